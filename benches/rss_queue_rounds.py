#!/usr/bin/env python3
"""RssAnon of a running stompd over rounds of N queues, each given one message and drained
(issue 13: per-queue state must not outlive its queue). Prints RssAnon KiB after each round,
SETTLE seconds after it (default 1.5; 11 lets the 10 s malloc_trim run, which makes rounds
comparable). Each round uses new names; pass `same` to reuse the names of the first.

    target/release/stompd --listen 127.0.0.1:61613 --shards 2 -s /tmp/data &
    SETTLE=11 benches/rss_queue_rounds.py $! 61613 10 100000
"""
import os
import socket
import sys
import time

pid, port, rounds, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
same = len(sys.argv) > 5 and sys.argv[5] == "same"

def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

class Conn:
    def __init__(self):
        self.s = socket.create_connection(("127.0.0.1", port))
        self.buf = b""
        self.s.sendall(b"CONNECT\naccept-version:1.2\nhost:x\n\n\0")
        self.frame()
    def frame(self):
        while True:
            i = self.buf.find(b"\0")
            if i >= 0:
                f, self.buf = self.buf[:i], self.buf[i + 1:]
                self.buf = self.buf.lstrip(b"\n")
                return f
            c = self.s.recv(1 << 20)
            if not c:
                raise RuntimeError("closed")
            self.buf += c

p, c = Conn(), Conn()
print("start", rss(pid), flush=True)
B = 1000
for r in range(rounds):
    name = (lambda i: b"/queue/q%d" % i) if same else (lambda i, r=r: b"/queue/r%d-%d" % (r, i))
    out = []
    for i in range(n):
        out.append(b"SEND\ndestination:" + name(i) + b"\n\nhello\0")
        if len(out) == B:
            p.s.sendall(b"".join(out)); out = []
    p.s.sendall(b"".join(out) + b"SEND\ndestination:/queue/last\nreceipt:r\n\nx\0")
    assert p.frame().startswith(b"RECEIPT")
    for start in range(0, n, B):
        subs = b"".join(b"SUBSCRIBE\nid:%d\ndestination:%s\nack:auto\n\n\0" % (i, name(i)) for i in range(start, min(n, start + B)))
        c.s.sendall(subs)
        for _ in range(start, min(n, start + B)):
            f = c.frame()
            assert f.startswith(b"MESSAGE"), f[:100]
        c.s.sendall(b"".join(b"UNSUBSCRIBE\nid:%d\n\n\0" % i for i in range(start, min(n, start + B))))
    c.s.sendall(b"SUBSCRIBE\nid:last\ndestination:/queue/last\nack:auto\n\n\0")
    assert c.frame().startswith(b"MESSAGE")
    c.s.sendall(b"UNSUBSCRIBE\nid:last\nreceipt:u\n\n\0")
    assert c.frame().startswith(b"RECEIPT")
    time.sleep(float(os.environ.get("SETTLE", "1.5")))
    print("round", r, rss(pid), flush=True)
