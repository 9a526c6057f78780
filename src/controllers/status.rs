//! Status controller: keeps Agent and Queue status (live leases, free slots, task counts) true, and
//! garbage-collects finished Tasks after their TTL. Keys are `agent/NAME`, `queue/NAME` and
//! `task/NAME`. Agent and queue writes are batched to at most one per second per object, so a burst
//! of runs does not double the store's write load.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::{Ctx, Error};
use crate::resources::meta::{parse_time, set_condition};
use crate::resources::{Agent, Queue, Task, TaskPhase};
use crate::runtime::controller::Action;
use crate::runtime::workqueue::WorkQueue;

/// Shortest time between two status writes of one object.
const MIN_WRITE_INTERVAL: Duration = Duration::from_secs(1);
/// Default TTL of a finished local task.
pub const DEFAULT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default TTL of a finished task mirrored from tinytask.
pub const DEFAULT_TINYTASK_TTL: Duration = Duration::from_secs(3600);
/// The tasks informer's index of Tasks by the blockers they name (`spec.blockedBy`), which a
/// blocker's TTL asks; registered by `Scheduler::start`.
pub const BLOCKED_BY_INDEX: &str = "blockedBy";

/// Index of the Task cache: the agent a Task shows a run on (Assigned or Running with a Lease), so
/// that an agent's status counts its runs without a scan of every task.
pub const RUNS_ON_INDEX: &str = "runsOn";

/// The [`RUNS_ON_INDEX`] values of `t`.
pub fn runs_on(t: &Task) -> Vec<String> {
    match (&t.status.phase, &t.status.lease, &t.status.agent) {
        (TaskPhase::Assigned | TaskPhase::Running, Some(_), Some(agent)) => vec![agent.clone()],
        _ => Vec::new(),
    }
}
/// Longest wait before a finished task's TTL is looked at again. The TTL runs on the wall clock,
/// the requeue on the monotonic one, which stops while the machine sleeps; and resyncs skip
/// finished tasks, so nothing else would correct a wait that a suspend made too long.
const MAX_TTL_WAIT: Duration = Duration::from_secs(3600);

pub async fn reconcile(key: String, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let Some((kind, name)) = key.split_once('/') else {
        return Ok(Action::await_change());
    };
    if ctx.settings.dry_run {
        return Ok(Action::await_change());
    }
    match kind {
        "agent" | "queue" => {
            let wait = throttle(&ctx, &key);
            if !wait.is_zero() {
                return Ok(Action::requeue_after(wait));
            }
            if kind == "agent" {
                agent_status(&ctx, name)?;
            } else {
                queue_status(&ctx, name)?;
            }
            Ok(Action::await_change())
        }
        "task" => task_ttl(&ctx, name),
        _ => Ok(Action::await_change()),
    }
}

/// Writes every Agent's and Queue's status now, bypassing the batching: `run --once` calls it
/// before it exits so that `get agents` shows the state it left behind.
pub fn flush_all(ctx: &Ctx) -> Result<(), Error> {
    if ctx.settings.dry_run {
        return Ok(());
    }
    for a in ctx.agents.list() {
        agent_status(ctx, &a.metadata.name)?;
    }
    for q in ctx.queues.list() {
        queue_status(ctx, &q.metadata.name)?;
    }
    Ok(())
}

/// The `keys` a run's change wakes now. An agent or queue key written less than a second ago is
/// queued for when its next write is due instead (the queue keeps one time per key): in a burst
/// the worker then wakes about once a second per key, not once per run. Changes to the Agent or
/// Queue object itself still wake their key at once.
/// `written` is [`Ctx::status_writes`].
pub fn due_now(
    written: &Mutex<HashMap<String, Instant>>,
    queue: &WorkQueue<String>,
    keys: Vec<String>,
) -> Vec<String> {
    let now = Instant::now();
    let (due, later): (Vec<_>, Vec<_>) = {
        let last = written.lock().unwrap_or_else(|p| p.into_inner());
        keys.into_iter()
            .map(|key| {
                let wait = until_next_write(last.get(&key).copied(), now);
                (key, wait)
            })
            .partition(|(_, wait)| wait.is_zero())
    };
    for (key, wait) in later {
        queue.add_after(key, wait);
    }
    due.into_iter().map(|(key, _)| key).collect()
}

/// How long after `now` a key last written at `last_write` may be written again (zero: now).
fn until_next_write(last_write: Option<Instant>, now: Instant) -> Duration {
    last_write
        .map(|t| MIN_WRITE_INTERVAL.saturating_sub(now.duration_since(t)))
        .unwrap_or_default()
}

/// How long `key` must wait before its next write (zero: write now, and the clock restarts).
fn throttle(ctx: &Ctx, key: &str) -> Duration {
    let mut last = ctx.status_writes.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    let wait = until_next_write(last.get(key).copied(), now);
    if wait.is_zero() {
        last.insert(key.to_string(), now);
    }
    wait
}

fn agent_status(ctx: &Ctx, name: &str) -> Result<(), Error> {
    let Some(agent) = ctx.agents.get(name) else {
        return Ok(());
    };
    // The assignment loop's count: live Leases, and runs whose Lease was deleted until reclaim has
    // recorded them (their agents may still be alive).
    let (leases, tasks) = (ctx.leases.list(), ctx.tasks.by_index(RUNS_ON_INDEX, name));
    let active = super::plan::slots_held(&leases, &tasks)
        .get(name)
        .copied()
        .unwrap_or(0);
    let free = if agent.spec.paused {
        0
    } else {
        (agent.spec.max_concurrency - active).max(0)
    };
    let generation = agent.metadata.generation;
    let written = ctx.store.patch_status::<Agent>(name, |a| {
        a.status.observed_generation = Some(generation);
        a.status.active_leases = active;
        a.status.free_slots = free;
        let (ready, reason, msg) = if a.spec.paused {
            (
                false,
                "Paused",
                "spec.paused is true: no new tasks".to_string(),
            )
        } else {
            (
                true,
                "Ready",
                format!("{free} of {} slots free", a.spec.max_concurrency),
            )
        };
        set_condition(&mut a.status.conditions, "Ready", ready, reason, &msg);
    })?;
    if let Some(a) = written {
        ctx.agents.observe(a);
    }
    Ok(())
}

fn queue_status(ctx: &Ctx, name: &str) -> Result<(), Error> {
    if ctx.queues.get(name).is_none() {
        return Ok(());
    }
    let (mut pending, mut blocked, mut running, mut succeeded, mut failed) = (0, 0, 0, 0, 0);
    for t in ctx.tasks.snapshot() {
        if t.spec.queue.as_deref() != Some(name) {
            continue;
        }
        match t.status.phase {
            TaskPhase::Pending => pending += 1,
            TaskPhase::Blocked => blocked += 1,
            TaskPhase::Assigned | TaskPhase::Running => running += 1,
            TaskPhase::Succeeded => succeeded += 1,
            TaskPhase::Failed => failed += 1,
        }
    }
    let agents: Vec<Arc<Agent>> = ctx
        .agents
        .list()
        .into_iter()
        .filter(|a| a.spec.queue.as_deref() == Some(name))
        .collect();
    let capacity = agents
        .iter()
        .filter(|a| !a.spec.paused)
        .map(|a| a.spec.max_concurrency)
        // Validation bounds each; an agent stored before it did must not wrap the sum.
        .fold(0i64, i64::saturating_add);
    let names: Vec<String> = agents.iter().map(|a| a.metadata.name.clone()).collect();
    let written = ctx.store.patch_status::<Queue>(name, |q| {
        q.status.observed_generation = Some(q.metadata.generation);
        q.status.pending = pending;
        q.status.blocked = blocked;
        q.status.running = running;
        q.status.succeeded = succeeded;
        q.status.failed = failed;
        q.status.agents = names.clone();
        q.status.capacity = capacity;
    })?;
    if let Some(q) = written {
        ctx.queues.observe(q);
    }
    Ok(())
}

/// Deletes a finished Task (and its logs) once its TTL has passed. Until then it asks to be looked
/// at again when the TTL is due (at least hourly): periodic resyncs skip finished tasks, so this
/// requeue is what fires the deletion.
fn task_ttl(ctx: &Ctx, name: &str) -> Result<Action, Error> {
    let Some(task) = ctx.tasks.get(name) else {
        return Ok(Action::await_change());
    };
    // Unfinished, or a result not yet written back to tinytask: keep it (its next change wakes us).
    if !task.status.phase.is_finished() || !task.status.write_backs.is_empty() {
        return Ok(Action::await_change());
    }
    let ttl = ttl_of(&task);
    let finished = task
        .status
        .finish_time
        .as_deref()
        .and_then(parse_time)
        .unwrap_or_else(SystemTime::now);
    // Too far off to represent (a Task stored before `ttlSecondsAfterFinished` had a maximum):
    // never due.
    let Some(due) = finished.checked_add(ttl) else {
        return Ok(Action::await_change());
    };
    if let Ok(left) = due.duration_since(SystemTime::now()) {
        return Ok(Action::requeue_after(
            left.clamp(Duration::from_secs(1), MAX_TTL_WAIT),
        ));
    }
    // A blocker stays while a task it blocks is unfinished: once deleted it would count as
    // unfinished and hold that task back for good. The dependent's changes wake this key (see
    // `keys_for_task`).
    if ctx
        .tasks
        .by_index(BLOCKED_BY_INDEX, name)
        .iter()
        .any(|t| !t.status.phase.is_finished())
    {
        return Ok(Action::await_change());
    }
    match ctx
        .store
        .delete::<Task>(name, Some(&task.metadata.resource_version))
    {
        Ok(_) => {
            ctx.tasks.observe_deleted(name);
            if let Err(e) = crate::agent::shim::remove_logs(&ctx.state_dir, name) {
                tracing::warn!(kind = "Task", name, "cannot remove logs {e}");
            }
            tracing::info!(kind = "Task", name, "deleted after its TTL");
            Ok(Action::await_change())
        }
        // Changed since the cache saw it: look again with the new version.
        Err(e) if e.is_conflict() || e.is_not_found() => Ok(Action::await_change()),
        Err(e) => Err(e.into()),
    }
}

/// How long a finished Task is kept: `spec.ttlSecondsAfterFinished` if set, else
/// [`DEFAULT_TINYTASK_TTL`] for a mirror and [`DEFAULT_TTL`] for a local Task. (A mirror that
/// failed for good may go: its task is tagged on the server, so it is not mirrored again.)
pub fn ttl_of(task: &Task) -> Duration {
    match task.spec.ttl_seconds_after_finished {
        Some(s) => Duration::from_secs(s.max(0) as u64),
        None if super::tinytask_sync::is_tinytask(task) => DEFAULT_TINYTASK_TTL,
        None => DEFAULT_TTL,
    }
}

/// The status keys a Task change affects: its own, its queue's, its agent's, and its blockers' (whose TTL
/// waits for the tasks they block).
pub fn keys_for_task(t: &Task) -> Vec<String> {
    let mut keys = vec![format!("task/{}", t.metadata.name)];
    if let Some(q) = &t.spec.queue {
        keys.push(format!("queue/{q}"));
    }
    // A run whose Lease was deleted holds its agent's slot until its Task lets go of it.
    if let Some(a) = &t.status.agent {
        keys.push(format!("agent/{a}"));
    }
    keys.extend(t.spec.blocked_by.iter().map(|b| format!("task/{b}")));
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::task::TINYTASK_ID_ANNOTATION;

    fn finished(mirror: bool, ttl: Option<i64>) -> Task {
        let mut t = Task::new("Task", "t", Default::default());
        t.status.phase = TaskPhase::Failed;
        t.spec.ttl_seconds_after_finished = ttl;
        if mirror {
            t.metadata
                .annotations
                .insert(TINYTASK_ID_ANNOTATION.into(), "7".into());
        }
        t
    }

    #[test]
    fn a_finished_task_is_kept_for_its_ttl_else_an_hour_if_mirrored_else_a_week() {
        assert_eq!(ttl_of(&finished(true, Some(60))), Duration::from_secs(60));
        assert_eq!(ttl_of(&finished(false, Some(0))), Duration::ZERO);
        assert_eq!(ttl_of(&finished(true, None)), DEFAULT_TINYTASK_TTL);
        assert_eq!(ttl_of(&finished(false, None)), DEFAULT_TTL);
    }

    #[tokio::test(start_paused = true)]
    async fn a_status_key_written_a_moment_ago_waits_on_the_queue_for_its_next_write() {
        let written = Mutex::new(HashMap::new());
        written.lock().unwrap().insert(
            "agent/a".to_string(),
            Instant::now() - Duration::from_millis(300),
        );
        let queue = WorkQueue::new(crate::runtime::backoff::Backoff::default());
        let keys = ["agent/a", "agent/b", "task/t"].map(String::from).to_vec();
        assert_eq!(due_now(&written, &queue, keys), ["agent/b", "task/t"]);
        assert_eq!(queue.len(), 0, "agent/a is not ready yet");
        // Due 700 ms after the check (a second after the write); checked with room to spare for a
        // slow machine between the write's stamp and the check.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(queue.len(), 0, "agent/a is due 700 ms after the check");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(queue.len(), 1, "agent/a is ready once its write is due");
    }
}
