//! The password file: parsing (errors with line numbers, never the hash), argon2id and bcrypt
//! verification, unknown users, and stompserver's plain-text compatibility format.

use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use stompd::auth::{hash_password, PasswordFile, PasswordFileError, PasswordFormat};

/// argon2id with the smallest parameters, so tests stay fast; verification reads the
/// parameters from the PHC string, so the code path is the one production hashes take.
fn cheap_argon2(password: &str) -> String {
    let params = Params::new(Params::MIN_M_COST, 1, 1, None).unwrap();
    let salt = SaltString::from_b64("c29tZXNhbHRzb21lc2FsdA").unwrap();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

/// bcrypt at its lowest cost (4), so tests stay fast.
fn cheap_bcrypt(password: &str) -> String {
    bcrypt::hash(password, 4).unwrap()
}

fn hashed(text: &str) -> Result<PasswordFile, PasswordFileError> {
    PasswordFile::parse(text.as_bytes(), PasswordFormat::Hashed)
}

#[test]
fn argon2id_lines_verify() {
    let text = format!(
        "alice:{}\nbob:{}\n",
        cheap_argon2("wonderland"),
        cheap_argon2("builder")
    );
    let file = hashed(&text).unwrap();
    assert_eq!(file.len(), 2);
    assert!(file.verify(b"alice", b"wonderland"));
    assert!(file.verify(b"bob", b"builder"));
    assert!(
        !file.verify(b"alice", b"builder"),
        "another user's password"
    );
    assert!(
        !file.verify(b"alice", b"wonderland "),
        "a trailing space matters"
    );
    assert!(!file.verify(b"alice", b""), "empty passcode");
    assert!(
        !file.verify(b"ALICE", b"wonderland"),
        "logins are case-sensitive"
    );
    assert!(file.verification_is_slow());
}

#[test]
fn argon2id_at_the_passwd_defaults_verifies() {
    let file = hashed(&format!("carol:{}\n", hash_password(b"s3cret").unwrap())).unwrap();
    assert!(file.verify(b"carol", b"s3cret"));
    assert!(!file.verify(b"carol", b"s3cret!"));
}

#[test]
fn bcrypt_lines_of_every_prefix_verify() {
    let hash = cheap_bcrypt("hunter2");
    assert!(hash.starts_with("$2b$04$"), "{hash}");
    let a = hash.replacen("$2b$", "$2a$", 1);
    let y = hash.replacen("$2b$", "$2y$", 1);
    let file = hashed(&format!("b:{hash}\na:{a}\ny:{y}\n")).unwrap();
    for user in [&b"a"[..], b"b", b"y"] {
        assert!(file.verify(user, b"hunter2"), "{user:?}");
        assert!(!file.verify(user, b"hunter3"), "{user:?}");
    }
}

#[test]
fn mixed_files_comments_blank_lines_and_whitespace() {
    let text = format!(
        "# users of the test broker\n\n   \n  alice : {}  \r\n# bob:{}\nbob:{}",
        cheap_argon2("a"),
        cheap_bcrypt("not this"),
        cheap_bcrypt("b")
    );
    let file = hashed(&text).unwrap();
    assert_eq!(file.len(), 2);
    assert!(file.verify(b"alice", b"a"));
    assert!(file.verify(b"bob", b"b"), "the last line needs no newline");
    assert!(
        !file.verify(b"bob", b"not this"),
        "comments are not entries"
    );
}

#[test]
fn unknown_users_are_refused_whatever_the_passcode() {
    let argon = cheap_argon2("x");
    let file = hashed(&format!("alice:{argon}\n")).unwrap();
    assert!(!file.verify(b"mallory", b"x"));
    assert!(!file.verify(b"", b""));
    assert!(!file.verify(b"alice\0", b"x"));
    // The dummy hash an unknown login is checked against must not be a way in either.
    assert!(!file.verify(b"mallory", b"stompd: no such user"));

    let empty = hashed("# nobody yet\n").unwrap();
    assert!(empty.is_empty());
    assert!(!empty.verify(b"alice", b"x"));
}

fn error(text: &str) -> PasswordFileError {
    hashed(text).expect_err("should not load")
}

#[test]
fn malformed_lines_name_the_line_and_never_the_hash() {
    let argon = cheap_argon2("x");
    let bcrypt_hash = cheap_bcrypt("x");
    let truncated_argon = &argon[..argon.len() - 30];
    let bad_bcrypt = format!("{}!!", &bcrypt_hash[..bcrypt_hash.len() - 2]);
    let cases: Vec<(String, usize, &str)> = vec![
        (format!("# ok\nalice {argon}\n"), 2, "no `:`"),
        (format!("ok:{argon}\n:{argon}\n"), 2, "user name"),
        (format!("\n\nal ice:{argon}\n"), 3, "user name"),
        ("alice:\n".to_owned(), 1, "empty hash"),
        ("alice:plaintext\n".to_owned(), 1, "neither an argon2id"),
        (
            format!("alice:{}\n", argon.replace("argon2id", "argon2i")),
            1,
            "neither",
        ),
        (
            "alice:$argon2id$v=19$m=8,t=1,p=1\n".to_owned(),
            1,
            "argon2id",
        ),
        (format!("alice:{truncated_argon}\n"), 1, "argon2id"),
        ("alice:$2b$04$short\n".to_owned(), 1, "bcrypt"),
        (format!("x:{argon}\nalice:{bad_bcrypt}\n"), 2, "bcrypt"),
    ];
    for (text, line, expected) in cases {
        let error = error(&text);
        let message = error.to_string();
        assert!(
            message.starts_with(&format!("line {line}:")),
            "{text:?}: {message}"
        );
        assert!(message.contains(expected), "{text:?}: {message}");
        for secret in [&argon, &bcrypt_hash, &bad_bcrypt] {
            assert!(!message.contains(&secret[8..]), "{message} leaks a hash");
        }
    }
}

#[test]
fn hashes_costlier_than_the_bounds_are_refused_without_hashing_them() {
    // Hand-written strings: producing them would take the time the bound prevents.
    let salt_and_hash = "c29tZXNhbHRzb21lc2FsdA$ofc77LQgxnLmnj6+TIKK/eJ3GIY0QjGH/32+jayI1/s";
    for params in ["m=262145,t=1,p=1", "m=8,t=17,p=1", "m=256,t=1,p=17"] {
        let text = format!("a:$argon2id$v=19${params}${salt_and_hash}\n");
        let message = error(&text).to_string();
        assert!(
            message.contains("above stompd's bounds"),
            "{params}: {message}"
        );
    }
    let cost_17 = cheap_bcrypt("x").replacen("$04$", "$17$", 1);
    let message = error(&format!("a:{cost_17}\n")).to_string();
    assert!(message.contains("cost 17"), "{message}");
}

#[test]
fn duplicate_users_are_an_error_naming_both_lines() {
    let text = format!(
        "alice:{}\n# comment\nalice:{}\n",
        cheap_argon2("1"),
        cheap_argon2("2")
    );
    match error(&text) {
        PasswordFileError::DuplicateUser {
            line,
            first_line,
            user,
        } => assert_eq!((line, first_line, user.as_str()), (3, 1, "alice")),
        other => panic!("{other}"),
    }
}

#[test]
fn non_utf8_lines_are_an_error() {
    let mut bytes = b"# fine\n".to_vec();
    bytes.extend_from_slice(b"al\xffce:x\n");
    let error = PasswordFile::parse(&bytes, PasswordFormat::Hashed).unwrap_err();
    assert!(
        matches!(error, PasswordFileError::NotUtf8 { line: 2 }),
        "{error}"
    );
}

#[test]
fn missing_file_is_an_io_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope");
    let error = PasswordFile::load(&path, PasswordFormat::Hashed).unwrap_err();
    assert!(matches!(error, PasswordFileError::Io { .. }));
    assert!(error.to_string().contains("nope"));
}

// stompserver's `.passwd` (lib/stomp_server/stomp_auth.rb): `login:passcode` in plain text,
// `#` comments, whitespace around both parts ignored.

#[test]
fn stompserver_plain_passwords() {
    let text = "# Comment lines are ignored\ntestuser:testpass\n  spaced  :  pass word  \nc:a:b\n";
    let file = PasswordFile::parse(text.as_bytes(), PasswordFormat::StompserverPlain).unwrap();
    assert_eq!(file.format(), PasswordFormat::StompserverPlain);
    assert!(!file.verification_is_slow());
    assert!(file.verify(b"testuser", b"testpass"));
    assert!(!file.verify(b"testuser", b"testpas"));
    assert!(!file.verify(b"testuser", b"testpasss"));
    assert!(
        file.verify(b"spaced", b"pass word"),
        "inner spaces are kept"
    );
    assert!(file.verify(b"c", b"a:b"), "the first colon splits");
    assert!(!file.verify(b"nobody", b"testpass"));
}

#[test]
fn stompserver_plain_files_still_refuse_bad_lines_and_duplicates() {
    let plain = |text: &str| PasswordFile::parse(text.as_bytes(), PasswordFormat::StompserverPlain);
    assert!(matches!(
        plain("justaname\n"),
        Err(PasswordFileError::MissingColon { line: 1 })
    ));
    assert!(matches!(
        plain("a:1\nb:2\na:3\n"),
        Err(PasswordFileError::DuplicateUser {
            line: 3,
            first_line: 1,
            ..
        })
    ));
    // A hashed file read as plain text compares the hash text itself; nothing crashes.
    let hash = cheap_bcrypt("x");
    let file = plain(&format!("u:{hash}\n")).unwrap();
    assert!(!file.verify(b"u", b"x"));
    assert!(file.verify(b"u", hash.as_bytes()));
}

#[test]
fn debug_output_shows_no_hash_or_password() {
    let hash = cheap_argon2("x");
    let file = hashed(&format!("alice:{hash}\n")).unwrap();
    let shown = format!("{file:?}");
    assert!(
        !shown.contains("argon2") && !shown.contains("alice"),
        "{shown}"
    );
    let plain = PasswordFile::parse(b"bob:hunter2\n", PasswordFormat::StompserverPlain).unwrap();
    assert!(!format!("{plain:?}").contains("hunter2"));
}

#[test]
fn password_file_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<PasswordFile>();
    let file = std::sync::Arc::new(hashed(&format!("a:{}\n", cheap_argon2("p"))).unwrap());
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let file = file.clone();
            std::thread::spawn(move || file.verify(b"a", b"p"))
        })
        .collect();
    assert!(handles.into_iter().all(|handle| handle.join().unwrap()));
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the bytes, loading returns a file or an error; it never panics.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = PasswordFile::parse(&bytes, PasswordFormat::Hashed);
            let _ = PasswordFile::parse(&bytes, PasswordFormat::StompserverPlain);
        }

        /// Lines shaped like hashes (right prefix, random rest) are refused or accepted, never
        /// a panic; cheap because nothing valid is hashed.
        #[test]
        fn hash_shaped_garbage_never_panics(
            prefix in prop_oneof![Just("$argon2id$"), Just("$2b$"), Just("$2y$04$")],
            rest in "[ -~]{0,80}",
        ) {
            let text = format!("u:{prefix}{rest}\n");
            let _ = PasswordFile::parse(text.as_bytes(), PasswordFormat::Hashed);
        }

        /// In stompserver's format, every user's own password verifies and no other does.
        #[test]
        fn plain_passwords_verify_exactly(
            entries in proptest::collection::btree_map("[a-z0-9_.@-]{1,12}", "[!-~]([ -~]{0,20}[!-~])?", 1..8),
        ) {
            let text: String = entries.iter().map(|(user, password)| format!("{user}:{password}\n")).collect();
            let file = PasswordFile::parse(text.as_bytes(), PasswordFormat::StompserverPlain).unwrap();
            prop_assert_eq!(file.len(), entries.len());
            for (user, password) in &entries {
                prop_assert!(file.verify(user.as_bytes(), password.as_bytes()));
                let wrong = format!("{password}x");
                prop_assert!(!file.verify(user.as_bytes(), wrong.as_bytes()));
                let unknown = format!("{user}~");
                prop_assert!(!file.verify(unknown.as_bytes(), password.as_bytes()));
            }
        }
    }
}
