//! A fork server for shims: one small process per scheduler that forks a shim for each run.
//!
//! Starting the shim by executing the `tinyscheduler` binary anew costs the exec, the dynamic
//! linking and relocation of a 14 MB binary, the command-line parsing and the tear-down of all of
//! that: about 1.2 ms of CPU per run, as much as the rest of the shim's work. So the scheduler
//! starts `tinyscheduler shim-launcher` once; it reads Lease names on its stdin, one per line,
//! forks a child for each that runs the very same shim code ([`super::shim::main`]), and answers
//! with the child's pid (or `error <message>`). A forked child is still a per-run shim that owns
//! its agent (invariant 7): it moves into its own session first thing, and nothing ties it to the
//! launcher afterwards. The launcher exits when its stdin closes, that is when the scheduler
//! exits; the shims it forked run on.
//!
//! The launcher stays single-threaded (no runtime, no threads), which is what makes `fork`
//! without `exec` sound. It ignores SIGCHLD, so the kernel reaps exited shims and none stays a
//! zombie; the child sets SIGCHLD back to its default before anything else.
//!
//! When the launcher cannot be started or stops answering, [`launch`] reports an error and the
//! caller starts the shim the slow way. `TINYSCHEDULER_SHIM_LAUNCHER=0` turns the launcher off.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, ExitCode, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{signal, SigHandler, Signal};
use nix::unistd::{fork, ForkResult};

use crate::cli::args::{Globals, ShimArgs};
use crate::cli::CliResult;
use crate::resources::validate::validate_name;

/// Environment variable that turns the launcher off (`0`, `false`, `off` or `no`).
pub const LAUNCHER_ENV: &str = "TINYSCHEDULER_SHIM_LAUNCHER";

/// After a launcher failed to start, how long shims are started the slow way before trying again.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// How long the scheduler waits for the launcher's answer (a fork takes milliseconds). A launcher
/// that does not answer in time (stopped, say) is killed and the shim started the slow way: were
/// the launcher to have forked that shim after all, the Lease's claim lets only one of the two
/// run it.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether shims are forked by a launcher (the default) rather than executed one by one.
pub fn enabled() -> bool {
    !std::env::var(LAUNCHER_ENV).is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "0" | "false" | "off" | "no"
        )
    })
}

/// Entry point of `tinyscheduler shim-launcher`: serve requests until stdin closes.
pub fn serve(g: &Globals) -> CliResult {
    // Out of the scheduler's session, like every shim: a terminal's Ctrl-C is not for it.
    let _ = nix::unistd::setsid();
    // SAFETY: setting dispositions in a process with one thread.
    unsafe {
        // Exited shims are reaped by the kernel; the launcher never waits on one.
        let _ = signal(Signal::SIGCHLD, SigHandler::SigIgn);
        // A scheduler that went away must not kill the launcher in the middle of a fork's reply.
        let _ = signal(Signal::SIGPIPE, SigHandler::SigIgn);
    }
    let mut input = BufReader::new(io::stdin());
    let mut line = String::new();
    loop {
        line.clear();
        match input.read_line(&mut line) {
            Ok(0) | Err(_) => return Ok(ExitCode::SUCCESS),
            Ok(_) => {}
        }
        let lease = line.trim_end_matches('\n');
        let reply = match validate_name(lease) {
            Err(e) => format!("error invalid lease name {lease:?}: {e}"),
            Ok(()) => match fork_shim(g, lease) {
                Ok(pid) => pid.to_string(),
                Err(e) => format!("error cannot fork a shim: {e}"),
            },
        };
        let mut out = io::stdout().lock();
        if writeln!(out, "{reply}").and_then(|()| out.flush()).is_err() {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

/// Forks the shim for `lease`; returns its pid in the launcher. The child never returns.
fn fork_shim(g: &Globals, lease: &str) -> io::Result<i32> {
    // SAFETY: the launcher has a single thread, so the child starts with consistent state.
    match unsafe { fork() }.map_err(io::Error::from)? {
        ForkResult::Parent { child } => Ok(child.as_raw()),
        ForkResult::Child => {
            // SIGCHLD back to its default, which an executed shim would have had (an ignored
            // SIGCHLD would also stay ignored in the agent). SIGPIPE stays ignored, as in any Rust
            // program; `shim::main` sets its signals up itself.
            // SAFETY: still a single thread.
            unsafe {
                let _ = signal(Signal::SIGCHLD, SigHandler::SigDfl);
            }
            // A forked shim keeps the launcher's command line; its name (`ps -o comm`, `top`)
            // says which Lease it runs, as far as 15 bytes go.
            if let Ok(name) = std::ffi::CString::new(format!("shim:{lease}")) {
                let _ = nix::sys::prctl::set_name(&name);
            }
            // The launcher's pipes are not the shim's: its stdin and stdout go to /dev/null.
            if let Ok(null) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                let _ = nix::unistd::dup2(null.as_raw_fd(), 0);
                let _ = nix::unistd::dup2(null.as_raw_fd(), 1);
            }
            let args = ShimArgs {
                lease: lease.to_string(),
            };
            let code = match super::shim::main(g, args) {
                Ok(_) => 0,
                Err(e) => {
                    eprintln!("{e}");
                    1
                }
            };
            // `_exit`, not `exit`: the exit handlers and library destructors are the launcher's,
            // not this child's to run. Nothing is left to flush: stdout is /dev/null, stderr is
            // unbuffered and the shim's files are closed by then.
            // SAFETY: `_exit` ends the process at once; no Rust code runs after it.
            unsafe { nix::libc::_exit(code) }
        }
    }
}

/// The scheduler's end of a running launcher.
struct Client {
    child: Option<Child>,
    requests: ChildStdin,
    replies: BufReader<ChildStdout>,
}

impl Client {
    fn start(exe: &Path, state_dir: &Path) -> io::Result<Client> {
        let mut child = super::spawn::shim_command(exe, state_dir)
            .arg("shim-launcher")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let (Some(requests), Some(replies)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            super::spawn::reap(child);
            return Err(io::Error::other("the launcher's pipes were not set up"));
        };
        Ok(Client {
            child: Some(child),
            requests,
            replies: BufReader::new(replies),
        })
    }

    /// Asks for a shim: `Ok(Ok(pid))`, `Ok(Err(message))` when the launcher refused (it is still
    /// fine), `Err` when talking to it failed.
    fn launch(&mut self, lease: &str) -> io::Result<Result<u32, String>> {
        writeln!(self.requests, "{lease}")?;
        self.requests.flush()?;
        if self.replies.buffer().is_empty() && !readable_within(&self.replies, REPLY_TIMEOUT)? {
            if let Some(child) = self.child.as_mut() {
                let _ = child.kill();
            }
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the launcher did not answer within {}s; killed it",
                    REPLY_TIMEOUT.as_secs()
                ),
            ));
        }
        let mut reply = String::new();
        if self.replies.read_line(&mut reply)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the launcher exited",
            ));
        }
        let reply = reply.trim_end();
        match reply.strip_prefix("error ") {
            Some(msg) => Ok(Err(msg.to_string())),
            None => reply
                .parse()
                .map(Ok)
                .map_err(|_| io::Error::other(format!("unexpected reply {reply:?}"))),
        }
    }
}

/// Whether `pipe` has something to read (or its end) within `timeout`.
fn readable_within(pipe: &BufReader<ChildStdout>, timeout: Duration) -> io::Result<bool> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        let mut fds = [PollFd::new(pipe.get_ref().as_fd(), PollFlags::POLLIN)];
        match poll(
            &mut fds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(0) if Instant::now() >= deadline => return Ok(false),
            Ok(0) => {}
            Ok(_) => return Ok(true),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Closing the requests pipe (dropped with `self`) makes the launcher exit; the reaper
        // collects it.
        if let Some(child) = self.child.take() {
            super::spawn::reap(child);
        }
    }
}

/// Per state directory: a running launcher, or when starting one last failed.
enum Slot {
    Up(Client),
    Down(Instant),
}

static LAUNCHERS: Mutex<Option<HashMap<PathBuf, Slot>>> = Mutex::new(None);

/// Starts the shim for `lease` through this process's launcher for `state_dir` (started with `exe`
/// on first use). An error means the caller should start the shim itself; a launcher that failed
/// is dropped and, after a pause, started again.
pub fn launch(exe: &Path, state_dir: &Path, lease: &str) -> io::Result<u32> {
    let mut guard = LAUNCHERS.lock().unwrap_or_else(|p| p.into_inner());
    let launchers = guard.get_or_insert_with(HashMap::new);
    if let Some(Slot::Down(since)) = launchers.get(state_dir) {
        if since.elapsed() < RETRY_AFTER {
            return Err(io::Error::other("the launcher failed recently"));
        }
    }
    if !matches!(launchers.get(state_dir), Some(Slot::Up(_))) {
        match Client::start(exe, state_dir) {
            Ok(c) => launchers.insert(state_dir.to_path_buf(), Slot::Up(c)),
            Err(e) => {
                launchers.insert(state_dir.to_path_buf(), Slot::Down(Instant::now()));
                return Err(e);
            }
        };
    }
    let Some(Slot::Up(client)) = launchers.get_mut(state_dir) else {
        return Err(io::Error::other("no launcher"));
    };
    match client.launch(lease) {
        Ok(Ok(pid)) => Ok(pid),
        Ok(Err(refused)) => Err(io::Error::other(refused)),
        Err(e) => {
            // Whatever went wrong, this launcher is not trusted again.
            tracing::warn!(
                "the shim launcher failed: {e}; shims are started by executing the binary for \
                 the next {}s",
                RETRY_AFTER.as_secs()
            );
            launchers.insert(state_dir.to_path_buf(), Slot::Down(Instant::now()));
            Err(e)
        }
    }
}
