//! A log written by format version 1 is kept in `tests/fixtures/log-v1/`, one written by
//! version 2 (with a recycled segment) in `tests/fixtures/log-v2/`, and one written by version 3
//! (binary ids, header blocks, transient records) in `tests/fixtures/log-v3/`; all must open,
//! with exactly this content, in every later build. Do not regenerate them when the format
//! changes: add a fixture for the new version beside them and keep these tests.
//!
//! The version 1 and 2 fixtures were written by `write_fixture` and `write_fixture_v2`, which
//! this build can no longer run (it writes version 3 only): see them in the commits that added
//! the fixtures, `git show 4a6942a:tests/log_fixture.rs` and `git show 8cc640c:tests/log_fixture.rs`.
//! The version 3 one is written by `write_fixture_v3` below:
//! `STOMPD_WRITE_LOG_FIXTURE=1 cargo test --test log_fixture write_fixture_v3 -- --ignored`.

use std::fs;
use std::path::{Path, PathBuf};

use stompd::log::format::{
    decode_record, decode_record_as, Decoded, RecordView, ScanItem, SegmentHeader, StoredHeaders,
    MESSAGE_FLAG_BLOCK_PLAIN, MESSAGE_FLAG_TRANSIENT, SEGMENT_FLAG_RECYCLED,
};
use stompd::log::{
    list_segments, BinaryId, LogConfig, MessageRecord, Position, SegmentReader, ShardInspection,
    ShardLog, StoredId,
};

const SEGMENT_BYTES: u64 = 16 * 1024;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/log-v1")
}

fn config(data_dir: &Path) -> LogConfig {
    let mut config = LogConfig::new(data_dir, 0);
    config.segment_bytes = SEGMENT_BYTES;
    config.populate = false;
    config
}

fn order_body(i: u64) -> Vec<u8> {
    format!("order {i:03};").repeat(40).into_bytes()
}

#[test]
fn a_version_1_log_still_opens_with_exactly_its_content() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = config(tmp.path()).dir;
    fs::create_dir_all(&copy).unwrap();
    let original = config(&fixture_dir()).dir;
    for (_, path) in list_segments(&original).unwrap() {
        fs::copy(&path, copy.join(path.file_name().unwrap())).unwrap();
    }

    // Raw bytes: the segment header as docs/log-format.md describes it.
    let first = fs::read(copy.join("00000000000000000000.seg")).unwrap();
    assert_eq!(first.len() as u64, SEGMENT_BYTES);
    assert_eq!(&first[0..8], b"STOMPDLG");
    assert_eq!(u32::from_le_bytes(first[8..12].try_into().unwrap()), 1);
    assert_eq!(
        SegmentHeader::decode(&first).unwrap(),
        SegmentHeader {
            format_version: 1,
            shard: 0,
            sequence: 0,
            segment_bytes: SEGMENT_BYTES,
            created_ms: 1_700_000_000_001,
            flags: 0,
        }
    );

    let (log, recovery) = ShardLog::open(config(tmp.path())).unwrap();
    assert!(recovery.report.is_clean(), "{}", recovery.report);
    assert_eq!(recovery.report.segments, 2);
    assert_eq!(recovery.queues.len(), 2);

    // audit-0 was written before order 10, the first pending order.
    let [audit, orders] = &recovery.queues[..] else {
        panic!("two queues expected");
    };
    assert_eq!(orders.destination, b"/queue/orders");
    let expected: Vec<u64> = (10..40).filter(|&i| i != 20).collect();
    assert_eq!(orders.messages.len(), expected.len());
    for (m, &i) in orders.messages.iter().zip(&expected) {
        assert_eq!(m.message_id.text(), format!("ID:fixture-1:{i}").as_bytes());
        assert_eq!(m.timestamp_ms, 1_700_000_000_001 + i);
        assert_eq!(m.body, order_body(i));
        assert_eq!(m.headers.len(), 2);
        assert_eq!(m.headers[0].name.as_ref(), b"persistent");
        assert_eq!(m.headers[0].value.as_ref(), b"true");
        assert_eq!(m.headers[1].name.as_ref(), b"priority");
        assert_eq!(m.headers[1].value.as_ref(), (i % 10).to_string().as_bytes());
        assert_eq!(m.redelivered, i == 10 || i == 11, "order {i}");
        assert_eq!(m.deliveries, u32::from(m.redelivered), "order {i}");
    }
    // Header 64 + ten orders of 16 + 90 + 400 + 4 = 510 -> 512 bytes + two audit messages of
    // 16 + 119 + 4 = 139 -> 144 bytes (docs/log-format.md, worked by hand).
    assert_eq!(
        orders.messages[0].position,
        Position {
            segment: 0,
            offset: 64 + 10 * 512 + 2 * 144
        }
    );

    assert_eq!(audit.destination, b"/queue/audit");
    let ids: Vec<Vec<u8>> = audit
        .messages
        .iter()
        .map(|m| m.message_id.text().into_owned())
        .collect();
    assert_eq!(
        ids,
        [
            &b"ID:fixture-1:audit-0"[..],
            b"ID:fixture-1:audit-8",
            b"ID:fixture-1:audit-16",
            b"ID:fixture-1:audit-24",
            b"ID:fixture-1:audit-32",
        ]
    );
    for m in &audit.messages {
        assert!(m.body.is_empty());
        let headers: Vec<(&[u8], &[u8])> = m
            .headers
            .iter()
            .map(|h| (h.name.as_ref(), h.value.as_ref()))
            .collect();
        assert_eq!(
            headers,
            [
                (&b"content-type"[..], &b"text/plain"[..]),
                (b"x-colon", b"a:b\nc"),
                (b"empty", b""),
            ]
        );
    }
    assert_eq!(log.live_messages(), 34);

    // The read-only reader sees the same records, kinds in the order written.
    let mut kinds = String::new();
    for (sequence, path) in list_segments(&copy).unwrap() {
        let reader = SegmentReader::open(sequence, &path).unwrap();
        for item in reader.scan() {
            match item {
                ScanItem::Record { record, .. } => kinds.push(match record {
                    RecordView::Message(_) => 'm',
                    RecordView::Ack(_) => 'a',
                    RecordView::Delivered(_) => 'd',
                }),
                other => panic!("{other:?}"),
            }
        }
        kinds.push('|');
    }
    assert_eq!(kinds.matches('m').count(), 45);
    assert_eq!(kinds.matches('a').count(), 2);
    assert_eq!(kinds.matches('d').count(), 1);
    assert!(kinds.contains("mad"), "{kinds}");
}

// Version 2: a log whose last segment is a recycled file, with the records of the segment it
// held before still behind its data. Written by `write_fixture_v2` (see the module comment).

fn fixture_v2_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/log-v2")
}

/// Copies a fixture's segment files into a fresh data directory.
fn copy_fixture(from: &Path, data_dir: &Path) -> PathBuf {
    let copy = config(data_dir).dir;
    fs::create_dir_all(&copy).unwrap();
    for (_, path) in list_segments(&config(from).dir).unwrap() {
        fs::copy(&path, copy.join(path.file_name().unwrap())).unwrap();
    }
    copy
}

#[test]
fn a_version_2_log_with_a_recycled_segment_opens_with_exactly_its_content() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = copy_fixture(&fixture_v2_dir(), tmp.path());

    // Raw bytes: segment 1 is a fresh file, segment 2 segment 0's file reused (flag bit 0),
    // with segment 0's orders 5 to 29 still valid under sequence 0 behind its data.
    let fresh = fs::read(copy.join("00000000000000000001.seg")).unwrap();
    assert_eq!(u32::from_le_bytes(fresh[8..12].try_into().unwrap()), 2);
    assert_eq!(u32::from_le_bytes(fresh[20..24].try_into().unwrap()), 0);
    let recycled = fs::read(copy.join("00000000000000000002.seg")).unwrap();
    assert_eq!(
        SegmentHeader::decode(&recycled).unwrap(),
        SegmentHeader {
            format_version: 2,
            shard: 0,
            sequence: 2,
            segment_bytes: SEGMENT_BYTES,
            created_ms: 1_700_000_100_059,
            flags: SEGMENT_FLAG_RECYCLED,
        }
    );
    // Four orders of 16 + (24 + 13 + 15 + 22) + 400 + 4 = 493 -> 496 bytes, an ack of one
    // reference (48), the audit message (144), a delivered mark (48), then the end marker.
    let data_end = 64 + 4 * 496 + 48 + 144 + 48;
    assert!(recycled[data_end..data_end + 16].iter().all(|&b| b == 0));
    for k in 5..30 {
        let offset = 64 + 496 * k;
        assert!(
            matches!(
                decode_record_as(&recycled[offset..], 0, 2),
                Decoded::Record { .. }
            ),
            "old order {k} left over at {offset}"
        );
    }

    let (log, recovery) = ShardLog::open(config(tmp.path())).unwrap();
    assert!(recovery.report.is_clean(), "{}", recovery.report);
    assert_eq!(recovery.report.segments, 2);
    let [orders, audit] = &recovery.queues[..] else {
        panic!("two queues expected");
    };
    assert_eq!(orders.destination, b"/queue/orders");
    let expected: Vec<u64> = (30..63).filter(|&i| i != 32).collect();
    let got: Vec<Vec<u8>> = orders
        .messages
        .iter()
        .map(|m| m.message_id.text().into_owned())
        .collect();
    let want: Vec<String> = expected
        .iter()
        .map(|i| format!("ID:fixture-2:{i}"))
        .collect();
    assert_eq!(got, want.iter().map(|w| w.as_bytes()).collect::<Vec<_>>());
    assert!(orders
        .messages
        .iter()
        .all(|m| m.message_id.binary().is_none()));
    for (m, &i) in orders.messages.iter().zip(&expected) {
        assert_eq!(m.timestamp_ms, 1_700_000_100_000 + i);
        assert_eq!(m.body, order_body(i));
        assert_eq!(m.headers.len(), 1);
        assert_eq!(m.redelivered, i == 30 || i == 62, "order {i}");
        assert_eq!(m.deliveries, u32::from(m.redelivered), "order {i}");
    }
    assert_eq!(
        orders.messages.last().unwrap().position,
        Position {
            segment: 2,
            offset: 64 + 3 * 496
        }
    );
    assert_eq!(audit.destination, b"/queue/audit");
    assert_eq!(audit.messages.len(), 1);
    assert_eq!(
        audit.messages[0].message_id,
        StoredId::Text(b"ID:fixture-2:audit".to_vec().into())
    );
    assert_eq!(
        log.appended_upto(),
        Position {
            segment: 2,
            offset: data_end as u64
        }
    );
    assert_eq!(log.live_messages(), 33);
    drop(log);

    // The read-only views agree: the recycled segment's scan ends at its end marker, and the
    // inspection finds nothing damaged and no stale record.
    let reader = SegmentReader::open(2, &copy.join("00000000000000000002.seg")).unwrap();
    let items: Vec<_> = reader.scan().collect();
    assert_eq!(items.len(), 7, "4 orders, ack, audit, delivered");
    assert!(items.iter().all(|i| matches!(i, ScanItem::Record { .. })));
    let inspection = ShardInspection::read(&copy).unwrap();
    assert!(inspection.is_clean(), "{:?}", inspection.segments);
    assert_eq!(inspection.records().count(), 29 + 2 + 7);
}

// Version 3: message records with a binary id and the header block as the broker holds it
// (one escaped block per audit message), transient records that never come back, acks and
// delivered marks, over two segments. Written by `write_fixture_v3`:
// `STOMPD_WRITE_LOG_FIXTURE=1 cargo test --test log_fixture write_fixture_v3 -- --ignored`.

fn fixture_v3_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/log-v3")
}

const V3_T0: u64 = 1_700_000_200_000;
/// The audit messages' block: `x-colon:a:b\nc` and an empty value, escaped for STOMP 1.2.
const V3_AUDIT_BLOCK: &[u8] = b"content-type:text/plain\nx-colon:a\\cb\\nc\nempty:\n";

fn order_block_v3(i: u64) -> String {
    format!("persistent:true\npriority:{}\n", i % 10)
}

#[test]
#[ignore = "writes the committed fixture; run only to create it"]
fn write_fixture_v3() {
    if std::env::var("STOMPD_WRITE_LOG_FIXTURE").is_err() {
        return;
    }
    let dir = fixture_v3_dir();
    let _ = fs::remove_dir_all(&dir);
    let (mut log, _) = ShardLog::open(config(&dir)).unwrap();
    let mut orders = Vec::new();
    for i in 0..40u64 {
        let t = V3_T0 + i;
        let block = order_block_v3(i);
        let body = order_body(i);
        orders.push(
            log.append_message(
                &MessageRecord {
                    destination: b"/queue/orders",
                    id: BinaryId { shard: 0, seq: i },
                    timestamp_ms: t,
                    header_block: block.as_bytes(),
                    block_plain: true,
                    transient: false,
                    body: &body,
                },
                t,
            )
            .unwrap(),
        );
        if i % 8 == 0 {
            log.append_message(
                &MessageRecord {
                    destination: b"/queue/audit",
                    id: BinaryId {
                        shard: 1,
                        seq: 1000 + i,
                    },
                    timestamp_ms: t,
                    header_block: V3_AUDIT_BLOCK,
                    block_plain: false,
                    transient: false,
                    body: b"",
                },
                t,
            )
            .unwrap();
        }
        if i % 10 == 5 {
            // A non-persistent message paged out to the log: never restored.
            log.append_message(
                &MessageRecord {
                    destination: b"/queue/orders",
                    id: BinaryId {
                        shard: 0,
                        seq: 5000 + i,
                    },
                    timestamp_ms: t,
                    header_block: b"persistent:false\n",
                    block_plain: true,
                    transient: true,
                    body: b"transient",
                },
                t,
            )
            .unwrap();
        }
        if i == 12 {
            log.ack(&orders[0..10], t).unwrap();
            log.delivered(&orders[10..12], t).unwrap();
        }
    }
    log.ack(&orders[20..21], V3_T0 + 40).unwrap();
    log.sync_now().unwrap();
    assert_eq!(log.segment_sequences(), [0, 1]);
}

#[test]
fn a_version_3_log_opens_with_exactly_its_content() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = copy_fixture(&fixture_v3_dir(), tmp.path());

    // Raw bytes: the header and the first message record as docs/log-format.md describes them
    // (its worked example).
    let first = fs::read(copy.join("00000000000000000000.seg")).unwrap();
    assert_eq!(
        SegmentHeader::decode(&first).unwrap(),
        SegmentHeader {
            format_version: 3,
            shard: 0,
            sequence: 0,
            segment_bytes: SEGMENT_BYTES,
            created_ms: V3_T0,
            flags: 0,
        }
    );
    let r = &first[64..];
    let h = 32 + 13 + 27;
    assert_eq!(u64::from_le_bytes(r[0..8].try_into().unwrap()), h);
    assert_eq!(u64::from_le_bytes(r[8..16].try_into().unwrap()), 400);
    assert_eq!(&r[16..20], &[1, MESSAGE_FLAG_BLOCK_PLAIN, 0, 0]);
    assert_eq!(u32::from_le_bytes(r[20..24].try_into().unwrap()), 27);
    assert_eq!(u64::from_le_bytes(r[24..32].try_into().unwrap()), V3_T0);
    assert_eq!(u32::from_le_bytes(r[32..36].try_into().unwrap()), 13);
    assert_eq!(&r[36..40], &[0, 0, 0, 0], "shard 0, reserved");
    assert_eq!(u64::from_le_bytes(r[40..48].try_into().unwrap()), 0, "seq");
    assert_eq!(&r[48..61], b"/queue/orders");
    assert_eq!(&r[61..88], b"persistent:true\npriority:0\n");
    assert_eq!(&r[88..488], order_body(0));
    // 16 + 72 + 400 + 4 = 492, padded to 496: the audit message follows.
    assert_eq!(&r[492..496], &[0, 0, 0, 0]);
    let Decoded::Record {
        record: RecordView::Message(audit),
        len,
    } = decode_record(&r[496..], 0)
    else {
        panic!("the audit message follows the first order");
    };
    assert_eq!(
        len,
        (16 + 32 + 12 + V3_AUDIT_BLOCK.len() + 4).next_multiple_of(8)
    );
    assert_eq!(
        audit.stored_headers(),
        StoredHeaders::Block {
            bytes: V3_AUDIT_BLOCK,
            plain: false
        }
    );

    let (log, recovery) = ShardLog::open(config(tmp.path())).unwrap();
    assert!(recovery.report.is_clean(), "{}", recovery.report);
    assert_eq!(recovery.report.segments, 2);
    let [audit, orders] = &recovery.queues[..] else {
        panic!("two queues expected");
    };
    assert_eq!(orders.destination, b"/queue/orders");
    let expected: Vec<u64> = (10..40).filter(|&i| i != 20).collect();
    let got: Vec<u64> = orders
        .messages
        .iter()
        .map(|m| m.message_id.binary().unwrap().seq)
        .collect();
    assert_eq!(got, expected, "no transient message came back");
    for (m, &i) in orders.messages.iter().zip(&expected) {
        assert_eq!(
            m.message_id,
            StoredId::Binary(BinaryId { shard: 0, seq: i })
        );
        assert_eq!(m.timestamp_ms, V3_T0 + i);
        assert_eq!(m.body, order_body(i));
        assert_eq!(m.headers[1].value.as_ref(), (i % 10).to_string().as_bytes());
        assert_eq!(m.redelivered, i == 10 || i == 11, "order {i}");
    }
    assert_eq!(audit.destination, b"/queue/audit");
    let ids: Vec<u64> = audit
        .messages
        .iter()
        .map(|m| m.message_id.binary().unwrap().seq)
        .collect();
    assert_eq!(ids, [1000, 1008, 1016, 1024, 1032]);
    for m in &audit.messages {
        assert_eq!(m.message_id.binary().unwrap().shard, 1);
        let headers: Vec<(&[u8], &[u8])> = m
            .headers
            .iter()
            .map(|h| (h.name.as_ref(), h.value.as_ref()))
            .collect();
        assert_eq!(
            headers,
            [
                (&b"content-type"[..], &b"text/plain"[..]),
                (b"x-colon", b"a:b\nc"),
                (b"empty", b""),
            ]
        );
    }
    assert_eq!(
        log.live_messages(),
        29 + 5,
        "transient records are not live"
    );
    drop(log);

    // The read-only views: four transient records are there, and none counts as pending.
    let inspection = ShardInspection::read(&copy).unwrap();
    assert!(inspection.is_clean(), "{:?}", inspection.segments);
    let transient = inspection
        .records()
        .filter(|r| matches!(r.record, RecordView::Message(m) if m.is_transient()))
        .count();
    assert_eq!(transient, 4);
    let pending: u64 = inspection.segments.iter().map(|s| s.pending).sum();
    assert_eq!(pending, 34);
    let reader = SegmentReader::open(0, &copy.join("00000000000000000000.seg")).unwrap();
    let flags: Vec<u8> = reader
        .scan()
        .filter_map(|item| match item {
            ScanItem::Record {
                record: RecordView::Message(m),
                ..
            } if m.destination == b"/queue/orders" => Some(m.flags()),
            _ => None,
        })
        .collect();
    assert!(flags.contains(&(MESSAGE_FLAG_TRANSIENT | MESSAGE_FLAG_BLOCK_PLAIN)));
}

/// A segment holds records of its own version only: after opening a version 1 or 2 log, the
/// first append starts a version 3 segment, and the old one keeps its records readable.
#[test]
fn appending_to_an_older_log_starts_a_version_3_segment() {
    for (fixture, last) in [(fixture_dir(), 1u64), (fixture_v2_dir(), 2)] {
        let tmp = tempfile::tempdir().unwrap();
        let copy = copy_fixture(&fixture, tmp.path());
        let before = fs::read(copy.join(format!("{last:020}.seg"))).unwrap();
        let (mut log, recovery) = ShardLog::open(config(tmp.path())).unwrap();
        let pending = recovery.report.messages_pending;
        let at = log
            .append_message(
                &MessageRecord {
                    destination: b"/queue/orders",
                    id: BinaryId { shard: 0, seq: 77 },
                    timestamp_ms: V3_T0,
                    header_block: b"persistent:true\n",
                    block_plain: true,
                    transient: false,
                    body: b"new",
                },
                V3_T0,
            )
            .unwrap();
        assert_eq!(at.segment, last + 1, "{fixture:?}");
        log.sync_now().unwrap();
        drop(log);
        let after = fs::read(copy.join(format!("{last:020}.seg"))).unwrap();
        assert!(before == after, "the old segment is not appended to");
        let new = fs::read(copy.join(format!("{:020}.seg", last + 1))).unwrap();
        assert_eq!(SegmentHeader::decode(&new).unwrap().format_version, 3);

        let (log, recovery) = ShardLog::open(config(tmp.path())).unwrap();
        assert!(recovery.report.is_clean(), "{}", recovery.report);
        assert_eq!(recovery.report.messages_pending, pending + 1);
        let orders = recovery
            .queues
            .iter()
            .find(|q| q.destination == b"/queue/orders")
            .unwrap();
        let newest = orders.messages.last().unwrap();
        assert_eq!(newest.position, at);
        assert_eq!(
            newest.message_id,
            StoredId::Binary(BinaryId { shard: 0, seq: 77 })
        );
        assert!(orders.messages[0].message_id.binary().is_none(), "text ids");
        drop(log);
    }
}
