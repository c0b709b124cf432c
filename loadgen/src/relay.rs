//! The reference relay: the simplest STOMP forwarder that can carry the load generator's
//! workloads, to measure the load generator against and to set a ceiling for brokers.
//!
//! One thread per connection, everything in memory, no acknowledgements, no persistence:
//! CONNECT gets CONNECTED, SUBSCRIBE registers, SEND becomes a MESSAGE to every subscriber of a
//! `/topic/...` destination or to one subscriber (round robin) of any other destination, a
//! `receipt` header gets a RECEIPT, DISCONNECT closes. ACK and NACK are read and ignored.
//! Messages sent to a queue with no subscriber are kept in memory (up to
//! [`QUEUE_BACKLOG_MESSAGES_MAX`]) and handed to the first subscriber, which is what the backlog
//! workload needs; messages to a topic with no subscriber are dropped, as topics do.
//! Connections are not limited: this is a bench helper for loopback, not a server to expose.
//!
//! A SEND's MESSAGEs are written by the sender's thread straight into each subscriber's socket,
//! batched per read: everything decoded from one read is routed, then each touched subscriber
//! gets one write. A slow subscriber therefore slows its senders (TCP back-pressure), which is
//! the honest behaviour for a relay with no storage.
//!
//! It can also misbehave on purpose ([`Fault`]) so the load generator's loss, duplication and
//! reorder detector can be shown to fire, and answer as a STOMP 1.0 broker to exercise the
//! client's version fallback. In `sink` mode it forwards nothing at all, to show what the load
//! generator's producers reach when the broker costs nothing.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;

use stompd::codec::{Command, Decoded, Decoder, Frame, FrameWriter, Limits, Version};

/// Messages one queue keeps while it has no subscriber. 16 Mi messages is 16 times the largest
/// backlog the comparison runs (1 M) yet bounds a mistaken run to a few GiB; past it the relay
/// drops, and the load generator reports the loss.
pub const QUEUE_BACKLOG_MESSAGES_MAX: usize = 16 * 1024 * 1024;

/// Each connection's read buffer: a few thousand small SENDs per read, so routing and writes
/// are batched; it grows (to twice the frame limit) only for a frame that does not fit.
const READ_BUFFER_BYTES: usize = 256 * 1024;

/// A deliberate fault, counted per destination over the messages it routes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Drop every Nth message.
    DropEvery(u64),
    /// Deliver every Nth message twice.
    DuplicateEvery(u64),
    /// Hold every Nth message back and deliver it after the next one.
    ReorderEvery(u64),
}

impl std::str::FromStr for Fault {
    type Err = String;

    /// `drop-every:N`, `duplicate-every:N` or `reorder-every:N`.
    fn from_str(text: &str) -> Result<Fault, String> {
        let (kind, count) = text
            .split_once(':')
            .ok_or_else(|| format!("expected KIND:N, got {text:?}"))?;
        let count: u64 = count
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("N must be a positive integer, got {count:?}"))?;
        match kind {
            "drop-every" => Ok(Fault::DropEvery(count)),
            "duplicate-every" => Ok(Fault::DuplicateEvery(count)),
            "reorder-every" => Ok(Fault::ReorderEvery(count)),
            _ => Err(format!(
                "unknown fault {kind:?} (drop-every, duplicate-every, reorder-every)"
            )),
        }
    }
}

#[derive(Clone, Debug)]
pub struct RelayConfig {
    pub fault: Option<Fault>,
    /// Answer CONNECT as a broker that speaks at most this version.
    pub version_max: Version,
    /// Accept SENDs and answer receipts, forward nothing.
    pub sink: bool,
}

impl Default for RelayConfig {
    fn default() -> RelayConfig {
        RelayConfig {
            fault: None,
            version_max: Version::V1_2,
            sink: false,
        }
    }
}

/// A running relay. Its threads live as long as the process; tests simply let them.
pub struct Relay {
    pub address: SocketAddr,
}

/// Binds `address` (port 0 for a free one) and serves in background threads.
pub fn spawn(address: &str, config: RelayConfig) -> io::Result<Relay> {
    let listener = TcpListener::bind(address)?;
    let address = listener.local_addr()?;
    let shared = Arc::new(Shared {
        config,
        destinations: Mutex::new(HashMap::new()),
        next_connection: AtomicU64::new(1),
        next_message: AtomicU64::new(1),
    });
    thread::Builder::new()
        .name("relay-accept".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let shared = shared.clone();
                let _ = thread::Builder::new()
                    .name("relay-conn".into())
                    .spawn(move || {
                        // A connection's failure (a peer that vanished) ends only that
                        // connection.
                        let _ = serve(stream, &shared);
                    });
            }
        })?;
    Ok(Relay { address })
}

struct Shared {
    config: RelayConfig,
    destinations: Mutex<HashMap<Vec<u8>, Destination>>,
    next_connection: AtomicU64,
    next_message: AtomicU64,
}

type Writer = Arc<Mutex<TcpStream>>;

struct Subscriber {
    connection: u64,
    id: Vec<u8>,
    version: Version,
    writer: Writer,
}

#[derive(Default)]
struct Destination {
    subscribers: Vec<Subscriber>,
    /// Next subscriber for round-robin queue delivery.
    next: usize,
    /// Queue messages that arrived with no subscriber: (message-id, body).
    backlog: VecDeque<(u64, Vec<u8>)>,
    /// Messages routed so far, for faults.
    routed: u64,
    /// A message held back by [`Fault::ReorderEvery`]: its target and its encoded frame.
    held: Option<(usize, Vec<u8>)>,
}

/// Frames waiting for one subscriber's socket, gathered over one read.
struct Pending {
    connection: u64,
    writer: Writer,
    bytes: Vec<u8>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A thread that panicked mid-write leaves a socket that is merely closed soon; go on.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn serve(stream: TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let connection = shared.next_connection.fetch_add(1, Ordering::Relaxed);
    let writer: Writer = Arc::new(Mutex::new(stream.try_clone()?));
    let mut reader = stream;
    let mut decoder = Decoder::new(Limits::DEFAULT);
    let mut version = Version::V1_0;
    let mut buffer = vec![0u8; READ_BUFFER_BYTES];
    let (mut start, mut end) = (0usize, 0usize);
    let mut pending: Vec<Pending> = Vec::new();
    let mut own = Vec::with_capacity(4096);
    let result = 'connection: loop {
        let read = match reader.read(&mut buffer[end..]) {
            Ok(0) => break Ok(()),
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => break Err(error),
        };
        end += read;
        let mut closing = false;
        {
            let mut destinations: Option<MutexGuard<'_, HashMap<Vec<u8>, Destination>>> = None;
            loop {
                let decoded = match decoder.decode(&buffer[start..end]) {
                    Ok(decoded) => decoded,
                    Err(error) => {
                        let mut reply = FrameWriter::begin(&mut own, version, Command::Error);
                        reply.header(b"message", error.to_string().as_bytes());
                        reply.finish(b"");
                        closing = true;
                        break;
                    }
                };
                match decoded {
                    Decoded::NeedMore => break,
                    Decoded::Heartbeat { consumed } => start += consumed,
                    Decoded::Frame { frame, consumed } => {
                        start += consumed;
                        let destinations =
                            destinations.get_or_insert_with(|| lock(&shared.destinations));
                        let step = handle(
                            &frame,
                            shared,
                            destinations,
                            connection,
                            &writer,
                            &mut version,
                            &mut own,
                            &mut pending,
                        );
                        if step == Step::Close {
                            closing = true;
                            break;
                        }
                        if frame.command == Command::Connect || frame.command == Command::Stomp {
                            decoder.set_version(version);
                        }
                    }
                }
            }
        }
        if !own.is_empty() {
            lock(&writer).write_all(&own)?;
            own.clear();
        }
        // A subscriber that went away loses its messages and leaves the cache (which would
        // otherwise keep its socket open); the sender carries on.
        pending.retain_mut(|target| {
            if target.bytes.is_empty() {
                return true;
            }
            let written = lock(&target.writer).write_all(&target.bytes);
            target.bytes.clear();
            written.is_ok()
        });
        if closing {
            break 'connection Ok(());
        }
        if start == end {
            (start, end) = (0, 0);
        } else if end == buffer.len() {
            buffer.copy_within(start..end, 0);
            end -= start;
            start = 0;
            if end == buffer.len() {
                let bigger = buffer.len() * 2;
                if bigger > Limits::DEFAULT.frame_bytes_max * 2 {
                    break Err(io::Error::other("frame too large"));
                }
                buffer.resize(bigger, 0);
            }
        }
    };
    {
        let mut destinations = lock(&shared.destinations);
        for destination in destinations.values_mut() {
            destination
                .subscribers
                .retain(|subscriber| subscriber.connection != connection);
        }
    }
    // Other threads may still hold this socket's writer; shutting the socket down (not just
    // dropping our handle) closes the connection now and makes their writes fail.
    let _ = reader.shutdown(std::net::Shutdown::Both);
    result
}

#[derive(PartialEq, Eq)]
enum Step {
    Continue,
    Close,
}

#[allow(clippy::too_many_arguments)]
fn handle(
    frame: &Frame<'_>,
    shared: &Shared,
    destinations: &mut HashMap<Vec<u8>, Destination>,
    connection: u64,
    writer: &Writer,
    version: &mut Version,
    own: &mut Vec<u8>,
    pending: &mut Vec<Pending>,
) -> Step {
    let mut step = Step::Continue;
    match frame.command {
        Command::Connect | Command::Stomp => {
            let offered = frame.header(b"accept-version").unwrap_or(b"1.0");
            *version = offered
                .split(|&byte| byte == b',')
                .filter_map(Version::parse)
                .filter(|&v| v <= shared.config.version_max)
                .max()
                .unwrap_or(Version::V1_0);
            let mut reply = FrameWriter::begin(own, *version, Command::Connected);
            if *version > Version::V1_0 {
                reply
                    .header(b"version", version.as_str().as_bytes())
                    .header(b"heart-beat", b"0,0");
            }
            reply.header(b"server", b"stompd-relay");
            reply.finish(b"");
        }
        Command::Subscribe => {
            let (Some(name), Some(id)) = (frame.header(b"destination"), frame.header(b"id")) else {
                return error(own, *version, "SUBSCRIBE needs destination and id");
            };
            let destination = destinations.entry(name.to_vec()).or_default();
            destination.subscribers.push(Subscriber {
                connection,
                id: id.to_vec(),
                version: *version,
                writer: writer.clone(),
            });
            if !shared.config.sink && !destination.backlog.is_empty() {
                let index = destination.subscribers.len() - 1;
                let target = pending_for(pending, &destination.subscribers[index]);
                for (message_id, body) in destination.backlog.drain(..) {
                    let subscriber = &destination.subscribers[index];
                    write_message(&mut target.bytes, subscriber, name, message_id, &body);
                }
            }
        }
        Command::Unsubscribe => {
            let id = frame.header(b"id").unwrap_or(b"");
            for destination in destinations.values_mut() {
                destination
                    .subscribers
                    .retain(|s| s.connection != connection || s.id != id);
            }
        }
        Command::Send => {
            let Some(name) = frame.header(b"destination") else {
                return error(own, *version, "SEND needs a destination");
            };
            if !shared.config.sink {
                route(shared, destinations, name, frame.body, pending);
            }
        }
        Command::Disconnect => step = Step::Close,
        // No acknowledgement tracking: a relay with no storage has nothing to redeliver.
        _ => {}
    }
    if let Some(receipt) = frame.header(b"receipt") {
        let mut reply = FrameWriter::begin(own, *version, Command::Receipt);
        reply.header(b"receipt-id", receipt);
        reply.finish(b"");
    }
    step
}

fn error(own: &mut Vec<u8>, version: Version, message: &str) -> Step {
    let mut reply = FrameWriter::begin(own, version, Command::Error);
    reply.header(b"message", message.as_bytes());
    reply.finish(b"");
    Step::Close
}

fn route(
    shared: &Shared,
    destinations: &mut HashMap<Vec<u8>, Destination>,
    name: &[u8],
    body: &[u8],
    pending: &mut Vec<Pending>,
) {
    let message_id = shared.next_message.fetch_add(1, Ordering::Relaxed);
    let is_topic = name.starts_with(b"/topic/");
    let destination = match destinations.get_mut(name) {
        Some(destination) => destination,
        None if is_topic => return,
        None => destinations.entry(name.to_vec()).or_default(),
    };
    if destination.subscribers.is_empty() {
        if !is_topic && destination.backlog.len() < QUEUE_BACKLOG_MESSAGES_MAX {
            destination.backlog.push_back((message_id, body.to_vec()));
        }
        return;
    }
    destination.routed += 1;
    let nth = destination.routed;
    let targets = if is_topic {
        0..destination.subscribers.len()
    } else {
        let index = destination.next % destination.subscribers.len();
        destination.next = index + 1;
        index..index + 1
    };
    let copies = match shared.config.fault {
        Some(Fault::DropEvery(n)) if nth % n == 0 => 0,
        Some(Fault::DuplicateEvery(n)) if nth % n == 0 => 2,
        _ => 1,
    };
    let hold = matches!(shared.config.fault, Some(Fault::ReorderEvery(n)) if nth % n == 0);
    for index in targets {
        let subscriber = &destination.subscribers[index];
        if hold {
            let mut held = Vec::new();
            write_message(&mut held, subscriber, name, message_id, body);
            destination.held = Some((index, held));
            continue;
        }
        let target = pending_for(pending, subscriber);
        for _ in 0..copies {
            write_message(&mut target.bytes, subscriber, name, message_id, body);
        }
        if let Some((_, bytes)) = destination.held.take_if(|(held, _)| *held == index) {
            target.bytes.extend_from_slice(&bytes);
        }
    }
}

/// The pending buffer for `subscriber`'s connection, created on first use.
fn pending_for<'p>(pending: &'p mut Vec<Pending>, subscriber: &Subscriber) -> &'p mut Pending {
    let position = pending
        .iter()
        .position(|target| target.connection == subscriber.connection);
    match position {
        Some(position) => &mut pending[position],
        None => {
            if pending.len() > 64 {
                // Keep the per-connection cache bounded; empty entries are cheap to rebuild.
                pending.retain(|target| !target.bytes.is_empty());
            }
            pending.push(Pending {
                connection: subscriber.connection,
                writer: subscriber.writer.clone(),
                bytes: Vec::with_capacity(64 * 1024),
            });
            pending.last_mut().expect("just pushed")
        }
    }
}

fn write_message(
    out: &mut Vec<u8>,
    subscriber: &Subscriber,
    destination: &[u8],
    message_id: u64,
    body: &[u8],
) {
    let mut digits = [0u8; 20];
    let id = stompd::codec::format_u64(message_id, &mut digits);
    let mut frame = FrameWriter::begin(out, subscriber.version, Command::Message);
    frame
        .header(b"destination", destination)
        .header(b"message-id", id)
        .header(b"subscription", &subscriber.id);
    if subscriber.version == Version::V1_2 {
        frame.header(b"ack", id);
    }
    frame.content_length(body.len());
    frame.finish(body);
}
