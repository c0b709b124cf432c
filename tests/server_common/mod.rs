//! Shared pieces of the server tests: a relay server on a free 127.0.0.1 port in a thread, and a
//! blocking STOMP client whose every read has a timeout.

#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use stompd::codec::{Command, Decoded, Decoder, Frame, Limits};
use stompd::server::{relay::Relay, Server, ServerConfig, ServerError, Shutdown, StatsHandle};

/// Every read waits at most this long; a test that hangs fails instead.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

pub fn test_config(shards: usize) -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards,
        // Small rings keep the tests light on a shared machine.
        recv_buffers_count: 64,
        ring_entries: 256,
        ..ServerConfig::default()
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub stats: StatsHandle,
    shutdown: Shutdown,
    thread: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    pub fn start(config: ServerConfig) -> TestServer {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
        let heartbeat = config.heartbeat;
        let server = Server::bind(config).expect("server binds");
        let addr = server.local_addr();
        let stats = server.stats();
        let shutdown = Shutdown::new();
        let signal = shutdown.clone();
        let thread = std::thread::spawn(move || {
            server.run(
                move |shard, shards| Relay::new(shard, shards, heartbeat),
                signal,
            )
        });
        TestServer {
            addr,
            stats,
            shutdown,
            thread: Some(thread),
        }
    }

    pub fn client(&self) -> Client {
        Client::connect(self.addr)
    }

    /// Stops the server and returns its result.
    pub fn stop(mut self) -> Result<(), ServerError> {
        self.shutdown.trigger();
        self.thread.take().unwrap().join().expect("server thread")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.trigger();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub struct Client {
    pub stream: TcpStream,
    buffer: Vec<u8>,
    decoder: Decoder,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        Client::from_stream(stream)
    }

    pub fn from_stream(stream: TcpStream) -> Client {
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Client {
            stream,
            buffer: Vec::new(),
            decoder: Decoder::new(Limits::DEFAULT),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// CONNECT as STOMP 1.2 and expect CONNECTED.
    pub fn stomp_connect(&mut self) -> OwnedFrame {
        self.send(b"CONNECT\naccept-version:1.2\nhost:test\n\n\0");
        let frame = self.read_frame();
        assert_eq!(frame.command, Command::Connected, "{frame:?}");
        frame
    }

    /// The next frame, skipping heart-beat EOLs. Panics on timeout or EOF.
    pub fn read_frame(&mut self) -> OwnedFrame {
        self.try_read_frame().expect("a frame before EOF")
    }

    /// The next frame, or `None` at EOF (or a reset). Panics on timeout.
    pub fn try_read_frame(&mut self) -> Option<OwnedFrame> {
        loop {
            loop {
                let step = match self
                    .decoder
                    .decode(&self.buffer)
                    .expect("server frames decode")
                {
                    Decoded::Frame { frame, consumed } => {
                        (Some(OwnedFrame::from(&frame)), consumed)
                    }
                    Decoded::Heartbeat { consumed } => (None, consumed),
                    Decoded::NeedMore => break,
                };
                self.buffer.drain(..step.1);
                if let Some(frame) = step.0 {
                    return Some(frame);
                }
            }
            if !self.fill()? {
                return None;
            }
        }
    }

    /// Reads more bytes; `None`/`Some(false)` at EOF.
    fn fill(&mut self) -> Option<bool> {
        let mut chunk = [0u8; 64 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => Some(false),
            Ok(count) => {
                self.buffer.extend_from_slice(&chunk[..count]);
                Some(true)
            }
            Err(error) if error.kind() == ErrorKind::ConnectionReset => Some(false),
            Err(error) if error.kind() == ErrorKind::Interrupted => Some(true),
            Err(error) => panic!("read failed (timeout?): {error}"),
        }
    }

    /// Reads raw bytes until at least one arrives; returns them. Panics on timeout.
    pub fn read_raw(&mut self) -> Vec<u8> {
        if self.buffer.is_empty() {
            assert_eq!(self.fill(), Some(true), "bytes before EOF");
        }
        std::mem::take(&mut self.buffer)
    }

    /// Waits for EOF, ignoring frames. Panics if none comes within the read timeout.
    pub fn expect_eof(&mut self) {
        while self.try_read_frame().is_some() {}
    }
}

/// A frame copied out of the client's buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedFrame {
    pub command: Command,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl OwnedFrame {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

impl From<&Frame<'_>> for OwnedFrame {
    fn from(frame: &Frame<'_>) -> OwnedFrame {
        OwnedFrame {
            command: frame.command,
            headers: frame
                .headers
                .iter()
                .map(|header| {
                    (
                        String::from_utf8_lossy(&header.name).into_owned(),
                        String::from_utf8_lossy(&header.value).into_owned(),
                    )
                })
                .collect(),
            body: frame.body.to_vec(),
        }
    }
}

/// Polls `condition` until it holds or `limit` passes (the bound keeps the test finite; it is
/// not a performance threshold).
pub fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    condition()
}
