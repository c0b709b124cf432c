//! Bounded memory: a consumer that stops reading does not make the server buffer without
//! bound, and does not slow the others.

mod server_common;

use std::net::TcpStream;
use std::sync::mpsc;
use std::time::Duration;

use server_common::{eventually, test_config, Client, TestServer};
use socket2::{Domain, Socket, Type};
use stompd::codec::Command;

const OUT_LIMIT: usize = 64 * 1024;
const BODY_BYTES: usize = 16 * 1024;
const MESSAGES: usize = 2000;

fn out_bytes(server: &TestServer) -> u64 {
    server
        .stats
        .shards()
        .iter()
        .map(|shard| shard.out_bytes)
        .sum()
}

#[test]
fn a_consumer_that_never_reads_keeps_server_memory_bounded_while_another_proceeds() {
    let mut config = test_config(2);
    config.out_buffer_bytes_max = OUT_LIMIT;
    let server = TestServer::start(config);

    // The stalled consumer has a tiny receive buffer, so the kernel absorbs little for it.
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let mut stalled = Client::from_stream(TcpStream::from(socket));
    stalled.stomp_connect();
    stalled.send(b"SUBSCRIBE\nid:0\ndestination:/topic/flood\nreceipt:s\n\n\0");
    assert_eq!(stalled.read_frame().command, Command::Receipt);

    let mut fast = server.client();
    fast.stomp_connect();
    fast.send(b"SUBSCRIBE\nid:0\ndestination:/topic/flood\nreceipt:s\n\n\0");
    assert_eq!(fast.read_frame().command, Command::Receipt);
    let (arrived, arrivals) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for index in 0..MESSAGES {
            let message = fast.read_frame();
            assert_eq!(message.command, Command::Message);
            assert_eq!(message.body.len(), BODY_BYTES);
            assert_eq!(message.body[0], (index % 251) as u8);
            arrived.send(index).unwrap();
        }
    });

    // 32 MiB in all: far more than the stalled consumer's socket buffers can absorb. Each
    // message is sent once the fast consumer has the previous one, so the fast consumer's own
    // out buffer never nears the limit and it must get every message.
    let mut producer = server.client();
    producer.stomp_connect();
    let mut out_bytes_max = 0;
    for index in 0..MESSAGES {
        let mut frame =
            format!("SEND\ndestination:/topic/flood\ncontent-length:{BODY_BYTES}\n\n").into_bytes();
        frame.extend(std::iter::repeat((index % 251) as u8).take(BODY_BYTES));
        frame.push(0);
        producer.send(&frame);
        assert_eq!(
            arrivals.recv_timeout(server_common::READ_TIMEOUT),
            Ok(index)
        );
        out_bytes_max = out_bytes_max.max(out_bytes(&server));
    }
    reader.join().expect("the fast consumer got every message");

    // One MESSAGE frame: the body plus its headers.
    let frame_bytes = (BODY_BYTES + 256) as u64;
    assert!(
        out_bytes_max <= OUT_LIMIT as u64 + frame_bytes,
        "buffered {out_bytes_max} bytes for a consumer that does not read"
    );
    // The limit, not the kernel, is what held it: the stalled connection's buffer filled to it.
    assert!(
        eventually(Duration::from_secs(10), || out_bytes(&server)
            >= (OUT_LIMIT / 2) as u64),
        "the stalled consumer's out buffer reached the limit"
    );
    assert!(out_bytes(&server) <= OUT_LIMIT as u64 + frame_bytes);

    // The stalled consumer is still connected and gets what was kept for it.
    let message = stalled.read_frame();
    assert_eq!(message.command, Command::Message);
}

/// Bytes a message body must stay under to be copied into the out buffer's owned chunks
/// (larger ones are shared and charged through their message).
const SMALL_BODY_BYTES: usize = 400;

fn connections_open(server: &TestServer) -> u64 {
    server
        .stats
        .shards()
        .iter()
        .map(|shard| shard.connections_open)
        .sum()
}

#[test]
fn out_buffers_are_charged_to_the_memory_budget_until_their_connection_goes() {
    let memory = stompd::broker::MemoryBudget::leak(u64::MAX);
    let mut config = test_config(2);
    config.out_buffer_bytes_max = OUT_LIMIT;
    config.memory = memory;
    let server = TestServer::start(config);

    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let mut stalled = Client::from_stream(TcpStream::from(socket));
    stalled.stomp_connect();
    stalled.send(b"SUBSCRIBE\nid:0\ndestination:/topic/small\nreceipt:s\n\n\0");
    assert_eq!(stalled.read_frame().command, Command::Receipt);

    // Small messages, a MiB at a time, until the stalled consumer's out buffer holds at least
    // half its limit (the kernel's socket buffers fill first; the relay drops what does not
    // fit). Each RECEIPT comes after its batch was handled.
    let mut producer = server.client();
    producer.stomp_connect();
    let mut frame =
        format!("SEND\ndestination:/topic/small\ncontent-length:{SMALL_BODY_BYTES}\n\n")
            .into_bytes();
    frame.extend(std::iter::repeat(b'x').take(SMALL_BODY_BYTES));
    frame.push(0);
    let mut batches = 0;
    while out_bytes(&server) < (OUT_LIMIT / 2) as u64 {
        assert!(
            batches < 256,
            "256 MiB sent and the out buffer never filled"
        );
        for _ in 0..(1 << 20) / frame.len() {
            producer.send(&frame);
        }
        producer.send(b"SUBSCRIBE\nid:1\ndestination:/topic/other\nreceipt:r\n\n\0");
        assert_eq!(producer.read_frame().command, Command::Receipt);
        producer.send(b"UNSUBSCRIBE\nid:1\n\n\0");
        batches += 1;
    }
    producer.send(b"DISCONNECT\nreceipt:done\n\n\0");
    assert_eq!(producer.read_frame().command, Command::Receipt);
    drop(producer);

    // Only the stalled consumer is left, and its out buffer holds copies only: at least the
    // bytes it holds are charged.
    assert!(
        eventually(Duration::from_secs(10), || connections_open(&server) == 1
            && out_bytes(&server) >= (OUT_LIMIT / 2) as u64
            && memory.charged() >= out_bytes(&server)),
        "the stalled consumer's out buffer is charged: {} charged for {} bytes held, {} open",
        memory.charged(),
        out_bytes(&server),
        connections_open(&server)
    );
    let held = out_bytes(&server);
    let charged = memory.charged();

    // Its charge goes with it. (Released slots keep a small reassembly buffer for the next
    // connection, still charged: only the out buffer's share is known to go.)
    drop(stalled);
    assert!(
        eventually(Duration::from_secs(10), || connections_open(&server) == 0
            && memory.charged() + held <= charged),
        "a closed connection's out buffer is no longer charged: {} of {charged} left, {held} \
         held before, {} open",
        memory.charged(),
        connections_open(&server)
    );

    // And a stopped server gives back everything its buffers were charged.
    server.stop().expect("the server stops cleanly");
    assert_eq!(memory.charged(), 0, "charged after the server stopped");
}
