//! Paced delivery through the real broker: a backlog of large messages drains to consumers
//! that keep the default prefetch (the byte window hands them a few MiB at a time, the
//! session writes no more than the out buffer takes), nothing is dead-lettered for it, and a
//! consumer that goes away before its deliveries were sent does not push them toward the
//! dead-letter queue.

mod stompd_common;

use std::time::Duration;

use stompd_common::{Broker, Client};

/// The longest any one expected frame may take (a debug build moving MiBs on a busy machine).
const FRAME_WAIT: Duration = Duration::from_secs(60);
/// How long a queue must stay silent to count as empty, when checking that nothing more
/// arrives: the broker has nothing in flight by then in these tests.
const QUIET: Duration = Duration::from_millis(1500);

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// A body of `bytes` that starts with its sequence number.
fn body(n: usize, bytes: usize) -> String {
    let mut body = format!("{n:08}-");
    body.push_str(&"x".repeat(bytes - body.len()));
    body
}

fn sequence_of(frame: &stompd_common::Frame) -> usize {
    std::str::from_utf8(&frame.body[..8])
        .expect("a numbered body")
        .parse()
        .expect("a numbered body")
}

/// Sends `count` messages of `bytes` to `queue`, each with a receipt, and waits for every
/// receipt: the backlog is all in the queue before anyone subscribes.
fn produce(port: u16, queue: &str, count: usize, bytes: usize) {
    let mut producer = Client::stomp12(port);
    producer.stream.set_write_timeout(Some(FRAME_WAIT)).unwrap();
    for n in 0..count {
        producer.publish(queue, &format!("receipt:r{n}\n"), &body(n, bytes));
    }
    for n in 0..count {
        let receipt = producer
            .read_frame(FRAME_WAIT)
            .unwrap_or_else(|| panic!("receipt {n} did not arrive"));
        assert_eq!(receipt.command, "RECEIPT", "{receipt:?}");
        assert_eq!(receipt.header("receipt-id"), Some(format!("r{n}").as_str()));
    }
    producer.send("DISCONNECT\n\n\0");
}

/// Subscribes to `queue` with the default prefetch (no prefetch header) and `ack`.
fn consumer(port: u16, queue: &str, ack: &str) -> Client {
    let mut consumer = Client::stomp12(port);
    consumer.subscribe("s", queue, ack);
    consumer
}

/// Reads MESSAGEs numbered `expected` in that order, each of `bytes`, acknowledging each
/// under client-individual; then checks nothing more comes.
fn receive_in_order(consumer: &mut Client, ack: &str, expected: &[usize], bytes: usize) {
    for &n in expected {
        let frame = consumer
            .read_frame(FRAME_WAIT)
            .unwrap_or_else(|| panic!("message {n} did not arrive (the connection stayed open)"));
        assert_eq!(frame.command, "MESSAGE", "{:?}", frame.headers);
        assert_eq!(sequence_of(&frame), n, "lost, repeated or out of order");
        assert_eq!(frame.body.len(), bytes);
        if ack == "client-individual" {
            let id = frame.header("ack").expect("an ack header").to_string();
            consumer.send(&format!("ACK\nid:{id}\n\n\0"));
        }
    }
    assert!(
        consumer.read_frame(QUIET).is_none(),
        "a message arrived twice"
    );
}

/// The sequence numbers of what `/queue/DLQ.<name>` holds: the `expected` messages it must
/// hold, each waited for as long as any frame (a quiet spell on a busy machine does not cut
/// them short), then whatever more arrives before it stays quiet.
fn dead_letters(port: u16, queue: &str, expected: usize) -> Vec<usize> {
    let dlq = format!("/queue/DLQ.{}", queue.trim_start_matches("/queue/"));
    let mut reader = consumer(port, &dlq, "auto");
    let mut found = Vec::new();
    while found.len() < expected {
        match reader.read_frame(FRAME_WAIT) {
            Some(frame) => found.push(sequence_of(&frame)),
            None => return found,
        }
    }
    while let Some(frame) = reader.read_frame(QUIET) {
        found.push(sequence_of(&frame));
    }
    found
}

fn drains_with_default_prefetch(count: usize, bytes: usize) {
    for ack in ["auto", "client-individual"] {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::start(dir.path(), &["--shards", "2"]);
        let queue = "/queue/backlog";
        produce(broker.port, queue, count, bytes);
        let mut reader = consumer(broker.port, queue, ack);
        let all: Vec<usize> = (0..count).collect();
        receive_in_order(&mut reader, ack, &all, bytes);
        assert_eq!(
            dead_letters(broker.port, queue, 0),
            [] as [usize; 0],
            "{ack}"
        );
    }
}

#[test]
fn a_backlog_of_300_messages_of_64_kib_drains_with_the_default_prefetch() {
    drains_with_default_prefetch(300, 64 * KIB);
}

#[test]
fn a_backlog_of_two_messages_of_9_mib_drains_with_the_default_prefetch() {
    drains_with_default_prefetch(2, 9 * MIB);
}

/// The largest value of a `/proc/sys/net/ipv4/tcp_*mem` triple.
fn kernel_buffer_max(name: &str) -> usize {
    let text = std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}")).unwrap();
    text.split_whitespace().last().unwrap().parse().unwrap()
}

#[test]
fn deliveries_a_lost_consumer_was_never_sent_are_not_dead_lettered() {
    let bytes = 64 * KIB;
    let out_buffer_bytes = 256 * KIB;
    let receive_buffer_bytes: libc::c_int = 64 * KIB as libc::c_int;
    // What can have reached the kernel for the consumer, at most: the broker's socket send
    // buffer, the client's receive buffer (Linux doubles what is set), a send in flight from
    // the out buffer, in messages, with one more for a partly sent frame. Every message
    // past that was handed to the consumer by its queue but never sent.
    let handed_max =
        (kernel_buffer_max("tcp_wmem") + 4 * receive_buffer_bytes as usize + 2 * out_buffer_bytes)
            / bytes
            + 2;
    let count = 300.max(handed_max + 100);
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(
        dir.path(),
        &[
            "--shards",
            "2",
            // Dead-lettered at the first return of a message that was delivered.
            "--dead-letter-deliveries-max",
            "1",
            // The whole backlog in the consumer's window: the queue hands it all out, and the
            // session holds what the out buffer cannot take.
            "--prefetch-bytes-default",
            "1073741824",
        ],
    );
    let queue = "/queue/lost";
    produce(broker.port, queue, count, bytes);

    let mut lost = Client::stomp12(broker.port);
    // SAFETY: a plain setsockopt on a socket this test owns.
    let set = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&lost.stream),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&receive_buffer_bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0, "SO_RCVBUF");
    lost.subscribe("s", queue, "client-individual");
    let first = lost.read_frame(FRAME_WAIT).expect("a first message");
    assert_eq!(sequence_of(&first), 0);
    // Gone without an ACK, with most of its window never written to its socket.
    drop(lost);

    // Once this one gets a message, the queue has taken the lost consumer's back.
    let mut next = consumer(broker.port, queue, "auto");
    let frame = next.read_frame(FRAME_WAIT).expect("the backlog comes back");
    let resumed_at = sequence_of(&frame);
    // The messages before the one it resumed at were sent to the lost consumer, so each goes
    // to the dead-letter queue (perhaps another shard's, so waited for).
    let dead = dead_letters(broker.port, queue, resumed_at);
    assert_eq!(
        dead,
        (0..resumed_at).collect::<Vec<_>>(),
        "what was sent went to the dead-letter queue, in order, and nothing else"
    );
    assert!(
        dead.len() <= handed_max,
        "{} dead-lettered, but at most {handed_max} can have reached the socket",
        dead.len()
    );
    let rest: Vec<usize> = (resumed_at + 1..count).collect();
    receive_in_order(&mut next, "auto", &rest, bytes);
}
