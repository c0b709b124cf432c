//! A shard's log: the writer that rolls segments, the live-message bookkeeping that decides
//! when a segment can go, the durability watermark, and recovery at start.
//!
//! The log is driven by its shard's event loop and never blocks it on a sync: `pending_sync`
//! hands out the descriptors to sync (the loop issues them as io_uring FSYNC operations) and
//! `mark_synced` advances the durable watermark when they complete. At most one sync is in
//! flight; records appended meanwhile are covered by the next one, which is the group commit.
//!
//! Invariants:
//! - `synced <= appended`: every record at a position below `synced` is on disk.
//! - A segment is deleted only when (1) it is not the active segment, (2) none of its messages
//!   is live, (3) every segment its ack and delivered records point into is already gone (an ack
//!   must outlive the message it acks, or the message would come back after a restart), and
//!   (4) no sync in flight uses its descriptor.
//! - The active segment is never deleted, so segment sequence numbers never repeat. A spare
//!   segment prepared ahead has the next sequence number; on disk it is an empty segment (an
//!   end marker right after its header), which recovery simply takes as the active one.
//! - At most one reclaimed segment file is kept for reuse (`free`, named `<sequence>.seg.free`,
//!   a name recovery never reads as a segment and deletes). Only a segment of format version 2
//!   or later (which knows recycling) and of the configured size is kept. It is reused only for a higher sequence number
//!   than the one it held, differing from it in the low 32 bits only, so its leftover records
//!   can never validate (the record CRC is seeded with the sequence; see
//!   `stale_records_cannot_validate`), and it gets its final name only after its new header is
//!   on disk (see `Segment::recycle`).
//! - Records are appended to a recycled segment only by the run that created it. One found at
//!   recovery (the last segment) is never appended to again: the first append rolls
//!   (`active_closed`). Recovery does not look past the end of a recycled segment's data, so a
//!   record of the segment's own sequence that a machine crash left on disk behind a lost
//!   framing stays there; appending in place could line up a new record's end with it, and a
//!   second crash that lost only the end marker would bring it back as valid (an ack naming a
//!   position a new message has taken would drop that message). Fresh segments have no such
//!   leftovers: recovery zeroes everything after their data.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs::{self, File};
use std::ops::ControlFlow;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use roaring::RoaringBitmap;
use rustc_hash::FxHashMap;
use smallvec::SmallVec;

use super::error::LogError;
use super::format::{
    decode_record_as, ends_data_at, Decoded, FormatError, MessageRecord, MessageView, Position,
    RecordRef, RecordView, ScanItem, SegmentHeader, SegmentScan, StoredId, FORMAT_VERSION,
    FORMAT_VERSION_RECYCLING, FRAME_BYTES, RECORD_ALIGN, REFS_FIXED_BYTES, REF_BYTES,
    SEGMENT_FLAG_RECYCLED, SEGMENT_HEADER_BYTES,
};
use super::policy::FsyncPolicy;
use super::segment::{
    free_file_name, last_nonzero_from, list_free_files, list_segments, scan_last_nonzero, Segment,
};
use crate::codec::Header;

/// The directory of shard `shard`'s log under the broker's data directory.
pub fn shard_dir(data_dir: &Path, shard: u32) -> PathBuf {
    data_dir.join(format!("shard-{shard}"))
}

/// How a shard's log is set up.
#[derive(Clone, Debug)]
pub struct LogConfig {
    /// The shard's own directory (`<data-dir>/shard-N`), created if missing.
    pub dir: PathBuf,
    /// Which shard this is; written into every segment header and checked at recovery.
    pub shard: u32,
    /// Size of each new segment file.
    pub segment_bytes: u64,
    /// When appended records are made durable.
    pub fsync: FsyncPolicy,
    /// Prefault a new segment's pages when mapping it (MAP_POPULATE). Off by default: the
    /// research spike measured 4-5x faster appends with it, but on the project machine
    /// (Linux 6.18, ext4) a later measurement (BENCHMARKS.md, "Log append"; docs/PERFORMANCE.md)
    /// found writing a fresh 64 MiB segment without it as fast or faster in total, while
    /// populating stalls the caller for 8-17 ms per segment. Kept as a switch so other hosts can
    /// be measured.
    pub populate: bool,
    /// Most bytes of segment files this log may hold (its share of `disk_bytes_max`): the
    /// segments, the spare prepared ahead and the reclaimed file kept for reuse. A segment
    /// that would pass it is not created (`LogError::DiskBudget`), exactly as if the disk were
    /// full. `u64::MAX`: only the disk limits it.
    pub disk_bytes_max: u64,
}

impl LogConfig {
    /// 64 MiB, as the design says: a roll (allocate and map a new file) every 64 MiB is rare
    /// enough not to matter, and a drained queue still pins at most one such file.
    pub const SEGMENT_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;
    /// Smallest segment accepted: the header plus room for a few small records.
    pub const SEGMENT_BYTES_MIN: u64 = 4096;
    /// Largest segment accepted: 4 GiB keeps offsets far from any width limit and a single map
    /// of reasonable size on 64-bit hosts.
    pub const SEGMENT_BYTES_MAX: u64 = 4 * 1024 * 1024 * 1024;

    /// The defaults for shard `shard` under `data_dir`.
    pub fn new(data_dir: &Path, shard: u32) -> LogConfig {
        LogConfig {
            dir: shard_dir(data_dir, shard),
            shard,
            segment_bytes: LogConfig::SEGMENT_BYTES_DEFAULT,
            fsync: FsyncPolicy::Always,
            populate: false,
            disk_bytes_max: u64::MAX,
        }
    }

    fn validate(&self) -> Result<(), LogError> {
        if self.segment_bytes < LogConfig::SEGMENT_BYTES_MIN {
            return Err(LogError::Config("segment size below 4096 bytes"));
        }
        if self.segment_bytes > LogConfig::SEGMENT_BYTES_MAX {
            return Err(LogError::Config("segment size above 4 GiB"));
        }
        if self.segment_bytes % 4096 != 0 {
            return Err(LogError::Config("segment size not a multiple of 4096"));
        }
        Ok(())
    }

    /// Space at the end of every segment that only ack and delivered records may use: a
    /// sixteenth of the segment. When the disk is full and no new segment can be made, consumers
    /// can still acknowledge (which frees whole segments) for a long while.
    pub fn ack_reserve_bytes(&self) -> u64 {
        self.segment_bytes / 16
    }

    /// The largest message record (padding included) a segment takes.
    pub fn message_bytes_max(&self) -> u64 {
        self.segment_bytes - SEGMENT_HEADER_BYTES as u64 - self.ack_reserve_bytes()
    }

    /// How many references one ack or delivered record holds at most: bounded by the segment
    /// and by 4096 (64 KiB of references), so one record never needs a segment of its own.
    fn refs_per_record_max(&self) -> usize {
        let room = self.segment_bytes as usize - SEGMENT_HEADER_BYTES - REFS_FIXED_BYTES - 24;
        (room / REF_BYTES).min(4096)
    }
}

/// One descriptor to sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncTarget {
    /// Valid until `mark_synced` or `mark_sync_failed` is called for the request.
    pub fd: RawFd,
    /// Data only (fdatasync, io_uring `Fsync` with DATASYNC) for segments; a full fsync for the
    /// directory after a segment was created, so the new file's name survives a crash.
    pub data_only: bool,
}

/// What the event loop must sync to make everything appended so far durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncRequest {
    /// Sync all of these (in any order, concurrently is fine).
    pub targets: SmallVec<[SyncTarget; 3]>,
    /// Pass this to `mark_synced` once every target's sync has succeeded.
    pub upto: Position,
}

/// A message brought back by recovery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveredMessage {
    /// Its identity in the log: pass it to `ack` when it is done.
    pub position: Position,
    /// Binary from format version 3 on; the text the writer gave in versions 1 and 2.
    pub message_id: StoredId<'static>,
    pub timestamp_ms: u64,
    pub headers: Vec<Header<'static>>,
    pub body: Vec<u8>,
    /// A delivered record names it: a consumer may have seen it before the restart.
    pub redelivered: bool,
    /// How many deliveries were logged for it (one delivered reference per delivery), for the
    /// dead-letter limit; 0 when `redelivered` is false.
    pub deliveries: u32,
}

/// A pending message as [`ShardLog::for_each_pending`] finds it: its record, borrowed from
/// the segment.
#[derive(Clone, Copy, Debug)]
pub struct PendingMessage<'a> {
    /// Its identity in the log: pass it to `ack` when it is done.
    pub position: Position,
    pub view: MessageView<'a>,
    /// A delivered record names it: a consumer may have seen it before the restart.
    pub redelivered: bool,
    /// How many deliveries were logged for it; 0 when `redelivered` is false.
    pub deliveries: u32,
}

/// A queue's unacknowledged messages, in the order they were sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveredQueue {
    pub destination: Vec<u8>,
    pub messages: Vec<RecoveredMessage>,
}

/// A damaged record that recovery skipped; later records of its segment were kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedRecord {
    pub position: Position,
    pub bytes: u64,
    pub error: FormatError,
}

/// How much of a torn tail in a recycled last segment recovery copies aside (to the
/// `.seg.cut-<offset>` file) before ending the data with an end marker. A fresh segment's tail
/// is copied and zeroed through its last non-zero byte, but behind a recycled segment's data lie
/// up to a whole segment (64 MiB) of leftovers of the file's earlier use, which are not damage:
/// copying them at every such restart would cost time and disk for nothing. A torn record is at
/// most one record long and the records a damaged length hides are the ones right after it, so
/// 1 MiB (larger than a typical record, well under a segment) keeps what an operator may want.
pub const RECYCLED_CUT_COPY_BYTES_MAX: u64 = 1024 * 1024;

/// Damaged or partial bytes after the last good record of a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TailCut {
    /// Segment and offset of the first byte after the last good record.
    pub position: Position,
    /// How many bytes from there on held something other than zeros (for the last segment) or
    /// could not be read as records (for earlier ones).
    pub bytes: u64,
    /// Whether the bytes were zeroed so that new records can follow. Only the last segment is
    /// appended to, so only its tail is zeroed; earlier tails are left as evidence.
    pub zeroed: bool,
    /// Where the zeroed bytes were copied first (`<segment>.seg.cut-<offset>` beside it), unless
    /// that copy failed.
    pub saved_to: Option<PathBuf>,
    /// Why the scan stopped there.
    pub error: Option<FormatError>,
    /// The segment is recycled: its data should have ended with an end marker right after the
    /// last good record. Bytes further on may be leftovers of the file's earlier use, so `bytes`
    /// counts only what was examined: in the last segment the prefix copied (at most
    /// [`RECYCLED_CUT_COPY_BYTES_MAX`], through its last non-zero byte), after which an end marker
    /// was written (`zeroed`) and the rest left as it is; in an earlier one, from the last good
    /// record to where the scan stopped (at least the 16 framing bytes that were not an end
    /// marker).
    pub recycled: bool,
}

/// What recovery found and did; the caller logs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segment files scanned.
    pub segments: usize,
    /// Good records read.
    pub records: u64,
    /// Messages brought back (not yet acknowledged).
    pub messages_pending: u64,
    /// Damaged records skipped in the middle of a segment.
    pub skipped: Vec<SkippedRecord>,
    /// Torn or damaged tails.
    pub cuts: Vec<TailCut>,
    /// Segment files whose creation never completed (header all zeros), removed.
    pub removed_incomplete: Vec<PathBuf>,
    /// Reclaimed segment files kept for reuse (`*.seg.free`) left by the last run, removed: a
    /// free file is never data, and the writer keeps a new one at its next reclaim.
    pub removed_free: Vec<PathBuf>,
    /// Segments deleted because all their messages were acknowledged.
    pub reclaimed: Vec<u64>,
}

impl RecoveryReport {
    /// True when nothing was damaged: no skipped record, no cut.
    pub fn is_clean(&self) -> bool {
        self.skipped.is_empty() && self.cuts.is_empty()
    }
}

impl fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} segments, {} records, {} messages pending, {} reclaimed",
            self.segments,
            self.records,
            self.messages_pending,
            self.reclaimed.len()
        )?;
        for s in &self.skipped {
            write!(
                f,
                "; skipped damaged record at {} ({} bytes: {})",
                s.position, s.bytes, s.error
            )?;
        }
        for c in &self.cuts {
            write!(
                f,
                "; {} {} bytes after the last good record at {}",
                if c.zeroed { "cut" } else { "left unreadable" },
                c.bytes,
                c.position
            )?;
            if let Some(e) = &c.error {
                write!(f, " ({e})")?;
            }
            if c.recycled {
                write!(
                    f,
                    " (recycled segment: bytes after these are leftovers, not examined)"
                )?;
            }
            if let Some(p) = &c.saved_to {
                write!(f, ", saved to {}", p.display())?;
            }
        }
        for p in &self.removed_incomplete {
            write!(f, "; removed incomplete segment {}", p.display())?;
        }
        for p in &self.removed_free {
            write!(f, "; removed reclaimed file kept for reuse {}", p.display())?;
        }
        Ok(())
    }
}

/// What `open` hands back besides the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Queues with pending messages, in the order their first pending message was written.
    pub queues: Vec<RecoveredQueue>,
    pub report: RecoveryReport,
}

/// Which of one segment's message records are live (appended, or found pending by recovery, and
/// not acknowledged or released since), at a cost that does not grow with the backlog: a count
/// of the live ones, plus the set of those that died while the segment is kept. Pending messages
/// cost nothing here, so a segment nobody acked in holds no set at all; a set grows only with
/// acks and releases, and is dropped as soon as no message of the segment is live (`dead_below`
/// then says all of it is dead). It replaced a bitmap of one bit per 8-byte slot, which took 1/64
/// of every segment whatever was acked (180 MiB of anonymous memory for an 11.5 GiB backlog).
///
/// The dead set is a `RoaringBitmap` of `offset / 8` (every record starts at a multiple of
/// `RECORD_ALIGN`): acks mostly come in send order and land in the same few 64 Ki-slot
/// containers (one per 512 KiB of segment), each a sorted array of u16 until it fills past 4096
/// values and becomes an 8 KiB bitmap. So a segment of 1 KiB records costs about 2 bytes per
/// dead record (at most about 128 KiB per 64 MiB segment), and one of records under 128 bytes at
/// most 1/64 of the segment, the old fixed cost.
///
/// The set knows which records died, not where records start: an offset inside a record (or at
/// an ack or delivered record) of a segment with a live message reads as live. Positions come
/// from the log's own `append_message` (and recovery), and the broker names only those, so that
/// is enough; what is refused is every offset never written (in the segment header, at or past
/// the write offset), every offset no record can start at (not a multiple of 8), and every
/// offset of a segment whose messages are all dead.
#[derive(Debug, Default)]
struct LiveSet {
    /// Message records live in the segment.
    count: u64,
    /// Slots of the records at or after `dead_below` that were acked or released (and, after
    /// recovery, the transient ones); `None` while there are none.
    dead: Option<RoaringBitmap>,
    /// Every record before this offset is dead: where the segment was written up to when its
    /// count last fell to 0.
    dead_below: u64,
}

impl LiveSet {
    /// A message record was appended at the write offset, past every record the set knows.
    fn appended(&mut self) {
        self.count += 1;
    }

    /// Whether the record at `offset` is live, in a segment written up to `write_offset`.
    fn is_live(&self, offset: u64, write_offset: u64) -> bool {
        let Some(slot) = record_slot(offset) else {
            return false;
        };
        self.count > 0
            && offset >= self.dead_below.max(SEGMENT_HEADER_BYTES as u64)
            && offset < write_offset
            && !self.dead.as_ref().is_some_and(|dead| dead.contains(slot))
    }

    /// Marks the record at `offset` dead; false (nothing changed) if it was not live.
    fn kill(&mut self, offset: u64, write_offset: u64) -> bool {
        if !self.is_live(offset, write_offset) {
            return false;
        }
        let slot = record_slot(offset).expect("a live offset has a slot");
        self.dead
            .get_or_insert_with(RoaringBitmap::new)
            .insert(slot);
        self.count -= 1;
        true
    }

    /// Undoes `kill(offset, ..)`, as long as `forget_dead` did not run in between.
    fn revive(&mut self, offset: u64) {
        let dead = self.dead.as_mut().expect("killed, so a dead set");
        let removed = dead.remove(record_slot(offset).expect("killed, so a slot"));
        debug_assert!(removed, "revived but not killed");
        self.count += 1;
        if dead.is_empty() {
            self.dead = None;
        }
    }

    /// Once no message is live, drops the dead set: everything before `write_offset` is dead, and
    /// records appended later start at or after it.
    fn forget_dead(&mut self, write_offset: u64) {
        if self.count == 0 {
            self.dead = None;
            self.dead_below = write_offset;
        }
    }
}

/// The slot of the record starting at `offset` in a dead set, or `None` where no record can
/// start: records start at multiples of `RECORD_ALIGN` (8), and a segment of at most 4 GiB has
/// fewer than 2^29 slots, so every slot fits a u32.
fn record_slot(offset: u64) -> Option<u32> {
    if offset % RECORD_ALIGN as u64 != 0 {
        return None;
    }
    u32::try_from(offset / RECORD_ALIGN as u64).ok()
}

#[derive(Debug)]
struct SegmentState {
    segment: Segment,
    /// Which of this segment's messages are not acknowledged yet.
    live: LiveSet,
    /// Other segments that this segment's ack and delivered records point into.
    refs: BTreeSet<u64>,
}

/// The log of one shard. Single-threaded: owned by the shard's event loop.
#[derive(Debug)]
pub struct ShardLog {
    config: LogConfig,
    /// The shard directory, open for the fsync that makes a new segment's name durable.
    dir: File,
    segments: BTreeMap<u64, SegmentState>,
    /// Sum of the sizes of `segments`, kept as they come and go: flow control asks for it
    /// per SEND (`disk_bytes_held`), and a large log has thousands of segments.
    segments_bytes: u64,
    /// The segment appended to, once there is one.
    active: Option<u64>,
    /// Sequence number of the next segment to create.
    next_sequence: u64,
    /// A segment created ahead of need by `prepare_spare`, taken by the next roll.
    spare: Option<Segment>,
    /// End of the last appended record.
    appended: Position,
    /// Where the log ended when it was opened: records before it were written by earlier runs.
    recovered_end: Position,
    /// Everything before this is durable.
    synced: Position,
    /// A sync request is out and not yet marked synced or failed: the lowest segment sequence
    /// among its targets, whose descriptors must stay open until it completes.
    sync_in_flight: Option<u64>,
    /// When the last sync request was issued, for `every:<ms>`.
    last_sync_issued_ms: Option<u64>,
    /// A segment was created since the directory was last synced.
    dir_dirty: bool,
    /// A reclaimed segment file kept for reuse by the next `create_segment`: the sequence it
    /// held and its path (`<sequence>.seg.free`). At most one; see the module invariants.
    free: Option<(u64, PathBuf)>,
    /// The active segment is a recycled one found at recovery, or one of an older format
    /// version: it is never appended to again (see the module invariants), so the first append
    /// rolls to a new segment. It stays the
    /// active segment until then, so that it is not reclaimed and sequence numbers never repeat.
    active_closed: bool,
    /// A sync failed: durability can no longer be promised.
    failed: bool,
    /// Messages appended or recovered and not yet acknowledged.
    live_messages: u64,
    /// Delivered marks recovery found, by message, until `for_each_pending` hands them out.
    recovered_deliveries: FxHashMap<Position, u32>,
}

impl ShardLog {
    /// Opens the shard's log, creating its directory if needed, and recovers it: every segment
    /// is scanned and every record's CRC checked; a torn tail of the last segment is zeroed; a
    /// damaged record in the middle is skipped; queues are rebuilt with their unacknowledged
    /// messages in order. Blocking; call before the shard serves.
    ///
    /// Recovery with every pending message copied out (headers and body), for tools and
    /// tests; the broker uses [`ShardLog::open_indexed`], which keeps memory independent of
    /// the backlog.
    pub fn open(config: LogConfig) -> Result<(ShardLog, Recovery), LogError> {
        let (mut log, report) = ShardLog::open_indexed(config)?;
        let mut queues: Vec<RecoveredQueue> = Vec::new();
        let mut queue_index: HashMap<Vec<u8>, usize> = HashMap::new();
        log.for_each_pending(|pending| {
            let m = pending.view;
            let index = *queue_index
                .entry(m.destination.to_vec())
                .or_insert_with(|| {
                    queues.push(RecoveredQueue {
                        destination: m.destination.to_vec(),
                        messages: Vec::new(),
                    });
                    queues.len() - 1
                });
            queues[index].messages.push(RecoveredMessage {
                position: pending.position,
                message_id: m.message_id().into_owned(),
                timestamp_ms: m.timestamp_ms,
                headers: m.headers_owned(),
                body: m.body.to_vec(),
                deliveries: pending.deliveries,
                redelivered: pending.redelivered,
            });
        })?;
        Ok((log, Recovery { queues, report }))
    }

    /// Opens and recovers the log (as [`ShardLog::open`] describes) without reading any
    /// pending message into memory: they stay in the segments, found again by
    /// [`ShardLog::for_each_pending`]. What stays in memory is per segment (a count of its live
    /// messages, and which were acked since) and the delivered marks, not per pending message.
    ///
    /// The steps, in order: scan (`remove_free_files`, `open_segments`, then `scan_segments`,
    /// which reads each segment's records and cuts its torn tail, `cut_torn_tail`), rebuild
    /// (`mark_live`, `from_recovered`), then reclaim what is fully acknowledged.
    pub fn open_indexed(config: LogConfig) -> Result<(ShardLog, RecoveryReport), LogError> {
        config.validate()?;
        fs::create_dir_all(&config.dir).map_err(|e| LogError::io(&config.dir, e))?;
        let dir = File::open(&config.dir).map_err(|e| LogError::io(&config.dir, e))?;
        let mut report = RecoveryReport::default();
        remove_free_files(&config.dir, &mut report)?;
        let (opened, next_sequence) = open_segments(&config, &mut report)?;
        report.segments = opened.len();
        let scanned = scan_segments(opened, &mut report)?;
        let mut states = scanned.states;
        let live_messages = mark_live(&mut states, scanned.marks.acked);
        report.messages_pending = live_messages;
        let mut log = ShardLog::from_recovered(
            config,
            dir,
            states,
            next_sequence,
            scanned.last_recycled,
            live_messages,
        );
        report.reclaimed = log.reclaim()?;
        log.recovered_deliveries = scanned.marks.deliveries;
        Ok((log, report))
    }

    /// Calls `visit` with each pending message (live, not acknowledged) found by recovery, in
    /// log order, borrowing its record from the segment's map: nothing is copied, so a backlog
    /// larger than memory is visited page by page (the kernel may drop the pages after). Each
    /// segment with a live message is scanned record by record (the log keeps no list of them)
    /// until all its live ones were seen; transient records are skipped (a transient message
    /// appended in this run is live, but is no recovered message).
    /// Delivery counts come from the delivered marks recovery found (forgotten after this).
    pub fn for_each_pending(
        &mut self,
        mut visit: impl FnMut(PendingMessage<'_>),
    ) -> Result<(), LogError> {
        let deliveries = std::mem::take(&mut self.recovered_deliveries);
        for (&sequence, state) in self.segments.iter_mut() {
            let SegmentState { segment, live, .. } = state;
            if live.count == 0 {
                continue;
            }
            let format_version = segment.format_version();
            let write_offset = segment.write_offset();
            let bytes = segment.record_bytes(0)?;
            let mut unseen = live.count;
            let mut scan = SegmentScan::with_version(bytes, sequence, format_version);
            for item in &mut scan {
                let ScanItem::Record {
                    offset,
                    record: RecordView::Message(view),
                    ..
                } = item
                else {
                    continue;
                };
                if !live.is_live(offset, write_offset) {
                    continue;
                }
                unseen -= 1;
                let position = Position {
                    segment: sequence,
                    offset,
                };
                if !view.is_transient() {
                    visit(PendingMessage {
                        position,
                        view,
                        deliveries: deliveries.get(&position).copied().unwrap_or(0),
                        redelivered: deliveries.contains_key(&position),
                    });
                }
                if unseen == 0 {
                    break;
                }
            }
            if unseen > 0 {
                let position = Position {
                    segment: sequence,
                    offset: scan.offset(),
                };
                return Err(LogError::Unreadable(
                    position,
                    format!("{unseen} live messages not found by the scan"),
                ));
            }
        }
        Ok(())
    }

    /// Visits the live message records from `from` on, in log order, until `visit` breaks:
    /// what a queue reads its tail back with. Returns where the scan stands: after the last
    /// record visited, or the log's end. A record the recovery skipped as damaged is passed
    /// over again; a transient record an earlier run wrote is not live.
    pub fn scan_live(
        &mut self,
        from: Position,
        mut visit: impl FnMut(Position, MessageView<'_>) -> ControlFlow<()>,
    ) -> Result<Position, LogError> {
        for (&sequence, state) in self.segments.range_mut(from.segment..) {
            let SegmentState { segment, live, .. } = state;
            if live.count == 0 {
                // Nothing live to find: not worth reading.
                continue;
            }
            let format_version = segment.format_version();
            let end = segment.write_offset();
            let mut offset = SEGMENT_HEADER_BYTES as u64;
            if sequence == from.segment {
                offset = offset.max(from.offset);
            }
            while offset < end {
                let bytes = segment.record_bytes(offset)?;
                let (record, len) = match decode_record_as(bytes, sequence, format_version) {
                    Decoded::Record { record, len } => (record, len as u64),
                    Decoded::Corrupt { len, .. } => {
                        offset += len as u64;
                        continue;
                    }
                    Decoded::End | Decoded::Unframed(_) => break,
                };
                let position = Position {
                    segment: sequence,
                    offset,
                };
                offset += len;
                let RecordView::Message(view) = record else {
                    continue;
                };
                if live.is_live(position.offset, end) && visit(position, view).is_break() {
                    return Ok(Position {
                        segment: sequence,
                        offset,
                    });
                }
            }
        }
        Ok(self.appended)
    }

    /// The rebuild's last step: the log as recovery leaves it. Every segment but the last is
    /// sealed; the last is the active one and appends go on where its good data ends.
    fn from_recovered(
        config: LogConfig,
        dir: File,
        mut states: BTreeMap<u64, SegmentState>,
        next_sequence: u64,
        last_recycled: bool,
        live_messages: u64,
    ) -> ShardLog {
        let active = states.keys().next_back().copied();
        // A segment holds records of its own version only, so one of an older version is
        // never appended to: the first append rolls, like after a recycled last segment.
        let active_older = active
            .is_some_and(|sequence| states[&sequence].segment.format_version() < FORMAT_VERSION);
        for (&sequence, state) in states.iter_mut() {
            if Some(sequence) != active {
                state.segment.seal();
            }
        }
        let appended = match active {
            Some(sequence) => Position {
                segment: sequence,
                offset: states[&sequence].segment.write_offset(),
            },
            None => Position {
                segment: next_sequence,
                offset: 0,
            },
        };
        let segments_bytes = states.values().map(|s| s.segment.segment_bytes()).sum();
        ShardLog {
            config,
            dir,
            segments: states,
            segments_bytes,
            active,
            next_sequence,
            spare: None,
            appended,
            recovered_end: appended,
            synced: appended,
            sync_in_flight: None,
            last_sync_issued_ms: None,
            dir_dirty: false,
            free: None,
            recovered_deliveries: FxHashMap::default(),
            active_closed: last_recycled || active_older,
            failed: false,
            live_messages,
        }
    }

    /// The configuration the log was opened with.
    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// Appends a message and returns its position (its identity for `ack` and `delivered`).
    /// Rolls to a new segment when the active one is full; `LogError::NoSpace` if that fails
    /// (`DiskBudget` if the new segment would pass `disk_bytes_max`), in which case nothing was
    /// written.
    pub fn append_message(
        &mut self,
        message: &MessageRecord<'_>,
        now_ms: u64,
    ) -> Result<Position, LogError> {
        if self.failed {
            return Err(LogError::SyncFailed);
        }
        check_width("destination", message.destination.len())?;
        check_width("header block", message.header_block.len())?;
        let record = RecordRef::Message(*message);
        let len = record.encoded_len() as u64;
        let max_bytes = self.config.message_bytes_max();
        if len > max_bytes {
            return Err(LogError::RecordTooLarge {
                bytes: len,
                max_bytes,
            });
        }
        let reserve = self.config.ack_reserve_bytes();
        let sequence = self.room_for(len + reserve, now_ms)?;
        let state = self.segments.get_mut(&sequence).expect("active segment");
        let offset = state.segment.append(&record);
        state.live.appended();
        self.live_messages += 1;
        self.appended = Position {
            segment: sequence,
            offset: state.segment.write_offset(),
        };
        Ok(Position {
            segment: sequence,
            offset,
        })
    }

    /// The message record at `position`, read back from the log (where it is live). A
    /// paged-out queue message's headers and body come from here.
    pub fn read_message(&mut self, position: Position) -> Result<MessageView<'_>, LogError> {
        let state = self
            .segments
            .get_mut(&position.segment)
            .ok_or(LogError::NotLive(position))?;
        let sequence = state.segment.sequence();
        let format_version = state.segment.format_version();
        let bytes = state.segment.record_bytes(position.offset)?;
        match decode_record_as(bytes, sequence, format_version) {
            Decoded::Record {
                record: RecordView::Message(view),
                ..
            } => Ok(view),
            Decoded::Record { .. } => Err(LogError::Unreadable(
                position,
                "an ack or delivered record is there".into(),
            )),
            Decoded::End => Err(LogError::Unreadable(position, "no record there".into())),
            Decoded::Unframed(error) | Decoded::Corrupt { error, .. } => {
                Err(LogError::Unreadable(position, error.to_string()))
            }
        }
    }

    /// Records that these messages are done. The in-memory state changes first, so even if the
    /// record cannot be written (`NoSpace`: the disk is full and the ack reserve of the active
    /// segment is used up) the messages stop counting as live and their segments can be
    /// reclaimed; after a crash such messages would come back, which is at-least-once delivery.
    /// `NotLive` (nothing changed) if a position is not a live message.
    pub fn ack(&mut self, positions: &[Position], now_ms: u64) -> Result<(), LogError> {
        self.take_live(positions)?;
        self.live_messages -= positions.len() as u64;
        self.forget_dead(positions);
        if self.failed {
            return Err(LogError::SyncFailed);
        }
        self.append_refs(positions, true, now_ms)
    }

    /// Forgets these transient messages (appended with `MessageRecord::transient`) without
    /// writing anything: recovery never restores a transient record, so no ack is needed to
    /// retire it, and its segment can go once nothing else in it is live. `NotLive` (nothing
    /// changed) if a position is not a live message. Do not use it for a persistent message:
    /// without an ack record it would come back after a restart.
    pub fn release(&mut self, positions: &[Position]) -> Result<(), LogError> {
        self.take_live(positions)?;
        self.live_messages -= positions.len() as u64;
        self.forget_dead(positions);
        Ok(())
    }

    /// Records that these messages were handed to a consumer, so that after a crash they come
    /// back marked redelivered, with the number of deliveries logged (call it on every delivery
    /// to keep a dead-letter count across restarts). Needs no sync of its own: it rides on the
    /// next one.
    pub fn delivered(&mut self, positions: &[Position], now_ms: u64) -> Result<(), LogError> {
        self.check_live(positions)?;
        if self.failed {
            return Err(LogError::SyncFailed);
        }
        self.append_refs(positions, false, now_ms)
    }

    /// Whether `position` is a live message: appended in this run, or found pending by recovery
    /// (transient records found by recovery never are), and not acknowledged or released since.
    /// Like `ack`, it trusts that `position` is one the log handed out: it is false for any
    /// offset never written, not a multiple of 8, or in a segment that is gone or whose messages
    /// are all done, but an offset inside a record of a segment with a live message reads as
    /// live (see `LiveSet`).
    pub fn is_live(&self, position: Position) -> bool {
        self.segments.get(&position.segment).is_some_and(|state| {
            state
                .live
                .is_live(position.offset, state.segment.write_offset())
        })
    }

    /// Where the log ended when it was opened (`appended_upto` then): every record before it
    /// was written by an earlier run, every record at or after it by this one.
    pub fn recovered_end(&self) -> Position {
        self.recovered_end
    }

    /// Clears every position's live mark, or none of them: `NotLive` (nothing changed) for the
    /// first one that is not live (`is_live`) or that was already named earlier in `positions`.
    /// One segment lookup and one dead-set insert per position.
    fn take_live(&mut self, positions: &[Position]) -> Result<(), LogError> {
        for (index, p) in positions.iter().enumerate() {
            let taken = self
                .segments
                .get_mut(&p.segment)
                .is_some_and(|state| state.live.kill(p.offset, state.segment.write_offset()));
            if !taken {
                self.restore_live(&positions[..index]);
                return Err(LogError::NotLive(*p));
            }
        }
        Ok(())
    }

    /// Marks positions cleared by `take_live` live again.
    fn restore_live(&mut self, positions: &[Position]) {
        for p in positions {
            let state = self.segments.get_mut(&p.segment).expect("taken from here");
            state.live.revive(p.offset);
        }
    }

    /// `NotLive` for the first position that is not live, else for one named twice; changes
    /// nothing. Unlike `take_live` and `restore_live`, it touches no dead set, so marking a
    /// delivery in a segment nobody acked in allocates none.
    fn check_live(&self, positions: &[Position]) -> Result<(), LogError> {
        if let Some(p) = positions.iter().find(|&&p| !self.is_live(p)) {
            return Err(LogError::NotLive(*p));
        }
        match first_repeated(positions) {
            Some(p) => Err(LogError::NotLive(p)),
            None => Ok(()),
        }
    }

    /// Drops the dead sets of the segments of `positions`, just taken, that hold no live
    /// message any more (see `LiveSet::forget_dead`).
    fn forget_dead(&mut self, positions: &[Position]) {
        let mut last = None;
        for p in positions {
            if last == Some(p.segment) {
                continue;
            }
            last = Some(p.segment);
            let state = self.segments.get_mut(&p.segment).expect("taken from here");
            state.live.forget_dead(state.segment.write_offset());
        }
    }

    fn append_refs(
        &mut self,
        positions: &[Position],
        ack: bool,
        now_ms: u64,
    ) -> Result<(), LogError> {
        for chunk in positions.chunks(self.config.refs_per_record_max()) {
            let record = if ack {
                RecordRef::Ack(chunk)
            } else {
                RecordRef::Delivered(chunk)
            };
            let len = record.encoded_len() as u64;
            let sequence = self.room_for(len, now_ms)?;
            let state = self.segments.get_mut(&sequence).expect("active segment");
            state.segment.append(&record);
            for p in chunk {
                if p.segment != sequence {
                    state.refs.insert(p.segment);
                }
            }
            self.appended = Position {
                segment: sequence,
                offset: state.segment.write_offset(),
            };
        }
        Ok(())
    }

    /// Makes sure the active segment has `needed` bytes free, rolling if not; returns its
    /// sequence.
    fn room_for(&mut self, needed: u64, now_ms: u64) -> Result<u64, LogError> {
        if let Some(sequence) = self.active {
            if !self.active_closed && self.segments[&sequence].segment.remaining() >= needed {
                return Ok(sequence);
            }
        }
        self.roll(now_ms)
    }

    fn roll(&mut self, now_ms: u64) -> Result<u64, LogError> {
        let segment = match self.spare.take() {
            Some(spare) => spare,
            None => self.create_segment(now_ms)?,
        };
        let sequence = segment.sequence();
        let live = LiveSet::default();
        if let Some(old) = self.active {
            let state = self.segments.get_mut(&old).expect("active segment");
            if let Err(error) = state.segment.write_pending() {
                // Records already accepted did not reach the file: no sync may confirm them.
                self.failed = true;
                self.spare = Some(segment);
                return Err(error);
            }
            state.segment.seal();
        }
        self.appended = Position {
            segment: sequence,
            offset: segment.write_offset(),
        };
        self.segments_bytes += segment.segment_bytes();
        self.segments.insert(
            sequence,
            SegmentState {
                segment,
                live,
                refs: BTreeSet::new(),
            },
        );
        self.active = Some(sequence);
        self.active_closed = false;
        Ok(sequence)
    }

    /// Creates the next segment: from the reclaimed file kept for reuse when there is one (no
    /// allocation, and its pages are still cached), else a fresh file. A failed reuse falls back
    /// to a fresh file; `Segment::recycle` leaves no file whose name and header disagree.
    fn create_segment(&mut self, now_ms: u64) -> Result<Segment, LogError> {
        let mut header = SegmentHeader {
            format_version: FORMAT_VERSION,
            shard: self.config.shard,
            sequence: self.next_sequence,
            segment_bytes: self.config.segment_bytes,
            created_ms: now_ms,
            flags: 0,
        };
        let recycled = self.free.take().and_then(|(old_sequence, free)| {
            // Stale records of the file validate only under their own sequence.
            assert!(
                old_sequence < header.sequence,
                "reusing a segment file for an old sequence"
            );
            if !stale_records_cannot_validate(old_sequence, header.sequence) {
                let _ = fs::remove_file(&free);
                return None;
            }
            let mut recycled_header = header;
            recycled_header.flags = SEGMENT_FLAG_RECYCLED;
            match Segment::recycle(
                &self.config.dir,
                &self.dir,
                &free,
                recycled_header,
                self.config.populate,
            ) {
                Ok(segment) => Some(segment),
                Err(error) => {
                    tracing::warn!(
                        %error,
                        "could not reuse a reclaimed log segment file; creating a fresh one"
                    );
                    None
                }
            }
        });
        let segment = match recycled {
            Some(segment) => segment,
            None => {
                header.flags = 0;
                if !self.fits_in_budget() {
                    return Err(LogError::DiskBudget {
                        max_bytes: self.config.disk_bytes_max,
                    });
                }
                Segment::create(&self.config.dir, header, self.config.populate)?
            }
        };
        self.next_sequence += 1;
        // The new name reaches the disk with the next sync request.
        self.dir_dirty = true;
        Ok(segment)
    }

    /// Whether a spare segment should be prepared: none is ready and the active segment is past
    /// half full (or there is none yet).
    pub fn wants_spare(&self) -> bool {
        self.spare.is_none()
            && !self.failed
            && (self.free.is_some() || self.fits_in_budget())
            && (self.active_closed
                || self.active.map_or(true, |sequence| {
                    self.segments[&sequence].segment.remaining() < self.config.segment_bytes / 2
                }))
    }

    /// Creates (allocates, maps, prefaults) the next segment now, so that the roll that needs it
    /// costs nothing. Creating a segment blocks for a few milliseconds at the default size
    /// (fallocate; or, reusing a reclaimed file, a directory fsync and an fdatasync); the
    /// event loop calls this when `wants_spare` says so, at a moment of its choosing (an idle
    /// turn), instead of paying it inside the append that happens to fill a segment.
    /// `NoSpace` here is an early warning: nothing changed.
    pub fn prepare_spare(&mut self, now_ms: u64) -> Result<(), LogError> {
        if self.spare.is_none() {
            self.spare = Some(self.create_segment(now_ms)?);
        }
        Ok(())
    }

    /// A sync or a write of the log failed: it refuses appends, and nothing appended since
    /// the last good sync will ever be reported durable.
    pub fn has_failed(&self) -> bool {
        self.failed
    }

    /// Writes the records appended since the last call into the active segment's file (see
    /// [`Segment::write_pending`]). An error fails the log as a failed sync does: the records
    /// were accepted, and no later sync may report them durable.
    pub fn write_pending(&mut self) -> Result<(), LogError> {
        let Some(active) = self.active else {
            return Ok(());
        };
        let segment = &mut self
            .segments
            .get_mut(&active)
            .expect("active segment")
            .segment;
        if !segment.has_pending() {
            return Ok(());
        }
        let result = segment.write_pending();
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    /// The sync the event loop should issue now, if any: under `always` whenever something is
    /// unsynced and no sync is in flight; under `every:<ms>` at most once per interval; never
    /// under `never`. The request covers every record appended so far (group commit).
    pub fn pending_sync(&mut self, now_ms: u64) -> Option<SyncRequest> {
        if self.failed || self.sync_in_flight.is_some() || !self.has_unsynced() {
            return None;
        }
        match self.config.fsync {
            FsyncPolicy::Never => return None,
            FsyncPolicy::Always => {}
            FsyncPolicy::Every { interval_ms } => {
                if let Some(last) = self.last_sync_issued_ms {
                    if now_ms < last.saturating_add(interval_ms) {
                        return None;
                    }
                }
            }
        }
        // What the sync covers must be in the file first. Only here, when a sync is issued:
        // under `every` and `never` the event loop writes at the end of each turn instead.
        if let Err(error) = self.write_pending() {
            tracing::error!(shard = self.config.shard, "log write failed: {error}");
            return None;
        }
        let request = self.sync_request();
        self.sync_in_flight = Some(self.synced.segment);
        self.dir_dirty = false;
        self.last_sync_issued_ms = Some(now_ms);
        Some(request)
    }

    /// When `pending_sync` will next have something to hand out under `every:<ms>` (for the
    /// event loop's timer); `None` when nothing waits for a timer.
    pub fn next_sync_due_ms(&self) -> Option<u64> {
        match self.config.fsync {
            FsyncPolicy::Every { interval_ms }
                if !self.failed && self.sync_in_flight.is_none() && self.has_unsynced() =>
            {
                Some(
                    self.last_sync_issued_ms
                        .map_or(0, |t| t.saturating_add(interval_ms)),
                )
            }
            _ => None,
        }
    }

    fn has_unsynced(&self) -> bool {
        self.synced < self.appended || self.dir_dirty
    }

    fn sync_request(&self) -> SyncRequest {
        let mut targets = SmallVec::new();
        for (&sequence, state) in self.segments.range(self.synced.segment..) {
            if sequence > self.synced.segment || state.segment.write_offset() > self.synced.offset {
                targets.push(SyncTarget {
                    fd: state.segment.raw_fd(),
                    data_only: true,
                });
            }
        }
        if self.dir_dirty {
            targets.push(SyncTarget {
                fd: self.dir.as_raw_fd(),
                data_only: false,
            });
        }
        SyncRequest {
            targets,
            upto: self.appended,
        }
    }

    /// Every target of the request that returned `upto` was synced: records before `upto` are
    /// durable.
    pub fn mark_synced(&mut self, upto: Position) {
        assert!(upto <= self.appended, "synced past the end of the log");
        self.synced = self.synced.max(upto);
        self.sync_in_flight = None;
    }

    /// A sync failed. Linux may drop the dirty pages of a failed writeback, so retrying could
    /// report success for data that is gone; the log stops accepting appends instead.
    pub fn mark_sync_failed(&mut self) {
        self.sync_in_flight = None;
        self.failed = true;
    }

    /// Syncs everything appended so far, blocking the caller (fdatasync on each segment with
    /// unsynced data, fsync on the directory). For recovery, tools, tests and shutdown; the
    /// event loop uses `pending_sync` instead.
    pub fn sync_now(&mut self) -> Result<(), LogError> {
        if self.failed {
            return Err(LogError::SyncFailed);
        }
        self.write_pending()?;
        let request = self.sync_request();
        for (&sequence, state) in self.segments.range(self.synced.segment..) {
            if sequence > self.synced.segment || state.segment.write_offset() > self.synced.offset {
                if let Err(error) = state.segment.sync_data() {
                    self.failed = true;
                    return Err(error);
                }
            }
        }
        if self.dir_dirty {
            if let Err(error) = self.dir.sync_all() {
                self.failed = true;
                return Err(LogError::io(&self.config.dir, error));
            }
            self.dir_dirty = false;
        }
        self.synced = self.synced.max(request.upto);
        Ok(())
    }

    /// Whether the record at `position` is on disk.
    pub fn is_durable(&self, position: Position) -> bool {
        position < self.synced
    }

    /// Whether a RECEIPT for the message at `position` may go out: at once unless the policy is
    /// `always`, else once a sync covers it.
    pub fn receipt_ready(&self, position: Position) -> bool {
        !self.config.fsync.receipt_waits_for_sync() || self.is_durable(position)
    }

    /// End of the last appended record.
    pub fn appended_upto(&self) -> Position {
        self.appended
    }

    /// Everything before this is durable.
    pub fn synced_upto(&self) -> Position {
        self.synced
    }

    /// Messages appended or recovered and not acknowledged.
    pub fn live_messages(&self) -> u64 {
        self.live_messages
    }

    /// Sequence numbers of the segment files the log holds.
    pub fn segment_sequences(&self) -> Vec<u64> {
        self.segments.keys().copied().collect()
    }

    /// Bytes of disk the segment files take (not counting the one reclaimed file that may be
    /// kept for reuse, which is at most one more segment).
    pub fn disk_bytes(&self) -> u64 {
        debug_assert_eq!(
            self.segments_bytes,
            self.segments
                .values()
                .map(|s| s.segment.segment_bytes())
                .sum::<u64>()
        );
        self.segments_bytes
    }

    /// Bytes of disk the log holds against its `disk_bytes_max`: the segment files, the spare
    /// prepared ahead and the reclaimed file kept for reuse.
    pub fn disk_bytes_held(&self) -> u64 {
        self.disk_bytes()
            + self.spare.as_ref().map_or(0, Segment::segment_bytes)
            + self.free.as_ref().map_or(0, |_| self.config.segment_bytes)
    }

    /// Whether one more fresh segment file stays within `disk_bytes_max`.
    fn fits_in_budget(&self) -> bool {
        self.disk_bytes_held()
            .saturating_add(self.config.segment_bytes)
            <= self.config.disk_bytes_max
    }

    /// Deletes every segment that no longer holds anything needed (see the module invariants)
    /// and returns their sequence numbers; the first one that can be reused is kept instead
    /// (renamed to `<sequence>.seg.free`) when none is kept yet, for the next `create_segment`.
    /// Blocking (unlink, rename); cheap when there is nothing to do.
    /// The event loop calls it after acks, at a quiet moment.
    pub fn reclaim(&mut self) -> Result<Vec<u64>, LogError> {
        let active = self.active;
        let sync_in_flight = self.sync_in_flight;
        let deletable = reclaimable_segments(
            self.segments
                .iter()
                .map(|(&sequence, state)| (sequence, state.live.count > 0, &state.refs)),
            |sequence| {
                Some(sequence) == active || sync_in_flight.is_some_and(|first| sequence >= first)
            },
        );
        let mut reclaimed = Vec::with_capacity(deletable.len());
        for sequence in deletable {
            let state = self.segments.remove(&sequence).expect("listed segment");
            self.segments_bytes -= state.segment.segment_bytes();
            let path = state.segment.path().to_owned();
            // Kept for reuse: one file is enough for the next roll, and a segment of version 1
            // (whose tail rules know no leftovers) or another size never is. Version 2 ones are:
            // the file gets a current header, and no leftover validates under the new sequence.
            let reusable = self.free.is_none()
                && state.segment.format_version() >= FORMAT_VERSION_RECYCLING
                && state.segment.segment_bytes() == self.config.segment_bytes;
            drop(state);
            if reusable {
                // Like the unlink below, not synced: if a crash undoes it, the segment comes back
                // under its old name (at-least-once). `Segment::recycle` syncs the directory
                // before it changes the content.
                let free = path.with_file_name(free_file_name(sequence));
                match fs::rename(&path, &free) {
                    Ok(()) => {
                        self.free = Some((sequence, free));
                        reclaimed.push(sequence);
                        continue;
                    }
                    Err(error) => tracing::warn!(
                        %error,
                        path = %path.display(),
                        "could not keep a reclaimed log segment for reuse; deleting it"
                    ),
                }
            }
            fs::remove_file(&path).map_err(|e| LogError::io(&path, e))?;
            reclaimed.push(sequence);
        }
        Ok(reclaimed)
    }
}

/// Whether no record written under sequence `old` can have a valid CRC under sequence `new`,
/// whatever its bytes. The CRC is linear: for the same bytes, the CRCs seeded with `old` and
/// `new` differ by a function of `old ^ new` alone, zero only when `old ^ new`, read as a
/// polynomial, is a multiple of the degree-32 CRC generator. Below 2^32 it has degree < 32 and
/// is not zero, so it cannot be one. (Sequences that far apart never meet in practice; the check
/// makes the argument hold for every file the writer reuses.)
fn stale_records_cannot_validate(old: u64, new: u64) -> bool {
    old != new && (old ^ new) >> 32 == 0
}

/// The reclaim rule of the module invariants, as a pure function shared by [`ShardLog::reclaim`]
/// and the read-only inspection (`stompd-log segments`), so both always agree on what may go.
///
/// `segments` lists every segment present, ascending by sequence: its sequence, whether it holds
/// a live message, and the segments its ack and delivered records point into. `pinned` says
/// which must stay regardless (the active segment, those in a sync in flight). Returns the
/// deletable sequences, ascending. Ascending order matters: references only point backwards, so
/// an early segment going can free a later one within the same pass.
pub fn reclaimable_segments<'a>(
    segments: impl IntoIterator<Item = (u64, bool, &'a BTreeSet<u64>)>,
    pinned: impl Fn(u64) -> bool,
) -> Vec<u64> {
    let segments: Vec<_> = segments.into_iter().collect();
    debug_assert!(segments.windows(2).all(|w| w[0].0 < w[1].0));
    let mut present: BTreeSet<u64> = segments.iter().map(|&(sequence, ..)| sequence).collect();
    let mut deletable = Vec::new();
    for (sequence, has_live, refs) in segments {
        if has_live || pinned(sequence) || refs.iter().any(|r| present.contains(r)) {
            continue;
        }
        present.remove(&sequence);
        deletable.push(sequence);
    }
    deletable
}

/// Recovery, first step: deletes the files the last run kept for reuse (`*.seg.free`). Such a
/// file holds nothing needed. It is deleted rather than reused: its old sequence is only known
/// to be lower than the next one while the segments that followed it are still here, and a file
/// reused under its own old sequence would bring its stale records back as valid.
fn remove_free_files(dir: &Path, report: &mut RecoveryReport) -> Result<(), LogError> {
    for path in list_free_files(dir)? {
        fs::remove_file(&path).map_err(|e| LogError::io(&path, e))?;
        report.removed_free.push(path);
    }
    Ok(())
}

/// Recovery, scan: opens every listed segment and validates its header (`open_checked`).
/// Returns the segments kept, each with whether it is recycled, and the sequence number the
/// next new segment gets (one past the highest listed, kept or not).
fn open_segments(
    config: &LogConfig,
    report: &mut RecoveryReport,
) -> Result<(Vec<(Segment, bool)>, u64), LogError> {
    let mut next_sequence = 0;
    let mut opened: Vec<(Segment, bool)> = Vec::new();
    for (sequence, path) in list_segments(&config.dir)? {
        next_sequence = sequence + 1;
        if let Some(opened_segment) = open_checked(config, sequence, &path, report)? {
            opened.push(opened_segment);
        }
    }
    Ok((opened, next_sequence))
}

/// The acks and delivered marks of every segment, gathered by the scan: the rebuild needs them
/// all before it can tell which messages are still pending. FxHash: one lookup or insert per
/// record scanned, keyed by positions the log wrote.
#[derive(Default)]
struct Marks {
    /// The slots (`record_slot`) acks name, by segment: a bitmap of u32 costs a few bytes per
    /// ack where a set of positions costs 16 and more. An ack naming an offset no record can
    /// start at is dropped here; one naming a slot where no message record starts is dropped by
    /// the rebuild (`recovered_live_set`).
    acked: FxHashMap<u64, RoaringBitmap>,
    deliveries: FxHashMap<Position, u32>,
}

impl Marks {
    /// Notes an ack or delivered record of segment `sequence`, and in `refs` the other segments
    /// it points into (a segment must outlive those it acks into; see the module invariants).
    fn note(&mut self, record: RecordView<'_>, sequence: u64, refs: &mut BTreeSet<u64>) {
        match record {
            RecordView::Ack(list) => {
                for p in list.iter() {
                    if let Some(slot) = record_slot(p.offset) {
                        self.acked.entry(p.segment).or_default().insert(slot);
                    }
                    if p.segment != sequence {
                        refs.insert(p.segment);
                    }
                }
            }
            RecordView::Delivered(list) => {
                for p in list.iter() {
                    let count = self.deliveries.entry(p).or_insert(0u32);
                    *count = count.saturating_add(1);
                    if p.segment != sequence {
                        refs.insert(p.segment);
                    }
                }
            }
            RecordView::Message(_) => {}
        }
    }
}

/// What the scan (pass 1) hands to the rebuild.
struct Scanned {
    /// Every segment kept, its write offset at the end of its good data, with no live message
    /// yet (the rebuild marks them).
    states: BTreeMap<u64, SegmentState>,
    marks: Marks,
    /// The last segment is recycled: it is never appended to again (`active_closed`).
    last_recycled: bool,
}

/// Recovery, scan and cut (pass 1): reads each segment's records (`scan_segment`), then
/// handles what lies after its good data (`cut_torn_tail`), one segment after the other.
fn scan_segments(
    opened: Vec<(Segment, bool)>,
    report: &mut RecoveryReport,
) -> Result<Scanned, LogError> {
    let mut marks = Marks::default();
    let mut states: BTreeMap<u64, SegmentState> = BTreeMap::new();
    let mut last_recycled = false;
    let last_index = opened.len().wrapping_sub(1);
    for (index, (mut segment, recycled)) in opened.into_iter().enumerate() {
        let sequence = segment.sequence();
        if index == last_index {
            last_recycled = recycled;
        }
        let bytes = segment.bytes().expect("recovered segments are mapped");
        let scanned = scan_segment(bytes, sequence, &mut marks, report);
        cut_torn_tail(
            &mut segment,
            &scanned,
            index == last_index,
            recycled,
            report,
        )?;
        segment.set_write_offset(scanned.last_good_end);
        let live = LiveSet::default();
        states.insert(
            sequence,
            SegmentState {
                segment,
                live,
                refs: scanned.refs,
            },
        );
    }
    Ok(Scanned {
        states,
        marks,
        last_recycled,
    })
}

/// What the scan of one segment found.
struct SegmentScanned {
    /// Other segments its ack and delivered records point into.
    refs: BTreeSet<u64>,
    /// The first byte after its last good record.
    last_good_end: u64,
    /// Where the scan stopped.
    scan_end: u64,
    /// Why the data after `last_good_end` is not records, if the scan said.
    tail_error: Option<FormatError>,
}

/// Scans one segment's records: counts the good ones, notes acks and delivered marks, and
/// finds where the good data ends. Damage before that end is a skipped record (reported here);
/// damage after it belongs to the tail, for `cut_torn_tail`.
fn scan_segment(
    bytes: &[u8],
    sequence: u64,
    marks: &mut Marks,
    report: &mut RecoveryReport,
) -> SegmentScanned {
    let mut refs = BTreeSet::new();
    let mut last_good_end = SEGMENT_HEADER_BYTES as u64;
    let mut damaged: Vec<SkippedRecord> = Vec::new();
    let mut stop: Option<(u64, FormatError)> = None;
    let mut scan = SegmentScan::new(bytes, sequence);
    for item in &mut scan {
        match item {
            ScanItem::Record {
                offset,
                len,
                record,
            } => {
                report.records += 1;
                last_good_end = offset + len;
                marks.note(record, sequence, &mut refs);
            }
            ScanItem::Corrupt { offset, len, error } => damaged.push(SkippedRecord {
                position: Position {
                    segment: sequence,
                    offset,
                },
                bytes: len,
                error,
            }),
            ScanItem::Unframed { offset, error } => stop = Some((offset, error)),
        }
    }
    let scan_end = scan.offset();
    let (in_middle, in_tail): (Vec<_>, Vec<_>) = damaged
        .into_iter()
        .partition(|s| s.position.offset < last_good_end);
    report.skipped.extend(in_middle);
    let tail_error = in_tail
        .into_iter()
        .next()
        .map(|s| s.error)
        .or(stop.map(|(_, e)| e));
    SegmentScanned {
        refs,
        last_good_end,
        scan_end,
        tail_error,
    }
}

/// Recovery, cut: what to do with the bytes after a segment's good data depends on whether the
/// segment is recycled (leftovers behind its data are expected) and whether it is the last one
/// (the only one appended to, so the only one whose tail is cleared).
fn cut_torn_tail(
    segment: &mut Segment,
    scanned: &SegmentScanned,
    is_last: bool,
    recycled: bool,
    report: &mut RecoveryReport,
) -> Result<(), LogError> {
    if recycled {
        cut_recycled_tail(segment, scanned, is_last, report)
    } else if is_last {
        cut_last_tail(segment, scanned, report)
    } else {
        note_earlier_tail(segment, scanned, report);
        Ok(())
    }
}

/// A recycled segment's data ends at an end marker right after the last good record; what lies
/// behind it is leftovers and is not looked at. Without one, the tail is torn: in the last
/// segment a bounded prefix is copied aside (see `RECYCLED_CUT_COPY_BYTES_MAX`) and the data
/// ended where the good records end, so appends go on from there; in an earlier one the tear
/// is only reported.
fn cut_recycled_tail(
    segment: &mut Segment,
    scanned: &SegmentScanned,
    is_last: bool,
    report: &mut RecoveryReport,
) -> Result<(), LogError> {
    let last_good_end = scanned.last_good_end;
    let bytes = segment.bytes().expect("recovered segments are mapped");
    if ends_data_at(bytes, last_good_end) {
        return Ok(());
    }
    let segment_end = bytes.len() as u64;
    let (cut_bytes, zeroed, saved_to) = if is_last {
        let window_end = (last_good_end + RECYCLED_CUT_COPY_BYTES_MAX).min(segment_end);
        let copy_end = scan_last_nonzero(bytes, last_good_end, window_end)
            .map_or(last_good_end, |last| last + 1);
        let marker_end = (last_good_end + FRAME_BYTES as u64).min(segment_end);
        let saved_to = cut_tail(segment, last_good_end, copy_end, marker_end)?;
        (copy_end - last_good_end, true, saved_to)
    } else {
        let examined = scanned
            .scan_end
            .max(last_good_end + FRAME_BYTES as u64)
            .min(segment_end)
            - last_good_end;
        (examined, false, None)
    };
    report.cuts.push(TailCut {
        position: Position {
            segment: segment.sequence(),
            offset: last_good_end,
        },
        bytes: cut_bytes,
        zeroed,
        saved_to,
        error: scanned.tail_error.clone(),
        recycled: true,
    });
    Ok(())
}

/// The last segment, fresh: everything after its good data up to its last non-zero byte is
/// copied aside and zeroed, so that new records follow the good ones on clean ground.
fn cut_last_tail(
    segment: &mut Segment,
    scanned: &SegmentScanned,
    report: &mut RecoveryReport,
) -> Result<(), LogError> {
    let last_good_end = scanned.last_good_end;
    let bytes = segment.bytes().expect("recovered segments are mapped");
    let Some(last_nonzero) = last_nonzero_from(segment.raw_fd(), bytes, last_good_end) else {
        return Ok(());
    };
    let cut_bytes = last_nonzero - last_good_end + 1;
    let end = last_good_end + cut_bytes;
    let saved_to = cut_tail(segment, last_good_end, end, end)?;
    report.cuts.push(TailCut {
        position: Position {
            segment: segment.sequence(),
            offset: last_good_end,
        },
        bytes: cut_bytes,
        zeroed: true,
        saved_to,
        error: scanned.tail_error.clone(),
        recycled: false,
    });
    Ok(())
}

/// An earlier fresh segment: a damaged tail is reported and left as evidence. A zeroed length
/// reads as the end of the data and hides the records after it; only non-zero bytes past the
/// end tell. An earlier segment's rest is small (it rolled because a record did not fit), so
/// looking costs little.
fn note_earlier_tail(segment: &Segment, scanned: &SegmentScanned, report: &mut RecoveryReport) {
    let last_good_end = scanned.last_good_end;
    let bytes = segment.bytes().expect("recovered segments are mapped");
    let last_nonzero = last_nonzero_from(segment.raw_fd(), bytes, last_good_end);
    if scanned.tail_error.is_none() && last_nonzero.is_none() {
        return;
    }
    let bytes = match last_nonzero {
        Some(last_nonzero) => last_nonzero - last_good_end + 1,
        None => scanned.scan_end.max(last_good_end) - last_good_end,
    };
    report.cuts.push(TailCut {
        position: Position {
            segment: segment.sequence(),
            offset: last_good_end,
        },
        bytes,
        zeroed: false,
        saved_to: None,
        error: scanned.tail_error.clone(),
        recycled: false,
    });
}

/// Recovery, rebuild (pass 2): counts each segment's pending messages (those no ack names) and
/// notes its dead ones (`recovered_live_set`); returns how many are pending in all. Nothing of
/// a pending message is kept in memory: `ShardLog::for_each_pending` reads them from the
/// segments when the broker rebuilds its queues.
fn mark_live(
    states: &mut BTreeMap<u64, SegmentState>,
    mut acked: FxHashMap<u64, RoaringBitmap>,
) -> u64 {
    let mut live_messages = 0;
    for (&sequence, state) in states.iter_mut() {
        let acked_here = acked.remove(&sequence).unwrap_or_default();
        state.live = recovered_live_set(&state.segment, &acked_here);
        live_messages += state.live.count;
    }
    live_messages
}

/// A recovered segment's live set: its message records are live unless an ack names them or
/// they are transient (a transient record only saved memory while its run lasted: it never
/// comes back). Only message records found here are counted or noted dead, so an ack naming
/// anything else (a damaged or foreign record) changes nothing.
fn recovered_live_set(segment: &Segment, acked: &RoaringBitmap) -> LiveSet {
    let bytes = segment.bytes().expect("recovered segments are mapped");
    let mut live = LiveSet::default();
    for item in SegmentScan::new(bytes, segment.sequence()) {
        let ScanItem::Record {
            offset,
            record: RecordView::Message(m),
            ..
        } = item
        else {
            continue;
        };
        let slot = record_slot(offset).expect("records start at multiples of 8");
        if m.is_transient() || acked.contains(slot) {
            // The scan goes up, so this appends to the bitmap's last container.
            let dead = live.dead.get_or_insert_with(RoaringBitmap::new);
            dead.try_push(slot).expect("slots in ascending order");
        } else {
            live.count += 1;
        }
    }
    live.forget_dead(segment.write_offset());
    live
}

/// Opens one listed segment and checks its header. Returns `None` (after deleting the file) for
/// a segment whose creation never finished; else the segment and whether it is recycled.
fn open_checked(
    config: &LogConfig,
    sequence: u64,
    path: &Path,
    report: &mut RecoveryReport,
) -> Result<Option<(Segment, bool)>, LogError> {
    let len = fs::metadata(path).map_err(|e| LogError::io(path, e))?.len();
    if len < SEGMENT_HEADER_BYTES as u64 {
        let content = fs::read(path).map_err(|e| LogError::io(path, e))?;
        if content.iter().all(|&b| b == 0) {
            fs::remove_file(path).map_err(|e| LogError::io(path, e))?;
            report.removed_incomplete.push(path.to_owned());
            return Ok(None);
        }
        return Err(LogError::BadSegment {
            path: path.to_owned(),
            error: FormatError::Truncated {
                needed: SEGMENT_HEADER_BYTES as u64,
                available: len,
            },
        });
    }
    let mut segment = Segment::open_existing(sequence, path)?;
    let bytes = segment.bytes().expect("mapped");
    let header = match SegmentHeader::decode(bytes) {
        Ok(header) => header,
        Err(_) if bytes[..SEGMENT_HEADER_BYTES].iter().all(|&b| b == 0) => {
            // Created but the header never reached the disk: no sync covered this file, so no
            // record in it was ever reported durable.
            drop(segment);
            fs::remove_file(path).map_err(|e| LogError::io(path, e))?;
            report.removed_incomplete.push(path.to_owned());
            return Ok(None);
        }
        Err(error) => {
            return Err(LogError::BadSegment {
                path: path.to_owned(),
                error,
            })
        }
    };
    let what = if header.sequence != sequence {
        Some(format!("header says sequence {}", header.sequence))
    } else if header.shard != config.shard {
        Some(format!(
            "header says shard {}, this is shard {}",
            header.shard, config.shard
        ))
    } else if header.segment_bytes != len {
        Some(format!(
            "header says {} bytes, the file has {len}",
            header.segment_bytes
        ))
    } else {
        None
    };
    match what {
        Some(what) => Err(LogError::MisplacedSegment {
            path: path.to_owned(),
            what,
        }),
        None => {
            segment.set_format_version(header.format_version);
            Ok(Some((segment, header.is_recycled())))
        }
    }
}

/// Cuts a torn tail in recovery: copies `from..copy_end` beside the segment
/// (`<segment>.seg.cut-<from>`), zeroes `from..zero_end` and syncs. The copy is kept because a
/// damaged length in the middle of the segment also lands in the tail, with good records behind
/// it that an operator may want back; it is best effort (a full disk must not stop recovery),
/// and where it went is returned.
fn cut_tail(
    segment: &mut Segment,
    from: u64,
    copy_end: u64,
    zero_end: u64,
) -> Result<Option<PathBuf>, LogError> {
    let saved = segment.path().with_extension(format!("seg.cut-{from}"));
    let map = segment.bytes_mut().expect("recovered segments are mapped");
    let saved_to = fs::write(&saved, &map[from as usize..copy_end as usize])
        .ok()
        .map(|()| saved);
    map[from as usize..zero_end as usize].fill(0);
    segment.sync_data()?;
    Ok(saved_to)
}

/// A position named twice in `positions`: the first repeated one, or for long lists the lowest
/// repeated one. The broker names one position per call, so short lists are compared pairwise
/// without allocating; long ones are sorted.
fn first_repeated(positions: &[Position]) -> Option<Position> {
    if positions.len() <= 16 {
        return positions
            .iter()
            .enumerate()
            .find(|&(index, p)| positions[..index].contains(p))
            .map(|(_, &p)| p);
    }
    let mut sorted = positions.to_vec();
    sorted.sort_unstable();
    sorted.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
}

fn check_width(field: &'static str, len: usize) -> Result<(), LogError> {
    if u32::try_from(len).is_err() {
        return Err(LogError::FieldTooLong { field, len });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{LiveSet, LogConfig, LogError, MessageRecord, Position, ShardLog};
    use crate::log::BinaryId;

    /// A segment written up to `write_offset` with live records at `offsets`, in order.
    fn live_set(offsets: &[u64]) -> LiveSet {
        let mut live = LiveSet::default();
        for _ in offsets {
            live.appended();
        }
        live
    }

    #[test]
    fn live_set_kills_each_record_once_in_any_order() {
        let end = 8192;
        let offsets = [64, 72, 504, 512, end - 8];
        let mut live = live_set(&offsets);
        assert!(live.dead.is_none(), "nothing died: no set");
        assert!(offsets.iter().all(|&o| live.is_live(o, end)));
        assert!(live.kill(512, end));
        assert!(live.kill(64, end));
        assert!(!live.kill(512, end), "killed once only");
        assert!(!live.is_live(512, end) && !live.is_live(64, end));
        assert!(live.is_live(72, end));
        assert_eq!(live.count, 3);
        live.revive(64);
        assert!(live.is_live(64, end));
        live.forget_dead(end);
        assert!(live.dead.is_some(), "kept while a message is live");
        for offset in offsets.iter().filter(|&&o| o != 512) {
            assert!(live.kill(*offset, end), "{offset}");
        }
        live.forget_dead(end);
        assert!(live.dead.is_none(), "nothing live: the set goes");
        assert!(offsets.iter().all(|&o| !live.is_live(o, end)));
        // A record appended after that is live, the ones before stay dead.
        live.appended();
        assert!(live.is_live(end, end + 64));
        assert!(!live.is_live(72, end + 64));
    }

    /// What the set refuses without knowing where records start: every offset never written,
    /// every offset not a multiple of 8. An offset inside a live segment's written part reads as
    /// live: positions come from the log's own appends (see `LiveSet`).
    #[test]
    fn live_set_offsets_no_record_can_start_at_are_never_live() {
        let mut live = live_set(&[64]);
        let end = 4096;
        for offset in [
            0,
            8,
            56,
            65,
            68,
            end,
            end + 8,
            1 << 40,
            u64::MAX - 7,
            u64::MAX,
        ] {
            assert!(!live.is_live(offset, end), "{offset}");
            assert!(!live.kill(offset, end), "{offset}");
        }
        assert!(live.is_live(64, end));
        assert!(live.is_live(72, end), "inside the record: not known");
        assert!(live.kill(64, end));
        assert!(!live.is_live(72, end), "no live message in the segment");
    }

    /// Dead-set memory for a 64 MiB segment of 1 KiB messages, all acked but the last: the worst
    /// case a kept segment reaches (the bitmap it replaced took 1 MiB whatever was acked).
    /// Roaring keeps one container per 64 Ki slots (512 KiB of segment); with records this size
    /// each is an array of u16, one per dead record.
    #[test]
    fn a_nearly_all_acked_segment_of_1_kib_records_holds_under_a_quarter_mib() {
        let end = LogConfig::SEGMENT_BYTES_DEFAULT;
        let record = super::super::format::record_len(64, 1024); // a 1 KiB body, a few headers
        let offsets: Vec<u64> = (64..end - record).step_by(record as usize).collect();
        let mut live = live_set(&offsets);
        for &offset in &offsets[..offsets.len() - 1] {
            assert!(live.kill(offset, end));
        }
        let stats = live.dead.as_ref().unwrap().statistics();
        assert_eq!(stats.n_containers, 128);
        assert_eq!(stats.n_bitset_containers, 0, "arrays: 2 bytes a record");
        let payload = u64::from(stats.n_values_array_containers) * 2;
        eprintln!(
            "{} records of {record} bytes, {} dead: {payload} bytes of arrays in {} containers",
            offsets.len(),
            stats.cardinality,
            stats.n_containers
        );
        assert!(payload < 256 * 1024, "{payload}");
        assert!(live.kill(*offsets.last().unwrap(), end));
        live.forget_dead(end);
        assert!(live.dead.is_none());
    }

    fn small_log(dir: &std::path::Path) -> ShardLog {
        let mut config = LogConfig::new(dir, 0);
        config.segment_bytes = 2 * LogConfig::SEGMENT_BYTES_MIN;
        ShardLog::open_indexed(config).unwrap().0
    }

    fn append(log: &mut ShardLog, seq: u64, transient: bool) -> Position {
        let body = [b'x'; 1000];
        let record = MessageRecord {
            destination: b"/queue/live",
            id: BinaryId { shard: 0, seq },
            timestamp_ms: seq,
            header_block: b"",
            block_plain: true,
            transient,
            body: &body,
        };
        log.append_message(&record, 0).unwrap()
    }

    fn has_dead_set(log: &ShardLog, segment: u64) -> bool {
        log.segments[&segment].live.dead.is_some()
    }

    #[test]
    fn acks_and_releases_in_any_order_retire_each_message_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = small_log(dir.path());
        let p: Vec<Position> = (0..5).map(|seq| append(&mut log, seq, seq == 4)).collect();
        assert_eq!(p[0].segment, p[4].segment, "one segment");
        assert!(p.iter().all(|&q| log.is_live(q)));
        log.ack(&[p[3]], 0).unwrap();
        log.ack(&[p[0], p[2]], 0).unwrap();
        log.release(&[p[4]]).unwrap();
        assert_eq!(log.live_messages(), 1);
        let live: Vec<bool> = p.iter().map(|&q| log.is_live(q)).collect();
        assert_eq!(live, [false, true, false, false, false]);
        for q in [p[0], p[3], p[4]] {
            assert!(matches!(log.ack(&[q], 0), Err(LogError::NotLive(r)) if r == q));
            assert!(matches!(log.release(&[q]), Err(LogError::NotLive(r)) if r == q));
            assert!(matches!(log.delivered(&[q], 0), Err(LogError::NotLive(r)) if r == q));
        }
        assert!(matches!(log.ack(&[p[1], p[1]], 0), Err(LogError::NotLive(r)) if r == p[1]));
        assert!(matches!(log.ack(&[p[1], p[3]], 0), Err(LogError::NotLive(r)) if r == p[3]));
        assert!(log.is_live(p[1]), "a refused batch changes nothing");
        assert_eq!(log.live_messages(), 1);
        log.ack(&[p[1]], 0).unwrap();
        assert_eq!(log.live_messages(), 0);
        assert!(!has_dead_set(&log, p[1].segment), "all dead: the set goes");
        assert!(p.iter().all(|&q| !log.is_live(q)));
    }

    /// Pending messages cost no dead set, nor do delivered marks; an ack makes one, and it goes
    /// again once the segment's messages are all done (even the active segment, not reclaimed).
    #[test]
    fn a_segment_nobody_acked_in_holds_no_dead_set() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = small_log(dir.path());
        let p: Vec<Position> = (0..12).map(|seq| append(&mut log, seq, false)).collect();
        let segments = log.segment_sequences();
        assert!(segments.len() >= 2);
        log.delivered(&p, 0).unwrap();
        assert!(segments.iter().all(|&s| !has_dead_set(&log, s)));
        let last = p.last().unwrap().segment;
        let in_last: Vec<Position> = p.iter().copied().filter(|q| q.segment == last).collect();
        log.ack(&in_last[1..], 0).unwrap();
        assert!(has_dead_set(&log, last), "a message is live");
        log.ack(&in_last[..1], 0).unwrap();
        assert!(!has_dead_set(&log, last), "none is live");
        log.ack(&[p[0]], 0).unwrap();
        assert!(has_dead_set(&log, p[0].segment));
        assert!(segments[1..].iter().all(|&s| !has_dead_set(&log, s)));
    }

    /// Recovery counts only message records no ack names, leaves transient records dead, and
    /// ignores acks that name no message record; `recovered_end` is where the earlier run ended.
    #[test]
    fn recovery_rebuilds_live_sets_from_acks_and_transient_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = small_log(dir.path());
        assert_eq!(log.recovered_end(), log.appended_upto(), "an empty log");
        let p: Vec<Position> = (0..4).map(|seq| append(&mut log, seq, false)).collect();
        let transient = append(&mut log, 9, true);
        log.ack(&[p[1]], 0).unwrap();
        // Acks no run of the log writes: inside a record, unaligned, past the data.
        let at = |offset| Position {
            segment: p[0].segment,
            offset,
        };
        let bogus = [at(p[0].offset + 8), at(p[2].offset + 4), at(1 << 20)];
        log.append_refs(&bogus, true, 0).unwrap();
        log.sync_now().unwrap();
        let end = log.appended_upto();
        drop(log);

        let mut log = small_log(dir.path());
        assert_eq!(log.recovered_end(), end);
        assert_eq!(log.live_messages(), 3);
        let live: Vec<bool> = p.iter().map(|&q| log.is_live(q)).collect();
        assert_eq!(live, [true, false, true, true]);
        assert!(!log.is_live(transient));
        let mut pending = Vec::new();
        log.for_each_pending(|m| pending.push(m.position)).unwrap();
        assert_eq!(pending, [p[0], p[2], p[3]]);
        assert!(matches!(
            log.ack(&[transient], 0),
            Err(LogError::NotLive(_))
        ));
        let later = append(&mut log, 10, false);
        assert!(later >= log.recovered_end());
        assert_eq!(log.recovered_end(), end, "fixed at open");
        log.ack(&[p[0], p[2], p[3], later], 0).unwrap();
        assert_eq!(log.live_messages(), 0);
    }

    /// Acked in reverse order across segments: each segment goes once its messages are all
    /// acked, but the active one.
    #[test]
    fn segments_are_reclaimed_once_all_their_messages_are_acked() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = small_log(dir.path());
        let p: Vec<Position> = (0..20).map(|seq| append(&mut log, seq, false)).collect();
        let last = *p.last().unwrap();
        assert!(last.segment >= 2, "three segments or more");
        for q in p.iter().rev().skip(1) {
            log.ack(&[*q], 0).unwrap();
        }
        let reclaimed = log.reclaim().unwrap();
        assert_eq!(reclaimed, (0..last.segment).collect::<Vec<_>>());
        assert_eq!(log.segment_sequences()[0], last.segment);
        assert_eq!(log.live_messages(), 1);
        log.ack(&[last], 0).unwrap();
        log.reclaim().unwrap();
        assert_eq!(log.segment_sequences(), [log.appended_upto().segment]);
        assert_eq!(log.live_messages(), 0);
    }

    /// The premise of recycling, checked on real CRCs: a record written under one sequence
    /// never validates under another that `stale_records_cannot_validate` accepts, and a pair it
    /// refuses (sequences differing by the generator polynomial) really can collide.
    #[test]
    fn stale_records_validate_only_where_the_check_refuses_reuse() {
        use super::super::format::{decode_record, encode_record, Decoded, RecordRef};
        use super::stale_records_cannot_validate;
        let record = RecordRef::Ack(&[]);
        let validates = |old: u64, new: u64| {
            let mut bytes = vec![0u8; 64];
            encode_record(&mut bytes, old, &record);
            matches!(decode_record(&bytes, new), Decoded::Record { .. })
        };
        for (old, new) in [
            (0, 1),
            (5, 6),
            (1 << 31, (1 << 31) + 1),
            (7, u32::MAX as u64),
        ] {
            assert!(stale_records_cannot_validate(old, new));
            assert!(!validates(old, new), "{old} -> {new}");
        }
        assert!(!stale_records_cannot_validate(3, 3));
        // x^32 + x^26 + ... + 1 in the reflected bit order crc32fast uses for its input.
        let generator = 0x1_DB71_0641_u64;
        assert!(!stale_records_cannot_validate(0, generator));
        assert!(validates(0, generator), "the refused pair collides");
    }

    /// Past the shard's share of `disk_bytes_max` no segment is created: appends fail as on a
    /// full disk (`DiskBudget`, naming the limit), no spare is wanted, and once the messages
    /// are acknowledged and their segments reclaimed, appends work again.
    #[test]
    fn no_segment_is_created_past_the_disk_budget() {
        use super::{LogConfig, LogError, MessageRecord, ShardLog};
        let dir = tempfile::tempdir().unwrap();
        let mut config = LogConfig::new(dir.path(), 0);
        config.segment_bytes = 2 * LogConfig::SEGMENT_BYTES_MIN;
        config.disk_bytes_max = 3 * config.segment_bytes;
        let budget = config.disk_bytes_max;
        let (mut log, _) = ShardLog::open(config).unwrap();
        let body = [7u8; 1000];
        let record = MessageRecord {
            destination: b"/queue/budget",
            id: crate::log::BinaryId::default(),
            timestamp_ms: 0,
            header_block: b"",
            block_plain: true,
            transient: false,
            body: &body,
        };
        let mut positions = Vec::new();
        let error = loop {
            // As the event loop does between appends.
            if log.wants_spare() {
                log.prepare_spare(0).unwrap();
            }
            match log.append_message(&record, 0) {
                Ok(position) => positions.push(position),
                Err(error) => break error,
            }
            assert!(positions.len() < 100, "the budget never stopped appends");
            assert!(log.disk_bytes_held() <= budget);
        };
        assert!(
            matches!(error, LogError::DiskBudget { max_bytes } if max_bytes == budget),
            "{error}"
        );
        assert!(
            error.to_string().contains("disk_bytes_max exceeded"),
            "{error}"
        );
        assert_eq!(log.disk_bytes_held(), budget);
        assert!(!log.wants_spare(), "a spare past the budget");
        assert_eq!(log.segment_sequences().len(), 3);

        log.ack(&positions, 0).unwrap();
        log.reclaim().unwrap();
        assert!(log.disk_bytes_held() < budget);
        log.append_message(&record, 0).unwrap();
    }
}
