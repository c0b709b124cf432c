//! One shard's store as the broker talks to it ([`crate::broker::Store`]): turns the broker's
//! [`Record`]s into log appends (acks and delivered marks name the records by the
//! [`StoreRef`]s the store gave), reads paged messages and queue tails back, recovers the
//! queues at start, hands the group-commit fsync to the shard's io_uring, and says which
//! [`DurableToken`]s may be reported to the broker.
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

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::Arc;

use crate::broker::{
    DiskPressure, DurableToken, Message, MessageId, Paged, Record, Recovered, Scanned, ShardId,
    Store, StoreRef, StoredAt, TailScan,
};
use crate::log::format::{BinaryId, MessageView, StoredHeaders};
use crate::log::{LogError, MessageRecord, Position, ShardLog, SyncRequest};

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

/// Ids for message records whose stored id is not one of ours (versions 1 and 2 kept the
/// text the writer gave): counting down from the first id of this boot keeps them apart from
/// the ids it hands out.
#[derive(Debug)]
struct FallbackIds {
    shard: ShardId,
    next_seq: u64,
}

impl FallbackIds {
    /// The queue's index entry for the message record `view` at `position`.
    fn entry(&mut self, position: Position, view: &MessageView<'_>) -> Paged {
        // Binary from format version 3 on; text the broker wrote (`<shard>-<seq>`) before.
        let id = match view.message_id().binary() {
            Some(id) => MessageId {
                shard: ShardId(id.shard),
                seq: id.seq,
            },
            None => {
                self.next_seq -= 1;
                MessageId {
                    shard: self.shard,
                    seq: self.next_seq,
                }
            }
        };
        Paged::new(
            pack(position),
            id,
            view.expires_ms(),
            view.body.len(),
            view.head_bytes(),
        )
    }
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
    /// Tokens not yet reported, in order, each with the position whose durability it needs.
    waiting: VecDeque<Waiting>,
    /// Entries ever popped from the front of `waiting`.
    waiting_popped: u64,
    /// Message records of this handler pass not written yet, in the order they came.
    deferred: VecDeque<Deferred>,
    /// Message records of this pass written before its end (the bound, or a delivered mark
    /// wanted the position): an ack the broker emitted while one was still held back names
    /// no position, and finds it here. Emptied by `flush`.
    written_early: Vec<Arc<Message>>,
    /// Records without a token that could not be written, to report before any token.
    not_stored: VecDeque<NotStored>,
    /// A sync failed: nothing becomes durable any more, and waiting tokens fail.
    failed: bool,
    /// `--fsync always`: tokens wait for the sync; otherwise they are released at once.
    receipts_wait_for_sync: bool,
    sync: Option<SyncInFlight>,
    /// Ids for records of older formats, as recovery and tail scans read them.
    fallback: FallbackIds,
}

/// io_uring user tokens of this module's fsyncs (the handler owns the rest of the space).
pub const SYNC_TOKEN: u64 = 1;

impl Durability {
    pub fn new(log: ShardLog) -> Durability {
        let receipts_wait_for_sync = log.config().fsync.receipt_waits_for_sync();
        Durability {
            log,
            waiting: VecDeque::new(),
            waiting_popped: 0,
            deferred: VecDeque::with_capacity(DEFERRED_MESSAGES_MAX),
            written_early: Vec::new(),
            not_stored: VecDeque::new(),
            failed: false,
            receipts_wait_for_sync,
            sync: None,
            fallback: FallbackIds {
                shard: ShardId(0),
                next_seq: u64::MAX,
            },
        }
    }

    /// Hands `restore` the index entry of every message recovery found pending, in log
    /// order, for `Shard::restore_one`: no body or header is kept in memory. `fallback_seq`
    /// numbers messages whose stored id is not one of ours (written by another tool):
    /// counting down from it keeps them apart from the ids this boot hands out.
    pub fn recover(
        &mut self,
        shard: ShardId,
        fallback_seq: u64,
        mut restore: impl FnMut(Recovered),
    ) -> Result<(), LogError> {
        self.fallback = FallbackIds {
            shard,
            next_seq: fallback_seq,
        };
        let fallback = &mut self.fallback;
        let mut destination: Arc<[u8]> = Arc::from(&b""[..]);
        self.log.for_each_pending(|pending| {
            let view = pending.view;
            // One name per run of messages of the same queue, not one per message.
            if *destination != *view.destination {
                destination = Arc::from(view.destination);
            }
            let deliveries = if pending.redelivered {
                pending.deliveries.max(1)
            } else {
                pending.deliveries
            };
            restore(Recovered {
                destination: destination.clone(),
                entry: fallback.entry(pending.position, &view),
                deliveries,
            });
        })
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
                    self.write_deferred(1, true, now_ms);
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
            Record::Ack {
                destination,
                id,
                at,
            } => {
                if let Some(at) = at {
                    match self.log.ack(&[unpack(at)], now_ms) {
                        // Acked already (a race the broker resolves itself): nothing to do.
                        Ok(()) | Err(LogError::NotLive(_)) => {}
                        // The ack is applied in memory; only a restart could bring it back.
                        Err(error) => {
                            tracing::warn!(
                                shard = self.log.config().shard,
                                "ack not logged: {error}"
                            )
                        }
                    }
                } else if let Some(index) = self.find_deferred(id, &destination) {
                    let cancelled = self.deferred.remove(index).expect("found above");
                    if let Some(at) = cancelled.waiting {
                        let end = self.log.appended_upto();
                        let waiting = self.waiting_at(at);
                        waiting.end = end;
                        waiting.deferred = false;
                    }
                } else if let Some(at) = self.written_early_at(id, &destination) {
                    self.append(
                        Record::Ack {
                            destination,
                            id,
                            at: Some(at),
                        },
                        None,
                        now_ms,
                    );
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
            Record::Delivered {
                destination,
                id,
                at,
            } => {
                // The mark needs the record's position: write it (and, to keep log order, the
                // ones deferred before it) now.
                let at = at.or_else(|| {
                    let Some(index) = self.find_deferred(id, &destination) else {
                        return self.written_early_at(id, &destination);
                    };
                    let message = self.deferred[index].message.clone();
                    self.write_deferred(index + 1, true, now_ms);
                    message.stored_at.get()
                });
                if let Some(at) = at {
                    if let Err(error) = self.log.delivered(&[unpack(at)], now_ms) {
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
        self.write_deferred(self.deferred.len(), false, now_ms);
        self.written_early.clear();
    }

    /// Where a record of this pass written before its end went (see `written_early`).
    fn written_early_at(&self, id: MessageId, destination: &Arc<[u8]>) -> Option<StoreRef> {
        let message =
            self.written_early.iter().rev().find(|message| {
                message.id == id && same_queue(&message.destination, destination)
            })?;
        message.stored_at.get()
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
    /// `early`: before the end of the pass, so remembered in `written_early` (the flush at
    /// the end needs no such record: the pass's acks are all in by then).
    fn write_deferred(&mut self, count: usize, early: bool, now_ms: u64) {
        for _ in 0..count {
            let Some(Deferred { message, waiting }) = self.deferred.pop_front() else {
                return;
            };
            let failed = match self.append_message(&message, now_ms) {
                Ok(position) => {
                    message.stored_at.set(pack(position));
                    if early {
                        self.written_early.push(message.clone());
                    }
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

    /// Writes `message` as a version 3 record: the binary id and the header block exactly as
    /// the message holds them, so nothing is unescaped here or escaped again by `load`.
    fn append_message(&mut self, message: &Message, now_ms: u64) -> Result<Position, LogError> {
        self.log.append_message(
            &MessageRecord {
                destination: &message.destination,
                id: BinaryId {
                    shard: message.id.shard.0,
                    seq: message.id.seq,
                },
                timestamp_ms: now_ms,
                header_block: &message.header_block,
                block_plain: message.header_block_plain,
                // A non-persistent message is logged only to free memory: it must not come
                // back after a restart.
                transient: !message.persistent,
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

/// Same queue name; pointer equality first, since a queue passes the same `Arc` each time.
fn same_queue(a: &Arc<[u8]>, b: &[u8]) -> bool {
    std::ptr::eq(a.as_ptr(), b.as_ptr()) || **a == *b
}

impl Store for Durability {
    fn load(&mut self, destination: &Arc<[u8]>, entry: &Paged) -> Option<Message> {
        let shard = self.log.config().shard;
        let view = match self.log.read_message(unpack(entry.at())) {
            Ok(view) => view,
            Err(error) => {
                tracing::error!(
                    shard,
                    destination = %String::from_utf8_lossy(destination),
                    "a queued message is lost: {error}"
                );
                return None;
            }
        };
        let persistent = !view.is_transient();
        let mut message = match view.stored_headers() {
            // Version 3: the block as the broker held it, copied once.
            StoredHeaders::Block { bytes, plain } => Message::from_block(
                entry.id(),
                destination.clone(),
                bytes,
                plain,
                view.body,
                entry.expires_ms,
                persistent,
            ),
            // Versions 1 and 2 stored unescaped entries: escaped as on a SEND.
            StoredHeaders::Entries(entries) => Message::from_send(
                entry.id(),
                destination.clone(),
                entries,
                view.body,
                entry.expires_ms,
                persistent,
            ),
        };
        message.stored_at = StoredAt::at(entry.at());
        Some(message)
    }

    fn scan(&mut self, scan: TailScan<'_>) -> Scanned {
        let TailScan {
            destination,
            from,
            skip,
            max,
            out,
        } = scan;
        let fallback = &mut self.fallback;
        let mut taken = 0;
        let scanned = self.log.scan_live(unpack(from), |position, view| {
            if *view.destination != **destination {
                return ControlFlow::Continue(());
            }
            let entry = fallback.entry(position, &view);
            if skip.passes_over(entry.at(), entry.id()) {
                return ControlFlow::Continue(());
            }
            out.push(entry);
            taken += 1;
            if taken < max {
                ControlFlow::Continue(())
            } else {
                ControlFlow::Break(())
            }
        });
        match scanned {
            Ok(next) => Scanned {
                next: pack_end(next),
                at_end: taken < max,
            },
            Err(error) => {
                // Only an unmappable segment gets here: the queue's tail reads what it found.
                tracing::error!(
                    shard = self.log.config().shard,
                    destination = %String::from_utf8_lossy(destination),
                    "a queue's backlog could not be read from the log: {error}"
                );
                Scanned {
                    next: from,
                    at_end: true,
                }
            }
        }
    }

    /// From the segment files the log holds (a running sum, no I/O) against its share of
    /// `disk_bytes_max`.
    fn disk_pressure(&self) -> DiskPressure {
        DiskPressure::of(self.log.disk_bytes_held(), self.log.config().disk_bytes_max)
    }
}

/// Bits of a [`StoreRef`] for the offset, in 8-byte units: segments are at most 4 GiB
/// (`LogConfig` checks), so offsets divided by 8 fit in 29 bits, leaving 35 for the segment's
/// sequence number (34 billion segments).
const OFFSET_BITS: u32 = 29;

/// A log position as the broker keeps it: one word instead of two.
pub fn pack(position: Position) -> StoreRef {
    debug_assert_eq!(position.offset % 8, 0, "records start at multiples of 8");
    debug_assert!(
        position.offset >> 3 < 1 << OFFSET_BITS,
        "segments are at most 4 GiB"
    );
    debug_assert!(position.segment < 1 << (64 - OFFSET_BITS));
    StoreRef(position.segment << OFFSET_BITS | position.offset >> 3)
}

/// [`pack`] for where a scan stopped, which may be the very end of a 4 GiB segment: the start
/// of the next one is the same place for a scan.
fn pack_end(position: Position) -> StoreRef {
    if position.offset >> 3 >= 1 << OFFSET_BITS {
        return pack(Position {
            segment: position.segment + 1,
            offset: 0,
        });
    }
    pack(position)
}

pub fn unpack(at: StoreRef) -> Position {
    Position {
        segment: at.0 >> OFFSET_BITS,
        offset: (at.0 & ((1 << OFFSET_BITS) - 1)) << 3,
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

    fn open(dir: &std::path::Path) -> Durability {
        let config = crate::log::LogConfig::new(dir, 0);
        let (log, _) = ShardLog::open(config).unwrap();
        Durability::new(log)
    }

    /// The stored message `seq` of queue `/queue/a`: one `Arc` per id for the whole test (a
    /// thread-local table), so acks find the position its record was written at.
    fn stored(seq: u64) -> Arc<Message> {
        thread_local! {
            static MESSAGES: std::cell::RefCell<std::collections::HashMap<u64, Arc<Message>>> =
                Default::default();
        }
        MESSAGES.with(|messages| {
            messages
                .borrow_mut()
                .entry(seq)
                .or_insert_with(|| {
                    Arc::new(Message::from_send(
                        id(seq),
                        Arc::from(&b"/queue/a"[..]),
                        [(&b"expires"[..], &b"0"[..]), (&b"x\\y"[..], &b"a:b"[..])],
                        b"body",
                        0,
                        true,
                    ))
                })
                .clone()
        })
    }

    fn message(seq: u64) -> Record {
        Record::Message {
            message: stored(seq),
        }
    }

    fn is_written(seq: u64) -> bool {
        stored(seq).stored_at.get().is_some()
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
                    at: None,
                },
                None,
                1,
            );
            durability.append(
                Record::Ack {
                    destination: queue,
                    id: id(1),
                    at: None,
                },
                None,
                1,
            );
            durability.sync_now(1);
        }
        let config = crate::log::LogConfig::new(dir.path(), 0);
        let (log, _) = ShardLog::open_indexed(config).unwrap();
        let mut durability = Durability::new(log);
        let mut recovered = Vec::new();
        durability
            .recover(ShardId(0), 1 << 40, |r| recovered.push(r))
            .unwrap();
        assert_eq!(recovered.len(), 1, "the acked message stays gone");
        let original = stored(2);
        assert_eq!(recovered[0].entry.id(), id(2));
        assert_eq!(recovered[0].deliveries, 1, "delivered before the restart");
        // Only the index entry came back; the body and headers are read from the log.
        let loaded = durability
            .load(&recovered[0].destination, &recovered[0].entry)
            .expect("readable");
        assert_eq!(loaded, *original, "same id, headers, body, record");
    }

    fn ack(seq: u64) -> Record {
        Record::Ack {
            destination: Arc::from(&b"/queue/a"[..]),
            id: id(seq),
            at: stored(seq).stored_at.get(),
        }
    }

    fn delivered(seq: u64) -> Record {
        Record::Delivered {
            destination: Arc::from(&b"/queue/a"[..]),
            id: id(seq),
            at: stored(seq).stored_at.get(),
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
        let (log, report) = ShardLog::open_indexed(config).unwrap();
        let records = report.records;
        let mut recovered = Vec::new();
        Durability::new(log)
            .recover(ShardId(0), 1 << 40, |r| recovered.push(r))
            .unwrap();
        let ids = recovered
            .iter()
            .map(|r| (r.entry.id(), r.deliveries))
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
            assert!(!is_written(1));
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
        assert!(!is_written(3));
        assert!(is_written(4));
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
            assert!(is_written(1));
            assert!(is_written(2));
            assert!(!is_written(3), "M3 stays deferred");
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
            assert!(is_written(1));
            durability.append(message(2), None, 2);
            sync(&mut durability, 2);
            assert!(is_written(2));
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
        assert!(!is_written(count + 1));
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
                    at: stored(seq).stored_at.get(),
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
}
