//! The memory budget in the broker logic: stored messages are charged and given back, a
//! producer past the pause level is paused and released by a tick once memory is freed, what
//! cannot wait is refused naming the limit, and drained destinations are freed.

use super::*;
use crate::broker::MemoryBudget;

/// A broker whose budget is `max` bytes (its own, so tests running at once do not share it).
fn budgeted(max: u64) -> (Cluster, &'static MemoryBudget) {
    let memory = MemoryBudget::leak(max);
    let cluster = Cluster::new(
        2,
        BrokerConfig {
            memory,
            ..BrokerConfig::default()
        },
    );
    (cluster, memory)
}

#[test]
fn a_producer_past_the_pause_level_is_paused_then_released_when_memory_is_freed() {
    // 1 MiB budget: paused past 896 KiB, released under 768 KiB, refused past 1 MiB.
    let (mut cluster, memory) = budgeted(1 << 20);
    let producer = cluster.connect(0);
    let body = "x".repeat(100 * 1024);
    for _ in 0..8 {
        cluster.publish(producer, "/queue/m", &body);
    }
    assert!(
        memory.charged() <= memory.pause_bytes(),
        "{}",
        memory.charged()
    );
    assert_eq!(throttles_of(&cluster, producer), Vec::<bool>::new());
    cluster.publish(producer, "/queue/m", &body);
    assert!(memory.charged() > memory.pause_bytes());
    assert_eq!(throttles_of(&cluster, producer), vec![true], "paused");
    // Still held: a tick releases nothing.
    cluster.tick();
    assert_eq!(throttles_of(&cluster, producer), vec![true]);

    let consumer = cluster.connect(1);
    cluster.subscribe(consumer, "c", "/queue/m", "auto");
    assert_eq!(
        cluster.frames(consumer).len(),
        9,
        "everything taken is delivered"
    );
    // Delivered and flushed: nothing holds the messages any more.
    cluster.flush(consumer);
    assert_eq!(memory.charged(), 0);
    cluster.tick();
    assert_eq!(
        throttles_of(&cluster, producer),
        vec![true, false],
        "released once"
    );
}

#[test]
fn what_cannot_wait_is_refused_naming_the_limit_and_its_memory_given_back() {
    let (mut cluster, memory) = budgeted(1 << 20);
    let producer = cluster.connect(0);
    cluster.send(
        producer,
        frame(Command::Begin, &[("transaction", "t")], b""),
    );
    let body = vec![b'x'; 100 * 1024];
    for _ in 0..8 {
        cluster.send(
            producer,
            frame(
                Command::Send,
                &[("destination", "/queue/t"), ("transaction", "t")],
                &body,
            ),
        );
    }
    assert!(cluster.take(producer).is_empty());
    // A transaction past the pause level is refused rather than paused: its own COMMIT or
    // ABORT is what would free the memory.
    cluster.send(
        producer,
        frame(
            Command::Send,
            &[("destination", "/queue/t"), ("transaction", "t")],
            &body,
        ),
    );
    let error = cluster.expect_error(producer);
    assert!(
        error
            .header("message")
            .unwrap()
            .contains("memory_bytes_max exceeded"),
        "{error:?}"
    );
    assert_eq!(
        memory.charged(),
        0,
        "the closed connection's transaction is freed"
    );
    assert_eq!(throttles_of(&cluster, producer), Vec::<bool>::new());
}

#[test]
fn a_client_ack_consumer_is_not_paused_for_memory() {
    let (mut cluster, memory) = budgeted(1 << 20);
    let conn = cluster.connect(0);
    cluster.subscribe(conn, "s", "/queue/own", "client");
    let body = "x".repeat(100 * 1024);
    for _ in 0..9 {
        cluster.publish(conn, "/queue/elsewhere", &body);
    }
    assert!(memory.charged() > memory.pause_bytes());
    assert_eq!(throttles_of(&cluster, conn), Vec::<bool>::new());
}

#[test]
fn drained_queues_are_freed_round_after_round() {
    let mut cluster = Cluster::new(2, BrokerConfig::default());
    let producer = cluster.connect(0);
    let consumer = cluster.connect(1);
    for round in 0..3 {
        for batch in 0..20 {
            for i in 0..1000 {
                cluster.publish(producer, &format!("/queue/r{round}-{batch}-{i}"), "x");
            }
            for i in 0..1000 {
                cluster.subscribe(
                    consumer,
                    &i.to_string(),
                    &format!("/queue/r{round}-{batch}-{i}"),
                    "client-individual",
                );
            }
            let frames = cluster.frames(consumer);
            assert_eq!(frames.len(), 1000);
            for message in &frames {
                cluster.ack(consumer, message.header("ack").unwrap());
            }
            for i in 0..1000 {
                cluster.send(
                    consumer,
                    frame(Command::Unsubscribe, &[("id", &i.to_string())], b""),
                );
            }
        }
        let queues: u64 = cluster.shards.iter().map(|s| s.metrics().queues).sum();
        assert_eq!(queues, 0, "round {round}: drained queues are still held");
    }
}

/// A logging broker of `shards` with a 256 KiB budget, after one producer sent 400 numbered
/// bodies of 2 KiB (800 KiB) to `queue`, persistent or not: paging must have let every one in
/// without pausing the producer, memory held near half the budget. Returns the bodies.
fn backlog_past_the_budget(
    shards: u16,
    queue: &str,
    persistent: bool,
) -> (Cluster, &'static MemoryBudget, Vec<String>) {
    let memory = MemoryBudget::leak(256 * 1024);
    let config = BrokerConfig {
        memory,
        log_enabled: true,
        ..BrokerConfig::default()
    };
    let mut cluster = Cluster::new(shards, config);
    let producer = cluster.connect(0);
    let bodies: Vec<String> = (0..400)
        .map(|n| format!("{n:04}{}", "x".repeat(2044)))
        .collect();
    let persistent = if persistent { "true" } else { "false" };
    for body in &bodies {
        let headers = [("destination", queue), ("persistent", persistent)];
        cluster.send(producer, frame(Command::Send, &headers, body.as_bytes()));
        // The harness's record of appends would keep every message (and its charge) alive.
        cluster.appended.clear();
    }
    assert_eq!(throttles_of(&cluster, producer), Vec::<bool>::new());
    assert!(
        memory.charged() <= memory.page_out_bytes() + 16 * 1024,
        "{} bytes charged",
        memory.charged()
    );
    (cluster, memory, bodies)
}

/// Past half the budget a queue keeps its logged messages' bodies only in the store: a
/// backlog of many times the budget is taken without pausing the producer, and drains in
/// order, each body read back when its turn comes.
#[test]
fn a_logged_backlog_past_half_the_budget_is_paged_out_and_drains_in_order() {
    let (mut cluster, _, bodies) = backlog_past_the_budget(2, "/queue/backlog", true);
    let consumer = cluster.connect(1);
    cluster.subscribe(consumer, "c", "/queue/backlog", "client-individual");
    let mut received = Vec::new();
    while received.len() < bodies.len() {
        let frames = cluster.frames(consumer);
        assert!(!frames.is_empty(), "stalled after {}", received.len());
        for frame in &frames {
            received.push(String::from_utf8(frame.body.clone()).unwrap());
            cluster.ack(consumer, &ack_id(frame));
        }
    }
    assert_eq!(received, bodies, "every body, in order");
    let store = cluster.shards[usize::from(shard_of(b"/queue/backlog", 2).0)].store_mut();
    assert!(store.live.is_empty(), "every record acknowledged once");
}

/// Past the paging level a backlog's newest messages are kept only in the store, as the
/// queue's tail: the queue holds a short head of entries however long the backlog grows. A
/// consumer that keeps up on another queue of the same shard is still served from memory:
/// nothing it gets is read back from the store.
#[test]
fn a_backlog_keeps_a_short_head_and_a_consumer_that_keeps_up_is_served_from_memory() {
    let (mut cluster, _, bodies) = backlog_past_the_budget(1, "/queue/backlog", true);
    let head = cluster.shards[0].held_message_ids(b"/queue/backlog").len();
    let tail = cluster.shards[0]
        .tail_span(b"/queue/backlog")
        .expect("the backlog has a tail");
    let in_tail = tail.written + tail.unwritten.len() as u64;
    assert_eq!(head as u64 + in_tail, bodies.len() as u64);
    assert!(
        head < 100,
        "{head} entries in memory, {in_tail} in the tail"
    );

    let producer = cluster.connect(0);
    let consumer = cluster.connect(0);
    cluster.subscribe(consumer, "c", "/queue/live", "auto");
    let loads = cluster.shards[0].store_mut().loads;
    for n in 0..50 {
        let body = format!("live {n}");
        let headers = [("destination", "/queue/live"), ("persistent", "true")];
        cluster.send(producer, frame(Command::Send, &headers, body.as_bytes()));
        cluster.appended.clear();
        let frames = cluster.frames(consumer);
        assert_eq!(frames.len(), 1, "delivered at once");
        assert_eq!(frames[0].body, body.as_bytes());
        cluster.flush(consumer);
    }
    assert_eq!(
        cluster.shards[0].store_mut().loads,
        loads,
        "nothing read back"
    );
    assert!(cluster.shards[0].tail_span(b"/queue/live").is_none());
}

/// Non-persistent messages past half the budget go to the store too, as transient records
/// (ActiveMQ's temp store): the producer is not paused for memory, everything drains in
/// order, and every transient record is released once its message is consumed.
#[test]
fn a_non_persistent_backlog_is_paged_out_as_transient_records() {
    let (mut cluster, _, bodies) = backlog_past_the_budget(1, "/queue/temp", false);
    let live = cluster.shards[0].store_mut().live.len();
    assert!(live > 300, "most went to the store ({live} records)");
    let consumer = cluster.connect(0);
    cluster.subscribe(consumer, "c", "/queue/temp", "auto");
    let mut received = Vec::new();
    while received.len() < bodies.len() {
        let frames = cluster.frames(consumer);
        assert!(!frames.is_empty(), "stalled after {}", received.len());
        received.extend(
            frames
                .iter()
                .map(|f| String::from_utf8(f.body.clone()).unwrap()),
        );
        cluster.flush(consumer);
    }
    assert_eq!(received, bodies, "every body, in order");
    assert!(cluster.shards[0].store_mut().live.is_empty());
}
