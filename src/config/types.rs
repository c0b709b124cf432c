//! The small value types an operator writes as words: the fsync policy and the queue type.
//! Each parses from and prints to the same text (`FromStr` and `Display` are inverses), and
//! serde goes through that text, so a flag, an environment variable and a TOML key all accept
//! exactly the same spelling.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// When the log makes appended records durable, spelled `always`, `every:<ms>` or `never`.
///
/// The default is [`FsyncPolicy::Always`] because stompd is durable by default: a RECEIPT for
/// a SEND to a durable queue is only sent after the record is on stable storage, so a message
/// whose RECEIPT went out survives `kill -9` *and* power loss. `every:<ms>` survives `kill -9`
/// (the page cache outlives the process) but can lose the last `<ms>` of receipted messages on
/// power loss, which breaks that promise; it stays an explicit opt-in for throughput. `always`
/// is affordable because the log commits in groups: one fsync covers every record appended
/// since the last one, so its cost is per batch, not per message.
///
/// The same shape as the log's own `log::FsyncPolicy { Always, Every { interval_ms }, Never }`
/// (whose `every:` bound is looser: every value valid here is valid there).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum FsyncPolicy {
    /// fsync before a RECEIPT is sent or a message is acknowledged as stored.
    #[default]
    Always,
    /// fsync at most this many milliseconds after an append; receipts do not wait for it.
    Every { interval_ms: u64 },
    /// Never fsync; the kernel writes back when it likes. For tests and throwaway brokers.
    Never,
}

impl FsyncPolicy {
    /// The bounds of `every:<ms>`. Below 1 ms it is `always` in disguise; above a minute the
    /// window of loss on power failure is longer than anyone would knowingly accept.
    pub const EVERY_MS_MIN: u64 = 1;
    pub const EVERY_MS_MAX: u64 = 60_000;
}

/// The running broker uses the log's type; this one exists for the operator-facing parsing
/// (trimmed, case-insensitive, tighter `every:` bound). Field for field, so nothing is lost.
impl From<FsyncPolicy> for crate::log::FsyncPolicy {
    fn from(policy: FsyncPolicy) -> crate::log::FsyncPolicy {
        match policy {
            FsyncPolicy::Always => crate::log::FsyncPolicy::Always,
            FsyncPolicy::Every { interval_ms } => crate::log::FsyncPolicy::Every { interval_ms },
            FsyncPolicy::Never => crate::log::FsyncPolicy::Never,
        }
    }
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsyncPolicy::Always => f.write_str("always"),
            FsyncPolicy::Every { interval_ms } => write!(f, "every:{interval_ms}"),
            FsyncPolicy::Never => f.write_str("never"),
        }
    }
}

/// Why a text is not an fsync policy.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("`{0}` is not an fsync policy: use `always`, `every:<milliseconds>` (e.g. `every:5`) or `never`")]
pub struct ParseFsyncError(pub String);

impl FromStr for FsyncPolicy {
    type Err = ParseFsyncError;

    fn from_str(text: &str) -> Result<FsyncPolicy, ParseFsyncError> {
        let trimmed = text.trim();
        match trimmed.to_ascii_lowercase().as_str() {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            other => other
                .strip_prefix("every:")
                .and_then(|ms| ms.trim().parse::<u64>().ok())
                .map(|interval_ms| FsyncPolicy::Every { interval_ms })
                .ok_or_else(|| ParseFsyncError(text.to_owned())),
        }
    }
}

/// Where queued messages live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum QueueType {
    /// In memory only: lost when the process stops. stompserver's default; ours is `file`.
    Memory,
    /// In the per-shard segmented log under the data directory.
    #[default]
    File,
}

impl fmt::Display for QueueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QueueType::Memory => "memory",
            QueueType::File => "file",
        })
    }
}

/// Why a text is not a queue type. stompserver's other back ends get their own variant so the
/// message can say what to use instead.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ParseQueueTypeError {
    #[error(
        "stompserver's `{0}` queue type is not supported by stompd: use `file` (the durable \
         log, the default) or `memory`"
    )]
    StompserverOnly(String),
    #[error("`{0}` is not a queue type: use `file` (the durable log, the default) or `memory`")]
    Unknown(String),
}

impl FromStr for QueueType {
    type Err = ParseQueueTypeError;

    fn from_str(text: &str) -> Result<QueueType, ParseQueueTypeError> {
        match text.trim().to_ascii_lowercase().as_str() {
            "memory" => Ok(QueueType::Memory),
            "file" => Ok(QueueType::File),
            "dbm" | "activerecord" => Err(ParseQueueTypeError::StompserverOnly(text.to_owned())),
            _ => Err(ParseQueueTypeError::Unknown(text.to_owned())),
        }
    }
}

/// Serde through `Display`/`FromStr`, so TOML accepts the same words as flags.
macro_rules! serde_via_str {
    ($ty:ty) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<$ty, D::Error> {
                let text = String::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

serde_via_str!(FsyncPolicy);
serde_via_str!(QueueType);

#[cfg(test)]
mod tests {
    #[test]
    fn every_valid_policy_converts_to_the_log_policy_with_the_same_text() {
        for text in ["always", "never", "every:1", "every:250", "every:60000"] {
            let ours: super::FsyncPolicy = text.parse().unwrap();
            let log: crate::log::FsyncPolicy = ours.into();
            assert_eq!(log.to_string(), text);
            assert_eq!(text.parse::<crate::log::FsyncPolicy>().unwrap(), log);
        }
    }

    use super::*;

    #[test]
    fn fsync_policy_text_round_trips() {
        for policy in [
            FsyncPolicy::Always,
            FsyncPolicy::Never,
            FsyncPolicy::Every { interval_ms: 1 },
            FsyncPolicy::Every { interval_ms: 250 },
        ] {
            assert_eq!(policy.to_string().parse::<FsyncPolicy>(), Ok(policy));
        }
        assert_eq!("ALWAYS".parse(), Ok(FsyncPolicy::Always));
        assert_eq!(
            " every: 5 ".parse(),
            Ok(FsyncPolicy::Every { interval_ms: 5 })
        );
    }

    #[test]
    fn fsync_policy_rejects_other_words() {
        for text in [
            "",
            "sometimes",
            "every",
            "every:",
            "every:-1",
            "every:5ms",
            "always:1",
        ] {
            let error = text.parse::<FsyncPolicy>().unwrap_err();
            assert!(
                error.to_string().contains("every:<milliseconds>"),
                "{error}"
            );
        }
    }

    #[test]
    fn queue_type_parses_ours_and_explains_stompservers() {
        assert_eq!("memory".parse(), Ok(QueueType::Memory));
        assert_eq!("File".parse(), Ok(QueueType::File));
        for text in ["dbm", "activerecord"] {
            let error = text.parse::<QueueType>().unwrap_err();
            assert_eq!(error, ParseQueueTypeError::StompserverOnly(text.into()));
            assert!(error.to_string().contains("use `file`"), "{error}");
        }
        assert_eq!(
            "disk".parse::<QueueType>(),
            Err(ParseQueueTypeError::Unknown("disk".into()))
        );
    }

    #[test]
    fn serde_uses_the_same_words() {
        #[derive(Deserialize, Serialize, PartialEq, Debug)]
        struct Doc {
            fsync: FsyncPolicy,
            queue_type: QueueType,
        }
        let doc: Doc = toml::from_str("fsync = \"every:20\"\nqueue_type = \"memory\"").unwrap();
        assert_eq!(
            doc,
            Doc {
                fsync: FsyncPolicy::Every { interval_ms: 20 },
                queue_type: QueueType::Memory
            }
        );
        let text = toml::to_string(&doc).unwrap();
        assert_eq!(toml::from_str::<Doc>(&text).unwrap(), doc);
        let error = toml::from_str::<Doc>("fsync = \"often\"\nqueue_type = \"file\"").unwrap_err();
        assert!(error.to_string().contains("not an fsync policy"), "{error}");
    }
}
