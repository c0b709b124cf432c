//! The server as a process: signals drain and exit 0; io_uring setup failures say what to fix.

mod server_common;

use std::io::{BufRead, BufReader};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use server_common::{test_config, Client};
use stompd::codec::Command;
use stompd::server::{self, relay::Relay, Server, ServerError, Shutdown};

/// Set in the environment of the child this test binary starts of itself.
const CHILD_ENV: &str = "STOMPD_TEST_CHILD_SERVER";

/// Runs in the child process only (see `signal_drains_and_exits_zero`): a relay server that
/// stops on SIGINT/SIGTERM like the real binary.
#[test]
#[ignore = "run as a child process by signal_drains_and_exits_zero"]
fn child_server() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let config = test_config(2);
    let heartbeat = config.heartbeat;
    let server = Server::bind(config).expect("bind");
    println!("LISTENING {}", server.local_addr());
    let shutdown = Shutdown::new();
    server::shutdown_on_signals(&shutdown).expect("signal thread");
    server
        .run(
            move |shard, shards| Relay::new(shard, shards, heartbeat),
            shutdown,
        )
        .expect("clean run");
}

fn signal_drains_and_exits_zero(signal: libc::c_int) {
    let mut child = Process::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_server",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start child");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("the child prints its address").unwrap();
        // The harness prints "test child_server ... " on the same line first.
        if let Some((_, addr)) = line.split_once("LISTENING ") {
            break addr.trim().parse().unwrap();
        }
    };
    // Keep draining the child's stdout so it never blocks on a full pipe.
    let drain = std::thread::spawn(move || lines.for_each(drop));

    let mut client = Client::connect(addr);
    client.stomp_connect();
    client.send(b"SUBSCRIBE\nid:0\ndestination:/topic/t\nreceipt:s\n\n\0");
    assert_eq!(client.read_frame().command, Command::Receipt);
    client.send(b"SEND\ndestination:/topic/t\nreceipt:p\n\nbefore the signal\0");
    // The receipt and the message, in either order.
    let mut commands = vec![client.read_frame().command, client.read_frame().command];
    commands.sort_by_key(|command| command.as_bytes());
    assert_eq!(commands, vec![Command::Message, Command::Receipt]);

    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
    client.expect_eof();

    // Bounded wait for the exit; the drain deadline is 5 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the server did not exit after the signal");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drain.join().unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn sigterm_drains_and_exits_zero() {
    signal_drains_and_exits_zero(libc::SIGTERM);
}

#[test]
fn sigint_drains_and_exits_zero() {
    signal_drains_and_exits_zero(libc::SIGINT);
}

/// A seccomp filter on this thread makes io_uring_setup fail with EPERM, as Docker's default
/// profile does; binding must fail with an error that names the cause and the fix.
#[cfg(target_arch = "x86_64")]
#[test]
fn io_uring_blocked_by_seccomp_gives_an_error_naming_the_fix() {
    // Runs on its own thread: seccomp filters stick to the thread that installs them.
    let result = std::thread::spawn(|| {
        const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
        const IO_URING_SETUP: u32 = 425;
        let load_word = 0x20; // BPF_LD | BPF_W | BPF_ABS
        let jump_equal = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
        let ret = 0x06; // BPF_RET | BPF_K
        let mut program = [
            libc::sock_filter {
                code: load_word,
                jt: 0,
                jf: 0,
                k: 4,
            }, // arch
            libc::sock_filter {
                code: jump_equal,
                jt: 0,
                jf: 3,
                k: AUDIT_ARCH_X86_64,
            },
            libc::sock_filter {
                code: load_word,
                jt: 0,
                jf: 0,
                k: 0,
            }, // syscall number
            libc::sock_filter {
                code: jump_equal,
                jt: 0,
                jf: 1,
                k: IO_URING_SETUP,
            },
            libc::sock_filter {
                code: ret,
                jt: 0,
                jf: 0,
                k: 0x0005_0000 | libc::EPERM as u32,
            },
            libc::sock_filter {
                code: ret,
                jt: 0,
                jf: 0,
                k: 0x7fff_0000,
            },
        ];
        let filter = libc::sock_fprog {
            len: program.len() as u16,
            filter: program.as_mut_ptr(),
        };
        // SAFETY: prctl with a valid filter program that outlives the call.
        unsafe {
            assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
            assert_eq!(
                libc::prctl(libc::PR_SET_SECCOMP, 2, &filter as *const libc::sock_fprog),
                0
            );
        }
        Server::bind(test_config(1)).map(|_| ())
    })
    .join()
    .unwrap();
    let error = result.expect_err("io_uring is blocked");
    assert!(matches!(error, ServerError::IoUring { .. }), "{error:?}");
    let text = error.to_string();
    assert!(text.contains("io_uring is disabled"), "{text}");
    assert!(text.contains("kernel.io_uring_disabled=0"), "{text}");
    assert!(text.contains("seccomp"), "{text}");
}
