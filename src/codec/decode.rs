//! The incremental frame decoder.
//!
//! The caller owns the bytes; the decoder owns only where it has looked. A call either hands
//! out one complete frame borrowed from the input, or reports heart-beat EOLs to drop, or asks
//! for more bytes. Between calls that return [`Decoded::NeedMore`] the caller must pass the same
//! bytes again with more appended; after any other result it drops `consumed` bytes from the
//! front and calls again.
//!
//! Invariants:
//! - Every byte is searched at most once. The head is parsed line by line as each line's LF
//!   arrives (command, colon, escapes, `content-length`), and the search position survives
//!   between calls, so a 1 MiB body that arrives in 4 KiB pieces is searched for its NUL once,
//!   not once per piece, and a body with a `content-length` is not searched at all.
//! - Limits are checked as soon as the bytes that break them are visible, before the caller
//!   buffers more: a header line or a frame that has grown past its limit without ending, a
//!   `content-length` over the body or frame limit as soon as its header line is complete.
//! - The result does not depend on how the input was split. Every check is a function of the
//!   bytes seen so far, and a limit breach is reported at the byte where it became certain (its
//!   `actual` is then the limit plus one), so one call with the whole input and one call per
//!   byte report the same frames and the same error.

use memchr::{memchr, memchr2, memchr3};
use smallvec::SmallVec;

use super::error::{DecodeError, LimitKind};
use super::escape::{check_escapes, unescape_checked, Escaping};
use super::frame::{Command, Frame, Header, Headers, Version, HEADERS_INLINE};
use super::limits::Limits;

/// What one call to [`Decoder::decode`] found.
// The frame variant is large because its headers are inline; boxing it would put an allocation
// on every decode, which is what the inline headers exist to avoid.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole frame; drop `consumed` bytes (the frame up to and including its NUL).
    Frame { frame: Frame<'a>, consumed: usize },
    /// `consumed` bytes of EOLs between frames (a heart-beat from the peer).
    Heartbeat { consumed: usize },
    /// The input ends inside a frame; call again with the same bytes and more.
    NeedMore,
}

/// Where one header's name and value sit in the frame, before unescaping.
#[derive(Clone, Copy, Debug)]
struct HeaderSpan {
    name_start: usize,
    name_end: usize,
    value_start: usize,
    value_end: usize,
    /// The line held a backslash, so name and value go through [`unescape`].
    escaped: bool,
}

/// A resumable STOMP frame decoder for one byte stream.
#[derive(Clone, Debug)]
pub struct Decoder {
    limits: Limits,
    version: Version,
    /// The frame's command once its line is whole; `None` while heart-beats may still come.
    command: Option<Command>,
    /// How this frame's headers are escaped, known once the command is.
    escaping: Escaping,
    /// `true` once the blank line that ends the header block has been seen.
    in_body: bool,
    /// Start of the header line not yet seen whole.
    line_start: usize,
    /// Where the next search starts: within the current line, or within the body.
    searched: usize,
    /// First `:` of the current line, once seen.
    colon: Option<usize>,
    /// The current line holds a backslash.
    backslash: bool,
    /// The first `content-length` header, parsed.
    content_length: Option<usize>,
    /// Offset of the body, once `in_body`.
    body_start: usize,
    /// The headers parsed so far, used to build the frame when it is whole.
    spans: SmallVec<[HeaderSpan; HEADERS_INLINE]>,
    /// Bytes handed to searches over the decoder's life; see [`Decoder::scanned_bytes`].
    scanned_bytes: u64,
}

impl Decoder {
    /// A decoder for a stream whose version is not yet negotiated. Before CONNECTED only
    /// CONNECT or STOMP is legal and neither escapes, so 1.2 is a safe starting point.
    pub fn new(limits: Limits) -> Decoder {
        Decoder {
            limits,
            version: Version::V1_2,
            command: None,
            escaping: Escaping::None,
            in_body: false,
            line_start: 0,
            searched: 0,
            colon: None,
            backslash: false,
            content_length: None,
            body_start: 0,
            spans: SmallVec::new(),
            scanned_bytes: 0,
        }
    }

    /// Sets the negotiated version, which decides the header escaping of later frames.
    pub fn set_version(&mut self, version: Version) {
        self.version = version;
    }

    pub fn version(&self) -> Version {
        self.version
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Forgets a partly scanned frame, for a caller that discards its buffer.
    pub fn reset(&mut self) {
        self.command = None;
        self.escaping = Escaping::None;
        self.in_body = false;
        self.line_start = 0;
        self.searched = 0;
        self.colon = None;
        self.backslash = false;
        self.content_length = None;
        self.body_start = 0;
        self.spans.clear();
    }

    /// How many input bytes the decoder's searches have looked at since it was made. Tests use
    /// it to check that a frame arriving in pieces is searched once, whatever the pieces.
    #[doc(hidden)]
    pub fn scanned_bytes(&self) -> u64 {
        self.scanned_bytes
    }

    /// How long the frame being decoded is, its NUL included, once its head is whole and
    /// declared a `content-length` (`None` before that, and for a body ended by its NUL alone).
    /// A caller that holds the frame's start in a buffer of its own can append just the rest
    /// of the frame there and decode whatever follows it where it lies.
    pub fn frame_len(&self) -> Option<usize> {
        match (self.in_body, self.content_length) {
            // `check_declared_frame` refused a length that would overflow this sum.
            (true, Some(length)) => Some(self.body_start + length + 1),
            _ => None,
        }
    }

    /// Decodes the next item at the front of `input`. See the module docs for the contract.
    pub fn decode<'a>(&mut self, input: &'a [u8]) -> Result<Decoded<'a>, DecodeError> {
        debug_assert!(
            self.searched <= input.len(),
            "decode called with fewer bytes than before"
        );
        if self.command.is_none() && self.searched == 0 {
            match input.first() {
                None => return Ok(Decoded::NeedMore),
                Some(b'\n' | b'\r') => {
                    let eols = leading_eols(input);
                    if eols > 0 {
                        return Ok(Decoded::Heartbeat { consumed: eols });
                    }
                    if input.len() == 1 {
                        // A CR whose LF has not arrived yet: keep it for the next call, which
                        // tells a heart-beat from a stray CR.
                        return Ok(Decoded::NeedMore);
                    }
                }
                Some(_) => {}
            }
        }
        match self.decode_frame(input) {
            Ok(None) => Ok(Decoded::NeedMore),
            Ok(Some(body_end)) => {
                // Built here, right where it is returned, by an infallible builder: a builder
                // returning a Result cost two more moves of the frame (about 600 bytes with its
                // inline headers), a tenth of the time of decoding a small SEND.
                let frame = self.build_frame(input, body_end);
                self.reset();
                Ok(Decoded::Frame {
                    frame,
                    consumed: body_end + 1,
                })
            }
            Err(error) => {
                // The stream is unusable; resetting keeps stale spans from leaking into a
                // caller that starts over.
                self.reset();
                Err(error)
            }
        }
    }

    /// Scans as far as `input` allows. Returns where the body ends (the NUL's offset) once the
    /// frame is whole.
    fn decode_frame(&mut self, input: &[u8]) -> Result<Option<usize>, DecodeError> {
        if !self.in_body && !self.scan_head(input)? {
            return Ok(None);
        }
        match self.content_length {
            Some(length) => {
                let body_end = self.body_start + length;
                if input.len() <= body_end {
                    return Ok(None);
                }
                if input[body_end] != 0 {
                    return Err(DecodeError::MissingNul {
                        content_length: length,
                    });
                }
                Ok(Some(body_end))
            }
            None => match memchr(0, &input[self.searched..]) {
                Some(found) => {
                    self.scanned_bytes += found as u64 + 1;
                    let nul = self.searched + found;
                    self.searched = nul + 1;
                    self.check_body_limits(nul)?;
                    Ok(Some(nul))
                }
                None => {
                    self.scanned_bytes += (input.len() - self.searched) as u64;
                    self.searched = input.len();
                    self.check_body_limits(input.len())?;
                    Ok(None)
                }
            },
        }
    }

    /// Advances through the header block, parsing each line as its LF arrives. Returns `true`
    /// once the blank line that ends the block was found (`in_body` is then set).
    fn scan_head(&mut self, input: &[u8]) -> Result<bool, DecodeError> {
        loop {
            let haystack = &input[self.searched..];
            // Look for the line's end, and for its first colon and any backslash until they
            // are found, so that each byte of the head is searched once.
            let want_colon = self.command.is_some() && self.colon.is_none();
            let want_backslash = self.escaping != Escaping::None && !self.backslash;
            let found = find_line_event(haystack, want_colon, want_backslash);
            let Some(found) = found else {
                self.scanned_bytes += haystack.len() as u64;
                self.searched = input.len();
                self.check_head_limits(input.len())?;
                return Ok(false);
            };
            self.scanned_bytes += found as u64 + 1;
            let at = self.searched + found;
            self.searched = at + 1;
            match input[at] {
                b':' => self.colon = Some(at),
                b'\\' => self.backslash = true,
                _ => {
                    // Everything before the LF was visible without it: a limit that such a
                    // prefix breaks is reported as a split input would report it.
                    self.check_head_limits(at)?;
                    if self.end_line(input, at)? {
                        return Ok(true);
                    }
                }
            }
        }
    }

    /// Errors if a frame whose head has `visible` bytes, none ending the current line, already
    /// breaks a limit. The line still needs its LF and the frame its NUL.
    #[inline]
    fn check_head_limits(&self, visible: usize) -> Result<(), DecodeError> {
        let line = self.limits.header_line_bytes_max;
        let frame = self.limits.frame_bytes_max;
        if visible < self.line_start.saturating_add(line).min(frame) {
            return Ok(());
        }
        first_breach(
            visible,
            [
                (LimitKind::HeaderLineBytes, line, self.line_start),
                (LimitKind::FrameBytes, frame, 0),
            ],
        )
    }

    /// Errors if a body without `content-length` whose first `visible - body_start` bytes hold
    /// no NUL already breaks a limit. The frame still needs its NUL.
    #[inline]
    fn check_body_limits(&self, visible: usize) -> Result<(), DecodeError> {
        let body = self.limits.body_bytes_max;
        let frame = self.limits.frame_bytes_max;
        let body_counted_from = self.body_start + 1;
        if visible < body_counted_from.saturating_add(body).min(frame) {
            return Ok(());
        }
        first_breach(
            visible,
            [
                (LimitKind::BodyBytes, body, body_counted_from),
                (LimitKind::FrameBytes, frame, 0),
            ],
        )
    }

    /// Errors if a frame whose `content-length` makes it `frame_bytes` long (saturated) is over
    /// the frame limit. A saturated size is over any limit, even `usize::MAX`: no buffer holds
    /// such a frame, and refusing it keeps the body's end offset from overflowing.
    fn check_declared_frame(&self, frame_bytes: usize) -> Result<(), DecodeError> {
        let max = self.limits.frame_bytes_max;
        if frame_bytes > max || frame_bytes == usize::MAX {
            return Err(limit(LimitKind::FrameBytes, max, frame_bytes));
        }
        Ok(())
    }

    /// Handles the line that ends with the LF at `lf`. Returns `true` if it was the blank line
    /// that ends the header block.
    fn end_line(&mut self, input: &[u8], lf: usize) -> Result<bool, DecodeError> {
        let line_start = self.line_start;
        let line_end = if lf > line_start && input[lf - 1] == b'\r' {
            lf - 1
        } else {
            lf
        };
        match self.command {
            None => {
                let text = &input[line_start..line_end];
                let command = Command::parse(text).ok_or_else(|| DecodeError::UnknownCommand {
                    command: String::from_utf8_lossy(text).into_owned(),
                })?;
                self.command = Some(command);
                self.escaping = Escaping::for_frame(self.version, command.escapes_headers());
            }
            Some(_) if line_end == line_start => {
                self.in_body = true;
                self.body_start = lf + 1;
                self.searched = self.body_start;
                if let Some(length) = self.content_length {
                    self.check_declared_frame(
                        self.body_start.saturating_add(length).saturating_add(1),
                    )?;
                }
                return Ok(true);
            }
            Some(_) => self.header_line(input, line_end, lf)?,
        }
        self.line_start = lf + 1;
        self.colon = None;
        self.backslash = false;
        Ok(false)
    }

    /// Records the header in `input[line_start..line_end]` (EOL removed; `lf` is its LF).
    fn header_line(&mut self, input: &[u8], line_end: usize, lf: usize) -> Result<(), DecodeError> {
        let line_start = self.line_start;
        let count = self.spans.len() + 1;
        if count > self.limits.headers_count_max {
            return Err(limit(
                LimitKind::HeadersCount,
                self.limits.headers_count_max,
                count,
            ));
        }
        let colon = self
            .colon
            .ok_or(DecodeError::HeaderWithoutColon { offset: line_start })?;
        if colon == line_start {
            return Err(DecodeError::EmptyHeaderName { offset: line_start });
        }
        let (mut value_start, mut value_end) = (colon + 1, line_end);
        if self.version == Version::V1_0 {
            // STOMP 1.0 peers pad values ("destination: /queue/a"); 1.1 and later forbid
            // trimming (STOMP 1.2 "Value Encoding").
            while value_start < value_end && matches!(input[value_start], b' ' | b'\t') {
                value_start += 1;
            }
            while value_end > value_start && matches!(input[value_end - 1], b' ' | b'\t') {
                value_end -= 1;
            }
        }
        self.check_header_bytes(&input[line_start..line_end], colon - line_start, line_start)?;
        let escaped = self.backslash && self.escaping != Escaping::None;
        if escaped {
            // Reject an undefined escape now, before the body is buffered.
            check_escapes(&input[line_start..colon], self.escaping, line_start)?;
            check_escapes(&input[value_start..value_end], self.escaping, value_start)?;
        }
        if self.content_length.is_none() && &input[line_start..colon] == b"content-length" {
            let length = self.parse_content_length(&input[value_start..value_end])?;
            // The rest of the frame is at least a blank line, the body and the NUL.
            self.check_declared_frame((lf + 1).saturating_add(length).saturating_add(2))?;
            self.content_length = Some(length);
        }
        self.spans.push(HeaderSpan {
            name_start: line_start,
            name_end: colon,
            value_start,
            value_end,
            escaped,
        });
        Ok(())
    }

    /// Refuses a header line (`line`, EOL removed, its colon at `colon`, starting at `offset`)
    /// that holds a NUL octet, or that is not UTF-8 in a frame whose headers are escaped (STOMP
    /// 1.1 and 1.2, "Value Encoding"; 1.0 has no such rule, and CONNECT and CONNECTED are not
    /// checked because the version is not agreed yet). One memchr and one UTF-8 check per
    /// line, both over bytes already in cache; escapes are ASCII, so checking before
    /// unescaping is the same as after.
    #[inline]
    fn check_header_bytes(
        &self,
        line: &[u8],
        colon: usize,
        offset: usize,
    ) -> Result<(), DecodeError> {
        let name = || String::from_utf8_lossy(&line[..colon]).into_owned();
        if memchr(0, line).is_some() {
            return Err(DecodeError::NulInHeader {
                name: name(),
                offset,
            });
        }
        if self.escaping != Escaping::None && std::str::from_utf8(line).is_err() {
            return Err(DecodeError::InvalidUtf8InHeader {
                name: name(),
                offset,
            });
        }
        Ok(())
    }

    /// A `content-length` value: decimal digits only (no sign, no spaces, not empty). A number
    /// too large for `usize` is over any body limit, so it is reported as that breach.
    fn parse_content_length(&self, value: &[u8]) -> Result<usize, DecodeError> {
        if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
            return Err(DecodeError::InvalidContentLength {
                value: String::from_utf8_lossy(value).into_owned(),
            });
        }
        let length = value.iter().fold(0usize, |sum, digit| {
            sum.saturating_mul(10)
                .saturating_add(usize::from(digit - b'0'))
        });
        if length > self.limits.body_bytes_max {
            return Err(limit(
                LimitKind::BodyBytes,
                self.limits.body_bytes_max,
                length,
            ));
        }
        Ok(length)
    }

    /// Builds the frame once it is whole. Cannot fail: every escape was checked as its line
    /// arrived.
    #[inline(always)]
    fn build_frame<'a>(&self, input: &'a [u8], body_end: usize) -> Frame<'a> {
        let mut headers = Headers::new();
        if self.spans.len() > HEADERS_INLINE {
            headers.reserve_exact(self.spans.len());
        }
        for span in &self.spans {
            let name = &input[span.name_start..span.name_end];
            let value = &input[span.value_start..span.value_end];
            headers.push(if span.escaped {
                Header {
                    name: unescape_checked(name, self.escaping),
                    value: unescape_checked(value, self.escaping),
                }
            } else {
                Header::new(name, value)
            });
        }
        Frame {
            command: self.command.expect("a whole frame has a command"),
            headers,
            body: &input[self.body_start..body_end],
        }
    }
}

fn limit(limit: LimitKind, max: usize, actual: usize) -> DecodeError {
    DecodeError::LimitExceeded { limit, max, actual }
}

/// Reports the limit that `visible` bytes break first. Each entry is a limit and the offset
/// where the counted bytes start; a limit breaks once more than `max` bytes from that offset are
/// visible. Breaches are ordered by the byte at which they became certain, so that the error
/// does not depend on how much input happened to be visible; ties go to the earlier entry.
#[cold]
fn first_breach<const N: usize>(
    visible: usize,
    limits: [(LimitKind, usize, usize); N],
) -> Result<(), DecodeError> {
    let mut first: Option<(usize, LimitKind, usize)> = None;
    for (kind, max, counted_from) in limits {
        // `visible` is the smallest count at which the bytes counted from `counted_from` reach
        // `max + 1` (the LF or NUL still to come makes up that last byte).
        let breaks_at = counted_from.saturating_add(max);
        if visible >= breaks_at && first.map_or(true, |(at, _, _)| breaks_at < at) {
            first = Some((breaks_at, kind, max));
        }
    }
    match first {
        Some((_, kind, max)) => Err(limit(kind, max, max.saturating_add(1))),
        None => Ok(()),
    }
}

/// How far into a search [`find_line_event`] looks a byte at a time before it hands over to
/// memchr. Most header names and values are shorter, and for them a table lookup per byte
/// costs less than a memchr call.
const SHORT_SEARCH_BYTES: usize = 32;

/// Which bytes end a step of the head search: bit 0 LF, bit 1 `:`, bit 2 `\`.
static LINE_EVENTS: [u8; 256] = {
    let mut table = [0u8; 256];
    table[b'\n' as usize] = 1;
    table[b':' as usize] = 2;
    table[b'\\' as usize] = 4;
    table
};

/// The offset of the first LF in `haystack`, or of the first `:` or `\` if asked for and
/// earlier.
#[inline(always)]
fn find_line_event(haystack: &[u8], want_colon: bool, want_backslash: bool) -> Option<usize> {
    let wanted = 1 | (u8::from(want_colon) << 1) | (u8::from(want_backslash) << 2);
    let short = &haystack[..haystack.len().min(SHORT_SEARCH_BYTES)];
    if let Some(found) = short
        .iter()
        .position(|&byte| LINE_EVENTS[usize::from(byte)] & wanted != 0)
    {
        return Some(found);
    }
    let rest = &haystack[short.len()..];
    let found = match (want_colon, want_backslash) {
        (false, false) => memchr(b'\n', rest),
        (true, false) => memchr2(b'\n', b':', rest),
        (false, true) => memchr2(b'\n', b'\\', rest),
        (true, true) => memchr3(b'\n', b':', b'\\', rest),
    };
    found.map(|position| short.len() + position)
}

/// How many bytes of whole EOLs (`\n` or `\r\n`) start `input`. A lone trailing `\r` is left
/// for the next call, when its `\n` has arrived.
fn leading_eols(input: &[u8]) -> usize {
    let mut index = 0;
    loop {
        match input.get(index) {
            Some(b'\n') => index += 1,
            Some(b'\r') if input.get(index + 1) == Some(&b'\n') => index += 2,
            _ => return index,
        }
    }
}
