#!/usr/bin/env bash
# How stompd's queue throughput scales with --shards: K load generators at once, each P=C=1,
# 128 B, auto ack, on its own queue, against a fresh broker per run; shard counts interleaved
# per repeat. Prints one line per run and a median per shard count.
#
#   benches/scaling.sh                 SHARDS="1 2", QUEUES=2, REPEATS=3, DURATION=5
#   SHARDS="1 2 4 8 16" QUEUES=16 benches/scaling.sh   on a many-core machine
#
# The queues are /queue/scale-0 … /queue/scale-(QUEUES-1); with QUEUES at least the largest
# shard count, most shards own one. Binaries: STOMPD_BIN and LOADGEN_BIN, or target/release.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${SHARDS:=1 2}" "${QUEUES:=2}" "${REPEATS:=3}" "${DURATION:=5}" "${WARMUP:=1}"
: "${WORK:=$ROOT/target/scaling}"
STOMPD_BIN=${STOMPD_BIN:-$ROOT/target/release/stompd}
LOADGEN_BIN=${LOADGEN_BIN:-$ROOT/target/release/stompd-loadgen}
if [[ ! -x $STOMPD_BIN || ! -x $LOADGEN_BIN ]]; then
    (cd "$ROOT" && cargo build --release -p stompd --bin stompd && cargo build --release -p stompd-loadgen >&2)
fi
mkdir -p "$WORK"

# listening_port
source "$ROOT/benches/ports.sh"

for ((repeat = 1; repeat <= REPEATS; repeat++)); do
    for shards in $SHARDS; do
        data=$(mktemp -d)
        "$STOMPD_BIN" --listen "127.0.0.1:0" --data-dir "$data" --shards "$shards" \
            >"$WORK/stompd.log" 2>&1 &
        broker=$!
        port=$(listening_port "$WORK/stompd.log" 30 "$broker") ||
            { echo "stompd did not start: $WORK/stompd.log" >&2; exit 1; }
        pids=()
        for ((q = 0; q < QUEUES; q++)); do
            "$LOADGEN_BIN" --port "$port" --broker-pid "$broker" --json --quiet \
                -n 1000000000 -d "$DURATION" --warmup "$WARMUP" \
                queue -s 128 --destination "/queue/scale-$q" \
                >"$WORK/$shards.$repeat.$q.json" 2>"$WORK/$shards.$repeat.$q.err" &
            pids+=($!)
        done
        wait "${pids[@]}" || true
        kill -TERM "$broker"
        wait "$broker" || true
        rm -rf "$data"
        python3 - "$WORK" "$shards" "$repeat" "$QUEUES" <<'PY'
import json, sys
work, shards, repeat, queues = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
total, ok, cpu = 0.0, True, None
for q in range(queues):
    d = json.load(open(f"{work}/{shards}.{repeat}.{q}.json"))
    total += d["received"]["msgs_per_s"]
    ok = ok and d["ok"]
    cpu = d.get("broker_cpu_percent")
print(f"shards={shards} repeat={repeat} total={total:.0f} msgs/s ok={ok} broker_cpu={cpu:.0f}%")
PY
    done
done | tee "$WORK/runs.txt"
python3 - "$WORK/runs.txt" <<'PY'
import re, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    m = re.match(r"shards=(\d+) repeat=\d+ total=(\d+) msgs/s ok=True", line)
    if m:
        runs.setdefault(int(m.group(1)), []).append(int(m.group(2)))
for shards, totals in sorted(runs.items()):
    print(f"--shards {shards}: median {statistics.median(totals):.0f} msgs/s "
          f"[{min(totals)}–{max(totals)}] over {len(totals)} clean runs")
PY
