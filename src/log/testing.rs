//! Checks shared by the log format's fuzz target (`fuzz/fuzz_targets/log_record.rs`) and its
//! stable counterpart (`tests/log_fuzz_smoke.rs`), so that CI without nightly runs exactly what
//! the fuzzer checks.
//!
//! Recovery and the inspection tool read whatever a crash left in a segment, so the decoder and
//! the scan must be total over arbitrary bytes: never panic, never report a length or offset
//! outside the bytes, always end. And a record they accept must be exactly what the encoder
//! writes for it, or the reader accepts bytes the writer never produces.

use super::format::{
    decode_record, encode_record, encode_record_with_end_marker, ends_data_at, record_len,
    BinaryId, Decoded, MessageRecord, Position, RecordRef, RecordView, ScanItem, SegmentHeader,
    SegmentScan, StoredHeaders, StoredId, CRC_BYTES, FORMAT_VERSION, FRAME_BYTES, REFS_FIXED_BYTES,
    SEGMENT_HEADER_BYTES,
};

/// A decoded record with its bytes copied out, so it can be handed back to the encoder. Records
/// of the current format version: what [`decode_record`] reads and the writer appends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnedRecord {
    Message {
        destination: Vec<u8>,
        id: BinaryId,
        timestamp_ms: u64,
        header_block: Vec<u8>,
        block_plain: bool,
        transient: bool,
        body: Vec<u8>,
    },
    Ack(Vec<Position>),
    Delivered(Vec<Position>),
}

impl OwnedRecord {
    pub fn from_view(view: &RecordView<'_>) -> OwnedRecord {
        match view {
            RecordView::Message(m) => {
                let (StoredId::Binary(id), StoredHeaders::Block { bytes, plain }) =
                    (m.message_id(), m.stored_headers())
                else {
                    panic!("a message record of an older format version: {m:?}");
                };
                OwnedRecord::Message {
                    destination: m.destination.to_vec(),
                    id,
                    timestamp_ms: m.timestamp_ms,
                    header_block: bytes.to_vec(),
                    block_plain: plain,
                    transient: m.is_transient(),
                    body: m.body.to_vec(),
                }
            }
            RecordView::Ack(list) => OwnedRecord::Ack(list.iter().collect()),
            RecordView::Delivered(list) => OwnedRecord::Delivered(list.iter().collect()),
        }
    }

    /// Hands the record to `f` as the [`RecordRef`] the writer would append.
    pub fn with_ref<T>(&self, f: impl FnOnce(&RecordRef<'_>) -> T) -> T {
        match self {
            OwnedRecord::Message {
                destination,
                id,
                timestamp_ms,
                header_block,
                block_plain,
                transient,
                body,
            } => f(&RecordRef::Message(MessageRecord {
                destination,
                id: *id,
                timestamp_ms: *timestamp_ms,
                header_block,
                block_plain: *block_plain,
                transient: *transient,
                body,
            })),
            OwnedRecord::Ack(refs) => f(&RecordRef::Ack(refs)),
            OwnedRecord::Delivered(refs) => f(&RecordRef::Delivered(refs)),
        }
    }
}

/// Decodes the record at the start of `bytes` (which run to the end of a segment) and, if it is
/// a good one, re-encodes it with the public encoders into buffers as long as `bytes` and
/// requires the same bytes: framing, header part, body and CRC exactly, then zero padding.
/// Returns the record's length if one decoded.
///
/// The input's own padding is not compared: it is not covered by the CRC and the reader does
/// not look at it (the format's unit tests flip only CRC-covered bits for the same reason), so a
/// good record may carry non-zero padding that the writer would never produce.
///
/// Panics, saying what differs, on any violation.
pub fn check_record_roundtrip(bytes: &[u8], segment_sequence: u64) -> Option<usize> {
    let (view, len) = match decode_record(bytes, segment_sequence) {
        Decoded::Record { record, len } => (record, len),
        Decoded::Corrupt { len, error } => {
            assert!(
                len <= bytes.len() && len >= FRAME_BYTES + REFS_FIXED_BYTES + CRC_BYTES,
                "a damaged record ({error}) claims {len} bytes of {}",
                bytes.len()
            );
            assert_eq!(len % 8, 0, "a damaged record's length {len} is not aligned");
            return None;
        }
        Decoded::End | Decoded::Unframed(_) => return None,
    };
    assert!(
        len <= bytes.len(),
        "decoded a record of {len} bytes from {} bytes",
        bytes.len()
    );
    let header_len = u64::from_le_bytes(bytes[0..8].try_into().expect("8 bytes"));
    let body_len = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    assert_eq!(
        record_len(header_len, body_len),
        len as u64,
        "decoded length disagrees with the framing (H = {header_len}, B = {body_len})"
    );
    let crc_end = FRAME_BYTES + header_len as usize + body_len as usize + CRC_BYTES;

    let owned = OwnedRecord::from_view(&view);
    owned.with_ref(|record| {
        assert_eq!(
            record.encoded_len(),
            len,
            "re-encoding {owned:?} gives a different length"
        );
        assert_eq!(record.header_len() as u64, header_len, "header part length");
        assert_eq!(record.body_len() as u64, body_len, "body length");

        // A sentinel fill shows anything written past the record (or past its end marker).
        let mut out = vec![0xA5u8; bytes.len()];
        let written = encode_record(&mut out, segment_sequence, record);
        assert_eq!(written, len, "encode_record's length");
        if let Some(at) = (0..crc_end).find(|&i| out[i] != bytes[i]) {
            panic!(
                "re-encoded record differs from the decoded bytes at byte {at} of {crc_end} \
                 (0x{:02x} written, 0x{:02x} read): {owned:?}",
                out[at], bytes[at]
            );
        }
        assert!(
            out[crc_end..len].iter().all(|&b| b == 0),
            "padding {:02x?} is not zero",
            &out[crc_end..len]
        );
        assert!(
            out[len..].iter().all(|&b| b == 0xA5),
            "encode_record wrote past the record's {len} bytes"
        );
        assert_eq!(
            decode_record(&out, segment_sequence),
            Decoded::Record { record: view, len },
            "the re-encoded record decodes differently"
        );

        let mut out = vec![0xA5u8; bytes.len()];
        let written = encode_record_with_end_marker(&mut out, segment_sequence, record);
        assert_eq!(written, len, "encode_record_with_end_marker's length");
        assert_eq!(out[..crc_end], bytes[..crc_end], "record with end marker");
        let marker_end = bytes.len().min(len + FRAME_BYTES);
        assert!(
            out[crc_end..marker_end].iter().all(|&b| b == 0),
            "padding or end marker is not zero"
        );
        assert!(
            out[marker_end..].iter().all(|&b| b == 0xA5),
            "encode_record_with_end_marker wrote past the end marker"
        );
        assert_eq!(decode_record(&out[len..], segment_sequence), Decoded::End);
        assert!(
            ends_data_at(&out, len as u64),
            "the end marker ends the data"
        );
    });
    Some(len)
}

/// Scans `segment` (a whole segment's bytes, header area included, as recovery and the
/// inspection tool do) to the end and checks that it ends, that every item lies inside the
/// bytes at a strictly increasing, aligned offset, that nothing follows an `Unframed` item, that
/// the scan's final offset is in bounds, and that every good record round-trips
/// ([`check_record_roundtrip`]). Returns the number of items.
pub fn check_segment_scan(segment: &[u8], segment_sequence: u64) -> usize {
    let total = segment.len() as u64;
    // Every record or damaged record takes at least 24 bytes; one `Unframed` may end the scan.
    let max_items = segment.len() / (FRAME_BYTES + REFS_FIXED_BYTES) + 1;
    let mut scan = SegmentScan::new(segment, segment_sequence);
    let mut next_free = (SEGMENT_HEADER_BYTES as u64).min(total);
    let mut items = 0usize;
    let mut last_good_end = SEGMENT_HEADER_BYTES as u64;
    let mut unframed_at = None;
    let mut prev_offset: Option<u64> = None;
    for item in &mut scan {
        items += 1;
        assert!(
            items <= max_items,
            "the scan of {total} bytes returned more than {max_items} items"
        );
        if let Some(at) = unframed_at {
            panic!("the scan went on after untrustworthy framing at {at}: {item:?}");
        }
        let (offset, len) = match &item {
            ScanItem::Record { offset, len, .. } | ScanItem::Corrupt { offset, len, .. } => {
                (*offset, *len)
            }
            ScanItem::Unframed { offset, .. } => {
                unframed_at = Some(*offset);
                (*offset, 0)
            }
        };
        assert!(
            prev_offset.map_or(true, |prev| prev < offset),
            "offsets do not increase: {item:?} after an item at {prev_offset:?}"
        );
        assert_eq!(
            offset, next_free,
            "the previous item ended at {next_free}, the next is {item:?}"
        );
        prev_offset = Some(offset);
        assert_eq!(offset % 8, 0, "misaligned item {item:?}");
        assert!(
            offset <= total && len <= total - offset,
            "item at {offset}, {len} bytes long, runs past the {total} bytes: {item:?}"
        );
        if let ScanItem::Record { .. } | ScanItem::Corrupt { .. } = item {
            assert!(len > 0, "a zero-length item would not advance: {item:?}");
        }
        if let ScanItem::Record { record, .. } = &item {
            let at = offset as usize;
            assert_eq!(
                check_record_roundtrip(&segment[at..], segment_sequence),
                Some(len as usize),
                "the scan's record at {offset} does not decode alone as {record:?}"
            );
            last_good_end = offset + len;
        }
        next_free = offset + len;
    }
    assert!(
        scan.offset() <= total,
        "the scan ended at {} of {total} bytes",
        scan.offset()
    );
    assert!(scan.next().is_none(), "the scan resumed after it ended");
    // Recovery asks this right after the last good record of a recycled segment.
    ends_data_at(segment, last_good_end);
    ends_data_at(segment, scan.offset());
    items
}

/// Rewrites the CRC of every record whose framing is plausible, from the start of `bytes` along
/// the chain their lengths give, until the data ends or the framing stops making sense. Applied
/// to fuzzed or mutated bytes, it lets them past the CRC to the layout checks behind it.
pub fn reseal(bytes: &mut [u8], segment_sequence: u64) {
    let mut at = 0usize;
    while let Some(rest) = bytes.get_mut(at..) {
        if rest.len() < FRAME_BYTES {
            return;
        }
        let header_len = u64::from_le_bytes(rest[0..8].try_into().expect("8 bytes"));
        let body_len = u64::from_le_bytes(rest[8..16].try_into().expect("8 bytes"));
        let available = rest.len() as u64;
        if header_len < REFS_FIXED_BYTES as u64
            || header_len > available
            || body_len > available
            || record_len(header_len, body_len) > available
        {
            return;
        }
        let body_end = FRAME_BYTES + header_len as usize + body_len as usize;
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&segment_sequence.to_le_bytes());
        hasher.update(&rest[..body_end]);
        rest[body_end..body_end + CRC_BYTES].copy_from_slice(&hasher.finalize().to_le_bytes());
        at += record_len(header_len, body_len) as usize;
    }
}

/// A valid segment header for `sequence`, as recovery checks it before it scans.
pub fn segment_header(sequence: u64, segment_bytes: u64) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut out = [0u8; SEGMENT_HEADER_BYTES];
    SegmentHeader {
        format_version: FORMAT_VERSION,
        shard: 0,
        sequence,
        segment_bytes,
        created_ms: 0,
        flags: 0,
    }
    .encode(&mut out);
    out
}

/// The fuzz target's check, also run by the stable tests. The first 8 bytes (fewer: zero-padded)
/// are the segment sequence, u64 LE; the rest are the bytes at a record's offset, running to the
/// end of the segment. Checks, on the bytes as given and again with every plausible record's CRC
/// rewritten ([`reseal`]):
///
/// - [`check_record_roundtrip`] on the bytes;
/// - [`check_segment_scan`] on the bytes as a whole segment (the scan skips their first 64
///   bytes as the header) and on them behind a valid segment header (what recovery scans), where
///   the first item must be what [`decode_record`] said of the bytes alone.
pub fn check_log_input(data: &[u8]) {
    let split = data.len().min(8);
    let mut sequence = [0u8; 8];
    sequence[..split].copy_from_slice(&data[..split]);
    let sequence = u64::from_le_bytes(sequence);
    let rest = &data[split..];
    let mut resealed = rest.to_vec();
    reseal(&mut resealed, sequence);
    for bytes in [rest, &resealed[..]] {
        let decoded = check_record_roundtrip(bytes, sequence);
        check_segment_scan(bytes, sequence);

        let mut segment = Vec::with_capacity(SEGMENT_HEADER_BYTES + bytes.len());
        segment.extend_from_slice(&segment_header(
            sequence,
            (SEGMENT_HEADER_BYTES + bytes.len()) as u64,
        ));
        segment.extend_from_slice(bytes);
        check_segment_scan(&segment, sequence);
        let first = SegmentScan::new(&segment, sequence).next();
        match (decode_record(bytes, sequence), first) {
            (Decoded::Record { len, .. }, Some(ScanItem::Record { offset, len: l, .. })) => {
                assert_eq!((offset, l as usize), (SEGMENT_HEADER_BYTES as u64, len));
                assert_eq!(decoded, Some(len));
            }
            (Decoded::Corrupt { len, .. }, Some(ScanItem::Corrupt { len: l, .. })) => {
                assert_eq!(l as usize, len)
            }
            (Decoded::Unframed(_), Some(ScanItem::Unframed { .. })) | (Decoded::End, None) => {}
            (alone, first) => {
                panic!("decode_record says {alone:?} but the scan starts with {first:?}")
            }
        }
    }
}
