//! One connection's flood does not hold up the others: each connection decodes a bounded
//! number of frames per loop turn, and the rest of its input waits for the next turn, in order.
//! (Measured here: the other connection's frame was handled after 8,191 of the flood's
//! frames, two turns, where without the budget it came after about 86,000.)

mod server_common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use server_common::{test_config, READ_TIMEOUT};
use stompd::codec::Frame;
use stompd::server::{
    CloseReason, ConnId, Server, ShardHandler, ShardId, ShardIo, Shutdown, StatsHandle,
};

/// Frames in the flood: far more than one turn's budget (4,096), and small, so a receive
/// batch holds many turns' worth.
const FLOOD_FRAMES: usize = 200_000;

/// Records, in the order handled, the body of every frame: the flood's frames carry their
/// index, the other connection's frame says "other". Answers "done" to the flood's last frame.
struct Recorder {
    seen: Arc<Mutex<Vec<String>>>,
}

impl ShardHandler for Recorder {
    type PeerMsg = ();

    fn on_open(&mut self, _conn: ConnId, _io: &mut ShardIo<'_, ()>) {}

    fn on_frame(&mut self, conn: ConnId, frame: &Frame<'_>, io: &mut ShardIo<'_, ()>) {
        let body = String::from_utf8_lossy(frame.body).into_owned();
        let last = body == (FLOOD_FRAMES - 1).to_string();
        self.seen.lock().unwrap().push(body);
        if last || frame.body == b"other" {
            io.write(conn, b"done\n");
        }
    }

    fn on_close(&mut self, _conn: ConnId, _reason: &CloseReason, _io: &mut ShardIo<'_, ()>) {}

    fn on_peer(&mut self, _from: ShardId, _msg: (), _io: &mut ShardIo<'_, ()>) {}
}

/// Times a connection used its frame budget for a loop turn (frames or bytes), over all shards.
fn frame_budget_spent(stats: &StatsHandle) -> u64 {
    stats
        .shards()
        .iter()
        .map(|shard| shard.frame_budget_spent)
        .sum()
}

fn read_done(stream: &mut TcpStream) {
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut got = Vec::new();
    while !got.ends_with(b"done\n") {
        assert!(Instant::now() < deadline, "no answer");
        let mut chunk = [0u8; 64];
        let n = stream
            .read(&mut chunk)
            .expect("answer within the read timeout");
        assert!(n > 0, "closed");
        got.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn a_flooding_connection_does_not_hold_up_another_and_keeps_its_order() {
    let server = Server::bind(test_config(1)).unwrap();
    let addr = server.local_addr();
    let stats = server.stats();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let shutdown = Shutdown::new();
    let thread = {
        let (seen, shutdown) = (seen.clone(), shutdown.clone());
        std::thread::spawn(move || {
            server.run(move |_, _| Recorder { seen: seen.clone() }, shutdown)
        })
    };

    let mut flood = TcpStream::connect(addr).unwrap();
    let mut other = TcpStream::connect(addr).unwrap();
    for stream in [&flood, &other] {
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
    }
    let mut bytes = Vec::new();
    for n in 0..FLOOD_FRAMES {
        bytes.extend_from_slice(format!("SEND\n\n{n}\0").as_bytes());
    }
    flood.write_all(&bytes).unwrap();
    // Written after the whole flood reached the server's side.
    other.write_all(b"SEND\n\nother\0").unwrap();
    read_done(&mut other);
    read_done(&mut flood);

    let seen = seen.lock().unwrap().clone();
    let budget_spent = frame_budget_spent(&stats);
    shutdown.trigger();
    thread.join().unwrap().unwrap();
    let other_at = seen.iter().position(|body| body == "other").unwrap();
    let flood: Vec<&String> = seen.iter().filter(|body| *body != "other").collect();
    assert_eq!(flood.len(), FLOOD_FRAMES);
    assert!(
        flood
            .iter()
            .enumerate()
            .all(|(n, body)| **body == n.to_string()),
        "the flood's frames were reordered or lost"
    );
    // 200,000 frames at most 4,096 a turn: the flood waited for a later turn at least 48
    // times, which is when the other connection's frame got its turn.
    assert!(
        budget_spent >= 48,
        "the budget was spent {budget_spent} times"
    );
    assert!(
        other_at < FLOOD_FRAMES,
        "the other connection's frame waited for the whole flood"
    );
}

/// Counts frames and answers "done" to the one whose body is "last".
struct Counter {
    frames: Arc<Mutex<usize>>,
}

impl ShardHandler for Counter {
    type PeerMsg = ();

    fn on_open(&mut self, _conn: ConnId, _io: &mut ShardIo<'_, ()>) {}

    fn on_frame(&mut self, conn: ConnId, frame: &Frame<'_>, io: &mut ShardIo<'_, ()>) {
        *self.frames.lock().unwrap() += 1;
        if frame.body == b"last" {
            io.write(conn, b"done\n");
        }
    }

    fn on_close(&mut self, _conn: ConnId, _reason: &CloseReason, _io: &mut ShardIo<'_, ()>) {}

    fn on_peer(&mut self, _from: ShardId, _msg: (), _io: &mut ShardIo<'_, ()>) {}
}

/// Large frames are bounded per turn by their bytes (64 KiB), not only by their count: 3 MiB
/// of 1 KiB frames, far fewer than 4,096 a turn would allow, still wait for later turns, and
/// every one of them is handled.
#[test]
fn a_flood_of_large_frames_is_bounded_per_turn_by_bytes() {
    let server = Server::bind(test_config(1)).unwrap();
    let addr = server.local_addr();
    let stats = server.stats();
    let frames = Arc::new(Mutex::new(0usize));
    let shutdown = Shutdown::new();
    let thread = {
        let (frames, shutdown) = (frames.clone(), shutdown.clone());
        std::thread::spawn(move || {
            server.run(
                move |_, _| Counter {
                    frames: frames.clone(),
                },
                shutdown,
            )
        })
    };

    let mut flood = TcpStream::connect(addr).unwrap();
    flood.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    flood.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
    let body = "x".repeat(1024);
    let count = 3000;
    let mut bytes = Vec::new();
    for _ in 0..count {
        bytes.extend_from_slice(
            format!("SEND\ncontent-length:{}\n\n{body}\0", body.len()).as_bytes(),
        );
    }
    bytes.extend_from_slice(b"SEND\n\nlast\0");
    flood.write_all(&bytes).unwrap();
    read_done(&mut flood);

    let budget_spent = frame_budget_spent(&stats);
    shutdown.trigger();
    thread.join().unwrap().unwrap();
    assert_eq!(*frames.lock().unwrap(), count + 1);
    // 3 MiB at most 64 KiB a turn: when the receives deliver faster than the loop turns, the
    // connection waits for a later turn; under the frame count alone it never would.
    assert!(budget_spent >= 1, "the byte budget was never spent");
}
