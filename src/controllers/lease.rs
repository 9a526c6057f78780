//! Lease controller: starts a shim for a Lease with no process (spawning is the last step after the
//! Lease exists — invariant 1), mirrors the Lease onto its Task (Assigned, then Running; see
//! `Settings::mirror_delay`), and records the outcome of a completed one.

use std::sync::Arc;
use std::time::Duration;

use super::outcome::{self, Ending};
use super::{Ctx, Error, SpawnedShim, Summary};
use crate::agent::claim::Claim;
use crate::agent::liveness::may_exist;
use crate::agent::spawn::spawn_shim;
use crate::resources::event::EventType;
use crate::resources::meta::to_seconds;
use crate::resources::{Lease, LeasePhase, Task, TaskPhase};
use crate::runtime::controller::Action;

/// How long a started shim has to claim its Lease before the controller looks again.
const START_CHECK: Duration = Duration::from_secs(2);
/// How long a started shim that has not claimed its Lease is waited for before another is started.
const SPAWN_PATIENCE: Duration = Duration::from_secs(10);

pub async fn reconcile(name: String, ctx: Arc<Ctx>) -> Result<Action, Error> {
    // The cache, not the store: each Lease change wakes this key once the cache has it, and
    // nothing here needs a fresher Lease. A shim runs only a Lease it finds Pending in the store
    // under its claim (invariant 1), every Task patch re-checks the Task under the store lock, and
    // the Lease is deleted only at the version it was read at.
    let Some(lease) = ctx.leases.get(&name) else {
        settled(&ctx, &name);
        ctx.summary.gone(&name);
        // The shim's entry goes only once its run, if it lives on, shows on the Task: until then
        // the entry is what keeps its agent's slot taken (`Ctx::planning_snapshot`).
        let spawned = ctx
            .spawned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&name)
            .map(|s| s.lease.clone());
        if let Some(gone) = spawned {
            show_run_of_deleted_lease(&ctx, &gone)?;
        }
        ctx.spawned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&name);
        return Ok(Action::await_change());
    };
    ctx.summary.scanned(&name, &lease.metadata.uid);
    match lease.status.phase {
        LeasePhase::Pending => {
            let action = start(&ctx, &lease).await?;
            let shown = |t: &Task| shows_lease(t, &name);
            match mirror_wait(&ctx, &lease, shown) {
                Some(wait) => Ok(sooner(action, wait)),
                None => {
                    mark_task_assigned(&ctx, &lease)?;
                    Ok(action)
                }
            }
        }
        LeasePhase::Running => {
            let shown = |t: &Task| shows_running(t, &name);
            if let Some(wait) = mirror_wait(&ctx, &lease, shown) {
                return Ok(Action::requeue_after(wait));
            }
            mark_task_running(&ctx, &lease)?;
            settled(&ctx, &name);
            Ok(Action::await_change())
        }
        LeasePhase::Completed => {
            outcome::record(&ctx, &lease, &Ending::from_lease(&lease))?;
            settled(&ctx, &name);
            Ok(Action::await_change())
        }
        // The reclaim controller owns a Lease it is killing.
        LeasePhase::Terminating => Ok(Action::await_change()),
    }
}

/// Starts the shim for a Lease no process holds yet, unless one is already starting.
async fn start(ctx: &Ctx, lease: &Arc<Lease>) -> Result<Action, Error> {
    let name = &lease.metadata.name;
    {
        let spawned = ctx.spawned.lock().unwrap_or_else(|p| p.into_inner());
        // A shim takes its claim within milliseconds of its start; one that has not after
        // SPAWN_PATIENCE is gone or stuck, and its pid, if it exists, may be another process's by
        // then. Another shim for the Lease is safe: the claim lets only one run it.
        if let Some(SpawnedShim { lease: l, pid, at }) = spawned.get(name) {
            if l.metadata.uid == lease.metadata.uid
                && at.elapsed() < SPAWN_PATIENCE
                && may_exist(*pid as i32)
            {
                return Ok(Action::requeue_after(START_CHECK));
            }
        }
    }
    // A tinytask task runs only once the sync controller has claimed it on the server.
    if super::tinytask_sync::awaits_claim(ctx, lease)? {
        return Ok(Action::await_change());
    }
    // A shim holds the Lease's claim from before it starts anything until it exits. Taken here,
    // not only asked, and held across the look for orphans and their kill below: a shim starting
    // in between would have its fresh agent taken for an orphan and killed. Released before the
    // spawn, for the new shim to take. (A dry run only asks: it creates no file.)
    let claim = if ctx.settings.dry_run {
        if Claim::is_held(&ctx.state_dir, &lease.metadata.uid).unwrap_or(false) {
            return Ok(Action::requeue_after(START_CHECK));
        }
        None
    } else {
        match Claim::acquire(&ctx.state_dir, &lease.metadata.uid) {
            Ok(Some(c)) => Some(c),
            Ok(None) => return Ok(Action::requeue_after(START_CHECK)),
            Err(e) => {
                let path = crate::agent::claim::claims_path(&ctx.state_dir);
                return Err(Error(format!("{}: {e}", path.display())));
            }
        }
    };
    // A shim of this run that died before it recorded its agent may have left that agent running
    // (the Lease names no pid): it goes before another one starts (invariant 1).
    let orphans = super::reclaim::unrecorded_groups(ctx, lease)
        .map_err(|e| Error(format!("lease/{name}: cannot look for its processes: {e}")))?;
    if !orphans.is_empty() {
        if ctx.settings.dry_run {
            ctx.would(&format!(
                "kill process groups {orphans:?} of lease/{name}: agents its shim never recorded"
            ));
        } else {
            let task = ctx.stored_task_of(lease)?;
            let unrecorded = super::reclaim::UNRECORDED;
            super::reclaim::kill_groups(ctx, name, &orphans, unrecorded, task.as_ref()).await?;
        }
    }
    if ctx.settings.dry_run {
        ctx.would(&format!(
            "start agent/{} for task/{} (lease/{name}, attempt {})",
            lease.spec.agent, lease.spec.task, lease.spec.attempt
        ));
        return Ok(Action::await_change());
    }
    drop(claim);
    let pid = spawn_shim(&ctx.state_dir, name)
        .map_err(|e| Error(format!("cannot start the shim for lease/{name}: {e}")))?;
    ctx.spawned
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            name.clone(),
            SpawnedShim {
                lease: lease.clone(),
                pid,
                at: std::time::Instant::now(),
            },
        );
    if let Some(waited) = ctx.runnable_since.take(&lease.spec.task) {
        super::dispatch::observe(&ctx.metrics, waited);
    }
    Summary::bump(&ctx.summary.started);
    Ok(Action::requeue_after(START_CHECK))
}

/// The earlier of two actions.
fn sooner(action: Action, wait: Duration) -> Action {
    match action {
        Action::RequeueAfter(d) if d <= wait => action,
        _ => Action::requeue_after(wait),
    }
}

/// How much longer the Task of `lease` waits before it is made to show the Lease's state (see
/// `Settings::mirror_delay`, counted from when this process first saw the Lease); `None` when it
/// is time, or the Task already shows it (`shown`).
fn mirror_wait(ctx: &Ctx, lease: &Lease, shown: impl Fn(&Task) -> bool) -> Option<Duration> {
    let settle = ctx.settings.mirror_delay;
    // A dry run writes nothing, so it has nothing to put off.
    if settle.is_zero() || ctx.settings.dry_run {
        return None;
    }
    if ctx.tasks.get(&lease.spec.task).is_some_and(|t| shown(&t)) {
        return None;
    }
    let now = std::time::Instant::now();
    let mut seen = ctx.leases_seen.lock().unwrap_or_else(|p| p.into_inner());
    let first = seen
        .entry(lease.metadata.name.clone())
        .or_insert_with(|| (lease.metadata.uid.clone(), now));
    if first.0 != lease.metadata.uid {
        *first = (lease.metadata.uid.clone(), now);
    }
    settle.checked_sub(now.duration_since(first.1))
}

/// Forgets when a Lease was first seen.
fn settled(ctx: &Ctx, lease: &str) {
    ctx.leases_seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(lease);
}

/// Whether `task` is marked Running with the run of Lease `lease`.
pub(crate) fn shows_running(task: &Task, lease: &str) -> bool {
    task.status.phase == TaskPhase::Running && shows_lease(task, lease)
}

/// Whether `task` shows the run of Lease `lease` (as Assigned or Running).
pub(crate) fn shows_lease(task: &Task, lease: &str) -> bool {
    task.status.lease.as_deref() == Some(lease)
}

/// Whether `task` has moved past attempt `attempt`: it is finished, on a later attempt, or this
/// attempt's outcome is recorded (no Lease shown, attempts counted). Nothing of that attempt may
/// be written into it any more.
pub(crate) fn past_attempt(task: &Task, attempt: i64) -> bool {
    task.status.phase.is_finished()
        || task.status.attempts > attempt
        || (task.status.lease.is_none() && task.status.attempts >= attempt)
}

/// Makes `task` show that `lease` runs it: phase Assigned (unless it is Running already), the
/// agent, the Lease and the attempt, and nothing left over from an earlier attempt.
pub(crate) fn mirror_assignment(t: &mut Task, lease: &Lease) {
    if matches!(t.status.phase, TaskPhase::Pending | TaskPhase::Blocked) {
        t.status.phase = TaskPhase::Assigned;
    }
    let agent = &lease.spec.agent;
    t.status.agent = Some(agent.clone());
    t.status.lease = Some(lease.metadata.name.clone());
    t.status.attempts = t.status.attempts.max(lease.spec.attempt);
    t.status.next_attempt_after = None;
    t.status.exit_code = None;
    t.status.start_time = None;
    t.status.finish_time = None;
    t.status.reason = None;
    let at = lease.metadata.creation_timestamp.as_deref().unwrap_or("-");
    t.status.message = Some(format!("assigned to agent/{agent} at {at}"));
}

/// Whether `t` is to be made to show `lease` as Assigned: it is the Lease's Task, does not show it
/// yet, and this attempt is not over already (its outcome recorded while the assignment was still
/// being written, say: showing the Lease then would leave the Task pointing at a deleted Lease).
pub(crate) fn shows_assignment_next(t: &Task, lease: &Lease) -> bool {
    lease.spec.runs(t)
        && !shows_lease(t, &lease.metadata.name)
        && !past_attempt(t, lease.spec.attempt)
        && !waits_out_a_delay(t)
}

/// Whether `t` is Pending with a `nextAttemptAfter` still to come. No Lease is made for such a
/// Task (see `assignment::commit`), so one it does not show was taken from it: a tinytask claim
/// postponed (`tinytask_sync::postpone`) put the Task back before deleting the Lease, and a pass
/// of the lease controller still holding that Lease must not make the Task show it again (its
/// deletion would then count as a reclaimed attempt).
fn waits_out_a_delay(t: &Task) -> bool {
    t.status.phase == TaskPhase::Pending
        && t.status
            .next_attempt_after
            .as_deref()
            .and_then(crate::resources::meta::parse_time)
            .is_some_and(|at| at > std::time::SystemTime::now())
}

/// Whether `t` is to be made to show `lease` Running: it is the Lease's Task, does not show it
/// Running yet, and this attempt is not over already.
fn shows_running_next(t: &Task, lease: &Lease) -> bool {
    lease.spec.runs(t)
        && !shows_running(t, &lease.metadata.name)
        && !past_attempt(t, lease.spec.attempt)
}

/// A Lease deleted (by hand) before its Task showed it — the daemon's Task shows a run only once
/// its Lease has lasted a moment (`Settings::mirror_delay`) — while the shim this process started
/// for it still runs: the Task is made to show that run, as it would have a moment later. Then the
/// run is what a run whose Lease was deleted is everywhere else: its agent's slot stays taken
/// while the shim ends it (invariant 2), and reclaim waits for the shim, then fails the attempt
/// and retries it. Left Pending, the Task's next assignment would only wait for the old run
/// (`assignment::Commit::Deferred`), and another task could take the slot beside it. An error
/// leaves the shim's entry, so the slot stays counted while the key is retried.
fn show_run_of_deleted_lease(ctx: &Ctx, lease: &Lease) -> Result<(), Error> {
    if ctx.settings.dry_run {
        return Ok(());
    }
    // The normal end of a run (its outcome recorded, then its Lease deleted) stops here, before
    // any probe: the Task is past the attempt.
    let Some(task) = ctx.tasks.get(&lease.spec.task) else {
        return Ok(());
    };
    if !shows_assignment_next(&task, lease) || !ctx.shim_runs(&task, lease.spec.attempt)? {
        return Ok(());
    }
    show_assignment(ctx, lease)
}

/// Makes the Task show `lease` as its run, if it is still to (re-checked on the stored Task).
fn show_assignment(ctx: &Ctx, lease: &Lease) -> Result<(), Error> {
    ctx.patch_task(&lease.spec.task, |t| {
        if shows_assignment_next(t, lease) {
            mirror_assignment(t, lease);
        }
    })?;
    Ok(())
}

/// Mirrors a Lease whose shim has not started the agent yet onto its Task (phase Assigned), once.
fn mark_task_assigned(ctx: &Ctx, lease: &Lease) -> Result<(), Error> {
    let Some(task) = ctx.tasks.get(&lease.spec.task) else {
        return Ok(());
    };
    if !shows_assignment_next(&task, lease) {
        return Ok(());
    }
    if ctx.settings.dry_run {
        ctx.would(&format!("mark task/{} Assigned", lease.spec.task));
        return Ok(());
    }
    show_assignment(ctx, lease)
}

/// What the Started event and the Running Task say about a run.
pub(crate) fn started_message(lease: &Lease) -> String {
    format!(
        "running on agent/{} (pid {}, attempt {})",
        lease.spec.agent,
        lease.status.pid.unwrap_or_default(),
        lease.spec.attempt
    )
}

/// The Started event's message: [`started_message`] plus the log's path.
pub(crate) fn started_event(lease: &Lease) -> String {
    let log = lease.status.log_path.as_deref().unwrap_or("-");
    format!("{}; log {log}", started_message(lease))
}

/// Mirrors a running Lease onto its Task (phase Running, start time), once.
fn mark_task_running(ctx: &Ctx, lease: &Lease) -> Result<(), Error> {
    let Some(task) = ctx.tasks.get(&lease.spec.task) else {
        return Ok(());
    };
    let name = &lease.metadata.name;
    if !shows_running_next(&task, lease) {
        return Ok(());
    }
    if ctx.settings.dry_run {
        ctx.would(&format!("mark task/{} Running", lease.spec.task));
        return Ok(());
    }
    let message = started_message(lease);
    let mut changed = false;
    let t = ctx.patch_task(&lease.spec.task, |t| {
        changed = shows_running_next(t, lease);
        if changed {
            if !shows_lease(t, name) {
                mirror_assignment(t, lease);
            }
            t.status.phase = TaskPhase::Running;
            t.status.start_time = lease.status.acquire_time.as_deref().map(to_seconds);
            t.status.message = Some(message.clone());
        }
    })?;
    if let (Some(t), true) = (t, changed) {
        ctx.event(&t, EventType::Normal, "Started", &started_event(lease));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::lease::test_lease;
    use crate::resources::TaskSpec;

    fn lease(attempt: i64) -> Lease {
        let mut l = test_lease("t", "a", attempt);
        l.metadata.creation_timestamp = Some("2026-12-01T10:00:00Z".into());
        l
    }

    fn task() -> Task {
        Task::new("Task", "t", TaskSpec::default())
    }

    #[test]
    fn mirroring_a_retry_clears_what_the_failed_attempt_left() {
        let mut t = task();
        t.status.attempts = 1;
        t.status.exit_code = Some(3);
        t.status.start_time = Some("2026-12-01T09:00:00Z".into());
        t.status.finish_time = Some("2026-12-01T09:00:01Z".into());
        t.status.next_attempt_after = Some("2026-12-01T09:00:11Z".into());
        t.status.reason = Some("Retrying".into());
        mirror_assignment(&mut t, &lease(2));
        assert_eq!(t.status.phase, TaskPhase::Assigned);
        assert_eq!(t.status.attempts, 2);
        assert_eq!(t.status.agent.as_deref(), Some("a"));
        assert!(shows_lease(&t, "t"));
        assert_eq!(
            (
                t.status.exit_code,
                t.status.start_time,
                t.status.finish_time,
                t.status.next_attempt_after,
                t.status.reason
            ),
            (None, None, None, None, None)
        );
        assert_eq!(
            t.status.message.as_deref(),
            Some("assigned to agent/a at 2026-12-01T10:00:00Z")
        );
    }

    #[test]
    fn an_assignment_is_shown_only_on_its_own_task_and_never_after_its_outcome() {
        let mut l = lease(2);
        l.spec.task_uid = "task-uid".into();
        let mut t = task();
        t.metadata.uid = "task-uid".into();
        t.status.attempts = 1;
        assert!(
            shows_assignment_next(&t, &l),
            "a retry waiting for attempt 2"
        );
        mirror_assignment(&mut t, &l);
        assert!(!shows_assignment_next(&t, &l), "shown already");
        // Attempt 2 ran and its outcome is recorded: the Lease is deleted, the Task shows none.
        t.status.lease = None;
        t.status.phase = TaskPhase::Pending;
        assert!(
            !shows_assignment_next(&t, &l),
            "a late assignment write must not point the Task at the deleted Lease"
        );
        let mut other = task();
        other.metadata.uid = "another-uid".into();
        assert!(!shows_assignment_next(&other, &l), "a new Task of the name");
    }

    #[test]
    fn mirroring_never_steps_a_running_task_back_to_assigned() {
        let mut t = task();
        t.status.phase = TaskPhase::Running;
        mirror_assignment(&mut t, &lease(1));
        assert_eq!(t.status.phase, TaskPhase::Running);
    }

    #[test]
    fn an_attempt_is_past_once_its_outcome_is_recorded_or_a_later_one_began() {
        let mut t = task();
        assert!(!past_attempt(&t, 1), "a task never run");
        t.status.attempts = 1;
        assert!(past_attempt(&t, 1), "attempt 1 recorded, no Lease shown");
        assert!(!past_attempt(&t, 2), "attempt 2 not recorded yet");
        t.status.lease = Some("t".into());
        assert!(!past_attempt(&t, 1), "attempt 1 shown running");
        t.status.attempts = 2;
        assert!(past_attempt(&t, 1), "attempt 2 began");
        t.status.lease = None;
        t.status.phase = TaskPhase::Succeeded;
        assert!(past_attempt(&t, 3), "a finished task takes no attempt");
    }
}
