//! A log written by format version 1 is kept in `tests/fixtures/log-v1/` and must open, with
//! exactly this content, in every later build. Do not regenerate it when the format changes:
//! add a `log-v2` fixture beside it and keep this test.
//!
//! It was written by `write_fixture` below:
//! `STOMPD_WRITE_LOG_FIXTURE=1 cargo test --test log_fixture write_fixture -- --ignored`.

use std::fs;
use std::path::{Path, PathBuf};

use stompd::codec::Header;
use stompd::log::format::{RecordView, ScanItem, SegmentHeader};
use stompd::log::{list_segments, LogConfig, MessageRecord, Position, SegmentReader, ShardLog};

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
#[ignore = "writes the committed fixture; run only to create it"]
fn write_fixture() {
    if std::env::var("STOMPD_WRITE_LOG_FIXTURE").is_err() {
        return;
    }
    let dir = fixture_dir();
    let _ = fs::remove_dir_all(&dir);
    let (mut log, _) = ShardLog::open(config(&dir)).unwrap();
    let mut orders = Vec::new();
    let mut t = 1_700_000_000_000;
    for i in 0..40u64 {
        t += 1;
        let id = format!("ID:fixture-1:{i}");
        let priority = (i % 10).to_string();
        let headers = [
            Header::new(b"persistent", b"true"),
            Header::new(b"priority", priority.as_bytes()),
        ];
        let body = order_body(i);
        orders.push(
            log.append_message(
                &MessageRecord {
                    destination: b"/queue/orders",
                    message_id: id.as_bytes(),
                    timestamp_ms: t,
                    headers: &headers,
                    body: &body,
                },
                t,
            )
            .unwrap(),
        );
        if i % 8 == 0 {
            let id = format!("ID:fixture-1:audit-{i}");
            let headers = [
                Header::new(b"content-type", b"text/plain"),
                Header::new(b"x-colon", b"a:b\nc"),
                Header::new(b"empty", b""),
            ];
            log.append_message(
                &MessageRecord {
                    destination: b"/queue/audit",
                    message_id: id.as_bytes(),
                    timestamp_ms: t,
                    headers: &headers,
                    body: b"",
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
    log.ack(&orders[20..21], t).unwrap();
    log.sync_now().unwrap();
    assert!(log.segment_sequences().len() >= 2);
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
        assert_eq!(m.message_id, format!("ID:fixture-1:{i}").as_bytes());
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
    let ids: Vec<&[u8]> = audit.messages.iter().map(|m| &m.message_id[..]).collect();
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
