//! tinytask sync controller: the only part of the scheduler that talks to a tinytask server.
//! Every other controller treats the mirrored `tt-<id>` Tasks exactly like local ones.
//!
//! Three kinds of keys:
//! - `tinytask/<queue>` — poll a `source: tinytask` Queue: a conditional `GET /queues/Q/stats`
//!   first (ETag), and only when it changed or free slots appeared, list just enough runnable
//!   tasks to fill the pool's free slots (blocked and foreign-assigned tasks never use up the
//!   window) and mirror them as Tasks `tt-<id>`; tasks already assigned on the server to an Agent
//!   we manage are mirrored pinned to it. Outages set the Queue's `SourceReachable` condition and
//!   back the poll off up to 30 s.
//! - `tinytask-claim/<lease>` — a Lease for a mirrored Task is not spawned until it is claimed
//!   here: re-read the task, assign it (PATCH) only if it is still ours to take, check that nobody
//!   wrote in between, set it `working`, then annotate the Lease `tinyscheduler.io/claimed`; a
//!   Lease reclaimed meanwhile (never started) gets the task put back on the server as the claim
//!   found it, with no `Claimed` event. A refused claim deletes the mirror and the Lease (nothing
//!   runs), once what the mirror owed the server (unsent write-backs, a claim held for an earlier
//!   attempt) is queued on its Queue; an unreachable server, or a task the server still calls
//!   blocked, puts the Task back to Pending (the attempt does not count) with a delay that grows
//!   with each claim of it postponed in a row.
//! - `tinytask-wb/<task>` — write the outcomes queued in `status.writeBacks` (by
//!   `outcome::record`, in the same write as the outcome) back to the server, in order, removing
//!   each only once the server acknowledged it; failures back off and are retried, also across
//!   restarts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::{plan, Ctx, Error, Summary};
use crate::resources::event::EventType;
use crate::resources::meta::{format_time, now_rfc3339, parse_time, set_condition};
use crate::resources::queue::OrphanWriteBack;
use crate::resources::queue::DEFAULT_POLL_INTERVAL_SECONDS;
use crate::resources::task::{WriteBack, WriteBackOp, TINYTASK_ID_ANNOTATION};
use crate::resources::{
    Agent, BlockingPolicy, Lease, LeasePhase, Queue, QueueSource, Task, TaskPhase, TaskSpec,
};
use crate::runtime::controller::Action;
use crate::runtime::informer::Informer;
use crate::tinytask::{
    self, Client, ListQuery, QueueStats, RemoteTask, TaskId, TaskPatch, TaskStatus, FAILED_TAG,
    SCAN_WINDOW_MAX,
};

/// Key prefix of a queue poll.
pub const POLL_PREFIX: &str = "tinytask/";
/// Key prefix of a claim.
pub const CLAIM_PREFIX: &str = "tinytask-claim/";
/// Key prefix of a task's pending write-backs.
pub const WRITE_BACK_PREFIX: &str = "tinytask-wb/";
/// Set to `"true"` on a Lease once its tinytask task is claimed; the lease controller spawns only
/// then.
pub const CLAIMED_ANNOTATION: &str = "tinyscheduler.io/claimed";
/// Set on a Lease with [`CLAIMED_ANNOTATION`]: the Queue its Task was mirrored for, so that a
/// result whose Task was deleted meanwhile can still be written back (see [`orphan_write_back`]).
pub const QUEUE_ANNOTATION: &str = "tinyscheduler.io/tinytask-queue";
/// Set on a mirror when it is made, and on its claimed Lease: the server its task is on. Claims
/// and results go there, not to whatever server its Queue names by then (the Queue may have been
/// edited, or deleted and applied again).
pub const ENDPOINT_ANNOTATION: &str = "tinyscheduler.io/tinytask-endpoint";
/// Label on mirrored Tasks.
pub const SOURCE_LABEL: &str = "tinyscheduler.io/source";
/// Name prefix of mirrored Tasks.
pub const TASK_PREFIX: &str = "tt-";
/// The Queue condition that says whether its tinytask server answers.
pub const CONDITION: &str = "SourceReachable";
/// Longest delay between polls of an unreachable server.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Shortest time between two polls of one queue (events such as a freed slot poll early).
/// How many currently-blocked idle tasks of a queue are mirrored as `Blocked` Tasks, so that
/// `get tasks` shows what waits and on what. They never count against free slots.
pub const BLOCKED_MIRROR_MAX: u32 = 50;
const MIN_POLL_GAP: Duration = Duration::from_millis(100);
/// `created_by` of our comments.
const AUTHOR: &str = "tinyscheduler";

/// Per-queue poll state and source health, shared with `/readyz` and `/metrics`.
#[derive(Default)]
pub struct SyncState {
    queues: Mutex<HashMap<String, QueueState>>,
    clients: Mutex<HashMap<String, Client>>,
    /// Claims postponed in a row, per mirror (Task name): each one waits longer (see
    /// [`postpone`]). Cleared by a claim that lands, or a refusal that drops the mirror.
    claim_failures: Mutex<HashMap<String, u32>>,
}

#[derive(Default, Clone, Debug)]
struct QueueState {
    etag: Option<String>,
    stats: Option<QueueStats>,
    /// Free slots seen at the last poll: more now means "list again" even with no server change.
    last_free: i64,
    last_poll: Option<Instant>,
    failures: u32,
    /// `None` until the first poll; then `Ok` or the last error.
    health: Option<Result<(), String>>,
    /// The server may hold runnable tasks for the pool that no list has shown yet: the last list
    /// was cut at the window, or a change was seen while local tasks filled the free slots. The
    /// first poll with room lists again (see [`needs_list`]).
    more: bool,
    /// When the queue's tasks were last listed (see [`list_resync`]).
    last_list: Option<Instant>,
}

/// Longest time between two lists of a queue that has room or Blocked mirrors, whatever its
/// stats say: a blocker completed in another queue changes nothing in this queue's stats, and
/// only a read of the task shows it unblocked. The informers' resync period
/// (`TINYSCHEDULER_LOOP_INTERVAL_SEC`, default 30 s).
fn list_resync() -> Duration {
    static RESYNC: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *RESYNC.get_or_init(|| crate::runtime::informer::InformerOptions::from_env().resync)
}

/// The runtime the tinytask requests run on: its own thread, so that HTTP answers are read at once
/// even while the scheduler's worker threads are busy with store writes and process starts (on
/// the shared runtime, a request's answer waited tens of milliseconds for a free thread).
fn io_runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tinytask-io")
            .enable_all()
            .build()
            .expect("cannot start the tinytask I/O runtime")
    })
}

/// A [`Client`] whose calls run on [`io_runtime`].
#[derive(Clone)]
struct Remote(Client);

impl Remote {
    async fn run<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = tinytask::Result<T>> + Send + 'static,
    ) -> tinytask::Result<T> {
        let endpoint = self.0.endpoint().to_string();
        io_runtime().spawn(f).await.unwrap_or_else(|e| {
            Err(tinytask::Error::Transport {
                request: endpoint,
                message: format!("request task failed: {e}"),
            })
        })
    }
    async fn get_task(&self, id: TaskId) -> tinytask::Result<RemoteTask> {
        let c = self.0.clone();
        self.run(async move { c.get_task(id).await }).await
    }
    async fn patch_task(&self, id: TaskId, p: &TaskPatch) -> tinytask::Result<RemoteTask> {
        let (c, p) = (self.0.clone(), p.clone());
        self.run(async move { c.patch_task(id, &p).await }).await
    }
    async fn add_comment(
        &self,
        id: TaskId,
        text: &str,
        by: &str,
    ) -> tinytask::Result<tinytask::Comment> {
        let (c, text, by) = (self.0.clone(), text.to_string(), by.to_string());
        self.run(async move { c.add_comment(id, &text, &by).await })
            .await
    }
    async fn queue_stats_if_changed(
        &self,
        q: &str,
        etag: Option<&str>,
    ) -> tinytask::Result<tinytask::Conditional<QueueStats>> {
        let (c, q, etag) = (self.0.clone(), q.to_string(), etag.map(str::to_string));
        self.run(async move { c.queue_stats_if_changed(&q, etag.as_deref()).await })
            .await
    }
    async fn runnable_tasks(
        &self,
        q: &str,
        want: usize,
        respect: bool,
    ) -> tinytask::Result<Vec<RemoteTask>> {
        let (c, q) = (self.0.clone(), q.to_string());
        self.run(async move { c.runnable_tasks(&q, want, respect).await })
            .await
    }
    /// Up to `want` idle tasks of queue `q` assigned to `agent` that may run there (not failed
    /// for good; not blocked, with `respect`), read past any number of others
    /// ([`Client::scan_idle`]).
    async fn assigned_runnable(
        &self,
        q: &str,
        agent: &str,
        want: usize,
        respect: bool,
    ) -> tinytask::Result<Vec<RemoteTask>> {
        let (c, q, agent) = (self.0.clone(), q.to_string(), agent.to_string());
        self.run(async move {
            let keep = |t: &RemoteTask| {
                t.status == TaskStatus::Idle
                    && t.assignee() == Some(agent.as_str())
                    && !t.failed_for_good()
                    && (!respect || !t.is_currently_blocked)
            };
            c.scan_idle(&q, Some(&agent), want, keep).await
        })
        .await
    }
    async fn list_tasks(&self, q: &ListQuery) -> tinytask::Result<Vec<RemoteTask>> {
        let (c, q) = (self.0.clone(), q.clone());
        self.run(async move { c.list_tasks(&q).await }).await
    }
}

impl SyncState {
    fn client(&self, endpoint: &str) -> Result<Remote, tinytask::Error> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(endpoint) {
            return Ok(Remote(c.clone()));
        }
        let c = Client::new(endpoint)?;
        clients.insert(endpoint.to_string(), c.clone());
        Ok(Remote(c))
    }

    fn get(&self, queue: &str) -> QueueState {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(queue)
            .cloned()
            .unwrap_or_default()
    }

    fn with<R>(&self, queue: &str, f: impl FnOnce(&mut QueueState) -> R) -> R {
        let mut m = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        f(m.entry(queue.to_string()).or_default())
    }

    /// Counts one more postponed claim of the mirror `task`; returns how many in a row. Mirrors
    /// that are gone (`exists` says no: deleted, expired) are forgotten here, so that the map
    /// holds only live mirrors and a new mirror of the same id starts afresh.
    fn claim_postponed(&self, task: &str, exists: impl Fn(&str) -> bool) -> u32 {
        let mut m = self
            .claim_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        m.retain(|name, _| name == task || exists(name));
        let n = m.entry(task.to_string()).or_default();
        *n = n.saturating_add(1);
        *n
    }

    /// The mirror `task`'s claim landed, or the mirror is dropped: its next claim starts afresh.
    fn claim_settled(&self, task: &str) {
        self.claim_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(task);
    }

    fn forget(&self, queue: &str) {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(queue);
    }

    /// Every polled queue with its health: `None` before the first poll, else `Ok` or the error.
    pub fn sources(&self) -> BTreeMap<String, Option<Result<(), String>>> {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.health.clone()))
            .collect()
    }
}

// ---- helpers other controllers use ----

/// The remote id of a mirrored Task.
pub fn remote_id(task: &Task) -> Option<TaskId> {
    task.metadata
        .annotations
        .get(TINYTASK_ID_ANNOTATION)
        .and_then(|v| v.trim().parse().ok())
}

/// Whether the Task mirrors a tinytask task.
pub fn is_tinytask(task: &Task) -> bool {
    task.metadata
        .annotations
        .contains_key(TINYTASK_ID_ANNOTATION)
}

/// Whether the Lease's tinytask task has been claimed on the server.
pub fn is_claimed(lease: &Lease) -> bool {
    lease
        .metadata
        .annotations
        .get(CLAIMED_ANNOTATION)
        .is_some_and(|v| v == "true")
}

/// True when `lease` must not be spawned yet: its Task mirrors a tinytask task that this
/// controller has not claimed. (The claim is triggered by the Lease itself.)
pub fn awaits_claim(ctx: &Ctx, lease: &Lease) -> Result<bool, Error> {
    if is_claimed(lease) {
        return Ok(false);
    }
    Ok(ctx.task_of(lease)?.is_some_and(|t| is_tinytask(&t)))
}

/// What `outcome::record` queues for a tinytask task whose attempt `attempt` just ended, given
/// the Task as the outcome left it (`phase` Succeeded, Pending to retry, or Failed). `started`:
/// whether that attempt's agent was started at all. A task whose last attempt never started (a
/// claim slower than the Lease, say) is released without the [`FAILED_TAG`]: nothing of it ran
/// here, so nothing says it cannot succeed.
pub fn outcome_write_backs(
    task: &Task,
    attempt: i64,
    agent: &str,
    what: &str,
    log: &str,
    started: bool,
) -> Vec<WriteBack> {
    let name = &task.metadata.name;
    let reason = task.status.reason.as_deref().unwrap_or("Failed");
    // The time makes each comment its own: a write-back retried after a crash posts it once
    // (`comment_once`), but a later run's same words are posted again.
    let at = now_rfc3339();
    let wb = |op, message: Option<String>| WriteBack {
        op,
        attempt,
        message,
        agent: match op {
            WriteBackOp::Release | WriteBackOp::Fail | WriteBackOp::Complete => task
                .status
                .remote_assignee
                .clone()
                .or_else(|| Some(agent.to_string())),
            _ => None,
        },
        created: Some(at.clone()),
    };
    match task.status.phase {
        TaskPhase::Succeeded => vec![wb(WriteBackOp::Complete, None)],
        TaskPhase::Failed if started => vec![wb(
            WriteBackOp::Fail,
            Some(format!(
                "[tinyscheduler {at}] task/{name} failed after {attempt} attempts ({reason}); last attempt on agent {agent}: {what}; log {log}. Released: idle and unassigned, tagged {FAILED_TAG}; remove the tag to have it run again."
            )),
        )],
        TaskPhase::Failed => vec![wb(
            WriteBackOp::Release,
            Some(format!(
                "[tinyscheduler {at}] task/{name} failed after {attempt} attempts ({reason}); its last attempt on agent {agent} never started: {what}. Released: idle and unassigned."
            )),
        )],
        _ => vec![wb(
            WriteBackOp::Comment,
            Some(format!(
                "[tinyscheduler {at}] task/{name} attempt {attempt} on agent {agent} failed ({reason}): {what}; log {log}. {}",
                task.status.message.as_deref().unwrap_or("")
            ).trim_end().to_string()),
        )],
    }
}

/// Queues the write-back for a claimed run whose mirror was deleted before its outcome was
/// recorded: the server's task would otherwise stay `working` for an agent that no longer runs
/// it. A success completes it; anything else releases it (idle and unassigned, with a comment).
/// The Task that would hold the write-back is gone, so the mirror's Queue holds it, durably,
/// before the Lease is deleted (invariant 3); its poll writes it. Not a mirror, not claimed, or
/// no such Queue: nothing to do.
pub fn orphan_write_back(
    ctx: &Ctx,
    lease: &Lease,
    succeeded: bool,
    what: &str,
) -> Result<(), Error> {
    let Some(id) = lease
        .spec
        .task
        .strip_prefix(TASK_PREFIX)
        .and_then(|i| i.parse::<TaskId>().ok())
    else {
        return Ok(());
    };
    if !is_claimed(lease) {
        return Ok(());
    }
    let queue = lease
        .metadata
        .annotations
        .get(QUEUE_ANNOTATION)
        .cloned()
        .or_else(|| {
            ctx.agents
                .get(&lease.spec.agent)
                .and_then(|a| a.spec.queue.clone())
        });
    let Some(queue) = queue else {
        return Ok(());
    };
    let task = &lease.spec.task;
    let agent = &lease.spec.agent;
    let attempt = lease.spec.attempt;
    // A time of the run's own, so that the same write-back queued again (a crash before the Lease
    // was deleted) carries the same words and is commented once.
    let at = lease
        .status
        .finish_time
        .clone()
        .or_else(|| lease.metadata.creation_timestamp.clone())
        .unwrap_or_else(now_rfc3339);
    let (op, message) = if succeeded {
        (WriteBackOp::Complete, None)
    } else {
        (
            WriteBackOp::Release,
            Some(format!(
                "[tinyscheduler {at}] task/{task} was deleted from the scheduler while attempt {attempt} ran on agent {agent}; the run ended ({what}). Released: idle and unassigned."
            )),
        )
    };
    let wb = WriteBack {
        op,
        attempt,
        message,
        agent: Some(agent.clone()),
        created: Some(at),
    };
    let endpoint = server_of(ctx, &lease.metadata.annotations, Some(&queue));
    let written = ctx.store.patch_status::<Queue>(&queue, |q| {
        let queued = q
            .status
            .write_backs
            .iter()
            .any(|o| o.task_id == id && o.write_back.attempt == attempt);
        if !queued {
            q.status.write_backs.push(OrphanWriteBack {
                task_id: id,
                endpoint: endpoint.clone(),
                lease_uid: lease.metadata.uid.clone(),
                write_back: wb.clone(),
            });
        }
    })?;
    match written {
        Some(q) => {
            tracing::info!(kind = "Queue", name = %queue, "task/{task} was deleted while it ran: {:?} queued for tinytask task {id}", wb.op);
            ctx.queues.observe(q);
        }
        None => {
            tracing::warn!(kind = "Task", name = %task, "deleted while it ran, and queue/{queue} is gone: tinytask task {id} is left as it is on the server");
        }
    }
    Ok(())
}

/// What deleting a mirror by hand left for its Queue to write to the server.
#[derive(Debug, PartialEq)]
pub enum Owed {
    /// Not a mirror, or it owed its server nothing.
    Nothing,
    /// This many write-backs were queued on the named Queue.
    Queued(String, usize),
    /// It owed its server write-backs, but its Queue is gone: nothing can send them.
    QueueGone(String),
}

/// Before a mirror is deleted by hand (`delete task tt-<id>`): what it still owes its server goes
/// to its Queue, durably, for the Queue's poll to write (as for a mirror deleted while it ran, see
/// [`orphan_write_back`]). That is its write-backs not sent yet and, if it holds a claim with no
/// claimed run of it here (waiting to retry, a retry's claim in flight, its Lease deleted by
/// hand: the server shows the task `working` for our agent, which no poll lists), a release:
/// without it, the task would stay `working` on the server for good. A claimed run's release is
/// left to its reclaim. `default_endpoint`: the server of mirrors and Queues that name none.
pub fn queue_owed_before_delete(
    store: &crate::store::Store,
    task: &Task,
    default_endpoint: &str,
) -> Result<Owed, crate::store::StoreError> {
    let name = &task.metadata.name;
    // A claimed run of it is reclaimed once its Task is gone, and that reclaim releases the task
    // ([`orphan_write_back`]); without one (waiting to retry, a claim still in flight, a Lease
    // deleted by hand) nothing else would.
    let claimed_run = store
        .try_get::<Lease>(name)?
        .is_some_and(|l| l.spec.runs(task) && is_claimed(&l));
    let release = match (
        &task.status.remote_assignee,
        task.status.phase.is_finished(),
    ) {
        (Some(agent), false) if !claimed_run => {
            let when = match task.status.attempts {
                0 => "before it ran".to_string(),
                n => format!("after attempt {n}"),
            };
            Some((
                agent.clone(),
                format!(
                    "[tinyscheduler {}] task/{name} was deleted from the scheduler with no run of it holding its claim ({when}, claimed for agent {agent}). Released: idle and unassigned.",
                    now_rfc3339()
                ),
            ))
        }
        _ => None,
    };
    queue_owed(store, task, default_endpoint, release)
}

/// Queues on the mirror's Queue its write-backs not sent yet and, with `release` (the agent the
/// server shows holding the task, and the comment), the release of that claim.
fn queue_owed(
    store: &crate::store::Store,
    task: &Task,
    default_endpoint: &str,
    release: Option<(String, String)>,
) -> Result<Owed, crate::store::StoreError> {
    let Some(id) = remote_id(task) else {
        return Ok(Owed::Nothing);
    };
    let mut owed: Vec<WriteBack> = task.status.write_backs.clone();
    if let Some((agent, message)) = release {
        owed.push(WriteBack {
            op: WriteBackOp::Release,
            attempt: task.status.attempts,
            message: Some(message),
            agent: Some(agent),
            created: Some(now_rfc3339()),
        });
    }
    if owed.is_empty() {
        return Ok(Owed::Nothing);
    }
    let Some(queue) = task.spec.queue.clone().filter(|q| !q.is_empty()) else {
        return Ok(Owed::QueueGone(String::new()));
    };
    let mut endpoint = recorded_endpoint(&task.metadata.annotations);
    let written = store.patch_status::<Queue>(&queue, |q| {
        let ep = endpoint.get_or_insert_with(|| queue_endpoint(Some(q), default_endpoint));
        for wb in &owed {
            // Once per attempt and kind: a delete that read the Task again (it changed) queues
            // its release again with another time in its words.
            let queued = q.status.write_backs.iter().any(|o| {
                o.task_id == id && o.write_back.op == wb.op && o.write_back.attempt == wb.attempt
            });
            if !queued {
                q.status.write_backs.push(OrphanWriteBack {
                    task_id: id,
                    endpoint: ep.clone(),
                    lease_uid: String::new(),
                    write_back: wb.clone(),
                });
            }
        }
    })?;
    Ok(match written {
        Some(_) => Owed::Queued(queue, owed.len()),
        None => Owed::QueueGone(queue),
    })
}

/// Writes the Queue's write-backs for deleted mirrors, oldest first, each to the server it was
/// queued for, removing each once the server took it (or the task is gone there). A release is
/// dropped instead when another run of the task holds a Lease here: it was released already (a
/// crash came between the write-back and the old Lease's deletion, and that run was recorded
/// twice), and releasing it now would take the task from under the new run.
/// A failure leaves that one for a later poll and goes on with the next; `true`: some are left.
async fn flush_orphans(ctx: &Ctx, queue: &Queue) -> bool {
    if queue.status.write_backs.is_empty() || ctx.settings.dry_run {
        return false;
    }
    let name = &queue.metadata.name;
    let mut left = false;
    for o in &queue.status.write_backs {
        let op = o.write_back.op;
        let id = o.task_id;
        let endpoint = if o.endpoint.is_empty() {
            endpoint_of(ctx, Some(queue))
        } else {
            o.endpoint.clone()
        };
        // Leases are named after their Task; only a claimed one of a Queue on the same server is
        // a run of this task (a local Task, or another server's task, may have the same name).
        let running_again = ctx
            .leases
            .get(&format!("{TASK_PREFIX}{id}"))
            .is_some_and(|l| {
                l.metadata.uid != o.lease_uid
                    && is_claimed(&l)
                    && l.metadata
                        .annotations
                        .get(QUEUE_ANNOTATION)
                        .is_some_and(|q| {
                            let theirs = server_of(ctx, &l.metadata.annotations, Some(q));
                            same_endpoint(&theirs, &endpoint)
                        })
            });
        if running_again && op == WriteBackOp::Release {
            tracing::info!(kind = "Queue", name = %name, "{op:?} for tinytask task {id} dropped: it runs here again");
        } else {
            let done = match ctx.tinytask.client(&endpoint) {
                Ok(client) => perform(&client, id, &o.write_back).await,
                Err(e) => Err(e),
            };
            match done {
                Ok(()) => {
                    tracing::info!(kind = "Queue", name = %name, "wrote back {op:?} to tinytask task {id}");
                }
                Err(e) if e.is_not_found() => {
                    tracing::warn!(kind = "Queue", name = %name, "{op:?} for tinytask task {id} dropped: {e}");
                }
                Err(e) => {
                    ctx.event(
                        queue,
                        EventType::Warning,
                        "WriteBackPending",
                        &format!("{op:?} for tinytask task {id} (its mirror was deleted) not written yet, will retry: {e}"),
                    );
                    left = true;
                    continue;
                }
            }
        }
        match ctx.store.patch_status::<Queue>(name, |q| {
            q.status.write_backs.retain(|x| x != o);
        }) {
            Ok(Some(q)) => ctx.queues.observe(q),
            Ok(None) => return false,
            Err(e) => {
                tracing::warn!(kind = "Queue", name = %name, "cannot remove a written write-back (it will be written again): {e}");
                left = true;
            }
        }
    }
    left
}

/// The tinytask queues whose server did not answer at the last poll, with the error.
pub fn unreachable_sources(ctx: &Ctx) -> Vec<(String, String)> {
    ctx.tinytask
        .sources()
        .into_iter()
        .filter_map(|(q, h)| match h {
            Some(Err(e)) => Some((q, e)),
            _ => None,
        })
        .collect()
}

/// Whether a reachable tinytask queue may still have runnable work for us: never polled yet, or
/// the server may hold runnable tasks not listed yet (`more`) and an unpaused agent serves the
/// queue (with none, no list would ever clear it). `run --once --wait` keeps going while it does.
pub fn has_more_work(ctx: &Ctx) -> bool {
    !sources_with_more_work(ctx).is_empty()
}

/// The tinytask queues [`has_more_work`] holds true for, each with why.
pub fn sources_with_more_work(ctx: &Ctx) -> Vec<(String, String)> {
    let sources = ctx
        .tinytask
        .queues
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let agents = ctx.agents.list();
    let served = |q: &str| {
        agents
            .iter()
            .any(|a| a.spec.queue.as_deref() == Some(q) && !a.spec.paused)
    };
    ctx.queues
        .list()
        .iter()
        .filter(|q| q.spec.source == QueueSource::Tinytask)
        .filter_map(|q| {
            let why = match sources.get(&q.metadata.name) {
                None => "never polled".to_string(),
                Some(s) => match &s.health {
                    None => "no poll has finished".to_string(),
                    Some(Ok(())) if s.more && served(&q.metadata.name) => format!(
                        "the server may hold runnable tasks not listed yet (free slots at the last poll: {})",
                        s.last_free
                    ),
                    _ => return None,
                },
            };
            Some((q.metadata.name.clone(), why))
        })
        .collect()
}

/// Readiness: fails while any tinytask queue's server is unreachable.
pub fn check_sources(ctx: &Ctx) -> Result<(), String> {
    let down = unreachable_sources(ctx);
    if down.is_empty() {
        return Ok(());
    }
    Err(down
        .iter()
        .map(|(q, e)| format!("queue/{q}: {e}"))
        .collect::<Vec<_>>()
        .join("; "))
}

/// `tinyscheduler_tinytask_source_up{queue}`: 1 when the last poll succeeded, else 0.
pub fn render_metrics(ctx: &Ctx) -> String {
    let mut out = String::from(
        "# HELP tinyscheduler_tinytask_source_up Whether the tinytask server of a queue answered its last poll.\n# TYPE tinyscheduler_tinytask_source_up gauge\n",
    );
    let sources = ctx.tinytask.sources();
    for q in ctx.queues.list() {
        if q.spec.source != QueueSource::Tinytask {
            continue;
        }
        let up = matches!(sources.get(&q.metadata.name), Some(Some(Ok(()))));
        out.push_str(&format!(
            "tinyscheduler_tinytask_source_up{{queue=\"{}\"}} {}\n",
            q.metadata.name.replace('\\', "\\\\").replace('"', "\\\""),
            u8::from(up)
        ));
    }
    out
}

// ---- key mappers ----

/// Every Queue change wakes its poll key: a tinytask queue is polled, and one that is no longer
/// (its source changed to local) has its poll state forgotten. Queues are few.
pub fn keys_for_queue(q: &Queue) -> Vec<String> {
    vec![format!("{POLL_PREFIX}{}", q.metadata.name)]
}

pub fn keys_for_agent(a: &Agent) -> Vec<String> {
    a.spec
        .queue
        .iter()
        .map(|q| format!("{POLL_PREFIX}{q}"))
        .collect()
}

pub fn keys_for_task(t: &Task) -> Vec<String> {
    if !t.status.write_backs.is_empty() {
        vec![format!("{WRITE_BACK_PREFIX}{}", t.metadata.name)]
    } else {
        Vec::new()
    }
}

/// A Lease change: claim it if it needs claiming, and (a slot taken or freed) look at its agent's
/// queue again if that queue is polled from tinytask. (A local queue's runs, thousands in a burst,
/// wake nothing here.)
pub fn lease_mapper(
    agents: Informer<Agent>,
    queues: Informer<Queue>,
) -> impl Fn(&Lease) -> Vec<String> + Send + Sync {
    move |l: &Lease| {
        let mut keys = Vec::new();
        if l.spec.task.starts_with(TASK_PREFIX)
            && l.status.phase == LeasePhase::Pending
            && !is_claimed(l)
        {
            keys.push(format!("{CLAIM_PREFIX}{}", l.metadata.name));
        }
        if let Some(q) = agents.get(&l.spec.agent).and_then(|a| a.spec.queue.clone()) {
            if queues
                .get(&q)
                .is_some_and(|q| q.spec.source == QueueSource::Tinytask)
            {
                keys.push(format!("{POLL_PREFIX}{q}"));
            }
        }
        keys
    }
}

pub async fn reconcile(key: String, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if let Some(q) = key.strip_prefix(POLL_PREFIX) {
        poll(&ctx, q).await
    } else if let Some(l) = key.strip_prefix(CLAIM_PREFIX) {
        claim(&ctx, l).await
    } else if let Some(t) = key.strip_prefix(WRITE_BACK_PREFIX) {
        write_back(&ctx, t).await
    } else {
        Ok(Action::await_change())
    }
}

fn endpoint_of(ctx: &Ctx, queue: Option<&Queue>) -> String {
    queue_endpoint(queue, &ctx.settings.tinytask_endpoint)
}

/// The server `queue` names, else `default` (also without a Queue).
fn queue_endpoint(queue: Option<&Queue>, default: &str) -> String {
    queue
        .and_then(|q| q.spec.endpoint.clone())
        .filter(|e| !e.trim().is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// The server recorded on an object with these annotations (a mirror, a claimed Lease), if any.
fn recorded_endpoint(annotations: &BTreeMap<String, String>) -> Option<String> {
    annotations
        .get(ENDPOINT_ANNOTATION)
        .filter(|e| !e.trim().is_empty())
        .cloned()
}

/// The endpoint of the Queue named `queue` (the default one when there is no such Queue).
fn endpoint_named(ctx: &Ctx, queue: Option<&str>) -> String {
    endpoint_of(ctx, queue.and_then(|q| ctx.queues.get(q)).as_deref())
}

/// The server of the object with these annotations: the one recorded on it, else (a mirror made
/// by an earlier version) its Queue's.
fn server_of(ctx: &Ctx, annotations: &BTreeMap<String, String>, queue: Option<&str>) -> String {
    recorded_endpoint(annotations).unwrap_or_else(|| endpoint_named(ctx, queue))
}

/// Whether two endpoints name the same server as written (a trailing `/` aside).
/// Whether two spellings name the same server as the client uses it (`http://h:3000/mcp` and
/// `http://h:3000/` do).
fn same_endpoint(a: &str, b: &str) -> bool {
    let norm = |e: &str| {
        crate::tinytask::client::normalize_endpoint(e)
            .unwrap_or_else(|| e.trim().trim_end_matches('/').to_string())
    };
    norm(a) == norm(b)
}

fn remote_queue(q: &Queue) -> String {
    q.spec
        .remote_queue
        .clone()
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| q.metadata.name.clone())
}

fn respects_blocking(ctx: &Ctx, q: Option<&Queue>) -> bool {
    !ctx.settings.disable_blocking && q.is_none_or(|q| q.spec.blocking == BlockingPolicy::Respect)
}

fn interval_of(q: &Queue) -> Duration {
    Duration::from_secs(
        q.spec
            .poll_interval_seconds
            .unwrap_or(DEFAULT_POLL_INTERVAL_SECONDS)
            .max(1) as u64,
    )
}

/// The delay before the next poll after `failures` failed polls in a row: the interval doubling
/// per failure, at most [`MAX_BACKOFF`].
pub fn backoff(interval: Duration, failures: u32) -> Duration {
    if failures == 0 {
        return interval;
    }
    interval
        .saturating_mul(1u32 << (failures - 1).min(16))
        .min(MAX_BACKOFF)
        .max(interval.min(MAX_BACKOFF))
}

/// Records the health of a queue's source: the in-memory state (for `/readyz`, `/metrics` and
/// `run --once`), the Queue's `SourceReachable` condition, an Event and the error count when it
/// goes down.
fn set_health(ctx: &Ctx, queue: &str, health: Result<(), String>) {
    let before = ctx.tinytask.with(queue, |s| {
        let before = s.health.clone();
        match &health {
            Ok(()) => s.failures = 0,
            Err(_) => s.failures = s.failures.saturating_add(1),
        }
        s.health = Some(health.clone());
        before
    });
    if before.as_ref() == Some(&health) {
        return;
    }
    match &health {
        Err(e) => {
            if !matches!(before, Some(Err(_))) {
                Summary::bump(&ctx.summary.errors);
            }
            tracing::warn!(
                kind = "Queue",
                name = queue,
                "tinytask source unreachable: {e}"
            );
        }
        Ok(()) => tracing::info!(kind = "Queue", name = queue, "tinytask source reachable"),
    }
    if ctx.settings.dry_run {
        return;
    }
    let (ok, reason, message) = match &health {
        Ok(()) => (true, "Polled", "the tinytask server answers".to_string()),
        Err(e) => (false, "Unreachable", e.clone()),
    };
    match ctx.store.patch_status::<Queue>(queue, |q| {
        set_condition(&mut q.status.conditions, CONDITION, ok, reason, &message);
    }) {
        Ok(Some(q)) => {
            // An event only when it flips, not for each failed poll.
            let flipped = matches!(
                (&before, &health),
                (Some(Ok(())), Err(_)) | (None, Err(_)) | (Some(Err(_)), Ok(()))
            );
            if flipped {
                let (t, r) = if ok {
                    (EventType::Normal, "SourceReachable")
                } else {
                    (EventType::Warning, "SourceUnreachable")
                };
                ctx.event(&q, t, r, &message);
            }
            ctx.queues.observe(q);
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(kind = "Queue", name = queue, "cannot write condition: {e}"),
    }
}

// ---- poll ----

async fn poll(ctx: &Ctx, name: &str) -> Result<Action, Error> {
    let Some(queue) = ctx.queues.get(name) else {
        ctx.tinytask.forget(name);
        return Ok(Action::await_change());
    };
    // Results of mirrors deleted while they ran are written apart from the poll: a server refusing
    // one of them must not stop the queue, and its source may even be local by now.
    if queue.spec.source != QueueSource::Tinytask {
        ctx.tinytask.forget(name);
        return Ok(if flush_orphans(ctx, &queue).await {
            Action::requeue_after(interval_of(&queue))
        } else {
            Action::await_change()
        });
    }
    let interval = interval_of(&queue);
    let state = ctx.tinytask.get(name);
    if let Some(last) = state.last_poll {
        let gap = if state.failures > 0 {
            backoff(interval, state.failures)
        } else {
            MIN_POLL_GAP
        };
        let since = last.elapsed();
        if since < gap {
            return Ok(Action::requeue_after(gap - since));
        }
    }
    ctx.tinytask
        .with(name, |s| s.last_poll = Some(Instant::now()));
    // Throttled with the poll, so that a server that is down is not asked at every wake.
    flush_orphans(ctx, &queue).await;
    match poll_once(ctx, &queue, &state).await {
        Ok(()) => {
            set_health(ctx, name, Ok(()));
            Ok(Action::requeue_after(interval))
        }
        Err(e) => {
            let msg = e.to_string();
            set_health(ctx, name, Err(msg));
            let failures = ctx.tinytask.get(name).failures;
            Ok(Action::requeue_after(backoff(interval, failures)))
        }
    }
}

/// What a poll sees of the local Tasks when it decides whether a free slot still needs a task
/// from the server.
struct Local<'a> {
    /// Every cached Task by name (blockers need not be mirrors).
    by_name: HashMap<&'a str, &'a Arc<Task>>,
    /// Tasks that hold a Lease.
    leased: HashSet<&'a str>,
    now: SystemTime,
    /// Whether the queue respects `blockedBy`.
    respect: bool,
}

impl Local<'_> {
    /// Whether a local Task is waiting for a slot right now, so that it already fills one of the
    /// window: Pending, not leased, not waiting out a retry delay, and not waiting for a blocker.
    /// A blocked mirror is created Pending and marked Blocked by the assignment loop a moment
    /// later; counted in between, it hid a free slot from the poll that saw the server change,
    /// and nothing made a later poll list again.
    fn fills_a_slot(&self, t: &Task) -> bool {
        t.status.phase == TaskPhase::Pending
            && !self.leased.contains(t.metadata.name.as_str())
            && t.status
                .next_attempt_after
                .as_deref()
                .and_then(parse_time)
                .is_none_or(|at| at <= self.now)
            && (!self.respect || plan::unfinished_blockers(t, &self.by_name).is_empty())
    }
}

/// Whether a poll lists the queue's runnable tasks: when the server changed, when a slot was freed
/// since the last poll, or when there is room (`want` > 0) and the server may hold runnable tasks
/// not listed yet (`more`: the last list was cut at the window, or a change was not listed since
/// the local tasks filled the slots then). The last case needs no event: whatever made room
/// without freeing a slot (a Pending mirror turning out blocked, or deleted) wakes nothing, and the
/// change it would have listed is not seen twice.
fn needs_list(changed: bool, free: i64, want: i64, state: &QueueState) -> bool {
    changed || free > state.last_free || (state.more && want > 0)
}

async fn poll_once(ctx: &Ctx, queue: &Queue, state: &QueueState) -> Result<(), tinytask::Error> {
    let name = queue.metadata.name.as_str();
    let client = ctx.tinytask.client(&endpoint_of(ctx, Some(queue)))?;
    let remote = remote_queue(queue);
    let respect = respects_blocking(ctx, Some(queue));

    let (changed, etag, stats) = match client
        .queue_stats_if_changed(&remote, state.etag.as_deref())
        .await?
    {
        tinytask::Conditional::NotModified => (false, state.etag.clone(), state.stats.clone()),
        tinytask::Conditional::Modified { value, etag } => (true, etag, Some(value)),
    };

    let agents = ctx.agents.list();
    let leases = ctx.leases.list();
    let tasks = ctx.tasks.list();
    let free = plan::free_slots(&agents, &leases, &tasks);
    let local = Local {
        by_name: tasks
            .iter()
            .map(|t| (t.metadata.name.as_str(), t))
            .collect(),
        leased: leases.iter().map(|l| l.spec.task.as_str()).collect(),
        now: SystemTime::now(),
        respect,
    };
    let by_name: HashMap<&str, &Arc<Task>> = tasks
        .iter()
        .filter(|t| is_tinytask(t))
        .map(|t| (t.metadata.name.as_str(), t))
        .collect();
    let mirrors: Vec<&Arc<Task>> = by_name
        .values()
        .copied()
        .filter(|t| t.spec.queue.as_deref() == Some(name))
        .collect();
    let pool: Vec<&Arc<Agent>> = agents
        .iter()
        .filter(|a| a.spec.queue.as_deref() == Some(name) && !a.spec.paused)
        .collect();
    let pool_free: i64 = pool
        .iter()
        .map(|a| free.get(&a.metadata.name).copied().unwrap_or(0))
        .sum();
    // The slots this queue's tasks can use: its pool's, and those of our agents the server has
    // tasks assigned to. (All agents' together would miss a slot freed here while one was taken
    // elsewhere.)
    let assignees: Vec<String> = stats.as_ref().map(|s| s.agents.clone()).unwrap_or_default();
    let watched_free: i64 = agents
        .iter()
        .filter(|a| {
            !a.spec.paused
                && (a.spec.queue.as_deref() == Some(name) || assignees.contains(&a.metadata.name))
        })
        .map(|a| free.get(&a.metadata.name).copied().unwrap_or(0))
        .sum();
    // Mirrors the server still lists as idle: they are in every answer, so ask for that many more.
    let known_idle = mirrors
        .iter()
        .filter(|t| {
            matches!(
                t.status.phase,
                TaskPhase::Pending | TaskPhase::Blocked | TaskPhase::Failed
            ) || !t.status.write_backs.is_empty()
        })
        .count();

    let pending_pool = mirrors
        .iter()
        .filter(|t| t.spec.assigned_to.is_none() && local.fills_a_slot(t))
        .count() as i64;
    let want = pool_free - pending_pool;
    let blocked_mirrors = mirrors.iter().any(|t| t.status.phase == TaskPhase::Blocked);
    let resync = (want > 0 || blocked_mirrors)
        && state.last_list.is_none_or(|t| t.elapsed() >= list_resync());
    let needs_list = needs_list(changed, watched_free, want, state) || resync;

    let mut more = state.more;
    if needs_list {
        if want <= 0 {
            // Local tasks fill the pool's free slots: the change stays owed, and the first poll
            // with room lists it (see `needs_list`). A full pool lists when a slot is freed anyway.
            more |= pool_free > 0;
        } else {
            let want = want as usize;
            let mut ask = (want + known_idle).min(SCAN_WINDOW_MAX as usize);
            let mut added = 0usize;
            let mut seen = HashSet::new();
            loop {
                let got = client.runnable_tasks(&remote, ask, respect).await?;
                let full = got.len() >= ask;
                more = full;
                for t in &got {
                    if !seen.insert(t.id) {
                        continue;
                    }
                    let tname = format!("{TASK_PREFIX}{}", t.id);
                    match by_name.get(tname.as_str()) {
                        Some(local) => refresh(ctx, queue, local, t, None, respect),
                        None if added < want && mirror(ctx, queue, t, None, respect) => {
                            added += 1;
                        }
                        None => {}
                    }
                }
                match wider_window(ask, full, added >= want) {
                    Some(w) => ask = w,
                    None => break,
                }
            }
        }

        // Blocked, unassigned idle tasks are mirrored too (bounded), blockedBy mapped, so they show
        // as Blocked; a later poll clears blockedBy once the blocker is done and they run.
        if respect {
            let q = ListQuery::new(BLOCKED_MIRROR_MAX)
                .queue(remote.clone())
                .status(TaskStatus::Idle);
            for t in client.list_tasks(&q).await?.iter().filter(|t| {
                t.status == TaskStatus::Idle
                    && t.assignee().is_none()
                    && t.is_currently_blocked
                    && !t.failed_for_good()
            }) {
                let tname = format!("{TASK_PREFIX}{}", t.id);
                match by_name.get(tname.as_str()) {
                    Some(local) => refresh(ctx, queue, local, t, None, respect),
                    None => {
                        mirror(ctx, queue, t, None, respect);
                    }
                }
            }
        }

        // Tasks assigned on the server to an Agent we manage run on that agent.
        for a in assignees {
            let Some(agent) = agents
                .iter()
                .find(|x| x.metadata.name == a && !x.spec.paused)
            else {
                continue;
            };
            let pend = mirrors
                .iter()
                .filter(|t| t.spec.assigned_to.as_deref() == Some(&a) && local.fills_a_slot(t))
                .count() as i64;
            let want = free.get(&agent.metadata.name).copied().unwrap_or(0) - pend;
            if want <= 0 {
                continue;
            }
            // Blocked tasks must not use up the window, as for the unassigned ones.
            let want = want as usize;
            let mut ask = (want + known_idle).min(SCAN_WINDOW_MAX as usize);
            let mut added = 0;
            let mut seen = HashSet::new();
            loop {
                let got = client.assigned_runnable(&remote, &a, ask, respect).await?;
                let full = got.len() >= ask;
                for t in &got {
                    if !seen.insert(t.id) {
                        continue;
                    }
                    let tname = format!("{TASK_PREFIX}{}", t.id);
                    match by_name.get(tname.as_str()) {
                        Some(local) => refresh(ctx, queue, local, t, Some(&a), respect),
                        None if added < want && mirror(ctx, queue, t, Some(&a), respect) => {
                            added += 1;
                        }
                        None => {}
                    }
                }
                match wider_window(ask, full, added >= want) {
                    Some(w) => ask = w,
                    None => break,
                }
            }
        }
    }
    ctx.tinytask.with(name, |s| {
        s.etag = etag;
        s.stats = stats;
        s.last_free = watched_free;
        s.more = more;
        if needs_list {
            s.last_list = Some(Instant::now());
        }
    });
    Ok(())
}

/// The next, wider window to list through, or `None` when this one did: enough runnable tasks
/// were found, the answer was not full (nothing more to see), or the window is at its largest.
/// Blocked tasks and tasks of others fill a window without counting, so it grows past them.
fn wider_window(window: usize, came_back_full: bool, found_enough: bool) -> Option<usize> {
    let max = SCAN_WINDOW_MAX as usize;
    (!found_enough && came_back_full && window < max).then(|| (window * 4).min(max))
}

/// The Task spec a remote task maps to.
fn spec_for(queue: &Queue, t: &RemoteTask, pinned: Option<&str>, respect: bool) -> TaskSpec {
    let mut params = BTreeMap::new();
    params.insert(
        "title".to_string(),
        serde_json::Value::from(param_text("title", &t.title)),
    );
    if let Some(d) = t.description.as_deref().filter(|d| !d.is_empty()) {
        params.insert(
            "description".to_string(),
            serde_json::Value::from(param_text("description", d)),
        );
    }
    params.insert("tinytask_id".to_string(), serde_json::Value::from(t.id));
    TaskSpec {
        queue: Some(queue.metadata.name.clone()),
        assigned_to: pinned.map(str::to_string),
        priority: t.priority_i64(),
        blocked_by: match t.blocked_by_task_id {
            Some(b) if respect && t.is_currently_blocked => vec![format!("{TASK_PREFIX}{b}")],
            _ => Vec::new(),
        },
        params,
        ..TaskSpec::default()
    }
}

/// A server's text as a param the agent's environment can carry (see
/// `validate::validate_task`): a NUL, which no variable can hold, as U+FFFD, and the text cut on a
/// character boundary to what one variable takes. Either would otherwise fail every attempt to
/// start the agent; the agent reads the whole task from the server by its id.
fn param_text(key: &str, text: &str) -> String {
    let room = crate::resources::validate::MAX_ENV_STRING
        .saturating_sub(crate::resources::task::param_env_name(key).len() + 1);
    // Also within a share of the mirror's size as stored, where a control character takes six
    // bytes (`\u001b`): two such params must not take a mirror over the store's limit.
    let (mut raw, mut stored) = (0, 0);
    let mut out = String::new();
    for c in text.chars() {
        let c = if c == '\0' { '\u{fffd}' } else { c };
        let escaped = match c {
            '"' | '\\' | '\n' | '\t' | '\r' | '\u{8}' | '\u{c}' => 2,
            c if (c as u32) < 0x20 => 6,
            c => c.len_utf8(),
        };
        if raw + c.len_utf8() > room || stored + escaped > MAX_PARAM_STORED {
            break;
        }
        raw += c.len_utf8();
        stored += escaped;
        out.push(c);
    }
    out
}

/// The most bytes one param of a mirror takes as stored JSON (see [`param_text`]).
const MAX_PARAM_STORED: usize = 256 * 1024;

/// Creates the mirror `tt-<id>`; false if it could not (it exists already, or a dry run).
fn mirror(ctx: &Ctx, queue: &Queue, t: &RemoteTask, pinned: Option<&str>, respect: bool) -> bool {
    let name = format!("{TASK_PREFIX}{}", t.id);
    if ctx.settings.dry_run {
        ctx.would(&format!(
            "mirror tinytask task {} as task/{name} in queue/{}",
            t.id, queue.metadata.name
        ));
        return false;
    }
    let mut task = Task::new("Task", &name, spec_for(queue, t, pinned, respect));
    task.metadata
        .annotations
        .insert(TINYTASK_ID_ANNOTATION.into(), t.id.to_string());
    task.metadata
        .annotations
        .insert(ENDPOINT_ANNOTATION.into(), endpoint_of(ctx, Some(queue)));
    task.metadata
        .labels
        .insert(SOURCE_LABEL.into(), "tinytask".into());
    match ctx.store.create(&task) {
        Ok(created) => {
            tracing::info!(kind = "Task", name = %name, queue = %queue.metadata.name, "mirrored tinytask task {}", t.id);
            ctx.tasks.observe(created);
            true
        }
        Err(e) if e.is_already_exists() => false,
        Err(e) => {
            tracing::warn!(kind = "Task", name = %name, "cannot mirror tinytask task {}: {e}", t.id);
            false
        }
    }
}

/// Brings a waiting mirror's spec up to date (priority, title, pinning); running ones are left
/// alone.
fn refresh(
    ctx: &Ctx,
    queue: &Queue,
    local: &Task,
    t: &RemoteTask,
    pinned: Option<&str>,
    respect: bool,
) {
    let endpoint = endpoint_of(ctx, Some(queue));
    let theirs = server_of(
        ctx,
        &local.metadata.annotations,
        local.spec.queue.as_deref(),
    );
    // A mirror of this Queue that nothing has claimed yet follows the Queue to the server it
    // names now (an endpoint spelled anew, a server moved): there is nothing of it on the old one.
    // A claimed or finished one keeps its server, where its run and result belong.
    let follows = local.spec.queue.as_deref() == Some(queue.metadata.name.as_str())
        && matches!(local.status.phase, TaskPhase::Pending | TaskPhase::Blocked)
        && local.status.attempts == 0
        && local.status.lease.is_none()
        && local.status.remote_assignee.is_none()
        && local.status.write_backs.is_empty()
        && ctx.leases.get(&local.metadata.name).is_none();
    if !same_endpoint(&theirs, &endpoint) && !follows {
        // Another server's task with the same id: mirror names are `tt-<id>`, so this one
        // cannot be mirrored beside it. Taking the mirror over would move it, and its result,
        // to the wrong server.
        ctx.event(
            queue,
            EventType::Warning,
            "NameCollision",
            &format!(
                "tinytask task {} of {endpoint} is not mirrored: task/{} mirrors task {} of {} \
                 (queue/{}); mirror names do not tell servers apart",
                t.id,
                local.metadata.name,
                t.id,
                theirs,
                local.spec.queue.as_deref().unwrap_or("none"),
            ),
        );
        return;
    }
    if !matches!(local.status.phase, TaskPhase::Pending | TaskPhase::Blocked)
        || local.status.lease.is_some()
        || ctx.settings.dry_run
    {
        return;
    }
    let mut spec = spec_for(queue, t, pinned, respect);
    spec.max_retries = local.spec.max_retries;
    spec.timeout_seconds = local.spec.timeout_seconds;
    spec.ttl_seconds_after_finished = local.spec.ttl_seconds_after_finished;
    let moved = !same_endpoint(&theirs, &endpoint);
    if spec == local.spec && !moved {
        return;
    }
    let mut next = local.clone();
    next.spec = spec;
    next.metadata
        .annotations
        .insert(ENDPOINT_ANNOTATION.into(), endpoint.clone());
    match ctx.store.update(&next) {
        Ok(u) => ctx.tasks.observe(u),
        Err(e) if e.is_conflict() || e.is_not_found() => {}
        Err(e) => tracing::warn!(kind = "Task", name = %local.metadata.name, "cannot refresh: {e}"),
    }
}

// ---- claim ----

/// Why the server's copy of a task may not be claimed for `agent`, if it may not.
pub fn refusal(
    remote: &RemoteTask,
    agent: &str,
    ours: Option<&str>,
    respect: bool,
    queue: Option<&str>,
) -> Option<String> {
    // Archived is tinytask's delete: lists and stats hide the task, a read by id still shows it.
    if remote.archived_at.as_deref().is_some_and(|a| !a.is_empty()) {
        return Some("it is archived on the server".into());
    }
    if remote.failed_for_good() {
        return Some(format!(
            "it failed for good before (tagged {FAILED_TAG} on the server)"
        ));
    }
    if let Some(q) = queue.filter(|q| remote.queue() != Some(*q)) {
        return Some(format!(
            "it moved from queue {q} to {} on the server",
            remote.queue().unwrap_or("none")
        ));
    }
    let assignee = remote.assignee();
    let mine = |a: Option<&str>| a.is_none_or(|a| a == agent || Some(a) == ours);
    match remote.status {
        TaskStatus::Complete => return Some("it is already complete on the server".into()),
        TaskStatus::Working if assignee.is_none() || assignee != ours => {
            return Some(format!(
                "it is being worked on by {} on the server",
                assignee.unwrap_or("someone")
            ))
        }
        _ => {}
    }
    if !mine(assignee) {
        return Some(format!(
            "it is assigned to {} on the server",
            assignee.unwrap_or("?")
        ));
    }
    if respect && remote.is_currently_blocked {
        return Some(format!(
            "it is blocked by task {} on the server",
            remote
                .blocked_by_task_id
                .map(|b| b.to_string())
                .unwrap_or_else(|| "?".into())
        ));
    }
    None
}

enum ClaimError {
    /// The task is not ours to run (any more). `held`: the agent of ours the server shows it
    /// working for, from an earlier attempt here: a claim that only this scheduler can give back.
    Refused { why: String, held: Option<String> },
    /// The server could not be reached (connect error, timeout); try later. The queue's source
    /// shows unreachable.
    Unreachable(String),
    /// The claim failed otherwise (the server answered with an error, or our store did); try
    /// later. Says nothing about whether the source is reachable.
    Failed(String),
    /// The server says the task is still blocked (its blocker not complete there), though every
    /// blocker succeeded here: keep the mirror and try later (see [`postpone`]).
    Blocked(String),
}

impl ClaimError {
    /// The Task's reason and message for a claim put off by this error (see [`postpone`]).
    fn postponement(self) -> (&'static str, String) {
        match self {
            ClaimError::Unreachable(e) => (
                "SourceUnreachable",
                format!("cannot claim on tinytask ({e})"),
            ),
            ClaimError::Failed(e) => ("ClaimFailed", format!("cannot claim on tinytask ({e})")),
            ClaimError::Blocked(why) => ("BlockedOnServer", format!("not claimed yet: {why}")),
            ClaimError::Refused { why, .. } => ("ClaimRefused", why),
        }
    }
}

impl From<tinytask::Error> for ClaimError {
    fn from(e: tinytask::Error) -> Self {
        if e.is_not_found() {
            ClaimError::Refused {
                why: "it no longer exists on the server".into(),
                held: None,
            }
        } else if e.is_unreachable() {
            ClaimError::Unreachable(e.to_string())
        } else {
            ClaimError::Failed(e.to_string())
        }
    }
}

async fn claim(ctx: &Ctx, lease_name: &str) -> Result<Action, Error> {
    let Some(lease) = ctx.store.try_get::<Lease>(lease_name)? else {
        return Ok(Action::await_change());
    };
    if lease.status.phase != LeasePhase::Pending || is_claimed(&lease) {
        return Ok(Action::await_change());
    }
    let Some(task) = ctx.stored_task_of(&lease)? else {
        return Ok(Action::await_change());
    };
    let Some(id) = remote_id(&task) else {
        return Ok(Action::await_change());
    };
    let agent = lease.spec.agent.clone();
    if ctx.settings.dry_run {
        ctx.would(&format!(
            "claim tinytask task {id} for agent/{agent} (lease/{lease_name})"
        ));
        return Ok(Action::await_change());
    }
    let queue = task.spec.queue.as_deref().and_then(|q| ctx.queues.get(q));
    let Some(queue) = queue else {
        // Its Queue, which says how the task may be taken (remote queue, blocking), is gone.
        let why = format!(
            "its Queue queue/{} no longer exists",
            task.spec.queue.as_deref().unwrap_or_default()
        );
        refuse(ctx, &lease, &task, id, &why, None)?;
        return Ok(Action::await_change());
    };
    let queue = Some(queue);
    let endpoint = server_of(ctx, &task.metadata.annotations, task.spec.queue.as_deref());
    let respect = respects_blocking(ctx, queue.as_deref());
    let from = queue.as_deref().map(remote_queue);
    let target = Target {
        endpoint: &endpoint,
        queue: from.as_deref(),
        respect,
    };
    match claim_on_server(ctx, &task, &lease, id, &agent, target).await {
        Ok(landed) => {
            if let Some(q) = &queue {
                set_health(ctx, &q.metadata.name, Ok(()));
            }
            if !mark_claimed(ctx, &lease, task.spec.queue.as_deref(), &endpoint)? {
                // The run was reclaimed ("never started") while the last PATCH was under way: the
                // release its outcome queued may already have found the task idle and left it
                // so, and nothing will run it now. Only this claim can give it back.
                // Should that fail, the release of the claim is queued with what the mirror owes
                // the server, and retried there until it lands: the task is never left working
                // for an agent that runs nothing (invariant 3).
                let owed = match give_back(ctx, &endpoint, id, &landed.before).await {
                    Ok(()) => landed.held,
                    Err(e) => {
                        tracing::warn!(
                            "tinytask task {id}: cannot give back the claim of a reclaimed run \
                             now ({e}); its release is queued"
                        );
                        Some(agent.clone())
                    }
                };
                refuse(ctx, &lease, &task, id, RECLAIMED_MEANWHILE, owed)?;
                return Ok(Action::await_change());
            }
            ctx.tinytask.claim_settled(&task.metadata.name);
            ctx.event(
                &task,
                EventType::Normal,
                "Claimed",
                &format!("claimed tinytask task {id} for agent/{agent} (assigned_to={agent}, status=working)"),
            );
            Ok(Action::await_change())
        }
        Err(ClaimError::Refused { why, held }) => {
            refuse(ctx, &lease, &task, id, &why, held)?;
            Ok(Action::await_change())
        }
        Err(e) => {
            if let (ClaimError::Unreachable(m), Some(q)) = (&e, &queue) {
                set_health(ctx, &q.metadata.name, Err(m.clone()));
            }
            let (reason, message) = e.postponement();
            postpone(ctx, &lease, &task, queue.as_deref(), reason, &message)?;
            Ok(Action::await_change())
        }
    }
}

/// Where a claim goes: the server, the queue the task must still be in there, and whether its
/// blockers count.
#[derive(Clone, Copy)]
struct Target<'a> {
    endpoint: &'a str,
    queue: Option<&'a str>,
    respect: bool,
}

/// A claim that landed on the server: what the task was before it, so that it can be given back.
struct Landed {
    /// The task as read before the claim.
    before: RemoteTask,
    /// The agent of ours the server showed holding the task from an earlier attempt, if any.
    held: Option<String>,
}

/// Why a claim is refused whose run was reclaimed (never started) while it was under way.
const RECLAIMED_MEANWHILE: &str = "its run was reclaimed while the claim was under way";

/// Puts the server's task back as the claim found it (status and assignee): the claim went
/// (part of the way) through, but its run is gone.
async fn give_back(
    ctx: &Ctx,
    endpoint: &str,
    id: TaskId,
    before: &RemoteTask,
) -> Result<(), tinytask::Error> {
    let assignee = before.assigned_to.clone().filter(|a| !a.is_empty());
    let undo = TaskPatch::new().assignee(assignee).status(before.status);
    ctx.tinytask
        .client(endpoint)?
        .patch_task(id, &undo)
        .await
        .map(|_| ())
}

/// Re-reads the task, assigns it to `agent` if it is still ours to take, checks that nobody wrote
/// in between (PATCH is last-write-wins: the answer's `previous_assigned_to` and `status` tell),
/// and sets it working. The caller still has to mark the Lease claimed, and give the task back
/// (with [`give_back`]) if the Lease is gone by then.
async fn claim_on_server(
    ctx: &Ctx,
    task: &Task,
    lease: &Lease,
    id: TaskId,
    agent: &str,
    target: Target<'_>,
) -> Result<Landed, ClaimError> {
    let client = ctx.tinytask.client(target.endpoint)?;
    let before = client.get_task(id).await?;
    let ours = task.status.remote_assignee.as_deref();
    // Still working for an earlier attempt here (and not archived, tinytask's delete): refused,
    // it must be given back, or it stays working for good. The agent it shows is the one claimed
    // last, or another of ours when a later claim's intent was recorded but never landed.
    let held = before
        .assignee()
        .filter(|a| Some(*a) == ours || ctx.agents.get(a).is_some())
        .filter(|_| {
            before.status == TaskStatus::Working
                && ours.is_some()
                && before.archived_at.as_deref().is_none_or(str::is_empty)
        })
        .map(str::to_string);
    if let Some(why) = refusal(&before, agent, ours, target.respect, target.queue) {
        // Blocked, and nothing else in the way: the blocker's completion has not reached the
        // server yet, or it never will from here (someone else holds the blocker). Dropping the
        // mirror would only have the next poll make it again at once.
        let only_blocked = target.respect
            && before.is_currently_blocked
            && refusal(&before, agent, ours, false, target.queue).is_none();
        if only_blocked {
            return Err(ClaimError::Blocked(why));
        }
        return Err(ClaimError::Refused { why, held });
    }
    // Durable intent first: a claim whose answer is lost is recognised as ours next time.
    ctx.patch_task(&task.metadata.name, |t| {
        t.status.remote_assignee = Some(agent.to_string());
    })
    .map_err(|e| ClaimError::Failed(e.0))?;
    let norm = |a: &Option<String>| a.clone().filter(|s| !s.is_empty());
    let after = client
        .patch_task(id, &TaskPatch::new().assign(agent))
        .await?;
    let unchanged_assignee = norm(&before.assigned_to).as_deref() == Some(agent)
        && norm(&after.previous_assigned_to) == norm(&before.previous_assigned_to);
    let was = if unchanged_assignee {
        Some(agent.to_string())
    } else {
        norm(&after.previous_assigned_to)
    };
    if was != norm(&before.assigned_to) || after.status != before.status {
        // Someone wrote between our read and our write: give it back as it was, and stand down.
        if !unchanged_assignee {
            let undo = TaskPatch::new().assignee(was.clone());
            if let Err(e) = client.patch_task(id, &undo).await {
                tracing::warn!("tinytask task {id}: cannot restore the assignee: {e}");
            }
        }
        return Err(ClaimError::Refused {
            why: format!(
                "it changed on the server while being claimed (assignee {}, status {})",
                was.as_deref().unwrap_or("none"),
                after.status
            ),
            held: None,
        });
    }
    // A claim slower than the Lease's duration may find the run reclaimed meanwhile ("never
    // started"): then nothing will run it, so the task goes back as it was instead of working.
    let lease_now = ctx
        .store
        .try_get::<Lease>(&lease.metadata.name)
        .map_err(|e| ClaimError::Failed(e.to_string()))?;
    if lease_now.is_none_or(|l| l.metadata.uid != lease.metadata.uid) {
        // Not working yet (nobody wrote since the read): the task is as it was but for its
        // assignee. Should the give-back fail, the task stays idle with our agent, whose polls
        // list it again.
        if let Err(e) = give_back(ctx, target.endpoint, id, &before).await {
            tracing::warn!("tinytask task {id}: cannot give back the claim: {e}");
        }
        return Err(ClaimError::Refused {
            why: RECLAIMED_MEANWHILE.into(),
            held,
        });
    }
    if after.status != TaskStatus::Working {
        client
            .patch_task(id, &TaskPatch::new().status(TaskStatus::Working))
            .await?;
    }
    Ok(Landed { before, held })
}

/// Annotates the Lease claimed (the lease controller spawns only then; the reclaim controller no
/// longer takes it for never started). False when the Lease is gone or replaced: its run was
/// reclaimed meanwhile, and the claim must be given back.
fn mark_claimed(
    ctx: &Ctx,
    lease: &Lease,
    queue: Option<&str>,
    endpoint: &str,
) -> Result<bool, Error> {
    let name = &lease.metadata.name;
    loop {
        let Some(mut l) = ctx.store.try_get::<Lease>(name)? else {
            return Ok(false);
        };
        if l.metadata.uid != lease.metadata.uid {
            return Ok(false);
        }
        l.metadata
            .annotations
            .insert(CLAIMED_ANNOTATION.into(), "true".into());
        if let Some(q) = queue {
            l.metadata
                .annotations
                .insert(QUEUE_ANNOTATION.into(), q.into());
        }
        l.metadata
            .annotations
            .insert(ENDPOINT_ANNOTATION.into(), endpoint.into());
        match ctx.store.update(&l) {
            Ok(u) => {
                ctx.leases.observe(u);
                return Ok(true);
            }
            Err(e) if e.is_conflict() => continue,
            Err(e) if e.is_not_found() => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    }
}

/// The task is no longer ours: nothing runs. What the mirror still owes the server — write-backs
/// not sent yet and, when an earlier attempt's claim is `held` there, its release — goes to its
/// Queue first ([`queue_owed`]); then the mirror is deleted (a crash in between leaves a Lease
/// whose Task is gone, which the reclaim controller removes), then the Lease.
fn refuse(
    ctx: &Ctx,
    lease: &Lease,
    task: &Task,
    id: TaskId,
    why: &str,
    held: Option<String>,
) -> Result<(), Error> {
    let message = format!(
        "not running tinytask task {id} on agent/{}: {why}; dropped the mirror",
        lease.spec.agent
    );
    ctx.event(task, EventType::Warning, "ClaimRefused", &message);
    let release = held.map(|agent| {
        let message = format!(
            "[tinyscheduler {}] task/{} was not run again: {why}. Released: idle and unassigned.",
            now_rfc3339(),
            task.metadata.name
        );
        (agent, message)
    });
    // The mirror as stored, deleted at that version: an outcome recorded meanwhile (a reclaim of
    // a slow claim's run) is read again, so that what it owes goes to the Queue too.
    let name = &task.metadata.name;
    loop {
        let Some(current) = ctx.stored_task_of(lease)? else {
            // Gone already (or replaced by a new Task of the name, which stays).
            if ctx.store.try_get::<Task>(name)?.is_none() {
                ctx.tasks.observe_deleted(name);
            }
            break;
        };
        let endpoint = &ctx.settings.tinytask_endpoint;
        if let Owed::QueueGone(q) = queue_owed(&ctx.store, &current, endpoint, release.clone())? {
            tracing::warn!(kind = "Task", name = %name, "queue/{q} is gone: what the mirror owed tinytask task {id} is not written back");
        }
        let rv = Some(current.metadata.resource_version.as_str()).filter(|v| !v.is_empty());
        match ctx.store.delete::<Task>(name, rv) {
            Ok(_) => ctx.tasks.observe_deleted(name),
            Err(e) if e.is_not_found() => ctx.tasks.observe_deleted(name),
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e.into()),
        }
        // As its TTL would: a later mirror of the id starts with no logs (a log's end says how
        // a run ended, see `shim::log_says_lease_lost`).
        if let Err(e) = crate::agent::shim::remove_logs(&ctx.state_dir, name) {
            tracing::warn!(kind = "Task", name = %name, "cannot remove {e}");
        }
        break;
    }
    ctx.tinytask.claim_settled(name);
    // The task may be runnable on the server again (given back) with nothing in the queue's
    // stats to show it: the next poll with room lists.
    if let Some(q) = &task.spec.queue {
        ctx.tinytask.with(q, |s| s.more = true);
    }
    ctx.delete_lease(&lease.metadata.name, &lease.metadata.uid)
}

/// The claim cannot be made now (the server could not be asked, or still calls the task
/// blocked): the Task goes back to Pending (this attempt never started, so it does not count)
/// with a delay, `reason` and `what` (why), then the Lease is deleted. The delay is the Queue's
/// poll interval doubling with each claim of this mirror postponed in a row, up to
/// [`MAX_BACKOFF`]: a claim that keeps failing is never a hot loop (invariant 6).
fn postpone(
    ctx: &Ctx,
    lease: &Lease,
    task: &Task,
    queue: Option<&Queue>,
    reason: &str,
    what: &str,
) -> Result<(), Error> {
    let failures = ctx
        .tinytask
        .claim_postponed(&task.metadata.name, |n| ctx.tasks.get(n).is_some());
    let interval = queue
        .map(interval_of)
        .unwrap_or(Duration::from_secs(DEFAULT_POLL_INTERVAL_SECONDS as u64));
    let delay = backoff(interval, failures.max(1));
    let at = format_time(SystemTime::now() + delay);
    let lease_name = lease.metadata.name.clone();
    let message = format!("{what}; trying again in {}s", delay.as_secs());
    ctx.patch_task(&task.metadata.name, |t| {
        // Also when the assignment has not made the Task show the Lease yet: the delay keeps it
        // from doing so afterwards (`lease::shows_assignment_next`).
        let shows = t.status.lease.as_deref() == Some(&lease_name);
        if shows || super::lease::shows_assignment_next(t, lease) {
            t.status.phase = TaskPhase::Pending;
            t.status.lease = None;
            t.status.agent = None;
            t.status.attempts = (lease.spec.attempt - 1).max(0);
            t.status.next_attempt_after = Some(at.clone());
            t.status.reason = Some(reason.into());
            t.status.message = Some(message.clone());
        }
    })?;
    ctx.event(task, EventType::Warning, "ClaimPostponed", &message);
    ctx.delete_lease(&lease.metadata.name, &lease.metadata.uid)
}

// ---- write-backs ----

async fn write_back(ctx: &Ctx, name: &str) -> Result<Action, Error> {
    let Some(task) = ctx.store.try_get::<Task>(name)? else {
        return Ok(Action::await_change());
    };
    if task.status.write_backs.is_empty() {
        return Ok(Action::await_change());
    }
    if ctx.settings.dry_run {
        for wb in &task.status.write_backs {
            ctx.would(&format!("write back {:?} for task/{name}", wb.op));
        }
        return Ok(Action::await_change());
    }
    let Some(id) = remote_id(&task) else {
        ack(ctx, name, None)?;
        return Ok(Action::await_change());
    };
    let endpoint = server_of(ctx, &task.metadata.annotations, task.spec.queue.as_deref());
    let client = ctx
        .tinytask
        .client(&endpoint)
        .map_err(|e| Error(e.to_string()))?;
    for wb in task.status.write_backs.clone() {
        match perform(&client, id, &wb).await {
            Ok(()) => {
                tracing::info!(
                    kind = "Task",
                    name,
                    "wrote back {:?} to tinytask task {id}",
                    wb.op
                );
                ack(ctx, name, Some(&wb))?;
            }
            // Gone: nothing left to write to. Any other refusal is retried: tinytask answers
            // every failure but "not found" with 400, a locked database included.
            Err(e) if e.is_not_found() => {
                ctx.event(
                    &task,
                    EventType::Warning,
                    "WriteBackDropped",
                    &format!("{:?} for tinytask task {id} refused: {e}", wb.op),
                );
                ack(ctx, name, Some(&wb))?;
            }
            Err(e) => {
                ctx.event(
                    &task,
                    EventType::Warning,
                    "WriteBackPending",
                    &format!(
                        "{:?} for tinytask task {id} not written yet, will retry: {e}",
                        wb.op
                    ),
                );
                return Err(Error(format!(
                    "task/{name}: write-back {:?} to tinytask task {id}: {e}",
                    wb.op
                )));
            }
        }
    }
    Ok(Action::await_change())
}

async fn perform(client: &Remote, id: TaskId, wb: &WriteBack) -> Result<(), tinytask::Error> {
    match wb.op {
        WriteBackOp::Complete => {
            // Queued before the assignee was recorded with it: complete as before.
            let Some(ours) = wb.agent.as_deref() else {
                client
                    .patch_task(id, &TaskPatch::new().status(TaskStatus::Complete))
                    .await?;
                return Ok(());
            };
            let current = client.get_task(id).await?;
            match current.assignee() {
                // Someone took it over while it ran: their work is not ours to close.
                Some(other) if other != ours => {
                    let text = format!(
                        "[tinyscheduler] agent {ours} finished this task (exit 0), but it is \
                         assigned to {other} now; not marking it complete."
                    );
                    comment_once(client, id, &current, &text).await?;
                }
                _ if current.status == TaskStatus::Complete => {}
                _ => {
                    client
                        .patch_task(id, &TaskPatch::new().status(TaskStatus::Complete))
                        .await?;
                }
            }
        }
        WriteBackOp::Comment | WriteBackOp::Release | WriteBackOp::Fail => {
            let current = client.get_task(id).await?;
            if let Some(text) = wb.message.as_deref() {
                comment_once(client, id, &current, text).await?;
            }
            if matches!(wb.op, WriteBackOp::Release | WriteBackOp::Fail) {
                let assignee = current.assignee();
                let still_ours = assignee.is_none() || assignee == wb.agent.as_deref();
                // A release gives back the claim that set the task working; a task that is not
                // (the claim never landed, or was given back already) keeps its assignee, which
                // may be a pin to one of our agents.
                let held = wb.op == WriteBackOp::Fail || current.status == TaskStatus::Working;
                if current.status != TaskStatus::Complete && still_ours && held {
                    let mut patch = TaskPatch::new().status(TaskStatus::Idle).unassign();
                    if wb.op == WriteBackOp::Fail && !current.failed_for_good() {
                        let mut tags = current.tags.clone();
                        tags.push(FAILED_TAG.to_string());
                        patch = patch.tags(Some(tags));
                    }
                    client.patch_task(id, &patch).await?;
                }
            }
        }
    }
    Ok(())
}

/// Adds `text` as a comment to task `id` unless `current` (the task as just read) has it
/// already: a comment whose answer was lost must not be written twice.
async fn comment_once(
    client: &Remote,
    id: TaskId,
    current: &RemoteTask,
    text: &str,
) -> Result<(), tinytask::Error> {
    if !current
        .comments
        .iter()
        .any(|c| c.content.trim() == text.trim())
    {
        client.add_comment(id, text, AUTHOR).await?;
    }
    Ok(())
}

/// Removes one acknowledged write-back (or, with `None`, all of them).
fn ack(ctx: &Ctx, name: &str, wb: Option<&WriteBack>) -> Result<(), Error> {
    ctx.patch_task(name, |t| match wb {
        Some(wb) => {
            if let Some(i) = t.status.write_backs.iter().position(|w| w == wb) {
                t.status.write_backs.remove(i);
            }
        }
        None => t.status.write_backs.clear(),
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(status: TaskStatus, assigned: Option<&str>, blocked: bool) -> RemoteTask {
        serde_json::from_value(serde_json::json!({
            "id": 1, "title": "t", "status": status.as_str(), "assigned_to": assigned,
            "is_currently_blocked": blocked, "blocked_by_task_id": if blocked { Some(9) } else { None },
        }))
        .unwrap()
    }

    #[test]
    fn a_mirrors_params_are_what_an_agents_environment_can_carry() {
        let mut t = remote(TaskStatus::Idle, None, false);
        t.title = "fix \0 bug".into();
        t.description = Some("é".repeat(100_000));
        let q = Queue::new("Queue", "q", Default::default());
        let spec = spec_for(&q, &t, None, true);
        assert!(
            crate::resources::validate::validate_task("tt-1", &spec).is_empty(),
            "{:?}",
            crate::resources::validate::validate_task("tt-1", &spec)
        );
        assert_eq!(spec.params["title"], "fix \u{fffd} bug");
        let d = spec.params["description"].as_str().unwrap();
        assert!(
            d.len() < 200_000 && d.chars().all(|c| c == 'é'),
            "{}",
            d.len()
        );
        // Control characters, six bytes each as stored: cut so that the mirror stays small.
        t.description = Some("\u{1b}".repeat(120_000));
        let spec = spec_for(&q, &t, None, true);
        let stored = serde_json::to_string(&spec.params["description"]).unwrap();
        assert!(stored.len() <= MAX_PARAM_STORED + 2, "{}", stored.len());
        assert!(stored.len() > MAX_PARAM_STORED - 8, "{}", stored.len());
    }

    #[test]
    fn one_server_spelled_two_ways_is_the_same_endpoint() {
        assert!(same_endpoint("http://h:3000/mcp", "http://h:3000/"));
        assert!(same_endpoint("http://h:3000/api/v1/", "http://H:3000"));
        assert!(!same_endpoint("http://h:3000", "http://h:3001"));
        assert!(!same_endpoint("http://h:3000/a", "http://h:3000/b"));
    }

    #[test]
    fn a_task_tagged_failed_for_good_is_not_claimed() {
        let mut t = remote(TaskStatus::Idle, None, false);
        t.tags = vec!["x".into(), FAILED_TAG.into()];
        let why = refusal(&t, "a", None, true, None).expect("refused");
        assert!(why.contains(FAILED_TAG), "{why}");
        t.tags = vec!["x".into()];
        assert_eq!(refusal(&t, "a", None, true, None), None);
    }

    #[test]
    fn a_claim_is_refused_unless_the_task_is_still_ours_to_take() {
        use TaskStatus::*;
        assert_eq!(
            refusal(&remote(Idle, None, false), "a", None, true, None),
            None
        );
        assert_eq!(
            refusal(&remote(Idle, Some("a"), false), "a", None, true, None),
            None
        );
        assert!(refusal(&remote(Idle, Some("b"), false), "a", None, true, None).is_some());
        // Our own earlier claim, for another agent of ours, may be taken over by a retry.
        assert_eq!(
            refusal(
                &remote(Working, Some("b"), false),
                "a",
                Some("b"),
                true,
                None
            ),
            None
        );
        assert!(refusal(&remote(Working, Some("b"), false), "a", None, true, None).is_some());
        assert!(refusal(&remote(Complete, None, false), "a", None, true, None).is_some());
        assert!(refusal(&remote(Idle, None, true), "a", None, true, None).is_some());
        assert_eq!(
            refusal(&remote(Idle, None, true), "a", None, false, None),
            None
        );
        // Archived (tinytask's delete), or moved to another queue since it was mirrored.
        let mut archived = remote(Idle, None, false);
        archived.archived_at = Some("2026-12-01T00:00:00Z".into());
        assert!(refusal(&archived, "a", None, true, None).is_some());
        let mut moved = remote(Idle, None, false);
        moved.queue_name = Some("qa".into());
        assert!(refusal(&moved, "a", None, true, Some("dev")).is_some());
        assert_eq!(refusal(&moved, "a", None, true, Some("qa")), None);
    }

    fn pending(name: &str, blocked_by: &[&str]) -> Arc<Task> {
        Arc::new(Task::new(
            "Task",
            name,
            TaskSpec {
                queue: Some("dev".into()),
                blocked_by: blocked_by.iter().map(|b| b.to_string()).collect(),
                ..TaskSpec::default()
            },
        ))
    }

    #[test]
    fn a_pending_mirror_waiting_for_a_blocker_does_not_fill_a_free_slot() {
        let mut done = (*pending("done", &[])).clone();
        done.status.phase = TaskPhase::Succeeded;
        let tasks = [
            pending("free", &[]),
            pending("waits-for-remote", &["tt-1"]),
            pending("waits-for-done", &["done"]),
            Arc::new(done),
        ];
        let local = |respect| Local {
            by_name: tasks
                .iter()
                .map(|t| (t.metadata.name.as_str(), t))
                .collect(),
            leased: HashSet::new(),
            now: SystemTime::now(),
            respect,
        };
        let filling = |l: &Local| {
            tasks
                .iter()
                .filter(|t| l.fills_a_slot(t))
                .map(|t| t.metadata.name.as_str())
                .collect::<Vec<_>>()
        };
        // Not yet marked Blocked by the assignment loop, but it never takes a slot.
        assert_eq!(filling(&local(true)), ["free", "waits-for-done"]);
        assert_eq!(
            filling(&local(false)),
            ["free", "waits-for-remote", "waits-for-done"],
            "with blocking ignored, every Pending task runs"
        );
        let mut leased = local(true);
        leased.leased.insert("free");
        assert_eq!(
            filling(&leased),
            ["waits-for-done"],
            "a leased task has its slot"
        );
    }

    #[test]
    fn a_list_cut_at_the_window_is_listed_again_once_there_is_room_without_a_server_change() {
        let state = QueueState {
            last_free: 2,
            more: true,
            ..QueueState::default()
        };
        assert!(
            !needs_list(false, 2, 0, &state),
            "no room: nothing to list for"
        );
        assert!(
            needs_list(false, 2, 2, &state),
            "room, and the server may hold more"
        );
        let all_listed = QueueState {
            more: false,
            ..state.clone()
        };
        assert!(!needs_list(false, 2, 2, &all_listed));
        assert!(needs_list(true, 2, 0, &all_listed), "a server change");
        assert!(needs_list(false, 3, 0, &all_listed), "a freed slot");
    }

    #[test]
    fn the_poll_backs_off_from_the_interval_up_to_thirty_seconds() {
        let i = Duration::from_secs(2);
        let d: Vec<u64> = (0..7).map(|f| backoff(i, f).as_secs()).collect();
        assert_eq!(d, [2, 2, 4, 8, 16, 30, 30]);
    }

    /// Informers over an empty store, with `agents` and `queues` observed into their caches.
    fn caches(
        dir: &std::path::Path,
        agents: &[(&str, &str)],
        queues: &[(&str, QueueSource)],
    ) -> (Informer<Agent>, Informer<Queue>) {
        let store = crate::store::Store::open(dir).unwrap();
        let (a, q) = (
            Informer::new(store.clone(), Default::default()),
            Informer::new(store, Default::default()),
        );
        for (name, queue) in agents {
            let spec = crate::resources::AgentSpec {
                queue: Some(queue.to_string()),
                ..Default::default()
            };
            let mut agent = Agent::new("Agent", name, spec);
            agent.metadata.resource_version = "1".into();
            a.observe(agent);
        }
        for (name, source) in queues {
            let spec = crate::resources::QueueSpec {
                source: *source,
                ..Default::default()
            };
            let mut queue = Queue::new("Queue", name, spec);
            queue.metadata.resource_version = "1".into();
            q.observe(queue);
        }
        (a, q)
    }

    fn lease_of(agent: &str) -> Lease {
        crate::resources::lease::test_lease("t", agent, 1)
    }

    #[test]
    fn a_run_of_a_local_queue_wakes_no_poll_and_one_of_a_tinytask_queue_does() {
        let dir = tempfile::tempdir().unwrap();
        let (agents, queues) = caches(
            dir.path(),
            &[("local-agent", "local"), ("remote-agent", "remote")],
            &[
                ("local", QueueSource::Local),
                ("remote", QueueSource::Tinytask),
            ],
        );
        let map = lease_mapper(agents, queues);
        assert!(map(&lease_of("local-agent")).is_empty());
        assert_eq!(
            map(&lease_of("remote-agent")),
            [format!("{POLL_PREFIX}remote")]
        );
    }

    #[test]
    fn every_queue_change_wakes_its_poll_so_a_source_turned_local_is_forgotten() {
        let q = |source| {
            Queue::new(
                "Queue",
                "q",
                crate::resources::QueueSpec {
                    source,
                    ..Default::default()
                },
            )
        };
        let want = [format!("{POLL_PREFIX}q")];
        assert_eq!(keys_for_queue(&q(QueueSource::Tinytask)), want);
        assert_eq!(keys_for_queue(&q(QueueSource::Local)), want);
    }
}
