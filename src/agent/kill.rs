//! Ending a run (invariant 4): SIGTERM to the agent's whole process group, a grace period, then
//! SIGKILL, and waiting until the group is really empty.

use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::{getpgrp, Pid};

use super::liveness::group_alive;

/// How often the group is polled while waiting.
const POLL: Duration = Duration::from_millis(25);
/// How long to wait for the group to vanish after SIGKILL (a process in uninterruptible sleep
/// dies only when its I/O returns).
const AFTER_KILL: Duration = Duration::from_secs(30);

/// What `terminate_group` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KillOutcome {
    /// The group is empty (no non-zombie member) now. False also when the call was refused.
    pub terminated: bool,
    /// SIGTERM was not enough within the grace: the group got SIGKILL.
    pub killed: bool,
}

/// Sends SIGTERM (and SIGCONT, so a stopped process can act on it) to process group `pgid`, waits
/// up to `grace` for it to empty, then SIGKILLs the group and waits until it is gone.
///
/// Refuses (returns `terminated: false, killed: false` and signals nothing) for `pgid <= 1` and
/// for the caller's own process group. An already empty group returns `terminated: true`.
pub async fn terminate_group(pgid: i32, grace: Duration) -> KillOutcome {
    let mut t = Termination::start(pgid, grace);
    loop {
        match t.step(Instant::now()) {
            Step::Done(outcome) => return outcome,
            Step::CheckAt(at) => tokio::time::sleep_until(at.into()).await,
        }
    }
}

/// [`terminate_group`] as a state machine, for a caller with an event loop of its own (the shim
/// keeps reaping its agent and renewing its Lease meanwhile): [`Termination::start`] sends the
/// SIGTERM, and [`Termination::step`] is called whenever the time it asked for has come.
#[derive(Debug)]
pub struct Termination {
    pgid: i32,
    deadline: Instant,
    killed: bool,
    done: Option<KillOutcome>,
}

/// What a [`Termination`] needs next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Finished: the group is empty, it outlived SIGKILL's wait, or the call was refused.
    Done(KillOutcome),
    /// Call [`Termination::step`] again at this time (or earlier).
    CheckAt(Instant),
}

impl Termination {
    /// Sends SIGTERM and SIGCONT to the group, unless it is empty already or the call is refused
    /// (see [`terminate_group`]); then the first step is `Done`.
    pub fn start(pgid: i32, grace: Duration) -> Termination {
        let mut t = Termination {
            pgid,
            deadline: Instant::now() + grace,
            killed: false,
            done: None,
        };
        if pgid <= 1 || Pid::from_raw(pgid) == getpgrp() {
            tracing::warn!(pgid, "refusing to signal process group");
            t.done = Some(KillOutcome::default());
        } else if !group_alive(pgid) {
            t.done = Some(KillOutcome {
                terminated: true,
                killed: false,
            });
        } else {
            let group = Pid::from_raw(pgid);
            let _ = killpg(group, Signal::SIGTERM);
            let _ = killpg(group, Signal::SIGCONT);
        }
        t
    }

    /// Looks at the group: done once it is empty; SIGKILL once the grace is over; gives up
    /// [`AFTER_KILL`] after that. Once done, it stays done.
    pub fn step(&mut self, now: Instant) -> Step {
        if let Some(outcome) = self.done {
            return Step::Done(outcome);
        }
        if !group_alive(self.pgid) {
            return self.finish(true);
        }
        if now >= self.deadline {
            if self.killed {
                return self.finish(false);
            }
            tracing::info!(
                pgid = self.pgid,
                "process group outlived SIGTERM; sending SIGKILL"
            );
            let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGKILL);
            self.killed = true;
            self.deadline = now + AFTER_KILL;
        }
        Step::CheckAt((now + POLL).min(self.deadline))
    }

    fn finish(&mut self, terminated: bool) -> Step {
        let outcome = KillOutcome {
            terminated,
            killed: self.killed,
        };
        self.done = Some(outcome);
        Step::Done(outcome)
    }
}
