//! Producer flow control through the real broker: a producer that outruns its consumers is
//! slowed down (its input is not read) instead of being refused, and nothing is lost.

mod stompd_common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use stompd_common::{Broker, Client};

const MESSAGES: usize = 60_000;
/// The longest a whole test waits for anything to happen.
const TEST_DEADLINE: Duration = Duration::from_secs(120);

/// A body of `bytes` that starts with its sequence number.
fn body(n: usize, bytes: usize) -> String {
    let mut body = format!("{n:08}-");
    body.push_str(&"x".repeat(bytes - body.len()));
    body
}

/// Starts a producer thread that pipelines `MESSAGES` SENDs (no receipts: as fast as the
/// socket takes them), then DISCONNECTs with a receipt and returns the frames it got back.
fn spawn_producer(
    port: u16,
    destination: &'static str,
    body_bytes: usize,
    written: Arc<AtomicUsize>,
) -> thread::JoinHandle<Vec<stompd_common::Frame>> {
    thread::spawn(move || {
        let mut producer = Client::stomp12(port);
        // Paused producers wait for consumers; the test's own deadline bounds this.
        producer
            .stream
            .set_write_timeout(Some(TEST_DEADLINE))
            .unwrap();
        for n in 0..MESSAGES {
            producer.publish(destination, "", &body(n, body_bytes));
            written.store(n + 1, Ordering::Relaxed);
        }
        producer.send("DISCONNECT\nreceipt:bye\n\n\0");
        let mut frames = Vec::new();
        while let Some(frame) = producer.read_frame(TEST_DEADLINE) {
            let last = frame.header("receipt-id") == Some("bye") || frame.command == "ERROR";
            frames.push(frame);
            if last {
                break;
            }
        }
        frames
    })
}

/// Reads `MESSAGES` MESSAGE frames and checks they carry 0, 1, 2, … in order, counting them
/// in `progress`.
fn receive_all_in_order(consumer: &mut Client, progress: &AtomicUsize) {
    for n in 0..MESSAGES {
        let frame = consumer
            .read_frame(TEST_DEADLINE)
            .unwrap_or_else(|| panic!("message {n} did not arrive"));
        assert_eq!(frame.command, "MESSAGE", "{frame:?}");
        assert_eq!(
            &frame.body[..9],
            format!("{n:08}-").as_bytes(),
            "message {n} out of order or lost"
        );
        progress.store(n + 1, Ordering::Relaxed);
    }
}

/// `size:` of `queue` in a `/queue/monitor` statistics message (stompserver's layout).
fn monitored_size(statistics: &str, queue: &str) -> Option<u64> {
    let mut lines = statistics.lines();
    lines.find(|line| *line == format!("Queue: {queue}"))?;
    lines
        .next()?
        .strip_prefix("size: ")
        .and_then(|size| size.parse().ok())
}

#[test]
fn a_producer_faster_than_its_consumers_is_paused_not_refused() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(
        dir.path(),
        &["--shards", "2", "--queue-messages-max", "1000"],
    );
    let written = Arc::new(AtomicUsize::new(0));
    let producer = spawn_producer(broker.port, "/queue/flow", 1024, written.clone());

    // Nobody consumes yet: the queue fills past its limit, the producer is paused, and the
    // queue stops growing (two statistics reports in a row give the same size) while the
    // producer still has messages to send. What it sent meanwhile waits in socket buffers.
    let mut monitor = Client::stomp12(broker.port);
    monitor.subscribe("m", "/queue/monitor", "auto");
    let deadline = Instant::now() + TEST_DEADLINE;
    let mut last = None;
    loop {
        assert!(Instant::now() < deadline, "the queue never stopped growing");
        let statistics = monitor
            .read_frame(TEST_DEADLINE)
            // Every 5 s; the first that names the queue can take two rounds when the queue
            // lives on another core (each core reports the others' figures as last heard, and
            // sends nothing while it knows of no queue), more on a loaded machine.
            .expect("statistics from /queue/monitor")
            .body_str();
        let Some(size) = monitored_size(&statistics, "/queue/flow") else {
            continue;
        };
        if size > 1000 && last == Some(size) {
            break;
        }
        last = Some(size);
    }
    assert!(
        written.load(Ordering::Relaxed) < MESSAGES || last < Some(MESSAGES as u64),
        "the producer was never held back"
    );

    let mut consumer = Client::stomp12(broker.port);
    consumer.subscribe("c", "/queue/flow", "auto");
    receive_all_in_order(&mut consumer, &AtomicUsize::new(0));
    let replies = producer.join().unwrap();
    assert!(
        matches!(&replies[..], [receipt] if receipt.command == "RECEIPT"),
        "the producer got {replies:?}"
    );
}

#[test]
fn a_topic_subscriber_that_falls_behind_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // A stall limit far beyond the test's deadlines: on a loaded machine the subscribers may
    // stay full for seconds, and this test is about flow control, not about giving up on
    // slow subscribers (src/broker/tests/flow.rs tests that).
    let broker = Broker::start(
        dir.path(),
        &["--shards", "2", "--topic-subscriber-stall-ms", "600000"],
    );
    let mut fast = Client::stomp12(broker.port);
    fast.subscribe("f", "/topic/flow", "auto");
    let mut slow = Client::stomp12(broker.port);
    slow.subscribe("s", "/topic/flow", "auto");
    // 256 B bodies: what is already on its way when a subscriber fills (a peer queue of 4,096
    // messages and a turn's decoding) must fit the slack it still gets (8 MiB); with 1 KiB
    // bodies it may not, and the excess is dropped (docs/ARCHITECTURE.md, "Topic").
    let written = Arc::new(AtomicUsize::new(0));
    let producer = spawn_producer(broker.port, "/topic/flow", 256, written);
    let reader = thread::spawn(move || receive_all_in_order(&mut fast, &AtomicUsize::new(0)));
    // `slow` reads nothing for a second, so its connection fills and the producer, which
    // could send everything in that time, must wait for it rather than leave it behind.
    thread::sleep(Duration::from_secs(1));
    receive_all_in_order(&mut slow, &AtomicUsize::new(0));
    reader.join().unwrap();
    let replies = producer.join().unwrap();
    assert!(
        matches!(&replies[..], [receipt] if receipt.command == "RECEIPT"),
        "the producer got {replies:?}"
    );
}
