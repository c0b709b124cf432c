//! The memory budget through the real broker (`--memory-bytes-max`): what clients make it
//! hold stays within the budget plus the fixed overhead docs/CONFIGURATION.md states, producers
//! are slowed before anything is refused, and the memory goes back once clients are gone.

mod stompd_common;

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use stompd_common::{Broker, Client, Frame};

/// The longest a whole test waits for anything to happen.
const TEST_DEADLINE: Duration = Duration::from_secs(180);
/// How long memory may take to go back to the operating system once clients are gone.
const RELEASE_DEADLINE: Duration = Duration::from_secs(30);
const MIB: usize = 1024 * 1024;
/// What docs/CONFIGURATION.md states as the fixed overhead on top of the budget, for the
/// two shards these tests run: receive rings, per-connection buffers, the heap's own slack.
const OVERHEAD_KIB: u64 = 128 * 1024;

/// These tests each push hundreds of MiB through a broker and read its memory: one at a time,
/// so they neither measure each other nor starve each other of CPU (and ephemeral ports: 30
/// clients of one test can take the port another test's broker was about to listen on).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A SEND frame of a `bytes` body that starts with its sequence number.
fn send_frame(destination: &str, extra: &str, n: usize, bytes: usize) -> Vec<u8> {
    let mut frame =
        format!("SEND\ndestination:{destination}\ncontent-length:{bytes}\n{extra}\n").into_bytes();
    let start = frame.len();
    frame.extend_from_slice(format!("{n:08}-").as_bytes());
    frame.resize(start + bytes, b'x');
    frame.push(0);
    frame
}

/// Polls the broker's RssAnon until it is at most `bound_kib`; returns the last value.
fn wait_for_rss_anon_below(broker: &Broker, bound_kib: u64) -> u64 {
    let deadline = Instant::now() + RELEASE_DEADLINE;
    loop {
        let now = broker.rss_anon_kib();
        if now <= bound_kib || Instant::now() >= deadline {
            return now;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

enum Outcome {
    /// Every SEND was taken (the RECEIPT of the last came back); the connection still holds
    /// its open transaction.
    Holding(Client),
    /// The broker refused a SEND with this ERROR.
    Refused(Frame),
}

#[test]
fn transactions_past_the_budget_are_refused_and_their_memory_comes_back() {
    const CONNECTIONS: usize = 30;
    const SENDS: usize = 60;
    const BUDGET: u64 = 512 * MIB as u64;
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(
        dir.path(),
        &[
            "--shards",
            "2",
            "--queue-type",
            "memory",
            "--memory-bytes-max",
            &BUDGET.to_string(),
        ],
    );
    let baseline_kib = broker.rss_anon_kib();
    let port = broker.port;
    let finished = Arc::new(AtomicUsize::new(0));
    let senders: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            let finished = finished.clone();
            thread::spawn(move || {
                let mut client = Client::stomp12(port);
                client
                    .stream
                    .set_write_timeout(Some(TEST_DEADLINE))
                    .unwrap();
                client.send("BEGIN\ntransaction:t\n\n\0");
                for n in 0..SENDS {
                    let extra = if n + 1 == SENDS {
                        "transaction:t\nreceipt:all\n"
                    } else {
                        "transaction:t\n"
                    };
                    let frame = send_frame(&format!("/queue/tx{c}"), extra, n, MIB);
                    // A refused connection is closed: its writes then fail, and its ERROR
                    // waits to be read.
                    if client.stream.write_all(&frame).is_err() {
                        break;
                    }
                }
                let reply = client
                    .read_frame(TEST_DEADLINE)
                    .expect("a RECEIPT or an ERROR");
                finished.fetch_add(1, Ordering::Relaxed);
                match reply.command.as_str() {
                    "RECEIPT" => Outcome::Holding(client),
                    "ERROR" => Outcome::Refused(reply),
                    _ => panic!("unexpected {reply:?}"),
                }
            })
        })
        .collect();

    let mut peak_kib = 0;
    while finished.load(Ordering::Relaxed) < CONNECTIONS {
        peak_kib = peak_kib.max(broker.rss_anon_kib());
        thread::sleep(Duration::from_millis(20));
    }
    let outcomes: Vec<Outcome> = senders.into_iter().map(|s| s.join().unwrap()).collect();
    peak_kib = peak_kib.max(broker.rss_anon_kib());
    let bound_kib = BUDGET / 1024 + OVERHEAD_KIB;
    assert!(
        peak_kib <= bound_kib,
        "RssAnon reached {peak_kib} KiB, over the budget plus overhead ({bound_kib} KiB)"
    );
    let mut holding = Vec::new();
    let mut refused = 0;
    for outcome in outcomes {
        match outcome {
            Outcome::Holding(client) => holding.push(client),
            Outcome::Refused(error) => {
                let message = error.header("message").unwrap_or_default();
                assert!(
                    message.contains("memory_bytes_max exceeded"),
                    "refused for another reason: {error:?}"
                );
                refused += 1;
            }
        }
    }
    // 30 × 60 MiB cannot fit in 512 MiB.
    assert!(refused > 0, "nothing was refused");
    assert!(!holding.is_empty(), "nothing was taken");

    // While the budget is held, a new client is still served.
    let mut fresh = Client::stomp12(port);
    fresh.subscribe("f", "/queue/fresh", "auto");
    fresh.publish("/queue/fresh", "", "hello");
    let message = fresh.expect_frame();
    assert_eq!(message.command, "MESSAGE", "{message:?}");
    assert_eq!(message.body_str(), "hello");

    drop(holding);
    let bound_kib = baseline_kib + 64 * 1024;
    let after_kib = wait_for_rss_anon_below(&broker, bound_kib);
    assert!(
        after_kib <= bound_kib,
        "RssAnon still {after_kib} KiB {RELEASE_DEADLINE:?} after the transactions closed \
         (started at {baseline_kib} KiB, peaked at {peak_kib} KiB)"
    );
}

#[test]
fn a_consumer_that_does_not_read_slows_its_producer_and_then_gets_everything() {
    const MESSAGES: usize = 500;
    const BUDGET: u64 = 128 * MIB as u64;
    let _serial = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(
        dir.path(),
        &[
            "--shards",
            "2",
            "--queue-type",
            "memory",
            "--memory-bytes-max",
            &BUDGET.to_string(),
        ],
    );
    let mut consumer = Client::stomp12(broker.port);
    // The default window (1,000 messages, 4 MiB): pacing keeps what a window of 1 MiB
    // messages puts between the queue and a socket that is not read within the out buffer.
    consumer.send("SUBSCRIBE\nid:c\ndestination:/queue/slow\nack:auto\n\n\0");
    let port = broker.port;
    let written = Arc::new(AtomicUsize::new(0));
    let producer = {
        let written = written.clone();
        thread::spawn(move || {
            let mut producer = Client::stomp12(port);
            producer
                .stream
                .set_write_timeout(Some(TEST_DEADLINE))
                .unwrap();
            for n in 0..MESSAGES {
                producer.send_bytes(&send_frame("/queue/slow", "", n, MIB));
                written.store(n + 1, Ordering::Relaxed);
            }
            producer.send("DISCONNECT\nreceipt:bye\n\n\0");
            producer.read_frame(TEST_DEADLINE)
        })
    };

    // The consumer reads nothing: the producer must be held back (it stops making progress
    // with messages left to send) while the broker's memory stays bounded.
    let deadline = Instant::now() + TEST_DEADLINE;
    let mut peak_kib = 0;
    let mut last = usize::MAX;
    let mut still_since = Instant::now();
    loop {
        peak_kib = peak_kib.max(broker.rss_anon_kib());
        let now = written.load(Ordering::Relaxed);
        assert!(now < MESSAGES, "the producer was never held back");
        if now != last {
            last = now;
            still_since = Instant::now();
        } else if still_since.elapsed() > Duration::from_secs(3) {
            break;
        }
        assert!(Instant::now() < deadline, "the producer never stopped");
        thread::sleep(Duration::from_millis(20));
    }
    let bound_kib = BUDGET / 1024 + OVERHEAD_KIB;
    assert!(
        peak_kib <= bound_kib,
        "RssAnon reached {peak_kib} KiB, over the budget plus overhead ({bound_kib} KiB)"
    );

    for n in 0..MESSAGES {
        let frame = match consumer.read_frame_or_eof(TEST_DEADLINE) {
            Ok(Some(frame)) => frame,
            Ok(None) => panic!("message {n} did not arrive"),
            Err(()) => panic!(
                "the consumer's connection closed before message {n}: {}",
                broker.stderr()
            ),
        };
        assert_eq!(frame.command, "MESSAGE", "{:?}", frame.header("message"));
        assert_eq!(
            &frame.body[..9],
            format!("{n:08}-").as_bytes(),
            "message {n} out of order or lost"
        );
    }
    let reply = producer.join().unwrap().expect("the DISCONNECT's RECEIPT");
    assert_eq!(reply.command, "RECEIPT", "{:?}", reply.header("message"));
}
