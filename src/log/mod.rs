//! The durable-queue log: each shard appends the messages of its queues, and the
//! acknowledgements that retire them, to its own memory-mapped segmented log, and rebuilds its
//! queues from it at start. Topics never touch it.
//!
//! - [`format`](mod@format): the bytes on disk (sans-IO encode, decode and scan), described byte by byte
//!   in `docs/log-format.md`.
//! - [`segment`]: one preallocated, mapped segment file; read-only opening for tools.
//! - [`shard`]: the shard's log: append, ack, delivered marks, group-commit syncs handed to
//!   the event loop, reclamation of fully-acknowledged segments, recovery.
//! - [`policy`]: `--fsync always | every:<ms> | never`.
//! - [`store`]: the store the broker talks to ([`Durability`]): the broker's records as
//!   appends, deferred to the end of a pass, reads of paged messages and queue tails, recovery
//!   into the broker's queues, and the order in which durability is reported.
//! - [`inspect`]: read-only snapshots of a shard directory for the `stompd-log` tool, with the
//!   scanner and reclaim rule recovery uses.

pub mod error;
pub mod format;
pub mod inspect;
pub mod policy;
pub mod segment;
pub mod shard;
pub mod store;
// Shared by the tests and the fuzz target (fuzz/), which is a separate crate and can only
// reach what the library exports.
#[doc(hidden)]
pub mod testing;

pub use error::LogError;
pub use format::{
    BinaryId, FormatError, MessageRecord, Position, RecordView, StoredId, FORMAT_VERSION,
};
pub use inspect::{list_shards, ShardInspection};
pub use policy::FsyncPolicy;
pub use segment::{list_segments, SegmentReader};
pub use shard::{
    reclaimable_segments, shard_dir, LogConfig, PendingMessage, RecoveredMessage, RecoveredQueue,
    Recovery, RecoveryReport, ShardLog, SkippedRecord, SyncRequest, SyncTarget, TailCut,
};
pub use store::{Durability, NotStored, Settled, SYNC_TOKEN};
