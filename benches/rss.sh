#!/usr/bin/env bash
# Broker memory over time under the two pressures of issue 13, stompd against ActiveMQ, drawn
# as an SVG chart (benches/rss_chart.py).
#
#   benches/rss.sh                  both cases, both brokers, chart to benches/rss.svg
#   SLOW_MB=100 TX_MB=20 benches/rss.sh   smaller, for a quick look
#
# Cases (benches/rss_load.py has the details):
#   slow-consumer  a subscriber reads nothing while SLOW_MB (500) messages of 1 MiB go to its
#                  queue, then reads them all in order;
#   transactions   TX_CONNECTIONS (30) connections each hold TX_MB (60) MiB in an open
#                  transaction, then disconnect.
# Each case runs against a freshly started broker, so its memory starts from the same place.
# stompd runs with STOMPD_ARGS (default: a 512 MiB memory budget, as in the issue's tests) on
# a fresh data dir; ActiveMQ with Debian's defaults (-Xmx512M) and a STOMP NIO connector.
#
# Environment: BROKERS ("activemq stompd"), CASES, STOMPD_ARGS, STOMPD_BIN, WORK, OUT (SVG),
# plus rss_load.py's SLOW_MB, TX_CONNECTIONS, TX_MB, HOLD_S, AFTER_S, CASE_DEADLINE_S.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${BROKERS:=activemq stompd}"
: "${CASES:=slow-consumer transactions}"
: "${STOMPD_ARGS=--memory-bytes-max 536870912}"
: "${WORK:=$ROOT/target/rss}"
: "${OUT:=$ROOT/benches/rss.svg}"

# log, die, start_activemq, start_stompd_as; free_port, wait_port
source "$ROOT/benches/brokers.sh"

declare -A PORT PID
STARTED=()
stop_broker() {
    kill "${PID[$1]}" 2>/dev/null || true
    wait "${PID[$1]}" 2>/dev/null || true
}
stop_all() {
    local pid
    for pid in "${STARTED[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap stop_all EXIT

start_stompd() {
    # shellcheck disable=SC2086 # STOMPD_ARGS is a list of arguments
    start_stompd_as stompd $STOMPD_ARGS
    [[ -n ${PORT[stompd]:-} ]] || die "stompd did not start: see $WORK/stompd.log"
}

mkdir -p "$WORK"
samples=$WORK/samples.csv
: >"$samples"
status=0
read -r -a broker_list <<<"$BROKERS"
for case in $CASES; do
    for broker in "${broker_list[@]}"; do
        log "$case on $broker: starting a fresh broker"
        "start_$broker"
        python3 "$ROOT/benches/rss_load.py" "$case" --port "${PORT[$broker]}" \
            --pid "${PID[$broker]}" --broker "$broker" --csv "$samples" | tee -a "$WORK/summary.txt" ||
            status=1
        stop_broker "$broker"
    done
done

budget_mib=$(sed -n 's/.*--memory-bytes-max \([0-9]*\).*/\1/p' <<<"$STOMPD_ARGS")
python3 "$ROOT/benches/rss_chart.py" "$samples" "$OUT" \
    ${budget_mib:+--budget-mib $((budget_mib / 1024 / 1024))} \
    --title "RssAnon under pressure, $(date -u +%Y-%m-%d), $(nproc) CPUs: $(lscpu | sed -n 's/^Model name: *//p' | head -n 1)"
log "samples in $samples, chart in $OUT"
exit "$status"
