//! What sessions and destinations may touch while handling one input ([`Ctx`]), apart from
//! the [`Shard`](super::Shard) that builds it: session.rs and destination.rs depend on this
//! module only, not on shard.rs, so the broker's modules import each other without a cycle.

use std::collections::VecDeque;

use super::config::BrokerConfig;
use super::effects::{DurableToken, Effect, Effects, Record, ShardMessage};
use super::store::Store;
use super::types::{MessageId, ShardId};

/// Running totals since the shard started, for the server's metrics endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Messages accepted by a destination of this shard (queue or topic).
    pub messages_accepted_total: u64,
    /// MESSAGE frames handed out by destinations of this shard (redeliveries included).
    pub deliveries_total: u64,
    /// Topic deliveries skipped because the subscriber was paused or out of credit.
    pub topic_deliveries_dropped_total: u64,
    /// Messages dropped because their `expires` time passed.
    pub messages_expired_total: u64,
    /// Messages moved to a dead-letter queue.
    pub messages_dead_lettered_total: u64,
    /// Paged-out messages the store could not read back (damage; each is also logged).
    pub messages_unreadable_total: u64,
    /// Connections closed with an ERROR frame.
    pub errors_total: u64,
}

/// Messages to send once a log append is durable (a RECEIPT's confirmation, a dead-lettered
/// message's release from its old queue), in append order.
#[derive(Debug, Default)]
pub(crate) struct DurableWaits {
    pub(super) next: u64,
    pub(super) waiting: VecDeque<(DurableToken, ShardId, ShardMessage)>,
}

/// What sessions and destinations may touch while handling one input: the clock, the
/// configuration, and the ways out (effects, the local message queue, the log, new ids).
pub(crate) struct Ctx<'a> {
    pub(crate) now_ms: u64,
    pub(crate) config: &'a BrokerConfig,
    pub(crate) shard: ShardId,
    pub(crate) shard_count: u16,
    pub(crate) effects: &'a mut Effects,
    pub(super) local: &'a mut VecDeque<ShardMessage>,
    pub(super) durable: &'a mut DurableWaits,
    /// Where queues read paged-out bodies back from.
    pub(crate) store: &'a mut dyn Store,
    pub(super) next_message_seq: &'a mut u64,
    pub(crate) counters: &'a mut Counters,
}

impl Ctx<'_> {
    /// Sends a typed message to shard `to`: queued locally when that is this shard (handled
    /// before the entry point returns), else handed to the server.
    pub(crate) fn route(&mut self, to: ShardId, message: ShardMessage) {
        if to == self.shard {
            self.local.push_back(message);
        } else {
            self.effects.list.push(Effect::Peer { to, message });
        }
    }

    pub(crate) fn append(&mut self, record: Record, token: Option<DurableToken>) {
        self.effects.list.push(Effect::Append { record, token });
    }

    /// A token for an append; once the server reports it durable, `then` goes to shard `to`.
    pub(crate) fn wait_durable(&mut self, to: ShardId, then: ShardMessage) -> DurableToken {
        let token = DurableToken(self.durable.next);
        self.durable.next += 1;
        self.durable.waiting.push_back((token, to, then));
        token
    }

    pub(crate) fn next_message_id(&mut self) -> MessageId {
        let seq = *self.next_message_seq;
        *self.next_message_seq += 1;
        MessageId {
            shard: self.shard,
            seq,
        }
    }
}

/// Builds a [`Ctx`] from a `Shard`'s fields: a macro, not a method, so the borrows stay
/// per field and the shard's `sessions` and `destinations` remain usable beside it.
macro_rules! ctx {
    ($shard:expr, $now:expr, $out:expr) => {
        Ctx {
            now_ms: $now,
            config: &$shard.config,
            shard: $shard.id,
            shard_count: $shard.shard_count,
            effects: $out,
            local: &mut $shard.local,
            durable: &mut $shard.durable,
            store: &mut $shard.store,
            next_message_seq: &mut $shard.next_message_seq,
            counters: &mut $shard.counters,
        }
    };
}
pub(super) use ctx;
