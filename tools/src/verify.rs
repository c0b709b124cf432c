//! `stompd-log verify`: every record's framing and CRC checked, every damage reported with its
//! segment and offset.
//!
//! The rule for a running broker: it appends only at the end of its live segment, writing a
//! record's framing after the rest, so a reader usually sees a record being written as the end
//! of the data; but it can catch one half-written, which looks exactly like a torn tail. So a
//! tail in the live part of a shard (the last segment holding records, and any empty segment
//! after it) is read again after `--settle-ms`: it is damage only if it is still there, at the
//! same offset. A broker that was writing has moved on by then (the record is complete, so the
//! data reaches past that offset); a torn tail left by a crash stays until the broker's next
//! start cuts it. Damage anywhere else is reported at once.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use stompd::log::inspect::{Damage, SegmentSummary};
use stompd::log::{LogError, SegmentReader};

use crate::cli::{Format, VerifyArgs};
use crate::segments::damage_text;
use crate::source::resolve;

pub fn run(args: &VerifyArgs, out: &mut dyn Write) -> anyhow::Result<u8> {
    let mut damaged_total = 0u64;
    for source in resolve(&args.source.path, args.source.shard)? {
        let mut inspection = source.inspect()?;
        let live_from = live_from(&inspection.segments);
        let mut settled = false;
        let mut in_progress = Vec::new();
        for summary in inspection.segments.iter_mut() {
            if summary.sequence < live_from {
                continue;
            }
            let Some(offset) = tail_offset(summary) else {
                continue;
            };
            if !settled {
                std::thread::sleep(Duration::from_millis(args.settle_ms));
                settled = true;
            }
            let again = rescan(&summary.path, summary.sequence, source_shard(&source.dir))?;
            if !tail_persists(offset, again.as_ref()) {
                summary.damage.retain(|d| !matches!(d, Damage::Tail { .. }));
                in_progress.push((summary.sequence, offset));
            }
        }
        let mut records = 0;
        let mut segments = 0;
        for summary in inspection
            .segments
            .iter()
            .filter(|s| source.wants(s.sequence))
        {
            segments += 1;
            records += summary.records;
            for damage in &summary.damage {
                damaged_total += 1;
                match args.format {
                    Format::Text => writeln!(
                        out,
                        "{}/{:020}.seg: {}",
                        source.name,
                        summary.sequence,
                        damage_text(damage)
                    )?,
                    Format::Json => writeln!(
                        out,
                        "{}",
                        json!({
                            "shard": source.name,
                            "segment": summary.sequence,
                            "offset": damage.offset(),
                            "damage": damage_kind(damage),
                            "detail": damage_text(damage),
                        })
                    )?,
                }
            }
        }
        let incomplete: Vec<u64> = inspection
            .segments
            .iter()
            .filter(|s| source.wants(s.sequence) && s.incomplete)
            .map(|s| s.sequence)
            .collect();
        let cut_files = cut_files(&source.dir)?;
        let damaged = inspection
            .segments
            .iter()
            .filter(|s| source.wants(s.sequence))
            .map(|s| s.damage.len())
            .sum::<usize>();
        match args.format {
            Format::Text => {
                for summary in &incomplete {
                    writeln!(
                        out,
                        "{}/{:020}.seg: incomplete segment (its creation never finished, nothing \
                         in it was durable; the broker removes it at start): not damage",
                        source.name, summary
                    )?;
                }
                for file in &cut_files {
                    writeln!(
                        out,
                        "{}/{file}: a tail cut by an earlier recovery, kept as evidence (remove \
                         it after inspection)",
                        source.name
                    )?;
                }
                for (sequence, offset) in &in_progress {
                    writeln!(
                        out,
                        "{}/{sequence:020}.seg: offset {offset}: a record was being written \
                         (the data moved on when read again): not damage",
                        source.name
                    )?;
                }
                writeln!(
                    out,
                    "{}: {segments} segments, {records} records checked: {}",
                    source.name,
                    if damaged == 0 {
                        "intact".to_string()
                    } else {
                        format!("{damaged} damaged")
                    }
                )?;
            }
            Format::Json => writeln!(
                out,
                "{}",
                json!({
                    "shard": source.name,
                    "segments": segments,
                    "records": records,
                    "damaged": damaged,
                    "incomplete": incomplete,
                    "cut_files": cut_files,
                    "in_progress": in_progress
                        .iter()
                        .map(|(s, o)| json!({"segment": s, "offset": o}))
                        .collect::<Vec<_>>(),
                })
            )?,
        }
    }
    Ok(if damaged_total == 0 { 0 } else { 1 })
}

/// Files recovery left beside the segments (`<segment>.seg.cut-<offset>`), by name.
fn cut_files(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let name = entry?.file_name();
        if let Some(name) = name.to_str().filter(|n| n.contains(".seg.cut-")) {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

fn source_shard(dir: &Path) -> Option<u32> {
    stompd::log::inspect::shard_number(dir)
}

/// The first segment of the live part: the last one holding records (a spare segment prepared
/// ahead may follow it, empty).
pub fn live_from(segments: &[SegmentSummary]) -> u64 {
    segments
        .iter()
        .rev()
        .find(|s| s.records > 0)
        .or(segments.last())
        .map_or(u64::MAX, |s| s.sequence)
}

fn tail_offset(summary: &SegmentSummary) -> Option<u64> {
    summary.damage.iter().find_map(|d| match d {
        Damage::Tail { offset, .. } => Some(*offset),
        _ => None,
    })
}

/// Whether a tail seen at `offset` is still there when the segment is read again (`None`: the
/// segment is gone, so is its tail).
pub fn tail_persists(offset: u64, again: Option<&SegmentSummary>) -> bool {
    again.is_some_and(|again| tail_offset(again) == Some(offset))
}

fn rescan(
    path: &Path,
    sequence: u64,
    shard: Option<u32>,
) -> anyhow::Result<Option<SegmentSummary>> {
    match SegmentReader::open(sequence, path) {
        Ok(reader) => {
            let summary = SegmentSummary::scan(&reader, path, shard);
            // Reused for a new segment meanwhile: gone, like a deleted one.
            Ok((!reader.reused_since_open()).then_some(summary))
        }
        Err(LogError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(None)
        }
        Err(error) => Err(error.into()),
    }
}

fn damage_kind(damage: &Damage) -> &'static str {
    match damage {
        Damage::BadHeader(_) => "bad_header",
        Damage::Misplaced(_) => "misplaced",
        Damage::Record { .. } => "record",
        Damage::Tail { .. } => "tail",
    }
}
