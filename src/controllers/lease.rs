//! Lease controller: starts a shim for a Lease with no process (spawning is the last step after the
//! Lease exists — invariant 1), mirrors a running Lease onto its Task, and records the outcome of a
//! completed one.

use std::sync::Arc;
use std::time::Duration;

use super::outcome::{self, Ending};
use super::{Ctx, Error, Summary};
use crate::agent::claim::Claim;
use crate::agent::liveness::{is_alive, start_time_of};
use crate::agent::spawn::spawn_shim;
use crate::resources::event::EventType;
use crate::resources::{Lease, LeasePhase, Task, TaskPhase};
use crate::runtime::controller::Action;

/// How long a started shim has to claim its Lease before the controller looks again.
const START_CHECK: Duration = Duration::from_secs(2);

pub async fn reconcile(name: String, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let Some(lease) = ctx.store.try_get::<Lease>(&name)? else {
        ctx.spawned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&name);
        settled(&ctx, &name);
        return Ok(Action::await_change());
    };
    Summary::bump(&ctx.summary.leases_scanned);
    match lease.status.phase {
        LeasePhase::Pending => start(&ctx, &lease),
        LeasePhase::Running => {
            if let Some(wait) = settling(&ctx, &lease) {
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
fn start(ctx: &Ctx, lease: &Lease) -> Result<Action, Error> {
    let name = &lease.metadata.name;
    // A shim holds the claim from before it starts anything until it exits.
    if Claim::is_held(&ctx.state_dir, &lease.metadata.uid).unwrap_or(false) {
        return Ok(Action::requeue_after(START_CHECK));
    }
    {
        let spawned = ctx.spawned.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((uid, pid)) = spawned.get(name) {
            if *uid == lease.metadata.uid
                && start_time_of(*pid as i32).is_some_and(|st| is_alive(*pid as i32, st))
            {
                return Ok(Action::requeue_after(START_CHECK));
            }
        }
    }
    // A tinytask task runs only once the sync controller has claimed it on the server.
    if super::tinytask_sync::awaits_claim(ctx, lease)? {
        return Ok(Action::await_change());
    }
    if ctx.settings.dry_run {
        ctx.would(&format!(
            "start agent/{} for task/{} (lease/{name}, attempt {})",
            lease.spec.agent, lease.spec.task, lease.spec.attempt
        ));
        return Ok(Action::await_change());
    }
    let pid = spawn_shim(&ctx.state_dir, name)
        .map_err(|e| Error(format!("cannot start the shim for lease/{name}: {e}")))?;
    ctx.spawned
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(name.clone(), (lease.metadata.uid.clone(), pid));
    if let Some(waited) = ctx.runnable_since.take(&lease.spec.task) {
        super::dispatch::observe(&ctx.metrics, waited);
    }
    Summary::bump(&ctx.summary.started);
    Ok(Action::requeue_after(START_CHECK))
}

/// How much longer a Running Lease waits before its Task is marked Running (see
/// `Settings::running_settle`); `None` when it is time, or the Task shows it already.
fn settling(ctx: &Ctx, lease: &Lease) -> Option<Duration> {
    let settle = ctx.settings.running_settle;
    if settle.is_zero() {
        return None;
    }
    if ctx
        .tasks
        .get(&lease.spec.task)
        .is_some_and(|t| shows_running(&t, &lease.metadata.name))
    {
        return None;
    }
    let now = std::time::Instant::now();
    let mut seen = ctx.running_seen.lock().unwrap_or_else(|p| p.into_inner());
    let first = seen
        .entry(lease.metadata.name.clone())
        .or_insert_with(|| (lease.metadata.uid.clone(), now));
    if first.0 != lease.metadata.uid {
        *first = (lease.metadata.uid.clone(), now);
    }
    settle.checked_sub(now.duration_since(first.1))
}

/// Forgets when a Lease was first seen Running.
fn settled(ctx: &Ctx, lease: &str) {
    ctx.running_seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(lease);
}

/// Whether `task` is marked Running with the run of Lease `lease`.
pub(crate) fn shows_running(task: &Task, lease: &str) -> bool {
    task.status.phase == TaskPhase::Running && task.status.lease.as_deref() == Some(lease)
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
    if shows_running(&task, &lease.metadata.name) {
        return Ok(());
    }
    if task.status.phase.is_finished() {
        return Ok(());
    }
    if ctx.settings.dry_run {
        ctx.would(&format!("mark task/{} Running", lease.spec.task));
        return Ok(());
    }
    let message = started_message(lease);
    let mut changed = false;
    let t = ctx.patch_task(&lease.spec.task, |t| {
        changed = !t.status.phase.is_finished();
        if changed {
            t.status.phase = TaskPhase::Running;
            t.status.agent = Some(lease.spec.agent.clone());
            t.status.lease = Some(lease.metadata.name.clone());
            t.status.attempts = t.status.attempts.max(lease.spec.attempt);
            t.status.start_time = lease.status.acquire_time.clone();
            t.status.reason = None;
            t.status.message = Some(message.clone());
        }
    })?;
    if let (Some(t), true) = (t, changed) {
        ctx.event(&t, EventType::Normal, "Started", &started_event(lease));
    }
    Ok(())
}
