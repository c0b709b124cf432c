#!/usr/bin/env python3
"""RssAnon of a running stompd while 30 connections each hold 60 MiB in open transactions, and
after they close (issue 13). Prints one line per sample: seconds since the close, RssAnon KiB.

    target/release/stompd --listen 127.0.0.1:61613 -q memory --memory-bytes-max 536870912 &
    scripts/rss-transactions.py $! 61613

Connections the broker refuses (ERROR memory_bytes_max exceeded) are counted and dropped.
"""
import socket
import sys
import threading
import time

CONNECTIONS = 30
SENDS = 60
BODY = b"x" * (1 << 20)


def rss_anon_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise RuntimeError("no RssAnon")


def connect(port):
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"CONNECT\naccept-version:1.2\nhost:x\n\n\0")
    reply = b""
    while b"\0" not in reply:
        reply += sock.recv(4096)
    return sock


def hold(port, index, held, refused):
    sock = connect(port)
    try:
        sock.sendall(b"BEGIN\ntransaction:t\n\n\0")
        for n in range(SENDS):
            receipt = b"receipt:all\n" if n + 1 == SENDS else b""
            head = b"SEND\ndestination:/queue/tx%d\ntransaction:t\ncontent-length:%d\n%s\n" % (
                index, len(BODY), receipt)
            sock.sendall(head + BODY + b"\0")
        reply = b""
        while b"\0" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    except OSError:
        reply = b"ERROR (connection closed)"
    if reply.startswith(b"RECEIPT"):
        held.append(sock)
    else:
        refused.append(reply.split(b"\n\n")[0])
        sock.close()


def main():
    pid, port = int(sys.argv[1]), int(sys.argv[2])
    print(f"before: {rss_anon_kib(pid)} KiB")
    held, refused = [], []
    threads = [threading.Thread(target=hold, args=(port, i, held, refused))
               for i in range(CONNECTIONS)]
    for thread in threads:
        thread.start()
    peak = 0
    while any(thread.is_alive() for thread in threads):
        peak = max(peak, rss_anon_kib(pid))
        time.sleep(0.02)
    peak = max(peak, rss_anon_kib(pid))
    print(f"held {len(held)}, refused {len(refused)}, peak {peak} KiB")
    for sock in held:
        sock.close()
    closed = time.monotonic()
    for at in (0, 1, 2, 3, 5, 10, 20, 30):
        time.sleep(max(0.0, closed + at - time.monotonic()))
        print(f"{at:>3} s after close: {rss_anon_kib(pid)} KiB")


if __name__ == "__main__":
    main()
