#!/usr/bin/env bash
# A deep persistent backlog, stompd against ActiveMQ in the same run (issue 14): fill, kill -9
# and restart on the same data, drain; the broker's memory sampled throughout and drawn as an
# SVG chart (benches/backlog_chart.py).
#
#   benches/backlog.sh                         10 M messages of 1 KiB (10 GiB), both brokers
#   N=200000 benches/backlog.sh                a quick look
#
# For each broker in turn, on a fresh data dir:
#   fill     PRODUCERS (4) producers send N persistent messages of SIZE bytes to one queue,
#            nobody consuming, each waiting for a receipt every RECEIPT_EVERY (100) sends
#            (stompd-loadgen queue -c 0); elapsed and msg/s.
#   restart  SETTLE_S (5) s later kill -9, then start the broker on the same data and port:
#            seconds from the start until it answers a CONNECT (backlog.py probe), and until
#            the first MESSAGE of the backlog reaches a consumer.
#   drain    CONSUMERS (4) consumers take all N (stompd-loadgen queue --drain-only), checking
#            that none is lost or duplicated and that each producer's order is kept; msg/s.
# Every SAMPLE_EVERY_S (0.5) s the broker process's RssAnon, RssFile (mapped file pages) and
# VmRSS go to $WORK/samples.csv with the phase (loadgen reports and timings: $WORK/runs/BROKER); for ActiveMQ that is its JVM. The data dir is
# deleted after each broker. stompd runs with --memory-bytes-max MEMORY_BYTES_MAX (256 MiB)
# and STOMPD_ARGS; ActiveMQ with Debian's defaults (-Xmx512M, KahaDB) and a STOMP NIO
# connector (benches/brokers.sh).
#
# Environment: BROKERS ("activemq stompd"), N, SIZE, PRODUCERS, CONSUMERS, RECEIPT_EVERY,
# MEMORY_BYTES_MAX, STOMPD_ARGS, SETTLE_S, PHASE_TIMEOUT_S (each of fill and drain; default
# N/1000 + 300), RESTART_TIMEOUT_S (600), RECEIPT_TIMEOUT_S (60: a fill held back this long
# fails), DRAIN_TIMEOUT_S (120: the drain stops after this long without a delivery),
# STOMPD_BIN, LOADGEN_BIN, WORK (target/backlog: needs 2.5 x N x SIZE free), OUT (the SVG,
# benches/backlog.svg), KEEP_DATA (1: leave the data dirs).
# shellcheck disable=SC2317 # functions called by name: trap, "start_$broker", "relaunch_$broker"
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${BROKERS:=activemq stompd}"
: "${N:=10000000}" "${SIZE:=1024}" "${PRODUCERS:=4}" "${CONSUMERS:=4}" "${RECEIPT_EVERY:=100}"
: "${MEMORY_BYTES_MAX:=268435456}"
: "${STOMPD_ARGS:=}"
: "${SETTLE_S:=5}"
: "${PHASE_TIMEOUT_S:=$((N / 1000 + 300))}"
: "${RESTART_TIMEOUT_S:=600}" "${RECEIPT_TIMEOUT_S:=60}" "${DRAIN_TIMEOUT_S:=120}"
: "${WORK:=$ROOT/target/backlog}"
: "${OUT:=$ROOT/benches/backlog.svg}"
: "${KEEP_DATA:=0}"

# log, die, start_activemq, launch_activemq, start_stompd_as, launch_stompd_as
source "$ROOT/benches/brokers.sh"

declare -A PORT PID
STARTED=()
SAMPLER='' CHILD=''
# Ends what this script started, by pid: TERM, up to 10 s, then KILL; then the data dirs.
stop_all() {
    local pid deadline=$((SECONDS + 10))
    for pid in $CHILD $SAMPLER "${STARTED[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in $CHILD $SAMPLER "${STARTED[@]}"; do
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if ((!KEEP_DATA)); then rm -rf "$WORK/activemq/data" "$WORK/stompd-data"; fi
}
trap stop_all EXIT
trap 'exit 130' INT TERM
# Runs a command in the background and waits for it: bash runs a trap only once the
# foreground command is done, and a fill can take hours; `wait` lets TERM through at once.
bounded() {
    "$@" &
    CHILD=$!
    local status=0
    wait "$CHILD" || status=$?
    CHILD=
    return "$status"
}

mkdir -p "$WORK"
need=$((N * SIZE * 5 / 2))
free=$(df -B1 --output=avail "$WORK" | tail -n 1)
((free >= need)) || die "$WORK has $((free >> 20)) MiB free; N=$N x SIZE=$SIZE needs $((need >> 20)) MiB (2.5x)"

if [[ -z ${STOMPD_BIN:-} || -z ${LOADGEN_BIN:-} ]]; then
    (cd "$ROOT" && cargo build --release -p stompd --bin stompd && cargo build --release -p stompd-loadgen >&2)
fi
: "${STOMPD_BIN:=$ROOT/target/release/stompd}" "${LOADGEN_BIN:=$ROOT/target/release/stompd-loadgen}"
export STOMPD_BIN
# The helpers import rss_load and rss_chart: no __pycache__ in benches/.
export PYTHONDONTWRITEBYTECODE=1

# shellcheck disable=SC2206 # STOMPD_ARGS is a list of arguments
STOMPD_FLAGS=(--memory-bytes-max "$MEMORY_BYTES_MAX" $STOMPD_ARGS)
start_stompd() {
    start_stompd_as stompd "${STOMPD_FLAGS[@]}"
    [[ -n ${PORT[stompd]:-} ]] || die "stompd did not start: see $WORK/stompd.log"
}
relaunch_stompd() { launch_stompd_as stompd "${PORT[stompd]}" "${STOMPD_FLAGS[@]}"; }
relaunch_activemq() { launch_activemq; }
data_dir_of() { if [[ $1 == activemq ]]; then echo "$WORK/activemq/data"; else echo "$WORK/$1-data"; fi; }
log_of() { if [[ $1 == activemq ]]; then echo "$WORK/activemq/out.log"; else echo "$WORK/$1.log"; fi; }

# Runs the loadgen for at most PHASE_TIMEOUT_S, its JSON report to $1, stderr to $1's .err.
loadgen() {
    local out=$1
    shift
    bounded timeout -k 10 "$PHASE_TIMEOUT_S" "$LOADGEN_BIN" --json --quiet -n "$N" -s "$SIZE" -d 1e9 \
        --receipt-timeout "$RECEIPT_TIMEOUT_S" --drain-timeout "$DRAIN_TIMEOUT_S" "$@" \
        >"$out" 2>"${out%.json}.err" && return 0
    log "loadgen $*: exit $? ($(tail -n 1 "${out%.json}.err"))"
}

kill_hard() {
    kill -9 "${PID[$1]}" 2>/dev/null || true
    wait "${PID[$1]}" 2>/dev/null || true
}

run_broker() {
    local broker=$1 dir=$WORK/runs/$1 queue start_ns launch_ns listen_s
    rm -rf "$dir"
    mkdir -p "$dir"
    queue=/queue/backlog-$$-$broker
    echo start >"$dir/phase"
    log "$broker: starting on a fresh data dir"
    "start_$broker"
    echo "${PID[$broker]}" >"$dir/pid"
    python3 "$ROOT/benches/backlog.py" sample --csv "$SAMPLES" --broker "$broker" --dir "$dir" &
    SAMPLER=$!

    echo fill >"$dir/phase"
    log "$broker: fill, $N x $SIZE B persistent, $PRODUCERS producers, receipt every $RECEIPT_EVERY"
    loadgen "$dir/fill.json" --port "${PORT[$broker]}" --broker-pid "${PID[$broker]}" \
        --destination "$queue" queue -p "$PRODUCERS" -c 0 --persistent --receipt-every "$RECEIPT_EVERY"
    echo filled >"$dir/phase"
    bounded sleep "$SETTLE_S"
    local disk_mib
    disk_mib=$(($(du -sb "$(data_dir_of "$broker")" | cut -f1) >> 20))

    log "$broker: kill -9 and restart on the same data ($disk_mib MiB)"
    kill_hard "$broker"
    mv "$(log_of "$broker")" "$dir/fill-broker.log"
    echo restart >"$dir/phase"
    start_ns=${EPOCHREALTIME/./}000
    "relaunch_$broker"
    echo "${PID[$broker]}" >"$dir/pid"
    if bounded python3 "$ROOT/benches/backlog.py" probe --port "${PORT[$broker]}" \
        --since-ns "$start_ns" --timeout "$RESTART_TIMEOUT_S" >"$dir/listen_s"; then
        listen_s=$(<"$dir/listen_s")
        echo drain >"$dir/phase"
        launch_ns=${EPOCHREALTIME/./}000
        log "$broker: answers CONNECT ${listen_s} s after the start; drain, $CONSUMERS consumers"
        loadgen "$dir/drain.json" --port "${PORT[$broker]}" --broker-pid "${PID[$broker]}" \
            --destination "$queue" queue -p "$PRODUCERS" -c "$CONSUMERS" --drain-only
        echo drained >"$dir/phase"
        bounded sleep "$SETTLE_S"
    else
        log "$broker: did not answer CONNECT within $RESTART_TIMEOUT_S s after the restart"
        listen_s='' launch_ns=$start_ns
    fi
    printf 'listen_s=%s\ndrain_launch_s=%s\ndisk_mib=%s\n' "$listen_s" \
        "$(awk -v a="$launch_ns" -v b="$start_ns" 'BEGIN { printf "%.3f", (a - b) / 1e9 }')" \
        "$disk_mib" >"$dir/restart.txt"

    kill "$SAMPLER" 2>/dev/null || true
    wait "$SAMPLER" 2>/dev/null || true
    SAMPLER=
    kill_hard "$broker"
    mv "$(log_of "$broker")" "$dir/drain-broker.log" 2>/dev/null || true
    if ((!KEEP_DATA)); then rm -rf "$(data_dir_of "$broker")"; fi
}

SAMPLES=$WORK/samples.csv
: >"$SAMPLES"
log "N=$N x SIZE=$SIZE B; stompd --memory-bytes-max $MEMORY_BYTES_MAX ($((MEMORY_BYTES_MAX >> 20)) MiB)${STOMPD_ARGS:+ $STOMPD_ARGS}; ActiveMQ -Xmx512M"
for broker in $BROKERS; do run_broker "$broker"; done

python3 "$ROOT/benches/backlog_chart.py" "$SAMPLES" "$OUT" --budget-mib $((MEMORY_BYTES_MAX >> 20)) \
    --title "Backlog of $N x $SIZE B: fill, kill -9 and restart, drain; $(date -u +%Y-%m-%d), $(nproc) CPUs: $(lscpu | sed -n 's/^Model name: *//p' | head -n 1)"
status=0
{
    echo "backlog N=$N SIZE=$SIZE PRODUCERS=$PRODUCERS CONSUMERS=$CONSUMERS; stompd --memory-bytes-max $MEMORY_BYTES_MAX${STOMPD_ARGS:+ $STOMPD_ARGS}; ActiveMQ -Xmx512M"
    python3 "$ROOT/benches/backlog.py" summary --runs "$WORK/runs" --brokers "$BROKERS" --csv "$SAMPLES"
} >"$WORK/summary.txt" || status=1
cat "$WORK/summary.txt"
log "samples in $SAMPLES, chart in $OUT, summary in $WORK/summary.txt"
exit "$status"
