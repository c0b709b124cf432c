//! One core's broker: the sessions of the connections it accepted and the destinations whose
//! names hash to it, plus the entry points the server calls. Every entry point takes the time
//! and an [`Effects`] to fill, and returns only after every message between this shard's own
//! sessions and destinations has been handled, so the server sees a settled state.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::sync::Arc;

use super::config::{Authenticator, BrokerConfig};
use super::ctx::{ctx, Counters, Ctx, DurableWaits};
use super::destination::{Destination, Queue, Topic};
use super::effects::{DurableToken, Effect, Effects, Record, Rejection, ShardMessage};
use super::error::{write_error_frame, ProtocolError};
use super::session::Session;
use super::store::{DiskPressure, NoStore, Store};
use super::types::{
    shard_of, AckMode, ConnectionId, ConsumerKey, DestinationKind, Message, MessageId, QueueStats,
    Recovered, ShardId, StoreRef, MONITOR_DESTINATION,
};
use crate::codec::{DecodeError, Frame};

/// Why recovered messages could not be put back.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    #[error("{destination} belongs to shard {} but was recovered by shard {}: was the shard count changed?", owner.0, shard.0)]
    WrongShard {
        destination: String,
        owner: ShardId,
        shard: ShardId,
    },
    #[error("{destination} is not a queue; only queues are logged")]
    NotAQueue { destination: String },
}

/// A snapshot of one shard for metrics: what it holds now, and its totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardMetrics {
    pub sessions: u64,
    pub queues: u64,
    pub topics: u64,
    /// Messages held by this shard's queues, waiting or unacknowledged.
    pub messages_held: u64,
    pub counters: Counters,
}

/// The broker logic of one core. See the module docs of [`crate::broker`] for the calls the
/// server makes and in which order.
pub struct Shard<S: Store = NoStore> {
    id: ShardId,
    shard_count: u16,
    config: BrokerConfig,
    authenticator: Arc<dyn Authenticator>,
    /// By [`ConnectionId::local`]. Ordered maps here and in sessions: every iteration (ticks,
    /// sweeps, credits) then runs in the same order on every run, so a seed replays exactly.
    sessions: BTreeMap<u64, Session>,
    next_connection: u64,
    /// Sessions with heart-beats in either direction: the only ones a tick must look at.
    beating: std::collections::BTreeSet<u64>,
    destinations: BTreeMap<Arc<[u8]>, Destination>,
    /// Messages from this shard to itself, drained before each entry point returns.
    local: VecDeque<ShardMessage>,
    durable: DurableWaits,
    next_message_seq: u64,
    /// The latest statistics each other shard published, for `/queue/monitor`.
    peer_stats: BTreeMap<ShardId, Arc<[QueueStats]>>,
    /// Queues with messages that expire, by the earliest such time: ticks sweep only these
    /// rather than every destination. Entries may be stale (the message left); a stale one
    /// costs one comparison.
    expiry_timer: BinaryHeap<Reverse<(u64, Arc<[u8]>)>>,
    /// When the next statistics round is due (set by the first tick).
    next_monitor_ms: Option<u64>,
    /// Topics that hold producers throttled: ticks check them, since a subscriber that stalls
    /// (stays full past `topic_subscriber_stall_ms`) releases its producers without an event.
    throttling_topics: BTreeSet<Arc<[u8]>>,
    /// Connections without a complete CONNECT, by `(deadline, local)`: ticks close the due
    /// ones. An entry leaves when its session gets past `AwaitingConnect` or is removed, so
    /// this holds at most the open connections (as `refusals` does).
    connect_deadlines: BTreeSet<(u64, u64)>,
    /// Refused logins waiting for their ERROR, by `(due, local)`, with the CONNECT's
    /// `receipt` header. One per session in `Refusing`, removed with it; each such connection
    /// still counts against the server's connection limit while it waits.
    refusals: BTreeMap<(u64, u64), Option<Box<[u8]>>>,
    /// Sessions that published past the memory budget's pause level: ticks release them once
    /// the budget is back under its resume level. Entries of closed sessions are skipped.
    memory_paused: BTreeSet<u64>,
    /// Connections (of any shard) paused because this shard's log is past seven eighths of
    /// its disk budget ([`Store::disk_pressure`]): ticks release them, each once, when it is
    /// back under three quarters. A release to a connection gone meanwhile is ignored there.
    disk_paused: BTreeSet<ConnectionId>,
    counters: Counters,
    /// Where paged-out bodies are read back from ([`Store`]).
    store: S,
}

impl Shard {
    /// A shard without a store (see [`Shard::with_store`]).
    pub fn new(
        id: ShardId,
        shard_count: u16,
        config: BrokerConfig,
        authenticator: Arc<dyn Authenticator>,
        first_message_seq: u64,
    ) -> Shard {
        Shard::with_store(
            id,
            shard_count,
            config,
            authenticator,
            first_message_seq,
            NoStore,
        )
    }
}

impl<S: Store> Shard<S> {
    /// `first_message_seq` starts this shard's message-id counter. Ids must not repeat across
    /// restarts: pass the start time in milliseconds shifted left by 22 (room for four million
    /// messages per millisecond of uptime before two boots could meet). `store` is the
    /// shard's log, which queues read paged-out bodies back from.
    pub fn with_store(
        id: ShardId,
        shard_count: u16,
        config: BrokerConfig,
        authenticator: Arc<dyn Authenticator>,
        first_message_seq: u64,
        store: S,
    ) -> Shard<S> {
        assert!(id.0 < shard_count, "shard {} of {shard_count}", id.0);
        Shard {
            store,
            id,
            shard_count,
            config,
            authenticator,
            sessions: BTreeMap::new(),
            next_connection: 0,
            beating: std::collections::BTreeSet::new(),
            destinations: BTreeMap::new(),
            local: VecDeque::new(),
            durable: DurableWaits::default(),
            next_message_seq: first_message_seq,
            peer_stats: BTreeMap::new(),
            next_monitor_ms: None,
            expiry_timer: BinaryHeap::new(),
            throttling_topics: BTreeSet::new(),
            connect_deadlines: BTreeSet::new(),
            refusals: BTreeMap::new(),
            memory_paused: BTreeSet::new(),
            disk_paused: BTreeSet::new(),
            counters: Counters::default(),
        }
    }

    pub fn id(&self) -> ShardId {
        self.id
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// A connection was accepted. Returns its id for every later call about it.
    pub fn open_connection(&mut self, now_ms: u64) -> ConnectionId {
        let conn = ConnectionId {
            shard: self.id,
            local: self.next_connection,
        };
        self.next_connection += 1;
        self.sessions.insert(conn.local, Session::new(conn, now_ms));
        self.connect_deadlines.insert((
            now_ms.saturating_add(self.config.connect_timeout_ms),
            conn.local,
        ));
        conn
    }

    /// Bytes arrived for the connection (frames or heart-beat EOLs): it is alive.
    pub fn on_input(&mut self, conn: ConnectionId, now_ms: u64) {
        if let Some(session) = self.sessions.get_mut(&conn.local) {
            session.note_input(now_ms);
        }
    }

    /// A decoded frame from the connection. Frames for a connection already closed are ignored.
    pub fn on_frame(
        &mut self,
        conn: ConnectionId,
        frame: &Frame<'_>,
        now_ms: u64,
        out: &mut Effects,
    ) {
        let Some(session) = self.sessions.get_mut(&conn.local) else {
            return;
        };
        session.note_input(now_ms);
        let mut ctx = ctx!(self, now_ms, out);
        let awaited_connect = session.awaits_connect();
        let result = session.handle_frame(&mut ctx, frame, &*self.authenticator);
        if awaited_connect && !session.awaits_connect() {
            let deadline = session
                .opened_ms()
                .saturating_add(self.config.connect_timeout_ms);
            self.connect_deadlines.remove(&(deadline, conn.local));
        }
        match result {
            Err(ProtocolError::LoginFailed) if self.config.login_failure_delay_ms > 0 => {
                let receipt = frame.header(b"receipt").map(Box::from);
                self.refuse_later(conn, receipt, now_ms, out);
            }
            Err(error) => self.fail(conn, &error, frame.header(b"receipt"), now_ms, out),
            Ok(()) => {
                if session.heartbeat().send_every_ms > 0 || session.heartbeat().expect_every_ms > 0
                {
                    self.beating.insert(conn.local);
                }
                if session.is_memory_paused() {
                    self.memory_paused.insert(conn.local);
                }
                self.close_if_done(conn, now_ms, out);
            }
        }
        self.drain_local(now_ms, out);
    }

    /// The verdict on an [`Effect::Authenticate`]: CONNECTED, or ERROR and close.
    pub fn on_login_result(
        &mut self,
        conn: ConnectionId,
        accepted: bool,
        now_ms: u64,
        out: &mut Effects,
    ) {
        let Some(session) = self.sessions.get_mut(&conn.local) else {
            return;
        };
        let mut ctx = ctx!(self, now_ms, out);
        match session.login_result(&mut ctx, accepted) {
            Err(ProtocolError::LoginFailed) if self.config.login_failure_delay_ms > 0 => {
                self.refuse_later(conn, None, now_ms, out);
            }
            Err(error) => self.fail(conn, &error, None, now_ms, out),
            Ok(()) => {
                if session.heartbeat().send_every_ms > 0 || session.heartbeat().expect_every_ms > 0
                {
                    self.beating.insert(conn.local);
                }
            }
        }
        self.drain_local(now_ms, out);
    }

    /// An offloaded login could not even be queued for verification (the server's hashing
    /// queue is full): ERROR `server busy, …` at once, without the refusal delay. The client
    /// did nothing wrong and should retry; a delay would only hold its connection longer.
    pub fn on_login_queue_full(&mut self, conn: ConnectionId, now_ms: u64, out: &mut Effects) {
        if self.sessions.contains_key(&conn.local) {
            self.fail(conn, &ProtocolError::LoginQueueFull, None, now_ms, out);
            self.drain_local(now_ms, out);
        }
    }

    /// Holds a refused login's ERROR for `login_failure_delay_ms` (sent by `on_tick`), and
    /// stops reading the connection meanwhile: anything decoded before the ERROR (a server
    /// frame, a malformed one, which the server answers itself) would be answered at once,
    /// telling the client its login failed before the delay.
    fn refuse_later(
        &mut self,
        conn: ConnectionId,
        receipt: Option<Box<[u8]>>,
        now_ms: u64,
        out: &mut Effects,
    ) {
        let Some(session) = self.sessions.get_mut(&conn.local) else {
            return;
        };
        if session.awaits_connect() {
            // Refused inline, straight from `AwaitingConnect`: the connect timer is done.
            let deadline = session
                .opened_ms()
                .saturating_add(self.config.connect_timeout_ms);
            self.connect_deadlines.remove(&(deadline, conn.local));
        }
        let due = now_ms.saturating_add(self.config.login_failure_delay_ms);
        session.refuse_later(due);
        self.beating.remove(&conn.local);
        self.refusals.insert((due, conn.local), receipt);
        out.list.push(Effect::Throttle { conn, paused: true });
    }

    /// Sends the refusals that are due and closes connections that missed the connect
    /// timeout.
    fn expire_logins(&mut self, now_ms: u64, out: &mut Effects) {
        while let Some(entry) = self.refusals.first_entry() {
            if entry.key().0 > now_ms {
                break;
            }
            let ((_, local), receipt) = entry.remove_entry();
            let conn = ConnectionId {
                shard: self.id,
                local,
            };
            if self.sessions.contains_key(&local) {
                self.fail(
                    conn,
                    &ProtocolError::LoginFailed,
                    receipt.as_deref(),
                    now_ms,
                    out,
                );
            }
        }
        while let Some(&(deadline, local)) = self.connect_deadlines.first() {
            if deadline > now_ms {
                break;
            }
            self.connect_deadlines.pop_first();
            let conn = ConnectionId {
                shard: self.id,
                local,
            };
            if self
                .sessions
                .get(&local)
                .is_some_and(Session::awaits_connect)
            {
                let error = ProtocolError::ConnectTimeout(self.config.connect_timeout_ms);
                self.fail(conn, &error, None, now_ms, out);
            }
        }
    }

    /// The connection's bytes could not be decoded: ERROR naming the problem, then close.
    pub fn on_decode_error(
        &mut self,
        conn: ConnectionId,
        error: DecodeError,
        now_ms: u64,
        out: &mut Effects,
    ) {
        if self.sessions.contains_key(&conn.local) {
            self.fail(conn, &ProtocolError::Decode(error), None, now_ms, out);
            self.drain_local(now_ms, out);
        }
    }

    /// The connection is gone (peer closed, I/O error). Its subscriptions end and its
    /// unacknowledged messages go back to their queues; nothing is written.
    pub fn on_connection_lost(&mut self, conn: ConnectionId, now_ms: u64, out: &mut Effects) {
        if let Some(mut session) = self.remove_session(conn) {
            let mut ctx = ctx!(self, now_ms, out);
            session.end(&mut ctx);
            session.close();
            self.drain_local(now_ms, out);
        }
    }

    /// The server handed the kernel the first `bytes` of the connection's output and drops
    /// the rest: call it just before [`Self::on_connection_lost`], so that client-ack
    /// deliveries that never reached the socket do not count toward dead-lettering.
    pub fn on_output_handed(&mut self, conn: ConnectionId, bytes: u64) {
        if let Some(session) = self.sessions.get_mut(&conn.local) {
            session.set_handed_bytes(bytes);
        }
    }

    /// The connection's output buffer filled up (`false`) or drained (`true`): paused
    /// subscriptions get no new queue deliveries.
    pub fn on_writable(
        &mut self,
        conn: ConnectionId,
        writable: bool,
        now_ms: u64,
        out: &mut Effects,
    ) {
        if let Some(session) = self.sessions.get_mut(&conn.local) {
            let mut ctx = ctx!(self, now_ms, out);
            session.set_writable(&mut ctx, writable);
            self.drain_local(now_ms, out);
        }
    }

    /// Estimated frame bytes of the deliveries waiting in the connection's session.
    #[cfg(test)]
    pub(crate) fn waiting_bytes(&self, conn: ConnectionId) -> u64 {
        self.sessions
            .get(&conn.local)
            .map_or(0, Session::waiting_bytes)
    }

    /// The connection's output buffer holds `bytes`, every write of earlier effects applied.
    /// Call it with no effects pending (they would be missing from `bytes`) after each batch
    /// of writes to the connection, and before [`Self::on_writable`] with `true`: the broker
    /// paces deliveries by it, and may write waiting ones at once.
    pub fn on_out_bytes(&mut self, conn: ConnectionId, bytes: u64, now_ms: u64, out: &mut Effects) {
        if let Some(session) = self.sessions.get_mut(&conn.local) {
            let mut ctx = ctx!(self, now_ms, out);
            session.set_out_bytes(&mut ctx, bytes);
            self.drain_local(now_ms, out);
        }
    }

    /// Everything written to the connection so far has been handed to the kernel (its output
    /// buffer is empty). Call it when a send completion leaves the buffer empty: auto-ack
    /// subscriptions get their window back only through this.
    pub fn on_flushed(&mut self, conn: ConnectionId, now_ms: u64, out: &mut Effects) {
        if let Some(session) = self.sessions.get_mut(&conn.local) {
            let mut ctx = ctx!(self, now_ms, out);
            session.flushed(&mut ctx);
            self.drain_local(now_ms, out);
        }
    }

    /// A message another shard sent this one ([`Effect::Peer`]), in the order that shard sent it.
    pub fn on_peer_message(&mut self, message: ShardMessage, now_ms: u64, out: &mut Effects) {
        self.handle(message, now_ms, out);
        self.drain_local(now_ms, out);
    }

    /// Every append up to and including `token` is as durable as the sync policy makes it:
    /// release what waited (RECEIPTs, dead-letter moves). Every token must be reported in the
    /// end, under every policy (under `never`, right after the write).
    pub fn on_durable(&mut self, token: DurableToken, now_ms: u64, out: &mut Effects) {
        while self
            .durable
            .waiting
            .front()
            .is_some_and(|(waiting, _, _)| *waiting <= token)
        {
            let Some((_, to, then)) = self.durable.waiting.pop_front() else {
                break;
            };
            let mut ctx = ctx!(self, now_ms, out);
            ctx.route(to, then);
        }
        self.drain_local(now_ms, out);
    }

    /// The log could not store the `Record::Message` of `id` on queue `destination` (disk full,
    /// record too large, a failed sync): the queue forgets the message if it has not been
    /// handed out yet. The RECEIPT that waited for `token` becomes an ERROR to its sender
    /// (`message not stored: reason`); the server still reports `token` through `on_durable`
    /// in its turn, as for any other token, which is what releases that ERROR. Without a
    /// token, the sender of a message forgotten here gets that ERROR at once: it asked for no
    /// receipt, but a message it sent is gone, and it must not carry on as if stored.
    pub fn on_append_failed(
        &mut self,
        destination: &[u8],
        id: MessageId,
        token: Option<DurableToken>,
        reason: &'static str,
        now_ms: u64,
        out: &mut Effects,
    ) {
        let origin = match self.destinations.get_mut(destination) {
            Some(Destination::Queue(queue)) => queue.forget_ready(id),
            _ => None,
        };
        let Some(token) = token else {
            if let Some(conn) = origin {
                let mut ctx = ctx!(self, now_ms, out);
                ctx.route(
                    conn.shard,
                    ShardMessage::Rejected {
                        conn,
                        reason: Rejection::NotStored { reason },
                    },
                );
                self.drain_local(now_ms, out);
            }
            return;
        };
        // A dead-letter copy that could not be stored: the old queue must keep the message
        // (it is never logged done there), so its release is dropped.
        self.durable.waiting.retain(|(waiting, _, then)| {
            *waiting != token || !matches!(then, ShardMessage::Moved { .. })
        });
        for (waiting, _, then) in self.durable.waiting.iter_mut() {
            if *waiting == token {
                if let ShardMessage::Confirmed { conn, .. } = then {
                    *then = ShardMessage::Rejected {
                        conn: *conn,
                        reason: Rejection::NotStored { reason },
                    };
                }
            }
        }
    }

    /// Time passed. Call at least every `tick_interval_ms`: heart-beats, heart-beat timeouts,
    /// connect timeouts, delayed login refusals, expired messages and `/queue/monitor`
    /// statistics happen here.
    pub fn on_tick(&mut self, now_ms: u64, out: &mut Effects) {
        let mut failed = Vec::new();
        {
            let mut ctx = ctx!(self, now_ms, out);
            for local in &self.beating {
                let Some(session) = self.sessions.get_mut(local) else {
                    continue;
                };
                if let Err(error) = session.tick(&mut ctx) {
                    failed.push((*local, error));
                }
            }
        }
        self.expire_logins(now_ms, out);
        self.sweep_due_queues(now_ms, out);
        self.check_throttling_topics(now_ms, out);
        self.release_memory_paused(now_ms, out);
        self.release_disk_paused(now_ms, out);
        for (local, error) in failed {
            let conn = ConnectionId {
                shard: self.id,
                local,
            };
            self.fail(conn, &error, None, now_ms, out);
        }
        let due = *self
            .next_monitor_ms
            .get_or_insert(now_ms + self.config.monitor_interval_ms);
        if now_ms >= due {
            self.next_monitor_ms = Some(now_ms + self.config.monitor_interval_ms);
            self.monitor_round(now_ms, out);
        }
        self.drain_local(now_ms, out);
    }

    /// The server is stopping (SIGINT/SIGTERM): every connection of this shard gets an ERROR
    /// saying so and is closed; their unacknowledged messages go back to their queues (on other
    /// shards through the usual peer messages, which the server should still deliver before it
    /// stops the other cores).
    pub fn on_shutdown(&mut self, now_ms: u64, out: &mut Effects) {
        let locals: Vec<u64> = self.sessions.keys().copied().collect();
        for local in locals {
            let conn = ConnectionId {
                shard: self.id,
                local,
            };
            self.fail(conn, &ProtocolError::ShuttingDown, None, now_ms, out);
        }
        self.drain_local(now_ms, out);
    }

    /// Puts messages recovered from this shard's log back into their queues, in log order.
    /// Call before accepting connections. A message this shard does not own (the shard count
    /// changed since it was logged, or a topic name) is refused: the caller must not drop it
    /// silently.
    pub fn restore(
        &mut self,
        recovered: impl IntoIterator<Item = Recovered>,
    ) -> Result<(), RestoreError> {
        for recovered in recovered {
            self.restore_one(recovered)?;
        }
        Ok(())
    }

    /// One message of [`Shard::restore`].
    pub fn restore_one(&mut self, recovered: Recovered) -> Result<(), RestoreError> {
        let Recovered {
            destination: name,
            entry,
            deliveries,
        } = recovered;
        let owner = shard_of(&name, self.shard_count);
        if owner != self.id {
            return Err(RestoreError::WrongShard {
                destination: String::from_utf8_lossy(&name).into_owned(),
                owner,
                shard: self.id,
            });
        }
        if DestinationKind::of(&name) != DestinationKind::Queue {
            return Err(RestoreError::NotAQueue {
                destination: String::from_utf8_lossy(&name).into_owned(),
            });
        }
        let id = entry.id();
        if id.shard == self.id {
            self.next_message_seq = self.next_message_seq.max(id.seq + 1);
        }
        let destination = self
            .destinations
            .entry(name.clone())
            .or_insert_with(|| Destination::Queue(Queue::new(name.clone())));
        // Only the index entry: the body is read back when the message's turn comes, so
        // memory after a restart does not grow with the backlog's bytes.
        if let Destination::Queue(queue) = destination {
            queue.restore(entry, deliveries);
        }
        self.track_expiry(&name);
        Ok(())
    }

    /// The shard's store (the server drives its writes and syncs).
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// This shard's queues, sorted by name.
    pub fn queue_stats(&self) -> Vec<QueueStats> {
        let mut stats: Vec<QueueStats> = self
            .destinations
            .values()
            .filter_map(|d| match d {
                Destination::Queue(queue) => Some(queue.stats()),
                Destination::Topic(_) => None,
            })
            .collect();
        stats.sort_by(|a, b| a.name.cmp(&b.name));
        stats
    }

    /// What this shard holds now and its running totals, for the metrics endpoint. Walks the
    /// queues, so call it at scrape time, not per message.
    /// Entries in the connect-timeout and refusal timers (tests check they are bounded by the
    /// sessions that need them).
    #[cfg(test)]
    pub(crate) fn login_timers_len(&self) -> (usize, usize) {
        (self.connect_deadlines.len(), self.refusals.len())
    }

    pub fn metrics(&self) -> ShardMetrics {
        let mut metrics = ShardMetrics {
            sessions: self.sessions.len() as u64,
            counters: self.counters,
            ..ShardMetrics::default()
        };
        for destination in self.destinations.values() {
            match destination {
                Destination::Queue(queue) => {
                    metrics.queues += 1;
                    metrics.messages_held += queue.stats().size;
                }
                Destination::Topic(_) => metrics.topics += 1,
            }
        }
        metrics
    }

    /// Number of open sessions (for tests and metrics).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Ids of every message a queue holds in memory, waiting or unacknowledged, not those of
    /// its tail (for invariant checks).
    pub fn held_message_ids(&self, destination: &[u8]) -> Vec<MessageId> {
        match self.destinations.get(destination) {
            Some(Destination::Queue(queue)) => queue.held_ids(),
            _ => Vec::new(),
        }
    }

    /// Every message a queue holds, with where its body is (for the paging checks).
    #[cfg(test)]
    pub(crate) fn held_views(&self, destination: &[u8]) -> Vec<super::destination::HeldView> {
        match self.destinations.get(destination) {
            Some(Destination::Queue(queue)) => queue.held_views(self.config.log_enabled),
            _ => Vec::new(),
        }
    }

    /// The tail of a queue, if it has one (for the paging checks).
    #[cfg(test)]
    pub(crate) fn tail_span(&self, destination: &[u8]) -> Option<super::tail::TailSpan> {
        match self.destinations.get(destination) {
            Some(Destination::Queue(queue)) => queue.tail_span(),
            _ => None,
        }
    }

    /// Bodies of the auto-acked deliveries waiting in this shard's sessions for room in
    /// their out buffers: left their queues, not yet written (for the paging checks).
    #[cfg(test)]
    pub(crate) fn settled_waiting_bodies(&self) -> Vec<Vec<u8>> {
        self.sessions
            .values()
            .flat_map(Session::settled_waiting)
            .map(|message| message.body.to_vec())
            .collect()
    }

    /// Bodies of every message a queue holds (for invariant checks in tests).
    #[cfg(test)]
    pub(crate) fn held_bodies(&self, destination: &[u8]) -> Vec<Vec<u8>> {
        match self.destinations.get(destination) {
            Some(Destination::Queue(queue)) => queue.held_bodies(),
            _ => Vec::new(),
        }
    }

    // --- internals ---

    /// Sends the ERROR frame for `error` and closes the connection: the one place a protocol
    /// error becomes bytes.
    fn fail(
        &mut self,
        conn: ConnectionId,
        error: &ProtocolError,
        receipt: Option<&[u8]>,
        now_ms: u64,
        out: &mut Effects,
    ) {
        let Some(mut session) = self.remove_session(conn) else {
            return;
        };
        self.counters.errors_total += 1;
        let start = out.bytes.len();
        write_error_frame(&mut out.bytes, session.version(), error, receipt);
        out.bytes.extend_from_slice(super::session::FRAME_TRAILER);
        let end = out.bytes.len();
        out.list.push(Effect::Write {
            conn,
            bytes: start..end,
            body: None,
        });
        out.list.push(Effect::Close { conn });
        let mut ctx = ctx!(self, now_ms, out);
        session.end(&mut ctx);
        session.close();
    }

    fn remove_session(&mut self, conn: ConnectionId) -> Option<Session> {
        self.beating.remove(&conn.local);
        self.memory_paused.remove(&conn.local);
        let session = self.sessions.remove(&conn.local)?;
        if session.awaits_connect() {
            let deadline = session
                .opened_ms()
                .saturating_add(self.config.connect_timeout_ms);
            self.connect_deadlines.remove(&(deadline, conn.local));
        }
        if let Some(due) = session.refusal_due_ms() {
            self.refusals.remove(&(due, conn.local));
        }
        Some(session)
    }

    fn close_if_done(&mut self, conn: ConnectionId, now_ms: u64, out: &mut Effects) {
        if self
            .sessions
            .get(&conn.local)
            .is_some_and(Session::is_closed)
        {
            if let Some(mut session) = self.remove_session(conn) {
                let mut ctx = ctx!(self, now_ms, out);
                session.end(&mut ctx);
                out.list.push(Effect::Close { conn });
            }
        }
    }

    /// Puts queue `name` on the expiry timer if it holds a message that expires sooner than
    /// what the timer already has for it.
    fn track_expiry(&mut self, name: &Arc<[u8]>) {
        if let Some(Destination::Queue(queue)) = self.destinations.get_mut(name) {
            let due = queue.next_expiry_ms();
            if due < queue.timer_ms {
                queue.timer_ms = due;
                self.expiry_timer.push(Reverse((due, name.clone())));
            }
        }
    }

    /// Drops the expired messages of the queues whose timer is due.
    fn sweep_due_queues(&mut self, now_ms: u64, out: &mut Effects) {
        while let Some(Reverse((due, _))) = self.expiry_timer.peek() {
            if *due > now_ms {
                break;
            }
            let Some(Reverse((due, name))) = self.expiry_timer.pop() else {
                break;
            };
            let mut ctx = ctx!(self, now_ms, out);
            if let Some(Destination::Queue(queue)) = self.destinations.get_mut(&name) {
                if queue.timer_ms == due {
                    queue.timer_ms = u64::MAX;
                }
                queue.sweep_expired(&mut ctx);
            }
            self.forget_if_idle(&name);
            self.track_expiry(&name);
        }
    }

    /// Drops a destination that holds nothing and has no subscribers: a topic keeps nothing
    /// anyway, and an idle queue's only state is its counters.
    fn forget_if_idle(&mut self, name: &[u8]) {
        let idle = match self.destinations.get(name) {
            Some(Destination::Queue(queue)) => queue.is_idle(),
            Some(Destination::Topic(topic)) => topic.is_idle(),
            None => false,
        };
        if idle {
            self.destinations.remove(name);
        }
    }

    /// Lets the producers paused for memory read again once the budget (all cores) is back
    /// under its resume level. Checked on the tick: memory is freed on any core, by any drop,
    /// so there is no one event to wait for; a tick (at most `tick_interval_ms`) is soon enough
    /// for a producer that has been paused.
    fn release_memory_paused(&mut self, now_ms: u64, out: &mut Effects) {
        if self.memory_paused.is_empty()
            || self.config.memory.charged() > self.config.memory.resume_bytes()
        {
            return;
        }
        let mut ctx = ctx!(self, now_ms, out);
        for local in std::mem::take(&mut self.memory_paused) {
            if let Some(session) = self.sessions.get_mut(&local) {
                session.memory_release(&mut ctx);
            }
        }
    }

    /// Lets the producers paused for disk go once this shard's log is back under three
    /// quarters of its budget. Checked on the tick, as for memory: the log shrinks when
    /// reclaim (on the server's tick) deletes acknowledged segments, not on any broker event.
    fn release_disk_paused(&mut self, now_ms: u64, out: &mut Effects) {
        if self.disk_paused.is_empty() || self.store.disk_pressure() != DiskPressure::Low {
            return;
        }
        let mut ctx = ctx!(self, now_ms, out);
        for conn in std::mem::take(&mut self.disk_paused) {
            ctx.route(
                conn.shard,
                ShardMessage::DiskThrottle {
                    conn,
                    paused: false,
                },
            );
        }
    }

    fn check_throttling_topics(&mut self, now_ms: u64, out: &mut Effects) {
        let mut ctx = ctx!(self, now_ms, out);
        self.throttling_topics
            .retain(|name| match self.destinations.get_mut(name) {
                Some(Destination::Topic(topic)) => {
                    topic.release_producers(&mut ctx);
                    topic.is_throttling()
                }
                _ => false,
            });
    }

    fn drain_local(&mut self, now_ms: u64, out: &mut Effects) {
        while let Some(message) = self.local.pop_front() {
            self.handle(message, now_ms, out);
        }
    }

    fn destination(&mut self, name: &Arc<[u8]>) -> &mut Destination {
        self.destinations
            .entry(name.clone())
            .or_insert_with(|| match DestinationKind::of(name) {
                DestinationKind::Queue => Destination::Queue(Queue::new(name.clone())),
                DestinationKind::Topic => Destination::Topic(Topic::new()),
            })
    }

    /// Dispatches one message to the method for its kind; each method keeps the order of
    /// operations of its kind (make the destination, build the context, act, tidy up).
    fn handle(&mut self, message: ShardMessage, now_ms: u64, out: &mut Effects) {
        match message {
            ShardMessage::Subscribe {
                consumer,
                destination,
                ack,
                prefetch,
                prefetch_bytes,
                paused,
                ticket,
            } => self.handle_subscribe(
                consumer,
                destination,
                ack,
                prefetch,
                prefetch_bytes,
                paused,
                ticket,
                now_ms,
                out,
            ),
            ShardMessage::Unsubscribe {
                consumer,
                destination,
                received,
            } => self.handle_unsubscribe(consumer, &destination, received, now_ms, out),
            ShardMessage::Publish {
                message,
                origin,
                ticket,
            } => self.handle_publish(message, origin, ticket, now_ms, out),
            ShardMessage::Ack {
                consumer,
                destination,
                ids,
            } => self.handle_ack(consumer, &destination, &ids, now_ms, out),
            ShardMessage::Nack {
                consumer,
                destination,
                ids,
                requeue,
            } => self.handle_nack(consumer, &destination, &ids, requeue, now_ms, out),
            ShardMessage::Unsent {
                consumer,
                destination,
                ids,
            } => self.handle_unsent(consumer, &destination, &ids),
            ShardMessage::Credit {
                consumer,
                destination,
                count,
                bytes,
            } => self.handle_credit(consumer, &destination, count, bytes, now_ms, out),
            ShardMessage::Flow {
                consumer,
                destination,
                paused,
            } => self.handle_flow(consumer, &destination, paused, now_ms, out),
            ShardMessage::Returned {
                message,
                deliveries,
                order,
            } => self.handle_returned(message, deliveries, order, now_ms, out),
            ShardMessage::ReturnedAll {
                destination,
                messages,
            } => self.handle_returned_all(destination, messages, now_ms, out),
            ShardMessage::Deliver {
                consumer,
                message,
                deliveries,
                settled,
                order,
            } => self.handle_deliver(consumer, message, deliveries, settled, order, now_ms, out),
            ShardMessage::Confirmed { conn, ticket } => {
                self.handle_confirmed(conn, ticket, now_ms, out)
            }
            ShardMessage::Throttle { conn, paused } => {
                self.handle_throttle(conn, paused, now_ms, out)
            }
            ShardMessage::DiskThrottle { conn, paused } => {
                if let Some(session) = self.sessions.get_mut(&conn.local) {
                    let mut ctx = ctx!(self, now_ms, out);
                    session.disk_throttle(&mut ctx, paused);
                }
            }
            ShardMessage::Rejected { conn, reason } => {
                self.handle_rejected(conn, reason, now_ms, out)
            }
            ShardMessage::DeadLetter {
                message,
                from,
                from_at,
            } => self.handle_dead_letter(message, from, from_at, now_ms, out),
            ShardMessage::Moved {
                destination,
                id,
                at,
            } => self.handle_moved(destination, id, at, out),
            ShardMessage::Stats { from, queues } => {
                self.peer_stats.insert(from, queues);
            }
        }
    }

    /// A subscription for a destination here, made on first use. Takes the message's fields
    /// one by one, as every `handle_*` does, hence the allow.
    #[allow(clippy::too_many_arguments)]
    fn handle_subscribe(
        &mut self,
        consumer: ConsumerKey,
        destination: Arc<[u8]>,
        ack: AckMode,
        prefetch: u32,
        prefetch_bytes: u64,
        paused: bool,
        ticket: Option<u64>,
        now_ms: u64,
        out: &mut Effects,
    ) {
        self.destination(&destination);
        let mut ctx = ctx!(self, now_ms, out);
        if let Some(ticket) = ticket {
            // Before any delivery is routed: the RECEIPT may then precede the first
            // MESSAGE, as a client reading the spec would expect.
            ctx.route(
                consumer.conn.shard,
                ShardMessage::Confirmed {
                    conn: consumer.conn,
                    ticket,
                },
            );
        }
        match self.destinations.get_mut(&destination) {
            Some(Destination::Queue(queue)) => {
                queue.subscribe(&mut ctx, consumer, ack, prefetch, prefetch_bytes, paused)
            }
            Some(Destination::Topic(topic)) => {
                topic.subscribe(&ctx, consumer, ack, prefetch, paused)
            }
            None => {}
        }
    }

    fn handle_unsubscribe(
        &mut self,
        consumer: ConsumerKey,
        destination: &Arc<[u8]>,
        received: u64,
        now_ms: u64,
        out: &mut Effects,
    ) {
        let mut ctx = ctx!(self, now_ms, out);
        match self.destinations.get_mut(destination) {
            Some(Destination::Queue(queue)) => queue.unsubscribe(&mut ctx, consumer, received),
            Some(Destination::Topic(topic)) => topic.unsubscribe(&mut ctx, consumer),
            None => {}
        }
        self.forget_if_idle(destination);
        self.track_expiry(destination);
    }

    fn handle_publish(
        &mut self,
        message: Arc<Message>,
        origin: ConnectionId,
        ticket: Option<u64>,
        now_ms: u64,
        out: &mut Effects,
    ) {
        let name = message.destination.clone();
        let kind = DestinationKind::of(&name);
        if kind == DestinationKind::Topic && !self.destinations.contains_key(&name) {
            // Nobody listens: the message is gone, and no topic is made for it.
            if let Some(ticket) = ticket {
                let mut ctx = ctx!(self, now_ms, out);
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
        self.destination(&name);
        // Producer flow control for disk: a SEND that will be logged while the log is past
        // seven eighths of its budget pauses its producer (the append itself may still fail
        // past the budget: `on_append_failed`). Read before this message's own append, which
        // the server carries out after the call.
        let pause_for_disk = kind == DestinationKind::Queue
            && self.config.log_enabled
            && message.persistent
            && self.store.disk_pressure() == DiskPressure::High
            && self.disk_paused.insert(origin);
        let mut ctx = ctx!(self, now_ms, out);
        if pause_for_disk {
            ctx.route(
                origin.shard,
                ShardMessage::DiskThrottle {
                    conn: origin,
                    paused: true,
                },
            );
        }
        match self.destinations.get_mut(&name) {
            Some(Destination::Queue(queue)) => queue.publish(&mut ctx, message, origin, ticket),
            Some(Destination::Topic(topic)) => {
                topic.publish(&mut ctx, message, origin, ticket);
                if topic.is_throttling() {
                    self.throttling_topics.insert(name.clone());
                }
            }
            None => {}
        }
        // An expired or refused message may leave a new queue empty.
        self.forget_if_idle(&name);
        self.track_expiry(&name);
    }

    fn handle_ack(
        &mut self,
        consumer: ConsumerKey,
        destination: &Arc<[u8]>,
        ids: &[MessageId],
        now_ms: u64,
        out: &mut Effects,
    ) {
        let mut ctx = ctx!(self, now_ms, out);
        match self.destinations.get_mut(destination) {
            Some(Destination::Queue(queue)) => queue.ack(&mut ctx, consumer, ids),
            Some(Destination::Topic(topic)) => topic.settle(consumer, ids),
            None => {}
        }
    }

    fn handle_nack(
        &mut self,
        consumer: ConsumerKey,
        destination: &Arc<[u8]>,
        ids: &[MessageId],
        requeue: bool,
        now_ms: u64,
        out: &mut Effects,
    ) {
        let mut ctx = ctx!(self, now_ms, out);
        match self.destinations.get_mut(destination) {
            Some(Destination::Queue(queue)) => queue.nack(&mut ctx, consumer, ids, requeue),
            Some(Destination::Topic(topic)) => topic.settle(consumer, ids),
            None => {}
        }
        self.track_expiry(destination);
    }

    fn handle_unsent(&mut self, consumer: ConsumerKey, destination: &Arc<[u8]>, ids: &[MessageId]) {
        if let Some(Destination::Queue(queue)) = self.destinations.get_mut(destination) {
            queue.unsent(consumer, ids);
        }
    }

    fn handle_credit(
        &mut self,
        consumer: ConsumerKey,
        destination: &Arc<[u8]>,
        count: u32,
        bytes: u64,
        now_ms: u64,
        out: &mut Effects,
    ) {
        let mut ctx = ctx!(self, now_ms, out);
        match self.destinations.get_mut(destination) {
            Some(Destination::Queue(queue)) => queue.credit(&mut ctx, consumer, count, bytes),
            Some(Destination::Topic(topic)) => topic.credit(consumer, count),
            None => {}
        }
    }

    fn handle_flow(
        &mut self,
        consumer: ConsumerKey,
        destination: &Arc<[u8]>,
        paused: bool,
        now_ms: u64,
        out: &mut Effects,
    ) {
        let mut ctx = ctx!(self, now_ms, out);
        match self.destinations.get_mut(destination) {
            Some(Destination::Queue(queue)) => queue.flow(&mut ctx, consumer, paused),
            Some(Destination::Topic(topic)) => topic.flow(&mut ctx, consumer, paused),
            None => {}
        }
    }

    fn handle_returned(
        &mut self,
        message: Arc<Message>,
        deliveries: u32,
        order: u64,
        now_ms: u64,
        out: &mut Effects,
    ) {
        let name = message.destination.clone();
        if DestinationKind::of(&name) == DestinationKind::Queue {
            self.on_queue(&name, now_ms, out, |queue, ctx| {
                queue.returned(ctx, message, deliveries, order)
            });
        }
    }

    /// Runs `f` on queue `name` (created if it was freed meanwhile), then puts the queue on
    /// the expiry timer if what it now holds expires sooner.
    fn on_queue(
        &mut self,
        name: &Arc<[u8]>,
        now_ms: u64,
        out: &mut Effects,
        f: impl FnOnce(&mut Queue, &mut Ctx<'_>),
    ) {
        self.destination(name);
        let mut ctx = ctx!(self, now_ms, out);
        if let Some(Destination::Queue(queue)) = self.destinations.get_mut(name) {
            f(queue, &mut ctx);
        }
        self.track_expiry(name);
    }

    fn handle_returned_all(
        &mut self,
        destination: Arc<[u8]>,
        messages: Vec<(Arc<Message>, u32, u64)>,
        now_ms: u64,
        out: &mut Effects,
    ) {
        if DestinationKind::of(&destination) == DestinationKind::Queue {
            self.on_queue(&destination, now_ms, out, |queue, ctx| {
                queue.returned_all(ctx, messages)
            });
        }
    }

    /// A delivery for a session here. Without the session, a settled message goes back to
    /// its queue.
    #[allow(clippy::too_many_arguments)]
    fn handle_deliver(
        &mut self,
        consumer: ConsumerKey,
        message: Arc<Message>,
        deliveries: u32,
        settled: bool,
        order: u64,
        now_ms: u64,
        out: &mut Effects,
    ) {
        let mut ctx = ctx!(self, now_ms, out);
        match self.sessions.get_mut(&consumer.conn.local) {
            Some(session) => session.deliver(
                &mut ctx,
                consumer.subscription,
                message,
                deliveries,
                settled,
                order,
            ),
            None if settled => {
                let to = shard_of(&message.destination, ctx.shard_count);
                ctx.route(
                    to,
                    ShardMessage::Returned {
                        message,
                        deliveries,
                        order,
                    },
                );
            }
            None => {}
        }
    }

    fn handle_confirmed(
        &mut self,
        conn: ConnectionId,
        ticket: u64,
        now_ms: u64,
        out: &mut Effects,
    ) {
        if let Some(session) = self.sessions.get_mut(&conn.local) {
            let mut ctx = ctx!(self, now_ms, out);
            session.confirmed(&mut ctx, ticket);
            self.close_if_done(conn, now_ms, out);
        }
    }

    fn handle_throttle(
        &mut self,
        conn: ConnectionId,
        paused: bool,
        now_ms: u64,
        out: &mut Effects,
    ) {
        if let Some(session) = self.sessions.get_mut(&conn.local) {
            let mut ctx = ctx!(self, now_ms, out);
            session.throttle(&mut ctx, paused);
        }
    }

    fn handle_rejected(
        &mut self,
        conn: ConnectionId,
        reason: Rejection,
        now_ms: u64,
        out: &mut Effects,
    ) {
        let error = match reason {
            Rejection::QueueMessagesFull => ProtocolError::QueueFull {
                limit: "queue_messages_max and its overshoot",
            },
            Rejection::QueueBytesFull => ProtocolError::QueueFull {
                limit: "queue_bytes_max and its overshoot",
            },
            Rejection::NotStored { reason } => ProtocolError::NotStored { reason },
        };
        self.fail(conn, &error, None, now_ms, out);
    }

    fn handle_dead_letter(
        &mut self,
        message: Arc<Message>,
        from: Arc<[u8]>,
        from_at: Option<StoreRef>,
        now_ms: u64,
        out: &mut Effects,
    ) {
        let name = message.destination.clone();
        self.on_queue(&name, now_ms, out, |queue, ctx| {
            queue.accept_dead_letter(ctx, message, from, from_at)
        });
    }

    fn handle_moved(
        &mut self,
        destination: Arc<[u8]>,
        id: MessageId,
        at: Option<StoreRef>,
        out: &mut Effects,
    ) {
        if self.config.log_enabled {
            out.list.push(Effect::Append {
                record: Record::Ack {
                    destination,
                    id,
                    at,
                },
                token: None,
            });
        }
    }

    /// Every `monitor_interval_ms`: publish this shard's queue statistics to the other shards,
    /// and write the whole broker's (this shard's now, the others' as last heard, so up to one
    /// interval old) to each `/queue/monitor` subscriber here.
    fn monitor_round(&mut self, now_ms: u64, out: &mut Effects) {
        let own = self.queue_stats();
        if self.shard_count > 1 {
            let shared: Arc<[QueueStats]> = own.clone().into();
            let mut ctx = ctx!(self, now_ms, out);
            let own_shard = ctx.shard;
            for shard in (0..self.shard_count)
                .map(ShardId)
                .filter(|&s| s != own_shard)
            {
                ctx.route(
                    shard,
                    ShardMessage::Stats {
                        from: ctx.shard,
                        queues: shared.clone(),
                    },
                );
            }
        }
        if !self.sessions.values().any(Session::has_monitor) {
            return;
        }
        let mut all: Vec<QueueStats> = own;
        for (shard, stats) in &self.peer_stats {
            if *shard != self.id {
                all.extend(stats.iter().cloned());
            }
        }
        all.sort_by(|a, b| a.name.cmp(&b.name));
        if all.is_empty() {
            // stompserver sends nothing when there is no queue to report.
            return;
        }
        // stompserver's README format: header-like lines, a blank line after each queue.
        let mut body = Vec::new();
        for stats in &all {
            body.extend_from_slice(b"Queue: ");
            body.extend_from_slice(&stats.name);
            body.extend_from_slice(
                format!(
                    "\nsize: {}\ndequeued: {}\nenqueued: {}\n\n",
                    stats.size, stats.dequeued, stats.enqueued
                )
                .as_bytes(),
            );
        }
        let mut ctx = ctx!(self, now_ms, out);
        let id = ctx.next_message_id();
        let headers: [(&[u8], &[u8]); 1] = [(b"content-type", b"text/plain")];
        let message = Arc::new(Message::from_send(
            id,
            Arc::from(MONITOR_DESTINATION),
            headers,
            &body,
            0,
            false,
        ));
        for session in self.sessions.values_mut() {
            if session.has_monitor() {
                session.deliver_monitor(&mut ctx, &message);
            }
        }
    }
}
