//! Operator-facing configuration: what the flags, the environment and the TOML config file say,
//! merged into one validated [`Config`].
//!
//! Precedence, lowest first: built-in defaults < config file (`-C FILE`) < environment
//! (`STOMPD_<KEY>`) < command-line flags. Each key has the same name in all three sources
//! (`frame_bytes_max`, `STOMPD_FRAME_BYTES_MAX`, `--frame-bytes-max`), because they all come
//! from one list in [`layer`]. Ruby stompserver's short flags keep their meaning (`-p -b -w -s
//! -q -a -c -d -C -l`); they are folded into the flag layer by [`RunArgs::to_layer`], except
//! `-p`/`-b`, which edit the merged listen address, and `-w`, which [`enter_workdir`] applies
//! before anything is read.
//!
//! Invariants: a [`Config`] only exists validated (every range and cross-key rule below
//! holds); resolving never reads the process environment itself (the caller passes a map, so
//! tests cannot race); every error names the key, its value, where that value came from and
//! what is allowed, and all errors are reported at once rather than the first.

// Config errors are built once, at startup, and carry the key, value and origin an operator
// needs; their size does not matter.
#![allow(clippy::result_large_err)]

mod cli;
pub mod commands;
mod layer;
mod types;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::auth::{PasswordFile, PasswordFormat};
use crate::codec::Limits;

pub use cli::{Cli, Command, PasswdArgs, RunArgs};
pub use layer::{env_var_name, flag_name, Layer, Origin};
pub use types::{FsyncPolicy, ParseFsyncError, ParseQueueTypeError, QueueType};

/// Built-in defaults, each with the reason for its value.
pub mod defaults {
    /// The STOMP port every client library assumes, on loopback only: a broker reachable from
    /// the network should be a decision (`--listen 0.0.0.0:61613`), not an accident.
    pub const LISTEN: &str = "127.0.0.1:61613";
    /// Relative to the working directory, so `stompd` runs without root like stompserver did
    /// (its default was `.stompserver`); not hidden, because it holds the only copy of durable
    /// messages and should not be deleted unseen. Packages set `/var/lib/stompd`.
    pub const DATA_DIR: &str = "stompd-data";
    /// Enough for a busy broker; each connection can hold up to `out_buffer_bytes_max` plus a
    /// frame of input, so the product bounds memory. Also well under common `nofile` limits
    /// that operators raise anyway.
    pub const CONNECTIONS_MAX: usize = 10_000;
    /// 256 KiB (the server's own default): about ten round trips of a fast consumer's
    /// window, while 10,000 stalled consumers hold 2.5 GiB at most before they get no more.
    pub const OUT_BUFFER_BYTES_MAX: usize = 256 * 1024;
    /// The floor under what a client asks for (the CONNECTED `sx`; the spec negotiates the
    /// larger of the two): 1 s, so a client asking for 1 s beats gets them, as from RabbitMQ
    /// and ActiveMQ, and none can make the server beat faster than the shard timer serves.
    pub const HEARTBEAT_SEND_MS: u64 = 1_000;
    /// The floor under what a client offers to send (the CONNECTED `sy`): 1 s, as for sending.
    pub const HEARTBEAT_RECEIVE_MS: u64 = 1_000;
    /// Two intervals, as Artemis' `heartBeatToConnectionTtlModifier` 2.0 and RabbitMQ's two
    /// missed beats: the spec asks for tolerance and networks stall, while a dead peer found
    /// one interval later costs little. (The server and broker modules use 200 % too.)
    pub const HEARTBEAT_READ_GRACE_PERCENT: u64 = 200;
    /// ActiveMQ's default (one delivery plus six redeliveries): a poison message stops
    /// cycling after a few tries instead of forever.
    pub const DEAD_LETTER_DELIVERIES_MAX: u32 = 7;
    /// ActiveMQ's queue prefetch default, which STOMP clients of ActiveMQ are tuned for.
    pub const PREFETCH_DEFAULT: u32 = 1000;
    /// 4 MiB of messages in a subscription's window: enough to keep a consumer busy across a
    /// round trip on a fast link (as many as the default message window holds at 4 KiB
    /// each), small enough that a backlog of large messages is paced instead of handed out
    /// at once (1,000 messages of 64 KiB would be 64 MiB). A larger message goes out alone.
    pub const PREFETCH_BYTES_DEFAULT: u64 = 4 * 1024 * 1024;
    /// Bounded by disk: the upper bound. A queue's bodies page out to the log, so what bounds
    /// a backlog is `disk_bytes_max` (and, for what stays in memory, `memory_bytes_max`), not
    /// a per-queue count; set this lower only to cap one queue below the others.
    pub const QUEUE_MESSAGES_MAX: u64 = *super::bounds::QUEUE_MESSAGES.end();
    /// Bounded by disk, as `QUEUE_MESSAGES_MAX`: the upper bound.
    pub const QUEUE_BYTES_MAX: u64 = *super::bounds::QUEUE_BYTES.end();
    /// Far longer than a burst takes to drain, far shorter than a publisher's patience.
    pub const TOPIC_SUBSCRIBER_STALL_MS: u64 = 5000;
    /// RabbitMQ's `handshake_timeout`: long enough for a client on a slow link that must
    /// also do TLS in front of us, short enough that silent sockets do not pile up.
    pub const CONNECT_TIMEOUT_MS: u64 = 10_000;
    /// A second per refused login: a person mistyping hardly notices, a guesser is slowed to
    /// one guess per second per connection.
    pub const LOGIN_FAILURE_DELAY_MS: u64 = 1000;
    /// 64 MiB, the log's own default: a segment roll is rare, and a drained queue pins at
    /// most one such file.
    pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
    /// Lifecycle events only; per-connection detail is `debug`.
    pub const LOG_LEVEL: &str = "info";

    /// One shard per CPU this process may run on (thread-per-core), within the allowed range.
    /// 40 % of the memory this process may use: the cgroup's `memory.max` when one is set
    /// (a container), else the machine's `MemTotal`. The rest is left for the fixed overhead
    /// (receive rings, per-connection buffers), the page cache the log's mapped segments live
    /// in, and whatever else runs beside the broker. 1 GiB when neither can be read.
    /// Left free on the log's filesystem by the default `disk_bytes_max`, in percent of its
    /// size. Why 10 %: `statvfs`'s available space already leaves out ext4's 5 % root
    /// reserve, so this is on top of what the kernel keeps; it is the space other writers on
    /// the machine (the broker's own logs, the OS, a package upgrade) keep, and filesystems
    /// slow down and fragment as they fill (copy-on-write ones need free space just to
    /// delete). The broker pauses producers and then refuses SENDs before the disk is full,
    /// not when another process finds it full.
    pub const DISK_RESERVE_PERCENT: u64 = 10;
    /// The fewest segments each shard's share of `disk_bytes_max` holds: the active segment,
    /// the spare prepared ahead, the reclaimed file kept for reuse, and one for a backlog.
    pub const DISK_SEGMENTS_PER_SHARD_MIN: u64 = 4;

    /// The default `disk_bytes_max` for a log that takes `log_bytes` now on a filesystem of
    /// `size_bytes` with `available_bytes` free to unprivileged writers: what it takes plus what
    /// is free, less the reserve, and never below `minimum` (each shard's
    /// [`DISK_SEGMENTS_PER_SHARD_MIN`] segments; on a filesystem that small the disk itself
    /// is the limit, as before).
    pub fn disk_bytes_max(
        log_bytes: u64,
        size_bytes: u64,
        available_bytes: u64,
        minimum: u64,
    ) -> u64 {
        let reserve = size_bytes / 100 * DISK_RESERVE_PERCENT;
        log_bytes
            .saturating_add(available_bytes.saturating_sub(reserve))
            .max(minimum)
    }

    pub fn memory_bytes_max() -> u64 {
        let limit = cgroup_memory_max().or_else(mem_total).unwrap_or(2560 << 20);
        (limit / 5 * 2).clamp(
            *super::bounds::MEMORY_BYTES.start(),
            *super::bounds::MEMORY_BYTES.end(),
        )
    }

    /// cgroup v2's limit for this process (`max` means none).
    fn cgroup_memory_max() -> Option<u64> {
        let text = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok()?;
        text.trim().parse().ok()
    }

    /// `MemTotal` of `/proc/meminfo`, in bytes.
    fn mem_total() -> Option<u64> {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = text.lines().find(|line| line.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    pub fn shards() -> usize {
        std::thread::available_parallelism()
            .map_or(1, |count| count.get())
            .clamp(*super::bounds::SHARDS.start(), *super::bounds::SHARDS.end())
    }
}

/// The allowed range of each numeric key, and why.
pub mod bounds {
    use std::ops::RangeInclusive;

    /// Cross-core queues are per pair of shards, so their count grows with the square; 1024
    /// is past any machine we run on.
    pub const SHARDS: RangeInclusive<usize> = 1..=1024;
    /// Below 1 KiB a CONNECT with a token passcode does not fit; above 1 GiB one message
    /// would not fit a log segment, and record lengths are 32-bit.
    pub const FRAME_BYTES: RangeInclusive<usize> = 1024..=1 << 30;
    /// A CONNECT carries up to six standard headers; fewer than 8 breaks real clients.
    pub const HEADERS_COUNT: RangeInclusive<usize> = 8..=100_000;
    /// 256 bytes holds any standard header line; the top is `frame_bytes_max`.
    pub const HEADER_LINE_BYTES_MIN: usize = 256;
    /// The body may be anything from one byte to the whole frame.
    pub const BODY_BYTES_MIN: usize = 1;
    pub const CONNECTIONS: RangeInclusive<usize> = 1..=1_000_000;
    /// One page at least, so small frames can be batched; at most 1 GiB per connection.
    pub const OUT_BUFFER_BYTES: RangeInclusive<usize> = 4096..=1 << 30;
    /// Besides 0 (off): 1 s at the fastest, the broker's own floor for sending (a client must
    /// not make the server beat thousands of times a second); slower than an hour detects
    /// nothing.
    pub const HEARTBEAT_MS: RangeInclusive<u64> = 1000..=3_600_000;
    /// Below 100 % the server would time out before the client's interval has passed; above
    /// 1000 % a dead peer holds its resources for ten intervals.
    pub const HEARTBEAT_READ_GRACE_PERCENT: RangeInclusive<u64> = 100..=1000;
    /// Log segments: 64 KiB at least (a few hundred small records per file; smaller only
    /// multiplies files), 4 GiB at most (the log's own ceiling for one mapping). Also a
    /// multiple of 4096, the page size the log maps in.
    pub const SEGMENT_BYTES: RangeInclusive<u64> = 65_536..=4 * 1024 * 1024 * 1024;
    /// Segment sizes must be whole pages.
    pub const SEGMENT_BYTES_MULTIPLE: u64 = 4096;
    pub const DEAD_LETTER_DELIVERIES: RangeInclusive<u32> = 1..=10_000;
    pub const PREFETCH: RangeInclusive<u32> = 1..=1_000_000;
    /// 4 KiB (a window of one message, whatever its size, is always allowed) to 1 GiB.
    pub const PREFETCH_BYTES: RangeInclusive<u64> = 4096..=1 << 30;
    /// At least one message; at most a billion (messages live in memory as well as in the log).
    pub const QUEUE_MESSAGES: RangeInclusive<u64> = 1..=1_000_000_000;
    /// 64 KiB to 1 TiB: below, one large message would pause its producer at once.
    pub const QUEUE_BYTES: RangeInclusive<u64> = 65_536..=1 << 40;
    /// 16 MiB (a default-sized frame, with room to pause before it) to 16 TiB.
    pub const MEMORY_BYTES: RangeInclusive<u64> = 16 << 20..=1 << 44;
    /// Four of the smallest segments (one shard's least share) to 1 EiB. Within the range,
    /// each shard's share must also hold `DISK_SEGMENTS_PER_SHARD_MIN` segments.
    pub const DISK_BYTES: RangeInclusive<u64> = 262_144..=1 << 60;
    /// 100 ms to an hour: shorter turns every burst into losses, longer lets one stuck client
    /// hold a topic's producers for longer than anyone waits.
    pub const TOPIC_SUBSCRIBER_STALL_MS: RangeInclusive<u64> = 100..=3_600_000;
    /// 100 ms to an hour: below the broker's tick (100 ms) it would be meaningless; an hour
    /// is already as good as none.
    pub const CONNECT_TIMEOUT_MS: RangeInclusive<u64> = 100..=3_600_000;
    /// Up to a minute: a refused connection is held (and counts against `connections_max`)
    /// this long, so more would let refusals crowd out clients.
    pub const LOGIN_FAILURE_DELAY_MS: RangeInclusive<u64> = 0..=60_000;
}

/// Who may connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthConfig {
    /// Anyone; CONNECT's login and passcode are ignored.
    Off,
    /// `user:hash` lines (argon2id PHC or bcrypt), see [`crate::auth::PasswordFile`].
    PasswordFile(PathBuf),
    /// stompserver's plain-text `user:password` lines (`-a`, `auth_plaintext = true`).
    StompserverPlain(PathBuf),
}

/// The validated settings of one broker process. Plain data; the server, broker and log take
/// the parts they need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Address of the STOMP listener.
    pub listen: SocketAddr,
    /// Event-loop threads, one per core; 1..=1024.
    pub shards: usize,
    /// Directory of the durable log.
    pub data_dir: PathBuf,
    /// Codec limits for every connection's decoder.
    pub limits: Limits,
    /// Open client connections, all shards together.
    pub connections_max: usize,
    /// Pending outbound bytes per connection before it is given no more messages.
    pub out_buffer_bytes_max: usize,
    /// CONNECTED `heart-beat` sx: the server's send interval, ms; 0 = none.
    pub heartbeat_send_ms: u64,
    /// CONNECTED `heart-beat` sy: the interval the server asks of clients, ms; 0 = none.
    pub heartbeat_receive_ms: u64,
    /// A client is dead after this percentage of the negotiated interval without a byte.
    pub heartbeat_read_grace_percent: u64,
    /// When the log fsyncs.
    pub fsync: FsyncPolicy,
    /// Size of each log segment file, bytes.
    pub segment_bytes: u64,
    /// Where queue messages live.
    pub queue_type: QueueType,
    /// Who may connect.
    pub auth: AuthConfig,
    /// Deliveries without an ACK before a message is dead-lettered.
    pub dead_letter_deliveries_max: u32,
    /// Prefetch of a subscription that sets none.
    pub prefetch_default: u32,
    /// Bytes of messages (estimated frame bytes) in a queue subscription's window.
    pub prefetch_bytes_default: u64,
    /// Messages a queue holds for consumers before its producers are paused.
    pub queue_messages_max: u64,
    /// Body bytes a queue holds for consumers before its producers are paused.
    pub queue_bytes_max: u64,
    /// Bytes the broker may hold for clients, all cores (the memory budget).
    pub memory_bytes_max: u64,
    /// Bytes of disk the log may take, all shards (the disk budget); `None`: the default,
    /// computed at start from the data directory's filesystem ([`defaults::disk_bytes_max`]).
    pub disk_bytes_max: Option<u64>,
    /// How long a full topic subscriber holds its producers back before it counts as slow.
    pub topic_subscriber_stall_ms: u64,
    /// How long a connection may take to send a complete CONNECT before it is closed.
    pub connect_timeout_ms: u64,
    /// How long a refused login waits for its ERROR.
    pub login_failure_delay_ms: u64,
    /// `tracing_subscriber::EnvFilter` directives, already checked to parse.
    pub log_level: String,
}

impl Config {
    /// The built-in defaults as a layer with every key set.
    pub fn defaults_layer() -> Layer {
        Layer {
            listen: Some(defaults::LISTEN.to_owned()),
            shards: Some(defaults::shards()),
            data_dir: Some(PathBuf::from(defaults::DATA_DIR)),
            frame_bytes_max: Some(Limits::DEFAULT.frame_bytes_max),
            headers_count_max: Some(Limits::DEFAULT.headers_count_max),
            header_line_bytes_max: Some(Limits::DEFAULT.header_line_bytes_max),
            body_bytes_max: Some(Limits::DEFAULT.body_bytes_max),
            connections_max: Some(defaults::CONNECTIONS_MAX),
            out_buffer_bytes_max: Some(defaults::OUT_BUFFER_BYTES_MAX),
            heartbeat_send_ms: Some(defaults::HEARTBEAT_SEND_MS),
            heartbeat_receive_ms: Some(defaults::HEARTBEAT_RECEIVE_MS),
            heartbeat_read_grace_percent: Some(defaults::HEARTBEAT_READ_GRACE_PERCENT),
            fsync: Some(FsyncPolicy::default()),
            segment_bytes: Some(defaults::SEGMENT_BYTES),
            queue_type: Some(QueueType::default()),
            auth_file: None,
            auth_plaintext: Some(false),
            dead_letter_deliveries_max: Some(defaults::DEAD_LETTER_DELIVERIES_MAX),
            prefetch_default: Some(defaults::PREFETCH_DEFAULT),
            prefetch_bytes_default: Some(defaults::PREFETCH_BYTES_DEFAULT),
            queue_messages_max: Some(defaults::QUEUE_MESSAGES_MAX),
            queue_bytes_max: Some(defaults::QUEUE_BYTES_MAX),
            memory_bytes_max: Some(defaults::memory_bytes_max()),
            // Depends on the data directory's filesystem: resolved when the broker starts.
            disk_bytes_max: None,
            topic_subscriber_stall_ms: Some(defaults::TOPIC_SUBSCRIBER_STALL_MS),
            connect_timeout_ms: Some(defaults::CONNECT_TIMEOUT_MS),
            login_failure_delay_ms: Some(defaults::LOGIN_FAILURE_DELAY_MS),
            log_level: Some(defaults::LOG_LEVEL.to_owned()),
        }
    }

    /// This config as a layer with every key set: what `print-config` writes, and what reads
    /// back as the same config.
    pub fn to_layer(&self) -> Layer {
        let (auth_file, auth_plaintext) = match &self.auth {
            AuthConfig::Off => (None, false),
            AuthConfig::PasswordFile(path) => (Some(path.clone()), false),
            AuthConfig::StompserverPlain(path) => (Some(path.clone()), true),
        };
        Layer {
            listen: Some(self.listen.to_string()),
            shards: Some(self.shards),
            data_dir: Some(self.data_dir.clone()),
            frame_bytes_max: Some(self.limits.frame_bytes_max),
            headers_count_max: Some(self.limits.headers_count_max),
            header_line_bytes_max: Some(self.limits.header_line_bytes_max),
            body_bytes_max: Some(self.limits.body_bytes_max),
            connections_max: Some(self.connections_max),
            out_buffer_bytes_max: Some(self.out_buffer_bytes_max),
            heartbeat_send_ms: Some(self.heartbeat_send_ms),
            heartbeat_receive_ms: Some(self.heartbeat_receive_ms),
            heartbeat_read_grace_percent: Some(self.heartbeat_read_grace_percent),
            fsync: Some(self.fsync),
            segment_bytes: Some(self.segment_bytes),
            queue_type: Some(self.queue_type),
            auth_file,
            auth_plaintext: Some(auth_plaintext),
            dead_letter_deliveries_max: Some(self.dead_letter_deliveries_max),
            prefetch_default: Some(self.prefetch_default),
            prefetch_bytes_default: Some(self.prefetch_bytes_default),
            queue_messages_max: Some(self.queue_messages_max),
            queue_bytes_max: Some(self.queue_bytes_max),
            memory_bytes_max: Some(self.memory_bytes_max),
            disk_bytes_max: self.disk_bytes_max,
            topic_subscriber_stall_ms: Some(self.topic_subscriber_stall_ms),
            connect_timeout_ms: Some(self.connect_timeout_ms),
            login_failure_delay_ms: Some(self.login_failure_delay_ms),
            log_level: Some(self.log_level.clone()),
        }
    }
}

/// One thing wrong with the settings.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML, or has an unknown key or a value of the wrong type; `message` is
    /// the toml crate's, with line, column and the offending line.
    #[error("config file {}: {message}", path.display())]
    Toml { path: PathBuf, message: String },
    #[error("environment variable {var}={value:?}: {reason}")]
    Env {
        var: String,
        value: String,
        reason: String,
    },
    #[error("{key} = {value} (from {origin}) is out of range: allowed {allowed}")]
    OutOfRange {
        key: &'static str,
        value: String,
        origin: Origin,
        allowed: String,
    },
    /// A limit larger than the limit that contains it (a header line longer than the frame).
    #[error(
        "{key} = {value} (from {origin}) must be at most {other_key} = {other_value} \
         (from {other_origin})"
    )]
    ExceedsOther {
        key: &'static str,
        value: String,
        origin: Origin,
        other_key: &'static str,
        other_value: String,
        other_origin: Origin,
    },
    #[error("{key} = {value:?} (from {origin}) is invalid: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        origin: Origin,
        reason: String,
    },
    /// The password file named by `auth_file` is missing or malformed.
    #[error("auth_file {} (from {origin}): {source}", path.display())]
    PasswordFile {
        path: PathBuf,
        origin: Origin,
        #[source]
        source: crate::auth::PasswordFileError,
    },
    #[error("cannot change to working directory {} (from {origin}): {source}", path.display())]
    Workdir {
        path: PathBuf,
        origin: Origin,
        #[source]
        source: std::io::Error,
    },
}

impl ConfigError {
    /// The key this error is about, where there is one.
    pub fn key(&self) -> Option<&'static str> {
        match self {
            ConfigError::OutOfRange { key, .. }
            | ConfigError::ExceedsOther { key, .. }
            | ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// Every error found, in the order found; never empty.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, error) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str("\n")?;
            }
            write!(f, "error: {error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(error: ConfigError) -> ConfigErrors {
        ConfigErrors(vec![error])
    }
}

/// A validated config, where each key came from, and what the operator should hear about
/// (log these as warnings once logging is up).
#[derive(Debug)]
pub struct Resolved {
    pub config: Config,
    pub origins: BTreeMap<&'static str, Origin>,
    pub warnings: Vec<String>,
}

impl Resolved {
    /// The config as TOML that `-C` reads back, each line commented with its origin.
    pub fn to_toml(&self) -> String {
        let text = toml::to_string(&self.config.to_layer())
            .expect("a layer of strings, numbers and booleans always serializes");
        let mut out = String::with_capacity(text.len() * 2);
        for line in text.lines() {
            let key = line.split(" = ").next().unwrap_or_default();
            out.push_str(line);
            if let Some(origin) = self.origins.get(key) {
                out.push_str("  # ");
                out.push_str(&origin.to_string());
            }
            out.push('\n');
        }
        if self.config.auth == AuthConfig::Off {
            out.push_str("# auth_file is not set: no authentication\n");
        }
        if self.config.disk_bytes_max.is_none() {
            out.push_str(
                "# disk_bytes_max is not set: the log's size plus the filesystem's available \
                 space, less 10 % of its size, computed at start\n",
            );
        }
        out
    }
}

/// The process environment as a map, skipping variables that are not UTF-8 (none of ours can
/// be, and a stray one elsewhere must not stop the broker).
pub fn process_env() -> BTreeMap<String, String> {
    std::env::vars_os()
        .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
        .collect()
}

/// The working directory `-w`/`STOMPD_WORKDIR` asks for, and where that came from.
pub fn workdir(args: &RunArgs, env: &BTreeMap<String, String>) -> Option<(PathBuf, Origin)> {
    if let Some(path) = &args.workdir {
        return Some((path.clone(), Origin::Flag("-w/--workdir".to_owned())));
    }
    env.get("STOMPD_WORKDIR")
        .filter(|value| !value.trim().is_empty())
        .map(|value| {
            (
                PathBuf::from(value),
                Origin::Env("STOMPD_WORKDIR".to_owned()),
            )
        })
}

/// Changes the process's working directory as `-w` asks; call before [`resolve`] so relative
/// paths in every source are taken from there, as stompserver did.
pub fn enter_workdir(args: &RunArgs, env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    if let Some((path, origin)) = workdir(args, env) {
        std::env::set_current_dir(&path).map_err(|source| ConfigError::Workdir {
            path,
            origin,
            source,
        })?;
    }
    Ok(())
}

/// Reads a config file into a layer. A YAML file (stompserver's format) gets a hint.
pub fn load_file(path: &Path) -> Result<Layer, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|error| {
        let mut message = error.to_string();
        let yaml_name = matches!(
            path.extension().and_then(|extension| extension.to_str()),
            Some("yml" | "yaml")
        );
        if yaml_name || text.trim_start().starts_with("---") {
            message.push_str(
                "\nThis looks like stompserver's YAML config; stompd reads TOML: write \
                 `key = value` lines (port/host become listen = \"HOST:PORT\", storage becomes \
                 data_dir, queue becomes queue_type; see stompd --help).",
            );
        }
        ConfigError::Toml {
            path: path.to_owned(),
            message: message.trim_end().to_owned(),
        }
    })
}

/// Resolves the settings for serving: defaults < the file named by `-C`/`STOMPD_CONFIG` <
/// `env` < `args`. `env` is normally [`process_env`]; tests pass their own.
pub fn resolve(args: &RunArgs, env: &BTreeMap<String, String>) -> Result<Resolved, ConfigErrors> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let mut merged = Config::defaults_layer();
    let mut origins: BTreeMap<&'static str, Origin> = Layer::KEYS
        .iter()
        .map(|&key| (key, Origin::Default))
        .collect();

    let config_path = args.config.clone().or_else(|| {
        env.get("STOMPD_CONFIG")
            .filter(|value| !value.trim().is_empty())
            .map(PathBuf::from)
    });
    if let Some(path) = config_path {
        match load_file(&path) {
            Ok(layer) => merged.overlay(layer, &|_| Origin::File(path.clone()), &mut origins),
            Err(error) => errors.push(error),
        }
    }

    match env_layer(env) {
        Ok((layer, log_var)) => merged.overlay(
            layer,
            &|key| {
                Origin::Env(if key == "log_level" {
                    log_var.clone()
                } else {
                    env_var_name(key)
                })
            },
            &mut origins,
        ),
        Err(env_errors) => errors.extend(env_errors),
    }
    warnings.extend(unknown_env_warnings(env));

    merged.overlay(
        args.to_layer(),
        &|key| {
            Origin::Flag(cli::compat_flag(key, args).map_or_else(|| flag_name(key), str::to_owned))
        },
        &mut origins,
    );
    if let Err(error) = apply_host_port(args, &mut merged, &mut origins) {
        errors.push(error);
    }
    if let Some(seconds) = args.checkpoint.filter(|&seconds| seconds > 0) {
        warnings.push(format!(
            "-c {seconds}: stompserver's checkpoint interval is mapped to fsync = every:{}; \
             messages receipted in the last {seconds} s can be lost on power loss. Without -c \
             the fsync setting applies (default always).",
            seconds.saturating_mul(1000)
        ));
    }

    if !errors.is_empty() {
        // Validating values from a source that failed to load would report noise.
        return Err(ConfigErrors(errors));
    }
    let config = validate(merged, &origins)?;
    if let AuthConfig::StompserverPlain(path) = &config.auth {
        warnings.push(format!(
            "password file {} is read as plain-text passwords (stompserver compatibility); \
             convert each user with `stompd passwd --file NEW USER` and use --auth-file NEW",
            path.display()
        ));
    }
    let cpus = std::thread::available_parallelism().map_or(1, |count| count.get());
    if config.shards > cpus {
        warnings.push(format!(
            "shards = {} is more than the {cpus} CPUs available; shards will share cores",
            config.shards
        ));
    }
    Ok(Resolved {
        config,
        origins,
        warnings,
    })
}

/// Loads the password file the config names, if any, so a bad file stops the broker (and
/// fails `check-config`) before anything listens.
pub fn load_password_file(resolved: &Resolved) -> Result<Option<PasswordFile>, ConfigError> {
    let (path, format) = match &resolved.config.auth {
        AuthConfig::Off => return Ok(None),
        AuthConfig::PasswordFile(path) => (path, PasswordFormat::Hashed),
        AuthConfig::StompserverPlain(path) => (path, PasswordFormat::StompserverPlain),
    };
    PasswordFile::load(path, format)
        .map(Some)
        .map_err(|source| ConfigError::PasswordFile {
            path: path.clone(),
            origin: resolved
                .origins
                .get("auth_file")
                .cloned()
                .unwrap_or(Origin::Default),
            source,
        })
}

/// Resolves the settings of one config file alone (defaults < file), for `check-config`.
pub fn resolve_file(path: &Path) -> Result<Resolved, ConfigErrors> {
    let args = RunArgs {
        config: Some(path.to_owned()),
        ..RunArgs::default()
    };
    resolve(&args, &BTreeMap::new())
}

/// The environment's layer, and the variable `log_level` came from (`RUST_LOG` counts when
/// `STOMPD_LOG_LEVEL` is unset, since that is where Rust operators look first).
fn env_layer(env: &BTreeMap<String, String>) -> Result<(Layer, String), Vec<ConfigError>> {
    let mut layer = Layer::from_env(&|name: &str| env.get(name).cloned())?;
    let mut log_var = env_var_name("log_level");
    if layer.log_level.is_none() {
        if let Some(filter) = env.get("RUST_LOG").filter(|value| !value.trim().is_empty()) {
            layer.log_level = Some(filter.clone());
            log_var = "RUST_LOG".to_owned();
        }
    }
    Ok((layer, log_var))
}

/// A `STOMPD_` variable that is no setting is most likely a typo the operator wants to hear of.
fn unknown_env_warnings(env: &BTreeMap<String, String>) -> Vec<String> {
    let known: Vec<String> = Layer::KEYS.iter().map(|key| env_var_name(key)).collect();
    env.keys()
        .filter(|name| name.starts_with("STOMPD_"))
        .filter(|name| !["STOMPD_CONFIG", "STOMPD_WORKDIR"].contains(&name.as_str()))
        .filter(|name| !known.contains(name))
        .map(|name| {
            format!(
                "environment variable {name} is not a stompd setting and is ignored \
                 (stompd --help lists them)"
            )
        })
        .collect()
}

/// stompserver's `-b HOST` / `-p PORT` replace one half of the listen address the lower layers
/// agreed on (clap already refuses them next to `--listen`).
fn apply_host_port(
    args: &RunArgs,
    merged: &mut Layer,
    origins: &mut BTreeMap<&'static str, Origin>,
) -> Result<(), ConfigError> {
    if args.host.is_none() && args.port.is_none() {
        return Ok(());
    }
    let base = merged.listen.clone().unwrap_or_default();
    let (host, port) = split_host_port(&base).map_err(|reason| ConfigError::Invalid {
        key: "listen",
        value: base.clone(),
        origin: origins["listen"].clone(),
        reason: format!("{reason} (so -b/-p cannot edit it)"),
    })?;
    let host = args.host.clone().unwrap_or(host);
    let port = args.port.unwrap_or(port);
    merged.listen = Some(join_host_port(&host, port));
    let flag = match (&args.host, &args.port) {
        (Some(_), Some(_)) => "-b/--host and -p/--port",
        (Some(_), None) => "-b/--host",
        _ => "-p/--port",
    };
    origins.insert("listen", Origin::Flag(flag.to_owned()));
    Ok(())
}

/// Splits `HOST:PORT` (`[v6]:PORT` for IPv6).
fn split_host_port(text: &str) -> Result<(String, u16), String> {
    let (host, port) = text
        .trim()
        .rsplit_once(':')
        .ok_or_else(|| "expected HOST:PORT".to_owned())?;
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("port `{port}` is not a number in 0..=65535"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|host| host.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err("the host is empty (use 0.0.0.0 for every IPv4 address)".to_owned());
    }
    Ok((host.to_owned(), port))
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Resolves a listen address; host names (stompserver's default was `localhost`) go through
/// the system resolver and the first address wins.
fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    if let Ok(address) = text.trim().parse::<SocketAddr>() {
        return Ok(address);
    }
    let (host, port) = split_host_port(text)?;
    (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|error| format!("cannot resolve host `{host}`: {error}"))?
        .next()
        .ok_or_else(|| format!("host `{host}` has no address"))
}

/// Normalizes a log filter: single level words are case-insensitive, and stompserver's
/// `fatal` is `error` (tracing has no fatal level).
fn normalize_log_level(text: &str) -> String {
    let word = text.trim().to_ascii_lowercase();
    match word.as_str() {
        "fatal" => "error".to_owned(),
        "warning" => "warn".to_owned(),
        "trace" | "debug" | "info" | "warn" | "error" | "off" => word,
        _ => text.trim().to_owned(),
    }
}

/// Checks a full layer and builds the config; every violation is reported.
fn validate(
    layer: Layer,
    origins: &BTreeMap<&'static str, Origin>,
) -> Result<Config, ConfigErrors> {
    let mut errors = Vec::new();
    let origin = |key: &'static str| origins.get(key).cloned().unwrap_or(Origin::Default);
    // The defaults layer sets every key but auth_file and disk_bytes_max, so this only fails
    // on a bug here.
    fn get<T>(value: Option<T>, key: &str) -> T {
        value.unwrap_or_else(|| panic!("the defaults layer has no value for {key}"))
    }

    let mut range = |key: &'static str, value: u128, allowed: RangeInclusive<u128>| {
        if !allowed.contains(&value) {
            errors.push(ConfigError::OutOfRange {
                key,
                value: value.to_string(),
                origin: origin(key),
                allowed: format!("{}..={}", allowed.start(), allowed.end()),
            });
        }
    };
    let wide = |range: RangeInclusive<usize>| *range.start() as u128..=*range.end() as u128;

    let shards = get(layer.shards, "shards");
    range("shards", shards as u128, wide(bounds::SHARDS));
    let body_bytes_max = get(layer.body_bytes_max, "body_bytes_max");
    // Left at its default, the frame limit follows the body limit, with room for the headers:
    // an operator who raises only body_bytes_max gets bodies of that size, headers included.
    let frame_bytes_max = if origin("frame_bytes_max") == Origin::Default {
        body_bytes_max
            .saturating_add(Limits::FRAME_HEADER_ROOM_BYTES)
            .min(*bounds::FRAME_BYTES.end())
    } else {
        get(layer.frame_bytes_max, "frame_bytes_max")
    };
    let limits = Limits {
        frame_bytes_max,
        headers_count_max: get(layer.headers_count_max, "headers_count_max"),
        header_line_bytes_max: get(layer.header_line_bytes_max, "header_line_bytes_max"),
        body_bytes_max,
    };
    range(
        "frame_bytes_max",
        limits.frame_bytes_max as u128,
        wide(bounds::FRAME_BYTES),
    );
    range(
        "headers_count_max",
        limits.headers_count_max as u128,
        wide(bounds::HEADERS_COUNT),
    );
    let line_max = (*bounds::FRAME_BYTES.end()) as u128;
    range(
        "header_line_bytes_max",
        limits.header_line_bytes_max as u128,
        bounds::HEADER_LINE_BYTES_MIN as u128..=line_max,
    );
    range(
        "body_bytes_max",
        limits.body_bytes_max as u128,
        bounds::BODY_BYTES_MIN as u128..=line_max,
    );
    let connections_max = get(layer.connections_max, "connections_max");
    range(
        "connections_max",
        connections_max as u128,
        wide(bounds::CONNECTIONS),
    );
    let out_buffer_bytes_max = get(layer.out_buffer_bytes_max, "out_buffer_bytes_max");
    range(
        "out_buffer_bytes_max",
        out_buffer_bytes_max as u128,
        wide(bounds::OUT_BUFFER_BYTES),
    );
    let dead_letter_deliveries_max = get(
        layer.dead_letter_deliveries_max,
        "dead_letter_deliveries_max",
    );
    range(
        "dead_letter_deliveries_max",
        dead_letter_deliveries_max.into(),
        (*bounds::DEAD_LETTER_DELIVERIES.start()).into()
            ..=(*bounds::DEAD_LETTER_DELIVERIES.end()).into(),
    );
    let queue_messages_max = get(layer.queue_messages_max, "queue_messages_max");
    range(
        "queue_messages_max",
        queue_messages_max.into(),
        (*bounds::QUEUE_MESSAGES.start()).into()..=(*bounds::QUEUE_MESSAGES.end()).into(),
    );
    let queue_bytes_max = get(layer.queue_bytes_max, "queue_bytes_max");
    range(
        "queue_bytes_max",
        queue_bytes_max.into(),
        (*bounds::QUEUE_BYTES.start()).into()..=(*bounds::QUEUE_BYTES.end()).into(),
    );
    let memory_bytes_max = get(layer.memory_bytes_max, "memory_bytes_max");
    range(
        "memory_bytes_max",
        memory_bytes_max.into(),
        (*bounds::MEMORY_BYTES.start()).into()..=(*bounds::MEMORY_BYTES.end()).into(),
    );
    if let Some(disk_bytes_max) = layer.disk_bytes_max {
        range(
            "disk_bytes_max",
            disk_bytes_max.into(),
            (*bounds::DISK_BYTES.start()).into()..=(*bounds::DISK_BYTES.end()).into(),
        );
    }
    let topic_subscriber_stall_ms =
        get(layer.topic_subscriber_stall_ms, "topic_subscriber_stall_ms");
    range(
        "topic_subscriber_stall_ms",
        topic_subscriber_stall_ms.into(),
        (*bounds::TOPIC_SUBSCRIBER_STALL_MS.start()).into()
            ..=(*bounds::TOPIC_SUBSCRIBER_STALL_MS.end()).into(),
    );
    let connect_timeout_ms = get(layer.connect_timeout_ms, "connect_timeout_ms");
    range(
        "connect_timeout_ms",
        connect_timeout_ms.into(),
        (*bounds::CONNECT_TIMEOUT_MS.start()).into()..=(*bounds::CONNECT_TIMEOUT_MS.end()).into(),
    );
    let login_failure_delay_ms = get(layer.login_failure_delay_ms, "login_failure_delay_ms");
    range(
        "login_failure_delay_ms",
        login_failure_delay_ms.into(),
        (*bounds::LOGIN_FAILURE_DELAY_MS.start()).into()
            ..=(*bounds::LOGIN_FAILURE_DELAY_MS.end()).into(),
    );
    let prefetch_default = get(layer.prefetch_default, "prefetch_default");
    range(
        "prefetch_default",
        prefetch_default.into(),
        (*bounds::PREFETCH.start()).into()..=(*bounds::PREFETCH.end()).into(),
    );
    let prefetch_bytes_default = get(layer.prefetch_bytes_default, "prefetch_bytes_default");
    range(
        "prefetch_bytes_default",
        prefetch_bytes_default.into(),
        (*bounds::PREFETCH_BYTES.start()).into()..=(*bounds::PREFETCH_BYTES.end()).into(),
    );

    for (key, contained) in [
        ("header_line_bytes_max", limits.header_line_bytes_max),
        ("body_bytes_max", limits.body_bytes_max),
    ] {
        if contained > limits.frame_bytes_max {
            errors.push(ConfigError::ExceedsOther {
                key,
                value: contained.to_string(),
                origin: origin(key),
                other_key: "frame_bytes_max",
                other_value: limits.frame_bytes_max.to_string(),
                other_origin: origin("frame_bytes_max"),
            });
        }
    }

    let heartbeat_send_ms = get(layer.heartbeat_send_ms, "heartbeat_send_ms");
    let heartbeat_receive_ms = get(layer.heartbeat_receive_ms, "heartbeat_receive_ms");
    for (key, value) in [
        ("heartbeat_send_ms", heartbeat_send_ms),
        ("heartbeat_receive_ms", heartbeat_receive_ms),
    ] {
        if value != 0 && !bounds::HEARTBEAT_MS.contains(&value) {
            errors.push(ConfigError::OutOfRange {
                key,
                value: value.to_string(),
                origin: origin(key),
                allowed: format!(
                    "0 (no heart-beats) or {}..={}",
                    bounds::HEARTBEAT_MS.start(),
                    bounds::HEARTBEAT_MS.end()
                ),
            });
        }
    }
    let heartbeat_read_grace_percent = get(
        layer.heartbeat_read_grace_percent,
        "heartbeat_read_grace_percent",
    );
    if !bounds::HEARTBEAT_READ_GRACE_PERCENT.contains(&heartbeat_read_grace_percent) {
        errors.push(ConfigError::OutOfRange {
            key: "heartbeat_read_grace_percent",
            value: heartbeat_read_grace_percent.to_string(),
            origin: origin("heartbeat_read_grace_percent"),
            allowed: format!(
                "{}..={}",
                bounds::HEARTBEAT_READ_GRACE_PERCENT.start(),
                bounds::HEARTBEAT_READ_GRACE_PERCENT.end()
            ),
        });
    }

    let fsync = get(layer.fsync, "fsync");
    if let FsyncPolicy::Every { interval_ms } = fsync {
        if !(FsyncPolicy::EVERY_MS_MIN..=FsyncPolicy::EVERY_MS_MAX).contains(&interval_ms) {
            errors.push(ConfigError::OutOfRange {
                key: "fsync",
                value: fsync.to_string(),
                origin: origin("fsync"),
                allowed: format!(
                    "always, never or every:{}..={}",
                    FsyncPolicy::EVERY_MS_MIN,
                    FsyncPolicy::EVERY_MS_MAX
                ),
            });
        }
    }

    let segment_bytes = get(layer.segment_bytes, "segment_bytes");
    if !bounds::SEGMENT_BYTES.contains(&segment_bytes)
        || segment_bytes % bounds::SEGMENT_BYTES_MULTIPLE != 0
    {
        errors.push(ConfigError::OutOfRange {
            key: "segment_bytes",
            value: segment_bytes.to_string(),
            origin: origin("segment_bytes"),
            allowed: format!(
                "a multiple of {} in {}..={}",
                bounds::SEGMENT_BYTES_MULTIPLE,
                bounds::SEGMENT_BYTES.start(),
                bounds::SEGMENT_BYTES.end()
            ),
        });
    }

    if let Some(disk_bytes_max) = layer.disk_bytes_max {
        let least = (shards as u64)
            .saturating_mul(defaults::DISK_SEGMENTS_PER_SHARD_MIN)
            .saturating_mul(segment_bytes);
        if bounds::DISK_BYTES.contains(&disk_bytes_max) && disk_bytes_max < least {
            errors.push(ConfigError::Invalid {
                key: "disk_bytes_max",
                value: disk_bytes_max.to_string(),
                origin: origin("disk_bytes_max"),
                reason: format!(
                    "each of the {shards} shards' logs needs room for at least {} segments of \
                     segment_bytes = {segment_bytes}: at least {least}",
                    defaults::DISK_SEGMENTS_PER_SHARD_MIN
                ),
            });
        }
    }

    let listen_text = get(layer.listen, "listen");
    let listen = parse_listen(&listen_text).unwrap_or_else(|reason| {
        errors.push(ConfigError::Invalid {
            key: "listen",
            value: listen_text.clone(),
            origin: origin("listen"),
            reason,
        });
        SocketAddr::from(([127, 0, 0, 1], 0))
    });

    let data_dir = get(layer.data_dir, "data_dir");
    if data_dir.as_os_str().is_empty() {
        errors.push(ConfigError::Invalid {
            key: "data_dir",
            value: String::new(),
            origin: origin("data_dir"),
            reason: "the data directory must be named".to_owned(),
        });
    }

    let plaintext = get(layer.auth_plaintext, "auth_plaintext");
    let auth = match layer.auth_file {
        Some(path) if path.as_os_str().is_empty() => {
            errors.push(ConfigError::Invalid {
                key: "auth_file",
                value: String::new(),
                origin: origin("auth_file"),
                reason: "name a password file, or leave auth_file unset for no authentication"
                    .to_owned(),
            });
            AuthConfig::Off
        }
        Some(path) if plaintext => AuthConfig::StompserverPlain(path),
        Some(path) => AuthConfig::PasswordFile(path),
        None if plaintext => {
            errors.push(ConfigError::Invalid {
                key: "auth_plaintext",
                value: "true".to_owned(),
                origin: origin("auth_plaintext"),
                reason: "auth_plaintext needs auth_file (or use -a for ./.passwd)".to_owned(),
            });
            AuthConfig::Off
        }
        None => AuthConfig::Off,
    };

    let log_level = normalize_log_level(&get(layer.log_level, "log_level"));
    if log_level.is_empty() {
        errors.push(ConfigError::Invalid {
            key: "log_level",
            value: log_level.clone(),
            origin: origin("log_level"),
            reason: "expected a level such as info or debug".to_owned(),
        });
    } else if let Err(error) = tracing_subscriber::EnvFilter::builder().parse(&log_level) {
        errors.push(ConfigError::Invalid {
            key: "log_level",
            value: log_level.clone(),
            origin: origin("log_level"),
            reason: format!("not a level or RUST_LOG-style filter: {error}"),
        });
    }

    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    Ok(Config {
        listen,
        shards,
        data_dir,
        limits,
        connections_max,
        out_buffer_bytes_max,
        heartbeat_send_ms,
        heartbeat_receive_ms,
        heartbeat_read_grace_percent,
        fsync,
        segment_bytes,
        queue_type: get(layer.queue_type, "queue_type"),
        auth,
        dead_letter_deliveries_max,
        prefetch_default,
        prefetch_bytes_default,
        queue_messages_max,
        queue_bytes_max,
        memory_bytes_max,
        disk_bytes_max: layer.disk_bytes_max,
        topic_subscriber_stall_ms,
        connect_timeout_ms,
        login_failure_delay_ms,
        log_level,
    })
}

/// Installs the global `tracing` subscriber: human-readable lines on stderr (stdout is for
/// command output), filtered by the validated `log_level`.
pub fn init_tracing(log_level: &str) {
    init_tracing_with(log_level, std::io::stderr);
}

/// As [`init_tracing`], writing through `writer` (the broker passes a non-blocking one).
pub fn init_tracing_with<W>(log_level: &str, writer: W)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = tracing_subscriber::EnvFilter::builder()
        .parse(log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(defaults::LOG_LEVEL));
    // A second call (tests, embedding) keeps the first subscriber, which is what we want.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(writer)
        .try_init();
}
