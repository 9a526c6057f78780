//! The shim: owns one agent process, renews its Lease and records how it ended.
//!
//! `tinyscheduler shim --lease NAME` is started detached by the lease controller (see
//! [`super::spawn::spawn_shim`]). It
//!
//! 1. claims the Lease: only a `Pending` Lease is run, and only by the one shim that holds its
//!    claim (a lock on the Lease's byte of `<state>/claims.lock`, see [`super::claim`]), taken
//!    before anything starts and held until the shim exits;
//! 2. renders the Agent's argv template, opens `<state>/logs/<task>/<attempt>.log` and starts the
//!    agent in its own process group (pgid = agent pid) with a minimal environment;
//! 3. records `phase: Running` with pid, start time, pgid, host, times and the log path, and renews
//!    `renewTime` every `heartbeatSeconds`; the Running record waits [`quick_exit`] (5 ms), so that
//!    a run that has ended by then is recorded once, as Completed with all of that;
//! 4. when the agent exits, terminates what is left of its process group, appends
//!    `[tinyscheduler] exited with code N` to the log and records `phase: Completed` with the exit
//!    code or signal and `finishTime`.
//!
//! A program that cannot be started is recorded as Completed with exit code 127 (126 when it is
//! not executable) and a message. SIGHUP and SIGPIPE are ignored; SIGTERM or SIGINT to the shim
//! terminates the agent's group (SIGTERM, grace, SIGKILL) and the result is recorded.
//!
//! A run belongs to its Lease. When a write finds the Lease deleted (`delete lease NAME`), or
//! replaced by a new Lease of the same name (compared by uid), the shim terminates the agent's
//! group the same way, never writes into the new Lease, and exits: a run without its Lease must
//! not go on beside the task's next attempt (invariant 1), also when the Lease went before the
//! agent started, or while no scheduler runs. A state directory that is gone altogether (a
//! lost mount) is not a deletion: the shim keeps supervising.
//!
//! A relative `workingDir` is resolved against the state directory's parent (for the default
//! `./state` that is the directory the scheduler runs in), so it does not depend on where the
//! scheduler happened to be started; without `workingDir` the agent inherits the shim's working
//! directory, which is the scheduler's.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal};

use super::claim::Claim;
use super::kill::{KillOutcome, Step, Termination};
use super::liveness::start_time_of;
use super::signal_pipe::Signals;
use super::template::render;
use crate::cli::args::{Globals, ShimArgs};
use crate::cli::{CliError, CliResult};
use crate::resources::agent::default_goose_command;
use crate::resources::meta::{now_rfc3339, now_rfc3339_micros};
use crate::resources::task::TINYTASK_ID_ANNOTATION;
use crate::resources::validate::{validate_name, MAX_SECONDS};
use crate::resources::{Agent, Lease, LeasePhase, Resource, Task};
use crate::store::fsio::ensure_private_dir;
use crate::store::Store;

/// Environment variable with the Goose binary used by the default command.
pub const GOOSE_BIN_ENV: &str = "TINYSCHEDULER_GOOSE_BIN";
/// Environment variable with the grace (seconds) between SIGTERM and SIGKILL.
pub const KILL_GRACE_ENV: &str = "TINYSCHEDULER_KILL_GRACE_SEC";
/// Default grace between SIGTERM and SIGKILL.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(10);
/// Environment variable with how long (milliseconds) the shim waits before recording a run as
/// Running; `0` records it at once.
pub const QUICK_EXIT_ENV: &str = "TINYSCHEDULER_QUICK_EXIT_MS";
/// How long after starting the agent the shim waits before it records the run as Running. A run
/// that has ended by then (a quick script, an agent that fails at once) is recorded with one
/// durable write of its Lease instead of two (of the eight durable writes a short run cost).
pub const DEFAULT_QUICK_EXIT: Duration = Duration::from_millis(5);

/// The wait before the Running record, from `TINYSCHEDULER_QUICK_EXIT_MS` (default 5 ms).
pub fn quick_exit() -> Duration {
    std::env::var(QUICK_EXIT_ENV)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_QUICK_EXIT)
}

/// PATH given to agents when the shim has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Where the output of one run goes: `<state>/logs/<task>/<attempt>.log`.
pub fn log_path(state_dir: &Path, task: &str, attempt: i64) -> PathBuf {
    state_dir
        .join("logs")
        .join(task)
        .join(format!("{attempt}.log"))
}

/// Removes every run log of `task` (`<state>/logs/<task>`), as when the Task is deleted; none
/// is fine. The error names the directory.
pub fn remove_logs(state_dir: &Path, task: &str) -> io::Result<()> {
    let dir = state_dir.join("logs").join(task);
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display())))
        }
        _ => Ok(()),
    }
}

/// The kill grace from `TINYSCHEDULER_KILL_GRACE_SEC` (default 10 s). The scheduler checked the
/// value before it started this shim; a shim started by hand with a bad one uses the default.
pub fn kill_grace() -> Duration {
    std::env::var(KILL_GRACE_ENV)
        .ok()
        .and_then(|s| crate::config::parse_seconds(&s))
        .unwrap_or(DEFAULT_KILL_GRACE)
}

/// Entry point of `tinyscheduler shim --lease NAME`.
pub fn main(g: &Globals, args: ShimArgs) -> CliResult {
    // Out of the scheduler's session and process group before anything else, so that a terminal's
    // Ctrl-C or hangup and a kill of the scheduler's group leave the run alone (invariant 7). The
    // scheduler does not do this between fork and exec so that it can spawn without forking. It
    // fails only for a process-group leader, which a shim started by hand may be: then it stays.
    let _ = nix::unistd::setsid();
    // Every disposition back to its default: one ignored by whoever started the scheduler (a
    // shell's background job ignores SIGINT and SIGQUIT, `nohup` SIGHUP) would stay ignored in
    // the agent across exec. The handlers the shim needs are installed below.
    for sig in Signal::iterator() {
        if !matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
            // SAFETY: the default disposition, before any other thread exists.
            let _ = unsafe { nix::sys::signal::signal(sig, SigHandler::SigDfl) };
        }
    }
    // A vanished parent or terminal must not take the run down with it. SIGHUP gets a handler
    // that does nothing rather than SIG_IGN: a handled signal is back to its default in the agent
    // after exec, an ignored one would stay ignored there. (SIGPIPE is ignored by the Rust runtime
    // and reset to its default for every child by the standard library.)
    let hup = SigAction::new(
        SigHandler::Handler(ignore_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: installing a handler that does nothing, before any other thread exists.
    unsafe {
        let _ = nix::sys::signal::sigaction(Signal::SIGHUP, &hup);
        let _ = nix::sys::signal::signal(Signal::SIGPIPE, SigHandler::SigIgn);
    }
    let signals = Signals::take()
        .map_err(|e| CliError(format!("error: cannot set up signal handling: {e}")))?;
    let state_dir = std::path::absolute(&g.state_dir)
        .map_err(|e| CliError(format!("error: {}: {e}", g.state_dir.display())))?;
    supervise(state_dir, args.lease, &signals)
}

extern "C" fn ignore_signal(_: nix::libc::c_int) {}

/// Everything about the started agent that goes into the Lease status.
#[derive(Clone)]
struct RunInfo {
    uid: String,
    pid: i32,
    start_time: Option<u64>,
    shim_pid: i32,
    shim_start_time: Option<u64>,
    host: String,
    acquire_time: String,
    log_path: String,
}

/// How the run ended, as recorded.
struct Outcome {
    exit_code: Option<i32>,
    signal: Option<i32>,
    message: String,
}

fn supervise(state_dir: PathBuf, lease_name: String, signals: &Signals) -> CliResult {
    let store = Store::open(&state_dir)?;
    // Held until this shim exits: the Lease's claim, and its run's (see [`claim`]).
    let Some((lease, _claim, _run_claim)) = claim(&store, &state_dir, &lease_name)? else {
        return Ok(ExitCode::SUCCESS);
    };
    let uid = lease.metadata.uid.clone();
    let attempt = lease.spec.attempt;

    // The log first, so that a failure to start can be written into it.
    let log = match validate_name(&lease.spec.task) {
        Ok(()) => {
            let path = log_path(&state_dir, &lease.spec.task, attempt);
            match open_log(&path) {
                Ok(f) => Ok((path, f)),
                Err(e) => Err(format!("cannot open log file {}: {e}", path.display())),
            }
        }
        Err(e) => Err(format!("invalid task name {:?}: {e}", lease.spec.task)),
    };
    let (path, mut log) = match log {
        Ok(x) => x,
        Err(msg) => {
            record_not_started(&store, &lease_name, &uid, 127, &msg, None);
            return Ok(ExitCode::SUCCESS);
        }
    };

    let prepared = prepare(&store, &state_dir, &lease);
    let (argv, env, workdir, heartbeat) = match prepared {
        Ok(p) => p,
        Err(msg) => {
            record_not_started(&store, &lease_name, &uid, 127, &msg, Some(&mut log));
            return Ok(ExitCode::SUCCESS);
        }
    };

    let mut child = match start_agent(&argv, &env, workdir.as_deref(), &log) {
        Ok(c) => c,
        Err(e) => {
            let code = match e.raw_os_error() {
                Some(nix::libc::EACCES) | Some(nix::libc::EPERM) | Some(nix::libc::ENOEXEC) => 126,
                _ if e.kind() == io::ErrorKind::PermissionDenied => 126,
                _ => 127,
            };
            let msg = format!("cannot start {:?}: {e}", argv[0]);
            record_not_started(&store, &lease_name, &uid, code, &msg, Some(&mut log));
            return Ok(ExitCode::SUCCESS);
        }
    };
    let pid = child.id() as i32;
    let me = std::process::id() as i32;
    let info = RunInfo {
        uid,
        pid,
        start_time: start_time_of(pid),
        shim_pid: me,
        shim_start_time: start_time_of(me),
        host: super::hostname(),
        acquire_time: now_rfc3339_micros(),
        log_path: path.display().to_string(),
    };
    // The Lease's duration was set from the Agent's heartbeat when it was made; an Agent changed
    // since must not make this shim renew less often than that duration needs.
    let heartbeat = match lease.spec.lease_duration_seconds / 3 {
        from_lease if from_lease > 0 => heartbeat.min(from_lease),
        _ => heartbeat,
    };
    // Clamped: a hand-written Agent's heartbeat past the clock's range must not panic the shim.
    let period = Duration::from_secs(heartbeat.clamp(1, MAX_SECONDS) as u64);
    let grace = kill_grace();
    // The Running record waits for [`quick_exit`] (at most a heartbeat): a run that has ended by
    // then is recorded once, as Completed with everything Running would have said.
    let mut running_recorded = false;
    let mut next_write = Instant::now() + quick_exit().min(period);
    // Between writes, a look every second whether the Lease was deleted (one `lstat`), so that a
    // run whose Lease is gone ends soon, not at the next heartbeat.
    let mut lease_seen = None;
    let mut next_look = Instant::now() + LEASE_LOOK;
    // A SIGTERM or SIGINT to the shim, or the Lease gone, terminates the agent's group: why, and
    // how far that has got. Only the first cause counts.
    let mut forwarded: Option<(Stop, Termination)> = None;

    let status: io::Result<ExitStatus> = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Ok(st),
            Ok(None) => {}
            Err(e) => break Err(e),
        }
        let now = Instant::now();
        if now >= next_write {
            let held = record_running(&store, &lease_name, &info, &mut running_recorded);
            if let (Held::Lost(why), None) = (held, &forwarded) {
                let _ = writeln!(log, "{}", lease_lost_line(&lease_name, why));
                tracing::warn!(lease = %lease_name, "{why}: terminating the agent's group");
                forwarded = Some((Stop::LeaseLost(why), Termination::start(pid, grace)));
            }
            next_write = Instant::now() + period;
        } else if now >= next_look {
            let lost = forwarded
                .is_none()
                .then(|| lease_lost(&store, &lease_name, &info.uid, &mut lease_seen))
                .flatten();
            if let Some(why) = lost {
                let _ = writeln!(log, "{}", lease_lost_line(&lease_name, why));
                tracing::warn!(lease = %lease_name, "{why}: terminating the agent's group");
                forwarded = Some((Stop::LeaseLost(why), Termination::start(pid, grace)));
            }
            next_look = Instant::now() + LEASE_LOOK;
        }
        let mut wake = next_write.min(next_look);
        if let Some((_, t)) = &mut forwarded {
            if let Step::CheckAt(at) = t.step(now) {
                wake = wake.min(at);
            }
        }
        if let Some(sig) = signals.wait(wake) {
            if forwarded.is_none() {
                forwarded = Some((Stop::Signal(sig), Termination::start(pid, grace)));
            }
        }
    };

    // Whatever the agent left behind in its group goes with it. The Lease is renewed meanwhile:
    // a group that takes its grace to end must not get a finished run reclaimed as silent.
    let mut renew = || {
        record_running(&store, &lease_name, &info, &mut running_recorded);
    };
    let forwarded =
        forwarded.map(|(sig, t)| (sig, finish_termination(t, next_write, period, &mut renew)));
    let leftovers = if forwarded.is_none() && super::liveness::group_alive(pid) {
        let t = Termination::start(pid, grace);
        Some(finish_termination(t, next_write, period, &mut renew))
    } else {
        None
    };

    let mut outcome = match &status {
        Ok(st) => match (st.code(), st.signal()) {
            (Some(code), _) => Outcome {
                exit_code: Some(code),
                signal: None,
                message: format!("exited with code {code}"),
            },
            (None, Some(sig)) => Outcome {
                exit_code: None,
                signal: Some(sig),
                message: format!("exited with signal {sig} ({})", signal_name(sig)),
            },
            _ => Outcome {
                exit_code: None,
                signal: None,
                message: format!("exited with unknown status {st:?}"),
            },
        },
        Err(e) => Outcome {
            exit_code: None,
            signal: None,
            message: format!("lost track of the agent: {e}"),
        },
    };
    // Not fsynced: the log is visible to readers as soon as it is written, and what must survive a
    // power loss — the exit status — is recorded durably in the Lease next. An fsync here cost a
    // flush and about five disk writes per run (the new file and its new directory).
    let _ = writeln!(log, "[tinyscheduler] {}", outcome.message);
    if let Some((stop, k)) = forwarded {
        outcome.message = format!("{}; {stop}, and {}", outcome.message, describe_kill(&k));
    } else if let Some(k) = leftovers {
        outcome.message = format!(
            "{}; processes left in its group were {}",
            outcome.message,
            if k.killed {
                "killed (SIGKILL)"
            } else {
                "terminated (SIGTERM)"
            }
        );
    }
    // The run's pid, times and log go in with the result even when a Running write was made: that
    // write may have failed (a passing store error), and rewriting them changes nothing.
    record_completed(&store, &lease_name, &info.uid, Some(&info), &outcome);
    Ok(ExitCode::SUCCESS)
}

/// Steps a termination to its end, calling `renew` every `period` from `next_renew` on.
fn finish_termination(
    mut t: Termination,
    mut next_renew: Instant,
    period: Duration,
    renew: &mut impl FnMut(),
) -> KillOutcome {
    loop {
        let now = Instant::now();
        if now >= next_renew {
            renew();
            next_renew = now + period;
        }
        match t.step(now) {
            Step::Done(outcome) => return outcome,
            Step::CheckAt(at) => {
                std::thread::sleep(at.min(next_renew).saturating_duration_since(Instant::now()))
            }
        }
    }
}

fn describe_kill(k: &KillOutcome) -> &'static str {
    match (k.terminated, k.killed) {
        (true, false) => "the shim terminated the agent's process group (SIGTERM)",
        (true, true) => {
            "the shim killed the agent's process group (SIGKILL after the grace period)"
        }
        (false, _) => "the shim could not empty the agent's process group",
    }
}

/// Why the shim ended its agent before the agent ended by itself.
#[derive(Clone, Copy)]
enum Stop {
    /// The shim received this signal (SIGTERM or SIGINT).
    Signal(&'static str),
    /// The run's Lease was deleted or replaced (says which).
    LeaseLost(&'static str),
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Signal(sig) => write!(f, "the shim received {sig}"),
            Stop::LeaseLost(why) => write!(f, "its Lease {why}"),
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    Signal::try_from(sig)
        .map(|s| s.as_str())
        .unwrap_or("unknown")
}

/// Claims the Lease for this shim. `None`: nothing to run (gone, not Pending, or another live shim
/// holds its claim). Two claims are taken, and held for as long as they live: the Lease's, and
/// its run's ([`super::claim::run_key`]: one attempt of one Task). While the run claim is held,
/// reclaim does not requeue the run even when its Lease is deleted (this shim ends the agent
/// itself then), and the assignment loop does not make the same attempt again. Both are taken
/// before the Lease is read once more: a run claim taken after that read would leave a moment in
/// which the Lease could be deleted and the attempt made again with no claim to say this shim is
/// about to start it. Already held: a shim of this attempt under an earlier Lease (deleted before
/// its Task showed it) still runs; nothing starts beside it, and the Lease stays Pending for a
/// later shim.
fn claim(
    store: &Store,
    state_dir: &Path,
    name: &str,
) -> Result<Option<(Lease, Claim, Claim)>, CliError> {
    let Some(lease) = store.try_get::<Lease>(name)? else {
        return Ok(None);
    };
    if lease.status.phase != LeasePhase::Pending {
        return Ok(None);
    }
    let claims_error = |e: io::Error| {
        CliError(format!(
            "error: {}: {e}",
            super::claim::claims_path(state_dir).display()
        ))
    };
    let Some(claim) = Claim::acquire(state_dir, &lease.metadata.uid).map_err(claims_error)? else {
        return Ok(None);
    };
    let spec = &lease.spec;
    let run_key = super::claim::run_key(&spec.task, &spec.task_uid, spec.attempt);
    let Some(run_claim) = Claim::acquire(state_dir, &run_key).map_err(claims_error)? else {
        tracing::warn!(lease = %name, attempt = spec.attempt, "a shim of this attempt still runs; starting nothing");
        return Ok(None);
    };
    // Read again under the claims: a shim that held them a moment ago may have run the Lease.
    match store.try_get::<Lease>(name)? {
        Some(l)
            if l.metadata.uid == lease.metadata.uid && l.status.phase == LeasePhase::Pending =>
        {
            Ok(Some((l, claim, run_claim)))
        }
        _ => Ok(None),
    }
}

type Prepared = (Vec<String>, Vec<(String, String)>, Option<PathBuf>, i64);

/// Reads the Task and Agent, renders the argv, builds the environment and the working directory.
fn prepare(store: &Store, state_dir: &Path, lease: &Lease) -> Result<Prepared, String> {
    let task = store
        .try_get::<Task>(&lease.spec.task)
        .map_err(|e| format!("cannot read task {:?}: {e}", lease.spec.task))?
        .ok_or_else(|| format!("task {:?} not found", lease.spec.task))?;
    if !lease.spec.runs(&task) {
        return Err(format!(
            "task {:?} was deleted; the task now of that name is another one",
            lease.spec.task
        ));
    }
    let agent = store
        .try_get::<Agent>(&lease.spec.agent)
        .map_err(|e| format!("cannot read agent {:?}: {e}", lease.spec.agent))?
        .ok_or_else(|| format!("agent {:?} not found", lease.spec.agent))?;

    let params: BTreeMap<String, String> = task
        .spec
        .params
        .iter()
        .map(|(k, v)| (k.clone(), param_string(v)))
        .collect();
    let mut vars = BTreeMap::new();
    vars.insert("task.name".to_string(), task.name().to_string());
    let id = task
        .metadata
        .annotations
        .get(TINYTASK_ID_ANNOTATION)
        .cloned()
        .unwrap_or_else(|| task.name().to_string());
    vars.insert("task.id".to_string(), id);
    for (k, v) in &params {
        vars.insert(format!("task.params.{k}"), v.clone());
    }
    vars.insert("agent.name".to_string(), agent.name().to_string());
    vars.insert("lease.name".to_string(), lease.name().to_string());
    vars.insert("attempt".to_string(), lease.spec.attempt.to_string());

    let template = if agent.spec.command.is_empty() {
        let goose = std::env::var(GOOSE_BIN_ENV)
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "goose".to_string());
        default_goose_command(&goose)
    } else {
        agent.spec.command.clone()
    };
    let argv = render(&template, &vars).map_err(|e| format!("bad command template: {e}"))?;
    if argv.first().is_none_or(|a| a.is_empty()) {
        return Err("the command is empty".into());
    }

    // One value per name, so that the program is looked up in the PATH the agent gets; the
    // Agent's env is set last and overrides the rest (docs/manifests.md).
    let mut env: BTreeMap<String, String> = BTreeMap::from([
        (
            "PATH".into(),
            std::env::var("PATH")
                .ok()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| DEFAULT_PATH.into()),
        ),
        ("HOME".into(), home_dir()),
    ]);
    let own: Vec<(String, String)> = vec![
        ("TINYSCHEDULER_TASK".into(), task.name().to_string()),
        ("TINYSCHEDULER_LEASE".into(), lease.name().to_string()),
        (
            "TINYSCHEDULER_ATTEMPT".into(),
            lease.spec.attempt.to_string(),
        ),
        ("TINYSCHEDULER_AGENT".into(), agent.name().to_string()),
    ];
    env.extend(own);
    for (k, v) in &params {
        env.insert(crate::resources::task::param_env_name(k), v.clone());
    }
    for (k, v) in &agent.spec.env {
        env.insert(k.clone(), v.clone());
    }
    let env: Vec<(String, String)> = env.into_iter().collect();

    let workdir = match agent.spec.working_dir.as_deref().filter(|w| !w.is_empty()) {
        None => None,
        Some(w) => {
            let base = state_dir.parent().unwrap_or(Path::new("/"));
            let dir = base.join(w);
            if !dir.is_dir() {
                return Err(format!(
                    "working directory {} does not exist or is not a directory",
                    dir.display()
                ));
            }
            Some(dir)
        }
    };
    Ok((argv, env, workdir, agent.spec.heartbeat_seconds))
}

/// A param as text: strings as they are, other scalars in JSON notation, null as empty.
fn param_string(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn home_dir() -> String {
    if let Some(h) = std::env::var("HOME").ok().filter(|s| !s.is_empty()) {
        return h;
    }
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.dir.display().to_string())
        .unwrap_or_else(|| "/".into())
}

/// Opens (appending, creating 0600 in 0700 directories) a run's log file. Only a regular file
/// with no other name is taken: a symlink (`O_NOFOLLOW`), a FIFO (opened without blocking, so
/// that a FIFO with no reader does not hang the shim while it holds the run's claim), a device,
/// or a hard link to a file elsewhere (the agent's output would land in it) is refused.
fn open_log(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        ensure_private_dir(dir)?;
    }
    let refuse = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what}; the log must be a file of its own"),
        )
    };
    // Looked at first for a clear message (a FIFO without a reader would fail to open with
    // "No such device or address"); checked again on what was opened.
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_file() => return Err(refuse("not a regular file")),
        _ => {}
    }
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)?;
    let m = file.metadata()?;
    if !m.file_type().is_file() {
        return Err(refuse("not a regular file"));
    }
    if std::os::unix::fs::MetadataExt::nlink(&m) != 1 {
        return Err(refuse("the file has other names (a hard link)"));
    }
    // Back to blocking writes, as the agent expects of its stdout.
    nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&file),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_APPEND),
    )
    .map_err(io::Error::from)?;
    Ok(file)
}

/// Starts the agent in its own process group with exactly `env`, stdin from /dev/null and
/// stdout + stderr appended to the log.
fn start_agent(
    argv: &[String],
    env: &[(String, String)],
    workdir: Option<&Path>,
    log: &File,
) -> io::Result<Child> {
    // A bare name is looked up in the agent's PATH here rather than by the standard library:
    // given a program to search for and a PATH of the child's own, it forks the shim and runs
    // execvp in the child instead of using posix_spawn.
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str());
    let mut cmd = match path.and_then(|p| find_in_path(&argv[0], p)) {
        Some(program) => {
            let mut c = Command::new(program);
            c.arg0(&argv[0]);
            c
        }
        None => Command::new(&argv[0]),
    };
    cmd.args(&argv[1..])
        .env_clear()
        .envs(
            env.iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log.try_clone()?);
    if let Some(w) = workdir {
        cmd.current_dir(w);
    }
    // Its own process group (pgid = its pid), set by posix_spawn (the program is a path, see
    // above): no fork of the shim, and no code of ours runs in the child. The shim unblocked
    // every signal (`Signals::take`), so the agent's mask is empty, and handled signals go back to
    // their defaults on exec.
    cmd.process_group(0);
    cmd.spawn()
}

/// Where `execvp` would find `name` on `path`: the first regular file there that this process may
/// execute. `None` when `name` has a slash (it is a path already), when nothing is found (the
/// caller lets the exec report why), or when a relative or empty PATH entry comes first (that
/// depends on the working directory the agent will have).
pub fn find_in_path(name: &str, path: &str) -> Option<PathBuf> {
    if name.is_empty() || name.contains('/') {
        return None;
    }
    for dir in path.split(':') {
        if !dir.starts_with('/') {
            return None;
        }
        let candidate = Path::new(dir).join(name);
        if super::spawn::is_executable(&candidate) {
            return Some(candidate);
        }
    }
    None
}

/// The line a shim appends to its run's log when it ends the agent because its Lease is gone.
fn lease_lost_line(lease: &str, why: &str) -> String {
    format!("[tinyscheduler] lease/{lease} {why}{LEASE_LOST_END}")
}

const LEASE_LOST_END: &str = ": terminating the agent";

/// Whether the run log at `path` says that its shim ended the agent of Lease `lease` because the
/// Lease was gone: that run started. Only the log's end is read (the line is among the last).
pub fn log_says_lease_lost(path: &Path, lease: &str) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = File::open(path) else {
        return false;
    };
    let tail = 16 * 1024;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if f.seek(SeekFrom::Start(len.saturating_sub(tail))).is_err() {
        return false;
    }
    let mut buf = Vec::new();
    if f.take(tail).read_to_end(&mut buf).is_err() {
        return false;
    }
    let start = format!("[tinyscheduler] lease/{lease} ");
    String::from_utf8_lossy(&buf)
        .lines()
        .any(|l| l.starts_with(&start) && l.ends_with(LEASE_LOST_END))
}

/// How often a shim looks whether its Lease was deleted between heartbeats.
const LEASE_LOOK: Duration = Duration::from_secs(1);

/// Why the run's Lease is no longer there, from a look at its file (see [`held`]): gone, or,
/// when the file changed since the last look (`seen`), read and found to be another Lease of the
/// name (deleted and made anew meanwhile).
fn lease_lost(
    store: &Store,
    name: &str,
    uid: &str,
    seen: &mut Option<crate::store::fsio::FileId>,
) -> Option<&'static str> {
    let found =
        match crate::store::fsio::FileId::at(&store.object_path(Lease::PLURAL, name)).ok()? {
            None => None,
            Some(id) if *seen == Some(id) => return None,
            Some(id) => {
                *seen = Some(id);
                store.try_get::<Lease>(name).ok()?
            }
        };
    match held(store, found.as_ref(), uid) {
        Held::Lost(why) => Some(why),
        Held::Kept => None,
    }
}

/// Whether the run's Lease was there for a write.
enum Held {
    /// The write went into the run's Lease, or could not be made (the next heartbeat tries again).
    Kept,
    /// The Lease is gone: deleted, or replaced by a new Lease of its name (says which).
    Lost(&'static str),
}

/// Writes the Running status, or renews it once `recorded`; a failure is logged (the next
/// heartbeat tries again). A Lease missing from a Lease directory that is there was deleted; one
/// missing with its directory is a state directory that is gone, which says nothing of the run.
fn record_running(store: &Store, lease: &str, info: &RunInfo, recorded: &mut bool) -> Held {
    let written = store.patch_status::<Lease>(lease, |l| mark_running(l, info));
    let renewing = std::mem::replace(recorded, true);
    match written {
        Ok(found) => held(store, found.as_ref(), &info.uid),
        Err(e) => {
            let what = if renewing {
                "renew"
            } else {
                "record the running agent"
            };
            tracing::warn!(lease, "cannot {what}: {e}");
            Held::Kept
        }
    }
}

/// Whether `found`, what the store has under the run's Lease name, is still the run's Lease (uid
/// `uid`). Nothing there counts as deleted only while the kind's directory is there: a state
/// directory gone whole is a lost mount, and the run goes on.
fn held(store: &Store, found: Option<&Lease>, uid: &str) -> Held {
    match found {
        Some(l) if l.metadata.uid == uid => Held::Kept,
        Some(_) => Held::Lost("was replaced by a new Lease of its name"),
        None if store.kind_dir(Lease::PLURAL).is_dir() => Held::Lost("was deleted"),
        None => Held::Kept,
    }
}

/// Fills in the Running status (idempotent: also used to renew). Never touches a different Lease
/// of the same name, nor one already Completed.
fn mark_running(l: &mut Lease, info: &RunInfo) {
    if l.metadata.uid != info.uid || l.status.phase == LeasePhase::Completed {
        return;
    }
    let s = &mut l.status;
    if s.phase == LeasePhase::Pending {
        s.phase = LeasePhase::Running;
    }
    s.pid = Some(info.pid);
    s.process_start_time = info.start_time;
    s.pgid = Some(info.pid);
    s.shim_pid = Some(info.shim_pid);
    s.shim_start_time = info.shim_start_time;
    s.host = Some(info.host.clone());
    s.boot_id = Some(crate::store::revision::boot_id().to_string()).filter(|b| !b.is_empty());
    if s.acquire_time.is_none() {
        s.acquire_time = Some(info.acquire_time.clone());
    }
    s.renew_time = Some(now_rfc3339_micros());
    s.log_path = Some(info.log_path.clone());
}

/// Records that nothing could be started.
fn record_not_started(
    store: &Store,
    lease: &str,
    uid: &str,
    code: i32,
    message: &str,
    log: Option<&mut File>,
) {
    if let Some(log) = log {
        let _ = writeln!(log, "[tinyscheduler] {message}");
        let _ = writeln!(log, "[tinyscheduler] exited with code {code}");
    }
    let outcome = Outcome {
        exit_code: Some(code),
        signal: None,
        message: message.to_string(),
    };
    record_completed(store, lease, uid, None, &outcome);
}

/// How long a shim keeps trying to record its agent's exit when the store refuses the write (a
/// full or read-only disk). The reclaim controller waits this long, and a little more, before it
/// reclaims a run whose agent has exited and whose shim is still alive (`reclaim::record_grace`).
pub const RECORD_GIVE_UP: Duration = Duration::from_secs(120);

/// Writes `phase: Completed` durably, retrying store errors for [`RECORD_GIVE_UP`]: the exit
/// status must not be lost (invariant 7). A Lease that is gone (or replaced) is left alone.
/// `started`: the agent that ran, whose pid, times and log go into the same write (`None`: none
/// was started).
fn record_completed(
    store: &Store,
    lease: &str,
    uid: &str,
    started: Option<&RunInfo>,
    outcome: &Outcome,
) {
    let finish = now_rfc3339();
    let mut delay = Duration::from_millis(100);
    let give_up = Instant::now() + RECORD_GIVE_UP;
    loop {
        let res = store.patch_status::<Lease>(lease, |l| {
            if l.metadata.uid != uid {
                return;
            }
            if let Some(info) = started {
                mark_running(l, info);
            }
            let s = &mut l.status;
            // A Lease being reclaimed stays the reclaim controller's: the exit status goes in,
            // but the phase and the reclaim's reason stay, so that the attempt is recorded as
            // reclaimed, once the reclaim has emptied the group (invariant 4).
            if s.phase != LeasePhase::Terminating {
                s.phase = LeasePhase::Completed;
                s.message = Some(outcome.message.clone());
            }
            s.exit_code = outcome.exit_code;
            s.signal = outcome.signal;
            s.finish_time = Some(finish.clone());
        });
        match res {
            Ok(_) => return,
            Err(e) if Instant::now() + delay < give_up => {
                tracing::warn!(lease, "cannot record completion (will retry): {e}");
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                tracing::error!(
                    lease,
                    "cannot record completion, giving up after {}s: {e}",
                    RECORD_GIVE_UP.as_secs()
                );
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::lease::test_lease;
    use std::os::unix::fs::PermissionsExt;

    fn run_info(uid: &str) -> RunInfo {
        RunInfo {
            uid: uid.to_string(),
            pid: 1,
            start_time: None,
            shim_pid: 1,
            shim_start_time: None,
            host: "here".into(),
            acquire_time: now_rfc3339(),
            log_path: "/dev/null".into(),
        }
    }

    #[test]
    fn a_write_tells_a_deleted_or_replaced_lease_from_a_state_directory_that_is_gone() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path().join("state")).unwrap();
        let ours = store.create(&test_lease("t", "a", 1)).unwrap();
        let info = run_info(&ours.metadata.uid);
        let mut recorded = false;
        let held = record_running(&store, "t", &info, &mut recorded);
        assert!(matches!(held, Held::Kept) && recorded);

        store.delete::<Lease>("t", None).unwrap();
        let fresh = store.create(&test_lease("t", "a", 2)).unwrap();
        let held = record_running(&store, "t", &info, &mut recorded);
        assert!(
            matches!(held, Held::Lost(why) if why.contains("replaced")),
            "a new Lease of the name"
        );
        assert_eq!(store.get::<Lease>("t").unwrap(), fresh, "left untouched");

        store.delete::<Lease>("t", None).unwrap();
        let held = record_running(&store, "t", &info, &mut recorded);
        assert!(matches!(held, Held::Lost("was deleted")));

        std::fs::rename(d.path().join("state/objects"), d.path().join("away")).unwrap();
        let held = record_running(&store, "t", &info, &mut recorded);
        assert!(
            matches!(held, Held::Kept),
            "no Lease directory: not a deletion"
        );
    }

    #[test]
    fn the_log_says_a_lease_was_lost_only_by_the_shims_line_for_that_lease_at_its_end() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("1.log");
        assert!(!log_says_lease_lost(&log, "t"), "no log");
        let mut text = "agent output\n".repeat(5000);
        text.push_str("[tinyscheduler] lease/other was deleted: terminating the agent\n");
        std::fs::write(&log, &text).unwrap();
        assert!(!log_says_lease_lost(&log, "t"), "another lease's line");
        text.push_str(&lease_lost_line("t", "was deleted"));
        text.push_str("\n[tinyscheduler] exited with signal 15 (SIGTERM)\n");
        std::fs::write(&log, &text).unwrap();
        assert!(text.len() > 16 * 1024);
        assert!(log_says_lease_lost(&log, "t"));
        std::fs::write(&log, "echo [tinyscheduler] lease/t was deleted\n").unwrap();
        assert!(
            !log_says_lease_lost(&log, "t"),
            "agent output that only looks alike"
        );
    }

    fn file(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn a_bare_name_is_found_in_the_first_path_entry_that_has_it_executable() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        file(&a, "agent", 0o644);
        let want = file(&b, "agent", 0o755);
        let path = format!("{}:{}", a.display(), b.display());
        assert_eq!(find_in_path("agent", &path), Some(want));
        assert_eq!(find_in_path("missing", &path), None);
    }

    #[test]
    fn a_path_or_a_relative_path_entry_is_left_to_the_exec() {
        let d = tempfile::tempdir().unwrap();
        file(d.path(), "agent", 0o755);
        let abs = d.path().display().to_string();
        assert_eq!(find_in_path("./agent", &abs), None);
        assert_eq!(find_in_path("agent", &format!("bin:{abs}")), None);
        assert_eq!(find_in_path("agent", &format!(":{abs}")), None);
    }
}
