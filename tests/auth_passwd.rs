//! `stompd passwd`: adds and changes users, keeps every other line, rewrites atomically with
//! mode 0600, and writes argon2id hashes the password file loader verifies. The password goes
//! in on stdin (not a terminal), as scripts and these tests use it.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use stompd::auth::{set_password, PasswdError, PasswdOutcome, PasswordFile, PasswordFormat};

fn passwd(dir: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_stompd"))
        .arg("passwd")
        .args(args)
        .current_dir(dir)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run stompd passwd");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn load(path: &Path) -> PasswordFile {
    PasswordFile::load(path, PasswordFormat::Hashed).unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn adds_a_user_to_a_new_file_with_mode_0600() {
    let dir = tempfile::tempdir().unwrap();
    let output = passwd(dir.path(), &["--file", "users", "alice"], "wonderland\n");
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("added user `alice`"));
    let path = dir.path().join("users");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.starts_with("alice:$argon2id$v=19$m=19456,t=2,p=1$"),
        "{text}"
    );
    assert!(text.ends_with('\n') && text.lines().count() == 1, "{text}");
    assert_eq!(mode(&path), 0o600);
    let file = load(&path);
    assert!(
        file.verify(b"alice", b"wonderland"),
        "the newline is not part of the password"
    );
    assert!(!file.verify(b"alice", b"wonderland\n"));
}

#[test]
fn default_file_name_is_stompd_passwd() {
    let dir = tempfile::tempdir().unwrap();
    let output = passwd(dir.path(), &["bob"], "pw\r\n");
    assert_eq!(output.status.code(), Some(0));
    assert!(
        load(&dir.path().join("stompd.passwd")).verify(b"bob", b"pw"),
        "CRLF stripped"
    );
}

#[test]
fn file_defaults_to_stompd_auth_file_when_set() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_stompd"))
        .args(["passwd", "dora"])
        .current_dir(dir.path())
        .env_clear()
        .env("STOMPD_AUTH_FILE", "from-env.passwd")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"explorer\n")
        .unwrap();
    assert_eq!(child.wait_with_output().unwrap().status.code(), Some(0));
    assert!(load(&dir.path().join("from-env.passwd")).verify(b"dora", b"explorer"));
    assert!(!dir.path().join("stompd.passwd").exists());
}

#[test]
fn changes_a_user_in_place_and_keeps_every_other_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("users");
    let bob = bcrypt::hash("builder", 4).unwrap();
    let before = format!(
        "# stompd users\n\nalice:$argon2id$placeholder-to-replace\n  # indented comment\nbob:{bob}"
    );
    std::fs::write(&path, &before).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();

    let output = passwd(dir.path(), &["-f", "users", "alice"], "new-secret\n");
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("changed the password"));

    let after = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = after.split('\n').collect();
    let old: Vec<&str> = before.split('\n').collect();
    assert_eq!(lines.len(), old.len(), "no line added or dropped: {after}");
    for (index, (new, old)) in lines.iter().zip(&old).enumerate() {
        if index == 2 {
            assert!(new.starts_with("alice:$argon2id$v=19$"), "{new}");
        } else {
            assert_eq!(new, old, "line {} kept byte for byte", index + 1);
        }
    }
    assert_eq!(mode(&path), 0o600, "rewritten files are 0600");
    let file = load(&path);
    assert!(file.verify(b"alice", b"new-secret"));
    assert!(file.verify(b"bob", b"builder"));

    // Adding to a file without a final newline starts a new line.
    let output = passwd(dir.path(), &["-f", "users", "carol"], "c\n");
    assert_eq!(output.status.code(), Some(0));
    let file = load(&path);
    assert_eq!(file.len(), 3);
    assert!(file.verify(b"carol", b"c") && file.verify(b"bob", b"builder"));
}

#[test]
fn rewrite_is_atomic_a_new_inode_and_no_temporary_left_behind() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("users");
    assert_eq!(
        passwd(dir.path(), &["-f", "users", "a"], "1\n")
            .status
            .code(),
        Some(0)
    );
    let before = std::fs::metadata(&path).unwrap().ino();
    // A reader holding the old file keeps seeing a complete old file.
    let old_handle = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        passwd(dir.path(), &["-f", "users", "a"], "2\n")
            .status
            .code(),
        Some(0)
    );
    let after = std::fs::metadata(&path).unwrap().ino();
    assert_ne!(before, after, "replaced by rename, not rewritten in place");
    assert_ne!(old_handle, std::fs::read_to_string(&path).unwrap());
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["users"], "temporary files are renamed or removed");
}

#[test]
fn refuses_bad_users_empty_passwords_and_duplicate_lines_without_touching_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("users");
    let original = "x:$2b$04$aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\ndup:1\ndup:2\n";
    std::fs::write(&path, original).unwrap();
    for (user, password, expected) in [
        ("a:b", "pw\n", "cannot be a user name"),
        ("a b", "pw\n", "cannot be a user name"),
        ("#root", "pw\n", "cannot be a user name"),
        ("ok", "\n", "empty"),
        ("ok", "", "empty"),
        ("dup", "pw\n", "more than one line ([2, 3])"),
    ] {
        let output = passwd(dir.path(), &["-f", "users", user], password);
        assert_eq!(output.status.code(), Some(1), "{user:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{user:?}: {stderr}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), original);
    }
}

#[test]
fn library_api_reports_what_it_did() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub-users");
    assert_eq!(
        set_password(&path, "u", b"p1").unwrap(),
        PasswdOutcome::Added
    );
    assert_eq!(
        set_password(&path, "u", b"p2").unwrap(),
        PasswdOutcome::Changed
    );
    assert!(load(&path).verify(b"u", b"p2"));
    let missing_dir = dir.path().join("no/such/dir/users");
    assert!(matches!(
        set_password(&missing_dir, "u", b"p"),
        Err(PasswdError::Io { .. })
    ));
}
