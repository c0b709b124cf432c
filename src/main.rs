//! The `stompd` binary: parses the command line, resolves and validates the settings, sets up
//! logging, then hands over to the server. Everything with logic lives in the library
//! (`stompd::config`, `stompd::auth`).

use std::process::ExitCode;

use clap::Parser;
use stompd::auth::PasswordFile;
use stompd::config::{self, commands, Cli, Command, Config};
use stompd::server::Shutdown;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::CheckConfig { file }) => {
            return commands::check_config(file, &mut std::io::stdout(), &mut std::io::stderr())
        }
        Some(Command::Passwd(args)) => return commands::passwd(args, &mut std::io::stderr()),
        None => {}
    }

    let env = config::process_env();
    // stompserver's -w: before anything else, so every relative path is taken from there.
    if let Err(error) = config::enter_workdir(&cli.run, &env) {
        eprintln!("error: {error}");
        return ExitCode::from(2);
    }
    let resolved = match config::resolve(&cli.run, &env) {
        Ok(resolved) => resolved,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };
    if cli.run.print_config {
        return commands::print_config(&resolved, &mut std::io::stdout(), &mut std::io::stderr());
    }
    // Log lines go through a background writer thread: a shard thread never blocks on a
    // slow or full stderr (a terminal, a pipe to journald). Kept until main returns, so lines
    // still queued are written before exit.
    let (writer, _log_guard) = tracing_appender::non_blocking(std::io::stderr());
    config::init_tracing_with(&resolved.config.log_level, writer);
    for warning in &resolved.warnings {
        tracing::warn!("{warning}");
    }
    let password_file = match config::load_password_file(&resolved) {
        Ok(password_file) => password_file,
        Err(error) => {
            tracing::error!("{error}");
            return ExitCode::from(2);
        }
    };
    tracing::info!(config = ?resolved.config, "settings resolved");
    run(resolved.config, password_file)
}

/// Starts the broker and waits for it to stop: exit 0 after a clean drain, 1 when it could
/// not start or failed while running (the message names the fix).
fn run(config: Config, password_file: Option<PasswordFile>) -> ExitCode {
    // A file-size limit (`ulimit -f`) must fail the log's write with EFBIG, which refuses that
    // one message (its sender gets an ERROR), not kill the broker and every connection with it.
    // SAFETY: setting a signal's disposition to ignore, before any thread starts.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let shutdown = Shutdown::new();
    if let Err(error) = stompd::server::shutdown_on_signals(&shutdown) {
        tracing::error!("cannot watch for SIGINT/SIGTERM: {error}");
        return ExitCode::from(1);
    }
    match stompd::run::run(&config, password_file, shutdown) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Straight to stderr, whatever the log level: the operator must see why.
            eprintln!("stompd: {error}");
            ExitCode::from(1)
        }
    }
}
