//! The seam between the transport and the broker logic: the loop decodes frames and calls a
//! [`ShardHandler`]; the handler answers through [`ShardIo`], which queues bytes and requests that
//! the loop performs after the call returns. The handler never sees a socket, a ring or a clock:
//! the time comes in as `io.now_ms()`, so the same handler can be driven by a deterministic test.

use std::fmt;

use bytes::Bytes;

use crate::codec::{DecodeError, Frame, Version};

use super::core::IoCore;

/// Which shard (core thread) something belongs to: `0..shards`.
pub type ShardId = usize;

/// A connection, unique for the life of the server: the slot index is reused after a close, the
/// generation is not, so a message about a connection that has closed meanwhile is recognised as
/// stale (every [`ShardIo`] call with a stale id is a no-op that returns `false`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    /// The shard that accepted the connection and alone may write to it.
    pub shard: u16,
    /// Index in that shard's connection table.
    pub slot: u32,
    /// Bumped each time the slot is released.
    pub generation: u32,
}

impl ConnId {
    pub fn shard(self) -> ShardId {
        usize::from(self.shard)
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}.{}", self.shard, self.slot, self.generation)
    }
}

/// Why a connection was closed; given to [`ShardHandler::on_close`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed its side (recv returned 0).
    PeerClosed,
    /// The handler asked for it ([`ShardIo::close`]), for example after DISCONNECT or an ERROR.
    Requested,
    /// The byte stream broke a codec rule or limit; an ERROR frame naming it was sent first.
    Protocol(DecodeError),
    /// No byte arrived within the read heart-beat timeout set by [`ShardIo::set_heartbeat`].
    HeartbeatTimeout,
    /// The handler queued more than `out_buffer_bytes_max` plus one largest MESSAGE for a client
    /// that does not read: the hard backstop that keeps memory bounded even if the handler
    /// ignores [`ShardIo::is_out_full`]. The broker paces its deliveries below it; frames it
    /// does not pace (a flood of RECEIPTs to a client that never reads) can still reach it.
    OutBufferOverflow,
    /// A socket error (errno).
    Io(i32),
    /// The server is shutting down.
    Shutdown,
}

/// The broker logic of one shard, driven by that shard's event loop. All calls happen on the
/// shard thread; the handler owns its state outright (no locks) and talks to other shards only
/// with [`ShardHandler::PeerMsg`] values.
pub trait ShardHandler {
    /// What one shard sends another, on a bounded single-producer single-consumer queue. It
    /// crosses threads, so it owns its data (a stored message body is a [`Bytes`], shared, not
    /// copied).
    type PeerMsg: Send + 'static;

    /// A connection was accepted.
    fn on_open(&mut self, conn: ConnId, io: &mut ShardIo<'_, Self::PeerMsg>);

    /// One complete frame. It borrows the receive buffer: anything kept must be copied.
    fn on_frame(&mut self, conn: ConnId, frame: &Frame<'_>, io: &mut ShardIo<'_, Self::PeerMsg>);

    /// The client sent heart-beat EOLs. The loop already counts every byte as a sign of life for
    /// the read timeout; this is for handlers that want to see them.
    fn on_heartbeat_in(&mut self, _conn: ConnId, _io: &mut ShardIo<'_, Self::PeerMsg>) {}

    /// The connection's out buffer, which was over `out_buffer_bytes_max`
    /// ([`ShardIo::is_out_full`] returned `true`), drained below half of it: deliveries that
    /// were held back may resume.
    fn on_writable(&mut self, _conn: ConnId, _io: &mut ShardIo<'_, Self::PeerMsg>) {}

    /// The out buffer of a connection for which [`ShardIo::notify_flushed`] was called is empty:
    /// everything written so far is in the kernel's hands (the broker refills auto-ack windows
    /// here, so a consumer never has more than its prefetch between queue and socket).
    fn on_flushed(&mut self, _conn: ConnId, _io: &mut ShardIo<'_, Self::PeerMsg>) {}

    /// The connection is closing; it is never handed to the handler again, and writes to it are
    /// ignored. Called exactly once per opened connection, also at shutdown.
    fn on_close(&mut self, conn: ConnId, reason: &CloseReason, io: &mut ShardIo<'_, Self::PeerMsg>);

    /// A message from a shard (possibly this one: sending to yourself is allowed and is
    /// delivered on the next loop iteration, which keeps handlers free of special cases).
    fn on_peer(&mut self, from: ShardId, msg: Self::PeerMsg, io: &mut ShardIo<'_, Self::PeerMsg>);

    /// Called every `tick_ms`.
    fn on_tick(&mut self, _io: &mut ShardIo<'_, Self::PeerMsg>) {}

    /// The loop has run every handler call of this turn and is about to submit the turn's
    /// operations and sends: the last moment to put what the turn produced where a crash of
    /// the process would not lose it before a client hears of it.
    fn on_turn_end(&mut self, _io: &mut ShardIo<'_, Self::PeerMsg>) {}

    /// The server is shutting down: the listener is closed and no more frames will be decoded.
    /// Finish what is in flight (receipts); connections are closed once [`Self::is_drained`]
    /// and every out buffer is empty, or when the drain deadline passes.
    fn on_shutdown(&mut self, _io: &mut ShardIo<'_, Self::PeerMsg>) {}

    /// Whether work the handler started (a log write awaiting its sync, a receipt) is done.
    fn is_drained(&self) -> bool {
        true
    }

    /// An operation submitted with [`ShardIo::submit`] completed (`result` and `flags` as in the
    /// CQE; a multishot operation completes more than once while `flags` has `F_MORE`).
    fn on_completion(
        &mut self,
        _token: u64,
        _result: i32,
        _flags: u32,
        _io: &mut ShardIo<'_, Self::PeerMsg>,
    ) {
    }
}

/// What a handler may ask of its shard's loop. Writes are appended to the connection's out
/// buffer and sent in one batch (one `sendmsg` per connection per loop iteration); nothing here
/// makes a syscall.
pub struct ShardIo<'a, M> {
    pub(super) core: &'a mut IoCore<M>,
}

impl<M> ShardIo<'_, M> {
    /// This shard.
    pub fn shard(&self) -> ShardId {
        self.core.shard
    }

    /// How many shards the server runs; a destination belongs to
    /// [`super::shard_of`]`(name, shards)`.
    pub fn shards(&self) -> usize {
        self.core.shards
    }

    /// Milliseconds since the server started, read once per loop iteration.
    pub fn now_ms(&self) -> u64 {
        self.core.now_ms
    }

    /// Whether `conn` is open on this shard (not closing, not stale).
    pub fn is_open(&self, conn: ConnId) -> bool {
        self.core.open_conn(conn).is_some()
    }

    /// Appends bytes to the out buffer. `false` if the connection is not open.
    pub fn write(&mut self, conn: ConnId, bytes: &[u8]) -> bool {
        self.core
            .write_with(conn, |out| out.extend_from_slice(bytes))
    }

    /// Lets `encode` append to the out buffer in place (for example with
    /// [`crate::codec::FrameWriter`]), so a frame is encoded without a temporary buffer.
    pub fn write_with(&mut self, conn: ConnId, encode: impl FnOnce(&mut Vec<u8>)) -> bool {
        self.core.write_with(conn, encode)
    }

    /// Appends a stored body without copying it: it goes to the kernel as its own iovec. Small
    /// bodies are copied anyway, because an iovec costs more than copying a few hundred bytes.
    pub fn write_shared(&mut self, conn: ConnId, body: Bytes) -> bool {
        self.core.write_shared(conn, body)
    }

    /// Bytes queued for `conn` and not yet acknowledged by the kernel.
    pub fn out_bytes(&self, conn: ConnId) -> usize {
        self.core
            .open_conn(conn)
            .map_or(0, |connection| connection.out.bytes())
    }

    /// Bytes of `conn`'s output handed to the kernel so far (taken by it, or offered in a send
    /// still in flight); also for a connection that is closing, so [`ShardHandler::on_close`]
    /// can tell which frames never reached the socket. `u64::MAX` (all of it, as far as
    /// anyone can tell) for a connection already released.
    pub fn handed_bytes(&self, conn: ConnId) -> u64 {
        let Some(slot) = self.core.slots.get(conn.slot as usize) else {
            return u64::MAX;
        };
        match &slot.conn {
            Some(connection) if slot.generation == conn.generation => {
                connection.out.handed_bytes(connection.send_in_flight)
            }
            _ => u64::MAX,
        }
    }

    /// Whether the out buffer is at or over `out_buffer_bytes_max`: deliver nothing more until
    /// [`ShardHandler::on_writable`]. Asking arms that callback.
    pub fn is_out_full(&mut self, conn: ConnId) -> bool {
        self.core.is_out_full(conn)
    }

    /// Closes the connection once its queued bytes are sent (so an ERROR or RECEIPT written
    /// just before arrives). [`ShardHandler::on_close`] follows with [`CloseReason::Requested`].
    pub fn close(&mut self, conn: ConnId) {
        if let Some(slot) = self.core.open_slot(conn) {
            self.core.begin_close(slot, CloseReason::Requested);
        }
    }

    /// Asks for one [`ShardHandler::on_flushed`] once the out buffer is next empty.
    pub fn notify_flushed(&mut self, conn: ConnId) {
        self.core.notify_flushed(conn);
    }

    /// Stops decoding frames from `conn` (bytes already received are kept, the kernel's socket
    /// buffer and TCP flow control hold back the rest) until [`Self::resume_reading`].
    pub fn pause_reading(&mut self, conn: ConnId) {
        if let Some(slot) = self.core.open_slot(conn) {
            self.core.set_paused(slot, true);
        }
    }

    pub fn resume_reading(&mut self, conn: ConnId) {
        if let Some(slot) = self.core.open_slot(conn) {
            self.core.set_paused(slot, false);
        }
    }

    /// Heart-beats as negotiated (STOMP 1.2 "Heart-beating"): the loop writes an EOL when
    /// nothing was written for `send_every_ms`, and closes the connection when nothing was read
    /// for `read_timeout_ms` (the negotiated interval plus the tolerance the handler grants).
    /// Zero turns either off.
    pub fn set_heartbeat(&mut self, conn: ConnId, send_every_ms: u64, read_timeout_ms: u64) {
        if let Some(connection) = self.core.open_conn_mut(conn) {
            connection.heartbeat_send_every_ms = send_every_ms;
            connection.heartbeat_read_timeout_ms = read_timeout_ms;
        }
    }

    /// The version negotiated at CONNECT, which decides header escaping for the frames that follow.
    pub fn set_version(&mut self, conn: ConnId, version: Version) {
        if let Some(connection) = self.core.open_conn_mut(conn) {
            connection.version = version;
        }
    }

    /// Puts an operation on this shard's ring (for example the log's `WRITE` and `FSYNC`, so
    /// durable writes never block the shard); [`ShardHandler::on_completion`] gets `token` back
    /// with the result. The entry's own user_data is replaced. Submitted with the loop's next
    /// `io_uring_enter`. Keep [`ShardHandler::is_drained`] false while such operations are in
    /// flight, so shutdown waits for them.
    ///
    /// # Safety
    /// Every buffer or pointer the entry refers to must stay valid, and unmoved, until its
    /// (last) completion; the ring is closed before the handler is dropped.
    pub unsafe fn submit(&mut self, entry: io_uring::squeue::Entry, token: u64) {
        assert!(
            token <= super::shard::HANDLER_TOKEN_MAX,
            "tokens have 56 bits"
        );
        self.core.handler_ops.push((entry, token));
    }

    /// Queues a message for shard `to`. It never fails: when the bounded queue to `to` is full
    /// the message waits in this shard's overflow list, and while that list is not empty the
    /// shard stops decoding client input, so the overflow is bounded by what the frames
    /// already decoded produce.
    pub fn send_peer(&mut self, to: ShardId, msg: M) {
        if !self.core.peers.send(to, msg) {
            // Stop decoding at once, not at the next loop iteration, so the rest of this
            // receive batch does not add to the overflow.
            self.core.pause_input();
        }
    }
}
