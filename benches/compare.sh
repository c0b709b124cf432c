#!/usr/bin/env bash
# Compare stompd with the brokers it replaces, on this machine, with stompd-loadgen.
#
#   benches/compare.sh            the full matrix: 3 repeats, 10 s per throughput run
#   benches/compare.sh --quick    one repeat, 2 s runs, small backlog: a smoke test
#
# Brokers (BROKERS, space-separated, in column order; the first is the baseline for ratios):
#   activemq   Debian's ActiveMQ Classic, installed with apt-get if missing, started from a
#              copy of its activemq.xml with only a STOMP NIO connector (tcpNoDelay=true, or its
#              latency tails carry about 40 ms of Nagle delay) and its data in a scratch dir.
#   stompd     $STOMPD_BIN, or target/release/stompd built here, at its defaults but for a fresh
#              data dir ($WORK/stompd-data).
#   stompd1    optional: the same with --shards 1 (see start_stompd1).
#   relay      stompd-relay: the simplest in-memory forwarder, a ceiling to report against.
#   rabbitmq   optional: Debian's rabbitmq-server with the STOMP plugin, guest/guest, vhost /.
#
# Every case runs against every broker in turn, repeat after repeat (interleaved, so that a
# noisy neighbour hurts all brokers alike). Each run writes its --json report to
# $WORK/runs/<case>/<broker>.<repeat>.json; the table (median [min–max] over repeats, ratio to
# the baseline) goes to $OUT and stdout. A run that lost, duplicated or reordered messages is
# flagged in the table, never averaged in.
#
# Environment: BROKERS, ONLY (a regex: run only the cases whose names match), REPEATS, DURATION (s per throughput run), WARMUP (s), BACKLOG
# (messages), CONNECTIONS, WORK (scratch dir), OUT (markdown file), STOMPD_BIN, LOADGEN_BIN,
# RELAY_BIN.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QUICK=0
if [[ ${1:-} == --quick ]]; then QUICK=1; fi

if ((QUICK)); then
    : "${REPEATS:=1}" "${DURATION:=2}" "${WARMUP:=0.5}" "${BACKLOG:=50000}" "${CONNECTIONS:=200}"
else
    : "${REPEATS:=3}" "${DURATION:=10}" "${WARMUP:=2}" "${BACKLOG:=1000000}" "${CONNECTIONS:=1000}"
fi
: "${BROKERS:=activemq stompd relay}"
: "${ONLY:=.}"
: "${WORK:=$ROOT/target/compare}"
: "${OUT:=$WORK/results.md}"

# The cases: name|loadgen arguments. Throughput runs are bounded by time (DURATION), with a
# message count far beyond what any broker here reaches in that time.
MANY=1000000000
CASES=(
    "queue-128B-1x1-auto|queue -s 128 -p 1 -c 1"
    "queue-1KiB-1x1-auto|queue -s 1024 -p 1 -c 1"
    "queue-128B-4x4-auto|queue -s 128 -p 4 -c 4"
    "queue-1KiB-4x4-auto|queue -s 1024 -p 4 -c 4"
    "queue-128B-1x1-client-individual|queue -s 128 --ack client-individual"
    "queue-128B-4x4-client-individual|queue -s 128 -p 4 -c 4 --ack client-individual"
    "queue-128B-1x1-persistent-receipt100|queue -s 128 --persistent --receipt-every 100"
    "topic-128B-1to10|topic -s 128 -k 10"
    "latency-128B-10k-per-s|latency -s 128 --rate 10000"
    "pingpong-128B|pingpong -s 128"
    "backlog-128B|backlog -s 128 -n $BACKLOG -d 600"
    "connections|connections -m $CONNECTIONS -d 600"
)

log() { printf '%s compare: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "$*"; exit 1; }

as_root() {
    if [[ $(id -u) == 0 ]]; then "$@"; else sudo "$@"; fi
}

install_package() {
    log "installing $1 with apt-get"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q --no-install-recommends "$1" >&2
}

# free_port, wait_port, listening_port
source "$ROOT/benches/ports.sh"

declare -A PORT PID
STARTED=()

stop_all() {
    local pid
    if [[ -n ${RABBIT_NODE:-} ]]; then
        rabbit_env "$RABBIT_BIN/rabbitmqctl" -n "$RABBIT_NODE" stop >/dev/null 2>&1 || true
        # Erlang starts an epmd daemon; stop it unless one was running before us.
        if ((!EPMD_WAS_RUNNING)); then epmd -kill >/dev/null 2>&1 || true; fi
    fi
    for pid in "${STARTED[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${STARTED[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}
trap stop_all EXIT

start_activemq() {
    [[ -f /usr/share/activemq/bin/activemq.jar ]] || install_package activemq
    local dir=$WORK/activemq port
    port=$(free_port)
    rm -rf "$dir"
    mkdir -p "$dir/conf" "$dir/data" "$dir/tmp"
    cp /etc/activemq/instances-available/main/log4j2.properties "$dir/conf/"
    # Debian's file with its OpenWire connector replaced by one STOMP connector.
    sed "/<transportConnectors>/,/<\/transportConnectors>/c\\
        <transportConnectors>\\
            <transportConnector name=\"stomp\" uri=\"stomp+nio://127.0.0.1:$port?transport.tcpNoDelay=true\"/>\\
        </transportConnectors>" \
        /etc/activemq/instances-available/main/activemq.xml >"$dir/conf/activemq.xml"
    grep -q "stomp+nio://127.0.0.1:$port" "$dir/conf/activemq.xml" ||
        die "could not put the STOMP connector into activemq.xml"
    # The JVM options are Debian's defaults (/usr/share/activemq/activemq-options).
    java -Xms512M -Xmx512M -Dorg.apache.activemq.UseDedicatedTaskRunner=true \
        -Djava.io.tmpdir="$dir/tmp" \
        -Dactivemq.home=/usr/share/activemq -Dactivemq.base="$dir" \
        -Dactivemq.conf="$dir/conf" -Dactivemq.data="$dir/data" \
        -jar /usr/share/activemq/bin/activemq.jar start "xbean:file:$dir/conf/activemq.xml" \
        >"$dir/out.log" 2>&1 &
    PID[activemq]=$!
    STARTED+=($!)
    PORT[activemq]=$port
    wait_port "$port" 120 "${PID[activemq]}" || die "ActiveMQ did not open port $port: see $dir/out.log"
}

# stompd at its defaults (one shard per CPU), or, as `stompd1`, with `--shards 1`: on a machine
# whose few CPUs the load generator shares, where the connections and the queue land decides
# whether a message crosses cores, and the second column shows what that costs.
start_stompd() { start_stompd_as stompd; }
start_stompd1() { start_stompd_as stompd1 --shards 1; }

start_stompd_as() {
    local name=$1 bin=${STOMPD_BIN:-} port
    shift
    if [[ -z $bin ]]; then
        (cd "$ROOT" && cargo build --release --bin stompd >&2)
        bin=$ROOT/target/release/stompd
    fi
    # A fresh log, like ActiveMQ's scratch data dir: the default (./stompd-data) could hold an
    # earlier run's messages, which a new broker would recover and deliver. Port 0: the kernel
    # picks the port, and the broker says which.
    rm -rf "$WORK/$name-data"
    "$bin" --listen "127.0.0.1:0" --data-dir "$WORK/$name-data" "$@" >"$WORK/$name.log" 2>&1 &
    PID[$name]=$!
    STARTED+=($!)
    if port=$(listening_port "$WORK/$name.log" 30 "${PID[$name]}"); then
        PORT[$name]=$port
        return 0
    fi
    log "$name did not start (see $WORK/$name.log); its column will read 'not run'"
    unset "PID[$name]" "PORT[$name]"
}

start_relay() {
    local port
    port=$(free_port)
    "$RELAY_BIN" --listen "127.0.0.1:$port" >"$WORK/relay.log" 2>&1 &
    PID[relay]=$!
    STARTED+=($!)
    PORT[relay]=$port
    wait_port "$port" 30 "${PID[relay]}" || die "stompd-relay did not start: see $WORK/relay.log"
}

# Runs RabbitMQ's own start script as the current user (Debian's /usr/sbin wrapper would switch
# to the rabbitmq user, who cannot write the scratch dir), with node, data, logs, config and
# Erlang cookie (HOME) all in the scratch dir.
RABBIT_BIN=/usr/lib/rabbitmq/bin
rabbit_env() {
    local dir=$WORK/rabbitmq
    env HOME="$dir" RABBITMQ_NODENAME="$RABBIT_NODE" RABBITMQ_MNESIA_BASE="$dir/mnesia" \
        RABBITMQ_LOG_BASE="$dir/log" RABBITMQ_CONFIG_FILE="$dir/rabbitmq" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" "$@"
}

start_rabbitmq() {
    [[ -x $RABBIT_BIN/rabbitmq-server ]] || install_package rabbitmq-server
    local dir=$WORK/rabbitmq port
    port=$(free_port)
    rm -rf "$dir"
    mkdir -p "$dir"
    if [[ -z ${EPMD_WAS_RUNNING:-} ]]; then
        EPMD_WAS_RUNNING=0
        if pgrep -x epmd >/dev/null; then EPMD_WAS_RUNNING=1; fi
    fi
    RABBIT_NODE=loadgen-$$@localhost
    printf 'stomp.listeners.tcp.1 = 127.0.0.1:%s\nloopback_users = none\nlisteners.tcp = none\n' \
        "$port" >"$dir/rabbitmq.conf"
    echo '[rabbitmq_stomp].' >"$dir/enabled_plugins"
    # RabbitMQ stops answering CONNECT near its open-file limit; raise it first.
    ulimit -n 65536 2>/dev/null || log "could not raise the open-file limit for RabbitMQ"
    rabbit_env RABBITMQ_DIST_PORT="$(free_port)" "$RABBIT_BIN/rabbitmq-server" >"$dir/out.log" 2>&1 &
    STARTED+=($!)
    PORT[rabbitmq]=$port
    wait_port "$port" 120 || die "RabbitMQ did not open port $port: see $dir/out.log"
    # The Erlang VM is a child of the start script: report its CPU and memory.
    PID[rabbitmq]=$(pgrep -f "beam.*-home $dir " | head -n 1 || true)
    [[ -n ${PID[rabbitmq]} ]] || log "RabbitMQ's Erlang VM not found: no CPU or memory figures for it"
}

mkdir -p "$WORK"
if [[ -z ${LOADGEN_BIN:-} || -z ${RELAY_BIN:-} ]]; then
    (cd "$ROOT" && cargo build --release -p stompd-loadgen >&2)
fi
: "${LOADGEN_BIN:=$ROOT/target/release/stompd-loadgen}"
: "${RELAY_BIN:=$ROOT/target/release/stompd-relay}"

read -r -a BROKER_LIST <<<"$BROKERS"
for broker in "${BROKER_LIST[@]}"; do
    log "starting $broker"
    "start_$broker"
done

# Stops one broker and starts it afresh. The connections case measures memory per connection
# from the broker's RSS, which only a fresh process shows: a broker that ran the backlog case
# reuses the memory it freed, and its growth reads as zero.
restart_broker() {
    local broker=$1
    log "restarting $broker for a fresh process"
    if [[ $broker == rabbitmq ]]; then
        rabbit_env "$RABBIT_BIN/rabbitmqctl" -n "$RABBIT_NODE" stop >/dev/null 2>&1 || true
    elif [[ -n ${PID[$broker]:-} ]]; then
        kill "${PID[$broker]}" 2>/dev/null || true
        wait "${PID[$broker]}" 2>/dev/null || true
    fi
    "start_$broker"
}
FRESH_CASES='^connections$'

rm -rf "$WORK/runs"
for ((repeat = 1; repeat <= REPEATS; repeat++)); do
    for index in "${!CASES[@]}"; do
        case=${CASES[$index]}
        # The number keeps the table in this order; the summary shows the name without it.
        name=$(printf '%02d-%s' "$index" "${case%%|*}")
        [[ $name =~ $ONLY ]] || continue
        read -r -a args <<<"${case#*|}"
        mkdir -p "$WORK/runs/$name"
        for broker in "${BROKER_LIST[@]}"; do
            [[ -n ${PORT[$broker]:-} ]] || continue
            if [[ ${case%%|*} =~ $FRESH_CASES ]]; then restart_broker "$broker"; fi
            [[ -n ${PORT[$broker]:-} ]] || continue
            log "repeat $repeat/$REPEATS: $name on $broker"
            pid_args=()
            if [[ -n ${PID[$broker]:-} ]]; then pid_args=(--broker-pid "${PID[$broker]}"); fi
            credentials=()
            if [[ $broker == rabbitmq ]]; then credentials=(--login guest --passcode guest); fi
            # Exit status 1 (lost messages) is in the report; the matrix goes on.
            "$LOADGEN_BIN" --port "${PORT[$broker]}" "${pid_args[@]}" "${credentials[@]}" \
                --json --quiet -n "$MANY" -d "$DURATION" --warmup "$WARMUP" \
                --drain-timeout 30 "${args[@]}" \
                >"$WORK/runs/$name/$broker.$repeat.json" 2>"$WORK/runs/$name/$broker.$repeat.err" ||
                log "$name on $broker failed: $(tail -n 1 "$WORK/runs/$name/$broker.$repeat.err")"
        done
    done
done

{
    echo "Measured $(date -u +%Y-%m-%d) on $(lscpu | sed -n 's/^Model name: *//p' | head -n 1)," \
        "$(nproc) CPUs, $(uname -r); loadgen on the same machine."
    echo "Median of $REPEATS interleaved repeats [min–max]; throughput runs ${DURATION} s after" \
        "${WARMUP} s of warm-up; latency in ms from the intended send time. Ratios are of medians;"
    echo "for ms and KiB lower is better, for rates higher is better."
    echo
    "$LOADGEN_BIN" summarize "$WORK/runs" --brokers "${BROKERS// /,}" --baseline "${BROKER_LIST[0]}"
} | tee "$OUT"
log "table written to $OUT"
