//! Starting a shim: detached (own session, stdio on /dev/null, a minimal environment) and reaped
//! by a background thread, so the scheduler never waits on it and no zombie lingers while the
//! scheduler lives. When the scheduler exits first, the shim is re-parented and goes on
//! (invariant 7).

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Marks every descriptor this process inherited above stderr close-on-exec, so that none reaches
/// a shim or an agent: a cron job's `flock` descriptor held by a day-long agent would keep the
/// next tick out, and an inherited pipe's reader would never see its end. The process itself keeps
/// them (that lock is its own to hold). Called first thing at start; the standard library opens
/// everything close-on-exec already.
pub fn keep_inherited_descriptors_from_children() {
    // SAFETY: close_range only changes descriptor flags; no memory is touched.
    let r = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_close_range,
            3u32,
            u32::MAX,
            nix::libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r == 0 {
        return;
    }
    // Kernels before 5.11: each open descriptor, as /proc lists them.
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: setting a flag on a descriptor number; one that closed meanwhile gives EBADF.
        unsafe {
            nix::libc::fcntl(fd, nix::libc::F_SETFD, nix::libc::FD_CLOEXEC);
        }
    }
}

/// Environment variable naming the binary to run as the shim (default: the current executable).
pub const SHIM_EXE_ENV: &str = "TINYSCHEDULER_SHIM_EXE";

/// Starts `<tinyscheduler> --state-dir <absolute state_dir> shim --lease <lease>` (which moves
/// itself into its own session) and returns its pid. A background thread reaps it; callers never wait on it.
///
/// The shim is forked by this process's launcher ([`super::launcher`]) when it can be, which
/// saves the exec of a whole binary per run; otherwise the binary is executed.
pub fn spawn_shim(state_dir: &Path, lease: &str) -> io::Result<u32> {
    let exe = shim_exe()?;
    let state_dir = std::path::absolute(state_dir)?;
    if super::launcher::enabled() {
        match super::launcher::launch(&exe, &state_dir, lease) {
            Ok(pid) => return Ok(pid),
            Err(e) => tracing::debug!(lease, "the shim launcher did not start the shim: {e}"),
        }
    }
    spawn_shim_with(&exe, &state_dir, lease)
}

/// `<exe> --state-dir <state_dir>`, stderr to /dev/null, with only the environment a shim gets
/// ([`shim_env`]): the start of both a shim's and the shim launcher's command line.
pub(crate) fn shim_command(exe: &Path, state_dir: &Path) -> Command {
    let mut cmd = Command::new(exe);
    cmd.arg("--state-dir")
        .arg(state_dir)
        .stderr(Stdio::null())
        .env_clear()
        .envs(shim_env(std::env::vars_os()));
    cmd
}

/// Like [`spawn_shim`] with an explicit binary.
pub fn spawn_shim_with(exe: &Path, state_dir: &Path, lease: &str) -> io::Result<u32> {
    let state_dir = std::path::absolute(state_dir)?;
    let mut cmd = shim_command(exe, &state_dir);
    cmd.arg("shim")
        .arg("--lease")
        .arg(lease)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    // No `pre_exec`: without one the standard library starts the child with posix_spawn (vfork
    // semantics) instead of fork, which would copy the scheduler's page tables for every run. The
    // shim puts itself in its own session first thing (`shim::main`).
    let child = cmd.spawn()?;
    let pid = child.id();
    reap(child);
    Ok(pid)
}

/// What Linux appends to `/proc/self/exe` once the running executable's path was unlinked.
const DELETED: &[u8] = b" (deleted)";

/// How often the reaper looks for exited shims while any is alive.
const REAP_EVERY: Duration = Duration::from_millis(50);

/// Hands `child` to the process's one reaper thread (started on first use), which collects the
/// exit status of every shim so that none stays a zombie. One thread for all shims: a thread per
/// shim cost a thread start and its stack for every run of a burst.
pub(crate) fn reap(child: Child) {
    static REAPER: OnceLock<Mutex<mpsc::Sender<Child>>> = OnceLock::new();
    let tx = REAPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Child>();
        let started = std::thread::Builder::new()
            .name("reap-shims".into())
            .spawn(move || reaper(rx));
        if let Err(e) = started {
            tracing::warn!("cannot start the shim reaper thread: {e}; exited shims stay zombies until the scheduler exits");
        }
        Mutex::new(tx)
    });
    let sent = tx.lock().unwrap_or_else(|p| p.into_inner()).send(child);
    // Without a reaper the child is dropped unwaited: it runs on, and is reaped by init once the
    // scheduler exits.
    drop(sent);
}

fn reaper(rx: mpsc::Receiver<Child>) {
    let mut live: Vec<Child> = Vec::new();
    loop {
        let next = if live.is_empty() {
            rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
        } else {
            rx.recv_timeout(REAP_EVERY)
        };
        match next {
            Ok(c) => live.push(c),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        while let Ok(c) = rx.try_recv() {
            live.push(c);
        }
        // Keep a child only while it runs and can still be asked.
        live.retain_mut(|c| matches!(c.try_wait(), Ok(None)));
    }
}

/// The environment a shim gets: PATH, HOME, LANG and every `TINYSCHEDULER_*` setting, nothing
/// else of the scheduler's environment.
pub fn shim_env(vars: impl IntoIterator<Item = (OsString, OsString)>) -> Vec<(OsString, OsString)> {
    vars.into_iter()
        .filter(|(k, _)| {
            let k = k.to_string_lossy();
            matches!(k.as_ref(), "PATH" | "HOME" | "LANG") || k.starts_with("TINYSCHEDULER_")
        })
        .collect()
}

/// Whether `p` is a regular file this user may execute (`access(X_OK)`, as `execve` will judge
/// it: an execute bit for someone else is not enough): a program the shim (or an agent's
/// command) could be started from.
pub fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file())
        && nix::unistd::access(p, nix::unistd::AccessFlags::X_OK).is_ok()
}

/// The binary to run as the shim: `$TINYSCHEDULER_SHIM_EXE`, else the current executable. When the
/// current executable is a cargo test harness (`target/<profile>/deps/<name>-<hash>`), the
/// `tinyscheduler` binary beside `deps/` is used instead, so a test never re-runs its own harness.
/// When an upgrade has replaced the running binary (`mv` over it), its old path names the new
/// file or nothing; the shims then run the scheduler's own code through `/proc/self/exe`.
pub fn shim_exe() -> io::Result<PathBuf> {
    if let Some(p) = std::env::var_os(SHIM_EXE_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    if exe.as_os_str().as_encoded_bytes().ends_with(DELETED) {
        return Ok(PathBuf::from("/proc/self/exe"));
    }
    let in_deps = exe
        .parent()
        .and_then(|d| d.file_name())
        .is_some_and(|n| n == "deps");
    if in_deps {
        let sibling = exe
            .parent()
            .and_then(Path::parent)
            .map(|d| d.join("tinyscheduler"));
        return match sibling {
            Some(s) if s.is_file() => Ok(s),
            _ => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{} looks like a test harness and no tinyscheduler binary is beside it; set {SHIM_EXE_ENV}",
                    exe.display()
                ),
            )),
        };
    }
    Ok(exe)
}
