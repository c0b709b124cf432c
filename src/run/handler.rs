//! The broker on one shard's event loop: a [`ShardHandler`] that owns one [`Shard`] (the
//! sessions of this core's connections and the destinations hashed to it) and, with file
//! queues, that shard's [`Durability`] (its log). It feeds the loop's events into the broker
//! with the wall-clock time and carries out the [`Effects`] that come back.
//!
//! Invariants: effects are carried out in the order the broker produced them (a Close after
//! the writes before it; peer messages FIFO per target, which the server's queues keep);
//! every [`DurableToken`] is reported once, in order; `is_drained` stays false while a sync is
//! in flight or a token waits, so shutdown does not cut a RECEIPT that was promised.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::Arc;

use bytes::Bytes;
use fnv::FnvHasher;

use crate::broker::{ConnectionId, Effect, Effects, Message, Shard, ShardId, ShardMessage};
use crate::codec::Frame;
use crate::server::{CloseReason, ConnId, ShardHandler, ShardIo};

use super::auth::{AuthClient, Submitted};
use super::trim::Trimmer;
use crate::log::{Durability, NotStored, Settled, SYNC_TOKEN};

type FnvMap<K, V> = HashMap<K, V, BuildHasherDefault<FnvHasher>>;

/// A stored body handed to the send path without a copy: the bytes live in the `Arc`ed
/// message, which stays alive until the kernel has sent them.
struct Body(Arc<Message>);

impl AsRef<[u8]> for Body {
    fn as_ref(&self) -> &[u8] {
        &self.0.body
    }
}

/// Bodies smaller than this are copied into the out buffer: an iovec and a reference count
/// cost more than copying a few hundred bytes (the server applies the same rule).
const SHARED_BODY_BYTES_MIN: usize = 512;

/// What the handler knows of one open connection.
struct Conn {
    server: ConnId,
    /// The broker was told the output is full (`on_writable(false)`) and not yet that it
    /// drained.
    out_paused: bool,
}

pub struct BrokerHandler {
    /// The broker logic of this core, holding its log (the store it reads paged-out bodies
    /// back from) when queues are durable.
    shard: Shard<Option<Durability>>,
    auth: Option<AuthClient>,
    effects: Effects,
    /// Broker connection (by its shard-local number) to the loop's connection.
    conns: FnvMap<u64, Conn>,
    /// The loop's connection to the broker's.
    by_server: FnvMap<ConnId, ConnectionId>,
    /// Connections written to during this call: checked for a full out buffer and armed for
    /// `on_flushed` once the effects are done.
    touched: Vec<ConnectionId>,
    /// Connections written to during this call whose out-buffer size the broker has not been
    /// told since: it paces deliveries by it (`Shard::on_out_bytes`, once all effects are
    /// applied).
    written: Vec<ConnectionId>,
    /// Wall-clock milliseconds at the loop's time zero: `io.now_ms()` counts from the server's
    /// start, the broker wants the Unix epoch (message expiry is epoch-based).
    epoch_base_ms: u64,
    /// Lowest tick at which the log may next want housekeeping or a timed sync.
    shutting_down: bool,
    /// Gives freed memory back to the kernel; shard 0's handler only (one per broker).
    trimmer: Option<Trimmer>,
}

impl BrokerHandler {
    pub fn new(
        shard: Shard<Option<Durability>>,
        auth: Option<AuthClient>,
        epoch_base_ms: u64,
    ) -> BrokerHandler {
        BrokerHandler {
            auth,
            effects: Effects::new(),
            conns: FnvMap::default(),
            by_server: FnvMap::default(),
            touched: Vec::new(),
            written: Vec::new(),
            epoch_base_ms,
            shutting_down: false,
            trimmer: (shard.id() == ShardId(0)).then(|| Trimmer::new(shard.config().memory)),
            shard,
        }
    }

    fn durability(&mut self) -> Option<&mut Durability> {
        self.shard.store_mut().as_mut()
    }

    fn now(&self, io: &ShardIo<'_, ShardMessage>) -> u64 {
        self.epoch_base_ms + io.now_ms()
    }

    /// Carries out the effects, and whatever they lead to (flow control, durable tokens,
    /// login verdicts), until the broker has nothing more to say.
    fn settle(&mut self, io: &mut ShardIo<'_, ShardMessage>) {
        loop {
            self.apply(io);
            let now = self.now(io);
            // Message records held back during `apply` (an auto-ack delivery in the same batch
            // cancels its pair) go to the log before anything reads its state.
            if let Some(durability) = self.durability() {
                durability.flush(now);
            }
            let mut more = false;
            for conn in std::mem::take(&mut self.touched) {
                let Some(entry) = self.conns.get_mut(&conn.local) else {
                    continue;
                };
                io.notify_flushed(entry.server);
                self.written.push(conn);
                if !entry.out_paused && io.is_out_full(entry.server) {
                    tracing::trace!(conn = %entry.server, "output full: deliveries paused");
                    entry.out_paused = true;
                    self.shard.on_writable(conn, false, now, &mut self.effects);
                    more = true;
                }
            }
            {
                while let Some(settled) = self.durability().and_then(Durability::next_settled) {
                    match settled {
                        Settled::Durable(token) => {
                            self.shard.on_durable(token, now, &mut self.effects);
                        }
                        Settled::NotStored(NotStored {
                            destination,
                            id,
                            token,
                            reason,
                        }) => {
                            self.shard.on_append_failed(
                                &destination,
                                id,
                                token,
                                reason,
                                now,
                                &mut self.effects,
                            );
                            if let Some(token) = token {
                                self.shard.on_durable(token, now, &mut self.effects);
                            }
                        }
                    }
                    more = true;
                }
            }
            if let Some(auth) = self.auth.as_mut() {
                while let Some((conn, accepted)) = auth.poll() {
                    // A refusal whose ERROR is delayed pauses the input again at once
                    // (`Effect::Throttle` from the broker).
                    if let Some(entry) = self.conns.get(&conn.local) {
                        io.resume_reading(entry.server);
                    }
                    self.shard
                        .on_login_result(conn, accepted, now, &mut self.effects);
                    more = true;
                }
            }
            if !more && self.effects.list.is_empty() {
                // Every write is applied: the broker learns what each written connection's
                // buffer holds, one connection at a time, going back to apply whatever that
                // writes (waiting deliveries) before the next, so each figure is exact.
                self.written.sort_unstable();
                self.written.dedup();
                while let Some(conn) = self.written.pop() {
                    if let Some(entry) = self.conns.get(&conn.local) {
                        let bytes = io.out_bytes(entry.server) as u64;
                        self.shard.on_out_bytes(conn, bytes, now, &mut self.effects);
                    }
                    if !self.effects.list.is_empty() {
                        break;
                    }
                }
                if self.effects.list.is_empty() {
                    break;
                }
            }
        }
        self.start_sync(io);
    }

    fn apply(&mut self, io: &mut ShardIo<'_, ShardMessage>) {
        let now = self.now(io);
        // Taken out so the bytes can be read while effects are consumed; put back to keep
        // both buffers' capacity (no allocation per call once warm).
        let mut list = std::mem::take(&mut self.effects.list);
        let mut logins_busy = Vec::new();
        let mut logins_known = Vec::new();
        for effect in list.drain(..) {
            match effect {
                Effect::Write { conn, bytes, body } => {
                    let Some(entry) = self.conns.get(&conn.local) else {
                        continue;
                    };
                    let server = entry.server;
                    let head = &self.effects.bytes[bytes];
                    match body {
                        None => {
                            io.write(server, head);
                        }
                        Some(message) if message.body.len() < SHARED_BODY_BYTES_MIN => {
                            io.write_with(server, |out| {
                                out.extend_from_slice(head);
                                out.extend_from_slice(&message.body);
                                out.push(0);
                            });
                        }
                        Some(message) => {
                            io.write(server, head);
                            io.write_shared(server, Bytes::from_owner(Body(message)));
                            io.write(server, b"\0");
                        }
                    }
                    if self.touched.last() != Some(&conn) {
                        self.touched.push(conn);
                    }
                }
                Effect::Connected { conn, version, .. } => {
                    // Heart-beats are the broker's (`on_tick` beats and times out), so the
                    // loop's own timers stay off: doing both would double the beats.
                    if let Some(entry) = self.conns.get(&conn.local) {
                        io.set_version(entry.server, version);
                    }
                }
                Effect::Authenticate {
                    conn,
                    login,
                    passcode,
                } => {
                    let Some(entry) = self.conns.get(&conn.local) else {
                        continue;
                    };
                    let submitted = match self.auth.as_mut() {
                        Some(auth) => auth.submit(conn, login, passcode),
                        None => Submitted::QueueFull,
                    };
                    match submitted {
                        Submitted::Queued => io.pause_reading(entry.server),
                        Submitted::Accepted => logins_known.push(conn),
                        Submitted::QueueFull => logins_busy.push(conn),
                    }
                }
                Effect::Throttle { conn, paused } => {
                    if let Some(entry) = self.conns.get(&conn.local) {
                        tracing::trace!(conn = %entry.server, paused, "producer flow control");
                        if paused {
                            io.pause_reading(entry.server);
                        } else {
                            io.resume_reading(entry.server);
                        }
                    }
                }
                Effect::Close { conn } => {
                    if let Some(auth) = self.auth.as_mut() {
                        auth.forget(conn);
                    }
                    if let Some(entry) = self.conns.remove(&conn.local) {
                        self.by_server.remove(&entry.server);
                        io.close(entry.server);
                    }
                }
                // A record that cannot be stored comes back through `next_settled` once the
                // batch is flushed (`settle`).
                Effect::Append { record, token } => match self.durability() {
                    Some(durability) => durability.append(record, token, now),
                    // Memory queues: the broker is configured without the log and emits no
                    // appends; a stray token is released at once rather than never.
                    None => {
                        if let Some(token) = token {
                            self.shard.on_durable(token, now, &mut self.effects);
                        }
                    }
                },
                Effect::Peer { to, message } => io.send_peer(usize::from(to.0), message),
            }
        }
        // Effects produced meanwhile (their byte ranges lie after the ones just written) go
        // round again; the byte buffer is reset only once nothing refers to it.
        let produced = std::mem::replace(&mut self.effects.list, list);
        self.effects.list.extend(produced);
        if self.effects.list.is_empty() {
            self.effects.bytes.clear();
        }
        for conn in logins_known {
            self.shard
                .on_login_result(conn, true, now, &mut self.effects);
        }
        for conn in logins_busy {
            self.shard.on_login_queue_full(conn, now, &mut self.effects);
        }
    }

    fn start_sync(&mut self, io: &mut ShardIo<'_, ShardMessage>) {
        let now = self.now(io);
        let Some(durability) = self.durability() else {
            return;
        };
        let Some(request) = durability.start_sync(now) else {
            return;
        };
        for target in &request.targets {
            let mut entry = io_uring::opcode::Fsync::new(io_uring::types::Fd(target.fd));
            if target.data_only {
                entry = entry.flags(io_uring::types::FsyncFlags::DATASYNC);
            }
            // SAFETY: an fsync refers to no memory, and the log keeps the descriptor open
            // until `mark_synced` / `mark_sync_failed`, which only the completion triggers.
            unsafe { io.submit(entry.build(), SYNC_TOKEN) };
        }
    }
}

impl ShardHandler for BrokerHandler {
    type PeerMsg = ShardMessage;

    fn on_open(&mut self, conn: ConnId, io: &mut ShardIo<'_, ShardMessage>) {
        let now = self.now(io);
        let id = self.shard.open_connection(now);
        self.conns.insert(
            id.local,
            Conn {
                server: conn,
                out_paused: false,
            },
        );
        self.by_server.insert(conn, id);
    }

    fn on_frame(&mut self, conn: ConnId, frame: &Frame<'_>, io: &mut ShardIo<'_, ShardMessage>) {
        let Some(&id) = self.by_server.get(&conn) else {
            return;
        };
        let now = self.now(io);
        self.shard.on_frame(id, frame, now, &mut self.effects);
        self.settle(io);
    }

    fn on_heartbeat_in(&mut self, conn: ConnId, io: &mut ShardIo<'_, ShardMessage>) {
        if let Some(&id) = self.by_server.get(&conn) {
            let now = self.now(io);
            self.shard.on_input(id, now);
        }
    }

    fn on_writable(&mut self, conn: ConnId, io: &mut ShardIo<'_, ShardMessage>) {
        let Some(&id) = self.by_server.get(&conn) else {
            return;
        };
        if let Some(entry) = self.conns.get_mut(&id.local) {
            if !entry.out_paused {
                return;
            }
            entry.out_paused = false;
            tracing::trace!(conn = %conn, "output drained: deliveries resume");
        }
        let now = self.now(io);
        // What it still holds first: the broker writes waiting deliveries up to the limit.
        let bytes = io.out_bytes(conn) as u64;
        self.shard.on_out_bytes(id, bytes, now, &mut self.effects);
        self.shard.on_writable(id, true, now, &mut self.effects);
        self.settle(io);
    }

    fn on_flushed(&mut self, conn: ConnId, io: &mut ShardIo<'_, ShardMessage>) {
        let Some(&id) = self.by_server.get(&conn) else {
            return;
        };
        if io.out_bytes(conn) > 0 {
            // Written to since the send that emptied it (a handler call came in between): the
            // broker would take those bytes for gone and write up to a whole buffer more. Those
            // writes armed the notice again, so the next empty buffer reports them all.
            return;
        }
        let now = self.now(io);
        self.shard.on_flushed(id, now, &mut self.effects);
        self.settle(io);
    }

    fn on_close(
        &mut self,
        conn: ConnId,
        _reason: &CloseReason,
        io: &mut ShardIo<'_, ShardMessage>,
    ) {
        // After an `Effect::Close` the broker has already forgotten the connection.
        let Some(id) = self.by_server.remove(&conn) else {
            return;
        };
        self.conns.remove(&id.local);
        if let Some(auth) = self.auth.as_mut() {
            auth.forget(id);
        }
        let now = self.now(io);
        // What was written and never sent does not count as delivered.
        self.shard.on_output_handed(id, io.handed_bytes(conn));
        self.shard.on_connection_lost(id, now, &mut self.effects);
        self.settle(io);
    }

    fn on_peer(&mut self, _from: usize, msg: ShardMessage, io: &mut ShardIo<'_, ShardMessage>) {
        let now = self.now(io);
        self.shard.on_peer_message(msg, now, &mut self.effects);
        self.settle(io);
    }

    fn on_tick(&mut self, io: &mut ShardIo<'_, ShardMessage>) {
        let now = self.now(io);
        self.shard.on_tick(now, &mut self.effects);
        if !self.shutting_down {
            if let Some(durability) = self.durability() {
                durability.housekeeping(now);
            }
        }
        self.settle(io);
        if let Some(trimmer) = self.trimmer.as_mut() {
            trimmer.tick(io.now_ms());
        }
    }

    fn on_turn_end(&mut self, io: &mut ShardIo<'_, ShardMessage>) {
        if let Some(durability) = self.durability() {
            if !durability.write_pending() {
                self.settle(io);
            }
        }
    }

    fn on_shutdown(&mut self, io: &mut ShardIo<'_, ShardMessage>) {
        self.shutting_down = true;
        let now = self.now(io);
        self.shard.on_shutdown(now, &mut self.effects);
        self.settle(io);
    }

    fn is_drained(&self) -> bool {
        self.shard
            .store()
            .as_ref()
            .map_or(true, |d| !d.is_sync_in_flight() && !d.has_waiting())
    }

    fn on_completion(
        &mut self,
        token: u64,
        result: i32,
        _flags: u32,
        io: &mut ShardIo<'_, ShardMessage>,
    ) {
        if token != SYNC_TOKEN {
            return;
        }
        if let Some(durability) = self.durability() {
            durability.sync_completed(result);
        }
        self.settle(io);
    }
}

impl Drop for BrokerHandler {
    fn drop(&mut self) {
        if let Some(durability) = self.durability() {
            // Nothing is deferred after a handler call (`settle` flushes); the clock only
            // stamps records that a missed flush would otherwise lose.
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_millis() as u64);
            durability.sync_now(now_ms);
        }
    }
}
