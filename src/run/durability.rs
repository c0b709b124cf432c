//! One shard's durable store as the running broker uses it: turns the broker's
//! [`Record`]s into log appends, keeps each live message's log [`Position`] so later acks and
//! delivered marks find it, drives the group-commit fsync through the shard's io_uring, and
//! says which [`DurableToken`]s may be reported to the broker.
//!
//! Invariants: tokens are reported in the order the broker issued them (each waits for the
//! position of its own record, and positions only grow); at most one sync request is in flight
//! (the log hands out one at a time) and its descriptors stay valid until it completes; a
//! failed sync stops the log (fsyncgate: retrying could report lost pages as stored).

use std::collections::hash_map::Entry;
use std::collections::VecDeque;
use std::sync::Arc;

use rustc_hash::FxHashMap;
use smallvec::SmallVec;

use crate::broker::{DurableToken, Message, MessageId, Record, Recovered, ShardId};
use crate::codec::escape::unescape;
use crate::codec::{Escaping, Header};
use crate::log::{LogError, MessageRecord, Position, RecoveredQueue, ShardLog, SyncRequest};

/// A sync the shard ring is carrying out.
#[derive(Debug)]
struct SyncInFlight {
    upto: Position,
    /// Completions still to come (one per target).
    remaining: usize,
    failed: bool,
}

/// A message record the log could not store: the broker must hear of it
/// (`Shard::on_append_failed`); `reason` is safe to show a client.
#[derive(Debug, PartialEq, Eq)]
pub struct NotStored {
    pub destination: Arc<[u8]>,
    pub id: MessageId,
    pub token: Option<DurableToken>,
    pub reason: &'static str,
}

/// A token that waits for its record to become durable.
#[derive(Debug)]
struct Waiting {
    token: DurableToken,
    /// The end of the log right after its record: durable once a sync covers this.
    end: Position,
    /// The message record it covers, to report it not stored if the sync fails.
    message: Option<(Arc<[u8]>, MessageId)>,
    /// The append itself failed, for this reason.
    failed: Option<&'static str>,
}

/// What the broker is owed, in token order.
#[derive(Debug, PartialEq, Eq)]
pub enum Settled {
    /// `Shard::on_durable(token)`.
    Durable(DurableToken),
    /// `Shard::on_append_failed(..)`, then `Shard::on_durable(token)`.
    NotStored(NotStored),
}

/// The log of one shard, with the bookkeeping between broker ids and log positions.
pub struct Durability {
    log: ShardLog,
    /// Where each live logged message is, by id. Almost always one queue per id; a
    /// dead-letter copy on the same shard shares its id, hence the queue in the value.
    positions: Positions,
    /// Tokens not yet reported, in order, each with the position whose durability it needs.
    waiting: VecDeque<Waiting>,
    /// A sync failed: nothing becomes durable any more, and waiting tokens fail.
    failed: bool,
    /// `--fsync always`: tokens wait for the sync; otherwise they are released at once.
    receipts_wait_for_sync: bool,
    sync: Option<SyncInFlight>,
}

/// io_uring user tokens of this module's fsyncs (the handler owns the rest of the space).
pub const SYNC_TOKEN: u64 = 1;

impl Durability {
    pub fn new(log: ShardLog) -> Durability {
        let receipts_wait_for_sync = log.config().fsync.receipt_waits_for_sync();
        Durability {
            log,
            positions: Positions::default(),
            waiting: VecDeque::new(),
            failed: false,
            receipts_wait_for_sync,
            sync: None,
        }
    }

    /// Turns what recovery found into messages for `Shard::restore`, remembering positions.
    /// `fallback_seq` numbers messages whose stored id is not one of ours (written by another
    /// tool): counting down from it keeps them apart from the ids this boot hands out.
    pub fn restore_queues(
        &mut self,
        queues: Vec<RecoveredQueue>,
        shard: ShardId,
        mut fallback_seq: u64,
    ) -> Vec<Recovered> {
        let mut out = Vec::new();
        for queue in queues {
            let destination: Arc<[u8]> = Arc::from(queue.destination.as_slice());
            for recovered in queue.messages {
                let id = MessageId::parse(&recovered.message_id).unwrap_or_else(|| {
                    fallback_seq -= 1;
                    MessageId {
                        shard,
                        seq: fallback_seq,
                    }
                });
                let expires_ms = recovered
                    .headers
                    .iter()
                    .find(|h| h.name.as_ref() == b"expires")
                    .and_then(|h| std::str::from_utf8(&h.value).ok()?.trim().parse().ok())
                    .unwrap_or(0);
                let message = Message::from_send(
                    id,
                    destination.clone(),
                    recovered
                        .headers
                        .iter()
                        .map(|h| (h.name.as_ref(), h.value.as_ref())),
                    &recovered.body,
                    expires_ms,
                    true,
                );
                self.positions.insert(id, &destination, recovered.position);
                let deliveries = if recovered.redelivered {
                    recovered.deliveries.max(1)
                } else {
                    recovered.deliveries
                };
                out.push(Recovered {
                    message: Arc::new(message),
                    deliveries,
                });
            }
        }
        out
    }

    /// Appends one broker record. Ack and delivered records of messages the log does not
    /// know (already acked: a race the broker resolves itself) are skipped.
    pub fn append(
        &mut self,
        record: &Record,
        token: Option<DurableToken>,
        now_ms: u64,
    ) -> Option<NotStored> {
        match record {
            Record::Message { message } => match self.append_message(message, now_ms) {
                Ok(position) => {
                    self.positions
                        .insert(message.id, &message.destination, position);
                    if let Some(token) = token {
                        self.waiting.push_back(Waiting {
                            token,
                            end: self.log.appended_upto(),
                            message: Some((message.destination.clone(), message.id)),
                            failed: None,
                        });
                    }
                    None
                }
                Err(error) => {
                    tracing::error!(
                        shard = self.log.config().shard,
                        destination = %String::from_utf8_lossy(&message.destination),
                        "message not stored: {error}"
                    );
                    let not_stored = NotStored {
                        destination: message.destination.clone(),
                        id: message.id,
                        token,
                        reason: error.client_message(),
                    };
                    match token {
                        // Reported in its turn, behind the tokens issued before it.
                        Some(token) => {
                            self.waiting.push_back(Waiting {
                                token,
                                end: self.log.appended_upto(),
                                message: Some((not_stored.destination, not_stored.id)),
                                failed: Some(not_stored.reason),
                            });
                            None
                        }
                        None => Some(not_stored),
                    }
                }
            },
            Record::Ack { destination, id } => {
                if let Some(position) = self.positions.remove(*id, destination) {
                    if let Err(error) = self.log.ack(&[position], now_ms) {
                        // The ack is applied in memory; only a restart could bring it back.
                        tracing::warn!(shard = self.log.config().shard, "ack not logged: {error}");
                    }
                }
                if let Some(token) = token {
                    self.waiting.push_back(Waiting {
                        token,
                        end: self.log.appended_upto(),
                        message: None,
                        failed: None,
                    });
                }
                None
            }
            Record::Delivered { destination, id } => {
                if let Some(position) = self.positions.get(*id, destination) {
                    if let Err(error) = self.log.delivered(&[position], now_ms) {
                        tracing::warn!(
                            shard = self.log.config().shard,
                            "delivered mark not logged: {error}"
                        );
                    }
                }
                None
            }
        }
    }

    fn append_message(&mut self, message: &Message, now_ms: u64) -> Result<Position, LogError> {
        let mut text = [0u8; 48];
        let id_len = message.id.write_text(&mut text);
        // Borrowed from the stored block unless a header needed an escape: no allocation
        // per append in the common case.
        let mut headers: SmallVec<[Header<'_>; 8]> = SmallVec::new();
        let escaping = if message.header_block_plain {
            Escaping::None
        } else {
            Escaping::V1_2
        };
        for line in message.header_block.split_inclusive(|&b| b == b'\n') {
            let line = &line[..line.len() - 1];
            let Some(colon) = memchr::memchr(b':', line) else {
                continue;
            };
            let (Ok(name), Ok(value)) = (
                unescape(&line[..colon], escaping, 0),
                unescape(&line[colon + 1..], escaping, 0),
            ) else {
                continue;
            };
            headers.push(Header { name, value });
        }
        self.log.append_message(
            &MessageRecord {
                destination: &message.destination,
                message_id: &text[..id_len],
                timestamp_ms: now_ms,
                headers: &headers,
                body: &message.body,
            },
            now_ms,
        )
    }

    /// The next thing the broker is owed, in token order; `None` while the front token still
    /// waits for a sync.
    pub fn next_settled(&mut self) -> Option<Settled> {
        let front = self.waiting.front()?;
        let reason = match front.failed {
            Some(reason) => Some(reason),
            None if self.failed => Some("the log could not be synced to disk"),
            None if !self.receipts_wait_for_sync || self.log.synced_upto() >= front.end => None,
            None => return None,
        };
        let waiting = self.waiting.pop_front().expect("front exists");
        Some(match (reason, waiting.message) {
            (Some(reason), Some((destination, id))) => Settled::NotStored(NotStored {
                destination,
                id,
                token: Some(waiting.token),
                reason,
            }),
            _ => Settled::Durable(waiting.token),
        })
    }

    /// The sync to put on the ring now, if any (`None` while one is in flight).
    pub fn start_sync(&mut self, now_ms: u64) -> Option<SyncRequest> {
        if self.sync.is_some() {
            return None;
        }
        let request = self.log.pending_sync(now_ms)?;
        self.sync = Some(SyncInFlight {
            upto: request.upto,
            remaining: request.targets.len(),
            failed: false,
        });
        Some(request)
    }

    /// One fsync of the request in flight completed with `result` (negative errno on failure).
    pub fn sync_completed(&mut self, result: i32) {
        let Some(sync) = self.sync.as_mut() else {
            debug_assert!(false, "a sync completion without a sync in flight");
            return;
        };
        sync.remaining -= 1;
        if result < 0 {
            sync.failed = true;
            tracing::error!(
                shard = self.log.config().shard,
                error = %std::io::Error::from_raw_os_error(-result),
                "fsync of the log failed: the log refuses further appends (persistent SENDs get an ERROR); restart the broker once the disk is healthy"
            );
        }
        if sync.remaining == 0 {
            let sync = self.sync.take().expect("checked above");
            if sync.failed {
                self.log.mark_sync_failed();
                // Nothing becomes durable any more: waiting tokens fail (`next_settled`).
                self.failed = true;
            } else {
                self.log.mark_synced(sync.upto);
            }
        }
    }

    pub fn is_sync_in_flight(&self) -> bool {
        self.sync.is_some()
    }

    /// When the `every:<ms>` timer next wants a sync.
    pub fn next_sync_due_ms(&self) -> Option<u64> {
        self.log.next_sync_due_ms()
    }

    /// Work for a quiet moment: unlink fully-acknowledged segments, prepare the next one.
    pub fn housekeeping(&mut self, now_ms: u64) {
        if self.sync.is_none() {
            if let Err(error) = self.log.reclaim() {
                tracing::warn!(shard = self.log.config().shard, "reclaim failed: {error}");
            }
        }
        if self.log.wants_spare() {
            if let Err(error) = self.log.prepare_spare(now_ms) {
                tracing::warn!(
                    shard = self.log.config().shard,
                    "cannot prepare the next log segment: {error}"
                );
            }
        }
    }

    /// Blocking sync at shutdown.
    pub fn sync_now(&mut self) {
        if self.sync.is_some() {
            return;
        }
        if let Err(error) = self.log.sync_now() {
            tracing::error!(
                shard = self.log.config().shard,
                "final log sync failed: {error}"
            );
        }
    }

    pub fn has_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Live messages, for logs and tests.
    pub fn live_messages(&self) -> u64 {
        self.log.live_messages()
    }
}

/// Live message positions by id, with the queue each belongs to.
///
/// A queue shard receives each origin shard's publishes in order (one FIFO channel per pair, ids
/// numbered upwards by the origin), so almost every insert carries a larger `seq` than the last
/// one from its origin, and a FIFO consumer's acks come back in the same order. Those go into a
/// run per origin: a deque sorted by `seq`, where an ack finds the front (or binary-searches)
/// and touches memory next to the previous ack's. A hash map of a large backlog missed the cache
/// on every insert and remove instead (~15% of the queue shard's time, see notes/perf.md).
/// Everything else (recovered ids, an id logged again, a second queue with the same id) goes to
/// `scattered`.
#[derive(Default)]
struct Positions {
    /// Indexed by the origin shard's number, for shards below `ORIGIN_RUNS_MAX`.
    runs: Vec<Run>,
    scattered: Scattered,
}

/// Origins with a run of their own: at least the broker's shard count (one per core); ids of
/// higher shard numbers (only from logs written by another tool) go to the hash map.
const ORIGIN_RUNS_MAX: usize = 1024;

/// When removed slots in the middle of a run (out-of-order acks) outnumber the live ones, the run
/// is compacted, so a message never acked at the front cannot make it grow without bound.
const RUN_COMPACT_LEN_MIN: usize = 64;

#[derive(Default)]
struct Run {
    /// Sorted by `seq`, strictly increasing; the front slot is always live.
    slots: VecDeque<Slot>,
    /// Slots whose entry was taken.
    removed: usize,
}

struct Slot {
    seq: u64,
    /// `None` once removed (a tombstone until it reaches the front or the run is compacted).
    entry: Option<(Arc<[u8]>, Position)>,
}

impl Run {
    fn find(&self, seq: u64) -> Option<usize> {
        let front = self.slots.front()?;
        if seq == front.seq {
            return Some(0);
        }
        if seq < front.seq {
            return None;
        }
        self.slots.binary_search_by_key(&seq, |slot| slot.seq).ok()
    }

    /// The live entry for `seq` in `queue`, if this run holds it.
    fn entry_mut(&mut self, seq: u64, queue: &[u8]) -> Option<(usize, &mut Position)> {
        let index = self.find(seq)?;
        match &mut self.slots[index].entry {
            Some((held, at)) if same_queue(held, queue) => Some((index, at)),
            _ => None,
        }
    }

    fn take(&mut self, index: usize) -> Position {
        let (_, at) = self.slots[index].entry.take().expect("a live slot");
        self.removed += 1;
        while self.slots.front().is_some_and(|slot| slot.entry.is_none()) {
            self.slots.pop_front();
            self.removed -= 1;
        }
        if self.removed >= RUN_COMPACT_LEN_MIN && self.removed * 2 > self.slots.len() {
            self.slots.retain(|slot| slot.entry.is_some());
            self.removed = 0;
        }
        at
    }
}

impl Positions {
    fn run_mut(&mut self, id: MessageId) -> Option<&mut Run> {
        let origin = usize::from(id.shard.0);
        if origin >= ORIGIN_RUNS_MAX {
            return None;
        }
        if origin >= self.runs.len() {
            self.runs.resize_with(origin + 1, Run::default);
        }
        Some(&mut self.runs[origin])
    }

    fn run(&self, id: MessageId) -> Option<&Run> {
        self.runs.get(usize::from(id.shard.0))
    }

    fn insert(&mut self, id: MessageId, queue: &Arc<[u8]>, position: Position) {
        if !self.scattered.is_empty() {
            self.scattered.remove(id, queue);
        }
        if let Some(run) = self.run_mut(id) {
            // The common case first: a new id at the back, no search.
            if run.slots.back().map_or(true, |last| last.seq < id.seq) {
                run.slots.push_back(Slot {
                    seq: id.seq,
                    entry: Some((queue.clone(), position)),
                });
                return;
            }
            if let Some((_, at)) = run.entry_mut(id.seq, queue) {
                *at = position;
                return;
            }
        }
        self.scattered.insert(id, queue, position);
    }

    fn get(&self, id: MessageId, queue: &[u8]) -> Option<Position> {
        if let Some(run) = self.run(id) {
            if let Some(index) = run.find(id.seq) {
                if let Some((held, at)) = &run.slots[index].entry {
                    if same_queue(held, queue) {
                        return Some(*at);
                    }
                }
            }
        }
        self.scattered.get(id, queue)
    }

    fn remove(&mut self, id: MessageId, queue: &[u8]) -> Option<Position> {
        if let Some(run) = self.runs.get_mut(usize::from(id.shard.0)) {
            if let Some((index, _)) = run.entry_mut(id.seq, queue) {
                return Some(run.take(index));
            }
        }
        self.scattered.remove(id, queue)
    }
}

/// Positions of ids that did not arrive in order, by id.
#[derive(Default)]
struct Scattered {
    /// FxHash: ids are the broker's own (not client-chosen).
    by_id: FxHashMap<MessageId, (Arc<[u8]>, Position)>,
    /// The rare second queue holding the same id on this shard (a dead-letter copy).
    more: Vec<(MessageId, Arc<[u8]>, Position)>,
}

fn same_queue(a: &Arc<[u8]>, b: &[u8]) -> bool {
    std::ptr::eq(a.as_ptr(), b.as_ptr()) || **a == *b
}

impl Scattered {
    fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    fn insert(&mut self, id: MessageId, queue: &Arc<[u8]>, position: Position) {
        match self.by_id.entry(id) {
            Entry::Occupied(mut entry) => {
                let (held, at) = entry.get_mut();
                if same_queue(held, queue) {
                    *at = position;
                } else {
                    self.more
                        .retain(|(i, q, _)| !(*i == id && same_queue(q, queue)));
                    self.more.push((id, queue.clone(), position));
                }
            }
            Entry::Vacant(entry) => {
                entry.insert((queue.clone(), position));
            }
        }
    }

    fn get(&self, id: MessageId, queue: &[u8]) -> Option<Position> {
        match self.by_id.get(&id) {
            Some((held, at)) if same_queue(held, queue) => Some(*at),
            _ => self
                .more
                .iter()
                .find(|(i, q, _)| *i == id && same_queue(q, queue))
                .map(|(_, _, at)| *at),
        }
    }

    fn remove(&mut self, id: MessageId, queue: &[u8]) -> Option<Position> {
        if let Entry::Occupied(entry) = self.by_id.entry(id) {
            if same_queue(&entry.get().0, queue) {
                let (_, at) = entry.remove();
                // Promote a same-id entry of another queue, if any.
                if !self.more.is_empty() {
                    if let Some(index) = self.more.iter().position(|(i, _, _)| *i == id) {
                        let (i, q, p) = self.more.swap_remove(index);
                        self.by_id.insert(i, (q, p));
                    }
                }
                return Some(at);
            }
        }
        let index = self
            .more
            .iter()
            .position(|(i, q, _)| *i == id && same_queue(q, queue))?;
        Some(self.more.swap_remove(index).2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::ShardId;

    fn id(seq: u64) -> MessageId {
        MessageId {
            shard: ShardId(0),
            seq,
        }
    }

    fn at(offset: u64) -> Position {
        Position { segment: 0, offset }
    }

    fn open(dir: &std::path::Path) -> Durability {
        let config = crate::log::LogConfig::new(dir, 0);
        let (log, _) = ShardLog::open(config).unwrap();
        Durability::new(log)
    }

    fn message(seq: u64) -> Record {
        Record::Message {
            message: Arc::new(Message::from_send(
                id(seq),
                Arc::from(&b"/queue/a"[..]),
                [(&b"expires"[..], &b"0"[..]), (&b"x\\y"[..], &b"a:b"[..])],
                b"body",
                0,
                true,
            )),
        }
    }

    #[test]
    fn tokens_wait_for_the_sync_that_covers_them_and_come_out_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut durability = open(dir.path());
        assert_eq!(
            durability.append(&message(1), Some(DurableToken(0)), 1),
            None
        );
        assert_eq!(durability.next_settled(), None, "not synced yet");
        let request = durability.start_sync(1).expect("a sync is due");
        assert!(durability.start_sync(1).is_none(), "one sync in flight");
        // Appended while the sync is in flight: waits for the next one.
        durability.append(&message(2), Some(DurableToken(1)), 1);
        for _ in &request.targets {
            durability.sync_completed(0);
        }
        assert_eq!(
            durability.next_settled(),
            Some(Settled::Durable(DurableToken(0)))
        );
        assert_eq!(durability.next_settled(), None);
        let request = durability.start_sync(2).unwrap();
        for _ in &request.targets {
            durability.sync_completed(0);
        }
        assert_eq!(
            durability.next_settled(),
            Some(Settled::Durable(DurableToken(1)))
        );
        assert!(!durability.has_waiting() && !durability.is_sync_in_flight());
    }

    #[test]
    fn a_failed_sync_fails_the_waiting_sends_instead_of_confirming_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut durability = open(dir.path());
        durability.append(&message(1), Some(DurableToken(0)), 1);
        let request = durability.start_sync(1).unwrap();
        durability.sync_completed(-libc::EIO);
        for _ in 1..request.targets.len() {
            durability.sync_completed(0);
        }
        let Some(Settled::NotStored(not_stored)) = durability.next_settled() else {
            panic!("the waiting SEND must fail");
        };
        assert_eq!(not_stored.token, Some(DurableToken(0)));
        assert_eq!(not_stored.id, id(1));
        // And the log refuses what comes next.
        let failed = durability.append(&message(2), None, 2);
        assert!(failed.is_some());
    }

    #[test]
    fn a_restart_brings_back_messages_with_headers_positions_and_delivery_marks() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut durability = open(dir.path());
            durability.append(&message(1), None, 1);
            durability.append(&message(2), None, 1);
            let queue: Arc<[u8]> = Arc::from(&b"/queue/a"[..]);
            durability.append(
                &Record::Delivered {
                    destination: queue.clone(),
                    id: id(2),
                },
                None,
                1,
            );
            durability.append(
                &Record::Ack {
                    destination: queue,
                    id: id(1),
                },
                None,
                1,
            );
            durability.sync_now();
        }
        let config = crate::log::LogConfig::new(dir.path(), 0);
        let (log, recovery) = ShardLog::open(config).unwrap();
        let mut durability = Durability::new(log);
        let recovered = durability.restore_queues(recovery.queues, ShardId(0), 1 << 40);
        assert_eq!(recovered.len(), 1, "the acked message stays gone");
        let Record::Message { message: original } = message(2) else {
            unreachable!()
        };
        assert_eq!(*recovered[0].message, *original, "same id, headers, body");
        assert_eq!(recovered[0].deliveries, 1, "delivered before the restart");
        // Its position is known again: acking it after the restart reaches the log.
        assert!(durability.positions.get(id(2), b"/queue/a").is_some());
    }

    #[test]
    fn one_id_in_two_queues_keeps_both_positions() {
        let queue: Arc<[u8]> = Arc::from(&b"/queue/a"[..]);
        let dlq: Arc<[u8]> = Arc::from(&b"/queue/DLQ.a"[..]);
        let mut positions = Positions::default();
        positions.insert(id(1), &queue, at(10));
        positions.insert(id(1), &dlq, at(20));
        positions.insert(id(2), &queue, at(30));
        assert_eq!(positions.get(id(1), b"/queue/a"), Some(at(10)));
        assert_eq!(positions.get(id(1), b"/queue/DLQ.a"), Some(at(20)));
        assert_eq!(positions.remove(id(1), b"/queue/a"), Some(at(10)));
        assert_eq!(positions.get(id(1), b"/queue/a"), None);
        assert_eq!(positions.get(id(1), b"/queue/DLQ.a"), Some(at(20)));
        assert_eq!(positions.remove(id(1), b"/queue/DLQ.a"), Some(at(20)));
        assert_eq!(positions.remove(id(1), b"/queue/DLQ.a"), None);
        // Logged again after an ack (a returned auto-ack delivery): the new position wins.
        positions.insert(id(2), &queue, at(40));
        assert_eq!(positions.remove(id(2), b"/queue/a"), Some(at(40)));
    }

    #[test]
    fn in_order_ids_acked_in_order_keep_the_run_short() {
        let queue: Arc<[u8]> = Arc::from(&b"/queue/a"[..]);
        let mut positions = Positions::default();
        for seq in 1..=1000 {
            positions.insert(id(seq), &queue, at(seq * 8));
        }
        assert!(positions.scattered.is_empty(), "in order: all in the run");
        for seq in 1..=1000 {
            assert_eq!(positions.remove(id(seq), b"/queue/a"), Some(at(seq * 8)));
            assert_eq!(positions.runs[0].slots.len() as u64, 1000 - seq);
        }
        assert_eq!(positions.remove(id(1), b"/queue/a"), None);
    }

    #[test]
    fn a_message_never_acked_at_the_front_does_not_make_the_run_grow_without_bound() {
        let queue: Arc<[u8]> = Arc::from(&b"/queue/a"[..]);
        let mut positions = Positions::default();
        positions.insert(id(1), &queue, at(8));
        for seq in 2..=100_000 {
            positions.insert(id(seq), &queue, at(seq * 8));
            assert_eq!(positions.remove(id(seq), b"/queue/a"), Some(at(seq * 8)));
        }
        let run = &positions.runs[0];
        assert!(
            run.slots.len() <= 2 * RUN_COMPACT_LEN_MIN,
            "{}",
            run.slots.len()
        );
        assert_eq!(positions.get(id(1), b"/queue/a"), Some(at(8)));
    }

    #[test]
    fn ids_out_of_order_or_from_unknown_origins_are_still_found() {
        let queue: Arc<[u8]> = Arc::from(&b"/queue/a"[..]);
        let mut positions = Positions::default();
        let far = MessageId {
            shard: ShardId(u16::MAX),
            seq: 5,
        };
        positions.insert(id(10), &queue, at(10));
        positions.insert(id(3), &queue, at(3));
        positions.insert(far, &queue, at(99));
        assert_eq!(positions.get(id(3), b"/queue/a"), Some(at(3)));
        assert_eq!(positions.get(far, b"/queue/a"), Some(at(99)));
        assert_eq!(positions.get(far, b"/queue/b"), None);
        assert_eq!(positions.remove(id(3), b"/queue/a"), Some(at(3)));
        assert_eq!(positions.remove(id(3), b"/queue/a"), None);
        assert_eq!(positions.remove(far, b"/queue/a"), Some(at(99)));
        assert_eq!(positions.remove(id(10), b"/queue/a"), Some(at(10)));
        assert!(positions.scattered.is_empty());
    }

    proptest::proptest! {
        /// Whatever the order of inserts and removes, the positions behave as one map keyed by
        /// (id, queue): the last insert wins, a remove returns it once.
        #[test]
        fn positions_behave_as_a_map_keyed_by_id_and_queue(
            ops in proptest::collection::vec(
                (0u8..3, 0u16..3, 0u64..12, proptest::bool::ANY, 0u64..1000),
                1..300,
            )
        ) {
            let queues: [Arc<[u8]>; 2] = [Arc::from(&b"/queue/a"[..]), Arc::from(&b"/queue/b"[..])];
            let mut positions = Positions::default();
            let mut model: std::collections::HashMap<(MessageId, bool), Position> =
                std::collections::HashMap::new();
            for (op, shard, seq, second, offset) in ops {
                let id = MessageId { shard: ShardId(shard * 600), seq };
                let queue = &queues[usize::from(second)];
                match op {
                    0 => {
                        positions.insert(id, queue, at(offset));
                        model.insert((id, second), at(offset));
                    }
                    1 => proptest::prop_assert_eq!(
                        positions.remove(id, queue),
                        model.remove(&(id, second))
                    ),
                    _ => proptest::prop_assert_eq!(
                        positions.get(id, queue),
                        model.get(&(id, second)).copied()
                    ),
                }
            }
            for ((id, second), at) in model {
                proptest::prop_assert_eq!(positions.remove(id, &queues[usize::from(second)]), Some(at));
            }
        }
    }
}
