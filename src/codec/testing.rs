//! Checks shared by the codec's tests, its property tests and its fuzz target, so that the
//! stable test suite exercises exactly what the fuzzer checks.
//!
//! The central property: the decoder's output does not depend on how the input was split, as
//! long as the caller keeps the contract (after `NeedMore`, the same bytes plus more; after a
//! frame or a heart-beat, the bytes after `consumed`). [`decode_one_shot`] gives the decoder the
//! whole input at once, [`decode_in_chunks`] lets it arrive piece by piece through a buffer the
//! way a connection's receive buffer does; both describe the run as a list of [`Event`]s.

use super::{encode_frame, Command, DecodeError, Decoded, Decoder, Escaping, Frame, Limits};
use super::{Header, Version};

/// A decoded frame with its bytes copied out, so runs over different buffers can be compared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedFrame {
    pub command: Command,
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl OwnedFrame {
    pub fn from_frame(frame: &Frame<'_>) -> OwnedFrame {
        OwnedFrame {
            command: frame.command,
            headers: frame
                .headers
                .iter()
                .map(|header| (header.name.to_vec(), header.value.to_vec()))
                .collect(),
            body: frame.body.to_vec(),
        }
    }

    /// Borrows it back as a [`Frame`], to encode it.
    pub fn as_frame(&self) -> Frame<'_> {
        Frame {
            command: self.command,
            headers: self
                .headers
                .iter()
                .map(|(name, value)| Header::new(name, value))
                .collect(),
            body: &self.body,
        }
    }
}

/// One thing a run of the decoder produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Frame(OwnedFrame),
    /// EOL bytes between frames. Adjacent heart-beats are merged: how many calls report a run
    /// of EOLs depends on how it arrived, the number of bytes does not.
    Heartbeat(usize),
    /// The run stopped on an error.
    Error(DecodeError),
    /// The input ended inside a frame, `buffered` bytes of it kept.
    NeedMore {
        buffered: usize,
    },
}

fn push_event(events: &mut Vec<Event>, event: Event) {
    if let (Event::Heartbeat(more), Some(Event::Heartbeat(bytes))) = (&event, events.last_mut()) {
        *bytes += more;
        return;
    }
    events.push(event);
}

/// Decodes `input` given whole to a fresh decoder.
pub fn decode_one_shot(limits: Limits, version: Version, input: &[u8]) -> Vec<Event> {
    let mut decoder = Decoder::new(limits);
    decoder.set_version(version);
    let mut events = Vec::new();
    let mut position = 0;
    loop {
        match decoder.decode(&input[position..]) {
            Ok(Decoded::Frame { frame, consumed }) => {
                push_event(&mut events, Event::Frame(OwnedFrame::from_frame(&frame)));
                position += consumed;
            }
            Ok(Decoded::Heartbeat { consumed }) => {
                push_event(&mut events, Event::Heartbeat(consumed));
                position += consumed;
            }
            Ok(Decoded::NeedMore) => {
                let buffered = input.len() - position;
                if buffered > 0 {
                    events.push(Event::NeedMore { buffered });
                }
                return events;
            }
            Err(error) => {
                events.push(Event::Error(error));
                return events;
            }
        }
    }
}

/// Decodes `input` arriving in pieces that end at `cuts` (offsets into `input`, increasing; the
/// end of the input is added), through a buffer that keeps the bytes not yet consumed.
pub fn decode_in_chunks(
    limits: Limits,
    version: Version,
    input: &[u8],
    cuts: impl IntoIterator<Item = usize>,
) -> Vec<Event> {
    let mut decoder = Decoder::new(limits);
    decoder.set_version(version);
    let mut events = Vec::new();
    let mut buffer = Vec::new();
    let mut arrived = 0;
    for cut in cuts.into_iter().chain([input.len()]) {
        let cut = cut.clamp(arrived, input.len());
        buffer.extend_from_slice(&input[arrived..cut]);
        arrived = cut;
        loop {
            let (event, consumed) = match decoder.decode(&buffer) {
                Ok(Decoded::Frame { frame, consumed }) => {
                    (Event::Frame(OwnedFrame::from_frame(&frame)), consumed)
                }
                Ok(Decoded::Heartbeat { consumed }) => (Event::Heartbeat(consumed), consumed),
                Ok(Decoded::NeedMore) => break,
                Err(error) => {
                    events.push(Event::Error(error));
                    return events;
                }
            };
            push_event(&mut events, event);
            buffer.drain(..consumed);
        }
    }
    if !buffer.is_empty() {
        events.push(Event::NeedMore {
            buffered: buffer.len(),
        });
    }
    events
}

/// Decodes `input` whole, then split in two at every point, then byte by byte, and panics
/// (naming the split) unless every run gives the same events. Returns the events.
pub fn assert_same_at_every_split(limits: Limits, version: Version, input: &[u8]) -> Vec<Event> {
    let whole = decode_one_shot(limits, version, input);
    for split in 0..=input.len() {
        let split_run = decode_in_chunks(limits, version, input, [split]);
        assert_eq!(
            split_run,
            whole,
            "input split at {split} decodes differently from the whole input {:?}",
            String::from_utf8_lossy(input)
        );
    }
    let bytewise = decode_in_chunks(limits, version, input, 1..input.len());
    assert_eq!(
        bytewise,
        whole,
        "input fed byte by byte decodes differently from the whole input {:?}",
        String::from_utf8_lossy(input)
    );
    whole
}

/// Whether `frame` survives encoding under `escaping` unchanged. What cannot: without escaping,
/// a CR in a name or value (the encoder writes a space); in 1.1, a value ending in CR (the
/// decoder takes it for part of a CRLF); in 1.0, a value starting or ending with blanks (1.0
/// trims them).
pub fn representable(frame: &OwnedFrame, escaping: Escaping, version: Version) -> bool {
    frame.headers.iter().all(|(name, value)| {
        let no_cr_lf = |text: &[u8]| !text.iter().any(|&byte| byte == b'\r' || byte == b'\n');
        let fits = match escaping {
            Escaping::None => no_cr_lf(name) && no_cr_lf(value) && !name.contains(&b':'),
            Escaping::V1_1 => value.last() != Some(&b'\r'),
            Escaping::V1_2 => true,
        };
        let blank = |byte: Option<&u8>| matches!(byte, Some(b' ' | b'\t'));
        let trimmed = version != Version::V1_0 || !(blank(value.first()) || blank(value.last()));
        fits && trimmed && !name.is_empty()
    })
}

/// Encodes each frame and decodes the bytes again. A representable frame must come back
/// unchanged; any frame must come back as one frame with the same command, body and number of
/// headers, so that nothing a peer sent can add headers or frames when relayed.
pub fn assert_reencodes(version: Version, frames: &[OwnedFrame]) {
    let relaxed = Limits {
        frame_bytes_max: usize::MAX,
        headers_count_max: usize::MAX,
        header_line_bytes_max: usize::MAX,
        body_bytes_max: usize::MAX,
    };
    for frame in frames {
        let mut bytes = Vec::new();
        encode_frame(&mut bytes, version, &frame.as_frame());
        let events = decode_one_shot(relaxed, version, &bytes);
        let [Event::Frame(again)] = events.as_slice() else {
            panic!(
                "re-encoding {frame:?} as {:?} decoded to {events:?}",
                String::from_utf8_lossy(&bytes)
            );
        };
        let escaping = Escaping::for_frame(version, frame.command.escapes_headers());
        if representable(frame, escaping, version) {
            assert_eq!(again, frame, "re-encoded frame differs");
        } else {
            assert_eq!(
                (again.command, again.headers.len(), &again.body),
                (frame.command, frame.headers.len(), &frame.body),
                "re-encoding an unrepresentable frame changed its structure"
            );
        }
    }
}

/// The fuzz target's check, also run by the stable tests. The first four bytes choose the run:
/// byte 0 the version and the limits (default, small or none), bytes 1 to 3 the sizes of the pieces the
/// rest arrives in. Checks that chunked and whole decoding agree and that every decoded frame
/// re-encodes to itself.
pub fn check_decode_input(data: &[u8]) {
    let Some((&[flags, a, b, c], input)) = data.split_first_chunk::<4>() else {
        return;
    };
    let version = match flags & 3 {
        0 => Version::V1_0,
        1 => Version::V1_1,
        _ => Version::V1_2,
    };
    let limits = match (flags >> 2) & 3 {
        // Small limits, so that breaches happen in short inputs.
        2 => Limits {
            frame_bytes_max: 16 + usize::from(a),
            headers_count_max: usize::from(b % 8),
            header_line_bytes_max: 4 + usize::from(c % 64),
            body_bytes_max: usize::from(flags >> 4),
        },
        // No limits at all, so that sizes near usize::MAX reach the arithmetic.
        3 => Limits {
            frame_bytes_max: usize::MAX,
            headers_count_max: usize::MAX,
            header_line_bytes_max: usize::MAX,
            body_bytes_max: usize::MAX,
        },
        _ => Limits::DEFAULT,
    };
    let whole = decode_one_shot(limits, version, input);
    let sizes = [a, b, c].map(|size| usize::from(size % 32) + 1);
    let mut cuts = Vec::new();
    let mut at = 0;
    for size in sizes.iter().cycle() {
        at += size;
        if at >= input.len() {
            break;
        }
        cuts.push(at);
    }
    let chunked = decode_in_chunks(limits, version, input, cuts);
    assert_eq!(
        chunked, whole,
        "chunked decoding differs from whole decoding"
    );
    let frames: Vec<OwnedFrame> = whole
        .into_iter()
        .filter_map(|event| match event {
            Event::Frame(frame) => Some(frame),
            _ => None,
        })
        .collect();
    assert_reencodes(version, &frames);
}
