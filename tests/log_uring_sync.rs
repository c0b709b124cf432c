//! The sync seam driven the way the event loop drives it: every target of a `SyncRequest` goes
//! to io_uring as an FSYNC (DATASYNC for segments, full for the directory), and `mark_synced`
//! runs when all completions are in. Appends made while the syncs are in flight are covered by
//! the next request (group commit). Skipped, with a message, where io_uring is unavailable.

use std::path::Path;

use io_uring::{opcode, types, IoUring};
use stompd::log::{BinaryId, LogConfig, MessageRecord, Position, ShardLog, SyncRequest};

fn append(log: &mut ShardLog, i: u64) -> Position {
    log.append_message(
        &MessageRecord {
            destination: b"/queue/uring",
            id: BinaryId { shard: 0, seq: i },
            timestamp_ms: i,
            header_block: b"",
            block_plain: true,
            transient: false,
            body: &[b'u'; 100],
        },
        i,
    )
    .unwrap()
}

/// Submits one FSYNC per target, like the event loop, and returns how many are in flight.
fn submit(ring: &mut IoUring, request: &SyncRequest) -> usize {
    for (i, target) in request.targets.iter().enumerate() {
        let flags = if target.data_only {
            types::FsyncFlags::DATASYNC
        } else {
            types::FsyncFlags::empty()
        };
        let sqe = opcode::Fsync::new(types::Fd(target.fd))
            .flags(flags)
            .build()
            .user_data(i as u64);
        // SAFETY: the descriptors stay open until mark_synced (the log's contract).
        unsafe { ring.submission().push(&sqe) }.expect("submission queue has room");
    }
    ring.submit().unwrap();
    request.targets.len()
}

#[test]
fn syncs_issued_through_io_uring_make_records_durable() {
    let mut ring = match IoUring::new(8) {
        Ok(ring) => ring,
        Err(e) => {
            eprintln!("SKIPPED: io_uring is not available here ({e})");
            return;
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut config = LogConfig::new(Path::new(tmp.path()), 0);
    config.segment_bytes = 64 * 1024;
    let (mut log, _) = ShardLog::open(config).unwrap();

    let first: Vec<Position> = (0..10).map(|i| append(&mut log, i)).collect();
    let request = log.pending_sync(0).unwrap();
    assert!(
        request.targets.iter().any(|t| !t.data_only),
        "new segment: directory too"
    );
    let mut in_flight = submit(&mut ring, &request);
    // While the syncs run, the loop keeps appending.
    let second: Vec<Position> = (10..20).map(|i| append(&mut log, i)).collect();
    assert_eq!(log.pending_sync(0), None, "one sync request at a time");
    while in_flight > 0 {
        ring.submit_and_wait(1).unwrap();
        for cqe in ring.completion() {
            assert!(cqe.result() >= 0, "fsync failed: {}", cqe.result());
            in_flight -= 1;
        }
    }
    log.mark_synced(request.upto);
    assert!(first.iter().all(|p| log.receipt_ready(*p)));
    assert!(second.iter().all(|p| !log.receipt_ready(*p)));

    // The next request covers everything appended meanwhile, with one FSYNC.
    let request = log.pending_sync(0).unwrap();
    assert_eq!(request.targets.len(), 1);
    let mut in_flight = submit(&mut ring, &request);
    while in_flight > 0 {
        ring.submit_and_wait(1).unwrap();
        for cqe in ring.completion() {
            assert!(cqe.result() >= 0);
            in_flight -= 1;
        }
    }
    log.mark_synced(request.upto);
    assert!(second.iter().all(|p| log.receipt_ready(*p)));
    assert_eq!(log.pending_sync(0), None);
}
