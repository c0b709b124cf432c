//! Counting while a run goes on, and the process facts a report needs.
//!
//! Each worker thread owns one [`Meter`] slot and stores its running count into it with a
//! relaxed store (no read-modify-write, no sharing of cache lines), and the coordinating thread
//! sums the slots once per tick. CPU time comes from `getrusage` for the load generator itself
//! and from `/proc/PID/stat` for a broker named by pid, so a report says whether the client or
//! the broker was the one using the cores.

use std::fs;
use std::sync::atomic::{AtomicU64, Ordering};

/// One thread's counters, alone on a cache line so threads do not slow each other.
#[repr(align(64))]
#[derive(Debug, Default)]
pub struct Slot {
    pub messages: AtomicU64,
    pub bytes: AtomicU64,
}

/// Counters for one role (senders or receivers), one slot per thread.
#[derive(Debug)]
pub struct Meter {
    slots: Vec<Slot>,
}

impl Meter {
    pub fn new(threads: usize) -> Meter {
        Meter {
            slots: (0..threads.max(1)).map(|_| Slot::default()).collect(),
        }
    }

    /// Publishes thread `index`'s totals so far. Only that thread writes its slot.
    pub fn store(&self, index: usize, messages: u64, bytes: u64) {
        let slot = &self.slots[index];
        slot.messages.store(messages, Ordering::Relaxed);
        slot.bytes.store(bytes, Ordering::Relaxed);
    }

    /// (messages, bytes) over all threads.
    pub fn total(&self) -> (u64, u64) {
        self.slots.iter().fold((0, 0), |(messages, bytes), slot| {
            (
                messages + slot.messages.load(Ordering::Relaxed),
                bytes + slot.bytes.load(Ordering::Relaxed),
            )
        })
    }
}

/// CPU seconds (user + system) this process has used so far.
pub fn own_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass and reads nothing else.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return 0.0;
        }
        usage
    };
    let seconds = |time: libc::timeval| time.tv_sec as f64 + time.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// CPU seconds (user + system) process `pid` has used, from `/proc/PID/stat`.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after its closing ')' do not.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of the file (utime, stime) are 12 and 13 after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks > 0.0).then(|| (utime + stime) / ticks)
}

/// Resident memory of process `pid` in KiB, from `VmRSS` in `/proc/PID/status`.
pub fn process_rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Raises the open-file limit to its hard maximum, for workloads with many connections.
pub fn raise_file_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit read and write only the struct we pass.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        limit.rlim_cur
    }
}

/// Asks the kernel to wake this thread's sleeps on time (1 µs slack instead of 50 µs), for the
/// paced sender whose gaps at 10k msgs/s are only 100 µs.
pub fn tight_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and affects only the calling thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meter_sums_slots() {
        let meter = Meter::new(3);
        meter.store(0, 5, 50);
        meter.store(2, 7, 70);
        meter.store(0, 6, 60);
        assert_eq!(meter.total(), (13, 130));
    }

    #[test]
    fn reads_own_process_facts() {
        let pid = std::process::id();
        assert!(process_rss_kib(pid).is_some_and(|kib| kib > 0));
        assert!(process_cpu_seconds(pid).is_some());
        assert!(own_cpu_seconds() >= 0.0);
    }
}
