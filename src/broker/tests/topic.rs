//! Topic semantics: fan-out to current subscribers, nothing kept.

use super::*;

#[test]
fn every_current_subscriber_gets_each_message() {
    let mut cluster = Cluster::single();
    let a = cluster.connect(0);
    let b = cluster.connect(0);
    cluster.subscribe(a, "s", "/topic/news", "auto");
    cluster.subscribe(b, "s", "/topic/news", "auto");
    let producer = cluster.connect(0);
    cluster.publish(producer, "/topic/news", "1");
    cluster.publish(producer, "/topic/news", "2");
    assert_eq!(bodies(&cluster.frames(a)), ["1", "2"]);
    assert_eq!(bodies(&cluster.frames(b)), ["1", "2"]);
}

#[test]
fn nothing_is_kept_for_later_subscribers() {
    let mut cluster = Cluster::single();
    let producer = cluster.connect(0);
    cluster.publish(producer, "/topic/news", "early");
    let late = cluster.connect(0);
    cluster.subscribe(late, "s", "/topic/news", "auto");
    assert!(cluster.frames(late).is_empty());
    cluster.publish(producer, "/topic/news", "late");
    assert_eq!(bodies(&cluster.frames(late)), ["late"]);
}

#[test]
fn topic_fans_out_across_shards() {
    let mut cluster = Cluster::new(3, BrokerConfig::default());
    let subscribers: Vec<ConnectionId> = (0..3).map(|shard| cluster.connect(shard)).collect();
    for conn in &subscribers {
        cluster.subscribe(*conn, "s", "/topic/all", "auto");
    }
    let producer = cluster.connect(1);
    cluster.publish(producer, "/topic/all", "hello");
    for conn in subscribers {
        assert_eq!(bodies(&cluster.frames(conn)), ["hello"]);
    }
}

#[test]
fn client_acked_topic_subscriber_out_of_credit_misses_messages() {
    let mut cluster = Cluster::single();
    let slow = cluster.connect(0);
    cluster.send(
        slow,
        frame(
            Command::Subscribe,
            &[
                ("id", "s"),
                ("destination", "/topic/t"),
                ("ack", "client"),
                ("prefetch-count", "1"),
            ],
            b"",
        ),
    );
    let producer = cluster.connect(0);
    cluster.publish(producer, "/topic/t", "1");
    cluster.publish(producer, "/topic/t", "2");
    let frames = cluster.frames(slow);
    assert_eq!(bodies(&frames), ["1"]);
    cluster.ack(slow, frames[0].header("ack").unwrap());
    cluster.publish(producer, "/topic/t", "3");
    assert_eq!(bodies(&cluster.frames(slow)), ["3"]);
}

#[test]
fn auto_ack_topic_subscriber_misses_messages_only_while_its_connection_is_full_past_its_slack() {
    // Slack for two of the 10 KB messages below (each frame is its body plus a few hundred
    // bytes of headers), not three.
    let config = BrokerConfig {
        topic_slack_bytes: 25_000,
        ..BrokerConfig::default()
    };
    let mut cluster = Cluster::new(1, config);
    cluster.auto_flush = false;
    let subscriber = cluster.connect(0);
    cluster.send(
        subscriber,
        frame(
            Command::Subscribe,
            &[
                ("id", "s"),
                ("destination", "/topic/t"),
                ("prefetch-count", "2"),
            ],
            b"",
        ),
    );
    let producer = cluster.connect(0);
    for body in ["1", "2", "3", "4"] {
        cluster.publish(producer, "/topic/t", body);
    }
    assert_eq!(
        bodies(&cluster.frames(subscriber)),
        ["1", "2", "3", "4"],
        "a burst before the first flush is not lost"
    );
    cluster.writable(subscriber, false);
    let large = |n: char| {
        std::iter::once(n)
            .chain(std::iter::repeat_n('x', 10_000))
            .collect::<String>()
    };
    for body in ['5', '6', '7'] {
        cluster.publish(producer, "/topic/t", &large(body));
    }
    assert!(
        cluster.frames(subscriber).is_empty(),
        "nothing is written to a full connection"
    );
    cluster.writable(subscriber, true);
    assert_eq!(
        bodies(&cluster.frames(subscriber)),
        [large('5'), large('6')],
        "a full connection takes its slack (written once it drains), then misses messages"
    );
    cluster.publish(producer, "/topic/t", "8");
    assert_eq!(bodies(&cluster.frames(subscriber)), ["8"]);
}

#[test]
fn a_briefly_full_subscriber_still_gets_one_message_larger_than_its_slack() {
    let config = BrokerConfig {
        topic_slack_bytes: 5_000,
        ..BrokerConfig::default()
    };
    let mut cluster = Cluster::new(1, config);
    cluster.auto_flush = false;
    let subscriber = cluster.connect(0);
    cluster.subscribe(subscriber, "s", "/topic/t", "auto");
    let producer = cluster.connect(0);
    cluster.writable(subscriber, false);
    let large = |n: char| {
        std::iter::once(n)
            .chain(std::iter::repeat_n('x', 20_000))
            .collect::<String>()
    };
    for body in ['1', '2'] {
        cluster.publish(producer, "/topic/t", &large(body));
    }
    cluster.writable(subscriber, true);
    assert_eq!(
        bodies(&cluster.frames(subscriber)),
        [large('1')],
        "one message whatever its size, then the slack is used"
    );
}
