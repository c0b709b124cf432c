//! The stamp every message body starts with: who sent it, its place in that sender's sequence,
//! and when it was meant to leave. The rest of the body is padding up to the requested size.
//!
//! The stamp is 40 lowercase hex digits: producer id (8), sequence (16), send time (16). Text,
//! not binary, so a body never holds a NUL: a STOMP 1.0 broker that drops `content-length`
//! (the body then ends at the first NUL, STOMP 1.0 "Frames") or one that turns bodies into text
//! messages still delivers it whole. Fixed width, so reading it is a fixed loop, not a parse.
//!
//! Timestamps are nanoseconds since the run's epoch, an [`Instant`] taken once per run. Producers
//! and consumers run in one process, so the same monotonic clock stamps and reads them.

use std::time::Instant;

/// Bytes of the stamp: producer id, sequence and send time in hex.
pub const STAMP_BYTES: usize = 40;

const HEX: &[u8; 16] = b"0123456789abcdef";

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

fn write_hex(out: &mut [u8], value: u64) {
    let digits = out.len();
    for (index, byte) in out.iter_mut().enumerate() {
        let shift = 4 * (digits - 1 - index);
        *byte = HEX[((value >> shift) & 0xf) as usize];
    }
}

fn read_hex(text: &[u8]) -> Option<u64> {
    text.iter().try_fold(0u64, |value, &byte| {
        let digit = match byte {
            b'0'..=b'9' => byte - b'0',
            b'a'..=b'f' => byte - b'a' + 10,
            _ => return None,
        };
        Some(value << 4 | u64::from(digit))
    })
}

impl Stamp {
    pub fn write(&self, out: &mut [u8; STAMP_BYTES]) {
        write_hex(&mut out[0..8], u64::from(self.producer));
        write_hex(&mut out[8..24], self.sequence);
        write_hex(&mut out[24..40], self.sent_ns);
    }

    /// Reads the stamp at the start of `body`; `None` when the body does not start with one,
    /// which means the message did not come from this load generator or was damaged.
    pub fn read(body: &[u8]) -> Option<Stamp> {
        let stamp = body.get(..STAMP_BYTES)?;
        Some(Stamp {
            producer: u32::try_from(read_hex(&stamp[0..8])?).ok()?,
            sequence: read_hex(&stamp[8..24])?,
            sent_ns: read_hex(&stamp[24..40])?,
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

    #[test]
    fn damaged_stamp_is_not_read() {
        let mut bytes = [0u8; STAMP_BYTES];
        Stamp {
            producer: 1,
            sequence: 2,
            sent_ns: 3,
        }
        .write(&mut bytes);
        bytes[10] = b'x';
        assert_eq!(Stamp::read(&bytes), None);
    }

    #[test]
    fn a_body_holds_no_nul() {
        let mut bytes = [0u8; STAMP_BYTES];
        Stamp {
            producer: 0,
            sequence: 0,
            sent_ns: 0,
        }
        .write(&mut bytes);
        assert!(!bytes.contains(&0));
        assert!(!padding(1024).contains(&0));
    }
}
