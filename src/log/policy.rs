//! When the log makes appended records durable: the `--fsync` flag.

use std::fmt;
use std::str::FromStr;

/// The durability policy of a shard's log.
///
/// `Always` is the only policy under which a RECEIPT means "on disk": the broker holds it until
/// a sync covering the record completes. Syncs are grouped: one covers every record appended
/// before it was issued, so the cost (0.2–0.5 ms at p50 on the project machine, see the research
/// note) is paid per batch, not per message. `Every` bounds what a machine crash can lose to the
/// last interval; `Never` leaves it to the kernel's writeback (a process crash loses nothing,
/// since the segments are shared file mappings).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// Sync before each RECEIPT for a persistent message (grouped across connections). The
    /// default: a broker that says "stored" should mean it.
    #[default]
    Always,
    /// Sync at most this many milliseconds after a record is appended.
    Every { interval_ms: u64 },
    /// Never sync; the kernel writes pages back when it chooses.
    Never,
}

impl FsyncPolicy {
    /// Whether a RECEIPT for a stored message must wait for the sync that covers it.
    pub fn receipt_waits_for_sync(self) -> bool {
        self == FsyncPolicy::Always
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

/// Why an `--fsync` value was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid fsync policy {given:?}: expected always, never or every:<milliseconds> (1 to {EVERY_INTERVAL_MS_MAX})")]
pub struct ParsePolicyError {
    given: String,
}

/// The longest `every:` interval accepted. An hour: beyond it the policy is `never` in all but
/// name, and a typo (an extra zero or three) is more likely than intent.
pub const EVERY_INTERVAL_MS_MAX: u64 = 3_600_000;

impl FromStr for FsyncPolicy {
    type Err = ParsePolicyError;

    fn from_str(text: &str) -> Result<FsyncPolicy, ParsePolicyError> {
        let error = || ParsePolicyError {
            given: text.to_owned(),
        };
        match text {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            _ => {
                let ms = text.strip_prefix("every:").ok_or_else(error)?;
                // u64::from_str accepts a leading '+'; a policy string should be plain digits.
                if ms.is_empty() || !ms.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(error());
                }
                let interval_ms: u64 = ms.parse().map_err(|_| error())?;
                if interval_ms == 0 || interval_ms > EVERY_INTERVAL_MS_MAX {
                    return Err(error());
                }
                Ok(FsyncPolicy::Every { interval_ms })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms_and_prints_them_back() {
        for text in ["always", "never", "every:1", "every:250", "every:3600000"] {
            let policy: FsyncPolicy = text.parse().unwrap();
            assert_eq!(policy.to_string(), text);
        }
        assert_eq!(
            "every:5".parse::<FsyncPolicy>().unwrap(),
            FsyncPolicy::Every { interval_ms: 5 }
        );
    }

    #[test]
    fn refuses_malformed_policies() {
        for text in [
            "",
            "Always",
            "every",
            "every:",
            "every:0",
            "every:+5",
            "every:-5",
            "every:5ms",
            "every:3600001",
            "sometimes",
            " always",
        ] {
            assert!(
                text.parse::<FsyncPolicy>().is_err(),
                "{text:?} was accepted"
            );
        }
    }

    #[test]
    fn only_always_holds_receipts() {
        assert!(FsyncPolicy::Always.receipt_waits_for_sync());
        assert!(!FsyncPolicy::Never.receipt_waits_for_sync());
        assert!(!FsyncPolicy::Every { interval_ms: 10 }.receipt_waits_for_sync());
    }
}
