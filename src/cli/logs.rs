//! `tinyscheduler logs TASK [-f] [--attempt N]`: prints the output of a task's run from
//! `<state>/logs/<task>/<attempt>.log` (the latest attempt by default). Read-only: creates nothing.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use super::args::{Globals, LogsArgs};
use super::{CliError, CliResult};
use crate::resources::validate::validate_name;
use crate::resources::{Lease, LeasePhase, Task};
use crate::store::Store;

/// How often `-f` looks for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// Entry point of `tinyscheduler logs`.
pub fn logs(g: &Globals, mut a: LogsArgs) -> CliResult {
    // `task/NAME`, as get, describe and kubectl take it.
    // Anything else with a slash is no name at all, and the name check below says so.
    if let Some((kind, name)) = a.task.split_once('/') {
        match crate::resources::Kind::from_cli(kind) {
            Some(crate::resources::Kind::Task) => a.task = name.to_string(),
            Some(_) => {
                return Err(CliError(format!(
                    "error: logs are a task's: got {:?}",
                    a.task
                )))
            }
            None => {}
        }
    }
    validate_name(&a.task)
        .map_err(|e| CliError(format!("error: invalid task name {:?}: {e}", a.task)))?;
    let dir = g.state_dir.join("logs").join(&a.task);
    let mut attempts = attempts_in(&dir);
    if attempts.is_empty() {
        attempts = first_run(g, &a, &dir)?;
    }
    let attempt = match a.attempt {
        Some(n) if attempts.contains(&u64::from(n)) => u64::from(n),
        Some(n) => {
            return Err(CliError(if attempts.is_empty() {
                format!("error: no logs for task {:?}", a.task)
            } else {
                format!("error: no logs for attempt {n} of task {:?}", a.task)
            }))
        }
        None => *attempts
            .last()
            .ok_or_else(|| CliError(format!("error: no logs for task {:?}", a.task)))?,
    };
    let path = dir.join(format!("{attempt}.log"));
    let mut file = File::open(&path)
        .map_err(|e| CliError(format!("error: cannot open {}: {e}", path.display())))?;
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let result = if a.follow {
        follow(&mut file, &mut out, &g.state_dir, &a.task, attempt)
    } else {
        copy_new(&mut file, &mut out).map(|_| ())
    };
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // The reader went away (`| head`): not an error.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        Err(e) => Err(CliError(format!("error: {}: {e}", path.display()))),
    }
}

/// With no log at all: says whether the task exists and has not run, or, with `-f` (and no
/// `--attempt`), waits for its first run's log and returns its attempts then, as `kubectl logs
/// -f` would like to. Gives up when the task goes away or finishes without a run.
fn first_run(g: &Globals, a: &LogsArgs, dir: &Path) -> Result<Vec<u64>, CliError> {
    let store = Store::open_read_only(&g.state_dir);
    loop {
        let task = store.get::<Task>(&a.task)?;
        let attempts = attempts_in(dir);
        if !attempts.is_empty() {
            return Ok(attempts);
        }
        if !a.follow || a.attempt.is_some() || task.status.phase.is_finished() {
            let why = if task.status.attempts == 0 {
                "it has not run"
            } else {
                "they were removed"
            };
            return Err(CliError(format!(
                "error: task {:?} has no logs: {why} (phase {:?})",
                a.task, task.status.phase
            )));
        }
        std::thread::sleep(FOLLOW_POLL);
    }
}

/// The attempts that have a log file (`<N>.log`), ascending.
fn attempts_in(dir: &Path) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<u64> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".log")?
                .parse::<u64>()
                .ok()
        })
        .collect();
    v.sort_unstable();
    v
}

/// Copies what the file has beyond the current position; returns how many bytes.
fn copy_new(file: &mut File, out: &mut impl Write) -> io::Result<u64> {
    let mut total = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            out.flush()?;
            return Ok(total);
        }
        out.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// Prints the file as it grows until the run is over (its Lease gone, Completed, or moved on to
/// another attempt) and nothing more arrives.
fn follow(
    file: &mut File,
    out: &mut impl Write,
    state_dir: &PathBuf,
    task: &str,
    attempt: u64,
) -> io::Result<()> {
    let store = Store::open_read_only(state_dir);
    loop {
        // Look at the Lease before reading: the shim writes its last line before it records
        // Completed, so once the run is over, this read gets everything.
        let over = run_is_over(&store, task, attempt);
        let n = copy_new(file, out)?;
        if n == 0 && over {
            return Ok(());
        }
        if n == 0 {
            std::thread::sleep(FOLLOW_POLL);
        }
    }
}

fn run_is_over(store: &Store, task: &str, attempt: u64) -> bool {
    match store.try_get::<Lease>(task) {
        Ok(None) => true,
        Ok(Some(l)) => {
            l.status.phase == LeasePhase::Completed
                || u64::try_from(l.spec.attempt).ok() != Some(attempt)
        }
        // A torn or unreadable Lease: keep following; the next look decides.
        Err(_) => false,
    }
}
