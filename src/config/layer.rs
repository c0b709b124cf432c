//! One layer of settings: what a single source (the defaults, the config file, the environment,
//! the command line) says, key by key, with `None` where that source is silent.
//!
//! The key list is written once, in the `layer!` invocation below; the TOML table, the
//! environment variable names (`STOMPD_` + the key in capitals) and the merge all come from it,
//! so a key cannot exist in one source and be missing from another. The flags are the one hand
//! written copy (clap needs their help text); a test checks that every key has its flag.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::types::{FsyncPolicy, QueueType};
use super::ConfigError;

/// Where a resolved value came from; error messages name it so the operator knows what to edit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// stompd's built-in default.
    Default,
    /// The TOML config file at this path.
    File(PathBuf),
    /// This environment variable.
    Env(String),
    /// This command-line flag, as the operator would type it (`--shards`, `-p`).
    Flag(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("the default"),
            Origin::File(path) => write!(f, "config file {}", path.display()),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// The environment variable that carries `key`.
pub fn env_var_name(key: &str) -> String {
    format!("STOMPD_{}", key.to_ascii_uppercase())
}

/// The long flag that carries `key`.
pub fn flag_name(key: &str) -> String {
    format!("--{}", key.replace('_', "-"))
}

/// How an environment variable's text becomes a value. Like `FromStr`, except that booleans
/// also take the spellings container tooling tends to write (`1`, `yes`, `on`).
trait FromEnv: Sized {
    fn from_env(text: &str) -> Result<Self, String>;
}

macro_rules! from_env_via_from_str {
    ($($ty:ty),*) => {$(
        impl FromEnv for $ty {
            fn from_env(text: &str) -> Result<$ty, String> {
                <$ty as FromStr>::from_str(text.trim()).map_err(|error| error.to_string())
            }
        }
    )*};
}

from_env_via_from_str!(usize, u32, u64, String, PathBuf, FsyncPolicy, QueueType);

impl FromEnv for bool {
    fn from_env(text: &str) -> Result<bool, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err("expected true or false".to_owned()),
        }
    }
}

macro_rules! layer {
    ($( $(#[$doc:meta])* $key:ident : $ty:ty, )*) => {
        /// What one source says about each key; `None` where it says nothing. The TOML config
        /// file deserializes straight into this (unknown keys are an error), and
        /// `print-config` serializes a full one back.
        #[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
        #[serde(deny_unknown_fields)]
        pub struct Layer {
            $(
                $(#[$doc])*
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub $key: Option<$ty>,
            )*
        }

        impl Layer {
            /// Every key, in the order of the config file.
            pub const KEYS: &'static [&'static str] = &[$(stringify!($key)),*];

            /// Reads `STOMPD_<KEY>` for every key through `lookup`. Empty values count as unset,
            /// because compose files and unit files write `VAR=` to mean "not set".
            pub fn from_env(
                lookup: &dyn Fn(&str) -> Option<String>,
            ) -> Result<Layer, Vec<ConfigError>> {
                let mut layer = Layer::default();
                let mut errors = Vec::new();
                $(
                    let var = env_var_name(stringify!($key));
                    if let Some(text) = lookup(&var).filter(|text| !text.trim().is_empty()) {
                        match <$ty as FromEnv>::from_env(&text) {
                            Ok(value) => layer.$key = Some(value),
                            Err(reason) => errors.push(ConfigError::Env { var, value: text, reason }),
                        }
                    }
                )*
                if errors.is_empty() { Ok(layer) } else { Err(errors) }
            }

            /// Lays `top` over `self`: every key `top` sets replaces ours, and `origins`
            /// records that it now comes from `origin(key)`.
            pub(super) fn overlay(
                &mut self,
                top: Layer,
                origin: &dyn Fn(&'static str) -> Origin,
                origins: &mut BTreeMap<&'static str, Origin>,
            ) {
                $(
                    if let Some(value) = top.$key {
                        self.$key = Some(value);
                        origins.insert(stringify!($key), origin(stringify!($key)));
                    }
                )*
            }
        }
    };
}

layer! {
    /// Address the STOMP listener binds, `HOST:PORT`.
    listen: String,
    /// Event-loop threads, one per core; destinations are split among them by name.
    shards: usize,
    /// Directory that holds the durable queue log (and nothing else).
    data_dir: PathBuf,
    /// Largest whole frame accepted, in bytes.
    frame_bytes_max: usize,
    /// Most headers accepted in one frame.
    headers_count_max: usize,
    /// Longest header line (or command line) accepted, in bytes.
    header_line_bytes_max: usize,
    /// Largest frame body accepted, in bytes.
    body_bytes_max: usize,
    /// Most client connections open at once, over all shards.
    connections_max: usize,
    /// Bytes queued for sending on one connection before the broker stops handing it messages.
    out_buffer_bytes_max: usize,
    /// The server's heart-beat send interval offered in CONNECTED (`sx`), ms; 0 = none.
    heartbeat_send_ms: u64,
    /// The heart-beat interval the server asks clients for in CONNECTED (`sy`), ms; 0 = none.
    heartbeat_receive_ms: u64,
    /// Silence tolerated before a connection is declared dead, in percent of the negotiated
    /// client-to-server heart-beat interval.
    heartbeat_read_grace_percent: u64,
    /// When the log fsyncs: `always`, `every:<ms>` or `never`.
    fsync: FsyncPolicy,
    /// Size of each log segment file, bytes (a multiple of 4096).
    segment_bytes: u64,
    /// Where queue messages live: `file` (the log) or `memory`.
    queue_type: QueueType,
    /// Password file; when set, CONNECT must carry a login and passcode found in it.
    auth_file: PathBuf,
    /// Read `auth_file` as stompserver's plain-text `user:password` lines instead of hashes.
    auth_plaintext: bool,
    /// Deliveries of one message without an ACK before it moves to the dead-letter queue.
    dead_letter_deliveries_max: u32,
    /// Unacknowledged messages per subscription when the client does not say.
    prefetch_default: u32,
    /// Bytes of messages in a queue subscription's window (at least one message always fits).
    prefetch_bytes_default: u64,
    /// Messages a queue holds for consumers before its producers are paused (producer flow
    /// control); SENDs already on their way are taken up to a quarter more, then refused.
    queue_messages_max: u64,
    /// Body bytes a queue holds for consumers before its producers are paused, as above.
    queue_bytes_max: u64,
    /// Bytes the broker may hold for clients, all cores: stored messages, open transactions,
    /// out buffers, frames being reassembled. Producers are paused as it fills.
    memory_bytes_max: u64,
    /// Bytes of disk the queue log may take, all shards together (each gets an equal share).
    /// Producers are paused as a shard's share fills; past it, SENDs to be logged get ERROR.
    /// Unset: the log's size now plus the filesystem's free space, less 10 % of its size.
    disk_bytes_max: u64,
    /// How long a topic subscriber whose connection is full holds the topic's producers back
    /// before it counts as slow (and misses messages past its slack instead), ms.
    topic_subscriber_stall_ms: u64,
    /// How long a connection may take to send a complete CONNECT before it is closed, ms.
    connect_timeout_ms: u64,
    /// How long a refused login waits for its ERROR, ms (0: at once).
    login_failure_delay_ms: u64,
    /// Log filter: a level (`info`, `debug`) or `RUST_LOG`-style directives.
    log_level: String,
}
