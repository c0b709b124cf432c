//! verify and recovery agree: on a log written by `ShardLog` with one byte flipped anywhere a
//! record's CRC covers, the read-only inspection reports damage starting exactly at the record
//! that holds the byte, and it reports exactly the positions recovery skips or cuts.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use proptest::prelude::*;
use stompd::log::format::{BinaryId, MessageRecord as Message, RecordRef};
use stompd::log::inspect::Damage;
use stompd::log::{shard_dir, FsyncPolicy, LogConfig, Position, ShardInspection, ShardLog};

fn config(dir: &std::path::Path) -> LogConfig {
    let mut config = LogConfig::new(dir, 0);
    config.segment_bytes = 8192;
    config.fsync = FsyncPolicy::Never;
    config
}

/// Writes messages with these body lengths (acking every other one) and returns each record's
/// position and the number of bytes its CRC covers (framing, header part, body, CRC).
fn write(dir: &std::path::Path, bodies: &[usize]) -> Vec<(Position, u64)> {
    let (mut log, _) = ShardLog::open(config(dir)).unwrap();
    let mut records = Vec::new();
    for (i, &len) in bodies.iter().enumerate() {
        let body = vec![b'a' + (i % 26) as u8; len];
        let message = Message {
            destination: b"/queue/p",
            id: BinaryId {
                shard: 0,
                seq: i as u64,
            },
            timestamp_ms: i as u64,
            header_block: b"persistent:true\n",
            block_plain: true,
            transient: false,
            body: &body,
        };
        let record = RecordRef::Message(message);
        let covered = (16 + record.header_len() + record.body_len() + 4) as u64;
        let position = log.append_message(&message, 0).unwrap();
        records.push((position, covered));
        if i % 2 == 1 {
            log.ack(&[position], 0).unwrap();
            let ack_len = RecordRef::Ack(&[position]);
            let covered = (16 + ack_len.header_len() + 4) as u64;
            // The ack went right after the message, in the same segment or the next one.
            let end = log.appended_upto();
            let start = Position {
                segment: end.segment,
                offset: end.offset - ack_len.encoded_len() as u64,
            };
            records.push((start, covered));
        }
    }
    log.sync_now().unwrap();
    records
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn verify_finds_every_flipped_byte_where_recovery_would(
        bodies in proptest::collection::vec(0usize..1500, 2..24),
        which in any::<proptest::sample::Index>(),
        at in any::<proptest::sample::Index>(),
        bit in 0u8..8,
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let records = write(tmp.path(), &bodies);
        let (position, covered) = records[which.index(records.len())];
        let file = shard_dir(tmp.path(), 0).join(format!("{:020}.seg", position.segment));
        let handle = OpenOptions::new().read(true).write(true).open(&file).unwrap();
        let at = position.offset + at.index(covered as usize) as u64;
        let mut byte = [0u8];
        handle.read_exact_at(&mut byte, at).unwrap();
        handle.write_all_at(&[byte[0] ^ (1 << bit)], at).unwrap();
        drop(handle);

        let inspection = ShardInspection::read(&shard_dir(tmp.path(), 0)).unwrap();
        let damage: BTreeSet<(u64, u64)> = inspection
            .segments
            .iter()
            .flat_map(|s| s.damage.iter().map(move |d| (s.sequence, d.offset())))
            .collect();
        let first = inspection
            .segments
            .iter()
            .find(|s| !s.damage.is_empty())
            .map(|s| (s.sequence, s.damage[0].offset()));
        prop_assert_eq!(first, Some((position.segment, position.offset)), "{:?}", damage);
        for segment in &inspection.segments {
            for d in &segment.damage {
                prop_assert!(matches!(d, Damage::Record { .. } | Damage::Tail { .. }), "{:?}", d);
            }
        }

        let (_, recovery) = ShardLog::open(config(tmp.path())).unwrap();
        let recovered: BTreeSet<(u64, u64)> = recovery
            .report
            .skipped
            .iter()
            .map(|s| s.position)
            .chain(recovery.report.cuts.iter().map(|c| c.position))
            .map(|p| (p.segment, p.offset))
            .collect();
        prop_assert_eq!(recovered, damage);
    }
}

/// A length zeroed in an earlier segment reads as the end of its data, hiding the good
/// records after it: only the non-zero bytes past that end tell, and the inspection looks for
/// them in every segment, as recovery does.
#[test]
fn zeroed_lengths_in_an_earlier_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let records = write(tmp.path(), &[100; 40]);
    let last_segment = records.iter().map(|(p, _)| p.segment).max().unwrap();
    assert!(last_segment >= 1);
    // An ack record (every second entry after a message) in segment 0, not its last record.
    let (ack, _) = records
        .iter()
        .enumerate()
        .filter(|(i, (p, _))| i % 3 == 2 && p.segment == 0)
        .map(|(_, r)| *r)
        .next()
        .unwrap();
    let file = shard_dir(tmp.path(), 0).join(format!("{:020}.seg", 0));
    let handle = OpenOptions::new().write(true).open(&file).unwrap();
    handle.write_all_at(&[0u8; 8], ack.offset).unwrap();
    drop(handle);
    let inspection = ShardInspection::read(&shard_dir(tmp.path(), 0)).unwrap();
    assert!(
        matches!(
            inspection.segments[0].damage[..],
            [Damage::Tail { offset, error: None, .. }] if offset == ack.offset
        ),
        "{:?}",
        inspection.segments[0].damage
    );
    let (_, recovery) = ShardLog::open(config(tmp.path())).unwrap();
    assert_eq!(recovery.report.cuts.len(), 1);
    assert_eq!(recovery.report.cuts[0].position, ack);
}
