//! One segment file: preallocated, memory-mapped, appended to until full.
//!
//! This module owns the file-level operations: creating a segment (allocate every block up
//! front, write the header), mapping it, appending encoded records into the map, and opening a
//! segment read-only for inspection. Invariants: a segment file never changes length after it is
//! created (so a reader's map never faults past the end of the file); records are appended only
//! at `write_offset`, which only grows; a record never spans two segments; every append is
//! followed by an end marker (16 zero bytes, as many as fit), so a segment's data always ends
//! at `write_offset` even in a recycled file whose bytes after it are leftovers; a file is
//! renamed to a segment's name only once its header (and the end marker after it) is on disk,
//! so a segment name never points at a file whose header names another segment.
//!
//! Recycling: a reclaimed segment file may be kept under a name recovery ignores
//! ([`free_file_name`], `<sequence>.seg.free`) and reused by [`Segment::recycle`] for a later
//! sequence. Its pages are still in the page cache, so appends into it fault in existing pages
//! instead of having the kernel allocate and zero fresh ones (15-19% of the queue shard's CPU
//! in the profile in docs/PERFORMANCE.md).
//!
//! Why `fallocate` and not `set_len`: a sparse file would let the disk fill up underneath the
//! map, and a write fault on a page with no block behind it kills the process with SIGBUS.
//! Allocating every block at creation turns "disk full" into an error on the one call that can
//! return it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use memmap2::{Mmap, MmapMut, MmapOptions};

use super::error::LogError;
use super::format::{
    encode_record_with_end_marker, RecordRef, SegmentHeader, SegmentScan, FORMAT_VERSION,
    FRAME_BYTES, SEGMENT_HEADER_BYTES,
};

/// File name suffix of segment files.
pub const SEGMENT_SUFFIX: &str = ".seg";

/// File name suffix of a reclaimed segment file kept for reuse (after [`SEGMENT_SUFFIX`], so
/// `<sequence>.seg.free`): outside the segment name pattern, so recovery never reads it as data
/// (it deletes such files at start).
pub const FREE_SUFFIX: &str = ".free";

/// The file name of segment `sequence`: 20 decimal digits, so names sort like numbers.
pub fn segment_file_name(sequence: u64) -> String {
    format!("{sequence:020}{SEGMENT_SUFFIX}")
}

/// The name a reclaimed segment file `sequence` is kept under until it is reused.
pub fn free_file_name(sequence: u64) -> String {
    format!("{sequence:020}{SEGMENT_SUFFIX}{FREE_SUFFIX}")
}

/// The reclaimed segment files kept for reuse in `dir` (`*.seg.free`), in sequence order.
pub fn list_free_files(dir: &Path) -> Result<Vec<PathBuf>, LogError> {
    let free_suffix = format!("{SEGMENT_SUFFIX}{FREE_SUFFIX}");
    let found = list_numbered(dir, &free_suffix)?;
    Ok(found.into_iter().map(|(_, path)| path).collect())
}

/// The segments in `dir`, sorted by sequence. Files with other names are left alone.
pub fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, LogError> {
    list_numbered(dir, SEGMENT_SUFFIX)
}

/// The files in `dir` named by a 20-digit sequence and then exactly `suffix`, sorted by
/// sequence.
fn list_numbered(dir: &Path, suffix: &str) -> Result<Vec<(u64, PathBuf)>, LogError> {
    let mut found = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| LogError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| LogError::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(suffix) else {
            continue;
        };
        if stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(sequence) = stem.parse() {
                found.push((sequence, entry.path()));
            }
        }
    }
    found.sort_unstable_by_key(|&(sequence, _)| sequence);
    Ok(found)
}

/// A writable, mapped segment.
#[derive(Debug)]
pub struct Segment {
    /// Sequence number, also the file name.
    sequence: u64,
    /// Where the file lives, for errors and deletion.
    path: PathBuf,
    /// Kept open for syncs (the server passes its fd to io_uring) even after the map is dropped.
    file: File,
    /// The whole file mapped shared; `None` once the segment is sealed and no longer written.
    map: Option<MmapMut>,
    /// A sealed segment mapped again, read-only, when a paged-out message is read back from
    /// it ([`Segment::record_bytes`]). Page cache, which the kernel may drop: not the broker's
    /// anonymous memory.
    read_map: Option<Mmap>,
    /// Length of the file.
    segment_bytes: u64,
    /// Where the next record goes; the bytes here are an end marker (or the segment's end), and
    /// after it zeros, or leftovers of the file's earlier use in a recycled segment.
    write_offset: u64,
    /// Records appended since the last [`Segment::write_pending`], for the file from
    /// `pending_at` on. Appends go through `pwrite` in batches, not through the map: the
    /// kernel's write-back of a page written through a shared map must write-protect it in
    /// every thread's page tables, which costs a TLB-shootdown interrupt to the other shard
    /// threads' CPUs, and the next write to it a fault; with two shards passing messages that
    /// cost about a quarter of the throughput (BENCHMARKS.md, "How the figures moved").
    pending: Vec<u8>,
    /// File offset of `pending[0]`.
    pending_at: u64,
    /// Format version of the header, which its records follow (1 or 2 for a segment written by
    /// an older build, which is never appended to; a version 1 one is never recycled either);
    /// 0 until recovery has read the header of an existing segment.
    format_version: u32,
}

impl Segment {
    /// Creates segment `sequence` in `dir`: allocates all `segment_bytes`, writes the header and
    /// maps it. On any failure the partial file is removed, so nothing is left to recover.
    pub fn create(dir: &Path, header: SegmentHeader, populate: bool) -> Result<Segment, LogError> {
        debug_assert_eq!(header.format_version, FORMAT_VERSION);
        let path = dir.join(segment_file_name(header.sequence));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(&path)
            .map_err(|e| space_or_io(&path, e))?;
        let built = Self::fill_new(&file, &path, header, populate);
        match built {
            Ok(map) => Ok(Self::empty(header, path, file, map)),
            Err(error) => {
                drop(file);
                // The file holds nothing anyone relies on; if even this fails recovery deletes a
                // segment whose header is all zeros.
                let _ = fs::remove_file(&path);
                Err(error)
            }
        }
    }

    /// A new segment (created or recycled) with nothing appended yet.
    fn empty(header: SegmentHeader, path: PathBuf, file: File, map: MmapMut) -> Segment {
        Segment {
            sequence: header.sequence,
            path,
            file,
            map: Some(map),
            read_map: None,
            segment_bytes: header.segment_bytes,
            write_offset: SEGMENT_HEADER_BYTES as u64,
            pending: Vec::new(),
            pending_at: 0,
            format_version: header.format_version,
        }
    }

    fn fill_new(
        file: &File,
        path: &Path,
        header: SegmentHeader,
        populate: bool,
    ) -> Result<MmapMut, LogError> {
        allocate(file, header.segment_bytes).map_err(|e| space_or_io(path, e))?;
        let mut bytes = [0u8; SEGMENT_HEADER_BYTES];
        header.encode(&mut bytes);
        file.write_all_at(&bytes, 0)
            .map_err(|e| space_or_io(path, e))?;
        let mut options = MmapOptions::new();
        if populate {
            // See `LogConfig::populate` for when this pays.
            options.populate();
        }
        // SAFETY: the file is ours (created with create_new in the shard's directory, which only
        // this shard writes) and never changes length, so the map stays valid.
        unsafe { options.map_mut(file) }.map_err(|e| LogError::io(path, e))
    }

    /// Opens an existing segment for recovery, mapped writable so a torn tail can be zeroed.
    /// The header is not checked here; recovery does that on the mapped bytes.
    pub fn open_existing(sequence: u64, path: &Path) -> Result<Segment, LogError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| LogError::io(path, e))?;
        let segment_bytes = file.metadata().map_err(|e| LogError::io(path, e))?.len();
        // SAFETY: as in `create`; recovery runs before the shard serves, so no one else writes.
        let map =
            unsafe { MmapOptions::new().map_mut(&file) }.map_err(|e| LogError::io(path, e))?;
        Ok(Segment {
            sequence,
            path: path.to_owned(),
            file,
            map: Some(map),
            read_map: None,
            segment_bytes,
            write_offset: SEGMENT_HEADER_BYTES as u64,
            pending: Vec::new(),
            pending_at: 0,
            format_version: 0,
        })
    }

    /// Reuses the reclaimed segment file at `free` (see [`free_file_name`]) as segment
    /// `header.sequence` (a header with `SEGMENT_FLAG_RECYCLED`), in an order that keeps every
    /// crash state recoverable without loss:
    ///
    /// 1. fsync the directory `dir`, so the rename away from the old segment name (done by
    ///    reclaim) is on disk before the content changes: otherwise a crash could bring back the
    ///    old name over the new header, a misplaced segment recovery refuses;
    /// 2. write the new header and an end marker right after it, then fdatasync, so the final
    ///    name never points at a stale header or at the old first record;
    /// 3. rename to the segment's name (made durable by the next sync, as for a new file);
    /// 4. map it. No allocation: the file was allocated in full when it was first created.
    ///
    /// On failure the file is removed (under whichever name it has) and the caller creates a
    /// fresh segment instead; nothing ever holds a name and a header that disagree. Blocking
    /// (two syncs, where `create` blocks on fallocate): called where `create` would be, by
    /// `prepare_spare` at a tick or, when no spare was ready, by the roll itself.
    pub fn recycle(
        dir: &Path,
        dir_file: &File,
        free: &Path,
        header: SegmentHeader,
        populate: bool,
    ) -> Result<Segment, LogError> {
        debug_assert_eq!(header.format_version, FORMAT_VERSION);
        debug_assert!(header.is_recycled());
        let path = dir.join(segment_file_name(header.sequence));
        let mut renamed = false;
        let result =
            Self::recycle_steps(dir, dir_file, free, &path, header, populate, &mut renamed);
        match result {
            Ok((file, map)) => Ok(Self::empty(header, path, file, map)),
            Err(error) => {
                // Under its final name it is a valid empty segment (header and end marker were
                // synced before the rename); removing it only makes room for a fresh one.
                let _ = fs::remove_file(if renamed { &path } else { free });
                Err(error)
            }
        }
    }

    fn recycle_steps(
        dir: &Path,
        dir_file: &File,
        free: &Path,
        path: &Path,
        header: SegmentHeader,
        populate: bool,
        renamed: &mut bool,
    ) -> Result<(File, MmapMut), LogError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(free)
            .map_err(|e| LogError::io(free, e))?;
        let len = file.metadata().map_err(|e| LogError::io(free, e))?.len();
        if len != header.segment_bytes {
            return Err(LogError::io(
                free,
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "kept for reuse with {len} bytes, new segments have {}",
                        header.segment_bytes
                    ),
                ),
            ));
        }
        dir_file.sync_all().map_err(|e| LogError::io(dir, e))?;
        // The header, then an end marker (zeros) over the old first record.
        let mut bytes = [0u8; SEGMENT_HEADER_BYTES + FRAME_BYTES];
        let mut head = [0u8; SEGMENT_HEADER_BYTES];
        header.encode(&mut head);
        bytes[..SEGMENT_HEADER_BYTES].copy_from_slice(&head);
        file.write_all_at(&bytes, 0)
            .map_err(|e| space_or_io(free, e))?;
        file.sync_data().map_err(|e| LogError::io(free, e))?;
        fs::rename(free, path).map_err(|e| LogError::io(path, e))?;
        *renamed = true;
        let mut options = MmapOptions::new();
        if populate {
            options.populate();
        }
        // SAFETY: as in `create`: the file is ours, in the shard's own directory, and its length
        // never changes.
        let map = unsafe { options.map_mut(&file) }.map_err(|e| LogError::io(path, e))?;
        Ok((file, map))
    }

    /// Records what recovery read in the header of an existing segment.
    pub(crate) fn set_format_version(&mut self, format_version: u32) {
        self.format_version = format_version;
    }

    /// Format version of the segment's header.
    pub fn format_version(&self) -> u32 {
        self.format_version
    }

    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn segment_bytes(&self) -> u64 {
        self.segment_bytes
    }

    pub fn write_offset(&self) -> u64 {
        self.write_offset
    }

    pub(crate) fn set_write_offset(&mut self, offset: u64) {
        assert!(offset >= SEGMENT_HEADER_BYTES as u64 && offset <= self.segment_bytes);
        self.write_offset = offset;
    }

    /// Bytes left for records.
    pub fn remaining(&self) -> u64 {
        self.segment_bytes - self.write_offset
    }

    /// The raw descriptor, for an io_uring FSYNC; valid as long as this segment lives.
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The mapped bytes (the whole file), while the segment is mapped.
    pub fn bytes(&self) -> Option<&[u8]> {
        self.map.as_deref()
    }

    pub(crate) fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        self.map.as_deref_mut()
    }

    /// The bytes from `offset` to the end of the segment as a reader sees them: records
    /// appended since the last [`Segment::write_pending`] from that batch, the rest from the
    /// file through the map (a sealed segment is mapped again, read-only, the first time).
    pub fn record_bytes(&mut self, offset: u64) -> Result<&[u8], LogError> {
        if !self.pending.is_empty() && offset >= self.pending_at {
            let start = (offset - self.pending_at) as usize;
            return Ok(self.pending.get(start..).unwrap_or_default());
        }
        if self.map.is_none() && self.read_map.is_none() {
            // SAFETY: as for the writable map: only this shard writes the file, and never
            // where a live record is; a reader checks each record's CRC.
            let map = unsafe { MmapOptions::new().map(&self.file) }
                .map_err(|e| LogError::io(&self.path, e))?;
            self.read_map = Some(map);
        }
        let bytes = match (&self.map, &self.read_map) {
            (Some(map), _) => &map[..],
            (None, Some(map)) => &map[..],
            (None, None) => unreachable!("mapped above"),
        };
        Ok(bytes.get(offset as usize..).unwrap_or_default())
    }

    /// Appends `record` at the write offset and returns the offset it was written at. The caller
    /// has checked that it fits (`remaining()`); the segment must still be mapped.
    pub fn append(&mut self, record: &RecordRef<'_>) -> u64 {
        let len = record.encoded_len() as u64;
        let offset = self.write_offset;
        assert!(
            len <= self.remaining(),
            "record does not fit: caller must roll"
        );
        assert!(self.map.is_some(), "appending to a sealed segment");
        debug_assert_eq!(
            self.format_version, FORMAT_VERSION,
            "records are appended in the segment's own version only"
        );
        if self.pending.is_empty() {
            self.pending_at = offset;
        }
        debug_assert_eq!(self.pending_at + self.pending.len() as u64, offset);
        let start = self.pending.len();
        // Room for the end marker too, which the next record overwrites (see `write_pending`).
        self.pending.resize(start + len as usize + FRAME_BYTES, 0);
        let written =
            encode_record_with_end_marker(&mut self.pending[start..], self.sequence, record) as u64;
        // Assert pair, writing side: what was encoded is exactly as long as planned; the CRC is
        // re-checked in debug builds the way a reader will check it.
        assert_eq!(written, len);
        debug_assert!(matches!(
            super::format::decode_record(&self.pending[start..], self.sequence),
            super::format::Decoded::Record { len: l, .. } if l as u64 == len
        ));
        self.pending.truncate(start + len as usize);
        self.write_offset += len;
        offset
    }

    /// Whether appended records wait for [`Segment::write_pending`].
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Writes the records appended since the last call into the file (the page cache), with the
    /// end marker after the last one (as many of its bytes as fit). The shard calls this before
    /// each sync and at the end of each event-loop turn, before any frame of that turn goes out,
    /// so a crash of the process alone still loses nothing a client was told about.
    pub fn write_pending(&mut self) -> Result<(), LogError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let records = self.pending.len();
        let end = self.pending_at + records as u64;
        let marker = (FRAME_BYTES as u64).min(self.segment_bytes - end) as usize;
        self.pending.resize(records + marker, 0);
        let result = self.file.write_all_at(&self.pending, self.pending_at);
        self.pending.clear();
        result.map_err(|e| space_or_io(&self.path, e))
    }

    /// Drops the map once the segment is full: sealed segments are only synced and, later,
    /// deleted, and each map costs address space and page tables.
    pub fn seal(&mut self) {
        debug_assert!(self.pending.is_empty(), "sealed with records not written");
        self.map = None;
    }

    /// Blocking fdatasync, for recovery, tools, tests and shutdown (never on the event loop).
    /// Records not yet written (`write_pending`) are not covered.
    pub fn sync_data(&self) -> Result<(), LogError> {
        self.file
            .sync_data()
            .map_err(|e| LogError::io(&self.path, e))
    }
}

impl Drop for Segment {
    /// A log dropped without a sync (a test's crash, a stop after a failed sync) still puts what
    /// was appended into the page cache, as the map did before appends were batched: only the
    /// death of the process loses the current turn's records.
    fn drop(&mut self) {
        if let Err(error) = self.write_pending() {
            tracing::warn!("records not written when the segment was closed: {error}");
        }
    }
}

/// Out of blocks, inodes or quota, or over the file-size limit: the broker answers a SEND with
/// an ERROR for these, and they clear once acknowledged segments are deleted.
fn space_or_io(path: &Path, source: io::Error) -> LogError {
    match source.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => LogError::NoSpace {
            path: path.to_owned(),
            source,
        },
        _ => LogError::io(path, source),
    }
}

/// Allocates every block of a new file. `fallocate` reserves blocks without writing them; where
/// the file system lacks it, zeros are written instead, which also allocates every block.
fn allocate(file: &File, len: u64) -> io::Result<()> {
    let len_off =
        libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    let error = loop {
        // SAFETY: fallocate on a descriptor we own, with no pointers involved.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len_off) };
        if rc == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            break error;
        }
    };
    if error.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(error);
    }
    let zeros = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// A segment opened read-only, for the inspection tool. Safe to use on a live broker's
/// directory: it never writes, the file never shrinks (segments are zeroed or ended with an end
/// marker, not truncated; a recycled file gets a segment name only with its new header), and
/// a record being written shows up as the end of the scan rather than an error. If the broker
/// deletes the segment meanwhile, the map keeps the old contents alive; if it reuses the file
/// for a new segment (recycling), the map shows the new contents, which
/// [`SegmentReader::reused_since_open`] tells.
#[derive(Debug)]
pub struct SegmentReader {
    sequence: u64,
    header: Result<SegmentHeader, super::format::FormatError>,
    map: Option<Mmap>,
    /// Kept open to ask the file system where data lies (`last_nonzero_from`).
    file: File,
    /// The name it was opened under, to tell whether that name still holds this file.
    path: PathBuf,
}

impl SegmentReader {
    /// Opens and maps the segment at `path` read-only. `sequence` comes from its file name.
    pub fn open(sequence: u64, path: &Path) -> Result<SegmentReader, LogError> {
        let file = File::open(path).map_err(|e| LogError::io(path, e))?;
        let len = file.metadata().map_err(|e| LogError::io(path, e))?.len();
        // An empty file cannot be mapped; it reads as a segment with a truncated header.
        let map = if len == 0 {
            None
        } else {
            // SAFETY: read-only shared map. The broker writes only past the records this reader
            // looks at (over zeros, or a recycled file's leftovers) and never truncates
            // segments; torn reads of a record being written are caught by its CRC.
            Some(unsafe { Mmap::map(&file) }.map_err(|e| LogError::io(path, e))?)
        };
        let header = SegmentHeader::decode(map.as_deref().unwrap_or(&[]));
        Ok(SegmentReader {
            sequence,
            header,
            map,
            file,
            path: path.to_owned(),
        })
    }

    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// The segment header, or why it could not be read.
    pub fn header(&self) -> &Result<SegmentHeader, super::format::FormatError> {
        &self.header
    }

    /// The whole file as mapped (empty for an empty file).
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Whether this is a segment whose creation never finished: its header (or as much of it
    /// as the file holds) is all zeros. Recovery removes such a file; no record in it was ever
    /// reported durable. On a live broker it is also a segment being created right now.
    pub fn is_blank(&self) -> bool {
        let bytes = self.bytes();
        bytes[..bytes.len().min(SEGMENT_HEADER_BYTES)]
            .iter()
            .all(|&b| b == 0)
    }

    /// Length of the file (0 for an empty file).
    pub fn file_bytes(&self) -> u64 {
        self.map.as_ref().map_or(0, |map| map.len() as u64)
    }

    /// The offset of the last non-zero byte at or after `from`, if any: how recovery finds what
    /// lies past the end of a segment's data (a torn record whose framing never landed, a
    /// zeroed length hiding good records). Reads only the regions the file system reports as
    /// data, so an empty 64 MiB segment costs almost nothing.
    pub fn last_nonzero_from(&self, from: u64) -> Option<u64> {
        let bytes = self.map.as_deref().unwrap_or(&[]);
        if from >= bytes.len() as u64 {
            return None;
        }
        last_nonzero_from(self.file.as_raw_fd(), bytes, from)
    }

    /// Whether the broker reused the file for another segment since it was opened (recycling
    /// rewrites the header of the same file, then appends new records): the map then shows new
    /// contents, so a scan may have seen a mix. Only a reclaimed segment, which held nothing
    /// needed, is reused, so readers treat it as deleted. Check after scanning: the header
    /// changes before any other byte does.
    ///
    /// The reuse can also come between opening and reading the header: the header then names
    /// another sequence than the file name, which at rest would be damage (a misplaced
    /// segment), but here the name no longer holds this file (it was renamed away to be
    /// reused).
    pub fn reused_since_open(&self) -> bool {
        match &self.header {
            Ok(header) if header.sequence != self.sequence && !self.still_named_by_path() => true,
            Ok(header) => SegmentHeader::decode(self.bytes()).as_ref() != Ok(header),
            Err(_) => false,
        }
    }

    /// Whether the name it was opened under still names this file (same device and inode).
    fn still_named_by_path(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(&self.path), self.file.metadata()) {
            (Ok(named), Ok(open)) => named.dev() == open.dev() && named.ino() == open.ino(),
            _ => false,
        }
    }

    /// The records of the segment, read in its header's format version (none if its header is
    /// bad).
    pub fn scan(&self) -> SegmentScan<'_> {
        match (&self.header, &self.map) {
            (Ok(header), Some(map)) => {
                SegmentScan::with_version(&map[..], self.sequence, header.format_version)
            }
            _ => SegmentScan::new(&[], self.sequence),
        }
    }
}

/// The offset of the last non-zero byte at or after `from` in a segment's bytes, if any.
///
/// Only regions the file system reports as data (SEEK_DATA/SEEK_HOLE) are read: the unwritten
/// rest of a preallocated segment is a hole to it, so recovery does not fault in (and fill the
/// page cache with) up to a whole segment of zeros. Pages written through the map but not yet on
/// disk are in the page cache, which SEEK_DATA counts as data. Where lseek cannot tell, the whole
/// range is read.
pub(crate) fn last_nonzero_from(fd: RawFd, bytes: &[u8], from: u64) -> Option<u64> {
    let end = bytes.len() as u64;
    let mut last = None;
    let mut at = from;
    while at < end {
        // SAFETY: lseek on a descriptor the caller keeps open; no pointers involved.
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break; // no data from `at` to the end of the file
            }
            return scan_last_nonzero(bytes, at, end).or(last);
        }
        let data = (data as u64).max(at);
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        if data >= end {
            break;
        }
        if let Some(found) = scan_last_nonzero(bytes, data, hole) {
            last = Some(found);
        }
        at = hole.max(data + 1);
    }
    last
}

/// The offset of the last non-zero byte of `bytes[from..to]`, if any, by reading it all.
pub(crate) fn scan_last_nonzero(bytes: &[u8], from: u64, to: u64) -> Option<u64> {
    bytes[from as usize..to as usize]
        .iter()
        .rposition(|&b| b != 0)
        .map(|i| from + i as u64)
}
