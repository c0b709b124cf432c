//! Queues and topics: the state a destination's owning shard keeps, and how it answers the
//! typed messages of [`super::ShardMessage`].
//!
//! Queue invariants:
//! - every accepted, unexpired message is in exactly one place: `ready` (waiting, FIFO), the
//!   tail (waiting after all of `ready`, kept only in the store; see [`super::tail`]) or one
//!   consumer's `unacked` (delivered, in delivery order), until it is consumed for good;
//! - a consumer is handed a message only when it is not paused and its window has room: fewer
//!   than its prefetch messages in it, and the message's estimated frame bytes fit in its
//!   byte window beside those already in it, or the window is empty (so a message larger than
//!   the byte window goes out alone). The window holds, for client acks, the unacknowledged
//!   messages; for auto acks, those handed out and not yet credited back by the session once
//!   flushed to the socket. Among consumers with room, they take turns (round-robin, by
//!   consumer key);
//! - `window_bytes` of a consumer is exactly the estimated frame bytes of the messages in its
//!   window, so what one subscription has between its queue and its socket is at most
//!   `max(prefetch_bytes, one message)`;
//! - a message's `deliveries` counts every time it was handed out (the client is told:
//!   `redelivered`, `delivery-count`); `unsent` counts those that the consumer's session
//!   reported never written to the socket ([`ShardMessage::Unsent`]) or never took in (still
//!   on their way when the consumer went: [`ShardMessage::Unsubscribe`]'s `received`), which
//!   do not count toward `deliveries_max`;
//! - messages that come back (NACK, consumer gone) return to the front of `ready` in their
//!   original order with their delivery count, so the next delivery is marked redelivered, or
//!   move to the dead-letter queue once they were delivered `deliveries_max` times; auto-acked
//!   deliveries returned unwritten (`Returned`, `ReturnedAll`) go back to their place by
//!   arrival order (`order`), however many batches they come back in.
//!
//! Producer flow control (queues): once the waiting messages (`ready` and the tail) pass
//! `queue_messages_max` or `queue_bytes_max`, each connection whose SEND arrives is throttled
//! (told to stop reading input, [`ShardMessage::Throttle`]) and remembered in `throttled`;
//! every one of them is released exactly once, when they have drained to three quarters of
//! both limits. SENDs already under way when the pause began are still taken, up to a quarter
//! over the limits and a few loop turns' worth of input ([`overshoot_max`]); only beyond that
//! is a SEND refused.
//!
//! Topics keep nothing: each message goes to every current subscriber that can take it. A
//! subscriber whose connection is full throttles the producers that publish to it, as a queue
//! does, until it drains (meanwhile it takes what was already on its way within its slack, and
//! an empty slack takes one message however large); one that stays full longer than
//! `topic_subscriber_stall_ms` is slow, not bursty: it stops holding back producers and misses
//! what does not fit its slack.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;
use std::sync::Arc;

use super::ctx::Ctx;
use super::effects::{Record, Rejection, ShardMessage};
use super::tail::{Tail, READ_ENTRIES};
use super::types::{
    dead_letter_queue, shard_of, AckMode, ConnectionId, ConsumerKey, Message, MessageId, Paged,
    QueueStats, ShardId, StoreRef,
};

/// While the broker's memory is past the paging level, a queue with at least this many waiting
/// entries starts a tail ([`Tail`]) rather than hold more; one whose tail exists reads the next
/// batch back once fewer wait. A consumer that keeps up is never near it, so it is served from
/// memory whatever other queues hold.
const HEAD_ENTRIES_LOW: usize = READ_ENTRIES / 4;

/// A message's sender, packed into 8 bytes so that a queue entry stays at 48.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Origin(u64);

impl Origin {
    /// Not known, or not one that fits (a connection number past 2^48 - 1: never in practice).
    const NONE: Origin = Origin(u64::MAX);
    const LOCAL_BITS: u32 = 48;

    fn of(conn: Option<ConnectionId>) -> Origin {
        match conn {
            Some(conn) if conn.local < (1 << Self::LOCAL_BITS) - 1 => {
                Origin(u64::from(conn.shard.0) << Self::LOCAL_BITS | conn.local)
            }
            _ => Origin::NONE,
        }
    }

    fn get(self) -> Option<ConnectionId> {
        (self != Origin::NONE).then_some(ConnectionId {
            shard: ShardId((self.0 >> Self::LOCAL_BITS) as u16),
            local: self.0 & ((1 << Self::LOCAL_BITS) - 1),
        })
    }
}

/// Where a held message's body is.
#[derive(Debug)]
enum Body {
    /// In memory, shared with the deliveries in flight.
    Resident {
        message: Arc<Message>,
        /// The connection that sent it, while that matters: a message the log then fails to
        /// store is dropped, and its sender hears of it even without a receipt. `None` for
        /// messages recovered, dead-lettered or handed back.
        origin: Origin,
    },
    /// Only in the store: a backlog's message, read back when its turn comes
    /// ([`Queue::page_out`], [`Queue::page_in`]).
    Paged(Paged),
}

/// A message held by a queue, with how many times it has been delivered so far.
#[derive(Debug)]
struct Held {
    body: Body,
    deliveries: u32,
    /// Of `deliveries`, those that never reached the consumer's socket: they do not count
    /// toward `deliveries_max`.
    unsent: u32,
    /// When it arrived at this queue (set by [`Queue::hold`]): auto-acked deliveries that come
    /// back unwritten go back to their place in this order, however they return.
    order: u64,
}

impl Held {
    fn resident(message: Arc<Message>, deliveries: u32, origin: Option<ConnectionId>) -> Held {
        Held {
            body: Body::Resident {
                message,
                origin: Origin::of(origin),
            },
            deliveries,
            unsent: 0,
            order: 0,
        }
    }

    fn paged(entry: Paged, deliveries: u32) -> Held {
        Held {
            body: Body::Paged(entry),
            deliveries,
            unsent: 0,
            order: 0,
        }
    }

    /// Deliveries that may have reached a client: what dead-lettering counts.
    fn deliveries_sent(&self) -> u32 {
        self.deliveries.saturating_sub(self.unsent)
    }

    fn id(&self) -> MessageId {
        match &self.body {
            Body::Resident { message, .. } => message.id,
            Body::Paged(paged) => paged.id(),
        }
    }

    fn body_bytes(&self) -> u64 {
        match &self.body {
            Body::Resident { message, .. } => message.body.len() as u64,
            Body::Paged(paged) => u64::from(paged.body_bytes),
        }
    }

    fn expires_ms(&self) -> u64 {
        match &self.body {
            Body::Resident { message, .. } => message.expires_ms,
            Body::Paged(paged) => paged.expires_ms,
        }
    }

    fn is_expired(&self, now_ms: u64) -> bool {
        let expires_ms = self.expires_ms();
        expires_ms != 0 && expires_ms <= now_ms
    }

    fn frame_bytes_estimate(&self) -> u64 {
        match &self.body {
            Body::Resident { message, .. } => message.frame_bytes_estimate(),
            Body::Paged(paged) => paged.frame_bytes_estimate(),
        }
    }

    /// Kept in the log: persistent with the log on, or a non-persistent one sent there to be
    /// paged out (a paged message always is).
    fn is_logged(&self, ctx: &Ctx<'_>) -> bool {
        match &self.body {
            Body::Resident { message, .. } => {
                Queue::logged(ctx, message) || message.stored_at.is_logged()
            }
            Body::Paged(_) => true,
        }
    }

    /// Its record in the store, once written.
    fn stored_at(&self) -> Option<StoreRef> {
        match &self.body {
            Body::Resident { message, .. } => message.stored_at.get(),
            Body::Paged(paged) => Some(paged.at()),
        }
    }

    /// The message in memory: a delivered or dead-lettered message always is.
    fn message(&self) -> &Arc<Message> {
        match &self.body {
            Body::Resident { message, .. } => message,
            Body::Paged(_) => unreachable!("paged in before it is handed out"),
        }
    }
}

#[derive(Debug)]
struct QueueConsumer {
    ack: AckMode,
    /// Most messages in its window at a time: unacknowledged ones for client acks, handed
    /// out and not yet credited back by the session for auto acks.
    prefetch: u32,
    /// Most estimated frame bytes in its window, though an empty window takes one message
    /// whatever its size.
    prefetch_bytes: u64,
    /// Estimated frame bytes of the messages in its window now.
    window_bytes: u64,
    /// Its connection's output is full: deliver nothing until resumed.
    paused: bool,
    /// Delivered and not yet acknowledged, in delivery order (empty for auto acks).
    unacked: VecDeque<Held>,
    /// Auto acks: deliveries the session has not yet reported written ([`ShardMessage::Credit`]).
    in_flight: u32,
    /// Client acks: deliveries handed out, to tell at unsubscribe those still on their way.
    handed: u64,
}

impl QueueConsumer {
    /// Room for one more message of `frame_bytes` (estimated) in its window.
    fn has_credit(&self, frame_bytes: u64) -> bool {
        let used = match self.ack {
            AckMode::Auto => self.in_flight as usize,
            AckMode::Client | AckMode::ClientIndividual => self.unacked.len(),
        };
        !self.paused
            && used < self.prefetch as usize
            && (used == 0 || self.window_bytes + frame_bytes <= self.prefetch_bytes)
    }
}

/// A held message as the tests' invariant checks see it ([`Queue::held_views`]).
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct HeldView {
    pub id: MessageId,
    /// Kept in the log (its record must be live in the store).
    pub logged: bool,
    /// Paged out: only this index entry's record holds the body.
    pub paged: Option<StoreRef>,
    /// The body, when resident.
    pub body: Option<Vec<u8>>,
    pub deliveries: u32,
}

/// A point-to-point destination.
#[derive(Debug)]
pub(crate) struct Queue {
    name: Arc<[u8]>,
    ready: VecDeque<Held>,
    /// Body bytes in `ready`, for `queue_bytes_max`.
    ready_bytes: u64,
    /// The waiting messages after those in `ready`, kept only in the store. Boxed: most
    /// queues never have one.
    tail: Option<Box<Tail>>,
    /// By key: acks and credits find their consumer in O(log n) even on a queue with
    /// thousands of workers, and the order (connection, then subscription) is deterministic.
    consumers: BTreeMap<ConsumerKey, QueueConsumer>,
    /// The consumer served last; the turn passes to the next key after it, wrapping around.
    last_served: Option<ConsumerKey>,
    enqueued: u64,
    dequeued: u64,
    /// No message in `ready` expires before this (u64::MAX: none expires). May be early after
    /// messages leave, never late, so a tick skips the sweep of a queue with nothing due.
    next_expiry_ms: u64,
    /// The earliest time the shard's expiry timer already holds for this queue (u64::MAX:
    /// none), so a queue is put on the timer again only when something expires sooner.
    pub(crate) timer_ms: u64,
    /// Producers told to stop sending because this queue was over its limits, each to be
    /// released once. Ordered, so releases go out in the same order on every run.
    throttled: BTreeSet<ConnectionId>,
    /// The `order` of the next message to arrive.
    next_order: u64,
}

/// The hard limit beyond the flow-control one: a quarter more plus `extra`
/// (`queue_overshoot_*`), room for the SENDs that were already decoded, or on their way
/// between cores, when the producers were throttled.
pub(crate) fn overshoot_max(limit: u64, extra: u64) -> u64 {
    limit.saturating_add(limit / 4).saturating_add(extra)
}

/// Lets every throttled producer go, each once.
fn release_all(ctx: &mut Ctx<'_>, throttled: &mut BTreeSet<ConnectionId>) {
    for conn in std::mem::take(throttled) {
        ctx.route(
            conn.shard,
            ShardMessage::Throttle {
                conn,
                paused: false,
            },
        );
    }
}

/// The level a throttled destination must drain to before its producers may resume: three
/// quarters of the limit, so producers are not paused and resumed on every message.
fn resume_below(limit: u64) -> u64 {
    limit - limit / 4
}

impl Queue {
    pub(crate) fn new(name: Arc<[u8]>) -> Queue {
        Queue {
            name,
            ready: VecDeque::new(),
            ready_bytes: 0,
            tail: None,
            consumers: BTreeMap::new(),
            last_served: None,
            enqueued: 0,
            dequeued: 0,
            next_expiry_ms: u64::MAX,
            timer_ms: u64::MAX,
            throttled: BTreeSet::new(),
            next_order: 0,
        }
    }

    /// Adds a message to `ready`: at the back, as it arrives (which numbers its `order`), or
    /// at the front, coming back.
    fn hold(&mut self, mut held: Held, front: bool) {
        self.note_held(&held);
        if front {
            self.ready.push_front(held);
        } else {
            held.order = self.next_order;
            self.next_order += 1;
            self.ready.push_back(held);
        }
    }

    /// Puts a message that came back unwritten before the first waiting one that arrived
    /// after it, so what goes out next is in the order the queue received it.
    fn hold_in_order(&mut self, held: Held) {
        self.note_held(&held);
        let position = self
            .ready
            .iter()
            .position(|waiting| waiting.order > held.order)
            .unwrap_or(self.ready.len());
        self.ready.insert(position, held);
    }

    fn note_held(&mut self, held: &Held) {
        if held.expires_ms() != 0 {
            self.next_expiry_ms = self.next_expiry_ms.min(held.expires_ms());
        }
        self.ready_bytes += held.body_bytes();
    }

    fn logged(ctx: &Ctx<'_>, message: &Message) -> bool {
        ctx.config.log_enabled && message.persistent
    }

    /// The message left the queue for good: its record is acknowledged.
    fn log_done(&self, ctx: &mut Ctx<'_>, held: &Held) {
        if held.is_logged(ctx) {
            ctx.append(
                Record::Ack {
                    destination: self.name.clone(),
                    id: held.id(),
                    at: held.stored_at(),
                },
                None,
            );
        }
    }

    /// Keeps the newest waiting messages' bodies only in the store while the broker's memory
    /// is past the paging level ([`crate::broker::MemoryBudget::page_out_bytes`]): a backlog
    /// then costs memory per message, not per byte. From the back, where the messages wait
    /// longest; it stops at the first one already paged (those before it were paged by an
    /// earlier call). A message whose record is not written yet (held back until the end of
    /// the call) stays for a later call. A non-persistent message is sent to the store first,
    /// as a transient record (ActiveMQ's temp store): never restored after a restart, it is
    /// there only so that memory does not bound the backlog.
    fn page_out(&mut self, ctx: &mut Ctx<'_>) {
        let budget = ctx.config.memory;
        if !ctx.config.log_enabled || budget.charged() <= budget.page_out_bytes() {
            return;
        }
        for held in self.ready.iter_mut().rev() {
            let Body::Resident { message, .. } = &held.body else {
                break;
            };
            if let Some(at) = message.stored_at.get() {
                held.body = Body::Paged(Paged::of(message, at));
            } else if !message.persistent && !message.stored_at.is_logged() && self.tail.is_none() {
                // (A persistent one's record is on its way already: it was appended when the
                // queue accepted it. With a tail, a record written now would come after the
                // tail's first and be read back as a member: the message stays in memory.)
                message.stored_at.set_appended();
                ctx.append(
                    Record::Message {
                        message: message.clone(),
                    },
                    None,
                );
            }
        }
    }

    /// Reads a paged message's body back from the store for its delivery. `false` when the
    /// store could not read it (it said why): the message is lost, and its record acked so
    /// that a restart does not try again.
    fn page_in(&self, ctx: &mut Ctx<'_>, held: &mut Held) -> bool {
        let Body::Paged(paged) = held.body else {
            return true;
        };
        match ctx.store.load(&self.name, &paged) {
            Some(mut message) => {
                // Back in memory, it counts against the budget as on its SEND.
                message.charge_to(ctx.config.memory);
                held.body = Body::Resident {
                    message: Arc::new(message),
                    origin: Origin::NONE,
                };
                true
            }
            None => {
                ctx.counters.messages_unreadable_total += 1;
                self.log_done(ctx, held);
                false
            }
        }
    }

    pub(crate) fn publish(
        &mut self,
        ctx: &mut Ctx<'_>,
        message: Arc<Message>,
        origin: ConnectionId,
        ticket: Option<u64>,
    ) {
        if message.is_expired(ctx.now_ms) {
            // Never delivered, never stored; the SEND itself was fine.
            ctx.counters.messages_expired_total += 1;
            if let Some(ticket) = ticket {
                ctx.route(
                    origin.shard,
                    ShardMessage::Confirmed {
                        conn: origin,
                        ticket,
                    },
                );
            }
            return;
        }
        let rejection = if self.waiting()
            >= overshoot_max(
                ctx.config.queue_messages_max as u64,
                ctx.config.queue_overshoot_messages,
            ) {
            Some(Rejection::QueueMessagesFull)
        } else if self.waiting_bytes() + message.body.len() as u64
            > overshoot_max(ctx.config.queue_bytes_max, ctx.config.queue_overshoot_bytes)
        {
            Some(Rejection::QueueBytesFull)
        } else {
            None
        };
        if let Some(reason) = rejection {
            ctx.route(
                origin.shard,
                ShardMessage::Rejected {
                    conn: origin,
                    reason,
                },
            );
            return;
        }
        self.enqueued += 1;
        ctx.counters.messages_accepted_total += 1;
        let mut confirm_now = ticket.is_some();
        if Self::logged(ctx, &message) {
            let token = match ticket {
                Some(ticket) if ctx.config.receipts_wait_for_sync => {
                    confirm_now = false;
                    let confirmed = ShardMessage::Confirmed {
                        conn: origin,
                        ticket,
                    };
                    Some(ctx.wait_durable(origin.shard, confirmed))
                }
                _ => None,
            };
            ctx.append(
                Record::Message {
                    message: message.clone(),
                },
                token,
            );
        }
        if confirm_now {
            if let Some(ticket) = ticket {
                ctx.route(
                    origin.shard,
                    ShardMessage::Confirmed {
                        conn: origin,
                        ticket,
                    },
                );
            }
        }
        self.take(ctx, message, Some(origin));
        if self.is_over_limits(ctx) && self.throttled.insert(origin) {
            ctx.route(
                origin.shard,
                ShardMessage::Throttle {
                    conn: origin,
                    paused: true,
                },
            );
        }
    }

    /// A message the queue accepted, its record appended if it is logged: held in memory, or
    /// in the store only, as the tail's newest member; then handed out if a consumer can take
    /// it.
    fn take(&mut self, ctx: &mut Ctx<'_>, message: Arc<Message>, origin: Option<ConnectionId>) {
        if self.goes_to_tail(ctx) {
            self.push_tail(ctx, message, origin);
            self.dispatch(ctx);
        } else {
            self.hold(Held::resident(message, 0, origin), false);
            self.dispatch(ctx);
            self.page_out(ctx);
        }
    }

    /// Messages waiting: in `ready`, then in the tail.
    fn waiting(&self) -> u64 {
        self.ready.len() as u64 + self.tail.as_ref().map_or(0, |tail| tail.len())
    }

    /// Body bytes of the messages waiting.
    fn waiting_bytes(&self) -> u64 {
        self.ready_bytes + self.tail.as_ref().map_or(0, |tail| tail.bytes())
    }

    /// A message arriving now goes to the tail: one exists (arrival order), or enough entries
    /// already wait in memory and the broker's memory is past the paging level, or was when
    /// the newest of them was paged out (paging brings the memory back under the level, but
    /// the backlog that made it cross goes on growing). Only with a log to keep it.
    fn goes_to_tail(&self, ctx: &Ctx<'_>) -> bool {
        let budget = ctx.config.memory;
        let under_pressure = || {
            budget.charged() > budget.page_out_bytes()
                || self
                    .ready
                    .back()
                    .is_some_and(|held| matches!(held.body, Body::Paged(_)))
        };
        ctx.config.log_enabled
            && (self.tail.is_some() || (self.ready.len() >= HEAD_ENTRIES_LOW && under_pressure()))
    }

    /// Keeps `message` only in the store, as the tail's newest member. A non-persistent one is
    /// sent there now, as a transient record (ActiveMQ's temp store), never restored after a
    /// restart; a persistent one's record was appended when the queue accepted it.
    fn push_tail(
        &mut self,
        ctx: &mut Ctx<'_>,
        message: Arc<Message>,
        origin: Option<ConnectionId>,
    ) {
        if !Self::logged(ctx, &message) {
            message.stored_at.set_appended();
            ctx.append(
                Record::Message {
                    message: message.clone(),
                },
                None,
            );
        }
        self.tail
            .get_or_insert_with(Box::default)
            .push(message, origin);
    }

    /// Reads the tail's next batch into `ready` once few entries wait there; when the tail is
    /// over, the members whose records are not written yet come back into memory.
    fn refill(&mut self, ctx: &mut Ctx<'_>) {
        if self.ready.len() >= HEAD_ENTRIES_LOW {
            return;
        }
        let Some(mut tail) = self.tail.take() else {
            return;
        };
        let mut entries = Vec::new();
        let max = READ_ENTRIES - self.ready.len();
        let over = tail.read(ctx.store, &self.name, max, &mut entries);
        for entry in entries {
            self.hold(Held::paged(entry, 0), false);
        }
        match over {
            None => self.tail = Some(tail),
            Some(unwritten) => {
                for (message, origin) in unwritten {
                    self.hold(Held::resident(message, 0, origin), false);
                }
            }
        }
    }

    /// Waiting messages or their bytes are past the flow-control limits.
    fn is_over_limits(&self, ctx: &Ctx<'_>) -> bool {
        self.waiting() > ctx.config.queue_messages_max as u64
            || self.waiting_bytes() > ctx.config.queue_bytes_max
    }

    /// Resumes the throttled producers once the queue has drained far enough.
    fn release_producers(&mut self, ctx: &mut Ctx<'_>) {
        if self.throttled.is_empty()
            || self.waiting() > resume_below(ctx.config.queue_messages_max as u64)
            || self.waiting_bytes() > resume_below(ctx.config.queue_bytes_max)
        {
            return;
        }
        release_all(ctx, &mut self.throttled);
    }

    /// A message that used up its deliveries on queue `from`. Taken whatever the limits: it
    /// has already left `from`, and refusing it would lose it.
    pub(crate) fn accept_dead_letter(
        &mut self,
        ctx: &mut Ctx<'_>,
        message: Arc<Message>,
        from: Arc<[u8]>,
        from_at: Option<StoreRef>,
    ) {
        self.enqueued += 1;
        if Self::logged(ctx, &message) {
            let moved = ShardMessage::Moved {
                destination: from.clone(),
                id: message.id,
                at: from_at,
            };
            let token = ctx.wait_durable(shard_of(&from, ctx.shard_count), moved);
            ctx.append(
                Record::Message {
                    message: message.clone(),
                },
                Some(token),
            );
        }
        self.take(ctx, message, None);
    }

    /// Drops a message still waiting in `ready` (its log record could not be written, so it
    /// must not be delivered as if stored). One handed out already stays with its consumer.
    /// Returns the sender of the message dropped, when known.
    pub(crate) fn forget_ready(&mut self, id: MessageId) -> Option<ConnectionId> {
        let Some(index) = self.ready.iter().position(|held| held.id() == id) else {
            let origin = self.tail.as_mut()?.forget(id)?;
            self.enqueued = self.enqueued.saturating_sub(1);
            return origin;
        };
        let held = self.ready.remove(index)?;
        self.ready_bytes -= held.body_bytes();
        self.enqueued = self.enqueued.saturating_sub(1);
        match held.body {
            Body::Resident { origin, .. } => origin.get(),
            Body::Paged(_) => None,
        }
    }

    /// Puts recovered messages back at startup, in log order. One never delivered joins the
    /// tail, which keeps only a count of them, so memory after a restart does not grow with
    /// the backlog; one delivered before the restart (few: at most the consumers' windows)
    /// waits in `ready` as an index entry, ahead of the tail, to be redelivered first.
    pub(crate) fn restore(&mut self, entry: Paged, deliveries: u32) {
        self.enqueued += 1;
        if deliveries == 0 {
            self.tail.get_or_insert_with(Box::default).restore(&entry);
            return;
        }
        if let Some(tail) = &mut self.tail {
            tail.skip(entry.at());
        }
        self.hold(Held::paged(entry, deliveries), false);
    }

    pub(crate) fn subscribe(
        &mut self,
        ctx: &mut Ctx<'_>,
        key: ConsumerKey,
        ack: AckMode,
        prefetch: u32,
        prefetch_bytes: u64,
        paused: bool,
    ) {
        let previous = self.consumers.insert(
            key,
            QueueConsumer {
                ack,
                prefetch: prefetch.max(1),
                prefetch_bytes,
                window_bytes: 0,
                paused,
                unacked: VecDeque::new(),
                in_flight: 0,
                handed: 0,
            },
        );
        debug_assert!(previous.is_none(), "consumer keys are never reused");
        self.dispatch(ctx);
    }

    /// The consumer is gone; its session took in `received` of the client-ack deliveries
    /// handed to it. The others were still on their way, the newest ones: they never reached
    /// the client, so they do not count toward dead-lettering (`unsent`). None of them can
    /// have been acked, so they are the last of `unacked`.
    pub(crate) fn unsubscribe(&mut self, ctx: &mut Ctx<'_>, key: ConsumerKey, received: u64) {
        let Some(mut consumer) = self.consumers.remove(&key) else {
            return;
        };
        let on_their_way = consumer.handed.saturating_sub(received);
        let on_their_way = usize::try_from(on_their_way).unwrap_or(usize::MAX);
        for held in consumer.unacked.iter_mut().rev().take(on_their_way) {
            held.unsent += 1;
        }
        self.take_back(ctx, consumer.unacked.into_iter().collect(), false);
        self.dispatch(ctx);
    }

    /// The session flushed `count` auto-acked deliveries of `bytes` (estimated) to the
    /// socket: room for as many more.
    pub(crate) fn credit(&mut self, ctx: &mut Ctx<'_>, key: ConsumerKey, count: u32, bytes: u64) {
        if let Some(consumer) = self.consumers.get_mut(&key) {
            consumer.in_flight = consumer.in_flight.saturating_sub(count);
            consumer.window_bytes = consumer.window_bytes.saturating_sub(bytes);
            debug_assert!(
                consumer.in_flight > 0 || consumer.window_bytes == 0,
                "an empty auto-ack window holds no bytes"
            );
        }
        self.dispatch(ctx);
    }

    /// The consumer's session never wrote these deliveries to the socket (they waited behind
    /// a full out buffer, or the connection was lost before they were sent): they do not
    /// count toward `deliveries_max`. The `Unsubscribe` that follows takes them back.
    pub(crate) fn unsent(&mut self, key: ConsumerKey, ids: &[MessageId]) {
        let Some(consumer) = self.consumers.get_mut(&key) else {
            return;
        };
        for held in consumer.unacked.iter_mut() {
            if ids.contains(&held.id()) && held.unsent < held.deliveries {
                held.unsent += 1;
            }
        }
    }

    pub(crate) fn flow(&mut self, ctx: &mut Ctx<'_>, key: ConsumerKey, paused: bool) {
        if let Some(consumer) = self.consumers.get_mut(&key) {
            consumer.paused = paused;
        }
        if !paused {
            self.dispatch(ctx);
        }
    }

    /// Removes `ids` from the consumer's unacknowledged messages, in delivery order. Ids it does
    /// not hold are skipped: the session checked them, so a miss means the consumer already
    /// ended (its messages were taken back) and the ack lost a race it may lose.
    fn remove_unacked(&mut self, key: ConsumerKey, ids: &[MessageId]) -> Vec<Held> {
        let removed = self.take_unacked(key, ids);
        if let Some(consumer) = self.consumers.get_mut(&key) {
            let bytes: u64 = removed.iter().map(Held::frame_bytes_estimate).sum();
            debug_assert!(bytes <= consumer.window_bytes, "window bytes are exact");
            consumer.window_bytes = consumer.window_bytes.saturating_sub(bytes);
        }
        removed
    }

    fn take_unacked(&mut self, key: ConsumerKey, ids: &[MessageId]) -> Vec<Held> {
        let Some(consumer) = self.consumers.get_mut(&key) else {
            return Vec::new();
        };
        if ids.len() > 8 {
            // A cumulative ACK names many: one pass with a set instead of a search per id.
            let wanted: std::collections::HashSet<MessageId> = ids.iter().copied().collect();
            let mut removed = Vec::with_capacity(ids.len());
            let mut kept = VecDeque::with_capacity(consumer.unacked.len());
            for held in consumer.unacked.drain(..) {
                if wanted.contains(&held.id()) {
                    removed.push(held);
                } else {
                    kept.push_back(held);
                }
            }
            consumer.unacked = kept;
            return removed;
        }
        // Acks usually name the oldest deliveries, so search from the front.
        let mut positions: Vec<usize> = ids
            .iter()
            .filter_map(|id| consumer.unacked.iter().position(|held| held.id() == *id))
            .collect();
        positions.sort_unstable();
        positions.dedup();
        let mut removed: Vec<Held> = positions
            .iter()
            .rev()
            .filter_map(|&position| consumer.unacked.remove(position))
            .collect();
        removed.reverse();
        removed
    }

    pub(crate) fn ack(&mut self, ctx: &mut Ctx<'_>, key: ConsumerKey, ids: &[MessageId]) {
        for held in self.remove_unacked(key, ids) {
            self.dequeued += 1;
            self.log_done(ctx, &held);
        }
        self.dispatch(ctx);
    }

    pub(crate) fn nack(
        &mut self,
        ctx: &mut Ctx<'_>,
        key: ConsumerKey,
        ids: &[MessageId],
        requeue: bool,
    ) {
        let returned = self.remove_unacked(key, ids);
        self.take_back(ctx, returned, !requeue);
        self.dispatch(ctx);
    }

    /// An auto-acked delivery that no subscription was left to write. It goes back to its place
    /// among the waiting messages (by `order`, the queue's arrival order), keeping its delivery
    /// count, so its next delivery is marked redelivered: conservative (it was never written),
    /// but it keeps the rule that unmarked deliveries to a subscription are in publish order,
    /// which a consumer that got later messages meanwhile could otherwise see broken.
    pub(crate) fn returned(
        &mut self,
        ctx: &mut Ctx<'_>,
        message: Arc<Message>,
        deliveries: u32,
        order: u64,
    ) {
        self.returned_all(ctx, vec![(message, deliveries, order)]);
    }

    /// Auto-acked deliveries, oldest first, that waited in a session for room in its out
    /// buffer when their subscription ended: back together, each to its place in arrival
    /// order, as [`Self::returned`] puts one (put back one by one, each could be handed out
    /// before the ones older than it were back). By order, not to the front: one that was on
    /// its way when the subscription ended comes back on its own, after the others, and must
    /// not jump ahead of them.
    ///
    /// None of them was handed to the socket, so this delivery is `unsent`: it does not count
    /// toward dead-lettering. (Earlier unsent deliveries of it, as a client-acked message, are
    /// not known here: counted, conservatively, as sent.)
    pub(crate) fn returned_all(
        &mut self,
        ctx: &mut Ctx<'_>,
        messages: Vec<(Arc<Message>, u32, u64)>,
    ) {
        let mut held = Vec::with_capacity(messages.len());
        for (message, deliveries, order) in messages {
            self.dequeued = self.dequeued.saturating_sub(1);
            // Its record, if any (persistent, or transient for paging), was acked when it was
            // handed out: it names nothing any more. Until a new one is written, acks of the
            // message cancel the new one instead, and paging waits for it.
            message.stored_at.clear();
            if Self::logged(ctx, &message) {
                // Log it again so a restart keeps it (a tail's scan passes the new record over).
                if let Some(tail) = &mut self.tail {
                    tail.skip_id(message.id);
                }
                ctx.append(
                    Record::Message {
                        message: message.clone(),
                    },
                    None,
                );
                // The new record lands behind messages that arrived after this one, and a
                // restart recovers in log order: marked as delivered, its next delivery
                // says redelivered after a restart as it does here, so the unmarked ones
                // still keep publish order.
                if deliveries > 0 {
                    ctx.append(
                        Record::Delivered {
                            destination: self.name.clone(),
                            id: message.id,
                            at: None,
                        },
                        None,
                    );
                }
            }
            let mut returned = Held::resident(message, deliveries, None);
            returned.unsent = 1.min(deliveries);
            returned.order = order;
            held.push(returned);
        }
        for held in held {
            self.hold_in_order(held);
        }
        self.dispatch(ctx);
    }

    /// Messages that were delivered and came back, oldest first: to the front of the queue in
    /// that order, or to the dead-letter queue when their deliveries are used up or the client
    /// asked (`dead_letter_now`). A dead-letter queue keeps its own messages either way.
    fn take_back(&mut self, ctx: &mut Ctx<'_>, returned: Vec<Held>, dead_letter_now: bool) {
        let dead_letter = dead_letter_queue(&self.name);
        let mut kept = Vec::new();
        for held in returned {
            match &dead_letter {
                Some(dlq)
                    if dead_letter_now || held.deliveries_sent() >= ctx.config.deliveries_max =>
                {
                    // In their order, so the dead-letter queue keeps it too. Its Ack record
                    // is written only once the dead-letter queue's copy is durable (`Moved`):
                    // a crash in between duplicates it, never loses it.
                    self.dequeued += 1;
                    ctx.counters.messages_dead_lettered_total += 1;
                    let dlq: Arc<[u8]> = Arc::from(dlq.as_slice());
                    let moved = Arc::new(held.message().moved_to(dlq.clone()));
                    let to = shard_of(&dlq, ctx.shard_count);
                    let from_at = match (held.is_logged(ctx), held.message().persistent) {
                        (true, true) => held.stored_at(),
                        // A transient record (paged out while waiting): nothing to keep it
                        // for, since a non-persistent copy is not logged in the dead-letter
                        // queue either.
                        (true, false) => {
                            self.log_done(ctx, &held);
                            None
                        }
                        (false, _) => None,
                    };
                    ctx.route(
                        to,
                        ShardMessage::DeadLetter {
                            message: moved,
                            from: self.name.clone(),
                            from_at,
                        },
                    );
                }
                _ => kept.push(held),
            }
        }
        // Last first, so they stand at the front in their original order.
        for held in kept.into_iter().rev() {
            self.hold(held, true);
        }
    }

    /// Hands waiting messages to consumers with credit, in turn, until either runs out; then
    /// lets throttled producers go if that drained the queue enough.
    fn dispatch(&mut self, ctx: &mut Ctx<'_>) {
        self.hand_out(ctx);
        self.release_producers(ctx);
    }

    fn hand_out(&mut self, ctx: &mut Ctx<'_>) {
        loop {
            if self.tail.is_some() && !self.consumers.is_empty() {
                self.refill(ctx);
            }
            let Some(front) = self.ready.front() else {
                return;
            };
            let frame_bytes = front.frame_bytes_estimate();
            let Some(key) = self.next_with_credit(frame_bytes) else {
                return;
            };
            let Some(mut held) = self.ready.pop_front() else {
                return;
            };
            self.ready_bytes -= held.body_bytes();
            if held.is_expired(ctx.now_ms) {
                self.dequeued += 1;
                ctx.counters.messages_expired_total += 1;
                self.log_done(ctx, &held);
                continue;
            }
            if !self.page_in(ctx, &mut held) {
                self.dequeued += 1;
                continue;
            }
            // Saturating: a dead-letter queue redelivers without limit.
            held.deliveries = held.deliveries.saturating_add(1);
            ctx.counters.deliveries_total += 1;
            self.last_served = Some(key);
            let Some(consumer) = self.consumers.get_mut(&key) else {
                return;
            };
            let settled = consumer.ack == AckMode::Auto;
            // Of the message as read back: what the session and acks will count.
            consumer.window_bytes += held.frame_bytes_estimate();
            ctx.route(
                key.conn.shard,
                ShardMessage::Deliver {
                    consumer: key,
                    message: held.message().clone(),
                    deliveries: held.deliveries,
                    settled,
                    order: held.order,
                },
            );
            if settled {
                consumer.in_flight += 1;
                self.dequeued += 1;
                self.log_done(ctx, &held);
            } else {
                if held.is_logged(ctx) {
                    ctx.append(
                        Record::Delivered {
                            destination: self.name.clone(),
                            id: held.id(),
                            at: held.stored_at(),
                        },
                        None,
                    );
                }
                consumer.handed += 1;
                consumer.unacked.push_back(held);
            }
        }
    }

    /// The first consumer after the one served last, wrapping around, that can take one more
    /// message of `frame_bytes`.
    fn next_with_credit(&self, frame_bytes: u64) -> Option<ConsumerKey> {
        let has_credit = |(key, consumer): (&ConsumerKey, &QueueConsumer)| {
            consumer.has_credit(frame_bytes).then_some(*key)
        };
        match self.last_served {
            None => self.consumers.iter().find_map(has_credit),
            Some(last) => self
                .consumers
                .range((Bound::Excluded(last), Bound::Unbounded))
                .chain(self.consumers.range(..=last))
                .find_map(has_credit),
        }
    }

    /// Drops expired messages that wait at the front (called on ticks), so an idle queue does
    /// not hold them until a consumer comes.
    pub(crate) fn sweep_expired(&mut self, ctx: &mut Ctx<'_>) {
        let now = ctx.now_ms;
        if now < self.next_expiry_ms {
            return;
        }
        self.next_expiry_ms = u64::MAX;
        let mut kept = VecDeque::with_capacity(self.ready.len());
        for held in std::mem::take(&mut self.ready) {
            if held.is_expired(now) {
                self.ready_bytes -= held.body_bytes();
                self.dequeued += 1;
                ctx.counters.messages_expired_total += 1;
                self.log_done(ctx, &held);
            } else {
                if held.expires_ms() != 0 {
                    self.next_expiry_ms = self.next_expiry_ms.min(held.expires_ms());
                }
                kept.push_back(held);
            }
        }
        self.ready = kept;
        self.release_producers(ctx);
    }

    /// When the earliest waiting message expires (u64::MAX: none does); may be early.
    pub(crate) fn next_expiry_ms(&self) -> u64 {
        self.next_expiry_ms
    }

    /// Nothing waits and nobody listens: the shard forgets the queue, so that names used once
    /// do not pile up (a client cannot grow memory by inventing destination names).
    pub(crate) fn is_idle(&self) -> bool {
        self.ready.is_empty()
            && self.tail.is_none()
            && self.consumers.is_empty()
            && self.throttled.is_empty()
    }

    pub(crate) fn stats(&self) -> QueueStats {
        let unacked: usize = self.consumers.values().map(|c| c.unacked.len()).sum();
        QueueStats {
            name: self.name.clone(),
            size: self.waiting() + unacked as u64,
            dequeued: self.dequeued,
            enqueued: self.enqueued,
        }
    }

    /// Bodies of the messages held, for invariant checks in tests.
    #[cfg(test)]
    pub(crate) fn held_bodies(&self) -> Vec<Vec<u8>> {
        let body = |held: &Held| match &held.body {
            Body::Resident { message, .. } => message.body.to_vec(),
            Body::Paged(_) => panic!("held_bodies reads resident messages only"),
        };
        let mut bodies: Vec<Vec<u8>> = self.ready.iter().map(body).collect();
        for consumer in self.consumers.values() {
            bodies.extend(consumer.unacked.iter().map(body));
        }
        bodies
    }

    /// Every message held, waiting then unacknowledged, as the paging checks see it.
    #[cfg(test)]
    pub(crate) fn held_views(&self, log_enabled: bool) -> Vec<HeldView> {
        let view = |held: &Held| match &held.body {
            Body::Resident { message, .. } => HeldView {
                id: message.id,
                logged: log_enabled && (message.persistent || message.stored_at.is_logged()),
                paged: None,
                body: Some(message.body.to_vec()),
                deliveries: held.deliveries,
            },
            Body::Paged(paged) => HeldView {
                id: paged.id(),
                logged: true,
                paged: Some(paged.at()),
                body: None,
                deliveries: held.deliveries,
            },
        };
        let mut views: Vec<HeldView> = self.ready.iter().map(view).collect();
        for consumer in self.consumers.values() {
            views.extend(consumer.unacked.iter().map(view));
        }
        views
    }

    /// The tail's members, for the paging checks.
    #[cfg(test)]
    pub(crate) fn tail_span(&self) -> Option<super::tail::TailSpan> {
        self.tail.as_ref().map(|tail| tail.span())
    }

    /// Messages held in memory (waiting in `ready` or unacknowledged; not the tail's), for
    /// tests and invariant checks.
    pub(crate) fn held_ids(&self) -> Vec<MessageId> {
        let mut ids: Vec<MessageId> = self.ready.iter().map(Held::id).collect();
        for consumer in self.consumers.values() {
            ids.extend(consumer.unacked.iter().map(Held::id));
        }
        ids
    }
}

#[derive(Debug)]
struct TopicConsumer {
    key: ConsumerKey,
    ack: AckMode,
    prefetch: u32,
    paused: bool,
    /// Delivered and not yet acknowledged (client acks), only to bound them by prefetch.
    unacked: VecDeque<MessageId>,
    /// Auto acks: deliveries not yet credited back by the session.
    in_flight: u32,
    /// Bytes (frames, estimated) handed over since the connection was last reported full,
    /// within the slack a paused subscriber gets (see `BrokerConfig::topic_slack_bytes`).
    slack_bytes: u64,
    /// When `paused` last became true: a subscriber full for longer than
    /// `topic_subscriber_stall_ms` no longer throttles producers.
    paused_since_ms: u64,
}

impl TopicConsumer {
    /// Full and not yet stalled: its producers should wait for it. At once, not when part of
    /// the slack is used: what is already decoded, or queued between cores, when the producer
    /// is paused still arrives (up to a peer queue's worth), and the slack must hold it.
    fn holds_back(&self, ctx: &Ctx<'_>) -> bool {
        self.paused
            && ctx.now_ms.saturating_sub(self.paused_since_ms)
                < ctx.config.topic_subscriber_stall_ms
    }
}

/// A publish-subscribe destination: nothing is kept. A subscriber whose connection is full
/// (paused) beyond its slack, or a client-ack one at its prefetch, does not get a message
/// published meanwhile (counted in the shard's metrics),
/// so one slow subscriber neither blocks the others nor grows memory without bound.
#[derive(Debug)]
pub(crate) struct Topic {
    consumers: BTreeMap<ConsumerKey, TopicConsumer>,
    /// Producers throttled because a subscriber was holding back, each released once.
    throttled: BTreeSet<ConnectionId>,
}

impl Topic {
    pub(crate) fn new() -> Topic {
        Topic {
            consumers: BTreeMap::new(),
            throttled: BTreeSet::new(),
        }
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.consumers.is_empty() && self.throttled.is_empty()
    }

    /// Whether producers wait for this topic's subscribers (the shard then checks it on ticks,
    /// when a subscriber may have stalled).
    pub(crate) fn is_throttling(&self) -> bool {
        !self.throttled.is_empty()
    }

    /// Resumes the throttled producers once no subscriber holds them back (it drained, left,
    /// or stalled).
    pub(crate) fn release_producers(&mut self, ctx: &mut Ctx<'_>) {
        if self.throttled.is_empty() || self.consumers.values().any(|c| c.holds_back(ctx)) {
            return;
        }
        release_all(ctx, &mut self.throttled);
    }

    pub(crate) fn publish(
        &mut self,
        ctx: &mut Ctx<'_>,
        message: Arc<Message>,
        origin: ConnectionId,
        ticket: Option<u64>,
    ) {
        if let Some(ticket) = ticket {
            ctx.route(
                origin.shard,
                ShardMessage::Confirmed {
                    conn: origin,
                    ticket,
                },
            );
        }
        if message.is_expired(ctx.now_ms) {
            ctx.counters.messages_expired_total += 1;
            return;
        }
        ctx.counters.messages_accepted_total += 1;
        let frame_bytes = message.frame_bytes_estimate();
        let mut holding_back = false;
        for consumer in self.consumers.values_mut() {
            holding_back |= consumer.holds_back(ctx);
            let settled = consumer.ack == AckMode::Auto;
            // Auto acks: only a full connection (`paused`, the server's out-buffer limit)
            // makes a subscriber miss messages. Counting unflushed deliveries against the
            // prefetch, as queues do, dropped messages for subscribers that were keeping up:
            // a burst decoded in one loop turn outruns the first flush.
            let used = if settled { 0 } else { consumer.unacked.len() };
            // A full connection still takes a bounded slack (`topic_slack_bytes`): what was on
            // its way when its producers were paused, so a subscriber that keeps up loses
            // nothing, while one that stays behind costs at most the slack. An empty slack
            // takes one message whatever its size, so a message larger than the slack is not
            // lost to a subscriber that is only briefly full (it waits in the session, not
            // in the out buffer).
            let over_slack = consumer.paused
                && consumer.slack_bytes > 0
                && consumer.slack_bytes + frame_bytes > ctx.config.topic_slack_bytes;
            if over_slack || used >= consumer.prefetch as usize {
                ctx.counters.topic_deliveries_dropped_total += 1;
                continue;
            }
            if consumer.paused {
                consumer.slack_bytes += frame_bytes;
            }
            ctx.counters.deliveries_total += 1;
            if settled {
                consumer.in_flight += 1;
            } else {
                consumer.unacked.push_back(message.id);
            }
            ctx.route(
                consumer.key.conn.shard,
                ShardMessage::Deliver {
                    consumer: consumer.key,
                    message: message.clone(),
                    deliveries: 1,
                    settled,
                    order: 0,
                },
            );
        }
        if holding_back && self.throttled.insert(origin) {
            ctx.route(
                origin.shard,
                ShardMessage::Throttle {
                    conn: origin,
                    paused: true,
                },
            );
        }
    }

    pub(crate) fn subscribe(
        &mut self,
        ctx: &Ctx<'_>,
        key: ConsumerKey,
        ack: AckMode,
        prefetch: u32,
        paused: bool,
    ) {
        self.consumers.insert(
            key,
            TopicConsumer {
                key,
                ack,
                prefetch: prefetch.max(1),
                paused,
                unacked: VecDeque::new(),
                in_flight: 0,
                slack_bytes: 0,
                paused_since_ms: ctx.now_ms,
            },
        );
    }

    pub(crate) fn credit(&mut self, key: ConsumerKey, count: u32) {
        if let Some(consumer) = self.consumers.get_mut(&key) {
            consumer.in_flight = consumer.in_flight.saturating_sub(count);
        }
    }

    pub(crate) fn unsubscribe(&mut self, ctx: &mut Ctx<'_>, key: ConsumerKey) {
        self.consumers.remove(&key);
        self.release_producers(ctx);
    }

    pub(crate) fn flow(&mut self, ctx: &mut Ctx<'_>, key: ConsumerKey, paused: bool) {
        if let Some(consumer) = self.consumers.get_mut(&key) {
            if paused && !consumer.paused {
                consumer.paused_since_ms = ctx.now_ms;
            }
            consumer.paused = paused;
            if !paused {
                consumer.slack_bytes = 0;
            }
        }
        self.release_producers(ctx);
    }

    /// ACK and NACK both just release credit: a topic has nothing to redeliver from.
    pub(crate) fn settle(&mut self, key: ConsumerKey, ids: &[MessageId]) {
        if let Some(consumer) = self.consumers.get_mut(&key) {
            consumer.unacked.retain(|id| !ids.contains(id));
        }
    }
}

/// A destination as its shard holds it.
#[derive(Debug)]
pub(crate) enum Destination {
    Queue(Queue),
    Topic(Topic),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a waiting message costs a queue (docs/ARCHITECTURE.md, "Queue storage"): the
    /// figures the documentation gives, so a field added here is a documented decision.
    #[test]
    fn a_queue_entry_is_48_bytes_and_a_paged_body_32() {
        assert_eq!(std::mem::size_of::<Paged>(), 32);
        assert_eq!(std::mem::size_of::<Held>(), 48);
    }

    #[test]
    fn an_origin_packs_a_connection_or_none() {
        let conn = ConnectionId {
            shard: ShardId(3),
            local: 77,
        };
        assert_eq!(Origin::of(Some(conn)).get(), Some(conn));
        assert_eq!(Origin::of(None).get(), None);
        let far = ConnectionId {
            shard: ShardId(u16::MAX),
            local: (1 << 48) - 1,
        };
        assert_eq!(Origin::of(Some(far)).get(), None);
    }
}
