//! Cost of the broker logic per message, without I/O: a SEND through a session, the queue, and
//! out as a MESSAGE head to an auto-ack consumer on the same shard, and the same across two
//! shards (the peer message handed over by hand, as the server would).

use std::borrow::Cow;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use stompd::broker::{AllowAll, BrokerConfig, Effect, Effects, Shard, ShardId};
use stompd::codec::{Command, Frame, Header};

fn frame<'a>(command: Command, headers: &[(&str, &str)]) -> Frame<'a> {
    let mut frame = Frame::new(command);
    for (name, value) in headers {
        frame.headers.push(Header {
            name: Cow::Owned(name.as_bytes().to_vec()),
            value: Cow::Owned(value.as_bytes().to_vec()),
        });
    }
    frame
}

fn shards(count: u16) -> Vec<Shard> {
    (0..count)
        .map(|id| {
            Shard::new(
                ShardId(id),
                count,
                BrokerConfig::default(),
                Arc::new(AllowAll),
                1,
            )
        })
        .collect()
}

fn publish_to_auto_consumer(c: &mut Criterion) {
    let mut group = c.benchmark_group("broker");
    group.throughput(Throughput::Elements(1));
    let body = vec![b'x'; 100];
    let mut send = frame(
        Command::Send,
        &[
            ("destination", "/queue/bench"),
            ("content-type", "text/plain"),
        ],
    );
    send.body = &body;

    group.bench_function("send_to_local_auto_consumer", |b| {
        let mut shards = shards(1);
        let shard = &mut shards[0];
        let mut out = Effects::new();
        let now = 1_000;
        let connect = frame(Command::Connect, &[("accept-version", "1.2")]);
        let consumer = shard.open_connection(now);
        shard.on_frame(consumer, &connect, now, &mut out);
        let subscribe = frame(
            Command::Subscribe,
            &[("id", "s"), ("destination", "/queue/bench")],
        );
        shard.on_frame(consumer, &subscribe, now, &mut out);
        let producer = shard.open_connection(now);
        shard.on_frame(producer, &connect, now, &mut out);
        b.iter(|| {
            out.clear();
            shard.on_frame(producer, &send, now, &mut out);
            shard.on_flushed(consumer, now, &mut out);
            assert!(!out.list.is_empty());
        });
    });

    group.bench_function("send_to_auto_consumer_on_another_shard", |b| {
        let mut shards = shards(2);
        let queue_shard = stompd::broker::shard_of(b"/queue/bench", 2).0 as usize;
        let other = 1 - queue_shard;
        let mut out = Effects::new();
        let now = 1_000;
        let connect = frame(Command::Connect, &[("accept-version", "1.2")]);
        let consumer = shards[other].open_connection(now);
        shards[other].on_frame(consumer, &connect, now, &mut out);
        let subscribe = frame(
            Command::Subscribe,
            &[("id", "s"), ("destination", "/queue/bench")],
        );
        shards[other].on_frame(consumer, &subscribe, now, &mut out);
        let producer = shards[other].open_connection(now);
        shards[other].on_frame(producer, &connect, now, &mut out);
        let mut pending: Vec<(usize, stompd::broker::ShardMessage)> = Vec::new();
        let mut relay = |shards: &mut Vec<Shard>, out: &mut Effects| loop {
            pending.clear();
            for effect in out.list.drain(..) {
                if let Effect::Peer { to, message } = effect {
                    pending.push((to.0 as usize, message));
                }
            }
            out.bytes.clear();
            if pending.is_empty() {
                return;
            }
            for (to, message) in pending.drain(..) {
                shards[to].on_peer_message(message, now, out);
            }
        };
        relay(&mut shards, &mut out);
        b.iter(|| {
            out.clear();
            shards[other].on_frame(producer, &send, now, &mut out);
            relay(&mut shards, &mut out);
            shards[other].on_flushed(consumer, now, &mut out);
            relay(&mut shards, &mut out);
        });
    });
    group.finish();
}

criterion_group!(benches, publish_to_auto_consumer);
criterion_main!(benches);
