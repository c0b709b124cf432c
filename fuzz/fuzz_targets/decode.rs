//! Feeds arbitrary bytes to the decoder in pieces whose sizes the first bytes choose, and
//! checks that the pieces decode exactly as the whole input does and that every decoded frame
//! re-encodes to itself. The check lives in the library (`stompd::codec::testing`) so the
//! stable test suite runs it too (`tests/codec_fuzz_smoke.rs`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    stompd::codec::testing::check_decode_input(data);
});
