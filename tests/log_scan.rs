//! `ShardLog::scan_live`, what a queue reads its tail back with: it visits the live message
//! records from a position on, in log order and across segments, passes over acked and
//! released ones and the transient records of an earlier run, and resumes exactly where a
//! stopped scan said it stood.

use std::ops::ControlFlow;
use std::path::Path;

use stompd::log::{BinaryId, LogConfig, MessageRecord, Position, ShardLog};

/// Small segments, so that the records span several of them.
const SEGMENT_BYTES: u64 = 64 * 1024;
const MESSAGES: u64 = 600;

fn config(dir: &Path) -> LogConfig {
    let mut config = LogConfig::new(dir, 0);
    config.segment_bytes = SEGMENT_BYTES;
    config.populate = false;
    config
}

fn destination(seq: u64) -> &'static [u8] {
    if seq % 3 == 0 {
        b"/queue/b"
    } else {
        b"/queue/a"
    }
}

/// Every fifth message is transient (a non-persistent one paged out).
fn is_transient(seq: u64) -> bool {
    seq % 5 == 0
}

fn append(log: &mut ShardLog, seq: u64) -> Position {
    let body = vec![b'x'; 200 + (seq as usize % 13) * 17];
    log.append_message(
        &MessageRecord {
            destination: destination(seq),
            id: BinaryId { shard: 0, seq },
            timestamp_ms: 0,
            header_block: b"persistent:true\n",
            block_plain: true,
            transient: is_transient(seq),
            body: &body,
        },
        0,
    )
    .expect("append")
}

/// Ids of the live records of `queue` from `from` on, at most `max`, and where the scan
/// stood.
fn scan(log: &mut ShardLog, queue: &[u8], from: Position, max: usize) -> (Vec<u64>, Position) {
    let mut seqs = Vec::new();
    let next = log
        .scan_live(from, |_, view| {
            if *view.destination != *queue {
                return ControlFlow::Continue(());
            }
            seqs.push(view.message_id().binary().expect("binary id").seq);
            if seqs.len() < max {
                ControlFlow::Continue(())
            } else {
                ControlFlow::Break(())
            }
        })
        .expect("scan");
    (seqs, next)
}

/// Scans `queue` in batches of `batch` from the start until the log's end.
fn scan_in_batches(log: &mut ShardLog, queue: &[u8], batch: usize) -> Vec<u64> {
    let mut from = Position {
        segment: 0,
        offset: 0,
    };
    let mut all = Vec::new();
    loop {
        let (seqs, next) = scan(log, queue, from, batch);
        assert!(next >= from, "a scan never goes back");
        let done = seqs.len() < batch;
        all.extend(seqs);
        from = next;
        if done {
            return all;
        }
    }
}

#[test]
fn a_scan_visits_live_records_in_order_and_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = ShardLog::open(config(dir.path())).unwrap();
    let positions: Vec<Position> = (0..MESSAGES).map(|seq| append(&mut log, seq)).collect();
    log.write_pending().unwrap();
    assert!(log.segment_sequences().len() > 2, "records span segments");
    // Acks of every seventh, releases of the transient ones among every eleventh.
    let acked: Vec<u64> = (0..MESSAGES)
        .filter(|seq| seq % 7 == 0 && !is_transient(*seq))
        .collect();
    let released: Vec<u64> = (0..MESSAGES)
        .filter(|seq| seq % 11 == 0 && is_transient(*seq))
        .collect();
    for &seq in &acked {
        log.ack(&[positions[seq as usize]], 0).unwrap();
    }
    for &seq in &released {
        log.release(&[positions[seq as usize]]).unwrap();
    }
    let live = |queue: &[u8], this_run: bool| -> Vec<u64> {
        (0..MESSAGES)
            .filter(|seq| destination(*seq) == queue)
            .filter(|seq| !acked.contains(seq) && !released.contains(seq))
            .filter(|seq| this_run || !is_transient(*seq))
            .collect()
    };
    for queue in [&b"/queue/a"[..], b"/queue/b"] {
        for batch in [1, 7, 1000] {
            assert_eq!(scan_in_batches(&mut log, queue, batch), live(queue, true));
        }
    }
    // From the middle: what follows that record, no more.
    let middle = positions[300];
    let (seqs, _) = scan(&mut log, b"/queue/a", middle, usize::MAX);
    let expected: Vec<u64> = live(b"/queue/a", true)
        .into_iter()
        .filter(|&seq| seq >= 300)
        .collect();
    assert_eq!(seqs, expected);
    // After a restart the transient records of the run before are not live.
    drop(log);
    let (mut log, _) = ShardLog::open_indexed(config(dir.path())).unwrap();
    for queue in [&b"/queue/a"[..], b"/queue/b"] {
        assert_eq!(scan_in_batches(&mut log, queue, 13), live(queue, false));
    }
}

#[test]
fn a_scan_sees_records_not_yet_written_and_ends_at_the_logs_end() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = ShardLog::open(config(dir.path())).unwrap();
    for seq in 1..=20 {
        append(&mut log, seq);
    }
    // Nothing written to the file yet: the batch is read where it waits.
    let (seqs, end) = scan(
        &mut log,
        b"/queue/a",
        Position {
            segment: 0,
            offset: 0,
        },
        usize::MAX,
    );
    let expected: Vec<u64> = (1..=20)
        .filter(|&s| destination(s) == b"/queue/a")
        .collect();
    assert_eq!(seqs, expected);
    assert_eq!(
        end,
        log.appended_upto(),
        "a scan that finds too few ends at the end"
    );
    // A later append is found from there.
    append(&mut log, 22);
    let (seqs, _) = scan(&mut log, b"/queue/a", end, usize::MAX);
    assert_eq!(seqs, vec![22]);
}
