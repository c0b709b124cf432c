//! Login checks off the shard threads. An argon2id verification costs milliseconds and
//! 19 MiB, bcrypt at cost 12 a quarter of a second: done on a shard's event loop, every client
//! of that core would wait. A few worker threads take `(shard, connection, login, passcode)`
//! jobs from one bounded queue and put verdicts on the asking shard's own channel, which the
//! shard polls on every loop turn it is called for (and on each tick).
//!
//! Bounds: `AUTH_QUEUE_LEN_MAX` jobs wait at most; a login arriving when the queue is full is
//! refused at once with ERROR `server busy, …` (the client may retry), so a flood of
//! CONNECTs cannot grow memory or starve the workers.
//!
//! Each shard's [`AuthClient`] remembers the credentials the workers accepted
//! ([`LoginCache`]), so the slow hash runs once per distinct credential and shard rather than
//! once per CONNECT: a thousand clients of one user reconnecting after a restart cost one
//! verification per shard, not a thousand. Logins of one credential that arrive while it is
//! being checked wait for that check instead of queueing their own. The cache lives on the
//! shard, not behind the workers: shared-nothing (no lock between cores), and a hit is
//! answered on the core without a trip through the queue; the price is at most one hash per
//! credential per shard. The password file is read once at start (there is no reload), so
//! a cached verdict holds for the life of the process; a reload would have to empty the caches.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use argon2::password_hash::rand_core::{OsRng, RngCore};
use blake2::digest::consts::U32;
use blake2::digest::{KeyInit, Mac};
use blake2::Blake2bMac;

use crate::auth::PasswordFile;
use crate::broker::{Authenticator, ConnectionId};

/// Logins waiting for a worker, all shards together. 1,024: a reconnect storm of a thousand
/// clients queues instead of being refused, while a queue this long already means seconds of
/// work at argon2id's cost.
pub const AUTH_QUEUE_LEN_MAX: usize = 1024;

/// Worker threads: two, so one slow bcrypt entry does not hold up every login, without taking
/// many cores from the shards (the hash is memory-hard and the machine has few cores).
pub const AUTH_WORKERS: usize = 2;

/// Accepted credentials one shard remembers. 4,096: more distinct (user, password) pairs
/// than a broker's clients use, at 64 bytes each (256 KiB per shard); when full, the oldest
/// is forgotten and costs one more hash next time.
pub const LOGIN_CACHE_ENTRIES_MAX: usize = 4096;

/// Credentials the workers accepted, by a keyed hash (BLAKE2b-256 MAC under a key drawn from
/// the OS at start, never stored): the passcode itself is never kept, and without the key the
/// entries cannot be checked against guesses. Only accepted credentials enter, so a hit (which
/// answers faster than a miss) tells a client nothing it is not told anyway: that its
/// password is right. Misses, right or wrong, all go to the workers.
pub struct LoginCache {
    key: [u8; 32],
    entries: HashSet<CredentialDigest>,
    /// Insertion order, oldest first, for eviction.
    order: VecDeque<CredentialDigest>,
    entries_max: usize,
}

/// The keyed hash of one `(login, passcode)`.
type CredentialDigest = [u8; 32];

impl LoginCache {
    pub fn new(entries_max: usize) -> LoginCache {
        let mut key = [0u8; 32];
        OsRng.fill_bytes(&mut key);
        LoginCache {
            key,
            entries: HashSet::new(),
            order: VecDeque::new(),
            entries_max,
        }
    }

    /// The login's length goes first so `("ab", "c")` and `("a", "bc")` differ.
    fn digest(&self, login: &[u8], passcode: &[u8]) -> CredentialDigest {
        let mut mac = <Blake2bMac<U32> as KeyInit>::new_from_slice(&self.key)
            .expect("a 32-byte key is within BLAKE2b's 64");
        mac.update(&(login.len() as u64).to_le_bytes());
        mac.update(login);
        mac.update(passcode);
        mac.finalize().into_bytes().into()
    }

    fn contains(&self, digest: &CredentialDigest) -> bool {
        self.entries.contains(digest)
    }

    fn insert(&mut self, digest: CredentialDigest) {
        if self.entries_max == 0 || !self.entries.insert(digest) {
            return;
        }
        self.order.push_back(digest);
        while self.order.len() > self.entries_max {
            if let Some(oldest) = self.order.pop_front() {
                self.entries.remove(&oldest);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The broker's view of a password file: `verify` is constant-time and safe from any thread.
pub struct PasswordAuthenticator(pub Arc<PasswordFile>);

impl Authenticator for PasswordAuthenticator {
    fn authenticate(&self, login: &[u8], passcode: &[u8]) -> bool {
        self.0.verify(login, passcode)
    }
}

struct Job {
    shard: usize,
    /// Names the check in the verdict: every connection waiting on it gets the answer.
    digest: CredentialDigest,
    login: Box<[u8]>,
    passcode: Box<[u8]>,
}

/// The worker pool; dropped when the server stops (workers end once every sender is gone).
pub struct AuthPool {
    jobs: SyncSender<Job>,
    /// The workers' end, kept here too so the queue stays open whatever the worker count.
    _queue: Arc<Mutex<Receiver<Job>>>,
    workers: Vec<JoinHandle<()>>,
}

/// A shard's end: submit jobs, collect verdicts. Owned by the shard's thread.
pub struct AuthClient {
    shard: usize,
    jobs: SyncSender<Job>,
    /// The queue's bound, for the log line when it is full.
    queue_len_max: usize,
    /// `(credential, accepted)` from the workers.
    verdicts: Receiver<(CredentialDigest, bool)>,
    cache: LoginCache,
    /// Checks queued by this shard and the connections waiting on each; one entry per open
    /// connection of the shard waiting for a login (a connection that closes first leaves by
    /// [`AuthClient::forget`]), so the lists are bounded by the shard's open connections
    /// however often a client reconnects while a check waits.
    in_flight: HashMap<CredentialDigest, Vec<ConnectionId>>,
    /// The check each connection in `in_flight` waits on, to find it again in `forget`.
    waiting_on: HashMap<ConnectionId, CredentialDigest>,
    /// Verdicts already known, for connections not yet told.
    ready: VecDeque<(ConnectionId, bool)>,
}

/// What became of a login handed to [`AuthClient::submit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submitted {
    /// The credential was accepted before ([`LoginCache`]): let the client in now.
    Accepted,
    /// A worker will check it (or is checking the same credential already): the verdict
    /// comes from [`AuthClient::poll`].
    Queued,
    /// The queue is full: answer `server busy` now.
    QueueFull,
}

impl AuthPool {
    /// Starts the workers and returns one client per shard.
    pub fn start(
        passwords: Arc<PasswordFile>,
        shards: usize,
    ) -> std::io::Result<(AuthPool, Vec<AuthClient>)> {
        AuthPool::start_with(
            passwords,
            shards,
            AUTH_QUEUE_LEN_MAX,
            AUTH_WORKERS,
            LOGIN_CACHE_ENTRIES_MAX,
        )
    }

    /// As [`AuthPool::start`] with other bounds (tests: a short queue, no workers).
    pub fn start_with(
        passwords: Arc<PasswordFile>,
        shards: usize,
        queue_len_max: usize,
        worker_count: usize,
        cache_entries_max: usize,
    ) -> std::io::Result<(AuthPool, Vec<AuthClient>)> {
        let (jobs, queue) = mpsc::sync_channel::<Job>(queue_len_max);
        let queue = Arc::new(Mutex::new(queue));
        let mut senders: Vec<Sender<(CredentialDigest, bool)>> = Vec::with_capacity(shards);
        let mut clients = Vec::with_capacity(shards);
        for shard in 0..shards {
            let (sender, verdicts) = mpsc::channel();
            senders.push(sender);
            clients.push(AuthClient {
                shard,
                jobs: jobs.clone(),
                queue_len_max,
                verdicts,
                cache: LoginCache::new(cache_entries_max),
                in_flight: HashMap::new(),
                waiting_on: HashMap::new(),
                ready: VecDeque::new(),
            });
        }
        let senders = Arc::new(senders);
        let mut workers = Vec::with_capacity(worker_count);
        for index in 0..worker_count {
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
                        let _ = senders[job.shard].send((job.digest, accepted));
                    })?,
            );
        }
        Ok((
            AuthPool {
                jobs,
                _queue: queue,
                workers,
            },
            clients,
        ))
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
    /// Looks the credential up, or queues a check of it (once, however many connections ask).
    pub fn submit(
        &mut self,
        conn: ConnectionId,
        login: Box<[u8]>,
        passcode: Box<[u8]>,
    ) -> Submitted {
        let digest = self.cache.digest(&login, &passcode);
        if self.cache.contains(&digest) {
            return Submitted::Accepted;
        }
        if let Some(waiting) = self.in_flight.get_mut(&digest) {
            waiting.push(conn);
            self.waiting_on.insert(conn, digest);
            return Submitted::Queued;
        }
        match self.jobs.try_send(Job {
            shard: self.shard,
            digest,
            login,
            passcode,
        }) {
            Ok(()) => {
                self.in_flight.insert(digest, vec![conn]);
                self.waiting_on.insert(conn, digest);
                Submitted::Queued
            }
            Err(TrySendError::Full(_)) => {
                tracing::warn!(
                    "login refused: server busy, the login queue is full ({} logins wait \
                     for verification)",
                    self.queue_len_max
                );
                Submitted::QueueFull
            }
            Err(TrySendError::Disconnected(_)) => Submitted::QueueFull,
        }
    }

    /// A verdict for one connection, if one is ready. Never blocks.
    pub fn poll(&mut self) -> Option<(ConnectionId, bool)> {
        loop {
            if let Some(verdict) = self.ready.pop_front() {
                return Some(verdict);
            }
            let (digest, accepted) = self.verdicts.try_recv().ok()?;
            if accepted {
                self.cache.insert(digest);
            }
            for conn in self.in_flight.remove(&digest).unwrap_or_default() {
                self.waiting_on.remove(&conn);
                self.ready.push_back((conn, accepted));
            }
        }
    }

    /// The connection closed: it no longer waits for a verdict. The check itself stays queued
    /// (other connections of the credential may still come to wait on it, and an accepted
    /// credential is remembered all the same). Unknown connections are ignored, so this may be
    /// called for every connection that closes.
    pub fn forget(&mut self, conn: ConnectionId) {
        if let Some(digest) = self.waiting_on.remove(&conn) {
            if let Some(waiting) = self.in_flight.get_mut(&digest) {
                // Linear, but a list holds only open connections of this shard; the order of
                // a list does not matter (every entry gets the same verdict).
                if let Some(index) = waiting.iter().position(|waiter| *waiter == conn) {
                    waiting.swap_remove(index);
                }
            }
        }
        if !self.ready.is_empty() {
            self.ready.retain(|(waiter, _)| *waiter != conn);
        }
    }

    /// Connections waiting for a verdict.
    pub fn waiting(&self) -> usize {
        debug_assert_eq!(
            self.waiting_on.len(),
            self.in_flight.values().map(Vec::len).sum::<usize>()
        );
        self.waiting_on.len()
    }

    /// Accepted credentials remembered.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::auth::PasswordFormat;
    use crate::broker::ShardId;

    fn conn(local: u64) -> ConnectionId {
        ConnectionId {
            shard: ShardId(0),
            local,
        }
    }

    fn boxed(text: &str) -> Box<[u8]> {
        text.as_bytes().into()
    }

    fn passwords() -> Arc<PasswordFile> {
        Arc::new(PasswordFile::parse(b"alice:secret\n", PasswordFormat::StompserverPlain).unwrap())
    }

    /// Waits (bounded) for `count` verdicts.
    fn verdicts(client: &mut AuthClient, count: usize) -> Vec<(ConnectionId, bool)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        while seen.len() < count {
            assert!(Instant::now() < deadline, "verdicts so far: {seen:?}");
            match client.poll() {
                Some(verdict) => seen.push(verdict),
                None => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        seen
    }

    #[test]
    fn a_full_queue_is_reported_and_a_credential_in_flight_takes_no_slot() {
        // No workers: nothing leaves the queue.
        let (pool, mut clients) = AuthPool::start_with(passwords(), 1, 2, 0, 16).unwrap();
        let client = &mut clients[0];
        assert_eq!(
            client.submit(conn(1), boxed("a"), boxed("1")),
            Submitted::Queued
        );
        assert_eq!(
            client.submit(conn(2), boxed("b"), boxed("1")),
            Submitted::Queued
        );
        assert_eq!(
            client.submit(conn(3), boxed("c"), boxed("1")),
            Submitted::QueueFull
        );
        assert_eq!(
            client.submit(conn(4), boxed("a"), boxed("1")),
            Submitted::Queued,
            "waits for the check already queued"
        );
        assert_eq!(client.poll(), None);
        drop(clients);
        pool.stop();
    }

    #[test]
    fn accepted_credentials_are_remembered_and_refused_ones_are_not() {
        let (pool, mut clients) = AuthPool::start_with(passwords(), 1, 8, 1, 16).unwrap();
        let client = &mut clients[0];
        // Two connections, one check: both get the verdict.
        for local in [1, 2] {
            assert_eq!(
                client.submit(conn(local), boxed("alice"), boxed("secret")),
                Submitted::Queued
            );
        }
        let mut got = verdicts(client, 2);
        got.sort_by_key(|(conn, _)| conn.local);
        assert_eq!(got, [(conn(1), true), (conn(2), true)]);
        assert_eq!(client.cached(), 1);
        assert_eq!(
            client.submit(conn(3), boxed("alice"), boxed("secret")),
            Submitted::Accepted
        );
        // Same bytes split differently between login and passcode are another credential.
        assert_eq!(
            client.submit(conn(4), boxed("alicesecre"), boxed("t")),
            Submitted::Queued
        );
        assert_eq!(verdicts(client, 1), [(conn(4), false)]);
        for local in [5, 6] {
            assert_eq!(
                client.submit(conn(local), boxed("alice"), boxed("wrong")),
                Submitted::Queued,
                "a refused credential is checked again"
            );
            assert_eq!(verdicts(client, 1), [(conn(local), false)]);
        }
        assert_eq!(client.cached(), 1);
        drop(clients);
        pool.stop();
    }

    #[test]
    fn connections_that_close_while_waiting_leave_the_waiting_list() {
        // No workers: the check never ends, as with a long queue ahead of it.
        let (pool, mut clients) = AuthPool::start_with(passwords(), 1, 2, 0, 16).unwrap();
        let client = &mut clients[0];
        // A client reconnecting again and again with one credential while it is checked.
        for local in 0..10_000 {
            assert_eq!(
                client.submit(conn(local), boxed("alice"), boxed("secret")),
                Submitted::Queued
            );
            client.forget(conn(local));
            assert_eq!(client.waiting(), 0, "after connection {local}");
        }
        // One job for the credential, however many connections came and went.
        assert_eq!(
            client.submit(conn(10_000), boxed("bob"), boxed("1")),
            Submitted::Queued
        );
        assert_eq!(client.waiting(), 1);
        // Forgetting a connection that waits on nothing (or twice) changes nothing.
        client.forget(conn(20_000));
        client.forget(conn(9_999));
        assert_eq!(client.waiting(), 1);
        assert_eq!(client.poll(), None);
        drop(clients);
        pool.stop();
    }

    #[test]
    fn a_closed_connection_gets_no_verdict_and_the_others_do() {
        let (pool, mut clients) = AuthPool::start_with(passwords(), 1, 8, 1, 16).unwrap();
        let client = &mut clients[0];
        for local in [1, 2, 3] {
            assert_eq!(
                client.submit(conn(local), boxed("alice"), boxed("secret")),
                Submitted::Queued
            );
        }
        // Whether or not the worker has answered yet, nothing is read before `poll`.
        client.forget(conn(2));
        assert_eq!(client.waiting(), 2);
        let mut got = verdicts(client, 2);
        got.sort_by_key(|(conn, _)| conn.local);
        assert_eq!(got, [(conn(1), true), (conn(3), true)]);
        assert_eq!(client.poll(), None);
        assert_eq!(client.waiting(), 0);
        assert_eq!(client.cached(), 1, "the verdict is remembered all the same");
        drop(clients);
        pool.stop();
    }

    #[test]
    fn the_cache_forgets_its_oldest_entry_when_full() {
        let mut cache = LoginCache::new(2);
        let digests: Vec<CredentialDigest> = ["a", "b", "c"]
            .iter()
            .map(|user| cache.digest(user.as_bytes(), b"x"))
            .collect();
        for digest in &digests {
            cache.insert(*digest);
        }
        cache.insert(digests[2]);
        assert_eq!(cache.len(), 2);
        assert!(!cache.contains(&digests[0]));
        assert!(cache.contains(&digests[1]) && cache.contains(&digests[2]));
        // Another process (another key) files the same credential elsewhere.
        assert_ne!(LoginCache::new(2).digest(b"a", b"x"), digests[0]);
    }
}
