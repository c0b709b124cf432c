//! RECEIPT timing (STOMP 1.2 "RECEIPT"): in order per connection, and, when the log is synced
//! before receipts, only once a persistent SEND's record is durable.

use super::*;

fn durable_config() -> BrokerConfig {
    BrokerConfig {
        log_enabled: true,
        receipts_wait_for_sync: true,
        ..BrokerConfig::default()
    }
}

fn receipt_ids(frames: &[Sent]) -> Vec<String> {
    frames
        .iter()
        .filter(|f| f.command == Command::Receipt)
        .map(|f| f.header("receipt-id").unwrap().to_string())
        .collect()
}

#[test]
fn receipt_for_a_persistent_send_waits_for_durability() {
    let mut cluster = Cluster::new(1, durable_config());
    let producer = cluster.connect(0);
    cluster.send(
        producer,
        frame(
            Command::Send,
            &[("destination", "/queue/a"), ("receipt", "r1")],
            b"x",
        ),
    );
    assert!(cluster.frames(producer).is_empty());
    let token = cluster.appended[0]
        .2
        .expect("a receipted persistent SEND carries a token");
    cluster.durable(0, token);
    assert_eq!(receipt_ids(&cluster.frames(producer)), ["r1"]);
}

#[test]
fn receipts_keep_their_order_behind_a_durable_wait() {
    let mut cluster = Cluster::new(1, durable_config());
    let producer = cluster.connect(0);
    cluster.send(
        producer,
        frame(
            Command::Send,
            &[("destination", "/queue/a"), ("receipt", "r1")],
            b"x",
        ),
    );
    cluster.send(
        producer,
        frame(
            Command::Subscribe,
            &[("id", "s"), ("destination", "/queue/b"), ("receipt", "r2")],
            b"",
        ),
    );
    cluster.send(
        producer,
        frame(
            Command::Send,
            &[
                ("destination", "/queue/a"),
                ("persistent", "false"),
                ("receipt", "r3"),
            ],
            b"y",
        ),
    );
    assert!(
        cluster.frames(producer).is_empty(),
        "r2 and r3 wait behind r1"
    );
    let token = cluster.appended[0].2.unwrap();
    cluster.durable(0, token);
    assert_eq!(receipt_ids(&cluster.frames(producer)), ["r1", "r2", "r3"]);
}

#[test]
fn one_durability_report_releases_every_earlier_append() {
    let mut cluster = Cluster::new(1, durable_config());
    let producer = cluster.connect(0);
    cluster.send(
        producer,
        frame(
            Command::Send,
            &[("destination", "/queue/a"), ("receipt", "r1")],
            b"x",
        ),
    );
    cluster.send(
        producer,
        frame(
            Command::Send,
            &[("destination", "/queue/b"), ("receipt", "r2")],
            b"y",
        ),
    );
    let last = cluster.appended[1].2.unwrap();
    cluster.durable(0, last);
    assert_eq!(receipt_ids(&cluster.frames(producer)), ["r1", "r2"]);
}

#[test]
fn without_sync_policy_the_receipt_is_immediate() {
    let config = BrokerConfig {
        log_enabled: true,
        ..BrokerConfig::default()
    };
    let mut cluster = Cluster::new(1, config);
    let producer = cluster.connect(0);
    cluster.send(
        producer,
        frame(
            Command::Send,
            &[("destination", "/queue/a"), ("receipt", "r1")],
            b"x",
        ),
    );
    assert_eq!(receipt_ids(&cluster.frames(producer)), ["r1"]);
    assert_eq!(cluster.appended[0].2, None);
}

#[test]
fn commit_receipt_waits_for_every_send_of_the_transaction() {
    let mut cluster = Cluster::new(2, durable_config());
    let producer = cluster.connect(0);
    cluster.send(
        producer,
        frame(Command::Begin, &[("transaction", "t")], b""),
    );
    // Two queues, likely on different shards: both must be durable.
    for queue in ["/queue/a", "/queue/b", "/queue/c"] {
        cluster.send(
            producer,
            frame(
                Command::Send,
                &[("destination", queue), ("transaction", "t")],
                b"x",
            ),
        );
    }
    cluster.send(
        producer,
        frame(
            Command::Commit,
            &[("transaction", "t"), ("receipt", "c")],
            b"",
        ),
    );
    assert!(cluster.frames(producer).is_empty());
    let appends: Vec<(ShardId, DurableToken)> = cluster
        .appended
        .iter()
        .map(|(shard, _, token)| (*shard, token.unwrap()))
        .collect();
    assert_eq!(appends.len(), 3);
    for (index, (shard, token)) in appends.iter().enumerate() {
        cluster.durable(shard.0, *token);
        let frames = cluster.frames(producer);
        if index + 1 < appends.len() {
            assert!(frames.is_empty());
        } else {
            assert_eq!(receipt_ids(&frames), ["c"]);
        }
    }
}

#[test]
fn disconnect_receipt_waits_for_earlier_receipts_then_closes() {
    let mut cluster = Cluster::new(1, durable_config());
    let producer = cluster.connect(0);
    cluster.send(
        producer,
        frame(
            Command::Send,
            &[("destination", "/queue/a"), ("receipt", "r1")],
            b"x",
        ),
    );
    cluster.send(
        producer,
        frame(Command::Disconnect, &[("receipt", "bye")], b""),
    );
    assert!(cluster.take(producer).is_empty());
    let token = cluster.appended[0].2.unwrap();
    cluster.durable(0, token);
    let seen = cluster.take(producer);
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(seen[2], Seen::Closed);
}

#[test]
fn receipt_for_a_send_to_another_shard_comes_back_in_order() {
    let mut cluster = Cluster::new(4, BrokerConfig::default());
    let producer = cluster.connect(0);
    let mut expected = Vec::new();
    for index in 0..20 {
        let receipt = format!("r{index}");
        let destination = format!("/queue/q{index}");
        cluster.send(
            producer,
            frame(
                Command::Send,
                &[("destination", &destination), ("receipt", &receipt)],
                b"x",
            ),
        );
        expected.push(receipt);
    }
    assert_eq!(receipt_ids(&cluster.frames(producer)), expected);
}

#[test]
fn a_send_the_log_could_not_store_gets_an_error_instead_of_its_receipt() {
    let mut cluster = Cluster::new(1, durable_config());
    let producer = cluster.connect(0);
    cluster.send(
        producer,
        frame(
            Command::Send,
            &[("destination", "/queue/a"), ("receipt", "r1")],
            b"x",
        ),
    );
    let (Record::Message { message }, Some(token)) =
        (cluster.appended[0].1.clone(), cluster.appended[0].2)
    else {
        panic!("a receipted persistent SEND is appended with a token");
    };
    let mut out = Effects::new();
    let now = cluster.now;
    cluster.shards[0].on_append_failed(
        b"/queue/a",
        message.id,
        Some(token),
        "disk full",
        now,
        &mut out,
    );
    assert!(out.list.is_empty());
    assert!(cluster.frames(producer).is_empty(), "reported in its turn");
    cluster.durable(0, token);
    let error = cluster.expect_error(producer);
    assert_eq!(
        error.header("message"),
        Some("message not stored: disk full")
    );
    assert!(receipt_ids(&[error]).is_empty());
    let consumer = cluster.connect(0);
    cluster.subscribe(consumer, "s", "/queue/a", "auto");
    assert!(
        cluster.frames(consumer).is_empty(),
        "a message that was not stored is not delivered"
    );
}

/// STOMP 1.2 "SUBSCRIBE" with a receipt: a client that publishes (from any connection) once it
/// has the RECEIPT must not have its message overtake the subscription on the way to the
/// destination's shard.
#[test]
fn a_subscribe_receipt_waits_until_the_destination_on_another_shard_has_the_subscription() {
    let mut cluster = Cluster::new(2, BrokerConfig::default());
    let name = (0..)
        .map(|n| format!("/topic/t{n}"))
        .find(|name| shard_of(name.as_bytes(), 2) == ShardId(1))
        .unwrap();
    let subscriber = cluster.connect(0);
    cluster.auto_pump = false;
    cluster.send(
        subscriber,
        frame(
            Command::Subscribe,
            &[("id", "s"), ("destination", &name), ("receipt", "r1")],
            b"",
        ),
    );
    assert!(
        cluster.frames(subscriber).is_empty(),
        "no RECEIPT before the destination's shard has the subscription"
    );
    while cluster.step_link(0) {}
    assert_eq!(receipt_ids(&cluster.frames(subscriber)), ["r1"]);
}

#[test]
fn a_send_without_receipt_the_log_could_not_store_gets_an_error_too() {
    let mut cluster = Cluster::new(2, durable_config());
    let queue_shard = shard_of(b"/queue/a", 2);
    let producer = cluster.connect(1 - queue_shard.0);
    cluster.publish(producer, "/queue/a", "x");
    let (shard, Record::Message { message }, None) = cluster.appended[0].clone() else {
        panic!("a persistent SEND without receipt is appended without a token");
    };
    assert_eq!(shard, queue_shard);
    let mut out = Effects::new();
    let now = cluster.now;
    cluster.shards[shard.0 as usize].on_append_failed(
        b"/queue/a",
        message.id,
        None,
        "disk full",
        now,
        &mut out,
    );
    cluster.absorb(shard, out);
    cluster.pump_if_auto();
    let error = cluster.expect_error(producer);
    assert_eq!(
        error.header("message"),
        Some("message not stored: disk full")
    );
    let consumer = cluster.connect(0);
    cluster.subscribe(consumer, "s", "/queue/a", "auto");
    assert!(
        cluster.frames(consumer).is_empty(),
        "not stored, not delivered"
    );
}
