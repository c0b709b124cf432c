//! The STOMP codec: frames from bytes and bytes from frames, with no I/O.
//!
//! Everything here works on byte slices and caller-owned buffers, so the same code serves the
//! io_uring server, the load generator and the log tool, and every rule can be tested with
//! plain byte strings. The decoder ([`Decoder`]) is incremental and zero-copy: a [`Frame`]
//! borrows its command, headers and body from the input. The encoder ([`encode_frame`],
//! [`FrameWriter`]) appends to a reusable `Vec<u8>`.
//!
//! The rules follow the STOMP 1.2 specification, section "STOMP Frames" and "Augmented BNF",
//! with what 1.0 and 1.1 peers send: LF or CRLF line ends, EOLs between frames as heart-beats,
//! `content-length` bodies that may hold NULs, repeated headers (first wins), and header
//! escaping per version ([`escape`]).

mod decode;
mod encode;
mod error;
pub mod escape;
mod frame;
mod limits;
// Shared by the tests and the fuzz target (fuzz/), which is a separate crate and can only
// reach what the library exports.
#[doc(hidden)]
pub mod testing;

pub use decode::{Decoded, Decoder};
pub use encode::{encode_frame, encode_header_block, format_u64, FrameWriter};
pub use error::{DecodeError, LimitKind};
pub use escape::Escaping;
pub use frame::{Command, Frame, Header, Headers, Version, HEADERS_INLINE};
pub use limits::Limits;
