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
    if pgid <= 1 || Pid::from_raw(pgid) == getpgrp() {
        tracing::warn!(pgid, "refusing to signal process group");
        return KillOutcome::default();
    }
    if !group_alive(pgid) {
        return KillOutcome {
            terminated: true,
            killed: false,
        };
    }
    let group = Pid::from_raw(pgid);
    let _ = killpg(group, Signal::SIGTERM);
    let _ = killpg(group, Signal::SIGCONT);
    if wait_empty(pgid, grace).await {
        return KillOutcome {
            terminated: true,
            killed: false,
        };
    }
    tracing::info!(
        pgid,
        ?grace,
        "process group outlived SIGTERM; sending SIGKILL"
    );
    let _ = killpg(group, Signal::SIGKILL);
    let terminated = wait_empty(pgid, AFTER_KILL).await;
    KillOutcome {
        terminated,
        killed: true,
    }
}

/// Polls until the group is empty (true) or `limit` passes (false).
async fn wait_empty(pgid: i32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if !group_alive(pgid) {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep(POLL.min(deadline - now)).await;
    }
}
