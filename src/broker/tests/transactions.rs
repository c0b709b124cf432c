//! STOMP 1.2 "BEGIN" / "COMMIT" / "ABORT": SEND, ACK and NACK inside transactions.

use super::*;

fn tx_frame<'b>(command: Command, tx: &str) -> Frame<'b> {
    frame(command, &[("transaction", tx)], b"")
}

#[test]
fn sends_in_a_transaction_are_delivered_on_commit_only() {
    let mut cluster = Cluster::single();
    let consumer = cluster.connect(0);
    cluster.subscribe(consumer, "s", "/queue/a", "auto");
    let producer = cluster.connect(0);
    cluster.send(producer, tx_frame(Command::Begin, "t1"));
    cluster.send(
        producer,
        frame(
            Command::Send,
            &[("destination", "/queue/a"), ("transaction", "t1")],
            b"1",
        ),
    );
    cluster.send(
        producer,
        frame(
            Command::Send,
            &[("destination", "/queue/a"), ("transaction", "t1")],
            b"2",
        ),
    );
    assert!(cluster.frames(consumer).is_empty());
    cluster.send(producer, tx_frame(Command::Commit, "t1"));
    assert_eq!(bodies(&cluster.frames(consumer)), ["1", "2"]);
}

#[test]
fn abort_discards_sends() {
    let mut cluster = Cluster::single();
    let producer = cluster.connect(0);
    cluster.send(producer, tx_frame(Command::Begin, "t1"));
    cluster.send(
        producer,
        frame(
            Command::Send,
            &[("destination", "/queue/a"), ("transaction", "t1")],
            b"1",
        ),
    );
    cluster.send(producer, tx_frame(Command::Abort, "t1"));
    assert!(cluster.shards[0].held_message_ids(b"/queue/a").is_empty());
    // The name is free again.
    cluster.send(producer, tx_frame(Command::Begin, "t1"));
    assert!(cluster.take(producer).is_empty());
}

#[test]
fn acks_in_a_transaction_take_effect_on_commit_and_are_undone_by_abort() {
    let mut cluster = Cluster::single();
    let consumer = cluster.connect(0);
    cluster.subscribe(consumer, "s", "/queue/a", "client-individual");
    let producer = cluster.connect(0);
    cluster.publish(producer, "/queue/a", "1");
    let frames = cluster.frames(consumer);
    let ack = frames[0].header("ack").unwrap().to_string();
    cluster.send(consumer, tx_frame(Command::Begin, "t1"));
    cluster.send(
        consumer,
        frame(Command::Ack, &[("id", &ack), ("transaction", "t1")], b""),
    );
    assert_eq!(cluster.shards[0].held_message_ids(b"/queue/a").len(), 1);
    cluster.send(consumer, tx_frame(Command::Abort, "t1"));
    assert_eq!(cluster.shards[0].held_message_ids(b"/queue/a").len(), 1);
    // Undone: the message can be acked again, now for real.
    cluster.send(consumer, tx_frame(Command::Begin, "t2"));
    cluster.send(
        consumer,
        frame(Command::Ack, &[("id", &ack), ("transaction", "t2")], b""),
    );
    cluster.send(consumer, tx_frame(Command::Commit, "t2"));
    assert!(cluster.shards[0].held_message_ids(b"/queue/a").is_empty());
    assert!(cluster.take(consumer).is_empty());
}

#[test]
fn nack_in_a_transaction_redelivers_on_commit() {
    let mut cluster = Cluster::single();
    let consumer = cluster.connect(0);
    cluster.subscribe(consumer, "s", "/queue/a", "client");
    let producer = cluster.connect(0);
    cluster.publish(producer, "/queue/a", "1");
    let frames = cluster.frames(consumer);
    cluster.send(consumer, tx_frame(Command::Begin, "t"));
    cluster.send(
        consumer,
        frame(
            Command::Nack,
            &[
                ("id", frames[0].header("ack").unwrap()),
                ("transaction", "t"),
            ],
            b"",
        ),
    );
    assert!(cluster.frames(consumer).is_empty());
    cluster.send(consumer, tx_frame(Command::Commit, "t"));
    let again = cluster.frames(consumer);
    assert_eq!(again[0].header("redelivered"), Some("true"));
}

#[test]
fn disconnect_aborts_open_transactions() {
    let mut cluster = Cluster::single();
    let producer = cluster.connect(0);
    cluster.send(producer, tx_frame(Command::Begin, "t1"));
    cluster.send(
        producer,
        frame(
            Command::Send,
            &[("destination", "/queue/a"), ("transaction", "t1")],
            b"1",
        ),
    );
    cluster.send(producer, frame(Command::Disconnect, &[], b""));
    assert!(cluster.shards[0].held_message_ids(b"/queue/a").is_empty());
}

#[test]
fn unknown_transaction_is_an_error() {
    for command in [Command::Commit, Command::Abort] {
        let mut cluster = Cluster::single();
        let conn = cluster.connect(0);
        cluster.send(conn, tx_frame(command, "nope"));
        assert_eq!(
            cluster.expect_error(conn).header("message"),
            Some("unknown transaction")
        );
    }
    let mut cluster = Cluster::single();
    let conn = cluster.connect(0);
    cluster.send(
        conn,
        frame(
            Command::Send,
            &[("destination", "/queue/a"), ("transaction", "nope")],
            b"",
        ),
    );
    assert_eq!(
        cluster.expect_error(conn).header("message"),
        Some("unknown transaction")
    );
}

#[test]
fn duplicate_transaction_is_an_error() {
    let mut cluster = Cluster::single();
    let conn = cluster.connect(0);
    cluster.send(conn, tx_frame(Command::Begin, "t1"));
    cluster.send(conn, tx_frame(Command::Begin, "t1"));
    assert_eq!(
        cluster.expect_error(conn).header("message"),
        Some("transaction already begun")
    );
}

#[test]
fn transaction_frames_are_limited() {
    let config = BrokerConfig {
        transaction_frames_max: 2,
        ..BrokerConfig::default()
    };
    let mut cluster = Cluster::new(1, config);
    let conn = cluster.connect(0);
    cluster.send(conn, tx_frame(Command::Begin, "t"));
    for _ in 0..3 {
        cluster.send(
            conn,
            frame(
                Command::Send,
                &[("destination", "/queue/a"), ("transaction", "t")],
                b"x",
            ),
        );
    }
    assert_eq!(
        cluster.expect_error(conn).header("message"),
        Some("transaction_frames_max exceeded (at most 2)")
    );
}
