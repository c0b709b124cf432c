#!/usr/bin/env bash
# Runs each cargo-fuzz target for a few seconds: `decode` (the STOMP codec) and `log_record`
# (the log's record decoder and segment scan), N seconds each (default 30). Needs a nightly
# toolchain (libFuzzer's sanitizer flags are nightly-only); where there is none the stable test
# suite still runs the same checks over generated input (tests/codec_fuzz_smoke.rs,
# tests/log_fuzz_smoke.rs), so this step skips with a note.
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
for target in decode log_record; do
    echo "fuzz smoke: $target for ${seconds} s"
    mkdir -p "fuzz/corpus/$target"
    cargo +nightly fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$seconds" -max_len=4096 -rss_limit_mb=2048
done
