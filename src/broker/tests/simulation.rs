//! A deterministic run of many clients against several shards. [`World`] models well-behaved
//! clients (they never send an illegal frame), drives a [`Cluster`] with random actions while
//! peer messages are delivered in a random (per-link FIFO) order, and checks after every step:
//!
//! - no MESSAGE reaches a subscription after its UNSUBSCRIBE;
//! - a queue message delivered again carries `redelivered:true`, and an auto-acked one is never
//!   delivered twice;
//! - the deliveries to one subscription that are not marked redelivered keep each producer's
//!   publish order;
//! - no ERROR frame is sent (the clients make no mistakes);
//!
//! and at the end, once every client is gone and every link drained, that each published queue
//! message was consumed exactly once or is still held, in its queue or its dead-letter queue.
//! The same model serves the proptest in `property.rs`.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use proptest::prelude::RngExt;
use proptest::test_runner::{RngAlgorithm, TestRng};

use super::*;

pub(crate) const DESTINATIONS: [&str; 4] = ["/queue/a", "/queue/b", "/queue/c", "/topic/t"];

/// One step of the run. Indices pick among what exists at the time (modulo), so any sequence
/// of actions is meaningful and shrinks well.
#[derive(Clone, Debug)]
pub(crate) enum Action {
    Connect {
        client: usize,
    },
    Send {
        client: usize,
        destination: usize,
        in_tx: bool,
        receipt: bool,
        /// `expires` this many milliseconds after now.
        expires_in: Option<u64>,
    },
    Subscribe {
        client: usize,
        destination: usize,
        ack: usize,
        prefetch: u32,
    },
    Unsubscribe {
        client: usize,
        pick: usize,
    },
    Ack {
        client: usize,
        pick: usize,
        in_tx: bool,
        nack: bool,
    },
    Begin {
        client: usize,
    },
    Commit {
        client: usize,
    },
    Abort {
        client: usize,
    },
    Disconnect {
        client: usize,
        graceful: bool,
    },
    Pump {
        link: usize,
        count: usize,
    },
    /// The log of `shard` reports appends durable up to one of its tokens (picked modulo).
    Durable {
        shard: usize,
        pick: usize,
    },
    /// The client's socket drained its output buffer.
    Flush {
        client: usize,
    },
    /// The client's output buffer filled up (`false`) or drained below its mark (`true`).
    Writable {
        client: usize,
        writable: bool,
    },
    Tick,
}

/// A delivery awaiting ACK: (ack id, tag, body).
type Delivery = (String, u64, String);

#[derive(Debug)]
struct SubModel {
    id: String,
    destination: String,
    ack: &'static str,
    prefetch: u32,
    /// (ack id, tag, body) of deliveries awaiting ACK, in delivery order.
    pending: Vec<Delivery>,
}

#[derive(Debug, Default)]
struct TxModel {
    name: String,
    sends: Vec<(String, String)>,
    /// (subscription id, (ack id, tag, body) taken, is ack).
    acks: Vec<(String, Vec<Delivery>, bool)>,
}

#[derive(Debug)]
struct ClientModel {
    shard: u16,
    conn: Option<ConnectionId>,
    subs: Vec<SubModel>,
    unsubscribed: HashSet<String>,
    tx: Option<TxModel>,
    next_name: u64,
    /// RECEIPTs asked for and not yet seen, in order; with the (queue, body) of a SEND whose
    /// receipt must wait until its log record is durable.
    receipts: VecDeque<(String, Option<(String, String)>)>,
}

pub(crate) struct World {
    pub cluster: Cluster,
    clients: Vec<ClientModel>,
    /// Publish order of each body (assigned when the message is really published).
    publish_seq: HashMap<String, u64>,
    next_publish: u64,
    /// Queue messages published, per destination.
    published: HashMap<String, BTreeSet<String>>,
    /// Queue messages consumed for good, per destination.
    consumed: HashMap<String, BTreeSet<String>>,
    /// How often each queue message was written to a client, per destination.
    delivered: HashMap<(String, String), u32>,
    /// Per (client, subscription id, producer client): publish seq of the last unmarked delivery.
    last_unmarked: HashMap<(usize, String, String), u64>,
    pub deliveries_seen: u64,
    /// Bodies sent with `expires`, and when they expire.
    expires: HashMap<String, u64>,
}

fn is_queue(destination: &str) -> bool {
    destination.starts_with("/queue/")
}

fn tag_of(ack_id: &str) -> u64 {
    ack_id
        .split_once('.')
        .and_then(|(_, tag)| tag.parse().ok())
        .expect("ack ids are number.tag")
}

impl World {
    pub fn new(shard_count: u16, clients: usize, config: BrokerConfig) -> World {
        let mut cluster = Cluster::new(shard_count, config);
        cluster.auto_pump = false;
        cluster.auto_flush = false;
        let clients = (0..clients)
            .map(|index| ClientModel {
                shard: (index % shard_count as usize) as u16,
                conn: None,
                subs: Vec::new(),
                unsubscribed: HashSet::new(),
                tx: None,
                next_name: 0,
                receipts: VecDeque::new(),
            })
            .collect();
        World {
            cluster,
            clients,
            publish_seq: HashMap::new(),
            next_publish: 0,
            published: HashMap::new(),
            consumed: HashMap::new(),
            delivered: HashMap::new(),
            last_unmarked: HashMap::new(),
            deliveries_seen: 0,
            expires: HashMap::new(),
        }
    }

    fn published_now(&mut self, destination: &str, body: &str) {
        self.publish_seq.insert(body.to_string(), self.next_publish);
        self.next_publish += 1;
        if is_queue(destination) {
            self.published
                .entry(destination.to_string())
                .or_default()
                .insert(body.to_string());
        }
    }

    fn consume(&mut self, destination: &str, body: &str) {
        if is_queue(destination) {
            let fresh = self
                .consumed
                .entry(destination.to_string())
                .or_default()
                .insert(body.to_string());
            assert!(fresh, "{body} on {destination} consumed twice");
        }
    }

    pub fn apply(&mut self, action: &Action) {
        let clients = self.clients.len();
        match *action {
            Action::Connect { client } => {
                let client = client % clients;
                if self.clients[client].conn.is_none() {
                    let shard = self.clients[client].shard;
                    let conn = self.cluster.connect(shard);
                    self.clients[client].conn = Some(conn);
                }
            }
            Action::Send {
                client,
                destination,
                in_tx,
                receipt,
                expires_in,
            } => {
                let client = client % clients;
                let Some(conn) = self.clients[client].conn else {
                    return;
                };
                let destination = DESTINATIONS[destination % DESTINATIONS.len()].to_string();
                let model = &mut self.clients[client];
                model.next_name += 1;
                let body = format!("c{client}-{}", model.next_name);
                let receipt_id = format!("r{client}-{}", model.next_name);
                let mut headers = vec![("destination", destination.as_str())];
                if receipt {
                    headers.push(("receipt", &receipt_id));
                }
                let expires_text;
                if let Some(offset) = expires_in {
                    let expires = self.cluster.now + offset;
                    self.expires.insert(body.clone(), expires);
                    expires_text = expires.to_string();
                    headers.push(("expires", &expires_text));
                }
                match (&mut model.tx, in_tx) {
                    (Some(tx), true) => {
                        let name = tx.name.clone();
                        tx.sends.push((destination.clone(), body.clone()));
                        if receipt {
                            model.receipts.push_back((receipt_id.clone(), None));
                        }
                        headers.push(("transaction", &name));
                        self.cluster
                            .send(conn, frame(Command::Send, &headers, body.as_bytes()));
                    }
                    _ => {
                        if receipt {
                            let durable =
                                is_queue(&destination).then(|| (destination.clone(), body.clone()));
                            model.receipts.push_back((receipt_id.clone(), durable));
                        }
                        self.published_now(&destination, &body);
                        self.cluster
                            .send(conn, frame(Command::Send, &headers, body.as_bytes()));
                    }
                }
            }
            Action::Subscribe {
                client,
                destination,
                ack,
                prefetch,
            } => {
                let client = client % clients;
                let Some(conn) = self.clients[client].conn else {
                    return;
                };
                let destination = DESTINATIONS[destination % DESTINATIONS.len()].to_string();
                let ack = ["auto", "client", "client-individual"][ack % 3];
                let model = &mut self.clients[client];
                model.next_name += 1;
                // Ids are never reused, so a late MESSAGE cannot be mistaken for a new one's.
                let id = format!("s{}", model.next_name);
                model.subs.push(SubModel {
                    id: id.clone(),
                    destination: destination.clone(),
                    ack,
                    prefetch: prefetch.max(1),
                    pending: Vec::new(),
                });
                let prefetch = prefetch.max(1).to_string();
                self.cluster.send(
                    conn,
                    frame(
                        Command::Subscribe,
                        &[
                            ("id", &id),
                            ("destination", &destination),
                            ("ack", ack),
                            ("prefetch-count", &prefetch),
                        ],
                        b"",
                    ),
                );
            }
            Action::Unsubscribe { client, pick } => {
                let client = client % clients;
                let Some(conn) = self.clients[client].conn else {
                    return;
                };
                let model = &mut self.clients[client];
                if model.subs.is_empty() {
                    return;
                }
                let sub = model.subs.remove(pick % model.subs.len());
                model.unsubscribed.insert(sub.id.clone());
                self.cluster
                    .send(conn, frame(Command::Unsubscribe, &[("id", &sub.id)], b""));
            }
            Action::Ack {
                client,
                pick,
                in_tx,
                nack,
            } => {
                let client = client % clients;
                let Some(conn) = self.clients[client].conn else {
                    return;
                };
                let model = &mut self.clients[client];
                let candidates: Vec<usize> = (0..model.subs.len())
                    .filter(|&index| !model.subs[index].pending.is_empty())
                    .collect();
                if candidates.is_empty() {
                    return;
                }
                let sub = &mut model.subs[candidates[pick % candidates.len()]];
                let position = (pick / 7) % sub.pending.len();
                let taken: Vec<Delivery> = if sub.ack == "client" {
                    sub.pending.drain(..=position).collect()
                } else {
                    vec![sub.pending.remove(position)]
                };
                let ack_id = taken.last().expect("took at least one").0.clone();
                let command = if nack { Command::Nack } else { Command::Ack };
                // One NACK in three asks RabbitMQ-style for no requeue (straight to the DLQ).
                let mut headers = vec![("id", ack_id.as_str())];
                if nack && pick % 3 == 0 {
                    headers.push(("requeue", "false"));
                }
                let sub_id = sub.id.clone();
                let destination = sub.destination.clone();
                match (&mut model.tx, in_tx) {
                    (Some(tx), true) => {
                        let name = tx.name.clone();
                        tx.acks.push((sub_id, taken, !nack));
                        headers.push(("transaction", &name));
                        self.cluster.send(conn, frame(command, &headers, b""));
                    }
                    _ => {
                        if !nack {
                            for (_, _, body) in &taken {
                                self.consume(&destination, body);
                            }
                        }
                        self.cluster.send(conn, frame(command, &headers, b""));
                    }
                }
            }
            Action::Begin { client } => {
                let client = client % clients;
                let Some(conn) = self.clients[client].conn else {
                    return;
                };
                let model = &mut self.clients[client];
                if model.tx.is_some() {
                    return;
                }
                model.next_name += 1;
                let name = format!("tx{}", model.next_name);
                model.tx = Some(TxModel {
                    name: name.clone(),
                    ..TxModel::default()
                });
                self.cluster
                    .send(conn, frame(Command::Begin, &[("transaction", &name)], b""));
            }
            Action::Commit { client } => {
                let client = client % clients;
                let Some(conn) = self.clients[client].conn else {
                    return;
                };
                let Some(tx) = self.clients[client].tx.take() else {
                    return;
                };
                for (destination, body) in &tx.sends {
                    self.published_now(destination, body);
                }
                for (sub_id, taken, is_ack) in &tx.acks {
                    // An ACK whose subscription ended before COMMIT finds its messages already
                    // taken back by the queue.
                    let live = self.clients[client]
                        .subs
                        .iter()
                        .find(|s| &s.id == sub_id)
                        .map(|s| s.destination.clone());
                    if let (Some(destination), true) = (live, *is_ack) {
                        for (_, _, body) in taken {
                            self.consume(&destination, body);
                        }
                    }
                }
                self.cluster.send(
                    conn,
                    frame(Command::Commit, &[("transaction", &tx.name)], b""),
                );
            }
            Action::Abort { client } => {
                let client = client % clients;
                let Some(conn) = self.clients[client].conn else {
                    return;
                };
                let Some(tx) = self.clients[client].tx.take() else {
                    return;
                };
                for (sub_id, taken, _) in tx.acks {
                    if let Some(sub) = self.clients[client]
                        .subs
                        .iter_mut()
                        .find(|s| s.id == sub_id)
                    {
                        sub.pending.extend(taken);
                        sub.pending.sort_by_key(|(_, tag, _)| *tag);
                    }
                }
                self.cluster.send(
                    conn,
                    frame(Command::Abort, &[("transaction", &tx.name)], b""),
                );
            }
            Action::Disconnect { client, graceful } => {
                let client = client % clients;
                let Some(conn) = self.clients[client].conn.take() else {
                    return;
                };
                self.observe();
                let model = &mut self.clients[client];
                for sub in model.subs.drain(..) {
                    model.unsubscribed.insert(sub.id);
                }
                model.tx = None;
                model.receipts.clear();
                if graceful {
                    self.cluster
                        .send(conn, frame(Command::Disconnect, &[], b""));
                    let seen = self.cluster.take(conn);
                    assert_eq!(
                        seen,
                        vec![Seen::Closed],
                        "DISCONNECT without receipt just closes"
                    );
                } else {
                    self.cluster.lose(conn);
                }
            }
            Action::Pump { link, count } => {
                for step in 0..count {
                    if !self.cluster.step_link(link.wrapping_add(step)) {
                        break;
                    }
                }
            }
            Action::Durable { shard, pick } => {
                let shard = (shard % self.cluster.shards.len()) as u16;
                let tokens: Vec<DurableToken> = self
                    .cluster
                    .appended
                    .iter()
                    .filter(|(from, _, _)| from.0 == shard)
                    .filter_map(|(_, _, token)| *token)
                    .collect();
                if !tokens.is_empty() {
                    self.cluster.durable(shard, tokens[pick % tokens.len()]);
                }
            }
            Action::Writable { client, writable } => {
                let client = client % clients;
                let Some(conn) = self.clients[client].conn else {
                    return;
                };
                self.cluster.writable(conn, writable);
            }
            Action::Flush { client } => {
                let client = client % clients;
                let Some(conn) = self.clients[client].conn else {
                    return;
                };
                self.cluster.flush(conn);
            }
            Action::Tick => {
                self.cluster.now += 1000;
                self.cluster.tick();
            }
        }
        self.observe();
    }

    /// Reads what every connected client was sent and checks the per-delivery invariants.
    fn observe(&mut self) {
        for client in 0..self.clients.len() {
            let Some(conn) = self.clients[client].conn else {
                continue;
            };
            for seen in self.cluster.take(conn) {
                let Seen::Frame(sent) = seen else {
                    assert_ne!(
                        seen,
                        Seen::Closed,
                        "client {client} was closed unexpectedly"
                    );
                    continue;
                };
                match sent.command {
                    Command::Message => self.on_message(client, &sent),
                    Command::Receipt => self.on_receipt(client, &sent),
                    other => panic!("client {client} got {other}: {sent:?}"),
                }
            }
        }
    }

    /// RECEIPTs come in request order, and one for a persistent queue SEND only once the log
    /// reported its record durable.
    fn on_receipt(&mut self, client: usize, sent: &Sent) {
        let id = sent.header("receipt-id").expect("RECEIPT has a receipt-id");
        let (expected, durable) = self.clients[client]
            .receipts
            .pop_front()
            .unwrap_or_else(|| panic!("client {client} got unexpected receipt {id}"));
        assert_eq!(id, expected, "receipts out of order for client {client}");
        if let Some((destination, body)) = durable {
            let shard = shard_of(destination.as_bytes(), self.cluster.shards.len() as u16);
            let token: Option<DurableToken> =
                self.cluster
                    .appended
                    .iter()
                    .find_map(|(from, record, token)| match record {
                        Record::Message { message }
                            if *from == shard && *message.body == *body.as_bytes() =>
                        {
                            *token
                        }
                        _ => None,
                    });
            let Some(token) = token else {
                // Only a message that expired before its queue saw it is never logged.
                let expired = self
                    .expires
                    .get(&body)
                    .is_some_and(|expires| self.cluster.now >= *expires);
                assert!(expired, "receipted persistent {body} has a durable token");
                return;
            };
            let reported = self.cluster.durable_reported.get(&shard.0).copied();
            assert!(
                reported >= Some(token),
                "receipt {id} before its record was durable"
            );
        }
    }

    fn on_message(&mut self, client: usize, sent: &Sent) {
        self.deliveries_seen += 1;
        let sub_id = sent
            .header("subscription")
            .expect("MESSAGE names its subscription")
            .to_string();
        let model = &self.clients[client];
        assert!(
            !model.unsubscribed.contains(&sub_id),
            "client {client} got a MESSAGE for {sub_id} after UNSUBSCRIBE"
        );
        let sub_index = model
            .subs
            .iter()
            .position(|s| s.id == sub_id)
            .expect("MESSAGE for a known subscription");
        let destination = model.subs[sub_index].destination.clone();
        let ack = model.subs[sub_index].ack;
        let body = sent.body_str().to_string();
        let redelivered = sent.header("redelivered") == Some("true");
        if let Some(expires) = self.expires.get(&body) {
            assert!(
                self.cluster.now < *expires,
                "{body} delivered after it expired"
            );
        }
        if is_queue(&destination) {
            let count = self
                .delivered
                .entry((destination.clone(), body.clone()))
                .or_insert(0);
            assert!(
                *count == 0 || redelivered,
                "{body} delivered again without redelivered:true"
            );
            *count += 1;
        }
        if !redelivered {
            let producer = body.split_once('-').expect("bodies are cN-M").0.to_string();
            let seq = self.publish_seq[&body];
            let key = (client, sub_id.clone(), producer);
            if let Some(last) = self.last_unmarked.get(&key) {
                assert!(
                    seq > *last,
                    "{body} arrived after a later message of its producer on {sub_id}"
                );
            }
            self.last_unmarked.insert(key, seq);
        }
        if ack == "auto" {
            self.consume(&destination, &body);
        } else {
            let ack_id = sent
                .header("ack")
                .expect("client acks carry an ack id")
                .to_string();
            let tag = tag_of(&ack_id);
            let sub = &mut self.clients[client].subs[sub_index];
            sub.pending.push((ack_id, tag, body));
            // Messages taken into an open transaction still count against the window, so
            // the pending ones alone can never exceed it.
            assert!(
                sub.pending.len() <= sub.prefetch as usize,
                "{} has {} unacknowledged, prefetch {}",
                sub.id,
                sub.pending.len(),
                sub.prefetch
            );
        }
    }

    /// Ends every connection, drains every link, and checks that nothing was lost or kept twice.
    pub fn finish(&mut self) {
        // Let everything settle: every append durable, every link drained, every socket
        // flushed; then each connected client has every receipt it asked for.
        loop {
            let mut reported_any = false;
            for shard in 0..self.cluster.shards.len() {
                let last = self
                    .cluster
                    .appended
                    .iter()
                    .filter(|(from, _, _)| from.0 as usize == shard)
                    .filter_map(|(_, _, token)| *token)
                    .max();
                let reported = self.cluster.durable_reported.get(&(shard as u16)).copied();
                if let Some(token) = last.filter(|token| Some(*token) > reported) {
                    self.cluster.durable(shard as u16, token);
                    reported_any = true;
                }
            }
            let mut stepped_any = false;
            while self.cluster.step_link(0) {
                stepped_any = true;
            }
            let unflushed: Vec<ConnectionId> = self.cluster.unflushed.iter().copied().collect();
            for conn in &unflushed {
                self.cluster.flush(*conn);
            }
            self.observe();
            // Settled once a whole round found nothing to do.
            if !reported_any && !stepped_any && unflushed.is_empty() {
                break;
            }
        }
        for (client, model) in self.clients.iter().enumerate() {
            if model.conn.is_some() {
                assert!(
                    model.receipts.is_empty(),
                    "client {client} still waits for {:?}",
                    model.receipts
                );
            }
        }
        for client in 0..self.clients.len() {
            self.apply(&Action::Disconnect {
                client,
                graceful: false,
            });
        }
        while self.cluster.step_link(0) {}
        assert!(self.cluster.links_empty());
        let shard_count = self.cluster.shards.len() as u16;
        let held = |cluster: &Cluster, destination: &str| -> Vec<String> {
            let shard = shard_of(destination.as_bytes(), shard_count).0 as usize;
            cluster.shards[shard]
                .held_bodies(destination.as_bytes())
                .into_iter()
                .map(|body| String::from_utf8(body).expect("UTF-8 bodies"))
                .collect()
        };
        for (destination, bodies) in &self.published {
            let dead =
                String::from_utf8(dead_letter_queue(destination.as_bytes()).expect("not a DLQ"))
                    .unwrap();
            let mut places: HashMap<&str, u32> = HashMap::new();
            let held_here = held(&self.cluster, destination);
            let held_dead = held(&self.cluster, &dead);
            let empty = BTreeSet::new();
            let consumed_here = self.consumed.get(destination).unwrap_or(&empty);
            let consumed_dead = self.consumed.get(&dead).unwrap_or(&empty);
            for body in held_here
                .iter()
                .chain(&held_dead)
                .chain(consumed_here)
                .chain(consumed_dead)
            {
                *places.entry(body.as_str()).or_default() += 1;
            }
            for body in bodies {
                let count = places.get(body.as_str()).copied().unwrap_or(0);
                // An expired message may be gone, and only once its time has passed.
                let may_be_gone = self
                    .expires
                    .get(body)
                    .is_some_and(|expires| self.cluster.now >= *expires);
                assert!(
                    count == 1 || (count == 0 && may_be_gone),
                    "{body} of {destination} lost or duplicated ({count} places)"
                );
            }
            assert!(
                places.keys().all(|body| bodies.contains(*body)),
                "{destination} holds messages nobody published"
            );
        }
    }
}

/// A random action, weighted towards moving peer messages so that the run is mostly busy
/// delivering rather than piling up work.
pub(crate) fn random_action(rng: &mut TestRng, clients: usize) -> Action {
    let client = rng.random_range(0..clients);
    let pick = rng.random_range(0..1000);
    match rng.random_range(0..100) {
        0..=4 => Action::Connect { client },
        5..=24 => Action::Send {
            client,
            destination: rng.random_range(0..4),
            in_tx: rng.random_bool(0.3),
            receipt: rng.random_bool(0.3),
            expires_in: rng.random_bool(0.2).then(|| rng.random_range(500..5000)),
        },
        25..=29 => Action::Subscribe {
            client,
            destination: rng.random_range(0..4),
            ack: rng.random_range(0..3),
            prefetch: rng.random_range(1..5),
        },
        30..=31 => Action::Unsubscribe { client, pick },
        32..=44 => Action::Ack {
            client,
            pick,
            in_tx: rng.random_bool(0.3),
            nack: rng.random_bool(0.2),
        },
        45..=47 => Action::Begin { client },
        48..=50 => Action::Commit { client },
        51 => Action::Abort { client },
        52..=53 => Action::Disconnect {
            client,
            graceful: rng.random_bool(0.5),
        },
        54 => Action::Tick,
        55..=62 => Action::Flush { client },
        63..=64 => Action::Writable {
            client,
            writable: rng.random_bool(0.6),
        },
        65..=69 => Action::Durable {
            shard: client,
            pick,
        },
        _ => Action::Pump {
            link: pick,
            count: rng.random_range(1..6),
        },
    }
}

fn run_seed(seed: u64, shards: u16, clients: usize, steps: usize) -> World {
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes);
    let config = BrokerConfig {
        log_enabled: true,
        receipts_wait_for_sync: true,
        deliveries_max: 4,
        ..BrokerConfig::default()
    };
    let mut world = World::new(shards, clients, config);
    for client in 0..clients {
        world.apply(&Action::Connect { client });
    }
    for _ in 0..steps {
        let action = random_action(&mut rng, clients);
        world.apply(&action);
    }
    world.finish();
    world
}

/// Four shards' worth of sessions and destinations, replayed from fixed seeds: a failure names
/// its seed and reproduces exactly.
#[test]
fn seeded_multi_shard_simulation_keeps_the_invariants() {
    let mut deliveries = 0;
    let mut totals = Counters::default();
    for seed in 0..24 {
        let world = run_seed(seed, 4, 8, 1500);
        deliveries += world.deliveries_seen;
        for shard in &world.cluster.shards {
            let counters = shard.metrics().counters;
            totals.messages_dead_lettered_total += counters.messages_dead_lettered_total;
            totals.topic_deliveries_dropped_total += counters.topic_deliveries_dropped_total;
            totals.errors_total += counters.errors_total;
            totals.messages_expired_total += counters.messages_expired_total;
        }
    }
    // The run must reach the paths it is meant to check, not just pass vacuously.
    assert!(deliveries > 1000, "too few deliveries ({deliveries})");
    assert!(
        totals.messages_dead_lettered_total > 0,
        "no dead-lettering happened"
    );
    assert!(totals.messages_expired_total > 0, "no message expired");
    assert!(
        totals.topic_deliveries_dropped_total > 0,
        "no slow topic subscriber"
    );
    assert_eq!(totals.errors_total, 0, "well-behaved clients get no ERROR");
}

#[test]
fn same_seed_same_run() {
    let first = run_seed(7, 3, 6, 800);
    let second = run_seed(7, 3, 6, 800);
    assert_eq!(first.deliveries_seen, second.deliveries_seen);
    assert_eq!(first.consumed, second.consumed);
    assert_eq!(first.cluster.appended, second.cluster.appended);
}
