//! Segment recycling (format version 2): a reclaimed segment file is kept as `<seq>.seg.free`
//! and reused for the next segment; its leftover bytes (records of its earlier sequence) are
//! never replayed nor reported; a torn tail in a recycled segment is cut with a bounded copy;
//! every crash state between the steps of reusing a file recovers without loss.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use stompd::log::format::{
    decode_record, Decoded, SegmentHeader, FORMAT_VERSION, SEGMENT_FLAG_RECYCLED,
    SEGMENT_HEADER_BYTES,
};
use stompd::log::inspect::SegmentSummary;
use stompd::log::segment::{free_file_name, segment_file_name};
use stompd::log::shard::RECYCLED_CUT_COPY_BYTES_MAX;
use stompd::log::{
    BinaryId, LogConfig, MessageRecord, Position, Recovery, ShardInspection, ShardLog,
};

const SEGMENT_BYTES: u64 = 16 * 1024;

fn config(data_dir: &Path, segment_bytes: u64) -> LogConfig {
    let mut config = LogConfig::new(data_dir, 0);
    config.segment_bytes = segment_bytes;
    config.populate = false;
    config
}

fn open(data_dir: &Path) -> (ShardLog, Recovery) {
    ShardLog::open(config(data_dir, SEGMENT_BYTES)).expect("open log")
}

fn body(id: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (id as usize * 7 + i) as u8 | 1) // never zero: leftovers are all non-zero
        .collect()
}

fn append_sized(log: &mut ShardLog, id: u64, body_len: usize) -> Position {
    let body = body(id, body_len);
    log.append_message(
        &MessageRecord {
            destination: b"/queue/a",
            id: BinaryId { shard: 0, seq: id },
            timestamp_ms: id,
            header_block: b"",
            block_plain: true,
            transient: false,
            body: &body,
        },
        id,
    )
    .expect("append")
}

fn append(log: &mut ShardLog, id: u64) -> Position {
    append_sized(log, id, 300)
}

fn ids(recovery: &Recovery) -> Vec<String> {
    recovery
        .queues
        .iter()
        .flat_map(|q| &q.messages)
        .map(|m| format!("id-{}", m.message_id.binary().unwrap().seq))
        .collect()
}

fn names(ids: &[u64]) -> Vec<String> {
    ids.iter().map(|id| format!("id-{id}")).collect()
}

fn shard_dir(data_dir: &Path) -> PathBuf {
    config(data_dir, SEGMENT_BYTES).dir
}

fn inode(path: &Path) -> u64 {
    fs::metadata(path).unwrap().ino()
}

fn free_files(data_dir: &Path) -> Vec<String> {
    let mut found: Vec<String> = fs::read_dir(shard_dir(data_dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".seg.free"))
        .collect();
    found.sort();
    found
}

/// A log whose segment 0 was filled, fully acknowledged and reclaimed, and whose segment 2 is
/// the same file reused. `live` are the messages not acknowledged (in segments 1 and 2),
/// `old` the positions segment 0's messages had (their bytes are still in the file).
struct Recycled {
    log: ShardLog,
    live: Vec<u64>,
    old: Vec<Position>,
    next_id: u64,
}

fn recycled_log(data_dir: &Path) -> Recycled {
    let (mut log, _) = open(data_dir);
    let dir = shard_dir(data_dir);
    let mut next_id = 0;
    let mut old = Vec::new();
    let mut live = Vec::new();
    loop {
        let p = append(&mut log, next_id);
        if p.segment == 1 {
            live.push(next_id);
            next_id += 1;
            break;
        }
        old.push(p);
        next_id += 1;
    }
    let segment_0 = dir.join(segment_file_name(0));
    let ino = inode(&segment_0);
    log.ack(&old, 0).unwrap();
    assert_eq!(log.reclaim().unwrap(), [0]);
    assert!(!segment_0.exists());
    assert_eq!(free_files(data_dir), [free_file_name(0)]);
    loop {
        let p = append(&mut log, next_id);
        live.push(next_id);
        next_id += 1;
        if p.segment == 2 {
            break;
        }
    }
    assert_eq!(
        inode(&dir.join(segment_file_name(2))),
        ino,
        "segment 2 reuses 0's file"
    );
    assert!(free_files(data_dir).is_empty());
    Recycled {
        log,
        live,
        old,
        next_id,
    }
}

/// The bytes of segment 2 after its data hold records that are valid under sequence 0: exactly
/// what a careless reader would replay.
fn assert_old_records_are_left_over(data_dir: &Path, old: &[Position], data_end: u64) {
    let bytes = fs::read(shard_dir(data_dir).join(segment_file_name(2))).unwrap();
    let header = SegmentHeader::decode(&bytes).unwrap();
    assert_eq!(header.format_version, FORMAT_VERSION);
    assert_eq!(header.flags, SEGMENT_FLAG_RECYCLED);
    let leftover = old.iter().filter(|p| p.offset > data_end).count();
    assert!(leftover > 10, "{leftover} old records left over");
    for p in old.iter().filter(|p| p.offset > data_end) {
        assert!(
            matches!(
                decode_record(&bytes[p.offset as usize..], 0),
                Decoded::Record { .. }
            ),
            "old record at {p} is valid under sequence 0"
        );
    }
}

#[test]
fn leftover_records_of_the_old_sequence_are_never_replayed_and_a_clean_stop_restarts_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let Recycled {
        mut log, live, old, ..
    } = recycled_log(tmp.path());
    log.sync_now().unwrap();
    let end = log.appended_upto();
    assert_eq!(end.segment, 2);
    drop(log);
    assert_old_records_are_left_over(tmp.path(), &old, end.offset);

    for _ in 0..2 {
        let (log, recovery) = open(tmp.path());
        assert!(recovery.report.is_clean(), "{}", recovery.report);
        assert!(recovery.report.cuts.is_empty() && recovery.report.skipped.is_empty());
        assert_eq!(ids(&recovery), names(&live));
        assert_eq!(
            log.appended_upto(),
            end,
            "appends go on right after the data"
        );
        assert_eq!(log.segment_sequences(), [1, 2]);
    }

    // The inspection tool's view: clean, and only the live records are listed.
    let inspection = ShardInspection::read(&shard_dir(tmp.path())).unwrap();
    assert!(inspection.is_clean(), "{:?}", inspection.segments);
    let recycled = &inspection.segments[1];
    assert!(recycled.header.unwrap().is_recycled());
    assert_eq!(recycled.data_end, end.offset);
    assert!(inspection
        .records()
        .all(|r| r.position.segment != 2 || r.position.offset < end.offset));
    assert_eq!(
        inspection
            .records()
            .filter(|r| matches!(r.record, stompd::log::RecordView::Message(_)))
            .count(),
        live.len()
    );
}

/// In-process drop without a sync is what a broker killed with -9 leaves: the page cache holds
/// everything appended. Recovery gets every record appended, none of the leftovers, and no cut.
#[test]
fn appends_into_a_recycled_segment_survive_a_stop_without_sync() {
    let tmp = tempfile::tempdir().unwrap();
    let Recycled {
        mut log,
        mut live,
        mut next_id,
        ..
    } = recycled_log(tmp.path());
    log.sync_now().unwrap();
    let synced = log.synced_upto();
    for _ in 0..5 {
        append(&mut log, next_id);
        live.push(next_id);
        next_id += 1;
    }
    let end = log.appended_upto();
    assert!(synced < end && end.segment == 2);
    drop(log);
    let (_, recovery) = open(tmp.path());
    assert!(recovery.report.is_clean(), "{}", recovery.report);
    assert_eq!(ids(&recovery), names(&live));
}

/// The last record in a recycled segment is torn (its framing landed, the rest did not): it is
/// cut, with a copy of the bytes from it to the last non-zero one (here less than the bound),
/// only an end marker is written (the leftovers behind it stay as they are), appends resume
/// (in a new segment), and the next restart is clean.
#[test]
fn a_torn_record_in_a_recycled_last_segment_is_cut_and_appends_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let Recycled {
        mut log,
        mut live,
        next_id,
        ..
    } = recycled_log(tmp.path());
    log.sync_now().unwrap();
    let torn = append(&mut log, next_id);
    let torn_end = log.appended_upto();
    drop(log);
    let path = shard_dir(tmp.path()).join(segment_file_name(2));
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    let middle = (torn.offset + torn_end.offset) / 2;
    file.write_all_at(&vec![0u8; (torn_end.offset - middle) as usize], middle)
        .unwrap();
    drop(file);
    let before = fs::read(&path).unwrap();
    let last_nonzero = before.iter().rposition(|&b| b != 0).unwrap() as u64;

    let (mut log, recovery) = open(tmp.path());
    assert_eq!(ids(&recovery), names(&live));
    let [cut] = &recovery.report.cuts[..] else {
        panic!("one cut expected: {}", recovery.report);
    };
    assert_eq!(cut.position, torn);
    assert!(cut.zeroed && cut.recycled);
    assert_eq!(cut.bytes, last_nonzero + 1 - torn.offset);
    assert!(recovery.report.to_string().contains("recycled"));
    let saved = fs::read(cut.saved_to.as_ref().unwrap()).unwrap();
    assert_eq!(saved, before[torn.offset as usize..=last_nonzero as usize]);
    // Only the end marker changed.
    let after = fs::read(&path).unwrap();
    let marker = torn.offset as usize..torn.offset as usize + 16;
    assert!(after[marker.clone()].iter().all(|&b| b == 0));
    assert_eq!(after[..marker.start], before[..marker.start]);
    assert_eq!(after[marker.end..], before[marker.end..]);

    // Appends resume in a new segment: a recovered recycled segment is not appended to again
    // (see a_stale_record_of_the_same_sequence_never_comes_back_after_two_crashes).
    assert!(log.wants_spare());
    assert_eq!(
        append(&mut log, next_id + 1),
        Position {
            segment: 3,
            offset: 64
        }
    );
    live.push(next_id + 1);
    drop(log);
    let (_, recovery) = open(tmp.path());
    assert!(recovery.report.is_clean(), "{}", recovery.report);
    assert_eq!(ids(&recovery), names(&live));
}

/// With leftovers reaching far past the torn record, the copy stops at the bound instead of
/// running through up to a whole segment of old data.
#[test]
fn the_copy_of_a_torn_recycled_tail_is_bounded() {
    let segment_bytes = 4 * RECYCLED_CUT_COPY_BYTES_MAX;
    let tmp = tempfile::tempdir().unwrap();
    let config = config(tmp.path(), segment_bytes);
    let (mut log, _) = ShardLog::open(config.clone()).unwrap();
    let big = 256 * 1024;
    let mut old = Vec::new();
    let mut live = Vec::new();
    let mut id = 0;
    loop {
        let p = append_sized(&mut log, id, big);
        id += 1;
        if p.segment == 1 {
            live.push(id - 1);
            break;
        }
        old.push(p);
    }
    log.ack(&old, 0).unwrap();
    log.reclaim().unwrap();
    loop {
        let p = append_sized(&mut log, id, big);
        id += 1;
        if p.segment == 2 {
            // Keep only small records in segment 2, so leftovers follow closely.
            log.ack(&[p], 0).unwrap();
            break;
        }
        live.push(id - 1);
    }
    let torn = append_sized(&mut log, id, 100);
    let torn_end = log.appended_upto();
    drop(log);
    let path = config.dir.join(segment_file_name(2));
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&[0u8; 8], torn_end.offset - 16).unwrap();
    drop(file);
    let before = fs::read(&path).unwrap();
    assert!(before[(torn.offset + RECYCLED_CUT_COPY_BYTES_MAX) as usize + 100] != 0);

    let (_, recovery) = ShardLog::open(config.clone()).unwrap();
    assert_eq!(ids(&recovery), names(&live));
    let [cut] = &recovery.report.cuts[..] else {
        panic!("one cut expected: {}", recovery.report);
    };
    assert!(cut.recycled);
    assert_eq!(cut.position, torn);
    assert_eq!(cut.bytes, RECYCLED_CUT_COPY_BYTES_MAX);
    let saved = fs::read(cut.saved_to.as_ref().unwrap()).unwrap();
    assert_eq!(saved.len() as u64, RECYCLED_CUT_COPY_BYTES_MAX);
    let after = fs::read(&path).unwrap();
    assert_eq!(
        after[torn.offset as usize + 16..],
        before[torn.offset as usize + 16..]
    );
    let (_, recovery) = ShardLog::open(config).unwrap();
    assert!(recovery.report.is_clean(), "{}", recovery.report);
}

/// Two segments reclaimed at once: one file is kept (and reused by the next spare, same
/// inode), the other deleted.
#[test]
fn the_next_spare_reuses_the_reclaimed_file_and_at_most_one_is_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(tmp.path());
    let (mut log, _) = open(tmp.path());
    let mut by_segment: Vec<Vec<Position>> = vec![Vec::new(); 3];
    let mut live = Vec::new();
    let mut id = 0;
    loop {
        let p = append(&mut log, id);
        id += 1;
        if p.segment == 3 {
            live.push(id - 1);
            break;
        }
        by_segment[p.segment as usize].push(p);
    }
    let ino_0 = inode(&dir.join(segment_file_name(0)));
    log.ack(&by_segment[0], 0).unwrap();
    log.ack(&by_segment[1], 0).unwrap();
    log.ack(&by_segment[2], 0).unwrap();
    assert_eq!(log.reclaim().unwrap(), [0, 1, 2]);
    assert_eq!(free_files(tmp.path()), [free_file_name(0)]);
    assert!(!dir.join(segment_file_name(1)).exists());
    assert!(!dir.join(segment_file_name(2)).exists());

    log.prepare_spare(0).unwrap();
    let spare = dir.join(segment_file_name(4));
    assert_eq!(inode(&spare), ino_0, "the spare is the reclaimed file");
    assert!(free_files(tmp.path()).is_empty());
    let bytes = fs::read(&spare).unwrap();
    let header = SegmentHeader::decode(&bytes).unwrap();
    assert!(header.is_recycled());
    assert!(
        bytes[64..80].iter().all(|&b| b == 0),
        "an end marker ends the old data"
    );
    assert!(
        bytes[80..].iter().any(|&b| b != 0),
        "the old records are still there"
    );
    assert_eq!(header.sequence, 4);

    // Filling segment 3 rolls into the recycled spare; a restart is clean.
    loop {
        let p = append(&mut log, id);
        live.push(id);
        id += 1;
        if p.segment == 4 {
            break;
        }
    }
    drop(log);
    let (_, recovery) = open(tmp.path());
    assert!(recovery.report.is_clean(), "{}", recovery.report);
    assert_eq!(ids(&recovery), names(&live));
}

/// A kept file the last run left behind is deleted at start, never read as data, even when it
/// holds records that would be valid.
#[test]
fn a_free_file_left_at_start_is_deleted_and_never_recovered() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(tmp.path());
    let (mut log, _) = open(tmp.path());
    let mut old = Vec::new();
    let mut live = Vec::new();
    let mut id = 0;
    loop {
        let p = append(&mut log, id);
        if p.segment == 1 {
            live.push(id);
            break;
        }
        old.push(p);
        id += 1;
    }
    log.ack(&old, 0).unwrap();
    log.reclaim().unwrap();
    log.sync_now().unwrap();
    drop(log);
    // A stray copy of the live segment under a free name, with valid records of sequence 1.
    fs::copy(dir.join(segment_file_name(1)), dir.join(free_file_name(1))).unwrap();
    assert_eq!(
        free_files(tmp.path()),
        [free_file_name(0), free_file_name(1)]
    );

    let (_, recovery) = open(tmp.path());
    assert!(recovery.report.is_clean(), "{}", recovery.report);
    assert_eq!(
        recovery.report.removed_free,
        [dir.join(free_file_name(0)), dir.join(free_file_name(1))]
    );
    assert!(free_files(tmp.path()).is_empty());
    assert_eq!(ids(&recovery), names(&live));
    assert_eq!(recovery.report.segments, 1);
}

/// Every state the disk can be in between the steps of reusing a file (see
/// `Segment::recycle`), as a crash would leave it: recovery opens cleanly and loses nothing
/// synced.
#[test]
fn a_crash_between_the_steps_of_reusing_a_file_loses_nothing() {
    let base = tempfile::tempdir().unwrap();
    let base_dir = shard_dir(base.path());
    let mut live = Vec::new();
    {
        let (mut log, _) = open(base.path());
        let mut old = Vec::new();
        let mut id = 0;
        loop {
            let p = append(&mut log, id);
            if p.segment == 1 {
                live.push(id);
                break;
            }
            old.push(p);
            id += 1;
        }
        log.ack(&old, 0).unwrap();
        for _ in 0..3 {
            id += 1;
            append(&mut log, id);
            live.push(id);
        }
        assert_eq!(log.reclaim().unwrap(), [0]);
        log.sync_now().unwrap();
    }
    let new_header = |sequence: u64| {
        let mut bytes = [0u8; SEGMENT_HEADER_BYTES];
        SegmentHeader {
            format_version: FORMAT_VERSION,
            shard: 0,
            sequence,
            segment_bytes: SEGMENT_BYTES,
            created_ms: 0,
            flags: SEGMENT_FLAG_RECYCLED,
        }
        .encode(&mut bytes);
        bytes
    };
    type Step = fn(&Path, &[u8; SEGMENT_HEADER_BYTES]);
    let states: [(&str, Step, &[u64], bool); 5] = [
        // Reclaim renamed the file away, not synced: the old name may come back. Its messages
        // are acknowledged by segment 1, so it is simply reclaimed again.
        (
            "rename undone",
            |dir, _| {
                fs::rename(dir.join(free_file_name(0)), dir.join(segment_file_name(0))).unwrap()
            },
            &[1],
            false,
        ),
        // Renamed to .free with the old header (before or after the directory sync).
        ("free, old header", |_, _| {}, &[1], true),
        // New header and end marker written (synced or not), not yet renamed.
        (
            "free, new header",
            |dir, header| {
                let file = OpenOptions::new()
                    .write(true)
                    .open(dir.join(free_file_name(0)))
                    .unwrap();
                file.write_all_at(header, 0).unwrap();
                file.write_all_at(&[0; 16], 64).unwrap();
            },
            &[1],
            true,
        ),
        // Half of the new header written.
        (
            "free, torn header",
            |dir, header| {
                let file = OpenOptions::new()
                    .write(true)
                    .open(dir.join(free_file_name(0)))
                    .unwrap();
                file.write_all_at(&header[..30], 0).unwrap();
            },
            &[1],
            true,
        ),
        // Renamed to its final name: an empty recycled segment.
        (
            "final name",
            |dir, header| {
                let file = OpenOptions::new()
                    .write(true)
                    .open(dir.join(free_file_name(0)))
                    .unwrap();
                file.write_all_at(header, 0).unwrap();
                file.write_all_at(&[0; 16], 64).unwrap();
                drop(file);
                fs::rename(dir.join(free_file_name(0)), dir.join(segment_file_name(2))).unwrap();
            },
            &[1, 2],
            false,
        ),
    ];
    for (name, step, segments, free_removed) in states {
        let tmp = tempfile::tempdir().unwrap();
        let dir = shard_dir(tmp.path());
        fs::create_dir_all(&dir).unwrap();
        for entry in fs::read_dir(&base_dir).unwrap() {
            let entry = entry.unwrap();
            fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
        step(&dir, &new_header(2));
        let (mut log, recovery) = open(tmp.path());
        assert!(recovery.report.is_clean(), "{name}: {}", recovery.report);
        assert_eq!(ids(&recovery), names(&live), "{name}");
        assert_eq!(log.segment_sequences(), segments, "{name}");
        assert_eq!(
            recovery.report.removed_free.len(),
            usize::from(free_removed),
            "{name}"
        );
        assert!(free_files(tmp.path()).is_empty() || !free_removed, "{name}");
        // The log goes on: appends land after what was there (in a new segment after a
        // recycled last one, which is not appended to again), and a restart is clean.
        let p = append(&mut log, 1000);
        let last = *segments.last().unwrap();
        let expected_segment = if name == "final name" { last + 1 } else { last };
        assert_eq!(p.segment, expected_segment, "{name}");
        drop(log);
        let (_, recovery) = open(tmp.path());
        assert!(recovery.report.is_clean(), "{name}: {}", recovery.report);
        let mut expected = names(&live);
        expected.push("id-1000".into());
        assert_eq!(ids(&recovery), expected, "{name}");
    }
}

/// A kept file that can no longer be reused (here: another size) is removed and a fresh
/// segment created instead; nothing is left under a name whose header disagrees.
#[test]
fn a_file_that_cannot_be_reused_falls_back_to_a_fresh_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(tmp.path());
    let (mut log, _) = open(tmp.path());
    let mut old = Vec::new();
    let mut id = 0;
    loop {
        let p = append(&mut log, id);
        id += 1;
        if p.segment == 1 {
            break;
        }
        old.push(p);
    }
    log.ack(&old, 0).unwrap();
    log.reclaim().unwrap();
    let free = dir.join(free_file_name(0));
    OpenOptions::new()
        .write(true)
        .open(&free)
        .unwrap()
        .set_len(SEGMENT_BYTES / 2)
        .unwrap();
    log.prepare_spare(0).unwrap();
    // (The file system may give the fresh file the freed inode number, so the header tells.)
    let spare = dir.join(segment_file_name(2));
    assert!(!free.exists());
    let bytes = fs::read(&spare).unwrap();
    assert_eq!(bytes.len() as u64, SEGMENT_BYTES);
    assert!(!SegmentHeader::decode(&bytes).unwrap().is_recycled());
    drop(log);
    let (_, recovery) = open(tmp.path());
    assert!(recovery.report.is_clean(), "{}", recovery.report);
}

/// A reader opened on a segment that the broker then reclaims and reuses (same file, new
/// header, new records) sees the new contents through its map, which would read as damage; the
/// reader tells, so the inspection can leave such a segment out like a deleted one.
#[test]
fn a_reader_notices_when_its_segment_file_is_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(tmp.path());
    let (mut log, _) = open(tmp.path());
    let mut old = Vec::new();
    let mut id = 0;
    loop {
        let p = append(&mut log, id);
        id += 1;
        if p.segment == 1 {
            break;
        }
        old.push(p);
    }
    let path = dir.join(segment_file_name(0));
    let reader = stompd::log::SegmentReader::open(0, &path).unwrap();
    assert!(!reader.reused_since_open());
    assert!(SegmentSummary::scan(&reader, &path, Some(0)).is_clean());

    log.ack(&old, 0).unwrap();
    log.reclaim().unwrap();
    while append(&mut log, id).segment != 2 {
        id += 1;
    }
    for _ in 0..3 {
        id += 1;
        append(&mut log, id);
    }
    assert!(reader.reused_since_open());
    assert!(
        !SegmentSummary::scan(&reader, &path, Some(0)).is_clean(),
        "new records under the old header read as damage"
    );
    // The inspection of the directory as it is now: clean, segment 0 gone.
    let inspection = ShardInspection::read(&dir).unwrap();
    assert!(inspection.is_clean());
    let sequences: Vec<u64> = inspection.segments.iter().map(|s| s.sequence).collect();
    assert_eq!(sequences, [1, 2]);
}

/// Why the writer never appends in place to a recycled segment it recovered. A machine crash
/// can keep a later record of the segment's own sequence on disk while losing the framing of
/// the one before it: recovery then sees the end of the data there, and the later record
/// (valid: same sequence) stays behind it, not zeroed. Had new appends filled the gap exactly,
/// a second crash losing only the last end marker would bring that stale record back: here an
/// ack naming the position a new, synced message took, which would then be lost.
#[test]
fn a_stale_record_of_the_same_sequence_never_comes_back_after_two_crashes() {
    use stompd::log::format::RecordRef;
    let tmp = tempfile::tempdir().unwrap();
    let Recycled {
        mut log,
        mut live,
        next_id,
        ..
    } = recycled_log(tmp.path());
    let len_of = |id: u64, body_len: usize| {
        let body = body(id, body_len);
        RecordRef::Message(MessageRecord {
            destination: b"/queue/a",
            id: BinaryId { shard: 0, seq: id },
            timestamp_ms: id,
            header_block: b"",
            block_plain: true,
            transient: false,
            body: &body,
        })
        .encoded_len() as u64
    };
    // Crash 1: message X and the ack of X were appended; the ack reached the disk, X's framing
    // did not.
    log.sync_now().unwrap();
    let x_id = next_id + 100;
    let x = append_sized(&mut log, x_id, 1000);
    log.ack(&[x], 0).unwrap();
    let ack_at = x.offset + len_of(x_id, 1000);
    log.sync_now().unwrap();
    drop(log);
    let path = shard_dir(tmp.path()).join(segment_file_name(x.segment));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut stale_framing = [0u8; 16];
    file.read_exact_at(&mut stale_framing, ack_at).unwrap();
    file.write_all_at(&[0u8; 16], x.offset).unwrap();

    let (mut log, recovery) = open(tmp.path());
    assert!(recovery.report.is_clean(), "{}", recovery.report);
    assert_eq!(ids(&recovery), names(&live));
    // Two new messages that together take exactly X's place (if appended in place): the first
    // synced, the second not.
    let n1 = append_sized(&mut log, next_id, 100);
    live.push(next_id);
    log.sync_now().unwrap();
    let rest = len_of(x_id, 1000) - len_of(next_id, 100);
    let n2_id = next_id + 1;
    let n2_body = (0..2000)
        .find(|&b| len_of(n2_id, b) == rest)
        .expect("a body length that fills the gap");
    append_sized(&mut log, n2_id, n2_body);
    drop(log);
    // Crash 2: the last end marker (where the stale ack's framing was) did not reach the disk.
    file.write_all_at(&stale_framing, ack_at).unwrap();
    drop(file);

    let (_, recovery) = open(tmp.path());
    let got = ids(&recovery);
    let n1_name = format!("id-{}", live.last().unwrap());
    assert!(
        got.contains(&n1_name),
        "the synced message {n1_name} at {n1} was lost: {got:?}\n{}",
        recovery.report
    );
    assert_ne!(n1.segment, x.segment, "appends went to a new segment");
}

/// A reader that opened a segment just before the broker renamed it away to reuse it, and read
/// the header only after the reuse rewrote it, sees a header naming another sequence. That is
/// reuse, not a misplaced segment, once the name no longer holds the file; at rest (the name
/// still holds it) it is damage. (`stompd-log verify` beside a live broker once reported such a
/// segment as misplaced.)
#[test]
fn a_reader_whose_segment_was_renamed_away_with_another_header_sees_reuse_not_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = open(tmp.path());
    append(&mut log, 1);
    log.sync_now().unwrap();
    drop(log);
    // Segment 0's file under the name of segment 60: its header says 0, its name 60.
    let dir = shard_dir(tmp.path());
    let misnamed = dir.join(segment_file_name(60));
    fs::copy(dir.join(segment_file_name(0)), &misnamed).unwrap();

    let reader = stompd::log::SegmentReader::open(60, &misnamed).unwrap();
    assert!(
        !reader.reused_since_open(),
        "at rest, a header naming another sequence is damage"
    );
    fs::rename(&misnamed, dir.join(free_file_name(60))).unwrap();
    assert!(
        reader.reused_since_open(),
        "renamed away with another header: reused while being read"
    );
}
