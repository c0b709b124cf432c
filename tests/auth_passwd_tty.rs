//! `stompd passwd` on a terminal: it prompts twice (rpassword, no echo) and refuses two
//! different answers. The child runs on a pseudo-terminal that is its controlling terminal,
//! which is what rpassword opens (`/dev/tty`).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
use stompd::auth::{PasswordFile, PasswordFormat};

/// Every wait in this test is bounded by this; a hung child is killed and the test fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

struct Session {
    child: std::process::Child,
    master: File,
    output: mpsc::Receiver<Vec<u8>>,
    seen: Vec<u8>,
}

impl Session {
    fn start(dir: &Path, args: &[&str]) -> Session {
        let master: OwnedFd = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
        grantpt(&master).unwrap();
        unlockpt(&master).unwrap();
        let slave_path = ptsname(&master, Vec::new()).unwrap();
        let slave = File::options()
            .read(true)
            .write(true)
            .open(slave_path.to_str().unwrap())
            .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_stompd"));
        command
            .arg("passwd")
            .args(args)
            .current_dir(dir)
            .env_clear()
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave.try_clone().unwrap()));
        // SAFETY: between fork and exec the closure only makes async-signal-safe system calls
        // (setsid, ioctl) on a descriptor the child already holds.
        unsafe {
            command.pre_exec(move || {
                rustix::process::setsid()?;
                rustix::process::ioctl_tiocsctty(std::io::stdin().as_fd())?;
                Ok(())
            });
        }
        let child = command.spawn().expect("run stompd passwd on a pty");
        drop(slave);
        let master = File::from(master);
        let mut reader = master.try_clone().unwrap();
        let (sender, output) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 1024];
            // Ends with EIO once the child has exited and the slave side is closed.
            while let Ok(count @ 1..) = reader.read(&mut buffer) {
                if sender.send(buffer[..count].to_vec()).is_err() {
                    break;
                }
            }
        });
        Session {
            child,
            master,
            output,
            seen: Vec::new(),
        }
    }

    fn expect(&mut self, text: &str) {
        while !String::from_utf8_lossy(&self.seen).contains(text) {
            match self.output.recv_timeout(STEP_TIMEOUT) {
                Ok(bytes) => self.seen.extend(bytes),
                Err(_) => {
                    let _ = self.child.kill();
                    panic!(
                        "no {text:?} on the terminal; saw {:?}",
                        String::from_utf8_lossy(&self.seen)
                    );
                }
            }
        }
    }

    fn type_line(&mut self, line: &str) {
        self.master
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
    }

    fn exit_code(mut self) -> Option<i32> {
        let deadline = std::time::Instant::now() + STEP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("stompd passwd did not exit");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[test]
fn prompts_twice_and_writes_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let mut session = Session::start(dir.path(), &["-f", "users", "tina"]);
    session.expect("New password for tina: ");
    session.type_line("tty-secret");
    session.expect("Again: ");
    session.type_line("tty-secret");
    session.expect("added user `tina`");
    assert_eq!(session.exit_code(), Some(0));
    let file = PasswordFile::load(&dir.path().join("users"), PasswordFormat::Hashed).unwrap();
    assert!(file.verify(b"tina", b"tty-secret"));
}

#[test]
fn different_answers_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut session = Session::start(dir.path(), &["-f", "users", "tina"]);
    session.expect("New password for tina: ");
    session.type_line("one");
    session.expect("Again: ");
    session.type_line("two");
    session.expect("the passwords differ");
    assert_eq!(session.exit_code(), Some(1));
    assert!(!dir.path().join("users").exists());
}
