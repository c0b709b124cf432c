//! A full disk: SENDs get `NoSpace` (the broker turns it into an ERROR, no RECEIPT), consumers
//! can still acknowledge, nothing already stored is damaged, and appends work again once
//! acknowledged segments are reclaimed. The disk is a small tmpfs mounted for the test, which
//! needs root (CAP_SYS_ADMIN; elsewhere that test says so and does nothing), and, without root,
//! a file-size limit (RLIMIT_FSIZE) in a child process.

use std::path::{Path, PathBuf};
use std::process::Command;

use stompd::log::{BinaryId, LogConfig, LogError, MessageRecord, Position, ShardLog};

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
    log.append_message(
        &MessageRecord {
            destination: b"/queue/full",
            id: BinaryId {
                shard: 0,
                seq: i as u64,
            },
            timestamp_ms: i as u64,
            header_block: b"",
            block_plain: true,
            transient: false,
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

/// In a child test (single-threaded, run by [`run_child`]): ignores SIGXFSZ, so a file-size
/// limit turns into an EFBIG error instead of killing the process, and opens the log in `dir`.
fn child_log(dir: &str) -> ShardLog {
    // SAFETY: a plain libc call at the start of a single-threaded child.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let mut config = LogConfig::new(Path::new(dir), 0);
    config.segment_bytes = SEGMENT_BYTES;
    ShardLog::open(config).unwrap().0
}

/// In a child test: sets the soft file-size limit to `bytes`.
fn limit_file_size(bytes: u64) {
    let limit = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid struct (the soft limit may go anywhere up to the hard one).
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &limit) }, 0);
}

/// Runs the ignored test `name` of this binary in a child process with `var` set to `dir`
/// (resource limits must not touch the test harness's other threads); returns its stdout
/// after checking it succeeded.
fn run_child(name: &str, var: &str, dir: &Path) -> String {
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            name,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(var, dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

const CHILD_VAR: &str = "STOMPD_LOG_FSIZE_CHILD_DIR";

/// Runs in a child process (see the test below): a file-size limit lower than a segment makes
/// the next segment's allocation fail with EFBIG, as a full disk would, without needing root.
#[test]
#[ignore = "run by a_file_size_limit_refuses_sends_and_damages_nothing as its child"]
fn file_size_limit_child() {
    let Ok(dir) = std::env::var(CHILD_VAR) else {
        return;
    };
    let mut log = child_log(&dir);
    let mut stored = Vec::new();
    while log.appended_upto().segment < 1 {
        stored.push(append(&mut log, stored.len()).unwrap());
    }
    limit_file_size(4096);
    let error = loop {
        match append(&mut log, stored.len()) {
            Ok(p) => stored.push(p),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(&error, LogError::NoSpace { source, .. } if source.raw_os_error() == Some(libc::EFBIG)),
        "{error}"
    );
    // A full disk refuses new blocks, not writes into blocks a segment already has; the
    // file-size limit refuses both past 4096 bytes, and appends reach the file in batches
    // (before a sync), so lift it before the batch is written.
    limit_file_size(libc::RLIM_INFINITY);
    let in_first: Vec<Position> = stored.iter().copied().filter(|p| p.segment == 0).collect();
    log.ack(&in_first, 0).expect("acks fit in the reserve");
    log.sync_now().unwrap();
    println!("child-ok {} {}", stored.len(), in_first.len());
}

const WRITE_CHILD_VAR: &str = "STOMPD_LOG_WRITE_FAIL_CHILD_DIR";

/// Runs in a child process (see the test below): the batched write of appended records fails
/// (a file-size limit below their offsets makes `pwrite` fail with EFBIG).
#[test]
#[ignore = "run by a_failed_write_fails_the_log_and_no_sync_confirms_it as its child"]
fn write_fail_child() {
    let Ok(dir) = std::env::var(WRITE_CHILD_VAR) else {
        return;
    };
    let mut log = child_log(&dir);
    // Past the first 4096 bytes of the segment, then limit the file size below them.
    let mut stored = Vec::new();
    while log.appended_upto().offset < 8192 {
        stored.push(append(&mut log, stored.len()).unwrap());
    }
    limit_file_size(4096);
    assert!(
        log.pending_sync(0).is_none(),
        "no sync may cover records that were not written"
    );
    assert!(log.has_failed());
    assert!(
        append(&mut log, stored.len()).is_err(),
        "a failed log refuses appends"
    );
    assert!(log.sync_now().is_err());
    println!("write-fail-ok {}", stored.len());
}

#[test]
fn a_failed_write_fails_the_log_and_no_sync_confirms_it() {
    let tmp = tempfile::tempdir().unwrap();
    let stdout = run_child("write_fail_child", WRITE_CHILD_VAR, tmp.path());
    assert!(stdout.contains("write-fail-ok"), "{stdout}");
}

#[test]
fn a_file_size_limit_refuses_sends_and_damages_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let stdout = run_child("file_size_limit_child", CHILD_VAR, tmp.path());
    let counts = stdout
        .split("child-ok ")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .expect("the child reports its counts");
    let (stored, acked) = counts.split_once(' ').unwrap();
    let (stored, acked): (usize, usize) = (stored.parse().unwrap(), acked.parse().unwrap());

    let mut config = LogConfig::new(tmp.path(), 0);
    config.segment_bytes = SEGMENT_BYTES;
    let (mut log, recovery) = ShardLog::open(config).unwrap();
    assert!(recovery.report.is_clean(), "{}", recovery.report);
    let messages = &recovery.queues[0].messages;
    assert_eq!(messages.len(), stored - acked);
    for (m, i) in messages.iter().zip(acked..) {
        assert_eq!(m.message_id.binary().unwrap().seq, i as u64);
        assert_eq!(m.body, vec![(i % 251) as u8; 1000]);
    }
    assert_eq!(
        recovery.report.reclaimed,
        [0],
        "segment 0 was fully acknowledged"
    );
    append(&mut log, stored).expect("without the limit, sends work again");
}
