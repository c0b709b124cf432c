"""stomper (PyPI stomper), the transport-neutral frame builder and parser, over a plain TCP
socket: the frames it builds must be accepted by stompd, and its parsers (StompBuffer for a
byte stream, Frame.unpack for one frame) must read what stompd sends. stomper ships a 1.1
module (the package's top level) and a 1.0 one (stomper.stomp_10). Every read is bounded."""

import socket
import uuid

import pytest
import stomper
import stomper.stomp_10 as stomper10
from stomper.stompbuffer import StompBuffer

from conftest import AUTH_PORT, FLAVOR, HOST, PASSCODE, PORT, USER, WAIT_S, fresh, needs_auth, needs_broker


class Wire:
    """A socket plus stomper's stream parser."""

    def __init__(self, port=PORT):
        self.sock = socket.create_connection((HOST, port), timeout=WAIT_S)
        self.buffer = StompBuffer()

    def send(self, frame_text):
        self.sock.sendall(frame_text.encode("utf-8"))

    def read(self, what="a frame"):
        """The next frame, as stomper's StompBuffer parses it; heart-beat EOLs are skipped."""
        while True:
            msg = self.buffer.getOneMessage()
            if msg is not None:
                return msg
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                raise AssertionError(
                    "stomper's StompBuffer found no complete frame (%s) within %.0f s; buffered: %r"
                    % (what, WAIT_S, self.buffer.buffer[:300])
                ) from None
            if not data:
                raise AssertionError("the broker closed the connection while we waited for %s; buffered: %r" % (what, self.buffer.buffer[:300]))
            self.buffer.appendData(data.decode("utf-8"))

    def expect(self, command, what=None):
        msg = self.read(what or command)
        assert msg["cmd"] == command, msg
        return msg

    def close(self):
        self.sock.close()


@pytest.fixture
def wires():
    made = []

    def make(**kwargs):
        wire = Wire(**kwargs)
        made.append(wire)
        return wire

    yield make
    for wire in made:
        wire.close()


def with_receipt(frame_text, receipt):
    """Adds a receipt header to a frame stomper built (stomper has no receipt parameter)."""
    command, rest = frame_text.split("\n", 1)
    return "%s\nreceipt:%s\n%s" % (command, receipt, rest)


def test_stomper11_connect_subscribe_send_receive(wires):
    """stomper 1.1 frames: CONNECT (with host, heart-beat), SUBSCRIBE (id), SEND
    (content-type, no content-length) are accepted; StompBuffer parses CONNECTED and MESSAGE."""
    wire = wires()
    wire.send(stomper.connect("guest", "guest", "localhost"))
    connected = wire.expect("CONNECTED")
    if FLAVOR == "stompd":
        assert connected["headers"].get("version") == "1.1"
    destination = fresh("topic", "stomper")
    receipt = uuid.uuid4().hex
    wire.send(with_receipt(stomper.subscribe(destination, "7"), receipt))
    assert wire.expect("RECEIPT")["headers"]["receipt-id"] == receipt
    wire.send(stomper.send(destination, "hello from stomper"))
    message = wire.expect("MESSAGE")
    assert message["headers"]["destination"] == destination
    assert message["headers"]["subscription"] == "7"
    assert message["body"] == "hello from stomper"


def test_stomper_frame_unpack_reads_our_message(wires):
    """stomper's Frame.unpack (one frame, as a string) reads a MESSAGE stompd sends."""
    wire = wires()
    wire.send(stomper.connect("guest", "guest", "localhost"))
    wire.expect("CONNECTED")
    destination = fresh("topic", "unpack")
    receipt = uuid.uuid4().hex
    wire.send(with_receipt(stomper.subscribe(destination, "1"), receipt))
    wire.expect("RECEIPT")
    frame = stomper.Frame()
    frame.cmd = "SEND"
    frame.headers = {"destination": destination, "x-from": "stomper"}
    frame.body = "packed by Frame.pack"
    wire.send(frame.pack())
    # Read the raw frame and hand it to Frame.unpack, as a non-streaming transport would.
    raw = b""
    while b"\x00" not in raw:
        data = wire.sock.recv(65536)
        assert data, "connection closed"
        raw += data
    parsed = stomper.Frame()
    parsed.unpack(raw.split(b"\x00", 1)[0].lstrip(b"\n").decode("utf-8") + "\x00")
    assert parsed.cmd == "MESSAGE"
    assert parsed.headers["destination"] == destination
    assert parsed.body == "packed by Frame.pack"
    if FLAVOR == "stompd":
        assert parsed.headers.get("x-from") == "stomper"


@needs_broker
def test_stomper11_client_ack_and_transaction(wires):
    """stomper 1.1 ACK (message-id + subscription), BEGIN, SEND with transaction, COMMIT,
    DISCONNECT with receipt (spec: ACK, BEGIN, COMMIT, DISCONNECT)."""
    wire = wires()
    wire.send(stomper.connect("guest", "guest", "localhost"))
    wire.expect("CONNECTED")
    destination = fresh("queue", "stomper-ack")
    wire.send(with_receipt(stomper.subscribe(destination, "s1", ack="client"), "sub"))
    wire.expect("RECEIPT")
    wire.send(stomper.begin("tx1"))
    wire.send(stomper.send(destination, "in a transaction", transactionid="tx1"))
    wire.send(with_receipt(stomper.commit("tx1"), "committed"))
    # The COMMIT's RECEIPT and the MESSAGE it released may come in either order.
    frames = [wire.read("RECEIPT and MESSAGE"), wire.read("RECEIPT and MESSAGE")]
    seen = {f["cmd"]: f for f in frames}
    assert set(seen) == {"RECEIPT", "MESSAGE"}, frames
    message = seen["MESSAGE"]
    assert message["body"] == "in a transaction"
    wire.send(with_receipt(stomper.ack(message["headers"]["message-id"], "s1"), "acked"))
    assert wire.expect("RECEIPT")["headers"]["receipt-id"] == "acked"
    # stomper.disconnect() leaves out the blank line that ends the headers (see
    # test_stomper11_malformed_disconnect_is_refused), so DISCONNECT is built with its Frame.
    bye = stomper.Frame()
    bye.cmd = "DISCONNECT"
    bye.headers = {"receipt": "bye"}
    wire.send(bye.pack())
    assert wire.expect("RECEIPT")["headers"]["receipt-id"] == "bye"

    # The ACK took: a new consumer sees only what is sent after.
    again = wires()
    again.send(stomper.connect("guest", "guest", "localhost"))
    again.expect("CONNECTED")
    again.send(stomper.subscribe(destination, "s2"))
    again.send(stomper.send(destination, "sentinel"))
    assert again.expect("MESSAGE")["body"] == "sentinel"


@needs_broker
def test_stomper11_nack(wires):
    """stomper 1.1 NACK: the broker redelivers the message."""
    wire = wires()
    wire.send(stomper.connect("guest", "guest", "localhost"))
    wire.expect("CONNECTED")
    destination = fresh("queue", "stomper-nack")
    wire.send(with_receipt(stomper.subscribe(destination, "n1", ack="client-individual"), "sub"))
    wire.expect("RECEIPT")
    wire.send(stomper.send(destination, "nacked"))
    first = wire.expect("MESSAGE")
    wire.send(stomper.nack(first["headers"]["message-id"], "n1"))
    again = wire.expect("MESSAGE", "the redelivery after NACK")
    assert again["body"] == "nacked"


def test_stomper10_frames(wires):
    """stomper 1.0 frames (stomper.stomp_10): CONNECT without accept-version, and
    SUBSCRIBE/ack headers written as `name: value` with a space, which 1.0 brokers (ActiveMQ)
    read with the value trimmed."""
    wire = wires()
    wire.send(stomper10.connect("guest", "guest"))
    wire.expect("CONNECTED")
    destination = fresh("topic", "stomper10")
    wire.send(with_receipt(stomper10.subscribe(destination), "sub10"))
    assert wire.expect("RECEIPT")["headers"]["receipt-id"] == "sub10"
    wire.send(stomper10.send(destination, "one-oh"))
    message = wire.expect("MESSAGE")
    assert message["headers"]["destination"] == destination
    assert message["body"] == "one-oh"


@needs_broker
def test_stomper10_client_ack_and_transaction(wires):
    """stomper 1.0 BEGIN / SEND with transaction / COMMIT / ACK by message-id."""
    wire = wires()
    wire.send(stomper10.connect("guest", "guest"))
    wire.expect("CONNECTED")
    destination = fresh("queue", "stomper10-ack")
    wire.send(with_receipt(stomper10.subscribe(destination, ack="client"), "sub"))
    wire.expect("RECEIPT")
    wire.send(stomper10.begin("t10"))
    wire.send(stomper10.send(destination, "tx one-oh", transactionid="t10"))
    wire.send(stomper10.commit("t10"))
    message = wire.expect("MESSAGE")
    assert message["body"] == "tx one-oh"
    wire.send(with_receipt(stomper10.ack(message["headers"]["message-id"]), "acked"))
    assert wire.expect("RECEIPT")["headers"]["receipt-id"] == "acked"


@needs_auth
def test_stomper_login_to_auth_broker(wires):
    """CONNECT with login/passcode built by stomper is accepted; a wrong one gets ERROR."""
    good = wires(port=AUTH_PORT)
    good.send(stomper.connect(USER, PASSCODE, "localhost"))
    good.expect("CONNECTED")
    bad = wires(port=AUTH_PORT)
    bad.send(stomper.connect(USER, PASSCODE + "x", "localhost"))
    assert bad.expect("ERROR")["headers"].get("message")


@needs_broker
def test_stomper11_malformed_disconnect_is_refused(wires):
    """Frames (spec: a blank line ends the headers): stomper 0.4.3's disconnect() writes
    `DISCONNECT\\nreceipt:R\\n\\0` with no blank line, so the NUL lands in the header block.
    stompd refuses it with an ERROR that says why (and the connection closes), rather than
    guessing; clients build DISCONNECT with stomper.Frame instead (see above)."""
    frame_text = stomper.disconnect("r")
    assert "\n\n" not in frame_text, "stomper fixed its DISCONNECT; drop this test"
    wire = wires()
    wire.send(stomper.connect("guest", "guest", "localhost"))
    wire.expect("CONNECTED")
    wire.send(frame_text)
    assert wire.expect("ERROR")["headers"].get("message")
