//! The scheduler with real agent processes: assignment order and agent choice, limits under a
//! burst, blocking, and dry runs that change nothing.

#[path = "support/sched.rs"]
mod sched;
mod support;

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use sched::{next_second, story, wait_for, Observer, Sched, LONG};
use tinyscheduler::resources::{Agent, Task, TaskPhase};

#[test]
fn tasks_run_blockers_first_then_by_priority_then_age_then_name() {
    let s = Sched::new();
    s.queue("default");
    s.agent("solo", 1, "echo \"$TINYSCHEDULER_TASK\" >> \"$OUT/order\"");
    s.task("zeta-old");
    next_second();
    s.task("beta");
    s.task("alpha");
    s.task_with("urgent", |t| t.priority = 5);
    s.task_with("waiting", |t| {
        t.priority = 9;
        t.blocked_by = vec!["blocker".into()];
    });
    s.task_with("blocker", |t| t.priority = -1);

    let r = s.run(&["run", "--once", "--wait"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        s.lines("order"),
        ["blocker", "waiting", "urgent", "zeta-old", "alpha", "beta"],
        "a single slot shows the order in which tasks were assigned"
    );
}

#[test]
fn the_agent_with_most_free_slots_gets_the_task_and_ties_go_to_the_first_name() {
    let s = Sched::new();
    s.queue("default");
    s.agent("m", 3, "sleep 0.2");
    s.agent("k", 2, "sleep 0.2");
    s.agent("p", 2, "sleep 0.2");
    for (i, name) in ["t1", "t2", "t3", "t4"].iter().enumerate() {
        s.task_with(name, |t| t.priority = 10 - i as i64);
    }
    let r = s.run(&["run", "--once", "--wait"]);
    assert_eq!(r.code, 0, "{r:?}");
    let agents: Vec<String> = ["t1", "t2", "t3", "t4"]
        .iter()
        .map(|t| s.get_task(t).status.agent.unwrap_or_default())
        .collect();
    // free m3 k2 p2 -> m; m2 k2 p2 -> k (tie: first name); m2 k1 p2 -> m; m1 k1 p2 -> p.
    assert_eq!(agents, ["m", "k", "m", "p"]);
}

#[test]
fn a_burst_of_500_tasks_never_runs_more_agents_than_their_limits() {
    let mut s = Sched::new();
    s.queue("default");
    let limits = [("a1", 2usize), ("a2", 3), ("a3", 5)];
    for (a, max) in limits {
        s.agent(
            a,
            max as i64,
            "echo \"$TINYSCHEDULER_TASK\" >> \"$OUT/ran\"; sleep 0.02",
        );
    }
    for i in 0..500 {
        s.task(&format!("burst-{i:03}"));
    }
    let obs = Observer::start(&s.token);
    s.daemon(&[]);
    s.wait_all_finished(Duration::from_secs(600));
    let seen = obs.finish();
    let ran = s.lines("ran");
    assert_eq!(ran.len(), 500, "every task ran once");
    assert!(s
        .tasks()
        .iter()
        .all(|t| t.status.phase == TaskPhase::Succeeded));
    for (a, max) in limits {
        let got = seen.get(a).copied().unwrap_or(0);
        assert!(got >= 1, "agent {a} was observed running: {seen:?}");
        assert!(got <= max, "agent {a} ran {got} at once, limit {max}");
    }
    wait_for("no lease left", LONG, || s.leases().is_empty());
}

#[test]
fn a_blocked_task_waits_for_its_blocker_and_then_runs() {
    let s = Sched::new();
    s.queue("default");
    s.agent(
        "w",
        2,
        "echo \"start $TINYSCHEDULER_TASK\" >> \"$OUT/log\"; sleep 0.5; echo \"end $TINYSCHEDULER_TASK\" >> \"$OUT/log\"",
    );
    s.task_with("after", |t| {
        t.priority = 10;
        t.blocked_by = vec!["first".into()];
    });
    s.task("first");
    let r = s.run(&["run", "--once", "--wait"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        s.lines("log"),
        ["start first", "end first", "start after", "end after"]
    );
    assert_eq!(s.phase("after"), TaskPhase::Succeeded);
    assert!(r.stdout.contains("task/after Blocked"), "{}", r.stdout);
}

#[test]
fn a_task_whose_blocker_failed_stays_blocked_and_run_once_wait_still_ends() {
    let s = Sched::new();
    s.queue("default");
    s.agent("w", 2, "exit 1");
    s.task_with("doomed", |t| t.max_retries = 0);
    s.task_with("dependent", |t| t.blocked_by = vec!["doomed".into()]);
    let r = s.run(&["run", "--once", "--wait"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(s.phase("doomed"), TaskPhase::Failed);
    let dependent = s.get_task("dependent");
    assert_eq!(dependent.status.phase, TaskPhase::Blocked);
    assert_eq!(dependent.status.attempts, 0);
    // It says that it will not run by itself now.
    assert_eq!(
        dependent.status.message.as_deref(),
        Some("waiting for doomed (Failed)")
    );
    assert_eq!(story(&s, "dependent"), ["Blocked", "Blocked"]);
}

#[test]
fn run_once_wait_ends_when_the_rest_can_never_run_a_cycle_or_a_chain_behind_a_failure() {
    let mut s = Sched::new();
    s.queue("default");
    s.agent("w", 2, "exit 1");
    s.task_with("doomed", |t| t.max_retries = 0);
    s.task_with("behind", |t| t.blocked_by = vec!["doomed".into()]);
    s.task_with("further-behind", |t| t.blocked_by = vec!["behind".into()]);
    s.task_with("chicken", |t| t.blocked_by = vec!["egg".into()]);
    s.task_with("egg", |t| t.blocked_by = vec!["chicken".into()]);
    let child = s
        .cmd(&["run", "--once", "--wait"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let out = s.ends_by_itself(
        child,
        "run --once --wait to end",
        "run --once --wait waited for tasks that can never run",
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(s.phase("doomed"), TaskPhase::Failed);
    for t in ["behind", "further-behind", "chicken", "egg"] {
        assert_eq!(s.phase(t), TaskPhase::Blocked, "{t}");
        assert_eq!(s.get_task(t).status.attempts, 0, "{t}");
    }
}

#[test]
fn a_task_whose_max_retries_was_lowered_below_its_attempts_fails_without_running_again() {
    let s = Sched::new();
    s.queue("default");
    s.agent("w", 2, "echo \"$TINYSCHEDULER_TASK\" >> \"$OUT/ran\"");
    // Two attempts failed and it waits for its retry, when its maxRetries goes down to 1.
    s.task_with("lowered", |t| t.max_retries = 1);
    let mut t = s.get_task("lowered");
    t.status.phase = TaskPhase::Pending;
    t.status.attempts = 2;
    t.status.reason = Some("Retrying".into());
    t.status.message = Some("attempt 2 failed (exited with code 1); retry 2 of 3 in 20s".into());
    s.store.update_status(&t).unwrap();
    // One still within its retries runs.
    s.task_with("within", |t| t.max_retries = 2);
    let mut t = s.get_task("within");
    t.status.attempts = 2;
    s.store.update_status(&t).unwrap();

    let r = s.run(&["run", "--once", "--wait"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(s.lines("ran"), ["within"]);
    let t = s.get_task("lowered");
    assert_eq!(t.status.phase, TaskPhase::Failed);
    assert_eq!(t.status.attempts, 2);
    assert_eq!(t.status.reason.as_deref(), Some("BackoffLimitExceeded"));
    let d = s.run(&["describe", "task", "lowered"]);
    assert!(
        d.stdout
            .contains("failed after 2 attempts; maxRetries is now 1"),
        "{}",
        d.stdout
    );
    assert!(s.leases().is_empty());
}

#[test]
fn run_once_dry_run_prints_its_decisions_and_changes_no_byte() {
    let s = Sched::new();
    s.queue("default");
    s.agent("y", 2, "echo ran >> \"$OUT/ran\"");
    s.task("x");
    let before = s.env.snapshot();
    let r = s.run(&["run", "--once", "--dry-run"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains("would assign task/x to agent/y"),
        "{}",
        r.stdout
    );
    assert_eq!(s.env.snapshot(), before);
    assert!(s.read_out("ran").is_empty(), "no agent ran");
}

#[test]
fn a_task_no_agent_serves_says_why_once_and_runs_when_an_agent_comes() {
    let s = Sched::new();
    s.queue("default");
    s.task("x");
    for _ in 0..2 {
        assert_eq!(s.run(&["run", "--once", "--wait"]).code, 0);
    }
    let t = s.get_task("x");
    assert_eq!(t.status.phase, TaskPhase::Pending);
    assert_eq!(t.status.reason.as_deref(), Some("Unschedulable"));
    assert_eq!(
        t.status.message.as_deref(),
        Some("no agent serves queue/default")
    );
    assert_eq!(story(&s, "x"), ["Unschedulable"], "said once");
    s.agent("w", 1, "true");
    assert_eq!(s.run(&["run", "--once", "--wait"]).code, 0);
    let t = s.get_task("x");
    assert_eq!(t.status.phase, TaskPhase::Succeeded);
    assert_eq!(
        story(&s, "x"),
        ["Unschedulable", "Assigned", "Started", "Succeeded"]
    );
}

#[test]
fn run_once_wait_dry_run_prints_one_pass_and_ends() {
    let mut s = Sched::new();
    s.queue("default");
    s.agent("y", 2, "echo ran >> \"$OUT/ran\"");
    s.task("x");
    let before = s.env.snapshot();
    let child = s
        .cmd(&["run", "--once", "--wait", "--dry-run"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Nothing a dry run would start ever finishes: waiting for it would be a hang.
    let out = s.ends_by_itself(
        child,
        "run --once --wait --dry-run to end",
        "run --once --wait --dry-run waited for a task that a dry run never starts",
    );
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("would assign task/x to agent/y"),
        "{stdout}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("a dry run ends after one pass"),
        "{out:?}"
    );
    assert_eq!(s.env.snapshot(), before);
}

#[test]
fn wait_without_once_and_http_without_daemon_are_refused() {
    let mut s = Sched::new();
    // Spawned: a daemon that took `--wait` silently would not end.
    let child = s
        .cmd(&["run", "--daemon", "--wait"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = s.ends_by_itself(
        child,
        "run --daemon --wait to be refused",
        "run --daemon --wait started a daemon",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--wait goes with --once"),
        "{out:?}"
    );
    let r = s.run(&["run", "--once", "--http", "127.0.0.1:0"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("use it with --daemon"), "{r:?}");
    // From the environment (the env file both units read) it is for the daemon and left alone.
    let r = s
        .cmd(&["run", "--once"])
        .env("TINYSCHEDULER_HTTP_ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(r.status.success(), "{r:?}");
}

#[test]
fn run_daemon_dry_run_prints_its_decisions_and_changes_no_byte() {
    let mut s = Sched::new();
    s.queue("default");
    s.agent("y", 2, "echo ran >> \"$OUT/ran\"");
    s.task("x");
    let before = s.env.snapshot();
    let pid = s.daemon(&["--dry-run"]);
    wait_for("the dry-run decision", LONG, || {
        s.read_out("daemon-0.out")
            .contains("would assign task/x to agent/y")
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(s.stop_daemon(pid, nix::sys::signal::Signal::SIGTERM), 0);
    assert_eq!(s.env.snapshot(), before, "{}", s.daemon_logs());
    assert!(s.read_out("ran").is_empty(), "no agent ran");
}

#[test]
fn a_burst_larger_than_the_write_rate_never_reclaims_runs_as_never_started() {
    // One agent with 400 free slots and a 3 s lease (heartbeat 1 s): if one assignment pass
    // created every Lease before any shim ran, the last ones would sit Pending past their lease
    // duration and be reclaimed as "never started".
    let mut s = Sched::new();
    s.queue("default");
    s.agent("wide", 400, "echo \"$TINYSCHEDULER_TASK\" >> \"$OUT/ran\"");
    for i in 0..400 {
        s.task(&format!("wave-{i:03}"));
    }
    s.daemon(&[]);
    s.wait_all_finished(Duration::from_secs(600));
    let retried: Vec<String> = s
        .tasks()
        .into_iter()
        .filter(|t| t.status.attempts != 1 || t.status.phase != TaskPhase::Succeeded)
        .map(|t| {
            format!(
                "{} {:?} {:?}",
                t.metadata.name, t.status.phase, t.status.message
            )
        })
        .collect();
    assert!(
        retried.is_empty(),
        "{} tasks needed another attempt: {:?}",
        retried.len(),
        &retried[..retried.len().min(5)]
    );
    assert_eq!(s.lines("ran").len(), 400);
}

/// Read syscalls of `pid` so far.
fn read_calls(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("syscr: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn an_idle_daemon_does_not_keep_rereading_the_objects_it_was_shown() {
    let mut s = Sched::new();
    s.queue("default");
    s.agent("w", 2, "true");
    for i in 0..20 {
        s.task(&format!("idle-{i:02}"));
    }
    let pid = s.daemon(&[]);
    s.wait_all_finished(LONG);
    // Something reads every object once more (as `get` would), then the daemon is left alone.
    let _ = s.tasks();
    std::thread::sleep(Duration::from_secs(3));
    let before = read_calls(pid);
    std::thread::sleep(Duration::from_secs(3));
    let reads = read_calls(pid) - before;
    // Idle means a timer tick now and then, not a file read per inotify event it caused itself.
    assert!(reads < 300, "{reads} read calls in 3 s of idling");
}

/// How many times `controller` has reconciled, whatever the result.
fn reconciles(metrics: &tinyscheduler::runtime::Metrics, controller: &str) -> u64 {
    metrics
        .histogram(
            "tinyscheduler_reconcile_duration_seconds",
            "",
            &[("controller", controller)],
            &[],
        )
        .count()
}

/// A resync re-checks unfinished tasks only: with 20 finished tasks and one waiting task (no
/// queue, so nothing can run it), every resync costs the status controller one reconcile (the
/// waiting task's key), not 21.
#[tokio::test(start_paused = true)]
async fn a_resync_does_not_reconcile_finished_tasks() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use tinyscheduler::controllers::Settings;
    use tinyscheduler::resources::meta::now_rfc3339;
    use tinyscheduler::resources::{Task, TaskSpec};
    use tinyscheduler::runtime::{InformerEvent, InformerOptions};
    use tinyscheduler::scheduler::{Options, Scheduler};
    use tinyscheduler::store::Store;

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    for i in 0..20 {
        let mut t = Task::new("Task", &format!("done-{i:02}"), TaskSpec::default());
        t.status.phase = if i % 2 == 0 {
            TaskPhase::Succeeded
        } else {
            TaskPhase::Failed
        };
        t.status.finish_time = Some(now_rfc3339());
        store.create(&t).unwrap();
    }
    store
        .create(&Task::new("Task", "waiting", TaskSpec::default()))
        .unwrap();
    let opts = Options {
        informers: InformerOptions {
            resync: Duration::from_secs(5),
            relist: Duration::from_secs(3600),
        },
        heartbeat: None,
        progress: false,
    };
    let sched = Scheduler::start(store, dir.path().to_path_buf(), Settings::default(), opts);
    let resyncs = Arc::new(AtomicU64::new(0));
    let r = resyncs.clone();
    sched.ctx.tasks.on_event(move |ev, _| {
        if let InformerEvent::Resync = ev {
            r.fetch_add(1, Ordering::SeqCst);
        }
    });
    sched.wait_synced().await;
    sched.wait_fixed_point().await;
    let (status0, assign0) = (
        reconciles(&sched.metrics, "status"),
        reconciles(&sched.metrics, "assignment"),
    );
    assert!(status0 >= 21, "the initial list reconciles every task once");
    let before = resyncs.load(Ordering::SeqCst);

    tokio::time::sleep(Duration::from_secs(62)).await;
    sched.wait_fixed_point().await;
    let n = resyncs.load(Ordering::SeqCst) - before;
    assert!(n >= 10, "{n} resyncs");
    assert_eq!(reconciles(&sched.metrics, "status") - status0, n);
    assert_eq!(reconciles(&sched.metrics, "assignment") - assign0, n);
    assert!(sched.ctx.tasks.get("done-00").is_some());
    sched.stop().await;
}

/// A finished task's TTL deletion is scheduled by the reconcile its finish caused; it does not
/// wait for a resync (an hour away here).
#[test]
fn a_finished_task_is_deleted_after_its_ttl_without_waiting_for_a_resync() {
    let mut s = Sched::new();
    s.extra_env
        .push(("TINYSCHEDULER_LOOP_INTERVAL_SEC".into(), "3600".into()));
    s.queue("default");
    s.agent("w", 1, "true");
    s.task_with("short-lived", |t| t.ttl_seconds_after_finished = Some(1));
    s.daemon(&[]);
    // Succeeded lasts only the one-second TTL, which a slow poll can miss: wait for the deletion,
    // then check from the daemon's log that the task had succeeded first.
    wait_for("task/short-lived to be deleted", LONG, || {
        s.store
            .try_get::<tinyscheduler::resources::Task>("short-lived")
            .unwrap()
            .is_none()
    });
    let logs = s.daemon_logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("\"name\":\"short-lived\"")
                && l.contains("\"reason\":\"Succeeded\"")),
        "the task succeeded before it was deleted:\n{logs}"
    );
}

/// An agent that moves to another queue leaves its old queue's status at once, not at the next
/// resync (an hour away here).
#[test]
fn an_agent_moved_to_another_queue_leaves_the_old_queues_status_without_a_resync() {
    let mut s = Sched::new();
    s.extra_env
        .push(("TINYSCHEDULER_LOOP_INTERVAL_SEC".into(), "3600".into()));
    s.queue("default");
    s.queue("other");
    s.agent("w", 3, "true");
    s.daemon(&[]);
    let queue = |name: &str| {
        s.store
            .get::<tinyscheduler::resources::Queue>(name)
            .unwrap()
    };
    wait_for("queue/default to list agent/w", LONG, || {
        queue("default").status.agents == ["w"]
    });
    // Past the start-up's writes: a status key is written at most once a second, and a write
    // held back by that (which would recompute the queue anyway) must not be what the test sees.
    std::thread::sleep(Duration::from_secs(2));
    support::update_retrying::<Agent>(&s.store, "w", |a| a.spec.queue = Some("other".into()));
    wait_for("queue/other to list agent/w", LONG, || {
        queue("other").status.agents == ["w"]
    });
    wait_for("queue/default to drop agent/w", LONG, || {
        let q = queue("default");
        q.status.agents.is_empty() && q.status.capacity == 0
    });
}

/// A blocker deleted by its TTL would count as unfinished and hold its dependent back for good;
/// so it stays until the tasks it blocks have finished, and goes then.
#[test]
fn a_blocker_outlives_its_ttl_until_the_task_it_blocks_has_finished() {
    let mut s = Sched::new();
    s.queue("default");
    s.agent("w", 1, "true");
    // The dependent is pinned to a paused agent: it cannot run before the blocker's TTL is up.
    s.agent_with("later", 1, "true", |a| a.paused = true);
    s.task_with("blocker", |t| t.ttl_seconds_after_finished = Some(0));
    s.task_with("dependent", |t| {
        t.blocked_by = vec!["blocker".into()];
        t.assigned_to = Some("later".into());
    });
    s.daemon(&[]);
    s.wait_phase("blocker", TaskPhase::Succeeded, LONG);
    wait_for("task/dependent to be unblocked", LONG, || {
        s.phase("dependent") == TaskPhase::Pending
    });

    // The daemon writes the Agent's status meanwhile.
    support::update_retrying::<Agent>(&s.store, "later", |a| a.spec.paused = false);
    s.wait_phase("dependent", TaskPhase::Succeeded, LONG);
    wait_for("task/blocker to be deleted after its TTL", LONG, || {
        s.store.try_get::<Task>("blocker").unwrap().is_none()
    });
}

#[test]
fn a_task_deleted_and_created_again_shows_only_its_own_logs_and_events() {
    let s = Sched::new();
    s.queue("default");
    s.agent("w", 1, "echo \"word=$TINYSCHEDULER_PARAM_WORD\"");
    let with_word = |word: &str| {
        s.task_with("again", |t| {
            t.params.insert("word".into(), word.into());
        })
    };
    with_word("first");
    assert_eq!(s.run(&["run", "--once", "--wait"]).code, 0);
    let deleted = s.run(&["delete", "task", "again"]);
    assert_eq!(deleted.code, 0, "{deleted:?}");
    assert!(
        !s.env.state().join("logs/again").exists(),
        "its logs went with it"
    );

    with_word("second");
    assert_eq!(s.run(&["run", "--once", "--wait"]).code, 0);
    assert_eq!(s.phase("again"), TaskPhase::Succeeded);
    let logs = s.run(&["logs", "again"]);
    assert!(logs.stdout.contains("word=second"), "{logs:?}");
    assert!(!logs.stdout.contains("word=first"), "{logs:?}");
    let d = s.run(&["describe", "task", "again"]);
    assert_eq!(d.code, 0, "{d:?}");
    let succeeded: Vec<&str> = d
        .stdout
        .lines()
        .filter(|l| l.contains("Succeeded"))
        .collect();
    assert!(
        succeeded.iter().all(|l| !l.contains("x2")),
        "the first incarnation's events are not this one's:\n{}",
        d.stdout
    );
    assert_eq!(
        d.stdout
            .lines()
            .filter(|l| l.contains("Assigned") && l.contains("agent/w"))
            .count(),
        1,
        "{}",
        d.stdout
    );
}

/// How the shims of a `run --once --wait` were started, as each agent saw its parent's command
/// line (a forked shim keeps the launcher's).
fn shim_command_lines(s: &Sched) -> Vec<String> {
    s.queue("default");
    s.agent(
        "solo",
        2,
        "echo \"$(tr '\\0' ' ' < /proc/$PPID/cmdline) comm=$(cat /proc/$PPID/comm)\" >> \"$OUT/shims\"",
    );
    for t in ["one", "two", "three"] {
        s.task(t);
    }
    let r = s.run(&["run", "--once", "--wait"]);
    assert_eq!(r.code, 0, "{r:?}");
    for t in ["one", "two", "three"] {
        assert_eq!(s.phase(t), TaskPhase::Succeeded, "{t}");
    }
    s.lines("shims")
}

#[test]
fn shims_are_forked_by_the_launcher() {
    let s = Sched::new();
    let shims = shim_command_lines(&s);
    assert_eq!(shims.len(), 3, "{shims:?}");
    assert!(
        shims.iter().all(|c| c.contains(" shim-launcher")),
        "{shims:?}"
    );
    // Each forked shim is named after its Lease (to 15 bytes).
    for t in ["one", "two", "three"] {
        assert!(
            shims.iter().any(|c| c.ends_with(&format!("comm=shim:{t}"))),
            "{shims:?}"
        );
    }
}

#[test]
fn with_the_launcher_turned_off_shims_are_executed_and_tasks_still_run() {
    let mut s = Sched::new();
    s.extra_env
        .push(("TINYSCHEDULER_SHIM_LAUNCHER".into(), "0".into()));
    let shims = shim_command_lines(&s);
    assert_eq!(shims.len(), 3, "{shims:?}");
    assert!(
        shims.iter().all(|c| c.contains(" shim --lease ")),
        "{shims:?}"
    );
}

#[test]
fn a_run_that_ends_at_once_still_tells_its_whole_story() {
    let mut s = Sched::new();
    s.queue("default");
    s.agent("w", 1, "true");
    s.task("quick");
    s.daemon(&[]);
    wait_for("task/quick to succeed", LONG, || {
        s.phase("quick") == TaskPhase::Succeeded
    });
    let t = s.get_task("quick");
    // The Lease's acquireTime, cut to the second as the Task's other times are.
    let started = t.status.start_time.as_deref().unwrap_or_default();
    assert!(
        started.ends_with('Z') && !started.contains('.'),
        "{:?}",
        t.status
    );
    assert_eq!(t.status.agent.as_deref(), Some("w"));
    wait_for("the Succeeded event", LONG, || {
        story(&s, "quick").last().map(String::as_str) == Some("Succeeded")
    });
    assert_eq!(story(&s, "quick"), ["Assigned", "Started", "Succeeded"]);
}

#[test]
fn a_run_that_keeps_running_is_shown_running_by_the_daemon() {
    let mut s = Sched::new();
    s.queue("default");
    s.agent(
        "w",
        1,
        "while [ ! -e \"$OUT/go\" ] && [ -d \"$OUT\" ]; do sleep 0.05; done",
    );
    s.task("slow");
    s.daemon(&[]);
    wait_for("task/slow to be Running", LONG, || {
        s.phase("slow") == TaskPhase::Running
    });
    let t = s.get_task("slow");
    assert_eq!(t.status.agent.as_deref(), Some("w"), "{:?}", t.status);
    assert_eq!(t.status.lease.as_deref(), Some("slow"), "{:?}", t.status);
    assert_eq!(t.status.attempts, 1, "{:?}", t.status);
    assert!(t.status.start_time.is_some(), "{:?}", t.status);
    // The Started event is written just after the Task.
    wait_for("the Started event", LONG, || story(&s, "slow").len() == 2);
    assert_eq!(story(&s, "slow"), ["Assigned", "Started"]);
    std::fs::write(s.out("go"), "").unwrap();
    wait_for("task/slow to succeed", LONG, || {
        s.phase("slow") == TaskPhase::Succeeded
    });
    wait_for("the Succeeded event", LONG, || {
        story(&s, "slow").last().map(String::as_str) == Some("Succeeded")
    });
    assert_eq!(story(&s, "slow"), ["Assigned", "Started", "Succeeded"]);
}

#[test]
fn a_retry_shown_running_carries_nothing_of_the_attempt_that_failed() {
    let mut s = Sched::new();
    s.extra_env
        .push(("TINYSCHEDULER_RETRY_BASE_SEC".into(), "0.2".into()));
    s.queue("default");
    // The first attempt fails at once; the second runs until told to stop.
    s.agent(
        "w",
        1,
        "if [ ! -e \"$OUT/failed\" ]; then : > \"$OUT/failed\"; exit 3; fi; \
         while [ ! -e \"$OUT/go\" ] && [ -d \"$OUT\" ]; do sleep 0.05; done",
    );
    s.task_with("again", |t| t.max_retries = 2);
    s.daemon(&[]);
    wait_for("the second attempt to be shown Running", LONG, || {
        let t = s.get_task("again");
        t.status.phase == TaskPhase::Running && t.status.attempts == 2
    });
    let t = s.get_task("again");
    assert_eq!(t.status.exit_code, None, "{:?}", t.status);
    assert_eq!(t.status.finish_time, None, "{:?}", t.status);
    assert_eq!(t.status.next_attempt_after, None, "{:?}", t.status);
    assert_eq!(t.status.reason, None, "{:?}", t.status);
    assert_eq!(t.status.lease.as_deref(), Some("again"), "{:?}", t.status);
    assert!(t.status.start_time.is_some(), "{:?}", t.status);
    std::fs::write(s.out("go"), "").unwrap();
    wait_for("task/again to succeed", LONG, || {
        s.phase("again") == TaskPhase::Succeeded
    });
    let t = s.get_task("again");
    assert_eq!((t.status.attempts, t.status.exit_code), (2, Some(0)));
}

#[test]
fn the_largest_task_apply_admits_still_has_its_failure_recorded() {
    use tinyscheduler::store::{stored_size, MAX_APPLIED_BYTES};
    let s = Sched::new();
    s.queue("default");
    s.agent("a", 1, "echo failing; exit 3");
    // A Task whose params bring it, as stored, to just under what apply admits (less what
    // admission adds: its defaulted fields). Eight of them: the agent gets each in a variable of
    // its environment, where one may be at most 128 KiB.
    let task = |len: usize| {
        let params: serde_json::Map<String, serde_json::Value> = (0..8)
            .map(|i| {
                (
                    format!("p{i}"),
                    "x".repeat(len / 8 + usize::from(i < len % 8)).into(),
                )
            })
            .collect();
        serde_json::json!({
            "apiVersion": "tinyscheduler.io/v1alpha1",
            "kind": "Task",
            "metadata": {"name": "fat"},
            "spec": {"queue": "default", "maxRetries": 0, "params": params},
        })
    };
    let probe = 900_000;
    let len = probe + (MAX_APPLIED_BYTES - stored_size(&task(probe), None)) as usize - 256;
    assert!(stored_size(&task(len), None) <= MAX_APPLIED_BYTES);
    let file = s.out("fat.json");
    std::fs::write(&file, serde_json::to_vec(&task(len)).unwrap()).unwrap();
    let applied = s.run(&["apply", "-f", file.to_str().unwrap()]);
    assert_eq!(applied.code, 0, "{applied:?}");
    // The first pass starts the agent, and records its failure if it has ended by then; once it
    // has, the next pass does (`--wait` would wait for ever if the outcome could not be written).
    let r = s.run(&["run", "--once"]);
    assert_eq!(r.code, 0, "{r:?}");
    wait_for("the run to end", LONG, || {
        s.store
            .try_get::<tinyscheduler::resources::Lease>("fat")
            .unwrap()
            .is_none_or(|l| l.status.phase == tinyscheduler::resources::LeasePhase::Completed)
    });
    let r = s.run(&["run", "--once"]);
    assert_eq!(r.code, 0, "{r:?}");
    let fat = s.get_task("fat");
    assert_eq!(fat.status.phase, TaskPhase::Failed, "{:?}", fat.status);
    assert_eq!(fat.status.exit_code, Some(3), "{:?}", fat.status.message);
    // One more byte than apply admits (before the defaulted fields) is refused, naming the limit.
    let over = len + (MAX_APPLIED_BYTES - stored_size(&task(len), None)) as usize + 1;
    std::fs::write(&file, serde_json::to_vec(&task(over)).unwrap()).unwrap();
    let refused = s.run(&["apply", "-f", file.to_str().unwrap()]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stderr.contains("kept for its status"),
        "{refused:?}"
    );
}

/// The daemon's shim launcher: its child whose command line says `shim-launcher`.
fn launcher_of(daemon: u32) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let ppid: u32 = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        (ppid == daemon && String::from_utf8_lossy(&cmdline).contains("shim-launcher"))
            .then_some(pid)
    })
}

#[test]
fn a_stopped_shim_launcher_is_replaced_and_the_runs_start_all_the_same() {
    let mut s = Sched::new();
    s.queue("default");
    s.agent("w", 2, "echo ran >> \"$OUT/ran\"");
    let d = s.daemon(&[]);
    // The launcher starts with the first run.
    s.task("first");
    s.wait_phase("first", TaskPhase::Succeeded, LONG);
    let launcher = launcher_of(d).expect("the daemon's shim launcher");
    kill(Pid::from_raw(launcher), Signal::SIGSTOP).unwrap();
    for name in ["a", "b", "c"] {
        s.task(name);
    }
    let all = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        s.wait_all_finished(LONG);
    }));
    // Whatever happened, the stopped launcher is not left behind.
    let _ = kill(Pid::from_raw(launcher), Signal::SIGKILL);
    let _ = kill(Pid::from_raw(launcher), Signal::SIGCONT);
    assert!(all.is_ok(), "{}", s.daemon_logs());
    for name in ["a", "b", "c"] {
        assert_eq!(
            s.phase(name),
            TaskPhase::Succeeded,
            "{name}: {}",
            s.daemon_logs()
        );
    }
    assert_eq!(s.lines("ran").len(), 4);
    assert!(
        s.daemon_logs().contains("the shim launcher failed"),
        "{}",
        s.daemon_logs()
    );
}
