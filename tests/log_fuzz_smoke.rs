//! Runs the log fuzz target's check (`stompd::log::testing::check_log_input`, the body of
//! `fuzz/fuzz_targets/log_record.rs`) on stable, over the target's seeds and over valid records
//! with random damage (flipped bytes, truncation, CRCs rewritten to let damage through to the
//! layout checks), so CI without nightly and cargo-fuzz still exercises it.

use proptest::prelude::*;
use stompd::log::format::{
    decode_record_as, encode_record_with_end_marker, BinaryId, Decoded, MessageRecord, Position,
    RecordRef, FORMAT_VERSION,
};
use stompd::log::testing::{check_log_input, check_record_roundtrip, OwnedRecord};

fn arb_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

fn arb_record() -> impl Strategy<Value = OwnedRecord> {
    let positions = proptest::collection::vec((any::<u64>(), 0u64..4096), 0..6).prop_map(|refs| {
        refs.into_iter()
            .map(|(segment, offset)| Position { segment, offset })
            .collect::<Vec<_>>()
    });
    prop_oneof![
        3 => (
            arb_bytes(24),
            (any::<u16>(), any::<u64>()),
            any::<u64>(),
            arb_bytes(48),
            (any::<bool>(), any::<bool>()),
            arb_bytes(64),
        )
            .prop_map(|(destination, (shard, seq), timestamp_ms, mut header_block, (block_plain, transient), body)| {
                // A block ends its last line (a record whose block does not is damaged).
                if header_block.last().is_some_and(|&b| b != b'\n') {
                    header_block.push(b'\n');
                }
                OwnedRecord::Message {
                    destination,
                    id: BinaryId { shard, seq },
                    timestamp_ms,
                    header_block,
                    block_plain,
                    transient,
                    body,
                }
            }),
        1 => positions.clone().prop_map(OwnedRecord::Ack),
        1 => positions.prop_map(OwnedRecord::Delivered),
    ]
}

/// One way to damage the encoded bytes.
#[derive(Clone, Debug)]
enum Damage {
    /// XOR a byte (index taken modulo the length).
    Flip(proptest::sample::Index, u8),
    /// Set one of the 16 framing bytes of the first record (the lengths a torn write garbles).
    Framing(u8, u8),
    /// Cut the input here.
    Truncate(proptest::sample::Index),
    /// Zero a 64-byte run, like a sector that never reached the disk.
    ZeroRun(proptest::sample::Index),
}

fn arb_damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        4 => (any::<proptest::sample::Index>(), 1u8..=255).prop_map(|(i, x)| Damage::Flip(i, x)),
        2 => (0u8..16, any::<u8>()).prop_map(|(i, v)| Damage::Framing(i, v)),
        1 => any::<proptest::sample::Index>().prop_map(Damage::Truncate),
        1 => any::<proptest::sample::Index>().prop_map(Damage::ZeroRun),
    ]
}

/// The fuzz input: the sequence, then the records one after another, each followed by the end
/// marker the writer puts after it (overwritten by the next record).
fn encode_input(sequence: u64, records: &[OwnedRecord], tail: usize) -> Vec<u8> {
    let len: usize = records
        .iter()
        .map(|r| r.with_ref(|r| r.encoded_len()))
        .sum();
    let mut bytes = vec![0u8; 8 + len + tail];
    bytes[..8].copy_from_slice(&sequence.to_le_bytes());
    let mut at = 8;
    for record in records {
        at += record.with_ref(|r| encode_record_with_end_marker(&mut bytes[at..], sequence, r));
    }
    bytes
}

fn damage(bytes: &mut Vec<u8>, damages: &[Damage]) {
    for d in damages {
        if bytes.len() <= 8 {
            return;
        }
        let data = bytes.len() - 8;
        match d {
            Damage::Flip(i, x) => bytes[8 + i.index(data)] ^= x,
            Damage::Framing(i, v) => {
                if let Some(b) = bytes.get_mut(8 + *i as usize) {
                    *b = *v;
                }
            }
            Damage::Truncate(i) => bytes.truncate(8 + i.index(data + 1)),
            Damage::ZeroRun(i) => {
                let start = 8 + i.index(data);
                let end = bytes.len().min(start + 64);
                bytes[start..end].fill(0);
            }
        }
    }
}

/// The seeds are what they say: the valid ones decode, the torn and misplaced ones do not, and
/// all pass the check.
#[test]
fn seeds_pass_the_check() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/log_record");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).expect("seed directory") {
        let path = entry.expect("seed").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let data = std::fs::read(&path).expect("seed file");
        check_log_input(&data);
        let sequence = u64::from_le_bytes(data[..8].try_into().unwrap());
        // Seeds named v1_/v2_ hold records of that format version (a message in that layout
        // is damage to the current decoder, still a useful start for mutations).
        let version = match &name[..3] {
            "v1_" => 1,
            "v2_" => 2,
            _ => FORMAT_VERSION,
        };
        let decodes = matches!(
            decode_record_as(&data[8..], sequence, version),
            Decoded::Record { .. }
        );
        let bad = name.starts_with("torn") || name.contains("wrong_segment");
        assert_eq!(decodes, !bad, "seed {name}");
        if version == FORMAT_VERSION {
            let round_trips = check_record_roundtrip(&data[8..], sequence).is_some();
            assert_eq!(round_trips, !bad, "seed {name}");
        }
        seen += 1;
    }
    assert!(seen >= 5, "only {seen} seeds in {dir}");
}

#[test]
fn owned_record_round_trips_headers() {
    let record = RecordRef::Message(MessageRecord {
        destination: b"/queue/a",
        id: BinaryId { shard: 2, seq: 9 },
        timestamp_ms: 7,
        header_block: b"k:v\\c\n",
        block_plain: false,
        transient: true,
        body: b"body",
    });
    let mut bytes = vec![0u8; 8 + record.encoded_len() + 16];
    encode_record_with_end_marker(&mut bytes[8..], 3, &record);
    bytes[..8].copy_from_slice(&3u64.to_le_bytes());
    assert_eq!(
        check_record_roundtrip(&bytes[8..], 3),
        Some(record.encoded_len())
    );
    check_log_input(&bytes);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn valid_records_pass_undamaged(
        sequence in any::<u64>(),
        records in proptest::collection::vec(arb_record(), 1..5),
        tail in 0usize..24,
    ) {
        let bytes = encode_input(sequence, &records, tail);
        let first = records[0].with_ref(|r| r.encoded_len());
        prop_assert_eq!(check_record_roundtrip(&bytes[8..], sequence), Some(first));
        check_log_input(&bytes);
    }

    #[test]
    fn damaged_records_pass_the_check(
        sequence in any::<u64>(),
        records in proptest::collection::vec(arb_record(), 1..5),
        tail in 0usize..24,
        damages in proptest::collection::vec(arb_damage(), 1..4),
    ) {
        let mut bytes = encode_input(sequence, &records, tail);
        damage(&mut bytes, &damages);
        check_log_input(&bytes);
    }

    #[test]
    fn random_bytes_pass_the_check(bytes in arb_bytes(512)) {
        check_log_input(&bytes);
    }
}
