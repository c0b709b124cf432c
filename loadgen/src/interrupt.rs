//! Ctrl-C (SIGINT) and SIGTERM end a run early but cleanly: producers stop, consumers drain,
//! and the summary of what ran so far is printed, as operators expect of a benchmark that is
//! taking too long. A second signal kills the process as usual.

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
    // SAFETY: signal() is async-signal-safe (POSIX.1 list); restoring the default action makes
    // the next signal end the process.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
    }
}

/// Routes SIGINT and SIGTERM to [`interrupted`]. For the binary; the library never installs it.
pub fn install() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic and calls signal(), both async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// Whether the user asked the run to stop.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}
