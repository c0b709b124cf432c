//! Giving freed memory back to the operating system.
//!
//! The broker uses glibc's malloc. Left alone it keeps most of what a burst freed: every core's
//! thread has its own arena, and an arena only shrinks from its top, so one live message above
//! a gigabyte of freed ones pins it all (measured: 30 connections holding 60 MiB each in open
//! transactions, closed, left 514 MiB of RssAnon held 30 s later, 526,536 KiB). `malloc_trim(0)` walks every
//! arena and returns every free page in it (`MADV_DONTNEED`), wherever it sits. It costs a walk
//! of the free chunks under each arena's lock, so it runs on a timer, from one core, and only
//! when there is something to give back: the memory budget's charge has fallen by
//! [`TRIM_FREED_BYTES_MIN`] since the last trim, or [`TRIM_IDLE_INTERVAL_MS`] has passed (for
//! what is freed without being charged, such as a closed connection's buffers). The
//! measurements that chose this over jemalloc settings are in BENCHMARKS.md.

use crate::broker::MemoryBudget;

/// How often the charge is looked at: 200 ms. Memory freed and not yet returned counts in
/// RssAnon on top of what is live, so under churn (transactions refused and dropped while
/// others fill the budget) a slower trim lets RssAnon run further past the budget.
pub const TRIM_CHECK_INTERVAL_MS: u64 = 200;
/// A fall in the charge worth a trim: 4 MiB, small next to any budget, large next to the
/// trim's own cost.
pub const TRIM_FREED_BYTES_MIN: u64 = 4 << 20;
/// A trim at least this often anyway, for memory freed outside the budget's count.
pub const TRIM_IDLE_INTERVAL_MS: u64 = 10_000;

/// Decides when to call `malloc_trim`; one per broker, on one core's tick.
pub struct Trimmer {
    budget: &'static MemoryBudget,
    /// The highest charge seen since the last trim.
    peak_since_trim: u64,
    next_check_ms: u64,
    next_idle_trim_ms: u64,
}

impl Trimmer {
    pub fn new(budget: &'static MemoryBudget) -> Trimmer {
        Trimmer {
            budget,
            peak_since_trim: 0,
            next_check_ms: 0,
            next_idle_trim_ms: TRIM_IDLE_INTERVAL_MS,
        }
    }

    /// Called on every tick with the loop's clock; trims when [`Trimmer::due`] says so.
    pub fn tick(&mut self, now_ms: u64) {
        if self.due(now_ms, self.budget.charged()) {
            trim();
        }
    }

    /// Whether a trim is due at `now_ms` with `charged` bytes charged now.
    fn due(&mut self, now_ms: u64, charged: u64) -> bool {
        self.peak_since_trim = self.peak_since_trim.max(charged);
        if now_ms < self.next_check_ms {
            return false;
        }
        self.next_check_ms = now_ms + TRIM_CHECK_INTERVAL_MS;
        let freed = self.peak_since_trim - charged >= TRIM_FREED_BYTES_MIN;
        if !freed && now_ms < self.next_idle_trim_ms {
            return false;
        }
        self.peak_since_trim = charged;
        self.next_idle_trim_ms = now_ms + TRIM_IDLE_INTERVAL_MS;
        true
    }
}

/// Returns the free pages of every malloc arena to the kernel.
fn trim() {
    // SAFETY: malloc_trim only takes the allocator's own locks; any thread may call it.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_when_the_charge_falls_or_after_the_idle_interval() {
        let budget = MemoryBudget::leak(1 << 30);
        let mut trimmer = Trimmer::new(budget);
        // Nothing freed: no trim until the idle interval.
        let step = TRIM_CHECK_INTERVAL_MS;
        assert!(!trimmer.due(0, 100 << 20));
        assert!(!trimmer.due(step, 100 << 20));
        // Freed a lot, but checked only once per interval.
        assert!(!trimmer.due(step + step / 2, 10 << 20));
        assert!(trimmer.due(2 * step, 10 << 20));
        assert!(!trimmer.due(3 * step, 9 << 20));
        assert!(trimmer.due(2 * step + TRIM_IDLE_INTERVAL_MS, 9 << 20));
    }
}
