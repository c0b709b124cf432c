//! Property tests of the codec: encode-then-decode is the identity for every frame the version
//! can carry; how the input is split never changes what is decoded; no input makes the decoder
//! panic.

use proptest::prelude::*;
use stompd::codec::testing::{decode_in_chunks, decode_one_shot, Event, OwnedFrame};
use stompd::codec::{Command, Escaping, FrameWriter, Limits, Version};

fn version() -> impl Strategy<Value = Version> {
    prop_oneof![
        Just(Version::V1_0),
        Just(Version::V1_1),
        Just(Version::V1_2)
    ]
}

fn command() -> impl Strategy<Value = Command> {
    proptest::sample::select(Command::ALL.to_vec())
}

/// Bytes with the ones that matter to framing (CR, LF, colon, backslash, NUL, blanks) common.
fn framing_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        3 => any::<u8>(),
        1 => proptest::sample::select(b"\r\n:\\\0 \t".to_vec()),
    ]
}

fn text(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(framing_byte(), 0..max)
}

/// Whether a header can travel in a frame escaped with `escaping` under `version`:
/// - 1.2 escapes CR, LF, `:` and `\`, so any name but the empty one and any value can;
/// - 1.1 cannot escape CR, and a CR that ends a value reads as part of a CRLF;
/// - unescaped frames (1.0, CONNECT/STOMP/CONNECTED) cannot hold CR or LF, nor `:` in a name,
///   and 1.0 trims blanks around values;
/// - no header holds a NUL, and escaped ones are UTF-8.
fn fits(version: Version, escaping: Escaping, name: &[u8], value: &[u8]) -> bool {
    let has = |text: &[u8], bytes: &[u8]| text.iter().any(|byte| bytes.contains(byte));
    let blank = |byte: Option<&u8>| matches!(byte, Some(b' ' | b'\t'));
    if name.is_empty() || name == b"content-length" {
        return false;
    }
    let escaped_fits = match escaping {
        Escaping::V1_2 => true,
        Escaping::V1_1 => value.last() != Some(&b'\r'),
        Escaping::None => !has(name, b"\r\n:") && !has(value, b"\r\n"),
    };
    let trim_fits = version != Version::V1_0 || !(blank(value.first()) || blank(value.last()));
    // No header may hold a NUL; escaped (1.1 and 1.2) headers must be UTF-8.
    let bytes_fit = !has(name, b"\0")
        && !has(value, b"\0")
        && (escaping == Escaping::None
            || (std::str::from_utf8(name).is_ok() && std::str::from_utf8(value).is_ok()));
    escaped_fits && trim_fits && bytes_fit
}

/// A frame that `version` can carry, with a binary body.
fn frame(version: Version) -> impl Strategy<Value = OwnedFrame> {
    (
        command(),
        proptest::collection::vec((text(12), text(24)), 0..16),
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(move |(command, headers, body)| {
            let escaping = Escaping::for_frame(version, command.escapes_headers());
            OwnedFrame {
                command,
                headers: headers
                    .into_iter()
                    .filter(|(name, value)| fits(version, escaping, name, value))
                    .collect(),
                body,
            }
        })
}

/// Encodes `frame` with a `content-length` header added last; returns the frame as it must
/// decode.
fn encode_with_length(out: &mut Vec<u8>, version: Version, frame: &OwnedFrame) -> OwnedFrame {
    let mut writer = FrameWriter::begin(out, version, frame.command);
    for (name, value) in &frame.headers {
        writer.header(name, value);
    }
    writer.content_length(frame.body.len());
    writer.finish(&frame.body);
    let mut expected = frame.clone();
    expected.headers.push((
        b"content-length".to_vec(),
        frame.body.len().to_string().into_bytes(),
    ));
    expected
}

fn version_and_frames() -> impl Strategy<Value = (Version, Vec<OwnedFrame>)> {
    version().prop_flat_map(|version| {
        (
            Just(version),
            proptest::collection::vec(frame(version), 1..5),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// "Value Encoding": encoding escapes exactly what decoding unescapes, for every frame the
    /// version can carry, with bodies holding any octets ("Header content-length").
    #[test]
    fn encode_then_decode_is_identity((version, frames) in version_and_frames()) {
        for frame in &frames {
            let mut bytes = Vec::new();
            let expected = encode_with_length(&mut bytes, version, frame);
            prop_assert_eq!(
                decode_one_shot(Limits::DEFAULT, version, &bytes),
                vec![Event::Frame(expected)]
            );
        }
    }

    /// A stream of frames and heart-beats decodes the same whole and in arbitrary pieces.
    #[test]
    fn chunked_decode_equals_one_shot(
        (version, frames) in version_and_frames(),
        heartbeats in proptest::collection::vec(0usize..3, 5),
        mut cuts in proptest::collection::vec(0usize..2048, 0..24),
    ) {
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for (frame, eols) in frames.iter().zip(heartbeats.iter().cycle()) {
            expected.push(Event::Frame(encode_with_length(&mut stream, version, frame)));
            if *eols > 0 {
                stream.extend(b"\r\n\n".iter().take(*eols + 1));
                expected.push(Event::Heartbeat(*eols + 1));
            }
        }
        cuts.sort_unstable();
        prop_assert_eq!(decode_one_shot(Limits::DEFAULT, version, &stream), expected.clone());
        prop_assert_eq!(decode_in_chunks(Limits::DEFAULT, version, &stream, cuts), expected);
    }

    /// Any bytes, under tight or default limits, whole or in pieces: no panic, and the pieces
    /// agree with the whole (errors included).
    #[test]
    fn arbitrary_bytes_never_panic(
        version in version(),
        tight in any::<bool>(),
        input in proptest::collection::vec(framing_byte(), 0..512),
        mut cuts in proptest::collection::vec(0usize..512, 0..16),
    ) {
        let limits = if tight {
            Limits { frame_bytes_max: 64, headers_count_max: 3, header_line_bytes_max: 16, body_bytes_max: 8 }
        } else {
            Limits::DEFAULT
        };
        cuts.sort_unstable();
        let whole = decode_one_shot(limits, version, &input);
        prop_assert_eq!(decode_in_chunks(limits, version, &input, cuts), whole);
    }

    /// Bytes that start as a valid frame and go wrong somewhere: the decoder must say so, not
    /// panic, and agree with itself however the bytes arrive.
    #[test]
    fn corrupted_frames_never_panic(
        (version, frames) in version_and_frames(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), framing_byte()), 1..4),
        mut cuts in proptest::collection::vec(0usize..1024, 0..16),
    ) {
        let mut stream = Vec::new();
        for frame in &frames {
            encode_with_length(&mut stream, version, frame);
        }
        for (index, byte) in flips {
            let at = index.index(stream.len());
            stream[at] = byte;
        }
        cuts.sort_unstable();
        let whole = decode_one_shot(Limits::DEFAULT, version, &stream);
        prop_assert_eq!(decode_in_chunks(Limits::DEFAULT, version, &stream, cuts), whole);
    }
}
