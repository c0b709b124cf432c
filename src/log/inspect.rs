//! Read-only inspection of a shard's log, for the `stompd-log` tool: what each segment holds,
//! what is damaged and where, which messages are acknowledged, which segments the broker would
//! reclaim.
//!
//! It reads with [`SegmentReader`] (read-only maps) and classifies with the same scanner and
//! the same rules as recovery ([`super::shard`]): a damaged record followed by a good one is
//! [`Damage::Record`] (recovery skips it), anything after the last good record is
//! [`Damage::Tail`] (recovery cuts it in the last segment; in a recycled segment only when no
//! end marker follows the last good record, the leftovers behind one being no damage), and which
//! segments may be deleted comes from [`reclaimable_segments`], the function
//! `ShardLog::reclaim` uses. It never writes, so it is safe on a live broker's directory; a
//! snapshot is bounded by what each segment held when it was first scanned (`data_end`), so a
//! second pass over the same readers sees the same records even while the broker appends,
//! except from a segment whose file the broker reused meanwhile (recycling, after reclaiming
//! it), which is left out like a deleted one. Knows no clocks: telling a record being written
//! from a torn one (read again later) is the caller's business.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use super::error::LogError;
use super::format::{
    ends_data_at, FormatError, Position, RecordView, ScanItem, SegmentHeader, FRAME_BYTES,
};
use super::segment::{list_segments, SegmentReader};
use super::shard::reclaimable_segments;

/// The shard directories (`shard-N`, N decimal) under a broker's data directory, by shard.
pub fn list_shards(data_dir: &Path) -> Result<Vec<(u32, PathBuf)>, LogError> {
    let mut found = Vec::new();
    let entries = fs::read_dir(data_dir).map_err(|e| LogError::io(data_dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| LogError::io(data_dir, e))?;
        if let Some(shard) = shard_number(&entry.path()) {
            if entry.path().is_dir() {
                found.push((shard, entry.path()));
            }
        }
    }
    found.sort_unstable_by_key(|&(shard, _)| shard);
    Ok(found)
}

/// The shard number of a directory named `shard-N`, as [`super::shard_dir`] names them.
pub fn shard_number(dir: &Path) -> Option<u32> {
    let digits = dir.file_name()?.to_str()?.strip_prefix("shard-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Where a segment stands, as the broker sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentStatus {
    /// The last segment: the one the broker appends to (or a spare prepared ahead, still empty).
    Live,
    /// An earlier segment that still holds something needed: a pending message, or acks whose
    /// messages' segments are still there.
    Full,
    /// An earlier segment the broker deletes at its next reclaim.
    Reclaimable,
}

impl SegmentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SegmentStatus::Live => "live",
            SegmentStatus::Full => "full",
            SegmentStatus::Reclaimable => "reclaimable",
        }
    }
}

/// Something wrong in a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Damage {
    /// The segment header cannot be read, so none of its records can.
    BadHeader(FormatError),
    /// The header names another sequence, shard or size than the file's name, directory or
    /// length (recovery refuses to start on it).
    Misplaced(String),
    /// A damaged record with a good record after it: recovery skips it and keeps the rest.
    Record {
        offset: u64,
        bytes: u64,
        error: FormatError,
    },
    /// Bytes after the last good record that are not zeros (in a recycled segment: that are not
    /// an end marker): a torn tail (recovery cuts it in the last segment), or, in the live
    /// segment of a running broker, a record being written.
    Tail {
        offset: u64,
        /// From `offset` through the last non-zero byte; in a recycled segment, through where the
        /// scan stopped (at least the 16 bytes that were not an end marker), since the leftovers
        /// of the file's earlier use follow.
        bytes: u64,
        /// Why the scan stopped there; `None` for non-zero bytes after a zero length.
        error: Option<FormatError>,
    },
}

impl Damage {
    /// The offset in the segment the damage starts at (0 for the header).
    pub fn offset(&self) -> u64 {
        match self {
            Damage::BadHeader(_) | Damage::Misplaced(_) => 0,
            Damage::Record { offset, .. } | Damage::Tail { offset, .. } => *offset,
        }
    }
}

/// The kind of a record, for listings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    Message,
    Ack,
    Delivered,
}

impl RecordKind {
    pub fn of(record: &RecordView<'_>) -> RecordKind {
        match record {
            RecordView::Message(_) => RecordKind::Message,
            RecordView::Ack(_) => RecordKind::Ack,
            RecordView::Delivered(_) => RecordKind::Delivered,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Message => "message",
            RecordKind::Ack => "ack",
            RecordKind::Delivered => "delivered",
        }
    }
}

/// What one segment held when it was scanned.
#[derive(Clone, Debug)]
pub struct SegmentSummary {
    /// Sequence number, from the file name (it seeds every record's CRC).
    pub sequence: u64,
    /// The segment file.
    pub path: PathBuf,
    /// Length of the file.
    pub file_bytes: u64,
    /// The header, if it could be read.
    pub header: Option<SegmentHeader>,
    /// Good records, and of them messages, ack records and delivered records.
    pub records: u64,
    pub messages: u64,
    pub acks: u64,
    pub delivered: u64,
    /// Offset and kind of the first and last good record.
    pub first: Option<(u64, RecordKind)>,
    pub last: Option<(u64, RecordKind)>,
    /// End of the last good record: where the broker appends next in the live segment.
    pub data_end: u64,
    /// Messages of this segment no ack record of the shard names.
    pub pending: u64,
    pub damage: Vec<Damage>,
    pub status: SegmentStatus,
    /// Segments this segment's ack and delivered records point into.
    pub refs: BTreeSet<u64>,
    /// A segment whose creation never finished (header all zeros): not damage, nothing in it
    /// was ever durable; recovery removes it, and on a live broker it is being created.
    pub incomplete: bool,
}

impl SegmentSummary {
    /// Scans one segment (the header, every record, the bytes after the data) on its own; the
    /// shard-wide fields (`pending`, `status`) are filled in by [`ShardInspection::read`].
    /// `shard`: the shard its directory says it belongs to, when known.
    pub fn scan(reader: &SegmentReader, path: &Path, shard: Option<u32>) -> SegmentSummary {
        let sequence = reader.sequence();
        let mut summary = SegmentSummary {
            sequence,
            path: path.to_owned(),
            file_bytes: reader.file_bytes(),
            header: None,
            records: 0,
            messages: 0,
            acks: 0,
            delivered: 0,
            first: None,
            last: None,
            data_end: super::format::SEGMENT_HEADER_BYTES as u64,
            pending: 0,
            damage: Vec::new(),
            status: SegmentStatus::Full,
            refs: BTreeSet::new(),
            incomplete: false,
        };
        let header = match reader.header() {
            Ok(header) => *header,
            Err(_) if reader.is_blank() => {
                summary.incomplete = true;
                return summary;
            }
            Err(error) => {
                summary.damage.push(Damage::BadHeader(error.clone()));
                return summary;
            }
        };
        summary.header = Some(header);
        let misplaced = if header.sequence != sequence {
            Some(format!("header says sequence {}", header.sequence))
        } else if shard.is_some_and(|shard| shard != header.shard) {
            Some(format!(
                "header says shard {}, its directory is shard {}",
                header.shard,
                shard.unwrap_or_default()
            ))
        } else if header.segment_bytes != summary.file_bytes {
            Some(format!(
                "header says {} bytes, the file has {}",
                header.segment_bytes, summary.file_bytes
            ))
        } else {
            None
        };
        if let Some(what) = misplaced {
            summary.damage.push(Damage::Misplaced(what));
        }
        let mut damaged: Vec<(u64, u64, FormatError)> = Vec::new();
        let mut stop: Option<(u64, FormatError)> = None;
        let mut scan = reader.scan();
        for item in &mut scan {
            match item {
                ScanItem::Record {
                    offset,
                    len,
                    record,
                } => {
                    let kind = RecordKind::of(&record);
                    summary.records += 1;
                    summary.first.get_or_insert((offset, kind));
                    summary.last = Some((offset, kind));
                    summary.data_end = offset + len;
                    match record {
                        RecordView::Message(_) => summary.messages += 1,
                        RecordView::Ack(list) | RecordView::Delivered(list) => {
                            if kind == RecordKind::Ack {
                                summary.acks += 1;
                            } else {
                                summary.delivered += 1;
                            }
                            summary
                                .refs
                                .extend(list.iter().map(|p| p.segment).filter(|&s| s != sequence));
                        }
                    }
                }
                ScanItem::Corrupt { offset, len, error } => damaged.push((offset, len, error)),
                ScanItem::Unframed { offset, error } => stop = Some((offset, error)),
            }
        }
        // Recovery's split: damage before the last good record is a skipped record, everything
        // from the end of the last good record on is the tail.
        let data_end = summary.data_end;
        let mut tail_error = None;
        for (offset, bytes, error) in damaged {
            if offset < data_end {
                summary.damage.push(Damage::Record {
                    offset,
                    bytes,
                    error,
                });
            } else {
                tail_error.get_or_insert(error);
            }
        }
        let tail_error = tail_error.or(stop.map(|(_, error)| error));
        if header.is_recycled() {
            // Recovery's rule for a recycled segment: its data ends at an end marker right after
            // the last good record, and the leftovers behind it are not damage. Without one the
            // tail is torn; what counts is what was examined, as recovery reports it.
            let bytes = reader.bytes();
            if !ends_data_at(bytes, data_end) {
                let segment_end = bytes.len() as u64;
                let examined = scan
                    .offset()
                    .max(data_end + FRAME_BYTES as u64)
                    .min(segment_end);
                summary.damage.push(Damage::Tail {
                    offset: data_end,
                    bytes: examined - data_end,
                    error: tail_error,
                });
            }
        } else if let Some(last_nonzero) = reader.last_nonzero_from(data_end) {
            summary.damage.push(Damage::Tail {
                offset: data_end,
                bytes: last_nonzero - data_end + 1,
                error: tail_error,
            });
        }
        summary
    }

    /// Whether anything in the segment is damaged.
    pub fn is_clean(&self) -> bool {
        self.damage.is_empty()
    }
}

/// A read-only snapshot of one shard directory: every segment scanned, acks and delivered marks
/// collected, statuses worked out. The readers stay open, so the records can be walked again
/// ([`ShardInspection::records`]) even if the broker deletes a segment meanwhile.
#[derive(Debug)]
pub struct ShardInspection {
    /// The shard directory read.
    pub dir: PathBuf,
    /// From the directory's name (`shard-N`), when it has that form.
    pub shard: Option<u32>,
    /// Every segment, in sequence order, as scanned.
    pub segments: Vec<SegmentSummary>,
    /// The read-only maps, one per summary, kept for [`ShardInspection::records`].
    readers: Vec<SegmentReader>,
    /// Positions named by an ack record of the shard.
    acked: HashSet<Position>,
    /// Positions named by delivered records, with how many times.
    deliveries: HashMap<Position, u32>,
}

impl ShardInspection {
    /// Scans every segment of `dir`. A segment the broker deleted between listing and opening
    /// is left out (it was reclaimable); any other I/O error is returned.
    pub fn read(dir: &Path) -> Result<ShardInspection, LogError> {
        let shard = shard_number(dir);
        let mut segments = Vec::new();
        let mut readers = Vec::new();
        for (sequence, path) in list_segments(dir)? {
            let reader = match SegmentReader::open(sequence, &path) {
                Ok(reader) => reader,
                Err(LogError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    continue
                }
                Err(error) => return Err(error),
            };
            let summary = SegmentSummary::scan(&reader, &path, shard);
            if reader.reused_since_open() {
                // Reclaimed and its file reused for a new segment while being read, which is
                // listed (or will be) under its new name: like a segment deleted meanwhile.
                continue;
            }
            segments.push(summary);
            readers.push(reader);
        }
        let mut inspection = ShardInspection {
            dir: dir.to_owned(),
            shard,
            segments,
            readers,
            acked: HashSet::new(),
            deliveries: HashMap::new(),
        };
        let mut acked = HashSet::new();
        let mut deliveries: HashMap<Position, u32> = HashMap::new();
        for record in inspection.records() {
            match record.record {
                RecordView::Ack(list) => acked.extend(list.iter()),
                RecordView::Delivered(list) => {
                    for p in list.iter() {
                        let count = deliveries.entry(p).or_insert(0);
                        *count = count.saturating_add(1);
                    }
                }
                RecordView::Message(_) => {}
            }
        }
        let mut pending: HashMap<u64, u64> = HashMap::new();
        for record in inspection.records() {
            // As recovery: a transient message never comes back, so it keeps nothing.
            let restorable = matches!(record.record, RecordView::Message(m) if !m.is_transient());
            if restorable && !acked.contains(&record.position) {
                *pending.entry(record.position.segment).or_insert(0) += 1;
            }
        }
        let last = inspection.segments.last().map(|s| s.sequence);
        for summary in &mut inspection.segments {
            summary.pending = pending.get(&summary.sequence).copied().unwrap_or(0);
        }
        let unreadable: HashSet<u64> = inspection
            .segments
            .iter()
            .filter(|s| s.header.is_none() && !s.incomplete)
            .map(|s| s.sequence)
            .collect();
        let reclaimable: HashSet<u64> = reclaimable_segments(
            inspection
                .segments
                .iter()
                .map(|s| (s.sequence, s.pending > 0, &s.refs)),
            // A segment whose header cannot be read is not the broker's to delete: it would not
            // start on it at all.
            |sequence| Some(sequence) == last || unreadable.contains(&sequence),
        )
        .into_iter()
        .collect();
        for summary in &mut inspection.segments {
            summary.status = if Some(summary.sequence) == last {
                SegmentStatus::Live
            } else if reclaimable.contains(&summary.sequence) {
                SegmentStatus::Reclaimable
            } else {
                SegmentStatus::Full
            };
        }
        inspection.acked = acked;
        inspection.deliveries = deliveries;
        Ok(inspection)
    }

    /// Every good record, in log order (segment, then offset), up to where each segment's data
    /// ended when it was scanned. A segment whose file the broker has reused since (recycling:
    /// it was reclaimed, so it held nothing needed) yields nothing: its map shows new contents.
    pub fn records(&self) -> impl Iterator<Item = InspectedRecord<'_>> + '_ {
        self.readers
            .iter()
            .zip(&self.segments)
            .filter(|(reader, _)| !reader.reused_since_open())
            .flat_map(|(reader, summary)| {
                let data_end = summary.data_end;
                reader.scan().filter_map(move |item| match item {
                    ScanItem::Record { offset, record, .. } if offset < data_end => {
                        Some(InspectedRecord {
                            position: Position {
                                segment: summary.sequence,
                                offset,
                            },
                            record,
                        })
                    }
                    _ => None,
                })
            })
    }

    /// Whether an ack record of this shard names the message at `position`.
    pub fn is_acked(&self, position: Position) -> bool {
        self.acked.contains(&position)
    }

    /// How many deliveries of the message at `position` were logged.
    pub fn deliveries(&self, position: Position) -> u32 {
        self.deliveries.get(&position).copied().unwrap_or(0)
    }

    /// Whether no segment is damaged.
    pub fn is_clean(&self) -> bool {
        self.segments.iter().all(SegmentSummary::is_clean)
    }
}

/// One good record of a [`ShardInspection`], borrowing its map.
#[derive(Clone, Copy, Debug)]
pub struct InspectedRecord<'a> {
    /// Where the record starts (its identity, for a message).
    pub position: Position,
    /// The decoded record.
    pub record: RecordView<'a>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_numbers_come_only_from_shard_dash_digits() {
        assert_eq!(shard_number(Path::new("/data/shard-0")), Some(0));
        assert_eq!(shard_number(Path::new("shard-17")), Some(17));
        assert_eq!(shard_number(Path::new("/data/shard-")), None);
        assert_eq!(shard_number(Path::new("/data/shard-+1")), None);
        assert_eq!(shard_number(Path::new("/data/shard-1x")), None);
        assert_eq!(shard_number(Path::new("/data/data")), None);
    }

    /// A segment holding acks stays while the segment they point into is there (or the
    /// acked messages would come back after a restart), and goes in the same pass once that
    /// one goes.
    #[test]
    fn reclaimable_follows_references_backwards_in_one_pass() {
        let none = BTreeSet::new();
        let to_0: BTreeSet<u64> = [0].into();
        let to_2: BTreeSet<u64> = [2].into();
        let segments = [
            (0, false, &none),
            (1, false, &to_0),
            (2, true, &none),
            (3, false, &to_2),
            (4, false, &none),
        ];
        assert_eq!(reclaimable_segments(segments, |s| s == 4), vec![0, 1]);
        assert_eq!(
            reclaimable_segments(segments, |s| s == 0 || s == 4),
            Vec::<u64>::new(),
            "segment 1 keeps its acks while segment 0 is pinned"
        );
    }
}
