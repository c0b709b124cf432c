//! `/queue/monitor`: stompserver's statistics pseudo-queue.

use super::*;

#[test]
fn monitor_subscriber_gets_stats_every_interval_in_stompserver_format() {
    let mut cluster = Cluster::new(2, BrokerConfig::default());
    let producer = cluster.connect(0);
    for _ in 0..3 {
        cluster.publish(producer, "/queue/test", "x");
    }
    cluster.publish(producer, "/queue/other", "y");
    let consumer = cluster.connect(0);
    cluster.subscribe(consumer, "c", "/queue/test", "auto");
    cluster.frames(consumer);
    cluster.publish(producer, "/queue/test", "z");
    cluster.frames(consumer);
    let monitor = cluster.connect(1);
    cluster.subscribe(monitor, "m", "/queue/monitor", "auto");
    cluster.tick(); // arms the timers
    cluster.now += 5000;
    cluster.tick(); // every shard publishes its stats; the monitor's shard has none to report yet
    cluster.now += 5000;
    cluster.tick(); // now with the other shard's figures
    let frames = cluster.frames(monitor);
    assert_eq!(frames.len(), 1);
    let last = &frames[0];
    assert_eq!(last.header("destination"), Some("/queue/monitor"));
    assert_eq!(last.header("subscription"), Some("m"));
    assert_eq!(
        last.body_str(),
        "Queue: /queue/other\nsize: 1\ndequeued: 0\nenqueued: 1\n\n\
         Queue: /queue/test\nsize: 0\ndequeued: 4\nenqueued: 4\n\n"
    );
    cluster.now += 4999;
    cluster.tick();
    assert!(
        cluster.frames(monitor).is_empty(),
        "not before the interval"
    );
}

#[test]
fn monitor_is_read_only() {
    let mut cluster = Cluster::single();
    let conn = cluster.connect(0);
    cluster.publish(conn, "/queue/monitor", "x");
    assert_eq!(
        cluster.expect_error(conn).header("message"),
        Some("/queue/monitor is read-only")
    );
}

#[test]
fn monitor_stays_quiet_when_there_is_no_queue() {
    let mut cluster = Cluster::single();
    let monitor = cluster.connect(0);
    cluster.subscribe(monitor, "m", "/queue/monitor", "auto");
    cluster.tick();
    cluster.now += 5000;
    cluster.tick();
    assert!(cluster.frames(monitor).is_empty());
}
