//! The broker's one memory budget (`memory_bytes_max`): the bytes clients have made it hold,
//! counted across every core.
//!
//! What is charged: every stored message ([`Message`](super::Message): body, header block and a
//! fixed overhead), from the SEND that made it until the last reference is gone. That one charge
//! follows the message wherever it is held: a queue's ready list or a consumer's unacked list,
//! an open transaction, a peer queue between cores, and a connection's out buffer (large bodies
//! are written from the stored bytes). The server charges the reassembly buffers of frames that
//! span receives and the chunks its out buffers own (encoded heads, small bodies copied in)
//! ([`MemoryBudget::charge`] / [`MemoryBudget::release`] around their capacity).
//!
//! Why one shared atomic and not per-core shares: a message is made on its producer's core and
//! freed wherever its last reference drops (the queue's core, a consumer's core, an out buffer),
//! so per-core shares would need every release sent back to the charging core, or would drift.
//! One relaxed `fetch_add` when a message is made and one `fetch_sub` when it is freed is two
//! atomic operations per message on one cache line: next to the allocation, the copy and the
//! peer-queue hop each message already costs, that is small, and it takes no lock. The count
//! is read with a relaxed load; being a few messages stale only moves a pause by that much.
//!
//! Levels (see `docs/ARCHITECTURE.md`, "Destination state machines"): past seven eighths of the
//! budget producers that can wait are paused (their input is not read); below three quarters
//! they are released (on the next tick); what cannot wait (a transactional SEND) is refused
//! at seven eighths, and nothing is taken past the budget itself.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes charged per stored message on top of its body and header block: the `Message` and
/// `Arc` headers, the boxed slices' allocations, and the allocator's rounding (measured: about
/// 200 bytes of RSS per small message held in a queue).
pub const MESSAGE_OVERHEAD_BYTES: u64 = 256;

/// A budget shared by every core of one broker.
#[derive(Debug)]
pub struct MemoryBudget {
    /// The limit, bytes (`memory_bytes_max`). `u64::MAX` means no limit.
    max: u64,
    /// Bytes charged now, all cores.
    charged: AtomicU64,
}

/// The budget of brokers configured without one (tests, embedders): counts, never limits.
pub static UNLIMITED: MemoryBudget = MemoryBudget::new(u64::MAX);

impl MemoryBudget {
    pub const fn new(max: u64) -> MemoryBudget {
        MemoryBudget {
            max,
            charged: AtomicU64::new(0),
        }
    }

    /// A budget that lives as long as the process: one per broker run, shared by its cores
    /// and by every message it stores (so a message needs no reference count to release it).
    pub fn leak(max: u64) -> &'static MemoryBudget {
        Box::leak(Box::new(MemoryBudget::new(max)))
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn charged(&self) -> u64 {
        self.charged.load(Ordering::Relaxed)
    }

    pub fn charge(&self, bytes: u64) {
        self.charged.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn release(&self, bytes: u64) {
        let before = self.charged.fetch_sub(bytes, Ordering::Relaxed);
        debug_assert!(before >= bytes, "released {bytes} of {before} charged");
    }

    /// Past this, producers that can wait are paused: seven eighths, so the eighth left covers
    /// what is already decoded or between cores when they stop.
    pub fn pause_bytes(&self) -> u64 {
        self.max - self.max / 8
    }

    /// Paused producers are released once the charge is back under three quarters: far enough
    /// below the pause level that they do not flap.
    pub fn resume_bytes(&self) -> u64 {
        self.max - self.max / 4
    }

    /// Past this, queues keep the bodies of their newest logged messages only in the log
    /// (paging): half, so the cache of bodies in memory never crowds out what cannot be
    /// paged (non-persistent messages, out buffers, frames being read) before producers are
    /// paused at seven eighths.
    pub fn page_out_bytes(&self) -> u64 {
        self.max / 2
    }

    pub fn is_limited(&self) -> bool {
        self.max != u64::MAX
    }
}

/// Two configs are the same when they share the same budget (it is identity, not a setting).
impl PartialEq for MemoryBudget {
    fn eq(&self, other: &MemoryBudget) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Eq for MemoryBudget {}

/// Bytes charged to a budget, given back when this is dropped (with the message that holds it,
/// on whatever core that happens).
#[derive(Debug)]
pub struct MemoryCharge {
    budget: &'static MemoryBudget,
    bytes: u64,
}

impl MemoryCharge {
    pub fn new(budget: &'static MemoryBudget, bytes: u64) -> MemoryCharge {
        budget.charge(bytes);
        MemoryCharge { budget, bytes }
    }

    /// Nothing charged (a message made outside a broker, in tests or tools).
    pub fn none() -> MemoryCharge {
        MemoryCharge {
            budget: &UNLIMITED,
            bytes: 0,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn budget(&self) -> &'static MemoryBudget {
        self.budget
    }
}

/// The charge is bookkeeping, not content: two messages with the same content are equal
/// whatever they are charged to.
impl PartialEq for MemoryCharge {
    fn eq(&self, _other: &MemoryCharge) -> bool {
        true
    }
}

impl Eq for MemoryCharge {}

impl Drop for MemoryCharge {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.release(self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_charge_is_given_back_when_dropped() {
        let budget = MemoryBudget::leak(1 << 20);
        let first = MemoryCharge::new(budget, 1000);
        let second = MemoryCharge::new(budget, 24);
        assert_eq!(budget.charged(), 1024);
        drop(first);
        assert_eq!(budget.charged(), 24);
        drop(second);
        assert_eq!(budget.charged(), 0);
    }

    #[test]
    fn levels_sit_below_the_limit() {
        let budget = MemoryBudget::new(8 << 20);
        assert_eq!(budget.pause_bytes(), 7 << 20);
        assert_eq!(budget.resume_bytes(), 6 << 20);
        assert!(budget.is_limited());
        assert!(!UNLIMITED.is_limited());
    }
}
