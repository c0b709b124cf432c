//! Header escaping (STOMP 1.2 "Value Encoding"). 1.2 escapes CR, LF, `:` and `\`; 1.1 has the
//! same rules without `\r`; 1.0 has no escaping at all. CONNECT, STOMP and CONNECTED frames are
//! never escaped, whatever the version.

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
    while index < raw.len() {
        let byte = raw[index];
        if byte != b'\\' {
            out.push(byte);
            index += 1;
            continue;
        }
        let escaped = raw.get(index + 1).copied();
        let decoded = match (escaped, escaping) {
            (Some(b'n'), _) => b'\n',
            (Some(b'c'), _) => b':',
            (Some(b'\\'), _) => b'\\',
            (Some(b'r'), Escaping::V1_2) => b'\r',
            (other, _) => {
                // A lone trailing backslash is as undefined as `\t`.
                return Err(DecodeError::InvalidEscape {
                    offset: offset + index,
                    byte: other.unwrap_or(b'\\'),
                });
            }
        };
        out.push(decoded);
        index += 2;
    }
    Ok(Cow::Owned(out))
}

/// Whether `text` needs any escaping under `escaping`.
#[inline]
pub fn needs_escape(text: &[u8], escaping: Escaping) -> bool {
    match escaping {
        Escaping::None => false,
        Escaping::V1_1 => memchr::memchr3(b'\n', b':', b'\\', text).is_some(),
        Escaping::V1_2 => {
            memchr::memchr3(b'\n', b':', b'\\', text).is_some()
                || memchr::memchr(b'\r', text).is_some()
        }
    }
}

/// Appends `text` to `out` with the escapes `escaping` asks for. 1.1 has no escape for CR, so
/// a CR goes out raw there (the peer's line parser sees it as part of the value, as 1.1 allows
/// only before an LF).
pub fn escape_into(out: &mut Vec<u8>, text: &[u8], escaping: Escaping) {
    if !needs_escape(text, escaping) {
        out.extend_from_slice(text);
        return;
    }
    for &byte in text {
        match (byte, escaping) {
            (b'\n', _) => out.extend_from_slice(b"\\n"),
            (b':', _) => out.extend_from_slice(b"\\c"),
            (b'\\', _) => out.extend_from_slice(b"\\\\"),
            (b'\r', Escaping::V1_2) => out.extend_from_slice(b"\\r"),
            (other, _) => out.push(other),
        }
    }
}
