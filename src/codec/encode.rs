//! The encoder: frames into a caller's reusable buffer, escaped for the negotiated version.
//!
//! Two ways in. [`encode_frame`] writes a whole [`Frame`] as it is. [`FrameWriter`] writes a
//! frame piece by piece, including a header block encoded earlier ([`FrameWriter::raw_headers`])
//! and a head without its body ([`FrameWriter::finish_head`]), which is how the broker builds a
//! MESSAGE: per-delivery headers, then the headers stored with the message, then the stored body
//! handed to the socket as its own slice, never copied into the frame.

use super::escape::{escape_into, escape_name_into, Escaping};
use super::frame::{Command, Frame, Header, Version};

/// Appends `frame` to `out`, escaping headers as `version` and the command require. Headers go
/// out exactly as given: no `content-length` is added (use [`FrameWriter::content_length`]).
pub fn encode_frame(out: &mut Vec<u8>, version: Version, frame: &Frame<'_>) {
    let mut writer = FrameWriter::begin(out, version, frame.command);
    for header in &frame.headers {
        writer.header(&header.name, &header.value);
    }
    writer.finish(frame.body);
}

/// Appends `name:value\n` lines for `headers`, escaped with `escaping`: a block to store with a
/// message and splice into each MESSAGE later with [`FrameWriter::raw_headers`].
pub fn encode_header_block<'h>(
    out: &mut Vec<u8>,
    escaping: Escaping,
    headers: impl IntoIterator<Item = &'h Header<'h>>,
) {
    for header in headers {
        write_header(out, escaping, &header.name, &header.value);
    }
}

fn write_header(out: &mut Vec<u8>, escaping: Escaping, name: &[u8], value: &[u8]) {
    escape_name_into(out, name, escaping);
    out.push(b':');
    escape_into(out, value, escaping);
    out.push(b'\n');
}

/// Writes one frame into a buffer, field by field.
pub struct FrameWriter<'o> {
    out: &'o mut Vec<u8>,
    escaping: Escaping,
}

impl<'o> FrameWriter<'o> {
    /// Writes the command line.
    pub fn begin(out: &'o mut Vec<u8>, version: Version, command: Command) -> FrameWriter<'o> {
        out.extend_from_slice(command.as_bytes());
        out.push(b'\n');
        FrameWriter {
            out,
            escaping: Escaping::for_frame(version, command.escapes_headers()),
        }
    }

    /// The escaping this frame's headers get, for building a matching raw header block.
    pub fn escaping(&self) -> Escaping {
        self.escaping
    }

    pub fn header(&mut self, name: &[u8], value: &[u8]) -> &mut Self {
        write_header(self.out, self.escaping, name, value);
        self
    }

    /// A header whose value is a decimal number, formatted without allocating.
    pub fn header_u64(&mut self, name: &[u8], value: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let text = format_u64(value, &mut digits);
        self.header(name, text)
    }

    pub fn content_length(&mut self, length: usize) -> &mut Self {
        self.header_u64(b"content-length", length as u64)
    }

    /// Splices in header lines that were encoded earlier, with the same escaping, by
    /// [`encode_header_block`]. They are copied as they are.
    pub fn raw_headers(&mut self, block: &[u8]) -> &mut Self {
        debug_assert!(
            block.is_empty() || block.ends_with(b"\n"),
            "a header block ends with an EOL"
        );
        self.out.extend_from_slice(block);
        self
    }

    /// Ends the header block. The caller sends the body and a NUL after these bytes itself.
    pub fn finish_head(self) {
        self.out.push(b'\n');
    }

    /// Ends the header block and writes the body and the NUL.
    pub fn finish(self, body: &[u8]) {
        self.out.push(b'\n');
        self.out.extend_from_slice(body);
        self.out.push(0);
    }
}

/// Formats `value` in decimal into the end of `buffer`, returning the digits.
pub fn format_u64(value: u64, buffer: &mut [u8; 20]) -> &[u8] {
    let mut digits = itoa::Buffer::new();
    let text = digits.format(value).as_bytes();
    let start = buffer.len() - text.len();
    buffer[start..].copy_from_slice(text);
    &buffer[start..]
}
