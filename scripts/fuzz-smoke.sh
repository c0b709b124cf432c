#!/usr/bin/env bash
# Runs the codec's cargo-fuzz target for a few seconds. Needs a nightly toolchain (libFuzzer's
# sanitizer flags are nightly-only); where there is none the stable test suite still runs the
# same check over generated input (tests/codec_fuzz_smoke.rs), so this step skips with a note.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-30}"
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz smoke skipped: no nightly toolchain (rustup toolchain install nightly to enable)"
    exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz --quiet
fi
mkdir -p fuzz/corpus/decode
cargo +nightly fuzz run decode fuzz/corpus/decode fuzz/seeds/decode -- \
    -max_total_time="$seconds" -max_len=4096 -rss_limit_mb=2048
