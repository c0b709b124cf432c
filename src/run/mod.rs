//! The running broker: glues the settings ([`crate::config`]), the per-core event loops
//! ([`crate::server`]), the broker logic ([`crate::broker`]), the durable log ([`crate::log`])
//! and the password file ([`crate::auth`]) into the process that `stompd` starts.
//!
//! Start-up, in order: refuse a data directory written with more shards than configured (the
//! queue-to-shard mapping must not change under a log); take the data directory's lock; open
//! and recover every shard's log (in parallel, one thread per shard) and restore the broker
//! shards from it; bind the listeners; start the auth workers if the password file is slow to
//! verify; run the shards until SIGINT/SIGTERM; drain; sync the logs.
//!
//! What each thread owns: `stompd-shard-N` owns its [`handler::BrokerHandler`] (one
//! `broker::Shard` and one `log::ShardLog`), `stompd-auth-N` only verifies passwords, the
//! caller waits. Nothing is shared between shards except the bounded queues of the server.

pub mod auth;
pub mod handler;
pub mod listening;
pub mod trim;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use thiserror::Error;

use crate::auth::PasswordFile;
use crate::broker::{AllowAll, Authenticator, BrokerConfig, RestoreError, Shard, ShardId};
use crate::config::{Config, QueueType};
use crate::log::{LogConfig, LogError, ShardLog};
use crate::server::{HeartbeatConfig, Server, ServerConfig, ServerError, Shutdown};

use self::auth::{AuthPool, PasswordAuthenticator};
use self::handler::BrokerHandler;
use crate::log::Durability;

/// Why the broker could not start or stopped with an error. Each message says how to fix it.
#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("cannot use the data directory {}: {source}. Fix: create it or choose another with --data-dir", path.display())]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the data directory {} is in use by another stompd process (its lock file {} is held). Fix: stop the other broker, or give this one its own --data-dir", dir.display(), dir.join(LOCK_FILE).display())]
    Locked { dir: PathBuf },
    #[error("the data directory {} was written by a broker with at least {found} shards, but --shards is {configured}: queues are assigned to shards by name, so the shard count of a data directory cannot change. Fix: run with --shards {found}, or drain the queues and start from an empty --data-dir", dir.display())]
    ShardCountChanged {
        dir: PathBuf,
        found: usize,
        configured: usize,
    },
    #[error("shard {shard}: cannot open its log: {source}")]
    Log {
        shard: usize,
        #[source]
        source: LogError,
    },
    #[error("shard {shard}: {source}. Fix: run with the shard count the data directory was written with")]
    Restore {
        shard: usize,
        #[source]
        source: RestoreError,
    },
    #[error("cannot start a thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The lock file in the data directory: two brokers on one log would corrupt it.
pub const LOCK_FILE: &str = "stompd.lock";

/// The server's settings from the operator's.
pub fn server_config(config: &Config) -> ServerConfig {
    ServerConfig {
        listen: config.listen,
        shards: config.shards,
        limits: config.limits,
        connections_max: config.connections_max,
        out_buffer_bytes_max: config.out_buffer_bytes_max,
        heartbeat: HeartbeatConfig {
            send_ms: config.heartbeat_send_ms,
            receive_ms: config.heartbeat_receive_ms,
            read_grace_percent: config.heartbeat_read_grace_percent,
        },
        ..ServerConfig::default()
    }
}

/// The broker logic's settings from the operator's. `login_offloaded` when the password
/// file is slow to verify (hashes): checks then run on the auth workers.
pub fn broker_config(config: &Config, login_offloaded: bool) -> BrokerConfig {
    let defaults = BrokerConfig::default();
    let file = config.queue_type == QueueType::File;
    BrokerConfig {
        log_enabled: file,
        receipts_wait_for_sync: file
            && crate::log::FsyncPolicy::from(config.fsync).receipt_waits_for_sync(),
        prefetch_default_messages: config.prefetch_default,
        prefetch_default_bytes: config.prefetch_bytes_default,
        out_buffer_bytes_max: config.out_buffer_bytes_max as u64,
        queue_messages_max: usize::try_from(config.queue_messages_max).unwrap_or(usize::MAX),
        queue_bytes_max: config.queue_bytes_max,
        // One budget per broker run, shared by every core.
        memory: crate::broker::MemoryBudget::leak(config.memory_bytes_max),
        topic_subscriber_stall_ms: config.topic_subscriber_stall_ms,
        connect_timeout_ms: config.connect_timeout_ms,
        login_failure_delay_ms: config.login_failure_delay_ms,
        deliveries_max: config.dead_letter_deliveries_max,
        // `sx`: the fastest the server promises to beat. The broker logic has no "never"
        // (a client that asks for beats gets them), so 0 keeps its 1 s floor.
        heartbeat_send_ms_min: if config.heartbeat_send_ms == 0 {
            defaults.heartbeat_send_ms_min
        } else {
            config.heartbeat_send_ms
        },
        heartbeat_receive_ms: config.heartbeat_receive_ms,
        heartbeat_read_grace_percent: config.heartbeat_read_grace_percent,
        login_offloaded,
        ..defaults
    }
}

/// The log settings of shard `shard`, whose share of the disk budget is `disk_share` bytes.
pub fn log_config(config: &Config, shard: usize, disk_share: u64) -> LogConfig {
    let mut log = LogConfig::new(&config.data_dir, shard as u32);
    log.fsync = config.fsync.into();
    log.segment_bytes = config.segment_bytes;
    log.disk_bytes_max = disk_share;
    log
}

/// The disk budget the shards' logs share (`disk_bytes_max`), as resolved at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskBudget {
    /// All shards together.
    pub total: u64,
    /// Each shard's log: an equal share (queues are spread over shards by name).
    pub per_shard: u64,
    /// How the default was computed; `None` when `disk_bytes_max` was set.
    pub default_from: Option<DiskSpace>,
}

/// What the default `disk_bytes_max` was computed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskSpace {
    /// Bytes the log's files took at start.
    pub log_bytes: u64,
    /// The data directory's filesystem: its size and the space unprivileged writers have.
    pub size_bytes: u64,
    pub available_bytes: u64,
}

impl std::fmt::Display for DiskBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes ({} per shard", self.total, self.per_shard)?;
        match self.default_from {
            None => write!(f, ", as set)"),
            Some(space) => write!(
                f,
                ", the default: the log's {} bytes plus {} available on its filesystem of {}, \
                 less a reserve of {} %)",
                space.log_bytes,
                space.available_bytes,
                space.size_bytes,
                crate::config::defaults::DISK_RESERVE_PERCENT
            ),
        }
    }
}

/// Resolves `disk_bytes_max`: as set, or by the default rule from the data directory's
/// filesystem (`statvfs`) and what the log's files take now. The data directory must exist.
pub fn disk_budget(config: &Config) -> Result<DiskBudget, RunError> {
    use crate::config::defaults;
    let shards = config.shards as u64;
    let minimum = shards * defaults::DISK_SEGMENTS_PER_SHARD_MIN * config.segment_bytes;
    let data_dir_error = |source| RunError::DataDir {
        path: config.data_dir.clone(),
        source,
    };
    let (total, default_from) = match config.disk_bytes_max {
        Some(total) => (total, None),
        None => {
            let (size_bytes, available_bytes) =
                filesystem_space(&config.data_dir).map_err(data_dir_error)?;
            let log_bytes = log_files_bytes(config).map_err(data_dir_error)?;
            let space = DiskSpace {
                log_bytes,
                size_bytes,
                available_bytes,
            };
            let total = defaults::disk_bytes_max(log_bytes, size_bytes, available_bytes, minimum);
            (total, Some(space))
        }
    };
    Ok(DiskBudget {
        total,
        per_shard: total / shards,
        default_from,
    })
}

/// The size of the filesystem that holds `dir`, and the space on it available to an
/// unprivileged writer, bytes.
fn filesystem_space(dir: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))?;
    // SAFETY: a NUL-terminated path and a zeroed struct for the kernel to fill.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let unit = stat.f_frsize as u64;
    Ok((
        (stat.f_blocks as u64).saturating_mul(unit),
        (stat.f_bavail as u64).saturating_mul(unit),
    ))
}

/// Bytes the files of every shard's log directory take now.
fn log_files_bytes(config: &Config) -> std::io::Result<u64> {
    let mut total = 0u64;
    for shard in 0..config.shards {
        let dir = crate::log::shard_dir(&config.data_dir, shard as u32);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error),
        };
        for entry in entries {
            let metadata = entry?.metadata()?;
            if metadata.is_file() {
                total = total.saturating_add(metadata.len());
            }
        }
    }
    Ok(total)
}

fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// Refuses a data directory that holds `shard-N` for some `N >= shards`.
fn check_shard_count(config: &Config) -> Result<(), RunError> {
    let entries = match std::fs::read_dir(&config.data_dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(RunError::DataDir {
                path: config.data_dir.clone(),
                source,
            })
        }
    };
    let mut highest = None;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(number) = name
            .to_str()
            .and_then(|name| name.strip_prefix("shard-"))
            .and_then(|number| number.parse::<usize>().ok())
        else {
            continue;
        };
        highest = highest.max(Some(number));
    }
    match highest {
        Some(highest) if highest >= config.shards => Err(RunError::ShardCountChanged {
            dir: config.data_dir.clone(),
            found: highest + 1,
            configured: config.shards,
        }),
        _ => Ok(()),
    }
}

/// Creates the data directory and takes its lock for the life of the returned file.
fn lock_data_dir(dir: &Path) -> Result<File, RunError> {
    std::fs::create_dir_all(dir).map_err(|source| RunError::DataDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))
        .map_err(|source| RunError::DataDir {
            path: dir.to_path_buf(),
            source,
        })?;
    // SAFETY: flock on a descriptor we own.
    let locked = unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    };
    if locked != 0 {
        return Err(RunError::Locked {
            dir: dir.to_path_buf(),
        });
    }
    Ok(file)
}

/// Opens (recovers) every shard's log in parallel and restores the broker shards from them.
fn open_shards(
    config: &Config,
    disk: &DiskBudget,
    broker: &BrokerConfig,
    authenticator: &Arc<dyn Authenticator>,
    first_message_seq: u64,
) -> Result<Vec<Shard<Option<Durability>>>, RunError> {
    let shards = config.shards;
    let open_one = |index: usize| -> Result<Shard<Option<Durability>>, RunError> {
        let mut shard = Shard::with_store(
            ShardId(index as u16),
            shards as u16,
            broker.clone(),
            authenticator.clone(),
            first_message_seq,
            None,
        );
        if config.queue_type == QueueType::Memory {
            return Ok(shard);
        }
        let log_error = |source| RunError::Log {
            shard: index,
            source,
        };
        let (log, report) =
            ShardLog::open_indexed(log_config(config, index, disk.per_shard)).map_err(log_error)?;
        if report.is_clean() {
            tracing::info!(shard = index, "log recovered: {report}");
        } else {
            tracing::warn!(shard = index, "log recovered with damage: {report}");
        }
        let mut durability = Durability::new(log);
        let mut refused = None;
        durability
            .recover(ShardId(index as u16), first_message_seq, |recovered| {
                if refused.is_none() {
                    refused = shard.restore_one(recovered).err();
                }
            })
            .map_err(log_error)?;
        if let Some(source) = refused {
            return Err(RunError::Restore {
                shard: index,
                source,
            });
        }
        *shard.store_mut() = Some(durability);
        Ok(shard)
    };
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..shards)
            .map(|index| {
                std::thread::Builder::new()
                    .name(format!("stompd-recover-{index}"))
                    .spawn_scoped(scope, move || open_one(index))
                    .map_err(RunError::Thread)
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle?
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// Runs the broker until `shutdown` is triggered, then drains and syncs. Returns once every
/// shard has stopped.
pub fn run(
    config: &Config,
    password_file: Option<PasswordFile>,
    shutdown: Shutdown,
) -> Result<(), RunError> {
    let passwords = password_file.map(Arc::new);
    let slow_auth = passwords
        .as_ref()
        .is_some_and(|passwords| passwords.verification_is_slow());
    let authenticator: Arc<dyn Authenticator> = match &passwords {
        Some(passwords) => Arc::new(PasswordAuthenticator(passwords.clone())),
        None => Arc::new(AllowAll),
    };
    let broker = broker_config(config, slow_auth);

    let (_lock, disk) = if config.queue_type == QueueType::File {
        check_shard_count(config)?;
        let lock = lock_data_dir(&config.data_dir)?;
        let disk = disk_budget(config)?;
        tracing::info!(
            disk_bytes_max = disk.total,
            "disk budget of the log: {disk}"
        );
        (Some(lock), Some(disk))
    } else {
        (None, None)
    };
    let boot_ms = epoch_ms();
    let unlimited = DiskBudget {
        total: u64::MAX,
        per_shard: u64::MAX,
        default_from: None,
    };
    let shards = open_shards(
        config,
        disk.as_ref().unwrap_or(&unlimited),
        &broker,
        &authenticator,
        boot_ms << 22,
    )?;

    let server = Server::bind(ServerConfig {
        // The broker's own budget: frames being reassembled count against it too.
        memory: broker.memory,
        ..server_config(config)
    })?;
    let (pool, clients) = match (&passwords, slow_auth) {
        (Some(passwords), true) => {
            let (pool, clients) =
                AuthPool::start(passwords.clone(), config.shards).map_err(RunError::Thread)?;
            (Some(pool), clients.into_iter().map(Some).collect())
        }
        _ => (None, (0..config.shards).map(|_| None).collect::<Vec<_>>()),
    };
    tracing::info!(
        address = %server.local_addr(),
        shards = config.shards,
        queue_type = %config.queue_type,
        fsync = %config.fsync,
        disk_bytes_max = disk.map_or(u64::MAX, |disk| disk.total),
        "stompd {} {}{}",
        env!("CARGO_PKG_VERSION"),
        listening::LISTENING_ON,
        server.local_addr()
    );
    // Scripts and tests start the broker on port 0 and read the port from this line, so it is
    // printed even when the log level hides it.
    if !tracing::enabled!(tracing::Level::INFO) {
        eprintln!(
            "stompd {} {}{}",
            env!("CARGO_PKG_VERSION"),
            listening::LISTENING_ON,
            server.local_addr()
        );
    }
    let parts: Vec<_> = shards
        .into_iter()
        .zip(clients)
        .map(|(shard, auth)| Mutex::new(Some((shard, auth))))
        .collect();
    // The loop's clock starts about now; the handlers add this to get epoch milliseconds.
    let epoch_base_ms = epoch_ms();
    let result = server.run(
        |index, _shards| {
            let (shard, auth) = parts[index]
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take()
                .expect("one handler per shard");
            BrokerHandler::new(shard, auth, epoch_base_ms)
        },
        shutdown,
    );
    if let Some(pool) = pool {
        pool.stop();
    }
    result?;
    tracing::info!("stopped cleanly");
    Ok(())
}
