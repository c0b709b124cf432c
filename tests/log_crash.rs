//! A real crash: a child process appends and acknowledges messages, syncs them through the same
//! `pending_sync`/`mark_synced` seam the event loop uses, and prints each durable point; the test
//! kills it with SIGKILL at a pseudo-random moment, recovers the log and checks that every
//! message reported durable is there, intact and in order, and that every message whose ack was
//! reported durable is gone. Several cycles run on the same log.
//!
//! The child is this test binary run again with `crash_child` selected and the log directory in
//! `STOMPD_LOG_CRASH_DIR`; without that variable `crash_child` is ignored.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::io::RawFd;
use std::path::Path;
use std::process::{Command, Stdio};

use stompd::log::{BinaryId, LogConfig, MessageRecord, Position, ShardLog, StoredId};

const CYCLES: u64 = 5;
/// Messages stay unacknowledged for this many later messages, so segments fill with a mix of
/// live and acknowledged messages and reclamation runs while the child works.
const ACK_LAG: u64 = 150;
const DIR_VAR: &str = "STOMPD_LOG_CRASH_DIR";
const CYCLE_VAR: &str = "STOMPD_LOG_CRASH_CYCLE";

fn config(dir: &Path) -> LogConfig {
    let mut config = LogConfig::new(dir, 0);
    config.segment_bytes = 64 * 1024;
    config
}

fn body(id: u64) -> Vec<u8> {
    format!("<{id}>")
        .repeat(1 + (id % 13) as usize)
        .into_bytes()
}

/// Message ids are `cycle * 1_000_000 + n`, so each cycle's messages are told apart.
fn parse_id(id: &StoredId) -> u64 {
    id.binary().unwrap().seq
}

fn fsync(fd: RawFd, data_only: bool) {
    // SAFETY: plain syscalls on descriptors the log keeps open until mark_synced.
    let rc = unsafe {
        if data_only {
            libc::fdatasync(fd)
        } else {
            libc::fsync(fd)
        }
    };
    assert_eq!(rc, 0, "sync failed: {}", std::io::Error::last_os_error());
}

#[test]
#[ignore = "run by kill9_during_synced_appends_loses_nothing_reported_durable as its child"]
fn crash_child() {
    let Ok(dir) = std::env::var(DIR_VAR) else {
        return;
    };
    let cycle: u64 = std::env::var(CYCLE_VAR).unwrap().parse().unwrap();
    let (mut log, recovery) = ShardLog::open(config(Path::new(&dir))).unwrap();
    // Drain what earlier cycles left, durably, before reporting anything.
    let leftovers: Vec<Position> = recovery
        .queues
        .iter()
        .flat_map(|q| q.messages.iter().map(|m| m.position))
        .collect();
    log.ack(&leftovers, 0).unwrap();
    log.sync_now().unwrap();
    log.reclaim().unwrap();
    let mut out = std::io::stdout().lock();
    writeln!(out, "drained").unwrap();
    out.flush().unwrap();

    let mut window: VecDeque<(u64, Position)> = VecDeque::new();
    let mut next = cycle * 1_000_000;
    let mut batch = 1;
    loop {
        for _ in 0..batch {
            let body = body(next);
            let position = log
                .append_message(
                    &MessageRecord {
                        destination: b"/queue/crash",
                        id: BinaryId {
                            shard: 0,
                            seq: next,
                        },
                        timestamp_ms: next,
                        header_block: b"",
                        block_plain: true,
                        transient: false,
                        body: &body,
                    },
                    next,
                )
                .unwrap();
            window.push_back((next, position));
            next += 1;
        }
        let mut acks = Vec::new();
        while window.len() as u64 > ACK_LAG {
            acks.push(window.pop_front().unwrap().1);
        }
        // Announce the acks before making them: once made they may reach the page cache (and
        // survive the kill) before any sync, so the parent must know they might be gone.
        let ack_below = window.front().map_or(next, |&(id, _)| id);
        writeln!(out, "acking {ack_below}").unwrap();
        out.flush().unwrap();
        log.ack(&acks, 0).unwrap();
        let request = log
            .pending_sync(0)
            .expect("always policy has a sync to issue");
        for target in &request.targets {
            fsync(target.fd, target.data_only);
        }
        log.mark_synced(request.upto);
        log.reclaim().unwrap();
        let lowest_unacked = window.front().map_or(next, |&(id, _)| id);
        writeln!(out, "durable {} {}", next - 1, lowest_unacked).unwrap();
        out.flush().unwrap();
        batch = batch % 37 + 1;
    }
}

#[test]
fn kill9_during_synced_appends_loses_nothing_reported_durable() {
    let tmp = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    for cycle in 1..=CYCLES {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let kill_after_lines = 20 + seed % 180;
        let mut child = Command::new(&exe)
            .args([
                "crash_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(DIR_VAR, tmp.path())
            .env(CYCLE_VAR, cycle.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut durable: Option<(u64, u64)> = None;
        let mut ack_intent: u64 = 0;
        let mut drained = false;
        let mut seen = 0;
        let mut killed = false;
        for line in lines.by_ref() {
            let line = line.unwrap();
            // libtest prints "test crash_child ... " before the child's first line.
            if line.ends_with("drained") {
                drained = true;
            } else if let Some(below) = line.strip_prefix("acking ") {
                ack_intent = below.parse().unwrap();
            } else if let Some(rest) = line.strip_prefix("durable ") {
                let (d, a) = rest.split_once(' ').unwrap();
                durable = Some((d.parse().unwrap(), a.parse().unwrap()));
                seen += 1;
                if seen == kill_after_lines && !killed {
                    child.kill().unwrap(); // SIGKILL
                    killed = true;
                }
            }
        }
        let status = child.wait().unwrap();
        assert!(
            killed,
            "cycle {cycle}: the child ended on its own: {status:?}"
        );
        assert!(drained, "cycle {cycle}: the child never recovered");
        let (last_durable, lowest_unacked) = durable.unwrap();

        let (_log, recovery) = ShardLog::open(config(tmp.path())).unwrap();
        assert!(
            recovery.report.skipped.is_empty(),
            "cycle {cycle}: {}",
            recovery.report
        );
        let messages = match &recovery.queues[..] {
            [queue] => &queue.messages,
            other => panic!("cycle {cycle}: {} queues", other.len()),
        };
        let ids: Vec<u64> = messages.iter().map(|m| parse_id(&m.message_id)).collect();
        // Nothing from earlier cycles (drained durably), nothing acked durably; everything
        // reported durable and never announced for acking is there, in order; anything after
        // the last durable point only as a contiguous run (appended, not yet synced).
        let first = *ids.first().expect("messages were pending");
        assert!(
            (lowest_unacked..=ack_intent.max(lowest_unacked)).contains(&first),
            "cycle {cycle}: first pending {first}, durably acked below {lowest_unacked}, \
             acks announced below {ack_intent}"
        );
        for pair in ids.windows(2) {
            assert_eq!(pair[1], pair[0] + 1, "cycle {cycle}: gap or reorder");
        }
        assert!(
            *ids.last().unwrap() >= last_durable,
            "cycle {cycle}: lost {last_durable}"
        );
        for m in messages {
            let id = parse_id(&m.message_id);
            assert_eq!(m.body, body(id), "cycle {cycle}: body of {id}");
            assert_eq!(m.timestamp_ms, id);
        }
    }
}
