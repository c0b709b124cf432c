//! Every workload, run as the real binary with `--json`, against the reference relay started
//! in this process on a free port. The tests that expect a correct broker can be pointed at
//! another one, which is how CI runs them against stompd:
//! - `LOADGEN_TEST_STOMPD=path/to/stompd`: each test starts that binary with
//!   `--listen 127.0.0.1:PORT --data-dir <its own temporary directory>` on a free port and
//!   kills it afterwards;
//! - `LOADGEN_TEST_BROKER=host:port`: a broker that is already running.
//!
//! Counts are small and every child process is killed after a deadline.
//!
//! The detector tests run against a relay that drops, duplicates or reorders on purpose and
//! check that the run fails (exit 1, a loud line, the right counter): the loss check is a test
//! that can fail.

use std::io::Read;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

#[path = "../../tests/support/run_bounded.rs"]
mod run_bounded;
use run_bounded::{run_bounded, Finished};

use serde_json::Value;
use stompd::codec::Version;
use stompd_loadgen::relay::{self, Fault, RelayConfig};

/// Generous: a debug build on a busy 2-core machine; the workloads themselves take well under
/// a second each.
const RUN_DEADLINE: Duration = Duration::from_secs(120);

/// How long a broker binary may take to start listening.
const BROKER_START_DEADLINE: Duration = Duration::from_secs(30);

/// A broker to run against; a broker process started for the test dies with this value.
struct Broker {
    host: String,
    port: u16,
    process: Option<Child>,
    /// The data directory of a broker process started for the test, removed with it.
    data_dir: Option<std::path::PathBuf>,
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(process) = &mut self.process {
            let _ = process.kill();
            let _ = process.wait();
        }
        if let Some(data_dir) = &self.data_dir {
            let _ = std::fs::remove_dir_all(data_dir);
        }
    }
}

/// Each started broker's own data directory: tests run in parallel, and two brokers may not
/// share one (stompd refuses a data directory another process holds).
fn broker_data_dir() -> std::path::PathBuf {
    static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let number = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!(
        "stompd-loadgen-test-{}-{number}",
        std::process::id()
    ))
}

struct Outcome {
    code: i32,
    report: Value,
    stderr: String,
}

fn relay_with(config: RelayConfig) -> Broker {
    let relay = relay::spawn("127.0.0.1:0", config).expect("binding a relay on a free port");
    Broker {
        host: relay.address.ip().to_string(),
        port: relay.address.port(),
        process: None,
        data_dir: None,
    }
}

fn start_broker_binary(path: &str) -> Broker {
    let data_dir = broker_data_dir();
    let mut command = Command::new(path);
    command
        .args(["--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&data_dir)
        .stdout(Stdio::null());
    let (process, port) = spawn_listening(command, BROKER_START_DEADLINE);
    Broker {
        host: "127.0.0.1".to_string(),
        port,
        process: Some(process),
        data_dir: Some(data_dir),
    }
}

/// Starts `command` (a stompd on port 0) and returns it with the port it says it listens on.
fn spawn_listening(command: Command, deadline: Duration) -> (Child, u16) {
    stompd::run::listening::spawn_listening(command, deadline)
        .unwrap_or_else(|error| panic!("starting stompd: {error}"))
}

/// The broker for tests that expect a correct one.
fn correct_broker() -> Broker {
    if let Ok(path) = std::env::var("LOADGEN_TEST_STOMPD") {
        return start_broker_binary(&path);
    }
    match std::env::var("LOADGEN_TEST_BROKER") {
        Ok(address) => {
            let (host, port) = address
                .rsplit_once(':')
                .expect("LOADGEN_TEST_BROKER is host:port");
            Broker {
                host: host.to_string(),
                port: port.parse().expect("a port number"),
                process: None,
                data_dir: None,
            }
        }
        Err(_) => relay_with(RelayConfig::default()),
    }
}

fn loadgen(broker: &Broker, args: &[&str]) -> Outcome {
    let Finished {
        status,
        stdout,
        stderr,
    } = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_stompd-loadgen"))
            .args(["--host", &broker.host, "--port", &broker.port.to_string()])
            // Reached only when messages are missing: generous, so a starved CI machine is not
            // mistaken for a lossy broker. The fault tests shorten it.
            .args(["--json", "--quiet", "--drain-timeout", "30"])
            .args(args),
        RUN_DEADLINE,
    );
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|error| {
        panic!("--json output does not parse ({error}): {stdout}\n{stderr}")
    });
    Outcome {
        code: status.code().unwrap_or(-1),
        report,
        stderr,
    }
}

fn integrity(outcome: &Outcome) -> &Value {
    &outcome.report["integrity"]
}

fn assert_clean(outcome: &Outcome, expected: u64) {
    assert_eq!(
        outcome.code, 0,
        "run failed: {}\n{:#}",
        outcome.stderr, outcome.report
    );
    assert_eq!(outcome.report["ok"], true);
    let integrity = integrity(outcome);
    assert_eq!(integrity["expected"], expected, "{integrity:#}");
    assert_eq!(integrity["received"], expected, "{integrity:#}");
    for counter in ["lost", "duplicated", "out_of_order", "unexpected"] {
        assert_eq!(integrity[counter], 0, "{counter}: {integrity:#}");
    }
}

#[test]
fn queue_auto_ack_delivers_everything_once() {
    let outcome = loadgen(&correct_broker(), &["-n", "5000", "queue"]);
    assert_clean(&outcome, 5000);
    assert_eq!(outcome.report["workload"], "queue");
    assert_eq!(outcome.report["sent"]["messages"], 5000);
    assert_eq!(outcome.report["received"]["messages"], 5000);
    assert!(outcome.report["latency"]["samples"].as_u64().unwrap() == 5000);
    assert!(outcome.report["client_cpu_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn queue_with_competing_consumers_individual_acks_and_receipts() {
    let outcome = loadgen(
        &correct_broker(),
        &[
            "-n",
            "6000",
            "queue",
            "-p",
            "3",
            "-c",
            "2",
            "--ack",
            "client-individual",
            "--persistent",
            "--receipt-every",
            "50",
        ],
    );
    assert_clean(&outcome, 6000);
}

#[test]
fn queue_with_cumulative_client_acks() {
    let outcome = loadgen(
        &correct_broker(),
        &[
            "-n",
            "4000",
            "--prefetch",
            "100",
            "queue",
            "--ack",
            "client",
        ],
    );
    assert_clean(&outcome, 4000);
}

#[test]
fn bodies_of_one_kibibyte() {
    let outcome = loadgen(&correct_broker(), &["-n", "2000", "-s", "1024", "queue"]);
    assert_clean(&outcome, 2000);
    assert_eq!(outcome.report["received"]["bytes"], 2000 * 1024);
}

#[test]
fn topic_reaches_every_subscriber_completely() {
    let outcome = loadgen(&correct_broker(), &["-n", "2000", "topic", "-k", "4"]);
    assert_clean(&outcome, 2000 * 4);
    let completeness = outcome.report["per_subscriber_completeness"]
        .as_array()
        .unwrap();
    assert_eq!(completeness.len(), 4);
    assert!(completeness.iter().all(|share| share == 1.0));
}

#[test]
fn latency_reports_ordered_percentiles() {
    let outcome = loadgen(
        &correct_broker(),
        &["-n", "1000", "latency", "--rate", "5000"],
    );
    assert_clean(&outcome, 1000);
    let latency = &outcome.report["latency"];
    assert_eq!(latency["samples"], 1000);
    let at = |name: &str| latency[name].as_f64().unwrap();
    assert!(at("p50_us") > 0.0);
    assert!(at("p50_us") <= at("p90_us"));
    assert!(at("p90_us") <= at("p99_us"));
    assert!(at("p99_us") <= at("p99_9_us"));
    assert!(at("p99_9_us") <= at("max_us"));
}

#[test]
fn warmup_is_left_out_of_latency() {
    let outcome = loadgen(
        &correct_broker(),
        &["-n", "1000", "--warmup", "0.1", "latency", "--rate", "5000"],
    );
    assert_clean(&outcome, 1000);
    // 0.1 s at 5,000 msgs/s is about 500 messages before the mark.
    let samples = outcome.report["latency"]["samples"].as_u64().unwrap();
    assert!(samples < 1000, "{samples}");
}

#[test]
fn pingpong_one_in_flight() {
    let outcome = loadgen(&correct_broker(), &["-n", "300", "pingpong"]);
    assert_clean(&outcome, 300);
    assert_eq!(outcome.report["latency"]["samples"], 300);
}

#[test]
fn backlog_fills_then_drains() {
    let outcome = loadgen(&correct_broker(), &["-n", "20000", "backlog"]);
    assert_clean(&outcome, 20000);
    assert_eq!(outcome.report["sent"]["messages"], 20000);
    assert_eq!(outcome.report["received"]["messages"], 20000);
    assert!(outcome.report["sent"]["msgs_per_s"].as_f64().unwrap() > 0.0);
    assert!(outcome.report["received"]["msgs_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn drain_only_takes_and_checks_what_an_earlier_fill_left() {
    // Two runs, as benches/backlog.sh does around a broker restart: producers alone fill the
    // queue, then consumers alone take it, expecting each producer's share in order.
    let broker = correct_broker();
    let destination = format!("/queue/drain-only-{}", std::process::id());
    let fill = loadgen(
        &broker,
        &[
            "-n",
            "3001",
            "--destination",
            &destination,
            "queue",
            "-p",
            "3",
            "-c",
            "0",
            "--persistent",
            "--receipt-every",
            "100",
        ],
    );
    assert_eq!(fill.code, 0, "{}\n{:#}", fill.stderr, fill.report);
    assert_eq!(fill.report["sent"]["messages"], 3001);
    let drain = loadgen(
        &broker,
        &[
            "-n",
            "3001",
            "--destination",
            &destination,
            "queue",
            "-p",
            "3",
            "-c",
            "2",
            "--drain-only",
        ],
    );
    assert_clean(&drain, 3001);
    assert!(drain.report["sent"].is_null(), "{:#}", drain.report);
    assert_eq!(drain.report["received"]["messages"], 3001);
    assert!(
        drain.report["latency"].is_null(),
        "another run's stamps: no latency"
    );
    let first = drain.report["first_message_s"].as_f64().unwrap();
    assert!(first > 0.0 && first <= drain.report["elapsed_s"].as_f64().unwrap());
}

#[test]
fn drain_only_counts_what_the_fill_did_not_leave_as_lost() {
    let broker = correct_broker();
    let destination = format!("/queue/drain-short-{}", std::process::id());
    let fill = loadgen(
        &broker,
        &[
            "-n",
            "900",
            "--destination",
            &destination,
            "queue",
            "-p",
            "3",
            "-c",
            "0",
        ],
    );
    assert_eq!(fill.code, 0, "{}", fill.stderr);
    let drain = loadgen(
        &broker,
        &[
            FAULT_DRAIN[0],
            FAULT_DRAIN[1],
            "-n",
            "1200",
            "--destination",
            &destination,
            "queue",
            "-p",
            "3",
            "--drain-only",
        ],
    );
    assert_fails_loudly(&drain);
    assert_eq!(integrity(&drain)["lost"], 300);
    assert_eq!(integrity(&drain)["out_of_order"], 0);
}

#[test]
fn drain_only_needs_a_destination() {
    let outcome = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_stompd-loadgen")).args(["queue", "--drain-only"]),
        RUN_DEADLINE,
    );
    assert_eq!(outcome.status.code(), Some(2), "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("--destination"),
        "{}",
        outcome.stderr
    );
}

#[test]
fn connections_each_with_a_live_subscription() {
    let broker = correct_broker();
    // The in-process relay's pid is this test's; a started broker has its own; an external
    // broker's is unknown.
    let pid = match &broker.process {
        Some(process) => Some(process.id()),
        None if std::env::var("LOADGEN_TEST_BROKER").is_err() => Some(std::process::id()),
        None => None,
    };
    let pid_text = pid.map(|pid| pid.to_string()).unwrap_or_default();
    let mut args = vec!["connections", "-m", "200"];
    if pid.is_some() {
        args.extend(["--broker-pid", &pid_text]);
    }
    let outcome = loadgen(&broker, &args);
    assert_clean(&outcome, 200);
    assert_eq!(outcome.report["connections"], 200);
    assert!(outcome.report["connect_per_s"].as_f64().unwrap() > 0.0);
    if pid.is_some() {
        assert!(outcome.report["broker_rss_kib_after"].as_u64().unwrap() > 0);
    }
}

#[test]
fn falls_back_to_stomp_1_0() {
    let broker = relay_with(RelayConfig {
        version_max: Version::V1_0,
        ..RelayConfig::default()
    });
    let outcome = loadgen(
        &broker,
        &["-n", "2000", "queue", "--ack", "client-individual"],
    );
    assert_clean(&outcome, 2000);
    assert_eq!(outcome.report["stomp_version"], "1.0");
}

#[test]
fn offers_a_lower_version_when_told() {
    let outcome = loadgen(
        &correct_broker(),
        &[
            "--stomp-version",
            "1.1",
            "-n",
            "2000",
            "queue",
            "--ack",
            "client-individual",
        ],
    );
    assert_clean(&outcome, 2000);
    assert_eq!(outcome.report["stomp_version"], "1.1");
}

#[test]
fn producers_alone_against_a_sink() {
    let broker = relay_with(RelayConfig {
        sink: true,
        ..RelayConfig::default()
    });
    let outcome = loadgen(&broker, &["-n", "20000", "queue", "-c", "0"]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    assert_eq!(outcome.report["sent"]["messages"], 20000);
    assert!(outcome.report["integrity"].is_null());
}

#[test]
fn a_message_count_bound_stops_a_long_duration() {
    let outcome = loadgen(&correct_broker(), &["-n", "100", "-d", "3600", "queue"]);
    assert_clean(&outcome, 100);
}

#[test]
fn a_duration_bound_stops_a_large_count() {
    let outcome = loadgen(
        &correct_broker(),
        &["-n", "1000000000", "-d", "0.3", "latency", "--rate", "1000"],
    );
    let sent = outcome.report["sent"]["messages"].as_u64().unwrap();
    assert!(sent > 0 && sent < 1000, "{sent}");
    assert_clean(&outcome, sent);
}

// The detector, against a relay that misbehaves on purpose.

/// Fault runs do wait out the drain timeout for what was dropped, so keep it short.
const FAULT_DRAIN: [&str; 2] = ["--drain-timeout", "1"];

fn faulty(fault: Fault) -> Broker {
    relay_with(RelayConfig {
        fault: Some(fault),
        ..RelayConfig::default()
    })
}

fn assert_fails_loudly(outcome: &Outcome) {
    assert_eq!(outcome.code, 1, "{:#}", outcome.report);
    assert_eq!(outcome.report["ok"], false);
    assert!(
        outcome.stderr.contains("LOADGEN FAILED"),
        "{}",
        outcome.stderr
    );
}

#[test]
fn detects_dropped_messages() {
    let outcome = loadgen(
        &faulty(Fault::DropEvery(100)),
        &[FAULT_DRAIN[0], FAULT_DRAIN[1], "-n", "1000", "queue"],
    );
    assert_fails_loudly(&outcome);
    assert_eq!(integrity(&outcome)["lost"], 10);
    assert_eq!(integrity(&outcome)["duplicated"], 0);
}

#[test]
fn detects_duplicated_messages() {
    let outcome = loadgen(
        &faulty(Fault::DuplicateEvery(100)),
        &[FAULT_DRAIN[0], FAULT_DRAIN[1], "-n", "1000", "queue"],
    );
    assert_fails_loudly(&outcome);
    assert_eq!(integrity(&outcome)["duplicated"], 10);
    assert_eq!(integrity(&outcome)["lost"], 0);
}

#[test]
fn detects_reordered_messages() {
    // 999 messages: the last held-back one (the 990th) is released by the 991st.
    let outcome = loadgen(
        &faulty(Fault::ReorderEvery(10)),
        &[FAULT_DRAIN[0], FAULT_DRAIN[1], "-n", "999", "queue"],
    );
    assert_fails_loudly(&outcome);
    assert_eq!(integrity(&outcome)["out_of_order"], 99);
    assert_eq!(integrity(&outcome)["lost"], 0);
}

#[test]
fn detects_an_incomplete_topic_subscriber() {
    let outcome = loadgen(
        &faulty(Fault::DropEvery(50)),
        &[
            FAULT_DRAIN[0],
            FAULT_DRAIN[1],
            "-n",
            "1000",
            "topic",
            "-k",
            "2",
        ],
    );
    assert_fails_loudly(&outcome);
    let completeness = outcome.report["per_subscriber_completeness"]
        .as_array()
        .unwrap();
    assert!(completeness
        .iter()
        .any(|share| share.as_f64().unwrap() < 1.0));
}

#[test]
fn detects_loss_in_ping_pong() {
    let outcome = loadgen(
        &faulty(Fault::DropEvery(10)),
        &[FAULT_DRAIN[0], FAULT_DRAIN[1], "-n", "100", "pingpong"],
    );
    assert_fails_loudly(&outcome);
}

#[test]
fn cannot_start_without_a_broker() {
    // Bind then drop a listener to get a port with nothing behind it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let output = Command::new(env!("CARGO_BIN_EXE_stompd-loadgen"))
        .args(["--port", &port.to_string(), "-q", "queue"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("connecting to"));
}

/// A broker that accepts one connection, answers CONNECT, then sends ERROR and stops
/// writing, reading (and discarding) everything until the client goes away.
fn refusing_broker(message: &'static str) -> Broker {
    use std::io::Write;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            thread::spawn(move || {
                let mut buffer = [0u8; 4096];
                let mut seen = Vec::new();
                // Wait for the end of CONNECT.
                while !seen.contains(&0) {
                    match stream.read(&mut buffer) {
                        Ok(0) | Err(_) => return,
                        Ok(read) => seen.extend_from_slice(&buffer[..read]),
                    }
                }
                let reply = format!("CONNECTED\nversion:1.2\n\n\0ERROR\nmessage:{message}\n\n\0");
                let _ = stream.write_all(reply.as_bytes());
                let _ = stream.shutdown(std::net::Shutdown::Write);
                while matches!(stream.read(&mut buffer), Ok(read) if read > 0) {}
            });
        }
    });
    Broker {
        host: "127.0.0.1".to_string(),
        port,
        process: None,
        data_dir: None,
    }
}

#[test]
fn a_broker_error_is_reported_with_its_message() {
    let outcome = loadgen(
        &refusing_broker("disk full"),
        &["-n", "1000", "queue", "-c", "0"],
    );
    assert_fails_loudly(&outcome);
    let errors = outcome.report["errors"].to_string();
    assert!(errors.contains("disk full"), "{errors}");
}

#[test]
fn ctrl_c_drains_and_reports() {
    use std::io::{BufRead, BufReader};
    let broker = correct_broker();
    let mut child = Command::new(env!("CARGO_BIN_EXE_stompd-loadgen"))
        .args(["--port", &broker.port.to_string(), "--host", &broker.host])
        .args(["--json", "-n", "1000000000", "-d", "100"])
        .args(["latency", "--rate", "1000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The first per-second line proves the run (and its signal handler) is going.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.contains("sent"), "{line}");
    // SAFETY: kill() on the pid of a child we own.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let deadline = Instant::now() + RUN_DEADLINE;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("stompd-loadgen did not stop after SIGINT");
        }
        thread::sleep(Duration::from_millis(20));
    }
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["ok"], true, "{report:#}");
    let sent = report["sent"]["messages"].as_u64().unwrap();
    assert!(sent > 0 && sent < 1_000_000_000);
    assert_eq!(report["integrity"]["lost"], 0);
}
