//! stompd-log on logs written by the broker's own log code (`stompd::log::ShardLog`, driven as
//! the broker drives it: message records, delivered marks, acks), run as the real binary.
//!
//! Replay goes into a running broker: by default the reference relay (`stompd-relay`) started
//! in this process on a free port. Point it at the real broker with
//! - `STOMPD_LOG_TEST_BROKER=path/to/stompd`: each test starts that binary with
//!   `--listen 127.0.0.1:PORT --queue-type memory` on a free port and kills it afterwards;
//! - `STOMPD_LOG_TEST_BROKER_ADDRESS=host:port`: a broker that is already running.
//!
//! Every child process runs under a deadline and every socket read has a timeout.

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

#[path = "../../tests/support/run_bounded.rs"]
mod run_bounded;
use run_bounded::run_bounded;

use serde_json::Value;
use stompd::client::{ConnectOptions, Connection};
use stompd::codec::Command as StompCommand;
use stompd::log::format::{encode_record, RecordRef};
use stompd::log::inspect::{Damage, SegmentSummary};
use stompd::log::{
    shard_dir, BinaryId, FsyncPolicy, LogConfig, MessageRecord, Position, SegmentReader, ShardLog,
};
use stompd_log::verify;

/// Generous for a debug build on a busy 2-core machine; the commands take milliseconds.
const RUN_DEADLINE: Duration = Duration::from_secs(120);
/// How long a broker binary may take to start listening.
const BROKER_START_DEADLINE: Duration = Duration::from_secs(30);
/// How long a subscriber waits for the messages it expects before the test fails.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(60);
/// Small segments, so a few dozen messages span several of them.
const SEGMENT_BYTES: u64 = 16 * 1024;

/// A message as the test sent it to the log.
#[derive(Clone, Debug)]
struct Sent {
    shard: u32,
    destination: String,
    id: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    position: Position,
    acked: bool,
    deliveries: u32,
}

fn config(data_dir: &Path, shard: u32) -> LogConfig {
    let mut config = LogConfig::new(data_dir, shard);
    config.segment_bytes = SEGMENT_BYTES;
    config.fsync = FsyncPolicy::Never;
    config
}

/// Writes `count` messages per destination, each destination on its own shard as the broker
/// places queues, the way the broker does: append, a delivered mark on every delivery, an ack
/// when done. Every third message is acked (after one delivery); every fifth unacked one was
/// delivered twice and stays pending. Nothing is reclaimed, so every message is still on disk.
fn write_log(data_dir: &Path, destinations: &[&str], count: usize) -> Vec<Sent> {
    let mut sent = Vec::new();
    for (shard, destination) in destinations.iter().enumerate() {
        let shard = shard as u32;
        let (mut log, recovery) = ShardLog::open(config(data_dir, shard)).unwrap();
        assert!(recovery.queues.is_empty());
        for i in 0..count {
            // The text the tool renders for the binary id.
            let id = format!("{shard}-{i}");
            let seq = i.to_string();
            let headers = vec![
                ("persistent".to_string(), "true".to_string()),
                ("x-seq".to_string(), seq),
                ("x-note".to_string(), "a:b\nc".to_string()),
            ];
            // As the broker holds it: escaped for STOMP 1.2.
            let block = format!("persistent:true\nx-seq:{i}\nx-note:a\\cb\\nc\n");
            // Unique per message, so a subscriber can tell every one apart; long enough that
            // the log spans several segments; a NUL inside, as STOMP bodies may hold.
            let mut body = format!("{destination} message {i} ").into_bytes();
            body.resize(300, b'.');
            body[299] = 0;
            let position = log
                .append_message(
                    &MessageRecord {
                        destination: destination.as_bytes(),
                        id: BinaryId {
                            shard: shard as u16,
                            seq: i as u64,
                        },
                        timestamp_ms: 1_700_000_000_000 + i as u64,
                        header_block: block.as_bytes(),
                        block_plain: false,
                        transient: false,
                        body: &body,
                    },
                    0,
                )
                .unwrap();
            let mut deliveries = 0;
            let acked = i % 3 == 0;
            if acked {
                log.delivered(&[position], 0).unwrap();
                log.ack(&[position], 0).unwrap();
                deliveries = 1;
            } else if i % 5 == 0 {
                log.delivered(&[position], 0).unwrap();
                log.delivered(&[position], 0).unwrap();
                deliveries = 2;
            }
            sent.push(Sent {
                shard,
                destination: destination.to_string(),
                id,
                headers,
                body,
                position,
                acked,
                deliveries,
            });
        }
        log.sync_now().unwrap();
    }
    sent
}

struct Outcome {
    code: i32,
    stdout: String,
}

fn stompd_log(args: &[&str]) -> Outcome {
    let finished = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_stompd-log")).args(args),
        RUN_DEADLINE,
    );
    if !finished.stderr.is_empty() {
        eprintln!("stompd-log {args:?} stderr: {}", finished.stderr);
    }
    Outcome {
        code: finished.status.code().expect("exited, not killed"),
        stdout: finished.stdout,
    }
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn segment_path(data_dir: &Path, shard: u32, sequence: u64) -> PathBuf {
    shard_dir(data_dir, shard).join(format!("{sequence:020}.seg"))
}

fn flip_byte(file: &Path, at: u64) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0x20], at).unwrap();
}

#[test]
fn dump_shows_every_message_sent_with_its_headers_body_and_state() {
    let tmp = tempfile::tempdir().unwrap();
    let sent = write_log(tmp.path(), &["/queue/dump-a", "/queue/dump-b"], 40);
    let out = stompd_log(&[
        "dump",
        path(tmp.path()),
        "--format",
        "json",
        "--body",
        "full",
    ]);
    assert_eq!(out.code, 0);
    let records = json_lines(&out.stdout);
    let messages: HashMap<String, &Value> = records
        .iter()
        .filter(|r| r["kind"] == "message")
        .map(|r| (r["message_id"].as_str().unwrap().to_string(), r))
        .collect();
    assert_eq!(
        messages.len(),
        sent.len(),
        "one message record per message sent"
    );
    for s in &sent {
        let r = messages[&s.id];
        assert_eq!(r["shard"], format!("shard-{}", s.shard));
        assert_eq!(r["destination"], s.destination);
        assert_eq!(r["segment"], s.position.segment);
        assert_eq!(r["offset"], s.position.offset);
        // Bodies hold a NUL, which is valid UTF-8: the JSON string keeps every byte.
        assert_eq!(r["body"].as_str().unwrap().as_bytes(), &s.body[..]);
        assert_eq!(r["body_bytes"], s.body.len());
        let headers: Vec<(String, String)> = r["headers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| (h[0].as_str().unwrap().into(), h[1].as_str().unwrap().into()))
            .collect();
        assert_eq!(headers, s.headers);
        assert_eq!(r["acked"], s.acked, "{}", s.id);
        assert_eq!(r["deliveries"], s.deliveries, "{}", s.id);
    }
    // Log order within each shard: positions only grow.
    for shard in ["shard-0", "shard-1"] {
        let positions: Vec<(u64, u64)> = records
            .iter()
            .filter(|r| r["shard"] == shard)
            .map(|r| {
                (
                    r["segment"].as_u64().unwrap(),
                    r["offset"].as_u64().unwrap(),
                )
            })
            .collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "{shard} in order"
        );
    }
    // Acks and delivered marks are listed too, naming the positions they reference.
    let acked_refs: usize = records
        .iter()
        .filter(|r| r["kind"] == "ack")
        .map(|r| r["refs"].as_array().unwrap().len())
        .sum();
    assert_eq!(acked_refs, sent.iter().filter(|s| s.acked).count());

    // The text listing names every message too, with its position.
    let text = stompd_log(&["dump", path(tmp.path())]);
    assert_eq!(text.code, 0);
    for s in &sent {
        let line = format!(
            "shard-{} {} message {} id {} ",
            s.shard, s.position, s.destination, s.id
        );
        assert!(text.stdout.contains(&line), "missing {line:?}");
    }
}

#[test]
fn dump_accepts_a_shard_directory_and_a_single_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let sent = write_log(tmp.path(), &["/queue/one-a", "/queue/one-b"], 40);
    let shard_1 = shard_dir(tmp.path(), 1);
    let out = stompd_log(&["dump", path(&shard_1), "--format", "json"]);
    assert_eq!(out.code, 0);
    let ids: Vec<String> = json_lines(&out.stdout)
        .iter()
        .filter(|r| r["kind"] == "message")
        .map(|r| r["message_id"].as_str().unwrap().to_string())
        .collect();
    let expected: Vec<String> = sent
        .iter()
        .filter(|s| s.shard == 1)
        .map(|s| s.id.clone())
        .collect();
    assert_eq!(ids, expected);

    let segment = segment_path(tmp.path(), 0, 1);
    let out = stompd_log(&["dump", path(&segment), "--format", "json"]);
    assert_eq!(out.code, 0);
    let records = json_lines(&out.stdout);
    assert!(!records.is_empty());
    assert!(records.iter().all(|r| r["segment"] == 1));
    let in_segment = sent
        .iter()
        .filter(|s| s.shard == 0 && s.position.segment == 1)
        .count();
    assert_eq!(
        records.iter().filter(|r| r["kind"] == "message").count(),
        in_segment
    );
    // Acks written in later segments still count: the whole shard is read.
    for r in records.iter().filter(|r| r["kind"] == "message") {
        let s = sent.iter().find(|s| s.id == r["message_id"]).unwrap();
        assert_eq!(r["acked"], s.acked);
    }
}

#[test]
fn dump_filters_by_destination_position_state_and_count() {
    let tmp = tempfile::tempdir().unwrap();
    let sent = write_log(tmp.path(), &["/queue/f-a", "/queue/f-b"], 40);
    let data = path(tmp.path());
    let ids = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["dump", data, "--format", "json"];
        all.extend_from_slice(args);
        let out = stompd_log(&all);
        assert_eq!(out.code, 0);
        json_lines(&out.stdout)
            .iter()
            .map(|r| {
                r["message_id"]
                    .as_str()
                    .unwrap_or(r["kind"].as_str().unwrap())
                    .to_string()
            })
            .collect()
    };
    let of = |keep: &dyn Fn(&Sent) -> bool| -> Vec<String> {
        sent.iter()
            .filter(|s| keep(s))
            .map(|s| s.id.clone())
            .collect()
    };
    assert_eq!(
        ids(&["--destination", "/queue/f-b"]),
        of(&|s| s.destination == "/queue/f-b")
    );
    assert_eq!(ids(&["--pending"]), of(&|s| !s.acked));
    assert_eq!(ids(&["--limit", "5"]).len(), 5);
    assert_eq!(
        ids(&["--destination", "/queue/f-a", "--from", "2:0", "--pending"]),
        of(&|s| s.destination == "/queue/f-a" && s.position.segment >= 2 && !s.acked)
    );
    let first = &sent[7];
    let from = first.position.to_string();
    assert_eq!(
        ids(&["--destination", &first.destination, "--from", &from]),
        of(&|s| s.destination == first.destination && s.position >= first.position)
    );
}

#[test]
fn verify_passes_on_a_clean_log() {
    let tmp = tempfile::tempdir().unwrap();
    write_log(tmp.path(), &["/queue/v-a", "/queue/v-b"], 40);
    let out = stompd_log(&["verify", path(tmp.path())]);
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert!(out.stdout.contains("shard-0: "), "{}", out.stdout);
    assert!(out.stdout.contains("records checked: intact"));
    assert!(!out.stdout.contains("damaged"));
}

#[test]
fn verify_fails_at_the_offset_of_a_flipped_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let sent = write_log(tmp.path(), &["/queue/flip-a", "/queue/flip-b"], 40);
    // A message in the middle of an early segment, with good records after it.
    let victim = sent
        .iter()
        .find(|s| s.shard == 1 && s.position.segment == 1 && s.position.offset > 64)
        .unwrap();
    let file = segment_path(tmp.path(), 1, 1);
    flip_byte(&file, victim.position.offset + 200); // inside its body
    let out = stompd_log(&["verify", path(tmp.path())]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    let expected = format!(
        "shard-1/00000000000000000001.seg: offset {}: damaged record",
        victim.position.offset
    );
    assert!(out.stdout.contains(&expected), "{}", out.stdout);
    assert!(out.stdout.contains("shard-0: "));
    assert_eq!(out.stdout.matches("damaged record").count(), 1);

    let out = stompd_log(&["verify", path(tmp.path()), "--format", "json"]);
    assert_eq!(out.code, 1);
    let damage: Vec<Value> = json_lines(&out.stdout)
        .into_iter()
        .filter(|r| r.get("damage").is_some())
        .collect();
    assert_eq!(damage.len(), 1);
    assert_eq!(damage[0]["shard"], "shard-1");
    assert_eq!(damage[0]["segment"], 1);
    assert_eq!(damage[0]["offset"], victim.position.offset);
    assert_eq!(damage[0]["damage"], "record");
    // The other shard's check is unaffected.
    let shard_0 = stompd_log(&["verify", path(tmp.path()), "--shard", "0"]);
    assert_eq!(shard_0.code, 0, "{}", shard_0.stdout);
}

#[test]
fn verify_fails_at_the_offset_of_a_torn_tail() {
    let tmp = tempfile::tempdir().unwrap();
    let sent = write_log(tmp.path(), &["/queue/torn"], 40);
    // Tear the last message record and the records after it (its delivered mark and ack), as
    // a crash mid-write leaves them: the framing landed, the rest did not.
    let last = sent.last().unwrap();
    let file = segment_path(tmp.path(), 0, last.position.segment);
    let handle = OpenOptions::new().write(true).open(&file).unwrap();
    let torn_from = last.position.offset + 100;
    let file_bytes = handle.metadata().unwrap().len();
    let zeros = vec![0u8; (file_bytes - torn_from) as usize];
    handle.write_all_at(&zeros, torn_from).unwrap();
    drop(handle);
    let out = stompd_log(&["verify", path(tmp.path()), "--settle-ms", "1"]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    let expected = format!(
        "shard-0/{:020}.seg: offset {}: torn tail",
        last.position.segment, last.position.offset
    );
    assert!(out.stdout.contains(&expected), "{}", out.stdout);
}

/// The live-directory rule: a tail that is gone (the data moved past it) when read again was
/// a record being written, not damage; one still there, at the same offset, is torn.
#[test]
fn a_record_being_written_is_not_damage_but_a_tail_that_stays_is() {
    let tmp = tempfile::tempdir().unwrap();
    let sent = write_log(tmp.path(), &["/queue/live"], 5);
    let dir = shard_dir(tmp.path(), 0);
    let file = segment_path(tmp.path(), 0, 0);
    let scan = || {
        let reader = SegmentReader::open(0, &file).unwrap();
        SegmentSummary::scan(&reader, &file, Some(0))
    };
    let before = scan();
    assert!(before.is_clean());
    let end = before.data_end;

    // The broker writes a record's framing last: first everything after the framing.
    let record = RecordRef::Message(MessageRecord {
        destination: b"/queue/live",
        id: BinaryId::default(),
        timestamp_ms: 0,
        header_block: b"",
        block_plain: true,
        transient: false,
        body: b"being written",
    });
    let mut bytes = vec![0u8; record.encoded_len()];
    encode_record(&mut bytes, 0, &record);
    let handle = OpenOptions::new().write(true).open(&file).unwrap();
    handle.write_all_at(&bytes[16..], end + 16).unwrap();
    let half = scan();
    assert!(
        matches!(half.damage[..], [Damage::Tail { offset, error: None, .. }] if offset == end),
        "{:?}",
        half.damage
    );
    // Read again with nothing changed: the tail stays, so it is torn.
    assert!(verify::tail_persists(end, Some(&scan())));
    // The writer finishes the record: read again, the data has moved on.
    handle.write_all_at(&bytes[..16], end).unwrap();
    let after = scan();
    assert!(after.is_clean(), "{:?}", after.damage);
    assert!(after.data_end > end);
    assert!(!verify::tail_persists(end, Some(&after)));
    assert!(
        !verify::tail_persists(end, None),
        "a deleted segment has no tail"
    );
    drop(handle);
    // And the binary agrees: intact, one more message than was sent.
    let out = stompd_log(&["verify", path(&dir), "--settle-ms", "1"]);
    assert_eq!(out.code, 0, "{}", out.stdout);
    let out = stompd_log(&["stats", path(&dir), "--format", "json"]);
    assert_eq!(json_lines(&out.stdout)[0]["messages"], sent.len() + 1);
}

/// Safe on a live broker's directory: verify, dump and stats run over and over beside a
/// writer that appends, acks, rolls and reclaims segments, and never see damage or fail.
#[test]
fn verify_and_dump_are_clean_beside_a_live_writer() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().to_owned();
    let (mut log, _) = ShardLog::open(config(&data_dir, 0)).unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let writer = thread::spawn(move || {
        let body = [b'x'; 200];
        let mut positions = Vec::new();
        for i in 0..10_000u64 {
            let position = log
                .append_message(
                    &MessageRecord {
                        destination: b"/queue/busy",
                        id: BinaryId { shard: 0, seq: i },
                        timestamp_ms: i,
                        header_block: b"",
                        block_plain: true,
                        transient: false,
                        body: &body,
                    },
                    i,
                )
                .unwrap();
            positions.push(position);
            if positions.len() == 10 {
                log.delivered(&positions, i).unwrap();
                log.ack(&positions, i).unwrap();
                positions.clear();
                log.reclaim().unwrap();
            }
        }
        done_tx.send(()).unwrap();
    });
    let dir = shard_dir(&data_dir, 0);
    let mut rounds = 0;
    loop {
        let finished = done_rx.try_recv().is_ok();
        let mut out = Vec::new();
        let cli = <stompd_log::cli::Cli as clap::Parser>::parse_from([
            "stompd-log",
            "verify",
            path(&dir),
            // The default: a writer preempted in the middle of a pwrite (a loaded 2-core CI
            // machine) must have moved on when the tail is read again; 5 ms was not always
            // enough there.
            "--settle-ms",
            "200",
        ]);
        let status = stompd_log::run(&cli, &mut out).unwrap();
        assert_eq!(status, 0, "{}", String::from_utf8_lossy(&out));
        let cli = <stompd_log::cli::Cli as clap::Parser>::parse_from([
            "stompd-log",
            "dump",
            path(&dir),
            "--format",
            "json",
        ]);
        let mut out = Vec::new();
        assert_eq!(stompd_log::run(&cli, &mut out).unwrap(), 0);
        rounds += 1;
        if finished {
            break;
        }
    }
    writer.join().unwrap();
    eprintln!("{rounds} rounds of verify and dump beside the writer");
    assert!(rounds >= 1);
}

#[test]
fn stats_agree_with_what_was_sent_and_acked() {
    let tmp = tempfile::tempdir().unwrap();
    let sent = write_log(tmp.path(), &["/queue/s-a", "/queue/s-b"], 40);
    let out = stompd_log(&["stats", path(tmp.path()), "--format", "json"]);
    assert_eq!(out.code, 0);
    let rows = json_lines(&out.stdout);
    assert_eq!(rows.len(), 2);
    for row in rows {
        let destination = row["destination"].as_str().unwrap();
        let mine: Vec<&Sent> = sent
            .iter()
            .filter(|s| s.destination == destination)
            .collect();
        assert_eq!(row["messages"], mine.len());
        assert_eq!(
            row["bytes"],
            mine.iter().map(|s| s.body.len()).sum::<usize>()
        );
        assert_eq!(row["acked"], mine.iter().filter(|s| s.acked).count());
        assert_eq!(row["pending"], mine.iter().filter(|s| !s.acked).count());
        assert_eq!(
            row["redelivered"],
            mine.iter().filter(|s| !s.acked && s.deliveries > 0).count()
        );
    }
    let text = stompd_log(&["stats", path(tmp.path())]);
    assert!(
        text.stdout.lines().any(|l| l.starts_with("/queue/s-a ")
            && l.split_whitespace().collect::<Vec<_>>()[1..] == ["40", "12000", "14", "26", "5"]),
        "{}",
        text.stdout
    );
}

/// `segments` says "reclaimable" for exactly the segments the broker deletes at its next
/// reclaim (recovery runs one), "live" for the last one, and counts records.
#[test]
fn segment_statuses_agree_with_the_brokers_reclaim() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = ShardLog::open(config(tmp.path(), 0)).unwrap();
    let body = [b'y'; 500];
    let mut early = Vec::new();
    for i in 0..80u64 {
        let position = log
            .append_message(
                &MessageRecord {
                    destination: b"/queue/seg",
                    id: BinaryId { shard: 0, seq: i },
                    timestamp_ms: i,
                    header_block: b"",
                    block_plain: true,
                    transient: false,
                    body: &body,
                },
                i,
            )
            .unwrap();
        // Everything acked except one message in the third segment.
        if position.segment != 2 || position.offset != 64 {
            early.push(position);
        }
    }
    log.ack(&early, 0).unwrap();
    log.sync_now().unwrap();
    drop(log);
    let out = stompd_log(&["segments", path(tmp.path()), "--format", "json"]);
    assert_eq!(out.code, 0);
    let rows = json_lines(&out.stdout);
    assert!(rows.len() >= 4, "{}", out.stdout);
    let status: BTreeMap<u64, String> = rows
        .iter()
        .map(|r| {
            (
                r["segment"].as_u64().unwrap(),
                r["status"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(status[&2], "full", "holds a pending message");
    assert_eq!(status.values().last().unwrap(), "live");
    let total_records: u64 = rows.iter().map(|r| r["records"].as_u64().unwrap()).sum();
    assert_eq!(total_records, 80 + 1, "80 messages and one ack record");
    let reclaimable: Vec<u64> = status
        .iter()
        .filter(|(_, s)| *s == "reclaimable")
        .map(|(&n, _)| n)
        .collect();
    assert!(!reclaimable.is_empty());
    let (_, recovery) = ShardLog::open(config(tmp.path(), 0)).unwrap();
    assert_eq!(recovery.report.reclaimed, reclaimable);
}

/// A broker to replay into, killed when the test ends if the test started it.
struct Broker {
    host: String,
    port: u16,
    process: Option<Child>,
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(process) = &mut self.process {
            let _ = process.kill();
            let _ = process.wait();
        }
    }
}

impl Broker {
    fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Starts `command` (a stompd on port 0) and returns it with the port it says it listens on.
fn spawn_listening(command: Command, deadline: Duration) -> (Child, u16) {
    stompd::run::listening::spawn_listening(command, deadline)
        .unwrap_or_else(|error| panic!("starting stompd: {error}"))
}

fn broker() -> Broker {
    if let Ok(binary) = std::env::var("STOMPD_LOG_TEST_BROKER") {
        let mut command = Command::new(&binary);
        command
            .args(["--listen", "127.0.0.1:0", "--queue-type", "memory"])
            .stdout(Stdio::null());
        let (process, port) = spawn_listening(command, BROKER_START_DEADLINE);
        return Broker {
            host: "127.0.0.1".into(),
            port,
            process: Some(process),
        };
    }
    if let Ok(address) = std::env::var("STOMPD_LOG_TEST_BROKER_ADDRESS") {
        let (host, port) = address.rsplit_once(':').expect("host:port");
        return Broker {
            host: host.into(),
            port: port.parse().expect("a port"),
            process: None,
        };
    }
    let relay = stompd_loadgen::relay::spawn("127.0.0.1:0", Default::default()).unwrap();
    Broker {
        host: relay.address.ip().to_string(),
        port: relay.address.port(),
        process: None,
    }
}

fn connect(broker: &Broker) -> Connection {
    let mut options = ConnectOptions::local(broker.port);
    options.host = broker.host.clone();
    Connection::connect(&options).unwrap()
}

/// Subscribes to `destinations`, then collects every MESSAGE body per destination until an
/// end marker (sent after the replay, on each destination) has arrived on each: anything
/// duplicated would have been queued before the marker.
struct Subscriber {
    connection: Connection,
    destinations: Vec<String>,
}

const END_MARKER: &[u8] = b"end of test";

impl Subscriber {
    fn new(broker: &Broker, destinations: &[&str]) -> Subscriber {
        let mut connection = connect(broker);
        for (i, destination) in destinations.iter().enumerate() {
            let receipt = format!("sub-{i}");
            connection
                .subscribe(destination, &format!("s{i}"), "auto", 1000, Some(&receipt))
                .unwrap();
        }
        Subscriber {
            connection,
            destinations: destinations.iter().map(|d| d.to_string()).collect(),
        }
    }

    fn collect(mut self, broker: &Broker) -> BTreeMap<String, Vec<Vec<u8>>> {
        let mut marker = connect(broker);
        for destination in &self.destinations {
            let mut frame = marker.frame(StompCommand::Send);
            frame.header(b"destination", destination.as_bytes());
            frame.content_length(END_MARKER.len());
            frame.finish(END_MARKER);
        }
        marker.flush().unwrap();
        marker.disconnect(Duration::from_secs(10)).unwrap();
        let mut received: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
        let mut ended = 0;
        let deadline = Instant::now() + DELIVERY_DEADLINE;
        self.connection
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        while ended < self.destinations.len() {
            assert!(
                Instant::now() < deadline,
                "deliveries stalled: {received:?}"
            );
            let got = self
                .connection
                .next_frame_timeout(|frame, _| {
                    assert_eq!(frame.command, StompCommand::Message, "{frame:?}");
                    let destination = frame.header_str(b"destination").unwrap().to_string();
                    (destination, frame.body.to_vec())
                })
                .unwrap();
            if let Some((destination, body)) = got {
                if body == END_MARKER {
                    ended += 1;
                } else {
                    received.entry(destination).or_default().push(body);
                }
            }
        }
        received
    }
}

#[test]
fn replay_into_a_running_broker_delivers_every_pending_message_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let destinations = ["/queue/replay-a", "/queue/replay-b"];
    let sent = write_log(tmp.path(), &destinations, 60);
    let broker = broker();
    let subscriber = Subscriber::new(&broker, &destinations);
    let out = stompd_log(&[
        "replay",
        path(tmp.path()),
        "--to",
        &broker.address(),
        "--pending-only",
        "--window",
        "8",
        "--format",
        "json",
    ]);
    let pending: Vec<&Sent> = sent.iter().filter(|s| !s.acked).collect();
    assert_eq!(out.code, 0, "{}", out.stdout);
    let summary = &json_lines(&out.stdout)[0];
    assert_eq!(summary["selected"], pending.len());
    assert_eq!(summary["sent"], pending.len());
    assert_eq!(summary["confirmed"], pending.len());
    let received = subscriber.collect(&broker);
    for destination in destinations {
        let expected: Vec<&[u8]> = pending
            .iter()
            .filter(|s| s.destination == destination)
            .map(|s| &s.body[..])
            .collect();
        let got: Vec<&[u8]> = received[destination].iter().map(|b| &b[..]).collect();
        // Exactly once and, one destination on one connection, in the order sent.
        assert_eq!(got, expected, "{destination}");
    }
}

#[test]
fn replay_filters_by_destination_renames_and_can_send_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let sent = write_log(tmp.path(), &["/queue/r-a", "/queue/r-b"], 20);
    let broker = broker();
    let subscriber = Subscriber::new(&broker, &["/queue/r-moved"]);
    let out = stompd_log(&[
        "replay",
        path(tmp.path()),
        "--to",
        &broker.address(),
        "--destination",
        "/queue/r-a",
        "--rename",
        "/queue/r-a=/queue/r-moved",
        "--rate",
        "2000",
    ]);
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert!(
        out.stdout.contains("20 selected, 20 sent, 20 confirmed"),
        "{}",
        out.stdout
    );
    assert!(out
        .stdout
        .contains("  /queue/r-moved: 20 selected, 20 sent, 20 confirmed"));
    let received = subscriber.collect(&broker);
    let expected: Vec<Vec<u8>> = sent
        .iter()
        .filter(|s| s.destination == "/queue/r-a")
        .map(|s| s.body.clone())
        .collect();
    assert_eq!(received["/queue/r-moved"], expected, "acked ones included");
}

/// A broker that refuses the SENDs: replay says what was sent and not confirmed, and exits 1.
#[test]
fn replay_reports_unconfirmed_messages_and_exits_1() {
    let tmp = tempfile::tempdir().unwrap();
    write_log(tmp.path(), &["/queue/refused"], 10);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut seen = Vec::new();
        let mut buffer = [0u8; 4096];
        // CONNECT, answered; then the first SEND, refused with an ERROR and a close.
        while !seen.windows(8).any(|w| w == b"CONNECT\n") || !seen.contains(&0) {
            let n = stream.read(&mut buffer).unwrap();
            assert!(n > 0);
            seen.extend_from_slice(&buffer[..n]);
        }
        stream
            .write_all(b"CONNECTED\nversion:1.2\nserver:refuser\n\n\0")
            .unwrap();
        seen.clear();
        while !seen.windows(5).any(|w| w == b"SEND\n") {
            let n = stream.read(&mut buffer).unwrap();
            assert!(n > 0);
            seen.extend_from_slice(&buffer[..n]);
        }
        stream
            .write_all(b"ERROR\nmessage:queue refused\n\n\0")
            .unwrap();
    });
    let out = stompd_log(&["replay", path(tmp.path()), "--to", &address]);
    server.join().unwrap();
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(out.stdout.contains("refuser"), "{}", out.stdout);
    assert!(out.stdout.contains("10 selected"), "{}", out.stdout);
    assert!(out.stdout.contains("0 confirmed"), "{}", out.stdout);
    assert!(out.stdout.contains("queue refused"), "{}", out.stdout);
    assert!(
        out.stdout.contains("NOT CONFIRMED: 10 messages"),
        "{}",
        out.stdout
    );
}

#[test]
fn a_missing_directory_is_an_error_with_exit_status_2() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let out = stompd_log(&["verify", path(&missing)]);
    assert_eq!(out.code, 2);
    let out = stompd_log(&["verify", path(tmp.path())]);
    assert_eq!(out.code, 2, "an empty directory holds no log");
}

#[test]
fn every_subcommand_has_help_with_an_example() {
    for sub in ["segments", "dump", "verify", "stats", "replay"] {
        let out = stompd_log(&[sub, "--help"]);
        assert_eq!(out.code, 0);
        assert!(
            out.stdout
                .contains(&format!("Example:\n  stompd-log {sub} ")),
            "{sub}: {}",
            out.stdout
        );
    }
}

/// What a crash leaves that is not damage: a segment whose creation never finished (recovery
/// removes it) and the copy of a cut tail that recovery keeps beside the log. Both are named;
/// neither fails the check. A header that is not blank but wrong does.
#[test]
fn verify_names_crash_leftovers_without_failing_and_fails_on_a_bad_header() {
    let tmp = tempfile::tempdir().unwrap();
    let sent = write_log(tmp.path(), &["/queue/left"], 20);
    let last = sent.last().unwrap();
    let file = segment_path(tmp.path(), 0, last.position.segment);
    let handle = OpenOptions::new().write(true).open(&file).unwrap();
    handle
        .write_all_at(&[0u8; 64], last.position.offset + 100)
        .unwrap();
    drop(handle);
    // The broker's next start cuts the torn tail and keeps a copy of it.
    let (log, recovery) = ShardLog::open(config(tmp.path(), 0)).unwrap();
    assert_eq!(recovery.report.cuts.len(), 1);
    drop(log);
    let blank = segment_path(tmp.path(), 0, last.position.segment + 1);
    std::fs::write(&blank, vec![0u8; SEGMENT_BYTES as usize]).unwrap();

    let out = stompd_log(&["verify", path(tmp.path())]);
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert!(out.stdout.contains(".seg.cut-"), "{}", out.stdout);
    assert!(out.stdout.contains("incomplete segment"), "{}", out.stdout);
    assert!(out.stdout.contains("intact"));

    std::fs::write(&blank, b"STOMPDLG but not a header").unwrap();
    let out = stompd_log(&["verify", path(tmp.path())]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    let expected = format!(
        "shard-0/{:020}.seg: unreadable segment header",
        last.position.segment + 1
    );
    assert!(out.stdout.contains(&expected), "{}", out.stdout);
}

/// A STOMP 1.0 broker cannot carry a newline in a header unescaped (STOMP 1.1 "Value
/// Encoding"): such messages are not sent rather than sent altered, and replay exits 1.
#[test]
fn replay_to_a_stomp_1_0_broker_refuses_headers_it_cannot_carry() {
    let tmp = tempfile::tempdir().unwrap();
    write_log(tmp.path(), &["/queue/old"], 6); // every message has x-note:a:b\nc
    let relay = stompd_loadgen::relay::spawn(
        "127.0.0.1:0",
        stompd_loadgen::relay::RelayConfig {
            version_max: stompd::codec::Version::V1_0,
            ..Default::default()
        },
    )
    .unwrap();
    let out = stompd_log(&[
        "replay",
        path(tmp.path()),
        "--to",
        &relay.address.to_string(),
    ]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(
        out.stdout.contains("STOMP 1.0): 6 selected, 0 sent"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("6 messages not sent: STOMP 1.0"),
        "{}",
        out.stdout
    );
}

/// A segment whose header cannot be read is never listed as reclaimable (the broker refuses to
/// start on it, and deletes nothing it cannot read), and `segments` flags it.
#[test]
fn a_segment_with_an_unreadable_header_is_not_reclaimable() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = ShardLog::open(config(tmp.path(), 0)).unwrap();
    for i in 0..120u64 {
        let position = log
            .append_message(
                &MessageRecord {
                    destination: b"/queue/hdr",
                    id: BinaryId { shard: 0, seq: i },
                    timestamp_ms: i,
                    header_block: b"",
                    block_plain: true,
                    transient: false,
                    body: &[b'h'; 500],
                },
                i,
            )
            .unwrap();
        log.ack(&[position], i).unwrap();
    }
    log.sync_now().unwrap();
    assert!(log.segment_sequences().len() >= 4);
    drop(log);
    let status_of_1 = || {
        let out = stompd_log(&["segments", path(tmp.path()), "--format", "json"]);
        assert_eq!(out.code, 0);
        json_lines(&out.stdout)
            .into_iter()
            .find(|r| r["segment"] == 1)
            .unwrap()
    };
    assert_eq!(status_of_1()["status"], "reclaimable");
    flip_byte(&segment_path(tmp.path(), 0, 1), 30); // inside the header's sequence field
    let row = status_of_1();
    assert_eq!(row["status"], "full", "{row}");
    assert_eq!(row["records"], 0);
    assert!(row["damage"][0]
        .as_str()
        .unwrap()
        .starts_with("unreadable segment header"));
    let text = stompd_log(&["segments", path(tmp.path())]);
    assert!(
        text.stdout.contains("[1 damaged, see stompd-log verify]"),
        "{}",
        text.stdout
    );
}

/// A broker that takes the SENDs but never confirms them: replay gives up after
/// --receipt-timeout with no receipt, reports what was sent and not confirmed, and exits 1.
#[test]
fn replay_gives_up_on_a_broker_that_never_confirms() {
    let tmp = tempfile::tempdir().unwrap();
    write_log(tmp.path(), &["/queue/silent"], 5);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut buffer = [0u8; 4096];
        let mut seen = Vec::new();
        while !seen.contains(&0) {
            let n = stream.read(&mut buffer).unwrap();
            assert!(n > 0);
            seen.extend_from_slice(&buffer[..n]);
        }
        assert!(seen.starts_with(b"CONNECT\n"));
        stream
            .write_all(b"CONNECTED\nversion:1.2\nserver:silent\n\n\0")
            .unwrap();
        // Swallow everything until the client hangs up.
        while matches!(stream.read(&mut buffer), Ok(n) if n > 0) {}
    });
    let out = stompd_log(&[
        "replay",
        path(tmp.path()),
        "--to",
        &address,
        "--receipt-timeout",
        "0.3",
    ]);
    server.join().unwrap();
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(
        out.stdout.contains("5 selected, 5 sent, 0 confirmed"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("no RECEIPT"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains("NOT CONFIRMED: 5 messages (5 sent without a receipt, 0 not sent)"),
        "{}",
        out.stdout
    );
}

/// A log whose segment 2 reuses segment 0's file (format version 2): its bytes after the data
/// are segment 0's records, which are valid under sequence 0. Returns the message bodies still
/// in the log (segments 1 and 2), in log order, by message id.
fn write_recycled_log(data_dir: &Path, destination: &str) -> Vec<(String, Vec<u8>)> {
    let (mut log, _) = ShardLog::open(config(data_dir, 0)).unwrap();
    let mut kept = Vec::new();
    let mut old = Vec::new();
    let mut i = 0;
    let append = |log: &mut ShardLog, i: usize| {
        let id = format!("0-{i}");
        let mut body = format!("{destination} message {i} ").into_bytes();
        body.resize(300, b'.');
        let position = log
            .append_message(
                &MessageRecord {
                    destination: destination.as_bytes(),
                    id: BinaryId {
                        shard: 0,
                        seq: i as u64,
                    },
                    timestamp_ms: 0,
                    header_block: b"",
                    block_plain: true,
                    transient: false,
                    body: &body,
                },
                0,
            )
            .unwrap();
        (position, id, body)
    };
    loop {
        let (p, id, body) = append(&mut log, i);
        i += 1;
        if p.segment == 1 {
            kept.push((id, body));
            break;
        }
        old.push(p);
    }
    log.ack(&old, 0).unwrap();
    assert_eq!(log.reclaim().unwrap(), [0]);
    let mut extra = 3;
    while extra > 0 {
        let (p, id, body) = append(&mut log, i);
        i += 1;
        kept.push((id, body));
        if p.segment == 2 {
            extra -= 1;
        }
    }
    log.sync_now().unwrap();
    drop(log);
    let reader = SegmentReader::open(2, &segment_path(data_dir, 0, 2)).unwrap();
    assert!(reader.header().as_ref().unwrap().is_recycled());
    kept
}

/// A healthy recycled segment is clean to `verify`, and neither `dump` nor `replay` shows any
/// record left over from the file's earlier use.
#[test]
fn a_recycled_segment_is_clean_and_its_leftovers_are_never_dumped_or_replayed() {
    let tmp = tempfile::tempdir().unwrap();
    let kept = write_recycled_log(tmp.path(), "/queue/recycled");
    let out = stompd_log(&["verify", path(tmp.path())]);
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert!(
        out.stdout.contains("records checked: intact"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("damaged"), "{}", out.stdout);

    let out = stompd_log(&["dump", path(tmp.path()), "--format", "json"]);
    assert_eq!(out.code, 0);
    let ids: Vec<String> = json_lines(&out.stdout)
        .iter()
        .filter(|r| r["kind"] == "message")
        .map(|r| r["message_id"].as_str().unwrap().to_string())
        .collect();
    let expected: Vec<String> = kept.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids, expected);

    let out = stompd_log(&["segments", path(tmp.path()), "--format", "json"]);
    assert_eq!(out.code, 0);
    let recycled: Vec<bool> = json_lines(&out.stdout)
        .iter()
        .filter(|r| r.get("segment").is_some())
        .map(|r| r["recycled"].as_bool().unwrap())
        .collect();
    assert_eq!(recycled, [false, true]);

    let broker = broker();
    let subscriber = Subscriber::new(&broker, &["/queue/recycled"]);
    let out = stompd_log(&["replay", path(tmp.path()), "--to", &broker.address()]);
    assert_eq!(out.code, 0, "{}", out.stdout);
    let received = subscriber.collect(&broker);
    let bodies: Vec<Vec<u8>> = kept.into_iter().map(|(_, body)| body).collect();
    assert_eq!(received["/queue/recycled"], bodies);
}

/// The version 3 fixture (binary ids, escaped header blocks, transient records) renders in
/// dump, and verify and stats read it.
#[test]
fn renders_a_version_3_log() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/log-v3/shard-0");
    let shard = shard_dir(tmp.path(), 0);
    std::fs::create_dir_all(&shard).unwrap();
    for entry in std::fs::read_dir(&fixture).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), shard.join(entry.file_name())).unwrap();
    }
    let out = stompd_log(&["dump", path(tmp.path()), "--format", "json"]);
    assert_eq!(out.code, 0, "{}", out.stdout);
    let records = json_lines(&out.stdout);
    let messages: Vec<&Value> = records.iter().filter(|r| r["kind"] == "message").collect();
    assert_eq!(messages.len(), 40 + 5 + 4);
    assert_eq!(
        messages.iter().filter(|r| r["transient"] == true).count(),
        4
    );
    let audit = messages
        .iter()
        .find(|r| r["message_id"] == "1-1000")
        .expect("binary ids render as <shard>-<seq>");
    assert_eq!(audit["destination"], "/queue/audit");
    assert_eq!(
        audit["headers"],
        serde_json::json!([
            ["content-type", "text/plain"],
            ["x-colon", "a:b\nc"],
            ["empty", ""]
        ]),
        "the escaped block is shown unescaped"
    );
    let out = stompd_log(&["dump", path(tmp.path())]);
    assert_eq!(out.code, 0);
    assert_eq!(
        out.stdout.matches("(transient)").count(),
        4,
        "{}",
        out.stdout
    );
    let out = stompd_log(&["verify", path(tmp.path())]);
    assert_eq!(out.code, 0, "{}", out.stdout);
    let out = stompd_log(&["stats", path(tmp.path())]);
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert!(out.stdout.contains("/queue/orders"), "{}", out.stdout);
}
