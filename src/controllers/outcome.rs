//! Recording how an attempt ended: the Task's outcome is written durably first, and only then is
//! the Lease deleted (invariant 3). Failed attempts are retried with exponential delay until
//! `maxRetries`, then the Task is `Failed` (invariant 6).

use std::time::SystemTime;

use super::{tinytask_sync, Ctx, Error, Summary};
use crate::resources::event::EventType;
use crate::resources::meta::{now_rfc3339, to_seconds};
use crate::resources::{Lease, TaskPhase};

/// How a run ended, from the shim's record or the reclaim controller's verdict.
#[derive(Debug, Clone)]
pub struct Ending {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Set when the run was reclaimed (killed or lost) rather than ending by itself.
    pub reclaimed: Option<String>,
    pub message: Option<String>,
    /// An agent of the attempt is known to have started though the Lease records none (reclaim
    /// found one, or its log says its shim ended it).
    pub started: bool,
}

impl Ending {
    /// What the shim recorded on a completed Lease.
    pub fn from_lease(l: &Lease) -> Ending {
        Ending {
            exit_code: l.status.exit_code,
            signal: l.status.signal,
            reclaimed: None,
            message: l.status.message.as_deref().and_then(beyond_status),
            started: false,
        }
    }

    fn succeeded(&self) -> bool {
        self.reclaimed.is_none() && self.exit_code == Some(0) && self.signal.is_none()
    }

    fn describe(&self) -> String {
        let mut s = match (&self.reclaimed, self.exit_code, self.signal) {
            (Some(r), _, _) => format!("reclaimed: {r}"),
            (None, _, Some(sig)) => match nix::sys::signal::Signal::try_from(sig) {
                Ok(name) => format!("killed by signal {sig} ({name})"),
                Err(_) => format!("killed by signal {sig}"),
            },
            (None, Some(c), None) => format!("exit code {c}"),
            (None, None, None) => "no exit status recorded".to_string(),
        };
        if let Some(m) = self.message.as_deref().filter(|m| !m.is_empty()) {
            s.push_str(&format!(" ({m})"));
        }
        s
    }
}

/// What a shim's message says beyond the exit status: its first clause ("exited with code 3",
/// "exited with signal 9 (SIGKILL)") only repeats the status, which is described anyway.
fn beyond_status(message: &str) -> Option<String> {
    if !message.starts_with("exited with ") {
        return Some(message.to_string());
    }
    message.split_once("; ").map(|(_, rest)| rest.to_string())
}

/// A retry delay as the message says it: whole seconds (rounded up) from ten seconds on, tenths
/// below (`0.2s`, not `1s`).
fn delay_text(d: std::time::Duration) -> String {
    if d >= std::time::Duration::from_secs(10) {
        format!("{}s", d.as_secs_f64().ceil() as u64)
    } else {
        let tenths = (d.as_secs_f64() * 10.0).ceil() / 10.0;
        format!("{tenths}s")
    }
}

/// Records `ending` for `lease`'s attempt on its Task, then deletes the Lease. Idempotent: an
/// attempt already recorded (a crash between the two writes) only has its Lease deleted. Returns
/// whether this call ended the attempt, false for one recorded already, so that the caller counts
/// and tells each ending once.
pub fn record(ctx: &Ctx, lease: &Lease, ending: &Ending) -> Result<bool, Error> {
    let name = &lease.metadata.name;
    let task_name = &lease.spec.task;
    let attempt = lease.spec.attempt;
    let what = ending.describe();
    if ctx.settings.dry_run {
        let verdict = if ending.succeeded() {
            "Succeeded"
        } else {
            "failed"
        };
        ctx.would(&format!(
            "record task/{task_name} attempt {attempt} {verdict}: {what}, then delete lease/{name}"
        ));
        if ending.reclaimed.is_none() {
            Summary::bump(&ctx.summary.completed);
        }
        return Ok(true);
    }

    // The Task is read once, under the store lock, by the patch: a Task that is gone, or that is
    // past this attempt, is left as it is, and the Lease deleted all the same.
    let finished = lease.status.finish_time.clone().unwrap_or_else(now_rfc3339);
    let log = lease.status.log_path.clone().unwrap_or_else(|| {
        crate::agent::shim::log_path(&ctx.state_dir, task_name, attempt)
            .display()
            .to_string()
    });
    let mut verdict = ("", String::new(), EventType::Normal);
    let mut applied = false;
    // A run that ended before its Task was made to show it (see `Settings::mirror_delay`)
    // gets its assignment and start recorded here, and its Started event before the
    // outcome's.
    let mut started_here = false;
    // Whether this attempt's agent was started: the shim records its pid and acquireTime with the
    // start (a run reclaimed without its Lease has the Task's start time), or reclaim knows.
    let started =
        lease.status.pid.is_some() || lease.status.acquire_time.is_some() || ending.started;
    // A Task deleted and created again under its name while this run went on is another Task.
    let mut replaced = false;
    let updated = ctx.patch_task(task_name, |t| {
        replaced = !lease.spec.runs(t);
        if replaced {
            applied = false;
            return;
        }
        // Checked again on the fresh object: the shim's record and a reclaim can race to
        // record one attempt, and only the first may (a later attempt's status is never
        // overwritten either).
        applied = !super::lease::past_attempt(t, attempt);
        if !applied {
            return;
        }
        // Mirroring sets the agent too; a Task that shows the Lease got it the same way.
        if !super::lease::shows_lease(t, name) {
            super::lease::mirror_assignment(t, lease);
        }
        started_here = lease.status.acquire_time.is_some() && !super::lease::shows_running(t, name);
        if started_here {
            t.status.start_time = lease.status.acquire_time.as_deref().map(to_seconds);
        }
        t.status.lease = None;
        t.status.attempts = t.status.attempts.max(attempt);
        t.status.exit_code = ending.exit_code;
        t.status.finish_time = Some(finished.clone());
        if ending.succeeded() {
            t.status.phase = TaskPhase::Succeeded;
            t.status.reason = Some("Succeeded".into());
            t.status.message = Some(format!("exited 0 on agent/{}", lease.spec.agent));
            t.status.next_attempt_after = None;
            verdict = (
                "Succeeded",
                t.status.message.clone().unwrap_or_default(),
                EventType::Normal,
            );
        } else if t.status.attempts > t.spec.max_retries {
            t.status.phase = TaskPhase::Failed;
            t.status.reason = Some(if ending.reclaimed.is_some() {
                "Reclaimed".into()
            } else {
                "BackoffLimitExceeded".into()
            });
            t.status.message = Some(format!(
                "failed after {} attempts; last: {what}",
                t.status.attempts
            ));
            t.status.next_attempt_after = None;
            verdict = (
                "Failed",
                t.status.message.clone().unwrap_or_default(),
                EventType::Warning,
            );
        } else {
            let delay = ctx.settings.retry_delay(t.status.attempts);
            let at = SystemTime::now() + delay;
            t.status.phase = TaskPhase::Pending;
            t.status.reason = Some("Retrying".into());
            // Milliseconds: whole seconds would truncate a sub-second delay to nothing and let
            // any retry start up to a second early.
            t.status.next_attempt_after = Some(humantime::format_rfc3339_millis(at).to_string());
            t.status.message = Some(format!(
                "attempt {} failed ({what}); retry {} of {} in {}",
                t.status.attempts,
                t.status.attempts,
                t.spec.max_retries,
                delay_text(delay)
            ));
            verdict = (
                "Retrying",
                t.status.message.clone().unwrap_or_default(),
                EventType::Warning,
            );
        }
        // tinytask: the result goes back to the server, queued durably with the outcome.
        if tinytask_sync::is_tinytask(t) {
            let wbs = tinytask_sync::outcome_write_backs(
                t,
                attempt,
                &lease.spec.agent,
                &what,
                &log,
                started,
            );
            t.status.write_backs.extend(wbs);
        }
    })?;
    let task_gone = updated.is_none() || replaced;
    if task_gone {
        // Deleted while it ran: a mirrored task's result still goes back to its server.
        tinytask_sync::orphan_write_back(ctx, lease, ending.succeeded(), &what)?;
    }
    if let (Some(t), true) = (updated, applied) {
        if started_here {
            ctx.event(
                &t,
                EventType::Normal,
                "Started",
                &super::lease::started_event(lease),
            );
        }
        ctx.event(&t, verdict.2, verdict.0, &verdict.1);
        // A run that ended by itself; a reclaimed one is counted as that.
        if ending.reclaimed.is_none() {
            Summary::bump(&ctx.summary.completed);
        }
    }
    ctx.delete_lease(name, &lease.metadata.uid)?;
    Ok(applied || task_gone)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_retry_delay_is_said_in_tenths_below_ten_seconds() {
        assert_eq!(delay_text(Duration::from_millis(200)), "0.2s");
        assert_eq!(delay_text(Duration::from_millis(1250)), "1.3s");
        assert_eq!(delay_text(Duration::from_secs(4)), "4s");
        assert_eq!(delay_text(Duration::from_millis(10_400)), "11s");
        assert_eq!(delay_text(Duration::from_secs(600)), "600s");
    }
}
