//! The shard's metrics snapshot: gauges of what it holds and running totals.

use super::*;

#[test]
fn metrics_count_what_happened() {
    // Room for one small MESSAGE frame (about 300 bytes) in a full connection's slack.
    let config = BrokerConfig {
        topic_slack_bytes: 400,
        ..BrokerConfig::default()
    };
    let mut cluster = Cluster::new(1, config);
    let producer = cluster.connect(0);
    let consumer = cluster.connect(0);
    cluster.subscribe(consumer, "q", "/queue/a", "client");
    cluster.send(
        consumer,
        frame(
            Command::Subscribe,
            &[
                ("id", "t"),
                ("destination", "/topic/t"),
                ("prefetch-count", "1"),
            ],
            b"",
        ),
    );
    cluster.publish(producer, "/queue/a", "1");
    cluster.publish(producer, "/queue/b", "kept");
    cluster.writable(consumer, false);
    cluster.publish(producer, "/topic/t", "the paused subscriber's slack");
    cluster.publish(producer, "/topic/t", "dropped while paused");
    let past = (cluster.now - 1).to_string();
    cluster.send(
        producer,
        frame(
            Command::Send,
            &[("destination", "/queue/a"), ("expires", &past)],
            b"late",
        ),
    );
    cluster.send(producer, frame(Command::Ack, &[("id", "nope")], b""));
    let metrics = cluster.shards[0].metrics();
    assert_eq!(metrics.sessions, 1, "the producer was closed by its error");
    assert_eq!(metrics.queues, 2);
    assert_eq!(metrics.topics, 1);
    assert_eq!(
        metrics.messages_held, 2,
        "one unacked on /queue/a, one waiting on /queue/b"
    );
    assert_eq!(
        metrics.counters,
        Counters {
            messages_accepted_total: 4,
            deliveries_total: 2,
            topic_deliveries_dropped_total: 1,
            messages_expired_total: 1,
            messages_dead_lettered_total: 0,
            messages_unreadable_total: 0,
            errors_total: 1,
        }
    );
}
