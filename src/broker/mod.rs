//! The broker logic, sans I/O: sessions (one per connection) and destinations (queues and
//! topics), grouped per core in a [`Shard`]. No sockets, threads or clocks: the server feeds
//! decoded frames, messages from other shards, durability reports and timer ticks, each with
//! the time, and carries out the [`Effects`] that come back. The same inputs give the same
//! outputs, so every STOMP behaviour is tested exactly and a multi-shard run replays from a seed.
//!
//! Ownership: a session lives on the shard that accepted its connection; a destination lives
//! on [`shard_of`] its name (FNV-1a 64 modulo the shard count, stable across restarts). They
//! talk only through [`ShardMessage`]s, routed the same way whether both ends share a shard or
//! not. The logic relies on one property of the transport: messages from one shard to another
//! arrive in the order they were sent.
//!
//! The seams, in the order a connection meets them:
//! - [`Shard::new`], then [`Shard::restore`] with the messages the log recovered;
//! - [`Shard::open_connection`] on accept; [`Shard::on_input`] whenever bytes arrive;
//!   [`Shard::on_frame`] per decoded frame; [`Shard::on_decode_error`] when decoding fails;
//!   [`Shard::on_login_result`] with the verdict on an [`Effect::Authenticate`] (only with
//!   `login_offloaded`), or [`Shard::on_login_queue_full`] when it could not be queued;
//! - [`Shard::on_writable`] when a connection's output buffer fills or drains;
//!   [`Shard::on_flushed`] when it is empty again (auto-ack windows refill only then);
//! - [`Shard::on_peer_message`] for each [`Effect::Peer`] another shard produced;
//! - [`Shard::on_durable`] once log appends up to a [`DurableToken`] are durable;
//! - [`Shard::on_tick`] at least every `tick_interval_ms`;
//! - [`Shard::on_connection_lost`] when the socket dies; [`Shard::on_shutdown`] when stopping;
//! - [`Shard::metrics`] and [`Shard::queue_stats`] at scrape time.
//!
//! Invariants the tests check for any interleaving (`tests/property.rs`, `tests/simulation.rs`):
//! a queue message is consumed once or still held (or expired); a redelivery is marked; nothing
//! reaches a subscription after UNSUBSCRIBE; unmarked deliveries keep each producer's order;
//! RECEIPTs keep frame order and follow durability when required.
//!
//! Monitor: a subscription to `/queue/monitor` receives, every `monitor_interval_ms`, one
//! MESSAGE listing every queue in stompserver's format (its README): `Queue: /queue/test`,
//! then `size: 50`, `dequeued: 250`, `enqueued: 300` on lines of their own, then a blank line.
//! Each shard publishes its statistics to the others on the same timer, so figures from other
//! shards are at most one interval old.

mod config;
mod ctx;
mod destination;
mod effects;
mod error;
mod memory;
mod session;
mod shard;
mod store;
mod tail;
mod types;

#[cfg(test)]
mod tests;

pub use config::{AllowAll, Authenticator, BrokerConfig};
pub use ctx::Counters;
pub use effects::{DurableToken, Effect, Effects, HeartbeatPlan, Record, Rejection, ShardMessage};
pub use error::{write_error_frame, ProtocolError, SUPPORTED_VERSIONS};
pub use memory::{MemoryBudget, MemoryCharge, MESSAGE_OVERHEAD_BYTES, UNLIMITED};
pub use shard::{RestoreError, Shard, ShardMetrics};
pub use store::{DiskPressure, NoStore, Scanned, Skip, Store, TailScan};
pub use types::{
    dead_letter_queue, shard_of, AckMode, ConnectionId, ConsumerKey, DestinationKind, Message,
    MessageId, Paged, QueueStats, Recovered, ShardId, StoreRef, StoredAt, DEAD_LETTER_PREFIX,
    MONITOR_DESTINATION,
};
