//! What the broker logic reads back from its shard's store: the bodies of messages a queue
//! paged out, and the records of a queue's tail (see `super::tail`). Writes still leave as [`super::Effect::Append`] effects, carried out by the
//! server after each call; a read cannot wait for that, so the shard holds its store and a
//! queue calls it in place (the store is a memory-mapped log: a read touches no socket and
//! does not block on more than a page fault).

use std::collections::BTreeSet;
use std::sync::Arc;

use super::types::{Message, MessageId, Paged, StoreRef};

/// Live records of a queue that its tail's scan passes over: they are held in memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Skip {
    /// By position: messages recovery put in the queue's head (delivered before a restart).
    pub at: BTreeSet<StoreRef>,
    /// By id: messages logged again while the tail existed (handed back unwritten, see
    /// `Queue::returned_all`), whose new records land among the tail's. Each is forgotten
    /// once passed.
    pub ids: BTreeSet<MessageId>,
}

impl Skip {
    /// Whether the scan passes over the record of `id` at `at`.
    pub fn passes_over(&mut self, at: StoreRef, id: MessageId) -> bool {
        self.at.contains(&at) || self.ids.remove(&id)
    }
}

/// What [`Store::scan`] is asked: up to `max` live message records of queue `destination`,
/// in store order, from `from` on, but those `skip` passes over, appended to `out` as index
/// entries.
#[derive(Debug)]
pub struct TailScan<'a> {
    pub destination: &'a Arc<[u8]>,
    pub from: StoreRef,
    pub skip: &'a mut Skip,
    pub max: usize,
    pub out: &'a mut Vec<Paged>,
}

/// Where a [`Store::scan`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scanned {
    /// Where the next scan starts: after the last record handed out, or the store's end.
    pub next: StoreRef,
    /// The scan reached the end of what the store has written before it found `max` records.
    pub at_end: bool,
}

/// How much of its disk budget (`disk_bytes_max`, this shard's share) the store holds, as
/// producer flow control reads it. The levels are the memory budget's: producers are paused
/// past seven eighths and released under three quarters, so they do not flap; past the budget
/// itself the store refuses the append (the SEND gets ERROR `message not stored`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DiskPressure {
    /// Under three quarters: producers paused for disk may go on.
    #[default]
    Low,
    /// Between three quarters and seven eighths: nobody new is paused, nobody released.
    Easing,
    /// Past seven eighths: a producer whose logged SEND arrives is paused.
    High,
}

impl DiskPressure {
    /// The level of `held` bytes out of a budget of `max` (`u64::MAX`: no budget).
    pub fn of(held: u64, max: u64) -> DiskPressure {
        if max == u64::MAX {
            DiskPressure::Low
        } else if held > max - max / 8 {
            DiskPressure::High
        } else if held > max - max / 4 {
            DiskPressure::Easing
        } else {
            DiskPressure::Low
        }
    }
}

/// A shard's store, as the broker sees it.
pub trait Store: Send {
    /// The message whose record `entry` names, on queue `destination`, with its body and
    /// headers, or `None` when it cannot be read (the store says why in its log). A message
    /// is only ever paged out once its record is written, so `None` means damage.
    fn load(&mut self, destination: &Arc<[u8]>, entry: &Paged) -> Option<Message>;

    /// Reads the next members of a queue's tail ([`TailScan`]; [`Skip::passes_over`] decides
    /// on each of the queue's records). Records written by an earlier run that were transient
    /// are not live. A record that cannot be read is passed over (the store says why in its
    /// log).
    fn scan(&mut self, scan: TailScan<'_>) -> Scanned;

    /// How full the store's disk budget is now (as of the appends carried out so far). A
    /// question answered from the store's own bookkeeping: no I/O.
    fn disk_pressure(&self) -> DiskPressure {
        DiskPressure::Low
    }
}

/// No store: nothing is logged, so nothing is ever paged out (`--queue-type memory`, tests).
#[derive(Debug, Default)]
pub struct NoStore;

impl Store for NoStore {
    fn load(&mut self, _destination: &Arc<[u8]>, _entry: &Paged) -> Option<Message> {
        None
    }

    fn scan(&mut self, scan: TailScan<'_>) -> Scanned {
        Scanned {
            next: scan.from,
            at_end: true,
        }
    }
}

impl<S: Store> Store for Option<S> {
    fn load(&mut self, destination: &Arc<[u8]>, entry: &Paged) -> Option<Message> {
        self.as_mut()?.load(destination, entry)
    }

    fn scan(&mut self, scan: TailScan<'_>) -> Scanned {
        match self {
            Some(store) => store.scan(scan),
            None => NoStore.scan(scan),
        }
    }

    fn disk_pressure(&self) -> DiskPressure {
        self.as_ref().map_or(DiskPressure::Low, S::disk_pressure)
    }
}

#[cfg(test)]
mod tests {
    use super::DiskPressure;

    #[test]
    fn disk_pressure_levels_are_the_memory_budgets() {
        let max = 8 << 20;
        assert_eq!(DiskPressure::of(6 << 20, max), DiskPressure::Low);
        assert_eq!(DiskPressure::of((6 << 20) + 1, max), DiskPressure::Easing);
        assert_eq!(DiskPressure::of(7 << 20, max), DiskPressure::Easing);
        assert_eq!(DiskPressure::of((7 << 20) + 1, max), DiskPressure::High);
        assert_eq!(DiskPressure::of(u64::MAX - 1, u64::MAX), DiskPressure::Low);
    }
}
