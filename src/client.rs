//! A small blocking STOMP client: one TCP connection, driven by one thread.
//!
//! Built for load, not for applications: frames are written into one reusable buffer and go
//! out in batches on [`Connection::flush`] (a send costs a copy, not a syscall), and frames are
//! read into one reusable buffer and decoded in place by the broker's own [`Decoder`], then
//! handed to a closure while they still borrow that buffer. After warm-up neither path
//! allocates.
//!
//! It negotiates STOMP 1.2 and accepts whatever lower version the broker answers (a 1.0 broker
//! sends CONNECTED without a `version` header, STOMP 1.1 "Protocol Negotiation"), and asks for
//! no heart-beats unless told to.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::codec::{Command, DecodeError, Decoded, Decoder, Frame, FrameWriter, Limits, Version};
use thiserror::Error;

/// Read buffer size. 256 KiB holds a few thousand small MESSAGE frames per read, so a busy
/// consumer makes few syscalls; larger frames grow it up to the decoder's frame limit.
pub const READ_BUFFER_BYTES: usize = 256 * 1024;

/// How long a SUBSCRIBE may take to be confirmed: generous, since a broker busy with a
/// previous run may be slow, but finite so a broker that ignores receipts fails the run.
pub const SUBSCRIBE_RECEIPT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long CONNECT may take to be answered.
pub const CONNECTED_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a wait for a receipt wakes to check its deadline.
const RECEIPT_POLL: Duration = Duration::from_millis(50);

/// Pending writes are flushed once they pass this size even if the caller has not asked:
/// large enough to batch hundreds of small frames per write, small enough to stay in cache.
pub const WRITE_BATCH_BYTES: usize = 64 * 1024;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("connecting to {address}")]
    Connect {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("I/O with the broker")]
    Io(#[from] io::Error),
    #[error("the broker sent a frame we cannot decode")]
    Decode(#[from] DecodeError),
    #[error("the broker closed the connection")]
    Closed,
    #[error("the broker sent ERROR: {message}")]
    Broker { message: String },
    #[error("no {waiting_for} from the broker within {seconds} s")]
    Timeout {
        waiting_for: &'static str,
        seconds: f64,
    },
    #[error("expected {expected}, the broker sent {got}")]
    Unexpected {
        expected: &'static str,
        got: Command,
    },
}

/// How to reach and log in to a broker.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    pub host: String,
    pub port: u16,
    pub login: Option<String>,
    pub passcode: Option<String>,
    /// The `host` header: a virtual host to RabbitMQ, informational elsewhere.
    pub vhost: String,
    /// Highest version offered in `accept-version` (tests use lower to exercise fallback).
    pub version_max: Version,
    /// `heart-beat` we offer, in ms: (we send, we want). (0, 0) means none.
    pub heartbeat_ms: (u64, u64),
    /// Initial read buffer; it grows when a frame does not fit. Small for workloads that hold
    /// thousands of idle connections, large for busy consumers.
    pub read_buffer_bytes: usize,
}

impl ConnectOptions {
    pub fn local(port: u16) -> ConnectOptions {
        ConnectOptions {
            host: "127.0.0.1".to_string(),
            port,
            login: None,
            passcode: None,
            vhost: "/".to_string(),
            version_max: Version::V1_2,
            heartbeat_ms: (0, 0),
            read_buffer_bytes: READ_BUFFER_BYTES,
        }
    }
}

/// A connected, logged-in STOMP session.
pub struct Connection {
    stream: TcpStream,
    decoder: Decoder,
    read_buffer: Vec<u8>,
    /// Undecoded bytes are `read_buffer[read_start..read_end]`.
    read_start: usize,
    read_end: usize,
    /// Frames written but not yet flushed.
    pub out: Vec<u8>,
    version: Version,
    /// The `server` header of CONNECTED, for the report.
    server: Option<String>,
    read_timeout: Option<Duration>,
}

impl Connection {
    /// Opens a TCP connection, sends CONNECT and waits for CONNECTED.
    pub fn connect(options: &ConnectOptions) -> Result<Connection, ClientError> {
        let address = format!("{}:{}", options.host, options.port);
        // Tries every address the name resolves to ("localhost" may be ::1 first).
        let stream =
            TcpStream::connect((options.host.as_str(), options.port)).map_err(|source| {
                ClientError::Connect {
                    address: address.clone(),
                    source,
                }
            })?;
        // Load generation sends small frames back to back; Nagle would hold them for an ACK.
        stream.set_nodelay(true)?;
        let mut connection = Connection {
            stream,
            decoder: Decoder::new(Limits::DEFAULT),
            read_buffer: vec![0; options.read_buffer_bytes.max(64)],
            read_start: 0,
            read_end: 0,
            out: Vec::new(),
            version: Version::V1_0,
            server: None,
            read_timeout: None,
        };
        connection.handshake(options)?;
        Ok(connection)
    }

    fn handshake(&mut self, options: &ConnectOptions) -> Result<(), ClientError> {
        let accept = match options.version_max {
            Version::V1_0 => "1.0",
            Version::V1_1 => "1.0,1.1",
            Version::V1_2 => "1.0,1.1,1.2",
        };
        let heartbeat = format!("{},{}", options.heartbeat_ms.0, options.heartbeat_ms.1);
        {
            // CONNECT, not STOMP: 1.0 brokers (stompserver) only know CONNECT.
            let mut frame = FrameWriter::begin(&mut self.out, Version::V1_0, Command::Connect);
            frame
                .header(b"accept-version", accept.as_bytes())
                .header(b"host", options.vhost.as_bytes())
                .header(b"heart-beat", heartbeat.as_bytes());
            if let Some(login) = &options.login {
                frame.header(b"login", login.as_bytes());
            }
            if let Some(passcode) = &options.passcode {
                frame.header(b"passcode", passcode.as_bytes());
            }
            frame.finish(b"");
        }
        self.set_read_timeout(Some(CONNECTED_TIMEOUT))?;
        let (version, server) = self
            .next_frame_timeout(|frame, _| match frame.command {
                Command::Connected => {
                    // No version header: the broker speaks 1.0 (STOMP 1.1 "Protocol Negotiation").
                    let version = frame
                        .header(b"version")
                        .and_then(Version::parse)
                        .unwrap_or(Version::V1_0);
                    Ok((version, frame.header_str(b"server").map(str::to_string)))
                }
                other => Err(unexpected("CONNECTED", frame, other)),
            })?
            .ok_or(ClientError::Timeout {
                waiting_for: "CONNECTED",
                seconds: CONNECTED_TIMEOUT.as_secs_f64(),
            })??;
        self.set_read_timeout(None)?;
        self.version = version.min(options.version_max);
        self.server = server;
        self.decoder.set_version(self.version);
        Ok(())
    }

    pub fn version(&self) -> Version {
        self.version
    }

    pub fn server(&self) -> Option<&str> {
        self.server.as_deref()
    }

    /// How long [`Connection::next_frame_timeout`] waits for bytes; `None` blocks.
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ClientError> {
        if self.read_timeout != timeout {
            self.stream.set_read_timeout(timeout)?;
            self.read_timeout = timeout;
        }
        Ok(())
    }

    /// Starts a frame in the write buffer.
    pub fn frame(&mut self, command: Command) -> FrameWriter<'_> {
        FrameWriter::begin(&mut self.out, self.version, command)
    }

    /// Writes the buffered frames to the socket.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out)?;
            self.out.clear();
        }
        Ok(())
    }

    /// Flushes if enough has been buffered to make a good batch.
    pub fn flush_if_full(&mut self) -> Result<(), ClientError> {
        if self.out.len() >= WRITE_BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    pub fn subscribe(
        &mut self,
        destination: &str,
        id: &str,
        ack: &str,
        prefetch: u32,
        receipt: Option<&str>,
    ) -> Result<(), ClientError> {
        let mut frame = self.frame(Command::Subscribe);
        frame
            .header(b"destination", destination.as_bytes())
            .header(b"id", id.as_bytes())
            .header(b"ack", ack.as_bytes())
            // ActiveMQ and RabbitMQ each read their own name for the consumer window; without
            // one they push without limit (ActiveMQ) or one at a time (RabbitMQ, client acks).
            .header_u64(b"activemq.prefetchSize", u64::from(prefetch))
            .header_u64(b"prefetch-count", u64::from(prefetch));
        if let Some(receipt) = receipt {
            frame.header(b"receipt", receipt.as_bytes());
        }
        frame.finish(b"");
        if let Some(receipt) = receipt {
            self.flush()?;
            self.wait_receipt(receipt.as_bytes(), SUBSCRIBE_RECEIPT_TIMEOUT)?;
        }
        Ok(())
    }

    /// Sends DISCONNECT with a receipt and waits for it, so that everything sent before was
    /// processed (STOMP 1.2 "DISCONNECT": graceful shutdown). Frames that arrive meanwhile are
    /// dropped. The broker closes the connection after the receipt; drop it afterwards.
    pub fn disconnect(&mut self, timeout: Duration) -> Result<(), ClientError> {
        let mut frame = self.frame(Command::Disconnect);
        frame.header(b"receipt", b"client-bye");
        frame.finish(b"");
        self.wait_receipt(b"client-bye", timeout)
    }

    /// Flushes, then reads frames until the RECEIPT for `receipt_id`, ignoring MESSAGEs and
    /// other RECEIPTs; gives up after `timeout`.
    pub fn wait_receipt(
        &mut self,
        receipt_id: &[u8],
        timeout: Duration,
    ) -> Result<(), ClientError> {
        let deadline = Instant::now() + timeout;
        let previous = self.read_timeout;
        self.set_read_timeout(Some(RECEIPT_POLL))?;
        let result = loop {
            let seen = self.next_frame_timeout(|frame, _| match frame.command {
                Command::Receipt => Ok(frame.header(b"receipt-id") == Some(receipt_id)),
                Command::Message => Ok(false),
                other => Err(unexpected("RECEIPT", frame, other)),
            });
            match seen {
                Ok(Some(Ok(true))) => break Ok(()),
                Ok(Some(Ok(false))) | Ok(None) => {
                    if Instant::now() >= deadline {
                        break Err(ClientError::Timeout {
                            waiting_for: "RECEIPT",
                            seconds: timeout.as_secs_f64(),
                        });
                    }
                }
                Ok(Some(Err(error))) | Err(error) => break Err(error),
            }
        };
        self.set_read_timeout(previous)?;
        result
    }

    /// Blocks until a whole frame has arrived and hands it to `handle`. ERROR frames are
    /// handed over like any other; [`error_of`] turns one into a [`ClientError`].
    pub fn next_frame<R>(
        &mut self,
        mut handle: impl FnMut(&Frame<'_>) -> R,
    ) -> Result<R, ClientError> {
        loop {
            if let Some(result) = self.try_decode(&mut |frame, _| handle(frame))? {
                return Ok(result);
            }
            // `false` is a read timeout with no data: keep waiting, this call blocks.
            self.fill()?;
        }
    }

    /// Like [`Connection::next_frame`] but gives up after one read timeout with no whole
    /// frame, returning `None`; `handle` also gets the write buffer for replies.
    pub fn next_frame_timeout<R>(
        &mut self,
        mut handle: impl FnMut(&Frame<'_>, &mut Outbox<'_>) -> R,
    ) -> Result<Option<R>, ClientError> {
        loop {
            if let Some(result) = self.try_decode(&mut handle)? {
                return Ok(Some(result));
            }
            if !self.fill()? {
                return Ok(None);
            }
        }
    }

    /// Decodes one frame from what is buffered, if a whole one is there.
    fn try_decode<R>(
        &mut self,
        handle: &mut impl FnMut(&Frame<'_>, &mut Outbox<'_>) -> R,
    ) -> Result<Option<R>, ClientError> {
        loop {
            let input = &self.read_buffer[self.read_start..self.read_end];
            match self.decoder.decode(input)? {
                Decoded::NeedMore => return Ok(None),
                Decoded::Heartbeat { consumed } => self.read_start += consumed,
                Decoded::Frame { frame, consumed } => {
                    let mut outbox = Outbox {
                        out: &mut self.out,
                        version: self.version,
                    };
                    let result = handle(&frame, &mut outbox);
                    self.read_start += consumed;
                    return Ok(Some(result));
                }
            }
        }
    }

    /// Reads more bytes; `false` when the read timed out with nothing. Anything still in the
    /// write buffer goes out first: a consumer that batched its ACKs must not wait for
    /// messages the broker holds back until those ACKs arrive.
    fn fill(&mut self) -> Result<bool, ClientError> {
        self.flush()?;
        if self.read_start > 0 {
            // Move the partial frame to the front. The decoder's scan positions are relative
            // to the frame start, so they stay valid.
            self.read_buffer
                .copy_within(self.read_start..self.read_end, 0);
            self.read_end -= self.read_start;
            self.read_start = 0;
        }
        if self.read_end == self.read_buffer.len() {
            let limit = self.decoder.limits().frame_bytes_max + 1;
            let new_len = (self.read_buffer.len() * 2).min(limit);
            if new_len <= self.read_buffer.len() {
                // The decoder reports an oversized frame before this, so this is a guard.
                return Err(ClientError::Io(io::Error::other("frame larger than limit")));
            }
            self.read_buffer.resize(new_len, 0);
        }
        match self.stream.read(&mut self.read_buffer[self.read_end..]) {
            Ok(0) => Err(ClientError::Closed),
            Ok(read) => {
                self.read_end += read;
                Ok(true)
            }
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(false)
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => Ok(true),
            Err(error) => Err(error.into()),
        }
    }
}

impl Connection {
    /// After a failed write, the broker has often said why in an ERROR frame before closing
    /// (a refused SEND, a full disk): return that instead of the bare I/O error when it is
    /// there to read.
    pub fn explain(&mut self, error: ClientError) -> ClientError {
        if !matches!(error, ClientError::Io(_)) {
            return error;
        }
        // Whatever is still unsent is moot now; the socket is broken for writing.
        self.out.clear();
        if self.set_read_timeout(Some(EXPLAIN_WAIT)).is_err() {
            return error;
        }
        loop {
            match self.try_decode(&mut |frame, _| {
                (frame.command == Command::Error).then(|| error_of(frame))
            }) {
                Ok(Some(Some(broker_error))) => return broker_error,
                Ok(Some(None)) => continue,
                // `out` is empty, so fill only reads.
                Ok(None) => match self.fill() {
                    Ok(true) => continue,
                    _ => return error,
                },
                Err(_) => return error,
            }
        }
    }
}

/// How long [`Connection::explain`] waits for an ERROR frame after a failed write.
const EXPLAIN_WAIT: Duration = Duration::from_millis(200);

/// The write side, lent to a frame handler so it can answer (ACK) while the frame it answers
/// still borrows the read buffer.
pub struct Outbox<'c> {
    pub out: &'c mut Vec<u8>,
    pub version: Version,
}

impl Outbox<'_> {
    pub fn frame(&mut self, command: Command) -> FrameWriter<'_> {
        FrameWriter::begin(self.out, self.version, command)
    }
}

/// The broker's `message` header of an ERROR frame (and the body, which often explains more).
pub fn error_of(frame: &Frame<'_>) -> ClientError {
    let mut message = frame
        .header_str(b"message")
        .unwrap_or("(no message header)")
        .to_string();
    if !frame.body.is_empty() {
        message.push_str(": ");
        message.push_str(String::from_utf8_lossy(frame.body).trim_end());
    }
    ClientError::Broker { message }
}

fn unexpected(expected: &'static str, frame: &Frame<'_>, got: Command) -> ClientError {
    if got == Command::Error {
        error_of(frame)
    } else {
        ClientError::Unexpected { expected, got }
    }
}
