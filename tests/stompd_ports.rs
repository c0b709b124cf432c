//! One broker per port: a second `stompd` on an address another one listens on exits with a
//! message naming the address (instead of sharing the port through SO_REUSEPORT and splitting
//! the clients between two brokers), and a broker restarted at once after `kill -9` waits for
//! the dead one's listeners to go, so no client that connects after it listens is reset.

mod stompd_common;

use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use stompd_common::{Broker, Client, FRAME_DEADLINE, START_DEADLINE};

/// Runs a second stompd on `listen` and returns its exit status and stderr; panics if it is
/// still running after the start deadline (it would be serving next to the first one).
fn second_broker(dir: &std::path::Path, listen: &str) -> (Option<i32>, String) {
    let stderr_path = dir.join("second.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_stompd"))
        .args(["--listen", listen, "--shards", "2", "--data-dir"])
        .arg(dir.join("second-data"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (
                status.code(),
                std::fs::read_to_string(&stderr_path).unwrap(),
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "a second broker on {listen} kept running: {}",
                std::fs::read_to_string(&stderr_path).unwrap()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_second_broker_on_the_same_address_exits_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let first = Broker::start(dir.path(), &["--shards", "2"]);
    let listen = format!("127.0.0.1:{}", first.port);
    let (code, stderr) = second_broker(dir.path(), &listen);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("already listens on {listen}")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("process {}", first.pid())),
        "{stderr}"
    );

    // The same address written as IPv4-mapped IPv6 is the same address. (The wildcard case,
    // 0.0.0.0, is covered by the unit tests of the overlap rule: tests listen on loopback only.)
    let mapped = format!("[::ffff:127.0.0.1]:{}", first.port);
    let (code, stderr) = second_broker(dir.path(), &mapped);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("already listens on {mapped}")),
        "{stderr}"
    );

    // The first broker still serves.
    let mut client = Client::stomp12(first.port);
    client.publish("/queue/still-here", "", "x");
}

#[test]
fn a_broker_restarted_at_once_after_kill_9_resets_no_connection() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..3 {
        let mut first = Broker::start(dir.path(), &["--shards", "2"]);
        let port = first.port;
        // Live sessions on both shards, so the dead broker leaves work for the kernel.
        let _clients: Vec<Client> = (0..8).map(|_| Client::stomp12(port)).collect();
        first.kill9_now();
        let second = Broker::start_on(dir.path(), port, &["--shards", "2"]);
        for attempt in 0..100 {
            let (mut client, reply) = Client::login(port, "accept-version:1.2\n");
            assert_eq!(
                reply.command, "CONNECTED",
                "round {round}, attempt {attempt}: {reply:?}"
            );
            client.send("DISCONNECT\nreceipt:bye\n\n\0");
            let receipt = client
                .read_frame(FRAME_DEADLINE)
                .expect("a RECEIPT for DISCONNECT");
            assert_eq!(receipt.command, "RECEIPT", "{receipt:?}");
        }
        drop(second);
    }
}

/// What a crashed broker leaves behind, made on purpose: a SO_REUSEPORT listener that no
/// descriptor holds any more, kept open only by an io_uring's pending accept, until the ring is
/// dropped when `release` says so (or after a minute, so the test cannot hang). Returns the port.
fn orphan_listener(release: mpsc::Receiver<()>) -> (u16, thread::JoinHandle<()>) {
    let (port_tx, port_rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        use std::os::fd::{AsRawFd, IntoRawFd};
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_reuse_address(true).unwrap();
        socket.set_reuse_port(true).unwrap();
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        socket.bind(&any.into()).unwrap();
        socket.listen(128).unwrap();
        let port = socket.local_addr().unwrap().as_socket().unwrap().port();
        let mut ring = io_uring::IoUring::new(8).unwrap();
        let accept = io_uring::opcode::AcceptMulti::new(io_uring::types::Fd(socket.as_raw_fd()))
            .build()
            .user_data(1);
        // SAFETY: the accept takes no buffers; the ring holds its own reference to the socket.
        unsafe { ring.submission().push(&accept).unwrap() };
        ring.submit().unwrap();
        // SAFETY: the descriptor is ours; closing it leaves the socket to the ring alone.
        unsafe { libc::close(socket.into_raw_fd()) };
        port_tx.send(port).unwrap();
        let _ = release.recv_timeout(Duration::from_secs(60));
        drop(ring);
    });
    (port_rx.recv().unwrap(), handle)
}

/// Everything the brokers started in `dir` wrote to stderr (the harness names their files
/// `stompd-N.log`).
fn brokers_stderr(dir: &std::path::Path) -> String {
    let mut all = String::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("stompd-") && name.ends_with(".log") {
            all += &std::fs::read_to_string(entry.path()).unwrap_or_default();
        }
    }
    all
}

#[test]
fn a_broker_waits_for_listeners_no_process_holds_before_it_listens() {
    let dir = tempfile::tempdir().unwrap();
    let (release, released) = mpsc::channel();
    let (port, orphan) = orphan_listener(released);
    // Started on another thread: `start_on` returns once the broker listens, which it must not
    // do while the orphan is there.
    let starting = {
        let dir = dir.path().to_owned();
        thread::spawn(move || Broker::start_on(&dir, port, &["--shards", "2"]))
    };
    // The orphan stays until the broker says it waits for it, however late the broker gets to
    // its port check on a busy machine.
    let deadline = Instant::now() + START_DEADLINE;
    while !brokers_stderr(dir.path()).contains("listeners of an exited process") {
        if starting.is_finished() || Instant::now() > deadline {
            let _ = release.send(());
            let _ = orphan.join();
            let stderr = brokers_stderr(dir.path());
            match starting.join() {
                Ok(_) => panic!("the broker listened without waiting for the orphan: {stderr}"),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
    release.send(()).unwrap();
    orphan.join().unwrap();
    let broker = match starting.join() {
        Ok(broker) => broker,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    // The ring goes asynchronously after the drop: a broker that did not wait for the orphan's
    // listener to be gone would share the port with it, and the first of these sessions would
    // land on it and get no CONNECTED.
    let sessions: Vec<Client> = (0..50)
        .map(|attempt| {
            let (client, reply) = Client::login(port, "accept-version:1.2\n");
            assert_eq!(reply.command, "CONNECTED", "attempt {attempt}: {reply:?}");
            client
        })
        .collect();
    drop(sessions);
    drop(broker);
}
