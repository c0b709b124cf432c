"""stomp.py (PyPI stomp-py) against stompd, for STOMP 1.0, 1.1 and 1.2 where a feature exists
in that version. Each test names the spec section it checks (stomp-specification-1.2 unless
said otherwise). Every wait is bounded (conftest.WAIT_S)."""

import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest
import stomp

from conftest import (
    AUTH_PORT,
    FLAVOR,
    HOST,
    PASSCODE,
    PORT,
    USER,
    VERSIONS,
    WAIT_S,
    drain_until,
    fresh,
    needs_auth,
    needs_broker,
)

V11_UP = ["1.1", "1.2"]


# ---- Connecting ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_connect_without_login_negotiates_version(clients, version):
    """Connecting / Protocol Negotiation: CONNECTED carries the version both sides speak
    (1.0 servers need not send it)."""
    client = clients(version)
    connected = client.connect()
    if version != "1.0":
        assert connected.headers.get("version") == version
    assert client.conn.is_connected()


@pytest.mark.parametrize("version", V11_UP)
def test_connect_with_connect_command_instead_of_stomp(clients, version):
    """CONNECT or STOMP Frame: a 1.1+ server accepts both commands."""
    client = clients(version)
    client.conn.connect(wait=False, with_connect_command=True)
    frame = client.rec.connected.get(timeout=WAIT_S)
    assert frame.headers.get("version") == version


@needs_broker
@pytest.mark.parametrize("version", VERSIONS)
def test_connect_with_host_header(clients, version):
    """CONNECT Frame: `host` is required in 1.2; a broker with one virtual host accepts any
    value, as ActiveMQ does."""
    client = clients(version)
    client.connect(host="stompd.example")
    client.send(fresh("queue", "host"), "x")


@needs_auth
@pytest.mark.parametrize("version", VERSIONS)
def test_connect_with_login_accepted(clients, version):
    """CONNECT Frame: login and passcode from the password file made by `stompd passwd`."""
    client = clients(version, port=AUTH_PORT)
    client.connect(USER, PASSCODE)
    destination = fresh("queue", "auth")
    client.send(destination, "authenticated")
    client.subscribe(destination)
    assert client.rec.message().body == "authenticated"


@needs_auth
@pytest.mark.parametrize("version", VERSIONS)
def test_connect_with_wrong_passcode_gets_error_and_close(clients, version):
    """Connecting: a refused CONNECT gets an ERROR frame (with a message header) and the
    connection closes."""
    client = clients(version, port=AUTH_PORT)
    client.conn.connect(USER, PASSCODE + "-wrong", wait=False)
    error = client.rec.error()
    assert error.headers.get("message")
    assert client.rec.connected.empty()
    assert client.rec.disconnected.wait(WAIT_S), "the broker kept a refused connection open"


@needs_auth
@pytest.mark.parametrize("version", VERSIONS)
def test_connect_without_login_to_auth_broker_is_refused(clients, version):
    """Connecting: with auth on, a CONNECT without credentials is refused with ERROR."""
    client = clients(version, port=AUTH_PORT)
    client.conn.connect(wait=False)
    assert client.rec.error().headers.get("message")
    assert client.rec.disconnected.wait(WAIT_S)


# ---- SEND / SUBSCRIBE / MESSAGE ------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_topic_send_subscribe(clients, version):
    """SEND, SUBSCRIBE, MESSAGE: a topic message reaches the subscriber with destination,
    message-id, subscription (1.1+) and the body; user headers pass through."""
    client = clients(version)
    client.connect()
    destination = fresh("topic", "basic")
    sub_id = client.subscribe(destination)
    client.send(destination, "hello topic", **{"x-custom": "kept"})
    frame = client.rec.message()
    assert frame.body == "hello topic"
    assert frame.headers["destination"] == destination
    assert frame.headers.get("message-id")
    if FLAVOR == "stompd":  # the demo relay drops user headers
        assert frame.headers.get("x-custom") == "kept"
    if version != "1.0":
        assert frame.headers.get("subscription") == sub_id


@needs_broker
@pytest.mark.parametrize("version", VERSIONS)
def test_queue_keeps_messages_sent_before_subscribe(clients, version):
    """SEND to a queue: the message waits for a consumer (ActiveMQ queue semantics)."""
    producer = clients(version)
    producer.connect()
    destination = fresh("queue", "stored")
    for i in range(3):
        producer.send(destination, "m%d" % i)
    consumer = clients(version)
    consumer.connect()
    consumer.subscribe(destination)
    assert [consumer.rec.message().body for _ in range(3)] == ["m0", "m1", "m2"]


@needs_broker
@pytest.mark.parametrize("version", VERSIONS)
def test_queue_message_goes_to_one_consumer(clients, version):
    """SUBSCRIBE to a queue: each message goes to exactly one of the competing consumers."""
    destination = fresh("queue", "compete")
    consumers = []
    for _ in range(2):
        consumer = clients(version)
        consumer.connect()
        consumer.subscribe(destination)
        consumers.append(consumer)
    producer = clients(version)
    producer.connect()
    bodies = ["c%d" % i for i in range(10)]
    for body in bodies:
        producer.send(destination, body)
    got = []
    deadline = time.monotonic() + WAIT_S
    while len(got) < len(bodies) and time.monotonic() < deadline:
        for consumer in consumers:
            while not consumer.rec.messages.empty():
                got.append(consumer.rec.messages.get().body)
        time.sleep(0.02)
    assert sorted(got) == sorted(bodies)


@needs_broker
@pytest.mark.parametrize("version", VERSIONS)
def test_topic_fans_out_and_drops_without_subscribers(clients, version):
    """SEND to a topic: every current subscriber gets a copy; nobody gets what was sent
    before they subscribed (ActiveMQ non-durable topic semantics)."""
    destination = fresh("topic", "fanout")
    producer = clients(version)
    producer.connect()
    producer.send(destination, "before anyone listened")
    subscribers = []
    for _ in range(2):
        subscriber = clients(version)
        subscriber.connect()
        subscriber.subscribe(destination)
        subscribers.append(subscriber)
    producer.send(destination, "to all")
    for subscriber in subscribers:
        assert subscriber.rec.message().body == "to all"
        assert subscriber.rec.messages.empty()


@needs_broker
@pytest.mark.parametrize("version", VERSIONS)
def test_unsubscribe_stops_delivery(clients, version):
    """UNSUBSCRIBE: nothing reaches the subscription afterwards; queue messages stay for the
    next consumer."""
    destination = fresh("queue", "unsub")
    client = clients(version)
    client.connect()
    sub_id = client.subscribe(destination)
    client.unsubscribe(destination, sub_id)
    client.sync()
    client.send(destination, "after unsubscribe")
    other = clients(version)
    other.connect()
    other.subscribe(destination)
    assert other.rec.message().body == "after unsubscribe"
    assert client.rec.messages.empty()


@needs_broker
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("value", ["true", True, "false", False])
def test_send_persistent_header_as_clients_write_it(clients, version, value):
    """SEND with ActiveMQ's `persistent` header: stomp.py writes a Python bool as `True` /
    `False`, which ActiveMQ reads without complaint; stompd reads true/false in any case."""
    destination = fresh("queue", "persistent")
    client = clients(version)
    client.connect()
    client.send(destination, "kept", persistent=value)
    client.subscribe(destination)
    assert client.rec.message().body == "kept"
    assert client.rec.errors.empty()


@needs_broker
@pytest.mark.parametrize("version", VERSIONS)
def test_prefetch_one_holds_back_until_ack(clients, version):
    """SUBSCRIBE with ActiveMQ's `activemq.prefetchSize:1` and ack:client: one unacknowledged
    message at a time; the ACK lets the next one through."""
    destination = fresh("queue", "prefetch")
    client = clients(version)
    client.connect()
    for body in ("p1", "p2"):
        client.send(destination, body)
    client.subscribe(destination, ack="client", **{"activemq.prefetchSize": "1"})
    first = client.rec.message()
    assert first.body == "p1"
    client.sync()
    assert client.rec.messages.empty(), "a second message came past prefetch 1"
    client.ack(first)
    assert client.rec.message().body == "p2"


@needs_broker
def test_stomp10_subscribe_without_id_and_unsubscribe_by_destination(clients):
    """STOMP 1.0 SUBSCRIBE / UNSUBSCRIBE: `id` is optional and UNSUBSCRIBE may name the
    destination instead, as 1.0 clients of ActiveMQ and stompserver do."""
    client = clients("1.0")
    client.connect()
    destination = fresh("queue", "noid")
    receipt = "r-" + uuid.uuid4().hex
    client.conn.send_frame("SUBSCRIBE", {"destination": destination, "receipt": receipt})
    client.rec.receipt(receipt)
    client.send(destination, "to the id-less subscription")
    assert client.rec.message().body == "to the id-less subscription"
    receipt = "u-" + uuid.uuid4().hex
    client.conn.send_frame("UNSUBSCRIBE", {"destination": destination, "receipt": receipt})
    client.rec.receipt(receipt)
    client.send(destination, "after unsubscribe")
    other = clients("1.0")
    other.connect()
    other.subscribe(destination)
    assert other.rec.message().body == "after unsubscribe"
    assert client.rec.messages.empty() and client.rec.errors.empty()


@needs_broker
@pytest.mark.parametrize("version", VERSIONS)
def test_open_transaction_is_aborted_at_disconnect(clients, version):
    """BEGIN: transactions not committed are aborted implicitly at DISCONNECT."""
    destination = fresh("queue", "open-tx")
    client = clients(version)
    client.connect()
    tx = client.conn.begin()
    client.send(destination, "never committed", transaction=tx)
    client.disconnect()
    after = clients(version)
    after.connect()
    after.subscribe(destination)
    after.send(destination, "sentinel")
    assert [f.body for f in drain_until(after, "sentinel")] == ["sentinel"]


@needs_broker
@pytest.mark.parametrize("version", VERSIONS)
def test_send_without_destination_is_an_error(clients, version):
    """SEND: `destination` is required; without it the broker answers ERROR."""
    client = clients(version)
    client.connect()
    client.conn.send_frame("SEND", {}, "nowhere")
    assert "destination" in client.rec.error().headers.get("message", "")


# ---- Bodies --------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_binary_body_with_nul_bytes(clients, version):
    """Frames / content-length: a body with NUL and every byte value arrives unchanged."""
    body = bytes(range(256)) * 4 + b"\x00\x00tail"
    receiver = clients(version, auto_decode=False)
    receiver.connect()
    destination = fresh("topic", "binary")
    receiver.subscribe(destination)
    sender = clients(version)
    sender.connect()
    sender.send(destination, body, content_type="application/octet-stream")
    frame = receiver.rec.message()
    assert frame.body == body
    assert int(frame.headers[b"content-length" if b"content-length" in frame.headers else "content-length"]) == len(body)


@needs_broker
@pytest.mark.parametrize("version", VERSIONS)
def test_large_binary_body_on_a_queue(clients, version):
    """Frames / content-length: a 4 MiB binary body is stored and delivered intact."""
    body = bytes(range(256)) * 16384
    client = clients(version, auto_decode=False)
    client.connect()
    destination = fresh("queue", "large")
    client.send(destination, body)
    client.subscribe(destination)
    assert client.rec.message().body == body


@pytest.mark.parametrize("version", VERSIONS)
def test_non_ascii_body_and_header(clients, version):
    """Value Encoding: UTF-8 bodies and header values pass through unchanged."""
    body = "héllo wörld ✓ 日本語 🚀"
    client = clients(version)
    client.connect()
    destination = fresh("topic", "utf8")
    client.subscribe(destination)
    client.send(destination, body, **{"x-greeting": "grüße"})
    frame = client.rec.message()
    assert frame.body == body
    if FLAVOR == "stompd":
        assert frame.headers.get("x-greeting") == "grüße"


@needs_broker
@pytest.mark.parametrize("version", V11_UP)
def test_header_escaping_round_trip(clients, version):
    """Value Encoding (1.1+): `:`, `\\n` and `\\\\` in header values are escaped on the wire
    and come back as sent."""
    value = "a:b\\c\nd"
    client = clients(version)
    client.connect()
    destination = fresh("topic", "escape")
    client.subscribe(destination)
    client.send(destination, "x", **{"x-tricky": value})
    assert client.rec.message().headers.get("x-tricky") == value


# ---- ACK / NACK ----------------------------------------------------------------------------


@needs_broker
@pytest.mark.parametrize("version", VERSIONS)
def test_client_ack_unacked_message_is_redelivered(clients, version):
    """SUBSCRIBE ack:client / ACK: a message not acknowledged before the consumer leaves goes
    back to the queue and is delivered again; once acknowledged it is gone."""
    destination = fresh("queue", "redeliver")
    producer = clients(version)
    producer.connect()
    producer.send(destination, "needs an ack")

    first = clients(version)
    first.connect()
    first.subscribe(destination, ack="client")
    assert first.rec.message().body == "needs an ack"
    first.disconnect()

    second = clients(version)
    second.connect()
    second.subscribe(destination, ack="client")
    again = second.rec.message()
    assert again.body == "needs an ack"
    # As ActiveMQ marks a redelivery.
    assert again.headers.get("redelivered") == "true", again.headers
    second.ack(again)
    second.disconnect()

    third = clients(version)
    third.connect()
    third.subscribe(destination, ack="client")
    producer.send(destination, "sentinel")
    seen = drain_until(third, "sentinel")
    assert [f.body for f in seen] == ["sentinel"]
    third.ack(seen[-1])


@needs_broker
@pytest.mark.parametrize("version", VERSIONS)
def test_client_ack_is_cumulative(clients, version):
    """ACK in ack:client mode is cumulative (1.1+ spec: SUBSCRIBE ack Header; ActiveMQ in
    1.0): acknowledging the 2nd message acknowledges the 1st, not the 3rd."""
    destination = fresh("queue", "cumulative")
    producer = clients(version)
    producer.connect()
    for body in ("one", "two", "three"):
        producer.send(destination, body)
    consumer = clients(version)
    consumer.connect()
    consumer.subscribe(destination, ack="client")
    frames = [consumer.rec.message() for _ in range(3)]
    assert [f.body for f in frames] == ["one", "two", "three"]
    consumer.ack(frames[1])
    consumer.sync()
    consumer.disconnect()

    after = clients(version)
    after.connect()
    after.subscribe(destination, ack="client")
    producer.send(destination, "sentinel")
    assert [f.body for f in drain_until(after, "sentinel")] == ["three", "sentinel"]


@needs_broker
@pytest.mark.parametrize("version", V11_UP)
def test_client_individual_ack_acks_one(clients, version):
    """SUBSCRIBE ack:client-individual: an ACK covers only the message it names."""
    destination = fresh("queue", "individual")
    producer = clients(version)
    producer.connect()
    for body in ("one", "two"):
        producer.send(destination, body)
    consumer = clients(version)
    consumer.connect()
    consumer.subscribe(destination, ack="client-individual")
    frames = [consumer.rec.message() for _ in range(2)]
    consumer.ack(frames[1])
    consumer.sync()
    consumer.disconnect()

    after = clients(version)
    after.connect()
    after.subscribe(destination, ack="client-individual")
    producer.send(destination, "sentinel")
    assert [f.body for f in drain_until(after, "sentinel")] == ["one", "sentinel"]


@needs_broker
@pytest.mark.parametrize("version", V11_UP)
def test_nack_redelivers(clients, version):
    """NACK (1.1+): the message is not consumed; the broker delivers it again (as ActiveMQ
    does until its redelivery limit), marked as a redelivery."""
    destination = fresh("queue", "nack")
    client = clients(version)
    client.connect()
    client.subscribe(destination, ack="client-individual")
    client.send(destination, "refused once")
    frame = client.rec.message()
    client.nack(frame)
    again = client.rec.message("the redelivery after NACK")
    assert again.body == "refused once"
    client.ack(again)


@needs_broker
@pytest.mark.parametrize("version", VERSIONS)
def test_auto_ack_does_not_redeliver(clients, version):
    """SUBSCRIBE ack:auto: a delivered message counts as consumed."""
    destination = fresh("queue", "auto")
    client = clients(version)
    client.connect()
    client.subscribe(destination)
    client.send(destination, "once")
    assert client.rec.message().body == "once"
    client.disconnect()
    again = clients(version)
    again.connect()
    again.subscribe(destination)
    again.send(destination, "sentinel")
    assert [f.body for f in drain_until(again, "sentinel")] == ["sentinel"]


# ---- Transactions --------------------------------------------------------------------------


@needs_broker
@pytest.mark.parametrize("version", VERSIONS)
def test_transaction_commit_delivers_sends(clients, version):
    """BEGIN / COMMIT: SENDs in a transaction are held until COMMIT."""
    destination = fresh("queue", "tx-commit")
    client = clients(version)
    client.connect()
    client.subscribe(destination)
    tx = client.conn.begin()
    client.send(destination, "in tx 1", transaction=tx)
    client.send(destination, "in tx 2", transaction=tx)
    client.send(destination, "outside")
    assert client.rec.message().body == "outside"
    client.sync()
    assert client.rec.messages.empty(), "a transactional SEND was delivered before COMMIT"
    client.conn.commit(tx)
    assert [client.rec.message().body for _ in range(2)] == ["in tx 1", "in tx 2"]


@needs_broker
@pytest.mark.parametrize("version", VERSIONS)
def test_transaction_abort_discards_sends(clients, version):
    """ABORT: SENDs in an aborted transaction are never delivered."""
    destination = fresh("queue", "tx-abort")
    client = clients(version)
    client.connect()
    client.subscribe(destination)
    tx = client.conn.begin()
    client.send(destination, "aborted", transaction=tx)
    client.conn.abort(tx)
    client.send(destination, "sentinel")
    assert [f.body for f in drain_until(client, "sentinel")] == ["sentinel"]


@needs_broker
@pytest.mark.parametrize("version", VERSIONS)
def test_transaction_abort_undoes_ack(clients, version):
    """ABORT: an ACK inside an aborted transaction is undone, so the message comes back."""
    destination = fresh("queue", "tx-ack")
    mode = "client" if version == "1.0" else "client-individual"
    client = clients(version)
    client.connect()
    client.send(destination, "acked then aborted")
    client.subscribe(destination, ack=mode)
    frame = client.rec.message()
    tx = client.conn.begin()
    client.ack(frame, transaction=tx)
    client.conn.abort(tx)
    client.disconnect()

    again = clients(version)
    again.connect()
    again.subscribe(destination, ack=mode)
    assert again.rec.message().body == "acked then aborted"


@needs_broker
@pytest.mark.parametrize("version", VERSIONS)
def test_transaction_commit_applies_ack(clients, version):
    """COMMIT: an ACK inside a committed transaction takes effect."""
    destination = fresh("queue", "tx-ack-commit")
    mode = "client" if version == "1.0" else "client-individual"
    client = clients(version)
    client.connect()
    client.send(destination, "acked in tx")
    client.subscribe(destination, ack=mode)
    frame = client.rec.message()
    tx = client.conn.begin()
    client.ack(frame, transaction=tx)
    client.conn.commit(tx)
    client.sync()
    client.disconnect()

    again = clients(version)
    again.connect()
    again.subscribe(destination, ack=mode)
    again.send(destination, "sentinel")
    assert [f.body for f in drain_until(again, "sentinel")] == ["sentinel"]


@needs_broker
@pytest.mark.parametrize("version", VERSIONS)
def test_commit_of_unknown_transaction_is_an_error(clients, version):
    """COMMIT: a transaction that was never begun gets an ERROR frame."""
    client = clients(version)
    client.connect()
    client.conn.commit("never-begun-" + uuid.uuid4().hex)
    assert client.rec.error().headers.get("message")


# ---- Receipts, heart-beats, DISCONNECT -----------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_receipts_come_back_in_order(clients, version):
    """RECEIPT: each frame with a receipt header gets a RECEIPT naming it, in frame order."""
    client = clients(version)
    client.connect()
    destination = fresh("topic", "receipts")
    ids = ["r-%d-%s" % (i, uuid.uuid4().hex[:6]) for i in range(5)]
    for receipt in ids:
        client.conn.send(destination, "x", receipt=receipt)
    assert [client.rec.receipts.get(timeout=WAIT_S).headers["receipt-id"] for _ in ids] == ids


@needs_broker
@pytest.mark.parametrize("version", V11_UP)
def test_heartbeats_negotiated_and_sent(clients, version):
    """Heart-beating (1.1+): CONNECTED answers the client's heart-beat header with the
    server's own, and the broker sends EOLs at the negotiated interval."""
    client = clients(version, heartbeats=(1000, 1000))
    connected = client.connect()
    sx, sy = (int(v) for v in connected.headers["heart-beat"].split(","))
    assert sx > 0 and sy > 0, connected.headers["heart-beat"]
    # The broker sends at max(its sx, our 1000 ms); run.sh starts it with 1000 ms. One more
    # than wanted, in case the EOL after CONNECTED's NUL reached stomp.py on its own.
    client.rec.wait_heartbeats(3)
    destination = fresh("topic", "hb")
    client.subscribe(destination)
    client.send(destination, "still alive")
    assert client.rec.message().body == "still alive"


@needs_broker
@pytest.mark.parametrize("version", V11_UP)
def test_idle_client_with_heartbeats_is_kept(clients, version):
    """Heart-beating: a client that sends only heart-beats for several intervals stays
    connected (stomp.py sends them from its own thread)."""
    client = clients(version, heartbeats=(1000, 1000))
    client.connect()
    client.rec.wait_heartbeats(4)
    assert client.conn.is_connected()
    assert client.rec.errors.empty()
    client.sync()


@pytest.mark.parametrize("version", VERSIONS)
def test_graceful_disconnect(clients, version):
    """DISCONNECT with receipt: the RECEIPT arrives, then the connection closes."""
    client = clients(version)
    client.connect()
    client.disconnect()
    assert not client.conn.is_connected()


# ---- The stomp.py command-line client ------------------------------------------------------


def run_cli(version, lines, port=PORT, extra=()):
    """Runs `stomp -H HOST -P PORT -S VERSION -F FILE` over `lines`; returns its output."""
    with tempfile.NamedTemporaryFile("w", suffix=".cmd", delete=False) as f:
        f.write("\n".join(lines) + "\n")
        path = f.name
    try:
        done = subprocess.run(
            [stomp_cli(), "-H", HOST, "-P", str(port), "-S", version, "-F", path, *extra],
            capture_output=True,
            text=True,
            timeout=30,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    finally:
        os.unlink(path)
    return done.stdout + done.stderr


def stomp_cli():
    return os.path.join(os.path.dirname(sys.executable), "stomp")


@needs_broker
@pytest.mark.parametrize("version", VERSIONS)
def test_cli_send_in_transaction(clients, version):
    """stomp CLI -F: `begin`, `send`, `commit` deliver the message (BEGIN/COMMIT)."""
    destination = fresh("queue", "cli-tx")
    out = run_cli(version, ["begin", "send %s from the cli" % destination, "commit"])
    assert "Committing" in out, out
    consumer = clients(version)
    consumer.connect()
    consumer.subscribe(destination)
    assert consumer.rec.message().body == "from the cli"


@needs_auth
def test_cli_with_login():
    """stomp CLI -U/-W: CONNECT with login/passcode to the broker with auth on."""
    destination = fresh("queue", "cli-auth")
    out = run_cli("1.2", ["send %s authed" % destination], port=AUTH_PORT, extra=("-U", USER, "-W", PASSCODE))
    assert "ERROR" not in out, out


@needs_broker
@pytest.mark.parametrize("version", VERSIONS)
def test_cli_subscribe_ack_and_transaction(clients, version):
    """stomp CLI -F: `subscribe DEST client` receives a queued MESSAGE, `ack` acknowledges it
    (ACK), and the commands after it run in a `begin`/`commit` transaction.

    The CLI runs its command file without waiting, so the file pauses on a FIFO (`sendfile`
    reads it) until this test has seen the MESSAGE, then `run`s a second file holding the ACK
    with the ids the broker assigned."""
    destination = fresh("queue", "cli-ack")
    reply = fresh("queue", "cli-reply")
    producer = clients(version)
    producer.connect()
    producer.send(destination, "for the cli")

    with tempfile.TemporaryDirectory() as tmp:
        gate = os.path.join(tmp, "gate")
        second = os.path.join(tmp, "second.cmd")
        first = os.path.join(tmp, "first.cmd")
        os.mkfifo(gate)
        with open(first, "w") as f:
            f.write("subscribe %s client\nsendfile %s %s\nrun %s\n" % (destination, fresh("queue", "gate"), gate, second))
        proc = subprocess.Popen(
            [stomp_cli(), "-H", HOST, "-P", str(PORT), "-S", version, "-V", "-F", first],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        out_lines = []
        headers = {}
        reader_done = threading.Event()

        def read():
            in_message = False
            for line in proc.stdout:
                out_lines.append(line)
                line = line.rstrip("\n")
                if line == "MESSAGE":
                    in_message = True
                elif in_message and ": " in line:
                    key, value = line.split(": ", 1)
                    headers[key] = value
                elif in_message and line == "for the cli":
                    # The CLI prints the headers, then the body: all is in. (Its receiver is a
                    # daemon thread, so the file must not run out before this is printed.)
                    reader_done.set()
            reader_done.set()

        threading.Thread(target=read, daemon=True).start()
        try:
            assert reader_done.wait(WAIT_S * 2) and "message-id" in headers, "the CLI printed no MESSAGE:\n" + "".join(out_lines)
            if version == "1.0":
                ack = "ack %s" % headers["message-id"]
            elif version == "1.1":
                ack = "ack %s %s" % (headers["message-id"], headers["subscription"])
            else:
                ack = "ack %s" % headers["ack"]
            with open(second, "w") as f:
                f.write("\n".join([ack, "begin", "send %s acked" % reply, "commit", ""]))
            with open(gate, "w") as f:
                f.write("go")
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    output = "".join(out_lines)
    assert "for the cli" in output, output
    consumer = clients(version)
    consumer.connect()
    consumer.subscribe(reply)
    assert consumer.rec.message().body == "acked"
    # The ACK took: nothing is left in the queue before a sentinel.
    consumer.subscribe(destination)
    consumer.send(destination, "sentinel")
    assert [f.body for f in drain_until(consumer, "sentinel")] == ["sentinel"]
