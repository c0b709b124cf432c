//! One broker per port: before the shards bind their SO_REUSEPORT listeners, find out whether
//! another socket already listens on the address, and after binding, whether one slipped in.
//!
//! SO_REUSEPORT is what spreads accepts over the shards, but it also lets any process of the same
//! user join the group: a second `stompd` on the same address would start and silently take half
//! of the new connections to a broker with other data. And after `kill -9` the kernel tears the
//! dead broker's io_uring down late; until then its listeners (held by the ring's pending
//! accepts, no longer by any descriptor) stay in the group and reset the connections they get.
//!
//! So the kernel's own table of sockets, `/proc/net/tcp` and `/proc/net/tcp6` of this network
//! namespace, is read for LISTEN sockets whose address overlaps ours (same port, and the same
//! address or a wildcard on either side), and `/proc/*/fd` is scanned for each one's inode:
//! - held by a live process: another server listens there; refuse, naming the address and pid;
//! - held by no descriptor, and the socket is ours (same uid) or we are root (root sees every
//!   descriptor): a dead process's listener being torn down; wait until it is gone, bounded;
//! - another user's, and we are not root: we cannot see its owner. The kernel would refuse the
//!   bind anyway (SO_REUSEPORT groups only join sockets of one uid), so refuse, naming the uid.
//!
//! Without a readable `/proc/net/tcp` (no procfs in a sandbox) the check is skipped with a
//! warning: the bind then behaves as plain SO_REUSEPORT does.
//!
//! The check and the bind are not atomic: two brokers started at the same moment can both find
//! the port free. The re-check after binding closes that: each broker then looks for a listener
//! that is not its own and held by a live process, and refuses if it finds one; whichever of two
//! racing brokers re-checks last sees the other, so they never both keep running (both may
//! refuse, which an operator notices at once).

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

/// The kernel's TCP_LISTEN state in `/proc/net/tcp`'s `st` column.
const STATE_LISTEN: u8 = 0x0A;

/// How often a wait for a dead process's listeners looks again.
const ORPHAN_POLL: Duration = Duration::from_millis(50);

/// One LISTEN socket from `/proc/net/tcp{,6}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Listening {
    pub addr: SocketAddr,
    pub uid: u32,
    pub inode: u64,
}

/// Who holds a listening socket that is in the way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Owner {
    /// A live process: its pid.
    Process(u32),
    /// Another user's socket whose descriptor this process may not see.
    OtherUser(u32),
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Process(pid) => write!(f, "held by process {pid}"),
            Owner::OtherUser(uid) => write!(
                f,
                "held by a process of user {uid}, which this user cannot see"
            ),
        }
    }
}

/// What the check before binding found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Nothing listens on the address (or procfs could not be read).
    Free,
    /// Another server listens there.
    InUse { listening: SocketAddr, owner: Owner },
    /// Listeners of an exited process were still there after the wait.
    StillClosing { listening: SocketAddr },
}

/// Whether a connection to one address could reach a listener on the other: the same port, and
/// the same address or a wildcard of a family that covers the other (an IPv6 wildcard may be
/// dual-stack, so it is taken to cover IPv4 too).
pub(super) fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() {
        return false;
    }
    let (a, b) = (canonical(a.ip()), canonical(b.ip()));
    match (a, b) {
        (IpAddr::V4(x), IpAddr::V4(y)) => x == y || x.is_unspecified() || y.is_unspecified(),
        (IpAddr::V6(x), IpAddr::V6(y)) => x == y || x.is_unspecified() || y.is_unspecified(),
        (IpAddr::V4(_), IpAddr::V6(v6)) | (IpAddr::V6(v6), IpAddr::V4(_)) => v6.is_unspecified(),
    }
}

/// IPv4-mapped IPv6 addresses as the IPv4 address they are.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Parses one table of `/proc/net/tcp` (IPv4) or `/proc/net/tcp6` and keeps the LISTEN rows.
/// Addresses are the kernel's 32-bit words printed in hex in host byte order; the port is in
/// plain hex.
pub(super) fn parse_listening(table: &str) -> Vec<Listening> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, state, uid, inode) = (
                fields.get(1)?,
                fields.get(3)?,
                fields.get(7)?,
                fields.get(9)?,
            );
            if u8::from_str_radix(state, 16).ok()? != STATE_LISTEN {
                return None;
            }
            let (ip, port) = local.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let ip = match ip.len() {
                8 => IpAddr::V4(Ipv4Addr::from(word(ip)?.to_ne_bytes())),
                32 => {
                    let mut octets = [0u8; 16];
                    for (index, chunk) in octets.chunks_mut(4).enumerate() {
                        chunk.copy_from_slice(
                            &word(ip.get(index * 8..index * 8 + 8)?)?.to_ne_bytes(),
                        );
                    }
                    IpAddr::V6(Ipv6Addr::from(octets))
                }
                _ => return None,
            };
            Some(Listening {
                addr: SocketAddr::new(ip, port),
                uid: uid.parse().ok()?,
                inode: inode.parse().ok()?,
            })
        })
        .collect()
}

fn word(hex: &str) -> Option<u32> {
    u32::from_str_radix(hex, 16).ok()
}

/// Every LISTEN socket of this network namespace that overlaps `addr`. `None` when procfs
/// cannot be read at all.
fn listening_on(addr: SocketAddr) -> Option<Vec<Listening>> {
    let mut found = Vec::new();
    let mut read_any = false;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        // A kernel without IPv6 has no tcp6 table; that is not a failure.
        if let Ok(text) = std::fs::read_to_string(table) {
            read_any = true;
            found.extend(
                parse_listening(&text)
                    .into_iter()
                    .filter(|listening| overlaps(listening.addr, addr)),
            );
        }
    }
    read_any.then_some(found)
}

/// The pid of a live process holding a descriptor of each of `inodes` (sockets appear in
/// `/proc/PID/fd` as links to `socket:[INODE]`). Processes whose descriptors this user may not
/// read are skipped.
fn socket_owners(inodes: &HashSet<u64>) -> HashMap<u64, u32> {
    let mut owners = HashMap::new();
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return owners;
    };
    for process in processes.flatten() {
        let Some(pid) = process
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(process.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let inode = target
                .to_str()
                .and_then(|target| target.strip_prefix("socket:["))
                .and_then(|rest| rest.strip_suffix(']'))
                .and_then(|inode| inode.parse::<u64>().ok());
            if let Some(inode) = inode.filter(|inode| inodes.contains(inode)) {
                owners.insert(inode, pid);
            }
        }
        if owners.len() == inodes.len() {
            break;
        }
    }
    owners
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The first of `listeners` held by a live process (this one included: another server in the
/// same process is in the way too), or by another user this process cannot see; `None` when
/// all of them are held by no descriptor at all.
fn live_owner(listeners: &[Listening]) -> Option<(SocketAddr, Owner)> {
    let inodes: HashSet<u64> = listeners.iter().map(|listening| listening.inode).collect();
    let owners = socket_owners(&inodes);
    let euid = effective_uid();
    listeners
        .iter()
        .find_map(|listening| match owners.get(&listening.inode) {
            Some(&pid) => Some((listening.addr, Owner::Process(pid))),
            None if euid != 0 && listening.uid != euid => {
                Some((listening.addr, Owner::OtherUser(listening.uid)))
            }
            None => None,
        })
}

/// The check before binding `addr`: refuses a port another server listens on, and waits up to
/// `wait_max` for the listeners of an exited process to go away.
pub(super) fn check_before_bind(addr: SocketAddr, wait_max: Duration) -> Verdict {
    // Port 0: the kernel picks a port no socket is bound to.
    if addr.port() == 0 {
        return Verdict::Free;
    }
    let start = Instant::now();
    let mut announced = false;
    loop {
        let Some(listeners) = listening_on(addr) else {
            tracing::warn!(
                %addr,
                "cannot read /proc/net/tcp: not checking whether another server listens on the address"
            );
            return Verdict::Free;
        };
        if listeners.is_empty() {
            if announced {
                tracing::info!(
                    %addr,
                    waited_ms = start.elapsed().as_millis() as u64,
                    "the exited process's listeners are gone"
                );
            }
            return Verdict::Free;
        }
        if let Some((listening, owner)) = live_owner(&listeners) {
            return Verdict::InUse { listening, owner };
        }
        if start.elapsed() >= wait_max {
            return Verdict::StillClosing {
                listening: listeners[0].addr,
            };
        }
        if !announced {
            announced = true;
            tracing::warn!(
                %addr,
                sockets = listeners.len(),
                wait_max_ms = wait_max.as_millis() as u64,
                "listeners of an exited process (the kernel closes io_uring sockets late after a crash) are still on the address; waiting for them to go before listening"
            );
        }
        std::thread::sleep(ORPHAN_POLL);
    }
}

/// The check after binding: another live process's listener on the address, other than ours
/// (`ours` are the inodes of this process's listeners).
pub(super) fn check_after_bind(
    addr: SocketAddr,
    ours: &HashSet<u64>,
) -> Option<(SocketAddr, Owner)> {
    let others: Vec<Listening> = listening_on(addr)?
        .into_iter()
        .filter(|listening| !ours.contains(&listening.inode))
        .collect();
    if others.is_empty() {
        return None;
    }
    live_owner(&others)
}

/// The inode of a socket, as `/proc/net/tcp` names it.
pub(super) fn socket_inode(fd: std::os::fd::RawFd) -> io::Result<u64> {
    // SAFETY: stat is plain data; fstat fills it.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a pointer to a live stat.
    if unsafe { libc::fstat(fd, &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.st_ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_rows_parse_to_listening_sockets() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:EDAD 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 12345 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:EDAD 0100007F:9C40 01 00000000:00000000 00:00000000 00000000  1000        0 12346 1 0000000000000000 20 4 30 10 -1\n   2: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 999 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(
            parse_listening(v4),
            vec![
                Listening {
                    addr: "127.0.0.1:60845".parse().unwrap(),
                    uid: 1000,
                    inode: 12345
                },
                Listening {
                    addr: "0.0.0.0:22".parse().unwrap(),
                    uid: 0,
                    inode: 999
                },
            ]
        );
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000000000000000000001000000:EDAD 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 777 1 0000000000000000 100 0 0 10 0\n   1: 0000000000000000FFFF00000100007F:EDAD 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 778 1 0000000000000000 100 0 0 10 0\n";
        let parsed = parse_listening(v6);
        assert_eq!(parsed[0].addr, "[::1]:60845".parse().unwrap());
        assert_eq!(parsed[1].addr, "[::ffff:127.0.0.1]:60845".parse().unwrap());
    }

    #[test]
    fn addresses_overlap_on_the_same_port_when_equal_or_wildcard() {
        let overlap = |a: &str, b: &str| overlaps(a.parse().unwrap(), b.parse().unwrap());
        assert!(overlap("127.0.0.1:61613", "127.0.0.1:61613"));
        assert!(overlap("127.0.0.1:61613", "0.0.0.0:61613"));
        assert!(overlap("0.0.0.0:61613", "10.0.0.1:61613"));
        assert!(overlap("127.0.0.1:61613", "[::]:61613"));
        assert!(overlap("[::ffff:127.0.0.1]:61613", "127.0.0.1:61613"));
        assert!(overlap("[::1]:61613", "[::]:61613"));
        assert!(!overlap("127.0.0.1:61613", "127.0.0.1:61614"));
        assert!(!overlap("127.0.0.1:61613", "10.0.0.1:61613"));
        assert!(!overlap("127.0.0.1:61613", "[::1]:61613"));
        assert!(!overlap("0.0.0.0:61613", "[::1]:61613"));
    }

    #[test]
    fn a_listener_that_no_descriptor_holds_is_waited_for() {
        use std::os::fd::{AsRawFd, IntoRawFd};
        // What a crashed broker leaves: a listener kept open only by a ring's pending accept.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        if listening_on(addr).is_none() {
            return; // No procfs here: nothing to check.
        }
        let mut ring = io_uring::IoUring::new(8).unwrap();
        let accept = io_uring::opcode::AcceptMulti::new(io_uring::types::Fd(listener.as_raw_fd()))
            .build()
            .user_data(1);
        // SAFETY: the accept takes no buffers; the ring holds its own reference to the file.
        unsafe { ring.submission().push(&accept).unwrap() };
        ring.submit().unwrap();
        // SAFETY: the descriptor is ours; closing it leaves the socket to the ring alone.
        unsafe { libc::close(listener.into_raw_fd()) };

        assert_eq!(
            check_before_bind(addr, Duration::from_millis(200)),
            Verdict::StillClosing { listening: addr }
        );
        // The ring goes, and with it the listener (the kernel may take a moment).
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(ring);
        });
        assert_eq!(
            check_before_bind(addr, Duration::from_secs(20)),
            Verdict::Free
        );
        closer.join().unwrap();
    }

    #[test]
    fn a_listener_of_this_process_is_seen_with_its_owner() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let inode = socket_inode(std::os::fd::AsRawFd::as_raw_fd(&listener)).unwrap();
        let Some(found) = listening_on(addr) else {
            return; // No procfs here: nothing to check.
        };
        assert!(
            found.iter().any(|listening| listening.inode == inode),
            "{found:?}"
        );
        let owners = socket_owners(&HashSet::from([inode]));
        assert_eq!(owners.get(&inode), Some(&std::process::id()));
        // A listener is not in the way of itself, but is of anything else.
        assert_eq!(check_after_bind(addr, &HashSet::from([inode])), None);
        assert_eq!(
            check_after_bind(addr, &HashSet::new()),
            Some((addr, Owner::Process(std::process::id())))
        );
        assert_eq!(
            check_before_bind(addr, Duration::from_secs(1)),
            Verdict::InUse {
                listening: addr,
                owner: Owner::Process(std::process::id())
            }
        );
    }
}
