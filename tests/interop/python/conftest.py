"""Shared pieces of the Python interop suites: where the brokers are (set by ../run.sh), fresh
destination names, and a stomp.py listener whose every wait is bounded."""

import itertools
import os
import queue
import threading
import time
import uuid

import pytest
import stomp

HOST = os.environ.get("STOMPD_HOST", "127.0.0.1")
PORT = int(os.environ.get("STOMPD_PORT", "61613"))
AUTH_PORT = int(os.environ["STOMPD_AUTH_PORT"]) if os.environ.get("STOMPD_AUTH_PORT") else None
USER = os.environ.get("STOMPD_USER", "interop")
PASSCODE = os.environ.get("STOMPD_PASSCODE", "")
# "relay" when run against the demo relay (examples/relay_server.rs), which only relays
# SEND to SUBSCRIBE and answers receipts: the tests of broker semantics skip there.
FLAVOR = os.environ.get("STOMPD_FLAVOR", "stompd")

# Bound on every wait for something the broker should send.
WAIT_S = 5.0

VERSIONS = ["1.0", "1.1", "1.2"]

_counter = itertools.count()


def fresh(kind, label):
    """A destination name no other test (or earlier run against the same data dir) uses."""
    return "/%s/interop-%s-%s-%d" % (kind, label, uuid.uuid4().hex[:8], next(_counter))


needs_broker = pytest.mark.skipif(FLAVOR != "stompd", reason="needs the full broker, not the relay")
needs_auth = pytest.mark.skipif(AUTH_PORT is None, reason="no broker with auth was started")


class Recorder(stomp.ConnectionListener):
    """Collects what the broker sends, for bounded waits from the test thread."""

    def __init__(self):
        self.messages = queue.Queue()
        self.errors = queue.Queue()
        self.receipts = queue.Queue()
        self.connected = queue.Queue()
        self.heartbeats = 0
        self.heartbeat_event = threading.Condition()
        self.disconnected = threading.Event()

    def on_message(self, frame):
        self.messages.put(frame)

    def on_error(self, frame):
        self.errors.put(frame)

    def on_receipt(self, frame):
        self.receipts.put(frame)

    def on_connected(self, frame):
        self.connected.put(frame)

    def on_heartbeat(self):
        with self.heartbeat_event:
            self.heartbeats += 1
            self.heartbeat_event.notify_all()

    def on_disconnected(self):
        self.disconnected.set()

    def message(self, what="a MESSAGE"):
        try:
            return self.messages.get(timeout=WAIT_S)
        except queue.Empty:
            raise AssertionError("no %s within %.0f s" % (what, WAIT_S)) from None

    def receipt(self, receipt_id):
        try:
            frame = self.receipts.get(timeout=WAIT_S)
        except queue.Empty:
            raise AssertionError("no RECEIPT for %s within %.0f s" % (receipt_id, WAIT_S)) from None
        assert frame.headers.get("receipt-id") == receipt_id
        return frame

    def error(self):
        try:
            return self.errors.get(timeout=WAIT_S)
        except queue.Empty:
            raise AssertionError("no ERROR within %.0f s" % WAIT_S) from None

    def wait_heartbeats(self, count):
        deadline = time.monotonic() + WAIT_S
        with self.heartbeat_event:
            while self.heartbeats < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        "%d heart-beats from the broker within %.0f s, wanted %d"
                        % (self.heartbeats, WAIT_S, count)
                    )
                self.heartbeat_event.wait(left)


class Client:
    """One stomp.py connection of a given protocol version, with version-neutral helpers."""

    def __init__(self, version, port=PORT, heartbeats=(0, 0), auto_decode=True):
        self.version = version
        hosts = [(HOST, port)]
        common = dict(auto_decode=auto_decode, reconnect_attempts_max=1)
        if version == "1.0":
            self.conn = stomp.Connection10(hosts, **common)
        elif version == "1.1":
            self.conn = stomp.Connection11(hosts, heartbeats=heartbeats, **common)
        else:
            self.conn = stomp.Connection12(hosts, heartbeats=heartbeats, **common)
        self.rec = Recorder()
        self.conn.set_listener("recorder", self.rec)
        self._sub_ids = itertools.count(1)

    def connect(self, login=None, passcode=None, **headers):
        self.conn.connect(login, passcode, wait=False, **headers)
        try:
            return self.rec.connected.get(timeout=WAIT_S)
        except queue.Empty:
            pass
        if not self.rec.errors.empty():
            raise AssertionError("ERROR instead of CONNECTED: %r" % self.rec.errors.get().headers)
        raise AssertionError("no CONNECTED within %.0f s" % WAIT_S)

    def subscribe(self, destination, ack="auto", receipt=True, **headers):
        sub_id = str(next(self._sub_ids))
        if receipt:
            headers["receipt"] = "sub-" + uuid.uuid4().hex
        self.conn.subscribe(destination, id=sub_id, ack=ack, **headers)
        if receipt:
            # The subscription is in place once its RECEIPT is back (spec: RECEIPT), so a
            # SEND that follows cannot race it.
            self.rec.receipt(headers["receipt"])
        return sub_id

    def unsubscribe(self, destination, sub_id):
        if self.version == "1.0":
            self.conn.unsubscribe(destination=destination, id=sub_id)
        else:
            self.conn.unsubscribe(id=sub_id)

    def send(self, destination, body, receipt=True, **headers):
        if receipt:
            headers["receipt"] = "send-" + uuid.uuid4().hex
        self.conn.send(destination, body, **headers)
        if receipt:
            self.rec.receipt(headers["receipt"])

    def ack(self, frame, transaction=None):
        h = frame.headers
        if self.version == "1.0":
            self.conn.ack(h["message-id"], transaction=transaction)
        elif self.version == "1.1":
            self.conn.ack(h["message-id"], h["subscription"], transaction=transaction)
        else:
            self.conn.ack(h["ack"], transaction=transaction)

    def nack(self, frame, transaction=None):
        h = frame.headers
        if self.version == "1.1":
            self.conn.nack(h["message-id"], h["subscription"], transaction=transaction)
        else:
            self.conn.nack(h["ack"], transaction=transaction)

    def sync(self):
        """A round trip: once its RECEIPT is back, every frame sent before it was handled."""
        receipt = "sync-" + uuid.uuid4().hex
        self.conn.send_frame("BEGIN", {"transaction": receipt, "receipt": receipt})
        self.rec.receipt(receipt)
        self.conn.send_frame("ABORT", {"transaction": receipt})

    def disconnect(self):
        """Graceful shutdown (spec: DISCONNECT): the RECEIPT comes back, then the broker closes."""
        receipt = "bye-" + uuid.uuid4().hex
        self.conn.disconnect(receipt=receipt)
        self.rec.receipt(receipt)
        assert self.rec.disconnected.wait(WAIT_S), "socket still open %.0f s after DISCONNECT" % WAIT_S

    def close(self):
        if self.conn.is_connected():
            try:
                self.conn.disconnect()
            except Exception:  # noqa: BLE001 - the test outcome is already decided
                pass


@pytest.fixture
def clients():
    """Makes clients and disconnects every one at the end of the test."""
    made = []

    def make(version, **kwargs):
        client = Client(version, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def drain_until(client, sentinel_body):
    """Every MESSAGE up to and including the one whose body is `sentinel_body`. Used to show
    that something was NOT delivered: the broker sends a queue's messages in order, so anything
    that should not be there would arrive before the sentinel sent after it."""
    seen = []
    while True:
        frame = client.rec.message("the sentinel %r" % sentinel_body)
        seen.append(frame)
        if frame.body == sentinel_body:
            return seen
