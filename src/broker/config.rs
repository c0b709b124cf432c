//! Settings and limits of the broker logic. Every bound is named with its unit last and says
//! why it has the value it has; the server fills this from flags and the TOML config.

use super::memory::{MemoryBudget, UNLIMITED};

/// How the broker logic behaves and how far any one client can push it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerConfig {
    /// Queues append persistent messages to the log ([`crate::broker::Record`]). Off means
    /// queues live in memory only (stompserver's default store).
    pub log_enabled: bool,
    /// A RECEIPT for a persistent SEND to a queue waits until the server reports its record
    /// durable ([`crate::broker::Shard::on_durable`]). Set under `--fsync always`: the receipt is
    /// then the durability point, as RabbitMQ's publisher confirms and Apollo's receipts are.
    pub receipts_wait_for_sync: bool,
    /// Whether a SEND without a `persistent` header is persistent. True: a broker whose queues
    /// are logged should not lose a message because the client did not know ActiveMQ's header
    /// (ActiveMQ defaults to false; send `persistent:false` to opt out per message).
    pub persistent_by_default: bool,
    /// Window of a subscription that names no prefetch: 1,000 messages, ActiveMQ's queue
    /// prefetch, enough to keep a consumer busy across a round trip. For client acks it bounds
    /// the unacknowledged messages; for auto acks, those written and not yet flushed to the
    /// socket ([`crate::broker::Shard::on_flushed`]).
    pub prefetch_default_messages: u32,
    /// Byte window of every queue subscription, beside its message window: estimated frame
    /// bytes ([`crate::broker::Message::frame_bytes_estimate`]) of the messages handed to it
    /// and not yet acknowledged (client acks) or flushed to the socket (auto acks). A window
    /// holding nothing always takes one message, so a message larger than this goes out
    /// alone. 4 MiB: a round trip's worth of traffic on a fast link, while 1,000 messages of
    /// 64 KiB (the message window) would be 64 MiB handed to one connection at once. No
    /// SUBSCRIBE header sets it: ActiveMQ and RabbitMQ's STOMP adapters prefetch by count
    /// only (AMQP's `prefetch-size` is not implemented by RabbitMQ either).
    pub prefetch_default_bytes: u64,
    /// Upper bound of `activemq.prefetchSize` / `prefetch-count`; larger requests are lowered
    /// to it. 65,536 unacknowledged messages bound what one subscription pins in memory.
    pub prefetch_messages_max: u32,
    /// The server's soft limit of a connection's out buffer (`out_buffer_bytes_max`). A session
    /// writes a MESSAGE only while the bytes it wrote since the buffer was last reported
    /// empty (or below half) stay under this; later deliveries wait in the session, in order,
    /// within their subscriptions' windows. So deliveries never push a buffer past this plus
    /// one frame, and the server's hard limit (this plus a largest frame) never closes a
    /// consumer for what the broker chose to send it. 256 KiB, the server's default.
    pub out_buffer_bytes_max: u64,
    /// Deliveries after which a message that comes back (NACK, consumer gone) moves to its
    /// dead-letter queue: 7, ActiveMQ's first delivery plus `maximumRedeliveries` 6.
    pub deliveries_max: u32,
    /// Subscriptions one connection may hold. 1,024: far beyond real clients, small enough
    /// that one connection cannot make every destination track it.
    pub subscriptions_per_connection_max: usize,
    /// Open transactions per connection. 64: clients use one at a time; each open one holds
    /// buffered messages.
    pub transactions_per_connection_max: usize,
    /// SEND, ACK and NACK frames one transaction may hold before COMMIT. 10,000 keeps an
    /// unfinished transaction from growing without bound.
    pub transaction_frames_max: usize,
    /// Message bytes the open transactions of one connection may buffer together. 64 MiB: four
    /// maximum-size frames; counted per connection, not per transaction, so opening more
    /// transactions does not multiply it.
    pub transaction_bytes_per_connection_max: usize,
    /// RECEIPTs one connection may have waiting for the log (or for an earlier receipt, to keep
    /// their order). 65,536 bounds the bookkeeping of a client that pipelines receipted sends.
    pub receipts_pending_max: usize,
    /// Messages a queue holds waiting for consumers before its producers are paused (producer
    /// flow control, as ActiveMQ's: their input is not read until the queue drains to three
    /// quarters of this). A billion by default, the configurable maximum: bodies page out to
    /// the log, so the disk budget (the store's [`DiskPressure`](super::DiskPressure)) and the
    /// memory budget bound a backlog, not a count per queue. SENDs already on their way when
    /// the pause began are taken up to a quarter more; a SEND beyond that is refused with an
    /// ERROR.
    pub queue_messages_max: usize,
    /// Body bytes a queue holds waiting for consumers before its producers are paused, as
    /// `queue_messages_max`. 1 TiB by default, the configurable maximum, for the same reason.
    pub queue_bytes_max: u64,
    /// Messages a queue still takes past `queue_messages_max` and its quarter more: what a
    /// producer's core may decode and forward before the pause reaches it. A core decodes at
    /// most its receive buffers (8 MiB) per loop turn, about 50,000 small SENDs, and a peer
    /// queue holds 4,096 more; 131,072 holds two turns of that.
    pub queue_overshoot_messages: u64,
    /// Body bytes a queue still takes past `queue_bytes_max` and its quarter more, for the
    /// same reason: 16 MiB, two loop turns of a core's receive buffers.
    pub queue_overshoot_bytes: u64,
    /// Bytes of MESSAGE frames (estimated) a topic still hands a subscriber whose connection is
    /// full before it misses messages. The producers are paused the moment the subscriber is
    /// full (see `topic_subscriber_stall_ms`), so this only has to hold what was already on its
    /// way: frames decoded and a peer queue's worth of messages between cores (4,096). 8 MiB
    /// holds that for 1 KiB messages; a subscriber that stalls costs no more than this (or one
    /// message, when a message is larger: an empty slack takes one). What the slack holds
    /// waits in the session until the connection drains (see `out_buffer_bytes_max`), so it
    /// need not fit the server's out buffer; the session keeps at most twice this for one
    /// subscription (what the topic sent after the pause, and what was on its way before).
    pub topic_slack_bytes: u64,
    /// A topic subscriber whose connection is full pauses the producers of the topic until it
    /// drains. One that stays full this long is slow,
    /// not bursty: it stops holding back producers (and misses messages past its slack), so a
    /// client that never reads cannot stall a topic for everyone. 5,000 ms: far longer than a
    /// burst takes to drain, far shorter than a publisher's patience.
    pub topic_subscriber_stall_ms: u64,
    /// Smallest interval at which the server will send heart-beats, whatever the client asks:
    /// 1,000 ms, so a client cannot make the server beat thousands of times a second.
    pub heartbeat_send_ms_min: u64,
    /// Interval at which the server would like heart-beats from clients that can send them
    /// (`sy` in the CONNECTED `heart-beat` header): 10,000 ms.
    pub heartbeat_receive_ms: u64,
    /// A client is given up on after this percentage of its heart-beat interval passes with no
    /// data: 200 %, Artemis' `heartBeatToConnectionTtlModifier` 2.0 and CoilMQ's 2x. ActiveMQ
    /// is strict by default and clients complained of spurious disconnects (stomp.py #78,
    /// #179, #203); a dead peer found one interval later costs little.
    pub heartbeat_read_grace_percent: u64,
    /// How often the server promises to call `on_tick`: 100 ms. A heart-beat is sent once the
    /// connection has been quiet for its interval less this, so it is never late.
    pub tick_interval_ms: u64,
    /// Interval between `/queue/monitor` statistics messages: 5,000 ms, as stompserver.
    pub monitor_interval_ms: u64,
    /// Login checks leave the shard's thread: CONNECT yields `Effect::Authenticate` and the
    /// server answers with `on_login_result`. An argon2id check takes tens of milliseconds,
    /// during which a core checking it inline would serve nobody. Off by default, because with
    /// authentication off (`AllowAll`) there is nothing slow to move.
    pub login_offloaded: bool,
    /// A connection that has not sent a complete, valid CONNECT this long after it was
    /// accepted gets ERROR and is closed: 10,000 ms, RabbitMQ's `handshake_timeout`. Without it
    /// a client that connects and says nothing (or half a frame) holds a connection slot and
    /// its buffers for ever. The clock stops at the CONNECT frame: the wait for an offloaded
    /// login's verdict is the server's doing, bounded by its hashing queue, and not held
    /// against the client.
    pub connect_timeout_ms: u64,
    /// A refused login is answered this long after the verdict, so guessing passwords over
    /// one connection after another is slow: 1,000 ms, as login(1)'s delay after a failure is
    /// seconds. The connection is held (and counts against the connection limit) but costs
    /// nothing meanwhile; 0 answers at once.
    pub login_failure_delay_ms: u64,
    /// The `server` header of CONNECTED.
    pub server_name: String,
    /// The memory budget every core of this broker shares (`memory_bytes_max`): stored
    /// messages are charged to it, and producers are paused as it fills
    /// ([`crate::broker::MemoryBudget`]). The default counts and never limits.
    pub memory: &'static MemoryBudget,
}

impl Default for BrokerConfig {
    fn default() -> BrokerConfig {
        BrokerConfig {
            log_enabled: false,
            receipts_wait_for_sync: false,
            persistent_by_default: true,
            prefetch_default_messages: 1000,
            prefetch_default_bytes: 4 * 1024 * 1024,
            out_buffer_bytes_max: 256 * 1024,
            prefetch_messages_max: 65_536,
            deliveries_max: 7,
            subscriptions_per_connection_max: 1024,
            transactions_per_connection_max: 64,
            transaction_frames_max: 10_000,
            transaction_bytes_per_connection_max: 64 * 1024 * 1024,
            receipts_pending_max: 65_536,
            queue_messages_max: 1_000_000_000,
            queue_bytes_max: 1 << 40,
            queue_overshoot_messages: 131_072,
            queue_overshoot_bytes: 16 * 1024 * 1024,
            topic_slack_bytes: 8 * 1024 * 1024,
            topic_subscriber_stall_ms: 5000,
            heartbeat_send_ms_min: 1000,
            heartbeat_receive_ms: 10_000,
            heartbeat_read_grace_percent: 200,
            tick_interval_ms: 100,
            monitor_interval_ms: 5000,
            login_offloaded: false,
            connect_timeout_ms: 10_000,
            login_failure_delay_ms: 1000,
            server_name: concat!("stompd/", env!("CARGO_PKG_VERSION")).to_string(),
            memory: &UNLIMITED,
        }
    }
}

/// Checks a user name and password from CONNECT. The password file and its hashes live in
/// `crate::auth`; the session only needs the verdict, and tests use a fake.
pub trait Authenticator: Send + Sync {
    /// True when `login` may connect with `passcode`. Must take the same time whether or not
    /// the user exists, so the answer cannot be timed.
    fn authenticate(&self, login: &[u8], passcode: &[u8]) -> bool;
}

/// Authentication off (stompserver's default without `-a`): every CONNECT is let in.
#[derive(Clone, Copy, Debug, Default)]
pub struct AllowAll;

impl Authenticator for AllowAll {
    fn authenticate(&self, _login: &[u8], _passcode: &[u8]) -> bool {
        true
    }
}
