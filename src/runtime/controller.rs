//! The controller loop: informer events map to keys in a work queue; bounded workers run the
//! reconciler for one key at a time; its result decides when the key is looked at again.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::time::Instant;

use super::backoff::Backoff;
use super::informer::{Informer, InformerEvent};
use super::metrics::{Counter, Histogram, Metrics, DURATION_BUCKETS};
use super::workqueue::WorkQueue;
use crate::resources::meta::Resource;

/// What a successful reconcile asks for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Look at the key again after this long (even if nothing changes).
    RequeueAfter(Duration),
    /// Look at the key again only when something it watches changes (or at resync, unless its
    /// objects are filtered out of resyncs, see [`Controller::watches_filtered`]).
    AwaitChange,
}

impl Action {
    pub fn requeue_after(d: Duration) -> Self {
        Action::RequeueAfter(d)
    }
    pub fn await_change() -> Self {
        Action::AwaitChange
    }
}

type SyncWait = Box<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A controller over String keys with context `C`.
pub struct Controller<C> {
    name: &'static str,
    ctx: Arc<C>,
    metrics: Metrics,
    queue: WorkQueue<String>,
    workers: usize,
    /// Whether each worker runs on a thread of its own (see [`Controller::worker_threads`]).
    own_threads: bool,
    grace: Duration,
    synced: Vec<SyncWait>,
}

impl<C: Send + Sync + 'static> Controller<C> {
    /// A controller named `name` (the `controller` label of its metrics, and its queue's `name`).
    pub fn new(name: &'static str, ctx: Arc<C>, metrics: Metrics) -> Self {
        let queue = WorkQueue::new(Backoff::default());
        queue.instrument(name, &metrics);
        Controller {
            name,
            ctx,
            metrics,
            queue,
            workers: 2,
            own_threads: false,
            grace: Duration::from_secs(30),
            synced: Vec::new(),
        }
    }

    /// Wakes keys on changes to `K`: every `Applied`/`Deleted` object maps through `mapper` to the
    /// keys to enqueue, and `Resync` enqueues `mapper(obj)` for every cached object. If the informer
    /// is already synced, its current objects are enqueued now; otherwise its initial list will be.
    pub fn watches<K: Resource>(
        self,
        informer: &Informer<K>,
        mapper: impl Fn(&K) -> Vec<String> + Send + Sync + 'static,
    ) -> Self {
        self.watches_filtered(informer, mapper, |_: &K| true)
    }

    /// Like [`Controller::watches`], but a `Resync` maps only the cached objects `resync` keeps.
    /// For an object with nothing left to do (its next look, if any, already scheduled with
    /// `RequeueAfter`), a re-check every period is wasted work, and with thousands of such objects
    /// it is most of an idle controller's. Changes still wake every object's keys, and the initial
    /// list enqueues them all.
    pub fn watches_filtered<K: Resource>(
        self,
        informer: &Informer<K>,
        mapper: impl Fn(&K) -> Vec<String> + Send + Sync + 'static,
        resync: impl Fn(&K) -> bool + Send + Sync + 'static,
    ) -> Self {
        let queue = self.queue.clone();
        let mapper = Arc::new(mapper);
        let m = mapper.clone();
        informer.on_event(move |ev, snapshot| match ev {
            InformerEvent::Applied(o) | InformerEvent::Deleted(o) => {
                for k in m(o) {
                    queue.add(k);
                }
            }
            InformerEvent::Resync => {
                for o in snapshot.iter().filter(|o| resync(o)) {
                    for k in m(o) {
                        queue.add(k);
                    }
                }
            }
        });
        if informer.is_synced() {
            for o in informer.list() {
                for k in mapper(&o) {
                    self.queue.add(k);
                }
            }
        }
        self.waits_for(informer)
    }

    /// Holds the first reconcile until `informer` has synced too: for a cache the reconciler
    /// reads but whose changes need not wake it. (An unsynced cache reads as empty, and a
    /// reconcile that found nothing there would not be woken again.)
    pub fn waits_for<K: Resource>(mut self, informer: &Informer<K>) -> Self {
        let inf = informer.clone();
        self.synced.push(Box::new(move || {
            let inf = inf.clone();
            Box::pin(async move { inf.wait_synced().await })
        }));
        self
    }

    /// Number of concurrent reconciles (default 2, at least 1).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n.max(1);
        self
    }

    /// Runs each worker on an OS thread of its own, with a single-threaded runtime, instead of as a
    /// task of the caller's runtime. For reconcilers that block on I/O (the file store's lock and
    /// fsyncs): such a reconcile then blocks only its own worker, and it needs no hand-off of the
    /// runtime to another thread per call (`block_in_place`), which in a burst cost a fifth of
    /// the daemon's CPU in thread wake-ups. Delayed requeues made by a worker run on its runtime.
    /// Workers that miss the shutdown grace period are left to finish on their own. Applies on a
    /// multi-threaded runtime only; on a current-thread one the workers stay its tasks.
    pub fn worker_threads(mut self) -> Self {
        self.own_threads = true;
        self
    }

    /// Backoff for failed keys (default 5 ms doubling to 1000 s).
    pub fn backoff(self, backoff: Backoff) -> Self {
        self.queue.set_backoff(backoff);
        self
    }

    /// How long in-flight reconciles may take to finish at shutdown (default 30 s).
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The controller's work queue (to enqueue keys by hand, or to wait for it to go idle).
    pub fn queue(&self) -> WorkQueue<String> {
        self.queue.clone()
    }

    /// Runs until `shutdown` completes: waits for the watched informers to sync, then reconciles
    /// keys with the configured number of workers. At shutdown the queue stops handing out keys,
    /// in-flight reconciles get the grace period to finish (then are cancelled), and `run` returns.
    pub async fn run<F, Fut, E>(self, reconcile: F, shutdown: impl Future<Output = ()> + Send)
    where
        F: Fn(String, Arc<C>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Action, E>> + Send + 'static,
        E: std::fmt::Display + Send,
    {
        let name = self.name;
        let queue = self.queue.clone();
        let reconcile = Arc::new(reconcile);
        let stats = Arc::new(Stats::new(name, &self.metrics));
        tokio::pin!(shutdown);

        let synced = futures::future::join_all(self.synced.iter().map(|f| f()));
        tokio::select! {
            _ = synced => {}
            _ = &mut shutdown => {
                queue.shutdown();
                return;
            }
        }
        tracing::debug!(
            controller = name,
            workers = self.workers,
            "controller started"
        );

        // On a current-thread runtime (tests on virtual time, say) the workers stay its tasks, so
        // that they keep running on its clock.
        let own_threads = self.own_threads
            && tokio::runtime::Handle::current().runtime_flavor()
                == tokio::runtime::RuntimeFlavor::MultiThread;
        let mut workers = tokio::task::JoinSet::new();
        for i in 0..self.workers {
            let queue = queue.clone();
            let reconcile = reconcile.clone();
            let ctx = self.ctx.clone();
            let stats = stats.clone();
            let work = async move {
                while let Some(key) = queue.get().await {
                    process(name, &queue, &*reconcile, &ctx, &stats, key).await;
                }
            };
            if own_threads {
                workers.spawn(on_own_thread(format!("{name}-{i}"), work));
            } else {
                workers.spawn(work);
            }
        }

        tokio::select! {
            _ = &mut shutdown => {}
            _ = async { while workers.join_next().await.is_some() {} } => {
                // Workers only end when the queue was shut down by someone else.
                return;
            }
        }
        tracing::debug!(controller = name, "controller shutting down");
        queue.shutdown();
        let drained = tokio::time::timeout(self.grace, async {
            while workers.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                controller = name,
                grace = ?self.grace,
                "in-flight reconciles did not finish within the grace period; cancelling them"
            );
            workers.shutdown().await;
        }
    }
}

/// Runs `work` on a new thread with a single-threaded runtime; the returned future ends when the
/// thread is done. If no thread or runtime can be had, `work` runs right here instead.
async fn on_own_thread<W>(name: String, work: W)
where
    W: Future<Output = ()> + Send + 'static,
{
    // The work travels to the thread through a channel, so that it can come back (`Some`) if the
    // thread's runtime cannot be built; `None` says the thread ran it.
    let (work_tx, work_rx) = std::sync::mpsc::sync_channel::<W>(1);
    let (end_tx, end_rx) = tokio::sync::oneshot::channel::<Option<W>>();
    let thread_name = name.clone();
    let started = std::thread::Builder::new().name(thread_name).spawn(move || {
        let Ok(work) = work_rx.recv() else { return };
        let end = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => {
                rt.block_on(work);
                None
            }
            Err(e) => {
                tracing::warn!(worker = %name, "cannot start a runtime for a worker thread: {e}; the worker runs on the shared runtime");
                Some(work)
            }
        };
        let _ = end_tx.send(end);
    });
    if let Err(e) = started {
        tracing::warn!("cannot start a worker thread: {e}; the worker runs on the shared runtime");
        return work.await;
    }
    if let Err(std::sync::mpsc::SendError(work)) = work_tx.send(work) {
        return work.await;
    }
    if let Ok(Some(work)) = end_rx.await {
        work.await;
    }
}

/// Reconciles that panicked, per controller (`controller` label); a panic is a bug, which a
/// one-shot run reports in its exit status.
pub const PANICS_METRIC: &str = "tinyscheduler_reconcile_panics_total";
const PANICS_HELP: &str = "Reconciles that panicked, per controller.";

/// How many reconciles of controller `name` have panicked so far.
pub fn panics(metrics: &Metrics, name: &str) -> u64 {
    metrics
        .counter(PANICS_METRIC, PANICS_HELP, &[("controller", name)])
        .get()
}

struct Stats {
    success: Counter,
    error: Counter,
    requeue: Counter,
    errors: Counter,
    panics: Counter,
    duration: Histogram,
}

impl Stats {
    fn new(name: &str, m: &Metrics) -> Self {
        let total = |result: &str| {
            m.counter(
                "tinyscheduler_reconcile_total",
                "Reconciles per controller and result (success, error, requeue).",
                &[("controller", name), ("result", result)],
            )
        };
        Stats {
            success: total("success"),
            error: total("error"),
            requeue: total("requeue"),
            errors: m.counter(
                "tinyscheduler_reconcile_errors_total",
                "Reconciles that returned an error or panicked, per controller.",
                &[("controller", name)],
            ),
            panics: m.counter(PANICS_METRIC, PANICS_HELP, &[("controller", name)]),
            duration: m.histogram(
                "tinyscheduler_reconcile_duration_seconds",
                "Time per reconcile, per controller.",
                &[("controller", name)],
                DURATION_BUCKETS,
            ),
        }
    }
}

async fn process<C, F, Fut, E>(
    name: &'static str,
    queue: &WorkQueue<String>,
    reconcile: &F,
    ctx: &Arc<C>,
    stats: &Stats,
    key: String,
) where
    F: Fn(String, Arc<C>) -> Fut,
    Fut: Future<Output = Result<Action, E>>,
    E: std::fmt::Display,
{
    let start = Instant::now();
    let result =
        match std::panic::catch_unwind(AssertUnwindSafe(|| reconcile(key.clone(), ctx.clone()))) {
            Ok(fut) => AssertUnwindSafe(fut).catch_unwind().await,
            Err(p) => Err(p),
        };
    stats.duration.observe(start.elapsed().as_secs_f64());
    match result {
        Ok(Ok(action)) => {
            queue.forget(&key);
            match action {
                Action::RequeueAfter(d) => {
                    stats.requeue.inc();
                    queue.add_after(key.clone(), d);
                }
                Action::AwaitChange => stats.success.inc(),
            }
        }
        Ok(Err(e)) => {
            stats.error.inc();
            stats.errors.inc();
            let failures = queue.num_requeues(&key) + 1;
            tracing::warn!(controller = name, key = %key, error = %e, failures, "reconcile failed; backing off");
            queue.add_rate_limited(key.clone());
        }
        Err(panic) => {
            stats.error.inc();
            stats.errors.inc();
            stats.panics.inc();
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "<non-string panic>".into());
            tracing::error!(controller = name, key = %key, panic = %msg, "reconcile panicked; backing off");
            queue.add_rate_limited(key.clone());
        }
    }
    queue.done(&key);
}
