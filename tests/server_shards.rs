//! Several shards, real sockets: traffic between connections on different shards, full peer
//! queues, and many connections at once.

mod server_common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use server_common::{eventually, test_config, Client, TestServer};
use stompd::codec::Command;

const DESTINATIONS: usize = 8;

fn subscribe_all(client: &mut Client) {
    for index in 0..DESTINATIONS {
        client.send(
            format!("SUBSCRIBE\nid:{index}\ndestination:/topic/d{index}\nreceipt:s{index}\n\n\0")
                .as_bytes(),
        );
    }
    for _ in 0..DESTINATIONS {
        assert_eq!(client.read_frame().command, Command::Receipt);
    }
}

/// Consumers read every message exactly once and, per producer and destination, in the order
/// it was sent, although producers, consumers and destination owners sit on different shards.
fn run_cross_shard(server: &TestServer, producers: usize, messages: usize) {
    let mut consumers: Vec<Client> = (0..4).map(|_| server.client()).collect();
    for consumer in &mut consumers {
        consumer.stomp_connect();
        subscribe_all(consumer);
    }
    let readers: Vec<_> = consumers
        .into_iter()
        .map(|mut consumer| {
            std::thread::spawn(move || {
                let mut seen = HashSet::new();
                let mut last: HashMap<(String, usize), usize> = HashMap::new();
                for _ in 0..producers * messages {
                    let frame = consumer.read_frame();
                    assert_eq!(frame.command, Command::Message, "{frame:?}");
                    let body = String::from_utf8(frame.body.clone()).unwrap();
                    let (producer, sequence) = body.split_once('-').unwrap();
                    let (producer, sequence): (usize, usize) =
                        (producer.parse().unwrap(), sequence.parse().unwrap());
                    assert!(seen.insert((producer, sequence)), "duplicate {body}");
                    let destination = frame.header("destination").unwrap().to_string();
                    if let Some(previous) = last.insert((destination, producer), sequence) {
                        assert!(
                            previous < sequence,
                            "out of order: {previous} then {sequence}"
                        );
                    }
                }
                seen.len()
            })
        })
        .collect();
    let writers: Vec<_> = (0..producers)
        .map(|producer| {
            let mut client = server.client();
            std::thread::spawn(move || {
                client.stomp_connect();
                let mut batch = Vec::new();
                for sequence in 0..messages {
                    batch.extend_from_slice(
                        format!(
                            "SEND\ndestination:/topic/d{}\n\n{producer}-{sequence}\0",
                            sequence % DESTINATIONS
                        )
                        .as_bytes(),
                    );
                    if batch.len() > 4096 {
                        client.send(&batch);
                        batch.clear();
                    }
                }
                batch.extend_from_slice(b"DISCONNECT\nreceipt:done\n\n\0");
                client.send(&batch);
                assert_eq!(client.read_frame().header("receipt-id"), Some("done"));
            })
        })
        .collect();
    for writer in writers {
        writer.join().expect("producer");
    }
    for reader in readers {
        assert_eq!(reader.join().expect("consumer"), producers * messages);
    }
}

#[test]
fn producers_and_consumers_on_different_shards_lose_and_duplicate_nothing() {
    let server = TestServer::start(test_config(4));
    run_cross_shard(&server, 4, 500);
    let stats = server.stats.shards();
    let sent: u64 = stats.iter().map(|shard| shard.peer_msgs_sent).sum();
    let received: u64 = stats.iter().map(|shard| shard.peer_msgs_received).sum();
    assert!(sent > 0 && received > 0, "{stats:?}");
    let shards_used = stats
        .iter()
        .filter(|shard| shard.connections_accepted > 0)
        .count();
    assert!(
        shards_used > 1,
        "SO_REUSEPORT spread connections: {stats:?}"
    );
    server.stop().expect("clean stop");
}

/// With a one-minute tick, a shard that has nothing to do sleeps in io_uring_enter until a
/// completion arrives: every cross-shard hop here completes only because the sender's MSG_RING
/// doorbell wakes the sleeping target.
#[test]
fn a_doorbell_wakes_a_sleeping_shard_without_waiting_for_the_tick() {
    let mut config = test_config(4);
    config.tick_ms = 60_000;
    let server = TestServer::start(config);
    run_cross_shard(&server, 2, 100);
    let doorbells: u64 = server
        .stats
        .shards()
        .iter()
        .map(|shard| shard.doorbells_rung)
        .sum();
    assert!(doorbells > 0);
}

/// With peer queues of two messages, publishing overflows them all the time: the shard parks
/// client input until the overflow drains, and still nothing is lost or reordered.
#[test]
fn full_peer_queues_pause_producers_without_losing_messages() {
    let mut config = test_config(4);
    config.peer_queue_len_max = 2;
    let server = TestServer::start(config);
    run_cross_shard(&server, 2, 300);
    let pauses: u64 = server
        .stats
        .shards()
        .iter()
        .map(|shard| shard.input_pauses)
        .sum();
    assert!(pauses > 0, "the overflow path was taken");
}

/// A buffer ring of four 256-byte buffers runs dry under four pipelining producers: each
/// receive that ends with ENOBUFS is re-armed after buffers are recycled, and no byte is lost.
#[test]
fn an_exhausted_receive_buffer_ring_is_rearmed_without_losing_data() {
    let mut config = test_config(1);
    config.recv_buffers_count = 4;
    config.recv_buffer_bytes = 256;
    let server = TestServer::start(config);
    run_cross_shard(&server, 4, 400);
    let exhausted: u64 = server
        .stats
        .shards()
        .iter()
        .map(|shard| shard.recv_buffer_exhausted)
        .sum();
    assert!(exhausted > 0, "the ring ran dry at least once");
}

#[test]
fn a_thousand_concurrent_connections() {
    let server = TestServer::start(test_config(2));
    let mut consumer = server.client();
    consumer.stomp_connect();
    consumer.send(b"SUBSCRIBE\nid:0\ndestination:/topic/many\nreceipt:s\n\n\0");
    assert_eq!(consumer.read_frame().command, Command::Receipt);

    let mut clients: Vec<Client> = (0..1000).map(|_| server.client()).collect();
    for client in &mut clients {
        client.send(b"CONNECT\naccept-version:1.2\n\n\0");
    }
    for client in &mut clients {
        assert_eq!(client.read_frame().command, Command::Connected);
    }
    let open = |server: &TestServer| -> u64 {
        server
            .stats
            .shards()
            .iter()
            .map(|shard| shard.connections_open)
            .sum()
    };
    assert!(eventually(Duration::from_secs(10), || open(&server) == 1001));
    for (index, client) in clients.iter_mut().enumerate() {
        client.send(
            format!("SEND\ndestination:/topic/many\nreceipt:{index}\n\n{index}\0").as_bytes(),
        );
    }
    for (index, client) in clients.iter_mut().enumerate() {
        let receipt = client.read_frame();
        assert_eq!(
            receipt.header("receipt-id"),
            Some(index.to_string().as_str())
        );
    }
    let mut bodies = HashSet::new();
    for _ in 0..1000 {
        let message = consumer.read_frame();
        assert!(bodies.insert(message.body));
    }
    drop(clients);
    assert!(
        eventually(Duration::from_secs(10), || open(&server) == 1),
        "every closed connection is released"
    );
}
