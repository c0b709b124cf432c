//! Header escaping (STOMP 1.2 "Value Encoding"). 1.2 escapes CR, LF, `:` and `\`; 1.1 has the
//! same rules without `\r`; 1.0 has no escaping at all. CONNECT, STOMP and CONNECTED frames are
//! never escaped, whatever the version; there the encoder replaces what it cannot write
//! (see [`escape_into`]).

use std::borrow::Cow;

use super::error::DecodeError;
use super::frame::Version;

/// Which escape sequences a frame's headers use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Escaping {
    /// 1.0, and CONNECT/STOMP/CONNECTED in every version: bytes are taken as they are.
    None,
    /// 1.1: `\n`, `\c`, `\\`.
    V1_1,
    /// 1.2: `\r`, `\n`, `\c`, `\\`.
    V1_2,
}

impl Escaping {
    pub fn for_frame(version: Version, command_escapes: bool) -> Escaping {
        match (version, command_escapes) {
            (_, false) | (Version::V1_0, _) => Escaping::None,
            (Version::V1_1, true) => Escaping::V1_1,
            (Version::V1_2, true) => Escaping::V1_2,
        }
    }
}

/// What the escape `\\` + `escaped` decodes to under `escaping`; `None` if it is undefined.
#[inline]
fn unescaped_byte(escaped: u8, escaping: Escaping) -> Option<u8> {
    match (escaped, escaping) {
        (b'n', _) => Some(b'\n'),
        (b'c', _) => Some(b':'),
        (b'\\', _) => Some(b'\\'),
        (b'r', Escaping::V1_2) => Some(b'\r'),
        _ => None,
    }
}

fn invalid_escape(raw: &[u8], index: usize, offset: usize) -> DecodeError {
    // A lone trailing backslash is as undefined as `\t`.
    DecodeError::InvalidEscape {
        offset: offset + index,
        byte: raw.get(index + 1).copied().unwrap_or(b'\\'),
    }
}

/// Checks that every backslash in `raw` starts an escape `escaping` defines, without building
/// the decoded text: the decoder rejects a bad header as soon as its line is whole and decodes
/// it only when the frame is. `offset` is where `raw` starts in the frame, for the error.
pub fn check_escapes(raw: &[u8], escaping: Escaping, offset: usize) -> Result<(), DecodeError> {
    if escaping == Escaping::None {
        return Ok(());
    }
    let mut from = 0;
    while let Some(found) = memchr::memchr(b'\\', &raw[from..]) {
        let index = from + found;
        match raw.get(index + 1) {
            Some(&escaped) if unescaped_byte(escaped, escaping).is_some() => from = index + 2,
            _ => return Err(invalid_escape(raw, index, offset)),
        }
    }
    Ok(())
}

/// Decodes the escapes in `raw`. Borrows when there are none, which is the common case.
/// `offset` is where `raw` starts in the frame, for the error.
pub fn unescape(
    raw: &[u8],
    escaping: Escaping,
    offset: usize,
) -> Result<Cow<'_, [u8]>, DecodeError> {
    if escaping == Escaping::None {
        return Ok(Cow::Borrowed(raw));
    }
    let Some(first) = memchr::memchr(b'\\', raw) else {
        return Ok(Cow::Borrowed(raw));
    };
    let mut out = Vec::with_capacity(raw.len());
    out.extend_from_slice(&raw[..first]);
    let mut index = first;
    while let Some(found) = memchr::memchr(b'\\', &raw[index..]) {
        out.extend_from_slice(&raw[index..index + found]);
        index += found;
        let decoded = raw
            .get(index + 1)
            .and_then(|&escaped| unescaped_byte(escaped, escaping))
            .ok_or_else(|| invalid_escape(raw, index, offset))?;
        out.push(decoded);
        index += 2;
    }
    out.extend_from_slice(&raw[index..]);
    Ok(Cow::Owned(out))
}

/// Decodes escapes that [`check_escapes`] has accepted. An undefined one (which would be a
/// bug in the caller) is kept as it is rather than failing.
pub(crate) fn unescape_checked(raw: &[u8], escaping: Escaping) -> Cow<'_, [u8]> {
    debug_assert!(check_escapes(raw, escaping, 0).is_ok());
    unescape(raw, escaping, 0).unwrap_or(Cow::Borrowed(raw))
}

/// Which bytes each escaping has to rewrite, one bit per [`Escaping`] (see [`escape_bit`]).
static REWRITTEN: [u8; 256] = {
    let mut table = [0u8; 256];
    table[b'\n' as usize] = NONE_BIT | V1_1_BIT | V1_2_BIT;
    table[b'\r' as usize] = NONE_BIT | V1_2_BIT;
    table[b':' as usize] = V1_1_BIT | V1_2_BIT;
    table[b'\\' as usize] = V1_1_BIT | V1_2_BIT;
    table
};
const NONE_BIT: u8 = 1;
const V1_1_BIT: u8 = 2;
const V1_2_BIT: u8 = 4;

fn escape_bit(escaping: Escaping) -> u8 {
    match escaping {
        Escaping::None => NONE_BIT,
        Escaping::V1_1 => V1_1_BIT,
        Escaping::V1_2 => V1_2_BIT,
    }
}

/// Header names and values up to this length are checked with a table lookup per byte, which
/// costs less than the two memchr calls a 1.2 check needs; longer ones use memchr.
const SHORT_TEXT_BYTES: usize = 32;

/// Whether `text` needs any escaping (or, unescaped, any replacing) under `escaping`.
#[inline]
pub fn needs_escape(text: &[u8], escaping: Escaping) -> bool {
    if text.len() <= SHORT_TEXT_BYTES {
        let bit = escape_bit(escaping);
        return text
            .iter()
            .fold(0, |seen, &byte| seen | REWRITTEN[usize::from(byte)])
            & bit
            != 0;
    }
    match escaping {
        Escaping::None => memchr::memchr2(b'\n', b'\r', text).is_some(),
        Escaping::V1_1 => memchr::memchr3(b'\n', b':', b'\\', text).is_some(),
        Escaping::V1_2 => {
            memchr::memchr3(b'\n', b':', b'\\', text).is_some()
                || memchr::memchr(b'\r', text).is_some()
        }
    }
}

/// Appends `text` to `out` with the escapes `escaping` asks for.
///
/// 1.1 has no escape for CR, so a CR goes out raw there (1.1 header values may hold one); a
/// peer that also accepts CRLF line ends will drop a CR that ends a value.
///
/// Without escaping (STOMP 1.0, and CONNECT/STOMP/CONNECTED) a CR or LF cannot be written at
/// all: sent raw it would end the header line early and let the rest of the value pose as
/// headers of its own (a header relayed from a 1.2 publisher to a 1.0 subscriber, say). Each is
/// written as a space instead. Lossy, but the frame keeps the structure the sender meant.
pub fn escape_into(out: &mut Vec<u8>, text: &[u8], escaping: Escaping) {
    if !needs_escape(text, escaping) {
        out.extend_from_slice(text);
        return;
    }
    for &byte in text {
        match (byte, escaping) {
            (b'\n' | b'\r', Escaping::None) => out.push(b' '),
            (b'\n', _) => out.extend_from_slice(b"\\n"),
            (b':', Escaping::V1_1 | Escaping::V1_2) => out.extend_from_slice(b"\\c"),
            (b'\\', Escaping::V1_1 | Escaping::V1_2) => out.extend_from_slice(b"\\\\"),
            (b'\r', Escaping::V1_2) => out.extend_from_slice(b"\\r"),
            (other, _) => out.push(other),
        }
    }
}

/// Appends a header name: as [`escape_into`], except that without escaping a `:` (which would
/// move the split between name and value) is written as `_`, for the same reason as CR and LF.
pub(crate) fn escape_name_into(out: &mut Vec<u8>, name: &[u8], escaping: Escaping) {
    if escaping != Escaping::None || memchr::memchr(b':', name).is_none() {
        escape_into(out, name, escaping);
        return;
    }
    let start = out.len();
    escape_into(out, name, escaping);
    for byte in &mut out[start..] {
        if *byte == b':' {
            *byte = b'_';
        }
    }
}
