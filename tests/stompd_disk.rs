//! The disk budget through the real broker (`--disk-bytes-max`): as the log fills, a producer
//! is paused first; a connection that is never paused (it consumes with client acks) then gets
//! ERROR `message not stored: disk_bytes_max exceeded` once a SEND would take the log past the
//! budget; and once the queue is consumed and its segments reclaimed, the paused producer goes
//! on and producing works again.
//!
//! Every wait is bounded by a deadline; whether the producer was paused is read from the order
//! of the queue (its next message comes after everything sent meanwhile), not from a timer.

mod stompd_common;

use std::path::Path;
use std::time::Duration;

use stompd_common::{Broker, Client, Frame};

/// The longest any one step waits (a debug build, `fsync always`, a busy machine).
const STEP_DEADLINE: Duration = Duration::from_secs(60);
const SEGMENT_BYTES: u64 = 65_536;
/// Eight segments: producers are paused past seven (seven eighths), released under six.
const DISK_BYTES_MAX: u64 = 8 * SEGMENT_BYTES;
const BODY_BYTES: usize = 1024;
const QUEUE: &str = "/queue/disk";

/// Bytes of the files in the shard's log directory: the segments, the spare and the
/// reclaimed file kept for reuse, which is what the budget counts.
fn log_bytes(data_dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(data_dir.join("shard-0")) else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|entry| entry.metadata().ok())
        .filter(|metadata| metadata.is_file())
        .map(|metadata| metadata.len())
        .sum()
}

/// A body of `BODY_BYTES` that starts with `tag`.
fn body(tag: &str) -> String {
    let mut body = format!("{tag}-");
    body.extend(std::iter::repeat('x').take(BODY_BYTES - body.len()));
    body
}

/// SEND with a receipt, then the reply (RECEIPT or ERROR).
fn send_receipted(client: &mut Client, tag: &str) -> Frame {
    client.publish(QUEUE, &format!("receipt:{tag}\n"), &body(tag));
    client
        .read_frame(STEP_DEADLINE)
        .unwrap_or_else(|| panic!("no reply to {tag}"))
}

fn tag_of(message: &Frame) -> String {
    let text = message.body_str();
    text.split('-').next().unwrap_or_default().to_owned()
}

#[test]
fn a_filling_disk_pauses_producers_then_refuses_and_consuming_lets_them_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(
        dir.path(),
        &[
            "--shards",
            "1",
            "--segment-bytes",
            &SEGMENT_BYTES.to_string(),
            "--disk-bytes-max",
            &DISK_BYTES_MAX.to_string(),
        ],
    );
    assert!(
        broker
            .stderr()
            .contains(&format!("disk_bytes_max={DISK_BYTES_MAX}")),
        "the start-up line names the budget: {}",
        broker.stderr()
    );
    let pause_level = DISK_BYTES_MAX - DISK_BYTES_MAX / 8;

    // The producer sends one message at a time until the log holds past seven eighths: the
    // SEND after that is taken (it gets its RECEIPT) and pauses the producer.
    let mut producer = Client::stomp12(broker.port);
    let mut taken: Vec<String> = Vec::new();
    loop {
        let past_pause_level = log_bytes(&broker.data_dir) > pause_level;
        let tag = format!("a{}", taken.len());
        let reply = send_receipted(&mut producer, &tag);
        assert_eq!(reply.command, "RECEIPT", "{reply:?}");
        taken.push(tag);
        if past_pause_level {
            break;
        }
        assert!(
            taken.len() < 2 * (DISK_BYTES_MAX as usize / BODY_BYTES),
            "the log never reached the pause level: {} bytes",
            log_bytes(&broker.data_dir)
        );
    }
    // Not read while the producer is paused.
    producer.publish(QUEUE, "receipt:after-pause\n", &body("paused"));

    // A connection that consumes with client acks is never paused (its ACKs may be what
    // drains the log): it goes on until a SEND would take the log past the budget.
    let mut worker = Client::stomp12(broker.port);
    worker.subscribe("w", "/queue/elsewhere", "client");
    let mut worker_taken = 0;
    let refusal = loop {
        let tag = format!("b{worker_taken}");
        let reply = send_receipted(&mut worker, &tag);
        match reply.command.as_str() {
            "RECEIPT" => taken.push(tag),
            "ERROR" => break reply,
            _ => panic!("{reply:?}"),
        }
        worker_taken += 1;
        assert!(
            worker_taken < DISK_BYTES_MAX as usize / BODY_BYTES,
            "no SEND was refused at the budget"
        );
    };
    // The raw client does not unescape: `\c` is the colon (STOMP 1.2 "Value Encoding").
    assert_eq!(
        refusal.header("message"),
        Some("message not stored\\c disk_bytes_max exceeded"),
        "{refusal:?}"
    );
    assert!(log_bytes(&broker.data_dir) <= DISK_BYTES_MAX);
    assert!(worker_taken > 0, "the worker was refused at once");
    // The paused producer got nothing meanwhile: its SEND waits unread (were it read, it would
    // have been answered long ago, after all the worker's round trips).
    assert!(producer.read_frame(Duration::from_millis(100)).is_none());

    // Consuming frees the log: reclaim brings it under three quarters, a tick releases the
    // producer, and its waiting SEND is taken behind everything taken meanwhile.
    let mut consumer = Client::stomp12(broker.port);
    consumer.subscribe("c", QUEUE, "auto");
    for expected in &taken {
        let message = consumer
            .read_frame(STEP_DEADLINE)
            .unwrap_or_else(|| panic!("message {expected} did not arrive"));
        assert_eq!(message.command, "MESSAGE", "{message:?}");
        assert_eq!(&tag_of(&message), expected, "out of order");
    }
    let released = producer
        .read_frame(STEP_DEADLINE)
        .expect("the paused producer is released once the queue is consumed");
    assert_eq!(released.command, "RECEIPT", "{released:?}");
    assert_eq!(released.header("receipt-id"), Some("after-pause"));
    let message = consumer.read_frame(STEP_DEADLINE).expect("its message");
    assert_eq!(
        tag_of(&message),
        "paused",
        "the paused producer's SEND was taken after the worker's"
    );

    // Producing works again.
    let reply = send_receipted(&mut producer, "again");
    assert_eq!(reply.command, "RECEIPT", "{reply:?}");
    assert_eq!(
        tag_of(&consumer.read_frame(STEP_DEADLINE).expect("delivered")),
        "again"
    );
    assert!(log_bytes(&broker.data_dir) <= DISK_BYTES_MAX - DISK_BYTES_MAX / 4);
}
