//! `stompd-log stats`: per destination, what is on disk and what is still owed to consumers.

use std::collections::BTreeMap;
use std::io::Write;

use serde_json::json;
use stompd::log::RecordView;

use crate::cli::{Format, StatsArgs};
use crate::render;
use crate::source::resolve;

/// One destination's numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestinationStats {
    /// Message records on disk.
    pub messages: u64,
    /// Their body bytes.
    pub bytes: u64,
    /// Of them, named by an ack record.
    pub acked: u64,
    /// Of them, not acked: what the broker delivers after a restart.
    pub pending: u64,
    /// Of the pending ones, delivered at least once (they come back marked redelivered).
    pub redelivered: u64,
}

/// Per destination (bytes as stored), over every shard of `args`.
pub fn collect(args: &StatsArgs) -> anyhow::Result<BTreeMap<Vec<u8>, DestinationStats>> {
    let mut stats: BTreeMap<Vec<u8>, DestinationStats> = BTreeMap::new();
    for source in resolve(&args.source.path, args.source.shard)? {
        let inspection = source.inspect()?;
        for record in inspection.records() {
            let RecordView::Message(m) = record.record else {
                continue;
            };
            if !source.wants(record.position.segment) {
                continue;
            }
            let entry = match stats.get_mut(m.destination) {
                Some(entry) => entry,
                None => stats.entry(m.destination.to_vec()).or_default(),
            };
            entry.messages += 1;
            entry.bytes += m.body.len() as u64;
            if inspection.is_acked(record.position) {
                entry.acked += 1;
            } else {
                entry.pending += 1;
                if inspection.deliveries(record.position) > 0 {
                    entry.redelivered += 1;
                }
            }
        }
    }
    Ok(stats)
}

pub fn run(args: &StatsArgs, out: &mut dyn Write) -> anyhow::Result<u8> {
    let stats = collect(args)?;
    let mut total = DestinationStats::default();
    for s in stats.values() {
        total.messages += s.messages;
        total.bytes += s.bytes;
        total.acked += s.acked;
        total.pending += s.pending;
        total.redelivered += s.redelivered;
    }
    match args.format {
        Format::Text => {
            let width = stats
                .keys()
                .map(|d| render::text(d).len())
                .max()
                .unwrap_or(0)
                .max("destination".len());
            writeln!(
                out,
                "{:width$} {:>10} {:>14} {:>10} {:>10} {:>11}",
                "destination", "messages", "bytes", "acked", "pending", "redelivered"
            )?;
            let rows = stats
                .iter()
                .map(|(d, s)| (render::text(d), s))
                .chain(std::iter::once(("(total)".to_string(), &total)));
            for (destination, s) in rows {
                writeln!(
                    out,
                    "{destination:width$} {:>10} {:>14} {:>10} {:>10} {:>11}",
                    s.messages, s.bytes, s.acked, s.pending, s.redelivered
                )?;
            }
        }
        Format::Json => {
            for (destination, s) in &stats {
                writeln!(
                    out,
                    "{}",
                    json!({
                        "destination": render::json_text(destination),
                        "messages": s.messages,
                        "bytes": s.bytes,
                        "acked": s.acked,
                        "pending": s.pending,
                        "redelivered": s.redelivered,
                    })
                )?;
            }
        }
    }
    Ok(0)
}
