//! Creating a shard's ring, with the fastest setup flags the kernel accepts, and turning setup
//! failures into errors that say what is wrong and how to fix it.

use std::io;

use io_uring::IoUring;

use super::ServerError;

/// How the ring was set up, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RingMode {
    /// SINGLE_ISSUER + DEFER_TASKRUN (Linux 6.1): completions run only when the shard asks, so
    /// no interrupt lands in the middle of its work.
    DeferTaskrun,
    /// COOP_TASKRUN + TASKRUN_FLAG (Linux 5.19).
    CoopTaskrun,
    Plain,
}

/// Builds a ring of `entries` submission slots (and four times as many completion slots, so a
/// burst of receives across many connections does not overflow the CQ). Must run on the thread
/// that will use the ring: SINGLE_ISSUER binds the ring to its creator.
pub(super) fn build_ring(entries: u32) -> Result<(IoUring, RingMode), ServerError> {
    let attempt = |mode: RingMode| {
        let mut builder = IoUring::builder();
        builder.setup_cqsize(entries * 4).setup_submit_all();
        match mode {
            RingMode::DeferTaskrun => {
                builder.setup_single_issuer().setup_defer_taskrun();
            }
            RingMode::CoopTaskrun => {
                builder.setup_coop_taskrun().setup_taskrun_flag();
            }
            RingMode::Plain => {}
        }
        builder.build(entries)
    };
    let mut last_error = None;
    for mode in [
        RingMode::DeferTaskrun,
        RingMode::CoopTaskrun,
        RingMode::Plain,
    ] {
        match attempt(mode) {
            Ok(ring) => {
                if mode != RingMode::DeferTaskrun {
                    tracing::warn!(
                        ?mode,
                        reason = %last_error.as_ref().map_or(String::new(), |error: &io::Error| error.to_string()),
                        "io_uring DEFER_TASKRUN not available (needs Linux 6.1); using a slower setup"
                    );
                }
                return Ok((ring, mode));
            }
            // EINVAL: the kernel does not know a flag; try fewer.
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => last_error = Some(error),
            Err(error) => return Err(setup_error("io_uring_setup", error)),
        }
    }
    Err(setup_error(
        "io_uring_setup",
        last_error.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EINVAL)),
    ))
}

/// Names the cause of a failed io_uring setup step and the fix an operator can apply.
pub(super) fn setup_error(step: &'static str, error: io::Error) -> ServerError {
    let (cause, fix) = match error.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => (
            "io_uring is disabled for this process",
            "set sysctl kernel.io_uring_disabled=0, or run outside a container/seccomp profile that blocks io_uring (Docker: --security-opt seccomp=... allowing io_uring_setup, io_uring_enter, io_uring_register)",
        ),
        Some(libc::ENOSYS) => (
            "the kernel has no io_uring (too old, built without CONFIG_IO_URING, or a seccomp filter answers ENOSYS)",
            "run on Linux 6.1 or newer with io_uring enabled",
        ),
        Some(libc::ENOMEM) => (
            "the kernel refused memory for the ring (the locked-memory limit is too low)",
            "raise RLIMIT_MEMLOCK: `ulimit -l unlimited`, LimitMEMLOCK=infinity in the systemd unit, or --ulimit memlock=-1 for Docker; or use fewer --shards",
        ),
        Some(libc::EINVAL) => (
            "the kernel does not support a required io_uring feature",
            "run on Linux 6.1 or newer (multishot receive needs 6.0, provided buffer rings 5.19)",
        ),
        Some(libc::EMFILE) | Some(libc::ENFILE) => (
            "out of file descriptors",
            "raise the open-files limit (`ulimit -n`, LimitNOFILE=)",
        ),
        _ => ("unexpected error", "see the error text"),
    };
    ServerError::IoUring {
        step,
        cause,
        fix,
        source: error,
    }
}

/// Raises the soft open-files limit (RLIMIT_NOFILE) to the hard one and returns the soft
/// limit now in force. Every connection is a descriptor, and the usual soft default (1,024,
/// kept low for programs that still use select(2), which this one does not) is below what a
/// broker serves, while the hard limit is what the administrator allows. Go's runtime does the
/// same at every start; message brokers' packages set LimitNOFILE for the same reason.
pub(super) fn raise_open_files_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok(limit.rlim_cur)
}

/// Pins the calling thread to one CPU of those it may run on: shard `shard` gets the
/// `shard mod n`-th allowed CPU, so more shards than cores share cores evenly.
pub(super) fn pin_to_cpu(shard: usize) -> io::Result<usize> {
    // SAFETY: cpu_set_t is a plain bit set; all-zero is the empty set.
    let mut allowed: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer and size describe `allowed`.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut allowed) }
        != 0
    {
        return Err(io::Error::last_os_error());
    }
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: the index is below CPU_SETSIZE.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &allowed) })
        .collect();
    if cpus.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let cpu = cpus[shard % cpus.len()];
    // SAFETY: as above.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: cpu < CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: the pointer and size describe `set`.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cpu)
}

/// The oldest kernel with everything the loop relies on: multishot receive (6.0) and
/// DEFER_TASKRUN (6.1; the loop falls back without it, but 6.1 is the oldest LTS with both).
pub(super) const KERNEL_VERSION_MIN: (u32, u32) = (6, 0);

/// The running kernel's `major.minor`, from uname.
pub(super) fn kernel_version() -> Option<(u32, u32)> {
    // SAFETY: utsname is plain data; uname fills it.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a utsname.
    if unsafe { libc::uname(&mut name) } != 0 {
        return None;
    }
    let release: Vec<u8> = name
        .release
        .iter()
        .take_while(|&&byte| byte != 0)
        .map(|&byte| byte as u8)
        .collect();
    parse_kernel_version(&String::from_utf8_lossy(&release))
}

/// `"6.18.44-fc-v669"` → `(6, 18)`.
pub(super) fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_parse_to_major_and_minor() {
        assert_eq!(parse_kernel_version("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(parse_kernel_version("6.1"), Some((6, 1)));
        assert_eq!(parse_kernel_version("garbage"), None);
        assert!((5, 19) < KERNEL_VERSION_MIN && (6, 1) >= KERNEL_VERSION_MIN);
    }
}
