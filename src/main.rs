//! The `stompd` binary: parses the command line, resolves and validates the settings, sets up
//! logging, then hands over to the server. Everything with logic lives in the library
//! (`stompd::config`, `stompd::auth`).

use std::process::ExitCode;

use clap::Parser;
use stompd::auth::PasswordFile;
use stompd::config::{self, commands, Cli, Command, Config};

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
    config::init_tracing(&resolved.config.log_level);
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

/// PLACEHOLDER until the io_uring server is merged: the lead replaces this body with the
/// server call (`server::run(server_config, shutdown)`), mapping `Config` onto its types and
/// wrapping `password_file` (when auth is on) in the broker's `Authenticator`.
fn run(config: Config, password_file: Option<PasswordFile>) -> ExitCode {
    let _ = password_file;
    eprintln!(
        "stompd {}: the network server is not built yet, so nothing listens on {}.",
        env!("CARGO_PKG_VERSION"),
        config.listen
    );
    ExitCode::from(2)
}
