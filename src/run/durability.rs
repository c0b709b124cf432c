//! One shard's durable store as the running broker uses it: turns the broker's
//! [`Record`]s into log appends, keeps each live message's log [`Position`] so later acks and
//! delivered marks find it, drives the group-commit fsync through the shard's io_uring, and
//! says which [`DurableToken`]s may be reported to the broker.
//!
//! Message records are deferred until the end of the handler pass ([`Durability::flush`]): a
//! message auto-acked in the same pass that accepted it (a consumer with credit was waiting)
//! costs neither its Message nor its Ack record. See [`Durability::append`] for why that keeps
//! the guarantees.
//!
//! Invariants: tokens are reported in the order the broker issued them (each waits for the
//! position of its own record, and positions only grow; a deferred message's token holds its
//! place and is never released before its record is written or cancelled); deferred records
//! are written in the order they came, and none is left once `flush` returned; at most one sync
//! request is in flight (the log hands out one at a time) and its descriptors stay valid until
//! it completes; a failed sync stops the log (fsyncgate: retrying could report lost pages as
//! stored).

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
    /// The end of the log right after its record: durable once a sync covers this. Not yet
    /// known while `deferred`.
    end: Position,
    /// Its message record is deferred: neither written nor cancelled yet, so the token may not
    /// be released (and nothing behind it may be).
    deferred: bool,
    /// The message record it covers, to report it not stored if the sync fails.
    message: Option<(Arc<[u8]>, MessageId)>,
    /// The append itself failed, for this reason.
    failed: Option<&'static str>,
}

/// A message record held back until the end of the handler pass.
#[derive(Debug)]
struct Deferred {
    message: Arc<Message>,
    /// Where its token's entry is in `waiting`, counted from the first token ever pushed
    /// (`Durability::waiting_popped` turns it into an index).
    waiting: Option<u64>,
}

/// How many message records one handler pass may hold back before the oldest is written. A
/// message delivered to an auto-ack consumer in the same pass is acked right behind its own
/// record, so a handful suffices for the case this is for; the bound keeps the scan each ack
/// makes (newest first) short when one pass accepts many messages (a transaction's COMMIT into
/// a local queue) while acking others.
const DEFERRED_MESSAGES_MAX: usize = 64;

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
    /// Entries ever popped from the front of `waiting`.
    waiting_popped: u64,
    /// Message records of this handler pass not written yet, in the order they came.
    deferred: VecDeque<Deferred>,
    /// Records without a token that could not be written, to report before any token.
    not_stored: VecDeque<NotStored>,
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
            waiting_popped: 0,
            deferred: VecDeque::with_capacity(DEFERRED_MESSAGES_MAX),
            not_stored: VecDeque::new(),
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

    /// Takes one broker record. Ack and delivered records of messages the log does not know
    /// (already acked: a race the broker resolves itself) are skipped.
    ///
    /// A message record is deferred until [`Durability::flush`], which the handler calls after
    /// carrying out each batch of effects; an ack of that message before then cancels both
    /// records. Why that loses nothing the log promised: the queue logs an auto-ack delivery's
    /// Ack when it hands the message out, in the same pass that produced the Message record
    /// when a consumer was waiting. Written, the pair would reach the page cache together and
    /// be covered by the same sync (syncs start only after the pass), so after any crash the
    /// message would be acked, never redelivered: auto ack means consumed once handed to the
    /// connection. Dropping both gives the same outcome without the bytes. A RECEIPT that waited
    /// for the record waits for what was appended before it instead, so it still comes out in
    /// turn. A record that is never written cannot fail: a message consumed at once is not
    /// reported `NotStored` (the sender's RECEIPT tells the truth, it was delivered).
    pub fn append(&mut self, record: Record, token: Option<DurableToken>, now_ms: u64) {
        match record {
            Record::Message { message } => {
                if self.deferred.len() >= DEFERRED_MESSAGES_MAX {
                    self.write_deferred(1, now_ms);
                }
                let waiting = token.map(|token| {
                    let at = self.waiting_popped + self.waiting.len() as u64;
                    self.waiting.push_back(Waiting {
                        token,
                        end: self.log.appended_upto(),
                        deferred: true,
                        message: Some((message.destination.clone(), message.id)),
                        failed: None,
                    });
                    at
                });
                self.deferred.push_back(Deferred { message, waiting });
            }
            Record::Ack { destination, id } => {
                if let Some(index) = self.find_deferred(id, &destination) {
                    let cancelled = self.deferred.remove(index).expect("found above");
                    if let Some(at) = cancelled.waiting {
                        let end = self.log.appended_upto();
                        let waiting = self.waiting_at(at);
                        waiting.end = end;
                        waiting.deferred = false;
                    }
                } else if let Some(position) = self.positions.remove(id, &destination) {
                    if let Err(error) = self.log.ack(&[position], now_ms) {
                        // The ack is applied in memory; only a restart could bring it back.
                        tracing::warn!(shard = self.log.config().shard, "ack not logged: {error}");
                    }
                }
                if let Some(token) = token {
                    self.waiting.push_back(Waiting {
                        token,
                        end: self.log.appended_upto(),
                        deferred: false,
                        message: None,
                        failed: None,
                    });
                }
            }
            Record::Delivered { destination, id } => {
                // The mark needs the record's position: write it (and, to keep log order, the
                // ones deferred before it) now.
                if let Some(index) = self.find_deferred(id, &destination) {
                    self.write_deferred(index + 1, now_ms);
                }
                if let Some(position) = self.positions.get(id, &destination) {
                    if let Err(error) = self.log.delivered(&[position], now_ms) {
                        tracing::warn!(
                            shard = self.log.config().shard,
                            "delivered mark not logged: {error}"
                        );
                    }
                }
            }
        }
    }

    /// Writes every deferred message record, in order. Must run before anything that needs
    /// the records on disk or their positions: a sync, `next_settled`, the end of the handler
    /// call.
    pub fn flush(&mut self, now_ms: u64) {
        self.write_deferred(self.deferred.len(), now_ms);
    }

    /// The newest deferred record of `id` on queue `destination`.
    fn find_deferred(&self, id: MessageId, destination: &Arc<[u8]>) -> Option<usize> {
        if self.deferred.is_empty() {
            return None;
        }
        self.deferred.iter().rposition(|deferred| {
            deferred.message.id == id && same_queue(&deferred.message.destination, destination)
        })
    }

    fn waiting_at(&mut self, at: u64) -> &mut Waiting {
        let index = (at - self.waiting_popped) as usize;
        &mut self.waiting[index]
    }

    /// Writes the `count` oldest deferred records.
    fn write_deferred(&mut self, count: usize, now_ms: u64) {
        for _ in 0..count {
            let Some(Deferred { message, waiting }) = self.deferred.pop_front() else {
                return;
            };
            let failed = match self.append_message(&message, now_ms) {
                Ok(position) => {
                    self.positions
                        .insert(message.id, &message.destination, position);
                    None
                }
                Err(error) => {
                    tracing::error!(
                        shard = self.log.config().shard,
                        destination = %String::from_utf8_lossy(&message.destination),
                        "message not stored: {error}"
                    );
                    Some(error.client_message())
                }
            };
            match waiting {
                // Reported in its turn, behind the tokens issued before it.
                Some(at) => {
                    let end = self.log.appended_upto();
                    let waiting = self.waiting_at(at);
                    waiting.end = end;
                    waiting.deferred = false;
                    waiting.failed = failed;
                }
                None => {
                    if let Some(reason) = failed {
                        self.not_stored.push_back(NotStored {
                            destination: message.destination.clone(),
                            id: message.id,
                            token: None,
                            reason,
                        });
                    }
                }
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

    /// The next thing the broker is owed: failed records without a token first, then tokens in
    /// order; `None` while the front token still waits for a sync (or for its deferred record:
    /// call `flush` first).
    pub fn next_settled(&mut self) -> Option<Settled> {
        if let Some(not_stored) = self.not_stored.pop_front() {
            return Some(Settled::NotStored(not_stored));
        }
        let front = self.waiting.front()?;
        if front.deferred {
            return None;
        }
        let reason = match front.failed {
            Some(reason) => Some(reason),
            None if self.failed || self.log.has_failed() => {
                Some("the log could not be written or synced to disk")
            }
            None if !self.receipts_wait_for_sync || self.log.synced_upto() >= front.end => None,
            None => return None,
        };
        let waiting = self.waiting.pop_front().expect("front exists");
        self.waiting_popped += 1;
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

    /// Writes the records appended this turn into the log's file, at the end of each event-loop
    /// turn, before the turn's frames go out; returns false when the write failed (waiting
    /// tokens now fail: the caller settles). Under every fsync policy: a client hears of
    /// records before any sync covers them (a RECEIPT for an ACK sent by another shard, a
    /// delivery), and only the page cache keeps them through a crash of the process. Writing
    /// only when a sync starts was faster (1.05M against 840k msgs/s, BENCHMARKS.md) but lost a
    /// receipted ACK to kill -9 (tests/stompd_durable.rs).
    pub fn write_pending(&mut self) -> bool {
        if let Err(error) = self.log.write_pending() {
            tracing::error!(
                shard = self.log.config().shard,
                "log write failed: the log refuses further appends (persistent SENDs get an ERROR); restart the broker once the disk is healthy: {error}"
            );
            self.failed = true;
            return false;
        }
        true
    }

    /// The sync to put on the ring now, if any (`None` while one is in flight).
    pub fn start_sync(&mut self, now_ms: u64) -> Option<SyncRequest> {
        // A sync covers what is written: nothing may still be held back.
        self.flush(now_ms);
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

    /// Work for each tick: unlink fully-acknowledged segments, prepare the next one.
    ///
    /// Reclaim does not wait for a moment with no sync in flight: under `fsync always` and
    /// steady load there is almost never one, and the log would grow until the load stopped.
    /// The log itself keeps every segment an in-flight sync names (`ShardLog::reclaim`).
    pub fn housekeeping(&mut self, now_ms: u64) {
        if let Err(error) = self.log.reclaim() {
            tracing::warn!(shard = self.log.config().shard, "reclaim failed: {error}");
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

    /// Blocking sync at shutdown (deferred records written first).
    pub fn sync_now(&mut self, now_ms: u64) {
        self.flush(now_ms);
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

    /// Tokens or failures not reported yet, or records not written yet.
    pub fn has_waiting(&self) -> bool {
        !self.waiting.is_empty() || !self.deferred.is_empty() || !self.not_stored.is_empty()
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
/// on every insert and remove instead (~15% of the queue shard's time, see docs/PERFORMANCE.md).
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
        durability.append(message(1), Some(DurableToken(0)), 1);
        durability.flush(1);
        assert_eq!(durability.next_settled(), None, "not synced yet");
        let request = durability.start_sync(1).expect("a sync is due");
        assert!(durability.start_sync(1).is_none(), "one sync in flight");
        // Appended while the sync is in flight: waits for the next one.
        durability.append(message(2), Some(DurableToken(1)), 1);
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
        durability.append(message(1), Some(DurableToken(0)), 1);
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
        durability.append(message(2), None, 2);
        durability.flush(2);
        let Some(Settled::NotStored(not_stored)) = durability.next_settled() else {
            panic!("a record the failed log refused must be reported");
        };
        assert_eq!((not_stored.id, not_stored.token), (id(2), None));
    }

    #[test]
    fn a_restart_brings_back_messages_with_headers_positions_and_delivery_marks() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut durability = open(dir.path());
            durability.append(message(1), None, 1);
            durability.append(message(2), None, 1);
            let queue: Arc<[u8]> = Arc::from(&b"/queue/a"[..]);
            durability.append(
                Record::Delivered {
                    destination: queue.clone(),
                    id: id(2),
                },
                None,
                1,
            );
            durability.append(
                Record::Ack {
                    destination: queue,
                    id: id(1),
                },
                None,
                1,
            );
            durability.sync_now(1);
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

    fn ack(seq: u64) -> Record {
        Record::Ack {
            destination: Arc::from(&b"/queue/a"[..]),
            id: id(seq),
        }
    }

    fn delivered(seq: u64) -> Record {
        Record::Delivered {
            destination: Arc::from(&b"/queue/a"[..]),
            id: id(seq),
        }
    }

    fn sync(durability: &mut Durability, now_ms: u64) {
        let request = durability.start_sync(now_ms).expect("a sync is due");
        for _ in &request.targets {
            durability.sync_completed(0);
        }
    }

    /// Reopens the log in `dir`: the ids of the messages recovery brings back, in log order,
    /// with their delivery counts, and how many good records it read.
    fn reopen(dir: &std::path::Path) -> (Vec<(MessageId, u32)>, u64) {
        let config = crate::log::LogConfig::new(dir, 0);
        let (log, recovery) = ShardLog::open(config).unwrap();
        let records = recovery.report.records;
        let recovered = Durability::new(log).restore_queues(recovery.queues, ShardId(0), 1 << 40);
        let ids = recovered
            .iter()
            .map(|r| (r.message.id, r.deliveries))
            .collect();
        (ids, records)
    }

    #[test]
    fn a_message_acked_in_the_pass_that_accepted_it_writes_no_record() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut durability = open(dir.path());
            let start = durability.log.appended_upto();
            durability.append(message(1), None, 1);
            durability.append(ack(1), None, 1);
            durability.flush(1);
            assert_eq!(
                durability.log.appended_upto(),
                start,
                "neither record written"
            );
            assert_eq!(durability.live_messages(), 0);
            assert_eq!(durability.positions.get(id(1), b"/queue/a"), None);
            assert!(!durability.has_waiting());
            // An ack after the flush of a message written by it is logged as before.
            durability.append(message(2), None, 2);
            durability.flush(2);
            durability.append(ack(2), None, 3);
            assert!(durability.log.appended_upto() > start);
            assert_eq!(durability.live_messages(), 0);
            durability.sync_now(3);
        }
        let (ids, records) = reopen(dir.path());
        assert_eq!(ids, vec![]);
        assert_eq!(records, 2, "message 2 and its ack; nothing of message 1");
    }

    #[test]
    fn a_cancelled_message_keeps_its_token_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut durability = open(dir.path());
        // M1 (token 0), M2 (token 1), M2 auto-acked in the same pass: token 1 needs no record,
        // yet must not overtake token 0, whose record is not even written before the flush.
        durability.append(message(1), Some(DurableToken(0)), 1);
        durability.append(message(2), Some(DurableToken(1)), 1);
        durability.append(ack(2), None, 1);
        assert_eq!(
            durability.next_settled(),
            None,
            "token 0's record is deferred"
        );
        durability.flush(1);
        assert_eq!(
            durability.next_settled(),
            None,
            "token 0 waits for its sync"
        );
        sync(&mut durability, 2);
        assert_eq!(
            durability.next_settled(),
            Some(Settled::Durable(DurableToken(0)))
        );
        assert_eq!(
            durability.next_settled(),
            Some(Settled::Durable(DurableToken(1)))
        );
        assert_eq!(durability.next_settled(), None);
        // M3 (token 2), M4 (token 3), M3 acked: token 2 is due with what came before it (all
        // synced), token 3 still waits for M4's sync.
        durability.append(message(3), Some(DurableToken(2)), 3);
        durability.append(message(4), Some(DurableToken(3)), 3);
        durability.append(ack(3), None, 3);
        durability.flush(3);
        assert_eq!(
            durability.next_settled(),
            Some(Settled::Durable(DurableToken(2)))
        );
        assert_eq!(durability.next_settled(), None, "M4 is not synced");
        sync(&mut durability, 4);
        assert_eq!(
            durability.next_settled(),
            Some(Settled::Durable(DurableToken(3)))
        );
        assert!(!durability.has_waiting());
        assert_eq!(durability.positions.get(id(3), b"/queue/a"), None);
        assert!(durability.positions.get(id(4), b"/queue/a").is_some());
    }

    #[test]
    fn a_delivered_mark_on_a_deferred_message_writes_it_first_in_order() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut durability = open(dir.path());
            durability.append(message(1), None, 1);
            durability.append(message(2), None, 1);
            durability.append(message(3), None, 1);
            durability.append(delivered(2), None, 1);
            assert!(durability.positions.get(id(1), b"/queue/a").is_some());
            assert!(durability.positions.get(id(2), b"/queue/a").is_some());
            assert_eq!(
                durability.positions.get(id(3), b"/queue/a"),
                None,
                "M3 stays deferred"
            );
            durability.flush(1);
            durability.sync_now(2);
        }
        let (ids, records) = reopen(dir.path());
        assert_eq!(ids, vec![(id(1), 0), (id(2), 1), (id(3), 0)]);
        assert_eq!(records, 4);
    }

    #[test]
    fn deferred_messages_are_written_by_flush_start_sync_and_sync_now() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut durability = open(dir.path());
            let start = durability.log.appended_upto();
            durability.append(message(1), None, 1);
            assert_eq!(durability.log.appended_upto(), start, "deferred");
            assert!(
                durability.has_waiting(),
                "not drained while a record is held"
            );
            durability.flush(1);
            assert!(durability.log.appended_upto() > start);
            assert!(!durability.has_waiting());
            assert!(durability.positions.get(id(1), b"/queue/a").is_some());
            durability.append(message(2), None, 2);
            sync(&mut durability, 2);
            assert!(durability.positions.get(id(2), b"/queue/a").is_some());
            durability.append(message(3), None, 3);
            durability.sync_now(3);
            assert_eq!(durability.live_messages(), 3);
        }
        let (ids, _) = reopen(dir.path());
        assert_eq!(ids, vec![(id(1), 0), (id(2), 0), (id(3), 0)]);
    }

    #[test]
    fn more_deferred_messages_than_the_bound_write_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let mut durability = open(dir.path());
        let count = DEFERRED_MESSAGES_MAX as u64;
        for seq in 1..=count {
            durability.append(message(seq), None, 1);
        }
        assert_eq!(durability.live_messages(), 0);
        durability.append(message(count + 1), None, 1);
        assert_eq!(durability.live_messages(), 1, "the oldest was written");
        // Its ack is now a record; the newest is still cancelled by its own.
        durability.append(ack(1), None, 1);
        durability.append(ack(count + 1), None, 1);
        durability.flush(1);
        assert_eq!(durability.live_messages(), count - 1);
        assert_eq!(durability.positions.get(id(count + 1), b"/queue/a"), None);
    }

    #[test]
    fn records_that_cannot_be_stored_are_still_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::log::LogConfig::new(dir.path(), 0);
        config.segment_bytes = 64 * 1024;
        let (log, _) = ShardLog::open(config).unwrap();
        let mut durability = Durability::new(log);
        let body = vec![7u8; 64 * 1024];
        let big = |seq: u64| Record::Message {
            message: Arc::new(Message::from_send(
                id(seq),
                Arc::from(&b"/queue/a"[..]),
                [(&b"persistent"[..], &b"true"[..])],
                &body,
                0,
                true,
            )),
        };
        // With a token: in its turn, before the token behind it.
        durability.append(big(1), Some(DurableToken(0)), 1);
        durability.append(message(2), Some(DurableToken(1)), 1);
        // Without one: reported first, with no token.
        durability.append(big(3), None, 1);
        durability.flush(1);
        let Some(Settled::NotStored(not_stored)) = durability.next_settled() else {
            panic!("big(3) must be reported");
        };
        assert_eq!((not_stored.id, not_stored.token), (id(3), None));
        assert_eq!(
            not_stored.reason,
            LogError::RecordTooLarge {
                bytes: 0,
                max_bytes: 0
            }
            .client_message()
        );
        let Some(Settled::NotStored(not_stored)) = durability.next_settled() else {
            panic!("big(1) must be reported in its turn");
        };
        assert_eq!(
            (not_stored.id, not_stored.token),
            (id(1), Some(DurableToken(0)))
        );
        assert_eq!(
            durability.next_settled(),
            None,
            "message 2 waits for its sync"
        );
        sync(&mut durability, 2);
        assert_eq!(
            durability.next_settled(),
            Some(Settled::Durable(DurableToken(1)))
        );
        // One consumed in the pass that accepted it is never written, so it cannot fail.
        durability.append(big(4), Some(DurableToken(2)), 3);
        durability.append(ack(4), None, 3);
        durability.flush(3);
        assert_eq!(
            durability.next_settled(),
            Some(Settled::Durable(DurableToken(2)))
        );
        assert!(!durability.has_waiting());
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

    /// Many queues, one message each, drained in another order than they were filled (and
    /// some ids out of order, so the scattered map is used too): nothing is held afterwards,
    /// not a slot and not a reference to any queue's name.
    #[test]
    fn drained_queues_leave_no_entry_and_no_name_behind() {
        let queues: Vec<Arc<[u8]>> = (0..10_000u64)
            .map(|n| Arc::from(format!("/queue/q{n}").into_bytes()))
            .collect();
        let mut positions = Positions::default();
        // Every 100th id arrives late, after the run has moved past it.
        let late = |n: u64| n % 100 == 7;
        for (n, queue) in (0u64..).zip(&queues) {
            if !late(n) {
                positions.insert(id(n + 1), queue, at((n + 1) * 8));
            }
        }
        for (n, queue) in (0u64..).zip(&queues) {
            if late(n) {
                positions.insert(id(n + 1), queue, at((n + 1) * 8));
            }
        }
        assert!(!positions.scattered.is_empty(), "late ids are scattered");
        // Drained by a stride that visits every queue once, far from publish order.
        for step in 0..10_000u64 {
            let n = (step * 7_919) % 10_000;
            let name = &queues[n as usize];
            assert_eq!(positions.remove(id(n + 1), name), Some(at((n + 1) * 8)));
        }
        assert!(positions.runs.iter().all(|run| run.slots.is_empty()));
        assert!(positions.scattered.is_empty() && positions.scattered.more.is_empty());
        for queue in &queues {
            assert_eq!(
                Arc::strong_count(queue),
                1,
                "a drained queue's name is held"
            );
        }
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
    fn housekeeping_reclaims_acked_segments_while_a_sync_is_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::log::LogConfig::new(dir.path(), 0);
        // A few dozen records per segment, so 200 messages span several.
        config.segment_bytes = 2 * crate::log::LogConfig::SEGMENT_BYTES_MIN;
        let (log, _) = ShardLog::open(config).unwrap();
        let mut durability = Durability::new(log);
        let queue: Arc<[u8]> = Arc::from(&b"/queue/a"[..]);
        for seq in 1..=200 {
            durability.append(message(seq), None, 1);
        }
        durability.flush(1);
        let request = durability.start_sync(1).unwrap();
        for _ in &request.targets {
            durability.sync_completed(0);
        }
        for seq in 1..=200 {
            let destination = queue.clone();
            durability.append(
                Record::Ack {
                    destination,
                    id: id(seq),
                },
                None,
                2,
            );
        }
        durability.flush(2);
        let before = durability.log.disk_bytes();
        // Steady load: the acks' sync is in flight at the tick.
        let request = durability.start_sync(2).unwrap();
        assert!(durability.is_sync_in_flight());
        durability.housekeeping(3);
        let after = durability.log.disk_bytes();
        assert!(
            after < before,
            "acked segments must go while a sync is in flight ({before} -> {after} bytes)"
        );
        for _ in &request.targets {
            durability.sync_completed(0);
        }
        assert_eq!(durability.live_messages(), 0);
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
