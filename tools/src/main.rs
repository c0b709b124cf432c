//! `stompd-log`: see `stompd_log` and `stompd-log --help`.

use std::process::ExitCode;

use clap::Parser;
use stompd_log::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match stompd_log::run(&cli, &mut out) {
        Ok(status) => ExitCode::from(status),
        // A closed pipe (`stompd-log dump DIR | head`) is not a failure.
        Err(error)
            if error
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(error) => {
            drop(out);
            eprintln!("stompd-log: {error:#}");
            ExitCode::from(stompd_log::EXIT_ERROR)
        }
    }
}
