//! Exact liveness of a process (invariant 5): a pid is alive only if `/proc/<pid>` exists with the
//! start time recorded when it was spawned and it is not a zombie. A pid reused by an unrelated
//! process has another start time and is therefore dead.
//!
//! When `/proc/<pid>` cannot be read (a `hidepid` mount hiding other users' processes), the answer
//! falls back to `kill(pid, 0)`: EPERM means the process exists and is alive, ESRCH that it is gone.
//! In that case the start time cannot be checked.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;

/// What `/proc/<pid>/stat` says of a process (the fields this crate needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: i32,
    /// The command name (field 2, without the parentheses; may contain spaces and parentheses).
    pub comm: String,
    /// Field 3: `R`, `S`, `D`, `Z`, `X`, `T`, …
    pub state: char,
    pub ppid: i32,
    /// Field 5: process group id.
    pub pgrp: i32,
    pub session: i32,
    /// Field 20: the process's threads, counting its first one even when that one has exited.
    pub num_threads: u64,
    /// Field 22: start time in clock ticks since boot.
    pub start_time: u64,
}

impl ProcStat {
    /// A dead (`X`) process, or a zombie (`Z`) whose threads have all exited, is not running
    /// anything any more. A `Z` whose first thread called `pthread_exit` while others go on
    /// (`ps` shows `Zl`) is still running them: it is alive, and kill(2) still reaches it.
    pub fn is_zombie_or_dead(&self) -> bool {
        match self.state {
            'X' | 'x' => true,
            'Z' => self.num_threads <= 1,
            _ => false,
        }
    }
}

/// Parses the contents of `/proc/<pid>/stat`. The comm field is split at the LAST `)`, since a
/// command name may itself contain `)` and spaces.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    if close < open {
        return None;
    }
    let pid = text[..open].trim().parse().ok()?;
    let comm = text[open + 1..close].to_string();
    // Fields from 3 (state) on.
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let state = rest.first()?.chars().next()?;
    let field = |n: usize| rest.get(n - 3).copied();
    Some(ProcStat {
        pid,
        comm,
        state,
        ppid: field(4)?.parse().ok()?,
        pgrp: field(5)?.parse().ok()?,
        session: field(6)?.parse().ok()?,
        num_threads: field(20)?.parse().ok()?,
        start_time: field(22)?.parse().ok()?,
    })
}

/// Reads and parses `/proc/<pid>/stat`.
pub fn read_stat(pid: i32) -> io::Result<ProcStat> {
    if pid <= 0 {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // Read into room enough for the whole line (52 numbers and a 16-byte name): /proc reports a
    // size of 0, so `fs::read_to_string` would stat the file and read it 32, 64, … bytes at a time.
    let mut file = fs::File::open(format!("/proc/{pid}/stat"))?;
    let mut buf = [0u8; 4096];
    let mut len = 0;
    while len < buf.len() {
        match file.read(&mut buf[len..])? {
            0 => break,
            n => len += n,
        }
    }
    let text = String::from_utf8_lossy(&buf[..len]);
    parse_stat(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/{pid}/stat: unparsable"),
        )
    })
}

/// Start time of `pid` in clock ticks since boot (`/proc/<pid>/stat` field 22), if it exists.
pub fn start_time_of(pid: i32) -> Option<u64> {
    read_stat(pid).ok().map(|s| s.start_time)
}

/// What `kill(pid, 0)` says: `Some(true)` exists (also EPERM), `Some(false)` ESRCH, `None` unknown.
fn signal_probe(target: i32) -> Option<bool> {
    match kill(Pid::from_raw(target), None) {
        Ok(()) => Some(true),
        Err(Errno::EPERM) => Some(true),
        Err(Errno::ESRCH) => Some(false),
        Err(_) => None,
    }
}

/// True only if `pid` is running with exactly `start_time` and is not a zombie. EPERM from
/// `kill(pid, 0)` counts as alive; ESRCH as dead. When `/proc/<pid>/stat` cannot be read for
/// another reason (out of file descriptors or memory), only the signal probe can tell, and a
/// process that may exist counts as alive: a run judged dead by mistake is killed and run again.
pub fn is_alive(pid: i32, start_time: u64) -> bool {
    if pid <= 0 {
        return false;
    }
    match read_stat(pid) {
        Ok(stat) => {
            if stat.start_time != start_time || stat.is_zombie_or_dead() {
                return false;
            }
            // The process may have ended between the read and now; EPERM still means alive.
            signal_probe(pid).unwrap_or(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Gone — unless /proc hides it from us (hidepid=2) while it exists.
            if proc_is_mounted() {
                matches!(signal_probe(pid), Some(true)) && proc_hides_others()
            } else {
                false
            }
        }
        // hidepid=1: the directory is there but unreadable; only the signal probe can tell.
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => signal_probe(pid).unwrap_or(false),
        Err(_) => signal_probe(pid).unwrap_or(true),
    }
}

/// Whether a process `pid` may exist (`kill(pid, 0)`; EPERM and an unknown answer count as yes).
/// Says nothing about which process it is: see [`is_alive`] for that.
pub fn may_exist(pid: i32) -> bool {
    pid > 0 && signal_probe(pid).unwrap_or(true)
}

/// True while the process group `pgid` has a member that is not a zombie. A group whose members
/// are all zombies (ended, not yet reaped by their parent) runs nothing and counts as empty.
pub fn group_alive(pgid: i32) -> bool {
    if pgid <= 0 {
        return false;
    }
    match signal_probe(-pgid) {
        Some(false) => false,
        _ => {
            let scanned = (proc_is_mounted() && !proc_hides_others())
                .then(|| scan_group(pgid))
                .flatten();
            match scanned {
                Some(members) => !members.is_empty(),
                // Without a full view of /proc only the signal probe can tell.
                None => signal_probe(-pgid).unwrap_or(true),
            }
        }
    }
}

/// Pids of the members of process group `pgid` that are not zombies, as far as `/proc` shows.
pub fn group_members(pgid: i32) -> Vec<i32> {
    scan_group(pgid)
        .unwrap_or_default()
        .iter()
        .map(|s| s.pid)
        .collect()
}

/// The members of `pgid` that are not zombies, by pid; `None` when `/proc` could not be read
/// whole (a process that ended meanwhile is no gap).
fn scan_group(pgid: i32) -> Option<Vec<ProcStat>> {
    let mut members = Vec::new();
    for pid in proc_pids().ok()? {
        match read_stat(pid) {
            Ok(s) if s.pgrp == pgid && !s.is_zombie_or_dead() => members.push(s),
            Ok(_) => {}
            // Ended between the listing and the read (or while being read).
            Err(e) if gone(&e) || e.kind() == io::ErrorKind::InvalidData => {}
            Err(_) => return None,
        }
    }
    members.sort_unstable_by_key(|s| s.pid);
    Some(members)
}

/// What marks a process as one run's: the Lease and attempt the shim put in the agent's
/// environment (`TINYSCHEDULER_LEASE`, `TINYSCHEDULER_ATTEMPT`), which its children inherit.
fn run_environ(lease: &str, attempt: i64) -> [String; 2] {
    [
        format!("TINYSCHEDULER_LEASE={lease}"),
        format!("TINYSCHEDULER_ATTEMPT={attempt}"),
    ]
}

/// Whether process group `pgid` still has a member of one run: a process with the run's Lease and
/// attempt in its environment (what the shim gave the agent; its children inherit it), with the
/// run's log (`log`) as its stdout or stderr (a child started with an environment of its own,
/// `env -i`, still writes there), or in the session of the run's shim and started no earlier
/// than its agent (`session`: the shim's pid, which is its session's id, and the agent's start
/// time, both of this boot; a child with neither the environment nor the log). Asked of a run
/// whose agent has exited, so that what it left in its group is found, and a group number that
/// something else has taken since is not: a group belongs to one session, and neither number is
/// given to another while a process holds it. An error: `/proc` could not be read (out of file
/// descriptors, say), so nothing can be said.
pub fn group_has_run(
    pgid: i32,
    lease: &str,
    attempt: i64,
    log: &Path,
    session: Option<(i32, u64)>,
) -> io::Result<bool> {
    if pgid <= 1 {
        return Ok(false);
    }
    let wanted = run_environ(lease, attempt);
    let log = as_the_kernel_shows(log)?;
    let members = scan_group(pgid).ok_or_else(unreadable_proc)?;
    for m in members {
        let of_the_shim = session
            .is_some_and(|(sid, since)| sid > 1 && m.session == sid && m.start_time >= since);
        if of_the_shim {
            return Ok(true);
        }
        if environ_has(m.pid, &wanted)? {
            return Ok(true);
        }
        if let Some(log) = &log {
            if writes_to(m.pid, log)? {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// A run's log path as the kernel shows it for an open file (symlinks resolved), to compare with
/// `/proc/<pid>/fd` links; `None` when there is no log (nothing can be writing to it).
fn as_the_kernel_shows(log: &Path) -> io::Result<Option<PathBuf>> {
    match fs::canonicalize(log) {
        Ok(l) => Ok(Some(l)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOTDIR) => Ok(None),
        Err(e) => Err(e),
    }
}

fn unreadable_proc() -> io::Error {
    io::Error::other("/proc could not be read whole")
}

/// The process groups of the processes of one run that its Lease does not name: the agent of a
/// shim killed before its first write (which started the agent but never recorded its pid), and
/// what an agent started outside its own group (`setsid`, a double fork). Such a process is found
/// by what the shim gave the agent and its children inherit: the run's log file as its stdout or
/// stderr. The log's path names the state directory, the task and the attempt, so no other run,
/// not even another scheduler's run of a task with the same name, is taken for it, and a child
/// that dropped the run's environment (`env -i`) is still found; the shim itself writes its
/// lines to the log through another descriptor. A process that closed both, or whose `/proc`
/// entries this process may not read, is not found; zombies and the caller's own group are left
/// out. An error: `/proc` could not be read (out of file descriptors, say), so none can be ruled
/// out.
pub fn groups_of_unrecorded_run(log: &Path) -> io::Result<Vec<i32>> {
    // No log file, no agent.
    let Some(log) = as_the_kernel_shows(log)? else {
        return Ok(Vec::new());
    };
    let own = nix::unistd::getpgrp().as_raw();
    let mut groups = Vec::new();
    for pid in proc_pids()? {
        if !writes_to(pid, &log)? {
            continue;
        }
        // A process that matched and then went is gone; any other failure (out of file
        // descriptors) would drop a live agent's group from the answer.
        let s = match read_stat(pid) {
            Ok(s) => s,
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(e),
        };
        if !s.is_zombie_or_dead() && s.pgrp > 1 && s.pgrp != own {
            groups.push(s.pgrp);
        }
    }
    groups.sort_unstable();
    groups.dedup();
    Ok(groups)
}

/// The pids `/proc` lists.
fn proc_pids() -> io::Result<Vec<i32>> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc")? {
        if let Some(pid) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// Whether `pid`'s stdout or stderr is the file at `path`. A process gone meanwhile, a closed
/// descriptor, or one this process may not read, is not; any other failure is an error.
fn writes_to(pid: i32, path: &Path) -> io::Result<bool> {
    for fd in [1, 2] {
        match fs::read_link(format!("/proc/{pid}/fd/{fd}")) {
            Ok(p) if p == path => return Ok(true),
            Ok(_) => {}
            Err(e) if gone(&e) || e.kind() == io::ErrorKind::PermissionDenied => {}
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// Whether a failure to read a process's `/proc` entry says that it (or the entry) is gone.
fn gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(nix::libc::ESRCH)
}

/// Whether every one of `entries` (`NAME=value`) is in the environment `pid` started with. A
/// process gone meanwhile, or whose environment this process may not read, has not; any other
/// failure is an error.
fn environ_has(pid: i32, entries: &[String]) -> io::Result<bool> {
    let env = match fs::read(format!("/proc/{pid}/environ")) {
        Ok(env) => env,
        Err(e) if gone(&e) || e.kind() == io::ErrorKind::PermissionDenied => return Ok(false),
        Err(e) => return Err(e),
    };
    Ok(entries
        .iter()
        .all(|e| env.split(|b| *b == 0).any(|v| v == e.as_bytes())))
}

fn proc_is_mounted() -> bool {
    fs::metadata("/proc/self/stat").is_ok()
}

/// Whether `/proc` is mounted with `hidepid` (other users' processes invisible or unreadable).
fn proc_hides_others() -> bool {
    let Ok(mounts) = fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_dev, mnt, fstype, opts) = (f.next(), f.next(), f.next(), f.next().unwrap_or(""));
        mnt == Some("/proc")
            && fstype == Some("proc")
            && opts
                .split(',')
                .any(|o| o.starts_with("hidepid=") && !matches!(o, "hidepid=0" | "hidepid=off"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comm_with_spaces_and_parentheses_is_split_at_the_last_paren() {
        let mut fields = vec!["S".to_string()];
        for n in 4..=52 {
            fields.push(n.to_string());
        }
        let line = format!("1234 (my (weird) prog) ) {}\n", fields.join(" "));
        let s = parse_stat(&line).unwrap();
        assert_eq!(s.pid, 1234);
        assert_eq!(s.comm, "my (weird) prog) ");
        assert_eq!(s.state, 'S');
        assert_eq!(s.ppid, 4);
        assert_eq!(s.pgrp, 5);
        assert_eq!(s.session, 6);
        assert_eq!(s.num_threads, 20);
        assert_eq!(s.start_time, 22);
    }

    #[test]
    fn a_zombie_is_dead_unless_threads_other_than_its_first_still_run() {
        let stat = |state: &str, threads: u32| {
            let mut fields = vec![state.to_string()];
            for n in 4..=52 {
                fields.push(if n == 20 { threads } else { n }.to_string());
            }
            parse_stat(&format!("7 (agent) {}\n", fields.join(" "))).unwrap()
        };
        assert!(stat("Z", 1).is_zombie_or_dead());
        assert!(
            !stat("Z", 3).is_zombie_or_dead(),
            "pthread_exit of the first thread"
        );
        assert!(stat("X", 1).is_zombie_or_dead());
        assert!(!stat("S", 1).is_zombie_or_dead());
    }

    #[test]
    fn a_truncated_stat_line_is_rejected() {
        assert!(parse_stat("12 (x) S 1 2").is_none());
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn this_process_is_alive_with_its_own_start_time_and_dead_with_another() {
        let me = std::process::id() as i32;
        let st = start_time_of(me).unwrap();
        assert!(is_alive(me, st));
        assert!(!is_alive(me, st + 1));
        assert!(!is_alive(0, st));
        assert!(!is_alive(-1, st));
    }

    #[test]
    fn a_live_process_and_group_stay_alive_when_proc_cannot_be_read_for_want_of_descriptors() {
        let parent = std::process::id() as i32;
        let st = start_time_of(parent).unwrap();
        let pgid = nix::unistd::getpgrp().as_raw();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("1.log");
        fs::write(&log, "").unwrap();
        // SAFETY: the child only sets a limit, asks, and `_exit`s; glibc's fork leaves malloc
        // usable in the child.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                // No descriptor can be opened any more: every /proc read fails with EMFILE.
                let mut limit = nix::libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                // SAFETY: plain system calls on values owned here.
                unsafe {
                    nix::libc::getrlimit(nix::libc::RLIMIT_NOFILE, &mut limit);
                    limit.rlim_cur = 0;
                    if nix::libc::setrlimit(nix::libc::RLIMIT_NOFILE, &limit) != 0
                        || std::fs::File::open("/proc/self/stat").is_ok()
                    {
                        nix::libc::_exit(100)
                    }
                    let code = i32::from(is_alive(parent, st))
                        | i32::from(group_alive(pgid)) << 1
                        | i32::from(groups_of_unrecorded_run(&log).is_err()) << 2
                        | i32::from(group_has_run(pgid, "t", 1, &log, None).is_err()) << 3;
                    nix::libc::_exit(code)
                }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(
                    status,
                    nix::sys::wait::WaitStatus::Exited(child, 0b1111),
                    "bit 0: the process, bit 1: its group were judged alive; bits 2 and 3: the \
                     searches for a run's processes failed rather than find none (100: no limit)"
                );
            }
        }
    }
}
