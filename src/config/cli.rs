//! The command line: clap's derive structs and their help text.
//!
//! Flags are parsed here but not applied here: [`RunArgs::to_layer`] turns them into the top
//! [`Layer`], and [`super::resolve`] stacks it on the file and the environment. clap's own
//! `env` feature is deliberately not used for the keys, so that the environment is read in one
//! place, from a map the caller passes (tests pass their own; no test touches the process
//! environment).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use super::layer::Layer;
use super::types::{FsyncPolicy, QueueType};

const LONG_ABOUT: &str = "\
stompd: a STOMP 1.0/1.1/1.2 message broker for Linux (thread-per-core, io_uring, durable queues \
in a per-core log, topics in memory).

Every setting can come from four places. Later ones win:
  1. the built-in default (shown with each flag below),
  2. the TOML config file given with -C/--config (or STOMPD_CONFIG); no file is read otherwise,
  3. the environment: STOMPD_<KEY>, e.g. STOMPD_SHARDS=4 (empty values count as unset),
  4. the flags on the command line.
The TOML key is the flag's long name with '_' for '-' (--frame-bytes-max is frame_bytes_max), \
and the environment variable is that key in capitals after STOMPD_. Unknown keys in the file and \
unknown STOMPD_ variables are reported. `stompd check-config FILE` validates a file; \
`stompd --print-config` prints the resolved settings as TOML, each with where it came from.

Flags with a short form (-p -b -w -s -q -a -c -d -C -l) take the meaning they have in Ruby's \
stompserver, so its command lines keep working.";

const AFTER_LONG_HELP: &str = "\
Examples:
  stompd                                   listen on 127.0.0.1:61613, queues in ./stompd-data
  stompd --listen 0.0.0.0:61613 --shards 4 --data-dir /var/lib/stompd
  stompd -C /etc/stompd/stompd.toml        read settings from a TOML file
  STOMPD_FSYNC=every:5 stompd              trade the power-loss guarantee for throughput
  stompd passwd --file /etc/stompd/users alice    add or change a user (prompts twice)
  stompd --auth-file /etc/stompd/users     require login/passcode from that file
  stompd -p 61613 -b 0.0.0.0 -q file -a    stompserver's flags, with its plain .passwd

A config file (every key is optional):
  listen = \"0.0.0.0:61613\"
  shards = 4
  data_dir = \"/var/lib/stompd\"
  fsync = \"always\"            # or \"every:5\" or \"never\"
  auth_file = \"/etc/stompd/users\"
  body_bytes_max = 16777216

Logs go to stderr. RUST_LOG works as an alias of STOMPD_LOG_LEVEL.
Exit status: 0 stopped cleanly, 1 failed while running, 2 bad flags or settings.";

/// The `stompd` command line.
#[derive(Parser, Debug)]
#[command(
    name = "stompd",
    version,
    about = "A STOMP 1.0/1.1/1.2 message broker (thread-per-core, io_uring, durable queues)",
    long_about = LONG_ABOUT,
    after_long_help = AFTER_LONG_HELP,
    args_conflicts_with_subcommands = true,
)]
pub struct Cli {
    #[command(flatten)]
    pub run: RunArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What `stompd` does besides serving.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Parse and validate a TOML config file; print the resolved settings or every error.
    /// Exit 0 when valid, 1 when not. The environment and flags are not applied.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Add a user to a password file, or change their password. The password is read from
    /// stdin when stdin is not a terminal, else prompted for twice without echo. The file is
    /// rewritten atomically with mode 0600; other lines and comments are kept.
    Passwd(PasswdArgs),
}

/// `stompd passwd [--file PATH] USER`.
#[derive(Args, Debug)]
pub struct PasswdArgs {
    /// The password file to edit; created when missing. Defaults to the broker's auth_file
    /// when STOMPD_AUTH_FILE is set, so both name the same file.
    #[arg(
        long,
        short = 'f',
        value_name = "PATH",
        env = "STOMPD_AUTH_FILE",
        default_value = "stompd.passwd"
    )]
    pub file: PathBuf,
    /// The login to add or change.
    pub user: String,
}

/// The settings flags of `stompd` (serving). Every one is optional: absent means "ask the
/// layers below" (environment, config file, default).
#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// TOML config file. Relative paths are taken after -w. [env: STOMPD_CONFIG]
    /// (stompserver's -C read YAML; stompd reads TOML.)
    #[arg(
        short = 'C',
        long = "config",
        visible_alias = "config-file",
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,

    /// Change to this directory before anything else; relative paths (config file, data
    /// directory, password files) are then relative to it. [env: STOMPD_WORKDIR]
    /// (stompserver -w/--working_dir)
    #[arg(
        short = 'w',
        long = "workdir",
        alias = "working_dir",
        value_name = "DIR"
    )]
    pub workdir: Option<PathBuf>,

    /// Print the resolved settings as TOML (each with its origin) and exit.
    #[arg(long)]
    pub print_config: bool,

    /// Address to listen on, HOST:PORT (IPv6 as [::1]:61613).
    /// [default: 127.0.0.1:61613] [env: STOMPD_LISTEN] [toml: listen]
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,

    /// Port to listen on; replaces the port of --listen's value from the file or environment.
    /// (stompserver -p/--port)
    #[arg(
        short = 'p',
        long = "port",
        value_name = "PORT",
        conflicts_with = "listen"
    )]
    pub port: Option<u16>,

    /// Host or address to listen on; replaces the host of --listen's value from the file or
    /// environment. (stompserver -b/--host)
    #[arg(
        short = 'b',
        long = "host",
        value_name = "HOST",
        conflicts_with = "listen"
    )]
    pub host: Option<String>,

    /// Event-loop threads (1..=1024), one per core.
    /// [default: number of CPUs] [env: STOMPD_SHARDS] [toml: shards]
    #[arg(long, value_name = "N")]
    pub shards: Option<usize>,

    /// Directory for the durable queue log.
    /// [default: stompd-data] [env: STOMPD_DATA_DIR] [toml: data_dir]
    /// (stompserver -s/--storage, whose default was .stompserver)
    #[arg(short = 's', long, alias = "storage", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Largest frame accepted, bytes (1024..=1073741824).
    /// [default: body_bytes_max + 65536] [env: STOMPD_FRAME_BYTES_MAX] [toml: frame_bytes_max]
    #[arg(long, value_name = "BYTES")]
    pub frame_bytes_max: Option<usize>,

    /// Most headers in one frame (8..=100000).
    /// [default: 1000] [env: STOMPD_HEADERS_COUNT_MAX] [toml: headers_count_max]
    #[arg(long, value_name = "N")]
    pub headers_count_max: Option<usize>,

    /// Longest header line, bytes (256..=frame_bytes_max).
    /// [default: 8192] [env: STOMPD_HEADER_LINE_BYTES_MAX] [toml: header_line_bytes_max]
    #[arg(long, value_name = "BYTES")]
    pub header_line_bytes_max: Option<usize>,

    /// Largest body, bytes (1..=frame_bytes_max).
    /// [default: 16777216] [env: STOMPD_BODY_BYTES_MAX] [toml: body_bytes_max]
    #[arg(long, value_name = "BYTES")]
    pub body_bytes_max: Option<usize>,

    /// Most open client connections, all shards together (1..=1000000).
    /// [default: 10000] [env: STOMPD_CONNECTIONS_MAX] [toml: connections_max]
    #[arg(long, value_name = "N")]
    pub connections_max: Option<usize>,

    /// Bytes waiting to be sent on one connection before it is given no more messages
    /// (4096..=1073741824). [default: 262144] [env: STOMPD_OUT_BUFFER_BYTES_MAX]
    /// [toml: out_buffer_bytes_max]
    #[arg(long, value_name = "BYTES")]
    pub out_buffer_bytes_max: Option<usize>,

    /// Fastest heart-beat the server sends (CONNECTED heart-beat sx): a client asking for a
    /// longer interval gets it, a shorter one gets this. ms; 0 = the 1 s floor,
    /// else 1000..=3600000. [default: 1000] [env: STOMPD_HEARTBEAT_SEND_MS]
    /// [toml: heartbeat_send_ms]
    #[arg(long, value_name = "MS")]
    pub heartbeat_send_ms: Option<u64>,

    /// Fastest heart-beat the server expects from a client (CONNECTED heart-beat sy): a
    /// client offering a longer interval is held to that, a shorter one to this. ms; 0 = never
    /// expect heart-beats, else 1000..=3600000. [default: 1000] [env: STOMPD_HEARTBEAT_RECEIVE_MS]
    /// [toml: heartbeat_receive_ms]
    #[arg(long, value_name = "MS")]
    pub heartbeat_receive_ms: Option<u64>,

    /// Silence tolerated from a client, in percent of the negotiated heart-beat interval
    /// (100..=1000). [default: 200] [env: STOMPD_HEARTBEAT_READ_GRACE_PERCENT]
    /// [toml: heartbeat_read_grace_percent]
    #[arg(long, value_name = "PERCENT")]
    pub heartbeat_read_grace_percent: Option<u64>,

    /// When the log fsyncs: always (before each RECEIPT; survives power loss), every:<ms>
    /// (survives kill -9, may lose the last <ms> on power loss) or never.
    /// [default: always] [env: STOMPD_FSYNC] [toml: fsync]
    #[arg(long, value_name = "POLICY")]
    pub fsync: Option<FsyncPolicy>,

    /// Size of each durable-log segment file, bytes: a multiple of 4096 in 65536..=4294967296.
    /// One message must fit in 15/16 of a segment. [default: 67108864]
    /// [env: STOMPD_SEGMENT_BYTES] [toml: segment_bytes]
    #[arg(long, value_name = "BYTES")]
    pub segment_bytes: Option<u64>,

    /// stompserver's checkpoint interval, seconds (0..=60). 0 changes nothing; N > 0 means
    /// --fsync every:N000, with a warning. (stompserver -c/--checkpoint)
    #[arg(
        short = 'c',
        long = "checkpoint",
        value_name = "SECONDS",
        conflicts_with = "fsync"
    )]
    pub checkpoint: Option<u64>,

    /// Where queue messages live: file (the durable log) or memory. stompserver's dbm and
    /// activerecord are refused. [default: file] [env: STOMPD_QUEUE_TYPE] [toml: queue_type]
    /// (stompserver -q/--queuetype, whose default was memory)
    #[arg(short = 'q', long, alias = "queuetype", value_name = "TYPE")]
    pub queue_type: Option<QueueType>,

    /// Require login/passcode from this password file (user:$argon2id$... or bcrypt lines; see
    /// `stompd passwd`). [default: none, no auth] [env: STOMPD_AUTH_FILE] [toml: auth_file]
    #[arg(long, value_name = "FILE")]
    pub auth_file: Option<PathBuf>,

    /// Read --auth-file as stompserver's plain-text user:password lines (not recommended).
    /// [default: false] [env: STOMPD_AUTH_PLAINTEXT] [toml: auth_plaintext]
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub auth_plaintext: Option<bool>,

    /// stompserver's -a: require auth from the plain-text .passwd in the working directory
    /// (same as --auth-file .passwd --auth-plaintext). (stompserver -a/--auth)
    #[arg(short = 'a', long = "auth", conflicts_with_all = ["auth_file", "auth_plaintext"])]
    pub stompserver_auth: bool,

    /// Deliveries of one message without an ACK before it is dead-lettered (1..=10000).
    /// [default: 7] [env: STOMPD_DEAD_LETTER_DELIVERIES_MAX] [toml: dead_letter_deliveries_max]
    #[arg(long, value_name = "N")]
    pub dead_letter_deliveries_max: Option<u32>,

    /// Unacknowledged messages per subscription when the client sets no prefetch header
    /// (1..=1000000). [default: 1000] [env: STOMPD_PREFETCH_DEFAULT] [toml: prefetch_default]
    #[arg(long, value_name = "N")]
    pub prefetch_default: Option<u32>,

    /// Bytes of messages a queue subscription has between its queue and its client at most
    /// (4096..=1073741824); a message larger than this goes out alone.
    /// [default: 4194304] [env: STOMPD_PREFETCH_BYTES_DEFAULT] [toml: prefetch_bytes_default]
    #[arg(long, value_name = "BYTES")]
    pub prefetch_bytes_default: Option<u64>,

    /// Messages a queue holds for consumers before its producers are paused (producer flow
    /// control: their input is not read until the queue drains to three quarters); SENDs
    /// already on their way are taken up to a quarter more, then refused with ERROR
    /// (1..=1000000000). [default: 1000000000, bounded by disk: disk_bytes_max and
    /// memory_bytes_max bound a backlog] [env: STOMPD_QUEUE_MESSAGES_MAX]
    /// [toml: queue_messages_max]
    #[arg(long, value_name = "N")]
    pub queue_messages_max: Option<u64>,

    /// Body bytes a queue holds for consumers before its producers are paused, as
    /// --queue-messages-max (65536..=1099511627776). [default: 1099511627776, bounded by disk]
    /// [env: STOMPD_QUEUE_BYTES_MAX] [toml: queue_bytes_max]
    #[arg(long, value_name = "BYTES")]
    pub queue_bytes_max: Option<u64>,

    /// Bytes the broker may hold for clients, all cores together: stored messages, open
    /// transactions, out buffers, frames being reassembled. Past seven eighths producers are
    /// paused (released under three quarters); a transactional SEND there, or any SEND past
    /// the budget, gets ERROR (16777216..=17592186044416). [default: 40 % of the cgroup's
    /// memory.max, else of MemTotal] [env: STOMPD_MEMORY_BYTES_MAX] [toml: memory_bytes_max]
    #[arg(long, value_name = "BYTES")]
    pub memory_bytes_max: Option<u64>,

    /// Bytes of disk the queue log may take, all shards together; each shard's log gets an
    /// equal share and at least 4 segments. Past seven eighths of a share, producers to that
    /// shard's queues are paused (released under three quarters); a SEND whose record would
    /// pass it gets ERROR `message not stored: disk_bytes_max exceeded`, as on a full disk
    /// (262144..=1152921504606846976). [default: what the log takes now plus the filesystem's
    /// available space, less a reserve of 10 % of its size; logged at start]
    /// [env: STOMPD_DISK_BYTES_MAX] [toml: disk_bytes_max]
    #[arg(long, value_name = "BYTES")]
    pub disk_bytes_max: Option<u64>,

    /// How long a topic subscriber whose connection is full holds the topic's producers back
    /// before it counts as slow and misses messages past its slack instead, so one client that
    /// never reads cannot stall a topic (100..=3600000). [default: 5000]
    /// [env: STOMPD_TOPIC_SUBSCRIBER_STALL_MS] [toml: topic_subscriber_stall_ms]
    #[arg(long, value_name = "MS")]
    pub topic_subscriber_stall_ms: Option<u64>,

    /// A connection that has not sent a complete CONNECT this long after it was accepted gets
    /// ERROR and is closed; the wait for a login's verdict does not count (100..=3600000).
    /// [default: 10000] [env: STOMPD_CONNECT_TIMEOUT_MS] [toml: connect_timeout_ms]
    #[arg(long, value_name = "MS")]
    pub connect_timeout_ms: Option<u64>,

    /// A refused login's ERROR is sent this long after the verdict, so guessing passwords is
    /// slow; 0 answers at once (0..=60000). [default: 1000]
    /// [env: STOMPD_LOGIN_FAILURE_DELAY_MS] [toml: login_failure_delay_ms]
    #[arg(long, value_name = "MS")]
    pub login_failure_delay_ms: Option<u64>,

    /// Log filter: trace, debug, info, warn, error, off, or RUST_LOG-style directives
    /// (stompd=debug,info). [default: info] [env: STOMPD_LOG_LEVEL, then RUST_LOG]
    /// [toml: log_level] (stompserver -l/--log_level; its `fatal` means error)
    #[arg(short = 'l', long, alias = "log_level", value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Debug logging, same as --log-level debug. (stompserver -d/--debug)
    #[arg(short = 'd', long, conflicts_with = "log_level")]
    pub debug: bool,
}

/// The flag to name in messages about `key` when a stompserver-style flag set it.
pub(super) fn compat_flag(key: &str, args: &RunArgs) -> Option<&'static str> {
    match key {
        "data_dir" if args.data_dir.is_some() => Some("-s/--data-dir"),
        "queue_type" if args.queue_type.is_some() => Some("-q/--queue-type"),
        "log_level" if args.debug => Some("-d/--debug"),
        "log_level" if args.log_level.is_some() => Some("-l/--log-level"),
        "fsync" if args.checkpoint.is_some() => Some("-c/--checkpoint"),
        "auth_file" | "auth_plaintext" if args.stompserver_auth => Some("-a/--auth"),
        _ => None,
    }
}

impl RunArgs {
    /// The keys the flags set, as a layer. `-p`/`-b` are not here: they edit the listen
    /// address after all layers are merged (see [`super::resolve`]). `-c` becomes `fsync`
    /// only for N > 0.
    pub fn to_layer(&self) -> Layer {
        let mut layer = Layer {
            listen: self.listen.clone(),
            shards: self.shards,
            data_dir: self.data_dir.clone(),
            frame_bytes_max: self.frame_bytes_max,
            headers_count_max: self.headers_count_max,
            header_line_bytes_max: self.header_line_bytes_max,
            body_bytes_max: self.body_bytes_max,
            connections_max: self.connections_max,
            out_buffer_bytes_max: self.out_buffer_bytes_max,
            heartbeat_send_ms: self.heartbeat_send_ms,
            heartbeat_receive_ms: self.heartbeat_receive_ms,
            heartbeat_read_grace_percent: self.heartbeat_read_grace_percent,
            fsync: self.fsync,
            segment_bytes: self.segment_bytes,
            queue_type: self.queue_type,
            auth_file: self.auth_file.clone(),
            auth_plaintext: self.auth_plaintext,
            dead_letter_deliveries_max: self.dead_letter_deliveries_max,
            prefetch_default: self.prefetch_default,
            prefetch_bytes_default: self.prefetch_bytes_default,
            queue_messages_max: self.queue_messages_max,
            queue_bytes_max: self.queue_bytes_max,
            memory_bytes_max: self.memory_bytes_max,
            disk_bytes_max: self.disk_bytes_max,
            topic_subscriber_stall_ms: self.topic_subscriber_stall_ms,
            connect_timeout_ms: self.connect_timeout_ms,
            login_failure_delay_ms: self.login_failure_delay_ms,
            log_level: self.log_level.clone(),
        };
        if self.debug {
            layer.log_level = Some("debug".to_owned());
        }
        if let Some(seconds) = self.checkpoint.filter(|&seconds| seconds > 0) {
            layer.fsync = Some(FsyncPolicy::Every {
                interval_ms: seconds.saturating_mul(1000),
            });
        }
        if self.stompserver_auth {
            layer.auth_file = Some(PathBuf::from(".passwd"));
            layer.auth_plaintext = Some(true);
        }
        layer
    }
}
