//! Which shim runs a Lease: an open-file-description lock on one byte of `<state>/claims.lock`,
//! at an offset taken from the Lease's uid.
//!
//! A shim takes the byte before it starts anything and holds it until it exits; the kernel drops
//! the lock when the shim's last descriptor closes, however it dies, so a claim can never outlive
//! its shim and never needs cleaning up. A second shim for the same Lease (a restarted scheduler
//! spawning again) finds the byte taken and leaves. The scheduler and the reclaim controller ask
//! whether the byte is held to tell a shim that is still starting from one that never came.
//!
//! This replaces a claim written into the Lease (one store write per run): a lock costs two system
//! calls and no disk. Two Leases whose uids hash to the same byte only wait for each other; with
//! 2^62 offsets that does not happen in practice.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::store::fsio;

/// The claims file in a state directory.
pub fn claims_path(state_dir: &Path) -> PathBuf {
    state_dir.join("claims.lock")
}

/// The claim a shim holds on its run for as long as it lives, beside the one on its Lease: the
/// run is one attempt of one Task, and outlasts a Lease deleted by hand, which takes the Lease's
/// uid with it. Reclaim asks it before it requeues such a run.
pub fn run_key(task: &str, task_uid: &str, attempt: i64) -> String {
    let task = if task_uid.is_empty() { task } else { task_uid };
    format!("run/{task}/{attempt}")
}

/// Whether a shim holds the claim of one run ([`run_key`]): under the Task's uid, or under its
/// name, as the shim of a Lease written without `taskUid` (before that field) holds it.
pub fn run_is_held(state_dir: &Path, task: &str, task_uid: &str, attempt: i64) -> io::Result<bool> {
    if Claim::is_held(state_dir, &run_key(task, task_uid, attempt))? {
        return Ok(true);
    }
    Ok(!task_uid.is_empty() && Claim::is_held(state_dir, &run_key(task, "", attempt))?)
}

/// A held claim; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct Claim {
    _file: File,
}

/// The byte a Lease uid claims: FNV-1a of the uid, within the positive `off_t` range.
fn offset(uid: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in uid.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h >> 2) as i64
}

fn lock_request(uid: &str, kind: nix::libc::c_short) -> nix::libc::flock {
    // SAFETY: flock is a plain C struct; all-zero is a valid value of every field.
    let mut l: nix::libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = kind;
    l.l_whence = nix::libc::SEEK_SET as nix::libc::c_short;
    l.l_start = offset(uid);
    l.l_len = 1;
    l
}

impl Claim {
    /// Takes the claim on the Lease with `uid`; `None` when a live process holds it already.
    pub fn acquire(state_dir: &Path, uid: &str) -> io::Result<Option<Claim>> {
        let file = fsio::open_private(&claims_path(state_dir))?;
        let req = lock_request(uid, nix::libc::F_WRLCK as nix::libc::c_short);
        match nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_OFD_SETLK(&req)) {
            Ok(_) => Ok(Some(Claim { _file: file })),
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EACCES) => Ok(None),
            Err(e) => Err(io::Error::from(e)),
        }
    }

    /// Whether some process on this host holds the claim on the Lease with `uid`. A missing
    /// claims file means nobody does.
    pub fn is_held(state_dir: &Path, uid: &str) -> io::Result<bool> {
        let file = match File::open(claims_path(state_dir)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        // A read lock's probe is enough to see a writer's lock, and needs only read access.
        let mut req = lock_request(uid, nix::libc::F_RDLCK as nix::libc::c_short);
        nix::fcntl::fcntl(
            file.as_raw_fd(),
            nix::fcntl::FcntlArg::F_OFD_GETLK(&mut req),
        )
        .map_err(io::Error::from)?;
        Ok(i32::from(req.l_type) != nix::libc::F_UNLCK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_exclusive_until_it_is_dropped() {
        let d = tempfile::tempdir().unwrap();
        assert!(!Claim::is_held(d.path(), "uid-1").unwrap());
        let c = Claim::acquire(d.path(), "uid-1").unwrap().expect("free");
        assert!(Claim::is_held(d.path(), "uid-1").unwrap());
        assert!(
            Claim::acquire(d.path(), "uid-1").unwrap().is_none(),
            "a second claim of the same lease fails, even from the same process"
        );
        assert!(
            Claim::acquire(d.path(), "uid-2").unwrap().is_some(),
            "another lease's claim is independent"
        );
        drop(c);
        assert!(!Claim::is_held(d.path(), "uid-1").unwrap());
        assert!(Claim::acquire(d.path(), "uid-1").unwrap().is_some());
    }

    #[test]
    fn a_run_is_held_under_its_tasks_uid_or_under_its_name_by_a_shim_of_an_older_lease() {
        let d = tempfile::tempdir().unwrap();
        assert!(!run_is_held(d.path(), "t", "uid-1", 1).unwrap());
        let by_uid = Claim::acquire(d.path(), &run_key("t", "uid-1", 1)).unwrap();
        assert!(run_is_held(d.path(), "t", "uid-1", 1).unwrap());
        assert!(
            !run_is_held(d.path(), "t", "uid-1", 2).unwrap(),
            "another attempt"
        );
        drop(by_uid);
        // A Lease without taskUid: its shim claims the run by the Task's name.
        let by_name = Claim::acquire(d.path(), &run_key("t", "", 1)).unwrap();
        assert!(run_is_held(d.path(), "t", "uid-1", 1).unwrap());
        assert!(
            !run_is_held(d.path(), "u", "uid-2", 1).unwrap(),
            "another task"
        );
        drop(by_name);
        assert!(!run_is_held(d.path(), "t", "uid-1", 1).unwrap());
    }
}
