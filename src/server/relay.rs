//! A deliberately small STOMP relay, to exercise the transport and to serve as the "simplest
//! relay" reference in benchmarks. It is NOT the broker: no queues, no acknowledgements, no
//! transactions, no persistence; every destination behaves like a topic, and a subscriber whose
//! out buffer is full misses messages (a broker keeps them queued instead).
//!
//! What it does, so that every transport path is used: CONNECT/STOMP with version and
//! heart-beat negotiation; SUBSCRIBE/UNSUBSCRIBE registered on the shard that owns the
//! destination ([`super::shard_of`]) — the RECEIPT for a SUBSCRIBE is sent only after the owner
//! confirmed, so a client may publish right after it; SEND hops to the owner, which fans out
//! MESSAGE deliveries to each subscriber's shard; the stored body is a [`Bytes`] written to each
//! subscriber without another copy; RECEIPT for any frame with a `receipt` header; DISCONNECT.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::codec::{Command, Frame, FrameWriter, Version};

use super::handler::{CloseReason, ConnId, ShardHandler, ShardId, ShardIo};
use super::{shard_of, HeartbeatConfig};

/// What relay shards tell each other.
#[derive(Debug)]
pub enum RelayMsg {
    Subscribe {
        destination: Arc<[u8]>,
        conn: ConnId,
        subscription: Arc<[u8]>,
        /// Sent back in [`RelayMsg::Subscribed`] once the subscription is in place.
        receipt: Option<Box<[u8]>>,
    },
    Subscribed {
        conn: ConnId,
        receipt: Box<[u8]>,
    },
    Unsubscribe {
        destination: Arc<[u8]>,
        conn: ConnId,
        subscription: Arc<[u8]>,
    },
    Publish {
        destination: Arc<[u8]>,
        content_type: Option<Box<[u8]>>,
        body: Bytes,
    },
    /// Sent by a disconnecting client's shard to each owner of its subscriptions, behind what
    /// it sent before; the owner answers with [`RelayMsg::Flushed`] behind the deliveries it
    /// made, so the DISCONNECT receipt comes after everything the client caused.
    Flush {
        conn: ConnId,
    },
    Flushed {
        conn: ConnId,
    },
    Deliver {
        conn: ConnId,
        subscription: Arc<[u8]>,
        destination: Arc<[u8]>,
        message_id: u64,
        content_type: Option<Box<[u8]>>,
        body: Bytes,
    },
}

/// A subscriber of an owned destination: its connection and subscription id.
type Subscriber = (ConnId, Arc<[u8]>);

struct Session {
    version: Version,
    /// DISCONNECT seen: its receipt, and the owners yet to answer [`RelayMsg::Flush`].
    disconnect: Option<(Option<Box<[u8]>>, usize)>,
    /// Subscription id → destination.
    subscriptions: HashMap<Arc<[u8]>, Arc<[u8]>>,
}

/// One shard's relay state.
pub struct Relay {
    shard: ShardId,
    shards: usize,
    heartbeat: HeartbeatConfig,
    /// Connected clients of this shard; absent before CONNECT.
    sessions: HashMap<ConnId, Session>,
    /// Destinations this shard owns → their subscribers (on any shard).
    subscribers: HashMap<Arc<[u8]>, Vec<Subscriber>>,
    next_message_id: u64,
    /// Deliveries skipped because the subscriber's out buffer was full.
    pub dropped_deliveries: u64,
}

impl Relay {
    pub fn new(shard: ShardId, shards: usize, heartbeat: HeartbeatConfig) -> Relay {
        Relay {
            shard,
            shards,
            heartbeat,
            sessions: HashMap::new(),
            subscribers: HashMap::new(),
            next_message_id: 0,
            dropped_deliveries: 0,
        }
    }

    fn error(
        &mut self,
        conn: ConnId,
        version: Version,
        message: &str,
        io: &mut ShardIo<'_, RelayMsg>,
    ) {
        io.write_with(conn, |out| {
            let mut writer = FrameWriter::begin(out, version, Command::Error);
            writer.header(b"message", message.as_bytes());
            writer.finish(b"");
        });
        io.close(conn);
    }

    fn receipt(conn: ConnId, version: Version, receipt: &[u8], io: &mut ShardIo<'_, RelayMsg>) {
        io.write_with(conn, |out| {
            let mut writer = FrameWriter::begin(out, version, Command::Receipt);
            writer.header(b"receipt-id", receipt);
            writer.finish(b"");
        });
    }

    fn connect(&mut self, conn: ConnId, frame: &Frame<'_>, io: &mut ShardIo<'_, RelayMsg>) {
        // STOMP 1.2 "Protocol Negotiation": no accept-version means 1.0.
        let version = match frame.header(b"accept-version") {
            None => Some(Version::V1_0),
            Some(list) => list
                .split(|&byte| byte == b',')
                .filter_map(|entry| Version::parse(entry.trim_ascii()))
                .max(),
        };
        let Some(version) = version else {
            io.write_with(conn, |out| {
                let mut writer = FrameWriter::begin(out, Version::V1_0, Command::Error);
                writer
                    .header(b"version", b"1.0,1.1,1.2")
                    .header(b"message", b"Supported protocol versions are 1.0 1.1 1.2");
                writer.finish(b"");
            });
            io.close(conn);
            return;
        };
        // STOMP 1.2 "Heart-beating": each side's interval is the larger of what one can do and
        // the other wants, or none if either says 0.
        let (client_send_ms, client_want_ms) = frame
            .header_str(b"heart-beat")
            .and_then(|value| {
                let (send, want) = value.split_once(',')?;
                Some((
                    send.trim().parse::<u64>().ok()?,
                    want.trim().parse::<u64>().ok()?,
                ))
            })
            .unwrap_or((0, 0));
        let server = self.heartbeat;
        let incoming_ms = if client_send_ms == 0 || server.receive_ms == 0 {
            0
        } else {
            client_send_ms.max(server.receive_ms)
        };
        let outgoing_ms = if server.send_ms == 0 || client_want_ms == 0 {
            0
        } else {
            server.send_ms.max(client_want_ms)
        };
        io.set_version(conn, version);
        io.set_heartbeat(
            conn,
            outgoing_ms,
            incoming_ms * server.read_grace_percent / 100,
        );
        let heart_beat = format!("{},{}", server.send_ms, server.receive_ms);
        io.write_with(conn, |out| {
            let mut writer = FrameWriter::begin(out, version, Command::Connected);
            writer
                .header(b"version", version.as_str().as_bytes())
                .header(b"heart-beat", heart_beat.as_bytes())
                .header(b"server", b"stompd-relay");
            writer.finish(b"");
        });
        self.sessions.insert(
            conn,
            Session {
                version,
                disconnect: None,
                subscriptions: HashMap::new(),
            },
        );
    }

    /// Sends the DISCONNECT receipt and closes once every owner has flushed.
    fn finish_disconnect(&mut self, conn: ConnId, io: &mut ShardIo<'_, RelayMsg>) {
        let Some(session) = self.sessions.get_mut(&conn) else {
            return;
        };
        let Some((receipt, 0)) = &session.disconnect else {
            return;
        };
        if let Some(receipt) = receipt {
            Self::receipt(conn, session.version, receipt, io);
        }
        io.close(conn);
    }

    fn deliver(&mut self, msg: RelayMsg, io: &mut ShardIo<'_, RelayMsg>) {
        let RelayMsg::Deliver {
            conn,
            subscription,
            destination,
            message_id,
            content_type,
            body,
        } = msg
        else {
            unreachable!("only deliveries are passed here");
        };
        let Some(session) = self.sessions.get(&conn) else {
            return;
        };
        if !io.is_open(conn) {
            return;
        }
        if io.is_out_full(conn) {
            self.dropped_deliveries += 1;
            return;
        }
        let version = session.version;
        let shard = self.shard;
        io.write_with(conn, |out| {
            let mut writer = FrameWriter::begin(out, version, Command::Message);
            writer
                .header(b"subscription", &subscription)
                .header(b"destination", &destination);
            let mut id = [0u8; 20];
            let id = crate::codec::format_u64(message_id, &mut id);
            let mut message_id = Vec::with_capacity(24);
            message_id.extend_from_slice(format!("{shard}-").as_bytes());
            message_id.extend_from_slice(id);
            writer.header(b"message-id", &message_id);
            if let Some(content_type) = &content_type {
                writer.header(b"content-type", content_type);
            }
            writer.content_length(body.len());
            writer.finish_head();
        });
        io.write_shared(conn, body);
        io.write(conn, b"\0");
    }
}

impl ShardHandler for Relay {
    type PeerMsg = RelayMsg;

    fn on_open(&mut self, _conn: ConnId, _io: &mut ShardIo<'_, RelayMsg>) {}

    fn on_frame(&mut self, conn: ConnId, frame: &Frame<'_>, io: &mut ShardIo<'_, RelayMsg>) {
        let Some(session) = self.sessions.get_mut(&conn) else {
            match frame.command {
                Command::Connect | Command::Stomp => self.connect(conn, frame, io),
                _ => self.error(conn, Version::V1_0, "not connected: send CONNECT first", io),
            }
            return;
        };
        let version = session.version;
        match frame.command {
            Command::Connect | Command::Stomp => {
                return self.error(conn, version, "already connected", io);
            }
            Command::Send => {
                let Some(destination) = frame.header(b"destination") else {
                    return self.error(conn, version, "SEND without destination", io);
                };
                // The one copy: the body is stored; deliveries share it.
                let msg = RelayMsg::Publish {
                    destination: Arc::from(destination),
                    content_type: frame.header(b"content-type").map(Box::from),
                    body: Bytes::copy_from_slice(frame.body),
                };
                io.send_peer(shard_of(destination, self.shards), msg);
            }
            Command::Subscribe => {
                let Some(destination) = frame.header(b"destination") else {
                    return self.error(conn, version, "SUBSCRIBE without destination", io);
                };
                // STOMP 1.0 made `id` optional; the destination then names the subscription.
                let subscription: Arc<[u8]> = Arc::from(frame.header(b"id").unwrap_or(destination));
                let destination: Arc<[u8]> = Arc::from(destination);
                session
                    .subscriptions
                    .insert(subscription.clone(), destination.clone());
                let owner = shard_of(&destination, self.shards);
                io.send_peer(
                    owner,
                    RelayMsg::Subscribe {
                        destination,
                        conn,
                        subscription,
                        receipt: frame.header(b"receipt").map(Box::from),
                    },
                );
                // The receipt comes back with RelayMsg::Subscribed.
                return;
            }
            Command::Unsubscribe => {
                let Some(id) = frame.header(b"id").or(frame.header(b"destination")) else {
                    return self.error(conn, version, "UNSUBSCRIBE without id", io);
                };
                if let Some((subscription, destination)) = session.subscriptions.remove_entry(id) {
                    let owner = shard_of(&destination, self.shards);
                    io.send_peer(
                        owner,
                        RelayMsg::Unsubscribe {
                            destination,
                            conn,
                            subscription,
                        },
                    );
                }
            }
            Command::Disconnect => {
                let mut owners: Vec<ShardId> = session
                    .subscriptions
                    .values()
                    .map(|destination| shard_of(destination, self.shards))
                    .collect();
                owners.sort_unstable();
                owners.dedup();
                io.pause_reading(conn);
                session.disconnect = Some((frame.header(b"receipt").map(Box::from), owners.len()));
                for owner in &owners {
                    io.send_peer(*owner, RelayMsg::Flush { conn });
                }
                self.finish_disconnect(conn, io);
                return;
            }
            Command::Ack | Command::Nack | Command::Begin | Command::Commit | Command::Abort => {}
            Command::Connected | Command::Message | Command::Receipt | Command::Error => {
                return self.error(conn, version, "a client may not send server frames", io);
            }
        }
        if let Some(receipt) = frame.header(b"receipt") {
            Self::receipt(conn, version, receipt, io);
        }
    }

    fn on_close(&mut self, conn: ConnId, _reason: &CloseReason, io: &mut ShardIo<'_, RelayMsg>) {
        let Some(session) = self.sessions.remove(&conn) else {
            return;
        };
        for (subscription, destination) in session.subscriptions {
            let owner = shard_of(&destination, self.shards);
            io.send_peer(
                owner,
                RelayMsg::Unsubscribe {
                    destination,
                    conn,
                    subscription,
                },
            );
        }
    }

    fn on_peer(&mut self, _from: ShardId, msg: RelayMsg, io: &mut ShardIo<'_, RelayMsg>) {
        match msg {
            RelayMsg::Subscribe {
                destination,
                conn,
                subscription,
                receipt,
            } => {
                self.subscribers
                    .entry(destination)
                    .or_default()
                    .push((conn, subscription));
                if let Some(receipt) = receipt {
                    io.send_peer(conn.shard(), RelayMsg::Subscribed { conn, receipt });
                }
            }
            RelayMsg::Subscribed { conn, receipt } => {
                if let Some(session) = self.sessions.get(&conn) {
                    Self::receipt(conn, session.version, &receipt, io);
                }
            }
            RelayMsg::Unsubscribe {
                destination,
                conn,
                subscription,
            } => {
                if let Some(list) = self.subscribers.get_mut(&destination) {
                    list.retain(|(c, s)| !(*c == conn && *s == subscription));
                    if list.is_empty() {
                        self.subscribers.remove(&destination);
                    }
                }
            }
            RelayMsg::Publish {
                destination,
                content_type,
                body,
            } => {
                let Some(list) = self.subscribers.get(&destination) else {
                    return;
                };
                self.next_message_id += 1;
                for (conn, subscription) in list {
                    io.send_peer(
                        conn.shard(),
                        RelayMsg::Deliver {
                            conn: *conn,
                            subscription: subscription.clone(),
                            destination: destination.clone(),
                            message_id: self.next_message_id,
                            content_type: content_type.clone(),
                            body: body.clone(),
                        },
                    );
                }
            }
            RelayMsg::Flush { conn } => io.send_peer(conn.shard(), RelayMsg::Flushed { conn }),
            RelayMsg::Flushed { conn } => {
                if let Some(Session {
                    disconnect: Some((_, waiting)),
                    ..
                }) = self.sessions.get_mut(&conn)
                {
                    *waiting -= 1;
                    self.finish_disconnect(conn, io);
                }
            }
            deliver @ RelayMsg::Deliver { .. } => self.deliver(deliver, io),
        }
    }
}
