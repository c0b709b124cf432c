//! A machine crash between every two sync points. The test runs a workload and snapshots the
//! segment files at each sync; for a crash between sync k and sync k+1 it builds directories
//! from both snapshots: every 512-byte sector written after sync k is on disk or not
//! (independently), segments created since may be missing or partly written, segments deleted
//! since may be back or gone. Recovery must then keep every message that was stored and not
//! acknowledged at sync k and still not acknowledged at the crash, in order per queue, with its
//! body intact. (Acknowledged messages may come back: unlinks are not synced, so delivery is at
//! least once.)
//!
//! A segment created since sync k from a recycled file (format version 2) starts from what that
//! file held at sync k (its inode, under its old name or as `.seg.free`), with only its new
//! header and the end marker after it on disk for sure (`Segment::recycle` syncs them before it
//! renames the file): its unsynced sectors hold the old segment's records, not zeros.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use stompd::log::format::{SegmentHeader, FRAME_BYTES, SEGMENT_HEADER_BYTES};
use stompd::log::{BinaryId, LogConfig, MessageRecord, Position, Recovery, ShardLog};

const SECTOR: usize = 512;
const CRASHES_PER_SYNC_POINT: usize = 4;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn chance(&mut self, one_in: u64) -> bool {
        self.next() % one_in == 0
    }
}

fn config(data_dir: &Path) -> LogConfig {
    let mut config = LogConfig::new(data_dir, 0);
    config.segment_bytes = 16 * 1024;
    config
}

/// Segment files (`*.seg`) and kept reclaimed files (`*.seg.free`) by name: inode, content.
type Files = BTreeMap<String, (u64, Vec<u8>)>;

fn snapshot(dir: &Path) -> Files {
    fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap())
        .filter_map(|entry| {
            let name = entry.file_name().into_string().unwrap();
            let wanted = name.ends_with(".seg") || name.ends_with(".seg.free");
            wanted.then(|| {
                let ino = entry.metadata().unwrap().ino();
                (name, (ino, fs::read(entry.path()).unwrap()))
            })
        })
        .collect()
}

/// What a segment created since the sync started from on disk: zeros for a fresh file; for a
/// recycled one, what its inode held at the sync, under its new header and end marker (synced
/// before the file got its new name).
fn base_of(new: &(u64, Vec<u8>), synced: &Files) -> Vec<u8> {
    let (ino, bytes) = new;
    let recycled = SegmentHeader::decode(bytes).is_ok_and(|h| h.is_recycled());
    let old = synced.values().find(|(old_ino, _)| old_ino == ino);
    match old {
        Some((_, old)) if recycled && old.len() == bytes.len() => {
            let mut base = old.clone();
            base[..SEGMENT_HEADER_BYTES].copy_from_slice(&bytes[..SEGMENT_HEADER_BYTES]);
            base[SEGMENT_HEADER_BYTES..SEGMENT_HEADER_BYTES + FRAME_BYTES].fill(0);
            base
        }
        _ => vec![0; bytes.len()],
    }
}

/// What the disk might hold after a crash that came after the sync that left `synced` and
/// before the next one, which found `next`.
fn crash(synced: &Files, next: &Files, rng: &mut Rng) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let names: BTreeSet<&String> = synced.keys().chain(next.keys()).collect();
    for name in names {
        match (synced.get(name), next.get(name)) {
            (Some((_, old)), Some((_, new))) => {
                out.insert(name.clone(), mix(old, new, rng));
            }
            // Deleted (or renamed away) since the sync: that may not have reached the disk.
            (Some((_, old)), None) => {
                if rng.chance(2) {
                    out.insert(name.clone(), old.clone());
                }
            }
            // Created since the sync: its name may not have reached the disk.
            (None, Some(new)) => {
                if rng.chance(2) {
                    out.insert(name.clone(), mix(&base_of(new, synced), &new.1, rng));
                }
            }
            (None, None) => unreachable!(),
        }
    }
    out
}

fn mix(old: &[u8], new: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut out = old.to_vec();
    for (i, sector) in new.chunks(SECTOR).enumerate() {
        if rng.chance(2) {
            out[i * SECTOR..i * SECTOR + sector.len()].copy_from_slice(sector);
        }
    }
    out
}

/// Runs `ops` random steps of the workload (append, ack mostly old messages, reclaim, sync) on
/// `log`, whose directory is `dir`, and records each sync point: the messages stored and not
/// acknowledged, and the files. `live` holds the unacknowledged messages in id order.
fn run_workload(
    log: &mut ShardLog,
    dir: &Path,
    rng: &mut Rng,
    live: &mut Vec<(u64, Position)>,
    next_id: &mut u64,
    ops: usize,
    body_len: &dyn Fn(&mut Rng) -> usize,
) -> Vec<(Vec<u64>, Files)> {
    let mut sync_points = Vec::new();
    for _ in 0..ops {
        match rng.next() % 10 {
            0..=5 => {
                let id = *next_id;
                *next_id += 1;
                let queue = format!("/queue/{}", id % 3);
                let body = vec![(id % 251) as u8; body_len(rng)];
                let p = log
                    .append_message(
                        &MessageRecord {
                            destination: queue.as_bytes(),
                            id: BinaryId { shard: 0, seq: id },
                            timestamp_ms: id,
                            header_block: b"",
                            block_plain: true,
                            transient: false,
                            body: &body,
                        },
                        id,
                    )
                    .unwrap();
                live.push((id, p));
            }
            6..=7 if !live.is_empty() => {
                // Consumers ack mostly old messages, sometimes recent ones.
                let i = (rng.next() as usize % live.len()).min(rng.next() as usize % 4);
                let (_, p) = live.remove(i);
                log.ack(&[p], 0).unwrap();
            }
            8 => {
                log.reclaim().unwrap();
            }
            _ => {
                log.sync_now().unwrap();
                let stored: Vec<u64> = live.iter().map(|&(id, _)| id).collect();
                sync_points.push((stored, snapshot(dir)));
            }
        }
    }
    let stored_at_end: Vec<u64> = live.iter().map(|&(id, _)| id).collect();
    sync_points.push((stored_at_end, snapshot(dir)));
    sync_points
}

/// Stored and unacknowledged at one sync and still unacknowledged at the next: what a crash
/// between them must not lose. (Acknowledged between the two syncs: may come back.)
fn required_between(stored: &[u64], stored_next: &[u64]) -> Vec<u64> {
    let still_live: BTreeSet<u64> = stored_next.iter().copied().collect();
    stored
        .iter()
        .copied()
        .filter(|id| still_live.contains(id))
        .collect()
}

/// Writes a crash state into a fresh data directory under `crashed`.
fn write_crash(crashed: &Path, synced: &Files, next: &Files, rng: &mut Rng) {
    let dir = config(crashed).dir;
    fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in crash(synced, next, rng) {
        fs::write(dir.join(name), bytes).unwrap();
    }
}

/// Checks a recovery: per queue in order, bodies intact, nothing `required` lost. Returns the
/// recovered messages in id order.
fn check_recovery(recovery: &Recovery, required: &[u64], what: &str) -> Vec<(u64, Position)> {
    let mut found = Vec::new();
    for queue in &recovery.queues {
        let ids: Vec<u64> = queue
            .messages
            .iter()
            .map(|m| m.message_id.binary().unwrap().seq)
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{what}: order {ids:?}");
        for (m, &id) in queue.messages.iter().zip(&ids) {
            assert_eq!(m.body, vec![(id % 251) as u8; m.body.len()], "{what}");
            assert_eq!(queue.destination, format!("/queue/{}", id % 3).as_bytes());
            found.push((id, m.position));
        }
    }
    found.sort_unstable();
    let ids: BTreeSet<u64> = found.iter().map(|&(id, _)| id).collect();
    let lost: Vec<&u64> = required.iter().filter(|id| !ids.contains(id)).collect();
    assert!(
        lost.is_empty(),
        "{what}: lost {lost:?}\n{}",
        recovery.report
    );
    found
}

#[test]
fn recovery_after_a_crash_at_any_sync_point_keeps_every_stored_unacked_message() {
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let tmp = tempfile::tempdir().unwrap();
    let live_dir = config(tmp.path()).dir;
    let (mut log, _) = ShardLog::open(config(tmp.path())).unwrap();
    let mut live = Vec::new();
    let mut next_id = 0u64;
    let sync_points = run_workload(
        &mut log,
        &live_dir,
        &mut rng,
        &mut live,
        &mut next_id,
        600,
        &|rng| (rng.next() % 700) as usize,
    );
    drop(log);
    assert!(sync_points.len() > 30, "{} sync points", sync_points.len());
    // Segments were recycled between sync points, so crashes start from leftover bytes too.
    let recycled_between = sync_points
        .windows(2)
        .filter(|w| {
            let (synced, next) = (&w[0].1, &w[1].1);
            next.iter().any(|(name, new)| {
                !synced.contains_key(name)
                    && base_of(new, synced)[SEGMENT_HEADER_BYTES + FRAME_BYTES..]
                        .iter()
                        .any(|&b| b != 0)
            })
        })
        .count();
    assert!(
        recycled_between > 0,
        "{recycled_between} recycled segments between syncs"
    );

    for (k, pair) in sync_points.windows(2).enumerate() {
        let [(stored, synced), (stored_next, next)] = pair else {
            unreachable!()
        };
        let required = required_between(stored, stored_next);
        for c in 0..CRASHES_PER_SYNC_POINT {
            let crashed = tempfile::tempdir().unwrap();
            write_crash(crashed.path(), synced, next, &mut rng);
            let (_, recovery) = ShardLog::open(config(crashed.path()))
                .unwrap_or_else(|e| panic!("sync point {k}, crash {c}: {e}"));
            check_recovery(&recovery, &required, &format!("sync point {k}, crash {c}"));
        }
    }
}

/// A crash, recovery, more work on the recovered log, and a second crash: what recovery left
/// behind (cut tails, end markers, a recycled last segment it no longer appends to, leftovers it
/// did not look at) must not let the second recovery lose anything stored and unacknowledged.
/// Messages all have one size, so new records line up with records lost in the first crash.
/// (Random sector mixes rarely reach the one known two-crash hazard, appending in place to a
/// recovered recycled segment; `tests/log_recycle.rs` builds that state deterministically.)
#[test]
fn a_second_crash_after_recovery_loses_nothing_either() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let same_size = |_: &mut Rng| 100;
    for round in 0..8 {
        let first = tempfile::tempdir().unwrap();
        let (mut log, _) = ShardLog::open(config(first.path())).unwrap();
        let mut live = Vec::new();
        let mut next_id = 0u64;
        let sync_points = run_workload(
            &mut log,
            &config(first.path()).dir,
            &mut rng,
            &mut live,
            &mut next_id,
            400,
            &same_size,
        );
        drop(log);
        let k = 1 + rng.next() as usize % (sync_points.len() - 2);
        let [(stored, synced), (stored_next, next)] = &sync_points[k..k + 2] else {
            unreachable!()
        };
        let crashed = tempfile::tempdir().unwrap();
        write_crash(crashed.path(), synced, next, &mut rng);
        let (mut log, recovery) = ShardLog::open(config(crashed.path())).unwrap();
        let what = format!("round {round}, first crash at {k}");
        let mut live = check_recovery(&recovery, &required_between(stored, stored_next), &what);
        // The recovered state is what the disk holds now (recovery syncs what it changed).
        let dir = config(crashed.path()).dir;
        let mut sync_points = vec![(live.iter().map(|&(id, _)| id).collect(), snapshot(&dir))];
        sync_points.extend(run_workload(
            &mut log,
            &dir,
            &mut rng,
            &mut live,
            &mut next_id,
            300,
            &same_size,
        ));
        drop(log);
        for (j, pair) in sync_points.windows(2).enumerate() {
            let [(stored, synced), (stored_next, next)] = pair else {
                unreachable!()
            };
            let again = tempfile::tempdir().unwrap();
            write_crash(again.path(), synced, next, &mut rng);
            let (_, recovery) = ShardLog::open(config(again.path()))
                .unwrap_or_else(|e| panic!("{what}, second crash at {j}: {e}"));
            let required = required_between(stored, stored_next);
            check_recovery(
                &recovery,
                &required,
                &format!("{what}, second crash at {j}"),
            );
        }
    }
}
