//! The disk budget in the broker logic: the shard's store says how full its log is
//! ([`DiskPressure`]); a logged SEND to a queue of a shard past seven eighths pauses its producer
//! (once, whatever core it is on), a tick releases it once the log is back under three
//! quarters, and what the memory budget never pauses (a connection with an open transaction,
//! one consuming with client acks) is not paused for disk either.

use super::*;
use crate::broker::DiskPressure;

/// Two shards, logging on; the queue `/queue/d` and the shard whose log holds it.
fn logging() -> (Cluster, usize) {
    let cluster = Cluster::new(
        2,
        BrokerConfig {
            log_enabled: true,
            ..BrokerConfig::default()
        },
    );
    let owner = usize::from(shard_of(b"/queue/d", 2).0);
    (cluster, owner)
}

#[test]
fn a_producer_to_a_queue_whose_log_is_nearly_full_is_paused_then_released_under_three_quarters() {
    let (mut cluster, owner) = logging();
    // The producer on the other core than the queue: the pause travels between shards.
    let producer = cluster.connect(1 - owner as u16);
    cluster.publish(producer, "/queue/d", "a");
    assert_eq!(throttles_of(&cluster, producer), Vec::<bool>::new());

    cluster.shards[owner].store_mut().disk = DiskPressure::High;
    cluster.publish(producer, "/queue/d", "b");
    cluster.publish(producer, "/queue/d", "c");
    assert_eq!(throttles_of(&cluster, producer), vec![true], "paused once");
    // Taken all the same: the pause is flow control, not a refusal.
    assert_eq!(cluster.shards[owner].held_message_ids(b"/queue/d").len(), 3);

    // Between the levels: nobody is released.
    cluster.shards[owner].store_mut().disk = DiskPressure::Easing;
    cluster.tick();
    assert_eq!(throttles_of(&cluster, producer), vec![true]);

    cluster.shards[owner].store_mut().disk = DiskPressure::Low;
    cluster.tick();
    cluster.tick();
    assert_eq!(
        throttles_of(&cluster, producer),
        vec![true, false],
        "released once"
    );
}

#[test]
fn what_does_not_reach_the_log_is_not_paused_for_disk() {
    let (mut cluster, owner) = logging();
    cluster.shards[0].store_mut().disk = DiskPressure::High;
    cluster.shards[1].store_mut().disk = DiskPressure::High;
    let producer = cluster.connect(0);
    let listener = cluster.connect(1);
    cluster.subscribe(listener, "t", "/topic/d", "auto");
    cluster.publish(producer, "/topic/d", "to a topic");
    cluster.send(
        producer,
        frame(
            Command::Send,
            &[("destination", "/queue/d"), ("persistent", "false")],
            b"not persistent",
        ),
    );
    assert_eq!(throttles_of(&cluster, producer), Vec::<bool>::new());
    assert_eq!(cluster.shards[owner].held_message_ids(b"/queue/d").len(), 1);
}

#[test]
fn a_client_ack_consumer_or_an_open_transaction_is_not_paused_for_disk() {
    let (mut cluster, owner) = logging();
    cluster.shards[owner].store_mut().disk = DiskPressure::High;

    // Its ACKs may be what drains the log.
    let worker = cluster.connect(0);
    cluster.subscribe(worker, "w", "/queue/other", "client");
    cluster.publish(worker, "/queue/d", "from a worker");
    assert_eq!(throttles_of(&cluster, worker), Vec::<bool>::new());

    // Its COMMIT is what frees the memory its SENDs hold: it is paused only once no
    // transaction is open.
    let producer = cluster.connect(1);
    cluster.send(
        producer,
        frame(Command::Begin, &[("transaction", "a")], b""),
    );
    cluster.send(
        producer,
        frame(Command::Begin, &[("transaction", "b")], b""),
    );
    cluster.send(
        producer,
        frame(
            Command::Send,
            &[("destination", "/queue/d"), ("transaction", "a")],
            b"in a",
        ),
    );
    cluster.send(
        producer,
        frame(Command::Commit, &[("transaction", "a")], b""),
    );
    assert_eq!(throttles_of(&cluster, producer), Vec::<bool>::new());
    cluster.send(
        producer,
        frame(Command::Abort, &[("transaction", "b")], b""),
    );
    assert_eq!(throttles_of(&cluster, producer), vec![true]);

    cluster.shards[owner].store_mut().disk = DiskPressure::Low;
    cluster.tick();
    assert_eq!(throttles_of(&cluster, producer), vec![true, false]);
    assert_eq!(throttles_of(&cluster, worker), Vec::<bool>::new());
}
