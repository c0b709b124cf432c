//! Append throughput of a shard's log for 128-byte and 1 KiB messages under each `--fsync`
//! policy, on real disk (Cargo's target tmp directory), with the default 64 MiB segments.
//!
//! What is timed: appending messages, including segment rolls (allocate + map a new file, once
//! per 64 MiB), and the syncs the policy calls for. The syncs are made blocking here, in the
//! benchmark thread, to show what they cost; the broker issues them through io_uring instead and
//! keeps serving meanwhile.
//! - `never`: no sync.
//! - `every:10`: a sync whenever 10 ms have passed since the last one.
//! - `always/64`: a sync after every 64 appends, i.e. group commit of 64 messages. One sync per
//!   message would measure only the disk's sync latency (about 2-3k/s here, see the research
//!   note).
//!
//! Untimed between chunks of 4096 appends: acknowledging them and reclaiming segments, so the
//! benchmark's disk use stays bounded however long criterion runs.

use std::os::unix::io::RawFd;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use stompd::log::format::SegmentHeader;
use stompd::log::segment::Segment;
use stompd::log::{
    BinaryId, FsyncPolicy, LogConfig, MessageRecord, Position, ShardLog, FORMAT_VERSION,
};

const CHUNK: u64 = 4096;
const ALWAYS_BATCH: u64 = 64;

fn blocking_sync(log: &mut ShardLog, now_ms: u64) {
    if let Some(request) = log.pending_sync(now_ms) {
        for target in &request.targets {
            sync_fd(target.fd, target.data_only);
        }
        log.mark_synced(request.upto);
    }
}

fn sync_fd(fd: RawFd, data_only: bool) {
    // SAFETY: descriptors from the log, open until mark_synced.
    let rc = unsafe {
        if data_only {
            libc::fdatasync(fd)
        } else {
            libc::fsync(fd)
        }
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
}

fn bench_append(c: &mut Criterion) {
    let mut group = c.benchmark_group("log_append");
    group.sample_size(20);
    // The last variant prefaults each new segment (MAP_POPULATE), to show what it is worth.
    let policies = [
        ("never", FsyncPolicy::Never, false),
        ("every:10", FsyncPolicy::Every { interval_ms: 10 }, false),
        ("always/64", FsyncPolicy::Always, false),
        ("never-populate", FsyncPolicy::Never, true),
    ];
    for payload in [128usize, 1024] {
        group.throughput(Throughput::Elements(1));
        for (name, policy, prefault) in policies {
            let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
            let mut config = LogConfig::new(tmp.path(), 0);
            config.fsync = policy;
            config.populate = prefault;
            let (mut log, _) = ShardLog::open(config).unwrap();
            let body = vec![b'x'; payload];
            let headers: &[u8] = b"persistent:true\n";
            let epoch = Instant::now();
            let mut positions: Vec<Position> = Vec::with_capacity(CHUNK as usize);
            group.bench_function(BenchmarkId::new(name, format!("{payload}B")), |b| {
                b.iter_custom(|iters| {
                    let mut timed = Duration::ZERO;
                    let mut done = 0;
                    while done < iters {
                        let chunk = (iters - done).min(CHUNK);
                        let start = Instant::now();
                        for k in 0..chunk {
                            let p = log
                                .append_message(
                                    &MessageRecord {
                                        destination: b"/queue/bench",
                                        id: BinaryId { shard: 1, seq: 1 },
                                        timestamp_ms: 0,
                                        header_block: headers,
                                        block_plain: true,
                                        transient: false,
                                        body: &body,
                                    },
                                    0,
                                )
                                .unwrap();
                            positions.push(p);
                            match policy {
                                FsyncPolicy::Never => {}
                                FsyncPolicy::Every { .. } => {
                                    blocking_sync(&mut log, epoch.elapsed().as_millis() as u64)
                                }
                                FsyncPolicy::Always => {
                                    if (k + 1) % ALWAYS_BATCH == 0 {
                                        blocking_sync(&mut log, 0);
                                    }
                                }
                            }
                        }
                        if policy == FsyncPolicy::Always {
                            blocking_sync(&mut log, 0);
                        }
                        timed += start.elapsed();
                        done += chunk;
                        log.ack(&positions, 0).unwrap();
                        positions.clear();
                        log.reclaim().unwrap();
                    }
                    timed
                })
            });
        }
    }
    group.finish();
}

/// The broker's shape for a durable queue with auto-ack consumers: every message is appended
/// (Message record) and later acknowledged one at a time (Ack record), with a standing backlog
/// of unacknowledged messages (the producer ahead of the consumer), so the live-message
/// bookkeeping holds `backlog` entries. Both the append and the ack are timed, and so are the
/// segment rolls, the reclaims and the spare segment's preparation (every 4096 acks, as the
/// broker's tick does), under `never` so the disk's sync latency does not hide the CPU cost.
fn bench_message_ack(c: &mut Criterion) {
    let mut group = c.benchmark_group("log_message_ack");
    group.sample_size(20);
    group.throughput(Throughput::Elements(1));
    for backlog in [1_000usize, 200_000] {
        let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let mut config = LogConfig::new(tmp.path(), 0);
        config.fsync = FsyncPolicy::Never;
        let (mut log, _) = ShardLog::open(config).unwrap();
        let body = vec![b'x'; 128];
        let headers: &[u8] = b"persistent:true\n";
        let record = MessageRecord {
            destination: b"/queue/bench",
            id: BinaryId { shard: 1, seq: 1 },
            timestamp_ms: 0,
            header_block: headers,
            block_plain: true,
            transient: false,
            body: &body,
        };
        let mut pending: std::collections::VecDeque<Position> =
            std::collections::VecDeque::with_capacity(backlog + 1);
        for _ in 0..backlog {
            pending.push_back(log.append_message(&record, 0).unwrap());
        }
        let mut acks = 0u64;
        group.bench_function(
            BenchmarkId::new("never/128B", format!("backlog{backlog}")),
            |b| {
                b.iter(|| {
                    pending.push_back(log.append_message(&record, 0).unwrap());
                    let oldest = pending.pop_front().unwrap();
                    log.ack(&[oldest], 0).unwrap();
                    acks += 1;
                    if acks % CHUNK == 0 {
                        // What the broker does on its tick.
                        log.reclaim().unwrap();
                        if log.wants_spare() {
                            log.prepare_spare(0).unwrap();
                        }
                    }
                })
            },
        );
    }
    group.finish();
}

/// What a roll costs: creating one default-size segment (fallocate, header, map), with and
/// without MAP_POPULATE. Deleting it afterwards is untimed.
fn bench_roll(c: &mut Criterion) {
    let mut group = c.benchmark_group("log_segment_create");
    group.sample_size(10);
    for populate in [true, false] {
        let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let mut sequence = 0;
        let name = if populate { "populate" } else { "plain" };
        group.bench_function(BenchmarkId::new(name, "64MiB"), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let header = SegmentHeader {
                        format_version: FORMAT_VERSION,
                        shard: 0,
                        sequence,
                        segment_bytes: LogConfig::SEGMENT_BYTES_DEFAULT,
                        created_ms: 0,
                        flags: 0,
                    };
                    sequence += 1;
                    let start = Instant::now();
                    let segment = Segment::create(tmp.path(), header, populate).unwrap();
                    timed += start.elapsed();
                    let path = segment.path().to_owned();
                    drop(segment);
                    std::fs::remove_file(path).unwrap();
                }
                timed
            })
        });
    }
    group.finish();
}

/// What start-up costs: recovering a shard whose log holds one full 64 MiB segment of 1 KiB
/// messages, every other one acknowledged (scan both passes, CRC every record, copy the pending
/// half out). The page cache is warm (the log was just written); a cold start adds reading the
/// segment from disk.
fn bench_recover(c: &mut Criterion) {
    let mut group = c.benchmark_group("log_recover");
    group.sample_size(10);
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut config = LogConfig::new(tmp.path(), 0);
    config.fsync = FsyncPolicy::Never;
    let body = vec![b'r'; 1024];
    let mut messages = 0u64;
    {
        let (mut log, _) = ShardLog::open(config.clone()).unwrap();
        while log.appended_upto().segment == 0 {
            let p = log
                .append_message(
                    &MessageRecord {
                        destination: b"/queue/recover",
                        id: BinaryId { shard: 1, seq: 1 },
                        timestamp_ms: 0,
                        header_block: b"",
                        block_plain: true,
                        transient: false,
                        body: &body,
                    },
                    0,
                )
                .unwrap();
            if messages % 2 == 0 {
                log.ack(&[p], 0).unwrap();
            }
            messages += 1;
        }
        log.sync_now().unwrap();
    }
    group.throughput(Throughput::Bytes(LogConfig::SEGMENT_BYTES_DEFAULT));
    group.bench_function(
        BenchmarkId::new("64MiB-segment", format!("{messages}msgs")),
        |b| {
            b.iter(|| {
                let (log, recovery) = ShardLog::open(config.clone()).unwrap();
                assert!(recovery.report.is_clean());
                (log, recovery)
            })
        },
    );
    group.finish();
}

criterion_group!(
    benches,
    bench_append,
    bench_message_ack,
    bench_roll,
    bench_recover
);
criterion_main!(benches);
