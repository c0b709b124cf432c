//! Why a frame could not be decoded. Each variant names the rule or limit that was broken and
//! where, so the server can put it in the `message` header of the ERROR frame it sends before
//! closing the connection.

use thiserror::Error;

/// Which configured bound a frame exceeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitKind {
    FrameBytes,
    HeadersCount,
    HeaderLineBytes,
    BodyBytes,
}

impl LimitKind {
    /// The configuration name of the limit, as the operator sets it.
    pub fn name(self) -> &'static str {
        match self {
            LimitKind::FrameBytes => "frame_bytes_max",
            LimitKind::HeadersCount => "headers_count_max",
            LimitKind::HeaderLineBytes => "header_line_bytes_max",
            LimitKind::BodyBytes => "body_bytes_max",
        }
    }
}

/// A fatal decoding error: the connection's byte stream cannot be trusted past this point.
/// Offsets count from the first byte of the frame (after any heart-beat EOLs).
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// `actual` is the size known when the breach became certain: the declared size for a
    /// `content-length` or a header count, and `max + 1` for bytes still streaming in (the
    /// decoder reports a breach at the byte that made it certain, whatever arrived after).
    #[error("{} exceeded: {actual} > {max}", limit.name())]
    LimitExceeded {
        limit: LimitKind,
        max: usize,
        actual: usize,
    },
    #[error("unknown command {command:?}")]
    UnknownCommand { command: String },
    #[error("header line at offset {offset} has no ':'")]
    HeaderWithoutColon { offset: usize },
    #[error("header line at offset {offset} has an empty name")]
    EmptyHeaderName { offset: usize },
    #[error("undefined escape sequence \\{} at offset {offset}", char::from(*byte))]
    InvalidEscape { offset: usize, byte: u8 },
    #[error("invalid content-length {value:?}")]
    InvalidContentLength { value: String },
    /// A NUL octet inside a header line: it would end the frame early for any peer the header
    /// is relayed to. `name` is the header's name as far as it is readable.
    #[error("header {name:?} at offset {offset} contains a NUL octet")]
    NulInHeader { name: String, offset: usize },
    /// STOMP 1.1 and 1.2 "Value Encoding": header names and values are UTF-8.
    #[error("header {name:?} at offset {offset} is not valid UTF-8")]
    InvalidUtf8InHeader { name: String, offset: usize },
    #[error("frame body of {content_length} bytes is not followed by a NUL octet")]
    MissingNul { content_length: usize },
}
