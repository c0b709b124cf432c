//! The real broker under load: queues spread over four shards with several producers and
//! consumers (nothing lost or duplicated), a thousand concurrent subscribed connections, and a
//! consumer that never reads while 50+ MiB pass through its queue (memory stays bounded, the
//! other consumer keeps getting messages). Counts are small enough for a debug build on a
//! shared 2-vCPU machine; every wait has a deadline.

mod stompd_common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use stompd_common::{Broker, Client};

#[test]
fn producers_and_consumers_across_four_shards_lose_and_duplicate_nothing() {
    const QUEUES: usize = 8;
    const PRODUCERS: usize = 4;
    const PER_PRODUCER_PER_QUEUE: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &["--shards", "4"]);
    let port = broker.port;
    // Two competing consumers per queue, client-individual acks.
    let consumers: Vec<_> = (0..QUEUES * 2)
        .map(|index| {
            let queue = index % QUEUES;
            std::thread::spawn(move || {
                let mut client = Client::stomp12(port);
                client.subscribe("s", &format!("/queue/spread-{queue}"), "client-individual");
                let mut got = Vec::new();
                while let Some(message) = client.read_frame(Duration::from_secs(3)) {
                    assert_eq!(message.command, "MESSAGE", "{message:?}");
                    client.send(&format!("ACK\nid:{}\n\n\0", message.header("ack").unwrap()));
                    got.push(message.body_str());
                }
                got
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|producer| {
            std::thread::spawn(move || {
                let mut client = Client::stomp12(port);
                for n in 0..PER_PRODUCER_PER_QUEUE {
                    for queue in 0..QUEUES {
                        client.publish(
                            &format!("/queue/spread-{queue}"),
                            "",
                            &format!("{queue}:{producer}:{n}"),
                        );
                    }
                }
                client.send("DISCONNECT\nreceipt:done\n\n\0");
                let receipt = client.expect_frame();
                assert_eq!(receipt.header("receipt-id"), Some("done"));
            })
        })
        .collect();
    for producer in producers {
        producer.join().unwrap();
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    for consumer in consumers {
        for body in consumer.join().unwrap() {
            *seen.entry(body).or_default() += 1;
        }
    }
    let expected = QUEUES * PRODUCERS * PER_PRODUCER_PER_QUEUE;
    let duplicated: Vec<_> = seen.iter().filter(|(_, &count)| count > 1).collect();
    assert!(duplicated.is_empty(), "duplicates: {duplicated:?}");
    assert_eq!(seen.len(), expected, "lost {}", expected - seen.len());
    for queue in 0..QUEUES {
        for producer in 0..PRODUCERS {
            for n in 0..PER_PRODUCER_PER_QUEUE {
                assert!(seen.contains_key(&format!("{queue}:{producer}:{n}")));
            }
        }
    }
}

#[test]
fn a_thousand_concurrent_connections_each_subscribed() {
    const CONNECTIONS: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &["--shards", "2"]);
    let mut clients: Vec<Client> = (0..CONNECTIONS)
        .map(|n| {
            let mut client = Client::stomp12(broker.port);
            client.subscribe("s", &format!("/topic/many-{}", n % 10), "auto");
            client
        })
        .collect();
    let mut producer = Client::stomp12(broker.port);
    for topic in 0..10 {
        producer.publish(&format!("/topic/many-{topic}"), "", &format!("to {topic}"));
    }
    for (n, client) in clients.iter_mut().enumerate() {
        let message = client.expect_frame();
        assert_eq!(message.body_str(), format!("to {}", n % 10));
    }
}

#[test]
fn a_consumer_that_never_reads_keeps_memory_bounded_while_another_proceeds() {
    const BODY_BYTES: usize = 64 * 1024;
    const MESSAGES: usize = 1000; // 62.5 MiB through the queue
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &["--shards", "2", "--queue-type", "memory"]);
    // Subscribes, then never reads: its prefetch window fills, its socket and out buffer fill.
    let mut stuck = Client::stomp12(broker.port);
    stuck.send("SUBSCRIBE\nid:s\ndestination:/queue/big\nack:auto\nreceipt:r\n\n\0");
    assert_eq!(stuck.expect_frame().command, "RECEIPT");
    let port = broker.port;
    let reader = std::thread::spawn(move || {
        let mut client = Client::stomp12(port);
        client.subscribe("s", "/queue/big", "client-individual");
        let mut count = 0;
        while let Some(message) = client.read_frame(Duration::from_secs(5)) {
            assert_eq!(message.body.len(), BODY_BYTES);
            client.send(&format!("ACK\nid:{}\n\n\0", message.header("ack").unwrap()));
            count += 1;
        }
        count
    });
    let body = "x".repeat(BODY_BYTES);
    let mut producer = Client::stomp12(broker.port);
    let rss_start = broker.rss_kib();
    let mut rss_max = rss_start;
    let deadline = Instant::now() + Duration::from_secs(120);
    for n in 0..MESSAGES {
        assert!(Instant::now() < deadline, "publishing stalled");
        producer.publish("/queue/big", "receipt:r\n", &body);
        assert_eq!(producer.expect_frame().command, "RECEIPT");
        if n % 50 == 0 {
            rss_max = rss_max.max(broker.rss_kib());
        }
    }
    let received = reader.join().unwrap();
    rss_max = rss_max.max(broker.rss_kib());
    // The stuck consumer holds at most its out buffer (256 KiB + a frame) plus what the
    // kernel's socket buffers took; everything else went to the reader.
    assert!(
        received >= MESSAGES - 100,
        "the reading consumer got only {received} of {MESSAGES}"
    );
    let growth_kib = rss_max.saturating_sub(rss_start);
    eprintln!("rss start {rss_start} KiB, max {rss_max} KiB, reader got {received}");
    assert!(
        growth_kib < 48 * 1024,
        "broker RSS grew by {growth_kib} KiB while 62.5 MiB passed (start {rss_start} KiB)"
    );
}
