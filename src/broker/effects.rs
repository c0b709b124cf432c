//! What the broker logic asks the world to do, and the typed messages sessions and destinations
//! exchange. Nothing here performs anything: the server reads [`Effects`] after each call and
//! carries them out in order.

use std::ops::Range;
use std::sync::Arc;

use smallvec::SmallVec;

use super::types::{
    AckMode, ConnectionId, ConsumerKey, Message, MessageId, QueueStats, ShardId, StoreRef,
};
use crate::codec::Version;

/// Identifies one log append whose durability a RECEIPT waits for. Increasing per shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DurableToken(pub u64);

/// A record for the owning shard's log. The log helper decides the bytes; these are the facts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A persistent message was accepted by a queue of this shard.
    Message { message: Arc<Message> },
    /// The message left the queue for good: acknowledged, auto-acked on delivery, expired, or
    /// moved to its dead-letter queue (written once the dead-letter queue's own `Message`
    /// record, on its shard, is durable: a crash between the two duplicates, never loses).
    Ack {
        destination: Arc<[u8]>,
        id: MessageId,
        /// Its record, when written ([`Message::stored_at`]); `None` while the store still
        /// holds it back, which the ack then cancels.
        at: Option<StoreRef>,
    },
    /// A logged message was handed to a client-ack consumer (auto-ack deliveries are logged
    /// done instead). After a crash it comes back marked redelivered, with its deliveries
    /// counted, so the dead-letter count and the `redelivered` mark survive restarts.
    Delivered {
        destination: Arc<[u8]>,
        id: MessageId,
        /// As for `Ack`; `None` makes the store write the held-back record first.
        at: Option<StoreRef>,
    },
}

/// Heart-beat timing agreed at CONNECT (STOMP 1.2 "Heart-beating"); 0 means none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeartbeatPlan {
    /// The server sends something (an EOL when idle) at least this often.
    pub send_every_ms: u64,
    /// The client promised data at least this often.
    pub expect_every_ms: u64,
    /// After this long with no data from the client the connection is closed (the expected
    /// interval times the configured grace).
    pub read_timeout_ms: u64,
}

/// One thing for the server to do. Kept in the order produced: a Close comes after the writes
/// that precede it for the same connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Write `Effects::bytes[bytes]` to the connection; when `body` is set, follow it with
    /// `body.body` and a NUL (a MESSAGE whose stored body is sent without copying).
    Write {
        conn: ConnectionId,
        bytes: Range<usize>,
        body: Option<Arc<Message>>,
    },
    /// CONNECTED was written: from now on decode this connection's frames as `version`, and
    /// keep its heart-beats per `heartbeat`.
    Connected {
        conn: ConnectionId,
        version: Version,
        heartbeat: HeartbeatPlan,
    },
    /// Check this login (only with `login_offloaded`): run the [`crate::broker::Authenticator`]
    /// off the core's thread, then call [`crate::broker::Shard::on_login_result`] (or
    /// [`crate::broker::Shard::on_login_queue_full`] when the check cannot be queued). Decode
    /// no further frames of the connection until then.
    Authenticate {
        conn: ConnectionId,
        login: Box<[u8]>,
        passcode: Box<[u8]>,
    },
    /// Close the connection once the writes before this have been flushed (or given up on).
    /// The broker has already forgotten it; frames that still arrive for it are ignored.
    Close { conn: ConnectionId },
    /// Append to this shard's log. With a token, call [`crate::broker::Shard::on_durable`] once
    /// it (and everything appended before it) is as durable as the sync policy makes it; every
    /// token must be reported eventually, whatever the policy.
    Append {
        record: Record,
        token: Option<DurableToken>,
    },
    /// Producer flow control: stop decoding the connection's frames (`paused`), leaving the
    /// rest of what it sends to the kernel's socket buffer and TCP's window, or start again.
    /// Also emitted (paused, never released) for a refused login waiting for its delayed
    /// ERROR: a frame or a malformed byte decoded meanwhile must not get an earlier answer
    /// that would tell a guesser the verdict before the delay.
    /// Heart-beat read timeouts do not run while it is paused (the client is not being read,
    /// so its silence means nothing).
    Throttle { conn: ConnectionId, paused: bool },
    /// Hand `message` to shard `to` on the queue from this shard to it (FIFO per pair of shards:
    /// the logic relies on that order), to be passed to its `on_peer_message`.
    Peer { to: ShardId, message: ShardMessage },
}

/// The output of one call: effects in order, and one buffer holding the bytes they write, so a
/// call makes no allocation per frame once the buffers have grown. The server clears it (or
/// makes a new one) between calls.
#[derive(Debug, Default)]
pub struct Effects {
    pub list: Vec<Effect>,
    pub bytes: Vec<u8>,
}

impl Effects {
    pub fn new() -> Effects {
        Effects::default()
    }

    pub fn clear(&mut self) {
        self.list.clear();
        self.bytes.clear();
    }

    /// The bytes of a write effect's range.
    pub fn slice(&self, range: &Range<usize>) -> &[u8] {
        &self.bytes[range.clone()]
    }
}

/// Why a destination refused a message: reported back to the publishing session, which sends
/// the ERROR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    QueueMessagesFull,
    QueueBytesFull,
    /// The log could not store the message (`reason` is safe to show a client: no paths).
    NotStored {
        reason: &'static str,
    },
}

/// The typed messages between sessions and destinations. They travel the same way whether both
/// ends are on one shard (a local FIFO drained before the call returns) or not
/// ([`Effect::Peer`]), so one code path is tested for both.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShardMessage {
    // Session -> destination (addressed by `destination`'s shard).
    /// A subscription starts: deliver to it, at most `prefetch` messages and (queues)
    /// `prefetch_bytes` estimated frame bytes in its window at a time, though always one.
    Subscribe {
        consumer: ConsumerKey,
        destination: Arc<[u8]>,
        ack: AckMode,
        prefetch: u32,
        prefetch_bytes: u64,
        /// The connection's output is full right now (see `Flow`).
        paused: bool,
        /// The SUBSCRIBE asked for a receipt: `Confirmed` comes back once the destination has
        /// the subscription, so a client may publish the moment it has the RECEIPT (from any
        /// connection, on any shard) without the message overtaking its subscription.
        ticket: Option<u64>,
    },
    /// The subscription ended (UNSUBSCRIBE, DISCONNECT, connection lost): its unacknowledged
    /// messages go back to the front of the queue.
    Unsubscribe {
        consumer: ConsumerKey,
        destination: Arc<[u8]>,
        /// Client-ack deliveries the session took in for it: those the queue handed out
        /// beyond these were still on their way and never reached the client.
        received: u64,
    },
    /// A SEND (or a committed one). `origin` hears of a refusal; with `ticket` it also hears of
    /// acceptance (once durable, when that is required), to release a RECEIPT.
    Publish {
        message: Arc<Message>,
        origin: ConnectionId,
        ticket: Option<u64>,
    },
    /// These messages, delivered to `consumer`, are consumed.
    Ack {
        consumer: ConsumerKey,
        destination: Arc<[u8]>,
        ids: SmallVec<[MessageId; 4]>,
    },
    /// These client-ack deliveries to `consumer` never reached its socket (they waited in the
    /// session, or in an out buffer the connection lost): they do not count toward
    /// dead-lettering. Sent just before the `Unsubscribe` that takes them back.
    Unsent {
        consumer: ConsumerKey,
        destination: Arc<[u8]>,
        ids: SmallVec<[MessageId; 4]>,
    },
    /// These messages, delivered to `consumer`, were not consumed: redeliver (or dead-letter).
    Nack {
        consumer: ConsumerKey,
        destination: Arc<[u8]>,
        ids: SmallVec<[MessageId; 4]>,
        /// False (`requeue:false` on the NACK, as RabbitMQ has it): dead-letter them now.
        requeue: bool,
    },
    /// `count` more auto-acked deliveries of this consumer, `bytes` of estimated frames, have
    /// left the broker (the server reported its connection's output flushed): its window has
    /// room for as many more. So an auto-ack consumer never has more than its window between
    /// its queue and its socket, and one call never writes more than that to it.
    Credit {
        consumer: ConsumerKey,
        destination: Arc<[u8]>,
        count: u32,
        bytes: u64,
    },
    /// The consumer's connection cannot take more output (`paused`) or can again.
    Flow {
        consumer: ConsumerKey,
        destination: Arc<[u8]>,
        paused: bool,
    },
    /// An auto-acked delivery reached a session whose subscription had already gone: it was
    /// never written, so the queue takes it back to the front (its next delivery is marked
    /// redelivered, conservatively).
    Returned {
        message: Arc<Message>,
        deliveries: u32,
        /// The queue's arrival number for it (`Deliver::order`): where it goes back.
        order: u64,
    },
    /// Auto-acked deliveries, oldest first, that were still waiting in the session for room in
    /// the out buffer when their subscription ended: never written, so the queue takes them
    /// back to its front together, in order (each keeps its delivery count, as `Returned`).
    ReturnedAll {
        destination: Arc<[u8]>,
        /// Each with its delivery count and `Deliver::order`.
        messages: Vec<(Arc<Message>, u32, u64)>,
    },
    // Destination -> destination.
    /// A message of queue `from` used up its deliveries: keep it in this dead-letter queue
    /// (its `destination`). When logged, `Moved` goes back once its record is durable.
    DeadLetter {
        message: Arc<Message>,
        from: Arc<[u8]>,
        /// The record of the message on `from`, handed back in `Moved`.
        from_at: Option<StoreRef>,
    },
    /// The dead-letter copy of message `id` is durable: queue `destination` may log it done.
    Moved {
        destination: Arc<[u8]>,
        id: MessageId,
        at: Option<StoreRef>,
    },
    // Destination -> session (addressed by the connection's shard).
    /// Write this message to the subscription. `deliveries` counts this one (1 = first).
    /// `settled`: the destination has already forgotten it (auto ack).
    Deliver {
        consumer: ConsumerKey,
        message: Arc<Message>,
        deliveries: u32,
        settled: bool,
        /// A queue's arrival number for the message, sent back with it if it returns
        /// unwritten (`Returned`, `ReturnedAll`); 0 from a topic.
        order: u64,
    },
    /// The Publish with this ticket is accepted (and durable if required).
    Confirmed { conn: ConnectionId, ticket: u64 },
    /// Producer flow control: a destination this connection publishes to is over its limits
    /// (`paused`), or no longer is. Each destination sends one release per pause.
    Throttle { conn: ConnectionId, paused: bool },
    /// Producer flow control for disk: the log of the shard that sends this holds past seven
    /// eighths of its `disk_bytes_max` share (`paused`), or is back under three quarters. As
    /// for the memory budget, a connection with an open transaction is not paused (its
    /// COMMIT is what frees the memory its SENDs hold; past the budget they are refused).
    /// Each shard sends one release per pause.
    DiskThrottle { conn: ConnectionId, paused: bool },
    /// A Publish from this connection was refused.
    Rejected {
        conn: ConnectionId,
        reason: Rejection,
    },
    // Shard -> every other shard.
    /// This shard's queue statistics, for `/queue/monitor` subscribers elsewhere.
    Stats {
        from: ShardId,
        queues: Arc<[QueueStats]>,
    },
}
