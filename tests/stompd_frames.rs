//! Frames as other brokers take them, against the real binary: a stray body on a frame that
//! has none is ignored, a body of exactly `body_bytes_max` fits the default frame limit, the
//! heart-beat a client asks for is granted down to 1 s; and headers with a NUL octet, or with
//! invalid UTF-8 in STOMP 1.1/1.2, get an ERROR naming the header and the connection closed.

mod stompd_common;

use std::time::Duration;

use stompd_common::{Broker, Client};

#[test]
fn a_stray_body_on_connect_and_subscribe_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &["--shards", "1"]);
    let mut client = Client::connect(broker.port);
    client.send("CONNECT\naccept-version:1.2\nlogin:guest\npasscode:guest\n\n\n\0");
    let reply = client.expect_frame();
    assert_eq!(reply.command, "CONNECTED", "{reply:?}");
    client.send("SUBSCRIBE\nid:1\ndestination:/queue/stray\nreceipt:r\n\n\n\0");
    let receipt = client.expect_frame();
    assert_eq!(receipt.command, "RECEIPT", "{receipt:?}");
    client.publish("/queue/stray", "", "hello");
    let message = client.expect_frame();
    assert_eq!(
        (message.command.as_str(), message.body_str().as_str()),
        ("MESSAGE", "hello")
    );
}

#[test]
fn a_body_of_exactly_the_default_body_limit_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &["--shards", "1", "--queue-type", "memory"]);
    let mut client = Client::stomp12(broker.port);
    let body = vec![b'x'; 16 * 1024 * 1024];
    let mut frame = format!(
        "SEND\ndestination:/queue/big\ncontent-length:{}\nreceipt:big\n\n",
        body.len()
    )
    .into_bytes();
    frame.extend_from_slice(&body);
    frame.push(0);
    client.send_bytes(&frame);
    let receipt = client.expect_frame();
    assert_eq!(receipt.command, "RECEIPT", "{receipt:?}");
}

#[test]
fn the_heart_beat_a_client_asks_for_is_granted_down_to_one_second() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &["--shards", "1", "--queue-type", "memory"]);
    for (asked, granted) in [
        ("1000,1000", "1000,1000"),
        ("500,200", "1000,1000"),
        ("0,30000", "30000,0"),
    ] {
        let (_client, reply) = Client::login(
            broker.port,
            &format!("accept-version:1.2\nheart-beat:{asked}\n"),
        );
        assert_eq!(
            reply.header("heart-beat"),
            Some(granted),
            "{asked}: {reply:?}"
        );
    }
}

/// Sends `raw` on a fresh 1.2 session and returns the ERROR's `message`, checking that the
/// connection is then closed.
fn refused(port: u16, raw: &[u8]) -> String {
    let mut client = Client::stomp12(port);
    client.send_bytes(raw);
    let error = client.expect_frame();
    assert_eq!(error.command, "ERROR", "{error:?}");
    assert!(
        client.closed_within(Duration::from_secs(10)),
        "closed after the ERROR"
    );
    error.header("message").unwrap_or_default().to_owned()
}

#[test]
fn a_nul_or_invalid_utf8_in_a_header_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &["--shards", "1", "--queue-type", "memory"]);
    let message = refused(
        broker.port,
        b"SEND\ndestination:/queue/a\nx-trace:ab\0cd\ncontent-length:1\n\nz\0",
    );
    assert!(message.contains("x-trace"), "{message}");
    assert!(message.contains("NUL"), "{message}");
    let message = refused(
        broker.port,
        b"SEND\ndestination:/queue/a\nx-na\xffme:1\n\nz\0",
    );
    assert!(message.contains("UTF-8"), "{message}");
    let message = refused(
        broker.port,
        b"SEND\ndestination:/queue/a\nx-latin:caf\xe9\n\nz\0",
    );
    assert!(
        message.contains("x-latin") && message.contains("UTF-8"),
        "{message}"
    );

    // STOMP 1.0 has no UTF-8 rule: the same header is relayed as sent.
    let (mut old, reply) = Client::login(broker.port, "");
    assert_eq!(reply.command, "CONNECTED");
    old.send("SUBSCRIBE\ndestination:/queue/latin\nreceipt:r\n\n\0");
    assert_eq!(old.expect_frame().command, "RECEIPT");
    old.send_bytes(b"SEND\ndestination:/queue/latin\nx-latin:caf\xe9\n\nz\0");
    let message = old.expect_frame();
    assert_eq!(message.command, "MESSAGE", "{message:?}");
}
