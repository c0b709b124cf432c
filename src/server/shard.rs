//! One shard's event loop.
//!
//! Each iteration: read the clock; deliver peer messages; carry out what handlers asked for
//! (close notices, resumed input, `on_writable`); on the tick, check heart-beats and deadlines;
//! submit one `sendmsg` per connection that has new bytes and no send in flight; ring the
//! doorbells of sleeping peers; then submit and wait in one `io_uring_enter` (up to the next
//! tick) and handle the completions: accepted connections, received bytes (decoded in place in
//! the provided buffer, or in the connection's reassembly buffer when a frame spans receives),
//! finished sends. Recycled receive buffers are published once per batch.
//!
//! Bytes travel: NIC → kernel socket → provided buffer (multishot receive, no syscall per
//! read) → decoder (zero-copy frame) → handler → out buffer (encoded heads; stored bodies by
//! reference) → one `sendmsg` with iovecs per connection per iteration → kernel.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::types::{Fd, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring};
use socket2::Socket;

use crate::codec::{Decoded, Decoder, Limits, Version};

use super::bufring::BufRing;
use super::core::{Conn, ConnState, IoCore, Slot, BYTES_PER_TURN_MAX, FRAMES_PER_TURN_MAX};
use super::handler::{CloseReason, ConnId, ShardHandler, ShardId, ShardIo};
use super::mesh::{PeerIn, PeerOut, ShardShared};
use super::out::OutQueue;
use super::setup::{build_ring, pin_to_cpu, setup_error};
use super::{ServerConfig, ServerError, Shutdown};

/// What a CQE is about: the top byte of its user_data; the low 32 bits hold a slot or a shard,
/// and for connection operations the 24 bits between hold the slot's generation, so that a
/// completion or cancel meant for an earlier connection in a reused slot is recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    Accept = 1,
    Recv = 2,
    Send = 3,
    Cancel = 4,
    Wake = 5,
    Doorbell = 6,
    DoorbellSent = 7,
    /// An operation the handler submitted; the low 56 bits are its token.
    Handler = 8,
}

/// Tokens of handler operations fit below the op byte.
/// Bytes a MESSAGE head adds beyond its `subscription` header (message-id, destination, ack,
/// redelivered, delivery-count, content-length): far under 1 KiB for any legal destination.
const MESSAGE_HEAD_EXTRA_BYTES_MAX: usize = 1024;

pub(super) const HANDLER_TOKEN_MAX: u64 = (1 << 56) - 1;

const GENERATION_MASK: u32 = 0x00FF_FFFF;

fn user_data(op: Op, index: u32) -> u64 {
    conn_user_data(op, index, 0)
}

fn conn_user_data(op: Op, slot: u32, generation: u32) -> u64 {
    (u64::from(op as u8) << 56) | (u64::from(generation & GENERATION_MASK) << 32) | u64::from(slot)
}

fn decode_user_data(data: u64) -> (Option<Op>, u32, u32) {
    let op = match (data >> 56) as u8 {
        1 => Op::Accept,
        2 => Op::Recv,
        3 => Op::Send,
        4 => Op::Cancel,
        5 => Op::Wake,
        6 => Op::Doorbell,
        7 => Op::DoorbellSent,
        8 => Op::Handler,
        _ => return (None, 0, 0),
    };
    (Some(op), data as u32, (data >> 32) as u32 & GENERATION_MASK)
}

/// Peer messages taken from one source queue per iteration, so one busy peer cannot starve the
/// others or the shard's own sockets.
const PEER_MSGS_PER_SOURCE_MAX: usize = 1024;

/// Longest sleep while connections are closing or the shard is draining, whatever `tick_ms`.
const DEADLINE_POLL_MS: u64 = 50;

/// A reassembly buffer bigger than this is freed when it empties, so 10,000 idle connections do
/// not each keep the memory of the largest frame they ever sent.
const REASSEMBLY_KEEP_BYTES_MAX: usize = 64 * 1024;

pub(super) struct ShardParams<'a, M> {
    pub(super) shard: ShardId,
    pub(super) shards: usize,
    pub(super) config: &'a ServerConfig,
    pub(super) listener: Socket,
    pub(super) waker: Arc<OwnedFd>,
    pub(super) shared: Arc<[ShardShared]>,
    pub(super) peer_out: PeerOut<M>,
    pub(super) peer_in: PeerIn<M>,
    pub(super) shutdown: Shutdown,
    pub(super) start: Instant,
}

/// Per connection, what only the receive path touches (kept apart from [`IoCore`] so frames can
/// borrow the reassembly buffer while the handler holds the core).
struct Reader {
    decoder: Decoder,
    reassembly: Vec<u8>,
    /// Bytes at the front of `reassembly` already decoded: always less than its length, or both
    /// zero. Dropped from the front only once they are at least what follows them, so a turn
    /// that decodes its budget from a long parked input does not move all the rest.
    decoded: usize,
    /// The reassembly buffer's capacity as last charged to the memory budget.
    charged: u64,
}

struct Shard<H: ShardHandler> {
    // Declared first so it is dropped first: the kernel must let go of the buffer ring's memory
    // before `buf_ring` unmaps it.
    ring: IoUring,
    buf_ring: BufRing,
    readers: Vec<Reader>,
    core: IoCore<H::PeerMsg>,
    handler: H,
    peer_in: PeerIn<H::PeerMsg>,
    shared: Arc<[ShardShared]>,
    shutdown: Shutdown,
    listener: Option<Socket>,
    accept_armed: bool,
    accept_retry: bool,
    waker: Arc<OwnedFd>,
    /// Where the eventfd read lands; boxed so the address stays put while the read is armed.
    waker_buffer: Box<u64>,
    limits: Limits,
    /// Charged with the reassembly buffers' capacity.
    memory: &'static crate::broker::MemoryBudget,
    connections_max: usize,
    tick_ms: u64,
    next_tick_ms: u64,
    shutdown_drain_ms: u64,
    /// Set when draining: the moment connections are cut.
    drain_deadline_ms: Option<u64>,
    /// Receives to re-arm after recycled buffers are published (the ring ran dry).
    rearm: Vec<u32>,
    completions: Vec<(u64, i32, u32)>,
    /// Submissions that did not fit in the submission queue.
    backlog: std::collections::VecDeque<squeue::Entry>,
    start: Instant,
}

pub(super) fn run_shard<H, F>(
    params: ShardParams<'_, H::PeerMsg>,
    make_handler: &F,
) -> Result<(), ServerError>
where
    H: ShardHandler,
    F: Fn(ShardId, usize) -> H,
{
    let config = params.config;
    if config.pin_threads {
        match pin_to_cpu(params.shard) {
            Ok(cpu) => tracing::debug!(shard = params.shard, cpu, "pinned"),
            Err(error) => {
                tracing::warn!(shard = params.shard, %error, "cannot pin shard thread; running unpinned")
            }
        }
    }
    let (ring, mode) = build_ring(config.ring_entries)?;
    let buf_ring = BufRing::register(
        &ring.submitter(),
        0,
        config.recv_buffers_count,
        config.recv_buffer_bytes,
    )
    .map_err(|error| setup_error("io_uring_register(PBUF_RING)", error))?;
    tracing::debug!(
        shard = params.shard,
        ?mode,
        incremental = buf_ring.incremental,
        "ring ready"
    );
    // SAFETY: dup of a descriptor we own; the copy is owned by ShardShared.
    let ring_fd = unsafe { libc::dup(ring.as_raw_fd()) };
    if ring_fd < 0 {
        return Err(setup_error("dup(ring fd)", std::io::Error::last_os_error()));
    }
    let shared_me = &params.shared[params.shard];
    shared_me.ring_fd.store(ring_fd, Ordering::SeqCst);

    let connections_max = config.connections_max.div_ceil(params.shards).max(1);
    let mut shard = Shard {
        ring,
        buf_ring,
        readers: Vec::new(),
        core: IoCore {
            shard: params.shard,
            shards: params.shards,
            now_ms: 0,
            slots: Vec::new(),
            free: Vec::new(),
            open_count: 0,
            dirty: Vec::new(),
            closed: Default::default(),
            closing: Vec::new(),
            writable: Default::default(),
            flushed: Default::default(),
            resume: Vec::new(),
            parked: Vec::new(),
            over_budget: Vec::new(),
            turn: 0,
            peers: params.peer_out,
            input_paused: false,
            out_buffer_bytes_max: config.out_buffer_bytes_max,
            // One MESSAGE may exceed the largest frame a client may send by the headers the
            // broker adds (`subscription`, at most a header line, and a few short ones).
            out_buffer_bytes_hard_max: config.out_buffer_bytes_max
                + config.limits.frame_bytes_max
                + config.limits.header_line_bytes_max
                + MESSAGE_HEAD_EXTRA_BYTES_MAX,
            close_linger_ms: config.close_linger_ms,
            out_bytes_total: 0,
            frames_in: 0,
            input_pauses: 0,
            handler_ops: Vec::new(),
        },
        handler: make_handler(params.shard, params.shards),
        peer_in: params.peer_in,
        shared: params.shared,
        shutdown: params.shutdown,
        listener: Some(params.listener),
        accept_armed: false,
        accept_retry: false,
        waker: params.waker,
        waker_buffer: Box::new(0),
        limits: config.limits,
        memory: config.memory,
        connections_max,
        tick_ms: config.tick_ms,
        next_tick_ms: config.tick_ms,
        shutdown_drain_ms: config.shutdown_drain_ms,
        drain_deadline_ms: None,
        rearm: Vec::new(),
        completions: Vec::with_capacity(1024),
        backlog: Default::default(),
        start: params.start,
    };
    let result = shard.run();
    shard.finish();
    result
}

impl<H: ShardHandler> Shard<H> {
    fn run(&mut self) -> Result<(), ServerError> {
        self.arm_accept();
        self.arm_waker();
        loop {
            self.core.now_ms = self.start.elapsed().as_millis() as u64;
            self.core.turn += 1;
            self.resume_over_budget();
            if self.drain_deadline_ms.is_none() && self.shutdown.is_triggered() {
                self.begin_drain();
            }
            self.receive_peer_messages();
            self.core.peers.flush_overflow();
            self.update_input_pause();
            self.process_deferred();
            if self.core.now_ms >= self.next_tick_ms {
                self.tick();
                self.process_deferred();
            }
            if self.drain_step() {
                return Ok(());
            }
            self.handler.on_turn_end(&mut self.core.io());
            self.submit_handler_ops();
            self.submit_sends();
            self.progress_closing();
            self.ring_doorbells();
            self.wait()?;
            self.handle_completions();
            self.buf_ring.commit();
            self.rearm_receives();
            self.publish_counters();
        }
    }

    // ---- submission helpers ----

    fn push(&mut self, entry: squeue::Entry) {
        if self.backlog.is_empty() {
            // SAFETY: every pointer in our entries (msghdr, eventfd buffer) stays valid until
            // the completion arrives; see OutQueue and `waker_buffer`.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            // The submission queue is full: hand it to the kernel and retry once. Completions
            // are not reaped here, so no handler runs inside another step of the loop.
            let _ = self.ring.submit();
            // SAFETY: as above.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
        }
        // Still full (the kernel refuses submissions while the CQ overflows): keep it for
        // the next `wait`, in order.
        self.backlog.push_back(entry);
    }

    fn flush_backlog(&mut self) {
        while let Some(entry) = self.backlog.front() {
            // SAFETY: as in `push`.
            if unsafe { self.ring.submission().push(entry) }.is_err() {
                break;
            }
            self.backlog.pop_front();
        }
    }

    fn arm_accept(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        let entry = opcode::AcceptMulti::new(Fd(listener.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data(Op::Accept, 0));
        self.push(entry);
        self.accept_armed = true;
    }

    fn arm_waker(&mut self) {
        let buffer: *mut u64 = &mut *self.waker_buffer;
        let entry = opcode::Read::new(Fd(self.waker.as_raw_fd()), buffer.cast(), 8)
            .build()
            .user_data(user_data(Op::Wake, 0));
        self.push(entry);
    }

    fn arm_recv(&mut self, slot: u32) {
        let group = self.buf_ring.group;
        let Some(conn) = self.core.conn_mut(slot) else {
            return;
        };
        debug_assert!(!conn.recv_armed);
        conn.recv_armed = true;
        let entry = opcode::RecvMulti::new(Fd(conn.fd), group)
            .build()
            .user_data(conn_user_data(Op::Recv, slot, conn.id.generation));
        self.push(entry);
    }

    fn cancel(&mut self, op: Op, slot: u32) {
        let generation = match op {
            Op::Recv | Op::Send => self.core.slots[slot as usize].generation,
            _ => 0,
        };
        let entry = opcode::AsyncCancel::new(conn_user_data(op, slot, generation))
            .build()
            .user_data(user_data(Op::Cancel, slot));
        self.push(entry);
    }

    // ---- the loop's steps ----

    fn receive_peer_messages(&mut self) {
        let mut received = 0u64;
        // Messages to ourselves first: they were queued in earlier iterations.
        let local = self.core.peers.local.len();
        for _ in 0..local {
            let Some(msg) = self.core.peers.local.pop_front() else {
                break;
            };
            received += 1;
            let me = self.core.shard;
            self.handler.on_peer(me, msg, &mut self.core.io());
        }
        for from in 0..self.peer_in.consumers.len() {
            for _ in 0..PEER_MSGS_PER_SOURCE_MAX {
                let Some(consumer) = self.peer_in.consumers[from].as_mut() else {
                    break;
                };
                let Ok(msg) = consumer.pop() else {
                    break;
                };
                received += 1;
                self.handler.on_peer(from, msg, &mut self.core.io());
            }
        }
        if received > 0 {
            self.shared[self.core.shard]
                .stats
                .peer_msgs_received
                .fetch_add(received, Ordering::Relaxed);
        }
    }

    /// Connections that used their frame budget last turn may decode again (their bytes wait
    /// in the reassembly buffer; `process_deferred` decodes them and re-arms their receive).
    fn resume_over_budget(&mut self) {
        let over = std::mem::take(&mut self.core.over_budget);
        if !over.is_empty() {
            self.shared[self.core.shard]
                .stats
                .frame_budget_spent
                .fetch_add(over.len() as u64, Ordering::Relaxed);
        }
        for &slot in &over {
            if let Some(conn) = self.core.conn_mut(slot) {
                conn.over_budget = false;
                self.core.resume.push(slot);
            }
        }
        self.core.over_budget = over;
        self.core.over_budget.clear();
    }

    /// The shard stops decoding client input while a peer queue is full (so it does not buffer
    /// without bound) and while draining; when that ends, parked input flows again.
    fn update_input_pause(&mut self) {
        let congested = self.core.peers.is_congested();
        if congested {
            self.core.pause_input();
        }
        let paused = self.drain_deadline_ms.is_some() || congested;
        if paused == self.core.input_paused {
            return;
        }
        self.core.input_paused = paused;
        if !paused {
            // `parked` mirrors membership of the parked list, which is emptied here; a
            // connection that is still stopped when its turn comes is parked again.
            let parked = std::mem::take(&mut self.core.parked);
            for &slot in &parked {
                if let Some(conn) = self.core.conn_mut(slot) {
                    conn.parked = false;
                }
            }
            self.core.resume.extend(parked);
        }
    }

    /// Delivers what the handler is owed (closes, writability) and resumes input, until none
    /// is left (each may cause more).
    fn process_deferred(&mut self) {
        loop {
            if let Some((id, reason)) = self.core.closed.pop_front() {
                self.handler.on_close(id, &reason, &mut self.core.io());
                continue;
            }
            if let Some(id) = self.core.writable.pop_front() {
                if self.core.open_conn(id).is_some() {
                    self.handler.on_writable(id, &mut self.core.io());
                }
                continue;
            }
            if let Some(id) = self.core.flushed.pop_front() {
                if self.core.open_conn(id).is_some() {
                    self.handler.on_flushed(id, &mut self.core.io());
                }
                continue;
            }
            if let Some(slot) = self.core.resume.pop() {
                self.resume_input(slot);
                continue;
            }
            break;
        }
    }

    fn resume_input(&mut self, slot: u32) {
        let input_paused = self.core.input_paused;
        let Some(conn) = self.core.conn_mut(slot) else {
            return;
        };
        if !conn.is_open() {
            return;
        }
        if conn.is_stopped() || input_paused {
            self.park(slot);
            return;
        }
        self.decode_reassembly(slot);
        self.keep_receiving(slot, false);
    }

    /// After a connection's input was handled: if no receive is armed, arm one (now, or after
    /// this batch's buffers are recycled when `after_commit`), or, while its input is stopped,
    /// park it so whoever lifts the pause re-arms it. Closing connections are left to
    /// `progress_closing`, which re-arms lingering reads itself.
    fn keep_receiving(&mut self, slot: u32, after_commit: bool) {
        let Some(conn) = self.core.conn(slot) else {
            return;
        };
        if !conn.is_open() || conn.recv_armed || conn.eof {
            return;
        }
        if conn.is_stopped() || self.core.input_paused {
            self.park(slot);
        } else if after_commit {
            self.rearm.push(slot);
        } else {
            self.arm_recv(slot);
        }
    }

    fn tick(&mut self) {
        let now = self.core.now_ms;
        self.next_tick_ms = now + self.tick_ms;
        let mut out_max = 0usize;
        let mut reassembly = 0usize;
        for slot in 0..self.core.slots.len() as u32 {
            let Some(conn) = self.core.conn_mut(slot) else {
                continue;
            };
            out_max = out_max.max(conn.out.bytes());
            let reader = &self.readers[slot as usize];
            reassembly += reader.reassembly.len() - reader.decoded;
            if !conn.is_open() {
                continue;
            }
            if conn.heartbeat_read_timeout_ms > 0
                && now.saturating_sub(conn.last_read_ms) > conn.heartbeat_read_timeout_ms
            {
                tracing::debug!(conn = %conn.id, "heart-beat timeout");
                self.core.begin_close(slot, CloseReason::HeartbeatTimeout);
                continue;
            }
            if conn.heartbeat_send_every_ms > 0
                && conn.out.is_empty()
                && now.saturating_sub(conn.last_write_ms) >= conn.heartbeat_send_every_ms
            {
                let id = conn.id;
                self.core.write_with(id, |out| out.push(b'\n'));
            }
        }
        let stats = &self.shared[self.core.shard].stats;
        stats
            .out_bytes_conn_max
            .store(out_max as u64, Ordering::Relaxed);
        stats
            .reassembly_bytes
            .store(reassembly as u64, Ordering::Relaxed);
        self.handler.on_tick(&mut self.core.io());
        if self.accept_retry && !self.accept_armed && self.drain_deadline_ms.is_none() {
            self.accept_retry = false;
            self.arm_accept();
        }
    }

    fn begin_drain(&mut self) {
        let deadline = self.core.now_ms + self.shutdown_drain_ms;
        self.drain_deadline_ms = Some(deadline);
        tracing::debug!(shard = self.core.shard, "draining");
        if self.accept_armed {
            self.cancel(Op::Accept, 0);
        }
        // Shut down, not only closed: the armed accept holds its own reference to the socket
        // until the cancel completes, and while it is open the kernel keeps handing it a share
        // of new connections (SO_REUSEPORT), which a broker started next on the same port
        // would never see. Shutting a listener down unhashes it at once; connections still in
        // its backlog are reset rather than left hanging.
        if let Some(listener) = &self.listener {
            // SAFETY: shutdown on a socket we own; an error (already shut) changes nothing.
            unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
        }
        self.listener = None;
        self.update_input_pause();
        self.handler.on_shutdown(&mut self.core.io());
        self.process_deferred();
    }

    /// While draining: close connections once the handler and their out buffers are done (or
    /// the deadline passed); returns true when the shard may stop.
    fn drain_step(&mut self) -> bool {
        let Some(deadline) = self.drain_deadline_ms else {
            return false;
        };
        let now = self.core.now_ms;
        let late = now >= deadline;
        let flushed = self
            .core
            .slots
            .iter()
            .filter_map(|slot| slot.conn.as_ref())
            .all(|conn| !conn.is_open() || conn.out.is_empty());
        if late || (flushed && self.handler.is_drained()) {
            for slot in 0..self.core.slots.len() as u32 {
                if self.core.conn(slot).is_some_and(Conn::is_open) {
                    self.core.begin_close(slot, CloseReason::Shutdown);
                }
                if let Some(conn) = self.core.conn_mut(slot) {
                    // Lingering for the client's EOF must not outlast the drain.
                    if let ConnState::Closing { deadline_ms, .. } = &mut conn.state {
                        *deadline_ms = (*deadline_ms).min(deadline);
                    }
                }
            }
            self.process_deferred();
        }
        // All released, or a second past the deadline (ops the kernel still holds are
        // abandoned; `finish` then leaks the receive buffers rather than free memory the
        // kernel may write to).
        self.core.open_count == 0 || now >= deadline + 1_000
    }

    /// Queues the operations handlers submitted since the last iteration.
    fn submit_handler_ops(&mut self) {
        let mut entries = std::mem::take(&mut self.core.handler_ops);
        for (entry, token) in entries.drain(..) {
            self.push(entry.user_data((u64::from(Op::Handler as u8) << 56) | token));
        }
        if self.core.handler_ops.is_empty() {
            self.core.handler_ops = entries;
        }
    }

    fn submit_sends(&mut self) {
        let dirty = std::mem::take(&mut self.core.dirty);
        let now = self.core.now_ms;
        let memory = self.memory;
        for &slot in &dirty {
            let Some(conn) = self.core.conn_mut(slot) else {
                continue;
            };
            conn.dirty = false;
            // Every write marks its connection dirty, so the handler's writes since the last
            // turn are all charged here, whether or not a send can start now.
            conn.out.sync_charge(memory);
            // `is_empty`, not `has_queued`: after a short send the unsent rest stays in the
            // in-flight list with nothing queued behind it, and must go out all the same.
            if conn.send_in_flight || conn.out.is_empty() {
                continue;
            }
            if let ConnState::Closing { forced: true, .. } = conn.state {
                continue;
            }
            let Some(header) = conn.out.prepare_send() else {
                continue;
            };
            conn.send_in_flight = true;
            conn.last_write_ms = now;
            let entry = opcode::SendMsg::new(Fd(conn.fd), header)
                .flags(libc::MSG_NOSIGNAL as u32)
                .build()
                .user_data(conn_user_data(Op::Send, slot, conn.id.generation));
            self.push(entry);
        }
        let mut dirty = dirty;
        dirty.clear();
        if self.core.dirty.is_empty() {
            self.core.dirty = dirty;
        }
    }

    /// Moves closing connections along: flush, FIN, linger for EOF, release.
    fn progress_closing(&mut self) {
        let now = self.core.now_ms;
        let mut index = 0;
        while index < self.core.closing.len() {
            let slot = self.core.closing[index];
            let Some(conn) = self.core.slots[slot as usize].conn.as_mut() else {
                self.core.closing.swap_remove(index);
                continue;
            };
            let ConnState::Closing {
                fin_sent,
                deadline_ms,
                forced,
            } = &mut conn.state
            else {
                unreachable!("only closing connections are in the closing list");
            };
            if !*forced && now >= *deadline_ms {
                *forced = true;
            }
            let mut cancel_recv = false;
            let mut cancel_send = false;
            let mut arm_recv = false;
            if *forced {
                let dropped = conn.out.drop_queued();
                conn.out.sync_charge(self.memory);
                self.core.out_bytes_total -= dropped;
                if conn.recv_armed && !conn.recv_cancel_sent {
                    conn.recv_cancel_sent = true;
                    cancel_recv = true;
                }
                if conn.send_in_flight && !conn.send_cancel_sent {
                    conn.send_cancel_sent = true;
                    cancel_send = true;
                }
            } else {
                if !*fin_sent && !conn.send_in_flight && conn.out.is_empty() {
                    // SAFETY: shutdown on a socket we own.
                    unsafe { libc::shutdown(conn.fd, libc::SHUT_WR) };
                    *fin_sent = true;
                }
                // Read (and drop) until the client's EOF, so its unread bytes do not turn our
                // close into a reset that could destroy the frame we just sent.
                if !conn.recv_armed && !conn.eof {
                    arm_recv = true;
                }
            }
            let done = (*forced || (*fin_sent && conn.eof))
                && !conn.recv_armed
                && !conn.send_in_flight
                && !arm_recv;
            if cancel_recv {
                self.cancel(Op::Recv, slot);
            }
            if cancel_send {
                self.cancel(Op::Send, slot);
            }
            if arm_recv {
                self.arm_recv(slot);
            }
            if done {
                self.core.closing.swap_remove(index);
                self.release(slot);
                continue;
            }
            index += 1;
        }
    }

    fn release(&mut self, slot: u32) {
        let entry = &mut self.core.slots[slot as usize];
        let mut conn = entry.conn.take().expect("released slots hold a connection");
        debug_assert!(!conn.recv_armed && !conn.send_in_flight);
        conn.out.release_charge(self.memory);
        if conn.parked {
            // Keeps the parked list to live connections (the relay pauses every client
            // that sends DISCONNECT, and a shard that is never congested never empties it).
            self.core.parked.retain(|&parked| parked != slot);
        }
        entry.generation = entry.generation.wrapping_add(1);
        self.core.out_bytes_total -= conn.out.bytes();
        // SAFETY: the fd is ours and no operation on it is in flight.
        unsafe { libc::close(conn.fd) };
        self.core.free.push(slot);
        self.core.open_count -= 1;
        let reader = &mut self.readers[slot as usize];
        reader.reassembly.clear();
        reader.decoded = 0;
        if reader.reassembly.capacity() > REASSEMBLY_KEEP_BYTES_MAX {
            reader.reassembly = Vec::new();
        }
        self.recharge_reassembly(slot);
    }

    /// Brings the memory budget's charge for `slot`'s reassembly buffer to its capacity.
    fn recharge_reassembly(&mut self, slot: u32) {
        let reader = &mut self.readers[slot as usize];
        let now = reader.reassembly.capacity() as u64;
        if now > reader.charged {
            self.memory.charge(now - reader.charged);
        } else if now < reader.charged {
            self.memory.release(reader.charged - now);
        }
        reader.charged = now;
    }

    fn ring_doorbells(&mut self) {
        let me = self.core.shard as i32;
        let shared = self.shared.clone();
        let mut targets = Vec::new();
        self.core
            .peers
            .take_doorbells(&shared, |to| targets.push(to));
        for to in targets {
            let fd = shared[to].ring_fd.load(Ordering::SeqCst);
            debug_assert!(fd >= 0, "a sleeping shard has published its ring");
            let entry =
                opcode::MsgRingData::new(Fd(fd), me, user_data(Op::Doorbell, me as u32), None)
                    .build()
                    .flags(squeue::Flags::SKIP_SUCCESS)
                    .user_data(user_data(Op::DoorbellSent, to as u32));
            self.push(entry);
            shared[self.core.shard]
                .stats
                .doorbells_rung
                .fetch_add(1, Ordering::Relaxed);
        }
        let sent = std::mem::take(&mut self.core.peers.sent);
        if sent > 0 {
            shared[self.core.shard]
                .stats
                .peer_msgs_sent
                .fetch_add(sent, Ordering::Relaxed);
        }
    }

    /// Submits and waits for at least one completion or the next tick. When work is already
    /// waiting (a message to ourselves, an overflowing peer queue, input to resume) it only
    /// collects what is ready.
    fn wait(&mut self) -> Result<(), ServerError> {
        self.flush_backlog();
        let me = &self.shared[self.core.shard];
        let busy = !self.backlog.is_empty()
            || !self.core.handler_ops.is_empty()
            || self.core.peers.has_local()
            || self.core.peers.is_congested()
            || !self.core.resume.is_empty()
            || !self.core.over_budget.is_empty()
            || !self.core.closed.is_empty();
        let mut timeout_ms = if busy {
            0
        } else {
            self.next_tick_ms.saturating_sub(self.core.now_ms)
        };
        if self.drain_deadline_ms.is_some() || !self.core.closing.is_empty() {
            // Close and drain deadlines are checked per iteration; do not sleep past them
            // when the tick is long.
            timeout_ms = timeout_ms.min(DEADLINE_POLL_MS);
        }
        if timeout_ms > 0 {
            me.sleeping.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if self.peer_in.any_waiting()
                || (self.shutdown.is_triggered() && self.drain_deadline_ms.is_none())
            {
                me.sleeping.store(false, Ordering::SeqCst);
                timeout_ms = 0;
            }
        }
        let timespec = Timespec::from(Duration::from_millis(timeout_ms));
        let args = SubmitArgs::new().timespec(&timespec);
        let result = self.ring.submitter().submit_with_args(1, &args);
        me.sleeping.store(false, Ordering::SeqCst);
        match result {
            Ok(_) => Ok(()),
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN)
                ) =>
            {
                Ok(())
            }
            Err(source) => Err(ServerError::Enter {
                shard: self.core.shard,
                source,
            }),
        }
    }

    fn handle_completions(&mut self) {
        let mut batch = std::mem::take(&mut self.completions);
        loop {
            batch.clear();
            batch.extend(
                self.ring
                    .completion()
                    .map(|cqe| (cqe.user_data(), cqe.result(), cqe.flags())),
            );
            if batch.is_empty() {
                break;
            }
            for &(data, result, flags) in &batch {
                self.core.now_ms = self.start.elapsed().as_millis() as u64;
                let (op, index, generation) = decode_user_data(data);
                if matches!(op, Some(Op::Recv) | Some(Op::Send))
                    && !self.is_current(index, generation)
                {
                    // A slot is released only when nothing is in flight, so this does not
                    // happen; if it did, the bytes still have to be accounted to the ring.
                    debug_assert!(false, "completion for a released connection");
                    if let (Some(id), true) = (cqueue::buffer_select(flags), result > 0) {
                        // SAFETY: from this CQE, in order; the slice is dropped at once.
                        let _ = unsafe {
                            self.buf_ring
                                .take(id, result as usize, cqueue::buffer_more(flags))
                        };
                    } else if let Some(id) = cqueue::buffer_select(flags) {
                        self.buf_ring.recycle(id);
                    }
                    continue;
                }
                match op {
                    Some(Op::Accept) => self.on_accept(result, flags),
                    Some(Op::Recv) => self.on_recv(index, result, flags),
                    Some(Op::Send) => self.on_send(index, result),
                    Some(Op::Wake) => {
                        if self.drain_deadline_ms.is_none() {
                            self.arm_waker();
                        }
                    }
                    Some(Op::Handler) => {
                        let token = data & HANDLER_TOKEN_MAX;
                        self.handler
                            .on_completion(token, result, flags, &mut self.core.io());
                    }
                    Some(Op::Doorbell) | Some(Op::Cancel) => {}
                    Some(Op::DoorbellSent) => {
                        tracing::warn!(to = index, error = %std::io::Error::from_raw_os_error(-result), "doorbell (MSG_RING) failed");
                    }
                    None => debug_assert!(false, "unknown user_data {data:#x}"),
                }
                self.process_deferred();
            }
        }
        self.completions = batch;
    }

    fn is_current(&self, slot: u32, generation: u32) -> bool {
        self.core.slots.get(slot as usize).is_some_and(|entry| {
            entry.conn.is_some() && entry.generation & GENERATION_MASK == generation
        })
    }

    fn on_accept(&mut self, result: i32, flags: u32) {
        if !cqueue::more(flags) {
            self.accept_armed = false;
        }
        if result >= 0 {
            self.open_conn(result);
        } else if result != -libc::ECANCELED {
            let error = std::io::Error::from_raw_os_error(-result);
            tracing::warn!(shard = self.core.shard, %error, "accept failed");
        }
        if !self.accept_armed && self.drain_deadline_ms.is_none() {
            if result == -libc::EMFILE || result == -libc::ENFILE || result == -libc::ENOMEM {
                // Out of descriptors: retry on the next tick rather than spin.
                self.accept_retry = true;
            } else {
                self.arm_accept();
            }
        }
    }

    fn open_conn(&mut self, fd: RawFd) {
        if self.core.open_count >= self.connections_max || self.drain_deadline_ms.is_some() {
            let frame = b"ERROR\nmessage:connections_max reached\n\n\0\n";
            // SAFETY: a fresh socket we own; a best-effort non-blocking write, then close.
            unsafe {
                libc::send(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                );
                libc::close(fd);
            }
            tracing::warn!(
                shard = self.core.shard,
                max = self.connections_max,
                "connection refused: connections_max reached"
            );
            return;
        }
        let one: libc::c_int = 1;
        // SAFETY: setsockopt with a live int; small frames must not wait for Nagle.
        unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        let slot = match self.core.free.pop() {
            Some(slot) => slot,
            None => {
                self.core.slots.push(Slot {
                    generation: 0,
                    conn: None,
                });
                self.readers.push(Reader {
                    decoder: Decoder::new(self.limits),
                    reassembly: Vec::new(),
                    decoded: 0,
                    charged: 0,
                });
                (self.core.slots.len() - 1) as u32
            }
        };
        let now = self.core.now_ms;
        let entry = &mut self.core.slots[slot as usize];
        let id = ConnId {
            shard: self.core.shard as u16,
            slot,
            generation: entry.generation,
        };
        entry.conn = Some(Conn {
            fd,
            id,
            state: ConnState::Open,
            out: OutQueue::new(),
            version: Version::V1_2,
            heartbeat_send_every_ms: 0,
            heartbeat_read_timeout_ms: 0,
            last_read_ms: now,
            last_write_ms: now,
            recv_armed: false,
            recv_cancel_sent: false,
            send_in_flight: false,
            send_cancel_sent: false,
            paused: false,
            over_budget: false,
            decode_turn: 0,
            decoded_in_turn: 0,
            decoded_bytes_in_turn: 0,
            parked: false,
            writable_owed: false,
            flushed_owed: false,
            dirty: false,
            eof: false,
        });
        self.readers[slot as usize] = Reader {
            decoder: Decoder::new(self.limits),
            reassembly: std::mem::take(&mut self.readers[slot as usize].reassembly),
            decoded: 0,
            charged: self.readers[slot as usize].charged,
        };
        self.core.open_count += 1;
        self.shared[self.core.shard]
            .stats
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        self.arm_recv(slot);
        self.handler.on_open(id, &mut self.core.io());
    }

    fn on_recv(&mut self, slot: u32, result: i32, flags: u32) {
        let buffer = cqueue::buffer_select(flags);
        let now = self.core.now_ms;
        let input_paused = self.core.input_paused;
        let Some(conn) = self.core.slots[slot as usize].conn.as_mut() else {
            debug_assert!(false, "a receive completed on a released slot");
            if let Some(id) = buffer {
                self.buf_ring.recycle(id);
            }
            return;
        };
        if !cqueue::more(flags) {
            conn.recv_armed = false;
            conn.recv_cancel_sent = false;
        }
        if result > 0 {
            conn.last_read_ms = now;
            let (open, paused) = (conn.is_open(), conn.is_stopped() || input_paused);
            let id = buffer.expect("a receive with data names its buffer");
            // SAFETY: id and length come from this CQE, in CQE order; the bytes are used (or
            // copied) before the next `commit`.
            let bytes = unsafe {
                self.buf_ring
                    .take(id, result as usize, cqueue::buffer_more(flags))
            };
            if open {
                if paused {
                    self.park_input(slot, bytes);
                } else {
                    self.decode(slot, bytes);
                }
            }
        } else {
            if let Some(id) = buffer {
                self.buf_ring.recycle(id);
            }
            match -result {
                0 => {
                    conn.eof = true;
                    self.core.begin_close(slot, CloseReason::PeerClosed);
                }
                // The ring ran dry: re-armed after this batch's buffers are recycled.
                libc::ENOBUFS => {
                    self.shared[self.core.shard]
                        .stats
                        .recv_buffer_exhausted
                        .fetch_add(1, Ordering::Relaxed);
                }
                // We cancelled (input paused): re-armed on resume if still wanted.
                libc::ECANCELED => {}
                errno => {
                    conn.eof = true;
                    self.core.begin_close(slot, CloseReason::Io(errno));
                    self.core.force_close(slot);
                }
            }
        }
        self.keep_receiving(slot, true);
    }

    /// Lists an open connection whose input is stopped, so that resuming decodes what it holds
    /// and re-arms its receive.
    fn park(&mut self, slot: u32) {
        let Some(conn) = self.core.slots[slot as usize].conn.as_mut() else {
            return;
        };
        if conn.is_open() && !conn.parked {
            conn.parked = true;
            self.core.parked.push(slot);
        }
    }

    /// Keeps bytes that arrived while input is paused, and stops the receive so no more come.
    fn park_input(&mut self, slot: u32, bytes: &[u8]) {
        self.readers[slot as usize]
            .reassembly
            .extend_from_slice(bytes);
        self.recharge_reassembly(slot);
        let Some(conn) = self.core.conn_mut(slot) else {
            return;
        };
        let cancel = conn.recv_armed && !conn.recv_cancel_sent;
        if cancel {
            conn.recv_cancel_sent = true;
        }
        if !conn.parked {
            conn.parked = true;
            self.core.parked.push(slot);
        }
        if cancel {
            self.cancel(Op::Recv, slot);
        }
    }

    /// Decodes bytes fresh from the ring: in place when no partial frame is waiting, else
    /// behind it in the reassembly buffer. When the waiting frame's length is known (its head
    /// is whole and has a `content-length`), only the rest of that frame is copied behind it,
    /// and the frames after it are decoded in place: a stream of frames that straddle receives
    /// would otherwise be copied whole, receive after receive.
    fn decode(&mut self, slot: u32, bytes: &[u8]) {
        let reader = &mut self.readers[slot as usize];
        if !reader.reassembly.is_empty() {
            let held = reader.reassembly.len() - reader.decoded;
            let rest = match reader.decoder.frame_len() {
                Some(length) if length > held && length - held < bytes.len() => length - held,
                _ => bytes.len(),
            };
            reader.reassembly.extend_from_slice(&bytes[..rest]);
            self.decode_reassembly(slot);
            if rest == bytes.len() {
                return;
            }
            let reader = &mut self.readers[slot as usize];
            if !reader.reassembly.is_empty() {
                // The frame is still waiting (input stopped, or the turn's frame budget is
                // spent): what follows it waits behind it.
                reader.reassembly.extend_from_slice(&bytes[rest..]);
                self.recharge_reassembly(slot);
                self.park_if_stopped(slot);
                return;
            }
            return self.decode_in_place(slot, &bytes[rest..]);
        }
        self.decode_in_place(slot, bytes);
    }

    /// Decodes `bytes` where they lie, no partial frame waiting; keeps an unfinished last
    /// frame (or everything, if input stopped) in the reassembly buffer.
    fn decode_in_place(&mut self, slot: u32, bytes: &[u8]) {
        let reader = &mut self.readers[slot as usize];
        debug_assert!(reader.reassembly.is_empty());
        let consumed = dispatch_frames(
            &mut reader.decoder,
            bytes,
            &mut self.handler,
            &mut self.core,
            slot,
        );
        if consumed < bytes.len() && self.core.conn(slot).is_some_and(Conn::is_open) {
            // A frame continues in the next receive (or input was paused): keep its start.
            reader.reassembly.extend_from_slice(&bytes[consumed..]);
            self.recharge_reassembly(slot);
            self.park_if_stopped(slot);
        }
    }

    /// Input stopped (paused by the handler or the shard) with whole frames possibly waiting
    /// in the reassembly buffer: list the connection so they are decoded on resume even if
    /// the client sends nothing more.
    fn park_if_stopped(&mut self, slot: u32) {
        let stopped = self
            .core
            .conn(slot)
            .is_some_and(|conn| conn.is_stopped() || self.core.input_paused);
        if stopped {
            self.park(slot);
        }
    }

    fn decode_reassembly(&mut self, slot: u32) {
        let Reader {
            decoder,
            reassembly,
            decoded,
            ..
        } = &mut self.readers[slot as usize];
        if reassembly.is_empty() {
            return;
        }
        let consumed = dispatch_frames(
            decoder,
            &reassembly[*decoded..],
            &mut self.handler,
            &mut self.core,
            slot,
        );
        *decoded += consumed;
        if *decoded == reassembly.len() || !self.core.conn(slot).is_some_and(Conn::is_open) {
            reassembly.clear();
            *decoded = 0;
        } else if *decoded >= reassembly.len() - *decoded {
            reassembly.drain(..*decoded);
            *decoded = 0;
        }
        if reassembly.is_empty() && reassembly.capacity() > REASSEMBLY_KEEP_BYTES_MAX {
            *reassembly = Vec::new();
        }
        let waiting = !reassembly.is_empty();
        self.recharge_reassembly(slot);
        if waiting {
            self.park_if_stopped(slot);
        }
    }

    fn on_send(&mut self, slot: u32, result: i32) {
        let low_water = self.core.out_buffer_bytes_max / 2;
        let memory = self.memory;
        let Some(conn) = self.core.conn_mut(slot) else {
            debug_assert!(false, "a send completed on a released slot");
            return;
        };
        conn.send_in_flight = false;
        conn.send_cancel_sent = false;
        if result >= 0 {
            conn.out.complete(result as usize);
            conn.out.sync_charge(memory);
            self.core.out_bytes_total -= result as usize;
            let conn = self.core.conn_mut(slot).expect("still there");
            let more = !conn.out.is_empty();
            let owed = conn.writable_owed && conn.is_open() && conn.out.bytes() <= low_water;
            if owed {
                conn.writable_owed = false;
            }
            let flushed = !more && conn.flushed_owed && conn.is_open();
            if flushed {
                conn.flushed_owed = false;
            }
            let id = conn.id;
            if more && !conn.dirty {
                conn.dirty = true;
                self.core.dirty.push(slot);
            }
            if flushed {
                self.core.flushed.push_back(id);
            }
            if owed {
                self.core.writable.push_back(id);
            }
        } else {
            let dropped = conn.out.clear();
            conn.out.sync_charge(memory);
            self.core.out_bytes_total -= dropped;
            let errno = -result;
            if errno != libc::ECANCELED {
                tracing::debug!(slot, error = %std::io::Error::from_raw_os_error(errno), "send failed");
                self.core.begin_close(slot, CloseReason::Io(errno));
                self.core.force_close(slot);
            }
        }
    }

    fn rearm_receives(&mut self) {
        let rearm = std::mem::take(&mut self.rearm);
        for &slot in &rearm {
            self.keep_receiving(slot, false);
        }
        self.rearm = rearm;
        self.rearm.clear();
    }

    fn publish_counters(&mut self) {
        let stats = &self.shared[self.core.shard].stats;
        stats
            .connections_open
            .store(self.core.open_count as u64, Ordering::Relaxed);
        stats
            .out_bytes
            .store(self.core.out_bytes_total as u64, Ordering::Relaxed);
        stats
            .frames_in
            .store(self.core.frames_in, Ordering::Relaxed);
        stats
            .input_pauses
            .store(self.core.input_pauses, Ordering::Relaxed);
    }

    /// Closes what is left. If the kernel may still write into receive buffers (the drain
    /// deadline cut connections whose operations had not finished), those buffers are leaked
    /// rather than unmapped.
    fn finish(mut self) {
        let busy = self
            .core
            .slots
            .iter()
            .filter_map(|slot| slot.conn.as_ref())
            .any(|conn| conn.recv_armed || conn.send_in_flight);
        let memory = self.memory;
        for conn in self
            .core
            .slots
            .iter_mut()
            .filter_map(|slot| slot.conn.as_mut())
        {
            // SAFETY: our fds; the ring is about to go, cancelling what remains.
            unsafe { libc::close(conn.fd) };
            conn.out.release_charge(memory);
        }
        // The budget outlives the server (an embedder may run another on it): give back what
        // this shard's buffers were charged.
        for reader in &mut self.readers {
            memory.release(reader.charged);
            reader.charged = 0;
        }
        let Shard { ring, buf_ring, .. } = self;
        drop(ring);
        if busy {
            tracing::warn!("shard stopped with receives in flight; leaking its receive buffers");
            std::mem::forget(buf_ring);
        }
    }
}

/// Decodes frames from `bytes` and hands them to the handler until the input ends inside a
/// frame, the connection stops being open, or its input is paused. Returns how many bytes were
/// consumed; on a decode error, all of them (the connection is closing).
fn dispatch_frames<H: ShardHandler>(
    decoder: &mut Decoder,
    bytes: &[u8],
    handler: &mut H,
    core: &mut IoCore<H::PeerMsg>,
    slot: u32,
) -> usize {
    let mut position = 0;
    let turn = core.turn;
    while position < bytes.len() {
        let input_paused = core.input_paused;
        let Some(conn) = core.conn_mut(slot) else {
            break;
        };
        if !conn.is_open() || conn.is_stopped() || input_paused {
            break;
        }
        if conn.decode_turn != turn {
            conn.decode_turn = turn;
            conn.decoded_in_turn = 0;
            conn.decoded_bytes_in_turn = 0;
        }
        if conn.decoded_in_turn >= FRAMES_PER_TURN_MAX
            || conn.decoded_bytes_in_turn >= BYTES_PER_TURN_MAX
        {
            conn.over_budget = true;
            core.over_budget.push(slot);
            break;
        }
        conn.decoded_in_turn += 1;
        if decoder.version() != conn.version {
            decoder.set_version(conn.version);
        }
        let id = conn.id;
        match decoder.decode(&bytes[position..]) {
            Ok(Decoded::Frame { frame, consumed }) => {
                position += consumed;
                if let Some(conn) = core.conn_mut(slot) {
                    conn.decoded_bytes_in_turn += consumed;
                }
                core.frames_in += 1;
                handler.on_frame(id, &frame, &mut ShardIo { core: &mut *core });
            }
            Ok(Decoded::Heartbeat { consumed }) => {
                position += consumed;
                handler.on_heartbeat_in(id, &mut ShardIo { core: &mut *core });
            }
            Ok(Decoded::NeedMore) => break,
            Err(error) => {
                core.protocol_error(slot, error);
                return bytes.len();
            }
        }
    }
    position
}
