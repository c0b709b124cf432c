//! The command line: one subcommand per operator question, each with an example in its help.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Inspect, verify and replay a stompd durable-queue log, read-only.
///
/// DIR is a broker data directory (holding shard-N/ directories) or a single shard directory.
/// Every subcommand only reads (read-only maps), so it is safe on a running broker's
/// directory.
#[derive(Parser, Debug)]
#[command(name = "stompd-log", version, after_help = EXIT_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

const EXIT_HELP: &str = "\
Exit status: 0 when all is well, 1 when something was found wrong (a damaged record, a message
not confirmed by the broker), 2 when the command itself failed (a missing directory, a bad flag).";

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List segments: size, records, first and last record, live/full/reclaimable.
    ///
    /// Each segment: size, record count, first and last record, and whether it is live
    /// (appended to), full (still needed) or reclaimable (the broker deletes it at its next
    /// reclaim).
    #[command(after_help = "\
Example:
  stompd-log segments /var/lib/stompd
  stompd-log segments /var/lib/stompd/shard-0 --format json")]
    Segments(SegmentsArgs),

    /// Print every record, in log order.
    ///
    /// Every record in log order: segment, offset, kind, destination, message id, headers,
    /// body (a printable preview, or all of it with --body full).
    #[command(after_help = "\
Example:
  stompd-log dump /var/lib/stompd --destination /queue/orders --limit 20
  stompd-log dump /var/lib/stompd/shard-0/00000000000000000003.seg --body full --format json

Filters combine: --destination (repeatable) and --pending keep only message records; --from
SEGMENT[:OFFSET] starts at that position in each shard; --limit stops after that many records.")]
    Dump(DumpArgs),

    /// Check every record's framing and CRC; exit 1 if anything is damaged.
    ///
    /// Checks the framing and CRC of every record and reports each damaged one with its segment
    /// and offset. Exit status 1 when anything is damaged, 0 when all is well.
    #[command(after_help = "\
Example:
  stompd-log verify /var/lib/stompd && echo intact

What counts as damage (the rules the broker's recovery uses):
  - a segment header that cannot be read or names another sequence, shard or size;
  - a record whose CRC or layout is wrong, with good records after it (recovery skips it);
  - bytes after the last good record of a segment (a torn tail: recovery cuts it). In a
    recycled segment (format 2: a reused file, whose bytes after its data are leftovers of its
    earlier use) only a missing end marker right after the last good record counts.
A running broker may be writing a record at the end of its live (last) segment. So a tail in
the live segment is read again after --settle-ms: if the data moved on meanwhile it was a
record being written, not damage; if it is still there, unchanged, it is a torn tail.
A segment whose header is all zeros (its creation never finished, or is under way) is listed
as incomplete, not damage: nothing in it was ever durable and the broker removes it at start.")]
    Verify(VerifyArgs),

    /// Per destination: messages, bytes, acked, still pending.
    ///
    /// Per destination: messages on disk, their body bytes, how many are acknowledged and how
    /// many are still pending.
    #[command(after_help = "\
Example:
  stompd-log stats /var/lib/stompd

Counts what is on disk: segments the broker already reclaimed (fully acknowledged) are gone,
with their messages.")]
    Stats(StatsArgs),

    /// Re-publish messages to any STOMP broker, with receipts.
    ///
    /// Re-publishes messages (all, or only the pending ones) to any STOMP broker, stompd or
    /// ActiveMQ alike, each SEND with a receipt, and reports what was sent and confirmed.
    #[command(after_help = "\
Example:
  stompd-log replay /var/lib/stompd --to broker2:61613 --pending-only
  stompd-log replay /backup/stompd --to 127.0.0.1:61613 --destination /queue/orders \\
      --rename /queue/orders=/queue/orders-replayed --rate 500

Each message keeps its stored headers except those the receiving broker assigns or that make no
sense on a new connection (message-id, destination, subscription, ack, receipt, transaction,
content-length, redelivered); its destination is the stored one, or the --rename target.
Messages go out in log order (per destination, the order they were sent), at most --window
unconfirmed at a time. Exit status 1 if any message was not confirmed by a RECEIPT.")]
    Replay(ReplayArgs),
}

/// Which log to read.
#[derive(Args, Debug, Clone)]
pub struct Source {
    /// A data directory (with shard-N/ inside) or one shard's directory.
    #[arg(value_name = "DIR")]
    pub path: PathBuf,
    /// Only this shard of a data directory.
    #[arg(long, value_name = "N")]
    pub shard: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Lines for people.
    Text,
    /// One JSON object per line, for jq and scripts.
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BodyMode {
    /// The first bytes, non-printable ones escaped.
    Preview,
    /// All of it (JSON: a string if it is UTF-8, else `body_hex`).
    Full,
    /// Only its length.
    None,
}

#[derive(Args, Debug)]
pub struct SegmentsArgs {
    #[command(flatten)]
    pub source: Source,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

#[derive(Args, Debug)]
pub struct DumpArgs {
    /// A data directory, a shard directory, or one segment file (NNNNNNNNNNNNNNNNNNNN.seg).
    #[arg(value_name = "DIR|SEGMENT")]
    pub path: PathBuf,
    /// Only this shard of a data directory.
    #[arg(long, value_name = "N")]
    pub shard: Option<u32>,
    /// Only messages to this destination (repeatable).
    #[arg(long, value_name = "DESTINATION")]
    pub destination: Vec<String>,
    /// Only messages no ack record names.
    #[arg(long)]
    pub pending: bool,
    /// Start at this position: SEGMENT or SEGMENT:OFFSET (in each shard).
    #[arg(long, value_name = "SEGMENT[:OFFSET]", value_parser = parse_position)]
    pub from: Option<stompd::log::Position>,
    /// Stop after this many records.
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
    /// How much of each body to show.
    #[arg(long, value_enum, default_value = "preview")]
    pub body: BodyMode,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub source: Source,
    /// How long to wait before reading a damaged-looking tail of a live segment again.
    #[arg(long, value_name = "MS", default_value_t = 200)]
    pub settle_ms: u64,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    #[command(flatten)]
    pub source: Source,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

#[derive(Args, Debug)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub source: Source,
    /// The broker to publish to.
    #[arg(long, value_name = "HOST:PORT", env = "STOMPD_LOG_REPLAY_TO")]
    pub to: String,
    /// Only messages no ack record names (what the broker would still deliver).
    #[arg(long)]
    pub pending_only: bool,
    /// Only messages to this destination (repeatable; matched before --rename).
    #[arg(long, value_name = "DESTINATION")]
    pub destination: Vec<String>,
    /// Publish messages stored for FROM to TO instead (repeatable, exact names).
    #[arg(long, value_name = "FROM=TO", value_parser = parse_rename)]
    pub rename: Vec<(String, String)>,
    /// At most this many messages per second (default: as fast as receipts allow).
    #[arg(long, value_name = "PER_SECOND")]
    pub rate: Option<f64>,
    /// At most this many messages sent and not yet confirmed by a RECEIPT.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub window: usize,
    /// Give up when no RECEIPT arrives for this long.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    pub receipt_timeout: f64,
    /// The CONNECT `login` header.
    #[arg(long, env = "STOMPD_LOG_REPLAY_LOGIN")]
    pub login: Option<String>,
    /// The CONNECT `passcode` header (prefer the environment variable: flags show in `ps`).
    #[arg(long, env = "STOMPD_LOG_REPLAY_PASSCODE", hide_env_values = true)]
    pub passcode: Option<String>,
    /// The CONNECT `host` header (a virtual host to RabbitMQ).
    #[arg(long, default_value = "/")]
    pub vhost: String,
    /// Summary format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

/// `SEGMENT` or `SEGMENT:OFFSET`.
pub fn parse_position(text: &str) -> Result<stompd::log::Position, String> {
    let (segment, offset) = match text.split_once(':') {
        Some((segment, offset)) => (segment, offset),
        None => (text, "0"),
    };
    let number = |part: &str| {
        part.parse::<u64>()
            .map_err(|_| format!("{text:?}: expected SEGMENT or SEGMENT:OFFSET (decimal)"))
    };
    Ok(stompd::log::Position {
        segment: number(segment)?,
        offset: number(offset)?,
    })
}

/// `FROM=TO`.
pub fn parse_rename(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((from, to)) if !from.is_empty() && !to.is_empty() => {
            Ok((from.to_string(), to.to_string()))
        }
        _ => Err(format!("{text:?}: expected FROM=TO")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_subcommand_help_has_an_example() {
        let mut command = Cli::command();
        for sub in command.get_subcommands_mut() {
            let help = sub.render_long_help().to_string();
            assert!(
                help.contains("Example:\n  stompd-log "),
                "{}: {help}",
                sub.get_name()
            );
        }
    }

    #[test]
    fn positions_and_renames_parse() {
        use stompd::log::Position;
        assert_eq!(
            parse_position("3:4096"),
            Ok(Position {
                segment: 3,
                offset: 4096
            })
        );
        assert_eq!(
            parse_position("7"),
            Ok(Position {
                segment: 7,
                offset: 0
            })
        );
        assert!(parse_position("x:1").is_err());
        assert_eq!(
            parse_rename("/queue/a=/queue/b"),
            Ok(("/queue/a".into(), "/queue/b".into()))
        );
        assert!(parse_rename("/queue/a").is_err());
        assert!(parse_rename("=/queue/b").is_err());
    }
}
