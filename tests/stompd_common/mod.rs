//! Shared helpers for the tests that run the real `stompd` binary: start it on port 0 (the
//! kernel picks a free port, so tests running at once never race for one; the port is read
//! from the broker's "listening on ADDR" line) with its own data directory, talk raw STOMP to it with a timeout on every read, stop it
//! with a signal or SIGKILL. Every wait has a deadline.

#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long the broker may take to listen (debug build, log recovery, a busy CI machine).
pub const START_DEADLINE: Duration = Duration::from_secs(20);
/// How long any single expected frame may take to arrive.
pub const FRAME_DEADLINE: Duration = Duration::from_secs(10);

pub struct Broker {
    pub port: u16,
    pub data_dir: PathBuf,
    child: Option<Child>,
    stderr_path: PathBuf,
}

/// Numbers the brokers' stderr files: the port is not known before the broker has started.
static BROKERS_STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The port of the first "listening on HOST:PORT" in a broker's stderr.
pub fn listening_port(stderr: &str) -> Option<u16> {
    stompd::run::listening::port_in(stderr)
}

/// Raises this test process's soft open-files limit to the hard one (as the broker does for
/// itself) and returns it: a test that opens a thousand sockets needs more than the usual soft
/// default of 1,024.
pub fn raise_open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read or fill the struct they are given.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit),
            0,
            "{}",
            std::io::Error::last_os_error()
        );
    }
    limit.rlim_cur
}

impl Broker {
    /// Starts stompd with `--data-dir <dir>/data` and `args`, and waits until it accepts.
    pub fn start(dir: &Path, args: &[&str]) -> Broker {
        Broker::start_with(dir, 0, args, |_| {})
    }

    /// Starts stompd on `port` (e.g. again on the port of a broker that was stopped).
    pub fn start_on(dir: &Path, port: u16, args: &[&str]) -> Broker {
        Broker::start_with(dir, port, args, |_| {})
    }

    /// Starts stompd on `port`, waiting up to `deadline` for it to listen (a restart that
    /// recovers a large log takes longer than `START_DEADLINE`).
    pub fn start_on_within(dir: &Path, port: u16, args: &[&str], deadline: Duration) -> Broker {
        Broker::start_with_deadline(dir, port, args, deadline, |_| {})
    }

    /// Starts stompd with a file-size limit (RLIMIT_FSIZE) of `bytes`, as `ulimit -f` would.
    pub fn start_file_size_limited(dir: &Path, args: &[&str], bytes: u64) -> Broker {
        use std::os::unix::process::CommandExt;
        Broker::start_with(dir, 0, args, |command| {
            // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child here.
            unsafe {
                command.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: bytes,
                        rlim_max: bytes,
                    };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        })
    }

    /// Starts stompd with its soft open-files limit lowered to `soft` (at most the hard one),
    /// as a shell's usual `ulimit -Sn 1024` would leave it.
    pub fn start_open_files_limited(dir: &Path, args: &[&str], soft: u64) -> Broker {
        use std::os::unix::process::CommandExt;
        Broker::start_with(dir, 0, args, |command| {
            // SAFETY: getrlimit and setrlimit are async-signal-safe; nothing else runs in the
            // child here.
            unsafe {
                command.pre_exec(move || {
                    let mut limit = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    limit.rlim_cur = soft.min(limit.rlim_max);
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        })
    }

    fn start_with(
        dir: &Path,
        port: u16,
        args: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Broker {
        Broker::start_with_deadline(dir, port, args, START_DEADLINE, configure)
    }

    fn start_with_deadline(
        dir: &Path,
        port: u16,
        args: &[&str],
        start_deadline: Duration,
        configure: impl FnOnce(&mut Command),
    ) -> Broker {
        let data_dir = dir.join("data");
        let number = BROKERS_STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stderr_path = dir.join(format!("stompd-{number}.log"));
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_stompd"));
        command
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(args)
            .stdout(Stdio::null())
            .stderr(stderr);
        configure(&mut command);
        let child = command.spawn().expect("starting stompd");
        let mut broker = Broker {
            port,
            data_dir,
            child: Some(child),
            stderr_path,
        };
        // The line is written once every listener is bound, so the broker accepts from then on.
        let deadline = Instant::now() + start_deadline;
        loop {
            if let Some(listening) = listening_port(&broker.stderr()) {
                assert!(port == 0 || listening == port, "{}", broker.stderr());
                broker.port = listening;
                break;
            }
            if let Some(status) = broker.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("stompd exited with {status}: {}", broker.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "stompd did not listen: {}",
                broker.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
        broker
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The broker process's soft open-files limit (`Max open files` in /proc/PID/limits).
    pub fn open_files_limit(&self) -> u64 {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.pid())).unwrap();
        let line = limits
            .lines()
            .find(|line| line.starts_with("Max open files"))
            .expect("Max open files");
        let soft = line["Max open files".len()..].split_whitespace().next();
        match soft {
            Some("unlimited") => u64::MAX,
            soft => soft.and_then(|soft| soft.parse().ok()).expect(line),
        }
    }

    /// Resident memory of the broker process, KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// Anonymous resident memory of the broker process, KiB (`RssAnon`: the heap and stacks,
    /// not the log's mapped segment pages, which the kernel can drop and write back).
    pub fn rss_anon_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("RssAnon:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("RssAnon")
    }

    /// SIGKILL, then wait until nothing listens on the port any more: the kernel tears a dead
    /// process's io_uring down asynchronously, and until then its listeners (held by the
    /// ring's pending accepts) stay in the SO_REUSEPORT group and can take, then drop, a
    /// connection meant for the next broker on the same port.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            self.wait_until_port_refuses();
        }
    }

    /// SIGKILL and reap, without waiting for the port: what a crash followed by an immediate
    /// restart looks like.
    pub fn kill9_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits (bounded) until nothing accepts on the port: a broker's listeners can outlive its
    /// exit for a moment (see `kill9`), after a clean stop too.
    fn wait_until_port_refuses(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` and waits for the exit, at most `deadline`.
    pub fn signal_and_wait(&mut self, signal: i32, deadline: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, signal) };
        let end = Instant::now() + deadline;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.wait_until_port_refuses();
                return status;
            }
            if Instant::now() > end {
                let _ = child.kill();
                let _ = child.wait();
                panic!("stompd did not exit within {deadline:?}: {}", self.stderr());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let end = Instant::now() + deadline;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > end {
                let _ = child.kill();
                let _ = child.wait();
                panic!("stompd did not exit within {deadline:?}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn client(&self) -> Client {
        Client::connect(self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One received frame.
#[derive(Clone, Debug)]
pub struct Frame {
    pub command: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Frame {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub struct Client {
    pub stream: TcpStream,
    buffer: Vec<u8>,
}

impl Client {
    pub fn connect(port: u16) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream.set_nodelay(true).unwrap();
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Client {
            stream,
            buffer: Vec::new(),
        }
    }

    /// CONNECT with `extra` header lines (e.g. "accept-version:1.2\n"); returns the reply.
    pub fn login(port: u16, extra: &str) -> (Client, Frame) {
        let mut client = Client::connect(port);
        client.send(&format!("CONNECT\n{extra}host:localhost\n\n\0"));
        let reply = client.expect_frame();
        (client, reply)
    }

    /// A 1.2 session, CONNECTED checked.
    pub fn stomp12(port: u16) -> Client {
        let (client, reply) = Client::login(port, "accept-version:1.2\n");
        assert_eq!(reply.command, "CONNECTED", "{reply:?}");
        client
    }

    pub fn send(&mut self, raw: &str) {
        self.send_bytes(raw.as_bytes());
    }

    pub fn send_bytes(&mut self, raw: &[u8]) {
        self.stream.write_all(raw).expect("write to stompd");
    }

    /// SEND with a body and extra header lines.
    pub fn publish(&mut self, destination: &str, extra: &str, body: &str) {
        self.send(&format!(
            "SEND\ndestination:{destination}\n{extra}content-length:{}\n\n{body}\0",
            body.len()
        ));
    }

    pub fn subscribe(&mut self, id: &str, destination: &str, ack: &str) {
        self.send(&format!(
            "SUBSCRIBE\nid:{id}\ndestination:{destination}\nack:{ack}\nreceipt:sub-{id}\n\n\0"
        ));
        let receipt = self.expect_frame();
        assert_eq!(receipt.command, "RECEIPT", "{receipt:?}");
    }

    pub fn expect_frame(&mut self) -> Frame {
        self.read_frame(FRAME_DEADLINE)
            .expect("a frame from stompd within the deadline")
    }

    /// The next frame, skipping heart-beat EOLs; `None` on timeout; panics on EOF.
    pub fn read_frame(&mut self, timeout: Duration) -> Option<Frame> {
        match self.read_frame_or_eof(timeout) {
            Ok(frame) => frame,
            Err(()) => panic!("stompd closed the connection; unread: {:?}", self.buffer),
        }
    }

    /// As `read_frame`, but the connection ending is `Err(())` instead of a panic.
    #[allow(clippy::result_unit_err)]
    pub fn read_frame_or_eof(&mut self, timeout: Duration) -> Result<Option<Frame>, ()> {
        let deadline = Instant::now() + timeout;
        loop {
            while matches!(self.buffer.first(), Some(b'\n') | Some(b'\r')) {
                self.buffer.remove(0);
            }
            if let Some(frame) = self.parse() {
                return Ok(Some(frame));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(()),
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Ok(None)
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Err(()),
            }
        }
    }

    /// Whether the server closed the connection (EOF or reset) within `timeout`, frames
    /// before it ignored.
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return false
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
    }

    fn parse(&mut self) -> Option<Frame> {
        let end = find(&self.buffer, b"\n\n")?;
        let head = String::from_utf8_lossy(&self.buffer[..end]).into_owned();
        let mut lines = head.split('\n').map(|l| l.trim_end_matches('\r'));
        let command = lines.next()?.to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        let body_start = end + 2;
        let length = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok());
        let body_end = match length {
            Some(length) => {
                if self.buffer.len() < body_start + length + 1 {
                    return None;
                }
                body_start + length
            }
            None => body_start + self.buffer[body_start..].iter().position(|&b| b == 0)?,
        };
        let body = self.buffer[body_start..body_end].to_vec();
        assert_eq!(self.buffer[body_end], 0, "frame ends with NUL");
        self.buffer.drain(..=body_end);
        Some(Frame {
            command,
            headers,
            body,
        })
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
