//! Resolution of settings: precedence (defaults < file < environment < flags), stompserver's
//! flags, and every validation error. The environment is always an explicit map, so these
//! tests never read or write the process environment and cannot race each other.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Parser;
use stompd::codec::Limits;
use stompd::config::{
    self, defaults, resolve, AuthConfig, Cli, ConfigError, ConfigErrors, FsyncPolicy, Layer,
    Origin, QueueType, Resolved,
};

fn args(flags: &[&str]) -> config::RunArgs {
    let mut argv = vec!["stompd"];
    argv.extend_from_slice(flags);
    Cli::try_parse_from(argv).expect("flags parse").run
}

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

fn toml_file(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("stompd.toml");
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(text.as_bytes()).unwrap();
    path
}

fn ok(flags: &[&str], environment: &[(&str, &str)]) -> Resolved {
    resolve(&args(flags), &env(environment)).unwrap_or_else(|errors| panic!("{errors}"))
}

fn errors(flags: &[&str], environment: &[(&str, &str)]) -> Vec<ConfigError> {
    match resolve(&args(flags), &env(environment)) {
        Ok(resolved) => panic!("expected errors, resolved {:?}", resolved.config),
        Err(ConfigErrors(errors)) => errors,
    }
}

/// The single error, which must be about `key`; returns its message.
fn error_about(flags: &[&str], environment: &[(&str, &str)], key: &str) -> String {
    let errors = errors(flags, environment);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].key(), Some(key), "{}", errors[0]);
    errors[0].to_string()
}

#[test]
fn defaults_when_nothing_is_said() {
    let resolved = ok(&[], &[]);
    let config = &resolved.config;
    assert_eq!(
        config.listen,
        "127.0.0.1:61613".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(config.shards, defaults::shards());
    assert!(config.shards >= 1);
    assert_eq!(config.data_dir, PathBuf::from("stompd-data"));
    assert_eq!(config.limits, Limits::DEFAULT);
    assert_eq!(config.connections_max, defaults::CONNECTIONS_MAX);
    assert_eq!(config.out_buffer_bytes_max, defaults::OUT_BUFFER_BYTES_MAX);
    assert_eq!(config.heartbeat_send_ms, 1_000);
    assert_eq!(config.heartbeat_receive_ms, 1_000);
    assert_eq!(config.heartbeat_read_grace_percent, 200);
    assert_eq!(config.fsync, FsyncPolicy::Always);
    assert_eq!(config.segment_bytes, defaults::SEGMENT_BYTES);
    assert_eq!(config.queue_type, QueueType::File);
    assert_eq!(config.auth, AuthConfig::Off);
    assert_eq!(config.dead_letter_deliveries_max, 7);
    assert_eq!(config.prefetch_default, 1000);
    assert_eq!(config.prefetch_bytes_default, 4 * 1024 * 1024);
    // Bounded by disk: the upper bounds, with the disk budget computed at start.
    assert_eq!(config.queue_messages_max, 1_000_000_000);
    assert_eq!(config.queue_bytes_max, 1 << 40);
    assert_eq!(config.disk_bytes_max, None);
    assert!(resolved.to_toml().contains("# disk_bytes_max is not set"));
    assert_eq!(config.log_level, "info");
    assert!(resolved
        .origins
        .values()
        .all(|origin| *origin == Origin::Default));
}

#[test]
fn file_beats_defaults_env_beats_file_flags_beat_env() {
    let dir = tempfile::tempdir().unwrap();
    let path = toml_file(
        dir.path(),
        "shards = 2\nconnections_max = 20\nprefetch_default = 30\nout_buffer_bytes_max = 8192\n",
    );
    let path_text = path.to_str().unwrap();
    let resolved = ok(
        &["-C", path_text, "--prefetch-default", "33"],
        &[
            ("STOMPD_CONNECTIONS_MAX", "22"),
            ("STOMPD_PREFETCH_DEFAULT", "32"),
        ],
    );
    let config = &resolved.config;
    assert_eq!(config.shards, 2, "file over default");
    assert_eq!(config.out_buffer_bytes_max, 8192, "file over default");
    assert_eq!(config.connections_max, 22, "environment over file");
    assert_eq!(config.prefetch_default, 33, "flag over environment");
    assert_eq!(
        config.dead_letter_deliveries_max, 7,
        "default when nobody says"
    );
    assert_eq!(resolved.origins["shards"], Origin::File(path.clone()));
    assert_eq!(
        resolved.origins["connections_max"],
        Origin::Env("STOMPD_CONNECTIONS_MAX".into())
    );
    assert_eq!(
        resolved.origins["prefetch_default"],
        Origin::Flag("--prefetch-default".into())
    );
    assert_eq!(
        resolved.origins["dead_letter_deliveries_max"],
        Origin::Default
    );
}

#[test]
fn every_key_is_read_from_file_env_and_flags() {
    // One value per key, different from its default, in each source in turn.
    let values: &[(&str, &str, &str)] = &[
        ("listen", "\"127.0.0.2:7000\"", "127.0.0.2:7000"),
        ("shards", "3", "3"),
        ("data_dir", "\"/srv/q\"", "/srv/q"),
        ("frame_bytes_max", "65536", "65536"),
        ("headers_count_max", "50", "50"),
        ("header_line_bytes_max", "1024", "1024"),
        ("body_bytes_max", "60000", "60000"),
        ("connections_max", "5", "5"),
        ("out_buffer_bytes_max", "65536", "65536"),
        ("heartbeat_send_ms", "0", "0"),
        ("heartbeat_receive_ms", "2000", "2000"),
        ("heartbeat_read_grace_percent", "250", "250"),
        ("fsync", "\"every:20\"", "every:20"),
        ("segment_bytes", "1048576", "1048576"),
        ("queue_type", "\"memory\"", "memory"),
        ("auth_file", "\"/etc/stompd/users\"", "/etc/stompd/users"),
        ("auth_plaintext", "true", "true"),
        ("dead_letter_deliveries_max", "3", "3"),
        ("prefetch_default", "10", "10"),
        ("prefetch_bytes_default", "65536", "65536"),
        ("queue_messages_max", "500", "500"),
        ("queue_bytes_max", "1000000", "1000000"),
        ("memory_bytes_max", "100000000", "100000000"),
        ("disk_bytes_max", "1073741824", "1073741824"),
        ("topic_subscriber_stall_ms", "60000", "60000"),
        ("connect_timeout_ms", "500", "500"),
        ("login_failure_delay_ms", "0", "0"),
        ("log_level", "\"debug\"", "debug"),
    ];
    let mut keys: Vec<&str> = values.iter().map(|(key, _, _)| *key).collect();
    keys.sort_unstable();
    let mut all: Vec<&str> = Layer::KEYS.to_vec();
    all.sort_unstable();
    assert_eq!(keys, all, "the table above covers every key");

    let check = |resolved: &Resolved, source: &str| {
        let config = &resolved.config;
        assert_eq!(config.listen, "127.0.0.2:7000".parse().unwrap(), "{source}");
        assert_eq!(config.shards, 3, "{source}");
        assert_eq!(config.data_dir, PathBuf::from("/srv/q"), "{source}");
        assert_eq!(
            config.limits,
            Limits {
                frame_bytes_max: 65536,
                headers_count_max: 50,
                header_line_bytes_max: 1024,
                body_bytes_max: 60000
            },
            "{source}"
        );
        assert_eq!(config.connections_max, 5, "{source}");
        assert_eq!(config.out_buffer_bytes_max, 65536, "{source}");
        assert_eq!(config.segment_bytes, 1_048_576, "{source}");
        assert_eq!(config.heartbeat_send_ms, 0, "{source}");
        assert_eq!(config.heartbeat_receive_ms, 2000, "{source}");
        assert_eq!(config.heartbeat_read_grace_percent, 250, "{source}");
        assert_eq!(
            config.fsync,
            FsyncPolicy::Every { interval_ms: 20 },
            "{source}"
        );
        assert_eq!(config.queue_type, QueueType::Memory, "{source}");
        assert_eq!(
            config.auth,
            AuthConfig::StompserverPlain("/etc/stompd/users".into()),
            "{source}"
        );
        assert_eq!(config.dead_letter_deliveries_max, 3, "{source}");
        assert_eq!(config.prefetch_default, 10, "{source}");
        assert_eq!(config.prefetch_bytes_default, 65536, "{source}");
        assert_eq!(config.queue_messages_max, 500, "{source}");
        assert_eq!(config.queue_bytes_max, 1_000_000, "{source}");
        assert_eq!(config.memory_bytes_max, 100_000_000, "{source}");
        assert_eq!(config.disk_bytes_max, Some(1 << 30), "{source}");
        assert_eq!(config.topic_subscriber_stall_ms, 60_000, "{source}");
        assert_eq!(config.connect_timeout_ms, 500, "{source}");
        assert_eq!(config.login_failure_delay_ms, 0, "{source}");
        assert_eq!(config.log_level, "debug", "{source}");
        for key in Layer::KEYS {
            assert_ne!(resolved.origins[key], Origin::Default, "{source}: {key}");
        }
    };

    let dir = tempfile::tempdir().unwrap();
    let text: String = values
        .iter()
        .map(|(key, toml, _)| format!("{key} = {toml}\n"))
        .collect();
    let path = toml_file(dir.path(), &text);
    check(&ok(&["-C", path.to_str().unwrap()], &[]), "file");

    let names: Vec<(String, &str)> = values
        .iter()
        .map(|(key, _, plain)| (config::env_var_name(key), *plain))
        .collect();
    let pairs: Vec<(&str, &str)> = names.iter().map(|(n, v)| (n.as_str(), *v)).collect();
    check(&ok(&[], &pairs), "environment");

    let flags: Vec<String> = values
        .iter()
        .flat_map(|(key, _, plain)| [config::flag_name(key), plain.to_string()])
        .collect();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    check(&ok(&flags, &[]), "flags");
}

#[test]
fn config_file_path_from_environment() {
    let dir = tempfile::tempdir().unwrap();
    let path = toml_file(dir.path(), "shards = 5\n");
    let resolved = ok(&[], &[("STOMPD_CONFIG", path.to_str().unwrap())]);
    assert_eq!(resolved.config.shards, 5);
}

#[test]
fn empty_environment_values_count_as_unset() {
    let resolved = ok(&[], &[("STOMPD_SHARDS", ""), ("STOMPD_FSYNC", "  ")]);
    assert_eq!(resolved.origins["shards"], Origin::Default);
    assert_eq!(resolved.config.fsync, FsyncPolicy::Always);
}

#[test]
fn environment_booleans_take_common_spellings() {
    for (text, plain) in [("1", true), ("yes", true), ("off", false), ("FALSE", false)] {
        let resolved = ok(
            &[],
            &[("STOMPD_AUTH_FILE", "u"), ("STOMPD_AUTH_PLAINTEXT", text)],
        );
        let expected = if plain {
            AuthConfig::StompserverPlain("u".into())
        } else {
            AuthConfig::PasswordFile("u".into())
        };
        assert_eq!(resolved.config.auth, expected, "{text}");
    }
}

#[test]
fn rust_log_is_an_alias_below_stompd_log_level() {
    let resolved = ok(&[], &[("RUST_LOG", "warn")]);
    assert_eq!(resolved.config.log_level, "warn");
    assert_eq!(
        resolved.origins["log_level"],
        Origin::Env("RUST_LOG".into())
    );
    let resolved = ok(&[], &[("RUST_LOG", "warn"), ("STOMPD_LOG_LEVEL", "error")]);
    assert_eq!(resolved.config.log_level, "error");
    let resolved = ok(&["--log-level", "trace"], &[("RUST_LOG", "warn")]);
    assert_eq!(resolved.config.log_level, "trace");
}

#[test]
fn unknown_stompd_variables_are_warned_about() {
    let resolved = ok(&[], &[("STOMPD_SHARD", "4"), ("STOMPD_WORKDIR", "/tmp")]);
    assert_eq!(resolved.warnings.len(), 1, "{:?}", resolved.warnings);
    assert!(
        resolved.warnings[0].contains("STOMPD_SHARD "),
        "{:?}",
        resolved.warnings
    );
}

// stompserver's flags (bin/stompserver, StompServer::Configurator#getopts).

#[test]
fn stompserver_port_and_host_edit_the_listen_address() {
    let resolved = ok(&["-p", "7001"], &[]);
    assert_eq!(resolved.config.listen, "127.0.0.1:7001".parse().unwrap());
    assert_eq!(resolved.origins["listen"], Origin::Flag("-p/--port".into()));

    let resolved = ok(&["-b", "0.0.0.0"], &[("STOMPD_LISTEN", "127.0.0.1:7002")]);
    assert_eq!(resolved.config.listen, "0.0.0.0:7002".parse().unwrap());

    let resolved = ok(&["-b", "::1", "-p", "7003"], &[]);
    assert_eq!(resolved.config.listen, "[::1]:7003".parse().unwrap());

    let resolved = ok(&["--port", "7004", "--host", "localhost"], &[]);
    assert_eq!(resolved.config.listen.port(), 7004);
    assert!(resolved.config.listen.ip().is_loopback());

    let error = Cli::try_parse_from(["stompd", "--listen", "127.0.0.1:1", "-p", "2"]).unwrap_err();
    assert_eq!(error.kind(), clap::error::ErrorKind::ArgumentConflict);
}

#[test]
fn stompserver_storage_queue_type_and_debug() {
    let resolved = ok(&["-s", ".stompserver", "-q", "memory", "-d"], &[]);
    assert_eq!(resolved.config.data_dir, PathBuf::from(".stompserver"));
    assert_eq!(resolved.config.queue_type, QueueType::Memory);
    assert_eq!(resolved.config.log_level, "debug");
    assert_eq!(
        resolved.origins["log_level"],
        Origin::Flag("-d/--debug".into())
    );
    assert_eq!(
        resolved.origins["data_dir"],
        Origin::Flag("-s/--data-dir".into())
    );

    // stompserver's long spellings are accepted too.
    let resolved = ok(
        &[
            "--storage",
            "st",
            "--queuetype",
            "file",
            "--log_level",
            "FATAL",
        ],
        &[],
    );
    assert_eq!(resolved.config.data_dir, PathBuf::from("st"));
    assert_eq!(resolved.config.queue_type, QueueType::File);
    assert_eq!(
        resolved.config.log_level, "error",
        "stompserver's fatal is error"
    );
}

#[test]
fn stompserver_queue_types_we_do_not_have_are_refused_with_advice() {
    for queue_type in ["dbm", "activerecord"] {
        let error = Cli::try_parse_from(["stompd", "-q", queue_type]).unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("not supported") && text.contains("use `file`"),
            "{text}"
        );

        let errors = errors(&[], &[("STOMPD_QUEUE_TYPE", queue_type)]);
        assert!(
            matches!(&errors[..], [ConfigError::Env { var, .. }] if var == "STOMPD_QUEUE_TYPE")
        );
        assert!(errors[0].to_string().contains("use `file`"));
    }
}

#[test]
fn stompserver_auth_reads_plain_dot_passwd() {
    let resolved = ok(&["-a"], &[]);
    assert_eq!(
        resolved.config.auth,
        AuthConfig::StompserverPlain(PathBuf::from(".passwd"))
    );
    assert_eq!(
        resolved.origins["auth_file"],
        Origin::Flag("-a/--auth".into())
    );
    assert!(
        resolved.warnings.iter().any(|w| w.contains("plain-text")),
        "{:?}",
        resolved.warnings
    );
    let error = Cli::try_parse_from(["stompd", "-a", "--auth-file", "x"]).unwrap_err();
    assert_eq!(error.kind(), clap::error::ErrorKind::ArgumentConflict);
}

#[test]
fn stompserver_checkpoint_maps_onto_fsync_every() {
    let resolved = ok(&["-c", "5"], &[]);
    assert_eq!(
        resolved.config.fsync,
        FsyncPolicy::Every { interval_ms: 5000 }
    );
    assert_eq!(
        resolved.origins["fsync"],
        Origin::Flag("-c/--checkpoint".into())
    );
    assert!(resolved.warnings.iter().any(|w| w.contains("every:5000")));

    let resolved = ok(&["-c", "0"], &[("STOMPD_FSYNC", "never")]);
    assert_eq!(
        resolved.config.fsync,
        FsyncPolicy::Never,
        "-c 0 changes nothing"
    );
    assert!(resolved.warnings.is_empty());

    let message = error_about(&["-c", "61"], &[], "fsync");
    assert!(
        message.contains("-c/--checkpoint") && message.contains("every:1..=60000"),
        "{message}"
    );

    let error = Cli::try_parse_from(["stompd", "-c", "5", "--fsync", "always"]).unwrap_err();
    assert_eq!(error.kind(), clap::error::ErrorKind::ArgumentConflict);
}

#[test]
fn stompserver_workdir_is_a_flag_or_environment_variable() {
    let (path, origin) = config::workdir(&args(&["-w", "/srv"]), &env(&[])).unwrap();
    assert_eq!(
        (path, origin),
        (PathBuf::from("/srv"), Origin::Flag("-w/--workdir".into()))
    );
    let (path, _) = config::workdir(&args(&[]), &env(&[("STOMPD_WORKDIR", "/var")])).unwrap();
    assert_eq!(path, PathBuf::from("/var"));
    let (path, _) = config::workdir(
        &args(&["--working_dir", "/a"]),
        &env(&[("STOMPD_WORKDIR", "/b")]),
    )
    .unwrap();
    assert_eq!(path, PathBuf::from("/a"), "the flag wins");
    assert!(config::workdir(&args(&[]), &env(&[])).is_none());
}

// Validation: each rule, with the key, the range and the origin in the message.

#[test]
fn out_of_range_numbers_name_key_range_and_origin() {
    let cases: &[(&str, &str, &str)] = &[
        ("shards", "0", "1..=1024"),
        ("shards", "1025", "1..=1024"),
        ("frame_bytes_max", "1023", "1024..=1073741824"),
        ("frame_bytes_max", "1073741825", "1024..=1073741824"),
        ("headers_count_max", "7", "8..=100000"),
        ("headers_count_max", "100001", "8..=100000"),
        ("header_line_bytes_max", "255", "256..="),
        ("body_bytes_max", "0", "1..="),
        ("connections_max", "0", "1..=1000000"),
        ("connections_max", "1000001", "1..=1000000"),
        ("out_buffer_bytes_max", "4095", "4096..=1073741824"),
        (
            "heartbeat_send_ms",
            "999",
            "0 (no heart-beats) or 1000..=3600000",
        ),
        (
            "heartbeat_receive_ms",
            "3600001",
            "0 (no heart-beats) or 1000..=3600000",
        ),
        ("heartbeat_read_grace_percent", "99", "100..=1000"),
        ("heartbeat_read_grace_percent", "1001", "100..=1000"),
        (
            "segment_bytes",
            "65535",
            "a multiple of 4096 in 65536..=4294967296",
        ),
        (
            "segment_bytes",
            "70000",
            "a multiple of 4096 in 65536..=4294967296",
        ),
        (
            "segment_bytes",
            "4294971392",
            "a multiple of 4096 in 65536..=4294967296",
        ),
        ("fsync", "every:0", "every:1..=60000"),
        ("fsync", "every:60001", "every:1..=60000"),
        ("dead_letter_deliveries_max", "0", "1..=10000"),
        ("dead_letter_deliveries_max", "10001", "1..=10000"),
        ("prefetch_default", "0", "1..=1000000"),
        ("prefetch_default", "1000001", "1..=1000000"),
        ("prefetch_bytes_default", "4095", "4096..=1073741824"),
        ("prefetch_bytes_default", "1073741825", "4096..=1073741824"),
        ("queue_messages_max", "0", "1..=1000000000"),
        ("queue_bytes_max", "4096", "65536..=1099511627776"),
        ("memory_bytes_max", "1048576", "16777216..=17592186044416"),
        ("disk_bytes_max", "4096", "262144..=1152921504606846976"),
        ("topic_subscriber_stall_ms", "99", "100..=3600000"),
        ("connect_timeout_ms", "99", "100..=3600000"),
        ("login_failure_delay_ms", "60001", "0..=60000"),
    ];
    for (key, value, allowed) in cases {
        let var = config::env_var_name(key);
        let errors = errors(&[], &[(&var, value)]);
        // A frame limit below the defaults of the limits inside it also reports those.
        assert!(
            errors[1..]
                .iter()
                .all(|error| matches!(error, ConfigError::ExceedsOther { other_key, .. } if other_key == key)),
            "{errors:?}"
        );
        assert!(matches!(&errors[0], ConfigError::OutOfRange { key: k, .. } if k == key));
        let message = errors[0].to_string();
        assert!(message.contains(allowed), "{key}={value}: {message}");
        assert!(message.contains(&var), "{key}={value}: {message}");
    }
}

#[test]
fn each_shard_s_share_of_the_disk_budget_holds_four_segments() {
    let message = error_about(
        &[
            "--shards",
            "2",
            "--segment-bytes",
            "65536",
            "--disk-bytes-max",
            "524287",
        ],
        &[],
        "disk_bytes_max",
    );
    assert!(message.contains("at least 524288"), "{message}");
    assert!(message.contains("--disk-bytes-max"), "{message}");
    let config = ok(
        &[
            "--shards",
            "2",
            "--segment-bytes",
            "65536",
            "--disk-bytes-max",
            "524288",
        ],
        &[],
    )
    .config;
    assert_eq!(config.disk_bytes_max, Some(524_288));
}

#[test]
fn the_default_disk_budget_leaves_a_tenth_of_the_filesystem_free() {
    const GIB: u64 = 1 << 30;
    // 100 GiB filesystem, 30 GiB available, the log takes 5 GiB: 5 + 30 - 10.
    assert_eq!(
        defaults::disk_bytes_max(5 * GIB, 100 * GIB, 30 * GIB, GIB),
        25 * GIB
    );
    // Less available than the reserve: what the log takes, and never below the minimum.
    assert_eq!(
        defaults::disk_bytes_max(3 * GIB, 100 * GIB, 4 * GIB, GIB),
        3 * GIB
    );
    assert_eq!(defaults::disk_bytes_max(0, 100 * GIB, 4 * GIB, GIB), GIB);
}

#[test]
fn limits_must_fit_inside_the_frame_limit() {
    let errors = errors(
        &[
            "--frame-bytes-max",
            "4096",
            "--header-line-bytes-max",
            "8192",
        ],
        &[],
    );
    // body_bytes_max keeps its 16 MiB default, which no longer fits either.
    assert_eq!(errors.len(), 2, "{errors:?}");
    let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert!(matches!(
        errors[0],
        ConfigError::ExceedsOther {
            key: "header_line_bytes_max",
            ..
        }
    ));
    assert!(messages[0]
        .contains("must be at most frame_bytes_max = 4096 (from flag --frame-bytes-max)"));
    assert!(matches!(
        errors[1],
        ConfigError::ExceedsOther {
            key: "body_bytes_max",
            ..
        }
    ));
    assert!(messages[1].contains("body_bytes_max = 16777216 (from the default)"));

    let resolved = ok(
        &[
            "--frame-bytes-max",
            "4096",
            "--header-line-bytes-max",
            "4096",
            "--body-bytes-max",
            "4096",
        ],
        &[],
    );
    assert_eq!(resolved.config.limits.frame_bytes_max, 4096);
}

#[test]
fn all_errors_are_reported_at_once() {
    let errors = errors(
        &[
            "--shards",
            "0",
            "--connections-max",
            "0",
            "--prefetch-default",
            "0",
        ],
        &[],
    );
    let keys: Vec<_> = errors.iter().filter_map(ConfigError::key).collect();
    assert_eq!(keys, ["shards", "connections_max", "prefetch_default"]);
}

#[test]
fn bad_listen_addresses() {
    for value in [
        "61613",
        "127.0.0.1:",
        "127.0.0.1:70000",
        ":61613",
        "no-such-host.invalid:1",
    ] {
        let message = error_about(&["--listen", value], &[], "listen");
        assert!(message.contains("--listen"), "{message}");
    }
    let message = error_about(&["-p", "1"], &[("STOMPD_LISTEN", "nonsense")], "listen");
    assert!(
        message.contains("STOMPD_LISTEN") && message.contains("-b/-p"),
        "{message}"
    );
    assert_eq!(
        ok(&["--listen", "[::]:0"], &[]).config.listen,
        "[::]:0".parse().unwrap()
    );
}

#[test]
fn auth_key_combinations() {
    let message = error_about(&["--auth-plaintext"], &[], "auth_plaintext");
    assert!(message.contains("needs auth_file"), "{message}");
    let dir = tempfile::tempdir().unwrap();
    let path = toml_file(dir.path(), "auth_file = \"\"\n");
    error_about(&["-C", path.to_str().unwrap()], &[], "auth_file");
    assert_eq!(
        ok(&["--auth-file", "users"], &[]).config.auth,
        AuthConfig::PasswordFile("users".into())
    );
}

#[test]
fn data_dir_and_log_level_must_say_something_valid() {
    // clap refuses an empty path on the command line; a file can still say it.
    assert!(Cli::try_parse_from(["stompd", "--data-dir", ""]).is_err());
    let dir = tempfile::tempdir().unwrap();
    let path = toml_file(dir.path(), "data_dir = \"\"\n");
    let message = error_about(&["-C", path.to_str().unwrap()], &[], "data_dir");
    assert!(message.contains("config file"), "{message}");
    let message = error_about(&["--log-level", "stompd=loud"], &[], "log_level");
    assert!(message.contains("--log-level"), "{message}");
    assert_eq!(
        ok(&["-l", "stompd=debug,warn"], &[]).config.log_level,
        "stompd=debug,warn"
    );
    assert_eq!(ok(&["-l", "WARNING"], &[]).config.log_level, "warn");
}

#[test]
fn environment_values_of_the_wrong_type_name_the_variable() {
    let errors = errors(
        &[],
        &[("STOMPD_SHARDS", "four"), ("STOMPD_FSYNC", "sometimes")],
    );
    let vars: Vec<&str> = errors
        .iter()
        .map(|error| match error {
            ConfigError::Env { var, .. } => var.as_str(),
            other => panic!("{other}"),
        })
        .collect();
    assert_eq!(vars.len(), 2);
    assert!(vars.contains(&"STOMPD_SHARDS") && vars.contains(&"STOMPD_FSYNC"));
}

#[test]
fn file_errors_unknown_keys_wrong_types_missing_file_and_yaml() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("shard = 4\n", "unknown field `shard`"),
        ("shards = \"four\"\n", "shards"),
        ("shards = -1\n", "shards"),
        ("fsync = \"sometimes\"\n", "not an fsync policy"),
        ("---\n:port: 61613\n", "stompd reads TOML"),
    ];
    for (text, expected) in cases {
        let path = toml_file(dir.path(), text);
        let errors = errors(&["-C", path.to_str().unwrap()], &[]);
        assert!(
            matches!(&errors[..], [ConfigError::Toml { .. }]),
            "{errors:?}"
        );
        let message = errors[0].to_string();
        assert!(message.contains(expected), "{text:?}: {message}");
        assert!(message.contains("line"), "{text:?}: {message}");
    }
    let missing = dir.path().join("missing.toml");
    let errors = errors(&["-C", missing.to_str().unwrap()], &[]);
    assert!(
        matches!(&errors[..], [ConfigError::ReadFile { .. }]),
        "{errors:?}"
    );
}

#[test]
fn printed_config_reads_back_as_the_same_config() {
    let resolved = ok(
        &[
            "--listen",
            "[::1]:7000",
            "--fsync",
            "every:3",
            "--auth-file",
            "u",
            "--auth-plaintext",
        ],
        &[("STOMPD_HEARTBEAT_READ_GRACE_PERCENT", "300")],
    );
    let dir = tempfile::tempdir().unwrap();
    let path = toml_file(dir.path(), &resolved.to_toml());
    let again = ok(&["-C", path.to_str().unwrap()], &[]);
    assert_eq!(again.config, resolved.config);
    assert!(resolved
        .to_toml()
        .contains("fsync = \"every:3\"  # flag --fsync"));

    let off = ok(&[], &[]);
    let path = toml_file(dir.path(), &off.to_toml());
    assert_eq!(ok(&["-C", path.to_str().unwrap()], &[]).config, off.config);
}

#[test]
fn a_bad_password_file_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("users");
    std::fs::write(&path, "alice:plain\n").unwrap();
    let resolved = ok(&["--auth-file", path.to_str().unwrap()], &[]);
    let error = config::load_password_file(&resolved).unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("line 1") && message.contains("--auth-file"),
        "{message}"
    );

    let resolved = ok(
        &["--auth-file", path.to_str().unwrap(), "--auth-plaintext"],
        &[],
    );
    let file = config::load_password_file(&resolved).unwrap().unwrap();
    assert!(file.verify(b"alice", b"plain"));
    assert!(config::load_password_file(&ok(&[], &[])).unwrap().is_none());
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Any valid combination survives print-config and reading back through `-C`.
        #[test]
        fn valid_settings_round_trip_through_print_config(
            shards in 1usize..=1024,
            frame in 1024usize..=1 << 30,
            line_pick in any::<usize>(),
            body_pick in any::<usize>(),
            headers in 8usize..=100_000,
            connections in 1usize..=1_000_000,
            heartbeat in prop_oneof![Just(0u64), 1000u64..=3_600_000],
            grace in 100u64..=1000,
            fsync in prop_oneof![
                Just(FsyncPolicy::Always),
                Just(FsyncPolicy::Never),
                (1u64..=60_000).prop_map(|interval_ms| FsyncPolicy::Every { interval_ms }),
            ],
            port in any::<u16>(),
        ) {
            let line = 256 + line_pick % (frame - 255);
            let body = 1 + body_pick % frame;
            let owned = [
                "--shards".to_owned(), shards.to_string(),
                "--frame-bytes-max".to_owned(), frame.to_string(),
                "--header-line-bytes-max".to_owned(), line.to_string(),
                "--body-bytes-max".to_owned(), body.to_string(),
                "--headers-count-max".to_owned(), headers.to_string(),
                "--connections-max".to_owned(), connections.to_string(),
                "--heartbeat-send-ms".to_owned(), heartbeat.to_string(),
                "--heartbeat-read-grace-percent".to_owned(), grace.to_string(),
                "--fsync".to_owned(), fsync.to_string(),
                "-p".to_owned(), port.to_string(),
            ];
            let flags: Vec<&str> = owned.iter().map(String::as_str).collect();
            let resolved = ok(&flags, &[]);
            prop_assert_eq!(resolved.config.limits.header_line_bytes_max, line);
            prop_assert_eq!(resolved.config.fsync, fsync);
            let dir = tempfile::tempdir().unwrap();
            let path = toml_file(dir.path(), &resolved.to_toml());
            let again = ok(&["-C", path.to_str().unwrap()], &[]);
            prop_assert_eq!(again.config, resolved.config);
        }
    }
}

/// Left at its default, the frame limit is the body limit plus room for the headers, so a body
/// of exactly `body_bytes_max` fits; set, it is taken as given.
#[test]
fn the_default_frame_limit_follows_the_body_limit_with_room_for_headers() {
    let room = Limits::FRAME_HEADER_ROOM_BYTES;
    let limits = ok(&[], &[]).config.limits;
    assert_eq!(limits.frame_bytes_max, limits.body_bytes_max + room);
    let limits = ok(&[], &[("STOMPD_BODY_BYTES_MAX", "1048576")])
        .config
        .limits;
    assert_eq!(limits.frame_bytes_max, 1048576 + room);
    let limits = ok(&["--body-bytes-max", "1073741824"], &[]).config.limits;
    assert_eq!(
        limits.frame_bytes_max,
        1 << 30,
        "capped at the largest frame allowed"
    );
    let limits = ok(
        &[
            "--frame-bytes-max",
            "4096",
            "--body-bytes-max",
            "4096",
            "--header-line-bytes-max",
            "1024",
        ],
        &[],
    )
    .config
    .limits;
    assert_eq!(limits.frame_bytes_max, 4096);
}
