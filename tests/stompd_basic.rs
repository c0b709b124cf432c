//! The `stompd` binary as a client sees it: one command starts a broker that speaks STOMP
//! (1.0 and 1.2 sessions, queues, topics, acks, receipts, errors, heart-beats, logins, memory
//! queues) and stops cleanly on SIGTERM. Each test runs its own broker on a free port with its
//! own data directory.

mod stompd_common;

use std::time::Duration;

use stompd_common::{Broker, Client};

#[test]
fn stomp_1_2_and_1_0_sessions_connect() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &["--shards", "2"]);
    // STOMP 1.2 "CONNECT or STOMP Frame": the highest common version is chosen.
    let (_client, reply) = Client::login(broker.port, "accept-version:1.0,1.1,1.2\n");
    assert_eq!(reply.command, "CONNECTED");
    assert_eq!(reply.header("version"), Some("1.2"));
    assert!(reply.header("server").unwrap().starts_with("stompd/"));
    // No accept-version: a STOMP 1.0 client.
    let (mut old, reply) = Client::login(broker.port, "");
    assert_eq!(reply.command, "CONNECTED");
    // A 1.0 CONNECTED may omit the version (1.0 had no such header).
    assert!(
        matches!(reply.header("version"), None | Some("1.0")),
        "{reply:?}"
    );
    old.send("SUBSCRIBE\ndestination:/queue/old\n\n\0");
    old.send("SEND\ndestination:/queue/old\n\nfrom 1.0\0");
    let message = old.expect_frame();
    assert_eq!(message.command, "MESSAGE");
    assert_eq!(message.body_str(), "from 1.0");
    assert_eq!(message.header("destination"), Some("/queue/old"));
}

#[test]
fn queue_send_subscribe_ack_and_receipts() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &["--shards", "2"]);
    let mut consumer = Client::stomp12(broker.port);
    consumer.subscribe("s1", "/queue/work", "client-individual");
    let mut producer = Client::stomp12(broker.port);
    for n in 0..3 {
        producer.publish(
            "/queue/work",
            &format!("receipt:p{n}\n"),
            &format!("job {n}"),
        );
        let receipt = producer.expect_frame();
        assert_eq!(receipt.command, "RECEIPT");
        assert_eq!(receipt.header("receipt-id"), Some(format!("p{n}").as_str()));
    }
    let messages: Vec<_> = (0..3).map(|_| consumer.expect_frame()).collect();
    for (n, message) in messages.iter().enumerate() {
        assert_eq!(message.command, "MESSAGE");
        assert_eq!(message.body_str(), format!("job {n}"));
        assert_eq!(message.header("subscription"), Some("s1"));
        let ack = message
            .header("ack")
            .expect("1.2 client acks carry an ack header");
        consumer.send(&format!("ACK\nid:{ack}\nreceipt:a{n}\n\n\0"));
        let receipt = consumer.expect_frame();
        assert_eq!(receipt.header("receipt-id"), Some(format!("a{n}").as_str()));
    }
    // Acked messages are gone: a second consumer gets nothing.
    let mut late = Client::stomp12(broker.port);
    late.subscribe("s2", "/queue/work", "auto");
    assert!(late.read_frame(Duration::from_millis(300)).is_none());
    // STOMP 1.2 "DISCONNECT": the receipt comes, then the connection closes.
    consumer.send("DISCONNECT\nreceipt:bye\n\n\0");
    let receipt = consumer.expect_frame();
    assert_eq!(receipt.command, "RECEIPT");
    assert_eq!(receipt.header("receipt-id"), Some("bye"));
    assert!(consumer.closed_within(Duration::from_secs(5)));
}

#[test]
fn topic_messages_reach_every_subscriber() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &["--shards", "2"]);
    let mut a = Client::stomp12(broker.port);
    a.subscribe("t", "/topic/news", "auto");
    let mut b = Client::stomp12(broker.port);
    b.subscribe("t", "/topic/news", "auto");
    let mut producer = Client::stomp12(broker.port);
    producer.publish("/topic/news", "receipt:r\n", "extra!");
    assert_eq!(producer.expect_frame().command, "RECEIPT");
    for client in [&mut a, &mut b] {
        let message = client.expect_frame();
        assert_eq!(message.command, "MESSAGE");
        assert_eq!(message.body_str(), "extra!");
        assert_eq!(message.header("destination"), Some("/topic/news"));
    }
}

#[test]
fn a_malformed_frame_gets_an_error_and_others_are_unaffected() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &["--shards", "2"]);
    let mut good = Client::stomp12(broker.port);
    good.subscribe("s", "/queue/fine", "auto");
    let mut bad = Client::stomp12(broker.port);
    bad.send("HELLO\n\n\0");
    let error = bad.expect_frame();
    assert_eq!(error.command, "ERROR");
    assert!(error.header("message").is_some(), "{error:?}");
    assert!(bad.closed_within(Duration::from_secs(5)));
    // A SEND without a destination is a broker-level ERROR too.
    let mut bad = Client::stomp12(broker.port);
    bad.send("SEND\n\nno destination\0");
    assert_eq!(bad.expect_frame().command, "ERROR");
    assert!(bad.closed_within(Duration::from_secs(5)));

    let mut producer = Client::stomp12(broker.port);
    producer.publish("/queue/fine", "", "still here");
    assert_eq!(good.expect_frame().body_str(), "still here");
}

#[test]
fn a_silent_client_is_closed_after_the_heartbeat_grace() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(
        dir.path(),
        &["--shards", "1", "--heartbeat-receive-ms", "1000"],
    );
    // STOMP 1.2 "Heart-beating": we promise a beat every second, then send nothing.
    let (mut silent, reply) = Client::login(broker.port, "accept-version:1.2\nheart-beat:1000,0\n");
    assert_eq!(reply.header("heart-beat"), Some("0,1000"));
    let (mut beating, _) = Client::login(broker.port, "accept-version:1.2\nheart-beat:1000,0\n");
    let mut closed = false;
    for _ in 0..20 {
        beating.send("\n");
        if silent.closed_within(Duration::from_millis(500)) {
            closed = true;
            break;
        }
    }
    assert!(closed, "the silent client was not closed within 10 s");
    // The one that beats is still served.
    beating.send("SEND\ndestination:/queue/hb\nreceipt:r\n\nx\0");
    assert_eq!(beating.expect_frame().command, "RECEIPT");
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path(), &["--shards", "2"]);
    let mut client = Client::stomp12(broker.port);
    client.publish("/queue/a", "receipt:r\n", "x");
    assert_eq!(client.expect_frame().command, "RECEIPT");
    let status = broker.signal_and_wait(libc::SIGTERM, Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{}", broker.stderr());
    assert!(client.closed_within(Duration::from_secs(5)));
}

#[test]
fn memory_queues_work_and_write_no_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &["--shards", "2", "--queue-type", "memory"]);
    let mut client = Client::stomp12(broker.port);
    client.publish("/queue/m", "receipt:r\n", "in memory");
    assert_eq!(client.expect_frame().command, "RECEIPT");
    client.subscribe("s", "/queue/m", "auto");
    assert_eq!(client.expect_frame().body_str(), "in memory");
    assert!(
        !broker.data_dir.exists(),
        "memory queues wrote a data directory"
    );
}

#[test]
fn a_second_broker_on_the_same_data_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Broker::start(dir.path(), &["--shards", "1"]);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_stompd"))
        .args(["--listen", "127.0.0.1:0", "--shards", "1", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("in use by another stompd"), "{stderr}");
}

#[test]
fn a_data_directory_of_more_shards_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("data/shard-3")).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_stompd"))
        .args(["--listen", "127.0.0.1:0", "--shards", "2", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--shards 4"), "{stderr}");
}

#[test]
fn logins_are_checked_against_the_password_file() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    let hash = stompd::auth::hash_password(b"s3cret").unwrap();
    std::fs::write(&users, format!("alice:{hash}\n")).unwrap();
    let broker = Broker::start(
        dir.path(),
        &["--shards", "2", "--auth-file", users.to_str().unwrap()],
    );
    let (mut good, reply) = Client::login(
        broker.port,
        "accept-version:1.2\nlogin:alice\npasscode:s3cret\n",
    );
    assert_eq!(reply.command, "CONNECTED", "{reply:?}");
    good.publish("/queue/auth", "receipt:r\n", "x");
    assert_eq!(good.expect_frame().command, "RECEIPT");
    for extra in [
        "login:alice\npasscode:wrong\n",
        "login:mallory\npasscode:s3cret\n",
        "",
    ] {
        let (mut bad, reply) = Client::login(broker.port, &format!("accept-version:1.2\n{extra}"));
        assert_eq!(reply.command, "ERROR", "{extra:?}: {reply:?}");
        assert!(bad.closed_within(Duration::from_secs(5)));
    }
}

/// With a file-size limit below one log segment (`ulimit -f`), the log cannot store anything:
/// a persistent SEND without a receipt gets an ERROR naming why (it must not be dropped in
/// silence), the broker stays up (SIGXFSZ does not kill it), and other connections go on.
#[test]
fn a_send_without_receipt_the_log_cannot_store_gets_an_error_and_others_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start_file_size_limited(dir.path(), &["--shards", "1"], 64 * 1024);
    let mut producer = Client::stomp12(broker.port);
    producer.publish("/queue/full", "", "lost?");
    let error = producer.expect_frame();
    assert_eq!(error.command, "ERROR", "{error:?}");
    // The raw client does not unescape: `\c` is the colon (STOMP 1.2 "Value Encoding").
    assert_eq!(
        error.header("message"),
        Some("message not stored\\c the broker's storage is full")
    );
    assert!(producer.closed_within(Duration::from_secs(10)));
    // Topics keep nothing on disk: they still work.
    let mut subscriber = Client::stomp12(broker.port);
    subscriber.subscribe("s", "/topic/alive", "auto");
    let mut other = Client::stomp12(broker.port);
    other.publish("/topic/alive", "", "still here");
    let message = subscriber.expect_frame();
    assert_eq!(message.body_str(), "still here");
    // Nothing was stored, so nothing is delivered from the queue.
    subscriber.subscribe("q", "/queue/full", "auto");
    assert!(subscriber.read_frame(Duration::from_millis(300)).is_none());
}
