//! Wiring: the shared informers, the controllers' context, and the five controllers, run either to
//! a fixed point (`run --once`) or until shutdown (`run --daemon`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use crate::controllers::{
    assignment, dispatch, lease, reclaim, status, task_needs_resync, tinytask_sync, Ctx, Settings,
    Summary,
};
use crate::daemon::signals::Shutdown;
use crate::daemon::watchdog::Heartbeat;
use crate::resources::{Agent, Lease, Queue, Task, TaskPhase};
use crate::runtime::backoff::Backoff;
use crate::runtime::controller::{Action, Controller};
use crate::runtime::events::Recorder;
use crate::runtime::informer::{Informer, InformerEvent, InformerOptions};
use crate::runtime::metrics::Metrics;
use crate::runtime::workqueue::WorkQueue;
use crate::store::Store;

/// The work-queue key that proves the assignment loop is alive (for the systemd watchdog).
pub const HEARTBEAT_KEY: &str = "heartbeat";

/// At most this many tasks are named by [`Scheduler::waiting_on`]; the rest are counted.
const WAITING_ON_TASKS_MAX: usize = 20;

/// A running set of controllers over one store.
pub struct Scheduler {
    pub ctx: Arc<Ctx>,
    pub metrics: Metrics,
    /// Each controller's name and work queue, the assignment loop's first.
    queues: Vec<(&'static str, WorkQueue<String>)>,
    tasks: JoinSet<()>,
    shutdown: Shutdown,
}

/// Tuning that is not a controller setting.
#[derive(Clone, Default)]
pub struct Options {
    pub informers: InformerOptions,
    /// Beaten by the assignment loop each time it handles [`HEARTBEAT_KEY`].
    pub heartbeat: Option<Heartbeat>,
    /// Print each Task's phase changes ([`print_progress`]) from the very first, as
    /// `run --once --wait` does.
    pub progress: bool,
}

impl Scheduler {
    /// Builds the informers and controllers and starts them. Must run inside a tokio runtime.
    pub fn start(store: Store, state_dir: PathBuf, settings: Settings, opts: Options) -> Scheduler {
        let metrics = Metrics::default();
        let informer = |_: &str| opts.informers.clone();
        let ctx = Arc::new(Ctx {
            recorder: Recorder::new(store.clone(), "tinyscheduler"),
            tasks: Informer::new(store.clone(), informer("tasks")),
            agents: Informer::new(store.clone(), informer("agents")),
            queues: Informer::new(store.clone(), informer("queues")),
            leases: Informer::new(store.clone(), informer("leases")),
            store,
            // Absolute once here: shims are started with it and run logs are named by it.
            state_dir: std::path::absolute(&state_dir).unwrap_or(state_dir),
            settings,
            summary: Summary::default(),
            spawned: Default::default(),
            shim_waits: Default::default(),
            leases_seen: Default::default(),
            status_writes: Default::default(),
            metrics: metrics.clone(),
            runnable_since: Default::default(),
            tinytask: Default::default(),
        });
        ctx.tasks.add_index(status::BLOCKED_BY_INDEX, |t: &Task| {
            t.spec.blocked_by.clone()
        });
        ctx.tasks.add_index(status::RUNS_ON_INDEX, status::runs_on);
        let since = ctx.runnable_since.clone();
        ctx.tasks.on_event(move |ev, _| since.on_task_event(ev));
        // Before anything starts: registered later, it could miss the first pass's changes.
        if opts.progress {
            print_progress(&ctx.tasks);
        }
        dispatch::register(&metrics);
        reclaim::register(&metrics);
        let shutdown = Shutdown::new();
        let mut tasks = JoinSet::new();
        let mut queues = Vec::new();
        fn one<K>(_: &K) -> Vec<String> {
            vec![assignment::KEY.to_string()]
        }

        let c = Controller::new("assignment", ctx.clone(), metrics.clone())
            .grace_period(STOP_GRACE)
            .watches_filtered(&ctx.tasks, one::<Task>, task_needs_resync)
            .watches(&ctx.agents, one::<Agent>)
            .watches(&ctx.queues, one::<Queue>)
            .watches(&ctx.leases, one::<Lease>)
            .workers(1)
            .worker_threads();
        queues.push(("assignment", c.queue()));
        let heartbeat = opts.heartbeat.clone();
        tasks.spawn(c.run(
            move |key: String, ctx: Arc<Ctx>| {
                let heartbeat = heartbeat.clone();
                async move {
                    if key == HEARTBEAT_KEY {
                        if let Some(h) = heartbeat {
                            h.beat();
                        }
                        return Ok(Action::await_change());
                    }
                    counted(
                        &ctx,
                        blocking_io(assignment::reconcile(key, ctx.clone())).await,
                    )
                }
            },
            shutdown.wait(),
        ));

        let by_name = |l: &Lease| vec![l.metadata.name.clone()];
        let c = Controller::new("lease", ctx.clone(), metrics.clone())
            .grace_period(STOP_GRACE)
            .watches(&ctx.leases, by_name)
            // It mirrors a Lease onto its Task from the cache: a Task not listed yet would be
            // left unmarked until the Lease changed again.
            .waits_for(&ctx.tasks)
            .waits_for(&ctx.agents)
            .waits_for(&ctx.queues)
            .workers(ctx.settings.workers)
            .worker_threads();
        queues.push(("lease", c.queue()));
        tasks.spawn(c.run(
            |key, ctx: Arc<Ctx>| async move {
                counted(&ctx, blocking_io(lease::reconcile(key, ctx.clone())).await)
            },
            shutdown.wait(),
        ));

        let leases = ctx.leases.clone();
        let c = Controller::new("reclaim", ctx.clone(), metrics.clone())
            .grace_period(STOP_GRACE)
            .watches(&ctx.leases, reclaim::keys_for_lease)
            // A deleted Task's run must be reclaimed. (A finished Task has no run, so a resync
            // costs nothing here.)
            .watches(&ctx.tasks, move |t: &Task| {
                reclaim::leases_of_task(t, |name| leases.get(name).is_some())
            })
            .workers(ctx.settings.workers)
            .worker_threads();
        queues.push(("reclaim", c.queue()));
        tasks.spawn(c.run(
            |key, ctx: Arc<Ctx>| async move {
                counted(
                    &ctx,
                    blocking_io(reclaim::reconcile(key, ctx.clone())).await,
                )
            },
            shutdown.wait(),
        ));

        let c = Controller::new("status", ctx.clone(), metrics.clone()).grace_period(STOP_GRACE);
        // Runs change an agent's and a queue's counts many times a second in a burst; a key whose
        // write is not due yet waits for it on the queue instead of waking the worker each time.
        let due = {
            let (ctx, queue) = (ctx.clone(), c.queue());
            move |keys: Vec<String>| status::due_now(&ctx.status_writes, &queue, keys)
        };
        let due_too = due.clone();
        let all_queues = ctx.queues.clone();
        let c = c
            .watches(&ctx.agents, move |a: &Agent| {
                let name = &a.metadata.name;
                let mut k = vec![format!("agent/{name}")];
                k.extend(a.spec.queue.iter().map(|q| format!("queue/{q}")));
                // A queue that still lists the agent (it moved to another queue, or is gone)
                // must drop it and its capacity now, not at the next resync.
                for q in all_queues.list() {
                    if q.status.agents.contains(name)
                        && a.spec.queue.as_deref() != Some(q.metadata.name.as_str())
                    {
                        k.push(format!("queue/{}", q.metadata.name));
                    }
                }
                k
            })
            .watches(&ctx.queues, |q: &Queue| {
                vec![format!("queue/{}", q.metadata.name)]
            })
            .watches(&ctx.leases, move |l: &Lease| {
                due(vec![format!("agent/{}", l.spec.agent)])
            })
            .watches_filtered(
                &ctx.tasks,
                move |t: &Task| due_too(status::keys_for_task(t)),
                task_needs_resync,
            )
            .workers(1)
            .worker_threads();
        queues.push(("status", c.queue()));
        tasks.spawn(c.run(
            |key, ctx: Arc<Ctx>| async move {
                counted(&ctx, blocking_io(status::reconcile(key, ctx.clone())).await)
            },
            shutdown.wait(),
        ));

        // Only this controller talks to tinytask servers: polls, claims and write-backs.
        let c = Controller::new("tinytask-sync", ctx.clone(), metrics.clone())
            .grace_period(STOP_GRACE)
            .watches(&ctx.queues, tinytask_sync::keys_for_queue)
            .watches(&ctx.agents, tinytask_sync::keys_for_agent)
            .watches(
                &ctx.leases,
                tinytask_sync::lease_mapper(ctx.agents.clone(), ctx.queues.clone()),
            )
            // Only tasks with write-backs pending map to keys, finished or not.
            .watches(&ctx.tasks, tinytask_sync::keys_for_task)
            .backoff(Backoff::new(
                Duration::from_millis(500),
                tinytask_sync::MAX_BACKOFF,
            ))
            .workers(ctx.settings.workers);
        queues.push(("tinytask-sync", c.queue()));
        tasks.spawn(c.run(
            // Its HTTP calls are async, but its store writes block (the store lock, fsyncs): like
            // the other controllers it must not hold a runtime thread that health checks, signals
            // and the watchdog need.
            |key, ctx: Arc<Ctx>| async move {
                counted(
                    &ctx,
                    blocking_io(tinytask_sync::reconcile(key, ctx.clone())).await,
                )
            },
            shutdown.wait(),
        ));

        for (kind, h) in [
            ("Task", ctx.tasks.start()),
            ("Agent", ctx.agents.start()),
            ("Queue", ctx.queues.start()),
            ("Lease", ctx.leases.start()),
        ] {
            let stop = shutdown.wait();
            let mut h = h;
            tasks.spawn(async move {
                tokio::select! {
                    _ = stop => h.abort(),
                    ended = &mut h => {
                        // An informer runs until it is stopped. One that died (a panic) leaves its
                        // cache frozen, and `wait_synced` waiting for ever: a scheduler that sees no
                        // more changes must not go on as if it did. Exit; a restart (systemd's, or
                        // the next timer tick) starts over from the store, which is consistent at
                        // every step.
                        let why = match ended {
                            Err(e) if e.is_panic() => "panicked",
                            _ => "ended",
                        };
                        crate::daemon::logging::print_error(&format!(
                            "error: the {kind} informer {why}; exiting so that a restart rebuilds it"
                        ));
                        std::process::exit(1);
                    }
                }
            });
        }

        Scheduler {
            ctx,
            metrics,
            queues,
            tasks,
            shutdown,
        }
    }

    /// Waits until every informer is synced: its initial list in, its watch set up.
    pub async fn wait_synced(&self) {
        self.ctx.tasks.wait_synced().await;
        self.ctx.agents.wait_synced().await;
        self.ctx.queues.wait_synced().await;
        self.ctx.leases.wait_synced().await;
    }

    /// Like [`Scheduler::wait_synced`], but ends at the first failed list with an error that
    /// names the kind and the store's reason (`run --once` fails there instead of retrying).
    pub async fn wait_synced_or_failed(&self) -> Result<(), String> {
        fn named(kind: &'static str) -> impl Fn(String) -> String {
            move |why| format!("cannot list {kind}: {why}")
        }
        self.ctx
            .tasks
            .wait_synced_or_failed()
            .await
            .map_err(named("tasks"))?;
        self.ctx
            .agents
            .wait_synced_or_failed()
            .await
            .map_err(named("agents"))?;
        self.ctx
            .queues
            .wait_synced_or_failed()
            .await
            .map_err(named("queues"))?;
        self.ctx
            .leases
            .wait_synced_or_failed()
            .await
            .map_err(named("leases"))
    }

    /// How many reconciles of any controller have panicked (each one was retried with backoff).
    pub fn panics(&self) -> u64 {
        self.queues
            .iter()
            .map(|(name, _)| crate::runtime::controller::panics(&self.metrics, name))
            .sum()
    }

    /// Waits until no controller has ready or in-flight work (delayed requeues do not count): the
    /// fixed point of `run --once`.
    pub async fn wait_fixed_point(&self) {
        loop {
            for (_, q) in &self.queues {
                q.wait_idle().await;
            }
            // Another controller's reconcile may have woken one we already passed.
            tokio::task::yield_now().await;
            if self.queues.iter().all(|(_, q)| q.is_idle()) {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if self.queues.iter().all(|(_, q)| q.is_idle()) {
                    return;
                }
            }
        }
    }

    /// Stops the assignment loop and waits for its pass in flight: no Lease is committed after
    /// this returns. The other controllers go on, so that a [`Scheduler::wait_fixed_point`] after
    /// it starts the shim of every Lease committed. `run --once` ends so; stopped all at once, a
    /// retry falling due as the pass ended could commit a Lease that the already stopped lease
    /// controller never started, left to a later pass to reclaim as never started.
    pub async fn stop_assigning(&self) {
        for (name, q) in &self.queues {
            if *name == "assignment" {
                q.drain().await;
            }
        }
    }

    /// Enqueues the watchdog heartbeat key into the assignment loop.
    pub fn poke_heartbeat(&self) {
        if let Some((_, q)) = self.queues.first() {
            q.add(HEARTBEAT_KEY.to_string());
        }
    }

    /// A handle that stops the controllers.
    pub fn shutdown_handle(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Stops intake, lets in-flight reconciles finish, and returns when every controller has.
    pub async fn stop(mut self) {
        self.shutdown.trigger("stop");
        while self.tasks.join_next().await.is_some() {}
    }

    /// True when nothing is left to do: no live Lease, and every unfinished task is waiting on
    /// something that can never happen (a failed blocker, no agent for its queue).
    pub fn all_done(&self) -> bool {
        if !self.ctx.leases.list().is_empty() {
            return false;
        }
        // A tinytask queue not yet polled, or whose last list was cut at the window.
        if tinytask_sync::has_more_work(&self.ctx) {
            return false;
        }
        self.unfinished_tasks().is_empty()
    }

    /// Tasks neither finished nor waiting on something that can never happen, sorted by name.
    fn unfinished_tasks(&self) -> Vec<Arc<Task>> {
        let tasks = self.ctx.tasks.list();
        let agents = self.ctx.agents.list();
        let can_run = can_still_run(&tasks, &agents);
        tasks
            .iter()
            .filter(|t| can_run.contains(t.metadata.name.as_str()))
            .cloned()
            .collect()
    }

    /// Why [`Scheduler::all_done`] is false, one line per reason (empty when it is true): the
    /// live Leases, the tinytask queues that may hold more work, and each unfinished task that is
    /// not waiting on something impossible. For `run --once --wait` to say what it waits for.
    pub fn waiting_on(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .ctx
            .leases
            .list()
            .iter()
            .map(|l| {
                format!(
                    "lease/{} (task/{}, agent/{}, phase {:?})",
                    l.metadata.name, l.spec.task, l.spec.agent, l.status.phase
                )
            })
            .collect();
        out.extend(
            tinytask_sync::sources_with_more_work(&self.ctx)
                .into_iter()
                .map(|(q, why)| format!("queue/{q}: {why}")),
        );
        let undone = self.unfinished_tasks();
        for t in undone.iter().take(WAITING_ON_TASKS_MAX) {
            out.push(format!(
                "task/{} {} (queue {}, assignedTo {}, lease {}, blockedBy [{}])",
                t.metadata.name,
                t.status.phase.as_str(),
                t.spec.queue.as_deref().unwrap_or("-"),
                t.spec.assigned_to.as_deref().unwrap_or("-"),
                t.status.lease.as_deref().unwrap_or("-"),
                t.spec.blocked_by.join(", ")
            ));
        }
        if undone.len() > WAITING_ON_TASKS_MAX {
            out.push(format!(
                "{} more unfinished tasks",
                undone.len() - WAITING_ON_TASKS_MAX
            ));
        }
        out
    }

    /// Which controllers' queues have ready or in-flight work (what `wait_fixed_point` waits on).
    pub fn busy_controllers(&self) -> Vec<String> {
        self.queues
            .iter()
            .filter(|(_, q)| !q.is_idle())
            .map(|(name, q)| format!("{name} ({} ready)", q.len()))
            .collect()
    }

    /// Prometheus text: the runtime's controller metrics plus scheduler gauges computed from the
    /// caches at scrape time.
    pub fn render_metrics(&self) -> String {
        render_metrics(&self.ctx, &self.metrics)
    }
}

/// Whether `t` is finished or waits on something that can never happen: no agent serves it, or
/// (Blocked) each of its blockers is finished or unknown. `phases` holds every cached task's phase.
/// The unfinished tasks that may still run, by name: assigned or running ones, pending ones an
/// agent that is not paused serves, and blocked ones whose every blocker has succeeded or may
/// still run. So a task blocked by a failed or missing task, by one that can never run itself,
/// or in a `blockedBy` cycle, can never run (and `run --once --wait` does not wait for it).
/// Worked out like a topological sort, without recursion, for chains of any length.
fn can_still_run<'a>(tasks: &'a [Arc<Task>], agents: &[Arc<Agent>]) -> HashSet<&'a str> {
    let servers = crate::controllers::plan::Servers::new(agents);
    let served = |t: &Task| servers.unschedulable(t).is_none();
    let mut can_run: HashSet<&str> = HashSet::new();
    // Names whose dependents may count one more blocker as satisfied.
    let mut settled: Vec<&str> = Vec::new();
    // Per blocked task, how many of its blockers are not yet known to succeed or to be able to.
    let mut missing: HashMap<&str, usize> = HashMap::new();
    let mut dependents: HashMap<&str, Vec<&str>> = HashMap::new();
    for t in tasks {
        let name = t.metadata.name.as_str();
        match t.status.phase {
            TaskPhase::Succeeded => settled.push(name),
            TaskPhase::Failed => {}
            TaskPhase::Assigned | TaskPhase::Running => {
                can_run.insert(name);
                settled.push(name);
            }
            TaskPhase::Pending if served(t) => {
                can_run.insert(name);
                settled.push(name);
            }
            TaskPhase::Pending => {}
            TaskPhase::Blocked => {
                let blockers: HashSet<&str> =
                    t.spec.blocked_by.iter().map(String::as_str).collect();
                if blockers.is_empty() {
                    // About to be unblocked (its blockedBy was emptied).
                    can_run.insert(name);
                    settled.push(name);
                    continue;
                }
                missing.insert(name, blockers.len());
                for b in blockers {
                    dependents.entry(b).or_default().push(name);
                }
            }
        }
    }
    while let Some(done) = settled.pop() {
        for &d in dependents.get(done).into_iter().flatten() {
            if let Some(left) = missing.get_mut(d) {
                *left -= 1;
                if *left == 0 {
                    can_run.insert(d);
                    settled.push(d);
                }
            }
        }
    }
    can_run
}

/// Runs a reconcile, which does blocking store I/O (the store's flock, fsync), without starving
/// the runtime: on a multi-threaded runtime the worker first hands its other tasks to a fresh
/// thread. (The controllers that only touch the store run their workers on threads of their own,
/// [`Controller::worker_threads`], where this is a plain `await`.) Without this, two reconciles
/// waiting on a slow disk or a held store lock occupied both workers and froze everything else —
/// the HTTP endpoints, signal handling, the watchdog.
async fn blocking_io<F: Future>(fut: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| h.block_on(fut))
        }
        _ => fut.await,
    }
}

fn counted<E>(ctx: &Ctx, r: Result<Action, E>) -> Result<Action, E> {
    if r.is_err() {
        Summary::bump(&ctx.summary.errors);
    }
    r
}

/// Scheduler gauges from the caches plus the runtime registry.
pub fn render_metrics(ctx: &Ctx, metrics: &Metrics) -> String {
    let mut out = metrics.render();
    out.push_str(&tinytask_sync::render_metrics(ctx));
    let mut by_phase: BTreeMap<(String, &'static str), u64> = BTreeMap::new();
    let tasks = ctx.tasks.snapshot();
    for t in &tasks {
        let q = t.spec.queue.clone().unwrap_or_default();
        *by_phase.entry((q, t.status.phase.as_str())).or_default() += 1;
    }
    out.push_str(
        "# HELP tinyscheduler_tasks Tasks by queue and phase.\n# TYPE tinyscheduler_tasks gauge\n",
    );
    for ((q, p), n) in by_phase {
        out.push_str(&format!(
            "tinyscheduler_tasks{{queue=\"{}\",phase=\"{p}\"}} {n}\n",
            escape(&q)
        ));
    }
    let leases = ctx.leases.list();
    let agents = ctx.agents.list();
    let free = crate::controllers::plan::free_slots(&agents, &leases, &tasks);
    out.push_str("# HELP tinyscheduler_agent_leases Live leases held by each agent.\n# TYPE tinyscheduler_agent_leases gauge\n");
    for a in &agents {
        let n = leases
            .iter()
            .filter(|l| l.spec.agent == a.metadata.name)
            .count();
        out.push_str(&format!(
            "tinyscheduler_agent_leases{{agent=\"{}\"}} {n}\n",
            escape(&a.metadata.name)
        ));
    }
    out.push_str("# HELP tinyscheduler_agent_free_slots Free slots of each agent.\n# TYPE tinyscheduler_agent_free_slots gauge\n");
    for (a, n) in free {
        out.push_str(&format!(
            "tinyscheduler_agent_free_slots{{agent=\"{}\"}} {n}\n",
            escape(&a)
        ));
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// How long a stopping scheduler lets in-flight reconciles finish: well within systemd's
/// `TimeoutStopSec=30s` (deploy/tinyscheduler.service), so that a stop that has to give up on a
/// stuck reconcile still ends as a clean exit, not as systemd's SIGKILL.
pub const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// Runs `fut` and returns early with `None` if `shutdown` fires first.
pub async fn until<T>(shutdown: &Shutdown, fut: impl Future<Output = T>) -> Option<T> {
    tokio::select! {
        v = fut => Some(v),
        _ = shutdown.wait() => None,
    }
}

/// Prints task phase changes as they happen (for `run --once --wait`).
pub fn print_progress(tasks: &Informer<Task>) {
    let last: std::sync::Mutex<HashMap<String, TaskPhase>> = Default::default();
    tasks.on_event(move |ev, _| {
        let InformerEvent::Applied(t) = ev else {
            return;
        };
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        let phase = t.status.phase;
        if last.insert(t.metadata.name.clone(), phase) == Some(phase) {
            return;
        }
        let detail = match phase {
            TaskPhase::Assigned | TaskPhase::Running => {
                format!(" on agent/{}", t.status.agent.as_deref().unwrap_or("?"))
            }
            _ => t
                .status
                .message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default(),
        };
        crate::outln!("task/{} {}{detail}", t.metadata.name, phase.as_str());
    });
}
