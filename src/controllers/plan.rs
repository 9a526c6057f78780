//! The assignment decision, as a pure function of the cached world: which tasks are blocked, which
//! are runnable, in what order, and which agent gets each. The assignment controller applies it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use crate::resources::meta::parse_time;
use crate::resources::task::WriteBackOp;
use crate::resources::{Agent, BlockingPolicy, Lease, Queue, Task, TaskPhase};

/// What the planner decided for one pass.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Task → agent, in the order they should be committed.
    pub assignments: Vec<(String, String)>,
    /// Tasks that must show `Blocked` with this message (`waiting for a, b (Failed)`): Pending
    /// ones with an unfinished blocker, and Blocked ones whose message no longer says what they
    /// wait for (a blocker failed, or is gone).
    pub newly_blocked: Vec<(String, String)>,
    /// Blocked tasks that may run now, and why (every blocker succeeded, or blocking is ignored
    /// by their queue or everywhere): back to `Pending`.
    pub unblocked: Vec<(String, String)>,
    /// Pending tasks no agent can take as things stand, and why (`no agent serves queue/q`): they
    /// must show reason `Unschedulable` with this message. Listed only when the Task does not
    /// say so already.
    pub unschedulable: Vec<(String, String)>,
    /// Pending tasks that show `Unschedulable` but an agent can take them now: the reason goes.
    pub schedulable: Vec<String>,
    /// The earliest `nextAttemptAfter` still in the future, if any (when to look again).
    pub next_wakeup: Option<SystemTime>,
}

/// The reason a Task shows while no agent can take it.
pub const UNSCHEDULABLE: &str = "Unschedulable";

/// The agents as the question "who could run this task" needs them.
pub struct Servers<'a> {
    /// Agent name → paused.
    by_name: HashMap<&'a str, bool>,
    /// Queue name → whether any of its agents is not paused.
    by_queue: HashMap<&'a str, bool>,
}

impl<'a> Servers<'a> {
    pub fn new(agents: &'a [Arc<Agent>]) -> Servers<'a> {
        let mut s = Servers {
            by_name: HashMap::new(),
            by_queue: HashMap::new(),
        };
        for a in agents {
            s.by_name.insert(a.metadata.name.as_str(), a.spec.paused);
            if let Some(q) = &a.spec.queue {
                *s.by_queue.entry(q.as_str()).or_default() |= !a.spec.paused;
            }
        }
        s
    }

    /// Why no agent can ever take `t` as the agents are now (`None`: some agent can, when it has
    /// a free slot).
    pub fn unschedulable(&self, t: &Task) -> Option<String> {
        match (&t.spec.assigned_to, &t.spec.queue) {
            (Some(a), _) => match self.by_name.get(a.as_str()) {
                None => Some(format!("agent/{a} (spec.assignedTo) does not exist")),
                Some(true) => Some(format!("agent/{a} (spec.assignedTo) is paused")),
                Some(false) => None,
            },
            (None, Some(q)) => match self.by_queue.get(q.as_str()) {
                None => Some(format!("no agent serves queue/{q}")),
                Some(false) => Some(format!("every agent of queue/{q} is paused")),
                Some(true) => None,
            },
            (None, None) => Some("it names no queue and no agent".into()),
        }
    }
}

/// Inputs that are not objects.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlanOptions {
    /// `TINYSCHEDULER_DISABLE_BLOCKING`: ignore `blockedBy` everywhere.
    pub disable_blocking: bool,
    /// Stop after this many assignments (`None`: as many as there are free slots). A pass commits
    /// only a few Leases, so with thousands of runnable tasks the planner orders just the head of
    /// the line instead of sorting all of it.
    pub max_assignments: Option<usize>,
}

/// Free slots per agent: `maxConcurrency` minus every live Lease it holds, and minus every run
/// whose Lease was deleted while its Task still shows it (its agent may live on until reclaim has
/// ended it and recorded the attempt, invariant 2); paused agents have none.
pub fn free_slots(
    agents: &[Arc<Agent>],
    leases: &[Arc<Lease>],
    tasks: &[Arc<Task>],
) -> BTreeMap<String, i64> {
    let used = slots_held(leases, tasks);
    agents
        .iter()
        .map(|a| {
            let free = if a.spec.paused {
                0
            } else {
                a.spec.max_concurrency - used.get(a.metadata.name.as_str()).copied().unwrap_or(0)
            };
            (a.metadata.name.clone(), free.max(0))
        })
        .collect()
}

/// The slots each agent's runs hold: one per live Lease, and one per run whose Lease was deleted
/// while its Task still shows it (see [`free_slots`]).
pub fn slots_held<'a>(leases: &'a [Arc<Lease>], tasks: &'a [Arc<Task>]) -> HashMap<&'a str, i64> {
    let mut used: HashMap<&str, i64> = HashMap::new();
    for l in leases {
        *used.entry(l.spec.agent.as_str()).or_default() += 1;
    }
    let mut lease_names: Option<HashSet<&str>> = None;
    for t in tasks {
        if !matches!(t.status.phase, TaskPhase::Assigned | TaskPhase::Running) {
            continue;
        }
        let (Some(lease), Some(agent)) = (&t.status.lease, &t.status.agent) else {
            continue;
        };
        let names = lease_names
            .get_or_insert_with(|| leases.iter().map(|l| l.metadata.name.as_str()).collect());
        if !names.contains(lease.as_str()) {
            *used.entry(agent.as_str()).or_default() += 1;
        }
    }
    used
}

/// The blockers of `task` that have not succeeded (missing ones count as unfinished). For a
/// tinytask mirror, a blocker that succeeded here but whose completion is not on the server yet
/// (its `Complete` write-back still queued) is unfinished too: the server calls the mirror's task
/// blocked until then, and would refuse its claim. Each blocker once, in `blockedBy`'s order.
pub fn unfinished_blockers(task: &Task, by_name: &HashMap<&str, &Arc<Task>>) -> Vec<String> {
    let mirror = super::tinytask_sync::is_tinytask(task);
    let mut out: Vec<String> = Vec::new();
    for b in &task.spec.blocked_by {
        let unfinished = by_name.get(b.as_str()).is_none_or(|t| {
            t.status.phase != TaskPhase::Succeeded || (mirror && completion_unsent(t))
        });
        if unfinished && !out.contains(b) {
            out.push(b.clone());
        }
    }
    out
}

/// Whether `t` succeeded but its `Complete` write-back has not reached the tinytask server yet.
fn completion_unsent(t: &Task) -> bool {
    t.status.phase == TaskPhase::Succeeded
        && t.status
            .write_backs
            .iter()
            .any(|w| w.op == WriteBackOp::Complete)
}

/// `waiting for a, b (Failed), c (no such Task)`: the blockers a task waits for, with those that
/// will not succeed by themselves marked.
pub fn waiting_message<'a>(
    waiting: &[String],
    by_name: &HashMap<&'a str, &'a Arc<Task>>,
    dead_ends: &mut DeadEnds<'a>,
) -> String {
    let named: Vec<String> = waiting
        .iter()
        .map(|b| match by_name.get(b.as_str()) {
            None => format!("{b} (no such Task)"),
            Some(t) if t.status.phase == TaskPhase::Failed => format!("{b} (Failed)"),
            Some(t) if completion_unsent(t) => {
                format!("{b} (Succeeded, not complete on the tinytask server yet)")
            }
            Some(t) => match dead_ends.behind(&t.metadata.name, by_name) {
                Some((name, what)) => format!("{b} (behind {name}, {what})"),
                None => b.clone(),
            },
        })
        .collect();
    format!("waiting for {}", named.join(", "))
}

/// The tasks behind which something will not succeed by itself, worked out once per pass and
/// only when a message needs it (see [`dead_ends`]).
#[derive(Default)]
pub struct DeadEnds<'a> {
    found: Option<HashMap<&'a str, (&'a str, &'static str)>>,
}

impl<'a> DeadEnds<'a> {
    /// Nothing worked out yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The dead end behind the task `name` (one of `by_name`), with what is wrong with it.
    fn behind(
        &mut self,
        name: &str,
        by_name: &HashMap<&'a str, &'a Arc<Task>>,
    ) -> Option<(&'a str, &'static str)> {
        self.found
            .get_or_insert_with(|| dead_ends(by_name))
            .get(name)
            .copied()
    }
}

/// Each task of `by_name` (the tasks named as a blocker) that cannot succeed by itself because a
/// task somewhere behind it will not (Failed, or no such Task), with the nearest such task. Only
/// a Pending or Blocked task is looked behind: one that runs or ran got past its blockers.
/// Worked out from the dead ends outwards, breadth first over who waits for whom and in name
/// order, so that a cycle among the blockers hides no dead end and the answer does not depend on
/// the order the tasks were listed in (a walk from each task, remembering what it had seen,
/// gave a task on a cycle a different answer depending on where the walk entered it).
fn dead_ends<'a>(
    by_name: &HashMap<&'a str, &'a Arc<Task>>,
) -> HashMap<&'a str, (&'a str, &'static str)> {
    let looked_behind =
        |t: &Task| matches!(t.status.phase, TaskPhase::Pending | TaskPhase::Blocked);
    let mut names: Vec<(&'a str, &'a Arc<Task>)> = by_name
        .iter()
        .filter(|(_, t)| looked_behind(t))
        .map(|(n, t)| (*n, *t))
        .collect();
    names.sort_unstable_by_key(|(n, _)| *n);
    let mut found: HashMap<&'a str, (&'a str, &'static str)> = HashMap::new();
    let mut waited_for_by: HashMap<&'a str, Vec<&'a str>> = HashMap::new();
    let mut next = std::collections::VecDeque::new();
    for &(name, t) in &names {
        let mut direct = None;
        for b in &t.spec.blocked_by {
            match by_name.get(b.as_str()) {
                None => direct = direct.or(Some((b.as_str(), "no such Task"))),
                Some(bt) if bt.status.phase == TaskPhase::Failed => {
                    direct = direct.or(Some((b.as_str(), "Failed")))
                }
                Some(bt) if looked_behind(bt) => {
                    waited_for_by.entry(b.as_str()).or_default().push(name)
                }
                Some(_) => {}
            }
        }
        if let Some(d) = direct {
            found.insert(name, d);
            next.push_back((name, d));
        }
    }
    while let Some((name, d)) = next.pop_front() {
        for &w in waited_for_by.get(name).map(Vec::as_slice).unwrap_or(&[]) {
            if let std::collections::hash_map::Entry::Vacant(e) = found.entry(w) {
                e.insert(d);
                next.push_back((w, d));
            }
        }
    }
    found
}

/// Decides one assignment pass.
pub fn plan(
    tasks: &[Arc<Task>],
    agents: &[Arc<Agent>],
    queues: &[Arc<Queue>],
    leases: &[Arc<Lease>],
    now: SystemTime,
    opts: PlanOptions,
) -> Plan {
    let mut out = Plan::default();
    // Only tasks named as someone's blocker are ever looked up, so only they are indexed: a map of
    // every task's name was most of a pass's cost over 10,000 tasks, which mostly block nothing.
    let named_as_blocker: HashSet<&str> = tasks
        .iter()
        .flat_map(|t| t.spec.blocked_by.iter().map(String::as_str))
        .collect();
    let by_name: HashMap<&str, &Arc<Task>> = if named_as_blocker.is_empty() {
        HashMap::new()
    } else {
        tasks
            .iter()
            .filter(|t| named_as_blocker.contains(t.metadata.name.as_str()))
            .map(|t| (t.metadata.name.as_str(), t))
            .collect()
    };
    let leased: HashSet<&str> = leases.iter().map(|l| l.spec.task.as_str()).collect();
    let ignore_blocking: HashSet<&str> = queues
        .iter()
        .filter(|q| q.spec.blocking == BlockingPolicy::Ignore)
        .map(|q| q.metadata.name.as_str())
        .collect();
    // Whether `t` waits for its blockers: not in a queue that ignores blocking, nor with blocking
    // disabled.
    let respects = |t: &Task| {
        !opts.disable_blocking
            && !t
                .spec
                .queue
                .as_deref()
                .is_some_and(|q| ignore_blocking.contains(q))
    };
    // How many unfinished tasks wait on each task: those unblock the most work, so go first. Only
    // a task that waits counts, and each once however often its `blockedBy` names the blocker.
    let mut dependents: HashMap<&str, usize> = HashMap::new();
    for t in tasks
        .iter()
        .filter(|t| !t.status.phase.is_finished() && !t.spec.blocked_by.is_empty() && respects(t))
    {
        let mut named = HashSet::new();
        for b in &t.spec.blocked_by {
            if named.insert(b.as_str()) {
                *dependents.entry(b.as_str()).or_default() += 1;
            }
        }
    }

    let servers = Servers::new(agents);
    let mut dead_ends = DeadEnds::new();
    let mut runnable: Vec<&Arc<Task>> = Vec::new();
    for t in tasks {
        let phase = t.status.phase;
        if !matches!(phase, TaskPhase::Pending | TaskPhase::Blocked) {
            continue;
        }
        let respects = respects(t);
        let waiting = if respects {
            unfinished_blockers(t, &by_name)
        } else {
            Vec::new()
        };
        if !waiting.is_empty() {
            let message = waiting_message(&waiting, &by_name, &mut dead_ends);
            let stale = match phase {
                TaskPhase::Pending => !leased.contains(t.metadata.name.as_str()),
                _ => t.status.message.as_deref() != Some(message.as_str()),
            };
            if stale {
                out.newly_blocked.push((t.metadata.name.clone(), message));
            }
            continue;
        }
        if phase == TaskPhase::Blocked {
            let why = match (respects, opts.disable_blocking, t.spec.queue.as_deref()) {
                (true, _, _) => "every blocker succeeded".to_string(),
                (false, true, _) => "blocking is disabled (TINYSCHEDULER_DISABLE_BLOCKING)".into(),
                (false, false, q) => format!("queue/{} ignores blocking", q.unwrap_or_default()),
            };
            out.unblocked.push((t.metadata.name.clone(), why));
        }
        if leased.contains(t.metadata.name.as_str()) {
            continue;
        }
        if let Some(after) = t.status.next_attempt_after.as_deref().and_then(parse_time) {
            if after > now {
                out.next_wakeup = Some(out.next_wakeup.map_or(after, |w| w.min(after)));
                continue;
            }
        }
        let shows = t.status.reason.as_deref() == Some(UNSCHEDULABLE);
        match servers.unschedulable(t) {
            Some(why) => {
                if !shows || t.status.message.as_deref() != Some(why.as_str()) {
                    out.unschedulable.push((t.metadata.name.clone(), why));
                }
                continue;
            }
            None if shows => out.schedulable.push(t.metadata.name.clone()),
            None => {}
        }
        runnable.push(t);
    }

    let mut free = free_slots(agents, leases, tasks);
    let mut total_free: i64 = free.values().sum();
    let pool: HashMap<&str, Vec<&str>> = agents.iter().fold(HashMap::new(), |mut m, a| {
        if let Some(q) = &a.spec.queue {
            m.entry(q.as_str())
                .or_default()
                .push(a.metadata.name.as_str());
        }
        m
    });
    let limit = opts.max_assignments.unwrap_or(usize::MAX);
    // Order: most dependents, then priority, then age, then name. Keys are computed once per task
    // and the line is a heap, so a pass that commits k tasks costs O(n + k log n), not a sort of
    // every runnable task with a timestamp parse per comparison.
    type Key<'a> = (Reverse<usize>, Reverse<i64>, SystemTime, &'a str);
    // A pass that may assign nothing need not order anything.
    let orderable = if limit > 0 && total_free > 0 {
        &runnable[..]
    } else {
        &[]
    };
    let mut line: BinaryHeap<Reverse<(Key<'_>, usize)>> = orderable
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let waiting_on_it = if dependents.is_empty() {
                0
            } else {
                dependents
                    .get(t.metadata.name.as_str())
                    .copied()
                    .unwrap_or(0)
            };
            let key: Key<'_> = (
                Reverse(waiting_on_it),
                Reverse(t.spec.priority),
                t.metadata
                    .creation_timestamp
                    .as_deref()
                    .and_then(parse_time)
                    .unwrap_or(SystemTime::UNIX_EPOCH),
                t.metadata.name.as_str(),
            );
            Reverse((key, i))
        })
        .collect();

    while out.assignments.len() < limit && total_free > 0 {
        let Some(Reverse((_, i))) = line.pop() else {
            break;
        };
        let t = runnable[i];
        let pinned: [&str; 1];
        let candidates: &[&str] = match (&t.spec.assigned_to, &t.spec.queue) {
            (Some(agent), _) => {
                pinned = [agent.as_str()];
                &pinned
            }
            (None, Some(q)) => pool.get(q.as_str()).map(Vec::as_slice).unwrap_or_default(),
            (None, None) => &[],
        };
        // Most free slots first; ties go to the alphabetically first name.
        let best = candidates
            .iter()
            .filter_map(|a| free.get(*a).map(|f| (*a, *f)))
            .filter(|(_, f)| *f > 0)
            .min_by_key(|(a, f)| (Reverse(*f), *a));
        if let Some((agent, _)) = best {
            let agent = agent.to_string();
            if let Some(f) = free.get_mut(&agent) {
                *f -= 1;
                total_free -= 1;
            }
            out.assignments.push((t.metadata.name.clone(), agent));
        }
    }
    // The input may come in any order; the output does not depend on it.
    out.newly_blocked.sort();
    out.unblocked.sort();
    out.unschedulable.sort();
    out.schedulable.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{AgentSpec, LeaseSpec, QueueSpec, TaskSpec};
    use std::time::Duration;

    fn agent(name: &str, queue: &str, max: i64) -> Arc<Agent> {
        Arc::new(Agent::new(
            "Agent",
            name,
            AgentSpec {
                queue: Some(queue.into()),
                max_concurrency: max,
                ..Default::default()
            },
        ))
    }

    fn task(name: &str, queue: &str, priority: i64, created: u64) -> Task {
        let mut t = Task::new(
            "Task",
            name,
            TaskSpec {
                queue: Some(queue.into()),
                priority,
                ..Default::default()
            },
        );
        t.metadata.creation_timestamp = Some(crate::resources::meta::format_time(
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + created),
        ));
        t
    }

    fn lease(task: &str, agent: &str) -> Arc<Lease> {
        Arc::new(Lease::new(
            "Lease",
            task,
            LeaseSpec {
                task: task.into(),
                agent: agent.into(),
                ..Default::default()
            },
        ))
    }

    fn queue(name: &str) -> Arc<Queue> {
        Arc::new(Queue::new("Queue", name, QueueSpec::default()))
    }

    fn arcs(ts: Vec<Task>) -> Vec<Arc<Task>> {
        ts.into_iter().map(Arc::new).collect()
    }

    fn now() -> SystemTime {
        SystemTime::now()
    }

    #[test]
    fn higher_priority_then_older_tasks_go_first() {
        let tasks = arcs(vec![
            task("c-low", "q", 0, 1),
            task("b-old", "q", 5, 1),
            task("a-new", "q", 5, 2),
        ]);
        let p = plan(
            &tasks,
            &[agent("x", "q", 3)],
            &[queue("q")],
            &[],
            now(),
            Default::default(),
        );
        let order: Vec<_> = p.assignments.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(order, ["b-old", "a-new", "c-low"]);
    }

    #[test]
    fn tasks_that_block_others_go_before_higher_priority_ones() {
        let mut waiting = task("waiting", "q", 9, 0);
        waiting.spec.blocked_by = vec!["blocker".into()];
        let tasks = arcs(vec![
            task("urgent", "q", 9, 0),
            task("blocker", "q", 0, 5),
            waiting,
        ]);
        let p = plan(
            &tasks,
            &[agent("x", "q", 1)],
            &[queue("q")],
            &[],
            now(),
            Default::default(),
        );
        assert_eq!(
            p.assignments,
            vec![("blocker".to_string(), "x".to_string())]
        );
        assert_eq!(
            p.newly_blocked,
            vec![("waiting".to_string(), "waiting for blocker".to_string())]
        );
    }

    #[test]
    fn the_agent_with_most_free_slots_wins_and_ties_go_to_the_first_name() {
        let agents = vec![agent("b", "q", 2), agent("a", "q", 2), agent("c", "q", 3)];
        let leases = vec![lease("running", "c")];
        let tasks = arcs(vec![
            task("t1", "q", 0, 1),
            task("t2", "q", 0, 2),
            task("t3", "q", 0, 3),
        ]);
        let p = plan(
            &tasks,
            &agents,
            &[queue("q")],
            &leases,
            now(),
            Default::default(),
        );
        let got: Vec<_> = p.assignments.iter().map(|(_, a)| a.as_str()).collect();
        // free: a=2 b=2 c=2 -> a (tie, first name); then b=2 c=2 a=1 -> b; then c=2 -> c.
        assert_eq!(got, ["a", "b", "c"]);
    }

    #[test]
    fn limits_count_every_live_lease_and_paused_agents_get_nothing() {
        let mut paused = (*agent("p", "q", 5)).clone();
        paused.spec.paused = true;
        let agents = vec![agent("x", "q", 2), Arc::new(paused)];
        let leases = vec![lease("old1", "x"), lease("old2", "x")];
        let tasks = arcs(vec![task("t", "q", 0, 0)]);
        let p = plan(
            &tasks,
            &agents,
            &[queue("q")],
            &leases,
            now(),
            Default::default(),
        );
        assert!(p.assignments.is_empty());
    }

    #[test]
    fn a_run_whose_lease_was_deleted_holds_its_slot_until_its_task_lets_go() {
        let agents = vec![agent("x", "q", 2)];
        let mut orphan = task("orphan", "q", 0, 0);
        orphan.status.phase = TaskPhase::Running;
        orphan.status.lease = Some("orphan".into());
        orphan.status.agent = Some("x".into());
        let mut shown = task("shown", "q", 0, 0);
        shown.status.phase = TaskPhase::Assigned;
        shown.status.lease = Some("shown".into());
        shown.status.agent = Some("x".into());
        let tasks = arcs(vec![orphan.clone(), shown]);
        // `shown` has its Lease (counted once), `orphan` lost its own (counted by its Task).
        let leases = vec![lease("shown", "x")];
        assert_eq!(free_slots(&agents, &leases, &tasks)["x"], 0);
        // Once reclaim recorded the attempt, the Task shows no Lease and the slot is free.
        orphan.status.phase = TaskPhase::Pending;
        orphan.status.lease = None;
        let tasks = arcs(vec![orphan]);
        assert_eq!(free_slots(&agents, &leases, &tasks)["x"], 1);
    }

    #[test]
    fn a_task_no_agent_can_take_is_unschedulable_and_says_why_once() {
        let mut paused = (*agent("sleepy", "napping", 1)).clone();
        paused.spec.paused = true;
        let agents = vec![agent("x", "q", 1), Arc::new(paused)];
        let mut ghost = task("ghost-pin", "q", 0, 0);
        ghost.spec.assigned_to = Some("ghost".into());
        let mut shown = task("shown", "nobody", 0, 0);
        shown.status.reason = Some(UNSCHEDULABLE.into());
        shown.status.message = Some("no agent serves queue/nobody".into());
        let mut fixed = task("fixed", "q", 0, 0);
        fixed.status.reason = Some(UNSCHEDULABLE.into());
        fixed.status.message = Some("no agent serves queue/q".into());
        let tasks = arcs(vec![
            ghost,
            task("lonely", "nobody", 0, 0),
            task("resting", "napping", 0, 0),
            shown,
            fixed,
        ]);
        let p = plan(
            &tasks,
            &agents,
            &[queue("q")],
            &[],
            now(),
            Default::default(),
        );
        let s = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(
            p.unschedulable,
            vec![
                s("ghost-pin", "agent/ghost (spec.assignedTo) does not exist"),
                s("lonely", "no agent serves queue/nobody"),
                s("resting", "every agent of queue/napping is paused"),
            ],
            "`shown` says so already"
        );
        assert_eq!(p.schedulable, ["fixed"]);
        assert_eq!(p.assignments, vec![s("fixed", "x")]);
    }

    #[test]
    fn a_pinned_task_runs_only_on_its_agent() {
        let mut t = task("t", "q", 0, 0);
        t.spec.assigned_to = Some("y".into());
        let agents = vec![agent("x", "q", 5), agent("y", "other", 1)];
        let p = plan(
            &arcs(vec![t]),
            &agents,
            &[queue("q")],
            &[],
            now(),
            Default::default(),
        );
        assert_eq!(p.assignments, vec![("t".to_string(), "y".to_string())]);
    }

    #[test]
    fn a_mirror_waits_until_its_blockers_completion_reached_the_server() {
        use crate::resources::task::{WriteBack, TINYTASK_ID_ANNOTATION};
        let mut blocker = task("tt-1", "q", 0, 1);
        blocker.status.phase = TaskPhase::Succeeded;
        blocker.status.write_backs.push(WriteBack {
            op: WriteBackOp::Complete,
            attempt: 1,
            message: None,
            agent: Some("a".into()),
            created: None,
        });
        let blocker = Arc::new(blocker);
        let mut mirror = task("tt-2", "q", 0, 2);
        mirror.spec.blocked_by = vec!["tt-1".into()];
        mirror
            .metadata
            .annotations
            .insert(TINYTASK_ID_ANNOTATION.into(), "2".into());
        let mut local = mirror.clone();
        local.metadata.annotations.clear();
        let by_name: HashMap<&str, &Arc<Task>> = [("tt-1", &blocker)].into_iter().collect();
        assert_eq!(unfinished_blockers(&mirror, &by_name), ["tt-1"]);
        assert!(
            waiting_message(&["tt-1".into()], &by_name, &mut DeadEnds::new())
                .contains("not complete on the tinytask"),
            "{}",
            waiting_message(&["tt-1".into()], &by_name, &mut DeadEnds::new())
        );
        // A local task does not wait for the server.
        assert!(unfinished_blockers(&local, &by_name).is_empty());
        // Written back: done.
        let mut sent = (*blocker).clone();
        sent.status.write_backs.clear();
        let sent = Arc::new(sent);
        let by_name: HashMap<&str, &Arc<Task>> = [("tt-1", &sent)].into_iter().collect();
        assert!(unfinished_blockers(&mirror, &by_name).is_empty());
    }

    #[test]
    fn a_chain_behind_a_failed_or_missing_task_says_where_it_ends() {
        let mut m0 = task("m0", "q", 0, 0);
        m0.status.phase = TaskPhase::Failed;
        let mut m1 = task("m1", "q", 0, 1);
        m1.spec.blocked_by = vec!["m0".into()];
        m1.status.phase = TaskPhase::Blocked;
        let mut m2 = task("m2", "q", 0, 2);
        m2.spec.blocked_by = vec!["m1".into()];
        let mut g1 = task("g1", "q", 0, 3);
        g1.spec.blocked_by = vec!["gone".into()];
        g1.status.phase = TaskPhase::Blocked;
        let mut g2 = task("g2", "q", 0, 4);
        g2.spec.blocked_by = vec!["g1".into()];
        // A cycle that can still finish nothing, but has no dead end: said as before.
        let mut c1 = task("c1", "q", 0, 5);
        c1.spec.blocked_by = vec!["c2".into()];
        let mut c2 = task("c2", "q", 0, 6);
        c2.spec.blocked_by = vec!["c1".into()];
        let said = blocked_messages(vec![m0, m1, m2, g1, g2, c1, c2]);
        assert_eq!(said["m2"], "waiting for m1 (behind m0, Failed)");
        assert_eq!(said["g2"], "waiting for g1 (behind gone, no such Task)");
        assert_eq!(said["c1"], "waiting for c2");
        assert_eq!(said["c2"], "waiting for c1");
    }

    /// What a plan for `tasks` (queue `q`, one agent of 5 slots) says of each task it finds
    /// newly blocked.
    fn blocked_messages(tasks: Vec<Task>) -> HashMap<String, String> {
        let p = plan(
            &arcs(tasks),
            &[agent("a", "q", 5)],
            &[],
            &[],
            now(),
            Default::default(),
        );
        p.newly_blocked.into_iter().collect()
    }

    #[test]
    fn a_dead_end_behind_a_cycle_is_named_whatever_order_the_tasks_come_in() {
        // x Failed; a waits for b and x; b waits for a (a cycle with a way out that fails);
        // u waits for b, w for a. Which of u and w was looked at first once decided u's message.
        let mut x = task("x", "q", 0, 0);
        x.status.phase = TaskPhase::Failed;
        let mut a = task("a", "q", 0, 1);
        a.spec.blocked_by = vec!["b".into(), "x".into()];
        let mut b = task("b", "q", 0, 2);
        b.spec.blocked_by = vec!["a".into()];
        let mut u = task("u", "q", 0, 3);
        u.spec.blocked_by = vec!["b".into()];
        let mut w = task("w", "q", 0, 4);
        w.spec.blocked_by = vec!["a".into()];
        for order in [
            vec![&w, &u, &a, &b, &x],
            vec![&u, &w, &b, &a, &x],
            vec![&a, &b, &u, &w, &x],
        ] {
            let said = blocked_messages(order.into_iter().cloned().collect());
            assert_eq!(said["u"], "waiting for b (behind x, Failed)");
            assert_eq!(said["w"], "waiting for a (behind x, Failed)");
            assert_eq!(said["b"], "waiting for a (behind x, Failed)");
            assert_eq!(said["a"], "waiting for b (behind x, Failed), x (Failed)");
        }
    }

    #[test]
    fn a_blocker_goes_first_only_for_tasks_that_wait_for_it_each_counted_once() {
        let first = |tasks: Vec<Task>, q: Arc<Queue>| {
            let p = plan(
                &arcs(tasks),
                &[agent("x", "q", 1)],
                &[q],
                &[],
                now(),
                Default::default(),
            );
            p.assignments[0].0.clone()
        };
        let mut dependent = task("dependent", "q", 100, 0);
        dependent.spec.blocked_by = vec!["blocker".into()];
        let tasks = vec![
            task("blocker", "q", 0, 0),
            dependent,
            task("other", "q", 50, 0),
        ];
        assert_eq!(first(tasks.clone(), queue("q")), "blocker");
        // In a queue that ignores blocking nothing waits for `blocker`: priority decides.
        let mut ignoring = (*queue("q")).clone();
        ignoring.spec.blocking = BlockingPolicy::Ignore;
        assert_eq!(first(tasks, Arc::new(ignoring)), "dependent");

        // One task naming `a` three times is one task waiting for it; `b` has two.
        let mut d1 = task("d1", "q", 0, 0);
        d1.spec.blocked_by = vec!["a".into(), "a".into(), "a".into()];
        let mut d2 = task("d2", "q", 0, 0);
        d2.spec.blocked_by = vec!["b".into()];
        let mut d3 = task("d3", "q", 0, 0);
        d3.spec.blocked_by = vec!["b".into()];
        let tasks = vec![task("a", "q", 0, 0), task("b", "q", 0, 0), d1, d2, d3];
        assert_eq!(first(tasks.clone(), queue("q")), "b");
        let by_name = HashMap::new();
        assert_eq!(
            unfinished_blockers(&tasks[2], &by_name),
            ["a"],
            "said once in the message"
        );
    }

    #[test]
    fn blocked_tasks_never_use_capacity_and_unblock_when_their_blocker_succeeds() {
        let mut b1 = task("b1", "q", 0, 0);
        b1.spec.blocked_by = vec!["root".into()];
        let mut root = task("root", "q", 0, 0);
        root.status.phase = TaskPhase::Running;
        let p = plan(
            &arcs(vec![b1.clone(), root.clone(), task("free", "q", -5, 9)]),
            &[agent("x", "q", 1)],
            &[queue("q")],
            &[lease("root", "x")],
            now(),
            Default::default(),
        );
        assert!(p.assignments.is_empty(), "the only slot is held by root");
        assert_eq!(p.newly_blocked.len(), 1);

        b1.status.phase = TaskPhase::Blocked;
        root.status.phase = TaskPhase::Succeeded;
        let p = plan(
            &arcs(vec![b1, root]),
            &[agent("x", "q", 1)],
            &[queue("q")],
            &[],
            now(),
            Default::default(),
        );
        assert_eq!(
            p.unblocked,
            vec![("b1".to_string(), "every blocker succeeded".to_string())]
        );
        assert_eq!(p.assignments, vec![("b1".to_string(), "x".to_string())]);
    }

    #[test]
    fn a_task_released_because_blocking_is_ignored_says_so_not_that_its_blockers_succeeded() {
        let mut t = task("b", "q", 0, 0);
        t.spec.blocked_by = vec!["nope".into()];
        t.status.phase = TaskPhase::Blocked;
        let mut ignoring = Queue::new("Queue", "q", QueueSpec::default());
        ignoring.spec.blocking = crate::resources::queue::BlockingPolicy::Ignore;
        let why = |queues: &[Arc<Queue>], disable_blocking| {
            let opts = PlanOptions {
                disable_blocking,
                ..Default::default()
            };
            let p = plan(&arcs(vec![t.clone()]), &[], queues, &[], now(), opts);
            p.unblocked.into_iter().map(|(_, w)| w).collect::<Vec<_>>()
        };
        assert_eq!(
            why(&[Arc::new(ignoring)], false),
            ["queue/q ignores blocking"]
        );
        assert_eq!(
            why(&[queue("q")], true),
            ["blocking is disabled (TINYSCHEDULER_DISABLE_BLOCKING)"]
        );
        assert!(
            why(&[queue("q")], false).is_empty(),
            "still waiting for nope"
        );
    }

    #[test]
    fn blocking_can_be_ignored_per_queue_or_globally() {
        let mut t = task("t", "q", 0, 0);
        t.spec.blocked_by = vec!["missing".into()];
        let tasks = arcs(vec![t]);
        let agents = [agent("x", "q", 1)];
        let p = plan(
            &tasks,
            &agents,
            &[queue("q")],
            &[],
            now(),
            Default::default(),
        );
        assert!(p.assignments.is_empty());
        let p = plan(
            &tasks,
            &agents,
            &[queue("q")],
            &[],
            now(),
            PlanOptions {
                disable_blocking: true,
                ..Default::default()
            },
        );
        assert_eq!(p.assignments.len(), 1);
        let mut q = (*queue("q")).clone();
        q.spec.blocking = BlockingPolicy::Ignore;
        let p = plan(
            &tasks,
            &agents,
            &[Arc::new(q)],
            &[],
            now(),
            Default::default(),
        );
        assert_eq!(p.assignments.len(), 1);
    }

    #[test]
    fn a_limited_pass_assigns_only_the_head_of_the_line() {
        let agents = vec![agent("a", "q", 10)];
        let tasks: Vec<Arc<Task>> = (0..50)
            .map(|i| Arc::new(task(&format!("t{i:02}"), "q", i % 7, i as u64)))
            .collect();
        let opts = |max| PlanOptions {
            max_assignments: max,
            ..Default::default()
        };
        let now = SystemTime::now();
        let all = plan(&tasks, &agents, &[queue("q")], &[], now, opts(None));
        assert_eq!(all.assignments.len(), 10, "as many as there are free slots");
        let head = plan(&tasks, &agents, &[queue("q")], &[], now, opts(Some(3)));
        assert_eq!(head.assignments, all.assignments[..3].to_vec());
        let none = plan(&tasks, &agents, &[queue("q")], &[], now, opts(Some(0)));
        assert!(none.assignments.is_empty());
        // Priority 6 first (t06, t13, ...), oldest first among equals.
        assert_eq!(head.assignments[0].0, "t06");
        assert_eq!(head.assignments[1].0, "t13");
    }

    #[test]
    fn a_task_waiting_for_its_retry_delay_is_not_run_early() {
        let mut t = task("t", "q", 0, 0);
        let later = now() + Duration::from_secs(60);
        t.status.next_attempt_after = Some(crate::resources::meta::format_time(later));
        let p = plan(
            &arcs(vec![t]),
            &[agent("x", "q", 1)],
            &[queue("q")],
            &[],
            now(),
            Default::default(),
        );
        assert!(p.assignments.is_empty());
        assert!(p.next_wakeup.is_some());
    }
}
