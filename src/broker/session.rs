//! One client connection's protocol state: version, login, heart-beats, subscriptions by id,
//! transactions and receipts. A session lives on the shard that accepted its connection and
//! reaches destinations only through [`ShardMessage`]s.
//!
//! States: `AwaitingConnect` (only CONNECT or STOMP is legal) → (`AwaitingLogin` while the
//! server checks an offloaded login) → `Connected` (or `Refusing` until a refused login's
//! delayed ERROR) → either
//! `Disconnecting` (DISCONNECT with a receipt that still waits for earlier receipts) → `Closed`,
//! or straight to `Closed` (DISCONNECT without receipt, or any error, which the shard turns into
//! an ERROR frame and a close).
//!
//! Invariants:
//! - a subscription's `unacked` holds, in delivery (tag) order, exactly the messages written to
//!   the client under a client ack mode and not yet acknowledged or taken into a transaction;
//! - an ACK or NACK inside a transaction takes its messages out of `unacked` until COMMIT
//!   (sent to the destination) or ABORT (put back), so they cannot be acknowledged twice;
//! - RECEIPTs go out in the order their frames arrived; `receipts` is sorted by ticket;
//! - a MESSAGE is written only while `out_bytes_estimate`, which is never less than what the
//!   server's out buffer holds, is under `out_buffer_bytes_max`; deliveries that arrive
//!   otherwise wait in `deferred`, in arrival order, and are written as the buffer drains
//!   (`flushed`, `set_writable`); while any wait, queues are told to hand this connection
//!   nothing more (`update_flow`). So deliveries never take a connection's out buffer past
//!   the limit plus one frame, whatever arrives from other shards: what waits here is bounded
//!   by `queue_waiting_bytes_max` for queues, all subscriptions together (past it a delivery
//!   goes back unwritten), and each subscription's slack for topics (enforced here too), not
//!   by the buffer. The server resets the estimate to what the buffer holds after every batch of
//!   writes (`set_out_bytes`), so deliveries wait here only while the estimate is at the
//!   limit, and then the server reports the buffer full (`set_writable(false)`) and every
//!   subscription, topics included, is paused;
//! - a client-ack delivery is in `unacked` only once written; one that was never written (it
//!   waited in `deferred`, or lay past what the server had handed to the kernel when the
//!   connection was lost) is reported [`ShardMessage::Unsent`] when its subscription ends, so
//!   it does not count toward dead-lettering.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use smallvec::SmallVec;

use super::config::Authenticator;
use super::ctx::Ctx;
use super::effects::{Effect, HeartbeatPlan, ShardMessage};
use super::error::ProtocolError;
use super::types::{
    shard_of, AckMode, ConnectionId, ConsumerKey, DestinationKind, Message, MessageId,
    MONITOR_DESTINATION,
};
use crate::codec::{format_u64, Command, Frame, FrameWriter, Version};

/// Topic deliveries one subscription may have waiting in the session: its slack twice. The
/// topic counts against `topic_slack_bytes` only what it sends after it heard that the
/// subscriber is full; what was already on its way then (peer queues and overflow lists
/// between the cores, a few thousand messages) arrives too, and gets as much again, so a
/// subscriber that catches up within `topic_subscriber_stall_ms` loses nothing.
fn topic_waiting_bytes_max(ctx: &Ctx<'_>) -> u64 {
    ctx.config.topic_slack_bytes.saturating_mul(2)
}

/// Most estimated frame bytes of queue deliveries a connection holds waiting for its out buffer,
/// all its subscriptions together: the out buffer's worth plus one default byte window, so
/// one subscription's whole window fits while the buffer drains. Past it (an empty list still
/// takes one message, however large) deliveries go back to their queues unwritten; without it
/// a connection could hold one window per subscription (1,024 × 4 MiB).
fn queue_waiting_bytes_max(ctx: &Ctx<'_>) -> u64 {
    ctx.config.out_buffer_bytes_max + ctx.config.prefetch_default_bytes
}

/// Written after the NUL of every frame the broker sends. STOMP allows EOLs there (1.2
/// "Augmented BNF": `NULL *( EOL )`), ActiveMQ and stompserver always write one, and stream
/// parsers written against them wait for it: stomper's `StompBuffer` finds a frame's end by
/// `\0\n` and would hold a frame ending in a bare NUL until the next bytes came.
pub(crate) const FRAME_TRAILER: &[u8] = b"\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    AwaitingConnect,
    /// CONNECT was valid; the server is checking the login ([`Effect::Authenticate`]).
    AwaitingLogin,
    /// The login was refused; the ERROR waits for `login_failure_delay_ms` (the shard's
    /// refusal timer). Frames that still come are dropped.
    Refusing,
    Connected,
    /// DISCONNECT arrived; its RECEIPT waits for earlier ones, then the connection closes.
    Disconnecting,
    Closed,
}

/// A delivered message the client must still acknowledge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pending {
    /// Per-session delivery number; the `ack` header carries it.
    tag: u64,
    id: MessageId,
    /// Offset of its MESSAGE frame in the connection's output (`Session::written_bytes` when
    /// it was written): it reached the socket if the server handed the kernel more than this.
    at: u64,
}

/// A delivery that arrived while the connection's out buffer was full, waiting to be written.
#[derive(Debug)]
struct Deferred {
    number: u64,
    message: Arc<Message>,
    deliveries: u32,
    settled: bool,
    /// The queue's arrival number for it (`ShardMessage::Deliver::order`).
    order: u64,
}

#[derive(Debug)]
struct Subscription {
    /// The client's `id` header.
    id: Box<[u8]>,
    destination: Arc<[u8]>,
    ack: AckMode,
    /// `/queue/monitor`: fed by the shard's statistics timer, not by a destination.
    monitor: bool,
    unacked: VecDeque<Pending>,
    /// Auto acks: deliveries written and not yet credited back to the destination (it does so
    /// once the server reports the connection's output flushed).
    uncredited: u32,
    /// Their estimated frame bytes, credited back with them (the queue's byte window).
    uncredited_bytes: u64,
    /// The destination is a queue (not a topic): see `Session::update_flow`.
    queue: bool,
    /// Estimated frame bytes of this subscription's deliveries waiting in `deferred`. A
    /// topic subscription's are capped at `topic_slack_bytes` (see `Session::deliver`).
    waiting_bytes: u64,
    /// What the destination was last told: hand this subscription nothing for now.
    flow_paused: bool,
    /// Client-ack deliveries taken in (see [`ShardMessage::Unsubscribe`]).
    received: u64,
}

#[derive(Debug)]
enum TxOp {
    Send(Arc<Message>),
    Ack {
        subscription: u64,
        taken: Vec<Pending>,
    },
    Nack {
        subscription: u64,
        taken: Vec<Pending>,
        requeue: bool,
    },
}

/// What an ACK or NACK does to the messages it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Consumed,
    /// `requeue: false` (RabbitMQ's NACK header) sends them straight to the dead-letter queue.
    Rejected {
        requeue: bool,
    },
}

#[derive(Debug, Default)]
struct Transaction {
    ops: Vec<TxOp>,
    bytes: usize,
}

#[derive(Debug)]
struct PendingReceipt {
    ticket: u64,
    /// Confirmations still to come before this receipt may go.
    awaiting: u32,
    receipt_id: Box<[u8]>,
    /// The DISCONNECT's receipt: close once it is written.
    close_after: bool,
}

#[derive(Debug)]
pub(crate) struct Session {
    conn: ConnectionId,
    state: State,
    /// When the connection was accepted: the connect timeout counts from here.
    opened_ms: u64,
    /// In `Refusing`: when the delayed ERROR is due (the key of the shard's refusal timer).
    refusal_due_ms: u64,
    version: Version,
    heartbeat: HeartbeatPlan,
    last_read_ms: u64,
    last_write_ms: u64,
    writable: bool,
    /// By the session's subscription number (the `subscription` of [`ConsumerKey`]).
    subscriptions: BTreeMap<u64, Subscription>,
    next_subscription: u64,
    next_tag: u64,
    transactions: BTreeMap<Box<[u8]>, Transaction>,
    receipts: VecDeque<PendingReceipt>,
    next_ticket: u64,
    /// The destination of the last SEND, shared with its messages.
    last_destination: Option<Arc<[u8]>>,
    /// Destinations that currently ask this connection to stop publishing
    /// ([`ShardMessage::Throttle`]); its input is paused while this is not zero.
    throttles: u32,
    /// An [`Effect::Throttle`] pause is in force.
    input_paused: bool,
    /// What the out buffer held when the server last said (`flushed`, `set_out_bytes`) plus
    /// what was written since: never less than what the buffer holds. MESSAGEs are written
    /// only while this is under `out_buffer_bytes_max`.
    out_bytes_estimate: u64,
    /// Deliveries waiting for room in the out buffer, in arrival order.
    deferred: VecDeque<Deferred>,
    /// Estimated frame bytes of the queue deliveries in `deferred`, all subscriptions
    /// together: capped at [`queue_waiting_bytes_max`].
    queue_waiting_bytes: u64,
    /// Every byte written to the connection so far: where the next frame starts.
    written_bytes: u64,
    /// How much of the output the server handed to the kernel, when it says (the connection
    /// was lost: the rest was dropped); `u64::MAX` otherwise, as everything written goes out.
    handed_bytes: u64,
    /// This connection published past the memory budget's pause level and waits for the
    /// budget to drain ([`Session::memory_release`], called by the shard's tick).
    memory_paused: bool,
    /// Shards whose logs ask this connection to stop publishing ([`ShardMessage::DiskThrottle`]):
    /// paused while not zero, like `memory_paused` (not while a transaction is open).
    disk_throttles: u32,
}

impl Session {
    pub(crate) fn new(conn: ConnectionId, now_ms: u64) -> Session {
        Session {
            conn,
            state: State::AwaitingConnect,
            opened_ms: now_ms,
            refusal_due_ms: 0,
            version: Version::V1_0,
            heartbeat: HeartbeatPlan::default(),
            last_read_ms: now_ms,
            last_write_ms: now_ms,
            writable: true,
            subscriptions: BTreeMap::new(),
            next_subscription: 0,
            next_tag: 0,
            transactions: BTreeMap::new(),
            receipts: VecDeque::new(),
            next_ticket: 0,
            last_destination: None,
            throttles: 0,
            input_paused: false,
            out_bytes_estimate: 0,
            deferred: VecDeque::new(),
            queue_waiting_bytes: 0,
            written_bytes: 0,
            handed_bytes: u64::MAX,
            memory_paused: false,
            disk_throttles: 0,
        }
    }

    /// The server handed the kernel the first `bytes` of this connection's output and dropped
    /// the rest (the connection was lost): deliveries past it never reached the client.
    pub(crate) fn set_handed_bytes(&mut self, bytes: u64) {
        self.handed_bytes = bytes;
    }

    pub(crate) fn version(&self) -> Version {
        self.version
    }

    pub(crate) fn heartbeat(&self) -> HeartbeatPlan {
        self.heartbeat
    }

    pub(crate) fn opened_ms(&self) -> u64 {
        self.opened_ms
    }

    /// No complete CONNECT yet: the connect timeout applies.
    pub(crate) fn awaits_connect(&self) -> bool {
        self.state == State::AwaitingConnect
    }

    /// When a refused login's ERROR is due, if this session is waiting for it.
    pub(crate) fn refusal_due_ms(&self) -> Option<u64> {
        (self.state == State::Refusing).then_some(self.refusal_due_ms)
    }

    /// The login was refused; the shard sends the ERROR at `due_ms`. Only from the login
    /// states.
    pub(crate) fn refuse_later(&mut self, due_ms: u64) {
        debug_assert!(matches!(
            self.state,
            State::AwaitingConnect | State::AwaitingLogin
        ));
        self.state = State::Refusing;
        self.refusal_due_ms = due_ms;
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    pub(crate) fn has_monitor(&self) -> bool {
        self.subscriptions.values().any(|s| s.monitor)
    }

    /// Producer flow control: a destination asks this connection to stop publishing, or lets
    /// it go again (each destination releases once what it paused).
    pub(crate) fn throttle(&mut self, ctx: &mut Ctx<'_>, paused: bool) {
        if paused {
            self.throttles += 1;
        } else {
            debug_assert!(self.throttles > 0, "a release without a pause");
            self.throttles = self.throttles.saturating_sub(1);
        }
        self.update_input(ctx);
    }

    /// Producer flow control for disk: a shard's log asks this connection to stop publishing,
    /// or lets it go again (each shard releases once what it paused).
    pub(crate) fn disk_throttle(&mut self, ctx: &mut Ctx<'_>, paused: bool) {
        if paused {
            self.disk_throttles += 1;
        } else {
            debug_assert!(self.disk_throttles > 0, "a release without a pause");
            self.disk_throttles = self.disk_throttles.saturating_sub(1);
        }
        self.update_input(ctx);
    }

    /// Whether this connection waits for the memory budget to drain.
    pub(crate) fn is_memory_paused(&self) -> bool {
        self.memory_paused
    }

    /// The memory budget is back under its resume level: reading may go on (unless a
    /// destination still throttles this connection).
    pub(crate) fn memory_release(&mut self, ctx: &mut Ctx<'_>) {
        if self.memory_paused {
            self.memory_paused = false;
            self.update_input(ctx);
        }
    }

    /// Pauses or resumes reading the connection as the throttles say, except for a connection
    /// that consumes with client acks: the ACKs it sends may be what drains the destination
    /// that throttles it (its own queue, say), so pausing it could stop both for good (the
    /// deadlock ActiveMQ documents for producer flow control). It stays bounded by the queue's
    /// hard limit instead. For the memory budget the same holds of a connection with an open
    /// transaction: its COMMIT or ABORT is what frees the memory it holds, so it is never paused
    /// for memory (its transactional SENDs are refused at the pause level instead), nor for
    /// disk (pausing it would keep that memory held until the log drains; its SENDs are
    /// refused past the disk budget instead).
    fn update_input(&mut self, ctx: &mut Ctx<'_>) {
        let budgets = self.memory_paused || self.disk_throttles > 0;
        let held = self.throttles > 0 || (budgets && self.transactions.is_empty());
        let pause = held
            && self.state == State::Connected
            && self.subscriptions.values().all(|s| s.ack == AckMode::Auto);
        if pause == self.input_paused {
            return;
        }
        self.input_paused = pause;
        if !pause {
            // Its silence while unread says nothing: the heart-beat clock starts again.
            self.last_read_ms = self.last_read_ms.max(ctx.now_ms);
        }
        ctx.effects.list.push(Effect::Throttle {
            conn: self.conn,
            paused: pause,
        });
    }

    /// Any bytes from the client, heart-beat EOLs included, show it is alive.
    pub(crate) fn note_input(&mut self, now_ms: u64) {
        self.last_read_ms = self.last_read_ms.max(now_ms);
    }

    fn write(
        &mut self,
        ctx: &mut Ctx<'_>,
        build: impl FnOnce(&mut Vec<u8>),
        body: Option<Arc<Message>>,
    ) {
        let start = ctx.effects.bytes.len();
        build(&mut ctx.effects.bytes);
        self.push_write(ctx, start, body);
    }

    /// Records the bytes appended since `start` as a write to this connection.
    fn push_write(&mut self, ctx: &mut Ctx<'_>, start: usize, body: Option<Arc<Message>>) {
        let end = ctx.effects.bytes.len();
        // Exactly what the server queues for this write (see `Effect::Write`).
        let written = (end - start) as u64 + body.as_ref().map_or(0, |m| m.body.len() as u64 + 1);
        self.written_bytes += written;
        self.out_bytes_estimate += written;
        ctx.effects.list.push(Effect::Write {
            conn: self.conn,
            bytes: start..end,
            body,
        });
        self.last_write_ms = self.last_write_ms.max(ctx.now_ms);
    }

    pub(crate) fn handle_frame(
        &mut self,
        ctx: &mut Ctx<'_>,
        frame: &Frame<'_>,
        authenticator: &dyn Authenticator,
    ) -> Result<(), ProtocolError> {
        let command = frame.command;
        if matches!(
            command,
            Command::Connected | Command::Message | Command::Receipt | Command::Error
        ) {
            return Err(ProtocolError::ServerFrame(command));
        }
        match self.state {
            State::AwaitingConnect => {
                if !matches!(command, Command::Connect | Command::Stomp) {
                    return Err(ProtocolError::NotConnected(command));
                }
            }
            State::AwaitingLogin => return Err(ProtocolError::LoginPending(command)),
            // The verdict is given; the ERROR is only waiting for its delay.
            State::Refusing => return Ok(()),
            State::Connected => {
                if matches!(command, Command::Connect | Command::Stomp) {
                    return Err(ProtocolError::AlreadyConnected);
                }
            }
            // STOMP 1.2 "DISCONNECT": clients MUST NOT send more frames; whatever still comes is
            // dropped rather than answered on a connection that is going away.
            State::Disconnecting | State::Closed => return Ok(()),
        }
        // STOMP 1.2 "Body": only SEND, MESSAGE and ERROR have one. A body on any other frame
        // (often one stray EOL after the blank line) is ignored, as RabbitMQ and ActiveMQ do,
        // instead of closing the connection over it.
        let receipt = frame.header(b"receipt");
        match command {
            Command::Connect | Command::Stomp => return self.connect(ctx, frame, authenticator),
            Command::Send => return self.send(ctx, frame),
            // Its receipt waits for the destination (see `ShardMessage::Subscribe::ticket`).
            Command::Subscribe => return self.subscribe(ctx, frame),
            Command::Unsubscribe => self.unsubscribe(ctx, frame)?,
            Command::Ack | Command::Nack => self.acknowledge(ctx, frame)?,
            Command::Begin => self.begin(ctx, frame)?,
            Command::Commit => return self.commit(ctx, frame),
            Command::Abort => {
                self.abort(frame)?;
                // The last open transaction ended: a pause for memory or disk it deferred
                // takes effect now.
                self.update_input(ctx);
            }
            Command::Disconnect => {
                self.end(ctx);
                match receipt {
                    Some(receipt) => {
                        self.state = State::Disconnecting;
                        self.push_receipt(ctx, receipt, 0, true)?;
                    }
                    None => self.state = State::Closed,
                }
                return Ok(());
            }
            Command::Connected | Command::Message | Command::Receipt | Command::Error => {
                unreachable!("server frames were refused above")
            }
        }
        if let Some(receipt) = receipt {
            self.push_receipt(ctx, receipt, 0, false)?;
        }
        Ok(())
    }

    // --- CONNECT (STOMP 1.2 "Connecting") ---

    fn connect(
        &mut self,
        ctx: &mut Ctx<'_>,
        frame: &Frame<'_>,
        authenticator: &dyn Authenticator,
    ) -> Result<(), ProtocolError> {
        let version =
            negotiate(frame.header(b"accept-version")).ok_or(ProtocolError::NoCommonVersion)?;
        // STOMP 1.0 has no heart-beating.
        let (client_send, client_wants) = match (version, frame.header(b"heart-beat")) {
            (Version::V1_0, _) | (_, None) => (0, 0),
            (_, Some(value)) => parse_heartbeat(value)?,
        };
        let config = ctx.config;
        // STOMP 1.2 "Heart-beating": each direction runs at the larger of what one side can do
        // and what the other wants, and not at all when either says 0. We reply with the
        // resulting intervals, so the client's computation lands on the same numbers.
        let send_every_ms = if client_wants == 0 {
            0
        } else {
            client_wants.max(config.heartbeat_send_ms_min)
        };
        let expect_every_ms = if client_send == 0 || config.heartbeat_receive_ms == 0 {
            0
        } else {
            client_send.max(config.heartbeat_receive_ms)
        };
        self.heartbeat = HeartbeatPlan {
            send_every_ms,
            expect_every_ms,
            read_timeout_ms: expect_every_ms.saturating_mul(config.heartbeat_read_grace_percent)
                / 100,
        };
        self.version = version;
        let login = frame.header(b"login").unwrap_or_default();
        let passcode = frame.header(b"passcode").unwrap_or_default();
        if config.login_offloaded {
            self.state = State::AwaitingLogin;
            ctx.effects.list.push(Effect::Authenticate {
                conn: self.conn,
                login: login.into(),
                passcode: passcode.into(),
            });
            return Ok(());
        }
        if !authenticator.authenticate(login, passcode) {
            return Err(ProtocolError::LoginFailed);
        }
        self.finish_connect(ctx);
        Ok(())
    }

    /// The verdict on an offloaded login ([`Effect::Authenticate`]).
    pub(crate) fn login_result(
        &mut self,
        ctx: &mut Ctx<'_>,
        accepted: bool,
    ) -> Result<(), ProtocolError> {
        if self.state != State::AwaitingLogin {
            return Ok(());
        }
        if !accepted {
            return Err(ProtocolError::LoginFailed);
        }
        self.finish_connect(ctx);
        Ok(())
    }

    fn finish_connect(&mut self, ctx: &mut Ctx<'_>) {
        let version = self.version;
        let HeartbeatPlan {
            send_every_ms,
            expect_every_ms,
            ..
        } = self.heartbeat;
        self.state = State::Connected;
        let conn = self.conn;
        let server = ctx.config.server_name.clone();
        self.write(
            ctx,
            |out| {
                let mut writer = FrameWriter::begin(out, version, Command::Connected);
                if version != Version::V1_0 {
                    writer.header(b"version", version.as_str().as_bytes());
                    let mut beat = Vec::with_capacity(24);
                    beat.extend_from_slice(format!("{send_every_ms},{expect_every_ms}").as_bytes());
                    writer.header(b"heart-beat", &beat);
                }
                writer.header(b"session", conn.to_string().as_bytes());
                writer.header(b"server", server.as_bytes());
                writer.finish(b"");
                out.extend_from_slice(FRAME_TRAILER);
            },
            None,
        );
        ctx.effects.list.push(Effect::Connected {
            conn,
            version,
            heartbeat: self.heartbeat,
        });
    }

    // --- SEND ---

    fn send(&mut self, ctx: &mut Ctx<'_>, frame: &Frame<'_>) -> Result<(), ProtocolError> {
        let destination = required(frame, Command::Send, "destination")?;
        if destination == MONITOR_DESTINATION {
            return Err(ProtocolError::MonitorReadOnly);
        }
        let expires_ms = match frame.header(b"expires") {
            None => 0,
            Some(text) => parse_u64(text).ok_or(ProtocolError::InvalidHeader {
                header: "expires",
                detail: "expected milliseconds since the Unix epoch",
            })?,
        };
        let persistent = match frame.header(b"persistent") {
            None => ctx.config.persistent_by_default,
            // Any case: stomp.py writes a Python bool as `True`/`False`, and ActiveMQ takes
            // those without complaint (found by the stomp.py interop tests).
            Some(value) if value.eq_ignore_ascii_case(b"true") => true,
            Some(value) if value.eq_ignore_ascii_case(b"false") => false,
            Some(_) => {
                return Err(ProtocolError::InvalidHeader {
                    header: "persistent",
                    detail: "expected true or false",
                })
            }
        };
        let transaction = frame.header(b"transaction");
        if let Some(name) = transaction {
            let tx = self
                .transactions
                .get(name)
                .ok_or(ProtocolError::UnknownTransaction)?;
            let buffered = self.transactions.values().map(|t| t.bytes).sum();
            check_transaction_room(ctx, tx, buffered, frame.body.len())?;
        }
        let id = ctx.next_message_id();
        let headers = frame
            .headers
            .iter()
            .map(|h| (h.name.as_ref(), h.value.as_ref()));
        let destination_name = self.intern_destination(destination);
        let mut message = Message::from_send(
            id,
            destination_name,
            headers,
            frame.body,
            expires_ms,
            persistent,
        );
        let memory = ctx.config.memory;
        message.charge_to(memory);
        let charged = memory.charged();
        if memory.is_limited() {
            // What cannot wait is refused: a transactional SEND at the pause level (pausing
            // it would hold its transaction's memory until the budget drains, which it may
            // be what prevents), anything past the budget itself. Dropping the message gives
            // its charge back.
            let refuse_at = if transaction.is_some() {
                memory.pause_bytes()
            } else {
                memory.max()
            };
            if charged > refuse_at {
                return Err(ProtocolError::LimitExceeded {
                    limit: "memory_bytes_max",
                    max: memory.max(),
                });
            }
            if transaction.is_none() && charged > memory.pause_bytes() {
                // Taken, and the connection is read no further until the budget drains.
                self.memory_paused = true;
                self.update_input(ctx);
            }
        }
        let message = Arc::new(message);
        let receipt = frame.header(b"receipt");
        if let Some(name) = transaction {
            let tx = self
                .transactions
                .get_mut(name)
                .ok_or(ProtocolError::UnknownTransaction)?;
            tx.bytes += message.body.len();
            tx.ops.push(TxOp::Send(message));
            if let Some(receipt) = receipt {
                self.push_receipt(ctx, receipt, 0, false)?;
            }
            return Ok(());
        }
        let ticket = match receipt {
            Some(receipt) => Some(self.push_receipt(ctx, receipt, 1, false)?),
            None => None,
        };
        let to = shard_of(destination, ctx.shard_count);
        ctx.route(
            to,
            ShardMessage::Publish {
                message,
                origin: self.conn,
                ticket,
            },
        );
        Ok(())
    }

    /// The shared name of `destination`: producers mostly send to one destination over and
    /// over, so the last name is kept and reused instead of allocated per SEND.
    fn intern_destination(&mut self, destination: &[u8]) -> Arc<[u8]> {
        match &self.last_destination {
            Some(last) if **last == *destination => last.clone(),
            _ => {
                let name: Arc<[u8]> = Arc::from(destination);
                self.last_destination = Some(name.clone());
                name
            }
        }
    }

    // --- SUBSCRIBE / UNSUBSCRIBE ---

    fn subscribe(&mut self, ctx: &mut Ctx<'_>, frame: &Frame<'_>) -> Result<(), ProtocolError> {
        let destination = required(frame, Command::Subscribe, "destination")?;
        // STOMP 1.0 has no `id`; the destination names the subscription, as ActiveMQ does.
        let id = match (frame.header(b"id"), self.version) {
            (Some(id), _) => id,
            (None, Version::V1_0) => destination,
            (None, _) => {
                return Err(ProtocolError::MissingHeader {
                    command: Command::Subscribe,
                    header: "id",
                })
            }
        };
        if self.subscriptions.values().any(|s| &*s.id == id) {
            return Err(ProtocolError::DuplicateSubscription);
        }
        if self.subscriptions.len() >= ctx.config.subscriptions_per_connection_max {
            return Err(ProtocolError::LimitExceeded {
                limit: "subscriptions_per_connection_max",
                max: ctx.config.subscriptions_per_connection_max as u64,
            });
        }
        let ack = match frame.header(b"ack") {
            None => AckMode::Auto,
            Some(text) => AckMode::parse(text).ok_or(ProtocolError::InvalidHeader {
                header: "ack",
                detail: "expected auto, client or client-individual",
            })?,
        };
        let prefetch = match frame
            .header(b"activemq.prefetchSize")
            .or(frame.header(b"prefetch-count"))
        {
            None => ctx.config.prefetch_default_messages,
            Some(text) => match parse_u64(text) {
                Some(count) if count > 0 => {
                    count.min(u64::from(ctx.config.prefetch_messages_max)) as u32
                }
                _ => {
                    return Err(ProtocolError::InvalidHeader {
                        header: "prefetch",
                        detail: "expected a message count of at least 1",
                    })
                }
            },
        };
        let number = self.next_subscription;
        self.next_subscription += 1;
        let destination: Arc<[u8]> = Arc::from(destination);
        let monitor = &*destination == MONITOR_DESTINATION;
        let queue = DestinationKind::of(&destination) == DestinationKind::Queue;
        let flow_paused = !self.writable || (queue && !self.deferred.is_empty());
        if !monitor {
            let consumer = ConsumerKey {
                conn: self.conn,
                subscription: number,
            };
            let ticket = match frame.header(b"receipt") {
                Some(receipt) => Some(self.push_receipt(ctx, receipt, 1, false)?),
                None => None,
            };
            let to = shard_of(&destination, ctx.shard_count);
            ctx.route(
                to,
                ShardMessage::Subscribe {
                    consumer,
                    destination: destination.clone(),
                    ack,
                    prefetch,
                    prefetch_bytes: ctx.config.prefetch_default_bytes,
                    paused: flow_paused,
                    ticket,
                },
            );
        } else if let Some(receipt) = frame.header(b"receipt") {
            self.push_receipt(ctx, receipt, 0, false)?;
        }
        self.subscriptions.insert(
            number,
            Subscription {
                id: id.into(),
                destination,
                // Statistics messages are not acknowledged.
                ack: if monitor { AckMode::Auto } else { ack },
                monitor,
                unacked: VecDeque::new(),
                uncredited: 0,
                uncredited_bytes: 0,
                queue,
                waiting_bytes: 0,
                flow_paused,
                received: 0,
            },
        );
        self.update_input(ctx);
        Ok(())
    }

    fn unsubscribe(&mut self, ctx: &mut Ctx<'_>, frame: &Frame<'_>) -> Result<(), ProtocolError> {
        let id = match (frame.header(b"id"), self.version) {
            (Some(id), _) => id,
            (None, Version::V1_0) => {
                frame
                    .header(b"destination")
                    .ok_or(ProtocolError::MissingHeader {
                        command: Command::Unsubscribe,
                        header: "id",
                    })?
            }
            (None, _) => {
                return Err(ProtocolError::MissingHeader {
                    command: Command::Unsubscribe,
                    header: "id",
                })
            }
        };
        let number = self
            .subscriptions
            .iter()
            .find(|(_, s)| &*s.id == id)
            .map(|(number, _)| *number)
            .ok_or(ProtocolError::UnknownSubscription)?;
        self.drop_subscription(ctx, number);
        Ok(())
    }

    fn drop_subscription(&mut self, ctx: &mut Ctx<'_>, number: u64) {
        let Some(subscription) = self.subscriptions.remove(&number) else {
            return;
        };
        if subscription.queue {
            self.queue_waiting_bytes -= subscription.waiting_bytes;
        }
        let (waiting, others): (VecDeque<Deferred>, VecDeque<Deferred>) =
            std::mem::take(&mut self.deferred)
                .into_iter()
                .partition(|deferred| deferred.number == number);
        self.deferred = others;
        if !subscription.monitor {
            let consumer = ConsumerKey {
                conn: self.conn,
                subscription: number,
            };
            let to = shard_of(&subscription.destination, ctx.shard_count);
            // Client-ack deliveries the client never got: written past what reached the
            // kernel, or still waiting here. The queue takes them back with the Unsubscribe
            // either way; this keeps them from counting toward dead-lettering.
            let handed = self.handed_bytes;
            let unsent: SmallVec<[MessageId; 4]> = subscription
                .unacked
                .iter()
                .filter(|pending| pending.at >= handed)
                .map(|pending| pending.id)
                .chain(
                    waiting
                        .iter()
                        .filter(|deferred| !deferred.settled)
                        .map(|deferred| deferred.message.id),
                )
                .collect();
            if !unsent.is_empty() {
                ctx.route(
                    to,
                    ShardMessage::Unsent {
                        consumer,
                        destination: subscription.destination.clone(),
                        ids: unsent,
                    },
                );
            }
            ctx.route(
                to,
                ShardMessage::Unsubscribe {
                    consumer,
                    destination: subscription.destination.clone(),
                    received: subscription.received,
                },
            );
            // Auto-ack deliveries still waiting were forgotten by their queue: they go back,
            // together and in order, after the Unsubscribe (so the queue does not hand them to
            // this consumer again).
            let messages: Vec<(Arc<Message>, u32, u64)> = waiting
                .into_iter()
                .filter(|deferred| deferred.settled)
                .map(|deferred| (deferred.message, deferred.deliveries, deferred.order))
                .collect();
            if !messages.is_empty() {
                ctx.route(
                    to,
                    ShardMessage::ReturnedAll {
                        destination: subscription.destination.clone(),
                        messages,
                    },
                );
            }
        }
        if self.state == State::Connected {
            // Its deliveries no longer wait: the others' queues may resume.
            self.update_flow(ctx);
        }
        self.update_input(ctx);
    }

    // --- ACK / NACK ---

    /// Finds which subscription and deliveries an ACK or NACK names, without changing anything.
    fn resolve_ack(&self, frame: &Frame<'_>) -> Result<(u64, usize), ProtocolError> {
        let command = frame.command;
        if self.version == Version::V1_2 {
            let id = frame.header(b"id").ok_or(ProtocolError::MissingHeader {
                command,
                header: "id",
            })?;
            let (number, tag) = parse_ack_id(id).ok_or(ProtocolError::UnknownAck)?;
            let subscription = self
                .subscriptions
                .get(&number)
                .ok_or(ProtocolError::UnknownAck)?;
            let position = subscription
                .unacked
                .binary_search_by_key(&tag, |pending| pending.tag)
                .map_err(|_| ProtocolError::UnknownAck)?;
            return Ok((number, position));
        }
        // STOMP 1.0/1.1 name the message by `message-id` (and 1.1 the subscription).
        let text = frame
            .header(b"message-id")
            .ok_or(ProtocolError::MissingHeader {
                command,
                header: "message-id",
            })?;
        let id = MessageId::parse(text).ok_or(ProtocolError::UnknownAck)?;
        let wanted_subscription = frame.header(b"subscription");
        self.subscriptions
            .iter()
            .filter(|(_, s)| wanted_subscription.map_or(true, |wanted| *s.id == *wanted))
            .find_map(|(number, s)| {
                s.unacked
                    .iter()
                    .position(|p| p.id == id)
                    .map(|position| (*number, position))
            })
            .ok_or(ProtocolError::UnknownAck)
    }

    fn acknowledge(&mut self, ctx: &mut Ctx<'_>, frame: &Frame<'_>) -> Result<(), ProtocolError> {
        let transaction = frame.header(b"transaction");
        if let Some(name) = transaction {
            let tx = self
                .transactions
                .get(name)
                .ok_or(ProtocolError::UnknownTransaction)?;
            check_transaction_room(ctx, tx, 0, 0)?;
        }
        let (number, position) = self.resolve_ack(frame)?;
        let subscription = self
            .subscriptions
            .get_mut(&number)
            .ok_or(ProtocolError::UnknownAck)?;
        // STOMP 1.2 "SUBSCRIBE ack Header": `client` is cumulative, for NACK too.
        let taken: Vec<Pending> = match subscription.ack {
            AckMode::Client => subscription.unacked.drain(..=position).collect(),
            AckMode::ClientIndividual => {
                subscription.unacked.remove(position).into_iter().collect()
            }
            AckMode::Auto => return Err(ProtocolError::UnknownAck),
        };
        let outcome = if frame.command == Command::Ack {
            Outcome::Consumed
        } else {
            Outcome::Rejected {
                requeue: frame.header(b"requeue") != Some(b"false"),
            }
        };
        if let Some(name) = transaction {
            let tx = self
                .transactions
                .get_mut(name)
                .ok_or(ProtocolError::UnknownTransaction)?;
            tx.ops.push(match outcome {
                Outcome::Consumed => TxOp::Ack {
                    subscription: number,
                    taken,
                },
                Outcome::Rejected { requeue } => TxOp::Nack {
                    subscription: number,
                    taken,
                    requeue,
                },
            });
            return Ok(());
        }
        self.settle(ctx, number, &taken, outcome);
        Ok(())
    }

    fn settle(&self, ctx: &mut Ctx<'_>, number: u64, taken: &[Pending], outcome: Outcome) {
        let Some(subscription) = self.subscriptions.get(&number) else {
            // Unsubscribed since: the destination already took these messages back.
            return;
        };
        let consumer = ConsumerKey {
            conn: self.conn,
            subscription: number,
        };
        let destination = subscription.destination.clone();
        let ids: SmallVec<[MessageId; 4]> = taken.iter().map(|p| p.id).collect();
        let to = shard_of(&destination, ctx.shard_count);
        let message = match outcome {
            Outcome::Consumed => ShardMessage::Ack {
                consumer,
                destination,
                ids,
            },
            Outcome::Rejected { requeue } => ShardMessage::Nack {
                consumer,
                destination,
                ids,
                requeue,
            },
        };
        ctx.route(to, message);
    }

    // --- BEGIN / COMMIT / ABORT ---

    fn begin(&mut self, ctx: &mut Ctx<'_>, frame: &Frame<'_>) -> Result<(), ProtocolError> {
        let name = required(frame, Command::Begin, "transaction")?;
        if self.transactions.contains_key(name) {
            return Err(ProtocolError::DuplicateTransaction);
        }
        if self.transactions.len() >= ctx.config.transactions_per_connection_max {
            return Err(ProtocolError::LimitExceeded {
                limit: "transactions_per_connection_max",
                max: ctx.config.transactions_per_connection_max as u64,
            });
        }
        self.transactions
            .insert(name.into(), Transaction::default());
        Ok(())
    }

    fn commit(&mut self, ctx: &mut Ctx<'_>, frame: &Frame<'_>) -> Result<(), ProtocolError> {
        let name = required(frame, Command::Commit, "transaction")?;
        let tx = self
            .transactions
            .remove(name)
            .ok_or(ProtocolError::UnknownTransaction)?;
        let receipt = frame.header(b"receipt");
        let sends = tx
            .ops
            .iter()
            .filter(|op| matches!(op, TxOp::Send(_)))
            .count() as u32;
        let ticket = match receipt {
            Some(receipt) => Some(self.push_receipt(ctx, receipt, sends, false)?),
            None => None,
        };
        for op in tx.ops {
            match op {
                TxOp::Send(message) => {
                    let to = shard_of(&message.destination, ctx.shard_count);
                    ctx.route(
                        to,
                        ShardMessage::Publish {
                            message,
                            origin: self.conn,
                            ticket,
                        },
                    );
                }
                TxOp::Ack {
                    subscription,
                    taken,
                } => self.settle(ctx, subscription, &taken, Outcome::Consumed),
                TxOp::Nack {
                    subscription,
                    taken,
                    requeue,
                } => self.settle(ctx, subscription, &taken, Outcome::Rejected { requeue }),
            }
        }
        // The last open transaction ended: a pause for memory or disk it deferred takes
        // effect now.
        self.update_input(ctx);
        Ok(())
    }

    fn abort(&mut self, frame: &Frame<'_>) -> Result<(), ProtocolError> {
        let name = required(frame, Command::Abort, "transaction")?;
        let tx = self
            .transactions
            .remove(name)
            .ok_or(ProtocolError::UnknownTransaction)?;
        for op in tx.ops {
            if let TxOp::Ack {
                subscription,
                taken,
            }
            | TxOp::Nack {
                subscription,
                taken,
                ..
            } = op
            {
                // The acknowledgements are undone: the messages await an ACK again.
                if let Some(subscription) = self.subscriptions.get_mut(&subscription) {
                    for pending in taken {
                        let at = subscription
                            .unacked
                            .partition_point(|p| p.tag < pending.tag);
                        subscription.unacked.insert(at, pending);
                    }
                }
            }
        }
        Ok(())
    }

    // --- RECEIPT ordering ---

    /// Queues a RECEIPT behind earlier ones; it goes once `awaiting` confirmations have come.
    /// Returns its ticket.
    fn push_receipt(
        &mut self,
        ctx: &mut Ctx<'_>,
        receipt_id: &[u8],
        awaiting: u32,
        close_after: bool,
    ) -> Result<u64, ProtocolError> {
        if self.receipts.len() >= ctx.config.receipts_pending_max {
            return Err(ProtocolError::LimitExceeded {
                limit: "receipts_pending_max",
                max: ctx.config.receipts_pending_max as u64,
            });
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.receipts.push_back(PendingReceipt {
            ticket,
            awaiting,
            receipt_id: receipt_id.into(),
            close_after,
        });
        self.release_receipts(ctx);
        Ok(ticket)
    }

    pub(crate) fn confirmed(&mut self, ctx: &mut Ctx<'_>, ticket: u64) {
        if let Ok(index) = self.receipts.binary_search_by_key(&ticket, |r| r.ticket) {
            let receipt = &mut self.receipts[index];
            receipt.awaiting = receipt.awaiting.saturating_sub(1);
        }
        self.release_receipts(ctx);
    }

    fn release_receipts(&mut self, ctx: &mut Ctx<'_>) {
        while self.receipts.front().is_some_and(|r| r.awaiting == 0) {
            let Some(receipt) = self.receipts.pop_front() else {
                break;
            };
            let version = self.version;
            self.write(
                ctx,
                |out| {
                    let mut writer = FrameWriter::begin(out, version, Command::Receipt);
                    writer.header(b"receipt-id", &receipt.receipt_id);
                    writer.finish(b"");
                    out.extend_from_slice(FRAME_TRAILER);
                },
                None,
            );
            if receipt.close_after {
                self.state = State::Closed;
            }
        }
    }

    // --- Deliveries ---

    /// A destination hands this session a message for subscription `number`.
    pub(crate) fn deliver(
        &mut self,
        ctx: &mut Ctx<'_>,
        number: u64,
        message: Arc<Message>,
        deliveries: u32,
        settled: bool,
        order: u64,
    ) {
        let live = self.state == State::Connected && self.subscriptions.contains_key(&number);
        if !live {
            // The subscription ended while this was in flight: nothing reaches it after
            // UNSUBSCRIBE. A client-acked message is taken back by the destination with the
            // rest of the consumer's unacked ones; an auto-acked one it has forgotten, so it is
            // returned here.
            if settled {
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
            return;
        }
        if !settled {
            if let Some(subscription) = self.subscriptions.get_mut(&number) {
                subscription.received += 1;
            }
        }
        if message.is_expired(ctx.now_ms) {
            // It expired on its way from another shard: still never delivered.
            self.drop_expired(ctx, number, message, settled);
            return;
        }
        if !self.deferred.is_empty() || !self.has_room(ctx) {
            // Behind a full out buffer (or behind deliveries already waiting for it, to keep
            // their order): written once it drains.
            let frame_bytes = message.frame_bytes_estimate();
            let topic_waiting_max = topic_waiting_bytes_max(ctx);
            let Some(subscription) = self.subscriptions.get_mut(&number) else {
                return;
            };
            if !subscription.queue
                && subscription.waiting_bytes > 0
                && subscription.waiting_bytes + frame_bytes > topic_waiting_max
            {
                // A topic subscriber that is behind misses what does not fit here: what was
                // already on its way when the topic heard of the pause, and what the topic
                // sent since within its slack. Bounded, so a subscriber the topic never
                // hears of cannot grow this session. As at the topic, an empty list takes one
                // message however large.
                ctx.counters.topic_deliveries_dropped_total += 1;
                self.release_unwritten(ctx, number, message, settled);
                return;
            }
            if subscription.queue
                && self.queue_waiting_bytes > 0
                && self.queue_waiting_bytes + frame_bytes > queue_waiting_bytes_max(ctx)
            {
                // Queue subscriptions pause while deliveries wait, but each may have had its
                // whole window on the way when the first began to wait (a client that sends
                // many SUBSCRIBEs to queues with backlogs at once): what does not fit goes back
                // to its queue unwritten instead of waiting here.
                self.give_back(ctx, number, message, deliveries, settled, order);
                return;
            }
            if subscription.queue {
                self.queue_waiting_bytes += frame_bytes;
            }
            subscription.waiting_bytes += frame_bytes;
            let was_empty = self.deferred.is_empty();
            self.deferred.push_back(Deferred {
                number,
                message,
                deliveries,
                settled,
                order,
            });
            if was_empty {
                // Only the first one changes what `update_flow` decides.
                self.update_flow(ctx);
            }
            return;
        }
        self.write_delivery(ctx, number, message, deliveries);
    }

    /// Auto-acked deliveries waiting in `deferred`: their queue counts them consumed.
    #[cfg(test)]
    pub(crate) fn settled_waiting(&self) -> impl Iterator<Item = &Arc<Message>> {
        self.deferred
            .iter()
            .filter(|deferred| deferred.settled)
            .map(|deferred| &deferred.message)
    }

    /// Estimated frame bytes of every delivery waiting in `deferred`.
    #[cfg(test)]
    pub(crate) fn waiting_bytes(&self) -> u64 {
        self.subscriptions.values().map(|s| s.waiting_bytes).sum()
    }

    /// The out buffer may take another MESSAGE: the server has not reported it full, and what
    /// it held when it last said, plus what was written since, is under its limit.
    fn has_room(&self, ctx: &Ctx<'_>) -> bool {
        self.writable && self.out_bytes_estimate < ctx.config.out_buffer_bytes_max
    }

    /// Writes waiting deliveries while the out buffer has room.
    fn write_deferred(&mut self, ctx: &mut Ctx<'_>) {
        while self.state == State::Connected && self.has_room(ctx) {
            let Some(deferred) = self.deferred.pop_front() else {
                return;
            };
            if let Some(subscription) = self.subscriptions.get_mut(&deferred.number) {
                let frame_bytes = deferred.message.frame_bytes_estimate();
                subscription.waiting_bytes -= frame_bytes;
                if subscription.queue {
                    self.queue_waiting_bytes -= frame_bytes;
                }
            }
            if deferred.message.is_expired(ctx.now_ms) {
                self.drop_expired(ctx, deferred.number, deferred.message, deferred.settled);
                continue;
            }
            self.write_delivery(ctx, deferred.number, deferred.message, deferred.deliveries);
        }
    }

    fn write_delivery(
        &mut self,
        ctx: &mut Ctx<'_>,
        number: u64,
        message: Arc<Message>,
        deliveries: u32,
    ) {
        let at = self.written_bytes;
        let tag = self.next_tag;
        self.next_tag += 1;
        let Some(subscription) = self.subscriptions.get_mut(&number) else {
            return;
        };
        let ack = subscription.ack;
        if ack == AckMode::Auto {
            subscription.uncredited += 1;
            subscription.uncredited_bytes += message.frame_bytes_estimate();
        } else {
            subscription.unacked.push_back(Pending {
                tag,
                id: message.id,
                at,
            });
        }
        self.write_message(
            ctx,
            number,
            message,
            deliveries,
            (ack != AckMode::Auto).then_some(tag),
        );
    }

    /// Settles a delivery that expired before it could be written: the destination forgets a
    /// client-acked one as if acknowledged, and an auto-acked one gives its window room back.
    fn drop_expired(
        &mut self,
        ctx: &mut Ctx<'_>,
        number: u64,
        message: Arc<Message>,
        settled: bool,
    ) {
        ctx.counters.messages_expired_total += 1;
        self.release_unwritten(ctx, number, message, settled);
    }

    /// Hands a queue delivery back unwritten: it does not count toward dead-lettering
    /// (`Unsent`, `Returned`), an auto-acked one gives its window room back (`Credit`), and the
    /// queue puts it back in its place (by `order`) or, client-acked, at the front (`Nack`).
    fn give_back(
        &self,
        ctx: &mut Ctx<'_>,
        number: u64,
        message: Arc<Message>,
        deliveries: u32,
        settled: bool,
        order: u64,
    ) {
        let consumer = ConsumerKey {
            conn: self.conn,
            subscription: number,
        };
        let destination = message.destination.clone();
        let to = shard_of(&destination, ctx.shard_count);
        if settled {
            ctx.route(
                to,
                ShardMessage::Credit {
                    consumer,
                    destination,
                    count: 1,
                    bytes: message.frame_bytes_estimate(),
                },
            );
            ctx.route(
                to,
                ShardMessage::Returned {
                    message,
                    deliveries,
                    order,
                },
            );
        } else {
            let ids: SmallVec<[MessageId; 4]> = std::iter::once(message.id).collect();
            ctx.route(
                to,
                ShardMessage::Unsent {
                    consumer,
                    destination: destination.clone(),
                    ids: ids.clone(),
                },
            );
            ctx.route(
                to,
                ShardMessage::Nack {
                    consumer,
                    destination,
                    ids,
                    requeue: true,
                },
            );
        }
    }

    /// Settles a delivery that will never be written (expired, or past a topic subscriber's
    /// slack): the destination forgets a client-acked one as if acknowledged, and an
    /// auto-acked one gives its window room back.
    fn release_unwritten(
        &self,
        ctx: &mut Ctx<'_>,
        number: u64,
        message: Arc<Message>,
        settled: bool,
    ) {
        let consumer = ConsumerKey {
            conn: self.conn,
            subscription: number,
        };
        let destination = message.destination.clone();
        let to = shard_of(&destination, ctx.shard_count);
        let reply = if settled {
            ShardMessage::Credit {
                consumer,
                destination,
                count: 1,
                bytes: message.frame_bytes_estimate(),
            }
        } else {
            ShardMessage::Ack {
                consumer,
                destination,
                ids: std::iter::once(message.id).collect(),
            }
        };
        ctx.route(to, reply);
    }

    /// Writes a `/queue/monitor` statistics message to every monitor subscription.
    pub(crate) fn deliver_monitor(&mut self, ctx: &mut Ctx<'_>, message: &Arc<Message>) {
        if self.state != State::Connected {
            return;
        }
        let numbers: SmallVec<[u64; 2]> = self
            .subscriptions
            .iter()
            .filter(|(_, s)| s.monitor)
            .map(|(n, _)| *n)
            .collect();
        for number in numbers {
            self.write_message(ctx, number, message.clone(), 1, None);
        }
    }

    fn write_message(
        &mut self,
        ctx: &mut Ctx<'_>,
        number: u64,
        message: Arc<Message>,
        deliveries: u32,
        tag: Option<u64>,
    ) {
        let version = self.version;
        let Some(subscription) = self.subscriptions.get(&number) else {
            return;
        };
        // Built in place, not through `write`, so the subscription id is borrowed rather than
        // copied: this is the hot path, one call per delivery.
        let start = ctx.effects.bytes.len();
        let mut writer = FrameWriter::begin(&mut ctx.effects.bytes, version, Command::Message);
        writer.header(b"subscription", &subscription.id);
        let mut id_text = [0u8; 48];
        let length = message.id.write_text(&mut id_text);
        writer.header(b"message-id", &id_text[..length]);
        writer.header(b"destination", &message.destination);
        if let (Some(tag), Version::V1_2) = (tag, version) {
            let mut ack_text = [0u8; 41];
            let length = write_ack_id(number, tag, &mut ack_text);
            writer.header(b"ack", &ack_text[..length]);
        }
        if deliveries > 1 {
            writer.header(b"redelivered", b"true");
            writer.header_u64(b"delivery-count", u64::from(deliveries));
        }
        writer.content_length(message.body.len());
        if version == Version::V1_2 || message.header_block_plain {
            writer.raw_headers(&message.header_block);
        } else {
            let mut converted = Vec::new();
            message.write_header_block(&mut converted, version);
            writer.raw_headers(&converted);
        }
        writer.finish_head();
        self.push_write(ctx, start, Some(message));
        // The body and its NUL go out after the head (see `Effect::Write`); the trailer
        // follows them as a write of its own.
        let start = ctx.effects.bytes.len();
        ctx.effects.bytes.extend_from_slice(FRAME_TRAILER);
        self.push_write(ctx, start, None);
    }

    // --- Flow control, heart-beats, the end ---

    /// Everything written to the connection so far has left its output buffer: the auto-ack
    /// deliveries among it are off the broker's hands, so their window room goes back to the
    /// destinations. This is what bounds an auto-ack consumer to `prefetch` messages between
    /// its queue and its socket.
    pub(crate) fn flushed(&mut self, ctx: &mut Ctx<'_>) {
        self.out_bytes_estimate = 0;
        for (number, subscription) in &mut self.subscriptions {
            if subscription.uncredited == 0 {
                continue;
            }
            let count = std::mem::take(&mut subscription.uncredited);
            let bytes = std::mem::take(&mut subscription.uncredited_bytes);
            let to = shard_of(&subscription.destination, ctx.shard_count);
            ctx.route(
                to,
                ShardMessage::Credit {
                    consumer: ConsumerKey {
                        conn: self.conn,
                        subscription: *number,
                    },
                    destination: subscription.destination.clone(),
                    count,
                    bytes,
                },
            );
        }
        self.write_deferred(ctx);
        self.update_flow(ctx);
    }

    pub(crate) fn set_writable(&mut self, ctx: &mut Ctx<'_>, writable: bool) {
        if self.writable == writable {
            return;
        }
        self.writable = writable;
        // On `true` the server drained the buffer to half its limit or less; what it holds
        // comes with `set_out_bytes`, which the server calls first. Lowering the estimate to
        // half the limit instead, whatever the buffer held, let it reach the limit while the
        // buffer stayed short of it: the server then never reported it full, so topics were
        // never paused while their deliveries piled up here.
        if writable {
            self.write_deferred(ctx);
        }
        self.update_flow(ctx);
    }

    /// The server reports what the connection's out buffer holds, every write the broker
    /// made so far included: the estimate becomes exactly that. The server calls this after
    /// each batch of writes to the connection (and before `set_writable(true)`), so after
    /// every batch either the estimate is under the limit or the server reports the buffer
    /// full (`set_writable(false)`, which pauses topics too): deliveries cannot wait here
    /// while nothing will ever say the buffer drained.
    pub(crate) fn set_out_bytes(&mut self, ctx: &mut Ctx<'_>, bytes: u64) {
        self.out_bytes_estimate = bytes;
        if self.state == State::Connected && !self.deferred.is_empty() && self.has_room(ctx) {
            self.write_deferred(ctx);
            self.update_flow(ctx);
        }
    }

    /// Tells each destination whether to hand this connection more: not while the server
    /// reports its out buffer full, and, for queues, not while deliveries wait here for room
    /// (what a queue still holds can go to its other consumers meanwhile). Topics pause only
    /// on the server's word: their pause holds back producers, which the session's own
    /// estimate, reset only when the buffer empties, would do far more often than needed.
    fn update_flow(&mut self, ctx: &mut Ctx<'_>) {
        let full = !self.writable;
        let waiting = !self.deferred.is_empty();
        for (number, subscription) in &mut self.subscriptions {
            if subscription.monitor {
                continue;
            }
            let paused = full || (waiting && subscription.queue);
            if paused == subscription.flow_paused {
                continue;
            }
            subscription.flow_paused = paused;
            let to = shard_of(&subscription.destination, ctx.shard_count);
            ctx.route(
                to,
                ShardMessage::Flow {
                    consumer: ConsumerKey {
                        conn: self.conn,
                        subscription: *number,
                    },
                    destination: subscription.destination.clone(),
                    paused,
                },
            );
        }
    }

    /// Sends a heart-beat when the connection has been quiet long enough, and gives up on a
    /// client that has been silent past its grace.
    pub(crate) fn tick(&mut self, ctx: &mut Ctx<'_>) -> Result<(), ProtocolError> {
        if self.state != State::Connected {
            return Ok(());
        }
        let now = ctx.now_ms;
        let plan = self.heartbeat;
        if plan.read_timeout_ms > 0
            && !self.input_paused
            && now.saturating_sub(self.last_read_ms) > plan.read_timeout_ms
        {
            return Err(ProtocolError::HeartbeatTimeout);
        }
        if plan.send_every_ms > 0
            && now.saturating_sub(self.last_write_ms) + ctx.config.tick_interval_ms
                >= plan.send_every_ms
        {
            self.write(ctx, |out| out.push(b'\n'), None);
        }
        Ok(())
    }

    /// Ends every subscription and drops open transactions (STOMP 1.2 "BEGIN": they are
    /// aborted on DISCONNECT or connection failure). Unacknowledged messages go back to their
    /// queues through the Unsubscribe each destination receives.
    pub(crate) fn end(&mut self, ctx: &mut Ctx<'_>) {
        self.transactions.clear();
        // First, so dropping the subscriptions does not look like a change of flow control.
        if self.state != State::Disconnecting {
            self.state = State::Closed;
        }
        let numbers: Vec<u64> = self.subscriptions.keys().copied().collect();
        for number in numbers {
            self.drop_subscription(ctx, number);
        }
    }

    /// Forgets pending receipts once the connection is closed.
    pub(crate) fn close(&mut self) {
        self.receipts.clear();
        self.state = State::Closed;
    }
}

fn required<'f>(
    frame: &'f Frame<'_>,
    command: Command,
    header: &'static str,
) -> Result<&'f [u8], ProtocolError> {
    match frame.header(header.as_bytes()) {
        Some(value) if !value.is_empty() => Ok(value),
        _ => Err(ProtocolError::MissingHeader { command, header }),
    }
}

/// Room for one more frame in `tx`, carrying `body_bytes` more on top of the `buffered_bytes`
/// all open transactions of the connection hold.
fn check_transaction_room(
    ctx: &Ctx<'_>,
    tx: &Transaction,
    buffered_bytes: usize,
    body_bytes: usize,
) -> Result<(), ProtocolError> {
    if tx.ops.len() >= ctx.config.transaction_frames_max {
        return Err(ProtocolError::LimitExceeded {
            limit: "transaction_frames_max",
            max: ctx.config.transaction_frames_max as u64,
        });
    }
    if buffered_bytes + body_bytes > ctx.config.transaction_bytes_per_connection_max {
        return Err(ProtocolError::LimitExceeded {
            limit: "transaction_bytes_per_connection_max",
            max: ctx.config.transaction_bytes_per_connection_max as u64,
        });
    }
    Ok(())
}

/// STOMP 1.2 "Protocol Negotiation": the highest version both sides know; no header means 1.0.
pub(crate) fn negotiate(accept_version: Option<&[u8]>) -> Option<Version> {
    let Some(list) = accept_version else {
        return Some(Version::V1_0);
    };
    list.split(|&byte| byte == b',')
        .filter_map(Version::parse)
        .max()
}

fn parse_heartbeat(value: &[u8]) -> Result<(u64, u64), ProtocolError> {
    let invalid = ProtocolError::InvalidHeader {
        header: "heart-beat",
        detail: "expected two integers separated by a comma",
    };
    let comma = memchr::memchr(b',', value).ok_or(invalid.clone())?;
    let send = parse_u64(&value[..comma]).ok_or(invalid.clone())?;
    let want = parse_u64(&value[comma + 1..]).ok_or(invalid)?;
    Ok((send, want))
}

/// A decimal `u64` (digits only: no sign, no spaces, as STOMP 1.2 forbids trimming).
fn parse_u64(text: &[u8]) -> Option<u64> {
    if text.is_empty() || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(text).ok()?.parse().ok()
}

/// The `ack` header value: `<subscription number>.<delivery tag>`, so an ACK finds its
/// subscription without a table.
fn write_ack_id(number: u64, tag: u64, buffer: &mut [u8; 41]) -> usize {
    let mut digits = [0u8; 20];
    let first = format_u64(number, &mut digits);
    let mut length = first.len();
    buffer[..length].copy_from_slice(first);
    buffer[length] = b'.';
    length += 1;
    let second = format_u64(tag, &mut digits);
    buffer[length..length + second.len()].copy_from_slice(second);
    length + second.len()
}

fn parse_ack_id(text: &[u8]) -> Option<(u64, u64)> {
    let dot = memchr::memchr(b'.', text)?;
    let number = parse_u64(&text[..dot])?;
    let tag = parse_u64(&text[dot + 1..])?;
    Some((number, tag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_picks_highest_common_version() {
        assert_eq!(negotiate(None), Some(Version::V1_0));
        assert_eq!(negotiate(Some(b"1.0,1.1,2.0")), Some(Version::V1_1));
        assert_eq!(negotiate(Some(b"1.2,1.1")), Some(Version::V1_2));
        assert_eq!(negotiate(Some(b"2.0,2.1")), None);
    }

    #[test]
    fn ack_ids_round_trip() {
        let mut buffer = [0u8; 41];
        let length = write_ack_id(u64::MAX, u64::MAX, &mut buffer);
        assert_eq!(parse_ack_id(&buffer[..length]), Some((u64::MAX, u64::MAX)));
        assert_eq!(parse_ack_id(b"1"), None);
        assert_eq!(parse_ack_id(b"1.x"), None);
    }

    #[test]
    fn numbers_are_strict() {
        assert_eq!(parse_u64(b"1000"), Some(1000));
        assert_eq!(parse_u64(b" 1"), None);
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        assert_eq!(parse_u64(b"+1"), None);
    }
}
