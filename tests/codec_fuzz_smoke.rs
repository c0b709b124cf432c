//! Runs the fuzz target's check (`stompd::codec::testing::check_decode_input`, the body of
//! `fuzz/fuzz_targets/decode.rs`) on stable, over generated inputs, so CI without nightly and
//! cargo-fuzz still exercises it.

use proptest::prelude::*;
use stompd::codec::testing::check_decode_input;

/// Pieces of STOMP that make generated inputs reach deep into the decoder: commands, header
/// lines with escapes, content-length values, EOLs, NULs.
const PIECES: &[&[u8]] = &[
    b"SEND\n",
    b"MESSAGE\r\n",
    b"CONNECT\n",
    b"CONNECTED\n",
    b"ERROR\n",
    b"send\n",
    b"destination:/queue/a\n",
    b"content-length:3\n",
    b"content-length:0\n",
    b"content-length:x\n",
    b"h\\c:v\\n\\r\\\\\n",
    b"h:\\t\n",
    b"h: padded \n",
    b":v\n",
    b"nocolon\n",
    b"\n",
    b"\r\n",
    b"\0",
    b"abc",
    b"\r",
    b"\\",
    b":",
];

fn stomp_like() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        3 => proptest::sample::select(PIECES).prop_map(<[u8]>::to_vec),
        1 => proptest::collection::vec(any::<u8>(), 1..8),
    ];
    (
        proptest::collection::vec(any::<u8>(), 4),
        proptest::collection::vec(piece, 0..40),
    )
        .prop_map(|(control, pieces)| {
            let mut input = control;
            for piece in pieces {
                input.extend_from_slice(&piece);
            }
            input
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn fuzz_check_on_stomp_like_inputs(input in stomp_like()) {
        check_decode_input(&input);
    }

    #[test]
    fn fuzz_check_on_random_bytes(input in proptest::collection::vec(any::<u8>(), 0..256)) {
        check_decode_input(&input);
    }
}
