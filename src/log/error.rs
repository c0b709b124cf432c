//! Errors of the durable-queue log.

use std::io;
use std::path::PathBuf;

use super::format::{FormatError, Position};

/// What went wrong in a shard's log. The broker turns `NoSpace`, `DiskBudget` and `RecordTooLarge` on a SEND
/// into an ERROR frame (no RECEIPT); the others are operating errors it logs.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A new segment could not be allocated (ENOSPC, EDQUOT or EFBIG). Nothing stored was
    /// touched; acknowledgements free space and appends succeed again once segments are reclaimed.
    #[error("no space for a new log segment {path}: {source}")]
    NoSpace { path: PathBuf, source: io::Error },
    /// A new segment would take the shard's log past its share of `disk_bytes_max`. As with
    /// `NoSpace`, nothing stored was touched, and appends succeed again once acknowledged
    /// segments are reclaimed.
    #[error("disk_bytes_max exceeded (this shard's log may take at most {max_bytes} bytes)")]
    DiskBudget { max_bytes: u64 },
    /// The record cannot fit in any segment of the configured size.
    #[error("record of {bytes} bytes does not fit in a log segment (at most {max_bytes} bytes)")]
    RecordTooLarge { bytes: u64, max_bytes: u64 },
    /// A field exceeds its on-disk width (a u32 length or count).
    #[error("{field} is too long to store ({len} bytes or items)")]
    FieldTooLong { field: &'static str, len: usize },
    /// An ack or delivered reference names no live message of this log.
    #[error("position {0} is not a live message of this log")]
    NotLive(Position),
    /// A segment's header is damaged or belongs elsewhere. Recovery refuses to guess: the
    /// operator must move the file aside.
    #[error("segment {path} has a bad header ({error}); move it out of the log directory to start without it")]
    BadSegment { path: PathBuf, error: FormatError },
    /// A segment header names another shard or sequence than its place says.
    #[error("segment {path} is misplaced: {what}")]
    MisplacedSegment { path: PathBuf, what: String },
    /// An earlier sync failed. After a failed fsync Linux may have dropped the dirty pages, so
    /// the log can no longer promise durability and refuses further appends.
    #[error(
        "an earlier sync of the log failed; restart the broker to recover from what is on disk"
    )]
    SyncFailed,
    /// The configuration cannot work.
    #[error("invalid log configuration: {0}")]
    Config(&'static str),
    /// A live message's record did not decode where the log said it is (damage after it was
    /// written: a disk error, or someone else writing the file).
    #[error("the record of live message {0} cannot be read back: {1}")]
    Unreadable(Position, String),
    /// Any other I/O error, with the file it concerned.
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl LogError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> LogError {
        LogError::Io {
            path: path.into(),
            source,
        }
    }
}

impl LogError {
    /// Text for the `message` header of the ERROR frame a client gets when its SEND could not be
    /// stored. The `Display` text names server paths and OS errors, which belong in the broker's
    /// log, not in a reply to a client.
    pub fn client_message(&self) -> &'static str {
        match self {
            LogError::NoSpace { .. } => "the broker's storage is full",
            LogError::DiskBudget { .. } => "disk_bytes_max exceeded",
            LogError::RecordTooLarge { .. } => "too large for the broker's log",
            LogError::FieldTooLong { .. } => "a header is too long to store",
            LogError::SyncFailed => "the broker's storage failed",
            _ => "storage error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_messages_name_no_paths() {
        let no_space = LogError::NoSpace {
            path: PathBuf::from("/var/lib/stompd/shard-0/00000000000000000001.seg"),
            source: io::Error::from_raw_os_error(libc::ENOSPC),
        };
        assert!(no_space.to_string().contains("/var/lib/stompd"));
        assert_eq!(no_space.client_message(), "the broker's storage is full");
        let budget = LogError::DiskBudget { max_bytes: 1 << 20 };
        assert!(budget.to_string().contains("at most 1048576 bytes"));
        assert_eq!(budget.client_message(), "disk_bytes_max exceeded");
        let io = LogError::io("/secret/path", io::Error::from_raw_os_error(libc::EIO));
        assert!(!io.client_message().contains('/'));
    }
}
