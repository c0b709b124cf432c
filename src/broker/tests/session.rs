//! Session behaviour: connecting, negotiation, login, heart-beats, errors, DISCONNECT.

use super::*;

struct FakeAuth;

impl Authenticator for FakeAuth {
    fn authenticate(&self, login: &[u8], passcode: &[u8]) -> bool {
        login == b"alice" && passcode == b"secret"
    }
}

fn connected_frame(cluster: &mut Cluster, conn: ConnectionId) -> Sent {
    let frames = cluster.frames(conn);
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0].command, Command::Connected);
    frames[0].clone()
}

/// STOMP 1.2 "Protocol Negotiation": the highest common version.
#[test]
fn connect_negotiates_highest_common_version() {
    let mut cluster = Cluster::single();
    let conn = cluster.open(0);
    cluster.send(
        conn,
        frame(
            Command::Connect,
            &[("accept-version", "1.0,1.1,2.0"), ("host", "h")],
            b"",
        ),
    );
    let connected = connected_frame(&mut cluster, conn);
    assert_eq!(connected.header("version"), Some("1.1"));
    assert!(connected.header("server").unwrap().starts_with("stompd/"));
    assert!(connected.header("session").is_some());
}

/// STOMP 1.2 "Protocol Negotiation": no `accept-version` means 1.0.
#[test]
fn connect_without_accept_version_is_1_0() {
    let mut cluster = Cluster::single();
    let conn = cluster.open(0);
    cluster.send(conn, frame(Command::Connect, &[], b""));
    let connected = connected_frame(&mut cluster, conn);
    assert_eq!(
        connected.header("version"),
        None,
        "1.0 CONNECTED has no version header"
    );
    assert_eq!(cluster.plans[&conn], HeartbeatPlan::default());
}

/// STOMP 1.2 "Protocol Negotiation": no common version is an ERROR listing ours, then close.
#[test]
fn connect_with_no_common_version_is_an_error_listing_ours() {
    let mut cluster = Cluster::single();
    let conn = cluster.open(0);
    cluster.send(
        conn,
        frame(Command::Connect, &[("accept-version", "2.0,2.1")], b""),
    );
    let error = cluster.expect_error(conn);
    assert_eq!(error.header("version"), Some("1.0,1.1,1.2"));
    assert_eq!(
        error.body_str(),
        "Supported protocol versions are 1.0 1.1 1.2\n"
    );
    assert_eq!(cluster.shards[0].session_count(), 0);
}

/// STOMP 1.2 "CONNECT or STOMP Frame": STOMP is handled like CONNECT.
#[test]
fn stomp_frame_connects() {
    let mut cluster = Cluster::single();
    let conn = cluster.open(0);
    cluster.send(
        conn,
        frame(
            Command::Stomp,
            &[("accept-version", "1.2"), ("host", "h")],
            b"",
        ),
    );
    assert_eq!(
        connected_frame(&mut cluster, conn).header("version"),
        Some("1.2")
    );
}

#[test]
fn frames_before_connect_are_errors() {
    let mut cluster = Cluster::single();
    let conn = cluster.open(0);
    cluster.send(
        conn,
        frame(
            Command::Send,
            &[("destination", "/queue/a"), ("receipt", "r1")],
            b"x",
        ),
    );
    let error = cluster.expect_error(conn);
    assert_eq!(
        error.header("message"),
        Some("expected CONNECT or STOMP, got SEND")
    );
    assert_eq!(error.header("receipt-id"), Some("r1"));
}

#[test]
fn second_connect_is_an_error() {
    let mut cluster = Cluster::single();
    let conn = cluster.connect(0);
    cluster.send(
        conn,
        frame(Command::Connect, &[("accept-version", "1.2")], b""),
    );
    assert_eq!(
        cluster.expect_error(conn).header("message"),
        Some("already connected")
    );
}

#[test]
fn login_is_checked_by_the_authenticator() {
    let mut cluster = Cluster::with_auth(1, BrokerConfig::default(), Arc::new(FakeAuth));
    let good = cluster.open(0);
    cluster.send(
        good,
        frame(
            Command::Connect,
            &[
                ("accept-version", "1.2"),
                ("login", "alice"),
                ("passcode", "secret"),
            ],
            b"",
        ),
    );
    connected_frame(&mut cluster, good);
    let bad = cluster.open(0);
    cluster.send(
        bad,
        frame(
            Command::Connect,
            &[
                ("accept-version", "1.2"),
                ("login", "alice"),
                ("passcode", "nope"),
            ],
            b"",
        ),
    );
    let anonymous = cluster.open(0);
    cluster.send(
        anonymous,
        frame(Command::Connect, &[("accept-version", "1.2")], b""),
    );
    // Refusals wait for `login_failure_delay_ms`, then come together with the tick.
    assert!(cluster.take(bad).is_empty());
    assert!(cluster.take(anonymous).is_empty());
    cluster.advance(BrokerConfig::default().login_failure_delay_ms);
    assert_eq!(
        cluster.expect_error(bad).header("message"),
        Some("login failed")
    );
    assert_eq!(
        cluster.expect_error(anonymous).header("message"),
        Some("login failed")
    );
}

/// STOMP 1.2 "Heart-beating": each direction at the larger of offer and wish, none if either is 0;
/// the reply states the intervals the server will actually use.
#[test]
fn heartbeat_negotiation_is_honest() {
    let mut cluster = Cluster::single();
    let conn = cluster.open(0);
    // Client can send every 5 s and wants beats every 200 ms: we send at our 1 s minimum and
    // expect the client at our 10 s wish.
    cluster.send(
        conn,
        frame(
            Command::Connect,
            &[("accept-version", "1.2"), ("heart-beat", "5000,200")],
            b"",
        ),
    );
    assert_eq!(
        connected_frame(&mut cluster, conn).header("heart-beat"),
        Some("1000,10000")
    );
    assert_eq!(
        cluster.plans[&conn],
        HeartbeatPlan {
            send_every_ms: 1000,
            expect_every_ms: 10_000,
            read_timeout_ms: 20_000
        }
    );
    let quiet = cluster.open(0);
    cluster.send(
        quiet,
        frame(
            Command::Connect,
            &[("accept-version", "1.2"), ("heart-beat", "0,0")],
            b"",
        ),
    );
    assert_eq!(
        connected_frame(&mut cluster, quiet).header("heart-beat"),
        Some("0,0")
    );
}

#[test]
fn malformed_heartbeat_header_is_an_error() {
    let mut cluster = Cluster::single();
    let conn = cluster.open(0);
    cluster.send(
        conn,
        frame(
            Command::Connect,
            &[("accept-version", "1.2"), ("heart-beat", "10, 10")],
            b"",
        ),
    );
    assert!(cluster
        .expect_error(conn)
        .header("message")
        .unwrap()
        .starts_with("invalid 'heart-beat'"));
}

#[test]
fn server_sends_heartbeats_when_idle() {
    let mut cluster = Cluster::single();
    let conn = cluster.open(0);
    cluster.send(
        conn,
        frame(
            Command::Connect,
            &[("accept-version", "1.2"), ("heart-beat", "0,1000")],
            b"",
        ),
    );
    cluster.take(conn);
    cluster.now += 800;
    cluster.tick();
    assert!(cluster.take(conn).is_empty(), "not yet due");
    // Due within one tick interval (100 ms) of the 1 s promise, so never late.
    cluster.now += 100;
    cluster.tick();
    assert_eq!(cluster.take(conn), vec![Seen::Heartbeat]);
    cluster.now += 100;
    cluster.tick();
    assert!(
        cluster.take(conn).is_empty(),
        "the beat just written counts as output"
    );
}

/// The read grace: a client is given up on only after twice its interval of silence.
#[test]
fn silent_client_times_out_after_the_grace() {
    let mut cluster = Cluster::single();
    let conn = cluster.open(0);
    cluster.send(
        conn,
        frame(
            Command::Connect,
            &[("accept-version", "1.2"), ("heart-beat", "10000,0")],
            b"",
        ),
    );
    cluster.take(conn);
    cluster.now += 15_000;
    cluster.shards[0].on_input(conn, cluster.now);
    cluster.now += 20_000;
    cluster.tick();
    assert!(
        cluster.take(conn).is_empty(),
        "exactly at the grace is still alive"
    );
    cluster.now += 1;
    cluster.tick();
    assert_eq!(
        cluster.expect_error(conn).header("message"),
        Some("heart-beat timeout")
    );
}

#[test]
fn missing_required_header_is_an_error_with_receipt_id() {
    let mut cluster = Cluster::single();
    let conn = cluster.connect(0);
    cluster.send(conn, frame(Command::Send, &[("receipt", "77")], b"x"));
    let error = cluster.expect_error(conn);
    assert_eq!(
        error.header("message"),
        Some("SEND frame requires a 'destination' header")
    );
    assert_eq!(error.header("receipt-id"), Some("77"));
    assert_eq!(error.header("content-type"), Some("text/plain"));
}

/// STOMP 1.2 "Body" says only SEND, MESSAGE and ERROR have one; a body on another frame (a
/// stray EOL after the blank line, say) is ignored, as RabbitMQ and ActiveMQ do.
#[test]
fn a_body_on_a_bodiless_frame_is_ignored() {
    let mut cluster = Cluster::single();
    let conn = cluster.open(0);
    cluster.send(
        conn,
        frame(Command::Connect, &[("accept-version", "1.2")], b"\n"),
    );
    connected_frame(&mut cluster, conn);
    cluster.send(
        conn,
        frame(
            Command::Subscribe,
            &[("id", "1"), ("destination", "/queue/a"), ("receipt", "r")],
            b"oops",
        ),
    );
    let frames = cluster.frames(conn);
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0].command, Command::Receipt);
    cluster.publish(conn, "/queue/a", "hello");
    assert_eq!(bodies(&cluster.frames(conn)), ["hello"]);
    for command in [Command::Begin, Command::Abort] {
        cluster.send(conn, frame(command, &[("transaction", "t")], b"x"));
    }
    cluster.send(
        conn,
        frame(Command::Disconnect, &[("receipt", "bye")], b"x"),
    );
    let frames = cluster.frames(conn);
    assert_eq!(
        frames.last().map(|f| f.command),
        Some(Command::Receipt),
        "{frames:?}"
    );
}

#[test]
fn server_frames_from_a_client_are_errors() {
    let mut cluster = Cluster::single();
    let conn = cluster.connect(0);
    cluster.send(conn, frame(Command::Message, &[], b""));
    assert_eq!(
        cluster.expect_error(conn).header("message"),
        Some("MESSAGE is a server frame")
    );
}

#[test]
fn decode_errors_become_error_frames() {
    let mut cluster = Cluster::single();
    let conn = cluster.connect(0);
    let mut out = Effects::new();
    cluster.shards[0].on_decode_error(
        conn,
        crate::codec::DecodeError::UnknownCommand {
            command: "HELLO".into(),
        },
        cluster.now,
        &mut out,
    );
    assert!(matches!(out.list.last(), Some(Effect::Close { .. })));
    let Effect::Write { bytes, .. } = &out.list[0] else {
        panic!("{:?}", out.list)
    };
    let text = String::from_utf8_lossy(out.slice(bytes)).to_string();
    // The `:` in the message is escaped as STOMP 1.2 requires.
    assert!(
        text.starts_with("ERROR\nmessage:malformed frame\\c unknown command \"HELLO\"\n"),
        "{text}"
    );
}

/// STOMP 1.2 "DISCONNECT": RECEIPT, then close.
#[test]
fn disconnect_with_receipt_answers_then_closes() {
    let mut cluster = Cluster::single();
    let conn = cluster.connect(0);
    cluster.send(conn, frame(Command::Disconnect, &[("receipt", "77")], b""));
    let seen = cluster.take(conn);
    match &seen[..] {
        [Seen::Frame(receipt), Seen::Closed] => {
            assert_eq!(receipt.command, Command::Receipt);
            assert_eq!(receipt.header("receipt-id"), Some("77"));
        }
        _ => panic!("{seen:?}"),
    }
    assert_eq!(cluster.shards[0].session_count(), 0);
}

#[test]
fn duplicate_subscription_id_is_an_error() {
    let mut cluster = Cluster::single();
    let conn = cluster.connect(0);
    cluster.subscribe(conn, "s", "/queue/a", "auto");
    cluster.subscribe(conn, "s", "/queue/b", "auto");
    assert_eq!(
        cluster.expect_error(conn).header("message"),
        Some("subscription id already in use")
    );
}

#[test]
fn unsubscribe_of_unknown_id_is_an_error() {
    let mut cluster = Cluster::single();
    let conn = cluster.connect(0);
    cluster.send(conn, frame(Command::Unsubscribe, &[("id", "nope")], b""));
    assert_eq!(
        cluster.expect_error(conn).header("message"),
        Some("unknown subscription")
    );
}

#[test]
fn subscriptions_per_connection_are_limited() {
    let config = BrokerConfig {
        subscriptions_per_connection_max: 2,
        ..BrokerConfig::default()
    };
    let mut cluster = Cluster::new(1, config);
    let conn = cluster.connect(0);
    cluster.subscribe(conn, "1", "/queue/a", "auto");
    cluster.subscribe(conn, "2", "/queue/a", "auto");
    cluster.subscribe(conn, "3", "/queue/a", "auto");
    assert_eq!(
        cluster.expect_error(conn).header("message"),
        Some("subscriptions_per_connection_max exceeded (at most 2)")
    );
}

#[test]
fn receipts_for_plain_frames_are_immediate() {
    let mut cluster = Cluster::single();
    let conn = cluster.connect(0);
    cluster.send(
        conn,
        frame(
            Command::Subscribe,
            &[("id", "1"), ("destination", "/queue/a"), ("receipt", "s")],
            b"",
        ),
    );
    let frames = cluster.frames(conn);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].command, Command::Receipt);
    assert_eq!(frames[0].header("receipt-id"), Some("s"));
}

/// STOMP 1.0 clients: no `id` on SUBSCRIBE, ACK by `message-id`.
#[test]
fn stomp_1_0_client_subscribes_and_acks_by_message_id() {
    let mut cluster = Cluster::single();
    let conn = cluster.open(0);
    cluster.send(conn, frame(Command::Connect, &[], b""));
    cluster.take(conn);
    cluster.send(
        conn,
        frame(
            Command::Subscribe,
            &[("destination", "/queue/a"), ("ack", "client")],
            b"",
        ),
    );
    cluster.publish(conn, "/queue/a", "one");
    let frames = cluster.frames(conn);
    assert_eq!(frames[0].header("subscription"), Some("/queue/a"));
    assert_eq!(
        frames[0].header("ack"),
        None,
        "1.0 and 1.1 have no ack header"
    );
    let message_id = frames[0].header("message-id").unwrap().to_string();
    cluster.send(
        conn,
        frame(Command::Ack, &[("message-id", &message_id)], b""),
    );
    assert!(cluster.take(conn).is_empty());
    assert!(cluster.shards[0].held_message_ids(b"/queue/a").is_empty());
}

/// STOMP 1.0 has no heart-beating: the header is ignored.
#[test]
fn stomp_1_0_ignores_heartbeat_header() {
    let mut cluster = Cluster::single();
    let conn = cluster.open(0);
    cluster.send(
        conn,
        frame(Command::Connect, &[("heart-beat", "1000,1000")], b""),
    );
    let connected = connected_frame(&mut cluster, conn);
    assert_eq!(connected.header("heart-beat"), None);
    assert_eq!(cluster.plans[&conn], HeartbeatPlan::default());
}

#[test]
fn frames_after_an_error_are_ignored() {
    let mut cluster = Cluster::single();
    let conn = cluster.connect(0);
    cluster.send(conn, frame(Command::Ack, &[("id", "nope")], b""));
    cluster.expect_error(conn);
    cluster.publish(conn, "/queue/a", "late");
    assert!(cluster.take(conn).is_empty());
    assert!(cluster.shards[0].held_message_ids(b"/queue/a").is_empty());
}

#[test]
fn pending_receipts_are_limited() {
    let config = BrokerConfig {
        log_enabled: true,
        receipts_wait_for_sync: true,
        receipts_pending_max: 2,
        ..BrokerConfig::default()
    };
    let mut cluster = Cluster::new(1, config);
    let conn = cluster.connect(0);
    for receipt in ["1", "2", "3"] {
        cluster.send(
            conn,
            frame(
                Command::Send,
                &[("destination", "/queue/a"), ("receipt", receipt)],
                b"x",
            ),
        );
    }
    let error = cluster.expect_error(conn);
    assert_eq!(
        error.header("message"),
        Some("receipts_pending_max exceeded (at most 2)")
    );
    assert_eq!(error.header("receipt-id"), Some("3"));
}

#[test]
fn transaction_bytes_are_limited() {
    let config = BrokerConfig {
        transaction_bytes_per_connection_max: 10,
        ..BrokerConfig::default()
    };
    let mut cluster = Cluster::new(1, config);
    let conn = cluster.connect(0);
    // Counted across the connection's transactions: a second one does not double the room.
    cluster.send(conn, frame(Command::Begin, &[("transaction", "t")], b""));
    cluster.send(conn, frame(Command::Begin, &[("transaction", "u")], b""));
    let headers = [("destination", "/queue/a"), ("transaction", "t")];
    cluster.send(conn, frame(Command::Send, &headers, b"123456"));
    assert!(cluster.take(conn).is_empty());
    let headers = [("destination", "/queue/a"), ("transaction", "u")];
    cluster.send(conn, frame(Command::Send, &headers, b"123456"));
    assert_eq!(
        cluster.expect_error(conn).header("message"),
        Some("transaction_bytes_per_connection_max exceeded (at most 10)")
    );
}

/// With `login_offloaded`, CONNECT asks the server to check the login off the core's thread.
#[test]
fn offloaded_login_waits_for_the_verdict() {
    let config = BrokerConfig {
        login_offloaded: true,
        ..BrokerConfig::default()
    };
    let mut cluster = Cluster::new(1, config);
    let good = cluster.open(0);
    cluster.send(
        good,
        frame(
            Command::Connect,
            &[
                ("accept-version", "1.2"),
                ("login", "alice"),
                ("passcode", "secret"),
                ("heart-beat", "0,1000"),
            ],
            b"",
        ),
    );
    assert!(cluster.take(good).is_empty(), "nothing before the verdict");
    assert_eq!(
        cluster.logins,
        [(good, b"alice".to_vec(), b"secret".to_vec())]
    );
    cluster.login_result(good, true);
    assert_eq!(
        connected_frame(&mut cluster, good).header("heart-beat"),
        Some("1000,0")
    );

    let bad = cluster.open(0);
    cluster.send(
        bad,
        frame(
            Command::Connect,
            &[("accept-version", "1.2"), ("login", "mallory")],
            b"",
        ),
    );
    cluster.login_result(bad, false);
    assert_eq!(cluster.throttles, [(bad, true)]);
    cluster.advance(BrokerConfig::default().login_failure_delay_ms);
    assert_eq!(
        cluster.expect_error(bad).header("message"),
        Some("login failed")
    );

    let eager = cluster.open(0);
    cluster.send(
        eager,
        frame(Command::Connect, &[("accept-version", "1.2")], b""),
    );
    cluster.send(
        eager,
        frame(
            Command::Subscribe,
            &[("id", "s"), ("destination", "/queue/a")],
            b"",
        ),
    );
    assert_eq!(
        cluster.expect_error(eager).header("message"),
        Some("SUBSCRIBE sent before CONNECTED (login still being checked)")
    );
}

/// A refused login's ERROR waits `login_failure_delay_ms` (not a millisecond less), so each
/// guess costs the guesser a second; its input is paused and frames that still reach the
/// shard are dropped, and the CONNECT's receipt is still answered.
#[test]
fn refused_login_is_answered_after_the_delay() {
    let config = BrokerConfig {
        login_failure_delay_ms: 700,
        ..BrokerConfig::default()
    };
    let mut cluster = Cluster::with_auth(1, config, Arc::new(FakeAuth));
    let bad = cluster.open(0);
    let connect = [
        ("accept-version", "1.2"),
        ("login", "alice"),
        ("passcode", "nope"),
        ("receipt", "c1"),
    ];
    cluster.send(bad, frame(Command::Connect, &connect, b""));
    assert_eq!(cluster.shards[0].login_timers_len(), (0, 1));
    // Its input is not read until the ERROR: nothing it sends can draw an earlier answer.
    assert_eq!(cluster.throttles, [(bad, true)]);
    cluster.advance(699);
    assert!(cluster.take(bad).is_empty(), "refused before the delay");
    cluster.send(
        bad,
        frame(Command::Send, &[("destination", "/queue/a")], b"x"),
    );
    assert!(
        cluster.take(bad).is_empty(),
        "frames after a refusal are dropped"
    );
    cluster.advance(1);
    let error = cluster.expect_error(bad);
    assert_eq!(error.header("message"), Some("login failed"));
    assert_eq!(error.header("receipt-id"), Some("c1"));
    assert!(
        cluster.shards[0].queue_stats().is_empty(),
        "the SEND went nowhere"
    );

    // A connection lost while it waits leaves nothing behind to fire later.
    let gone = cluster.open(0);
    cluster.send(gone, frame(Command::Connect, &connect, b""));
    cluster.lose(gone);
    assert_eq!(cluster.shards[0].login_timers_len(), (0, 0));
    cluster.advance(700);
    assert!(cluster.take(gone).is_empty());
    assert_eq!(cluster.shards[0].metrics().sessions, 0);

    // 0 answers at once.
    let config = BrokerConfig {
        login_failure_delay_ms: 0,
        ..BrokerConfig::default()
    };
    let mut cluster = Cluster::with_auth(1, config, Arc::new(FakeAuth));
    let bad = cluster.open(0);
    cluster.send(bad, frame(Command::Connect, &connect, b""));
    assert_eq!(
        cluster.expect_error(bad).header("message"),
        Some("login failed")
    );
}

/// A connection that sends no complete CONNECT within `connect_timeout_ms` is told why and
/// closed; bytes that are not a whole frame (heart-beat EOLs, half a CONNECT) do not extend
/// it. Once CONNECT has come, the timer is off, also while its login is being checked.
#[test]
fn connect_timeout_closes_connections_that_never_connect() {
    let config = BrokerConfig {
        connect_timeout_ms: 500,
        login_offloaded: true,
        ..BrokerConfig::default()
    };
    let mut cluster = Cluster::new(1, config);
    let silent = cluster.open(0);
    cluster.advance(250);
    let chatty = cluster.open(0);
    let checking = cluster.open(0);
    let connected = cluster.open(0);
    cluster.send(
        checking,
        frame(Command::Connect, &[("accept-version", "1.2")], b""),
    );
    cluster.send(
        connected,
        frame(Command::Connect, &[("accept-version", "1.2")], b""),
    );
    cluster.login_result(connected, true);
    connected_frame(&mut cluster, connected);
    cluster.advance(249);
    assert!(cluster.take(silent).is_empty(), "closed before its time");
    cluster.advance(1);
    assert_eq!(
        cluster.expect_error(silent).header("message"),
        Some("connect timeout, no complete CONNECT frame within 500 ms of connecting")
    );
    // Input that is not a frame counts as life for heart-beats, not as connecting.
    cluster.shards[0].on_input(chatty, cluster.now);
    cluster.advance(249);
    assert!(cluster.take(chatty).is_empty());
    cluster.advance(1);
    assert_eq!(
        cluster.expect_error(chatty).header("message"),
        Some("connect timeout, no complete CONNECT frame within 500 ms of connecting")
    );
    cluster.advance(10_000);
    assert!(
        cluster.take(checking).is_empty(),
        "a login being checked is not cut"
    );
    assert!(cluster.take(connected).is_empty());
    cluster.login_result(checking, true);
    connected_frame(&mut cluster, checking);
    assert_eq!(cluster.shards[0].metrics().sessions, 2);
    assert_eq!(cluster.shards[0].login_timers_len(), (0, 0));
    // Lost before connecting: its timer goes with it.
    let lost = cluster.open(0);
    assert_eq!(cluster.shards[0].login_timers_len(), (1, 0));
    cluster.lose(lost);
    assert_eq!(cluster.shards[0].login_timers_len(), (0, 0));
}

/// When the server cannot even queue a login for verification, the client hears so at once
/// (no refusal delay: it did nothing wrong) with a message naming the condition.
#[test]
fn login_queue_full_is_server_busy_at_once() {
    let config = BrokerConfig {
        login_offloaded: true,
        ..BrokerConfig::default()
    };
    let mut cluster = Cluster::new(1, config);
    let conn = cluster.open(0);
    cluster.send(
        conn,
        frame(
            Command::Connect,
            &[("accept-version", "1.2"), ("login", "a"), ("passcode", "b")],
            b"",
        ),
    );
    cluster.login_queue_full(conn);
    assert_eq!(
        cluster.expect_error(conn).header("message"),
        Some("server busy, too many logins already wait for verification; retry later")
    );
}

#[test]
fn shutdown_closes_every_connection_with_an_error_and_returns_unacked() {
    let mut cluster = Cluster::new(2, BrokerConfig::default());
    let queue = "/queue/kept";
    let other = 1 - shard_of(queue.as_bytes(), 2).0;
    let consumer = cluster.connect(other);
    cluster.subscribe(consumer, "s", queue, "client");
    cluster.publish(consumer, queue, "x");
    assert_eq!(bodies(&cluster.frames(consumer)), ["x"]);
    let mut out = Effects::new();
    cluster.shards[other as usize].on_shutdown(cluster.now, &mut out);
    let unsubscribes = out
        .list
        .iter()
        .filter(|e| {
            matches!(
                e,
                Effect::Peer {
                    message: ShardMessage::Unsubscribe { .. },
                    ..
                }
            )
        })
        .count();
    assert_eq!(unsubscribes, 1, "the consumer's queue hears it is gone");
    let Some(Effect::Write { bytes, .. }) = out.list.first() else {
        panic!("{:?}", out.list)
    };
    assert!(out
        .slice(bytes)
        .starts_with(b"ERROR\nmessage:server shutting down\n"));
    let closes = out
        .list
        .iter()
        .filter(|e| matches!(e, Effect::Close { .. }))
        .count();
    assert_eq!(closes, 1);
    assert_eq!(cluster.shards[other as usize].session_count(), 0);
}

/// STOMP 1.2 "Augmented BNF" (`frame = ... NULL *( EOL )`): every frame the broker writes
/// (CONNECTED, RECEIPT, MESSAGE, ERROR) ends NUL then LF, as ActiveMQ and stompserver write
/// them. stomper's StompBuffer (tests/interop) finds a frame's end by `\0\n` and held frames
/// ending in a bare NUL until more bytes came.
#[test]
fn every_frame_ends_with_nul_then_eol() {
    let mut cluster = Cluster::single();
    let conn = cluster.open(0);
    cluster.send(
        conn,
        frame(Command::Connect, &[("accept-version", "1.2")], b""),
    );
    cluster.send(
        conn,
        frame(
            Command::Subscribe,
            &[("destination", "/topic/t"), ("id", "1"), ("receipt", "r1")],
            b"",
        ),
    );
    cluster.send(
        conn,
        frame(Command::Send, &[("destination", "/topic/t")], b"body"),
    );
    cluster.send(
        conn,
        frame(Command::Commit, &[("transaction", "never")], b""),
    );

    let seen = cluster.take(conn);
    let commands: Vec<Command> = seen
        .iter()
        .filter_map(|seen| match seen {
            Seen::Frame(sent) => Some(sent.command),
            _ => None,
        })
        .collect();
    assert_eq!(
        commands,
        [
            Command::Connected,
            Command::Receipt,
            Command::Message,
            Command::Error
        ]
    );
    assert!(
        !seen.contains(&Seen::Heartbeat),
        "the trailer is not a heart-beat: {seen:?}"
    );
    let raw = &cluster.raw[&conn];
    let nuls: Vec<usize> = (0..raw.len()).filter(|&i| raw[i] == 0).collect();
    assert_eq!(nuls.len(), 4, "{}", String::from_utf8_lossy(raw));
    for at in nuls {
        assert_eq!(
            raw.get(at + 1),
            Some(&b'\n'),
            "NUL at {at} not followed by EOL: {}",
            String::from_utf8_lossy(raw)
        );
    }
}
