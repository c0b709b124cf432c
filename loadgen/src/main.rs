//! `stompd-loadgen`: flags in, one workload run, a report out. Exit status 0 when the run was
//! clean, 1 when messages were lost, duplicated or reordered (or a worker failed), 2 when the
//! run could not start (bad flags, no broker).

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use stompd::codec::Version;
use stompd_loadgen::client::ConnectOptions;
use stompd_loadgen::payload::STAMP_BYTES;
use stompd_loadgen::report::Report;
use stompd_loadgen::workload::{self, AckMode, Common, Flow};

/// Load for any STOMP broker (stompd, ActiveMQ, RabbitMQ, stompserver), with loss,
/// duplication and reorder checks on every message.
///
/// Every message body starts with a stamp (producer, sequence, send time); consumers check it
/// and the run fails loudly (exit 1) if anything was lost, duplicated or out of order.
/// Each run stops at --messages or --duration, whichever comes first, or at Ctrl-C (which
/// still drains and prints the summary; a second Ctrl-C kills).
/// Exit status: 0 clean, 1 messages lost/duplicated/reordered or a worker failed, 2 could
/// not start.
///
/// Examples:
///   stompd-loadgen queue --producers 4 --consumers 4 --size 1024
///   stompd-loadgen queue --ack client-individual --persistent --receipt-every 100
///   stompd-loadgen topic --subscribers 10
///   stompd-loadgen latency --rate 10000 --duration 10
///   stompd-loadgen --port 61613 --login admin --passcode admin backlog --messages 1000000
#[derive(Parser, Debug, Serialize)]
// A flag given twice takes its last value, so scripts can override their defaults.
#[command(version, verbatim_doc_comment, args_override_self = true)]
struct Cli {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    run: RunArgs,
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Args, Debug, Serialize)]
struct BrokerArgs {
    /// Broker host.
    #[arg(long, global = true, env = "LOADGEN_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Broker STOMP port.
    #[arg(long, global = true, env = "LOADGEN_PORT", default_value_t = 61613)]
    port: u16,
    #[arg(long, global = true, env = "LOADGEN_LOGIN")]
    login: Option<String>,
    #[arg(long, global = true, env = "LOADGEN_PASSCODE")]
    #[serde(skip)]
    passcode: Option<String>,
    /// The CONNECT `host` header (a virtual host to RabbitMQ).
    #[arg(long, global = true, env = "LOADGEN_VHOST", default_value = "/")]
    vhost: String,
    /// Highest STOMP version to offer (the broker may answer lower).
    #[arg(long, global = true, default_value = "1.2", value_parser = parse_version)]
    #[serde(serialize_with = "serialize_version")]
    stomp_version: Version,
    /// Pid of the broker, to report its CPU time and resident memory.
    #[arg(long, global = true, env = "LOADGEN_BROKER_PID")]
    broker_pid: Option<u32>,
}

#[derive(Args, Debug, Serialize)]
struct RunArgs {
    /// Stop after this many messages (total over producers).
    #[arg(long, short = 'n', global = true, default_value_t = 100_000)]
    messages: u64,
    /// Stop sending after this many seconds, warm-up included.
    #[arg(long, short = 'd', global = true, default_value_t = 30.0)]
    duration: f64,
    /// Seconds at the start left out of rates and latency percentiles.
    #[arg(long, global = true, default_value_t = 0.0)]
    warmup: f64,
    /// Message body size in bytes (at least 40, the stamp).
    #[arg(long, short = 's', global = true, default_value_t = 128)]
    size: usize,
    /// Destination; by default a fresh /queue/loadgen-… or /topic/loadgen-… per run.
    #[arg(long, global = true)]
    destination: Option<String>,
    /// After the last send, seconds without any delivery before missing messages count as lost.
    #[arg(long, global = true, default_value_t = 10.0)]
    drain_timeout: f64,
    /// Seconds a receipt may take.
    #[arg(long, global = true, default_value_t = 30.0)]
    receipt_timeout: f64,
    /// Consumer window, sent as activemq.prefetchSize and prefetch-count.
    #[arg(long, global = true, default_value_t = 1000)]
    prefetch: u32,
    /// Print the report as one JSON object on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// No per-second lines or progress bar.
    #[arg(long, short = 'q', global = true)]
    quiet: bool,
}

#[derive(Subcommand, Debug, Serialize)]
#[serde(tag = "workload", rename_all = "kebab-case")]
enum Workload {
    /// P producers and C competing consumers on one queue, as fast as it goes.
    Queue {
        #[arg(long, short = 'p', default_value_t = 1)]
        producers: usize,
        /// 0 measures the producers alone.
        #[arg(long, short = 'c', default_value_t = 1)]
        consumers: usize,
        #[arg(long, value_enum, default_value_t = AckMode::Auto)]
        ack: AckMode,
        /// Send with persistent:true.
        #[arg(long)]
        persistent: bool,
        /// Each producer waits for a RECEIPT every K sends (confirmed publish).
        #[arg(long, value_name = "K")]
        receipt_every: Option<u64>,
        /// Send nothing: --destination already holds the -n messages of --producers producers
        /// from an earlier `queue -c 0` run with the same -n, -p, -s and --destination (a
        /// broker restart may lie between them). The consumers take and check them.
        #[arg(long, conflicts_with_all = ["persistent", "receipt_every"])]
        drain_only: bool,
    },
    /// One producer, K subscribers on one topic: fan-out rate and completeness per subscriber.
    Topic {
        #[arg(long, short = 'k', default_value_t = 10)]
        subscribers: usize,
        #[arg(long)]
        persistent: bool,
    },
    /// A paced producer and one consumer; latency from each message's intended send time.
    Latency {
        /// Messages per second.
        #[arg(long, short = 'r', default_value_t = 10_000.0)]
        rate: f64,
    },
    /// One message in flight at a time on one connection.
    Pingpong,
    /// Fill a queue with no consumer, then drain it; both rates.
    Backlog {
        #[arg(long)]
        persistent: bool,
        #[arg(long, value_enum, default_value_t = AckMode::Auto)]
        ack: AckMode,
    },
    /// M connections, each with a subscription: connect rate and broker memory.
    Connections {
        #[arg(long, short = 'm', default_value_t = 1000)]
        connections: usize,
        /// Threads opening connections in parallel.
        #[arg(long, default_value_t = 4)]
        threads: usize,
    },
    /// Print the markdown comparison table for DIR/<case>/<broker>.<repeat>.json reports
    /// (what benches/compare.sh writes). Connects to nothing.
    Summarize {
        dir: std::path::PathBuf,
        /// Brokers, in column order.
        #[arg(long, value_delimiter = ',', default_value = "activemq,stompd,relay")]
        brokers: Vec<String>,
        /// The broker the ratios are taken against.
        #[arg(long, default_value = "activemq")]
        baseline: String,
    },
}

fn parse_version(text: &str) -> Result<Version, String> {
    Version::parse(text.as_bytes()).ok_or_else(|| format!("{text:?}: expected 1.0, 1.1 or 1.2"))
}

fn serialize_version<S: serde::Serializer>(version: &Version, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(version.as_str())
}

fn seconds(value: f64, name: &str) -> Result<Duration, String> {
    Duration::try_from_secs_f64(value).map_err(|_| format!("--{name} must be a positive number"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    stompd_loadgen::interrupt::install();
    if let Workload::Summarize {
        dir,
        brokers,
        baseline,
    } = &cli.workload
    {
        return match stompd_loadgen::summary::markdown(dir, brokers, baseline) {
            Ok(table) => {
                print!("{table}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("stompd-loadgen: reading {}: {error}", dir.display());
                ExitCode::from(2)
            }
        };
    }
    match run(&cli) {
        Ok(report) => {
            if cli.run.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("a report serializes")
                );
            } else {
                print!("{}", report.human());
            }
            match report.failure_line() {
                None => ExitCode::SUCCESS,
                Some(line) => {
                    eprintln!("{line}");
                    ExitCode::from(1)
                }
            }
        }
        Err(error) => {
            eprintln!("stompd-loadgen: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<Report> {
    let run = &cli.run;
    anyhow::ensure!(
        run.size >= STAMP_BYTES,
        "--size must be at least {STAMP_BYTES} bytes (the stamp every body carries)"
    );
    let broker = &cli.broker;
    let connect = ConnectOptions {
        host: broker.host.clone(),
        port: broker.port,
        login: broker.login.clone(),
        passcode: broker.passcode.clone(),
        vhost: broker.vhost.clone(),
        version_max: broker.stomp_version,
        ..ConnectOptions::local(broker.port)
    };
    let common = Common {
        connect,
        messages: run.messages,
        duration: seconds(run.duration, "duration").map_err(anyhow::Error::msg)?,
        warmup: seconds(run.warmup, "warmup").map_err(anyhow::Error::msg)?,
        body_bytes: run.size,
        destination: run.destination.clone(),
        drain_timeout: seconds(run.drain_timeout, "drain-timeout").map_err(anyhow::Error::msg)?,
        receipt_timeout: seconds(run.receipt_timeout, "receipt-timeout")
            .map_err(anyhow::Error::msg)?,
        prefetch: run.prefetch.max(1),
        quiet: run.quiet,
        broker_pid: broker.broker_pid,
        parameters: serde_json::to_value(cli)?,
    };
    let flow = |name| Flow {
        name,
        producers: 1,
        consumers: 1,
        topic: false,
        ack: AckMode::Auto,
        persistent: false,
        receipt_every: None,
        rate: None,
        backlog: false,
        drain_only: false,
    };
    let report = match &cli.workload {
        Workload::Queue {
            producers,
            consumers,
            ack,
            persistent,
            receipt_every,
            drain_only,
        } => {
            anyhow::ensure!(*producers >= 1, "--producers must be at least 1");
            anyhow::ensure!(
                !drain_only || *consumers >= 1,
                "--drain-only needs at least one consumer"
            );
            // Checked here, not by clap: --destination is global, given before the workload.
            anyhow::ensure!(
                !drain_only || run.destination.is_some(),
                "--drain-only needs --destination, the queue an earlier run filled"
            );
            workload::run_flow(
                &common,
                &Flow {
                    producers: *producers,
                    consumers: *consumers,
                    ack: *ack,
                    persistent: *persistent,
                    receipt_every: receipt_every.filter(|&k| k > 0),
                    drain_only: *drain_only,
                    ..flow("queue")
                },
            )?
        }
        Workload::Topic {
            subscribers,
            persistent,
        } => workload::run_flow(
            &common,
            &Flow {
                consumers: *subscribers,
                topic: true,
                persistent: *persistent,
                ..flow("topic")
            },
        )?,
        Workload::Latency { rate } => {
            anyhow::ensure!(*rate > 0.0, "--rate must be positive");
            workload::run_flow(
                &common,
                &Flow {
                    rate: Some(*rate),
                    ..flow("latency")
                },
            )?
        }
        Workload::Pingpong => workload::run_pingpong(&common)?,
        Workload::Backlog { persistent, ack } => workload::run_flow(
            &common,
            &Flow {
                persistent: *persistent,
                ack: *ack,
                backlog: true,
                ..flow("backlog")
            },
        )?,
        Workload::Connections {
            connections,
            threads,
        } => workload::run_connections(&common, *connections, *threads)?,
        Workload::Summarize { .. } => unreachable!("handled in main"),
    };
    Ok(report)
}
