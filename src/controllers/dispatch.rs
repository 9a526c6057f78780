//! Dispatch latency: how long a runnable task waited in this process before its agent's shim was
//! spawned. The clock starts when this process first saw the task runnable (the Task informer's
//! event, or its `nextAttemptAfter` when a retry is due later) and stops at the spawn; the result
//! goes to `tinyscheduler_dispatch_latency_seconds`. A run adopted after a restart, or spawned
//! for a task this process never saw runnable, is not measured.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use crate::resources::meta::parse_time;
use crate::resources::{Task, TaskPhase};
use crate::runtime::informer::InformerEvent;
use crate::runtime::metrics::Metrics;

/// The histogram's name.
pub const METRIC: &str = "tinyscheduler_dispatch_latency_seconds";
const HELP: &str = "Time from a task becoming runnable (as this process saw it) to its agent's shim being started.";
/// Buckets (seconds): a dispatch normally takes milliseconds; a full agent pool makes it minutes.
pub const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// When each task not yet dispatched became runnable. Fed by the Task informer (a cheap map
/// update per event), drained at spawn.
#[derive(Debug, Default)]
pub struct RunnableSince {
    since: Mutex<HashMap<String, Instant>>,
}

impl RunnableSince {
    /// Notes a Task event: a Pending task starts (or keeps) its clock; Assigned and Running keep
    /// it until the spawn; Blocked, finished and deleted tasks drop it.
    pub fn on_task_event(&self, ev: &InformerEvent<Task>) {
        let mut since = self.since.lock().unwrap_or_else(|p| p.into_inner());
        match ev {
            InformerEvent::Applied(t) => {
                let name = &t.metadata.name;
                match t.status.phase {
                    TaskPhase::Pending => {
                        let now = Instant::now();
                        let due = t
                            .status
                            .next_attempt_after
                            .as_deref()
                            .and_then(parse_time)
                            .map(|at| {
                                let wait = at
                                    .duration_since(SystemTime::now())
                                    .unwrap_or(Duration::ZERO);
                                now + wait
                            });
                        match due {
                            // A retry is runnable from its due time, never earlier.
                            Some(due) => {
                                let e = since.entry(name.clone()).or_insert(due);
                                *e = (*e).max(due);
                            }
                            None => {
                                since.entry(name.clone()).or_insert(now);
                            }
                        }
                    }
                    TaskPhase::Assigned | TaskPhase::Running => {}
                    TaskPhase::Blocked | TaskPhase::Succeeded | TaskPhase::Failed => {
                        since.remove(name);
                    }
                }
            }
            InformerEvent::Deleted(t) => {
                since.remove(&t.metadata.name);
            }
            InformerEvent::Resync => {}
        }
    }

    /// Stops the clock of `task` (its shim was just spawned) and returns how long it ran.
    pub fn take(&self, task: &str) -> Option<Duration> {
        let mut since = self.since.lock().unwrap_or_else(|p| p.into_inner());
        since
            .remove(task)
            .map(|t| Instant::now().saturating_duration_since(t))
    }
}

/// Registers the histogram, so that it is exported (empty) from the first scrape.
pub fn register(metrics: &Metrics) {
    metrics.histogram(METRIC, HELP, &[], BUCKETS);
}

/// Records one dispatch.
pub fn observe(metrics: &Metrics, latency: Duration) {
    metrics
        .histogram(METRIC, HELP, &[], BUCKETS)
        .observe(latency.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::meta::format_time;
    use crate::resources::TaskSpec;
    use std::sync::Arc;

    fn task(phase: TaskPhase, retry_in: Option<Duration>) -> InformerEvent<Task> {
        let mut t = Task::new("Task", "t", TaskSpec::default());
        t.status.phase = phase;
        t.status.next_attempt_after = retry_in.map(|d| format_time(SystemTime::now() + d));
        InformerEvent::Applied(Arc::new(t))
    }

    #[test]
    fn the_clock_runs_from_the_first_pending_sighting_to_the_spawn() {
        let r = RunnableSince::default();
        assert_eq!(r.take("t"), None);
        r.on_task_event(&task(TaskPhase::Pending, None));
        let first = r.since.lock().unwrap()["t"];
        r.on_task_event(&task(TaskPhase::Pending, None));
        r.on_task_event(&task(TaskPhase::Assigned, None));
        assert_eq!(
            r.since.lock().unwrap()["t"],
            first,
            "later events keep the start"
        );
        assert!(r.take("t").is_some());
        assert_eq!(r.take("t"), None, "one measurement per dispatch");
    }

    #[test]
    fn a_retry_starts_its_clock_at_its_due_time_and_blocked_or_finished_tasks_drop_it() {
        let r = RunnableSince::default();
        r.on_task_event(&task(TaskPhase::Pending, None));
        r.on_task_event(&task(TaskPhase::Pending, Some(Duration::from_secs(3600))));
        assert!(r.since.lock().unwrap()["t"] > Instant::now() + Duration::from_secs(3000));
        assert_eq!(r.take("t"), Some(Duration::ZERO), "not runnable yet");
        for phase in [TaskPhase::Blocked, TaskPhase::Succeeded, TaskPhase::Failed] {
            r.on_task_event(&task(TaskPhase::Pending, None));
            r.on_task_event(&task(phase, None));
            assert_eq!(r.take("t"), None, "{phase:?}");
        }
    }
}
