//! Reclaim controller: finds stale runs — shim and agent gone with no result, heartbeat expired,
//! over their maximum runtime, or whose Task was deleted — kills the whole process group (SIGTERM,
//! then SIGKILL after a grace) and only then fails the attempt (invariant 4). Liveness is exact:
//! pid plus start time (invariant 5); a Lease held on another host is judged by its renew time alone.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::outcome::{self, Ending};
use super::{Ctx, Error, Summary};
use crate::agent::claim::{claims_path, Claim};
use crate::agent::kill::terminate_group;
use crate::agent::liveness::{group_has_run, groups_of_unrecorded_run, is_alive};
use crate::agent::shim::{log_path, RECORD_GIVE_UP};
use crate::resources::event::EventType;
use crate::resources::lease::LeaseStatus;
use crate::resources::meta::parse_time;
use crate::resources::{Lease, LeasePhase, LeaseSpec, Resource, Task, TaskPhase};
use crate::runtime::controller::Action;

/// Why a run is being reclaimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Healthy; look again after this long.
    Healthy(Duration),
    /// The heartbeat expired or the maximum runtime passed (the reason, as a stale verdict would
    /// give it), but the agent has exited and its shim is alive: the run is over and the shim is
    /// still ending what the agent left in its group or trying to record its result (the store
    /// refused its writes, say). Reclaiming now could fail, and run again, a run that succeeded.
    /// Look again after this long; [`record_grace`] past the limit the run is stale after all.
    AwaitingShim(Duration, String),
    Stale(String),
}

/// How long past a Lease's expiry or its maximum runtime reclaim waits for the live shim of an
/// exited agent to record its result: longer than the shim may take before it gives up and exits — ending what the
/// agent left in its group (`kill_grace`), then trying to write for [`RECORD_GIVE_UP`] — plus a
/// minute.
pub fn record_grace(kill_grace: Duration) -> Duration {
    RECORD_GIVE_UP + kill_grace + Duration::from_secs(60)
}

fn age(ts: Option<&str>, now: SystemTime) -> Option<Duration> {
    ts.and_then(parse_time)
        .map(|t| now.duration_since(t).unwrap_or_default())
}

/// What [`judge`] knows about a Lease besides the Lease itself.
#[derive(Debug, Clone, Copy)]
pub struct Facts {
    /// The time to judge at.
    pub now: SystemTime,
    /// Whether the run's processes are on this host, so that pids can be checked.
    pub local: bool,
    /// Whether the Lease's Task is still there.
    pub task_exists: bool,
    /// Whether a process on this host holds the Lease's claim (a shim starting it; see
    /// [`Claim`]). Only asked of a local Pending Lease.
    pub claimed: bool,
    /// See [`record_grace`].
    pub record_grace: Duration,
}

/// The Leases that may run `task`, for the reclaim controller to look at when the Task changes or
/// is deleted: the one it shows, or, for a run it does not show yet (`Settings::mirror_delay`), a
/// Lease named after it that `cached` knows (Leases are named after their Task). A finished Task
/// has none.
pub fn leases_of_task(task: &Task, cached: impl Fn(&str) -> bool) -> Vec<String> {
    match &task.status.lease {
        Some(l) => vec![l.clone()],
        None if !task.status.phase.is_finished() && cached(&task.metadata.name) => {
            vec![task.metadata.name.clone()]
        }
        None => Vec::new(),
    }
}

/// The key a Lease change wakes: its own, unless the Lease is Completed. Reclaim never acts on a
/// Completed Lease (see `reclaim`, which leaves it as it is): the lease controller records its
/// outcome and deletes it, also when its Task is gone. Without this a short run woke reclaim four
/// times, twice for nothing (its Completed record and then its deletion, which carries the
/// Completed Lease).
pub fn keys_for_lease(lease: &Lease) -> Vec<String> {
    if lease.status.phase == LeasePhase::Completed {
        Vec::new()
    } else {
        vec![lease.metadata.name.clone()]
    }
}

/// Whether the process a Lease recorded (`pid`, `start`) is alive: by [`is_alive`], and only if
/// the Lease was recorded in this boot of the machine, since after a reboot a recorded pid and
/// start time may name an unrelated process. A Lease without a boot id (one written before it
/// was recorded) is judged by pid and start time alone.
fn recorded_alive(s: &LeaseStatus, pid: Option<i32>, start: Option<u64>) -> bool {
    recorded_this_boot(s) && matches!((pid, start), (Some(p), Some(t)) if is_alive(p, t))
}

/// Whether a Lease's pids are of this boot of the machine (see [`recorded_alive`]).
fn recorded_this_boot(s: &LeaseStatus) -> bool {
    let now = crate::store::revision::boot_id();
    s.boot_id
        .as_deref()
        .is_none_or(|b| now.is_empty() || b == now)
}

/// Judges a Lease from what is known about it.
pub fn judge(lease: &Lease, facts: &Facts) -> Verdict {
    let Facts {
        now,
        local,
        task_exists,
        claimed,
        record_grace,
    } = *facts;
    let s = &lease.status;
    if !task_exists {
        return Verdict::Stale("its task was deleted".into());
    }
    let duration = Duration::from_secs(lease.spec.lease_duration_seconds.max(1) as u64);
    let max_runtime = Duration::from_secs(lease.spec.max_runtime_seconds.max(1) as u64);
    match s.phase {
        LeasePhase::Completed => return Verdict::Healthy(Duration::MAX),
        LeasePhase::Terminating => {
            return Verdict::Stale(
                s.message
                    .clone()
                    .unwrap_or_else(|| "being reclaimed".into()),
            )
        }
        LeasePhase::Pending => {
            let created =
                age(lease.metadata.creation_timestamp.as_deref(), now).unwrap_or_default();
            let shim_alive = local && recorded_alive(s, s.shim_pid, s.shim_start_time);
            // A shim still starting holds the claim before it writes anything.
            let starting = local && claimed;
            if created > duration && !shim_alive && !starting {
                return Verdict::Stale(format!(
                    "never started: no process {}s after the lease was created",
                    created.as_secs()
                ));
            }
            if created > duration {
                return Verdict::Healthy(duration);
            }
            return Verdict::Healthy(duration.saturating_sub(created).max(Duration::from_secs(1)));
        }
        LeasePhase::Running => {}
    }
    let since_renew = age(s.renew_time.as_deref(), now).unwrap_or_default();
    let mut recording = false;
    if local {
        let agent_alive = recorded_alive(s, s.pid, s.process_start_time);
        let shim_alive = recorded_alive(s, s.shim_pid, s.shim_start_time);
        if !agent_alive && !shim_alive {
            return Verdict::Stale(
                "the shim and the agent exited without recording a result".into(),
            );
        }
        recording = !agent_alive && shim_alive;
    }
    let running_for = age(s.acquire_time.as_deref(), now).unwrap_or_default();
    let past_limit = if since_renew > duration {
        let expired = since_renew - duration;
        Some((
            expired,
            format!("heartbeat expired {}s ago", expired.as_secs()),
        ))
    } else if running_for > max_runtime {
        Some((
            running_for - max_runtime,
            format!("exceeded its maximum runtime of {}s", max_runtime.as_secs()),
        ))
    } else {
        None
    };
    if let Some((past, mut reason)) = past_limit {
        if recording && past <= record_grace {
            let left = record_grace - past;
            let after = left.min(duration).max(Duration::from_millis(200));
            return Verdict::AwaitingShim(after, reason);
        }
        if recording {
            reason.push_str(&format!(
                "; its agent exited and its shim recorded nothing for {}s",
                record_grace.as_secs()
            ));
        }
        return Verdict::Stale(reason);
    }
    let next = (duration - since_renew).min(max_runtime - running_for);
    Verdict::Healthy(next.max(Duration::from_millis(200)))
}

/// The metric counting reclaims, labelled by [`reason_label`].
pub const RECLAIMS_METRIC: &str = "tinyscheduler_reclaims_total";
const RECLAIMS_HELP: &str = "Runs reclaimed (process group killed, attempt failed), by reason.";
/// Every reason label [`reason_label`] gives for a reason [`judge`] writes.
pub const REASONS: &[&str] = &[
    "heartbeat",
    "max-runtime",
    "lost",
    "task-deleted",
    "never-started",
    "lease-deleted",
];

/// The short `reason` label of a stale verdict (or of a Terminating Lease's message, which is the
/// verdict that started the reclaim); `other` for a reason [`judge`] never gives.
pub fn reason_label(reason: &str) -> &'static str {
    if reason.starts_with("heartbeat expired") {
        "heartbeat"
    } else if reason.starts_with("exceeded its maximum runtime") {
        "max-runtime"
    } else if reason.starts_with("the shim and the agent exited") {
        "lost"
    } else if reason.starts_with("its task was deleted") {
        "task-deleted"
    } else if reason.starts_with("never started") {
        "never-started"
    } else if reason.starts_with(LEASE_DELETED) {
        "lease-deleted"
    } else {
        "other"
    }
}

/// Registers `tinyscheduler_reclaims_total` at 0 for every reason, so rates work from the start.
pub fn register(metrics: &crate::runtime::metrics::Metrics) {
    for r in REASONS {
        metrics.counter(RECLAIMS_METRIC, RECLAIMS_HELP, &[("reason", r)]);
    }
}

pub async fn reconcile(name: String, ctx: Arc<Ctx>) -> Result<Action, Error> {
    // First from the cache: every Lease change reaches it before it wakes this key, so a healthy
    // verdict on a version that a newer one is about to replace is judged again in a moment. The
    // claim (which only ever makes a starting Lease healthy) is not asked here, so a Lease that
    // needs it goes on to the store.
    let Some(cached) = ctx.leases.get(&name) else {
        return without_lease(&ctx, &name).await;
    };
    if let Verdict::Healthy(after) = judge(&cached, &facts(&ctx, &cached, false)?) {
        return Ok(look_again(after));
    }
    // A run is reclaimed only on a verdict from the store: a cache a moment behind (an old
    // renewTime, say) must never get a live run killed.
    let Some(lease) = ctx.store.try_get::<Lease>(&name)? else {
        // Gone from the store but not from the cache: a deletion the cache never heard of. Its
        // Deleted event brings the usual handling of a deleted Lease.
        ctx.leases.drop_missing(&name, cached.revision());
        return Ok(Action::await_change());
    };
    let facts = facts(&ctx, &lease, true)?;
    let reason = match judge(&lease, &facts) {
        Verdict::Healthy(after) => return Ok(look_again(after)),
        Verdict::AwaitingShim(after, why) => {
            await_shim(&ctx, &lease, &why);
            return Ok(Action::requeue_after(after));
        }
        Verdict::Stale(reason) => reason,
    };
    let local = facts.local;
    if ctx.settings.dry_run {
        ctx.would(&format!("reclaim lease/{name}: {reason}"));
        Summary::bump(&ctx.summary.reclaimed);
        return Ok(Action::await_change());
    }
    let _claim = match hold_claim(&ctx.state_dir, &lease, local) {
        Ok(ClaimHold::Held(c)) => Some(c),
        Ok(ClaimHold::NotNeeded) => None,
        Ok(ClaimHold::Starting) => return Ok(Action::requeue_after(STARTING_RECHECK)),
        Err(e) => {
            let path = claims_path(&ctx.state_dir);
            return Err(Error(format!("{}: {e}", path.display())));
        }
    };
    reclaim(&ctx, lease, local, &reason).await?;
    Ok(Action::await_change())
}

/// How soon a Pending Lease whose shim took its claim after the verdict is judged again.
const STARTING_RECHECK: Duration = Duration::from_secs(1);

/// Whether reclaim may go on with a Lease, and the claim it holds meanwhile.
#[derive(Debug)]
pub enum ClaimHold {
    /// Not a local Pending Lease: no shim can start it any more.
    NotNeeded,
    /// Reclaim holds the claim, so no shim can start the Lease's agent until it is released.
    Held(Claim),
    /// A shim holds the claim: it is starting the run, which is judged again.
    Starting,
}

/// Takes the claim of a local Pending Lease for the reclaim. A shim takes the claim, then reads
/// its Lease once more and starts the agent only if it is still Pending; the verdict was made
/// before, so without the claim a shim starting between the two would run an agent that the
/// reclaim neither saw nor killed, and the task would be requeued beside it (invariant 1).
pub fn hold_claim(state_dir: &Path, lease: &Lease, local: bool) -> io::Result<ClaimHold> {
    if !local || lease.status.phase != LeasePhase::Pending {
        return Ok(ClaimHold::NotNeeded);
    }
    Ok(match Claim::acquire(state_dir, &lease.metadata.uid)? {
        Some(c) => ClaimHold::Held(c),
        None => ClaimHold::Starting,
    })
}

/// How often reclaim looks whether the shim of a run whose Lease was deleted has ended.
const SHIM_ENDING_LOOK: Duration = Duration::from_millis(500);

/// How long reclaim waits for the shim of a run whose Lease was deleted to end it: it looks at its
/// Lease every second, then ends the agent's group (SIGTERM, SIGKILL after `kill_grace`); ten
/// seconds more cover a loaded machine.
pub fn shim_end_deadline(kill_grace: Duration) -> Duration {
    kill_grace + Duration::from_secs(11)
}

/// How long reclaim has found `run`'s shim holding it without its Lease (zero the first time).
fn shim_waited(ctx: &Ctx, run: &str) -> Duration {
    let now = std::time::Instant::now();
    let mut waits = ctx.shim_waits.lock().unwrap_or_else(|p| p.into_inner());
    // A run whose Task went another way meanwhile (deleted, say) leaves its entry; such entries
    // go once they are far past any deadline.
    let stale = shim_end_deadline(ctx.settings.kill_grace) * 10;
    waits.retain(|_, since| now.duration_since(*since) < stale);
    now.duration_since(*waits.entry(run.to_string()).or_insert(now))
}

/// Why a run is reclaimed whose Lease was deleted by hand.
const LEASE_DELETED: &str = "its Lease was deleted";

/// A Task that shows a Lease that is gone (deleted by hand, `delete lease NAME`) would wait for
/// its run's result for good (invariant 3). Its run is reclaimed as a Lease's would be: the
/// agents of the attempt, found by their log, are killed, then the attempt is
/// failed and retried. Only on the store's word: the cache may be a moment behind a new Lease.
async fn without_lease(ctx: &Ctx, name: &str) -> Result<Action, Error> {
    let shows = |t: &Task| {
        t.status.lease.as_deref() == Some(name)
            && matches!(t.status.phase, TaskPhase::Assigned | TaskPhase::Running)
    };
    if !ctx.tasks.get(name).is_some_and(|t| shows(&t)) {
        return Ok(Action::await_change());
    }
    let Some(task) = ctx.store.try_get::<Task>(name)?.filter(|t| shows(t)) else {
        return Ok(Action::await_change());
    };
    if ctx.store.try_get::<Lease>(name)?.is_some() {
        return Ok(Action::await_change());
    }
    // The run as the Task knows it: its name, agent, attempt and Task.
    let mut lease = Lease::new(
        "Lease",
        name,
        LeaseSpec {
            task: name.to_string(),
            agent: task.status.agent.clone().unwrap_or_default(),
            attempt: task.status.attempts,
            task_uid: task.metadata.uid.clone(),
            ..Default::default()
        },
    );
    lease.status.acquire_time = task.status.start_time.clone();
    if ctx.settings.dry_run {
        ctx.would(&format!("reclaim the run of task/{name}: {LEASE_DELETED}"));
        Summary::bump(&ctx.summary.reclaimed);
        return Ok(Action::await_change());
    }
    // Its shim, while it lives, holds the run: it finds the Lease gone within a second and ends
    // the agent's group itself, however the agent's processes look (one that redirected its
    // output is not found by its log below). Requeueing before then would start the next attempt
    // beside it (invariants 1 and 4).
    let run = crate::agent::claim::run_key(name, &task.metadata.uid, lease.spec.attempt);
    if ctx.shim_runs(&task, lease.spec.attempt)? {
        // Waited for only so long: a shim that lives but does not end the run (stopped, frozen,
        // stuck in the kernel) would hold it for good. Past the deadline the run is reclaimed
        // without it, its agents found by their log as for a shim that died.
        let waited = shim_waited(ctx, &run);
        let deadline = shim_end_deadline(ctx.settings.kill_grace);
        if waited < deadline {
            return Ok(Action::requeue_after(SHIM_ENDING_LOOK));
        }
        ctx.event(
            &task,
            EventType::Warning,
            "ShimUnresponsive",
            &format!(
                "the shim of attempt {} still holds its run {}s after its Lease was deleted, \
                 without ending it; reclaiming the run without the shim",
                lease.spec.attempt,
                waited.as_secs()
            ),
        );
    }
    let groups = unrecorded_groups(ctx, &lease)
        .map_err(|e| Error(format!("task/{name}: cannot look for its processes: {e}")))?;
    // The run started if an agent of it was found, or if its shim, finding the Lease gone, ended
    // the agent itself (its log says so); a Task showing it Running (`acquireTime`) says so too.
    let shim_ended_it = crate::agent::shim::log_says_lease_lost(
        &log_path(&ctx.state_dir, name, lease.spec.attempt),
        name,
    );
    let started = !groups.is_empty() || shim_ended_it;
    if shim_ended_it && groups.is_empty() {
        ctx.event(
            &task,
            EventType::Warning,
            "Killed",
            &format!(
                "the agent's process group was ended by its shim (attempt {}), which found its \
                 Lease deleted",
                lease.spec.attempt
            ),
        );
    }
    kill_groups(ctx, name, &groups, WITHOUT_LEASE, Some(&task)).await?;
    record_reclaimed(ctx, &lease, LEASE_DELETED, Some(&task), started)?;
    // Only now: a kill that failed is retried at once, not after another deadline.
    ctx.shim_waits
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&run);
    Ok(Action::await_change())
}

/// Says on the Task that its run is over and reclaim waits for the shim to record the result.
/// The message stays the same while it waits, so the Event is aggregated (its count grows).
fn await_shim(ctx: &Ctx, lease: &Lease, why: &str) {
    let Ok(Some(task)) = ctx.task_of(lease) else {
        return;
    };
    let shim = lease.status.shim_pid.unwrap_or_default();
    ctx.event(
        &*task,
        EventType::Warning,
        "AwaitingResult",
        &format!(
            "lease/{} (attempt {}): {why}, but the agent has exited and its shim (pid {shim}) is \
             alive; waiting up to {}s for it to record the result before reclaiming",
            lease.metadata.name,
            lease.spec.attempt,
            record_grace(ctx.settings.kill_grace).as_secs()
        ),
    );
}

/// When to look at a healthy Lease again.
fn look_again(after: Duration) -> Action {
    if after == Duration::MAX {
        Action::await_change()
    } else {
        Action::requeue_after(after)
    }
}

/// The facts [`judge`] needs about `lease`, now. A Task in the cache exists (its deletion, if
/// any, wakes this key again); one missing from the cache is looked up in the store. The claim is
/// asked only with `ask_claim`; without it a starting Lease counts as unclaimed.
fn facts(ctx: &Ctx, lease: &Lease, ask_claim: bool) -> Result<Facts, Error> {
    let local = lease
        .status
        .host
        .as_deref()
        .is_none_or(|h| h == ctx.settings.host);
    // A Task of the same name with another uid is a new Task: the one this run was for is gone.
    let task_exists = ctx.task_of(lease)?.is_some();
    let claimed = ask_claim
        && lease.status.phase == LeasePhase::Pending
        && task_exists
        && local
        && Claim::is_held(&ctx.state_dir, &lease.metadata.uid).unwrap_or(false);
    Ok(Facts {
        now: SystemTime::now(),
        local,
        task_exists,
        claimed,
        record_grace: record_grace(ctx.settings.kill_grace),
    })
}

/// Marks the Lease Terminating, kills the run's process group, then fails the attempt.
async fn reclaim(ctx: &Ctx, lease: Lease, local: bool, reason: &str) -> Result<(), Error> {
    let name = lease.metadata.name.clone();
    let uid = lease.metadata.uid.clone();
    let message = reason.to_string();
    let marked = ctx.patch_lease(&name, |l| {
        if l.metadata.uid == uid && l.status.phase != LeasePhase::Completed {
            l.status.phase = LeasePhase::Terminating;
            l.status.message = Some(message.clone());
        }
    })?;
    // Completed since we judged it (the shim recorded the real result as it exited): the lease
    // controller records that outcome; reclaiming now would fail a run that succeeded.
    let Some(lease) =
        marked.filter(|l| l.metadata.uid == uid && l.status.phase != LeasePhase::Completed)
    else {
        return Ok(());
    };
    let task = ctx.stored_task_of(&lease)?;
    // A Lease left Terminating by a process that stopped after recording the attempt: its
    // processes are still looked for and ended, but the reclaim was told and counted already.
    let told = |t: &&Task| !super::lease::past_attempt(t, lease.spec.attempt);
    if let Some(t) = task.as_ref().filter(told) {
        ctx.event(
            t,
            EventType::Warning,
            "Reclaiming",
            &format!("lease/{name} (attempt {}): {reason}", lease.spec.attempt),
        );
    }
    // Kill first (invariant 4): the group of a process that is still the one we started, or of
    // what an exited agent left behind in it, or, for a run the shim never recorded, the groups
    // of its unrecorded agents.
    let mut started = false;
    if local {
        let s = &lease.status;
        let agent_alive = recorded_alive(s, s.pid, s.process_start_time);
        // What cannot be looked at (an unreadable /proc) is an error: the reclaim is tried again
        // later rather than requeue the task beside a run it could not see.
        let proc_err =
            |e: std::io::Error| Error(format!("lease/{name}: cannot look for its processes: {e}"));
        let log = log_path(&ctx.state_dir, &lease.spec.task, lease.spec.attempt);
        // The shim's session, which the agent's group belongs to: it marks what the agent left
        // there even without the run's environment or log (only for a Lease that names its
        // boot: numbers of another boot say nothing).
        let session = match (s.shim_pid, s.process_start_time) {
            (Some(shim), Some(since)) if s.boot_id.is_some() && recorded_this_boot(s) => {
                Some((shim, since))
            }
            _ => None,
        };
        let left_behind = match (s.pid, s.pgid.filter(|g| *g > 1)) {
            (Some(_), Some(pgid)) if !agent_alive => {
                group_has_run(pgid, &name, lease.spec.attempt, &log, session).map_err(proc_err)?
            }
            _ => false,
        };
        match (s.pid, s.pgid.filter(|g| *g > 1)) {
            (None, _) => {
                let groups = unrecorded_groups(ctx, &lease).map_err(proc_err)?;
                kill_groups(ctx, &name, &groups, UNRECORDED, task.as_ref()).await?;
                // An agent found is one that started: the attempt is recorded as such.
                started = !groups.is_empty();
            }
            (Some(_), Some(pgid)) if agent_alive => {
                kill_groups(ctx, &name, &[pgid], "", task.as_ref()).await?;
            }
            (Some(_), Some(pgid)) if left_behind => {
                kill_groups(ctx, &name, &[pgid], LEFT_BEHIND, task.as_ref()).await?;
            }
            _ => {}
        }
        if s.pid.is_some() {
            // What left the agent's group (`setsid`, a double fork) still writes to the run's
            // log: it is ended too, or the next attempt would run beside it (invariants 1 and
            // 4). The recorded group is over by now, so whatever is found is another.
            let escaped = unrecorded_groups(ctx, &lease).map_err(proc_err)?;
            kill_groups(ctx, &name, &escaped, ESCAPED, task.as_ref()).await?;
        }
    }
    record_reclaimed(ctx, &lease, reason, task.as_ref(), started)?;
    // A deleted Task's logs were kept for the look above (`delete task` leaves them while its
    // run lives): they go now, unless a new Task of the name has come meanwhile.
    if local && task.is_none() && ctx.store.try_get::<Task>(&lease.spec.task)?.is_none() {
        if let Err(e) = crate::agent::shim::remove_logs(&ctx.state_dir, &lease.spec.task) {
            tracing::warn!("cannot remove {e}");
        }
    }
    Ok(())
}

/// Fails the attempt of `lease` as reclaimed for `reason` (after its kill: invariant 4), counts it
/// under its reason and says so on its Task, unless the attempt was recorded already (a crash
/// between the Task's write and the Lease's delete). `started`: an agent of the attempt is known
/// to have started, though the Lease records none.
fn record_reclaimed(
    ctx: &Ctx,
    lease: &Lease,
    reason: &str,
    task: Option<&Task>,
    started: bool,
) -> Result<(), Error> {
    let ending = Ending {
        exit_code: None,
        signal: None,
        reclaimed: Some(reason.to_string()),
        message: None,
        started,
    };
    if !outcome::record(ctx, lease, &ending)? {
        return Ok(());
    }
    Summary::bump(&ctx.summary.reclaimed);
    ctx.metrics
        .counter(
            RECLAIMS_METRIC,
            RECLAIMS_HELP,
            &[("reason", reason_label(reason))],
        )
        .inc();
    if let Some(t) = task {
        let message = format!(
            "lease/{} (attempt {}): {reason}",
            lease.metadata.name, lease.spec.attempt
        );
        ctx.event(t, EventType::Warning, "Reclaimed", &message);
    }
    Ok(())
}

/// How a Killed event names the group of an agent found by [`unrecorded_groups`].
pub const UNRECORDED: &str = "of an agent its shim never recorded ";
/// How a Killed event names the group of an agent whose Lease was deleted by hand.
pub const WITHOUT_LEASE: &str = "of an agent whose Lease was deleted ";
/// How a Killed event names a group whose agent had exited, leaving other processes in it.
pub const LEFT_BEHIND: &str = "left behind by the exited agent ";
/// How a Killed event names the group of a process of the run that left the agent's group.
pub const ESCAPED: &str = "of a process of the run outside the agent's group ";

/// The process groups of agents this Lease's run started that its Lease does not name: a shim
/// killed before its first write leaves one running. Looked for only when the run's log file
/// exists (the shim opens it before it starts the agent), so a Lease that never got that far
/// costs one `lstat`. An error: the log or `/proc` could not be looked at, so no agent can be
/// ruled out.
pub fn unrecorded_groups(ctx: &Ctx, lease: &Lease) -> std::io::Result<Vec<i32>> {
    let log = log_path(&ctx.state_dir, &lease.spec.task, lease.spec.attempt);
    match std::fs::symlink_metadata(&log) {
        Ok(_) => {}
        // No log (or no directory it could be in): the shim started no agent.
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || e.raw_os_error() == Some(nix::libc::ENOTDIR) =>
        {
            return Ok(Vec::new())
        }
        Err(e) => {
            return Err(std::io::Error::new(
                e.kind(),
                format!("{}: {e}", log.display()),
            ))
        }
    }
    groups_of_unrecorded_run(&log)
}

/// Ends each process group (SIGTERM, then SIGKILL after the grace) and says so on the Task.
/// `whose` qualifies the group in the event ("" or [`UNRECORDED`]).
pub async fn kill_groups(
    ctx: &Ctx,
    lease: &str,
    groups: &[i32],
    whose: &str,
    task: Option<&Task>,
) -> Result<(), Error> {
    for &pgid in groups {
        let k = terminate_group(pgid, ctx.settings.kill_grace).await;
        if !k.terminated {
            return Err(Error(format!(
                "lease/{lease}: process group {pgid} survived SIGKILL; will try again"
            )));
        }
        if let Some(t) = task {
            let how = if k.killed {
                format!(
                    "process group {pgid} {whose}ignored SIGTERM for {}s and was SIGKILLed",
                    ctx.settings.kill_grace.as_secs()
                )
            } else {
                format!("process group {pgid} {whose}ended on SIGTERM")
            };
            ctx.event(t, EventType::Warning, "Killed", &how);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(now: SystemTime, local: bool, task_exists: bool) -> Facts {
        Facts {
            now,
            local,
            task_exists,
            claimed: false,
            record_grace: record_grace(Duration::from_secs(10)),
        }
    }
    use crate::resources::lease::test_lease;
    use crate::resources::meta::format_time;

    fn lease(phase: LeasePhase, renewed_ago: u64, running_for: u64) -> Lease {
        let now = SystemTime::now();
        let mut l = test_lease("t", "a", 1);
        l.spec.lease_duration_seconds = 45;
        l.spec.max_runtime_seconds = 3600;
        l.metadata.creation_timestamp = Some(format_time(now - Duration::from_secs(running_for)));
        l.status.phase = phase;
        l.status.renew_time = Some(format_time(now - Duration::from_secs(renewed_ago)));
        l.status.acquire_time = Some(format_time(now - Duration::from_secs(running_for)));
        l
    }

    #[test]
    fn a_process_recorded_in_another_boot_is_dead_though_its_pid_and_start_time_match() {
        let now = SystemTime::now();
        // This test process stands for the agent and the shim: alive, with matching start times.
        let me = std::process::id() as i32;
        let mut l = lease(LeasePhase::Running, 0, 5);
        l.status.pid = Some(me);
        l.status.process_start_time = crate::agent::liveness::start_time_of(me);
        l.status.shim_pid = Some(me);
        l.status.shim_start_time = l.status.process_start_time;
        for (boot, alive) in [
            (None, true),
            (Some(crate::store::revision::boot_id().to_string()), true),
            (Some("a-boot-before-a-reboot".to_string()), false),
        ] {
            l.status.boot_id = boot.clone();
            let v = judge(&l, &facts(now, true, true));
            assert_eq!(matches!(v, Verdict::Healthy(_)), alive, "{boot:?}: {v:?}");
        }
    }

    #[test]
    fn reclaim_holds_a_pending_leases_claim_so_no_shim_can_start_it_meanwhile() {
        let d = tempfile::tempdir().unwrap();
        let pending = lease(LeasePhase::Pending, 0, 100);
        let uid = &pending.metadata.uid;
        let held = hold_claim(d.path(), &pending, true).unwrap();
        assert!(matches!(held, ClaimHold::Held(_)), "{held:?}");
        assert!(
            Claim::acquire(d.path(), uid).unwrap().is_none(),
            "a shim starting now finds the claim taken and runs nothing"
        );
        drop(held);
        let shim = Claim::acquire(d.path(), uid).unwrap().expect("free again");
        let starting = hold_claim(d.path(), &pending, true).unwrap();
        assert!(
            matches!(starting, ClaimHold::Starting),
            "a shim that took the claim after the verdict is starting the run: {starting:?}"
        );
        drop(shim);
        for (l, local) in [
            (lease(LeasePhase::Running, 100, 100), true),
            (pending.clone(), false),
        ] {
            let h = hold_claim(d.path(), &l, local).unwrap();
            assert!(matches!(h, ClaimHold::NotNeeded), "{h:?}");
        }
    }

    #[test]
    fn every_lease_change_wakes_reclaim_except_a_completed_lease() {
        for phase in [
            LeasePhase::Pending,
            LeasePhase::Running,
            LeasePhase::Terminating,
        ] {
            assert_eq!(keys_for_lease(&lease(phase, 0, 0)), vec!["t".to_string()]);
        }
        assert!(keys_for_lease(&lease(LeasePhase::Completed, 0, 0)).is_empty());
    }

    #[test]
    fn a_remote_lease_is_judged_by_its_renew_time_alone() {
        let fresh = lease(LeasePhase::Running, 10, 100);
        assert!(matches!(
            judge(&fresh, &facts(SystemTime::now(), false, true)),
            Verdict::Healthy(_)
        ));
        let stale = lease(LeasePhase::Running, 140, 200);
        match judge(&stale, &facts(SystemTime::now(), false, true)) {
            Verdict::Stale(r) => assert!(r.starts_with("heartbeat expired 95s ago"), "{r}"),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn a_local_run_with_no_live_process_is_stale_at_once() {
        let mut l = lease(LeasePhase::Running, 1, 5);
        l.status.pid = Some(i32::MAX - 7);
        l.status.process_start_time = Some(1);
        match judge(&l, &facts(SystemTime::now(), true, true)) {
            Verdict::Stale(r) => assert!(r.contains("without recording a result"), "{r}"),
            v => panic!("{v:?}"),
        }
    }

    /// A Running local Lease whose agent has exited (a pid that is not alive) and whose shim is
    /// this test process (alive).
    fn recording(renewed_ago: u64) -> Lease {
        let mut l = lease(LeasePhase::Running, renewed_ago, renewed_ago + 5);
        l.status.pid = Some(i32::MAX - 7);
        l.status.process_start_time = Some(1);
        let me = std::process::id() as i32;
        l.status.shim_pid = Some(me);
        l.status.shim_start_time = crate::agent::liveness::start_time_of(me);
        l
    }

    #[test]
    fn an_expired_lease_whose_agent_exited_waits_for_its_live_shim_to_record_the_result() {
        let now = SystemTime::now();
        // Expired 55 s ago (45 s lease).
        match judge(&recording(100), &facts(now, true, true)) {
            Verdict::AwaitingShim(after, why) => {
                assert!(after <= Duration::from_secs(45), "{after:?}");
                assert_eq!(why, "heartbeat expired 55s ago");
            }
            v => panic!("{v:?}"),
        }
        // Not expired: healthy, as any run being renewed.
        assert!(matches!(
            judge(&recording(10), &facts(now, true, true)),
            Verdict::Healthy(_)
        ));
    }

    #[test]
    fn a_live_shim_that_records_nothing_for_the_whole_grace_gets_its_run_reclaimed() {
        let expired = 45 + record_grace(Duration::from_secs(10)).as_secs() + 1;
        match judge(&recording(expired), &facts(SystemTime::now(), true, true)) {
            Verdict::Stale(r) => {
                assert!(r.starts_with("heartbeat expired"), "{r}");
                assert!(r.contains("its shim recorded nothing"), "{r}");
                assert_eq!(reason_label(&r), "heartbeat");
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn an_over_time_lease_whose_agent_exited_waits_for_its_live_shim_for_the_grace_only() {
        let now = SystemTime::now();
        // Renewed just now; running for 5 s, 4 s past its maximum.
        let mut l = recording(0);
        l.spec.max_runtime_seconds = 1;
        match judge(&l, &facts(now, true, true)) {
            Verdict::AwaitingShim(_, why) => assert_eq!(why, "exceeded its maximum runtime of 1s"),
            v => panic!("{v:?}"),
        }
        let grace = record_grace(Duration::from_secs(10));
        let started = now - grace - Duration::from_secs(3);
        l.status.acquire_time = Some(format_time(started));
        match judge(&l, &facts(now, true, true)) {
            Verdict::Stale(r) => {
                assert!(r.starts_with("exceeded its maximum runtime of 1s"), "{r}");
                assert!(r.contains("its shim recorded nothing"), "{r}");
                assert_eq!(reason_label(&r), "max-runtime");
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn an_expired_lease_whose_agent_still_runs_is_stale_however_alive_its_shim() {
        let mut l = recording(100);
        let me = std::process::id() as i32;
        l.status.pid = Some(me);
        l.status.process_start_time = crate::agent::liveness::start_time_of(me);
        match judge(&l, &facts(SystemTime::now(), true, true)) {
            Verdict::Stale(r) => assert_eq!(r, "heartbeat expired 55s ago"),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn an_over_time_run_is_stale() {
        let l = lease(LeasePhase::Running, 1, 3700);
        match judge(&l, &facts(SystemTime::now(), false, true)) {
            Verdict::Stale(r) => assert!(r.contains("maximum runtime of 3600s"), "{r}"),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn every_stale_verdict_maps_to_a_known_reason_label() {
        let label = |v: Verdict| match v {
            Verdict::Stale(r) => reason_label(&r),
            v => panic!("{v:?}"),
        };
        let now = SystemTime::now();
        assert_eq!(
            label(judge(
                &lease(LeasePhase::Running, 140, 200),
                &facts(now, false, true)
            )),
            "heartbeat"
        );
        assert_eq!(
            label(judge(
                &lease(LeasePhase::Running, 1, 3700),
                &facts(now, false, true)
            )),
            "max-runtime"
        );
        let mut gone = lease(LeasePhase::Running, 1, 5);
        gone.status.pid = Some(i32::MAX - 7);
        gone.status.process_start_time = Some(1);
        assert_eq!(label(judge(&gone, &facts(now, true, true))), "lost");
        assert_eq!(
            label(judge(
                &lease(LeasePhase::Running, 1, 5),
                &facts(now, false, false)
            )),
            "task-deleted"
        );
        assert_eq!(
            label(judge(
                &lease(LeasePhase::Pending, 1, 100),
                &facts(now, true, true)
            )),
            "never-started"
        );
        assert_eq!(reason_label("being reclaimed"), "other");
        assert_eq!(reason_label(LEASE_DELETED), "lease-deleted");
        for r in [
            "heartbeat",
            "max-runtime",
            "lost",
            "task-deleted",
            "never-started",
            "lease-deleted",
        ] {
            assert!(REASONS.contains(&r));
        }
    }

    #[test]
    fn an_old_pending_lease_is_stale_unless_a_starting_shim_holds_its_claim() {
        let l = lease(LeasePhase::Pending, 1, 100);
        let now = SystemTime::now();
        assert!(matches!(
            judge(&l, &facts(now, true, true)),
            Verdict::Stale(_)
        ));
        let claimed = Facts {
            claimed: true,
            ..facts(now, true, true)
        };
        assert!(matches!(judge(&l, &claimed), Verdict::Healthy(_)));
        // A claim on this host says nothing about a run on another host.
        let remote = Facts {
            local: false,
            ..claimed
        };
        assert!(matches!(judge(&l, &remote), Verdict::Stale(_)));
    }

    #[test]
    fn a_lease_whose_task_is_gone_is_stale() {
        let l = lease(LeasePhase::Running, 1, 5);
        assert!(matches!(
            judge(&l, &facts(SystemTime::now(), false, false)),
            Verdict::Stale(_)
        ));
    }

    fn task(phase: crate::resources::TaskPhase, lease: Option<&str>) -> Task {
        let mut t = Task::new("Task", "t", Default::default());
        t.status.phase = phase;
        t.status.lease = lease.map(String::from);
        t
    }

    #[test]
    fn a_task_change_wakes_the_lease_it_shows() {
        use crate::resources::TaskPhase::Running;
        assert_eq!(leases_of_task(&task(Running, Some("t")), |_| false), ["t"]);
    }

    #[test]
    fn a_task_change_wakes_a_cached_lease_of_a_run_it_does_not_show_yet() {
        use crate::resources::TaskPhase::Pending;
        assert_eq!(leases_of_task(&task(Pending, None), |n| n == "t"), ["t"]);
        assert!(leases_of_task(&task(Pending, None), |_| false).is_empty());
    }

    #[test]
    fn a_finished_task_wakes_no_lease() {
        use crate::resources::TaskPhase::Succeeded;
        assert!(leases_of_task(&task(Succeeded, None), |_| true).is_empty());
    }
}
