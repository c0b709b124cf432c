//! `stompd-relay`: the reference relay (see `stompd_loadgen::relay`), as a process, for
//! `benches/compare.sh` and for measuring the load generator by hand.

use clap::Parser;
use stompd::codec::Version;
use stompd_loadgen::relay::{self, Fault, RelayConfig};

/// The simplest in-memory STOMP forwarder: one thread per connection, no acks, no storage.
/// A ceiling for brokers and a trivial target for measuring the load generator.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, env = "RELAY_LISTEN", default_value = "127.0.0.1:61613")]
    listen: String,
    /// Accept SENDs and answer receipts, forward nothing (a trivial sink).
    #[arg(long)]
    sink: bool,
    /// Misbehave on purpose: drop-every:N, duplicate-every:N or reorder-every:N.
    #[arg(long)]
    fault: Option<Fault>,
    /// Answer as a broker that speaks at most this STOMP version (1.0 exercises fallback).
    #[arg(long, default_value = "1.2", value_parser = parse_version)]
    stomp_version: Version,
}

fn parse_version(text: &str) -> Result<Version, String> {
    Version::parse(text.as_bytes()).ok_or_else(|| format!("{text:?}: expected 1.0, 1.1 or 1.2"))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let relay = relay::spawn(
        &args.listen,
        RelayConfig {
            fault: args.fault,
            version_max: args.stomp_version,
            sink: args.sink,
        },
    )?;
    // Scripts wait for this line to know the port.
    println!("listening on {}", relay.address);
    loop {
        std::thread::park();
    }
}
