//! Property test of a shard's log against a model: any sequence of appends, acks, delivered
//! marks, reclaims, spare segments and restarts leaves exactly the model's pending messages, per
//! queue, in order, with the model's redelivered marks and delivery counts; and once everything
//! is acknowledged the log shrinks to one segment. With 4 KiB segments, reclaims and rolls
//! recycle segment files (format version 2) all the time: every restart in between must still
//! be clean, and at most one reclaimed file is ever kept for reuse.

use std::collections::BTreeMap;
use std::path::Path;

use proptest::prelude::*;
use stompd::log::{BinaryId, LogConfig, MessageRecord, Position, Recovery, ShardLog};

#[derive(Clone, Debug)]
enum Op {
    Append { queue: u8, body_len: usize },
    Ack(prop::sample::Index),
    AckAll,
    Delivered(prop::sample::Index),
    Reclaim,
    PrepareSpare,
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        // Acking everything is rare, so that old segments with a few live messages build up.
        16 => (0u8..3, 0usize..600).prop_map(|(queue, body_len)| Op::Append { queue, body_len }),
        8 => any::<prop::sample::Index>().prop_map(Op::Ack),
        1 => Just(Op::AckAll),
        4 => any::<prop::sample::Index>().prop_map(Op::Delivered),
        4 => Just(Op::Reclaim),
        2 => Just(Op::PrepareSpare),
        3 => Just(Op::Restart),
    ]
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Pending {
    id: u64,
    queue: u8,
    deliveries: u32,
}

fn config(dir: &Path) -> LogConfig {
    let mut config = LogConfig::new(dir, 0);
    config.segment_bytes = 4096; // the smallest: many rolls and reclaims
    config.populate = false;
    config
}

/// Reclaimed segment files kept for reuse (`*.seg.free`).
fn free_files(data_dir: &Path) -> usize {
    std::fs::read_dir(config(data_dir).dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".seg.free")
        })
        .count()
}

fn body(id: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (id as usize * 31 + i) as u8).collect()
}

/// Checks a recovery against the model and returns the model keyed by the recovered positions.
fn check(recovery: &Recovery, model: &[Pending], bodies: &BTreeMap<u64, usize>) -> Vec<Position> {
    let mut positions = Vec::new();
    for queue in 0u8..3 {
        let expected: Vec<&Pending> = model.iter().filter(|p| p.queue == queue).collect();
        let destination = format!("/queue/{queue}");
        let got = recovery
            .queues
            .iter()
            .find(|q| q.destination == destination.as_bytes());
        let got = got.map_or(&[][..], |q| &q.messages[..]);
        assert_eq!(got.len(), expected.len(), "queue {queue}");
        for (m, p) in got.iter().zip(expected) {
            assert_eq!(m.message_id.binary().unwrap().seq, p.id);
            assert_eq!(m.redelivered, p.deliveries > 0, "message {}", p.id);
            assert_eq!(m.deliveries, p.deliveries, "message {}", p.id);
            assert_eq!(m.body, body(p.id, bodies[&p.id]));
            assert_eq!(m.headers[0].value.as_ref(), p.id.to_string().as_bytes());
        }
    }
    // Positions in model (log) order.
    let mut all: Vec<(u64, Position)> = recovery
        .queues
        .iter()
        .flat_map(|q| q.messages.iter())
        .map(|m| (m.message_id.binary().unwrap().seq, m.position))
        .collect();
    all.sort();
    for ((id, position), p) in all.iter().zip(model) {
        assert_eq!(*id, p.id);
        positions.push(*position);
    }
    positions
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_log_matches_the_model(ops in proptest::collection::vec(op(), 1..300)) {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, _) = ShardLog::open(config(tmp.path())).unwrap();
        // Pending messages in append order, and their positions in the same order.
        let mut model: Vec<Pending> = Vec::new();
        let mut positions: Vec<Position> = Vec::new();
        let mut bodies = BTreeMap::new();
        let mut next_id = 0u64;
        for op in ops {
            match op {
                Op::Append { queue, body_len } => {
                    let id = next_id;
                    next_id += 1;
                    let destination = format!("/queue/{queue}");
                    let block = format!("id:{id}\n");
                    let body = body(id, body_len);
                    let p = log.append_message(&MessageRecord {
                        destination: destination.as_bytes(),
                        id: BinaryId { shard: 0, seq: id },
                        timestamp_ms: id,
                        header_block: block.as_bytes(),
                        block_plain: true,
                        transient: false,
                        body: &body,
                    }, id).unwrap();
                    prop_assert!(positions.last().map_or(true, |last| *last < p));
                    bodies.insert(id, body_len);
                    model.push(Pending { id, queue, deliveries: 0 });
                    positions.push(p);
                }
                Op::Ack(index) if !model.is_empty() => {
                    let i = index.index(model.len());
                    log.ack(&[positions[i]], 0).unwrap();
                    model.remove(i);
                    positions.remove(i);
                }
                Op::AckAll => {
                    log.ack(&positions, 0).unwrap();
                    model.clear();
                    positions.clear();
                }
                Op::Delivered(index) if !model.is_empty() => {
                    let i = index.index(model.len());
                    log.delivered(&[positions[i]], 0).unwrap();
                    model[i].deliveries += 1;
                }
                Op::Reclaim => {
                    log.reclaim().unwrap();
                }
                Op::PrepareSpare => {
                    if log.wants_spare() {
                        log.prepare_spare(0).unwrap();
                    }
                }
                Op::Restart => {
                    drop(log);
                    let (reopened, recovery) = ShardLog::open(config(tmp.path())).unwrap();
                    prop_assert!(recovery.report.is_clean(), "{}", recovery.report);
                    positions = check(&recovery, &model, &bodies);
                    log = reopened;
                }
                Op::Ack(_) | Op::Delivered(_) => {}
            }
            prop_assert_eq!(log.live_messages(), model.len() as u64);
            prop_assert!(free_files(tmp.path()) <= 1);
        }
        drop(log);
        let (mut log, recovery) = ShardLog::open(config(tmp.path())).unwrap();
        prop_assert!(recovery.report.is_clean(), "{}", recovery.report);
        let positions = check(&recovery, &model, &bodies);
        log.ack(&positions, 0).unwrap();
        log.reclaim().unwrap();
        prop_assert!(log.segment_sequences().len() <= 1, "{:?}", log.segment_sequences());
    }
}
