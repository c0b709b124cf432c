//! The incremental frame decoder.
//!
//! The caller owns the bytes; the decoder owns only where it has looked. A call either hands
//! out one complete frame borrowed from the input, or reports heart-beat EOLs to drop, or asks
//! for more bytes. Between calls that return [`Decoded::NeedMore`] the caller must pass the same
//! bytes again with more appended; after any other result it drops `consumed` bytes from the
//! front and calls again. Because the scan position survives between calls, a 1 MiB body that
//! arrives in 4 KiB pieces is searched for its NUL once, not once per piece, and a body with a
//! `content-length` is not searched at all.
//!
//! Limits are checked as soon as the bytes that break them are visible, so a caller that
//! stops buffering on error never holds more than one limit's worth of a hostile frame.

use smallvec::SmallVec;

use super::error::{DecodeError, LimitKind};
use super::escape::{unescape, Escaping};
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
}

#[derive(Clone, Debug)]
enum State {
    /// Looking for the blank line that ends the header block.
    Head {
        /// Start of the line not yet seen whole.
        line_start: usize,
        /// How far the search for that line's LF has got.
        searched: usize,
        /// Lines seen whole so far, the command line included.
        lines: usize,
    },
    /// The header block is parsed; waiting for the body and its NUL.
    Body {
        command: Command,
        body_start: usize,
        content_length: Option<usize>,
        /// How far the search for the NUL has got (bodies without `content-length`).
        searched: usize,
    },
}

const HEAD_START: State = State::Head {
    line_start: 0,
    searched: 0,
    lines: 0,
};

/// A resumable STOMP frame decoder for one byte stream.
#[derive(Clone, Debug)]
pub struct Decoder {
    limits: Limits,
    version: Version,
    state: State,
    /// Header positions found when the header block completed, used to build the frame.
    spans: SmallVec<[HeaderSpan; HEADERS_INLINE]>,
}

impl Decoder {
    /// A decoder for a stream whose version is not yet negotiated. Before CONNECTED only
    /// CONNECT or STOMP is legal and neither escapes, so 1.2 is a safe starting point.
    pub fn new(limits: Limits) -> Decoder {
        Decoder {
            limits,
            version: Version::V1_2,
            state: HEAD_START,
            spans: SmallVec::new(),
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
        self.state = HEAD_START;
        self.spans.clear();
    }

    /// Decodes the next item at the front of `input`. See the module docs for the contract.
    pub fn decode<'a>(&mut self, input: &'a [u8]) -> Result<Decoded<'a>, DecodeError> {
        if let State::Head {
            line_start: 0,
            searched: 0,
            ..
        } = self.state
        {
            let eols = leading_eols(input);
            if eols > 0 {
                return Ok(Decoded::Heartbeat { consumed: eols });
            }
        }
        let result = self.decode_frame(input);
        if !matches!(result, Ok(Decoded::NeedMore)) {
            // After an error the stream is unusable; resetting keeps the decoder reusable
            // for a caller that starts over (and keeps stale spans from leaking into it).
            self.reset();
        }
        result
    }

    fn decode_frame<'a>(&mut self, input: &'a [u8]) -> Result<Decoded<'a>, DecodeError> {
        if let State::Head { .. } = self.state {
            if !self.scan_head(input)? {
                return Ok(Decoded::NeedMore);
            }
        }
        let State::Body {
            command,
            body_start,
            content_length,
            searched,
        } = self.state
        else {
            unreachable!("scan_head returns true only after moving to State::Body");
        };
        let body_end = match content_length {
            Some(length) => {
                let body_end = body_start + length;
                if input.len() <= body_end {
                    return Ok(Decoded::NeedMore);
                }
                if input[body_end] != 0 {
                    return Err(DecodeError::MissingNul {
                        content_length: length,
                    });
                }
                body_end
            }
            None => match memchr::memchr(0, &input[searched..]) {
                Some(position) => searched + position,
                None => {
                    self.check_body_so_far(input.len() - body_start, input.len())?;
                    self.state = State::Body {
                        command,
                        body_start,
                        content_length,
                        searched: input.len(),
                    };
                    return Ok(Decoded::NeedMore);
                }
            },
        };
        self.check_body_so_far(body_end - body_start, body_end)?;
        let frame = self.build_frame(command, input, &input[body_start..body_end])?;
        Ok(Decoded::Frame {
            frame,
            consumed: body_end + 1,
        })
    }

    /// Errors if a body of `body_bytes` (NUL not yet seen) ending at `frame_bytes` already
    /// breaks a limit; the NUL still to come makes the frame one byte longer.
    fn check_body_so_far(&self, body_bytes: usize, frame_bytes: usize) -> Result<(), DecodeError> {
        if body_bytes > self.limits.body_bytes_max {
            return Err(limit(
                LimitKind::BodyBytes,
                self.limits.body_bytes_max,
                body_bytes,
            ));
        }
        if frame_bytes + 1 > self.limits.frame_bytes_max {
            return Err(limit(
                LimitKind::FrameBytes,
                self.limits.frame_bytes_max,
                frame_bytes + 1,
            ));
        }
        Ok(())
    }

    /// Advances through whole header lines. Returns `true` once the blank line that ends the
    /// header block was found and parsed (the state is then `Body`).
    fn scan_head(&mut self, input: &[u8]) -> Result<bool, DecodeError> {
        let State::Head {
            mut line_start,
            mut searched,
            mut lines,
        } = self.state
        else {
            return Ok(true);
        };
        debug_assert!(
            searched <= input.len(),
            "decode called with fewer bytes than before"
        );
        loop {
            let Some(found) = memchr::memchr(b'\n', &input[searched..]) else {
                let partial = input.len() - line_start;
                if partial > self.limits.header_line_bytes_max {
                    return Err(limit(
                        LimitKind::HeaderLineBytes,
                        self.limits.header_line_bytes_max,
                        partial,
                    ));
                }
                if input.len() >= self.limits.frame_bytes_max {
                    return Err(limit(
                        LimitKind::FrameBytes,
                        self.limits.frame_bytes_max,
                        input.len() + 1,
                    ));
                }
                self.state = State::Head {
                    line_start,
                    searched: input.len(),
                    lines,
                };
                return Ok(false);
            };
            let line_end = searched + found; // index of the LF
            let line_bytes = line_end + 1 - line_start;
            if line_bytes > self.limits.header_line_bytes_max {
                return Err(limit(
                    LimitKind::HeaderLineBytes,
                    self.limits.header_line_bytes_max,
                    line_bytes,
                ));
            }
            let blank = line_end == line_start
                || (line_end == line_start + 1 && input[line_start] == b'\r');
            if blank && lines > 0 {
                self.parse_head(input, line_start, line_end + 1)?;
                return Ok(true);
            }
            lines += 1;
            // The command line is not a header.
            if lines - 1 > self.limits.headers_count_max {
                return Err(limit(
                    LimitKind::HeadersCount,
                    self.limits.headers_count_max,
                    lines - 1,
                ));
            }
            line_start = line_end + 1;
            searched = line_start;
            if line_start >= self.limits.frame_bytes_max {
                return Err(limit(
                    LimitKind::FrameBytes,
                    self.limits.frame_bytes_max,
                    line_start + 1,
                ));
            }
        }
    }

    /// Parses the command line and the header lines of `input[..head_end]` (which ends at
    /// the blank line), records the header spans and moves to the body state.
    fn parse_head(
        &mut self,
        input: &[u8],
        blank_start: usize,
        body_start: usize,
    ) -> Result<(), DecodeError> {
        let head = &input[..blank_start];
        let mut lines = LineIter {
            input: head,
            position: 0,
        };
        let (_, command_line) = lines
            .next()
            .expect("scan_head saw at least the command line");
        let command = Command::parse(command_line).ok_or_else(|| DecodeError::UnknownCommand {
            command: String::from_utf8_lossy(command_line).into_owned(),
        })?;
        let escaping = Escaping::for_frame(self.version, command.escapes_headers());
        let trim = self.version == Version::V1_0;
        self.spans.clear();
        let mut content_length = None;
        for (line_offset, line) in lines {
            let colon = memchr::memchr(b':', line).ok_or(DecodeError::HeaderWithoutColon {
                offset: line_offset,
            })?;
            if colon == 0 {
                return Err(DecodeError::EmptyHeaderName {
                    offset: line_offset,
                });
            }
            let (mut value_start, mut value_end) =
                (line_offset + colon + 1, line_offset + line.len());
            if trim {
                // STOMP 1.0 peers pad values ("destination: /queue/a"); 1.1 and later forbid
                // trimming (STOMP 1.2 "Value Encoding").
                while value_start < value_end && matches!(input[value_start], b' ' | b'\t') {
                    value_start += 1;
                }
                while value_end > value_start && matches!(input[value_end - 1], b' ' | b'\t') {
                    value_end -= 1;
                }
            }
            if escaping != Escaping::None && memchr::memchr(b'\\', line).is_some() {
                // Reject bad escapes now, before the body is buffered.
                unescape(
                    &input[line_offset..line_offset + colon],
                    escaping,
                    line_offset,
                )?;
                unescape(&input[value_start..value_end], escaping, value_start)?;
            }
            let name = &input[line_offset..line_offset + colon];
            if content_length.is_none() && name == b"content-length" {
                content_length = Some(self.parse_content_length(&input[value_start..value_end])?);
            }
            self.spans.push(HeaderSpan {
                name_start: line_offset,
                name_end: line_offset + colon,
                value_start,
                value_end,
            });
        }
        self.state = State::Body {
            command,
            body_start,
            content_length,
            searched: body_start,
        };
        Ok(())
    }

    fn parse_content_length(&self, value: &[u8]) -> Result<usize, DecodeError> {
        let invalid = || DecodeError::InvalidContentLength {
            value: String::from_utf8_lossy(value).into_owned(),
        };
        if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
            return Err(invalid());
        }
        let length = value
            .iter()
            .fold(0usize, |sum, digit| sum * 10 + usize::from(digit - b'0'));
        if length > self.limits.body_bytes_max {
            return Err(limit(
                LimitKind::BodyBytes,
                self.limits.body_bytes_max,
                length,
            ));
        }
        Ok(length)
    }

    fn build_frame<'a>(
        &self,
        command: Command,
        input: &'a [u8],
        body: &'a [u8],
    ) -> Result<Frame<'a>, DecodeError> {
        let escaping = Escaping::for_frame(self.version, command.escapes_headers());
        let mut headers = Headers::new();
        for span in &self.spans {
            let (name_start, value_start) = (span.name_start, span.value_start);
            let name = &input[name_start..span.name_end];
            let value = &input[value_start..span.value_end];
            headers.push(Header {
                name: unescape(name, escaping, name_start)?,
                value: unescape(value, escaping, value_start)?,
            });
        }
        Ok(Frame {
            command,
            headers,
            body,
        })
    }
}

fn limit(limit: LimitKind, max: usize, actual: usize) -> DecodeError {
    DecodeError::LimitExceeded { limit, max, actual }
}

/// How many bytes of whole EOLs (`\n` or `\r\n`) start `input`. A lone trailing `\r` is left
/// for the next call, when its `\n` has arrived.
fn leading_eols(input: &[u8]) -> usize {
    let mut index = 0;
    loop {
        match input.get(index..index + 2) {
            _ if input.get(index) == Some(&b'\n') => index += 1,
            Some(b"\r\n") => index += 2,
            _ => return index,
        }
    }
}

/// Lines of a header block with their start offsets, a trailing `\r` removed from each.
struct LineIter<'a> {
    input: &'a [u8],
    position: usize,
}

impl<'a> Iterator for LineIter<'a> {
    type Item = (usize, &'a [u8]);

    fn next(&mut self) -> Option<(usize, &'a [u8])> {
        if self.position >= self.input.len() {
            return None;
        }
        let start = self.position;
        let end = memchr::memchr(b'\n', &self.input[start..])
            .map_or(self.input.len(), |found| start + found);
        self.position = end + 1;
        let line = &self.input[start..end];
        Some((start, line.strip_suffix(b"\r").unwrap_or(line)))
    }
}
