//! Helpers for the CLI integration tests: a temporary state directory, running the real binary,
//! and a fingerprint of every file under a directory (to prove that a failed command changed
//! nothing).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_tinyscheduler");

/// A scratch area: `state/` for the store and room for manifest files beside it.
pub struct Env {
    pub tmp: tempfile::TempDir,
}

/// What a finished command printed and how it exited.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Env {
    pub fn new() -> Env {
        Env {
            tmp: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn state(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    /// Writes a manifest file beside the state directory and returns its path.
    pub fn file(&self, name: &str, content: &str) -> PathBuf {
        let p = self.tmp.path().join(name);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(&p, content).unwrap();
        p
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--state-dir")
            .arg(self.state())
            .args(args)
            .current_dir(self.tmp.path())
            .env_remove("TINYSCHEDULER_STATE_DIR");
        c
    }

    /// Runs `tinyscheduler --state-dir STATE ARGS...` to completion.
    pub fn run(&self, args: &[&str]) -> Run {
        self.cmd(args).output().expect("run binary").into()
    }

    /// Same, feeding `stdin`.
    pub fn run_stdin(&self, args: &[&str], stdin: &str) -> Run {
        let mut child = self
            .cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap().into()
    }

    /// Applies a manifest, asserting success.
    pub fn apply_ok(&self, name: &str, content: &str) -> Run {
        let f = self.file(name, content);
        let r = self.run(&["apply", "-f", f.to_str().unwrap()]);
        assert_eq!(r.code, 0, "apply failed: {r:?}");
        r
    }

    pub fn store(&self) -> tinyscheduler::store::Store {
        tinyscheduler::store::Store::open(self.state()).unwrap()
    }

    /// Fingerprint of the state directory.
    pub fn snapshot(&self) -> Snapshot {
        snapshot(&self.state())
    }
}

/// Every entry under a directory: its relative path, type, mode, and a hash of its content (or of
/// its link target).
#[derive(Debug, PartialEq, Eq)]
pub struct Snapshot(pub BTreeMap<PathBuf, (String, u32, u64)>);

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

pub fn snapshot(root: &Path) -> Snapshot {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, (String, u32, u64)>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            if ft.is_symlink() {
                let t = std::fs::read_link(&p).unwrap();
                let h = fnv(t.as_os_str().as_encoded_bytes());
                out.insert(rel, ("link".into(), m.mode(), h));
            } else if ft.is_dir() {
                out.insert(rel, ("dir".into(), m.mode(), 0));
                walk(root, &p, out);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                out.insert(rel, ("file".into(), m.mode(), fnv(&bytes)));
            }
        }
    }
    walk(root, root, &mut out);
    Snapshot(out)
}

/// A child whose stdout lines arrive on a channel, killed (by pid) when dropped.
pub struct Streaming {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
}

impl Streaming {
    pub fn spawn(mut cmd: Command) -> Streaming {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Streaming { child, lines: rx }
    }

    /// The next line, or `None` after `timeout`.
    pub fn line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub const API: &str = "apiVersion: tinyscheduler.io/v1alpha1";

/// An Agent manifest.
pub fn agent(name: &str, limit: i64) -> String {
    format!(
        "{API}\nkind: Agent\nmetadata:\n  name: {name}\nspec:\n  queue: default\n  maxConcurrency: {limit}\n  command: [\"true\"]\n"
    )
}

/// A Queue manifest.
pub fn queue(name: &str) -> String {
    format!("{API}\nkind: Queue\nmetadata:\n  name: {name}\nspec:\n  source: local\n")
}

/// A Task manifest.
pub fn task(name: &str, queue: &str) -> String {
    format!("{API}\nkind: Task\nmetadata:\n  name: {name}\nspec:\n  queue: {queue}\n")
}

pub mod tinytask_server;

/// Changes object `name` with `f` and writes it, reading it again when a write by the running
/// daemon came in between (a Conflict).
pub fn update_retrying<K: tinyscheduler::resources::meta::Resource>(
    store: &tinyscheduler::store::Store,
    name: &str,
    mut f: impl FnMut(&mut K),
) {
    loop {
        let mut obj = store.get::<K>(name).unwrap();
        f(&mut obj);
        match store.update(&obj) {
            Ok(_) => return,
            Err(e) if e.is_conflict() => continue,
            Err(e) => panic!("{e}"),
        }
    }
}
