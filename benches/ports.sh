# Port helpers shared by the benchmark scripts (sourced, not run).

# A port nothing listens on (bash's /dev/tcp connect fails), below the kernel's ephemeral
# range (32768 and up by default): a port in it can be the local end of a client connection
# (the connections case opens thousands), and a broker started on it fails with EADDRINUSE.
free_port() {
    local port
    while :; do
        port=$((20000 + RANDOM % 12000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
}

# Waits until something accepts on the port: at most `seconds`, and not past the exit of
# `pid` when given. Usage: wait_port PORT SECONDS [PID]
wait_port() {
    local deadline=$((SECONDS + $2))
    while ((SECONDS < deadline)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        if [[ -n ${3:-} ]] && ! kill -0 "$3" 2>/dev/null; then return 1; fi
        sleep 0.2
    done
    return 1
}

# Prints the port of a broker started with `--listen 127.0.0.1:0`, from the "listening on
# HOST:PORT" line it writes to LOG (stompd writes it whatever the log level): at most SECONDS,
# and not past the exit of PID. Port 0 leaves the choice to the kernel, so nothing can take the
# port between choosing and binding it. Usage: listening_port LOG SECONDS PID
listening_port() {
    local log=$1 deadline=$((SECONDS + $2)) pid=$3 port
    while ((SECONDS < deadline)); do
        port=$(grep -o -m1 'listening on [^ ]*' "$log" 2>/dev/null | head -n1 | sed 's/.*://' || true)
        if [[ -n $port ]]; then
            echo "$port"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}
