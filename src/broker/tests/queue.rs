//! Queue semantics: FIFO, one consumer per message, round-robin, retention, ack modes,
//! redelivery, dead-lettering, expiry, prefetch and flow control.

use super::*;

#[test]
fn messages_sent_before_anyone_subscribes_are_kept_in_order() {
    let mut cluster = Cluster::single();
    let producer = cluster.connect(0);
    for body in ["1", "2", "3"] {
        cluster.publish(producer, "/queue/a", body);
    }
    let consumer = cluster.connect(0);
    cluster.subscribe(consumer, "s", "/queue/a", "auto");
    let frames = cluster.frames(consumer);
    assert_eq!(bodies(&frames), ["1", "2", "3"]);
    let first = &frames[0];
    assert_eq!(first.header("subscription"), Some("s"));
    assert_eq!(first.header("destination"), Some("/queue/a"));
    assert!(first.header("message-id").is_some());
    assert_eq!(first.header("ack"), None, "auto acks need no ack header");
    assert_eq!(first.header("redelivered"), None);
    assert_eq!(first.header("content-length"), Some("1"));
}

#[test]
fn user_headers_pass_through_and_broker_headers_do_not() {
    let mut cluster = Cluster::single();
    let conn = cluster.connect(0);
    cluster.subscribe(conn, "s", "/queue/a", "auto");
    cluster.send(
        conn,
        frame(
            Command::Send,
            &[
                ("destination", "/queue/a"),
                ("content-type", "text/plain"),
                ("x-colour", "red:blue"),
                ("receipt", "r"),
            ],
            b"hi",
        ),
    );
    let frames = cluster.frames(conn);
    let message = frames
        .iter()
        .find(|f| f.command == Command::Message)
        .unwrap();
    assert_eq!(message.header("content-type"), Some("text/plain"));
    assert_eq!(message.header("x-colour"), Some("red:blue"));
    assert_eq!(message.header("receipt"), None);
    assert_eq!(
        message
            .headers
            .iter()
            .filter(|(n, _)| n == b"destination")
            .count(),
        1
    );
}

#[test]
fn each_message_goes_to_one_consumer_round_robin() {
    let mut cluster = Cluster::single();
    let a = cluster.connect(0);
    let b = cluster.connect(0);
    cluster.subscribe(a, "s", "/queue/a", "auto");
    cluster.subscribe(b, "s", "/queue/a", "auto");
    let producer = cluster.connect(0);
    for body in ["1", "2", "3", "4"] {
        cluster.publish(producer, "/queue/a", body);
    }
    assert_eq!(bodies(&cluster.frames(a)), ["1", "3"]);
    assert_eq!(bodies(&cluster.frames(b)), ["2", "4"]);
}

#[test]
fn prefetch_bounds_unacknowledged_deliveries() {
    let mut cluster = Cluster::single();
    let producer = cluster.connect(0);
    for body in ["1", "2", "3"] {
        cluster.publish(producer, "/queue/a", body);
    }
    let consumer = cluster.connect(0);
    cluster.send(
        consumer,
        frame(
            Command::Subscribe,
            &[
                ("id", "s"),
                ("destination", "/queue/a"),
                ("ack", "client-individual"),
                ("activemq.prefetchSize", "2"),
            ],
            b"",
        ),
    );
    let frames = cluster.frames(consumer);
    assert_eq!(bodies(&frames), ["1", "2"]);
    cluster.ack(consumer, &ack_id(&frames[0]));
    assert_eq!(bodies(&cluster.frames(consumer)), ["3"]);
}

#[test]
fn rabbitmq_prefetch_count_is_accepted_and_zero_is_refused() {
    let mut cluster = Cluster::single();
    let producer = cluster.connect(0);
    cluster.publish(producer, "/queue/a", "1");
    cluster.publish(producer, "/queue/a", "2");
    let consumer = cluster.connect(0);
    cluster.send(
        consumer,
        frame(
            Command::Subscribe,
            &[
                ("id", "s"),
                ("destination", "/queue/a"),
                ("ack", "client"),
                ("prefetch-count", "1"),
            ],
            b"",
        ),
    );
    assert_eq!(bodies(&cluster.frames(consumer)), ["1"]);
    let other = cluster.connect(0);
    cluster.send(
        other,
        frame(
            Command::Subscribe,
            &[
                ("id", "s"),
                ("destination", "/queue/b"),
                ("prefetch-count", "0"),
            ],
            b"",
        ),
    );
    assert!(cluster
        .expect_error(other)
        .header("message")
        .unwrap()
        .starts_with("invalid 'prefetch'"));
}

#[test]
fn default_prefetch_for_client_acks_is_bounded() {
    let config = BrokerConfig {
        prefetch_default_messages: 3,
        ..BrokerConfig::default()
    };
    let mut cluster = Cluster::new(1, config);
    let producer = cluster.connect(0);
    for index in 0..5 {
        cluster.publish(producer, "/queue/a", &index.to_string());
    }
    let consumer = cluster.connect(0);
    cluster.subscribe(consumer, "s", "/queue/a", "client");
    assert_eq!(bodies(&cluster.frames(consumer)).len(), 3);
}

/// STOMP 1.2 "SUBSCRIBE ack Header": `client` acks are cumulative.
#[test]
fn client_ack_is_cumulative() {
    let mut cluster = Cluster::single();
    let consumer = cluster.connect(0);
    cluster.subscribe(consumer, "s", "/queue/a", "client");
    let producer = cluster.connect(0);
    for body in ["1", "2", "3"] {
        cluster.publish(producer, "/queue/a", body);
    }
    let frames = cluster.frames(consumer);
    cluster.ack(consumer, &ack_id(&frames[1]));
    assert_eq!(
        cluster.shards[0].held_message_ids(b"/queue/a").len(),
        1,
        "1 and 2 are acked"
    );
    // Acking 1 again is an ACK of an id no longer pending.
    cluster.ack(consumer, &ack_id(&frames[0]));
    assert_eq!(
        cluster.expect_error(consumer).header("message"),
        Some("unknown ack id")
    );
}

/// STOMP 1.2 "SUBSCRIBE ack Header": `client-individual` acks only the named message.
#[test]
fn client_individual_ack_is_not_cumulative() {
    let mut cluster = Cluster::single();
    let consumer = cluster.connect(0);
    cluster.subscribe(consumer, "s", "/queue/a", "client-individual");
    let producer = cluster.connect(0);
    for body in ["1", "2", "3"] {
        cluster.publish(producer, "/queue/a", body);
    }
    let frames = cluster.frames(consumer);
    cluster.ack(consumer, &ack_id(&frames[1]));
    assert_eq!(cluster.shards[0].held_message_ids(b"/queue/a").len(), 2);
    cluster.ack(consumer, &ack_id(&frames[0]));
    cluster.ack(consumer, &ack_id(&frames[2]));
    assert!(cluster.shards[0].held_message_ids(b"/queue/a").is_empty());
    assert!(cluster.take(consumer).is_empty());
}

#[test]
fn ack_of_unknown_id_is_an_error() {
    let mut cluster = Cluster::single();
    let conn = cluster.connect(0);
    cluster.send(
        conn,
        frame(Command::Ack, &[("id", "0.99"), ("receipt", "r")], b""),
    );
    let error = cluster.expect_error(conn);
    assert_eq!(error.header("message"), Some("unknown ack id"));
    assert_eq!(error.header("receipt-id"), Some("r"));
    let other = cluster.connect(0);
    cluster.send(other, frame(Command::Nack, &[("id", "garbage")], b""));
    assert_eq!(
        cluster.expect_error(other).header("message"),
        Some("unknown ack id")
    );
}

#[test]
fn ack_of_auto_subscription_message_is_an_error() {
    let mut cluster = Cluster::single();
    let conn = cluster.connect(0);
    cluster.subscribe(conn, "s", "/queue/a", "auto");
    cluster.publish(conn, "/queue/a", "1");
    cluster.frames(conn);
    cluster.ack(conn, "0.0");
    assert_eq!(
        cluster.expect_error(conn).header("message"),
        Some("unknown ack id")
    );
}

#[test]
fn consumer_that_disconnects_returns_unacked_to_the_front_in_order_marked_redelivered() {
    let mut cluster = Cluster::single();
    let producer = cluster.connect(0);
    for body in ["1", "2", "3", "4"] {
        cluster.publish(producer, "/queue/a", body);
    }
    let first = cluster.connect(0);
    cluster.send(
        first,
        frame(
            Command::Subscribe,
            &[
                ("id", "s"),
                ("destination", "/queue/a"),
                ("ack", "client"),
                ("activemq.prefetchSize", "2"),
            ],
            b"",
        ),
    );
    assert_eq!(bodies(&cluster.frames(first)), ["1", "2"]);
    cluster.lose(first);
    let second = cluster.connect(0);
    cluster.subscribe(second, "t", "/queue/a", "auto");
    let frames = cluster.frames(second);
    assert_eq!(bodies(&frames), ["1", "2", "3", "4"]);
    for frame in &frames[..2] {
        assert_eq!(frame.header("redelivered"), Some("true"));
        assert_eq!(frame.header("delivery-count"), Some("2"));
    }
    for frame in &frames[2..] {
        assert_eq!(frame.header("redelivered"), None);
        assert_eq!(frame.header("delivery-count"), None);
    }
}

#[test]
fn unsubscribe_returns_unacked_and_nothing_more_reaches_the_subscription() {
    let mut cluster = Cluster::single();
    let consumer = cluster.connect(0);
    cluster.subscribe(consumer, "s", "/queue/a", "client");
    let producer = cluster.connect(0);
    cluster.publish(producer, "/queue/a", "1");
    assert_eq!(bodies(&cluster.frames(consumer)), ["1"]);
    cluster.send(consumer, frame(Command::Unsubscribe, &[("id", "s")], b""));
    cluster.publish(producer, "/queue/a", "2");
    assert!(cluster.take(consumer).is_empty());
    assert_eq!(cluster.shards[0].held_message_ids(b"/queue/a").len(), 2);
}

/// An auto-acked delivery in flight to a subscription that has just gone is not lost.
#[test]
fn auto_delivery_racing_an_unsubscribe_goes_back_to_the_queue() {
    let mut cluster = Cluster::new(2, BrokerConfig::default());
    cluster.auto_pump = false;
    let queue = "/queue/race";
    let queue_shard = shard_of(queue.as_bytes(), 2).0;
    let other = 1 - queue_shard;
    let consumer = cluster.connect(other);
    cluster.subscribe(consumer, "s", queue, "auto");
    while cluster.step_link(0) {}
    let producer = cluster.connect(queue_shard);
    cluster.publish(producer, queue, "1");
    // The Deliver is on the link; the client unsubscribes before it lands.
    cluster.send(consumer, frame(Command::Unsubscribe, &[("id", "s")], b""));
    while cluster.step_link(0) {}
    assert!(cluster.frames(consumer).is_empty());
    assert_eq!(
        cluster.shards[queue_shard as usize]
            .held_message_ids(queue.as_bytes())
            .len(),
        1
    );
    let late = cluster.connect(queue_shard);
    cluster.subscribe(late, "s", queue, "auto");
    while cluster.step_link(0) {}
    let frames = cluster.frames(late);
    assert_eq!(bodies(&frames), ["1"]);
    // Never written to anyone, but marked conservatively so that unmarked deliveries stay in
    // publish order for every subscription.
    assert_eq!(frames[0].header("redelivered"), Some("true"));
}

#[test]
fn nack_redelivers_marked_redelivered() {
    let mut cluster = Cluster::single();
    let consumer = cluster.connect(0);
    cluster.subscribe(consumer, "s", "/queue/a", "client-individual");
    let producer = cluster.connect(0);
    cluster.publish(producer, "/queue/a", "1");
    let frames = cluster.frames(consumer);
    cluster.send(
        consumer,
        frame(Command::Nack, &[("id", &ack_id(&frames[0]))], b""),
    );
    let again = cluster.frames(consumer);
    assert_eq!(bodies(&again), ["1"]);
    assert_eq!(again[0].header("redelivered"), Some("true"));
    assert_eq!(again[0].header("delivery-count"), Some("2"));
    assert_eq!(
        again[0].header("message-id"),
        frames[0].header("message-id")
    );
}

#[test]
fn message_moves_to_dead_letter_queue_after_deliveries_max() {
    let config = BrokerConfig {
        deliveries_max: 3,
        ..BrokerConfig::default()
    };
    let mut cluster = Cluster::new(1, config);
    let consumer = cluster.connect(0);
    cluster.subscribe(consumer, "s", "/queue/orders", "client-individual");
    let producer = cluster.connect(0);
    cluster.publish(producer, "/queue/orders", "poison");
    for delivery in 1..=3 {
        let frames = cluster.frames(consumer);
        assert_eq!(bodies(&frames), ["poison"], "delivery {delivery}");
        cluster.send(
            consumer,
            frame(Command::Nack, &[("id", &ack_id(&frames[0]))], b""),
        );
    }
    assert!(
        cluster.take(consumer).is_empty(),
        "not delivered a fourth time"
    );
    assert!(cluster.shards[0]
        .held_message_ids(b"/queue/orders")
        .is_empty());
    let dlq = cluster.connect(0);
    cluster.subscribe(dlq, "d", "/queue/DLQ.orders", "auto");
    let frames = cluster.frames(dlq);
    assert_eq!(bodies(&frames), ["poison"]);
    assert_eq!(frames[0].header("destination"), Some("/queue/DLQ.orders"));
}

#[test]
fn expired_messages_are_never_delivered() {
    let mut cluster = Cluster::single();
    let producer = cluster.connect(0);
    let now = cluster.now;
    let soon = (now + 50).to_string();
    let past = (now - 1).to_string();
    cluster.send(
        producer,
        frame(
            Command::Send,
            &[("destination", "/queue/a"), ("expires", &past)],
            b"dead",
        ),
    );
    cluster.send(
        producer,
        frame(
            Command::Send,
            &[("destination", "/queue/a"), ("expires", &soon)],
            b"soon",
        ),
    );
    cluster.send(
        producer,
        frame(
            Command::Send,
            &[("destination", "/queue/a"), ("expires", "0")],
            b"never",
        ),
    );
    cluster.now += 100;
    let consumer = cluster.connect(0);
    cluster.subscribe(consumer, "s", "/queue/a", "auto");
    assert_eq!(bodies(&cluster.frames(consumer)), ["never"]);
}

#[test]
fn expired_messages_are_swept_on_tick() {
    let mut cluster = Cluster::single();
    let producer = cluster.connect(0);
    let soon = (cluster.now + 50).to_string();
    cluster.send(
        producer,
        frame(
            Command::Send,
            &[("destination", "/queue/a"), ("expires", &soon)],
            b"x",
        ),
    );
    // A paused consumer keeps the queue alive but takes nothing.
    let consumer = cluster.connect(0);
    cluster.writable(consumer, false);
    cluster.subscribe(consumer, "s", "/queue/a", "auto");
    assert_eq!(cluster.shards[0].held_message_ids(b"/queue/a").len(), 1);
    cluster.now += 100;
    cluster.tick();
    assert!(cluster.shards[0].held_message_ids(b"/queue/a").is_empty());
    assert_eq!(cluster.shards[0].queue_stats()[0].dequeued, 1);
    cluster.writable(consumer, true);
    assert!(cluster.frames(consumer).is_empty());
}

#[test]
fn idle_queues_are_forgotten() {
    let mut cluster = Cluster::single();
    let conn = cluster.connect(0);
    cluster.subscribe(conn, "s", "/queue/once", "auto");
    cluster.publish(conn, "/queue/once", "x");
    assert_eq!(cluster.shards[0].queue_stats().len(), 1);
    cluster.send(conn, frame(Command::Unsubscribe, &[("id", "s")], b""));
    assert!(cluster.shards[0].queue_stats().is_empty());
    let past = (cluster.now - 1).to_string();
    cluster.send(
        conn,
        frame(
            Command::Send,
            &[("destination", "/queue/never"), ("expires", &past)],
            b"x",
        ),
    );
    assert!(cluster.shards[0].queue_stats().is_empty());
}

#[test]
fn paused_consumer_gets_no_new_queue_deliveries() {
    let mut cluster = Cluster::single();
    let slow = cluster.connect(0);
    let fast = cluster.connect(0);
    cluster.subscribe(slow, "s", "/queue/a", "auto");
    cluster.subscribe(fast, "s", "/queue/a", "auto");
    cluster.writable(slow, false);
    let producer = cluster.connect(0);
    cluster.publish(producer, "/queue/a", "1");
    cluster.publish(producer, "/queue/a", "2");
    assert!(cluster.frames(slow).is_empty());
    assert_eq!(bodies(&cluster.frames(fast)), ["1", "2"]);
    cluster.send(fast, frame(Command::Unsubscribe, &[("id", "s")], b""));
    cluster.publish(producer, "/queue/a", "3");
    assert!(cluster.frames(slow).is_empty(), "kept while paused");
    cluster.writable(slow, true);
    assert_eq!(bodies(&cluster.frames(slow)), ["3"]);
}

#[test]
fn full_queue_refuses_sends_past_its_overshoot_with_an_error() {
    let config = BrokerConfig {
        queue_messages_max: 2,
        queue_overshoot_messages: 1,
        ..BrokerConfig::default()
    };
    let mut cluster = Cluster::new(1, config);
    let producer = cluster.connect(0);
    cluster.publish(producer, "/queue/a", "1");
    cluster.publish(producer, "/queue/a", "2");
    // Past the limit: throttled (tests/flow.rs), still taken within the overshoot.
    cluster.publish(producer, "/queue/a", "3");
    assert!(cluster.take(producer).is_empty());
    cluster.publish(producer, "/queue/a", "4");
    assert_eq!(
        cluster.expect_error(producer).header("message"),
        Some("queue full (queue_messages_max and its overshoot reached)")
    );
    assert_eq!(cluster.shards[0].held_message_ids(b"/queue/a").len(), 3);
}

#[test]
fn persistent_queue_messages_are_logged_and_their_acks_too() {
    let config = BrokerConfig {
        log_enabled: true,
        ..BrokerConfig::default()
    };
    let mut cluster = Cluster::new(1, config);
    let producer = cluster.connect(0);
    cluster.publish(producer, "/queue/a", "kept");
    cluster.send(
        producer,
        frame(
            Command::Send,
            &[("destination", "/queue/a"), ("persistent", "false")],
            b"memory",
        ),
    );
    cluster.publish(producer, "/topic/t", "never logged");
    assert_eq!(cluster.appended.len(), 1);
    let Record::Message { message } = cluster.appended[0].1.clone() else {
        panic!()
    };
    assert_eq!(&*message.body, b"kept");
    let id = message.id;
    let consumer = cluster.connect(0);
    cluster.subscribe(consumer, "s", "/queue/a", "client-individual");
    let frames = cluster.frames(consumer);
    assert_eq!(
        cluster.appended.len(),
        2,
        "delivery alone is not consumption, only a delivered mark for the logged message"
    );
    assert_eq!(
        cluster.appended[1].1,
        Record::Delivered {
            destination: Arc::from(&b"/queue/a"[..]),
            id,
            at: message.stored_at.get(),
        }
    );
    cluster.ack(consumer, &ack_id(&frames[0]));
    cluster.ack(consumer, &ack_id(&frames[1]));
    assert_eq!(
        cluster.appended.len(),
        3,
        "only the persistent message's ack is logged"
    );
    assert_eq!(
        cluster.appended[2].1,
        Record::Ack {
            destination: Arc::from(&b"/queue/a"[..]),
            id,
            at: message.stored_at.get(),
        }
    );
}

#[test]
fn restored_messages_are_delivered_with_their_redelivery_mark() {
    let mut cluster = Cluster::single();
    let destination: Arc<[u8]> = Arc::from(&b"/queue/a"[..]);
    let make = |seq: u64, body: &[u8]| {
        let id = MessageId {
            shard: ShardId(0),
            seq,
        };
        let headers: [(&[u8], &[u8]); 0] = [];
        Arc::new(Message::from_send(
            id,
            destination.clone(),
            headers,
            body,
            0,
            true,
        ))
    };
    // In the store, as the log keeps them; the shard gets their index entries only.
    let mut recovered = |message: Arc<Message>, deliveries: u32| {
        let record = Record::Message {
            message: message.clone(),
        };
        cluster.shards[0].store_mut().apply(&record);
        Recovered {
            destination: destination.clone(),
            entry: Paged::of(&message, message.stored_at.get().expect("stored")),
            deliveries,
        }
    };
    let old = recovered(make(500, b"old"), 1);
    let new = recovered(make(501, b"new"), 0);
    cluster.shards[0]
        .restore([old, new])
        .expect("one shard owns every queue");
    let consumer = cluster.connect(0);
    cluster.subscribe(consumer, "s", "/queue/a", "auto");
    let frames = cluster.frames(consumer);
    assert_eq!(bodies(&frames), ["old", "new"]);
    assert_eq!(frames[0].header("redelivered"), Some("true"));
    assert_eq!(frames[1].header("redelivered"), None);
    // New ids continue past the recovered ones.
    cluster.publish(consumer, "/queue/a", "fresh");
    let frames = cluster.frames(consumer);
    assert_eq!(frames[0].header("message-id"), Some("0-502"));
}

/// An auto-ack consumer has at most its prefetch between the queue and its socket: the window
/// comes back only when the server reports the connection's output flushed.
#[test]
fn auto_ack_window_refills_when_the_connection_is_flushed() {
    let mut cluster = Cluster::single();
    cluster.auto_flush = false;
    let producer = cluster.connect(0);
    for body in ["1", "2", "3", "4", "5"] {
        cluster.publish(producer, "/queue/a", body);
    }
    let consumer = cluster.connect(0);
    cluster.send(
        consumer,
        frame(
            Command::Subscribe,
            &[
                ("id", "s"),
                ("destination", "/queue/a"),
                ("prefetch-count", "2"),
            ],
            b"",
        ),
    );
    assert_eq!(bodies(&cluster.frames(consumer)), ["1", "2"]);
    cluster.flush(consumer);
    assert_eq!(bodies(&cluster.frames(consumer)), ["3", "4"]);
    cluster.flush(consumer);
    assert_eq!(bodies(&cluster.frames(consumer)), ["5"]);
}

#[test]
fn restore_refuses_messages_of_another_shard() {
    let mut cluster = Cluster::new(2, BrokerConfig::default());
    let name = (0..)
        .map(|index| format!("/queue/q{index}"))
        .find(|name| shard_of(name.as_bytes(), 2) == ShardId(1))
        .unwrap();
    let id = MessageId {
        shard: ShardId(1),
        seq: 1,
    };
    let headers: [(&[u8], &[u8]); 0] = [];
    let message = Arc::new(Message::from_send(
        id,
        Arc::from(name.as_bytes()),
        headers,
        b"x",
        0,
        true,
    ));
    let error = cluster.shards[0]
        .restore([Recovered {
            destination: message.destination.clone(),
            entry: Paged::of(&message, crate::broker::StoreRef(8)),
            deliveries: 0,
        }])
        .unwrap_err();
    assert!(matches!(
        error,
        RestoreError::WrongShard {
            owner: ShardId(1),
            ..
        }
    ));
}

#[test]
fn dead_lettering_across_shards_is_logged_on_both() {
    let config = BrokerConfig {
        log_enabled: true,
        deliveries_max: 1,
        ..BrokerConfig::default()
    };
    let shard_count = 4;
    let mut cluster = Cluster::new(shard_count, config);
    // A queue whose DLQ lives on another shard.
    let name = (0..)
        .map(|index| format!("/queue/q{index}"))
        .find(|name| {
            let dlq = dead_letter_queue(name.as_bytes()).unwrap();
            shard_of(name.as_bytes(), shard_count) != shard_of(&dlq, shard_count)
        })
        .unwrap();
    let dlq = String::from_utf8(dead_letter_queue(name.as_bytes()).unwrap()).unwrap();
    let consumer = cluster.connect(0);
    cluster.subscribe(consumer, "s", &name, "client-individual");
    cluster.publish(consumer, &name, "poison");
    let frames = cluster.frames(consumer);
    cluster.send(
        consumer,
        frame(Command::Nack, &[("id", &ack_id(&frames[0]))], b""),
    );
    let queue_shard = shard_of(name.as_bytes(), shard_count);
    let dlq_shard = shard_of(dlq.as_bytes(), shard_count);
    let describe = |cluster: &Cluster| -> Vec<(ShardId, String)> {
        cluster
            .appended
            .iter()
            .filter_map(|(shard, record, _)| {
                let text = match record {
                    Record::Message { message } => {
                        format!("message {}", String::from_utf8_lossy(&message.destination))
                    }
                    Record::Ack { destination, .. } => {
                        format!("ack {}", String::from_utf8_lossy(destination))
                    }
                    Record::Delivered { .. } => return None,
                };
                Some((*shard, text))
            })
            .collect()
    };
    assert_eq!(
        describe(&cluster),
        [
            (queue_shard, format!("message {name}")),
            (dlq_shard, format!("message {dlq}")),
        ],
        "the old queue's Ack waits until the dead-letter copy is durable"
    );
    let token = cluster
        .appended
        .iter()
        .find_map(|(shard, record, token)| {
            (*shard == dlq_shard && matches!(record, Record::Message { .. })).then_some(*token)
        })
        .flatten()
        .expect("a dead-letter append carries a token");
    cluster.durable(dlq_shard.0, token);
    assert_eq!(
        describe(&cluster),
        [
            (queue_shard, format!("message {name}")),
            (dlq_shard, format!("message {dlq}")),
            (queue_shard, format!("ack {name}")),
        ]
    );
    assert_eq!(
        cluster.shards[dlq_shard.0 as usize]
            .held_message_ids(dlq.as_bytes())
            .len(),
        1
    );
    assert!(cluster.shards[queue_shard.0 as usize]
        .held_message_ids(name.as_bytes())
        .is_empty());
}

#[test]
fn auto_ack_dispatch_logs_the_ack() {
    let config = BrokerConfig {
        log_enabled: true,
        ..BrokerConfig::default()
    };
    let mut cluster = Cluster::new(1, config);
    let consumer = cluster.connect(0);
    cluster.subscribe(consumer, "s", "/queue/a", "auto");
    cluster.publish(consumer, "/queue/a", "x");
    assert_eq!(bodies(&cluster.frames(consumer)), ["x"]);
    assert!(matches!(
        &cluster.appended[..],
        [
            (_, Record::Message { .. }, None),
            (_, Record::Ack { .. }, None)
        ]
    ));
}

/// STOMP 1.2 "NACK": in `client` mode a NACK covers every earlier unacknowledged message.
#[test]
fn client_mode_nack_is_cumulative() {
    let mut cluster = Cluster::single();
    let consumer = cluster.connect(0);
    cluster.subscribe(consumer, "s", "/queue/a", "client");
    let producer = cluster.connect(0);
    for body in ["1", "2", "3"] {
        cluster.publish(producer, "/queue/a", body);
    }
    let frames = cluster.frames(consumer);
    cluster.send(
        consumer,
        frame(Command::Nack, &[("id", &ack_id(&frames[1]))], b""),
    );
    let again = cluster.frames(consumer);
    assert_eq!(bodies(&again), ["1", "2"]);
    assert!(again
        .iter()
        .all(|f| f.header("redelivered") == Some("true")));
}

/// STOMP 1.1 "ACK": `subscription` and `message-id` name the message; headers are escaped
/// the 1.1 way (no `\r`).
#[test]
fn stomp_1_1_client_acks_by_subscription_and_message_id() {
    let mut cluster = Cluster::single();
    let conn = cluster.open(0);
    cluster.send(
        conn,
        frame(Command::Connect, &[("accept-version", "1.1")], b""),
    );
    cluster.take(conn);
    cluster.subscribe(conn, "s", "/queue/a", "client-individual");
    let producer = cluster.connect(0);
    cluster.send(
        producer,
        frame(
            Command::Send,
            &[("destination", "/queue/a"), ("note", "a:b\r\nc")],
            b"x",
        ),
    );
    let frames = cluster.frames(conn);
    assert_eq!(frames[0].header("ack"), None);
    // The harness decodes as 1.1: `\c` and `\n` unescaped, the CR sent raw.
    assert_eq!(frames[0].header("note"), Some("a:b\r\nc"));
    let message_id = frames[0].header("message-id").unwrap().to_string();
    cluster.send(
        conn,
        frame(
            Command::Ack,
            &[("subscription", "s"), ("message-id", &message_id)],
            b"",
        ),
    );
    assert!(cluster.take(conn).is_empty());
    assert!(cluster.shards[0].held_message_ids(b"/queue/a").is_empty());
}

#[test]
fn queue_bytes_are_limited() {
    let config = BrokerConfig {
        queue_bytes_max: 10,
        queue_overshoot_bytes: 0,
        ..BrokerConfig::default()
    };
    let mut cluster = Cluster::new(1, config);
    let producer = cluster.connect(0);
    cluster.publish(producer, "/queue/a", "123456");
    cluster.publish(producer, "/queue/a", "1234");
    // 11 bytes: throttled, taken within the overshoot (10 + 10/4).
    cluster.publish(producer, "/queue/a", "1");
    assert!(cluster.take(producer).is_empty());
    cluster.publish(producer, "/queue/a", "12");
    assert_eq!(
        cluster.expect_error(producer).header("message"),
        Some("queue full (queue_bytes_max and its overshoot reached)")
    );
}

/// A message that expires on its way from the queue's shard to the consumer's is not written,
/// and the queue forgets it.
#[test]
fn message_expiring_in_flight_between_shards_is_not_delivered() {
    let mut cluster = Cluster::new(2, BrokerConfig::default());
    cluster.auto_pump = false;
    let queue = "/queue/far";
    let queue_shard = shard_of(queue.as_bytes(), 2).0;
    let consumer = cluster.connect(1 - queue_shard);
    cluster.subscribe(consumer, "s", queue, "client-individual");
    while cluster.step_link(0) {}
    let producer = cluster.connect(queue_shard);
    let expires = (cluster.now + 10).to_string();
    cluster.send(
        producer,
        frame(
            Command::Send,
            &[("destination", queue), ("expires", &expires)],
            b"x",
        ),
    );
    // The Deliver is on the link when the message expires.
    cluster.now += 20;
    while cluster.step_link(0) {}
    assert!(cluster.frames(consumer).is_empty());
    assert!(cluster.shards[queue_shard as usize]
        .held_message_ids(queue.as_bytes())
        .is_empty());
}

/// RabbitMQ's `requeue:false` on NACK: the message goes to the dead-letter queue at once.
#[test]
fn nack_without_requeue_dead_letters_at_once() {
    let mut cluster = Cluster::single();
    let consumer = cluster.connect(0);
    cluster.subscribe(consumer, "s", "/queue/orders", "client-individual");
    let producer = cluster.connect(0);
    cluster.publish(producer, "/queue/orders", "bad");
    let frames = cluster.frames(consumer);
    cluster.send(
        consumer,
        frame(
            Command::Nack,
            &[("id", &ack_id(&frames[0])), ("requeue", "false")],
            b"",
        ),
    );
    assert!(cluster.frames(consumer).is_empty());
    assert!(cluster.shards[0]
        .held_message_ids(b"/queue/orders")
        .is_empty());
    assert_eq!(
        cluster.shards[0]
            .held_message_ids(b"/queue/DLQ.orders")
            .len(),
        1
    );
}

/// ActiveMQ's `persistent` SEND header in any case: stomp.py writes `persistent=True` as
/// `True`, which ActiveMQ accepts; a value that is neither true nor false is still refused.
#[test]
fn persistent_header_is_read_in_any_case() {
    let config = BrokerConfig {
        log_enabled: true,
        ..BrokerConfig::default()
    };
    let mut cluster = Cluster::new(1, config);
    let producer = cluster.connect(0);
    for (value, body) in [
        ("True", "logged"),
        ("FALSE", "memory"),
        ("false", "memory too"),
    ] {
        cluster.send(
            producer,
            frame(
                Command::Send,
                &[("destination", "/queue/a"), ("persistent", value)],
                body.as_bytes(),
            ),
        );
    }
    assert!(cluster.frames(producer).is_empty(), "no ERROR");
    assert_eq!(
        cluster.appended.len(),
        1,
        "only the persistent one is logged"
    );
    let Record::Message { message } = &cluster.appended[0].1 else {
        panic!()
    };
    assert_eq!(&*message.body, b"logged");
    cluster.send(
        producer,
        frame(
            Command::Send,
            &[("destination", "/queue/a"), ("persistent", "yes")],
            b"x",
        ),
    );
    let error = cluster.expect_error(producer);
    assert!(error.header("message").is_some());
}

// --- Byte windows (pacing a backlog of large messages) ---

/// A body of `bytes` bytes starting with `tag`, so deliveries can be told apart.
fn sized(tag: usize, bytes: usize) -> String {
    let mut body = format!("{tag}:");
    body.push_str(&"x".repeat(bytes - body.len()));
    body
}

/// Bodies' tags, in order.
fn tags(frames: &[Sent]) -> Vec<usize> {
    bodies(frames)
        .iter()
        .map(|body| body.split(':').next().unwrap().parse().unwrap())
        .collect()
}

fn byte_window(bytes: u64) -> BrokerConfig {
    BrokerConfig {
        prefetch_default_bytes: bytes,
        ..BrokerConfig::default()
    }
}

/// The estimated frame bytes the queue counts for a message of `body_bytes` to `/queue/q`.
fn estimate(body_bytes: usize) -> u64 {
    Message {
        id: MessageId {
            shard: ShardId(0),
            seq: 0,
        },
        destination: Arc::from(&b"/queue/q"[..]),
        header_block: Box::new([]),
        header_block_plain: true,
        body: vec![b'x'; body_bytes].into_boxed_slice(),
        expires_ms: 0,
        persistent: true,
        charge: crate::broker::MemoryCharge::none(),
        stored_at: crate::broker::StoredAt::new(),
    }
    .frame_bytes_estimate()
}

#[test]
fn a_byte_window_always_admits_one_message_however_large() {
    let mut cluster = Cluster::new(1, byte_window(10_000));
    let producer = cluster.connect(0);
    for tag in 0..3 {
        cluster.publish(producer, "/queue/q", &sized(tag, 50_000));
    }
    let consumer = cluster.connect(0);
    cluster.subscribe(consumer, "s", "/queue/q", "client-individual");
    for expected in 0..3 {
        let frames = cluster.frames(consumer);
        assert_eq!(tags(&frames), [expected], "one at a time, in order");
        cluster.ack(consumer, &ack_id(&frames[0]));
    }
    assert!(cluster.frames(consumer).is_empty());
    assert!(cluster.shards[0].held_message_ids(b"/queue/q").is_empty());
}

#[test]
fn a_byte_window_holds_what_fits_and_acks_release_their_bytes() {
    // Room for three 1,000-byte messages, not four.
    let window = 3 * estimate(1000) + estimate(1000) / 2;
    let mut cluster = Cluster::new(1, byte_window(window));
    let producer = cluster.connect(0);
    for tag in 0..8 {
        cluster.publish(producer, "/queue/q", &sized(tag, 1000));
    }
    let consumer = cluster.connect(0);
    cluster.subscribe(consumer, "s", "/queue/q", "client");
    let frames = cluster.frames(consumer);
    assert_eq!(tags(&frames), [0, 1, 2]);
    // A cumulative ACK of two frees two messages' bytes.
    cluster.ack(consumer, &ack_id(&frames[1]));
    let more = cluster.frames(consumer);
    assert_eq!(tags(&more), [3, 4]);
    // A large message does not fit beside the three held; once they are acked it goes alone.
    cluster.publish(producer, "/queue/q", &sized(8, 4000));
    cluster.ack(consumer, &ack_id(&more[1]));
    let frames = cluster.frames(consumer);
    assert_eq!(tags(&frames), [5, 6, 7], "three small ones fit again");
    cluster.ack(consumer, &ack_id(&frames[2]));
    assert_eq!(tags(&cluster.frames(consumer)), [8], "the large one, alone");
}

#[test]
fn an_auto_ack_byte_window_refills_only_as_its_bytes_are_flushed() {
    let window = 3 * estimate(1000) + estimate(1000) / 2;
    let mut cluster = Cluster::new(2, byte_window(window));
    cluster.auto_flush = false;
    let producer = cluster.connect(0);
    for tag in 0..7 {
        cluster.publish(producer, "/queue/q", &sized(tag, 1000));
    }
    let consumer = cluster.connect(1);
    cluster.subscribe(consumer, "s", "/queue/q", "auto");
    assert_eq!(tags(&cluster.frames(consumer)), [0, 1, 2]);
    assert!(cluster.frames(consumer).is_empty(), "nothing until flushed");
    flush_and_pump(&mut cluster, consumer);
    assert_eq!(tags(&cluster.frames(consumer)), [3, 4, 5]);
    flush_and_pump(&mut cluster, consumer);
    assert_eq!(tags(&cluster.frames(consumer)), [6]);
}

#[test]
fn the_message_window_still_applies_to_small_messages() {
    let mut cluster = Cluster::new(1, byte_window(1 << 20));
    let producer = cluster.connect(0);
    for tag in 0..5 {
        cluster.publish(producer, "/queue/q", &sized(tag, 10));
    }
    let consumer = cluster.connect(0);
    cluster.subscribe_prefetch(consumer, "/queue/q", "client-individual", 2);
    assert_eq!(tags(&cluster.frames(consumer)), [0, 1]);
}

/// The server reports `conn`'s output flushed; the credit travels to the queue's shard.
fn flush_and_pump(cluster: &mut Cluster, conn: ConnectionId) {
    cluster.flush(conn);
    while cluster.step_link(0) {}
}

/// Found while tuning loop turns: a client-ack delivery still on its way between cores when
/// its consumer's connection closes never reached the session, so it must not count toward
/// dead-lettering. With `deliveries_max: 1` it would otherwise move to the dead-letter queue
/// without ever having been sent; it goes back to its queue, and the next consumer gets it.
#[test]
fn a_delivery_in_flight_when_its_consumer_goes_is_not_counted_toward_dead_lettering() {
    let config = BrokerConfig {
        deliveries_max: 1,
        ..BrokerConfig::default()
    };
    let mut cluster = Cluster::new(2, config);
    let queue = "/queue/in-flight";
    let owner = shard_of(queue.as_bytes(), 2).0;
    let other = 1 - owner;
    let producer = cluster.connect(owner);
    cluster.publish(producer, queue, "never sent");
    let consumer = cluster.connect(other);
    cluster.auto_pump = false;
    cluster.subscribe(consumer, "s", queue, "client-individual");
    // The queue's shard takes the SUBSCRIBE and hands the message out: its Deliver waits on
    // the link to the consumer's shard while the connection goes.
    while !cluster.links[&(other, owner)].is_empty() {
        assert!(cluster.step_link(0));
    }
    assert_eq!(
        cluster.links[&(owner, other)].len(),
        1,
        "the Deliver on its way"
    );
    cluster.lose(consumer);
    while cluster.step_link(0) {}
    cluster.auto_pump = true;
    assert!(
        cluster.take(consumer).is_empty(),
        "it never reached the client"
    );
    assert!(
        cluster.shards[usize::from(shard_of(b"/queue/DLQ.in-flight", 2).0)]
            .held_message_ids(b"/queue/DLQ.in-flight")
            .is_empty(),
        "not dead-lettered"
    );
    let next = cluster.connect(other);
    cluster.subscribe(next, "s", queue, "client-individual");
    assert_eq!(bodies(&cluster.frames(next)), ["never sent"]);
}
