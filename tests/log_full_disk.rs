//! A full disk: SENDs get `NoSpace` (the broker turns it into an ERROR, no RECEIPT), consumers
//! can still acknowledge, nothing already stored is damaged, and appends work again once
//! acknowledged segments are reclaimed. The disk is a small tmpfs mounted for the test, which
//! needs root (CAP_SYS_ADMIN); elsewhere the test says so and does nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use stompd::log::{LogConfig, LogError, MessageRecord, Position, ShardLog};

const SEGMENT_BYTES: u64 = 64 * 1024;
/// Room for eight segments.
const FILESYSTEM_BYTES: u64 = 8 * SEGMENT_BYTES;

/// Unmounts the test filesystem even when the test fails.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn mount_small_tmpfs(at: &Path) -> Option<Mounted> {
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o"])
        .arg(format!("size={FILESYSTEM_BYTES}"))
        .arg("stompd-log-test")
        .arg(at)
        .status();
    match status {
        Ok(s) if s.success() => Some(Mounted(at.to_owned())),
        other => {
            eprintln!(
                "SKIPPED: cannot mount a small tmpfs at {} ({other:?}); run as root to test a full disk",
                at.display()
            );
            None
        }
    }
}

fn append(log: &mut ShardLog, i: usize) -> Result<Position, LogError> {
    let body = vec![(i % 251) as u8; 1000];
    let id = format!("id-{i}");
    log.append_message(
        &MessageRecord {
            destination: b"/queue/full",
            message_id: id.as_bytes(),
            timestamp_ms: i as u64,
            headers: &[],
            body: &body,
        },
        i as u64,
    )
}

#[test]
fn a_full_disk_refuses_sends_keeps_acks_working_and_damages_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(_mounted) = mount_small_tmpfs(tmp.path()) else {
        return;
    };
    let mut config = LogConfig::new(tmp.path(), 0);
    config.segment_bytes = SEGMENT_BYTES;
    // Also exercises prefaulted maps (MAP_POPULATE), which the other tests leave off.
    config.populate = true;
    let (mut log, _) = ShardLog::open(config.clone()).unwrap();

    let mut stored = Vec::new();
    let error = loop {
        match append(&mut log, stored.len()) {
            Ok(p) => stored.push(p),
            Err(e) => break e,
        }
        assert!(stored.len() < 10_000, "the disk never filled");
    };
    assert!(matches!(error, LogError::NoSpace { .. }), "{error}");
    assert!(stored.len() > 100);
    // Refused again, without side effects.
    assert!(matches!(
        append(&mut log, stored.len()),
        Err(LogError::NoSpace { .. })
    ));
    log.sync_now().unwrap();

    // Consumers keep working: the oldest half is acknowledged within the ack reserve.
    let (done, pending) = stored.split_at(stored.len() / 2);
    for chunk in done.chunks(16) {
        log.ack(chunk, 0).expect("acks fit in the reserve");
    }
    // Everything stored is intact and in order after a restart (the log is reopened as is).
    drop(log);
    let (mut log, recovery) = ShardLog::open(config.clone()).unwrap();
    assert!(recovery.report.is_clean(), "{}", recovery.report);
    let recovered: Vec<Position> = recovery.queues[0]
        .messages
        .iter()
        .map(|m| m.position)
        .collect();
    assert_eq!(recovered, pending);
    for (m, i) in recovery.queues[0].messages.iter().zip(done.len()..) {
        assert_eq!(m.body, vec![(i % 251) as u8; 1000]);
    }
    // Recovery reclaimed the acknowledged segments, so sends work again.
    assert!(!recovery.report.reclaimed.is_empty());
    append(&mut log, stored.len()).expect("space was freed");
}
