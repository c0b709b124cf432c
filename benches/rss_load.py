#!/usr/bin/env python3
"""The load behind benches/rss.sh: one memory-pressure case against one STOMP broker, with the
broker's memory sampled over time.

    rss_load.py CASE --port P --pid PID --broker NAME --csv OUT.csv

Cases (sizes from the environment, defaults as in issue 13's tests):
  slow-consumer  a consumer subscribes to a queue and reads nothing while a producer sends
                 SLOW_MB messages of 1 MiB (persistent, a receipt every 8, so a broker that
                 slows its producers holds it back); once the producer is done or has made no
                 progress for STALL_S seconds, the consumer reads everything and checks the
                 order.
  transactions   TX_CONNECTIONS connections each open a transaction and send TX_MB messages of
                 1 MiB in it; they hold it for HOLD_S seconds, then disconnect (an implicit
                 abort); sampling goes on for AFTER_S seconds.

Every sample is one CSV row: broker, case, seconds since the case began, RssAnon and VmRSS of
the broker (KiB), and the phase. Every wait is bounded; a case that runs out of time says so
and exits 1. Standard library only, so the script runs wherever python3 does.
"""

import argparse
import csv
import os
import socket
import sys
import threading
import time

MIB = 1024 * 1024
SLOW_MB = int(os.environ.get("SLOW_MB", "500"))
TX_CONNECTIONS = int(os.environ.get("TX_CONNECTIONS", "30"))
TX_MB = int(os.environ.get("TX_MB", "60"))
HOLD_S = float(os.environ.get("HOLD_S", "5"))
STALL_S = float(os.environ.get("STALL_S", "5"))
AFTER_S = float(os.environ.get("AFTER_S", "15"))
CASE_DEADLINE_S = float(os.environ.get("CASE_DEADLINE_S", "300"))
SAMPLE_EVERY_S = 0.25


def memory_kib(pid, names=("RssAnon", "VmRSS")):
    """The named /proc/PID/status fields of the process in KiB (by default RssAnon and VmRSS;
    RssFile is its mapped file pages), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
        return tuple(int(fields[name].split()[0]) for name in names)
    except (OSError, KeyError, ValueError):
        # Gone, or a zombie (whose status has no memory lines).
        return None


class Sampler(threading.Thread):
    """Samples the broker's memory until stopped; `phase` labels the rows."""

    def __init__(self, pid, broker, case, writer):
        super().__init__(daemon=True)
        self.pid, self.broker, self.case, self.writer = pid, broker, case, writer
        self.phase = "start"
        self.start_time = time.monotonic()
        self.stopped = threading.Event()
        self.peak_anon_kib = 0

    def run(self):
        while not self.stopped.is_set():
            sample = memory_kib(self.pid)
            if sample is None:
                return
            self.peak_anon_kib = max(self.peak_anon_kib, sample[0])
            elapsed = time.monotonic() - self.start_time
            self.writer.writerow([self.broker, self.case, f"{elapsed:.2f}", *sample, self.phase])
            self.stopped.wait(SAMPLE_EVERY_S)


def frame(command, headers, body=b""):
    head = command + "\n" + "".join(f"{k}:{v}\n" for k, v in headers.items()) + "\n"
    return head.encode() + body + b"\0"


class Connection:
    """A blocking STOMP 1.2 connection with a bounded wait on every read."""

    def __init__(self, port, timeout=CASE_DEADLINE_S):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""
        self.send("CONNECT", {"accept-version": "1.2", "host": "/", "heart-beat": "0,0"})
        command, headers, _ = self.read_frame()
        if command != "CONNECTED":
            raise RuntimeError(f"CONNECT answered {command}: {headers.get('message')}")

    def send(self, command, headers, body=b""):
        self.sock.sendall(frame(command, headers, body))

    def read_frame(self):
        """The next frame as (command, headers, body); content-length bodies may hold NULs."""
        while True:
            start = len(self.buffer) - len(self.buffer.lstrip(b"\r\n"))
            end_of_head = self.buffer.find(b"\n\n", start)
            if end_of_head >= 0:
                lines = self.buffer[start:end_of_head].decode().split("\n")
                headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
                body_start = end_of_head + 2
                length = headers.get("content-length")
                if length is not None:
                    body_end = body_start + int(length)
                else:
                    body_end = self.buffer.find(b"\0", body_start)
                if 0 <= body_end < len(self.buffer):
                    body = self.buffer[body_start:body_end]
                    self.buffer = self.buffer[body_end + 1 :]
                    return lines[0], headers, body
            chunk = self.sock.recv(4 * MIB)
            if not chunk:
                raise RuntimeError("the broker closed the connection")
            self.buffer += chunk

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def produce(port, queue, done):
    """Sends SLOW_MB messages of 1 MiB, a receipt every 8 and at most two receipt windows
    outstanding, so a broker that slows its producers holds this loop back; counts in `done`."""
    producer = Connection(port)
    body = b"x" * MIB
    receipts_due = 0
    for sequence in range(SLOW_MB):
        headers = {"destination": queue, "persistent": "true", "seq": str(sequence)}
        if sequence % 8 == 7 or sequence == SLOW_MB - 1:
            headers["receipt"] = str(sequence)
            receipts_due += 1
        producer.send("SEND", headers, body)
        done["sent"] = sequence + 1
        while receipts_due > 2 or (sequence == SLOW_MB - 1 and receipts_due):
            command, headers, _ = producer.read_frame()
            if command != "RECEIPT":
                raise RuntimeError(f"producer got {command}: {headers.get('message')}")
            receipts_due -= 1
    producer.close()


def slow_consumer(port, sampler):
    queue = f"/queue/rss-slow-{os.getpid()}"
    consumer = Connection(port)
    consumer.send("SUBSCRIBE", {"id": "0", "destination": queue, "ack": "auto"})
    # The consumer's socket is not read while the producer makes progress: its receive buffer
    # fills, then the broker's out buffer, then whatever the broker keeps for it. A broker
    # that bounds its memory holds the producer back; once it has made no progress for
    # STALL_S (or is done), the consumer starts reading.
    done, failure = {"sent": 0}, {}

    def run_producer():
        try:
            produce(port, queue, done)
        except (RuntimeError, OSError) as error:
            failure["error"] = str(error)

    producer = threading.Thread(target=run_producer, daemon=True)
    sampler.phase = "fill"
    producer.start()
    last, last_change = -1, time.monotonic()
    while producer.is_alive() and time.monotonic() - last_change < STALL_S:
        if done["sent"] != last:
            last, last_change = done["sent"], time.monotonic()
        time.sleep(0.1)
    held = producer.is_alive()
    sampler.phase = "drain"
    for expected in range(SLOW_MB):
        command, headers, body = consumer.read_frame()
        if command != "MESSAGE":
            raise RuntimeError(f"consumer got {command}: {headers.get('message')}")
        if int(headers["seq"]) != expected or len(body) != MIB:
            raise RuntimeError(f"out of order: expected {expected}, got {headers['seq']}")
    producer.join(CASE_DEADLINE_S)
    if "error" in failure:
        raise RuntimeError(f"producer: {failure['error']}")
    consumer.close()
    sampler.phase = "after"
    time.sleep(AFTER_S)
    how = f"held back after {last} sent" if held else "never held back"
    return f"{SLOW_MB} messages of 1 MiB delivered in order (producer {how})"


def transactions(port, sampler):
    body = b"t" * MIB
    connections, refused = [], 0
    sampler.phase = "fill"
    for index in range(TX_CONNECTIONS):
        connection = Connection(port)
        connection.send("BEGIN", {"transaction": "tx"})
        try:
            for sequence in range(TX_MB):
                connection.send(
                    "SEND",
                    {"destination": f"/queue/rss-tx-{index}", "transaction": "tx", "seq": str(sequence)},
                    body,
                )
            # A receipt proves the broker read every SEND of the transaction.
            connection.send("BEGIN", {"transaction": "probe", "receipt": "held"})
            command, headers, _ = connection.read_frame()
            if command != "RECEIPT":
                raise RuntimeError(f"{command}: {headers.get('message')}")
            connections.append(connection)
        except (RuntimeError, OSError) as error:
            # A broker with a memory budget refuses a transaction past it with an ERROR.
            refused += 1
            print(f"transaction {index} refused: {error}", file=sys.stderr)
            connection.close()
    sampler.phase = "hold"
    time.sleep(HOLD_S)
    for connection in connections:
        connection.send("DISCONNECT", {})
        connection.close()
    sampler.phase = "after"
    time.sleep(AFTER_S)
    return f"{len(connections)} transactions held, {refused} refused"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("case", choices=["slow-consumer", "transactions"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--csv", required=True)
    args = parser.parse_args()
    with open(args.csv, "a", newline="") as out:
        writer = csv.writer(out)
        sampler = Sampler(args.pid, args.broker, args.case, writer)
        sampler.start()
        outcome = {}

        def run():
            try:
                outcome["ok"] = {"slow-consumer": slow_consumer, "transactions": transactions}[
                    args.case
                ](args.port, sampler)
            except (RuntimeError, OSError) as error:
                outcome["error"] = str(error)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(CASE_DEADLINE_S)
        sampler.stopped.set()
        sampler.join()
    peak = sampler.peak_anon_kib / 1024
    if worker.is_alive():
        print(f"{args.broker} {args.case}: not done in {CASE_DEADLINE_S:.0f} s (peak RssAnon {peak:.0f} MiB)")
        return 1
    if "error" in outcome:
        print(f"{args.broker} {args.case}: failed: {outcome['error']} (peak RssAnon {peak:.0f} MiB)")
        return 1
    print(f"{args.broker} {args.case}: {outcome['ok']}; peak RssAnon {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
