//! Login checks off the shard threads. An argon2id verification costs milliseconds and
//! 19 MiB, bcrypt at cost 12 a quarter of a second: done on a shard's event loop, every client
//! of that core would wait. A few worker threads take `(shard, connection, login, passcode)`
//! jobs from one bounded queue and put verdicts on the asking shard's own channel, which the
//! shard polls on every loop turn it is called for (and on each tick).
//!
//! Bounds: `AUTH_QUEUE_LEN_MAX` jobs wait at most; a login arriving when the queue is full is
//! refused at once (the client gets the usual login ERROR and may retry), so a flood of
//! CONNECTs cannot grow memory or starve the workers.

use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::auth::PasswordFile;
use crate::broker::{Authenticator, ConnectionId};

/// Logins waiting for a worker, all shards together. 1,024: a reconnect storm of a thousand
/// clients queues instead of being refused, while a queue this long already means seconds of
/// work at argon2id's cost.
pub const AUTH_QUEUE_LEN_MAX: usize = 1024;

/// Worker threads: two, so one slow bcrypt entry does not hold up every login, without taking
/// many cores from the shards (the hash is memory-hard and the machine has few cores).
pub const AUTH_WORKERS: usize = 2;

/// The broker's view of a password file: `verify` is constant-time and safe from any thread.
pub struct PasswordAuthenticator(pub Arc<PasswordFile>);

impl Authenticator for PasswordAuthenticator {
    fn authenticate(&self, login: &[u8], passcode: &[u8]) -> bool {
        self.0.verify(login, passcode)
    }
}

struct Job {
    shard: usize,
    conn: ConnectionId,
    login: Box<[u8]>,
    passcode: Box<[u8]>,
}

/// The worker pool; dropped when the server stops (workers end once every sender is gone).
pub struct AuthPool {
    jobs: SyncSender<Job>,
    workers: Vec<JoinHandle<()>>,
}

/// A shard's end: submit jobs, collect verdicts.
pub struct AuthClient {
    shard: usize,
    jobs: SyncSender<Job>,
    verdicts: Receiver<(ConnectionId, bool)>,
}

impl AuthPool {
    /// Starts the workers and returns one client per shard.
    pub fn start(
        passwords: Arc<PasswordFile>,
        shards: usize,
    ) -> std::io::Result<(AuthPool, Vec<AuthClient>)> {
        let (jobs, queue) = mpsc::sync_channel::<Job>(AUTH_QUEUE_LEN_MAX);
        let queue = Arc::new(Mutex::new(queue));
        let mut senders: Vec<Sender<(ConnectionId, bool)>> = Vec::with_capacity(shards);
        let mut clients = Vec::with_capacity(shards);
        for shard in 0..shards {
            let (sender, verdicts) = mpsc::channel();
            senders.push(sender);
            clients.push(AuthClient {
                shard,
                jobs: jobs.clone(),
                verdicts,
            });
        }
        let senders = Arc::new(senders);
        let mut workers = Vec::with_capacity(AUTH_WORKERS);
        for index in 0..AUTH_WORKERS {
            let queue = queue.clone();
            let senders = senders.clone();
            let passwords = passwords.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("stompd-auth-{index}"))
                    .spawn(move || loop {
                        let job = match queue.lock() {
                            Ok(queue) => queue.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        let accepted = passwords.verify(&job.login, &job.passcode);
                        // The shard is gone only at shutdown; the verdict no longer matters.
                        let _ = senders[job.shard].send((job.conn, accepted));
                    })?,
            );
        }
        Ok((AuthPool { jobs, workers }, clients))
    }

    /// Stops the workers once queued jobs are done (the shards' clients are dropped first).
    pub fn stop(self) {
        drop(self.jobs);
        for worker in self.workers {
            let _ = worker.join();
        }
    }
}

impl AuthClient {
    /// Queues a check. `false` when the queue is full: refuse the login now.
    pub fn submit(&self, conn: ConnectionId, login: Box<[u8]>, passcode: Box<[u8]>) -> bool {
        match self.jobs.try_send(Job {
            shard: self.shard,
            conn,
            login,
            passcode,
        }) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                tracing::warn!(
                    "login refused: {AUTH_QUEUE_LEN_MAX} logins already wait for verification"
                );
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }

    /// A verdict, if one is ready. Never blocks.
    pub fn poll(&self) -> Option<(ConnectionId, bool)> {
        self.verdicts.try_recv().ok()
    }
}
