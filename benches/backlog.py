#!/usr/bin/env python3
"""Helpers of benches/backlog.sh: a memory sampler that follows the broker across its restart,
the restart probe, and the summary.

    backlog.py sample --csv OUT.csv --broker NAME --dir DIR
        every SAMPLE_EVERY_S (0.5) s, until SIGTERM: the pid in DIR/pid and the phase in
        DIR/phase (the script rewrites both), and one row of OUT.csv: broker, seconds since the
        sampler started, phase, pid, RssAnon, RssFile (mapped file pages) and VmRSS in KiB.
        No row while no broker process is there (between kill -9 and restart).
    backlog.py probe --port P --since-ns T --timeout S
        tries a STOMP CONNECT every 50 ms until the broker answers CONNECTED; prints the
        seconds since T (CLOCK_REALTIME ns, bash's EPOCHREALTIME), exit 1 after S seconds.
    backlog.py summary --runs DIR --brokers "activemq stompd" --csv SAMPLES.csv
        one line per broker from DIR/BROKER/{fill,drain}.json (stompd-loadgen --json),
        DIR/BROKER/restart.txt and the samples, then the stompd/ActiveMQ ratios.

Standard library only; the STOMP connection and /proc reading are rss_load.py's.
"""

import argparse
import csv
import json
import os
import signal
import sys
import time

from rss_load import Connection, memory_kib

SAMPLE_EVERY_S = float(os.environ.get("SAMPLE_EVERY_S", "0.5"))
FIELDS = ("RssAnon", "RssFile", "VmRSS")


def read_text(path):
    try:
        with open(path) as file:
            return file.read().strip()
    except OSError:
        return ""


def sample(args):
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    start = time.monotonic()
    with open(args.csv, "a", newline="") as out:
        writer = csv.writer(out)
        while not stop:
            pid = read_text(os.path.join(args.dir, "pid"))
            kib = memory_kib(pid, FIELDS) if pid.isdigit() else None
            if kib is not None:
                phase = read_text(os.path.join(args.dir, "phase")) or "start"
                row = [args.broker, f"{time.monotonic() - start:.2f}", phase, pid, *kib]
                writer.writerow(row)
                out.flush()
            time.sleep(SAMPLE_EVERY_S)
    return 0


def probe(args):
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            # A broker that accepted but is slow to answer gets what is left of the wait.
            connection = Connection(args.port, timeout=max(deadline - time.monotonic(), 0.1))
        except (OSError, RuntimeError, ValueError):
            time.sleep(0.05)
            continue
        seconds = (time.time_ns() - args.since_ns) / 1e9
        connection.send("DISCONNECT", {})
        connection.close()
        print(f"{seconds:.3f}")
        return 0
    print(f"no CONNECTED within {args.timeout:.0f} s", file=sys.stderr)
    return 1


def load_json(path):
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def broker_result(runs, broker, peaks):
    """What one broker's run gave, as a dict of numbers (None where a phase did not finish)."""
    directory = os.path.join(runs, broker)
    fill, drain = load_json(f"{directory}/fill.json"), load_json(f"{directory}/drain.json")
    restart = dict(
        line.split("=", 1) for line in read_text(f"{directory}/restart.txt").split() if "=" in line
    )
    number = lambda text: float(text) if text else None  # noqa: E731
    result = {
        "fill_msgs": fill and fill["sent"] and fill["sent"]["messages"],
        "fill_s": fill and fill["sent"] and fill["sent"]["seconds"],
        "fill_per_s": fill and fill["sent"] and fill["sent"]["msgs_per_s"],
        "fill_ok": bool(fill and fill["ok"]),
        "fill_errors": (fill or {}).get("errors", []),
        "listen_s": number(restart.get("listen_s")),
        "first_s": None,
        "drain_msgs": drain and drain["received"] and drain["received"]["messages"],
        "drain_s": drain and drain["received"] and drain["received"]["seconds"],
        "drain_per_s": drain and drain["received"] and drain["received"]["msgs_per_s"],
        "drain_ok": bool(drain and drain["ok"]),
        "integrity": (drain or {}).get("integrity"),
        "disk_mib": number(restart.get("disk_mib")),
        "peak_anon_mib": peaks.get(broker, {}).get("anon"),
        "peak_file_mib": peaks.get(broker, {}).get("file"),
        "peak_rss_mib": peaks.get(broker, {}).get("rss"),
    }
    # Restart to first MESSAGE: broker start to the drain's launch, plus the drain's own wait.
    if drain and drain.get("first_message_s") is not None and restart.get("drain_launch_s"):
        result["first_s"] = float(restart["drain_launch_s"]) + drain["first_message_s"]
    return result


def peaks_of(samples):
    peaks = {}
    try:
        with open(samples, newline="") as file:
            for broker, _seconds, _phase, _pid, anon, mapped, rss in csv.reader(file):
                peak = peaks.setdefault(broker, {"anon": 0.0, "file": 0.0, "rss": 0.0})
                for key, kib in (("anon", anon), ("file", mapped), ("rss", rss)):
                    peak[key] = max(peak[key], int(kib) / 1024)
    except OSError:
        pass
    return peaks


def show(value, form):
    return "n/a" if value is None else format(value, form)


def summary(args):
    peaks = peaks_of(args.csv)
    results = {broker: broker_result(args.runs, broker, peaks) for broker in args.brokers.split()}
    for broker, r in results.items():
        integrity = r["integrity"] or {}
        checks = (
            "drain complete and in order"
            if r["drain_ok"]
            else "NO DRAIN REPORT"
            if not integrity
            else (
                f"DRAIN NOT CLEAN: received {integrity.get('received', 'n/a')} of "
                f"{integrity.get('expected', 'n/a')}, lost {integrity.get('lost', 'n/a')}, "
                f"duplicated {integrity.get('duplicated', 'n/a')}, "
                f"out of order {integrity.get('out_of_order', 'n/a')}"
            )
        )
        fill_note = "" if r["fill_ok"] else f" (FILL INCOMPLETE: {'; '.join(r['fill_errors'][:1]) or 'no report'})"
        print(
            f"{broker}: fill {show(r['fill_per_s'], ',.0f')} msg/s ({show(r['fill_msgs'], ',')} msgs in "
            f"{show(r['fill_s'], '.1f')} s){fill_note}; drain {show(r['drain_per_s'], ',.0f')} msg/s "
            f"({show(r['drain_msgs'], ',')} msgs in {show(r['drain_s'], '.1f')} s, {checks}); "
            f"restart to listening {show(r['listen_s'], '.2f')} s, to first message "
            f"{show(r['first_s'], '.2f')} s; peak RssAnon {show(r['peak_anon_mib'], '.0f')} MiB, "
            f"RssFile {show(r['peak_file_mib'], '.0f')} MiB, VmRSS {show(r['peak_rss_mib'], '.0f')} MiB; "
            f"data on disk {show(r['disk_mib'], '.0f')} MiB"
        )
    if "stompd" in results and "activemq" in results:
        s, a = results["stompd"], results["activemq"]

        def ratio(key, clean=None):
            # A rate of a phase that did not finish cleanly is not one to compare.
            if clean and not (s[clean] and a[clean]):
                return "n/a (not clean)"
            return "n/a" if not s[key] or not a[key] else f"{s[key] / a[key]:.2f}x"

        print(
            f"stompd/ActiveMQ: fill {ratio('fill_per_s', 'fill_ok')}, "
            f"drain {ratio('drain_per_s', 'drain_ok')}, "
            f"restart to listening {ratio('listen_s')}, to first message {ratio('first_s')}, "
            f"peak RssAnon {ratio('peak_anon_mib')} (rates: higher is better; seconds and MiB: lower)"
        )
    failed = [b for b, r in results.items() if not (r["fill_ok"] and r["drain_ok"])]
    return 1 if failed else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("sample")
    p.add_argument("--csv", required=True)
    p.add_argument("--broker", required=True)
    p.add_argument("--dir", required=True)
    p = commands.add_parser("probe")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--since-ns", type=int, required=True)
    p.add_argument("--timeout", type=float, required=True)
    p = commands.add_parser("summary")
    p.add_argument("--runs", required=True)
    p.add_argument("--brokers", required=True)
    p.add_argument("--csv", required=True)
    args = parser.parse_args()
    return {"sample": sample, "probe": probe, "summary": summary}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
