//! `stompd-log segments`: what each segment file holds and what the broker will do with it.

use std::io::Write;

use serde_json::json;
use stompd::log::inspect::{Damage, RecordKind, SegmentSummary};

use crate::cli::{Format, SegmentsArgs};
use crate::source::resolve;

pub fn run(args: &SegmentsArgs, out: &mut dyn Write) -> anyhow::Result<u8> {
    for source in resolve(&args.source.path, args.source.shard)? {
        let inspection = source.inspect()?;
        if args.format == Format::Text {
            writeln!(
                out,
                "{}: {} segments",
                source.name,
                inspection.segments.len()
            )?;
        }
        for summary in inspection
            .segments
            .iter()
            .filter(|s| source.wants(s.sequence))
        {
            match args.format {
                Format::Text => writeln!(out, "  {}", line(summary))?,
                Format::Json => {
                    let position = |p: Option<(u64, RecordKind)>| {
                        p.map(|(offset, kind)| json!({"offset": offset, "kind": kind.as_str()}))
                    };
                    let object = json!({
                        "shard": source.name,
                        "segment": summary.sequence,
                        "path": summary.path.display().to_string(),
                        "bytes": summary.file_bytes,
                        "data_end": summary.data_end,
                        "records": summary.records,
                        "messages": summary.messages,
                        "acks": summary.acks,
                        "delivered": summary.delivered,
                        "pending": summary.pending,
                        "first": position(summary.first),
                        "last": position(summary.last),
                        "status": summary.status.as_str(),
                        "incomplete": summary.incomplete,
                        "recycled": summary.header.is_some_and(|h| h.is_recycled()),
                        "damage": summary.damage.iter().map(damage_text).collect::<Vec<_>>(),
                    });
                    writeln!(out, "{object}")?;
                }
            }
        }
    }
    Ok(0)
}

fn line(summary: &SegmentSummary) -> String {
    let position = |p: Option<(u64, RecordKind)>| match p {
        Some((offset, kind)) => format!("{}:{offset} {}", summary.sequence, kind.as_str()),
        None => "-".to_string(),
    };
    let mut line = format!(
        "{:020}.seg {} bytes, {} used, {} records ({} messages, {} ack, {} delivered), \
         {} pending, first {}, last {}: {}",
        summary.sequence,
        summary.file_bytes,
        summary.data_end,
        summary.records,
        summary.messages,
        summary.acks,
        summary.delivered,
        summary.pending,
        position(summary.first),
        position(summary.last),
        summary.status.as_str(),
    );
    if summary.header.is_some_and(|h| h.is_recycled()) {
        line.push_str(" (recycled: bytes after its data are leftovers of the file's earlier use)");
    }
    if summary.incomplete {
        line.push_str(" (incomplete: its creation never finished; the broker removes it at start)");
    }
    if !summary.damage.is_empty() {
        line.push_str(&format!(
            " [{} damaged, see stompd-log verify]",
            summary.damage.len()
        ));
    }
    line
}

/// One line describing a damage, as `verify` reports it.
pub fn damage_text(damage: &Damage) -> String {
    match damage {
        Damage::BadHeader(error) => format!("unreadable segment header: {error}"),
        Damage::Misplaced(what) => format!("misplaced segment: {what}"),
        Damage::Record {
            offset,
            bytes,
            error,
        } => format!("offset {offset}: damaged record of {bytes} bytes: {error}"),
        Damage::Tail {
            offset,
            bytes,
            error,
        } => {
            let mut text =
                format!("offset {offset}: torn tail, {bytes} bytes after the last good record");
            if let Some(error) = error {
                text.push_str(&format!(" ({error})"));
            }
            text
        }
    }
}
