//! Recovery of a shard's log: restart keeps unacknowledged messages in order, damage is found
//! and recovered around, fully acknowledged segments are reclaimed.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use stompd::log::format::SEGMENT_HEADER_BYTES;
use stompd::log::segment::segment_file_name;
use stompd::log::{
    BinaryId, FsyncPolicy, LogConfig, LogError, MessageRecord, Position, RecoveredQueue, Recovery,
    SegmentReader, ShardLog, StoredId,
};

const SEGMENT_BYTES: u64 = 64 * 1024;

fn config(dir: &Path) -> LogConfig {
    let mut config = LogConfig::new(dir, 0);
    config.segment_bytes = SEGMENT_BYTES;
    config.populate = false;
    config
}

fn open(dir: &Path) -> (ShardLog, Recovery) {
    ShardLog::open(config(dir)).expect("open log")
}

fn body(i: usize) -> Vec<u8> {
    format!("message body {i} ").repeat(1 + i % 7).into_bytes()
}

fn append(log: &mut ShardLog, destination: &str, i: usize) -> Position {
    let block = format!("persistent:true\ncustom:id-{i}\n");
    let body = body(i);
    log.append_message(
        &MessageRecord {
            destination: destination.as_bytes(),
            id: BinaryId {
                shard: 0,
                seq: i as u64,
            },
            timestamp_ms: 1_000 + i as u64,
            header_block: block.as_bytes(),
            block_plain: true,
            transient: false,
            body: &body,
        },
        1_000 + i as u64,
    )
    .expect("append")
}

fn ids(queue: &RecoveredQueue) -> Vec<String> {
    queue
        .messages
        .iter()
        .map(|m| format!("id-{}", m.message_id.binary().unwrap().seq))
        .collect()
}

fn queue<'a>(recovery: &'a Recovery, destination: &str) -> &'a RecoveredQueue {
    recovery
        .queues
        .iter()
        .find(|q| q.destination == destination.as_bytes())
        .unwrap_or_else(|| panic!("no queue {destination}"))
}

fn segment_path(dir: &Path, sequence: u64) -> PathBuf {
    config(dir).dir.join(segment_file_name(sequence))
}

#[test]
fn restart_keeps_unacked_messages_in_order_per_queue() {
    let tmp = tempfile::tempdir().unwrap();
    let mut positions = Vec::new();
    {
        let (mut log, recovery) = open(tmp.path());
        assert!(recovery.queues.is_empty());
        for i in 0..1000 {
            let destination = if i % 3 == 0 { "/queue/b" } else { "/queue/a" };
            positions.push(append(&mut log, destination, i));
        }
        // Ack every fifth message, some of them across segments.
        let acked: Vec<Position> = positions.iter().copied().step_by(5).collect();
        log.ack(&acked, 5_000).unwrap();
        log.sync_now().unwrap();
        assert!(
            log.segment_sequences().len() > 1,
            "the test must span segments"
        );
    }
    let (log, recovery) = open(tmp.path());
    assert!(recovery.report.is_clean(), "{}", recovery.report);
    let expected = |dest_b: bool| -> Vec<String> {
        (0..1000)
            .filter(|i| i % 5 != 0 && (i % 3 == 0) == dest_b)
            .map(|i| format!("id-{i}"))
            .collect()
    };
    assert_eq!(ids(queue(&recovery, "/queue/a")), expected(false));
    assert_eq!(ids(queue(&recovery, "/queue/b")), expected(true));
    // id-0 (the first for /queue/b) is acked, so /queue/a has the oldest pending message.
    assert_eq!(recovery.queues[0].destination, b"/queue/a");
    let m = &queue(&recovery, "/queue/a").messages[0];
    assert_eq!(
        m.message_id,
        StoredId::Binary(BinaryId { shard: 0, seq: 1 })
    );
    assert_eq!(m.body, body(1));
    assert_eq!(m.timestamp_ms, 1_001);
    assert_eq!(m.headers[0].name.as_ref(), b"persistent");
    assert_eq!(m.headers[1].value.as_ref(), b"id-1");
    assert!(!m.redelivered);
    assert_eq!(m.position, positions[1]);
    assert_eq!(log.live_messages(), 800);
    assert_eq!(recovery.report.messages_pending, 800);
}

#[test]
fn recovered_messages_can_be_acked_and_stay_acked() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (mut log, _) = open(tmp.path());
        for i in 0..10 {
            append(&mut log, "/queue/a", i);
        }
    }
    let positions: Vec<Position> = {
        let (mut log, recovery) = open(tmp.path());
        let q = queue(&recovery, "/queue/a");
        let first_four: Vec<Position> = q.messages[..4].iter().map(|m| m.position).collect();
        log.ack(&first_four, 0).unwrap();
        // Appending after recovery continues the same segment where the data ended.
        append(&mut log, "/queue/a", 10);
        q.messages.iter().map(|m| m.position).collect()
    };
    let (_, recovery) = open(tmp.path());
    let q = queue(&recovery, "/queue/a");
    assert_eq!(
        ids(q),
        (4..11).map(|i| format!("id-{i}")).collect::<Vec<_>>()
    );
    assert_eq!(q.messages[0].position, positions[4]);
}

#[test]
fn delivered_but_unacked_messages_come_back_redelivered() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (mut log, _) = open(tmp.path());
        let p: Vec<Position> = (0..4).map(|i| append(&mut log, "/queue/a", i)).collect();
        log.delivered(&p[0..2], 0).unwrap();
        log.ack(&p[0..1], 0).unwrap();
        // Delivered again (after a NACK, say), in a record of its own.
        log.delivered(&p[1..2], 0).unwrap();
        log.delivered(&p[3..4], 0).unwrap();
    }
    let (_, recovery) = open(tmp.path());
    let q = queue(&recovery, "/queue/a");
    assert_eq!(ids(q), ["id-1", "id-2", "id-3"]);
    let marks: Vec<bool> = q.messages.iter().map(|m| m.redelivered).collect();
    assert_eq!(marks, [true, false, true]);
    let counts: Vec<u32> = q.messages.iter().map(|m| m.deliveries).collect();
    assert_eq!(counts, [2, 0, 1], "one count per logged delivery");
}

#[test]
fn acking_an_unknown_or_repeated_position_is_refused_without_change() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = open(tmp.path());
    let p = append(&mut log, "/queue/a", 0);
    // Where no record was written yet. (An offset inside a written record is not refused: the
    // log keeps which records died, not where they start, and names only positions it handed
    // out; see `ShardLog::is_live`.)
    let bogus = Position {
        segment: p.segment,
        offset: log.appended_upto().offset,
    };
    assert!(matches!(log.ack(&[bogus], 0), Err(LogError::NotLive(q)) if q == bogus));
    assert!(matches!(log.ack(&[p, p], 0), Err(LogError::NotLive(_))));
    assert_eq!(log.live_messages(), 1);
    // A batch is refused as a whole: the good position named before the bad one stays live.
    for bad in [
        bogus,
        Position {
            segment: p.segment,
            offset: p.offset + 1,
        },
        Position {
            segment: p.segment,
            offset: u64::MAX - 7,
        },
        Position {
            segment: p.segment + 1,
            offset: p.offset,
        },
    ] {
        assert!(matches!(log.ack(&[p, bad], 0), Err(LogError::NotLive(q)) if q == bad));
        assert!(matches!(log.delivered(&[p, bad], 0), Err(LogError::NotLive(q)) if q == bad));
    }
    assert!(matches!(
        log.delivered(&[p, p], 0),
        Err(LogError::NotLive(_))
    ));
    assert_eq!(log.live_messages(), 1);
    log.delivered(&[p], 0).unwrap();
    log.ack(&[p], 0).unwrap();
    assert!(matches!(log.ack(&[p], 0), Err(LogError::NotLive(_))));
    assert!(matches!(log.delivered(&[p], 0), Err(LogError::NotLive(_))));
}

/// Damages the last record of the only segment the way a torn write would: its framing and
/// part of its bytes reached the disk, the rest did not.
#[test]
fn a_torn_last_record_is_cut_and_reported_and_appends_continue_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    let last;
    let end;
    {
        let (mut log, _) = open(tmp.path());
        for i in 0..5 {
            append(&mut log, "/queue/a", i);
        }
        last = append(&mut log, "/queue/a", 5);
        end = log.appended_upto();
        log.sync_now().unwrap();
    }
    let path = segment_path(tmp.path(), last.segment);
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    // Zero the second half of the last record: its CRC can no longer match.
    let middle = (last.offset + end.offset) / 2;
    file.write_all_at(&vec![0u8; (end.offset - middle) as usize], middle)
        .unwrap();
    drop(file);

    let (mut log, recovery) = open(tmp.path());
    assert_eq!(ids(queue(&recovery, "/queue/a")).len(), 5);
    let cut = &recovery.report.cuts[..];
    assert_eq!(cut.len(), 1, "{}", recovery.report);
    assert_eq!(cut[0].position, last);
    assert!(cut[0].zeroed);
    assert_eq!(cut[0].bytes, middle - last.offset);
    assert!(recovery.report.skipped.is_empty());
    assert!(recovery.report.to_string().contains("cut"));
    // The next record goes where the torn one was, and the log is clean afterwards.
    assert_eq!(append(&mut log, "/queue/a", 6), last);
    drop(log);
    let (_, recovery) = open(tmp.path());
    assert!(recovery.report.is_clean(), "{}", recovery.report);
    assert_eq!(
        ids(queue(&recovery, "/queue/a")),
        ["id-0", "id-1", "id-2", "id-3", "id-4", "id-6"]
    );
}

#[test]
fn garbage_after_the_last_record_is_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let end;
    {
        let (mut log, _) = open(tmp.path());
        append(&mut log, "/queue/a", 0);
        end = log.appended_upto();
    }
    let path = segment_path(tmp.path(), end.segment);
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    // Framing of a record whose lengths run past the segment, then stray bytes further on.
    file.write_all_at(&[0xFF; 16], end.offset).unwrap();
    file.write_all_at(b"stray", end.offset + 1000).unwrap();
    drop(file);
    let (_, recovery) = open(tmp.path());
    assert_eq!(ids(queue(&recovery, "/queue/a")), ["id-0"]);
    let cut = &recovery.report.cuts[0];
    assert_eq!(cut.position, end);
    assert_eq!(cut.bytes, 1005);
    let bytes = fs::read(&path).unwrap();
    assert!(bytes[end.offset as usize..].iter().all(|&b| b == 0));
    // What was zeroed is kept beside the segment, and is not mistaken for a segment.
    let saved = fs::read(cut.saved_to.as_ref().unwrap()).unwrap();
    assert_eq!(saved.len(), 1005);
    assert_eq!(&saved[..16], &[0xFF; 16]);
    assert_eq!(&saved[1000..], b"stray");
    let (_, recovery) = open(tmp.path());
    assert!(recovery.report.is_clean(), "{}", recovery.report);
}

#[test]
fn a_flipped_byte_in_the_middle_skips_only_that_record() {
    let tmp = tempfile::tempdir().unwrap();
    let positions: Vec<Position>;
    {
        let (mut log, _) = open(tmp.path());
        positions = (0..6).map(|i| append(&mut log, "/queue/a", i)).collect();
    }
    let path = segment_path(tmp.path(), positions[2].segment);
    let mut bytes = fs::read(&path).unwrap();
    // A byte of the third message's body.
    let at = positions[3].offset as usize - 12;
    bytes[at] ^= 0x40;
    fs::write(&path, &bytes).unwrap();

    let (_, recovery) = open(tmp.path());
    assert_eq!(
        ids(queue(&recovery, "/queue/a")),
        ["id-0", "id-1", "id-3", "id-4", "id-5"]
    );
    let skipped = &recovery.report.skipped;
    assert_eq!(skipped.len(), 1, "{}", recovery.report);
    assert_eq!(skipped[0].position, positions[2]);
    assert_eq!(skipped[0].bytes, positions[3].offset - positions[2].offset);
    assert!(recovery.report.cuts.is_empty());
    assert!(!recovery.report.is_clean());
}

#[test]
fn a_flipped_length_in_an_earlier_segment_loses_only_that_segments_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let mut positions = Vec::new();
    {
        let (mut log, _) = open(tmp.path());
        let mut i = 0;
        while log.appended_upto().segment < 2 {
            positions.push(append(&mut log, "/queue/a", i));
            i += 1;
        }
    }
    let in_first: Vec<&Position> = positions.iter().filter(|p| p.segment == 0).collect();
    let victim = *in_first[in_first.len() / 2];
    let path = segment_path(tmp.path(), 0);
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&[0x7F], victim.offset + 6).unwrap(); // high byte of the header length
    drop(file);
    let (_, recovery) = open(tmp.path());
    let survivors: Vec<Position> = queue(&recovery, "/queue/a")
        .messages
        .iter()
        .map(|m| m.position)
        .collect();
    let expected: Vec<Position> = positions
        .iter()
        .copied()
        .filter(|p| p.segment != 0 || p.offset < victim.offset)
        .collect();
    assert_eq!(survivors, expected);
    let cut = &recovery.report.cuts[0];
    assert_eq!(cut.position, victim);
    assert!(!cut.zeroed, "only the last segment's tail is rewritten");
}

/// A header length zeroed in an earlier segment reads as the end of its data: the records
/// after it are lost, but not silently. The non-zero bytes past the end are reported as an
/// unreadable tail, as a damaged length is.
#[test]
fn a_zeroed_length_in_an_earlier_segment_is_reported_not_silent() {
    let tmp = tempfile::tempdir().unwrap();
    let mut positions = Vec::new();
    {
        let (mut log, _) = open(tmp.path());
        let mut i = 0;
        while log.appended_upto().segment < 2 {
            positions.push(append(&mut log, "/queue/a", i));
            i += 1;
        }
    }
    let in_first: Vec<&Position> = positions.iter().filter(|p| p.segment == 0).collect();
    let victim = *in_first[in_first.len() / 2];
    let path = segment_path(tmp.path(), 0);
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&[0u8; 16], victim.offset).unwrap(); // both lengths
    drop(file);
    let (_, recovery) = open(tmp.path());
    assert_eq!(recovery.report.cuts.len(), 1, "{}", recovery.report);
    let cut = &recovery.report.cuts[0];
    assert_eq!(cut.position, victim);
    assert!(!cut.zeroed);
    assert!(cut.error.is_none(), "the scan saw an end, not an error");
    assert!(!recovery.report.is_clean());
}

#[test]
fn a_drained_queue_keeps_disk_use_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = open(tmp.path());
    let mut created = 0;
    for round in 0..50 {
        let batch: Vec<Position> = (0..100)
            .map(|i| append(&mut log, "/queue/a", round * 100 + i))
            .collect();
        log.ack(&batch, 0).unwrap();
        log.reclaim().unwrap();
        created = created.max(log.appended_upto().segment + 1);
        assert!(
            log.segment_sequences().len() <= 2,
            "{:?}",
            log.segment_sequences()
        );
    }
    assert!(
        created >= 10,
        "the test must roll many segments, rolled {created}"
    );
    assert_eq!(log.live_messages(), 0);
    let files = fs::read_dir(&log.config().dir).unwrap().count();
    assert!(files <= 2, "{files} files left");
    drop(log);
    let (log, recovery) = open(tmp.path());
    assert!(recovery.queues.is_empty());
    assert_eq!(
        log.segment_sequences().len(),
        1,
        "only the active segment is kept"
    );
}

/// A stuck message in an old segment pins that segment, and the segment holding acks for its
/// neighbours; later segments whose messages and acks are self-contained are deleted.
#[test]
fn reclaim_keeps_segments_whose_acks_still_matter() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = open(tmp.path());
    let mut first = Vec::new();
    while log.appended_upto().segment == 0 {
        first.push(append(&mut log, "/queue/a", first.len()));
    }
    let stuck = first.remove(0);
    let in_segment_zero: Vec<Position> = first.iter().copied().filter(|p| p.segment == 0).collect();
    // These acks land in segment 1 and point into segment 0.
    log.ack(&in_segment_zero, 0).unwrap();
    let rest: Vec<Position> = first.iter().copied().filter(|p| p.segment != 0).collect();
    log.ack(&rest, 0).unwrap();
    let ack_segment = log.appended_upto().segment;
    // Fill a few more segments, each acked by itself.
    while log.appended_upto().segment < ack_segment + 3 {
        let p = append(&mut log, "/queue/a", 0);
        log.ack(&[p], 0).unwrap();
    }
    log.reclaim().unwrap();
    let kept = log.segment_sequences();
    assert!(kept.contains(&0), "the stuck message's segment stays");
    assert!(
        kept.contains(&ack_segment),
        "acks into segment 0 stay: {kept:?}"
    );
    assert!(
        kept.len() < ack_segment as usize + 3,
        "later segments went: {kept:?}"
    );
    drop(log);
    let (mut log, recovery) = open(tmp.path());
    assert_eq!(ids(queue(&recovery, "/queue/a")), ["id-0"]);
    log.ack(&[stuck], 0).unwrap();
    log.reclaim().unwrap();
    assert_eq!(log.segment_sequences().len(), 1);
}

#[test]
fn syncs_are_grouped_and_never_issued_twice_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = open(tmp.path());
    assert_eq!(
        log.pending_sync(0),
        None,
        "nothing appended, nothing to sync"
    );
    let a = append(&mut log, "/queue/a", 0);
    let b = append(&mut log, "/queue/a", 1);
    assert!(!log.receipt_ready(a));
    let first = log.pending_sync(0).expect("a sync");
    // The new segment's data and the directory that names it.
    assert_eq!(first.targets.len(), 2);
    assert!(first.targets[0].data_only && !first.targets[1].data_only);
    let c = append(&mut log, "/queue/a", 2);
    assert_eq!(log.pending_sync(0), None, "one sync in flight at a time");
    log.mark_synced(first.upto);
    assert!(log.is_durable(a) && log.is_durable(b) && log.receipt_ready(b));
    assert!(!log.is_durable(c));
    let second = log.pending_sync(0).expect("covers c");
    assert_eq!(second.targets.len(), 1, "the directory is already synced");
    log.mark_synced(second.upto);
    assert!(log.is_durable(c));
    assert_eq!(log.pending_sync(0), None);
}

#[test]
fn every_policy_waits_for_its_interval_and_never_syncs_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.fsync = FsyncPolicy::Every { interval_ms: 100 };
    let (mut log, _) = ShardLog::open(cfg).unwrap();
    let a = append(&mut log, "/queue/a", 0);
    assert!(log.receipt_ready(a), "only always holds receipts");
    assert_eq!(log.next_sync_due_ms(), Some(0));
    let first = log.pending_sync(1_000).expect("first sync is due at once");
    log.mark_synced(first.upto);
    append(&mut log, "/queue/a", 1);
    assert_eq!(log.next_sync_due_ms(), Some(1_100));
    assert_eq!(log.pending_sync(1_099), None);
    assert!(log.pending_sync(1_100).is_some());

    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.fsync = FsyncPolicy::Never;
    let (mut log, _) = ShardLog::open(cfg).unwrap();
    append(&mut log, "/queue/a", 0);
    assert_eq!(log.pending_sync(u64::MAX), None);
    assert_eq!(log.next_sync_due_ms(), None);
}

#[test]
fn a_failed_sync_stops_appends() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = open(tmp.path());
    let a = append(&mut log, "/queue/a", 0);
    let _request = log.pending_sync(0).unwrap();
    log.mark_sync_failed();
    assert!(!log.is_durable(a));
    let err = log
        .append_message(
            &MessageRecord {
                destination: b"/queue/a",
                id: BinaryId::default(),
                timestamp_ms: 0,
                header_block: b"",
                block_plain: true,
                transient: false,
                body: b"",
            },
            0,
        )
        .unwrap_err();
    assert!(matches!(err, LogError::SyncFailed));
    assert_eq!(log.pending_sync(0), None);
}

#[test]
fn a_record_too_large_for_a_segment_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = open(tmp.path());
    let max = log.config().message_bytes_max();
    let body = vec![7u8; max as usize];
    let err = log
        .append_message(
            &MessageRecord {
                destination: b"/queue/a",
                id: BinaryId::default(),
                timestamp_ms: 0,
                header_block: b"",
                block_plain: true,
                transient: false,
                body: &body,
            },
            0,
        )
        .unwrap_err();
    assert!(matches!(err, LogError::RecordTooLarge { max_bytes, .. } if max_bytes == max));
    // The largest that fits does fit.
    let fits = max as usize - 16 - 32 - 8 - 4;
    log.append_message(
        &MessageRecord {
            destination: b"/queue/a",
            id: BinaryId::default(),
            timestamp_ms: 0,
            header_block: b"",
            block_plain: true,
            transient: false,
            body: &body[..fits],
        },
        0,
    )
    .unwrap();
}

#[test]
fn a_segment_with_a_damaged_header_stops_recovery_with_its_path() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (mut log, _) = open(tmp.path());
        append(&mut log, "/queue/a", 0);
    }
    let path = segment_path(tmp.path(), 0);
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(b"X", 20).unwrap();
    drop(file);
    match ShardLog::open(config(tmp.path())) {
        Err(LogError::BadSegment { path: p, .. }) => assert_eq!(p, path),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_segment_of_another_shard_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (mut log, _) = open(tmp.path());
        append(&mut log, "/queue/a", 0);
    }
    let mut other = config(tmp.path());
    other.shard = 1;
    fs::rename(config(tmp.path()).dir, &other.dir).unwrap();
    assert!(matches!(
        ShardLog::open(other),
        Err(LogError::MisplacedSegment { .. })
    ));
}

#[test]
fn a_segment_whose_creation_never_finished_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = config(tmp.path()).dir;
    {
        let (mut log, _) = open(tmp.path());
        append(&mut log, "/queue/a", 0);
    }
    // A preallocated file whose header never reached the disk, and an empty one.
    fs::write(
        dir.join(segment_file_name(1)),
        vec![0u8; SEGMENT_BYTES as usize],
    )
    .unwrap();
    fs::write(dir.join(segment_file_name(2)), b"").unwrap();
    let (mut log, recovery) = open(tmp.path());
    assert_eq!(recovery.report.removed_incomplete.len(), 2);
    assert_eq!(ids(queue(&recovery, "/queue/a")), ["id-0"]);
    // Sequence numbers are not reused, even for removed files.
    log.ack(&[recovery.queues[0].messages[0].position], 0)
        .unwrap();
    let mut i = 1;
    while log.appended_upto().segment == 0 {
        append(&mut log, "/queue/a", i);
        i += 1;
    }
    assert_eq!(log.appended_upto().segment, 3);
}

#[test]
fn invalid_segment_sizes_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for bytes in [0, 4095, 5000, 8 * 1024 * 1024 * 1024] {
        let mut cfg = config(tmp.path());
        cfg.segment_bytes = bytes;
        assert!(
            matches!(ShardLog::open(cfg), Err(LogError::Config(_))),
            "{bytes}"
        );
    }
}

/// The read-only reader sees what the writer wrote while the writer still holds the log open,
/// including a record in the middle of being written as the end of the data.
#[test]
fn the_read_only_reader_works_beside_a_live_writer() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = open(tmp.path());
    for i in 0..3 {
        append(&mut log, "/queue/a", i);
    }
    // Appends reach the file in batches: at the end of a loop turn or before a sync.
    let reader = SegmentReader::open(0, &segment_path(tmp.path(), 0)).unwrap();
    assert_eq!(reader.scan().count(), 0, "nothing written yet");
    log.write_pending().unwrap();
    let end = log.appended_upto();
    let path = segment_path(tmp.path(), 0);
    let reader = SegmentReader::open(0, &path).unwrap();
    assert_eq!(
        reader.header().as_ref().unwrap().segment_bytes,
        SEGMENT_BYTES
    );
    let records: Vec<_> = reader.scan().collect();
    assert_eq!(records.len(), 3);
    // Simulate a half-written record: body bytes present, framing not yet.
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(b"partial", end.offset + 16).unwrap();
    let records: Vec<_> = reader.scan().collect();
    assert_eq!(records.len(), 3, "a record being written is not reported");
    assert_eq!(SEGMENT_HEADER_BYTES, 64);
}

/// Appends are batched in memory and written with one `pwrite`; a sync request must never be
/// handed out before what it covers is in the file, or the fsync would confirm nothing.
#[test]
fn a_sync_request_is_handed_out_only_after_its_records_are_in_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = open(tmp.path());
    for i in 0..5 {
        append(&mut log, "/queue/a", i);
    }
    let reader = SegmentReader::open(0, &segment_path(tmp.path(), 0)).unwrap();
    assert_eq!(reader.scan().count(), 0, "batched, not written yet");
    let request = log.pending_sync(0).expect("a sync is due");
    assert_eq!(request.upto, log.appended_upto());
    assert_eq!(
        reader.scan().count(),
        5,
        "written before the sync is handed out"
    );
}

#[test]
fn a_segment_in_an_unfinished_sync_is_not_deleted_until_it_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = open(tmp.path());
    let mut in_first = Vec::new();
    while log.appended_upto().segment == 0 {
        in_first.push(append(&mut log, "/queue/a", in_first.len()));
    }
    let last = in_first.pop().unwrap(); // landed in segment 1
    let request = log.pending_sync(0).unwrap();
    assert_eq!(
        request.targets.len(),
        3,
        "segments 0 and 1, and the directory"
    );
    log.ack(&in_first, 0).unwrap();
    assert_eq!(
        log.reclaim().unwrap(),
        Vec::<u64>::new(),
        "segment 0's fd is in flight"
    );
    // A blocking sync meanwhile does not release it either.
    log.sync_now().unwrap();
    assert_eq!(log.reclaim().unwrap(), Vec::<u64>::new());
    log.mark_synced(request.upto);
    assert_eq!(log.reclaim().unwrap(), vec![0]);
    log.ack(&[last], 0).unwrap();
}

#[test]
fn a_prepared_spare_is_taken_by_the_next_roll_and_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = open(tmp.path());
    assert!(log.wants_spare(), "no active segment yet");
    let mut positions = vec![append(&mut log, "/queue/a", 0)];
    assert!(!log.wants_spare(), "segment 0 is nearly empty");
    while !log.wants_spare() {
        positions.push(append(&mut log, "/queue/a", positions.len()));
    }
    log.prepare_spare(7).unwrap();
    assert!(!log.wants_spare());
    // The spare's name is made durable by the next sync.
    let request = log.pending_sync(0).unwrap();
    assert!(request.targets.iter().any(|t| !t.data_only));
    log.mark_synced(request.upto);
    // Restart with the spare on disk: it becomes the active segment, nothing is lost.
    drop(log);
    let (mut log, recovery) = open(tmp.path());
    assert!(recovery.report.is_clean(), "{}", recovery.report);
    assert_eq!(queue(&recovery, "/queue/a").messages.len(), positions.len());
    assert_eq!(log.segment_sequences(), [0, 1]);
    let next = append(&mut log, "/queue/a", 999);
    assert_eq!(next.segment, 1, "appends continue in the spare");
    // A spare taken by a roll keeps its sequence; the one after is new.
    log.prepare_spare(8).unwrap();
    while log.appended_upto().segment == 1 {
        append(&mut log, "/queue/a", 1000);
    }
    assert_eq!(log.appended_upto().segment, 2);
    let header = SegmentReader::open(2, &segment_path(tmp.path(), 2))
        .unwrap()
        .header()
        .clone()
        .unwrap();
    assert_eq!(header.created_ms, 8, "the prepared segment was used");
}

/// Recovery looks only at the regions the file system reports as data; a stray byte at the very
/// end of the preallocated segment is still found.
#[test]
fn a_stray_byte_at_the_end_of_the_segment_is_found_and_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let end;
    {
        let (mut log, _) = open(tmp.path());
        append(&mut log, "/queue/a", 0);
        end = log.appended_upto();
        log.sync_now().unwrap();
    }
    let path = segment_path(tmp.path(), end.segment);
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(b"!", SEGMENT_BYTES - 1).unwrap();
    file.sync_all().unwrap();
    drop(file);
    let (_, recovery) = open(tmp.path());
    assert_eq!(recovery.report.cuts.len(), 1, "{}", recovery.report);
    assert_eq!(recovery.report.cuts[0].bytes, SEGMENT_BYTES - end.offset);
    assert_eq!(ids(queue(&recovery, "/queue/a")), ["id-0"]);
}

fn append_transient(log: &mut ShardLog, seq: u64, transient: bool) -> Position {
    let body = vec![b't'; 3000];
    log.append_message(
        &MessageRecord {
            destination: b"/queue/t",
            id: BinaryId { shard: 0, seq },
            timestamp_ms: seq,
            header_block: b"persistent:false\n",
            block_plain: true,
            transient,
            body: &body,
        },
        seq,
    )
    .expect("append")
}

/// A transient record (a non-persistent message written only to save memory) is readable while
/// the log runs, but after a restart it is neither restored nor live, so a segment holding
/// nothing else is reclaimed at once.
#[test]
fn transient_records_do_not_come_back_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = config(tmp.path());
    config.segment_bytes = 16 * 1024;
    let (mut log, _) = ShardLog::open(config.clone()).unwrap();
    let mut transient = Vec::new();
    while transient.last().map_or(true, |p: &Position| p.segment == 0) {
        let seq = transient.len() as u64;
        transient.push(append_transient(&mut log, seq, true));
    }
    let kept = append_transient(&mut log, 100, false);
    assert_eq!(kept.segment, 1);
    let view = log.read_message(transient[0]).unwrap();
    assert!(view.is_transient());
    assert_eq!(view.header_block().0.as_ref(), b"persistent:false\n");
    // Live while the run lasts: segment 0 is not reclaimed under a paged-out transient message.
    assert!(log.reclaim().unwrap().is_empty());
    assert_eq!(log.live_messages(), transient.len() as u64 + 1);
    // Releasing one writes nothing and stops it counting.
    let appended = log.appended_upto();
    log.release(&transient[..1]).unwrap();
    assert_eq!(log.appended_upto(), appended);
    assert!(matches!(
        log.release(&transient[..1]),
        Err(LogError::NotLive(_))
    ));
    log.sync_now().unwrap();
    drop(log);

    let (log, recovery) = ShardLog::open(config).unwrap();
    assert!(recovery.report.is_clean(), "{}", recovery.report);
    assert_eq!(recovery.queues.len(), 1);
    let messages = &recovery.queues[0].messages;
    assert_eq!(messages.len(), 1, "only the persistent message");
    assert_eq!(messages[0].position, kept);
    assert_eq!(
        messages[0].message_id,
        StoredId::Binary(BinaryId { shard: 0, seq: 100 })
    );
    assert_eq!(recovery.report.messages_pending, 1);
    assert_eq!(log.live_messages(), 1);
    assert_eq!(
        recovery.report.reclaimed,
        [0],
        "nothing live kept the transient records' segment"
    );
}
