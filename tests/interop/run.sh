#!/usr/bin/env bash
# Interop tests: real STOMP client libraries (stomp.py and its CLI, stomper, the Ruby stomp gem,
# Perl Net::Stomp, @stomp/stompjs over TCP) against real stompd processes.
#
# Installs what it needs on a fresh Debian machine (a Python venv under target/interop-venv,
# Debian packages with apt-get, npm packages from the committed lock file), builds stompd,
# starts two brokers on free 127.0.0.1 ports (one open, one requiring login from a password
# file made by `stompd passwd`), runs every client suite, stops the brokers and ends with
# exactly one line `interop: N passed, M failed` (nothing after it). Exit status 0 only when
# nothing failed.
#
# Environment:
#   STOMPD_BIN          broker binary (default: target/debug/stompd, built here). Pointing it
#                       at the demo relay (target/debug/examples/relay_server) runs the suites
#                       against the relay: only --listen is passed and the auth broker is not
#                       started, so the tests that need the full broker are skipped.
#   INTEROP_TIMEOUT_S   bound on the whole run, seconds (default 1200).
#   INTEROP_SUITES      space-separated subset of: stomppy stomper ruby perl node (default all).
#   CI                  when "true", a client that cannot be installed is a failure, not a skip.
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
HERE="$ROOT/tests/interop"
cd "$ROOT" || exit 2

# Outer half: bound the whole run, and print the one closing line whatever happened inside.
if [[ "${INTEROP_INNER:-}" != 1 ]]; then
    TALLY="$(mktemp)"
    INTEROP_INNER=1 INTEROP_TALLY="$TALLY" \
        timeout -k 15 "${INTEROP_TIMEOUT_S:-1200}" bash "$0" "$@"
    rc=$?
    passed=0 failed=0
    # shellcheck disable=SC1090
    [[ -s "$TALLY" ]] && source "$TALLY"
    rm -f "$TALLY"
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        echo "interop: FAILED: the run exceeded INTEROP_TIMEOUT_S=${INTEROP_TIMEOUT_S:-1200}s"
        failed=$((failed + 1))
    elif [[ $rc -ne 0 && $failed -eq 0 ]]; then
        echo "interop: FAILED: the harness itself failed (exit $rc), see above"
        failed=$((failed + 1))
    fi
    echo "interop: $passed passed, $failed failed"
    [[ $failed -eq 0 ]]
    exit $?
fi

# Inner half.
PASSED=0
FAILED=0
WORK="$(mktemp -d /tmp/stompd-interop.XXXXXX)"
BROKER_PIDS=()

tally() { printf 'passed=%d\nfailed=%d\n' "$PASSED" "$FAILED" >"$INTEROP_TALLY"; }
step() { printf '\n==> interop: %s\n' "$*"; }
fail_step() {
    echo "interop: FAILED: $*"
    FAILED=$((FAILED + 1))
    tally
}

stop_brokers() {
    local pid
    for pid in "${BROKER_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null
    done
    for pid in "${BROKER_PIDS[@]}"; do
        # A graceful drain is bounded: 10 s, then SIGKILL.
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "interop: broker $pid ignored SIGTERM for 10 s, killing it"
            kill -KILL "$pid" 2>/dev/null
        fi
        wait "$pid" 2>/dev/null
    done
    BROKER_PIDS=()
}
cleanup() {
    stop_brokers
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

# A client that cannot be installed: loud, and a failure in CI where every client must run.
skip_or_fail() {
    if [[ "${CI:-}" == true ]]; then
        fail_step "$1 (CI=true, so a missing client is a failure)"
    else
        echo "interop: SKIPPED: $1"
    fi
}

want() { [[ " ${INTEROP_SUITES:-stomppy stomper ruby perl node} " == *" $1 "* ]]; }

# ---- installs --------------------------------------------------------------------------

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null || return 1
    local sudo=()
    [[ $(id -u) -ne 0 ]] && sudo=(sudo -n)
    if [[ $APT_UPDATED -eq 0 ]]; then
        timeout 300 "${sudo[@]}" apt-get update -qq || return 1
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive timeout 600 "${sudo[@]}" apt-get install -y -qq "$@" >/dev/null
}
have_deb() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

VENV="$ROOT/target/interop-venv"
PY_OK=0
if want stomppy || want stomper; then
    step "Python clients (stomp.py, stomper, pytest) into $VENV"
    if ! command -v python3 >/dev/null; then
        apt_install python3 python3-venv || true
    fi
    if [[ ! -x "$VENV/bin/python" ]]; then
        python3 -m venv "$VENV" || { apt_install python3-venv && rm -rf "$VENV" && python3 -m venv "$VENV"; }
    fi
    if [[ -x "$VENV/bin/python" ]] &&
        timeout 300 "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
            -r "$HERE/python/requirements.txt"; then
        PY_OK=1
        "$VENV/bin/python" -m pip freeze --disable-pip-version-check | grep -i -E '^(stomp|pytest)'
    else
        skip_or_fail "the Python clients could not be installed"
    fi
fi

RUBY_OK=0
if want ruby; then
    step "Ruby stomp gem (Debian ruby-stomp)"
    if have_deb ruby-stomp || apt_install ruby-stomp; then
        RUBY_OK=1
        dpkg-query -W ruby-stomp
    else
        skip_or_fail "ruby-stomp could not be installed with apt-get"
    fi
fi

PERL_OK=0
if want perl; then
    step "Perl Net::Stomp (Debian libnet-stomp-perl)"
    if have_deb libnet-stomp-perl || apt_install libnet-stomp-perl; then
        PERL_OK=1
        dpkg-query -W libnet-stomp-perl
    else
        skip_or_fail "libnet-stomp-perl could not be installed with apt-get"
    fi
fi

NODE_OK=0
if want node; then
    step "@stomp/stompjs and @stomp/tcp-wrapper (npm ci, from the committed lock file)"
    if ! command -v npm >/dev/null; then
        apt_install nodejs npm || true
    fi
    node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
    if [[ $node_major -lt 18 ]]; then
        skip_or_fail "Node.js >= 18 is needed for @stomp/stompjs 7 (found: ${node_major})"
    elif (cd "$HERE/node" && timeout 300 npm ci --no-audit --no-fund --loglevel=error); then
        NODE_OK=1
        (cd "$HERE/node" && node -e 'for (const p of ["@stomp/stompjs", "@stomp/tcp-wrapper"]) console.log(p + "@" + require("./node_modules/" + p + "/package.json").version)')
        echo "node $(node --version)"
    else
        skip_or_fail "npm ci failed in tests/interop/node"
    fi
fi

# ---- brokers ---------------------------------------------------------------------------

if [[ -z "${STOMPD_BIN:-}" ]]; then
    step "cargo build --bin stompd"
    timeout 900 cargo build --quiet --bin stompd || {
        fail_step "cargo build --bin stompd"
        exit 1
    }
    STOMPD_BIN="$ROOT/target/debug/stompd"
fi
FLAVOR=stompd
[[ "$(basename "$STOMPD_BIN")" == relay_server ]] && FLAVOR=relay

# start_broker NAME [extra args...]: starts it in the background on 127.0.0.1:0 and waits
# (bounded) for its "listening on ADDR" line, then sets BROKER_PORT. Port 0: the kernel picks a
# free port, so nothing else can take it between choosing and binding (stompd and relay_server
# both print that line; stompd even when the log level hides info).
start_broker() {
    local name=$1
    shift
    local args=(--listen "127.0.0.1:0")
    if [[ $FLAVOR == stompd ]]; then
        mkdir -p "$WORK/$name-data"
        args+=(--data-dir "$WORK/$name-data" --shards 2 "$@")
    fi
    "$STOMPD_BIN" "${args[@]}" >"$WORK/$name.log" 2>&1 &
    local pid=$!
    BROKER_PIDS+=("$pid")
    BROKER_PORT=""
    for _ in $(seq 200); do
        BROKER_PORT=$(grep -o -m1 'listening on [^ ]*' "$WORK/$name.log" | head -n1 | sed 's/.*://' || true)
        if [[ -n $BROKER_PORT ]]; then
            echo "interop: broker $name (pid $pid, $FLAVOR) listens on 127.0.0.1:$BROKER_PORT"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "interop: broker $name exited early:"
            tail -n 20 "$WORK/$name.log"
            return 1
        fi
        sleep 0.05
    done
    echo "interop: broker $name did not say it was listening within 10 s:"
    tail -n 20 "$WORK/$name.log"
    return 1
}

step "start the brokers ($STOMPD_BIN)"
export STOMPD_HOST=127.0.0.1
# Heart-beats at 1 s (the smallest stompd allows), so the heart-beat tests see several soon.
start_broker open --heartbeat-send-ms 1000 --heartbeat-receive-ms 1000 || {
    fail_step "the broker did not start"
    exit 1
}
STOMPD_PORT=$BROKER_PORT
export STOMPD_PORT STOMPD_FLAVOR=$FLAVOR
export STOMPD_USER=interop STOMPD_PASSCODE="interop-secret-1"
STOMPD_AUTH_PORT=""
if [[ $FLAVOR == stompd ]]; then
    printf '%s\n' "$STOMPD_PASSCODE" | "$STOMPD_BIN" passwd --file "$WORK/users" "$STOMPD_USER" ||
        fail_step "stompd passwd"
    start_broker auth --auth-file "$WORK/users" ||
        fail_step "the auth broker did not start"
    STOMPD_AUTH_PORT=$BROKER_PORT
fi
export STOMPD_AUTH_PORT

# ---- suites ----------------------------------------------------------------------------

# TAP-style suites print `ok - NAME` / `not ok - NAME`; a suite that dies before reporting
# anything, or exits non-zero with no failure reported, counts as one failure.
count_tap() {
    local name=$1 log=$2 rc=$3
    local ok notok
    ok=$(grep -c -E '^ok ' "$log")
    notok=$(grep -c -E '^not ok ' "$log")
    PASSED=$((PASSED + ok))
    FAILED=$((FAILED + notok))
    if [[ $rc -ne 0 && $notok -eq 0 ]]; then
        fail_step "$name exited with status $rc without reporting a failed test"
    elif [[ $ok -eq 0 && $notok -eq 0 ]]; then
        fail_step "$name reported no tests"
    fi
    echo "interop: $name: $ok passed, $notok failed"
    tally
}

run_pytest() {
    local name=$1 file=$2
    step "$name (pytest $file)"
    local xml="$WORK/$name.xml"
    (cd "$HERE/python" && PYTHONUNBUFFERED=1 PATH="$VENV/bin:$PATH" timeout 600 \
        "$VENV/bin/python" -m pytest -q -p no:cacheprovider --junitxml="$xml" -o junit_family=xunit2 \
        --timeout=60 --timeout-method=thread "$file")
    local rc=$?
    local counts
    counts=$("$VENV/bin/python" - "$xml" <<'EOF' 2>/dev/null
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
tests = sum(int(s.get("tests", 0)) for s in suites)
bad = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
print(tests - bad - skipped, bad)
EOF
    )
    if [[ -z "$counts" ]]; then
        fail_step "$name: pytest produced no report (exit $rc)"
        return
    fi
    local ok bad
    read -r ok bad <<<"$counts"
    PASSED=$((PASSED + ok))
    FAILED=$((FAILED + bad))
    if [[ $rc -ne 0 && $bad -eq 0 ]]; then
        fail_step "$name: pytest exited with status $rc"
    fi
    echo "interop: $name: $ok passed, $bad failed"
    tally
}

run_tap() {
    local name=$1
    shift
    step "$name ($*)"
    local log="$WORK/$name.tap"
    (cd "$HERE" && timeout 300 "$@") 2>&1 | tee "$log"
    count_tap "$name" "$log" "${PIPESTATUS[0]}"
}

[[ $PY_OK == 1 ]] && want stomppy && run_pytest stomppy test_stomppy.py
[[ $PY_OK == 1 ]] && want stomper && run_pytest stomper test_stomper.py
[[ $RUBY_OK == 1 ]] && run_tap ruby ruby ruby/test_stomp.rb
[[ $PERL_OK == 1 ]] && run_tap perl perl perl/test_stomp.pl
[[ $NODE_OK == 1 ]] && run_tap node node node/test_stompjs.mjs

step "stop the brokers"
for log in "$WORK"/*.log; do
    # A broker that logged a panic has misbehaved even if every client was content.
    if grep -q -E 'panicked at' "$log"; then
        fail_step "$(basename "$log" .log) broker panicked:"
        grep -A5 'panicked at' "$log" | head -n 20
    fi
done
stop_brokers
tally
[[ $FAILED -eq 0 ]]
