//! Feeds arbitrary bytes to the log's record decoder and segment scan, as recovery feeds them
//! whatever a torn write left: the first 8 bytes are the segment sequence (u64 LE), the rest
//! the bytes at a record's offset. Checks that a good record re-encodes byte for byte and that
//! the scan ends, in bounds. The check lives in the library (`stompd::log::testing`) so the
//! stable test suite runs it too (`tests/log_fuzz_smoke.rs`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    stompd::log::testing::check_log_input(data);
});
