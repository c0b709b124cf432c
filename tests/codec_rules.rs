//! One test per framing rule of the STOMP specification, each naming its section (1.2 unless
//! said otherwise). Every decoder test goes through [`decode`], which decodes the input whole,
//! split in two at every point and byte by byte, and checks that all runs agree (STYLE.md 10).

use stompd::codec::testing::{assert_same_at_every_split, decode_one_shot, Event, OwnedFrame};
use stompd::codec::{
    encode_frame, encode_header_block, Command, DecodeError, Decoded, Decoder, Escaping, Frame,
    FrameWriter, Header, LimitKind, Limits, Version,
};

/// Decodes `input` under default limits at every split point; returns what the runs agreed on.
fn decode(version: Version, input: &[u8]) -> Vec<Event> {
    assert_same_at_every_split(Limits::DEFAULT, version, input)
}

fn decode_limited(limits: Limits, input: &[u8]) -> Vec<Event> {
    assert_same_at_every_split(limits, Version::V1_2, input)
}

fn frame(command: Command, headers: &[(&[u8], &[u8])], body: &[u8]) -> Event {
    Event::Frame(OwnedFrame {
        command,
        headers: headers
            .iter()
            .map(|(name, value)| (name.to_vec(), value.to_vec()))
            .collect(),
        body: body.to_vec(),
    })
}

/// The single frame `input` holds.
fn only_frame(version: Version, input: &[u8]) -> OwnedFrame {
    match decode(version, input).as_slice() {
        [Event::Frame(frame)] => frame.clone(),
        other => panic!("expected one frame, got {other:?}"),
    }
}

/// The error `input` ends in, after any frames before it.
fn error_of(version: Version, input: &[u8]) -> DecodeError {
    error_in(decode(version, input))
}

fn error_in(events: Vec<Event>) -> DecodeError {
    match events.last() {
        Some(Event::Error(error)) => error.clone(),
        other => panic!("expected an error, got {other:?} in {events:?}"),
    }
}

fn breach(limit: LimitKind, max: usize, actual: usize) -> Event {
    Event::Error(DecodeError::LimitExceeded { limit, max, actual })
}

/// Default limits with one or more replaced.
fn limits(frame: usize, count: usize, line: usize, body: usize) -> Limits {
    Limits {
        frame_bytes_max: frame,
        headers_count_max: count,
        header_line_bytes_max: line,
        body_bytes_max: body,
    }
}

const ALL: [Version; 3] = [Version::V1_0, Version::V1_1, Version::V1_2];

// ---- STOMP Frames ----------------------------------------------------------------------------

/// "STOMP Frames": all commands and header names are case sensitive.
#[test]
fn stomp_frames_commands_are_case_sensitive() {
    for version in ALL {
        assert_eq!(
            decode(version, b"SEND\n\n\0"),
            [frame(Command::Send, &[], b"")]
        );
        assert_eq!(
            error_of(version, b"send\n\n\0"),
            DecodeError::UnknownCommand {
                command: "send".into()
            }
        );
        assert_eq!(
            error_of(version, b"Send\n\n\0"),
            DecodeError::UnknownCommand {
                command: "Send".into()
            }
        );
    }
}

/// "STOMP Frames": header names are case sensitive too; `Content-Length` is not
/// `content-length`, so it does not delimit the body.
#[test]
fn stomp_frames_header_names_are_case_sensitive() {
    let frame = only_frame(Version::V1_2, b"SEND\nContent-Length:5\n\nab\0");
    assert_eq!(frame.body, b"ab");
    assert_eq!(frame.as_frame().header(b"content-length"), None);
    assert_eq!(frame.as_frame().header(b"Content-Length"), Some(&b"5"[..]));
}

/// "Augmented BNF": every command of client-command and server-command decodes; anything else
/// is an error, reported as soon as the command line is whole.
#[test]
fn augmented_bnf_unknown_command_is_an_error() {
    for command in Command::ALL {
        let mut input = command.as_bytes().to_vec();
        input.extend_from_slice(b"\n\n\0");
        assert_eq!(decode(Version::V1_2, &input), [frame(command, &[], b"")]);
    }
    let unknown = DecodeError::UnknownCommand {
        command: "SENDX".into(),
    };
    assert_eq!(error_of(Version::V1_2, b"SENDX\n\n\0"), unknown);
    // Rejected from the command line alone, before any header arrives.
    assert_eq!(decode(Version::V1_2, b"SENDX\n"), [Event::Error(unknown)]);
    assert_eq!(
        decode(Version::V1_2, b"SENDX"),
        [Event::NeedMore { buffered: 5 }]
    );
}

/// "STOMP Frames": an EOL is a LF.
#[test]
fn stomp_frames_lf_line_ends() {
    assert_eq!(
        decode(
            Version::V1_2,
            b"SEND\ndestination:/queue/a\nreceipt:7\n\nhello\0"
        ),
        [frame(
            Command::Send,
            &[(b"destination", b"/queue/a"), (b"receipt", b"7")],
            b"hello"
        )]
    );
}

/// "STOMP Frames": an EOL is an optional CR then a LF; CRLF and LF may be mixed, and the CR
/// belongs to neither the command nor the value.
#[test]
fn stomp_frames_crlf_line_ends() {
    let expected = [frame(
        Command::Send,
        &[(b"destination", b"/queue/a"), (b"receipt", b"7")],
        b"hello\r\n",
    )];
    assert_eq!(
        decode(
            Version::V1_2,
            b"SEND\r\ndestination:/queue/a\r\nreceipt:7\r\n\r\nhello\r\n\0"
        ),
        expected
    );
    assert_eq!(
        decode(
            Version::V1_2,
            b"SEND\r\ndestination:/queue/a\nreceipt:7\r\n\nhello\r\n\0"
        ),
        expected
    );
}

/// "STOMP Frames" (the NUL "can be optionally followed by multiple EOLs") and "Heart-beating"
/// (an EOL is a heart-beat): EOLs before, between and after frames are reported as
/// heart-beats, LF or CRLF.
#[test]
fn heart_beating_eols_between_frames() {
    assert_eq!(
        decode(Version::V1_2, b"\n\r\n\nSEND\n\na\0\r\n\nSEND\n\nb\0\n\r\n"),
        [
            Event::Heartbeat(4),
            frame(Command::Send, &[], b"a"),
            Event::Heartbeat(3),
            frame(Command::Send, &[], b"b"),
            Event::Heartbeat(3),
        ]
    );
    assert_eq!(decode(Version::V1_2, b"\n"), [Event::Heartbeat(1)]);
    assert_eq!(decode(Version::V1_2, b"\r\n"), [Event::Heartbeat(2)]);
}

/// "Heart-beating": a CR is an EOL only with its LF. A lone CR waits for the next byte; a CR
/// followed by anything else starts a (bad) command line.
#[test]
fn heart_beating_cr_without_lf_is_not_an_eol() {
    assert_eq!(
        decode(Version::V1_2, b"\r"),
        [Event::NeedMore { buffered: 1 }]
    );
    assert_eq!(
        decode(Version::V1_2, b"\n\r"),
        [Event::Heartbeat(1), Event::NeedMore { buffered: 1 }]
    );
    assert_eq!(
        error_of(Version::V1_2, b"\rSEND\n\n\0"),
        DecodeError::UnknownCommand {
            command: "\rSEND".into()
        }
    );
}

/// "Header content-length": that many octets are read "regardless of whether or not there are
/// NULL octets in the body", and the NUL still follows.
#[test]
fn content_length_body_may_contain_nuls() {
    assert_eq!(
        decode(
            Version::V1_2,
            b"SEND\ncontent-length:5\n\na\0b\0c\0SEND\ncontent-length:0\n\n\0"
        ),
        [
            frame(Command::Send, &[(b"content-length", b"5")], b"a\0b\0c"),
            frame(Command::Send, &[(b"content-length", b"0")], b""),
        ]
    );
}

/// "STOMP Frames" / 1.0 SEND: without `content-length` the first NUL ends the body.
#[test]
fn body_without_content_length_ends_at_first_nul() {
    assert_eq!(
        decode(Version::V1_2, b"SEND\n\nab\0SEND\n\ncd\0"),
        [
            frame(Command::Send, &[], b"ab"),
            frame(Command::Send, &[], b"cd"),
        ]
    );
}

/// "Header content-length": "the frame still needs to be terminated with a NULL octet".
#[test]
fn content_length_with_missing_nul_is_an_error() {
    assert_eq!(
        error_of(Version::V1_2, b"SEND\ncontent-length:2\n\nabc\0"),
        DecodeError::MissingNul { content_length: 2 }
    );
}

/// "Header content-length": an octet count is decimal digits; anything else is an error, and
/// a count too large for memory is a body limit breach.
#[test]
fn content_length_invalid_values_are_errors() {
    for value in ["", "-1", "+1", " 1", "1 ", "1a", "0x10", "1.0", "١"] {
        let input = format!("SEND\ncontent-length:{value}\n\n\0");
        assert_eq!(
            error_of(Version::V1_2, input.as_bytes()),
            DecodeError::InvalidContentLength {
                value: value.into()
            },
            "content-length:{value}"
        );
    }
    let huge = "9".repeat(40);
    assert_eq!(
        decode(
            Version::V1_2,
            format!("SEND\ncontent-length:{huge}\n").as_bytes()
        ),
        [breach(
            LimitKind::BodyBytes,
            Limits::DEFAULT.body_bytes_max,
            usize::MAX
        )]
    );
    // Leading zeros are still a decimal number.
    let frame = only_frame(Version::V1_2, b"SEND\ncontent-length:0002\n\nab\0");
    assert_eq!(frame.body, b"ab");
}

/// "Repeated Header Entries": the first entry is the value; later ones are kept in order. The
/// first `content-length` is the one that delimits the body.
#[test]
fn repeated_headers_first_wins_all_kept() {
    let frame = only_frame(
        Version::V1_2,
        b"MESSAGE\nfoo:World\nfoo:Hello\ncontent-length:1\ncontent-length:3\n\nx\0",
    );
    assert_eq!(frame.as_frame().header(b"foo"), Some(&b"World"[..]));
    assert_eq!(
        frame.headers,
        [
            (b"foo".to_vec(), b"World".to_vec()),
            (b"foo".to_vec(), b"Hello".to_vec()),
            (b"content-length".to_vec(), b"1".to_vec()),
            (b"content-length".to_vec(), b"3".to_vec()),
        ]
    );
    assert_eq!(frame.body, b"x");
}

// ---- Value Encoding ---------------------------------------------------------------------------

/// "Value Encoding" (1.2): `\r`, `\n`, `\c` and `\\` decode to CR, LF, `:` and `\`, in names
/// and values.
#[test]
fn value_encoding_1_2_escapes() {
    let frame = only_frame(
        Version::V1_2,
        b"MESSAGE\na\\cb\\\\:x\\ny\\rz\\\\\\c\nplain:v\n\n\0",
    );
    assert_eq!(
        frame.headers,
        [
            (b"a:b\\".to_vec(), b"x\ny\rz\\:".to_vec()),
            (b"plain".to_vec(), b"v".to_vec()),
        ]
    );
}

/// "Value Encoding": "Undefined escape sequences such as \t MUST be treated as a fatal protocol
/// error", in a name or a value, and a lone trailing backslash too. The error comes as soon as
/// the header line is whole, before the body arrives.
#[test]
fn value_encoding_undefined_escape_is_an_error() {
    assert_eq!(
        error_of(Version::V1_2, b"SEND\nh:a\\tb\n\n\0"),
        DecodeError::InvalidEscape {
            offset: 8,
            byte: b't'
        }
    );
    assert_eq!(
        error_of(Version::V1_2, b"SEND\nh\\x:v\n\n\0"),
        DecodeError::InvalidEscape {
            offset: 6,
            byte: b'x'
        }
    );
    assert_eq!(
        error_of(Version::V1_2, b"SEND\nh:v\\\n\n\0"),
        DecodeError::InvalidEscape {
            offset: 8,
            byte: b'\\'
        }
    );
    assert!(matches!(
        decode(Version::V1_2, b"SEND\nh:a\\tb\n").as_slice(),
        [Event::Error(DecodeError::InvalidEscape { .. })]
    ));
}

/// "Value Encoding": CONNECT and CONNECTED (and STOMP, its alias) are never escaped, whatever
/// the version, so backslashes and colons are taken as they are.
#[test]
fn value_encoding_connect_and_connected_are_not_escaped() {
    for version in ALL {
        for command in ["CONNECT", "STOMP", "CONNECTED"] {
            let input = format!("{command}\npasscode:a\\tb\\c:d\n\n\0");
            let frame = only_frame(version, input.as_bytes());
            assert_eq!(
                frame.headers,
                [(b"passcode".to_vec(), b"a\\tb\\c:d".to_vec())],
                "{command} in {version}"
            );
        }
    }
}

/// "Value Encoding" (1.1): `\n`, `\c` and `\\` are defined; `\r` is not (1.1 names it as its
/// example of an undefined escape), so it is a fatal error there.
#[test]
fn value_encoding_1_1_has_no_cr_escape() {
    let frame = only_frame(Version::V1_1, b"SEND\nh:a\\nb\\cc\\\\d\n\n\0");
    assert_eq!(frame.headers, [(b"h".to_vec(), b"a\nb:c\\d".to_vec())]);
    assert_eq!(
        error_of(Version::V1_1, b"SEND\nh:a\\rb\n\n\0"),
        DecodeError::InvalidEscape {
            offset: 8,
            byte: b'r'
        }
    );
}

/// STOMP 1.0 has no escaping: backslashes are data. 1.0 peers pad values ("login: <username>"
/// in the 1.0 spec), so 1.0 values are trimmed of spaces and tabs.
#[test]
fn stomp_1_0_no_escaping_and_values_trimmed() {
    let frame = only_frame(
        Version::V1_0,
        b"SEND\ndestination: /queue/a \nh:a\\tb\\c\n\t:\t\n\n\0",
    );
    assert_eq!(
        frame.headers,
        [
            (b"destination".to_vec(), b"/queue/a".to_vec()),
            (b"h".to_vec(), b"a\\tb\\c".to_vec()),
            (b"\t".to_vec(), b"".to_vec()),
        ]
    );
}

/// "Value Encoding": 1.1 and 1.2 "MUST never trim or pad headers with spaces".
#[test]
fn value_encoding_1_1_and_1_2_do_not_trim() {
    for version in [Version::V1_1, Version::V1_2] {
        let frame = only_frame(version, b"SEND\n h : v \n\n\0");
        assert_eq!(frame.headers, [(b" h ".to_vec(), b" v ".to_vec())]);
    }
}

/// "Value Encoding" (1.1, 1.2): "The commands and header names and values MUST be encoded as
/// UTF-8". A header that is not is a fatal error naming it; 1.0 has no such rule, and CONNECT
/// (whose version is not agreed yet) is not checked.
#[test]
fn value_encoding_headers_must_be_utf8_from_1_1() {
    for version in [Version::V1_1, Version::V1_2] {
        assert_eq!(
            error_of(
                version,
                b"SEND\ndestination:/queue/a\nx-latin:caf\xe9\n\n\0"
            ),
            DecodeError::InvalidUtf8InHeader {
                name: "x-latin".into(),
                offset: 26
            }
        );
        assert_eq!(
            error_of(version, b"SEND\nx-\xff:1\n\n\0"),
            DecodeError::InvalidUtf8InHeader {
                name: "x-\u{fffd}".into(),
                offset: 5
            }
        );
        // A UTF-8 sequence cut by the end of the line is invalid too.
        assert!(matches!(
            error_of(version, b"SEND\nx:\xe2\x82\n\n\0"),
            DecodeError::InvalidUtf8InHeader { .. }
        ));
        assert_eq!(
            decode(version, "SEND\nx-caf\u{e9}:\u{20ac}5\n\n\0".as_bytes()),
            [frame(
                Command::Send,
                &[("x-caf\u{e9}".as_bytes(), "\u{20ac}5".as_bytes())],
                b""
            )]
        );
        assert_eq!(
            decode(version, b"CONNECT\nlogin:caf\xe9\n\n\0"),
            [frame(Command::Connect, &[(b"login", b"caf\xe9")], b"")]
        );
    }
    assert_eq!(
        decode(Version::V1_0, b"SEND\nx-latin:caf\xe9\n\n\0"),
        [frame(Command::Send, &[(b"x-latin", b"caf\xe9")], b"")]
    );
}

/// "Augmented BNF": a header value is any OCTET but CR, LF, `:` and NUL ("OCTET* minus NULL"
/// in the frame's sense: the NUL ends the frame). A NUL inside a header line would end the
/// frame early for every peer it is relayed to, so it is a fatal error naming the header, in
/// every version and every command.
#[test]
fn augmented_bnf_a_nul_in_a_header_is_an_error() {
    for version in ALL {
        assert_eq!(
            error_of(
                version,
                b"SEND\ndestination:/queue/a\nx-trace:ab\0cd\n\nbody\0"
            ),
            DecodeError::NulInHeader {
                name: "x-trace".into(),
                offset: 26
            }
        );
        assert_eq!(
            error_of(version, b"SEND\nx\0y:1\n\n\0"),
            DecodeError::NulInHeader {
                name: "x\0y".into(),
                offset: 5
            }
        );
        assert_eq!(
            error_of(version, b"CONNECT\npasscode:\0\n\n\0"),
            DecodeError::NulInHeader {
                name: "passcode".into(),
                offset: 8
            }
        );
    }
}

// ---- Augmented BNF: header ------------------------------------------------------------------

/// "Augmented BNF": header = header-name ":" header-value. A line without a colon is an error.
#[test]
fn augmented_bnf_header_without_colon_is_an_error() {
    for version in ALL {
        assert_eq!(
            error_of(version, b"SEND\na:1\nnocolon\n\n\0"),
            DecodeError::HeaderWithoutColon { offset: 9 }
        );
    }
}

/// "Augmented BNF": header-name = 1*<octet>, so an empty name is an error.
#[test]
fn augmented_bnf_empty_header_name_is_an_error() {
    for version in ALL {
        assert_eq!(
            error_of(version, b"SEND\n:v\n\n\0"),
            DecodeError::EmptyHeaderName { offset: 5 }
        );
    }
}

/// "Augmented BNF" excludes `:` from header-value, but the name ends at the first colon, and
/// real peers put unescaped colons in values (URLs, CONNECT passcodes); the rest of the line is
/// the value, as ActiveMQ and RabbitMQ read it.
#[test]
fn augmented_bnf_colon_inside_value_is_kept() {
    for version in ALL {
        let frame = only_frame(version, b"SEND\nreply-to:tcp://host:61613\n\n\0");
        assert_eq!(
            frame.headers,
            [(b"reply-to".to_vec(), b"tcp://host:61613".to_vec())]
        );
    }
}

// ---- Size Limits ------------------------------------------------------------------------------

/// "Size Limits": a frame of exactly `frame_bytes_max` bytes (NUL included) is accepted; one
/// more byte is a breach, with or without `content-length`.
#[test]
fn size_limits_frame_bytes() {
    let limits = limits(20, 100, 1000, 1000);
    let at_limit = b"SEND\n\n0123456789abc\0";
    assert_eq!(at_limit.len(), 20);
    assert_eq!(
        decode_limited(limits, at_limit),
        [frame(Command::Send, &[], b"0123456789abc")]
    );
    assert_eq!(
        decode_limited(limits, b"SEND\n\n0123456789abcd\0"),
        [breach(LimitKind::FrameBytes, 20, 21)]
    );
    let limits = self::limits(30, 100, 1000, 1000);
    let at_limit = b"SEND\ncontent-length:6\n\nab\0de\0\0";
    assert_eq!(at_limit.len(), 30);
    assert_eq!(
        decode_limited(limits, at_limit),
        [frame(
            Command::Send,
            &[(b"content-length", b"6")],
            b"ab\0de\0"
        )]
    );
    assert_eq!(
        decode_limited(limits, b"SEND\ncontent-length:7\n\nab\0de\0f\0"),
        [breach(LimitKind::FrameBytes, 30, 31)]
    );
}

/// "Size Limits": `headers_count_max` headers are accepted, one more is a breach.
#[test]
fn size_limits_headers_count() {
    let limits = limits(1000, 2, 1000, 1000);
    assert_eq!(
        decode_limited(limits, b"SEND\na:1\nb:2\n\n\0"),
        [frame(Command::Send, &[(b"a", b"1"), (b"b", b"2")], b"")]
    );
    assert_eq!(
        decode_limited(limits, b"SEND\na:1\nb:2\nc:3\n\n\0"),
        [breach(LimitKind::HeadersCount, 2, 3)]
    );
}

/// "Size Limits": a header line of `header_line_bytes_max` bytes, EOL included, is accepted;
/// one more is a breach. The command line counts as a line.
#[test]
fn size_limits_header_line_bytes() {
    let limits = limits(1000, 100, 16, 1000);
    let line = b"h:0123456789abc\n";
    assert_eq!(line.len(), 16);
    assert_eq!(
        decode_limited(limits, b"SEND\nh:0123456789abc\n\n\0"),
        [frame(Command::Send, &[(b"h", b"0123456789abc")], b"")]
    );
    assert_eq!(
        decode_limited(limits, b"SEND\nh:0123456789ab\r\n\n\0"),
        [frame(Command::Send, &[(b"h", b"0123456789ab")], b"")]
    );
    assert_eq!(
        decode_limited(limits, b"SEND\nh:0123456789abcd\n\n\0"),
        [breach(LimitKind::HeaderLineBytes, 16, 17)]
    );
    let limits = self::limits(1000, 100, 10, 1000);
    assert_eq!(
        decode_limited(limits, b"SUBSCRIBE\n\n\0"),
        [frame(Command::Subscribe, &[], b"")]
    );
    assert_eq!(
        decode_limited(limits, b"UNSUBSCRIBE\n\n\0"),
        [breach(LimitKind::HeaderLineBytes, 10, 11)]
    );
}

/// "Size Limits": a body of `body_bytes_max` bytes is accepted, one more is a breach, with or
/// without `content-length`.
#[test]
fn size_limits_body_bytes() {
    let limits = limits(1000, 100, 1000, 4);
    assert_eq!(
        decode_limited(limits, b"SEND\n\nabcd\0"),
        [frame(Command::Send, &[], b"abcd")]
    );
    assert_eq!(
        decode_limited(limits, b"SEND\n\nabcde\0"),
        [breach(LimitKind::BodyBytes, 4, 5)]
    );
    assert_eq!(
        decode_limited(limits, b"SEND\ncontent-length:4\n\na\0cd\0"),
        [frame(Command::Send, &[(b"content-length", b"4")], b"a\0cd")]
    );
    assert_eq!(
        decode_limited(limits, b"SEND\ncontent-length:5\n\na\0cde\0"),
        [breach(LimitKind::BodyBytes, 4, 5)]
    );
}

/// "Size Limits": breaches are caught before the oversized frame has arrived, so a caller
/// never buffers more than a limit's worth: a `content-length` over the body or frame limit
/// from its header line alone; a header line, a body or a frame that never ends as soon as it
/// has passed its limit.
#[test]
fn size_limits_breach_detected_before_the_frame_arrives() {
    let body_limited = limits(1 << 20, 100, 1000, 100);
    assert_eq!(
        decode_limited(body_limited, b"SEND\ncontent-length:101\n"),
        [breach(LimitKind::BodyBytes, 100, 101)]
    );
    let frame_limited = limits(100, 100, 1000, 1 << 20);
    assert_eq!(
        decode_limited(frame_limited, b"SEND\ncontent-length:100\n"),
        [breach(LimitKind::FrameBytes, 100, 126)]
    );

    // A header line with no end: NeedMore up to the limit, the breach the byte after.
    let line_limited = limits(1 << 20, 100, 16, 1 << 20);
    let mut endless = b"SEND\nh:".to_vec();
    endless.resize(5 + 15, b'x');
    assert_eq!(
        decode_one_shot(line_limited, Version::V1_2, &endless),
        [Event::NeedMore { buffered: 20 }]
    );
    endless.push(b'x');
    assert_eq!(
        decode_limited(line_limited, &endless),
        [breach(LimitKind::HeaderLineBytes, 16, 17)]
    );

    // A body without content-length and without its NUL.
    let mut endless = b"SEND\n\n".to_vec();
    endless.resize(6 + 100, b'x');
    assert_eq!(
        decode_one_shot(body_limited, Version::V1_2, &endless),
        [Event::NeedMore { buffered: 106 }]
    );
    endless.push(b'x');
    assert_eq!(
        decode_limited(body_limited, &endless),
        [breach(LimitKind::BodyBytes, 100, 101)]
    );

    // A frame that outgrows the frame limit in its body, and in its head.
    let mut endless = b"SEND\n\n".to_vec();
    endless.resize(99, b'x');
    assert_eq!(
        decode_one_shot(frame_limited, Version::V1_2, &endless),
        [Event::NeedMore { buffered: 99 }]
    );
    endless.push(b'x');
    assert_eq!(
        decode_limited(frame_limited, &endless),
        [breach(LimitKind::FrameBytes, 100, 101)]
    );
    let mut head = b"SEND\n".to_vec();
    while head.len() < 100 {
        head.extend_from_slice(b"h:v\n");
    }
    assert_eq!(
        decode_limited(frame_limited, &head),
        [breach(LimitKind::FrameBytes, 100, 101)]
    );
}

/// "Size Limits" with every limit switched off (`usize::MAX`): a `content-length` too large
/// for memory is still refused rather than overflowing the body's end offset.
#[test]
fn size_limits_unlimited_still_refuses_impossible_content_length() {
    let unlimited = limits(usize::MAX, usize::MAX, usize::MAX, usize::MAX);
    let input = format!("SEND\ncontent-length:{}\n\n", usize::MAX - 10);
    assert_eq!(
        decode_limited(unlimited, input.as_bytes()),
        [breach(LimitKind::FrameBytes, usize::MAX, usize::MAX)]
    );
}

/// "Size Limits": when several limits break, the one that broke first in the byte stream is
/// reported, however the input was split.
#[test]
fn size_limits_first_breach_in_the_stream_wins() {
    // The frame limit breaks at byte 30, the line limit (which the line reaches only later)
    // at byte 5 + 40.
    let limits = limits(30, 100, 40, 1000);
    let mut input = b"SEND\nh:".to_vec();
    input.resize(60, b'x');
    input.extend_from_slice(b"\n\n\0");
    assert_eq!(
        decode_limited(limits, &input),
        [breach(LimitKind::FrameBytes, 30, 31)]
    );
}

/// "STOMP Frames": frames follow one another in the stream; several in one buffer decode in
/// order, each `consumed` ending at its NUL.
#[test]
fn pipelined_frames_in_one_buffer() {
    let input = b"SUBSCRIBE\nid:0\ndestination:/queue/a\n\n\0SEND\ndestination:/queue/a\ncontent-length:2\n\nhi\0\nDISCONNECT\nreceipt:9\n\n\0";
    assert_eq!(
        decode(Version::V1_2, input),
        [
            frame(
                Command::Subscribe,
                &[(b"id", b"0"), (b"destination", b"/queue/a")],
                b""
            ),
            frame(
                Command::Send,
                &[(b"destination", b"/queue/a"), (b"content-length", b"2")],
                b"hi"
            ),
            Event::Heartbeat(1),
            frame(Command::Disconnect, &[(b"receipt", b"9")], b""),
        ]
    );
    let mut decoder = Decoder::new(Limits::DEFAULT);
    let Ok(Decoded::Frame { consumed, .. }) = decoder.decode(input) else {
        panic!("first frame");
    };
    assert_eq!(
        &input[..consumed],
        b"SUBSCRIBE\nid:0\ndestination:/queue/a\n\n\0"
    );
}

/// A frame with more headers than fit inline spills to the heap and keeps them all in order.
#[test]
fn many_headers_are_kept_in_order() {
    let mut input = b"SEND\n".to_vec();
    for index in 0..40 {
        input.extend_from_slice(format!("h{index}:v{index}\n").as_bytes());
    }
    input.extend_from_slice(b"\n\0");
    let frame = only_frame(Version::V1_2, &input);
    assert_eq!(frame.headers.len(), 40);
    assert_eq!(frame.headers[39], (b"h39".to_vec(), b"v39".to_vec()));
}

/// A decoder keeps working after a frame and after `reset`.
#[test]
fn decoder_reset_forgets_a_partial_frame() {
    let mut decoder = Decoder::new(Limits::DEFAULT);
    assert_eq!(decoder.decode(b"SEND\nh:v"), Ok(Decoded::NeedMore));
    decoder.reset();
    let Ok(Decoded::Frame { frame, consumed }) = decoder.decode(b"ACK\nid:1\n\n\0") else {
        panic!("frame after reset");
    };
    assert_eq!((frame.command, consumed), (Command::Ack, 11));
}

// ---- Scan once --------------------------------------------------------------------------------

fn feed_in_chunks(decoder: &mut Decoder, input: &[u8], chunk: usize) -> usize {
    let mut end = 0;
    loop {
        end = (end + chunk).min(input.len());
        match decoder.decode(&input[..end]) {
            Ok(Decoded::NeedMore) => assert!(end < input.len(), "whole frame gave NeedMore"),
            Ok(Decoded::Frame { consumed, .. }) => return consumed,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The decoder keeps its search position between calls: a 1 MiB body without
/// `content-length` arriving in 4 KiB pieces is searched once (not once per piece, which
/// would be 128 times the frame), and a body with `content-length` is not searched at all.
#[test]
fn decoder_searches_each_byte_once() {
    let body = vec![b'x'; 1 << 20];
    let mut input = b"SEND\ndestination:/queue/a\n\n".to_vec();
    input.extend_from_slice(&body);
    input.push(0);
    let mut decoder = Decoder::new(Limits::DEFAULT);
    let consumed = feed_in_chunks(&mut decoder, &input, 4096);
    assert_eq!(consumed, input.len());
    assert!(
        decoder.scanned_bytes() <= input.len() as u64,
        "searched {} bytes of a {}-byte frame",
        decoder.scanned_bytes(),
        input.len()
    );

    let mut input = format!("SEND\ncontent-length:{}\n\n", body.len()).into_bytes();
    let head_with_length = input.len();
    input.extend_from_slice(&body);
    input.push(0);
    let mut decoder = Decoder::new(Limits::DEFAULT);
    feed_in_chunks(&mut decoder, &input, 4096);
    assert!(decoder.scanned_bytes() <= head_with_length as u64);

    // The head too, even when it arrives a byte at a time.
    let mut input = b"MESSAGE\n".to_vec();
    for index in 0..100 {
        input.extend_from_slice(format!("header-{index}:value\\c{index}:more\n").as_bytes());
    }
    input.extend_from_slice(b"\nbody\0");
    let mut decoder = Decoder::new(Limits::DEFAULT);
    assert_eq!(feed_in_chunks(&mut decoder, &input, 1), input.len());
    assert!(decoder.scanned_bytes() <= input.len() as u64);
}

// ---- Encoder ---------------------------------------------------------------------------------

fn encoded(version: Version, frame: &Frame<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(&mut out, version, frame);
    out
}

/// "Value Encoding": the encoder applies the reverse transformation for the version: 1.2
/// escapes CR, LF, `:` and `\`; 1.1 all but CR; 1.0 nothing.
#[test]
fn encoder_escapes_per_version() {
    let frame = Frame::new(Command::Message).with_header(b"a:b", b"x\ny\rz\\");
    assert_eq!(
        encoded(Version::V1_2, &frame),
        b"MESSAGE\na\\cb:x\\ny\\rz\\\\\n\n\0"
    );
    assert_eq!(
        encoded(Version::V1_1, &frame),
        b"MESSAGE\na\\cb:x\\ny\rz\\\\\n\n\0"
    );
    let plain = Frame::new(Command::Message).with_header(b"h", b"a\\b:c");
    assert_eq!(encoded(Version::V1_0, &plain), b"MESSAGE\nh:a\\b:c\n\n\0");
}

/// "Value Encoding": CONNECT and CONNECTED are never escaped, whatever the version.
#[test]
fn encoder_does_not_escape_connect_or_connected() {
    for version in ALL {
        for command in [Command::Connect, Command::Stomp, Command::Connected] {
            let frame = Frame::new(command).with_header(b"passcode", b"a\\b:c");
            let mut expected = command.as_bytes().to_vec();
            expected.extend_from_slice(b"\npasscode:a\\b:c\n\n\0");
            assert_eq!(encoded(version, &frame), expected);
        }
    }
}

/// Without escaping, CR and LF cannot be written: sent raw they would end the line and let the
/// rest of a relayed value pose as headers of its own. They go out as spaces, and a `:` in a
/// name as `_`, so the frame keeps one header.
#[test]
fn encoder_without_escaping_cannot_inject_headers() {
    let frame = Frame::new(Command::Message).with_header(b"a:b\n", b"x\ndestination:/queue/evil\r");
    let bytes = encoded(Version::V1_0, &frame);
    assert_eq!(bytes, b"MESSAGE\na_b :x destination:/queue/evil \n\n\0");
    let decoded = only_frame(Version::V1_0, &bytes);
    assert_eq!(decoded.headers.len(), 1);
}

/// The round trip of a frame with an escaped header and a binary body.
#[test]
fn encoder_output_decodes_to_the_same_frame() {
    let frame = Frame::new(Command::Send)
        .with_header(b"destination", b"/queue/a:b")
        .with_header(b"content-length", b"3")
        .with_body(b"\0\x01\0");
    let decoded = only_frame(Version::V1_2, &encoded(Version::V1_2, &frame));
    assert_eq!(decoded, OwnedFrame::from_frame(&frame));
}

/// FrameWriter: a MESSAGE built from per-delivery headers, a header block stored earlier and a
/// body sent separately after `finish_head`.
#[test]
fn frame_writer_raw_headers_and_finish_head() {
    let stored = [
        Header::new(b"destination", b"/queue/a"),
        Header::new(b"x:y", b"1\n2"),
    ];
    let mut block = Vec::new();
    encode_header_block(&mut block, Escaping::V1_2, &stored);
    assert_eq!(block, b"destination:/queue/a\nx\\cy:1\\n2\n");

    let body = b"hello";
    let mut out = Vec::new();
    let mut writer = FrameWriter::begin(&mut out, Version::V1_2, Command::Message);
    assert_eq!(writer.escaping(), Escaping::V1_2);
    writer
        .header(b"subscription", b"0")
        .header_u64(b"message-id", 42)
        .raw_headers(&block)
        .content_length(body.len());
    writer.finish_head();
    assert_eq!(
        out,
        b"MESSAGE\nsubscription:0\nmessage-id:42\ndestination:/queue/a\nx\\cy:1\\n2\ncontent-length:5\n\n"
    );
    out.extend_from_slice(body);
    out.push(0);
    let frame = only_frame(Version::V1_2, &out);
    assert_eq!(frame.as_frame().header(b"x:y"), Some(&b"1\n2"[..]));
    assert_eq!(frame.body, b"hello");
}

/// `header_u64` writes decimal digits, from 0 to `u64::MAX`.
#[test]
fn frame_writer_header_u64() {
    for (value, text) in [
        (0u64, "0"),
        (7, "7"),
        (10, "10"),
        (1_000_000, "1000000"),
        (u64::MAX, "18446744073709551615"),
    ] {
        let mut out = Vec::new();
        let mut writer = FrameWriter::begin(&mut out, Version::V1_2, Command::Receipt);
        writer.header_u64(b"n", value);
        writer.finish(b"");
        assert_eq!(out, format!("RECEIPT\nn:{text}\n\n\0").as_bytes());
    }
}

/// `Decoder::frame_len` (which lets the server copy only the rest of a frame that straddles
/// receives): unknown until the head is whole, then the frame's length with its NUL, whatever
/// part of the body has arrived; unknown for a body that only its NUL ends.
#[test]
fn frame_len_is_known_once_the_head_with_content_length_is_whole() {
    let input = b"SEND\ndestination:/queue/a\ncontent-length:5\n\nhello\0SEND";
    let head = b"SEND\ndestination:/queue/a\ncontent-length:5\n\n".len();
    for cut in 0..head {
        let mut decoder = Decoder::new(Limits::DEFAULT);
        assert_eq!(decoder.decode(&input[..cut]), Ok(Decoded::NeedMore));
        assert_eq!(decoder.frame_len(), None, "cut {cut}");
    }
    for cut in head..head + 6 {
        let mut decoder = Decoder::new(Limits::DEFAULT);
        assert_eq!(decoder.decode(&input[..cut]), Ok(Decoded::NeedMore));
        assert_eq!(decoder.frame_len(), Some(head + 6), "cut {cut}");
    }
    let mut decoder = Decoder::new(Limits::DEFAULT);
    match decoder.decode(input) {
        Ok(Decoded::Frame { consumed, .. }) => assert_eq!(consumed, head + 6),
        other => panic!("expected a frame, got {other:?}"),
    }
    // The next frame has not begun its head: nothing is known of it.
    assert_eq!(decoder.frame_len(), None);

    let mut decoder = Decoder::new(Limits::DEFAULT);
    let no_length = b"SEND\ndestination:/queue/a\n\nhel";
    assert_eq!(decoder.decode(no_length), Ok(Decoded::NeedMore));
    assert_eq!(decoder.frame_len(), None);
}
