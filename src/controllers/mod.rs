//! The scheduling controllers: assignment (task → agent), lease (run the agent, record the outcome),
//! reclaim (kill and requeue stale runs), status (agent and queue counters) and gc (finished-task
//! TTL). Each is a reconcile function over the shared [`Ctx`]; the framework lives in `runtime`.

pub mod assignment;
pub mod dispatch;
pub mod lease;
pub mod outcome;
pub mod plan;
pub mod reclaim;
pub mod status;
pub mod tinytask_sync;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::resources::event::{EventType, ObjectReference};
use crate::resources::{Agent, Lease, Queue, Resource, Task};
use crate::runtime::events::Recorder;
use crate::runtime::informer::Informer;
use crate::runtime::metrics::Metrics;
use crate::store::{Store, StoreError};

/// Settings the controllers act on.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Print each decision instead of acting on it.
    pub dry_run: bool,
    /// Ignore `blockedBy` everywhere (`TINYSCHEDULER_DISABLE_BLOCKING=1`).
    pub disable_blocking: bool,
    /// Delay before the first retry of a failed attempt; doubles per attempt.
    pub retry_base: Duration,
    /// Longest delay between attempts.
    pub retry_cap: Duration,
    /// Time between SIGTERM and SIGKILL when a run is reclaimed.
    pub kill_grace: Duration,
    /// `host/pid` written into every Lease this scheduler creates.
    pub holder: String,
    /// This host's name, to tell our own runs from other hosts'.
    pub host: String,
    /// The tinytask server of Queues that name no `spec.endpoint`.
    pub tinytask_endpoint: String,
    /// How long a Lease exists before its Task is made to show it (zero: at once). The Lease is
    /// the commit point and holds the run's state; the Task's `Assigned` and `Running` phases
    /// mirror it. A run that ends sooner goes from Pending straight to its outcome, written once,
    /// which saves two durable Task writes per short run (and the assignment loop one of its two);
    /// a longer run's Task shows it Running (or Assigned, if its shim has not started it yet)
    /// once the delay has passed. The daemon uses [`MIRROR_DELAY`]; `run --once` mirrors at once,
    /// since it may exit before any delay passes. Tasks from tinytask are always mirrored at once:
    /// their claim on the server is keyed on the Task showing its Lease.
    pub mirror_delay: Duration,
    /// Workers of the lease, reclaim and tinytask sync controllers (`TINYSCHEDULER_WORKERS`).
    pub workers: usize,
}

/// Default [`Settings::retry_base`] (`TINYSCHEDULER_RETRY_BASE_SEC`).
pub const DEFAULT_RETRY_BASE: Duration = Duration::from_secs(10);
/// Default [`Settings::retry_cap`] (`TINYSCHEDULER_RETRY_MAX_SEC`).
pub const DEFAULT_RETRY_CAP: Duration = Duration::from_secs(600);

/// The daemon's [`Settings::mirror_delay`].
pub const MIRROR_DELAY: Duration = Duration::from_millis(50);

impl Default for Settings {
    fn default() -> Self {
        Settings {
            dry_run: false,
            disable_blocking: false,
            retry_base: DEFAULT_RETRY_BASE,
            retry_cap: DEFAULT_RETRY_CAP,
            kill_grace: crate::agent::shim::DEFAULT_KILL_GRACE,
            holder: format!("{}/{}", crate::agent::hostname(), std::process::id()),
            host: crate::agent::hostname(),
            tinytask_endpoint: crate::tinytask::DEFAULT_ENDPOINT.to_string(),
            mirror_delay: Duration::ZERO,
            workers: crate::config::DEFAULT_WORKERS as usize,
        }
    }
}

impl Settings {
    /// The delay before attempt `failed + 1` after `failed` failed attempts.
    pub fn retry_delay(&self, failed: i64) -> Duration {
        let exp = (failed.max(1) - 1).min(30) as u32;
        self.retry_base
            .checked_mul(1u32 << exp.min(31))
            .unwrap_or(self.retry_cap)
            .min(self.retry_cap)
    }
}

/// What one `run --once` did, printed as its summary.
#[derive(Debug, Default)]
pub struct Summary {
    /// How many Leases the lease controller looked at: each once, however often it did.
    leases_scanned: AtomicU64,
    /// The uid of each live Lease counted in `leases_scanned`, by name (a Lease that is gone
    /// leaves, so that a daemon remembers only the runs it has now).
    scanned: Mutex<HashMap<String, String>>,
    pub reclaimed: AtomicU64,
    pub completed: AtomicU64,
    pub assigned: AtomicU64,
    pub started: AtomicU64,
    pub blocked: AtomicU64,
    pub errors: AtomicU64,
}

impl Summary {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts Lease `name` with this uid as scanned (once per uid).
    pub fn scanned(&self, name: &str, uid: &str) {
        let mut seen = self.scanned.lock().unwrap_or_else(|p| p.into_inner());
        if seen.get(name).map(String::as_str) != Some(uid) {
            seen.insert(name.to_string(), uid.to_string());
            Summary::bump(&self.leases_scanned);
        }
    }

    /// Forgets Lease `name`, which is gone (it stays counted).
    pub fn gone(&self, name: &str) {
        self.scanned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        write!(
            f,
            "leases scanned: {}, reclaimed: {}, completed: {}, assigned: {}, started: {}, blocked: {}, errors: {}",
            g(&self.leases_scanned),
            g(&self.reclaimed),
            g(&self.completed),
            g(&self.assigned),
            g(&self.started),
            g(&self.blocked),
            g(&self.errors),
        )
    }
}

/// A shim this process started for a Lease.
#[derive(Debug, Clone)]
pub struct SpawnedShim {
    /// The Lease it was started for, as it was then: what its run is, should the Lease be
    /// deleted before its Task shows it (see `lease::show_run_of_deleted_lease`).
    pub lease: Arc<Lease>,
    pub pid: u32,
    /// When it was started.
    pub at: std::time::Instant,
}

/// Everything a reconciler needs: the store, the shared informers, the event recorder, settings.
pub struct Ctx {
    pub store: Store,
    /// The state directory, absolute (made so by `Scheduler::start`).
    pub state_dir: PathBuf,
    pub tasks: Informer<Task>,
    pub agents: Informer<Agent>,
    pub queues: Informer<Queue>,
    pub leases: Informer<Lease>,
    pub recorder: Recorder,
    pub settings: Settings,
    pub summary: Summary,
    /// Shims this process started, by lease name.
    pub spawned: Mutex<HashMap<String, SpawnedShim>>,
    /// Runs whose Lease was deleted while their shim still held them, by run key
    /// (`agent::claim::run_key`): when reclaim first found each so (see
    /// `reclaim::without_lease`).
    pub shim_waits: Mutex<HashMap<String, std::time::Instant>>,
    /// Leases whose Task does not show them Running yet, by lease name: (lease uid, when this
    /// process first saw the Lease). See [`Settings::mirror_delay`].
    pub leases_seen: Mutex<HashMap<String, (String, std::time::Instant)>>,
    /// Last status write per status key, to batch bursts.
    pub status_writes: Mutex<HashMap<String, std::time::Instant>>,
    /// The runtime registry served on `/metrics` (reclaims, dispatch latency).
    pub metrics: Metrics,
    /// When each task not yet dispatched became runnable (fed by the Task informer).
    pub runnable_since: Arc<dispatch::RunnableSince>,
    /// The tinytask sync controller's per-queue poll state and source health.
    pub tinytask: tinytask_sync::SyncState,
}

/// Whether a periodic resync should wake this Task's keys in the assignment and status
/// controllers: only while it is unfinished. A finished Task is never assigned (as a blocker, its
/// last change already woke the assignment loop), its queue's counters were recounted when it
/// changed, and its TTL deletion is a `RequeueAfter` set by the reconcile its last change caused
/// (or the initial list's, after a restart). Re-checking 10,000 finished tasks every resync was
/// most of an idle daemon's CPU.
pub fn task_needs_resync(t: &Task) -> bool {
    !t.status.phase.is_finished()
}

/// A reconcile failure; the runtime backs the key off and retries.
#[derive(Debug)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error(e.to_string())
    }
}

/// A reference to an object for events.
pub fn object_ref<K: Resource>(obj: &K) -> ObjectReference {
    ObjectReference {
        kind: K::KIND.to_string(),
        name: obj.meta().name.clone(),
        uid: obj.meta().uid.clone(),
    }
}

/// What one assignment pass plans from (see [`Ctx::planning_snapshot`]).
pub struct PlanningSnapshot {
    /// Every cached Task.
    pub tasks: Vec<Arc<Task>>,
    /// The live Leases in the cache.
    pub leases: Vec<Arc<Lease>>,
    /// Runs this process started whose Lease is gone and whose Task does not show them yet.
    pub without_lease: Vec<Arc<Lease>>,
}

impl Ctx {
    /// Records an event on `obj` (best effort: failures are logged, never fatal). Nothing is
    /// written in a dry run.
    pub fn event<K: Resource>(&self, obj: &K, type_: EventType, reason: &str, message: &str) {
        if self.settings.dry_run {
            return;
        }
        // A Warning Event (Retrying, Failed, Reclaimed, Killed, …) is a warning in the log too, so
        // that `journalctl -p warning` shows every run that went wrong.
        match type_ {
            EventType::Warning => {
                tracing::warn!(kind = K::KIND, name = %obj.meta().name, reason, "{message}")
            }
            EventType::Normal => {
                tracing::info!(kind = K::KIND, name = %obj.meta().name, reason, "{message}")
            }
        }
        if let Err(e) = self
            .recorder
            .publish(&object_ref(obj), type_, reason, message)
        {
            tracing::warn!(kind = K::KIND, name = %obj.meta().name, "cannot record event {reason}: {e}");
        }
    }

    /// Whether a shim of `task`'s attempt `attempt` still lives on this host: it holds the run's
    /// claim (`agent::claim::run_key`) for as long as it does, with or without its Lease.
    pub fn shim_runs(&self, task: &Task, attempt: i64) -> Result<bool, Error> {
        let name = &task.metadata.name;
        let uid = &task.metadata.uid;
        crate::agent::claim::run_is_held(&self.state_dir, name, uid, attempt).map_err(|e| {
            Error(format!(
                "task/{name}: cannot ask whether a shim runs it: {e}"
            ))
        })
    }

    /// What the assignment plans from: the Task snapshot, the live Leases, and the Leases of runs
    /// this process started that are gone while their Task does not show the attempt, neither
    /// running nor over (a Lease deleted by hand before its Task showed it, until the lease
    /// controller makes the Task show the run: `lease::show_run_of_deleted_lease`). The planner
    /// counts those as live Leases, so that their agents' slots stay taken (invariant 2) and their
    /// tasks are not assigned again meanwhile.
    ///
    /// Read in the order a run moves through them, so that none falls between two reads: its
    /// Lease leaves the cache, then the lease controller makes the Task show the run, then drops
    /// its entry. Leases first, entries next, Tasks last: a run whose Lease was read gone still
    /// has its entry, or else the Tasks read after show it; and an entry counts unless the very
    /// Tasks the planner sees show its run (which then hold its slot themselves, `plan::slots_held`).
    pub fn planning_snapshot(&self) -> PlanningSnapshot {
        let leases = self.leases.list();
        let mut without_lease: Vec<Arc<Lease>> = {
            let spawned = self.spawned.lock().unwrap_or_else(|p| p.into_inner());
            let cached: std::collections::HashSet<&str> =
                leases.iter().map(|l| l.metadata.name.as_str()).collect();
            spawned
                .iter()
                .filter(|(name, _)| !cached.contains(name.as_str()))
                .map(|(_, s)| s.lease.clone())
                .collect()
        };
        let tasks = self.tasks.snapshot();
        if !without_lease.is_empty() {
            let by_name: HashMap<&str, &Arc<Task>> = tasks
                .iter()
                .map(|t| (t.metadata.name.as_str(), t))
                .collect();
            without_lease.retain(|l| {
                by_name
                    .get(l.spec.task.as_str())
                    .is_some_and(|t| lease::shows_assignment_next(t, l))
            });
        }
        PlanningSnapshot {
            tasks,
            leases,
            without_lease,
        }
    }

    /// Prints a dry-run decision (`would assign task/x to agent/y`).
    pub fn would(&self, decision: &str) {
        crate::outln!("would {decision}");
    }

    /// Updates a Task's status with `f` (re-reading on conflict) and puts the result into the cache.
    /// Returns `None` if the task does not exist.
    pub fn patch_task(&self, name: &str, f: impl FnMut(&mut Task)) -> Result<Option<Task>, Error> {
        let t = self.store.patch_status::<Task>(name, f)?;
        if let Some(t) = &t {
            self.tasks.observe(t.clone());
        }
        Ok(t)
    }

    /// The Task `lease` runs, from the cache, else the store. `None` when it is gone, also when a
    /// new Task has its name (another uid; see [`crate::resources::LeaseSpec::runs`]).
    pub fn task_of(&self, lease: &Lease) -> Result<Option<Arc<Task>>, Error> {
        match self.tasks.get(&lease.spec.task) {
            Some(t) => Ok(Some(t).filter(|t| lease.spec.runs(t))),
            None => Ok(self.stored_task_of(lease)?.map(Arc::new)),
        }
    }

    /// [`Ctx::task_of`] read from the store, for a decision that must rest on the newest version.
    pub fn stored_task_of(&self, lease: &Lease) -> Result<Option<Task>, Error> {
        let task = self.store.try_get::<Task>(&lease.spec.task)?;
        Ok(task.filter(|t| lease.spec.runs(t)))
    }

    /// Updates a Lease's status with `f` and puts the result into the cache.
    pub fn patch_lease(
        &self,
        name: &str,
        f: impl FnMut(&mut Lease),
    ) -> Result<Option<Lease>, Error> {
        let l = self.store.patch_status::<Lease>(name, f)?;
        if let Some(l) = &l {
            self.leases.observe(l.clone());
        }
        Ok(l)
    }

    /// Deletes the Lease `name` if it is still the one with `uid` (a later attempt's Lease, which
    /// reuses the name, is left alone).
    pub fn delete_lease(&self, name: &str, uid: &str) -> Result<(), Error> {
        // The cache usually holds the version to delete (the shim's last write), so it is tried
        // first; the store's resourceVersion check turns a newer one into a conflict, and the
        // version in the store is read then.
        let mut known = self
            .leases
            .get(name)
            .filter(|l| l.metadata.uid == uid)
            .map(|l| l.metadata.resource_version.clone());
        loop {
            let version = match known.take() {
                Some(v) => v,
                None => {
                    let Some(current) = self.store.try_get::<Lease>(name)? else {
                        self.leases.observe_deleted(name);
                        return Ok(());
                    };
                    if current.metadata.uid != uid {
                        return Ok(());
                    }
                    current.metadata.resource_version
                }
            };
            match self.store.delete::<Lease>(name, Some(&version)) {
                Ok(_) => {
                    self.leases.observe_deleted(name);
                    // Only this Lease's entry: a later attempt's Lease of the same name may have
                    // had its shim started meanwhile.
                    let mut spawned = self.spawned.lock().unwrap_or_else(|p| p.into_inner());
                    if spawned
                        .get(name)
                        .is_some_and(|s| s.lease.metadata.uid == uid)
                    {
                        spawned.remove(name);
                    }
                    return Ok(());
                }
                Err(e) if e.is_conflict() => continue,
                Err(e) if e.is_not_found() => {
                    self.leases.observe_deleted(name);
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_up_to_the_cap() {
        let s = Settings::default();
        let d: Vec<u64> = (1..=8).map(|n| s.retry_delay(n).as_secs()).collect();
        assert_eq!(d, [10, 20, 40, 80, 160, 320, 600, 600]);
    }
}
