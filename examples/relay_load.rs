//! A tiny load generator for `relay_server`, for quick sanity checks of the transport (not a
//! benchmark harness): `relay_load ADDR PRODUCERS MESSAGES BODY_BYTES`. One consumer subscribes
//! to /topic/load; each producer pipelines MESSAGES SENDs of BODY_BYTES in 64 KiB writes. Prints
//! how many MESSAGE frames the consumer got and how fast. The relay skips deliveries to a full
//! consumer, so "delivered" may be below "sent" when the consumer falls behind.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 4 {
        eprintln!("usage: relay_load ADDR PRODUCERS MESSAGES BODY_BYTES");
        std::process::exit(2);
    }
    let addr = args[0].clone();
    let producers: usize = args[1].parse().expect("PRODUCERS");
    let messages: usize = args[2].parse().expect("MESSAGES");
    let body_bytes: usize = args[3].parse().expect("BODY_BYTES");

    let mut consumer = TcpStream::connect(&addr).expect("connect");
    consumer.set_nodelay(true).unwrap();
    consumer
        .write_all(b"CONNECT\naccept-version:1.2\n\n\0SUBSCRIBE\nid:0\ndestination:/topic/load\nreceipt:s\n\n\0")
        .unwrap();
    let mut buffer = vec![0u8; 256 * 1024];
    let mut seen = Vec::new();
    while !seen.windows(10).any(|window| window == b"receipt-id") {
        let count = consumer.read(&mut buffer).unwrap();
        assert!(count > 0);
        seen.extend_from_slice(&buffer[..count]);
    }

    let start = Instant::now();
    let threads: Vec<_> = (0..producers)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(&addr).expect("connect");
                stream.set_nodelay(true).unwrap();
                stream
                    .write_all(b"CONNECT\naccept-version:1.2\n\n\0")
                    .unwrap();
                let frame = {
                    let mut frame =
                        format!("SEND\ndestination:/topic/load\ncontent-length:{body_bytes}\n\n")
                            .into_bytes();
                    frame.extend(std::iter::repeat(b'x').take(body_bytes));
                    frame.push(0);
                    frame
                };
                let mut batch = Vec::with_capacity(64 * 1024 + frame.len());
                for _ in 0..messages {
                    batch.extend_from_slice(&frame);
                    if batch.len() >= 64 * 1024 {
                        stream.write_all(&batch).unwrap();
                        batch.clear();
                    }
                }
                stream.write_all(&batch).unwrap();
                // Keep the connection open until the consumer is done.
                std::thread::sleep(Duration::from_secs(2));
            })
        })
        .collect();

    let expected = producers * messages;
    let mut delivered = 0usize;
    let mut last = Instant::now();
    consumer
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let marker = b"MESSAGE\n";
    let mut tail: Vec<u8> = Vec::new();
    while delivered < expected {
        match consumer.read(&mut buffer) {
            Ok(0) => break,
            Ok(count) => {
                tail.extend_from_slice(&buffer[..count]);
                delivered += memchr::memmem::find_iter(&tail, marker).count();
                let keep = tail.len().saturating_sub(marker.len() - 1);
                tail.drain(..keep);
                last = Instant::now();
            }
            Err(_) => break,
        }
    }
    let elapsed = last.duration_since(start).as_secs_f64();
    println!(
        "producers={producers} sent={expected} delivered={delivered} body={body_bytes}B \
         elapsed={elapsed:.3}s delivered/s={:.0}",
        delivered as f64 / elapsed
    );
    for thread in threads {
        thread.join().unwrap();
    }
}
