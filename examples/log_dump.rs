//! Prints what a shard's log holds, record by record, without changing anything: the starting
//! point of the `stompd-log` inspection tool. Safe on a live broker's directory (read-only
//! maps; a record being written ends the listing of its segment).
//!
//! `cargo run --example log_dump -- <data-dir>/shard-N [--bodies]`

use std::path::PathBuf;
use std::process::ExitCode;

use stompd::log::format::{RecordView, ScanItem};
use stompd::log::{list_segments, SegmentReader};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next().map(PathBuf::from) else {
        eprintln!("usage: log_dump <data-dir>/shard-N [--bodies]");
        return ExitCode::from(2);
    };
    let bodies = args.any(|a| a == "--bodies");
    let segments = match list_segments(&dir) {
        Ok(segments) => segments,
        Err(e) => {
            eprintln!("log_dump: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut damaged = false;
    for (sequence, path) in segments {
        let reader = match SegmentReader::open(sequence, &path) {
            Ok(reader) => reader,
            Err(e) => {
                eprintln!("log_dump: {e}");
                damaged = true;
                continue;
            }
        };
        match reader.header() {
            Ok(h) => println!(
                "segment {sequence}: version {}, shard {}, {} bytes, created {} ms",
                h.format_version, h.shard, h.segment_bytes, h.created_ms
            ),
            Err(e) => {
                println!("segment {sequence}: unreadable header: {e}");
                damaged = true;
                continue;
            }
        }
        let mut scan = reader.scan();
        for item in &mut scan {
            match item {
                ScanItem::Record {
                    offset,
                    len,
                    record,
                } => match record {
                    RecordView::Message(m) => {
                        println!(
                            "  {sequence}:{offset} message {} bytes: destination {:?}, id {:?}, {} headers, body {} bytes, at {} ms",
                            len,
                            String::from_utf8_lossy(m.destination),
                            String::from_utf8_lossy(&m.message_id().text()),
                            m.header_count(),
                            m.body.len(),
                            m.timestamp_ms
                        );
                        for (name, value) in m.headers() {
                            // Escaped, so a newline in a value cannot fake another line.
                            println!(
                                "      {}:{}",
                                String::from_utf8_lossy(&name).escape_debug(),
                                String::from_utf8_lossy(&value).escape_debug()
                            );
                        }
                        if bodies {
                            println!("      body {:?}", String::from_utf8_lossy(m.body));
                        }
                    }
                    RecordView::Ack(list) | RecordView::Delivered(list) => {
                        let kind = if matches!(record, RecordView::Ack(_)) {
                            "ack"
                        } else {
                            "delivered"
                        };
                        let refs: Vec<String> = list.iter().map(|p| p.to_string()).collect();
                        println!("  {sequence}:{offset} {kind} {}", refs.join(" "));
                    }
                },
                ScanItem::Corrupt { offset, len, error } => {
                    println!("  {sequence}:{offset} damaged record of {len} bytes: {error}");
                    damaged = true;
                }
                ScanItem::Unframed { offset, error } => {
                    println!("  {sequence}:{offset} unreadable from here: {error}");
                    damaged = true;
                }
            }
        }
        println!("  end of data at {sequence}:{}", scan.offset());
    }
    if damaged {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
