//! The part of a shard's state that a handler may change through [`ShardIo`]: the connection
//! table, out buffers and the outgoing peer queues. Requests that need the ring (sends, closes,
//! resumed reads) are queued here and carried out by the loop in `shard.rs` after the handler
//! returns, so a handler call never makes a syscall and never re-enters the handler.

use std::collections::VecDeque;
use std::os::fd::RawFd;

use bytes::Bytes;

use crate::codec::{Command, DecodeError, FrameWriter, Version};

use super::handler::{CloseReason, ConnId, ShardId, ShardIo};
use super::mesh::PeerOut;
use super::out::OutQueue;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ConnState {
    Open,
    /// The handler has been (or is about to be) told; queued bytes are flushed, then FIN is sent,
    /// then input is read and dropped until the client's EOF, so that the client reads our last
    /// frame instead of a reset. `forced` skips the rest once `deadline_ms` passes.
    Closing {
        fin_sent: bool,
        deadline_ms: u64,
        forced: bool,
    },
}

pub(super) struct Conn {
    pub(super) fd: RawFd,
    pub(super) id: ConnId,
    pub(super) state: ConnState,
    pub(super) out: OutQueue,
    pub(super) version: Version,
    pub(super) heartbeat_send_every_ms: u64,
    pub(super) heartbeat_read_timeout_ms: u64,
    pub(super) last_read_ms: u64,
    pub(super) last_write_ms: u64,
    /// A multishot receive is armed (its final CQE, without F_MORE, has not arrived).
    pub(super) recv_armed: bool,
    pub(super) recv_cancel_sent: bool,
    pub(super) send_in_flight: bool,
    pub(super) send_cancel_sent: bool,
    /// The handler paused reading.
    pub(super) paused: bool,
    /// Decoded its share of frames this loop turn ([`FRAMES_PER_TURN_MAX`] or
    /// [`BYTES_PER_TURN_MAX`]); the rest waits for the next turn, in the reassembly buffer.
    pub(super) over_budget: bool,
    /// The turn `decoded_in_turn` counts for.
    pub(super) decode_turn: u64,
    pub(super) decoded_in_turn: u32,
    /// Bytes of the frames counted in `decoded_in_turn`.
    pub(super) decoded_bytes_in_turn: usize,
    /// Received bytes wait undecoded in the reassembly buffer because input is paused.
    pub(super) parked: bool,
    /// The handler saw the out buffer full and is owed an `on_writable`.
    pub(super) writable_owed: bool,
    /// The handler asked to hear when the out buffer is next empty ([`ShardIo::notify_flushed`]).
    pub(super) flushed_owed: bool,
    /// In the dirty list: has queued bytes for the next batch of sends.
    pub(super) dirty: bool,
    /// The client closed its side or the socket failed: no receive is re-armed.
    pub(super) eof: bool,
}

impl Conn {
    pub(super) fn is_open(&self) -> bool {
        self.state == ConnState::Open
    }

    /// Its input is not decoded now: paused by the handler, or its share of this turn used.
    pub(super) fn is_stopped(&self) -> bool {
        self.paused || self.over_budget
    }
}

/// Frames one connection may have decoded in one loop turn. Between turns the loop takes in
/// peer messages (a destination's request to pause this producer among them), sends, and
/// serves the other connections, so one client's flood neither delays everyone else's frames
/// by a whole receive batch (8 MiB) nor outruns producer flow control by more than a turn's
/// worth. 4,096 small frames take about a millisecond to handle.
pub(super) const FRAMES_PER_TURN_MAX: u32 = 4096;

/// Bytes of frames one connection may have decoded in one loop turn (the frame that crosses it
/// is finished). Peer messages (a consumer's credit, a delivery) are taken in and sends
/// completed only between turns, and one send takes at most an out buffer (256 KiB by default)
/// to a consumer, while 4,096 frames of 1 KiB are 4 MiB: with turns that long a producer put
/// far more into a queue each turn than its consumer took out, the backlog grew until every
/// message was logged instead of handed on, which made the queue's core slower still
/// (`stompd-loadgen queue -s 1024`: p50 latency 1.6–4.6 s and about 6.4 µs of broker CPU per
/// message before, 20–300 ms and about 4 µs with this; BENCHMARKS.md). Bounding the turn only
/// while this core's own output was backed up did not help: the producer's core is often not
/// the consumer's. Taking fewer peer messages per turn (128 instead of 1,024) measured no
/// better.
pub(super) const BYTES_PER_TURN_MAX: usize = 64 * 1024;

pub(super) struct Slot {
    pub(super) generation: u32,
    pub(super) conn: Option<Conn>,
}

pub(super) struct IoCore<M> {
    pub(super) shard: ShardId,
    pub(super) shards: usize,
    pub(super) now_ms: u64,
    pub(super) slots: Vec<Slot>,
    pub(super) free: Vec<u32>,
    pub(super) open_count: usize,
    /// Connections with bytes queued since their last send was submitted.
    pub(super) dirty: Vec<u32>,
    /// `on_close` calls owed to the handler.
    pub(super) closed: VecDeque<(ConnId, CloseReason)>,
    /// Connections in `ConnState::Closing`, driven to release by the loop.
    pub(super) closing: Vec<u32>,
    /// `on_writable` calls owed to the handler.
    pub(super) writable: VecDeque<ConnId>,
    /// `on_flushed` calls owed to the handler.
    pub(super) flushed: VecDeque<ConnId>,
    /// Connections whose input may flow again.
    pub(super) resume: Vec<u32>,
    /// Connections holding parked input.
    pub(super) parked: Vec<u32>,
    /// Connections that used their frame budget this turn; resumed at the next.
    pub(super) over_budget: Vec<u32>,
    /// Loop iterations so far: the unit of the per-connection frame budget.
    pub(super) turn: u64,
    pub(super) peers: PeerOut<M>,
    /// The whole shard stopped decoding client input (a peer queue is full, or draining).
    pub(super) input_paused: bool,
    pub(super) out_buffer_bytes_max: usize,
    /// Past this the connection is closed: `out_buffer_bytes_max` plus one largest MESSAGE
    /// (a largest frame plus the head the broker adds). Deliveries never reach it (the
    /// broker writes a MESSAGE only below `out_buffer_bytes_max`); a flood of other frames
    /// (RECEIPTs to a client that does not read) can.
    pub(super) out_buffer_bytes_hard_max: usize,
    pub(super) close_linger_ms: u64,
    /// Sum of all out buffers, kept current for the stats.
    pub(super) out_bytes_total: usize,
    pub(super) frames_in: u64,
    /// Times input was paused because a peer queue was full.
    pub(super) input_pauses: u64,
    /// Operations handlers submitted ([`ShardIo::submit`]) with their tokens, for the loop to
    /// put on the ring.
    pub(super) handler_ops: Vec<(io_uring::squeue::Entry, u64)>,
}

impl<M> IoCore<M> {
    pub(super) fn conn(&self, slot: u32) -> Option<&Conn> {
        self.slots.get(slot as usize)?.conn.as_ref()
    }

    pub(super) fn conn_mut(&mut self, slot: u32) -> Option<&mut Conn> {
        self.slots.get_mut(slot as usize)?.conn.as_mut()
    }

    /// The slot of `id` if it is a live, open connection of this shard.
    pub(super) fn open_slot(&self, id: ConnId) -> Option<u32> {
        self.open_conn(id).map(|_| id.slot)
    }

    pub(super) fn open_conn(&self, id: ConnId) -> Option<&Conn> {
        if id.shard() != self.shard {
            debug_assert!(false, "connection {id} belongs to another shard");
            return None;
        }
        let slot = self.slots.get(id.slot as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.conn.as_ref().filter(|conn| conn.is_open())
    }

    pub(super) fn open_conn_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        self.open_slot(id)?;
        self.conn_mut(id.slot)
    }

    pub(super) fn write_with(&mut self, id: ConnId, encode: impl FnOnce(&mut Vec<u8>)) -> bool {
        let Some(conn) = self.open_conn_mut(id) else {
            return false;
        };
        let added = conn.out.append_with(encode);
        self.after_write(id.slot, added);
        true
    }

    pub(super) fn write_shared(&mut self, id: ConnId, body: Bytes) -> bool {
        let Some(conn) = self.open_conn_mut(id) else {
            return false;
        };
        let added = conn.out.append_shared(body);
        self.after_write(id.slot, added);
        true
    }

    fn after_write(&mut self, slot: u32, added: usize) {
        self.out_bytes_total += added;
        let hard_max = self.out_buffer_bytes_hard_max;
        let Some(conn) = self.slots[slot as usize].conn.as_mut() else {
            return;
        };
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(slot);
        }
        if conn.out.bytes() > hard_max {
            tracing::debug!(conn = %conn.id, bytes = conn.out.bytes(), "out buffer over its hard limit; closing");
            self.begin_close(slot, CloseReason::OutBufferOverflow);
            self.force_close(slot);
        }
    }

    pub(super) fn is_out_full(&mut self, id: ConnId) -> bool {
        let max = self.out_buffer_bytes_max;
        let Some(conn) = self.open_conn_mut(id) else {
            return false;
        };
        let full = conn.out.bytes() >= max;
        if full {
            conn.writable_owed = true;
        }
        full
    }

    /// Arms [`super::ShardHandler::on_flushed`] for the next time the out buffer is empty
    /// (at once, from the loop, when it already is).
    pub(super) fn notify_flushed(&mut self, id: ConnId) {
        let Some(conn) = self.open_conn_mut(id) else {
            return;
        };
        if conn.out.is_empty() && !conn.send_in_flight {
            conn.flushed_owed = false;
            self.flushed.push_back(id);
        } else {
            conn.flushed_owed = true;
        }
    }

    pub(super) fn set_paused(&mut self, slot: u32, paused: bool) {
        let Some(conn) = self.conn_mut(slot) else {
            return;
        };
        if conn.paused == paused {
            return;
        }
        conn.paused = paused;
        if !paused {
            self.resume.push(slot);
        }
    }

    /// Starts closing: the handler is told (later, by the loop), new writes are refused,
    /// queued bytes still go out.
    pub(super) fn begin_close(&mut self, slot: u32, reason: CloseReason) {
        let now_ms = self.now_ms;
        let linger_ms = self.close_linger_ms;
        let Some(conn) = self.conn_mut(slot) else {
            return;
        };
        if !conn.is_open() {
            return;
        }
        conn.state = ConnState::Closing {
            fin_sent: false,
            deadline_ms: now_ms + linger_ms,
            forced: false,
        };
        let id = conn.id;
        tracing::trace!(conn = %id, ?reason, "closing");
        self.closed.push_back((id, reason));
        self.closing.push(slot);
    }

    /// Gives up on flushing and lingering: queued bytes are dropped; the loop cancels what is
    /// in flight and releases the slot when the kernel is done with it.
    pub(super) fn force_close(&mut self, slot: u32) {
        let Some(conn) = self.conn_mut(slot) else {
            return;
        };
        if let ConnState::Closing {
            forced,
            deadline_ms,
            ..
        } = &mut conn.state
        {
            *forced = true;
            *deadline_ms = 0;
        }
    }

    /// Turns a decode error into an ERROR frame that names it (STOMP 1.2 "ERROR": the
    /// `message` header holds a short description) and closes the connection after it.
    pub(super) fn protocol_error(&mut self, slot: u32, error: DecodeError) {
        let Some(conn) = self.conn(slot) else {
            return;
        };
        let (id, version) = (conn.id, conn.version);
        let text = error.to_string();
        tracing::debug!(conn = %id, %text, "protocol error");
        self.write_with(id, |out| {
            let mut writer = FrameWriter::begin(out, version, Command::Error);
            writer
                .header(b"message", text.as_bytes())
                .header(b"content-type", b"text/plain")
                .content_length(text.len());
            writer.finish(text.as_bytes());
            // The EOL after the NUL that ActiveMQ writes after every frame, as the broker
            // does (`broker::session::FRAME_TRAILER`): stream parsers such as stomper's look
            // for `\0\n` and would never see this last frame before the close.
            out.push(b'\n');
        });
        self.begin_close(slot, CloseReason::Protocol(error));
    }

    /// A peer queue is full: stop decoding client input until the overflow drains.
    pub(super) fn pause_input(&mut self) {
        if !self.input_paused {
            self.input_paused = true;
            self.input_pauses += 1;
        }
    }

    pub(super) fn io(&mut self) -> ShardIo<'_, M> {
        ShardIo { core: self }
    }
}
