//! `stompd-log replay`: re-publishes stored messages to any STOMP broker, each SEND with a
//! receipt, keeping at most `--window` unconfirmed, and says what was sent and confirmed.
//!
//! A message is replayed with its stored headers, minus those the receiving broker assigns or
//! that belong to the original connection ([`DROPPED_HEADERS`]), to its stored destination or
//! the `--rename` target. Messages go out in log order per shard; a destination lives on one
//! shard, so each destination's messages keep the order they were sent in. The snapshot is
//! taken before the first SEND, so replaying into the very broker whose directory is read
//! cannot chase its own tail.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use stompd::client::{error_of, ClientError, ConnectOptions, Connection};
use stompd::codec::{Command, FrameWriter, Version};
use stompd::log::format::MessageView;
use stompd::log::inspect::InspectedRecord;
use stompd::log::{RecordView, ShardInspection};

use crate::cli::{Format, ReplayArgs};
use crate::render;
use crate::source::{resolve, ShardSource};

/// Stored headers not replayed: the receiving broker assigns `message-id` (and `subscription`,
/// `ack`, `redelivered` on delivery); `destination`, `receipt` and `content-length` are written
/// afresh for each SEND; a `transaction` of the original connection does not exist on ours.
pub const DROPPED_HEADERS: &[&[u8]] = &[
    b"destination",
    b"message-id",
    b"subscription",
    b"ack",
    b"redelivered",
    b"receipt",
    b"receipt-id",
    b"transaction",
    b"content-length",
];

/// How often a wait for receipts wakes up to check its deadline.
const RECEIPT_POLL: Duration = Duration::from_millis(100);

/// How long DISCONNECT may take to be confirmed once every SEND was.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Writes the SEND that replays `message` to `destination`.
pub fn write_send(
    out: &mut Vec<u8>,
    version: Version,
    destination: &[u8],
    message: &MessageView<'_>,
    receipt: &[u8],
) {
    let mut frame = FrameWriter::begin(out, version, Command::Send);
    frame.header(b"destination", destination);
    for (name, value) in message.headers() {
        if !DROPPED_HEADERS.contains(&&*name) {
            frame.header(&name, &value);
        }
    }
    frame.header(b"receipt", receipt);
    // Always: a body may hold NUL bytes.
    frame.content_length(message.body.len());
    frame.finish(message.body);
}

/// Whether a SEND in `version` can carry `message` to `destination` unchanged. STOMP 1.0 has
/// no header escaping (STOMP 1.1 "Value Encoding" added it), so there a header line cannot
/// hold a newline, nor a header name a colon; such a message is not sent rather than sent
/// altered.
pub fn representable(version: Version, destination: &[u8], message: &MessageView<'_>) -> bool {
    if version != Version::V1_0 {
        return true;
    }
    let line_safe = |bytes: &[u8]| !bytes.contains(&b'\n');
    line_safe(destination)
        && message
            .headers()
            .filter(|(name, _)| !DROPPED_HEADERS.contains(&&**name))
            .all(|(name, value)| line_safe(&name) && !name.contains(&b':') && line_safe(&value))
}

/// Counts for one destination (as it is published, after `--rename`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Messages the filters kept.
    pub selected: u64,
    /// SENDs written to the broker.
    pub sent: u64,
    /// SENDs the broker confirmed with a RECEIPT.
    pub confirmed: u64,
    /// Not sent: the broker's STOMP version cannot carry the message unchanged.
    pub unsendable: u64,
}

pub fn run(args: &ReplayArgs, out: &mut dyn Write) -> anyhow::Result<u8> {
    anyhow::ensure!(args.window > 0, "--window must be at least 1");
    if let Some(rate) = args.rate {
        anyhow::ensure!(rate > 0.0 && rate.is_finite(), "--rate must be positive");
    }
    anyhow::ensure!(
        args.receipt_timeout > 0.0 && args.receipt_timeout.is_finite(),
        "--receipt-timeout must be positive"
    );
    let (host, port) = args
        .to
        .rsplit_once(':')
        .and_then(|(host, port)| Some((host.trim_matches(['[', ']']), port.parse().ok()?)))
        .with_context(|| format!("--to {:?}: expected HOST:PORT", args.to))?;

    let shards: Vec<(ShardSource, ShardInspection)> =
        resolve(&args.source.path, args.source.shard)?
            .into_iter()
            .map(|source| source.inspect().map(|inspection| (source, inspection)))
            .collect::<anyhow::Result<_>>()?;
    let renames: HashMap<&[u8], &[u8]> = args
        .rename
        .iter()
        .map(|(from, to)| (from.as_bytes(), to.as_bytes()))
        .collect();
    let selected = |inspection: &ShardInspection, record| select(args, inspection, record);
    let mut counts: BTreeMap<Vec<u8>, Counts> = BTreeMap::new();
    for (_, inspection) in &shards {
        for record in inspection.records() {
            if let Some(m) = selected(inspection, record) {
                let target = renames.get(m.destination).copied().unwrap_or(m.destination);
                counts.entry(target.to_vec()).or_default().selected += 1;
            }
        }
    }
    let total: u64 = counts.values().map(|c| c.selected).sum();

    let progress = if std::io::stderr().is_terminal() {
        ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} confirmed, {per_sec}, {elapsed} elapsed, eta {eta}",
        )
        .expect("a valid template"),
    );

    let mut options = ConnectOptions::local(port);
    options.host = host.to_string();
    options.login = args.login.clone();
    options.passcode = args.passcode.clone();
    options.vhost = args.vhost.clone();
    options.read_buffer_bytes = 64 * 1024;
    let connection =
        Connection::connect(&options).with_context(|| format!("connecting to {}", args.to))?;
    let server = connection.server().unwrap_or("unknown").to_string();
    let version = connection.version();

    let mut replay = Replay {
        connection,
        in_flight: HashMap::new(),
        counts,
        receipt_timeout: Duration::from_secs_f64(args.receipt_timeout),
        progress,
    };
    let started = Instant::now();
    let mut index = 0u64;
    let mut receipt = Vec::with_capacity(32);
    let outcome: Result<(), ClientError> = (|| {
        for (_, inspection) in &shards {
            for record in inspection.records() {
                let Some(m) = selected(inspection, record) else {
                    continue;
                };
                let target = renames.get(m.destination).copied().unwrap_or(m.destination);
                if !representable(version, target, &m) {
                    replay.counts.get_mut(target).expect("counted").unsendable += 1;
                    continue;
                }
                if let Some(rate) = args.rate {
                    let due = started + Duration::from_secs_f64(index as f64 / rate);
                    let now = Instant::now();
                    if due > now {
                        replay.connection.flush()?;
                        std::thread::sleep(due - now);
                    }
                }
                while replay.in_flight.len() >= args.window {
                    replay.await_receipts()?;
                }
                receipt.clear();
                write!(receipt, "replay-{index}").expect("writing to a Vec");
                write_send(&mut replay.connection.out, version, target, &m, &receipt);
                replay.in_flight.insert(index, target.to_vec());
                replay.counts.get_mut(target).expect("counted").sent += 1;
                index += 1;
                replay.connection.flush_if_full()?;
            }
        }
        replay.connection.flush()?;
        while !replay.in_flight.is_empty() {
            replay.await_receipts()?;
        }
        replay.connection.disconnect(DISCONNECT_TIMEOUT)
    })();
    replay.progress.finish_and_clear();
    let outcome = outcome.map_err(|error| replay.connection.explain(error));

    let sum = |f: fn(&Counts) -> u64| replay.counts.values().map(f).sum::<u64>();
    let (sent, confirmed) = (sum(|c| c.sent), sum(|c| c.confirmed));
    let unsendable = sum(|c| c.unsendable);
    let elapsed = started.elapsed().as_secs_f64();
    match args.format {
        Format::Text => {
            writeln!(
                out,
                "replay to {} ({server}, STOMP {}): {total} selected, {sent} sent, {confirmed} \
                 confirmed in {elapsed:.1} s",
                args.to,
                version.as_str()
            )?;
            for (destination, c) in &replay.counts {
                writeln!(
                    out,
                    "  {}: {} selected, {} sent, {} confirmed",
                    render::text(destination),
                    c.selected,
                    c.sent,
                    c.confirmed
                )?;
            }
            if let Err(error) = &outcome {
                writeln!(out, "stopped: {}", error_chain(error))?;
            }
            if unsendable > 0 {
                writeln!(
                    out,
                    "{unsendable} messages not sent: STOMP {} cannot carry a newline in a \
                     header (or a colon in a header name) unescaped",
                    version.as_str()
                )?;
            }
            if confirmed < total {
                writeln!(
                    out,
                    "NOT CONFIRMED: {} messages ({} sent without a receipt, {} not sent)",
                    total - confirmed,
                    sent - confirmed,
                    total - sent
                )?;
            }
        }
        Format::Json => writeln!(
            out,
            "{}",
            json!({
                "to": args.to,
                "server": server,
                "version": version.as_str(),
                "selected": total,
                "sent": sent,
                "confirmed": confirmed,
                "unsendable": unsendable,
                "seconds": elapsed,
                "error": outcome.as_ref().err().map(error_chain),
                "destinations": replay.counts.iter().map(|(d, c)| json!({
                    "destination": render::json_text(d),
                    "selected": c.selected,
                    "sent": c.sent,
                    "confirmed": c.confirmed,
                    "unsendable": c.unsendable,
                })).collect::<Vec<_>>(),
            })
        )?,
    }
    Ok(if confirmed == total && outcome.is_ok() {
        0
    } else {
        1
    })
}

/// The message of `record` if the filters keep it.
fn select<'a>(
    args: &ReplayArgs,
    inspection: &ShardInspection,
    record: InspectedRecord<'a>,
) -> Option<MessageView<'a>> {
    let RecordView::Message(m) = record.record else {
        return None;
    };
    let wanted = (args.destination.is_empty()
        || args
            .destination
            .iter()
            .any(|d| d.as_bytes() == m.destination))
        // A transient record is never restored, so it is not pending either.
        && (!args.pending_only || !(inspection.is_acked(record.position) || m.is_transient()));
    wanted.then_some(m)
}

fn error_chain(error: &ClientError) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A replay under way.
struct Replay {
    /// The one connection every SEND goes over.
    connection: Connection,
    /// Receipt number -> destination, for SENDs not yet confirmed.
    in_flight: HashMap<u64, Vec<u8>>,
    /// Per destination as published.
    counts: BTreeMap<Vec<u8>, Counts>,
    /// The longest wait for one RECEIPT.
    receipt_timeout: Duration,
    /// Confirmed messages out of the selected ones (hidden unless stderr is a terminal).
    progress: ProgressBar,
}

impl Replay {
    /// Flushes and waits until one RECEIPT for a SEND in flight arrives. It returns at once
    /// with a receipt already buffered, and blocks only when none is: waiting for more than one
    /// would stall the window each time the broker has already confirmed everything sent. An
    /// ERROR frame from the broker ends the replay with its message.
    fn await_receipts(&mut self) -> Result<(), ClientError> {
        self.connection.flush()?;
        self.connection.set_read_timeout(Some(RECEIPT_POLL))?;
        let deadline = Instant::now() + self.receipt_timeout;
        loop {
            let frame = self
                .connection
                .next_frame_timeout(|frame, _| match frame.command {
                    Command::Receipt => Ok(frame
                        .header(b"receipt-id")
                        .and_then(|id| id.strip_prefix(b"replay-"))
                        .and_then(|n| std::str::from_utf8(n).ok()?.parse::<u64>().ok())),
                    Command::Error => Err(error_of(frame)),
                    // Nothing is subscribed; a broker's stray frame is not ours to judge.
                    _ => Ok(None),
                })?;
            match frame {
                Some(Ok(Some(n))) => {
                    if let Some(destination) = self.in_flight.remove(&n) {
                        if let Some(counts) = self.counts.get_mut(&destination) {
                            counts.confirmed += 1;
                        }
                        self.progress.inc(1);
                        return Ok(());
                    }
                }
                Some(Ok(None)) => {}
                Some(Err(error)) => return Err(error),
                None => {
                    if Instant::now() >= deadline {
                        return Err(ClientError::Timeout {
                            waiting_for: "RECEIPT",
                            seconds: self.receipt_timeout.as_secs_f64(),
                        });
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stompd::codec::{Decoded, Decoder, Limits};
    use stompd::log::format::{encode_record, Decoded as LogDecoded, RecordRef};
    use stompd::log::{BinaryId, MessageRecord};

    /// The SEND a stored message becomes: stored headers kept in order, broker-assigned ones
    /// dropped, destination, receipt and content-length written afresh (STOMP 1.2 "SEND").
    #[test]
    fn a_replayed_send_keeps_the_stored_headers_but_not_the_brokers() {
        // A version 3 record stores the block escaped for STOMP 1.2, as the broker holds it.
        let block = b"persistent:true\nmessage-id:ID\\cold-1\ncontent-type:text/plain\n\
            transaction:tx-9\nx-trace:a\\cb\\nc\ncontent-length:999\n";
        let body = b"hello\0world";
        let record = RecordRef::Message(MessageRecord {
            destination: b"/queue/original",
            id: BinaryId { shard: 0, seq: 1 },
            timestamp_ms: 1,
            header_block: block,
            block_plain: false,
            transient: false,
            body,
        });
        let mut bytes = vec![0u8; record.encoded_len()];
        encode_record(&mut bytes, 0, &record);
        let LogDecoded::Record {
            record: RecordView::Message(view),
            ..
        } = stompd::log::format::decode_record(&bytes, 0)
        else {
            panic!("the record decodes");
        };
        let mut out = Vec::new();
        write_send(
            &mut out,
            Version::V1_2,
            b"/queue/renamed",
            &view,
            b"replay-7",
        );
        let mut decoder = Decoder::new(Limits::DEFAULT);
        decoder.set_version(Version::V1_2);
        let Ok(Decoded::Frame { frame, consumed }) = decoder.decode(&out) else {
            panic!("a whole frame");
        };
        assert_eq!(consumed, out.len());
        assert_eq!(frame.command, Command::Send);
        let names: Vec<(&[u8], &[u8])> = frame
            .headers
            .iter()
            .map(|h| (&h.name[..], &h.value[..]))
            .collect();
        assert_eq!(
            names,
            vec![
                (&b"destination"[..], &b"/queue/renamed"[..]),
                (b"persistent", b"true"),
                (b"content-type", b"text/plain"),
                (b"x-trace", b"a:b\nc"),
                (b"receipt", b"replay-7"),
                (b"content-length", b"11"),
            ]
        );
        assert_eq!(frame.body, body);
        // STOMP 1.0 cannot carry the newline in x-trace; 1.1 and 1.2 escape it.
        assert!(!representable(Version::V1_0, b"/queue/renamed", &view));
        assert!(representable(Version::V1_1, b"/queue/renamed", &view));
    }
}
