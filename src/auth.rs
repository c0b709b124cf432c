//! The password file: who may CONNECT, and the `stompd passwd` edit of that file.
//!
//! Format (htpasswd-like, one user per line): `user:hash`, where `hash` is an argon2id PHC
//! string (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`, what `stompd passwd` writes) or a
//! bcrypt hash (`$2a$`, `$2b$`, `$2y$`, what `htpasswd -B` writes). Blank lines and lines
//! starting with `#` are ignored. In the stompserver compatibility format
//! ([`PasswordFormat::StompserverPlain`], stompserver's `-a` and its `.passwd`) the part after
//! the first `:` is the password itself, trimmed of surrounding whitespace.
//!
//! Invariants: a loaded [`PasswordFile`] has no duplicate user and only hashes the crates
//! accept; errors name the line and, at most, the user, never the hash or password; whether
//! [`PasswordFile::verify`] takes long does not depend on whether the login exists (an unknown
//! user is checked against a dummy credential of the same kind and cost).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use blake2::{Blake2b512, Digest};
use subtle::ConstantTimeEq;
use thiserror::Error;

/// How the part after `user:` is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PasswordFormat {
    /// argon2id PHC strings or bcrypt hashes; anything else is a load error.
    Hashed,
    /// stompserver's plain-text passwords. Kept for drop-in compatibility only: anyone who can
    /// read the file can log in as anyone in it.
    StompserverPlain,
}

/// Why a password file cannot be used. Line numbers count from 1.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PasswordFileError {
    #[error("cannot read password file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("line {line}: not UTF-8 text")]
    NotUtf8 { line: usize },
    #[error("line {line}: expected `user:hash`, found no `:`")]
    MissingColon { line: usize },
    #[error("line {line}: the user name is empty or contains whitespace")]
    BadUser { line: usize },
    #[error("line {line}: user `{user}` has an empty hash")]
    EmptyHash { line: usize, user: String },
    #[error(
        "line {line}: user `{user}` has neither an argon2id ($argon2id$) nor a bcrypt ($2a$, \
         $2b$, $2y$) hash; set it with `stompd passwd`, or read the file as stompserver \
         plain-text passwords with auth_plaintext / -a"
    )]
    UnsupportedHash { line: usize, user: String },
    #[error("line {line}: user `{user}` has a malformed {kind} hash: {reason}")]
    MalformedHash {
        line: usize,
        user: String,
        kind: &'static str,
        reason: String,
    },
    #[error("line {line}: user `{user}` is already defined on line {first_line}")]
    DuplicateUser {
        line: usize,
        first_line: usize,
        user: String,
    },
}

/// What a user's line holds, ready to verify against. `Debug` is derived for the unit tests
/// only; [`PasswordFile`]'s own `Debug` never shows these.
#[derive(Clone, Debug)]
enum Credential {
    /// An argon2id PHC string, checked to parse at load.
    Argon2(String),
    /// A bcrypt hash, checked to parse at load.
    Bcrypt(String),
    /// BLAKE2b-512 of a plain-text password. Comparing digests rather than the passwords
    /// keeps the comparison's time independent of the password's length.
    Plain([u8; 64]),
}

impl Credential {
    fn verify(&self, passcode: &[u8]) -> bool {
        match self {
            Credential::Argon2(phc) => PasswordHash::new(phc)
                .map(|hash| Argon2::default().verify_password(passcode, &hash).is_ok())
                .unwrap_or(false),
            Credential::Bcrypt(hash) => bcrypt::verify(passcode, hash).unwrap_or(false),
            Credential::Plain(digest) => plain_digest(passcode).ct_eq(digest).into(),
        }
    }

    /// What to check an unknown login against so that it costs what a known one costs: the
    /// same algorithm with the same parameters as `self`.
    fn dummy_like(&self) -> Credential {
        const DUMMY: &[u8] = b"stompd: no such user";
        match self {
            Credential::Argon2(phc) => {
                let params = PasswordHash::new(phc)
                    .ok()
                    .and_then(|hash| Params::try_from(&hash).ok())
                    .unwrap_or_default();
                let salt = SaltString::generate(&mut OsRng);
                Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
                    .hash_password(DUMMY, &salt)
                    .map(|hash| Credential::Argon2(hash.to_string()))
                    .unwrap_or_else(|_| Credential::Plain(plain_digest(DUMMY)))
            }
            Credential::Bcrypt(hash) => {
                let cost = hash
                    .parse::<bcrypt::HashParts>()
                    .map_or(bcrypt::DEFAULT_COST, |parts| parts.get_cost());
                bcrypt::hash(DUMMY, cost)
                    .map(Credential::Bcrypt)
                    .unwrap_or_else(|_| Credential::Plain(plain_digest(DUMMY)))
            }
            Credential::Plain(_) => Credential::Plain(plain_digest(DUMMY)),
        }
    }

    fn kind(&self) -> u8 {
        match self {
            Credential::Argon2(_) => 0,
            Credential::Bcrypt(_) => 1,
            Credential::Plain(_) => 2,
        }
    }
}

fn plain_digest(password: &[u8]) -> [u8; 64] {
    Blake2b512::digest(password).into()
}

/// The users allowed to CONNECT and their credentials.
///
/// [`verify`](PasswordFile::verify) is deliberately slow for hashed files (argon2id at the
/// crate defaults takes milliseconds and 19 MiB; bcrypt cost 12 about a quarter second): the
/// server must not call it on a shard's event-loop thread. Run it on a small blocking pool,
/// and/or cache successful `(login, passcode)` checks keyed by a fast keyed digest. The type
/// is `Send + Sync` and `verify` takes `&self`, so one `Arc<PasswordFile>` serves every
/// thread. The file is read once at start; a reload (SIGHUP, not implemented) would load a
/// new one, swap the `Arc` and empty the shards' login caches (`run::auth::LoginCache`).
#[derive(Clone)]
pub struct PasswordFile {
    users: HashMap<Vec<u8>, Credential>,
    /// Checked when the login is unknown, to take as long as a known login.
    dummy: Credential,
    format: PasswordFormat,
}

/// Users and format only: hashes stay out of logs and panic messages.
impl std::fmt::Debug for PasswordFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordFile")
            .field("users", &self.users.len())
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

impl PasswordFile {
    /// Reads and parses the file at `path`.
    pub fn load(path: &Path, format: PasswordFormat) -> Result<PasswordFile, PasswordFileError> {
        let bytes = std::fs::read(path).map_err(|source| PasswordFileError::Io {
            path: path.to_owned(),
            source,
        })?;
        PasswordFile::parse(&bytes, format)
    }

    /// Parses file contents; the first error wins.
    pub fn parse(bytes: &[u8], format: PasswordFormat) -> Result<PasswordFile, PasswordFileError> {
        let mut users: HashMap<Vec<u8>, Credential> = HashMap::new();
        let mut first_lines: HashMap<String, usize> = HashMap::new();
        for (index, raw) in bytes.split(|&byte| byte == b'\n').enumerate() {
            let line = index + 1;
            let text = std::str::from_utf8(raw).map_err(|_| PasswordFileError::NotUtf8 { line })?;
            let Some((user, secret)) = split_entry(text, line)? else {
                continue;
            };
            let credential = match format {
                PasswordFormat::StompserverPlain => {
                    Credential::Plain(plain_digest(secret.as_bytes()))
                }
                PasswordFormat::Hashed => parse_hash(secret, user, line)?,
            };
            if let Some(&first_line) = first_lines.get(user) {
                return Err(PasswordFileError::DuplicateUser {
                    line,
                    first_line,
                    user: user.to_owned(),
                });
            }
            first_lines.insert(user.to_owned(), line);
            users.insert(user.as_bytes().to_vec(), credential);
        }
        let dummy = dummy_for(&users);
        Ok(PasswordFile {
            users,
            dummy,
            format,
        })
    }

    /// Whether `passcode` is `login`'s password. Takes as long for an unknown login as for a
    /// known one (see the type's docs: slow, keep it off event-loop threads). The final
    /// comparison of each algorithm is constant-time (the argon2 and bcrypt crates compare
    /// with `subtle`; plain-text digests are compared with `subtle` here).
    pub fn verify(&self, login: &[u8], passcode: &[u8]) -> bool {
        let (credential, known) = match self.users.get(login) {
            Some(credential) => (credential, true),
            None => (&self.dummy, false),
        };
        // Both operands are always evaluated: `&` on bools does not short-circuit.
        credential.verify(passcode) & known
    }

    /// Whether `verify` is expensive (hashed files) or a digest compare (plain-text files),
    /// so the server can skip the blocking pool for the latter.
    pub fn verification_is_slow(&self) -> bool {
        self.format == PasswordFormat::Hashed && !self.users.is_empty()
    }

    pub fn format(&self) -> PasswordFormat {
        self.format
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether `login` has a line. Not constant-time: for tooling and logs, not for CONNECT.
    pub fn contains_user(&self, login: &[u8]) -> bool {
        self.users.contains_key(login)
    }
}

/// The dummy credential matches the most common kind of entry, so unknown users cost what
/// most known users cost.
fn dummy_for(users: &HashMap<Vec<u8>, Credential>) -> Credential {
    let mut counts = [0usize; 3];
    let mut examples: [Option<&Credential>; 3] = [None; 3];
    for credential in users.values() {
        let kind = usize::from(credential.kind());
        counts[kind] += 1;
        examples[kind].get_or_insert(credential);
    }
    let most = (0..3).max_by_key(|&kind| counts[kind]).unwrap_or(2);
    examples[most].map_or_else(
        || Credential::Plain(plain_digest(b"stompd: no users")),
        Credential::dummy_like,
    )
}

/// `Ok(None)` for blank and comment lines, else the user and the rest of the line.
fn split_entry(text: &str, line: usize) -> Result<Option<(&str, &str)>, PasswordFileError> {
    let trimmed = text.trim();
    if trimmed.is_empty() || trimmed.starts_with('#') {
        return Ok(None);
    }
    let (user, secret) = trimmed
        .split_once(':')
        .ok_or(PasswordFileError::MissingColon { line })?;
    let user = user.trim();
    if !valid_user(user) {
        return Err(PasswordFileError::BadUser { line });
    }
    let secret = secret.trim();
    if secret.is_empty() {
        return Err(PasswordFileError::EmptyHash {
            line,
            user: user.to_owned(),
        });
    }
    Ok(Some((user, secret)))
}

fn valid_user(user: &str) -> bool {
    !user.is_empty()
        && !user.starts_with('#')
        && !user.contains(':')
        && !user.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Bounds on the work one verification may take, so a mistyped parameter cannot make loading
/// (which hashes a dummy at the file's cost) or every CONNECT take minutes. Each is several
/// times the strongest setting in common advice: argon2id 256 MiB (OWASP's minimum is 19 MiB,
/// RFC 9106's first choice 2 GiB is for disk encryption, not logins), 16 passes, 16 lanes;
/// bcrypt cost 16 (about 5 s; NATS uses 11, the bcrypt crate defaults to 12).
pub const ARGON2_M_COST_MAX: u32 = 256 * 1024;
pub const ARGON2_T_COST_MAX: u32 = 16;
pub const ARGON2_P_COST_MAX: u32 = 16;
pub const BCRYPT_COST_MAX: u32 = 16;

fn parse_hash(hash: &str, user: &str, line: usize) -> Result<Credential, PasswordFileError> {
    let malformed = |kind, reason: String| PasswordFileError::MalformedHash {
        line,
        user: user.to_owned(),
        kind,
        reason,
    };
    if hash.starts_with("$argon2id$") {
        // password_hash errors describe the field, never echo the string.
        let parsed =
            PasswordHash::new(hash).map_err(|error| malformed("argon2id", error.to_string()))?;
        let params =
            Params::try_from(&parsed).map_err(|error| malformed("argon2id", error.to_string()))?;
        if parsed.hash.is_none() {
            return Err(malformed("argon2id", "no hash output".to_owned()));
        }
        if params.m_cost() > ARGON2_M_COST_MAX
            || params.t_cost() > ARGON2_T_COST_MAX
            || params.p_cost() > ARGON2_P_COST_MAX
        {
            return Err(malformed(
                "argon2id",
                format!(
                    "parameters above stompd's bounds (m <= {ARGON2_M_COST_MAX} KiB, \
                     t <= {ARGON2_T_COST_MAX}, p <= {ARGON2_P_COST_MAX})"
                ),
            ));
        }
        Ok(Credential::Argon2(hash.to_owned()))
    } else if ["$2a$", "$2b$", "$2y$"]
        .iter()
        .any(|prefix| hash.starts_with(prefix))
    {
        // bcrypt's own error would quote the hash, so the reason is ours.
        let parts = hash.parse::<bcrypt::HashParts>().map_err(|_| {
            malformed(
                "bcrypt",
                "expected $2b$<cost>$ and 53 characters of salt and hash".to_owned(),
            )
        })?;
        if parts.get_cost() > BCRYPT_COST_MAX {
            return Err(malformed(
                "bcrypt",
                format!(
                    "cost {} is above stompd's bound of {BCRYPT_COST_MAX}",
                    parts.get_cost()
                ),
            ));
        }
        Ok(Credential::Bcrypt(hash.to_owned()))
    } else {
        Err(PasswordFileError::UnsupportedHash {
            line,
            user: user.to_owned(),
        })
    }
}

/// Why `stompd passwd` could not set a password.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PasswdError {
    #[error(
        "`{0}` cannot be a user name: it must be non-empty, not start with #, and contain no \
         `:`, whitespace or control characters"
    )]
    BadUser(String),
    #[error("the password is empty")]
    EmptyPassword,
    #[error("user `{user}` is on more than one line ({lines:?}) of {}; fix the file by hand", path.display())]
    DuplicateUser {
        path: PathBuf,
        user: String,
        lines: Vec<usize>,
    },
    #[error("{} is not UTF-8 text", path.display())]
    NotUtf8 { path: PathBuf },
    #[error("cannot hash the password: {0}")]
    Hash(String),
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What [`set_password`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PasswdOutcome {
    Added,
    Changed,
}

/// Hashes `password` with argon2id at the argon2 crate's defaults (the OWASP minimum: 19 MiB,
/// 2 passes, 1 lane) and a random salt, as a PHC string.
pub fn hash_password(password: &[u8]) -> Result<String, PasswdError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password, &salt)
        .map(|hash| hash.to_string())
        .map_err(|error| PasswdError::Hash(error.to_string()))
}

/// Sets `user`'s password in the file at `path`, creating the file if needed. The user's line
/// is replaced in place (or appended); every other line, comments included, is kept byte for
/// byte. The new file is written to a temporary file in the same directory with mode 0600,
/// fsynced, renamed over the old one, and the directory is fsynced, so a crash leaves either
/// the old file or the new one.
pub fn set_password(
    path: &Path,
    user: &str,
    password: &[u8],
) -> Result<PasswdOutcome, PasswdError> {
    if !valid_user(user) {
        return Err(PasswdError::BadUser(user.to_owned()));
    }
    if password.is_empty() {
        return Err(PasswdError::EmptyPassword);
    }
    let old = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes).map_err(|_| PasswdError::NotUtf8 {
            path: path.to_owned(),
        })?,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(PasswdError::Io {
                action: "read",
                path: path.to_owned(),
                source,
            })
        }
    };
    let matches: Vec<usize> = old
        .split('\n')
        .enumerate()
        .filter(|(_, text)| line_user(text) == Some(user))
        .map(|(index, _)| index)
        .collect();
    if matches.len() > 1 {
        return Err(PasswdError::DuplicateUser {
            path: path.to_owned(),
            user: user.to_owned(),
            lines: matches.iter().map(|index| index + 1).collect(),
        });
    }
    let entry = format!("{user}:{}", hash_password(password)?);
    let (new, outcome) = match matches.first() {
        Some(&replace) => {
            let lines: Vec<&str> = old
                .split('\n')
                .enumerate()
                .map(|(index, text)| {
                    if index == replace {
                        entry.as_str()
                    } else {
                        text
                    }
                })
                .collect();
            (lines.join("\n"), PasswdOutcome::Changed)
        }
        None => {
            let mut new = old;
            if !new.is_empty() && !new.ends_with('\n') {
                new.push('\n');
            }
            new.push_str(&entry);
            new.push('\n');
            (new, PasswdOutcome::Added)
        }
    };
    write_atomically(path, new.as_bytes())?;
    Ok(outcome)
}

/// The user a line defines, if it is an entry line (whatever its hash).
fn line_user(text: &str) -> Option<&str> {
    let trimmed = text.trim();
    if trimmed.starts_with('#') {
        return None;
    }
    trimmed.split_once(':').map(|(user, _)| user.trim())
}

fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), PasswdError> {
    use std::os::unix::fs::PermissionsExt;

    let io = |action, source| PasswdError::Io {
        action,
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    // tempfile creates the file with O_EXCL and mode 0600 in the target directory, so the
    // rename below is atomic and the hashes are never readable by others, even briefly.
    let mut temp = tempfile::Builder::new()
        .prefix(".stompd-passwd-")
        .tempfile_in(&dir)
        .map_err(|source| io("create a temporary file next to", source))?;
    temp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|source| io("set permissions for", source))?;
    temp.write_all(contents)
        .map_err(|source| io("write", source))?;
    temp.as_file()
        .sync_all()
        .map_err(|source| io("fsync", source))?;
    temp.persist(path)
        .map_err(|error| io("rename over", error.error))?;
    std::fs::File::open(&dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|source| io("fsync the directory of", source))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_digest_compare_ignores_nothing() {
        let file = PasswordFile::parse(b"a:secret\n", PasswordFormat::StompserverPlain).unwrap();
        assert!(file.verify(b"a", b"secret"));
        assert!(!file.verify(b"a", b"secret "));
        assert!(!file.verify(b"a", b"secre"));
        assert!(!file.verification_is_slow());
    }

    #[test]
    fn dummy_follows_the_most_common_kind() {
        let cheap = bcrypt::hash("x", 4).unwrap();
        let text = format!("a:{cheap}\nb:{cheap}\n");
        let file = PasswordFile::parse(text.as_bytes(), PasswordFormat::Hashed).unwrap();
        match &file.dummy {
            Credential::Bcrypt(hash) => {
                assert_eq!(hash.parse::<bcrypt::HashParts>().unwrap().get_cost(), 4)
            }
            other => panic!("dummy should be bcrypt, is {other:?}"),
        }
        assert!(file.verification_is_slow());
    }

    #[test]
    fn line_user_skips_comments() {
        assert_eq!(line_user("# bob:x"), None);
        assert_eq!(line_user(" bob : x"), Some("bob"));
        assert_eq!(line_user(""), None);
    }
}
