//! The handler seam with a handler written for the test: out-buffer backpressure through
//! `is_out_full` / `on_writable`, and the hard backstop for a handler that ignores it.

mod server_common;

use std::collections::HashMap;
use std::io::Read;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use server_common::{eventually, test_config, READ_TIMEOUT};
use socket2::{Domain, Socket, Type};
use stompd::codec::Frame;
use stompd::server::{CloseReason, ConnId, Server, ShardHandler, ShardId, ShardIo, Shutdown};

const OUT_LIMIT: usize = 64 * 1024;
const CHUNK_BYTES: usize = 16 * 1024;

fn pattern(offset: usize) -> u8 {
    (offset % 251) as u8
}

/// Answers a frame whose body is a decimal byte count with that many pattern bytes, written
/// in chunks while the out buffer has room (or regardless, when `ignore_limit`).
struct Streamer {
    ignore_limit: bool,
    /// Per connection: bytes written so far and bytes asked for.
    streams: HashMap<ConnId, (usize, usize)>,
    closes: Arc<Mutex<Vec<CloseReason>>>,
    writable_calls: Arc<AtomicU64>,
}

impl Streamer {
    fn pump(&mut self, conn: ConnId, io: &mut ShardIo<'_, ()>) {
        let Some((written, total)) = self.streams.get_mut(&conn) else {
            return;
        };
        while *written < *total && (self.ignore_limit || !io.is_out_full(conn)) {
            let length = CHUNK_BYTES.min(*total - *written);
            let start = *written;
            if !io.write_with(conn, |out| out.extend((start..start + length).map(pattern))) {
                return;
            }
            *written += length;
        }
    }
}

impl ShardHandler for Streamer {
    type PeerMsg = ();

    fn on_open(&mut self, _conn: ConnId, _io: &mut ShardIo<'_, ()>) {}

    fn on_frame(&mut self, conn: ConnId, frame: &Frame<'_>, io: &mut ShardIo<'_, ()>) {
        let total: usize = std::str::from_utf8(frame.body).unwrap().parse().unwrap();
        self.streams.insert(conn, (0, total));
        self.pump(conn, io);
    }

    fn on_writable(&mut self, conn: ConnId, io: &mut ShardIo<'_, ()>) {
        self.writable_calls.fetch_add(1, Ordering::SeqCst);
        self.pump(conn, io);
    }

    fn on_close(&mut self, conn: ConnId, reason: &CloseReason, _io: &mut ShardIo<'_, ()>) {
        self.streams.remove(&conn);
        self.closes.lock().unwrap().push(reason.clone());
    }

    fn on_peer(&mut self, _from: ShardId, _msg: (), _io: &mut ShardIo<'_, ()>) {}
}

struct Running {
    addr: std::net::SocketAddr,
    stats: stompd::server::StatsHandle,
    closes: Arc<Mutex<Vec<CloseReason>>>,
    writable_calls: Arc<AtomicU64>,
    shutdown: Shutdown,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.trigger();
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

fn start(ignore_limit: bool) -> Running {
    let mut config = test_config(1);
    config.out_buffer_bytes_max = OUT_LIMIT;
    config.limits.frame_bytes_max = 64 * 1024;
    let server = Server::bind(config).unwrap();
    let closes = Arc::new(Mutex::new(Vec::new()));
    let writable_calls = Arc::new(AtomicU64::new(0));
    let shutdown = Shutdown::new();
    let addr = server.local_addr();
    let stats = server.stats();
    let thread = {
        let (closes, writable_calls, shutdown) =
            (closes.clone(), writable_calls.clone(), shutdown.clone());
        std::thread::spawn(move || {
            server
                .run(
                    move |_, _| Streamer {
                        ignore_limit,
                        streams: HashMap::new(),
                        closes: closes.clone(),
                        writable_calls: writable_calls.clone(),
                    },
                    shutdown,
                )
                .unwrap()
        })
    };
    Running {
        addr,
        stats,
        closes,
        writable_calls,
        shutdown,
        thread: Some(thread),
    }
}

fn small_window_client(addr: std::net::SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&addr.into()).unwrap();
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    stream
}

fn out_bytes(stats: &stompd::server::StatsHandle) -> u64 {
    stats.shards().iter().map(|shard| shard.out_bytes).sum()
}

#[test]
fn a_full_out_buffer_pauses_the_handler_until_on_writable() {
    let server = start(false);
    let mut client = small_window_client(server.addr);
    let total = 4 * 1024 * 1024;
    std::io::Write::write_all(&mut client, format!("SEND\n\n{total}\0").as_bytes()).unwrap();

    // The handler stops at the limit while the client does not read.
    assert!(eventually(Duration::from_secs(10), || out_bytes(
        &server.stats
    ) >= OUT_LIMIT
        as u64));
    assert!(out_bytes(&server.stats) < (OUT_LIMIT + CHUNK_BYTES) as u64);

    let mut received = 0usize;
    let mut buffer = vec![0u8; 64 * 1024];
    while received < total {
        let count = client.read(&mut buffer).expect("read within the timeout");
        assert!(count > 0, "EOF after {received} bytes");
        for (index, &byte) in buffer[..count].iter().enumerate() {
            assert_eq!(byte, pattern(received + index), "byte {}", received + index);
        }
        received += count;
    }
    assert!(server.writable_calls.load(Ordering::SeqCst) > 0);
    assert!(server.closes.lock().unwrap().is_empty());
}

#[test]
fn a_handler_that_ignores_the_limit_gets_the_connection_closed() {
    let server = start(true);
    let mut client = small_window_client(server.addr);
    std::io::Write::write_all(&mut client, b"SEND\n\n100000000\0").unwrap();
    assert!(eventually(Duration::from_secs(10), || !server
        .closes
        .lock()
        .unwrap()
        .is_empty()));
    assert_eq!(
        server.closes.lock().unwrap()[0],
        CloseReason::OutBufferOverflow
    );
    // The slot is released and nothing stays buffered.
    assert!(eventually(Duration::from_secs(10), || {
        let stats = server.stats.shards();
        stats[0].connections_open == 0 && stats[0].out_bytes == 0
    }));
}

/// Echoes each frame's body followed by an EOL; a body of `pause` pauses reading from that
/// connection until the next tick.
struct Pauser {
    paused: Vec<ConnId>,
}

impl ShardHandler for Pauser {
    type PeerMsg = ();

    fn on_open(&mut self, _conn: ConnId, _io: &mut ShardIo<'_, ()>) {}

    fn on_frame(&mut self, conn: ConnId, frame: &Frame<'_>, io: &mut ShardIo<'_, ()>) {
        io.write(conn, frame.body);
        io.write(conn, b"\n");
        if frame.body == b"pause" {
            io.pause_reading(conn);
            self.paused.push(conn);
        }
    }

    fn on_close(&mut self, _conn: ConnId, _reason: &CloseReason, _io: &mut ShardIo<'_, ()>) {}

    fn on_peer(&mut self, _from: ShardId, _msg: (), _io: &mut ShardIo<'_, ()>) {}

    fn on_tick(&mut self, io: &mut ShardIo<'_, ()>) {
        for conn in self.paused.drain(..) {
            io.resume_reading(conn);
        }
    }
}

#[test]
fn frames_received_while_paused_are_decoded_on_resume_without_new_input() {
    let server = Server::bind(test_config(1)).unwrap();
    let addr = server.local_addr();
    let shutdown = Shutdown::new();
    let thread = {
        let shutdown = shutdown.clone();
        std::thread::spawn(move || {
            server
                .run(|_, _| Pauser { paused: Vec::new() }, shutdown)
                .unwrap()
        })
    };
    let mut client = TcpStream::connect(addr).unwrap();
    client.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    // One write: the last two frames arrive while reading is paused.
    std::io::Write::write_all(&mut client, b"SEND\n\npause\0SEND\n\na\0SEND\n\nb\0").unwrap();
    let mut replies = Vec::new();
    let mut buffer = [0u8; 256];
    while replies.len() < b"pause\na\nb\n".len() {
        let count = client.read(&mut buffer).expect("read within the timeout");
        assert!(count > 0, "EOF");
        replies.extend_from_slice(&buffer[..count]);
    }
    assert_eq!(replies, b"pause\na\nb\n");
    shutdown.trigger();
    thread.join().unwrap();
}

/// Submits a NOP per frame with the frame's number as token, and answers when it completes.
struct Submitter {
    frames: u64,
    conn: Option<ConnId>,
}

impl ShardHandler for Submitter {
    type PeerMsg = ();

    fn on_open(&mut self, conn: ConnId, _io: &mut ShardIo<'_, ()>) {
        self.conn = Some(conn);
    }

    fn on_frame(&mut self, _conn: ConnId, _frame: &Frame<'_>, io: &mut ShardIo<'_, ()>) {
        self.frames += 1;
        // SAFETY: a NOP refers to no memory.
        unsafe { io.submit(io_uring::opcode::Nop::new().build(), self.frames) };
    }

    fn on_completion(&mut self, token: u64, result: i32, _flags: u32, io: &mut ShardIo<'_, ()>) {
        if let Some(conn) = self.conn {
            io.write(conn, format!("done {token} {result}\n").as_bytes());
        }
    }

    fn on_close(&mut self, _conn: ConnId, _reason: &CloseReason, _io: &mut ShardIo<'_, ()>) {}

    fn on_peer(&mut self, _from: ShardId, _msg: (), _io: &mut ShardIo<'_, ()>) {}
}

#[test]
fn operations_a_handler_submits_complete_back_to_it() {
    let server = Server::bind(test_config(1)).unwrap();
    let addr = server.local_addr();
    let shutdown = Shutdown::new();
    let thread = {
        let shutdown = shutdown.clone();
        std::thread::spawn(move || {
            server
                .run(
                    |_, _| Submitter {
                        frames: 0,
                        conn: None,
                    },
                    shutdown,
                )
                .unwrap()
        })
    };
    let mut client = TcpStream::connect(addr).unwrap();
    client.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    std::io::Write::write_all(&mut client, b"SEND\n\n\0SEND\n\n\0").unwrap();
    let expected = b"done 1 0\ndone 2 0\n";
    let mut replies = Vec::new();
    let mut buffer = [0u8; 256];
    while replies.len() < expected.len() {
        let count = client.read(&mut buffer).expect("read within the timeout");
        assert!(count > 0, "EOF");
        replies.extend_from_slice(&buffer[..count]);
    }
    assert_eq!(replies, expected);
    shutdown.trigger();
    thread.join().unwrap();
}
