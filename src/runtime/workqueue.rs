//! A work queue with client-go semantics.
//!
//! - A key that is already queued is not queued twice (`dirty` set).
//! - A key is never handed to two workers at once (`processing` set); a key added while it is being
//!   processed is queued again when the worker calls [`WorkQueue::done`].
//! - [`WorkQueue::add_after`] keeps the earliest due time per key.
//! - [`WorkQueue::add_rate_limited`] backs off per key (exponential, see [`Backoff`]) until
//!   [`WorkQueue::forget`] resets it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::backoff::Backoff;
use super::metrics::{Counter, Gauge, Histogram, Metrics, DURATION_BUCKETS};

/// The longest [`WorkQueue::add_after`] waits. A reconciler's delay can come from a number in a
/// hand-written file (a Lease's duration, a Queue's poll interval); one past the clock's range
/// must not panic, and a level-triggered reconcile that looks again a day later loses nothing.
pub const MAX_DELAY: Duration = Duration::from_secs(24 * 3600);

/// The queue; clones share it.
#[derive(Clone)]
pub struct WorkQueue<K: Clone + Eq + Hash + Send + Sync + 'static> {
    inner: Arc<Inner<K>>,
}

struct Inner<K> {
    state: Mutex<State<K>>,
    /// Wakes one waiting worker per key that became ready (and every worker at shutdown). One,
    /// not all: with workers on threads of their own, waking every worker for each key cost a
    /// thread wake-up per worker per key.
    ready: Notify,
    /// Woken for [`WorkQueue::wait_idle`] when a key finished or the queue shut down.
    changed: Notify,
    metrics: Mutex<Option<QueueMetrics>>,
}

#[derive(Clone)]
struct QueueMetrics {
    depth: Gauge,
    queue_duration: Histogram,
    retries: Counter,
    adds: Counter,
}

struct State<K> {
    backoff: Backoff,
    /// Ready keys, in order.
    queue: VecDeque<K>,
    /// Keys that need processing (queued, or added again while processing), with the time they
    /// were first added (for the queue-duration metric).
    dirty: HashMap<K, Instant>,
    /// Keys a worker holds.
    processing: HashSet<K>,
    /// Delayed keys and their due time (the earliest asked for).
    delayed: HashMap<K, Instant>,
    /// Consecutive failures per key.
    failures: HashMap<K, u32>,
    shutting_down: bool,
}

impl<K: Clone + Eq + Hash + Send + Sync + 'static> WorkQueue<K> {
    /// An empty queue backing off failures with `backoff`.
    pub fn new(backoff: Backoff) -> Self {
        WorkQueue {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    backoff,
                    queue: VecDeque::new(),
                    dirty: HashMap::new(),
                    processing: HashSet::new(),
                    delayed: HashMap::new(),
                    failures: HashMap::new(),
                    shutting_down: false,
                }),
                ready: Notify::new(),
                changed: Notify::new(),
                metrics: Mutex::new(None),
            }),
        }
    }

    /// Reports `tinyscheduler_workqueue_{depth,queue_duration_seconds,retries_total,adds_total}`
    /// with label `name` into `metrics`.
    pub fn instrument(&self, name: &str, metrics: &Metrics) {
        let labels = [("name", name)];
        let m = QueueMetrics {
            depth: metrics.gauge(
                "tinyscheduler_workqueue_depth",
                "Current depth of the work queue (keys ready to be processed).",
                &labels,
            ),
            queue_duration: metrics.histogram(
                "tinyscheduler_workqueue_queue_duration_seconds",
                "How long a key stays in the work queue before a worker gets it.",
                &labels,
                DURATION_BUCKETS,
            ),
            retries: metrics.counter(
                "tinyscheduler_workqueue_retries_total",
                "Rate-limited re-adds (retries after a failure) handled by the work queue.",
                &labels,
            ),
            adds: metrics.counter(
                "tinyscheduler_workqueue_adds_total",
                "Adds handled by the work queue.",
                &labels,
            ),
        };
        m.depth.set(self.len() as f64);
        *self.inner.metrics.lock().unwrap_or_else(|p| p.into_inner()) = Some(m);
    }

    /// Replaces the backoff used by later [`WorkQueue::add_rate_limited`] calls.
    pub fn set_backoff(&self, backoff: Backoff) {
        self.lock().backoff = backoff;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<K>> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn metrics(&self) -> Option<QueueMetrics> {
        self.inner
            .metrics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Marks `key` as needing processing. No-op if it is already queued or the queue is shut down;
    /// if a worker holds it, it is queued again after `done`.
    pub fn add(&self, key: K) {
        let m = self.metrics();
        {
            let mut s = self.lock();
            if !add_locked(&mut s, key) {
                return;
            }
            // Set under the lock: set after it, racing writers could leave a stale depth.
            if let Some(m) = &m {
                m.depth.set(s.queue.len() as f64);
            }
        }
        if let Some(m) = m {
            m.adds.inc();
        }
        self.inner.ready.notify_one();
    }

    /// Adds `key` once `delay` has passed. If it is already waiting, the earlier due time wins.
    /// A delay beyond [`MAX_DELAY`] waits that long instead. Needs a tokio runtime for a non-zero
    /// delay (without one the key is added at once).
    pub fn add_after(&self, key: K, delay: Duration) {
        if delay.is_zero() {
            return self.add(key);
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return self.add(key);
        };
        let due = Instant::now() + delay.min(MAX_DELAY);
        {
            let mut s = self.lock();
            if s.shutting_down {
                return;
            }
            match s.delayed.get(&key) {
                Some(d) if *d <= due => return,
                _ => {
                    s.delayed.insert(key.clone(), due);
                }
            }
        }
        let weak: Weak<Inner<K>> = Arc::downgrade(&self.inner);
        handle.spawn(async move {
            tokio::time::sleep_until(due).await;
            let Some(inner) = weak.upgrade() else { return };
            let q = WorkQueue { inner };
            {
                let mut s = q.lock();
                // A later add_after with an earlier time replaced ours; that one fires instead.
                if s.delayed.get(&key) != Some(&due) {
                    return;
                }
                s.delayed.remove(&key);
            }
            q.add(key);
        });
    }

    /// Adds `key` after its backoff delay, counting one more failure.
    pub fn add_rate_limited(&self, key: K) {
        let delay = {
            let mut s = self.lock();
            let n = s.failures.entry(key.clone()).or_insert(0);
            *n = n.saturating_add(1);
            let n = *n;
            s.backoff.delay(n)
        };
        if let Some(m) = self.metrics() {
            m.retries.inc();
        }
        self.add_after(key, delay);
    }

    /// Resets `key`'s failure count (it does not cancel a pending delayed add).
    pub fn forget(&self, key: &K) {
        self.lock().failures.remove(key);
    }

    /// Consecutive failures recorded for `key`.
    pub fn num_requeues(&self, key: &K) -> u32 {
        self.lock().failures.get(key).copied().unwrap_or(0)
    }

    /// The next ready key, marked as being processed until [`WorkQueue::done`]. Waits while nothing
    /// is ready; `None` once the queue is shut down.
    pub async fn get(&self) -> Option<K> {
        loop {
            let notified = self.inner.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let m = self.metrics();
                let mut s = self.lock();
                if s.shutting_down {
                    return None;
                }
                if let Some(key) = s.queue.pop_front() {
                    let added = s.dirty.remove(&key);
                    s.processing.insert(key.clone());
                    if let Some(m) = &m {
                        m.depth.set(s.queue.len() as f64);
                    }
                    drop(s);
                    if let (Some(m), Some(t)) = (m, added) {
                        m.queue_duration.observe(t.elapsed().as_secs_f64());
                    }
                    return Some(key);
                }
            }
            notified.await;
        }
    }

    /// Releases `key` after processing; if it was added meanwhile, it is queued again.
    pub fn done(&self, key: &K) {
        let m = self.metrics();
        let requeued = {
            let mut s = self.lock();
            s.processing.remove(key);
            let requeued = s.dirty.contains_key(key) && !s.shutting_down;
            if requeued {
                s.queue.push_back(key.clone());
            }
            if let Some(m) = &m {
                m.depth.set(s.queue.len() as f64);
            }
            requeued
        };
        if requeued {
            self.inner.ready.notify_one();
        }
        self.inner.changed.notify_waiters();
    }

    /// Number of ready keys (not counting delayed ones or ones being processed).
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    /// True when no key is ready.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of keys waiting for a delayed add.
    pub fn delayed_len(&self) -> usize {
        self.lock().delayed.len()
    }

    /// Stops the queue: later adds are ignored and `get` returns `None`. Keys being processed may
    /// still be reported `done`.
    pub fn shutdown(&self) {
        {
            let mut s = self.lock();
            s.shutting_down = true;
            s.queue.clear();
            s.delayed.clear();
        }
        self.inner.ready.notify_waiters();
        self.inner.changed.notify_waiters();
    }

    /// Shuts down, then waits until no key is being processed.
    pub async fn drain(&self) {
        self.shutdown();
        self.wait_idle().await;
    }

    pub fn is_shutting_down(&self) -> bool {
        self.lock().shutting_down
    }

    /// True when nothing is ready and nothing is being processed (delayed keys do not count).
    pub fn is_idle(&self) -> bool {
        let s = self.lock();
        s.queue.is_empty() && s.processing.is_empty()
    }

    /// Returns once nothing is ready and nothing is being processed (delayed keys do not count).
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_idle() {
                return;
            }
            notified.await;
        }
    }
}

/// Marks a key dirty and queues it unless it is queued already or being processed; true if the
/// queue changed.
fn add_locked<K: Clone + Eq + Hash>(s: &mut State<K>, key: K) -> bool {
    if s.shutting_down || s.dirty.contains_key(&key) {
        return false;
    }
    s.dirty.insert(key.clone(), Instant::now());
    if !s.processing.contains(&key) {
        s.queue.push_back(key);
    }
    true
}
