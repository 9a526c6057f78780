//! The instance lock (invariant 9): one scheduler per state directory makes decisions. It is an
//! flock on `<state>/scheduler.lock`, a file that is never truncated or unlinked (so two processes
//! can never lock two different inodes); who holds it is written beside it, in `scheduler.holder`.

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::resources::meta::now_rfc3339;
use crate::store::fsio;

/// Held for as long as the value lives; dropping it (or the process dying) releases the lock.
pub struct InstanceLock {
    lock: Flock<File>,
    path: PathBuf,
    holder: PathBuf,
}

/// Why the lock could not be taken.
#[derive(Debug)]
pub enum LockError {
    /// Another scheduler holds it; the text says who, as written in the holder file.
    Held {
        path: PathBuf,
        holder: String,
    },
    Io {
        path: PathBuf,
        source: io::Error,
    },
}

impl fmt::Display for LockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockError::Held { path, holder } => write!(
                f,
                "another scheduler holds the lock {}: {holder}",
                path.display()
            ),
            LockError::Io { path, source } => write!(f, "{}: {source}", path.display()),
        }
    }
}

impl std::error::Error for LockError {}

impl InstanceLock {
    /// Takes the lock without waiting.
    pub fn acquire(state_dir: &Path) -> Result<InstanceLock, LockError> {
        let path = state_dir.join("scheduler.lock");
        let io_err = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        fsio::ensure_private_dir(state_dir).map_err(io_err)?;
        let file = fsio::open_private(&path).map_err(io_err)?;
        let holder = state_dir.join("scheduler.holder");
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, Errno::EWOULDBLOCK)) => {
                let who = fs::read_to_string(&holder)
                    .map(|s| s.trim().to_string())
                    .unwrap_or_else(|_| "holder unknown".into());
                return Err(LockError::Held { path, holder: who });
            }
            Err((_, e)) => return Err(io_err(io::Error::from(e))),
        };
        let who = format!(
            "pid {} on {} since {}\n",
            std::process::id(),
            crate::agent::hostname(),
            now_rfc3339()
        );
        let tmp = state_dir.join("tmp");
        fsio::ensure_private_dir(&tmp).map_err(io_err)?;
        fsio::write_atomic(&tmp, &holder, who.as_bytes(), true).map_err(io_err)?;
        Ok(InstanceLock { lock, path, holder })
    }

    /// Whether the file at the lock's path is still the one this instance locked. A state
    /// directory removed (or its lock file replaced) while the daemon runs frees the path for a
    /// second scheduler, which would lock a new file and decide beside this one (invariant 9).
    pub fn check(&self) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt;
        let held = self
            .lock
            .metadata()
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        match fs::metadata(&self.path) {
            Ok(m) if m.dev() == held.dev() && m.ino() == held.ino() => Ok(()),
            Ok(_) => Err(format!(
                "{} is no longer the file this scheduler locked",
                self.path.display()
            )),
            Err(e) => Err(format!(
                "{} is gone ({e}): the state directory was removed or moved",
                self.path.display()
            )),
        }
    }

    /// Where the holder's identity is written.
    pub fn holder_path(&self) -> &Path {
        &self.holder
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_instance_is_told_who_holds_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let first = InstanceLock::acquire(dir.path()).unwrap();
        let e = InstanceLock::acquire(dir.path())
            .err()
            .expect("second must fail");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        drop(first);
        InstanceLock::acquire(dir.path()).expect("free again after drop");
    }

    #[test]
    fn the_lock_knows_when_its_file_was_removed_or_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let lock = InstanceLock::acquire(dir.path()).unwrap();
        assert_eq!(lock.check(), Ok(()));
        let path = dir.path().join("scheduler.lock");
        std::fs::remove_file(&path).unwrap();
        assert!(lock.check().unwrap_err().contains("is gone"));
        std::fs::write(&path, "").unwrap();
        assert!(lock.check().unwrap_err().contains("no longer the file"));
    }
}
