//! One shard's durable store as the running broker uses it: turns the broker's
//! [`Record`]s into log appends, keeps each live message's log [`Position`] so later acks and
//! delivered marks find it, drives the group-commit fsync through the shard's io_uring, and
//! says which [`DurableToken`]s may be reported to the broker.
//!
//! Invariants: tokens are reported in the order the broker issued them (each waits for the
//! position of its own record, and positions only grow); at most one sync request is in flight
//! (the log hands out one at a time) and its descriptors stay valid until it completes; a
//! failed sync stops the log (fsyncgate: retrying could report lost pages as stored).

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;
use std::sync::Arc;

use fnv::FnvHasher;

use crate::broker::{DurableToken, Message, MessageId, Record, Recovered, ShardId};
use crate::codec::escape::unescape;
use crate::codec::{Escaping, Header};
use crate::log::{LogError, MessageRecord, Position, RecoveredQueue, ShardLog, SyncRequest};

type FnvMap<K, V> = HashMap<K, V, BuildHasherDefault<FnvHasher>>;

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
    position: Position,
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
    /// Where each live logged message is: (message id, queue) to its record.
    positions: FnvMap<(MessageId, Arc<[u8]>), Position>,
    /// Tokens not yet reported, in order, each with the position whose durability it needs.
    waiting: VecDeque<Waiting>,
    /// A sync failed: nothing becomes durable any more, and waiting tokens fail.
    failed: bool,
    sync: Option<SyncInFlight>,
    /// Reused for the headers of each appended record.
    headers: Vec<Header<'static>>,
}

/// io_uring user tokens of this module's fsyncs (the handler owns the rest of the space).
pub const SYNC_TOKEN: u64 = 1;

impl Durability {
    pub fn new(log: ShardLog) -> Durability {
        Durability {
            log,
            positions: FnvMap::default(),
            waiting: VecDeque::new(),
            failed: false,
            sync: None,
            headers: Vec::new(),
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
                self.positions
                    .insert((id, destination.clone()), recovered.position);
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
                        .insert((message.id, message.destination.clone()), position);
                    if let Some(token) = token {
                        self.waiting.push_back(Waiting {
                            token,
                            position,
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
                                position: self.log.appended_upto(),
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
                if let Some(position) = self.positions.remove(&(*id, destination.clone())) {
                    if let Err(error) = self.log.ack(&[position], now_ms) {
                        // The ack is applied in memory; only a restart could bring it back.
                        tracing::warn!(shard = self.log.config().shard, "ack not logged: {error}");
                    }
                }
                if let Some(token) = token {
                    self.waiting.push_back(Waiting {
                        token,
                        position: self.log.appended_upto(),
                        message: None,
                        failed: None,
                    });
                }
                None
            }
            Record::Delivered { destination, id } => {
                if let Some(position) = self.positions.get(&(*id, destination.clone())) {
                    if let Err(error) = self.log.delivered(&[*position], now_ms) {
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
        let mut headers = std::mem::take(&mut self.headers);
        headers.clear();
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
            headers.push(Header {
                name: Cow::Owned(name.into_owned()),
                value: Cow::Owned(value.into_owned()),
            });
        }
        let result = self.log.append_message(
            &MessageRecord {
                destination: &message.destination,
                message_id: &text[..id_len],
                timestamp_ms: now_ms,
                headers: &headers,
                body: &message.body,
            },
            now_ms,
        );
        self.headers = headers;
        result
    }

    /// The next thing the broker is owed, in token order; `None` while the front token still
    /// waits for a sync.
    pub fn next_settled(&mut self) -> Option<Settled> {
        let front = self.waiting.front()?;
        let reason = match front.failed {
            Some(reason) => Some(reason),
            None if self.failed => Some("the log could not be synced to disk"),
            None if self.log.receipt_ready(front.position) => None,
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
