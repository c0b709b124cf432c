//! Durability of the real broker (issue 5 wired into issue 4): queue messages survive a
//! restart in order, deliveries that were not acknowledged come back marked `redelivered`,
//! and every SEND whose RECEIPT a client saw survives `kill -9` (`--fsync always`, the
//! default). Each test has its own data directory and broker processes.

mod stompd_common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use stompd_common::{Broker, Client};

fn publish_receipted(client: &mut Client, destination: &str, bodies: &[String]) {
    for (n, body) in bodies.iter().enumerate() {
        client.publish(destination, &format!("receipt:r{n}\n"), body);
    }
    for n in 0..bodies.len() {
        let receipt = client.expect_frame();
        assert_eq!(receipt.command, "RECEIPT", "{receipt:?}");
        assert_eq!(receipt.header("receipt-id"), Some(format!("r{n}").as_str()));
    }
}

fn restart_keeps_unacked_messages_in_order(stop: &dyn Fn(&mut Broker)) {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path(), &["--shards", "2"]);
    let bodies: Vec<String> = (0..10).map(|n| format!("m{n}")).collect();
    let mut producer = Client::stomp12(broker.port);
    publish_receipted(&mut producer, "/queue/keep", &bodies);

    let mut consumer = Client::stomp12(broker.port);
    consumer.send(
        "SUBSCRIBE\nid:s\ndestination:/queue/keep\nack:client-individual\nactivemq.prefetchSize:3\n\n\0",
    );
    let first: Vec<_> = (0..3).map(|_| consumer.expect_frame()).collect();
    let bodies_seen: Vec<String> = first.iter().map(|f| f.body_str()).collect();
    assert_eq!(bodies_seen, ["m0", "m1", "m2"]);
    consumer.send(&format!(
        "ACK\nid:{}\nreceipt:ack\n\n\0",
        first[0].header("ack").unwrap()
    ));
    // The window refills with m3; the receipt of the ACK may come before or after it.
    let mut fourth = None;
    for _ in 0..2 {
        let frame = consumer.expect_frame();
        if frame.command == "MESSAGE" {
            fourth = Some(frame);
        }
    }
    assert_eq!(fourth.expect("m3 delivered").body_str(), "m3");
    stop(&mut broker);
    drop(consumer);

    let broker = Broker::start_on(dir.path(), broker.port, &["--shards", "2"]);
    let mut consumer = Client::stomp12(broker.port);
    consumer.subscribe("again", "/queue/keep", "client-individual");
    for n in 1..10 {
        let message = consumer.expect_frame();
        assert_eq!(
            message.body_str(),
            format!("m{n}"),
            "order kept after restart"
        );
        let redelivered = message.header("redelivered") == Some("true");
        assert_eq!(
            redelivered,
            (1..=3).contains(&n),
            "m{n}: delivered before the restart and not acked <=> redelivered: {message:?}"
        );
    }
    assert!(
        consumer.read_frame(Duration::from_millis(300)).is_none(),
        "the acked m0 stays gone"
    );
}

#[test]
fn sigterm_restart_keeps_unacked_queue_messages_in_order_and_marks_redeliveries() {
    restart_keeps_unacked_messages_in_order(&|broker| {
        let status = broker.signal_and_wait(libc::SIGTERM, Duration::from_secs(15));
        assert_eq!(status.code(), Some(0));
    });
}

#[test]
fn kill_9_restart_keeps_unacked_queue_messages_in_order_and_marks_redeliveries() {
    restart_keeps_unacked_messages_in_order(&|broker| broker.kill9());
}

/// Several cycles of: a producer pipelines receipted persistent SENDs, the broker is killed
/// with SIGKILL in the middle. Afterwards every message whose RECEIPT arrived is delivered
/// (duplicates of unreceipted ones are allowed: at-least-once).
#[test]
fn every_receipted_send_survives_kill_9() {
    const CYCLES: usize = 4;
    const SENDS_PER_CYCLE: usize = 4000;
    let dir = tempfile::tempdir().unwrap();
    let mut receipted = BTreeSet::new();
    let mut port = None;
    for cycle in 0..CYCLES {
        let mut broker = match port {
            None => Broker::start(dir.path(), &["--shards", "2"]),
            Some(port) => Broker::start_on(dir.path(), port, &["--shards", "2"]),
        };
        port = Some(broker.port);
        let mut client = Client::stomp12(broker.port);
        let mut writer = client.stream.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            use std::io::Write;
            let mut batch = Vec::new();
            for n in 0..SENDS_PER_CYCLE {
                let body = format!("c{cycle}-{n}");
                batch.extend_from_slice(
                    format!(
                        "SEND\ndestination:/queue/crash\npersistent:true\nreceipt:c{cycle}-{n}\ncontent-length:{}\n\n{body}\0",
                        body.len()
                    )
                    .as_bytes(),
                );
                if batch.len() > 4096 {
                    if writer.write_all(&batch).is_err() {
                        return;
                    }
                    batch.clear();
                }
            }
            let _ = writer.write_all(&batch);
        });
        // Kill after a different number of receipts each cycle, while SENDs are in flight.
        let kill_after = 200 + cycle * 350;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = 0;
        loop {
            assert!(Instant::now() < deadline, "receipts stalled");
            match client.read_frame_or_eof(Duration::from_secs(10)) {
                Ok(Some(frame)) => {
                    assert_eq!(frame.command, "RECEIPT", "{frame:?}");
                    receipted.insert(frame.header("receipt-id").unwrap().to_string());
                    seen += 1;
                    if seen == kill_after {
                        broker.kill9();
                    }
                }
                Ok(None) => panic!("no receipt within 10 s"),
                Err(()) => break,
            }
            if seen == SENDS_PER_CYCLE {
                broker.kill9();
            }
        }
        let _ = sender.join();
        assert!(seen >= kill_after, "cycle {cycle}: only {seen} receipts");
    }

    let broker = Broker::start_on(dir.path(), port.unwrap(), &["--shards", "2"]);
    let mut consumer = Client::stomp12(broker.port);
    consumer.subscribe("all", "/queue/crash", "auto");
    let mut delivered = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while let Some(message) = consumer.read_frame(Duration::from_secs(3)) {
        assert!(Instant::now() < deadline);
        delivered.insert(message.body_str());
    }
    let lost: Vec<_> = receipted.difference(&delivered).collect();
    assert!(
        lost.is_empty(),
        "{} of {} receipted messages lost, e.g. {:?}",
        lost.len(),
        receipted.len(),
        &lost[..lost.len().min(5)]
    );
}

/// A persistent message handed to a waiting auto-ack consumer in the pass that accepted it
/// writes no log record (neither its Message nor its Ack: auto ack consumes it on hand-off, and
/// the pair would only ever be replayed as acked), while a message that waits for a consumer
/// is written; after kill -9 the consumed ones stay gone and the waiting ones come back.
#[test]
fn messages_auto_acked_on_arrival_leave_no_record_and_stay_consumed_after_kill_9() {
    const CONSUMED: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path(), &["--shards", "2"]);
    let mut consumer = Client::stomp12(broker.port);
    consumer.subscribe("s", "/queue/auto", "auto");
    let mut producer = Client::stomp12(broker.port);
    for n in 0..CONSUMED {
        // One at a time: the consumer always has credit when the message arrives.
        publish_receipted(&mut producer, "/queue/auto", &[format!("a{n}")]);
        let message = consumer.expect_frame();
        assert_eq!(message.command, "MESSAGE", "{message:?}");
        assert_eq!(message.body_str(), format!("a{n}"));
    }
    let kept: Vec<String> = (0..3).map(|n| format!("k{n}")).collect();
    publish_receipted(&mut producer, "/queue/kept", &kept);
    broker.kill9();
    drop((consumer, producer));

    let mut records = 0;
    for shard in 0..2 {
        let config = stompd::log::LogConfig::new(&broker.data_dir, shard);
        let (_log, recovery) = stompd::log::ShardLog::open(config).unwrap();
        records += recovery.report.records;
    }
    assert_eq!(
        records, 3,
        "only the three messages that waited were written"
    );

    let broker = Broker::start_on(dir.path(), broker.port, &["--shards", "2"]);
    let mut consumer = Client::stomp12(broker.port);
    consumer.subscribe("auto", "/queue/auto", "auto");
    consumer.subscribe("kept", "/queue/kept", "auto");
    let bodies: Vec<String> = (0..3).map(|_| consumer.expect_frame().body_str()).collect();
    assert_eq!(bodies, kept);
    assert!(
        consumer.read_frame(Duration::from_millis(300)).is_none(),
        "consumed messages are not redelivered"
    );
}

/// `--fsync never`: RECEIPTs do not wait for a sync, so what a client was told must be in the
/// page cache before the RECEIPT leaves (appends are batched and written at the end of each
/// loop turn); a crash of the process alone then loses none of it.
#[test]
fn under_fsync_never_every_receipted_send_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--shards", "2", "--fsync", "never"];
    let mut broker = Broker::start(dir.path(), &args);
    let bodies: Vec<String> = (0..50).map(|n| format!("n{n}")).collect();
    let mut producer = Client::stomp12(broker.port);
    publish_receipted(&mut producer, "/queue/never", &bodies);
    broker.kill9();
    drop(producer);

    let broker = Broker::start_on(dir.path(), broker.port, &args);
    let mut consumer = Client::stomp12(broker.port);
    consumer.subscribe("s", "/queue/never", "auto");
    let got: Vec<String> = (0..bodies.len())
        .map(|_| consumer.expect_frame().body_str())
        .collect();
    assert_eq!(got, bodies);
}
