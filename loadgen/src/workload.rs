//! The workloads: each opens its connections, runs one thread per connection, watches the
//! counters once a tick from the calling thread, and returns a [`Report`].
//!
//! Producers, consumers and subscribers share one engine ([`run_flow`]): queue, topic, paced
//! latency and backlog are the same flow with different shapes. Ping-pong and connections have
//! their own, simpler loops.
//!
//! Every run is bounded twice: by a message count and by a duration (producers stop at
//! whichever comes first), and consumers stop when they have everything the producers sent or
//! when the drain timeout after the last send has passed. What did not arrive by then is lost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use stompd::codec::{format_u64, Command, Frame, Version};

use crate::client::{error_of, ClientError, ConnectOptions, Connection, Outbox};
use crate::interrupt;
use crate::payload::{padding, Epoch, Stamp, STAMP_BYTES};
use crate::report::{latency_histogram, Latency, Progress, Rate, Report};
use crate::stats::{self, Meter};
use crate::tracker::{Integrity, Observation, Tracker};

/// How often the coordinating thread looks at the counters.
const TICK: Duration = Duration::from_millis(20);

/// How long a consumer blocks in one read before it looks at the stop flag.
const CONSUMER_POLL: Duration = Duration::from_millis(50);

/// Producers publish their counters every this many sends (a relaxed store; cheap but not free).
const METER_EVERY: u64 = 64;

/// How the consumers acknowledge (STOMP 1.2 "SUBSCRIBE ack Header").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AckMode {
    Auto,
    /// Cumulative ACK every half prefetch window.
    Client,
    /// One ACK per message.
    ClientIndividual,
}

impl AckMode {
    fn header(self) -> &'static str {
        match self {
            AckMode::Auto => "auto",
            AckMode::Client => "client",
            AckMode::ClientIndividual => "client-individual",
        }
    }
}

/// What every workload needs.
#[derive(Clone, Debug)]
pub struct Common {
    pub connect: ConnectOptions,
    /// Upper bound on messages (total over producers).
    pub messages: u64,
    /// Upper bound on the sending time, warm-up included.
    pub duration: Duration,
    /// Excluded from rates and latency percentiles.
    pub warmup: Duration,
    pub body_bytes: usize,
    /// Destination name; `None` picks a fresh one per run, so runs never see each other's
    /// leftovers.
    pub destination: Option<String>,
    /// After the last send, how long consumers may go without any delivery before the
    /// messages still missing count as lost.
    pub drain_timeout: Duration,
    /// How long a receipt may take (persistent sends can be slow).
    pub receipt_timeout: Duration,
    /// Consumer window: `activemq.prefetchSize` and `prefetch-count`.
    pub prefetch: u32,
    pub quiet: bool,
    pub broker_pid: Option<u32>,
    /// The flags as given, copied into the report.
    pub parameters: serde_json::Value,
}

/// The shape of a producer/consumer run.
#[derive(Clone, Debug)]
pub struct Flow {
    pub name: &'static str,
    pub producers: usize,
    pub consumers: usize,
    /// Fan-out (every consumer gets every message) instead of competing consumers.
    pub topic: bool,
    pub ack: AckMode,
    pub persistent: bool,
    /// Wait for a receipt every this many sends.
    pub receipt_every: Option<u64>,
    /// Total paced send rate in msgs/s; `None` sends as fast as the broker takes them.
    pub rate: Option<f64>,
    /// Fill the queue with no consumer, then drain it.
    pub backlog: bool,
    /// Send nothing: the destination already holds the messages `producers` producers sent
    /// in an earlier run (split as [`run_flow`] splits `messages`); consumers take them.
    pub drain_only: bool,
}

/// Everything sampled at the start of the run and of its measured window (after warm-up), to
/// subtract at the end.
struct Baseline {
    epoch: Epoch,
    broker_rss_kib: Option<u64>,
    window_start: Instant,
    window_cpu_s: f64,
    window_broker_cpu_s: Option<f64>,
}

impl Baseline {
    fn take(common: &Common) -> Baseline {
        let epoch = Epoch::now();
        Baseline {
            epoch,
            broker_rss_kib: common.broker_pid.and_then(stats::process_rss_kib),
            window_start: epoch.instant(),
            window_cpu_s: stats::own_cpu_seconds(),
            window_broker_cpu_s: common.broker_pid.and_then(stats::process_cpu_seconds),
        }
    }

    /// The measured window starts now: CPU used before (warm-up) is not counted.
    fn start_window(&mut self, common: &Common) {
        self.window_start = Instant::now();
        self.window_cpu_s = stats::own_cpu_seconds();
        self.window_broker_cpu_s = common.broker_pid.and_then(stats::process_cpu_seconds);
    }

    fn fill(&self, common: &Common, report: &mut Report) {
        report.elapsed_s = self.epoch.instant().elapsed().as_secs_f64();
        let window = self.window_start.elapsed().as_secs_f64().max(1e-9);
        report.client_cpu_s = stats::own_cpu_seconds() - self.window_cpu_s;
        report.client_cpu_percent = 100.0 * report.client_cpu_s / window;
        let handled = [&report.sent, &report.received]
            .into_iter()
            .flatten()
            .map(|rate| rate.messages)
            .sum::<u64>();
        report.client_cpu_ns_per_msg =
            (handled > 0).then(|| report.client_cpu_s * 1e9 / handled as f64);
        if let Some(pid) = common.broker_pid {
            if let (Some(before), Some(after)) =
                (self.window_broker_cpu_s, stats::process_cpu_seconds(pid))
            {
                report.broker_cpu_s = Some(after - before);
                report.broker_cpu_percent = Some(100.0 * (after - before) / window);
            }
            report.broker_rss_kib_before = self.broker_rss_kib;
            report.broker_rss_kib_after = stats::process_rss_kib(pid);
        }
        report.parameters = common.parameters.clone();
        report.finish();
    }
}

fn fresh_destination(common: &Common, topic: bool) -> String {
    if let Some(name) = &common.destination {
        return name.clone();
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let kind = if topic { "topic" } else { "queue" };
    format!("/{kind}/loadgen-{}-{nanos}", std::process::id())
}

/// Shared, read-only state of the producer threads.
struct ProducerShared {
    destination: String,
    persistent: bool,
    receipt_every: Option<u64>,
    /// Per producer, msgs/s.
    rate: Option<f64>,
    epoch: Epoch,
    /// When sending starts; paced producers schedule message N at `start_ns + N / rate`.
    start_ns: u64,
    deadline_ns: u64,
    receipt_timeout: Duration,
    stop: AtomicBool,
    meter: Meter,
    padding: Vec<u8>,
}

/// Sends up to `count` messages, stamped `producer`, then DISCONNECTs with a receipt so that
/// everything it counts as sent was taken by the broker. Returns how many it sent.
fn produce(
    mut connection: Connection,
    producer: u32,
    count: u64,
    shared: &ProducerShared,
) -> Result<u64, ClientError> {
    if shared.rate.is_some() {
        stats::tight_timer_slack();
    }
    send_all(&mut connection, producer, count, shared).map_err(|error| connection.explain(error))
}

fn send_all(
    connection: &mut Connection,
    producer: u32,
    count: u64,
    shared: &ProducerShared,
) -> Result<u64, ClientError> {
    let body_bytes = STAMP_BYTES + shared.padding.len();
    let start_ns = shared.start_ns;
    let mut sent = 0u64;
    let mut digits = [0u8; 20];
    while sent < count {
        if sent % METER_EVERY == 0 {
            shared
                .meter
                .store(producer as usize, sent, sent * body_bytes as u64);
            if shared.stop.load(Ordering::Relaxed)
                || shared.epoch.elapsed_ns() >= shared.deadline_ns
            {
                break;
            }
        }
        let sent_ns = match shared.rate {
            Some(rate) => {
                // The intended time, not the actual one: if the broker (or this machine) stalls
                // us, the messages sent late carry the delay in their latency.
                let intended = start_ns + (sent as f64 * 1e9 / rate) as u64;
                let now = shared.epoch.elapsed_ns();
                if now < intended {
                    thread::sleep(Duration::from_nanos(intended - now));
                }
                intended
            }
            None => shared.epoch.elapsed_ns(),
        };
        let receipt = shared
            .receipt_every
            .is_some_and(|every| (sent + 1) % every == 0);
        {
            let mut frame = connection.frame(Command::Send);
            frame
                .header(b"destination", shared.destination.as_bytes())
                .content_length(body_bytes);
            if shared.persistent {
                frame.header(b"persistent", b"true");
            }
            if receipt {
                frame.header_u64(b"receipt", sent);
            }
            frame.finish_head();
        }
        let mut stamp = [0u8; STAMP_BYTES];
        Stamp {
            producer,
            sequence: sent,
            sent_ns,
        }
        .write(&mut stamp);
        connection.out.extend_from_slice(&stamp);
        connection.out.extend_from_slice(&shared.padding);
        connection.out.push(0);
        if receipt {
            connection.flush()?;
            let id = format_u64(sent, &mut digits);
            connection.wait_receipt(id, shared.receipt_timeout)?;
        } else if shared.rate.is_some() {
            connection.flush()?;
        } else {
            connection.flush_if_full()?;
        }
        sent += 1;
    }
    shared
        .meter
        .store(producer as usize, sent, sent * body_bytes as u64);
    connection.disconnect(shared.receipt_timeout)?;
    Ok(sent)
}

/// Shared, read-only state of the consumer threads.
struct ConsumerShared {
    ack: AckMode,
    prefetch: u32,
    epoch: Epoch,
    warmup_ns: u64,
    stop: AtomicBool,
    /// Every delivery, for rates.
    meter: Meter,
    /// First deliveries only (no duplicates or redeliveries), for deciding the drain is done:
    /// counting duplicates could stop consumers while originals are still in flight.
    fresh: Meter,
}

struct ConsumerOutcome {
    tracker: Tracker,
    histogram: Histogram<u64>,
    /// When the first and the last message arrived, ns since the epoch.
    first_ns: Option<u64>,
    last_ns: u64,
}

/// Receives until told to stop, tracking every stamp.
fn consume(
    mut connection: Connection,
    index: usize,
    shared: &ConsumerShared,
) -> Result<ConsumerOutcome, ClientError> {
    connection.set_read_timeout(Some(CONSUMER_POLL))?;
    let mut tracker = Tracker::new();
    let mut histogram = latency_histogram();
    let (mut count, mut bytes, mut last_ns, mut fresh) = (0u64, 0u64, 0u64, 0u64);
    let mut first_ns = None;
    let ack_batch = (shared.prefetch / 2).max(1);
    let mut unacked = 0u32;
    while !shared.stop.load(Ordering::Relaxed) {
        let handled = connection.next_frame_timeout(|frame, outbox| match frame.command {
            Command::Message => {
                let now = shared.epoch.elapsed_ns();
                count += 1;
                bytes += frame.body.len() as u64;
                first_ns.get_or_insert(now);
                last_ns = now;
                match Stamp::read(frame.body) {
                    Some(stamp) => {
                        let redelivered = frame.header(b"redelivered") == Some(b"true");
                        let observation =
                            tracker.record(stamp.producer, stamp.sequence, redelivered);
                        if matches!(observation, Observation::Fresh | Observation::OutOfOrder) {
                            fresh += 1;
                        }
                        if stamp.sent_ns >= shared.warmup_ns {
                            histogram.saturating_record(now.saturating_sub(stamp.sent_ns));
                        }
                    }
                    None => tracker.record_unstamped(),
                }
                match shared.ack {
                    AckMode::Auto => {}
                    AckMode::ClientIndividual => write_ack(outbox, frame),
                    AckMode::Client => {
                        unacked += 1;
                        if unacked >= ack_batch {
                            write_ack(outbox, frame);
                            unacked = 0;
                        }
                    }
                }
                Ok(())
            }
            Command::Error => Err(error_of(frame)),
            _ => Ok(()),
        })?;
        match handled {
            Some(result) => {
                result?;
                if count % METER_EVERY == 0 {
                    shared.meter.store(index, count, bytes);
                    shared.fresh.store(index, fresh, 0);
                }
            }
            None => {
                shared.meter.store(index, count, bytes);
                shared.fresh.store(index, fresh, 0);
            }
        }
    }
    shared.meter.store(index, count, bytes);
    shared.fresh.store(index, fresh, 0);
    // Leaving politely is not part of the measurement; a broker slow to answer it is fine.
    let _ = connection.disconnect(Duration::from_secs(2));
    Ok(ConsumerOutcome {
        tracker,
        histogram,
        first_ns,
        last_ns,
    })
}

/// Acknowledges `frame` in the form the negotiated version wants (STOMP 1.2 "ACK": `id` from
/// the MESSAGE's `ack` header; 1.1: `message-id` and `subscription`; 1.0: `message-id`).
fn write_ack(outbox: &mut Outbox<'_>, frame: &Frame<'_>) {
    let version = outbox.version;
    let message_id = frame.header(b"message-id").unwrap_or(b"");
    let mut ack = outbox.frame(Command::Ack);
    match version {
        Version::V1_2 => {
            ack.header(b"id", frame.header(b"ack").unwrap_or(message_id));
        }
        Version::V1_1 => {
            ack.header(b"message-id", message_id).header(
                b"subscription",
                frame.header(b"subscription").unwrap_or(b""),
            );
        }
        Version::V1_0 => {
            ack.header(b"message-id", message_id);
        }
    }
    ack.finish(b"");
}

fn connect_consumers(
    common: &Common,
    flow: &Flow,
    destination: &str,
) -> Result<Vec<Connection>, ClientError> {
    (0..flow.consumers)
        .map(|index| {
            let mut connection = Connection::connect(&common.connect)?;
            let id = format!("loadgen-{index}");
            connection.subscribe(
                destination,
                &id,
                flow.ack.header(),
                common.prefetch,
                Some(&id),
            )?;
            Ok(connection)
        })
        .collect()
}

fn spawn_consumers(
    connections: Vec<Connection>,
    shared: &Arc<ConsumerShared>,
) -> Vec<JoinHandle<Result<ConsumerOutcome, ClientError>>> {
    connections
        .into_iter()
        .enumerate()
        .map(|(index, connection)| {
            let shared = shared.clone();
            thread::Builder::new()
                .name(format!("consumer-{index}"))
                .spawn(move || consume(connection, index, &shared))
                .expect("spawning a thread")
        })
        .collect()
}

fn join<T>(handle: JoinHandle<Result<T, ClientError>>, errors: &mut Vec<String>) -> Option<T> {
    match handle.join() {
        Ok(Ok(value)) => Some(value),
        Ok(Err(error)) => {
            let mut text = error.to_string();
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            errors.push(text);
            None
        }
        Err(_) => {
            errors.push("a worker thread panicked".to_string());
            None
        }
    }
}

/// Queue, topic, latency and backlog.
pub fn run_flow(common: &Common, flow: &Flow) -> Result<Report, ClientError> {
    assert!(flow.producers >= 1, "a flow has at least one producer");
    assert!(
        common.body_bytes >= STAMP_BYTES,
        "bodies hold at least the stamp"
    );
    let mut baseline = Baseline::take(common);
    let epoch = baseline.epoch;
    let destination = fresh_destination(common, flow.topic);
    let warmup = if flow.backlog || flow.drain_only {
        Duration::ZERO
    } else {
        common.warmup
    };
    let mut report = Report {
        workload: flow.name.to_string(),
        warmup_s: warmup.as_secs_f64(),
        ..Report::default()
    };

    // Subscribed before any producer connects, so that topic subscribers miss nothing.
    let mut consumer_connections = Vec::new();
    if !flow.backlog {
        consumer_connections = connect_consumers(common, flow, &destination)?;
        if let Some(first) = consumer_connections.first() {
            report.stomp_version = first.version().to_string();
            report.server = first.server().map(str::to_string);
        }
    }

    let senders = if flow.drain_only { 0 } else { flow.producers };
    let producer_connections: Vec<Connection> = (0..senders)
        .map(|_| Connection::connect(&common.connect))
        .collect::<Result<_, _>>()?;
    if report.stomp_version.is_empty() && !producer_connections.is_empty() {
        report.stomp_version = producer_connections[0].version().to_string();
        report.server = producer_connections[0].server().map(str::to_string);
    }
    // Time counts from here: connection set-up is neither warm-up nor measurement.
    let producers_start = epoch.elapsed_ns();
    let warmup_ns = producers_start + warmup.as_nanos() as u64;
    let consumer_shared = Arc::new(ConsumerShared {
        ack: flow.ack,
        prefetch: common.prefetch,
        epoch,
        warmup_ns,
        stop: AtomicBool::new(false),
        meter: Meter::new(flow.consumers),
        fresh: Meter::new(flow.consumers),
    });
    let mut consumers = spawn_consumers(consumer_connections, &consumer_shared);
    let producer_shared = Arc::new(ProducerShared {
        destination: destination.clone(),
        persistent: flow.persistent,
        receipt_every: flow.receipt_every,
        rate: flow.rate.map(|rate| rate / flow.producers as f64),
        epoch,
        start_ns: producers_start,
        deadline_ns: producers_start + common.duration.as_nanos() as u64,
        receipt_timeout: common.receipt_timeout,
        stop: AtomicBool::new(false),
        meter: Meter::new(flow.producers),
        padding: padding(common.body_bytes),
    });
    let per_producer = common.messages / flow.producers as u64;
    let remainder = common.messages % flow.producers as u64;
    let count_of = |index: usize| per_producer + u64::from((index as u64) < remainder);
    let producers: Vec<_> = producer_connections
        .into_iter()
        .enumerate()
        .map(|(index, connection)| {
            let shared = producer_shared.clone();
            let count = count_of(index);
            thread::Builder::new()
                .name(format!("producer-{index}"))
                .spawn(move || produce(connection, index as u32, count, &shared))
                .expect("spawning a thread")
        })
        .collect();

    let expected_total = common.messages * if flow.topic { flow.consumers as u64 } else { 1 };
    let mut progress = Progress::new(
        expected_total.max(common.messages),
        common.duration,
        common.quiet,
    );
    let mut next_tick = Duration::from_secs(1);
    let mut warmup_mark: Option<(u64, u64, u64)> = None; // (ns, sent, received)
    if warmup.is_zero() {
        warmup_mark = Some((producers_start, 0, 0));
        baseline.start_window(common);
    }
    let mut producers_done_ns: Option<u64> = None;
    // Drain only: what the earlier run's producers sent, as it split the count.
    let mut sent_per_producer: Vec<u64> = (0..flow.producers)
        .map(|index| if flow.drain_only { count_of(index) } else { 0 })
        .collect();
    let mut producers = Some(producers);
    // The last time the consumers' count moved: a drain times out only after that long without
    // any delivery, so a slow broker with a deep queue is not mistaken for a lossy one.
    let mut progress_ns = producers_start;
    let mut last_received = 0u64;
    loop {
        thread::sleep(TICK);
        let elapsed = Duration::from_nanos(epoch.elapsed_ns() - producers_start);
        let (sent, _) = producer_shared.meter.total();
        let (received, _) = consumer_shared.meter.total();
        if received != last_received {
            last_received = received;
            progress_ns = epoch.elapsed_ns();
        }
        if elapsed >= next_tick {
            progress.tick(elapsed, sent, received);
            next_tick += Duration::from_secs(1);
        }
        if warmup_mark.is_none() && elapsed >= warmup {
            warmup_mark = Some((epoch.elapsed_ns(), sent, received));
            baseline.start_window(common);
        }
        if producers_done_ns.is_none()
            && producers
                .as_ref()
                .is_some_and(|handles| handles.iter().all(JoinHandle::is_finished))
        {
            for (index, handle) in producers.take().into_iter().flatten().enumerate() {
                // A producer that failed may have sent messages the broker never took; with
                // no way to tell, it expects none, and its error fails the run.
                sent_per_producer[index] = join(handle, &mut report.errors).unwrap_or(0);
            }
            let done = epoch.elapsed_ns();
            producers_done_ns = Some(done);
            if flow.backlog && flow.consumers > 0 {
                let fill = Rate::new(
                    sent_per_producer.iter().sum(),
                    producer_shared.meter.total().1,
                    (done - producers_start) as f64 / 1e9,
                );
                report.sent = Some(fill);
                let connections = connect_consumers(common, flow, &destination)?;
                let drain_start_ns = epoch.elapsed_ns();
                progress_ns = drain_start_ns;
                warmup_mark = Some((drain_start_ns, sent, 0));
                consumers = spawn_consumers(connections, &consumer_shared);
            }
        }
        if let Some(done_ns) = producers_done_ns {
            let sent_total: u64 = sent_per_producer.iter().sum();
            let expected = sent_total * if flow.topic { flow.consumers as u64 } else { 1 };
            let drained = consumer_shared.fresh.total().0 >= expected;
            let timed_out = epoch.elapsed_ns().saturating_sub(done_ns.max(progress_ns))
                > common.drain_timeout.as_nanos() as u64;
            let consumers_failed = consumers.iter().any(JoinHandle::is_finished);
            if flow.consumers == 0 || drained || timed_out || consumers_failed {
                break;
            }
        }
        if (elapsed >= common.duration || interrupt::interrupted())
            && !producer_shared.stop.load(Ordering::Relaxed)
        {
            producer_shared.stop.store(true, Ordering::Relaxed);
        }
    }
    consumer_shared.stop.store(true, Ordering::Relaxed);
    let outcomes: Vec<ConsumerOutcome> = consumers
        .into_iter()
        .filter_map(|handle| join(handle, &mut report.errors))
        .collect();
    progress.done();

    let producers_done_ns = producers_done_ns.expect("the loop ends after producers finish");
    let (mark_ns, mark_sent, mark_received) = warmup_mark.unwrap_or((producers_start, 0, 0));
    let (sent_total, sent_bytes) = producer_shared.meter.total();
    let (received_total, received_bytes) = consumer_shared.meter.total();
    if !flow.backlog && !flow.drain_only {
        let mark_sent_bytes = mark_sent * common.body_bytes as u64;
        report.sent = Some(Rate::new(
            sent_total - mark_sent,
            sent_bytes.saturating_sub(mark_sent_bytes),
            producers_done_ns.saturating_sub(mark_ns) as f64 / 1e9,
        ));
    }
    if flow.consumers > 0 {
        let last_ns = outcomes.iter().map(|o| o.last_ns).max().unwrap_or(mark_ns);
        let mark_received_bytes = mark_received * common.body_bytes as u64;
        report.received = Some(Rate::new(
            received_total - mark_received,
            received_bytes.saturating_sub(mark_received_bytes),
            last_ns.saturating_sub(mark_ns) as f64 / 1e9,
        ));
        let mut histogram = latency_histogram();
        for outcome in &outcomes {
            histogram
                .add(&outcome.histogram)
                .expect("histograms share bounds");
        }
        // Stamps from another run's clock say nothing about latency.
        if !flow.drain_only {
            report.latency = Latency::from_histogram(&histogram);
        }
        report.first_message_s = outcomes
            .iter()
            .filter_map(|o| o.first_ns)
            .min()
            .map(|ns| ns as f64 / 1e9);
        if outcomes.len() == flow.consumers {
            let trackers: Vec<Tracker> = outcomes.into_iter().map(|o| o.tracker).collect();
            report.integrity = Some(if flow.topic {
                let mut total = Integrity::default();
                for tracker in &trackers {
                    let one = Integrity::for_subscriber(tracker, &sent_per_producer);
                    report
                        .per_subscriber_completeness
                        .push(one.received as f64 / one.expected.max(1) as f64);
                    total.add(&one);
                }
                total
            } else {
                Integrity::for_queue(&trackers, &sent_per_producer)
            });
        }
    }
    baseline.fill(common, &mut report);
    Ok(report)
}

/// One message in flight: send, wait for its delivery on the same connection, repeat.
pub fn run_pingpong(common: &Common) -> Result<Report, ClientError> {
    let mut baseline = Baseline::take(common);
    let epoch = baseline.epoch;
    let destination = fresh_destination(common, false);
    let mut connection = Connection::connect(&common.connect)?;
    connection.subscribe(&destination, "pingpong", "auto", 1, Some("pingpong"))?;
    connection.set_read_timeout(Some(CONSUMER_POLL))?;
    let mut report = Report {
        workload: "pingpong".to_string(),
        warmup_s: common.warmup.as_secs_f64(),
        stomp_version: connection.version().to_string(),
        server: connection.server().map(str::to_string),
        ..Report::default()
    };
    let pad = padding(common.body_bytes);
    let start_ns = epoch.elapsed_ns();
    let warmup_ns = start_ns + common.warmup.as_nanos() as u64;
    let deadline_ns = start_ns + common.duration.as_nanos() as u64;
    let mut histogram = latency_histogram();
    let mut tracker = Tracker::new();
    let mut progress = Progress::new(common.messages, common.duration, common.quiet);
    let mut next_tick = Duration::from_secs(1);
    let mut sent = 0u64;
    let mut measured = (0u64, 0u64); // (first measured ns, messages)
    'run: while sent < common.messages
        && epoch.elapsed_ns() < deadline_ns
        && !interrupt::interrupted()
    {
        let sent_ns = epoch.elapsed_ns();
        {
            let mut frame = connection.frame(Command::Send);
            frame
                .header(b"destination", destination.as_bytes())
                .content_length(common.body_bytes);
            frame.finish_head();
        }
        let mut stamp = [0u8; STAMP_BYTES];
        Stamp {
            producer: 0,
            sequence: sent,
            sent_ns,
        }
        .write(&mut stamp);
        connection.out.extend_from_slice(&stamp);
        connection.out.extend_from_slice(&pad);
        connection.out.push(0);
        connection.flush()?;
        sent += 1;
        let wait_start = Instant::now();
        loop {
            let got = connection.next_frame_timeout(|frame, _| match frame.command {
                Command::Message => {
                    let now = epoch.elapsed_ns();
                    match Stamp::read(frame.body) {
                        Some(stamp) => {
                            tracker.record(stamp.producer, stamp.sequence, false);
                            if stamp.sent_ns >= warmup_ns {
                                histogram.saturating_record(now - stamp.sent_ns);
                            }
                        }
                        None => tracker.record_unstamped(),
                    }
                    Ok(true)
                }
                Command::Error => Err(error_of(frame)),
                _ => Ok(false),
            })?;
            if got.transpose()?.unwrap_or(false) {
                break;
            }
            if wait_start.elapsed() > common.drain_timeout {
                report
                    .errors
                    .push(format!("message {} not delivered in time", sent - 1));
                break 'run;
            }
        }
        if sent_ns >= warmup_ns {
            if measured.1 == 0 {
                measured.0 = sent_ns;
                baseline.start_window(common);
            }
            measured.1 += 1;
        }
        let elapsed = epoch.instant().elapsed();
        if elapsed >= next_tick {
            progress.tick(elapsed, sent, sent);
            next_tick += Duration::from_secs(1);
        }
    }
    progress.done();
    let seconds = epoch.elapsed_ns().saturating_sub(measured.0) as f64 / 1e9;
    let bytes = measured.1 * common.body_bytes as u64;
    report.sent = Some(Rate::new(measured.1, bytes, seconds));
    report.received = Some(Rate::new(measured.1, bytes, seconds));
    report.latency = Latency::from_histogram(&histogram);
    report.integrity = Some(Integrity::for_subscriber(&tracker, &[sent]));
    let _ = connection.disconnect(Duration::from_secs(2));
    baseline.fill(common, &mut report);
    Ok(report)
}

/// M connections, each with a subscription to one topic: how fast they open, what they cost
/// the broker, and whether each still gets a message once all are open.
pub fn run_connections(
    common: &Common,
    connections: usize,
    threads: usize,
) -> Result<Report, ClientError> {
    stats::raise_file_limit();
    let baseline = Baseline::take(common);
    let epoch = baseline.epoch;
    let destination = fresh_destination(
        &Common {
            destination: common.destination.clone(),
            ..common.clone()
        },
        true,
    );
    let mut options = common.connect.clone();
    // Idle connections: a small buffer each, or 10,000 of them would hold 2.5 GiB here.
    options.read_buffer_bytes = 4096;
    let threads = threads.clamp(1, connections.max(1));
    let meter = Arc::new(Meter::new(threads));
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..threads)
        .map(|thread_index| {
            let options = options.clone();
            let destination = destination.clone();
            let meter = meter.clone();
            let stop = stop.clone();
            let mine = connections / threads + usize::from(thread_index < connections % threads);
            thread::Builder::new()
                .name(format!("connector-{thread_index}"))
                .spawn(move || -> Result<Vec<Connection>, ClientError> {
                    let mut opened = Vec::with_capacity(mine);
                    for index in 0..mine {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let mut connection = Connection::connect(&options)?;
                        let id = format!("c{thread_index}-{index}");
                        connection.subscribe(&destination, &id, "auto", 1, Some(&id))?;
                        opened.push(connection);
                        meter.store(thread_index, opened.len() as u64, 0);
                    }
                    Ok(opened)
                })
                .expect("spawning a thread")
        })
        .collect();
    let mut report = Report {
        workload: "connections".to_string(),
        ..Report::default()
    };
    let mut progress = Progress::new(connections as u64, common.duration, common.quiet);
    let mut next_tick = Duration::from_secs(1);
    while !handles.iter().all(JoinHandle::is_finished) {
        thread::sleep(TICK);
        let elapsed = epoch.instant().elapsed();
        if elapsed >= next_tick {
            progress.tick(elapsed, meter.total().0, 0);
            next_tick += Duration::from_secs(1);
        }
        if elapsed >= common.duration || interrupt::interrupted() {
            stop.store(true, Ordering::Relaxed);
        }
    }
    let connect_seconds = epoch.instant().elapsed().as_secs_f64();
    progress.done();
    let mut opened: Vec<Connection> = Vec::with_capacity(connections);
    for handle in handles {
        if let Some(batch) = join(handle, &mut report.errors) {
            opened.extend(batch);
        }
    }
    report.connections = Some(opened.len() as u64);
    report.connect_per_s = Some(opened.len() as f64 / connect_seconds.max(1e-9));
    if let Some(first) = opened.first() {
        report.stomp_version = first.version().to_string();
        report.server = first.server().map(str::to_string);
    }

    // One message to the topic: every subscription should get it.
    let mut producer = Connection::connect(&common.connect)?;
    {
        let mut frame = producer.frame(Command::Send);
        frame
            .header(b"destination", destination.as_bytes())
            .content_length(common.body_bytes);
        frame.finish_head();
    }
    let mut stamp = [0u8; STAMP_BYTES];
    Stamp {
        producer: 0,
        sequence: 0,
        sent_ns: epoch.elapsed_ns(),
    }
    .write(&mut stamp);
    producer.out.extend_from_slice(&stamp);
    producer.out.extend_from_slice(&padding(common.body_bytes));
    producer.out.push(0);
    producer.disconnect(common.receipt_timeout)?;
    let deadline = Instant::now() + common.drain_timeout;
    let mut integrity = Integrity::default();
    for connection in &mut opened {
        let mut tracker = Tracker::new();
        connection.set_read_timeout(Some(CONSUMER_POLL))?;
        while tracker.deliveries == 0 && Instant::now() < deadline {
            connection.next_frame_timeout(|frame, _| {
                if frame.command == Command::Message {
                    match Stamp::read(frame.body) {
                        Some(stamp) => {
                            tracker.record(stamp.producer, stamp.sequence, false);
                        }
                        None => tracker.record_unstamped(),
                    }
                }
            })?;
        }
        integrity.add(&Integrity::for_subscriber(&tracker, &[1]));
    }
    report.integrity = Some(integrity);
    // RSS while every connection is still open.
    baseline.fill(common, &mut report);
    drop(opened);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stompd::codec::{Decoded, Decoder, Limits};

    /// The ACK written for a MESSAGE, decoded back.
    fn ack_for(version: Version) -> Vec<(String, String)> {
        let message = Frame::new(Command::Message)
            .with_header(b"destination", b"/queue/a")
            .with_header(b"message-id", b"m-7")
            .with_header(b"subscription", b"s-1")
            .with_header(b"ack", b"a-9");
        let mut out = Vec::new();
        write_ack(
            &mut Outbox {
                out: &mut out,
                version,
            },
            &message,
        );
        let mut decoder = Decoder::new(Limits::DEFAULT);
        decoder.set_version(version);
        let Ok(Decoded::Frame { frame, consumed }) = decoder.decode(&out) else {
            panic!("an ACK decodes: {out:?}");
        };
        assert_eq!(consumed, out.len());
        assert_eq!(frame.command, Command::Ack);
        frame
            .headers
            .iter()
            .map(|h| {
                (
                    String::from_utf8_lossy(&h.name).into_owned(),
                    String::from_utf8_lossy(&h.value).into_owned(),
                )
            })
            .collect()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn ack_1_2_names_the_ack_header() {
        // STOMP 1.2 "ACK": "id" matching the MESSAGE's "ack" header.
        assert_eq!(ack_for(Version::V1_2), pairs(&[("id", "a-9")]));
    }

    #[test]
    fn ack_1_1_names_message_and_subscription() {
        assert_eq!(
            ack_for(Version::V1_1),
            pairs(&[("message-id", "m-7"), ("subscription", "s-1")])
        );
    }

    #[test]
    fn ack_1_0_names_the_message() {
        assert_eq!(ack_for(Version::V1_0), pairs(&[("message-id", "m-7")]));
    }
}
