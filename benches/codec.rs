//! Codec throughput: decoding and encoding a SEND with five headers, as stomp.py sends it, with
//! a 128-byte and a 1 KiB body. Each benchmark runs in two groups, `codec_frames` (frames per
//! second) and `codec_bytes` (bytes per second), so criterion reports both rates.
//!
//! Target: decoding the 128-byte SEND in at most 200 ns on one core (5 M frames/s).
//!
//! ```text
//! cargo bench --bench codec -- --warm-up-time 1 --measurement-time 3
//! ```

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use stompd::codec::{Command, Decoded, Decoder, FrameWriter, Limits, Version};

const BODY_SIZES: [usize; 2] = [128, 1024];

fn body(size: usize) -> Vec<u8> {
    (0..size).map(|index| b'a' + (index % 26) as u8).collect()
}

fn encode_send(out: &mut Vec<u8>, body: &[u8]) {
    let mut writer = FrameWriter::begin(out, Version::V1_2, Command::Send);
    writer
        .header(b"destination", b"/queue/orders")
        .header(b"content-type", b"text/plain")
        .header(b"receipt", b"message-12345")
        .header(b"persistent", b"true")
        .content_length(body.len());
    writer.finish(body);
}

fn send_frame(body_size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    encode_send(&mut out, &body(body_size));
    out
}

fn decode_one(decoder: &mut Decoder, bytes: &[u8]) -> usize {
    // Matched by reference, as a server would use the frame in place: moving it out would
    // time a 600-byte copy that is not the decoder's.
    match &decoder.decode(black_box(bytes)) {
        Ok(Decoded::Frame { frame, consumed }) => {
            black_box(frame);
            *consumed
        }
        other => panic!("benchmark frame did not decode: {other:?}"),
    }
}

fn add_benches<M: criterion::measurement::Measurement>(
    group: &mut BenchmarkGroup<'_, M>,
    throughput: impl Fn(&[u8]) -> Throughput,
) {
    for size in BODY_SIZES {
        let bytes = send_frame(size);
        group.throughput(throughput(&bytes));
        let mut decoder = Decoder::new(Limits::DEFAULT);
        decoder.set_version(Version::V1_2);
        group.bench_function(format!("decode/send_{size}"), |bencher| {
            bencher.iter(|| decode_one(&mut decoder, &bytes))
        });
        let body = body(size);
        let mut out = Vec::with_capacity(bytes.len());
        group.bench_function(format!("encode/send_{size}"), |bencher| {
            bencher.iter(|| {
                out.clear();
                encode_send(&mut out, black_box(&body));
                black_box(out.len())
            })
        });
    }
}

fn codec(criterion: &mut Criterion) {
    let mut frames = criterion.benchmark_group("codec_frames");
    add_benches(&mut frames, |_| Throughput::Elements(1));
    frames.finish();
    let mut bytes = criterion.benchmark_group("codec_bytes");
    add_benches(&mut bytes, |frame| Throughput::Bytes(frame.len() as u64));
    bytes.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
