//! The `stompd` binary's command line: help, `check-config` exit codes, `--print-config`, and
//! the exit codes of bad settings. Each child gets a cleared environment, so the developer's
//! own `STOMPD_*` or `RUST_LOG` cannot change the outcome.

use std::path::Path;
use std::process::{Command, Output};

use stompd::config::{env_var_name, flag_name, Layer};

fn stompd(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stompd"))
        .args(args)
        .current_dir(dir)
        .env_clear()
        .output()
        .expect("run stompd")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn long_help_documents_every_key_flag_env_and_the_precedence() {
    let dir = tempfile::tempdir().unwrap();
    let output = stompd(&["--help"], dir.path());
    assert!(output.status.success());
    let help = text(&output.stdout);
    for key in Layer::KEYS {
        assert!(
            help.contains(&flag_name(key)),
            "--help lacks {}",
            flag_name(key)
        );
        assert!(
            help.contains(&env_var_name(key)),
            "--help lacks {}",
            env_var_name(key)
        );
        assert!(
            help.contains(&format!("[toml: {key}]")),
            "--help lacks toml key {key}"
        );
    }
    for short in [
        "-p,", "-b,", "-w,", "-s,", "-q,", "-a,", "-c,", "-d,", "-C,", "-l,",
    ] {
        assert!(help.contains(short), "--help lacks stompserver's {short}");
    }
    for words in [
        "Later ones win",
        "STOMPD_CONFIG",
        "check-config",
        "passwd",
        "Examples:",
        "RUST_LOG",
    ] {
        assert!(help.contains(words), "--help lacks {words:?}");
    }
}

#[test]
fn check_config_exits_0_for_a_valid_file_and_prints_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ok.toml"),
        "shards = 2\nfsync = \"every:10\"\n",
    )
    .unwrap();
    let output = stompd(&["check-config", "ok.toml"], dir.path());
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    assert!(
        stdout.contains("shards = 2  # config file ok.toml"),
        "{stdout}"
    );
    assert!(stdout.contains("fsync = \"every:10\""), "{stdout}");
    assert!(
        stdout.contains("listen = \"127.0.0.1:61613\"  # the default"),
        "{stdout}"
    );
}

#[test]
fn check_config_exits_1_and_lists_each_error_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.toml"),
        "shards = 0\nconnections_max = 0\nheartbeat_send_ms = 5\n",
    )
    .unwrap();
    let output = stompd(&["check-config", "bad.toml"], dir.path());
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    for key in ["shards = 0", "connections_max = 0", "heartbeat_send_ms = 5"] {
        assert!(
            stderr.contains(&format!("error: {key} (from config file bad.toml)")),
            "{stderr}"
        );
    }
    assert!(stderr.contains("3 error(s)"), "{stderr}");
    assert!(output.stdout.is_empty());
}

#[test]
fn check_config_exits_1_for_syntax_unknown_keys_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("syntax.toml"), "shards = \n").unwrap();
    std::fs::write(dir.path().join("typo.toml"), "shard = 2\n").unwrap();
    for (file, expected) in [
        ("syntax.toml", "line 1"),
        ("typo.toml", "unknown field `shard`"),
        ("missing.toml", "cannot read config file"),
    ] {
        let output = stompd(&["check-config", file], dir.path());
        assert_eq!(output.status.code(), Some(1), "{file}");
        assert!(
            text(&output.stderr).contains(expected),
            "{file}: {}",
            text(&output.stderr)
        );
    }
}

#[test]
fn check_config_loads_the_password_file_it_names() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("auth.toml"), "auth_file = \"users\"\n").unwrap();
    std::fs::write(dir.path().join("users"), "# users\nalice:s3cr3t-value\n").unwrap();
    let output = stompd(&["check-config", "auth.toml"], dir.path());
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("auth_file users") && stderr.contains("line 2"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("s3cr3t-value"),
        "never print a password: {stderr}"
    );
}

#[test]
fn print_config_applies_env_and_flags_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_stompd"))
        .args(["--print-config", "-p", "7000", "--shards", "3"])
        .current_dir(dir.path())
        .env_clear()
        .env("STOMPD_QUEUE_TYPE", "memory")
        .env("STOMPD_SHARDS", "9")
        .env("STOMPD_NOT_A_KEY", "1")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    assert!(
        stdout.contains("listen = \"127.0.0.1:7000\"  # flag -p/--port"),
        "{stdout}"
    );
    assert!(stdout.contains("shards = 3  # flag --shards"), "{stdout}");
    assert!(
        stdout.contains("queue_type = \"memory\"  # environment variable STOMPD_QUEUE_TYPE"),
        "{stdout}"
    );
    assert!(text(&output.stderr).contains("STOMPD_NOT_A_KEY"));
}

#[test]
fn bad_settings_exit_2_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let output = stompd(&["--shards", "0", "--prefetch-default", "0"], dir.path());
    assert_eq!(output.status.code(), Some(2));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("shards = 0 (from flag --shards)"),
        "{stderr}"
    );
    assert!(stderr.contains("prefetch_default = 0"), "{stderr}");

    let output = stompd(&["-q", "dbm"], dir.path());
    assert_eq!(output.status.code(), Some(2), "clap's usage error");
    assert!(text(&output.stderr).contains("not supported by stompd"));

    let output = stompd(&["-w", "does/not/exist"], dir.path());
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("cannot change to working directory"));
}

#[test]
fn workdir_applies_before_the_config_file_is_read() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("srv")).unwrap();
    std::fs::write(dir.path().join("srv/stompd.toml"), "shards = 4\n").unwrap();
    let output = stompd(
        &["-w", "srv", "-C", "stompd.toml", "--print-config"],
        dir.path(),
    );
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("shards = 4"));
}

/// Starts the broker, reads its log until it listens (deadline 20 s), stops it with SIGTERM
/// and returns the log; the exit status must be 0.
fn serve_then_stop(args: &[&str], dir: &Path) -> String {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_stompd"))
        .args(args)
        .current_dir(dir)
        .env_clear()
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run stompd");
    let stderr = child.stderr.take().unwrap();
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    let mut log = String::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !log.contains("listening on") {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match received.recv_timeout(left) {
            Ok(line) => {
                log.push_str(&line);
                log.push('\n');
            }
            Err(_) => {
                let _ = child.kill();
                panic!("stompd did not listen: {log}");
            }
        }
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    log
}

#[test]
fn serving_logs_its_settings_and_address_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let log = serve_then_stop(&["--listen", "127.0.0.1:0", "--shards", "1"], dir.path());
    assert!(
        log.contains("settings resolved"),
        "logs go to stderr: {log}"
    );
    assert!(log.contains("listening on 127.0.0.1:"), "{log}");
}

#[test]
fn stompserver_auth_flag_needs_its_dot_passwd() {
    let dir = tempfile::tempdir().unwrap();
    let output = stompd(&["-a"], dir.path());
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains(".passwd"));

    std::fs::write(dir.path().join(".passwd"), "testuser:testpass\n").unwrap();
    let stderr = serve_then_stop(
        &["-a", "--listen", "127.0.0.1:0", "--shards", "1"],
        dir.path(),
    );
    assert!(stderr.contains("plain-text passwords"), "warned: {stderr}");
}
