# Broker start-up shared by the benchmark scripts (sourced, not run). The caller sets WORK
# (scratch dir) and declares `declare -A PORT PID; STARTED=()`; each start_* function fills
# PORT[name] and PID[name] and appends the pid to STARTED, for the caller's clean-up.

# free_port, wait_port, listening_port
source "$(dirname "${BASH_SOURCE[0]}")/ports.sh"

log() { printf '%s %s: %s\n' "$(date -u +%H:%M:%S)" "$(basename "$0" .sh)" "$*" >&2; }
die() { log "$*"; exit 1; }

as_root() {
    if [[ $(id -u) == 0 ]]; then "$@"; else sudo "$@"; fi
}

install_package() {
    log "installing $1 with apt-get"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q --no-install-recommends "$1" >&2
}

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
    PORT[activemq]=$port
    launch_activemq
    wait_port "$port" 120 "${PID[activemq]}" || die "ActiveMQ did not open port $port: see $dir/out.log"
}

# Starts ActiveMQ on the instance start_activemq made ($WORK/activemq), its data as they are,
# on PORT[activemq], without waiting for the port: start_activemq's second half, and a restart
# on the same data (benches/backlog.sh). The JVM is the process itself: PID[activemq].
launch_activemq() {
    local dir=$WORK/activemq
    # The JVM options are Debian's defaults (/usr/share/activemq/activemq-options).
    java -Xms512M -Xmx512M -Dorg.apache.activemq.UseDedicatedTaskRunner=true \
        -Djava.io.tmpdir="$dir/tmp" \
        -Dactivemq.home=/usr/share/activemq -Dactivemq.base="$dir" \
        -Dactivemq.conf="$dir/conf" -Dactivemq.data="$dir/data" \
        -jar /usr/share/activemq/bin/activemq.jar start "xbean:file:$dir/conf/activemq.xml" \
        >"$dir/out.log" 2>&1 &
    PID[activemq]=$!
    STARTED+=($!)
}

# stompd from $STOMPD_BIN (or target/release/stompd, built here) under the name `name`, on a
# fresh data dir, with extra arguments. Usage: start_stompd_as NAME [STOMPD ARGS...]
start_stompd_as() {
    local name=$1 port
    shift
    # A fresh log, like ActiveMQ's scratch data dir: the default (./stompd-data) could hold an
    # earlier run's messages, which a new broker would recover and deliver. Port 0: the kernel
    # picks the port, and the broker says which.
    rm -rf "$WORK/$name-data"
    launch_stompd_as "$name" 0 "$@"
    if port=$(listening_port "$WORK/$name.log" 30 "${PID[$name]}"); then
        PORT[$name]=$port
        return 0
    fi
    log "$name did not start (see $WORK/$name.log); its column will read 'not run'"
    unset "PID[$name]" "PORT[$name]"
}

# stompd under the name `name` on its data dir ($WORK/NAME-data) as it is, on 127.0.0.1:PORT
# (0: the kernel picks), without waiting for the port: start_stompd_as's first half, and a
# restart on the same data (benches/backlog.sh). Its stderr goes to $WORK/NAME.log, afresh.
# Usage: launch_stompd_as NAME PORT [STOMPD ARGS...]
launch_stompd_as() {
    local name=$1 port=$2 bin=${STOMPD_BIN:-}
    shift 2
    if [[ -z $bin ]]; then
        (cd "$ROOT" && cargo build --release --bin stompd >&2)
        bin=$ROOT/target/release/stompd
    fi
    "$bin" --listen "127.0.0.1:$port" --data-dir "$WORK/$name-data" "$@" >"$WORK/$name.log" 2>&1 &
    PID[$name]=$!
    STARTED+=($!)
}
