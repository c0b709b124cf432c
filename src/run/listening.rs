//! The "listening on ADDR" line stompd writes to stderr once it accepts connections, whatever
//! the log level, and how a program that starts a stompd on port 0 learns its port from it.
//! Port 0 means nothing else can take the port between choosing and binding it, so scripts,
//! tests and tools start brokers that way; this module is the one place that knows the line.

use std::io::{self, BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// What precedes the address in the line.
pub const LISTENING_ON: &str = "listening on ";

/// The port of the first "listening on HOST:PORT" in `text` (a line or a whole stderr log).
pub fn port_in(text: &str) -> Option<u16> {
    let rest = &text[text.find(LISTENING_ON)? + LISTENING_ON.len()..];
    let address = rest.split_whitespace().next()?;
    address.rsplit_once(':')?.1.parse().ok()
}

/// Starts `command` (a stompd on `--listen 127.0.0.1:0`) with its stderr piped, and returns
/// the process and the port from its "listening on" line, waiting at most `deadline`. The
/// rest of its stderr is passed on to ours by a thread. A process that does not say it
/// listens in time is killed and the wait is an error (`TimedOut`).
pub fn spawn_listening(mut command: Command, deadline: Duration) -> io::Result<(Child, u16)> {
    let mut process = command.stderr(Stdio::piped()).spawn()?;
    let stderr = process.stderr.take().expect("stderr was piped");
    let (port_sender, port_receiver) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("{line}");
            if let Some(port) = port_in(&line) {
                let _ = port_sender.send(port);
            }
        }
    });
    match port_receiver.recv_timeout(deadline) {
        Ok(port) => Ok((process, port)),
        Err(_) => {
            let _ = process.kill();
            let _ = process.wait();
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{command:?} did not say it was listening within {deadline:?}"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_is_read_from_the_line_stompd_writes() {
        let line = "2026-12-07T17:58:32Z INFO stompd::run: stompd 0.1.0 listening on 127.0.0.1:34433 address=127.0.0.1:34433 shards=2";
        assert_eq!(port_in(line), Some(34433));
        assert_eq!(
            port_in("stompd 0.1.0 listening on [::1]:61613"),
            Some(61613)
        );
        assert_eq!(port_in("settings resolved"), None);
    }
}
