//! The network server: one pinned thread per core ("shard"), each running its own io_uring
//! event loop over the connections it accepted, with no locks between shards.
//!
//! What each shard owns: its ring, a SO_REUSEPORT listener (the kernel spreads new connections
//! over the shards' listeners, and a connection never moves), a provided buffer ring that all its
//! receives land in, its connection table (per connection: a decoder, a bounded reassembly buffer
//! and an out buffer), a [`ShardHandler`] with the broker state of that shard, and the receiving
//! ends of one bounded queue from every other shard. Shards talk only through those queues
//! (`mesh.rs`), with an io_uring MSG_RING doorbell when the target sleeps.
//!
//! The seam with the broker logic is the [`ShardHandler`] trait: the loop hands it decoded frames
//! (borrowed from the receive buffer), peer messages and ticks; the handler answers through
//! [`ShardIo`]. Decode errors never reach the handler: the loop sends the ERROR frame and closes.
//! [`relay`] is a small handler used to test the transport; the broker replaces it.
//!
//! Invariants: a shard's state is touched only by its thread; every buffer is bounded (receive
//! ring, reassembly by the frame limit, out buffer by `out_buffer_bytes_max` plus one frame,
//! peer queues by `peer_queue_len_max`); a slot is released only once no operation on it is in
//! flight in the kernel.

mod bufring;
mod core;
mod handler;
mod mesh;
mod out;
mod ports;
pub mod relay;
mod setup;
mod shard;

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use socket2::{Domain, Socket, Type};
use thiserror::Error;

use crate::codec::Limits;

pub use handler::{CloseReason, ConnId, ShardHandler, ShardId, ShardIo};

/// Everything the transport needs to know. [`ServerConfig::default`] gives the production values.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Shard threads, each pinned to a CPU with its own ring. Defaults to the CPUs this process
    /// may use; more shards than CPUs is allowed (they share CPUs round-robin).
    pub shards: usize,
    /// Frame limits; the reassembly buffer of a connection never holds more than one frame plus
    /// one receive.
    pub limits: Limits,
    /// Open connections over all shards (each shard takes its share, rounded up). 10,000: the
    /// C10k mark, well inside the default open-files limits of systemd services (524,288) and
    /// a few hundred MiB at worst-case buffering.
    pub connections_max: usize,
    /// Bytes queued for one client past which [`ShardIo::is_out_full`] says stop delivering.
    /// 256 KiB: about ten round trips of a fast consumer's window, small enough that 10,000
    /// stalled consumers cost 2.5 GiB at most.
    pub out_buffer_bytes_max: usize,
    /// Size of one provided receive buffer. 32 KiB: big enough that a burst of small frames
    /// shares one buffer (with incremental consumption), as measured in research/io_uring.md.
    pub recv_buffer_bytes: usize,
    /// Provided receive buffers per shard (a power of two). 256 × 32 KiB = 8 MiB per shard: the
    /// research measured a few hundred 16–64 KiB buffers as the sweet spot.
    pub recv_buffers_count: u16,
    /// Messages per shard-pair queue. 4,096: a few milliseconds of traffic at a million
    /// messages per second, so a briefly busy shard does not stall its producers.
    pub peer_queue_len_max: usize,
    /// Submission queue entries per ring. 1,024 covers a full loop iteration's sends for many
    /// hundreds of connections; the loop submits early when it fills.
    pub ring_entries: u32,
    /// The shard timer: heart-beat checks, linger deadlines, [`ShardHandler::on_tick`]. 50 ms is
    /// fine enough for heart-beats of a second or more.
    pub tick_ms: u64,
    /// How long a closing connection may take to flush and to see the client's EOF before it is
    /// cut. 2 s: enough for a client to read an ERROR frame.
    pub close_linger_ms: u64,
    /// On SIGINT/SIGTERM: how long in-flight work may take before connections are cut. 5 s, well
    /// under systemd's 90 s stop timeout.
    pub shutdown_drain_ms: u64,
    /// Pin shard threads to CPUs.
    pub pin_threads: bool,
    /// How long [`Server::bind`] waits for listeners on the address that no process holds any
    /// more (a crashed broker's, which the kernel closes late: io_uring's pending accepts keep
    /// them alive for a moment) before it gives up. 30 s: the teardown takes milliseconds to a
    /// few seconds on a loaded machine; past that something else is wrong.
    pub listen_orphan_wait_ms: u64,
    /// Heart-beat policy, applied by the handler when it negotiates (STOMP 1.2 "Heart-beating").
    pub heartbeat: HeartbeatConfig,
    /// The broker's memory budget: the reassembly buffers of frames that span receives and the
    /// out buffers' own chunks are charged to it (the broker charges the messages). The
    /// default counts and never limits.
    pub memory: &'static crate::broker::MemoryBudget,
}

/// Heart-beat policy: what the server offers in CONNECTED and how much slack it grants.
#[derive(Clone, Copy, Debug)]
pub struct HeartbeatConfig {
    /// The `sx` the server puts in CONNECTED: it can send heart-beats this often. 0 turns
    /// server heart-beats off. 10 s, ActiveMQ's and RabbitMQ's usual client setting.
    pub send_ms: u64,
    /// The `sy` the server puts in CONNECTED: it wants the client's heart-beats this often.
    pub receive_ms: u64,
    /// A client is closed after `interval × read_grace_percent / 100` of silence. 200 %: the
    /// spec asks for tolerance and networks stall; RabbitMQ uses two missed beats too.
    pub read_grace_percent: u64,
}

impl Default for HeartbeatConfig {
    fn default() -> HeartbeatConfig {
        HeartbeatConfig {
            send_ms: 10_000,
            receive_ms: 10_000,
            read_grace_percent: 200,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 61613)),
            shards: std::thread::available_parallelism().map_or(1, |count| count.get()),
            limits: Limits::DEFAULT,
            connections_max: 10_000,
            out_buffer_bytes_max: 256 * 1024,
            recv_buffer_bytes: 32 * 1024,
            recv_buffers_count: 256,
            peer_queue_len_max: 4096,
            ring_entries: 1024,
            tick_ms: 50,
            close_linger_ms: 2_000,
            shutdown_drain_ms: 5_000,
            pin_threads: true,
            listen_orphan_wait_ms: 30_000,
            heartbeat: HeartbeatConfig::default(),
            memory: &crate::broker::UNLIMITED,
        }
    }
}

/// Why the server could not start or had to stop.
#[derive(Debug, Error)]
pub enum ServerError {
    #[error("invalid configuration: {0}")]
    Config(&'static str),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("another server already listens on {addr} (its socket on {listening} is {owner}). Fix: stop it, or give this broker another --listen address")]
    AddressInUse {
        addr: SocketAddr,
        listening: SocketAddr,
        /// Who holds it: a pid, or a user this process cannot see into.
        owner: String,
    },
    #[error("cannot listen on {addr}: listeners of an exited process are still open on {listening} after {waited_ms} ms. Fix: wait and start again, or use another --listen address")]
    AddressStillClosing {
        addr: SocketAddr,
        listening: SocketAddr,
        waited_ms: u64,
    },
    #[error("{step} failed: {cause} ({source}). Fix: {fix}")]
    IoUring {
        step: &'static str,
        cause: &'static str,
        fix: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "Linux {}.{} is too old: the server needs multishot receive (Linux {}.{}). Fix: run on Linux 6.1 or newer",
        found.0, found.1, setup::KERNEL_VERSION_MIN.0, setup::KERNEL_VERSION_MIN.1
    )]
    KernelTooOld { found: (u32, u32) },
    #[error("cannot start shard thread: {0}")]
    Thread(#[source] io::Error),
    #[error("shard {0} panicked")]
    ShardPanicked(ShardId),
    #[error("shard {shard}: io_uring_enter failed: {source}")]
    Enter {
        shard: ShardId,
        #[source]
        source: io::Error,
    },
}

/// The destination's owner: the broker's placement rule ([`crate::broker::shard_of`], FNV-1a 64
/// of the name modulo the shard count, stable across builds because durable queues live in the
/// owning shard's log), in the loop's shard numbering, so handlers that are not the broker (the
/// relay) place destinations the same way.
pub fn shard_of(name: &[u8], shards: usize) -> ShardId {
    let shards = u16::try_from(shards).expect("shard counts fit in u16 (config allows 1024)");
    usize::from(crate::broker::shard_of(name, shards).0)
}

/// Asks a running server to stop; clone it freely. Triggering is idempotent: an atomic store and
/// a `write` to each shard's eventfd. Call it from a thread (as [`shutdown_on_signals`] does),
/// not from inside a signal handler: it takes a lock.
#[derive(Clone, Default)]
pub struct Shutdown {
    inner: Arc<ShutdownInner>,
}

#[derive(Default)]
struct ShutdownInner {
    requested: AtomicBool,
    /// One eventfd per shard, read by a ring op, so a sleeping shard wakes at once.
    wakers: Mutex<Vec<Arc<OwnedFd>>>,
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    pub fn trigger(&self) {
        self.inner.requested.store(true, Ordering::SeqCst);
        let wakers = self
            .inner
            .wakers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for waker in wakers.iter() {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
            unsafe { libc::write(waker.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    pub fn is_triggered(&self) -> bool {
        self.inner.requested.load(Ordering::SeqCst)
    }

    fn register(&self, waker: Arc<OwnedFd>) {
        self.inner
            .wakers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(waker);
    }
}

/// Triggers `shutdown` on the first SIGINT or SIGTERM; a second one exits at once with status
/// 130, for an operator who does not want to wait for the drain.
pub fn shutdown_on_signals(shutdown: &Shutdown) -> io::Result<std::thread::JoinHandle<()>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    let shutdown = shutdown.clone();
    std::thread::Builder::new()
        .name("stompd-signals".into())
        .spawn(move || {
            let mut seen = 0;
            for signal in signals.forever() {
                seen += 1;
                if seen > 1 {
                    std::process::exit(130);
                }
                tracing::info!(signal, "shutting down: draining connections");
                shutdown.trigger();
            }
        })
}

/// A snapshot of one shard's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardStatsSnapshot {
    pub connections_open: u64,
    pub connections_accepted: u64,
    /// Bytes queued for clients over all connections of the shard.
    pub out_bytes: u64,
    /// The largest single connection's out buffer (updated every tick).
    pub out_bytes_conn_max: u64,
    /// Bytes held in reassembly buffers (updated every tick).
    pub reassembly_bytes: u64,
    pub frames_in: u64,
    pub peer_msgs_sent: u64,
    pub peer_msgs_received: u64,
    pub doorbells_rung: u64,
    /// Times the shard stopped decoding client input because a peer queue was full.
    pub input_pauses: u64,
    /// Receives re-armed because the provided buffer ring ran dry.
    pub recv_buffer_exhausted: u64,
    /// Times a connection decoded its frame budget for a loop turn (4,096 frames or 64 KiB) and the rest of its
    /// input waited for the next turn.
    pub frame_budget_spent: u64,
}

/// Reads the shards' counters while the server runs.
#[derive(Clone)]
pub struct StatsHandle {
    shared: Arc<[mesh::ShardShared]>,
}

impl StatsHandle {
    pub fn shards(&self) -> Vec<ShardStatsSnapshot> {
        self.shared
            .iter()
            .map(|shard| {
                let stats = &shard.stats;
                let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
                ShardStatsSnapshot {
                    connections_open: load(&stats.connections_open),
                    connections_accepted: load(&stats.connections_accepted),
                    out_bytes: load(&stats.out_bytes),
                    out_bytes_conn_max: load(&stats.out_bytes_conn_max),
                    reassembly_bytes: load(&stats.reassembly_bytes),
                    frames_in: load(&stats.frames_in),
                    peer_msgs_sent: load(&stats.peer_msgs_sent),
                    peer_msgs_received: load(&stats.peer_msgs_received),
                    doorbells_rung: load(&stats.doorbells_rung),
                    input_pauses: load(&stats.input_pauses),
                    recv_buffer_exhausted: load(&stats.recv_buffer_exhausted),
                    frame_budget_spent: load(&stats.frame_budget_spent),
                }
            })
            .collect()
    }
}

/// A bound server: listeners are open (so the port is known and clients may connect), shards
/// are not started yet.
pub struct Server {
    config: ServerConfig,
    listeners: Vec<Socket>,
    local_addr: SocketAddr,
    shared: Arc<[mesh::ShardShared]>,
}

impl Server {
    /// Opens one SO_REUSEPORT listener per shard on `config.listen` (port 0 picks a free port,
    /// shared by all shards) and checks that io_uring can be set up here, so setup errors show
    /// before anything is announced. Refuses an address another server listens on, and first
    /// waits (up to `listen_orphan_wait_ms`) for a crashed process's listeners to close: see
    /// `ports.rs`.
    pub fn bind(config: ServerConfig) -> Result<Server, ServerError> {
        if config.shards == 0 || config.shards > usize::from(u16::MAX) {
            return Err(ServerError::Config("shards must be between 1 and 65535"));
        }
        if !config.recv_buffers_count.is_power_of_two() {
            return Err(ServerError::Config(
                "recv_buffers_count must be a power of two",
            ));
        }
        if config.peer_queue_len_max == 0 || config.tick_ms == 0 {
            return Err(ServerError::Config(
                "peer_queue_len_max and tick_ms must be positive",
            ));
        }
        if let Some(found) = setup::kernel_version() {
            if found < setup::KERNEL_VERSION_MIN {
                return Err(ServerError::KernelTooOld { found });
            }
        }
        // A throwaway ring, on a throwaway thread: the real ones are built on the shard
        // threads, and a ring's teardown notifies its creating thread, which would make a
        // blocking socket call with a timeout on the caller's thread fail once with EINTR.
        std::thread::Builder::new()
            .name("stompd-probe".into())
            .spawn(|| setup::build_ring(8).map(drop))
            .map_err(ServerError::Thread)?
            .join()
            .map_err(|_| ServerError::Config("io_uring probe panicked"))??;

        match setup::raise_open_files_limit() {
            // A few descriptors per shard besides the connections: rings, listeners, eventfds,
            // the log's files.
            Ok(open_files) if (open_files as usize) < config.connections_max + 64 => {
                tracing::warn!(
                    open_files,
                    connections_max = config.connections_max,
                    "the open-files limit is below connections_max: connections past it are \
                     refused by the kernel; raise the hard limit (`ulimit -Hn`, LimitNOFILE=)"
                );
            }
            Ok(open_files) => tracing::debug!(open_files, "open-files limit"),
            Err(error) => tracing::warn!(%error, "could not read or raise the open-files limit"),
        }
        let wait_max = std::time::Duration::from_millis(config.listen_orphan_wait_ms);
        match ports::check_before_bind(config.listen, wait_max) {
            ports::Verdict::Free => {}
            ports::Verdict::InUse { listening, owner } => {
                return Err(ServerError::AddressInUse {
                    addr: config.listen,
                    listening,
                    owner: owner.to_string(),
                })
            }
            ports::Verdict::StillClosing { listening } => {
                return Err(ServerError::AddressStillClosing {
                    addr: config.listen,
                    listening,
                    waited_ms: config.listen_orphan_wait_ms,
                })
            }
        }
        // Bound first and listening only after the re-check: a bound socket that does not
        // listen joins no accept group, so a broker that loses a race here exits without ever
        // taking (and then resetting) a connection meant for the other (see `ports.rs`).
        let mut listeners = Vec::with_capacity(config.shards);
        let mut addr = config.listen;
        for _ in 0..config.shards {
            let listener = bind(addr).map_err(|source| ServerError::Listen { addr, source })?;
            if addr.port() == 0 {
                addr = listener
                    .local_addr()
                    .ok()
                    .and_then(|local| local.as_socket())
                    .ok_or(ServerError::Config("listener has no inet address"))?;
            }
            listeners.push(listener);
        }
        refuse_another_listener(&config, addr, &listeners)?;
        for listener in &listeners {
            // The kernel caps the backlog at net.core.somaxconn (4096 on current kernels).
            listener
                .listen(4096)
                .map_err(|source| ServerError::Listen { addr, source })?;
        }
        // Bound sockets are not in the kernel's table, so two brokers that both re-checked
        // before either listened saw nothing; once listening they see each other here.
        refuse_another_listener(&config, addr, &listeners)?;
        let shared: Arc<[mesh::ShardShared]> = (0..config.shards)
            .map(|_| mesh::ShardShared::new())
            .collect();
        Ok(Server {
            config,
            listeners,
            local_addr: addr,
            shared,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn stats(&self) -> StatsHandle {
        StatsHandle {
            shared: self.shared.clone(),
        }
    }

    /// Runs the shards until `shutdown` is triggered (or a shard fails), then drains and returns.
    /// `make_handler(shard, shards)` is called on each shard thread.
    pub fn run<H, F>(self, make_handler: F, shutdown: Shutdown) -> Result<(), ServerError>
    where
        H: ShardHandler,
        F: Fn(ShardId, usize) -> H + Send + Sync,
    {
        let Server {
            config,
            listeners,
            shared,
            ..
        } = self;
        let shards = config.shards;
        let mut ends = mesh::mesh::<H::PeerMsg>(shards, config.peer_queue_len_max);
        let start = Instant::now();
        let mut wakers = Vec::with_capacity(shards);
        for _ in 0..shards {
            // SAFETY: eventfd has no memory preconditions.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            if fd < 0 {
                return Err(ServerError::Thread(io::Error::last_os_error()));
            }
            // SAFETY: fd is a fresh descriptor we own.
            let waker = Arc::new(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
            shutdown.register(waker.clone());
            wakers.push(waker);
        }
        if shutdown.is_triggered() {
            return Ok(());
        }

        std::thread::scope(|scope| {
            let mut threads = Vec::with_capacity(shards);
            for (shard, (listener, waker)) in listeners.into_iter().zip(wakers).enumerate().rev() {
                let (peer_out, peer_in) = ends.pop().expect("one pair of ends per shard");
                let params = shard::ShardParams {
                    shard,
                    shards,
                    config: &config,
                    listener,
                    waker,
                    shared: shared.clone(),
                    peer_out,
                    peer_in,
                    shutdown: shutdown.clone(),
                    start,
                };
                let make_handler = &make_handler;
                let handle = std::thread::Builder::new()
                    .name(format!("stompd-shard-{shard}"))
                    .spawn_scoped(scope, move || {
                        // Any shard that stops, however, stops the server.
                        let _stop_all = StopOnDrop(params.shutdown.clone());
                        shard::run_shard(params, make_handler)
                    })
                    .map_err(ServerError::Thread);
                match handle {
                    Ok(handle) => threads.push((shard, handle)),
                    Err(error) => {
                        // The threads already started stop and are joined by the scope.
                        shutdown.trigger();
                        return Err(error);
                    }
                }
            }
            let mut result = Ok(());
            for (shard, handle) in threads {
                let outcome = handle
                    .join()
                    .unwrap_or(Err(ServerError::ShardPanicked(shard)));
                if let Err(error) = outcome {
                    if result.is_ok() {
                        result = Err(error);
                    }
                }
            }
            result
        })
    }
}

struct StopOnDrop(Shutdown);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.trigger();
    }
}

/// A shard's socket, bound to the address in the shards' `SO_REUSEPORT` group but not yet
/// listening.
fn bind(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// Another broker may have bound between the check and our binds; whichever of two re-checks
/// last sees the other (see `ports.rs`).
fn refuse_another_listener(
    config: &ServerConfig,
    addr: SocketAddr,
    listeners: &[Socket],
) -> Result<(), ServerError> {
    if config.listen.port() == 0 {
        return Ok(());
    }
    let ours = listeners
        .iter()
        .map(|listener| ports::socket_inode(listener.as_raw_fd()))
        .collect::<io::Result<_>>()
        .map_err(|source| ServerError::Listen { addr, source })?;
    match ports::check_after_bind(addr, &ours) {
        Some((listening, owner)) => Err(ServerError::AddressInUse {
            addr,
            listening,
            owner: owner.to_string(),
        }),
        None => Ok(()),
    }
}

/// Binds and runs the [`relay`] handler: the simplest server, for tests and as a benchmark
/// reference until the broker logic plugs in.
pub fn run(config: ServerConfig, shutdown: Shutdown) -> Result<(), ServerError> {
    let heartbeat = config.heartbeat;
    Server::bind(config)?.run(
        move |shard, shards| relay::Relay::new(shard, shards, heartbeat),
        shutdown,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destination_owner_is_stable_and_in_range() {
        // Fixed expectations: the mapping must not change between versions (durable queues
        // live in the owner's log).
        assert_eq!(shard_of(b"", 4), (0xcbf2_9ce4_8422_2325u64 % 4) as usize);
        for shards in 1..9 {
            for name in [&b"/queue/a"[..], b"/topic/prices", b"x"] {
                assert!(shard_of(name, shards) < shards);
                assert_eq!(shard_of(name, shards), shard_of(name, shards));
            }
        }
        let spread: std::collections::HashSet<_> = (0..64)
            .map(|index| shard_of(format!("/queue/{index}").as_bytes(), 4))
            .collect();
        assert_eq!(spread.len(), 4, "names spread over every shard");
    }
}
