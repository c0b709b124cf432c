//! stompd-log: what is in a stompd durable-queue log, whether it is intact, and getting its
//! messages out again.
//!
//! Everything here reads the log through the broker's own code (`stompd::log`: the same
//! scanner, CRC check and reclaim rule as recovery) and publishes through the broker crate's
//! client (`stompd::client`). Nothing writes to the log directory: segments are opened
//! read-only, so the tool is safe on a running broker's directory. Each subcommand is a module
//! with a `run(args, out) -> exit status`; `main.rs` only parses flags.

pub mod cli;
pub mod dump;
pub mod render;
pub mod replay;
pub mod segments;
pub mod source;
pub mod stats;
pub mod verify;

use std::io::Write;

use cli::{Cli, Command};

/// Exit status when the command failed to run at all (bad directory, I/O error, bad flag as
/// clap reports it).
pub const EXIT_ERROR: u8 = 2;

/// Runs a parsed command line, writing its report to `out`; returns the exit status (0 all
/// well, 1 something found wrong).
pub fn run(cli: &Cli, out: &mut dyn Write) -> anyhow::Result<u8> {
    let status = match &cli.command {
        Command::Segments(args) => segments::run(args, out)?,
        Command::Dump(args) => dump::run(args, out)?,
        Command::Verify(args) => verify::run(args, out)?,
        Command::Stats(args) => stats::run(args, out)?,
        Command::Replay(args) => replay::run(args, out)?,
    };
    out.flush()?;
    Ok(status)
}
