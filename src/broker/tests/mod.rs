//! Tests of the broker logic through the same entry points the server uses. [`Cluster`] plays
//! the server: it owns one or more shards, carries peer messages over per-pair FIFO links,
//! decodes what each connection was sent, and records log appends.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use super::*;
use crate::codec::{Command, Decoded, Decoder, Frame, Header, Limits, Version};
use store::TestStore;

mod disk;
mod flow;
mod hostile;
mod memory;
mod metrics;
mod monitor;
mod paging;
mod property;
mod queue;
mod receipts;
mod session;
mod simulation;
mod store;
mod topic;
mod transactions;

/// A frame the broker wrote, decoded and owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Sent {
    pub command: Command,
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Sent {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name.as_bytes())
            .map(|(_, v)| std::str::from_utf8(v).expect("test headers are UTF-8"))
    }

    pub fn body_str(&self) -> &str {
        std::str::from_utf8(&self.body).expect("test bodies are UTF-8")
    }
}

/// What one connection saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    Frame(Sent),
    Heartbeat,
    Closed,
}

/// Builds a frame with owned headers around a borrowed body.
pub(crate) fn frame<'b>(command: Command, headers: &[(&str, &str)], body: &'b [u8]) -> Frame<'b> {
    let mut frame = Frame::new(command).with_body(body);
    for (name, value) in headers {
        frame.headers.push(Header {
            name: Cow::Owned(name.as_bytes().to_vec()),
            value: Cow::Owned(value.as_bytes().to_vec()),
        });
    }
    frame
}

/// The throttle effects for one connection, in order (true: paused).
pub(crate) fn throttles_of(cluster: &Cluster, conn: ConnectionId) -> Vec<bool> {
    cluster
        .throttles
        .iter()
        .filter(|(c, _)| *c == conn)
        .map(|(_, paused)| *paused)
        .collect()
}

/// The `ack` header of a client-ack MESSAGE, to ACK it by.
pub(crate) fn ack_id(frame: &Sent) -> String {
    frame
        .header("ack")
        .expect("client-ack MESSAGE has an ack header")
        .to_string()
}

pub(crate) struct Cluster {
    pub shards: Vec<Shard<TestStore>>,
    /// Peer messages in flight, FIFO per (from, to).
    pub links: BTreeMap<(u16, u16), VecDeque<ShardMessage>>,
    pub now: u64,
    pub seen: HashMap<ConnectionId, Vec<Seen>>,
    versions: HashMap<ConnectionId, Version>,
    pub plans: HashMap<ConnectionId, HeartbeatPlan>,
    /// Log appends in order, per shard, with their durability tokens.
    pub appended: Vec<(ShardId, Record, Option<DurableToken>)>,
    /// Deliver all peer messages after each call (false in the simulation, which interleaves).
    pub auto_pump: bool,
    /// With `auto_pump`, report every written connection flushed (its socket kept up).
    pub auto_flush: bool,
    /// Offloaded login checks asked for, in order.
    pub logins: Vec<(ConnectionId, Vec<u8>, Vec<u8>)>,
    /// The highest token reported durable, per shard.
    pub durable_reported: HashMap<u16, DurableToken>,
    /// Connections written to since they were last reported flushed.
    pub unflushed: std::collections::BTreeSet<ConnectionId>,
    /// Every byte each connection was sent, in order, as the server would write it.
    pub raw: HashMap<ConnectionId, Vec<u8>>,
    /// Connections whose last write ended a frame, so a leading EOL in their next write is
    /// that frame's trailer (a MESSAGE's trailer is written after its shared body), not a
    /// heart-beat.
    trailer_due: std::collections::HashSet<ConnectionId>,
    /// Every `Effect::Throttle`, in order: (connection, paused).
    pub throttles: Vec<(ConnectionId, bool)>,
}

impl Cluster {
    pub fn new(shard_count: u16, config: BrokerConfig) -> Cluster {
        Cluster::with_auth(shard_count, config, Arc::new(AllowAll))
    }

    pub fn with_auth(
        shard_count: u16,
        config: BrokerConfig,
        auth: Arc<dyn Authenticator>,
    ) -> Cluster {
        let stores = (0..shard_count).map(|_| TestStore::default()).collect();
        Cluster::with_stores(config, auth, stores, 1)
    }

    /// Shards over the given stores (one per shard), numbering messages from
    /// `first_message_seq`.
    fn with_stores(
        config: BrokerConfig,
        auth: Arc<dyn Authenticator>,
        stores: Vec<TestStore>,
        first_message_seq: u64,
    ) -> Cluster {
        let shard_count = stores.len() as u16;
        let shards = stores
            .into_iter()
            .enumerate()
            .map(|(id, store)| {
                let (id, auth) = (ShardId(id as u16), auth.clone());
                Shard::with_store(
                    id,
                    shard_count,
                    config.clone(),
                    auth,
                    first_message_seq,
                    store,
                )
            })
            .collect();
        Cluster {
            shards,
            links: BTreeMap::new(),
            now: 1_000_000,
            seen: HashMap::new(),
            versions: HashMap::new(),
            plans: HashMap::new(),
            appended: Vec::new(),
            auto_pump: true,
            auto_flush: true,
            durable_reported: HashMap::new(),
            logins: Vec::new(),
            unflushed: std::collections::BTreeSet::new(),
            raw: HashMap::new(),
            trailer_due: std::collections::HashSet::new(),
            throttles: Vec::new(),
        }
    }

    /// The broker after a kill -9 with every append durable: everything in memory is gone
    /// (connections, peer messages in flight, the harness's record of appends), and fresh
    /// shards restore each store's live records, in log order, as the server's recovery does.
    /// Message ids go on from `first_message_seq`, as the server's start time makes them.
    pub fn restart(self, first_message_seq: u64) -> Cluster {
        let config = self.shards[0].config().clone();
        let now = self.now;
        let mut stores: Vec<TestStore> = self
            .shards
            .into_iter()
            .map(|mut shard| std::mem::take(shard.store_mut()))
            .collect();
        let recovered: Vec<Vec<Recovered>> = stores.iter_mut().map(TestStore::recovered).collect();
        let mut cluster =
            Cluster::with_stores(config, Arc::new(AllowAll), stores, first_message_seq);
        cluster.now = now;
        for (shard, recovered) in cluster.shards.iter_mut().zip(recovered) {
            shard
                .restore(recovered)
                .expect("each store holds its own shard's queues");
        }
        cluster
    }

    pub fn single() -> Cluster {
        Cluster::new(1, BrokerConfig::default())
    }

    pub fn open(&mut self, shard: u16) -> ConnectionId {
        let now = self.now;
        self.shards[shard as usize].open_connection(now)
    }

    /// Opens a connection and completes a STOMP 1.2 CONNECT.
    pub fn connect(&mut self, shard: u16) -> ConnectionId {
        let conn = self.open(shard);
        self.send(
            conn,
            frame(
                Command::Connect,
                &[("accept-version", "1.2"), ("host", "h")],
                b"",
            ),
        );
        let seen = self.take(conn);
        assert!(
            matches!(&seen[..], [Seen::Frame(f)] if f.command == Command::Connected),
            "{seen:?}"
        );
        conn
    }

    pub fn send(&mut self, conn: ConnectionId, frame: Frame<'_>) {
        let mut out = Effects::new();
        let now = self.now;
        self.shards[conn.shard.0 as usize].on_frame(conn, &frame, now, &mut out);
        self.absorb(conn.shard, out);
        self.pump_if_auto();
    }

    pub fn lose(&mut self, conn: ConnectionId) {
        let mut out = Effects::new();
        let now = self.now;
        self.shards[conn.shard.0 as usize].on_connection_lost(conn, now, &mut out);
        self.absorb(conn.shard, out);
        self.pump_if_auto();
    }

    /// The server reports the out buffer full (`false`) or drained to empty (`true`).
    pub fn writable(&mut self, conn: ConnectionId, writable: bool) {
        if writable {
            self.drained_to(conn, 0);
            return;
        }
        let mut out = Effects::new();
        let now = self.now;
        self.shards[conn.shard.0 as usize].on_writable(conn, false, now, &mut out);
        self.absorb(conn.shard, out);
        self.pump_if_auto();
    }

    /// The server reports the out buffer, reported full before, drained to `bytes`.
    pub fn drained_to(&mut self, conn: ConnectionId, bytes: u64) {
        self.out_bytes(conn, bytes);
        let mut out = Effects::new();
        let now = self.now;
        self.shards[conn.shard.0 as usize].on_writable(conn, true, now, &mut out);
        self.absorb(conn.shard, out);
        self.pump_if_auto();
    }

    /// The server reports what the out buffer holds (after a batch of writes).
    pub fn out_bytes(&mut self, conn: ConnectionId, bytes: u64) {
        let mut out = Effects::new();
        let now = self.now;
        self.shards[conn.shard.0 as usize].on_out_bytes(conn, bytes, now, &mut out);
        self.absorb(conn.shard, out);
        self.pump_if_auto();
    }

    pub fn tick(&mut self) {
        for index in 0..self.shards.len() {
            let mut out = Effects::new();
            let now = self.now;
            self.shards[index].on_tick(now, &mut out);
            self.absorb(ShardId(index as u16), out);
        }
        self.pump_if_auto();
    }

    pub fn durable(&mut self, shard: u16, token: DurableToken) {
        let reported = self.durable_reported.entry(shard).or_insert(token);
        *reported = (*reported).max(token);
        let mut out = Effects::new();
        let now = self.now;
        self.shards[shard as usize].on_durable(token, now, &mut out);
        self.absorb(ShardId(shard), out);
        self.pump_if_auto();
    }

    pub fn flush(&mut self, conn: ConnectionId) {
        self.unflushed.remove(&conn);
        let mut out = Effects::new();
        let now = self.now;
        self.shards[conn.shard.0 as usize].on_flushed(conn, now, &mut out);
        self.absorb(conn.shard, out);
    }

    pub fn login_result(&mut self, conn: ConnectionId, accepted: bool) {
        let mut out = Effects::new();
        let now = self.now;
        self.shards[conn.shard.0 as usize].on_login_result(conn, accepted, now, &mut out);
        self.absorb(conn.shard, out);
        self.pump_if_auto();
    }

    pub fn login_queue_full(&mut self, conn: ConnectionId) {
        let mut out = Effects::new();
        let now = self.now;
        self.shards[conn.shard.0 as usize].on_login_queue_full(conn, now, &mut out);
        self.absorb(conn.shard, out);
        self.pump_if_auto();
    }

    /// Moves the clock `ms` forward and ticks every shard.
    pub fn advance(&mut self, ms: u64) {
        self.now += ms;
        self.tick();
    }

    fn pump_if_auto(&mut self) {
        if !self.auto_pump {
            return;
        }
        loop {
            while self.step_link(0) {}
            if !self.auto_flush {
                return;
            }
            let Some(conn) = self.unflushed.pop_first() else {
                return;
            };
            self.flush(conn);
        }
    }

    /// Delivers the first message of the `choice`-th non-empty link. False when none is left.
    pub fn step_link(&mut self, choice: usize) -> bool {
        let busy: Vec<(u16, u16)> = self
            .links
            .iter()
            .filter(|(_, queue)| !queue.is_empty())
            .map(|(key, _)| *key)
            .collect();
        if busy.is_empty() {
            return false;
        }
        let key = busy[choice % busy.len()];
        let message = self
            .links
            .get_mut(&key)
            .and_then(VecDeque::pop_front)
            .expect("non-empty link");
        let mut out = Effects::new();
        let now = self.now;
        self.shards[key.1 as usize].on_peer_message(message, now, &mut out);
        self.absorb(ShardId(key.1), out);
        true
    }

    pub fn links_empty(&self) -> bool {
        self.links.values().all(VecDeque::is_empty)
    }

    fn absorb(&mut self, from: ShardId, out: Effects) {
        for effect in out.list.iter() {
            match effect {
                Effect::Write { conn, bytes, body } => {
                    self.unflushed.insert(*conn);
                    let mut data = out.slice(bytes).to_vec();
                    if let Some(message) = body {
                        data.extend_from_slice(&message.body);
                        data.push(0);
                    }
                    self.raw.entry(*conn).or_default().extend_from_slice(&data);
                    self.decode_into(*conn, &data);
                }
                Effect::Connected {
                    conn,
                    version,
                    heartbeat,
                } => {
                    self.versions.insert(*conn, *version);
                    self.plans.insert(*conn, *heartbeat);
                }
                Effect::Close { conn } => self.seen.entry(*conn).or_default().push(Seen::Closed),
                Effect::Throttle { conn, paused } => self.throttles.push((*conn, *paused)),
                Effect::Authenticate {
                    conn,
                    login,
                    passcode,
                } => self.logins.push((*conn, login.to_vec(), passcode.to_vec())),
                Effect::Append { record, token } => {
                    self.shards[usize::from(from.0)].store_mut().apply(record);
                    self.appended.push((from, record.clone(), *token))
                }
                Effect::Peer { to, message } => {
                    assert_ne!(*to, from, "a shard routes to itself locally");
                    self.links
                        .entry((from.0, to.0))
                        .or_default()
                        .push_back(message.clone());
                }
            }
        }
    }

    fn decode_into(&mut self, conn: ConnectionId, data: &[u8]) {
        let mut decoder = Decoder::new(Limits::default());
        decoder.set_version(self.versions.get(&conn).copied().unwrap_or(Version::V1_0));
        let mut rest = data;
        if self.trailer_due.remove(&conn) {
            rest = rest.strip_prefix(b"\n").unwrap_or(rest);
        }
        while !rest.is_empty() {
            match decoder
                .decode(rest)
                .expect("the broker writes valid frames")
            {
                Decoded::Frame { frame, consumed } => {
                    let sent = Sent {
                        command: frame.command,
                        headers: frame
                            .headers
                            .iter()
                            .map(|h| (h.name.to_vec(), h.value.to_vec()))
                            .collect(),
                        body: frame.body.to_vec(),
                    };
                    self.seen.entry(conn).or_default().push(Seen::Frame(sent));
                    rest = &rest[consumed..];
                    match rest.strip_prefix(b"\n") {
                        Some(after) => rest = after,
                        None => {
                            self.trailer_due.insert(conn);
                        }
                    }
                }
                Decoded::Heartbeat { consumed } => {
                    self.seen.entry(conn).or_default().push(Seen::Heartbeat);
                    rest = &rest[consumed..];
                }
                Decoded::NeedMore => panic!("a write holds whole frames: {rest:?}"),
            }
        }
    }

    pub fn take(&mut self, conn: ConnectionId) -> Vec<Seen> {
        self.seen.remove(&conn).unwrap_or_default()
    }

    /// The frames a connection was sent since the last take, heart-beats left out.
    pub fn frames(&mut self, conn: ConnectionId) -> Vec<Sent> {
        self.take(conn)
            .into_iter()
            .filter_map(|seen| match seen {
                Seen::Frame(frame) => Some(frame),
                _ => None,
            })
            .collect()
    }

    /// Asserts the connection got exactly one ERROR and was closed; returns the ERROR.
    pub fn expect_error(&mut self, conn: ConnectionId) -> Sent {
        let seen = self.take(conn);
        match &seen[..] {
            [Seen::Frame(error), Seen::Closed] if error.command == Command::Error => error.clone(),
            _ => panic!("expected ERROR then close, got {seen:?}"),
        }
    }

    // Shorthands for common frames.

    pub fn subscribe(&mut self, conn: ConnectionId, id: &str, destination: &str, ack: &str) {
        self.send(
            conn,
            frame(
                Command::Subscribe,
                &[("id", id), ("destination", destination), ("ack", ack)],
                b"",
            ),
        );
    }

    /// SUBSCRIBE with an ActiveMQ prefetch window.
    pub fn subscribe_prefetch(
        &mut self,
        conn: ConnectionId,
        destination: &str,
        ack: &str,
        prefetch: u32,
    ) {
        let prefetch = prefetch.to_string();
        self.send(
            conn,
            frame(
                Command::Subscribe,
                &[
                    ("id", "s"),
                    ("destination", destination),
                    ("ack", ack),
                    ("activemq.prefetchSize", &prefetch),
                ],
                b"",
            ),
        );
    }

    pub fn publish(&mut self, conn: ConnectionId, destination: &str, body: &str) {
        self.send(
            conn,
            frame(
                Command::Send,
                &[("destination", destination)],
                body.as_bytes(),
            ),
        );
    }

    pub fn ack(&mut self, conn: ConnectionId, ack_id: &str) {
        self.send(conn, frame(Command::Ack, &[("id", ack_id)], b""));
    }
}

/// Bodies of the MESSAGE frames in `frames`.
pub(crate) fn bodies(frames: &[Sent]) -> Vec<String> {
    frames
        .iter()
        .filter(|f| f.command == Command::Message)
        .map(|f| f.body_str().to_string())
        .collect()
}

/// Shards run one per thread and messages cross between them.
#[test]
fn shards_and_their_messages_can_move_between_threads() {
    fn assert_send<T: Send>() {}
    assert_send::<Shard>();
    assert_send::<ShardMessage>();
    assert_send::<Effects>();
}
