//! Assignment: one serialized decision loop (like kube-scheduler). It plans over the cache, then
//! commits each decision by creating the task's Lease exclusively — the commit point of invariant 1.
//! The Task shows it (`Assigned`) right after, or, in the daemon, once the Lease has lasted a
//! moment (`Settings::mirror_delay`; the lease controller or the outcome writes it).

use std::sync::Arc;
use std::time::SystemTime;

use super::lease::{mirror_assignment, shows_assignment_next};
use super::plan::{self, PlanOptions, UNSCHEDULABLE};
use super::{tinytask_sync, Ctx, Error, PlanningSnapshot, Summary};
use crate::resources::event::EventType;
use crate::resources::{Lease, LeasePhase, LeaseSpec, Task, TaskPhase};
use crate::runtime::controller::Action;

/// The single key of the assignment loop.
pub const KEY: &str = "assign";

/// At most this many Leases may wait for their shim (phase Pending) at once. A pass commits no
/// more than the difference; every Lease change wakes the loop again. Without it one pass over a
/// burst committed thousands of Leases (three durable writes each) before any shim ran: the
/// controllers starved for minutes and Leases past their duration were reclaimed as "never
/// started".
pub const MAX_STARTING: usize = 32;

/// One assignment pass over the whole cache.
pub async fn reconcile(_key: String, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let (agents, queues) = (ctx.agents.list(), ctx.queues.list());
    let PlanningSnapshot {
        tasks,
        mut leases,
        without_lease,
    } = ctx.planning_snapshot();
    let now = SystemTime::now();
    let starting = leases
        .iter()
        .filter(|l| l.status.phase == LeasePhase::Pending)
        .count();
    leases.extend(without_lease);
    // A dry run starts nothing, so it prints the whole plan.
    let budget = if ctx.settings.dry_run {
        None
    } else {
        Some(MAX_STARTING.saturating_sub(starting))
    };
    let p = plan::plan(
        &tasks,
        &agents,
        &queues,
        &leases,
        now,
        PlanOptions {
            disable_blocking: ctx.settings.disable_blocking,
            max_assignments: budget,
        },
    );

    let mut first_error = None;
    let mut note = |r: Result<(), Error>| {
        if let Err(e) = r {
            // Every failed step counts; the first is returned, and counted by the runtime.
            if first_error.is_some() {
                Summary::bump(&ctx.summary.errors);
            }
            first_error.get_or_insert(e);
        }
    };
    for (name, message) in &p.newly_blocked {
        note(block(&ctx, name, message));
    }
    for (name, why) in &p.unblocked {
        note(unblock(&ctx, name, why));
    }
    for (name, why) in &p.unschedulable {
        note(unschedulable(&ctx, name, Some(why)));
    }
    for name in &p.schedulable {
        note(unschedulable(&ctx, name, None));
    }
    let mut deferred = false;
    for (task, agent) in &p.assignments {
        note(commit(&ctx, task, agent).map(|d| deferred |= d == Commit::Deferred));
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let wakeup = p
        .next_wakeup
        .map(|t| t.duration_since(now).unwrap_or_default());
    Ok(match (wakeup, deferred) {
        (Some(w), true) => Action::requeue_after(w.min(RUN_ENDING_LOOK)),
        (None, true) => Action::requeue_after(RUN_ENDING_LOOK),
        (Some(w), false) => Action::requeue_after(w),
        (None, false) => Action::await_change(),
    })
}

/// Shows `Blocked` with `message` on a Pending task, or the new message on a Blocked one.
fn block(ctx: &Ctx, name: &str, message: &str) -> Result<(), Error> {
    let message = message.to_string();
    if ctx.settings.dry_run {
        if ctx
            .tasks
            .get(name)
            .is_some_and(|t| t.status.phase == TaskPhase::Pending)
        {
            Summary::bump(&ctx.summary.blocked);
        }
        ctx.would(&format!("mark task/{name} Blocked: {message}"));
        return Ok(());
    }
    let mut changed = false;
    let mut newly = false;
    let t = ctx.patch_task(name, |t| {
        newly = t.status.phase == TaskPhase::Pending;
        changed = newly
            || (t.status.phase == TaskPhase::Blocked
                && t.status.message.as_deref() != Some(message.as_str()));
        if changed {
            t.status.phase = TaskPhase::Blocked;
            t.status.reason = Some("Blocked".into());
            t.status.message = Some(message.clone());
        }
    })?;
    if let (Some(t), true) = (t, changed) {
        // Counted once per task that became Blocked, not per new message of a blocked one.
        if newly {
            Summary::bump(&ctx.summary.blocked);
        }
        ctx.event(&t, EventType::Normal, "Blocked", &message);
    }
    Ok(())
}

/// Shows on a Pending task that no agent can take it, and why (`Some`), with a Warning Event;
/// or (`None`) takes that back once an agent can.
fn unschedulable(ctx: &Ctx, name: &str, why: Option<&str>) -> Result<(), Error> {
    if ctx.settings.dry_run {
        if let Some(why) = why {
            ctx.would(&format!("mark task/{name} {UNSCHEDULABLE}: {why}"));
        }
        return Ok(());
    }
    let mut changed = false;
    let t = ctx.patch_task(name, |t| {
        let shows = t.status.reason.as_deref() == Some(UNSCHEDULABLE);
        changed = t.status.phase == TaskPhase::Pending
            && match why {
                Some(why) => !shows || t.status.message.as_deref() != Some(why),
                None => shows,
            };
        if changed {
            t.status.reason = why.map(|_| UNSCHEDULABLE.to_string());
            t.status.message = why.map(str::to_string);
        }
    })?;
    if let (Some(t), true, Some(why)) = (t, changed, why) {
        ctx.event(&t, EventType::Warning, UNSCHEDULABLE, why);
    }
    Ok(())
}

fn unblock(ctx: &Ctx, name: &str, why: &str) -> Result<(), Error> {
    if ctx.settings.dry_run {
        ctx.would(&format!("mark task/{name} Pending: {why}"));
        return Ok(());
    }
    let mut changed = false;
    let t = ctx.patch_task(name, |t| {
        changed = t.status.phase == TaskPhase::Blocked;
        if changed {
            t.status.phase = TaskPhase::Pending;
            t.status.reason = None;
            t.status.message = Some(why.to_string());
        }
    })?;
    if let (Some(t), true) = (t, changed) {
        ctx.event(&t, EventType::Normal, "Unblocked", why);
    }
    Ok(())
}

/// What became of one planned assignment.
#[derive(Debug, PartialEq)]
enum Commit {
    /// Committed, or nothing to do (the Task moved on, its Lease exists already).
    Done,
    /// A shim of the same attempt still lives: its Lease was deleted before the Task showed it.
    /// The assignment waits for that shim to end its agent (it finds its Lease gone within a
    /// second) and exit.
    Deferred,
}

/// How soon a deferred assignment is looked at again.
const RUN_ENDING_LOOK: std::time::Duration = std::time::Duration::from_millis(500);

/// Fails `task`, whose attempts are past its `maxRetries`, without another attempt.
fn out_of_retries(ctx: &Ctx, task: &Task) -> Result<(), Error> {
    let name = &task.metadata.name;
    let message = format!(
        "failed after {} attempts; maxRetries is now {}",
        task.status.attempts, task.spec.max_retries
    );
    if ctx.settings.dry_run {
        ctx.would(&format!("fail task/{name}: {message}"));
        return Ok(());
    }
    let uid = &task.metadata.uid;
    let mut failed = false;
    let updated = ctx.patch_task(name, |t| {
        failed = t.metadata.uid == *uid
            && matches!(t.status.phase, TaskPhase::Pending | TaskPhase::Blocked)
            && t.status.lease.is_none()
            && t.status.attempts > t.spec.max_retries;
        if failed {
            t.status.phase = TaskPhase::Failed;
            t.status.reason = Some("BackoffLimitExceeded".into());
            t.status.message = Some(format!(
                "failed after {} attempts; maxRetries is now {}",
                t.status.attempts, t.spec.max_retries
            ));
            t.status.next_attempt_after = None;
        }
    })?;
    if let (Some(t), true) = (updated, failed) {
        let message = t.status.message.clone().unwrap_or_default();
        ctx.event(&t, EventType::Warning, "Failed", &message);
    }
    Ok(())
}

/// Creates the Lease (the commit point), then records the assignment on the Task.
fn commit(ctx: &Ctx, task_name: &str, agent_name: &str) -> Result<Commit, Error> {
    // The plan came from the cache; the commit re-reads the Task so that a task finished a moment
    // ago is never started again.
    let Some(task) = ctx.store.try_get::<Task>(task_name)? else {
        return Ok(Commit::Done);
    };
    if !matches!(task.status.phase, TaskPhase::Pending | TaskPhase::Blocked) {
        return Ok(Commit::Done);
    }
    // Nor is a retry started early: the attempt before may have failed since the plan's read,
    // and the Task's update (with its retry time) wakes the loop again.
    let due = task
        .status
        .next_attempt_after
        .as_deref()
        .and_then(crate::resources::meta::parse_time);
    if due.is_some_and(|at| at > SystemTime::now()) {
        return Ok(Commit::Done);
    }
    let Some(agent) = ctx.agents.get(agent_name) else {
        return Ok(Commit::Done);
    };
    let attempt = task.status.attempts + 1;
    // A Lease deleted before its Task showed it leaves the Task Pending at the same attempt, while
    // that attempt's shim may still run its agent: the same attempt again would run beside it
    // (invariant 1). The shim holds the attempt's run claim for as long as it lives.
    if !ctx.settings.dry_run && ctx.shim_runs(&task, attempt)? {
        return Ok(Commit::Deferred);
    }
    // Its `maxRetries` was lowered while it waited for a retry: it has used them up, and fails now
    // rather than after one more run (as a Job whose backoffLimit is lowered). A tinytask mirror
    // is left to run: its outcome goes back to its server with a run's record.
    if task.status.attempts > task.spec.max_retries && !tinytask_sync::is_tinytask(&task) {
        out_of_retries(ctx, &task)?;
        return Ok(Commit::Done);
    }
    if ctx.settings.dry_run {
        ctx.would(&format!(
            "assign task/{task_name} to agent/{agent_name} (attempt {attempt})"
        ));
        Summary::bump(&ctx.summary.assigned);
        return Ok(Commit::Done);
    }
    let mut lease = Lease::new(
        "Lease",
        task_name,
        LeaseSpec {
            task: task_name.to_string(),
            agent: agent_name.to_string(),
            holder_identity: ctx.settings.holder.clone(),
            lease_duration_seconds: agent.spec.heartbeat_seconds.saturating_mul(3),
            max_runtime_seconds: task
                .spec
                .timeout_seconds
                .unwrap_or(agent.spec.max_runtime_seconds),
            attempt,
            task_uid: task.metadata.uid.clone(),
        },
    );
    lease
        .metadata
        .labels
        .insert("tinyscheduler.io/agent".into(), agent_name.into());
    let lease = match ctx.store.create(&lease) {
        Ok(l) => l,
        // Someone holds this task's run already: invariant 1 says we must not start another.
        Err(e) if e.is_already_exists() => return Ok(Commit::Done),
        Err(e) => return Err(e.into()),
    };
    // A tinytask task is claimed on its server only once its Task shows the Lease.
    let mirror_now = ctx.settings.mirror_delay.is_zero() || tinytask_sync::is_tinytask(&task);
    let shown = if mirror_now {
        // The Lease is in the store already: the lease controller may have seen the run start
        // (never step back from Running), or even end, its outcome recorded (never write the
        // assignment over it: the Task would show a Lease that is gone).
        ctx.patch_task(task_name, |t| {
            if shows_assignment_next(t, &lease) {
                mirror_assignment(t, &lease);
            }
        })
    } else {
        Ok(None)
    };
    // Wake the lease controller only now, so that it finds the Task already showing the Lease
    // if it is to. The Lease is committed even when the Task's write failed: it goes into the
    // cache all the same, so that the next pass counts its agent's slot even before the watch
    // brings it (invariant 2); the lease controller makes the Task show it later.
    ctx.leases.observe(lease);
    Summary::bump(&ctx.summary.assigned);
    ctx.event(
        shown
            .as_ref()
            .ok()
            .and_then(Option::as_ref)
            .unwrap_or(&task),
        EventType::Normal,
        "Assigned",
        &format!("assigned to agent/{agent_name} (attempt {attempt})"),
    );
    shown?;
    Ok(Commit::Done)
}
