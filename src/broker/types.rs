//! The nouns the broker logic shares: who is who (shards, connections, consumers), what a
//! stored message is, and which shard owns which destination.

use std::fmt;
use std::hash::Hasher;
use std::num::NonZeroU64;
use std::sync::Arc;

use super::memory::{MemoryBudget, MemoryCharge, MESSAGE_OVERHEAD_BYTES};
use crate::codec::escape::{escape_into, unescape};
use crate::codec::{Escaping, Version};

/// One core's worth of broker state. Shards are numbered `0..shard_count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShardId(pub u16);

/// A client connection: the shard that accepted it and a number that shard never reuses, so a
/// message addressed to a connection that has gone cannot reach a newer one by mistake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnectionId {
    pub shard: ShardId,
    pub local: u64,
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.shard.0, self.local)
    }
}

/// One subscription as a destination sees it. `subscription` is a number the session gives each
/// SUBSCRIBE (never reused within the connection), not the client's `id` string, so that a
/// delivery still in flight for an old subscription cannot land on a new one with the same id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConsumerKey {
    pub conn: ConnectionId,
    /// 64 bits so that no client can wrap it around by subscribing over and over.
    pub subscription: u64,
}

/// A broker-wide unique message id: the shard whose session accepted the SEND and that shard's
/// counter. Rendered as `<shard>-<seq>` in the `message-id` header. The counter starts where the
/// server says ([`crate::broker::Shard::new`]), so ids stay unique across restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId {
    pub shard: ShardId,
    pub seq: u64,
}

impl MessageId {
    /// Writes the `message-id` text into `buffer` without allocating; returns its length.
    /// Runs once per delivery and per logged message: plain digit writing, not `fmt`
    /// (which was 1.3 % of a queue shard's time).
    pub fn write_text(&self, buffer: &mut [u8; 48]) -> usize {
        let mut digits = [0u8; 20];
        let shard = crate::codec::format_u64(u64::from(self.shard.0), &mut digits);
        let mut length = shard.len();
        buffer[..length].copy_from_slice(shard);
        buffer[length] = b'-';
        length += 1;
        let seq = crate::codec::format_u64(self.seq, &mut digits);
        // 48 bytes hold "65535-18446744073709551615" (26).
        buffer[length..length + seq.len()].copy_from_slice(seq);
        length + seq.len()
    }

    /// Parses the text [`MessageId::write_text`] writes (used by STOMP 1.0/1.1 ACK frames).
    pub fn parse(text: &[u8]) -> Option<MessageId> {
        let text = std::str::from_utf8(text).ok()?;
        let (shard, seq) = text.split_once('-')?;
        Some(MessageId {
            shard: ShardId(shard.parse().ok()?),
            seq: seq.parse().ok()?,
        })
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.shard.0, self.seq)
    }
}

/// The SUBSCRIBE `ack` header (STOMP 1.2 "SUBSCRIBE ack Header").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AckMode {
    /// Consumed once handed to the connection.
    Auto,
    /// An ACK or NACK covers the named message and every earlier one of the subscription.
    Client,
    /// An ACK or NACK covers only the named message.
    ClientIndividual,
}

impl AckMode {
    pub fn parse(text: &[u8]) -> Option<AckMode> {
        match text {
            b"auto" => Some(AckMode::Auto),
            b"client" => Some(AckMode::Client),
            b"client-individual" => Some(AckMode::ClientIndividual),
            _ => None,
        }
    }
}

/// What a destination name means here. `/topic/...` fans out; everything else is a queue
/// (stompserver and ActiveMQ keep messages for names they do not know, and keeping is the
/// choice that loses nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestinationKind {
    Queue,
    Topic,
}

impl DestinationKind {
    pub fn of(name: &[u8]) -> DestinationKind {
        if name.starts_with(b"/topic/") {
            DestinationKind::Topic
        } else {
            DestinationKind::Queue
        }
    }
}

/// The stompserver-compatible statistics pseudo-queue (see [`crate::broker`] "Monitor").
pub const MONITOR_DESTINATION: &[u8] = b"/queue/monitor";

/// Prefix of dead-letter queues: a message of `/queue/orders` that was delivered
/// `deliveries_max` times moves to `/queue/DLQ.orders`, as ActiveMQ's
/// `individualDeadLetterStrategy` names them (`DLQ.` + the queue name).
pub const DEAD_LETTER_PREFIX: &[u8] = b"/queue/DLQ.";

/// The dead-letter queue for queue `name`; `None` for a dead-letter queue itself, whose
/// messages are redelivered without limit rather than dropped or moved again.
pub fn dead_letter_queue(name: &[u8]) -> Option<Vec<u8>> {
    if name.starts_with(DEAD_LETTER_PREFIX) {
        return None;
    }
    let short = name.strip_prefix(b"/queue/").unwrap_or(name);
    let mut dlq = DEAD_LETTER_PREFIX.to_vec();
    dlq.extend_from_slice(short);
    Some(dlq)
}

/// The shard that owns destination `name`: 64-bit FNV-1a of the name's bytes, modulo the shard
/// count. FNV-1a is a fixed, published function (the `fnv` crate implements it exactly; the
/// test vectors in the tests pin it), unlike std's `DefaultHasher`, whose output may change
/// between Rust releases. Stability matters because each shard's log holds the queues this
/// function gave it: the same name must map to the same shard after a restart with the same
/// shard count.
pub fn shard_of(name: &[u8], shard_count: u16) -> ShardId {
    assert!(shard_count > 0, "a broker has at least one shard");
    let mut hasher = fnv::FnvHasher::default();
    hasher.write(name);
    ShardId((hasher.finish() % u64::from(shard_count)) as u16)
}

/// A message as the broker keeps it: shared by reference count between the queue, the
/// deliveries in flight and the log, so that a fan-out or a cross-core hop never copies the body.
#[derive(Debug, PartialEq, Eq)]
pub struct Message {
    pub id: MessageId,
    pub destination: Arc<[u8]>,
    /// The SEND's user headers as `name:value\n` lines escaped for STOMP 1.2, in arrival order,
    /// without the headers the broker owns (destination, transaction, receipt, content-length,
    /// message-id, subscription, ack, redelivered, delivery-count). Spliced into every MESSAGE.
    pub header_block: Box<[u8]>,
    /// No header in the block needed an escape, so the block is valid for every version.
    pub header_block_plain: bool,
    pub body: Box<[u8]>,
    /// `expires` header: milliseconds since the Unix epoch after which the message is dropped
    /// instead of delivered; 0 means never (ActiveMQ's convention).
    pub expires_ms: u64,
    /// Whether a queue keeps this message in the log (when the log is on).
    pub persistent: bool,
    /// What this message counts against the broker's memory budget, given back when the last
    /// reference to it is dropped, on whatever core that is.
    pub charge: MemoryCharge,
    /// Where the owning shard's store wrote it, once written (see [`StoredAt`]).
    pub stored_at: StoredAt,
}

/// An opaque handle to a record in a shard's store (the log packs a segment and an offset
/// into it). The broker keeps it to page the message back in and to acknowledge it; only the
/// store that gave it knows what it means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StoreRef(pub u64);

/// Set by the owning shard's store when it writes a message's record, read by the queue
/// holding the message on that same shard: once set, the queue may drop the body from memory
/// and keep a [`Paged`] entry instead, and an ack names the record directly. An atomic only
/// because a `Message` is shared with other cores (which never read it); `Relaxed` suffices,
/// writer and reader being one thread.
#[derive(Debug, Default)]
pub struct StoredAt(std::sync::atomic::AtomicU64);

impl StoredAt {
    const NOT_STORED: u64 = u64::MAX;
    /// A queue sent its record to the store (a non-persistent message being paged out) and the
    /// store has not written it yet: acks must reach the store, to cancel it.
    const APPENDED: u64 = u64::MAX - 1;

    pub fn new() -> StoredAt {
        StoredAt(std::sync::atomic::AtomicU64::new(Self::NOT_STORED))
    }

    pub fn at(at: StoreRef) -> StoredAt {
        StoredAt(std::sync::atomic::AtomicU64::new(at.0))
    }

    pub fn get(&self) -> Option<StoreRef> {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            Self::NOT_STORED | Self::APPENDED => None,
            at => Some(StoreRef(at)),
        }
    }

    /// A record of it was sent to the store (written or not yet).
    pub fn is_logged(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed) != Self::NOT_STORED
    }

    /// Its record is on its way to the store (see `APPENDED`).
    pub fn set_appended(&self) {
        self.0
            .store(Self::APPENDED, std::sync::atomic::Ordering::Relaxed);
    }

    /// Not written (again): the message is about to be logged anew.
    pub fn clear(&self) {
        self.0
            .store(Self::NOT_STORED, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn set(&self, at: StoreRef) {
        debug_assert!(
            at.0 < Self::APPENDED,
            "a store ref is never one of the marks"
        );
        self.0.store(at.0, std::sync::atomic::Ordering::Relaxed);
    }
}

impl PartialEq for StoredAt {
    fn eq(&self, other: &StoredAt) -> bool {
        self.get() == other.get()
    }
}

impl Eq for StoredAt {}

/// A queued message whose body is not in memory but in the shard's store: the index entry a
/// queue keeps per message between its head and its tail, 32 bytes. Only a message whose
/// record is written is paged out, so `at` always names a live record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Paged {
    /// A record is never at 0 (a segment starts with its header), so the queue entry holding
    /// this can use 0 as its own tag: that keeps an entry at 48 bytes.
    at: NonZeroU64,
    pub id_seq: u64,
    /// `expires` (0: never), as [`Message::expires_ms`].
    pub expires_ms: u64,
    pub body_bytes: u32,
    /// Bytes of the stored header block and destination, for the frame estimate (saturated).
    pub head_bytes: u16,
    pub id_shard: u16,
}

impl Paged {
    /// The entry for `message`, written at `at`.
    pub fn of(message: &Message, at: StoreRef) -> Paged {
        let head = message.header_block.len() + message.destination.len();
        Paged::new(at, message.id, message.expires_ms, message.body.len(), head)
    }

    /// The entry for a record at `at` (never 0) of message `id`, with `body_bytes` of body and
    /// `head_bytes` of header block and destination (both saturated).
    pub fn new(
        at: StoreRef,
        id: MessageId,
        expires_ms: u64,
        body_bytes: usize,
        head_bytes: usize,
    ) -> Paged {
        Paged {
            at: NonZeroU64::new(at.0).expect("no record is at 0"),
            id_seq: id.seq,
            expires_ms,
            body_bytes: u32::try_from(body_bytes).unwrap_or(u32::MAX),
            head_bytes: u16::try_from(head_bytes).unwrap_or(u16::MAX),
            id_shard: id.shard.0,
        }
    }

    /// Its record in the store.
    pub fn at(&self) -> StoreRef {
        StoreRef(self.at.get())
    }

    pub fn id(&self) -> MessageId {
        MessageId {
            shard: ShardId(self.id_shard),
            seq: self.id_seq,
        }
    }

    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_ms != 0 && self.expires_ms <= now_ms
    }

    /// As [`Message::frame_bytes_estimate`] (which it equals unless the head saturated).
    pub fn frame_bytes_estimate(&self) -> u64 {
        u64::from(self.body_bytes) + u64::from(self.head_bytes) + 256
    }
}

/// Headers of a SEND that the broker sets itself on MESSAGE, or that only mean something on
/// the SEND, and so are not stored with the message.
const BROKER_HEADERS: [&[u8]; 9] = [
    b"destination",
    b"transaction",
    b"receipt",
    b"content-length",
    b"message-id",
    b"subscription",
    b"ack",
    b"redelivered",
    b"delivery-count",
];

impl Message {
    /// Builds a stored message from a SEND's headers (already unescaped by the decoder).
    pub fn from_send<'h, I>(
        id: MessageId,
        destination: Arc<[u8]>,
        headers: I,
        body: &[u8],
        expires_ms: u64,
        persistent: bool,
    ) -> Message
    where
        I: IntoIterator<Item = (&'h [u8], &'h [u8])>,
        I::IntoIter: Clone,
    {
        let headers = headers.into_iter();
        // Sized up front: the block is built once per SEND, and boxing it must not reallocate.
        let capacity: usize = headers
            .clone()
            .filter(|(name, _)| !BROKER_HEADERS.contains(name))
            .map(|(name, value)| name.len() + value.len() + 2)
            .sum();
        let mut block = Vec::with_capacity(capacity);
        let mut plain = true;
        for (name, value) in headers {
            if BROKER_HEADERS.contains(&name) {
                continue;
            }
            let before = block.len();
            escape_into(&mut block, name, Escaping::V1_2);
            block.push(b':');
            escape_into(&mut block, value, Escaping::V1_2);
            block.push(b'\n');
            if block.len() - before != name.len() + value.len() + 2 {
                plain = false;
            }
        }
        Message {
            id,
            destination,
            header_block: block.into_boxed_slice(),
            header_block_plain: plain,
            body: body.into(),
            expires_ms,
            persistent,
            charge: MemoryCharge::none(),
            stored_at: StoredAt::new(),
        }
    }

    /// Builds a stored message around a header block that is already in [`Message::header_block`]
    /// form (escaped for STOMP 1.2, broker headers left out), such as the log's version 3
    /// records hold: copied as is, never unescaped and escaped again.
    pub fn from_block(
        id: MessageId,
        destination: Arc<[u8]>,
        header_block: &[u8],
        header_block_plain: bool,
        body: &[u8],
        expires_ms: u64,
        persistent: bool,
    ) -> Message {
        Message {
            id,
            destination,
            header_block: header_block.into(),
            header_block_plain,
            body: body.into(),
            expires_ms,
            persistent,
            charge: MemoryCharge::none(),
            stored_at: StoredAt::new(),
        }
    }

    /// Counts this message against `budget` until it is dropped (replacing any earlier charge).
    pub fn charge_to(&mut self, budget: &'static MemoryBudget) {
        let bytes = Message::charge_bytes(self.body.len(), self.header_block.len());
        self.charge = MemoryCharge::new(budget, bytes);
    }

    /// Bytes [`Message::charge_to`] would charge for a message of `body_bytes` and `header_bytes`.
    pub fn charge_bytes(body_bytes: usize, header_bytes: usize) -> u64 {
        body_bytes as u64 + header_bytes as u64 + MESSAGE_OVERHEAD_BYTES
    }

    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_ms != 0 && self.expires_ms <= now_ms
    }

    /// What its MESSAGE frame costs in a connection's out buffer, roughly: the body, the
    /// sender's headers, and the broker's own (destination, message-id, subscription, ack,
    /// content-length, redelivered), which stay under 256 bytes for names of normal length.
    /// Windows and topic slack count in these bytes, so that many small messages weigh their
    /// heads too.
    pub fn frame_bytes_estimate(&self) -> u64 {
        (self.body.len() + self.header_block.len() + self.destination.len()) as u64 + 256
    }

    /// A copy of this message for another destination (dead-lettering), with the same id.
    pub fn moved_to(&self, destination: Arc<[u8]>) -> Message {
        Message {
            id: self.id,
            destination,
            header_block: self.header_block.clone(),
            header_block_plain: self.header_block_plain,
            body: self.body.clone(),
            expires_ms: self.expires_ms,
            persistent: self.persistent,
            // The copy holds its own bytes, so it is charged as the original is.
            charge: if self.charge.bytes() > 0 {
                MemoryCharge::new(self.charge.budget(), self.charge.bytes())
            } else {
                MemoryCharge::none()
            },
            // A new record, on the dead-letter queue's shard.
            stored_at: StoredAt::new(),
        }
    }

    /// Appends the stored headers escaped for a `version` peer. 1.2 (and any plain block) is
    /// spliced as stored; 1.1 is re-escaped (it has no `\r`); 1.0 has no escaping at all, so a
    /// header whose unescaped name or value holds CR, LF (or `:` in the name) cannot be written
    /// to it without breaking the frame and is left out.
    pub fn write_header_block(&self, out: &mut Vec<u8>, version: Version) {
        if version == Version::V1_2 || self.header_block_plain {
            out.extend_from_slice(&self.header_block);
            return;
        }
        for line in self.header_block.split_inclusive(|&byte| byte == b'\n') {
            let line = &line[..line.len() - 1];
            // In an escaped block the first raw ':' is the separator.
            let Some(colon) = memchr::memchr(b':', line) else {
                continue;
            };
            let (Ok(name), Ok(value)) = (
                unescape(&line[..colon], Escaping::V1_2, 0),
                unescape(&line[colon + 1..], Escaping::V1_2, 0),
            ) else {
                continue;
            };
            let escaping = if version == Version::V1_1 {
                Escaping::V1_1
            } else {
                let breaks_frame = |text: &[u8]| text.iter().any(|&b| b == b'\n' || b == b'\r');
                if breaks_frame(&name) || breaks_frame(&value) || name.contains(&b':') {
                    continue;
                }
                Escaping::None
            };
            escape_into(out, &name, escaping);
            out.push(b':');
            escape_into(out, &value, escaping);
            out.push(b'\n');
        }
    }
}

/// A message the log recovered at startup, for [`crate::broker::Shard::restore`]: its queue
/// and its index entry; the body stays in the store until a consumer needs it.
#[derive(Clone, Debug)]
pub struct Recovered {
    pub destination: Arc<[u8]>,
    pub entry: Paged,
    /// How many times it had been handed to a consumer before the restart (0 if never, or if
    /// the log does not know). Non-zero makes the next delivery carry `redelivered:true`.
    pub deliveries: u32,
}

/// One queue's numbers, as `/queue/monitor` reports them (stompserver's three counters).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueStats {
    pub name: Arc<[u8]>,
    /// Messages held: waiting plus delivered and not yet acknowledged.
    pub size: u64,
    /// Messages consumed for good: acknowledged, auto-acked, expired or dead-lettered.
    pub dequeued: u64,
    /// Messages accepted into the queue.
    pub enqueued: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_hash_is_fnv1a_64_and_stable() {
        // Published FNV-1a 64 test vectors: the log layout depends on these never changing.
        let mut hasher = fnv::FnvHasher::default();
        hasher.write(b"");
        assert_eq!(hasher.finish(), 0xcbf2_9ce4_8422_2325);
        let mut hasher = fnv::FnvHasher::default();
        hasher.write(b"a");
        assert_eq!(hasher.finish(), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(
            shard_of(b"a", 7),
            ShardId((0xaf63_dc4c_8601_ec8c_u64 % 7) as u16)
        );
        assert_eq!(shard_of(b"/queue/x", 1), ShardId(0));
    }

    #[test]
    fn message_id_text_round_trips() {
        let id = MessageId {
            shard: ShardId(65535),
            seq: u64::MAX,
        };
        let mut buffer = [0u8; 48];
        let length = id.write_text(&mut buffer);
        assert_eq!(&buffer[..length], b"65535-18446744073709551615");
        assert_eq!(MessageId::parse(&buffer[..length]), Some(id));
        assert_eq!(MessageId::parse(b"x-1"), None);
    }

    proptest::proptest! {
        /// The hand-written digits say what `Display` says, for every shard and sequence.
        #[test]
        fn message_id_text_matches_display(shard: u16, seq: u64) {
            let id = MessageId { shard: ShardId(shard), seq };
            let mut buffer = [0u8; 48];
            let length = id.write_text(&mut buffer);
            let expected = id.to_string();
            proptest::prop_assert_eq!(&buffer[..length], expected.as_bytes());
        }
    }

    #[test]
    fn dead_letter_queue_names_follow_activemq() {
        assert_eq!(
            dead_letter_queue(b"/queue/orders").as_deref(),
            Some(&b"/queue/DLQ.orders"[..])
        );
        assert_eq!(dead_letter_queue(b"/queue/DLQ.orders"), None);
    }

    #[test]
    fn header_block_is_reescaped_per_version() {
        let id = MessageId {
            shard: ShardId(0),
            seq: 1,
        };
        let headers: [(&[u8], &[u8]); 3] = [
            (b"destination", b"/queue/a"),
            (b"k", b"a\r\nb:c"),
            (b"plain", b"v"),
        ];
        let message = Message::from_send(id, Arc::from(&b"/queue/a"[..]), headers, b"", 0, true);
        assert!(!message.header_block_plain);
        assert_eq!(&*message.header_block, b"k:a\\r\\nb\\cc\nplain:v\n");
        let mut out = Vec::new();
        message.write_header_block(&mut out, Version::V1_1);
        assert_eq!(out, b"k:a\r\\nb\\cc\nplain:v\n");
        out.clear();
        message.write_header_block(&mut out, Version::V1_0);
        assert_eq!(out, b"plain:v\n");
    }
}
