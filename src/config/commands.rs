//! The subcommands that do not serve: `check-config`, `passwd` and `--print-config`. Each
//! returns the process exit code and writes only to the streams it is given, so tests drive
//! them directly and `main.rs` stays a dispatcher.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;

use super::{load_password_file, resolve_file, PasswdArgs, Resolved};
use crate::auth::{self, PasswdOutcome};

/// `stompd check-config FILE`: the resolved settings on `out` and exit 0, or each error on
/// `err` and exit 1. The password file the config names is loaded and checked too.
pub fn check_config(path: &Path, out: &mut dyn Write, err: &mut dyn Write) -> ExitCode {
    match resolve_file(path).and_then(|resolved| {
        load_password_file(&resolved)?;
        Ok(resolved)
    }) {
        Ok(resolved) => {
            let _ = writeln!(out, "# {}: valid", path.display());
            let _ = out.write_all(resolved.to_toml().as_bytes());
            for warning in &resolved.warnings {
                let _ = writeln!(err, "warning: {warning}");
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            let _ = writeln!(err, "{errors}");
            let _ = writeln!(err, "{}: {} error(s)", path.display(), errors.0.len());
            ExitCode::FAILURE
        }
    }
}

/// `stompd --print-config`: the resolved settings as TOML with their origins.
pub fn print_config(resolved: &Resolved, out: &mut dyn Write, err: &mut dyn Write) -> ExitCode {
    for warning in &resolved.warnings {
        let _ = writeln!(err, "warning: {warning}");
    }
    match out.write_all(resolved.to_toml().as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

/// `stompd passwd [--file PATH] USER`: reads the password (two silent prompts on a terminal,
/// else the first line of stdin) and sets it. Exit 0 on success, 1 on failure.
pub fn passwd(args: &PasswdArgs, err: &mut dyn Write) -> ExitCode {
    let password = match read_password(&args.user) {
        Ok(password) => password,
        Err(message) => {
            let _ = writeln!(err, "error: {message}");
            return ExitCode::FAILURE;
        }
    };
    match auth::set_password(&args.file, &args.user, password.as_bytes()) {
        Ok(outcome) => {
            let verb = match outcome {
                PasswdOutcome::Added => "added",
                PasswdOutcome::Changed => "changed the password of",
            };
            let _ = writeln!(
                err,
                "{verb} user `{}` in {}",
                args.user,
                args.file.display()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            let _ = writeln!(err, "error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn read_password(user: &str) -> Result<String, String> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        let first = rpassword::prompt_password(format!("New password for {user}: "))
            .map_err(|error| format!("cannot read the password from the terminal: {error}"))?;
        let second = rpassword::prompt_password("Again: ")
            .map_err(|error| format!("cannot read the password from the terminal: {error}"))?;
        if first != second {
            return Err("the passwords differ; nothing was changed".to_owned());
        }
        return Ok(first);
    }
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .map_err(|error| format!("cannot read the password from stdin: {error}"))?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    Ok(password.to_owned())
}
