//! The transport with the test relay handler, as a process: `relay_server [--listen ADDR]
//! [--shards N]`. Prints `listening on ADDR` on stdout once bound; SIGINT/SIGTERM drain and
//! exit 0. Useful for poking at the event loop by hand and as the "simplest relay" in benchmarks.

use std::process::ExitCode;

use stompd::server::{self, Server, ServerConfig, Shutdown};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let mut config = ServerConfig::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().unwrap_or_default();
        match arg.as_str() {
            "--listen" => config.listen = value.parse().expect("--listen takes HOST:PORT"),
            "--shards" => config.shards = value.parse().expect("--shards takes a number"),
            _ => {
                eprintln!("usage: relay_server [--listen HOST:PORT] [--shards N]");
                return ExitCode::from(2);
            }
        }
    }
    let heartbeat = config.heartbeat;
    let server = match Server::bind(config) {
        Ok(server) => server,
        Err(error) => {
            eprintln!("relay_server: {error}");
            return ExitCode::FAILURE;
        }
    };
    println!("listening on {}", server.local_addr());
    let shutdown = Shutdown::new();
    server::shutdown_on_signals(&shutdown).expect("signal handler");
    match server.run(
        move |shard, shards| server::relay::Relay::new(shard, shards, heartbeat),
        shutdown,
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("relay_server: {error}");
            ExitCode::FAILURE
        }
    }
}
