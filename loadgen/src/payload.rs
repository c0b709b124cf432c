//! The stamp every message body starts with: who sent it, its place in that sender's sequence,
//! and when it was meant to leave. The rest of the body is padding up to the requested size.
//!
//! The stamp is binary, fixed-width little-endian, so writing it costs three stores and reading it
//! needs no parsing. Bodies are sent with `content-length`, so the NULs it may hold are legal
//! (STOMP 1.2 "Body").
//!
//! Timestamps are nanoseconds since the run's epoch, an [`Instant`] taken once per run. Producers
//! and consumers run in one process, so the same monotonic clock stamps and reads them.

use std::time::Instant;

/// Bytes of the stamp: producer id (u32), sequence (u64), send time (u64 ns).
pub const STAMP_BYTES: usize = 20;

/// What a body's stamp says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// Which producer sent it; consumers track sequences per producer.
    pub producer: u32,
    /// 0, 1, 2 … per producer, with no gaps on the sending side.
    pub sequence: u64,
    /// When it was meant to be sent, in ns since the run epoch (the intended time, not the
    /// actual one, for paced sends: a stall shows up as latency instead of hiding).
    pub sent_ns: u64,
}

impl Stamp {
    pub fn write(&self, out: &mut [u8; STAMP_BYTES]) {
        out[0..4].copy_from_slice(&self.producer.to_le_bytes());
        out[4..12].copy_from_slice(&self.sequence.to_le_bytes());
        out[12..20].copy_from_slice(&self.sent_ns.to_le_bytes());
    }

    /// Reads the stamp at the start of `body`; `None` when the body is too short to hold one,
    /// which means the message did not come from this load generator.
    pub fn read(body: &[u8]) -> Option<Stamp> {
        let stamp: &[u8; STAMP_BYTES] = body.get(..STAMP_BYTES)?.try_into().ok()?;
        Some(Stamp {
            producer: u32::from_le_bytes(stamp[0..4].try_into().ok()?),
            sequence: u64::from_le_bytes(stamp[4..12].try_into().ok()?),
            sent_ns: u64::from_le_bytes(stamp[12..20].try_into().ok()?),
        })
    }
}

/// The run's time origin, shared by every thread.
#[derive(Clone, Copy, Debug)]
pub struct Epoch(Instant);

impl Epoch {
    pub fn now() -> Epoch {
        Epoch(Instant::now())
    }

    pub fn instant(&self) -> Instant {
        self.0
    }

    /// Nanoseconds since the epoch.
    pub fn elapsed_ns(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Padding bytes after the stamp for a body of `body_bytes` (at least [`STAMP_BYTES`]). Filled
/// with printable text so a broker that logs bodies shows something readable.
pub fn padding(body_bytes: usize) -> Vec<u8> {
    assert!(body_bytes >= STAMP_BYTES, "a body holds at least its stamp");
    (0..body_bytes - STAMP_BYTES)
        .map(|index| b'a' + (index % 26) as u8)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trips() {
        let stamp = Stamp {
            producer: 7,
            sequence: u64::MAX - 1,
            sent_ns: 123_456_789,
        };
        let mut bytes = [0u8; STAMP_BYTES];
        stamp.write(&mut bytes);
        let mut body = bytes.to_vec();
        body.extend_from_slice(&padding(128));
        assert_eq!(Stamp::read(&body), Some(stamp));
    }

    #[test]
    fn short_body_has_no_stamp() {
        assert_eq!(Stamp::read(b"hello"), None);
    }
}
