//! The `stompd` binary. Until the server lands (issue 4) it parses its flags and says plainly
//! that it cannot serve yet, rather than pretending to listen.

use std::process::ExitCode;

use clap::Parser;

/// stompd: a STOMP 1.0/1.1/1.2 message broker (work in progress: the codec is done, the
/// server is not).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "STOMPD_LISTEN", default_value = "127.0.0.1:61613")]
    listen: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    eprintln!(
        "stompd {}: the network server is not built yet, so nothing listens on {}.\n\
         What works today is listed in README.md (Status).",
        env!("CARGO_PKG_VERSION"),
        args.listen
    );
    ExitCode::from(2)
}
