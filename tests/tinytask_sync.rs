//! The tinytask sync controller end to end: the real binary (`run --once --wait` or
//! `run --daemon`) against the fake tinytask server on 127.0.0.1, with `sh -c` agents that append
//! what they ran to a shared file (so a task that ran twice shows up twice).

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::tinytask_server::TinytaskServer;
use support::{Env, Run, API};
use tinyscheduler::resources::{Event, Lease, LeasePhase, Task};
use tinyscheduler::store::Store;

/// A scratch state directory plus a fake server and the shared "what ran" file.
struct World {
    env: Env,
    server: TinytaskServer,
}

impl World {
    async fn new() -> World {
        World {
            env: Env::new(),
            server: TinytaskServer::start().await,
        }
    }

    fn ran_file(&self) -> PathBuf {
        self.env.tmp.path().join("ran.txt")
    }

    /// Lines `TASK AGENT` the agents appended, in order.
    fn ran(&self) -> Vec<(String, String)> {
        std::fs::read_to_string(self.ran_file())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (t, a) = l.split_once(' ')?;
                Some((t.to_string(), a.to_string()))
            })
            .collect()
    }

    fn apply(&self, name: &str, doc: Value) {
        let text = serde_json::to_string_pretty(&doc).unwrap();
        self.env.apply_ok(&format!("{name}.json"), &text);
    }

    /// A tinytask Queue on the fake server.
    fn tinytask_queue(&self, name: &str, extra: Value) {
        let mut spec =
            json!({"source": "tinytask", "endpoint": self.server.url(), "pollIntervalSeconds": 1});
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                s.insert(k.clone(), v.clone());
            }
        }
        self.apply(
            &format!("queue-{name}"),
            json!({"apiVersion": "tinyscheduler.io/v1alpha1", "kind": "Queue", "metadata": {"name": name}, "spec": spec}),
        );
    }

    /// An Agent running `sh -c SCRIPT`; `$RAN` is the shared file.
    fn agent(&self, name: &str, queue: Option<&str>, slots: i64, script: &str) {
        let mut spec = json!({
            "maxConcurrency": slots,
            "command": ["sh", "-c", script],
            "env": {"RAN": self.ran_file().display().to_string()},
        });
        if let Some(q) = queue {
            spec["queue"] = json!(q);
        }
        self.apply(
            &format!("agent-{name}"),
            json!({"apiVersion": "tinyscheduler.io/v1alpha1", "kind": "Agent", "metadata": {"name": name}, "spec": spec}),
        );
    }

    fn cmd(&self, args: &[&str]) -> tokio::process::Command {
        let mut c = self.env.cmd(args);
        c.env("TINYSCHEDULER_RETRY_BASE_SEC", "0.1")
            .env("TINYSCHEDULER_RETRY_MAX_SEC", "0.5")
            .env_remove("TINYSCHEDULER_MCP_ENDPOINT");
        let mut c = tokio::process::Command::from(c);
        c.kill_on_drop(true);
        c
    }

    /// `run --once --wait` to completion (the fake server keeps serving meanwhile). If it does
    /// not finish in time, the panic shows what it printed so far (it logs what it still waits
    /// for every 10 s), the store's Tasks and Leases, and the requests the server saw.
    async fn run_once(&self, timeout: Duration) -> Run {
        use tokio::io::AsyncReadExt;
        let mut cmd = self.cmd(&["run", "--once", "--wait"]);
        cmd.env("TINYSCHEDULER_LOG_LEVEL", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("run the binary");
        // Read both pipes as the child writes, so that what it printed survives a timeout.
        let drain = |pipe: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>| {
            let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let b = buf.clone();
            let task = tokio::spawn(async move {
                let Some(mut pipe) = pipe else { return };
                let mut chunk = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                    b.lock().unwrap().extend_from_slice(&chunk[..n]);
                }
            });
            (buf, task)
        };
        let text = |b: &std::sync::Arc<std::sync::Mutex<Vec<u8>>>| {
            String::from_utf8_lossy(&b.lock().unwrap()).into_owned()
        };
        let (stdout, out_task) = drain(child.stdout.take().map(|p| Box::new(p) as _));
        let (stderr, err_task) = drain(child.stderr.take().map(|p| Box::new(p) as _));
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => {
                let status = status.expect("wait for the binary");
                let _ = out_task.await;
                let _ = err_task.await;
                Run {
                    code: status.code().unwrap_or(-1),
                    stdout: text(&stdout),
                    stderr: text(&stderr),
                }
            }
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                let _ = tokio::time::timeout(Duration::from_secs(5), out_task).await;
                let _ = tokio::time::timeout(Duration::from_secs(5), err_task).await;
                panic!(
                    "run --once --wait did not finish in {timeout:?}\n--- stdout:\n{}\n--- stderr:\n{}\n--- store:\n{}\n--- server requests:\n{}",
                    text(&stdout),
                    text(&stderr),
                    self.store_dump(),
                    self.request_log(),
                );
            }
        }
    }

    /// The requests the fake server saw, one line each: `METHOD PATH?QUERY [If-None-Match] -> STATUS BODY`.
    fn request_log(&self) -> String {
        self.server
            .requests()
            .iter()
            .map(|r| {
                format!(
                    "{} {}{}{} -> {} {}",
                    r.method,
                    r.path,
                    r.query
                        .as_deref()
                        .map(|q| format!("?{q}"))
                        .unwrap_or_default(),
                    r.if_none_match
                        .as_deref()
                        .map(|e| format!(" [If-None-Match {e}]"))
                        .unwrap_or_default(),
                    r.status,
                    r.body,
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The store's Tasks (phase, lease, blockedBy, write-backs) and Leases (task, agent, phase),
    /// one line each, and the Events, for a failure message.
    fn store_dump(&self) -> String {
        let store = self.store();
        let mut out = Vec::new();
        match store.list::<Task>(None) {
            Ok(l) => out.extend(l.items.iter().map(|t| {
                format!(
                    "task/{} rv {} phase {} lease {:?} agent {:?} attempts {} blockedBy {:?} writeBacks {} message {:?}",
                    t.metadata.name,
                    t.metadata.resource_version,
                    t.status.phase.as_str(),
                    t.status.lease,
                    t.status.agent,
                    t.status.attempts,
                    t.spec.blocked_by,
                    t.status.write_backs.len(),
                    t.status.message,
                )
            })),
            Err(e) => out.push(format!("cannot list tasks: {e}")),
        }
        match store.list::<Lease>(None) {
            Ok(l) => out.extend(l.items.iter().map(|l| {
                format!(
                    "lease/{} rv {} task {} agent {} phase {:?} claimed {:?}",
                    l.metadata.name,
                    l.metadata.resource_version,
                    l.spec.task,
                    l.spec.agent,
                    l.status.phase,
                    l.metadata.annotations.get("tinyscheduler.io/claimed"),
                )
            })),
            Err(e) => out.push(format!("cannot list leases: {e}")),
        }
        out.push(format!("events:\n{}", self.events()));
        out.join("\n")
    }

    fn status(&self, id: i64) -> (String, Option<String>) {
        let t = self.server.task(id).expect("task exists");
        (t.status, t.assigned_to)
    }

    fn store(&self) -> Store {
        Store::open_read_only(self.env.state())
    }

    fn task_json(&self, name: &str) -> Option<Value> {
        self.store().get_raw("tasks", name).ok()
    }

    /// Leases whose agent is running.
    fn running(&self) -> usize {
        self.store()
            .list::<Lease>(None)
            .map(|l| {
                l.items
                    .iter()
                    .filter(|l| l.status.phase == LeasePhase::Running)
                    .count()
            })
            .unwrap_or(0)
    }

    /// Every Event's reason and message.
    fn events(&self) -> String {
        self.store()
            .list::<Event>(None)
            .map(|l| {
                l.items
                    .iter()
                    .map(|e| format!("{} {}", e.spec.reason, e.spec.message))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default()
    }
}

const RECORD: &str = r#"echo "$TINYSCHEDULER_TASK $TINYSCHEDULER_AGENT" >> "$RAN""#;

async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn queued(server: &TinytaskServer, title: &str, queue: &str) -> i64 {
    server.insert(title, |t| t.queue_name = Some(queue.into()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_is_spread_over_the_pool_and_completed_on_the_server() {
    let w = World::new().await;
    let ids: Vec<i64> = (0..7)
        .map(|i| queued(&w.server, &format!("job {i}"), "dev"))
        .collect();
    w.tinytask_queue("dev", json!({}));
    let slow = format!("{RECORD}; sleep 0.3");
    w.agent("alice", Some("dev"), 2, &slow);
    w.agent("bob", Some("dev"), 2, &slow);

    let r = w.run_once(Duration::from_secs(90)).await;
    assert_eq!(r.code, 0, "{r:?}");
    for id in &ids {
        assert_eq!(w.status(*id).0, "complete", "task {id}: {r:?}");
    }
    let ran = w.ran();
    assert_eq!(ran.len(), ids.len(), "each task ran exactly once: {ran:?}");
    let agents: std::collections::BTreeSet<&str> = ran.iter().map(|(_, a)| a.as_str()).collect();
    assert_eq!(agents.len(), 2, "both agents of the pool got work: {ran:?}");
    // Claimed for the agent that ran it.
    for (task, agent) in &ran {
        let id: i64 = task.trim_start_matches("tt-").parse().unwrap();
        assert_eq!(w.status(id).1.as_deref(), Some(agent.as_str()));
    }
    // Never more than the window: no request lists the whole queue without a limit.
    assert!(w
        .server
        .requests()
        .iter()
        .filter(|q| q.path == "/api/v1/tasks")
        .all(|q| q.query.as_deref().unwrap_or("").contains("limit=")));
    // The stats check is conditional after the first poll.
    assert!(w
        .server
        .requests()
        .iter()
        .any(|q| q.path.ends_with("/stats") && q.if_none_match.is_some()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_assigned_on_the_server_run_on_their_agent_and_foreign_ones_are_left_alone() {
    let w = World::new().await;
    let for_bob: Vec<i64> = (0..2)
        .map(|i| {
            w.server.insert(&format!("bob {i}"), |t| {
                t.queue_name = Some("dev".into());
                t.assigned_to = Some("bob".into());
            })
        })
        .collect();
    let foreign = w.server.insert("someone else's", |t| {
        t.queue_name = Some("dev".into());
        t.assigned_to = Some("stranger".into());
    });
    let pool = queued(&w.server, "anyone", "dev");
    w.tinytask_queue("dev", json!({}));
    w.agent("alice", Some("dev"), 2, RECORD);
    // bob serves no queue: only what is pinned to him.
    w.agent("bob", None, 2, RECORD);

    let r = w.run_once(Duration::from_secs(60)).await;
    assert_eq!(r.code, 0, "{r:?}");
    let ran = w.ran();
    for id in &for_bob {
        assert!(
            ran.contains(&(format!("tt-{id}"), "bob".into())),
            "{id} on bob: {ran:?}"
        );
        assert_eq!(w.status(*id), ("complete".into(), Some("bob".into())));
    }
    assert!(
        ran.contains(&(format!("tt-{pool}"), "alice".into())),
        "{ran:?}"
    );
    assert_eq!(
        ran.len(),
        3,
        "{ran:?}\n{}\n{:#?}",
        w.events(),
        w.server.requests()
    );
    assert_eq!(w.status(foreign), ("idle".into(), Some("stranger".into())));
    assert!(w.task_json(&format!("tt-{foreign}")).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_tasks_wait_and_do_not_starve_the_window() {
    let w = World::new().await;
    // The blocker is someone else's work in progress.
    let blocker = w.server.insert("blocker", |t| {
        t.queue_name = Some("dev".into());
        t.assigned_to = Some("stranger".into());
        t.status = "working".into();
    });
    let blocked: Vec<i64> = (0..10)
        .map(|i| {
            w.server.insert(&format!("blocked {i}"), |t| {
                t.queue_name = Some("dev".into());
                t.priority = 10.0;
                t.blocked_by_task_id = Some(blocker);
            })
        })
        .collect();
    let runnable: Vec<i64> = (0..2)
        .map(|i| queued(&w.server, &format!("free {i}"), "dev"))
        .collect();
    w.tinytask_queue("dev", json!({}));
    w.agent("alice", Some("dev"), 2, RECORD);

    let r = w.run_once(Duration::from_secs(60)).await;
    assert_eq!(r.code, 0, "{r:?}");
    for id in &runnable {
        assert_eq!(w.status(*id).0, "complete", "{id}: {r:?}");
    }
    for id in &blocked {
        assert_eq!(w.status(*id), ("idle".into(), None), "{id} waits");
        let mirror = w
            .task_json(&format!("tt-{id}"))
            .expect("blocked tasks are mirrored");
        assert_eq!(mirror["status"]["phase"], "Blocked", "{mirror}");
        assert_eq!(
            mirror["spec"]["blockedBy"][0],
            format!("tt-{blocker}"),
            "{mirror}"
        );
    }
    assert_eq!(w.ran().len(), 2, "{:?}", w.ran());
}

/// Runs the daemon against one contested task; `take` is called once `ready` holds and changes
/// the task on the server. Returns the request log and the Events' text.
async fn contested(
    w: &World,
    id: i64,
    ready: impl Fn(&World) -> bool,
    take: impl FnOnce(&TinytaskServer),
) -> String {
    // Every request is slow, so the test can act while one is in flight.
    w.server.delay_next(1000, Duration::from_millis(400));
    let mut child = w.cmd(&["run", "--daemon"]).spawn().unwrap();
    let name = format!("tt-{id}");
    wait_until("the claim to begin", Duration::from_secs(30), || ready(w)).await;
    take(&w.server);
    wait_until("the mirror to be dropped", Duration::from_secs(30), || {
        w.task_json(&name).is_none()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = child.start_kill();
    let _ = child.wait().await;
    assert!(w.ran().is_empty(), "nothing ran: {:?}", w.ran());
    w.events()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_taken_on_the_server_before_the_claims_re_read_does_not_run() {
    let w = World::new().await;
    let id = queued(&w.server, "contested", "dev");
    w.tinytask_queue("dev", json!({}));
    w.agent("alice", Some("dev"), 1, RECORD);
    let mirrored = |w: &World| w.task_json(&format!("tt-{id}")).is_some();
    // The poll saw it free; the claim's re-read (in flight now) sees it taken.
    let events = contested(&w, id, mirrored, |s| {
        s.mutate_task(id, |t| t.assigned_to = Some("stranger".into()))
    })
    .await;
    assert!(events.contains("ClaimRefused"), "{events}");
    assert!(events.contains("assigned to stranger"), "{events}");
    assert_eq!(w.status(id), ("idle".into(), Some("stranger".into())));
    assert!(
        !w.server.requests().iter().any(|r| r.method == "PATCH"),
        "never written: {:?}",
        w.server.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_taken_on_the_server_between_read_and_claim_does_not_run() {
    let w = World::new().await;
    let id = queued(&w.server, "contested", "dev");
    w.tinytask_queue("dev", json!({}));
    w.agent("alice", Some("dev"), 1, RECORD);
    let path = format!("/api/v1/tasks/{id}");
    let read = move |w: &World| {
        w.server
            .requests()
            .iter()
            .any(|r| r.method == "GET" && r.path == path)
    };
    // The claim's read has been answered and its PATCH is in flight: someone else claims it now.
    let events = contested(&w, id, read, |s| {
        s.mutate_task(id, |t| {
            t.assigned_to = Some("stranger".into());
            t.status = "working".into();
        })
    })
    .await;
    assert!(events.contains("ClaimRefused"), "{events}");
    assert!(events.contains("changed on the server"), "{events}");
    assert_eq!(
        w.status(id),
        ("working".into(), Some("stranger".into())),
        "the other claimant keeps it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_mid_run_delays_write_backs_but_loses_none_and_runs_nothing_twice() {
    let mut w = World::new().await;
    let ids: Vec<i64> = (0..6)
        .map(|i| queued(&w.server, &format!("job {i}"), "dev"))
        .collect();
    w.tinytask_queue("dev", json!({}));
    // Slow enough that the server goes away while they run.
    w.agent("alice", Some("dev"), 3, &format!("sleep 1.5; {RECORD}"));
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let http = format!("127.0.0.1:{port}");
    let mut child = w
        .cmd(&["run", "--daemon", "--http", &http])
        .spawn()
        .unwrap();
    wait_until("three runs to start", Duration::from_secs(30), || {
        w.running() >= 3
    })
    .await;
    w.server.stop().await;
    // The runs finish while the server is down: their results wait in the Tasks' status.
    wait_until("the first runs to finish", Duration::from_secs(30), || {
        w.ran().len() >= 3
    })
    .await;
    let wb_pending = |w: &World| {
        ids.iter()
            .filter_map(|id| w.task_json(&format!("tt-{id}")))
            .filter(|t| {
                t.pointer("/status/writeBacks")
                    .and_then(Value::as_array)
                    .is_some_and(|a| !a.is_empty())
            })
            .count()
    };
    wait_until("write-backs to be queued", Duration::from_secs(30), || {
        wb_pending(&w) >= 3
    })
    .await;
    // Unready while the source is down (from its first failed poll, which a loaded machine may
    // not have run yet); the queue says why.
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let ready = reqwest::get(format!("http://{http}/readyz")).await.unwrap();
        if ready.status().as_u16() == 500 {
            break ready.text().await.unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "readyz never reported the source down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(body.contains("tinytask-sources"), "{body}");
    let metrics = reqwest::get(format!("http://{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tinyscheduler_tinytask_source_up{queue=\"dev\"} 0"),
        "{metrics}"
    );
    let d = w.env.run(&["describe", "queue", "dev"]);
    assert!(d.stdout.contains("SourceReachable"), "{d:?}");
    assert!(d.stdout.contains("False"), "{d:?}");
    // What finished during the outage is not on the server yet.
    let waiting: Vec<i64> = ids
        .iter()
        .copied()
        .filter(|id| {
            w.task_json(&format!("tt-{id}"))
                .and_then(|t| t.pointer("/status/writeBacks").cloned())
                .is_some_and(|a| a.as_array().is_some_and(|a| !a.is_empty()))
        })
        .collect();
    assert!(waiting.len() >= 3, "{waiting:?}");
    for id in &waiting {
        assert_eq!(w.status(*id).0, "working", "{id}");
    }

    w.server.restart().await;
    wait_until(
        "every task to be complete on the server",
        Duration::from_secs(90),
        || ids.iter().all(|id| w.status(*id).0 == "complete"),
    )
    .await;
    wait_until("no write-back left", Duration::from_secs(30), || {
        wb_pending(&w) == 0
    })
    .await;
    let ready = reqwest::get(format!("http://{http}/readyz")).await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    let _ = child.start_kill();
    let _ = child.wait().await;

    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for (t, _) in w.ran() {
        *counts.entry(t).or_default() += 1;
    }
    assert_eq!(counts.len(), ids.len(), "{counts:?}");
    assert!(counts.values().all(|n| *n == 1), "ran twice: {counts:?}");
    let d = w.env.run(&["describe", "queue", "dev"]);
    assert!(d.stdout.contains("SourceReachable"), "{d:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_and_malformed_answers_are_retried_without_a_crash() {
    let w = World::new().await;
    let ids: Vec<i64> = (0..3)
        .map(|i| queued(&w.server, &format!("job {i}"), "dev"))
        .collect();
    w.tinytask_queue("dev", json!({}));
    w.agent("alice", Some("dev"), 3, RECORD);
    w.server.fail_next(3, 503);
    w.server.malformed_next(2);
    // Each run either finishes the work or reports why it could not (naming the cause); the next
    // one picks up where it stopped.
    for _ in 0..4 {
        let r = w.run_once(Duration::from_secs(60)).await;
        assert!(r.stdout.contains("leases scanned"), "no crash: {r:?}");
        assert!(!r.stderr.contains("panick"), "{r:?}");
        if r.code == 0 {
            break;
        }
        assert!(
            r.stderr.contains("malformed JSON") || r.stderr.contains("HTTP 503"),
            "{r:?}"
        );
        assert!(!r.stdout.contains("errors: 0"), "{r:?}");
    }
    for id in &ids {
        assert_eq!(w.status(*id).0, "complete", "{id}");
    }
    assert_eq!(w.ran().len(), 3);

    // A burst longer than the client's retries is reported, then recovered from.
    let id = queued(&w.server, "late", "dev");
    w.server.fail_next(6, 500);
    let r = w.run_once(Duration::from_secs(60)).await;
    assert!(r.stdout.contains("leases scanned"), "no crash: {r:?}");
    if w.status(id).0 != "complete" {
        assert_eq!(r.code, 1, "an unfinished poll is an error: {r:?}");
        assert!(r.stderr.contains("HTTP 500"), "{r:?}");
        let r = w.run_once(Duration::from_secs(60)).await;
        assert_eq!(r.code, 0, "{r:?}");
    }
    assert_eq!(w.status(id).0, "complete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_task_gets_comments_and_ends_idle_and_unassigned() {
    let w = World::new().await;
    let id = queued(&w.server, "doomed", "dev");
    w.tinytask_queue("dev", json!({}));
    w.agent("alice", Some("dev"), 1, &format!("{RECORD}; exit 3"));
    let r = w.run_once(Duration::from_secs(60)).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(w.ran().len(), 4, "1 + maxRetries 3 attempts: {:?}", w.ran());
    assert_eq!(w.status(id), ("idle".into(), None));
    let comments: Vec<String> = w
        .server
        .comments(id)
        .into_iter()
        .map(|c| c.content)
        .collect();
    assert_eq!(comments.len(), 4, "{comments:#?}");
    for (i, c) in comments.iter().take(3).enumerate() {
        assert!(c.contains(&format!("attempt {}", i + 1)), "{c}");
        assert!(c.contains("exit code 3"), "{c}");
        assert!(c.contains(&format!("logs/tt-{id}/{}.log", i + 1)), "{c}");
    }
    assert!(
        comments[3].contains("failed after 4 attempts"),
        "{}",
        comments[3]
    );
    let t = w.task_json(&format!("tt-{id}")).unwrap();
    assert_eq!(t["status"]["phase"], "Failed");
    assert!(t["status"].get("writeBacks").is_none(), "{t}");
}

/// tinytask has no failed state: a task given up after its retries is idle again on the server,
/// and only the tag set with the release keeps it from running again once its mirror is gone (it
/// goes an hour after it failed), until someone removes the tag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_failed_for_good_is_tagged_and_not_run_again_until_the_tag_is_removed() {
    let w = World::new().await;
    let id = w.server.insert("doomed", |t| {
        t.queue_name = Some("dev".into());
        t.tags = Some(vec!["keep-me".into()]);
    });
    w.tinytask_queue("dev", json!({}));
    w.agent("alice", Some("dev"), 1, &format!("{RECORD}; exit 3"));
    let name = format!("tt-{id}");
    let r = w.run_once(Duration::from_secs(60)).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(w.ran().len(), 4, "{:?}", w.ran());
    let t = w.server.task(id).unwrap();
    assert_eq!(
        (t.status.as_str(), t.assigned_to.as_deref()),
        ("idle", None)
    );
    assert_eq!(
        t.tags,
        Some(vec![
            "keep-me".to_string(),
            "tinyscheduler-failed".to_string()
        ])
    );
    let last = w.server.comments(id).pop().unwrap().content;
    assert!(last.contains("remove the tag"), "{last}");

    // Its mirror goes (as after its TTL); the task, idle on the server, is not mirrored again.
    let d = w.env.run(&["delete", "task", &name]);
    assert_eq!(d.code, 0, "{d:?}");
    w.server.clear_requests();
    let r = w.run_once(Duration::from_secs(60)).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(w.task_json(&name).is_none(), "mirrored again");
    assert_eq!(w.ran().len(), 4, "{:?}", w.ran());
    // Left out of the listing, not mirrored and then refused at its claim.
    let path = format!("/api/v1/tasks/{id}");
    assert!(
        !w.server.requests().iter().any(|r| r.path == path),
        "{}",
        w.request_log()
    );
    assert!(!w.events().contains("ClaimRefused"), "{}", w.events());

    // Without the tag it runs again.
    w.server
        .mutate_task(id, |t| t.tags = Some(vec!["keep-me".into()]));
    let r = w.run_once(Duration::from_secs(60)).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(w.ran().len(), 8, "{:?}", w.ran());
    // The second round's comments say what the first round's said, and are posted all the same.
    let comments = w.server.comments(id);
    assert_eq!(comments.len(), 8, "{comments:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_with_the_server_down_exits_1_naming_it_while_local_work_runs() {
    let mut w = World::new().await;
    queued(&w.server, "never seen", "dev");
    w.tinytask_queue("dev", json!({}));
    let url = w.server.url();
    w.server.stop().await;
    w.agent("alice", Some("dev"), 1, RECORD);
    w.apply(
        "local",
        json!({"apiVersion": "tinyscheduler.io/v1alpha1", "kind": "Queue", "metadata": {"name": "local"}, "spec": {"source": "local"}}),
    );
    w.agent("carol", Some("local"), 1, RECORD);
    w.env.apply_ok(
        "task.yaml",
        &format!("{API}\nkind: Task\nmetadata:\n  name: here\nspec:\n  queue: local\n"),
    );
    let r = w.run_once(Duration::from_secs(60)).await;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("queue/dev"), "{r:?}");
    assert!(r.stderr.contains("cannot connect"), "{r:?}");
    assert!(r.stderr.contains(&url), "{r:?}");
    assert!(!r.stdout.contains("errors: 0"), "{r:?}");
    assert_eq!(w.ran(), vec![("here".to_string(), "carol".to_string())]);
    let d = w.env.run(&["describe", "queue", "dev"]);
    assert!(d.stdout.contains("SourceReachable"), "{d:?}");
    assert!(d.stdout.contains("Unreachable"), "{d:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_task_is_mirrored_as_blocked_and_runs_once_its_blocker_is_complete() {
    let w = World::new().await;
    let blocker = queued(&w.server, "first", "dev");
    let blocked = w.server.insert("second", |t| {
        t.queue_name = Some("dev".into());
        t.priority = 10.0;
        t.blocked_by_task_id = Some(blocker);
    });
    w.tinytask_queue("dev", json!({}));
    w.agent("alice", Some("dev"), 2, RECORD);

    // The first pass runs the blocker; the blocked task may already run in the same pass once the
    // server says it is no longer blocked, else the next pass runs it.
    for _ in 0..3 {
        let r = w.run_once(Duration::from_secs(60)).await;
        assert_eq!(r.code, 0, "{r:?}");
        if w.status(blocked).0 == "complete" {
            break;
        }
    }
    assert_eq!(w.status(blocker).0, "complete");
    assert_eq!(w.status(blocked).0, "complete");
    let events = w.env.run(&["describe", "task", &format!("tt-{blocked}")]);
    assert!(events.stdout.contains("Blocked"), "{}", events.stdout);
    assert_eq!(w.ran().len(), 2, "{:?}", w.ran());
}

/// The tinytask sync controller's context over a fresh store, with no controller running: the
/// test drives the polls itself and plays the other controllers' part, so that the interleaving
/// is fixed.
fn sync_ctx(store: Store, state_dir: PathBuf) -> std::sync::Arc<tinyscheduler::controllers::Ctx> {
    use tinyscheduler::controllers::{Ctx, Settings};
    use tinyscheduler::runtime::{Informer, InformerOptions, Metrics, Recorder};
    let opts = InformerOptions {
        resync: Duration::from_secs(3600),
        relist: Duration::from_secs(3600),
    };
    std::sync::Arc::new(Ctx {
        recorder: Recorder::new(store.clone(), "tinyscheduler"),
        tasks: Informer::new(store.clone(), opts.clone()),
        agents: Informer::new(store.clone(), opts.clone()),
        queues: Informer::new(store.clone(), opts.clone()),
        leases: Informer::new(store.clone(), opts),
        store,
        state_dir,
        settings: Settings::default(),
        summary: Default::default(),
        spawned: Default::default(),
        shim_waits: Default::default(),
        leases_seen: Default::default(),
        status_writes: Default::default(),
        metrics: Metrics::default(),
        runnable_since: Default::default(),
        tinytask: Default::default(),
    })
}

/// A change on the server seen by a poll while freshly mirrored blocked tasks were still Pending
/// (the assignment loop had not marked them Blocked yet) must still be listed once they are
/// Blocked: they never take a slot. Before, that poll counted them as filling the free slots,
/// skipped the list and kept the "list cut at the window" flag of the first poll; no later poll
/// listed (no server change, no slot freed), and `run --once --wait` waited forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_mirrors_not_yet_marked_blocked_do_not_keep_run_once_waiting() {
    use tinyscheduler::controllers::tinytask_sync;
    use tinyscheduler::resources::{
        Agent, AgentSpec, Queue, QueueSource, QueueSpec, Resource, TaskPhase,
    };

    let mut server = TinytaskServer::start().await;
    let blocker = server.insert("blocker", |t| {
        t.queue_name = Some("dev".into());
        t.assigned_to = Some("stranger".into());
        t.status = "working".into();
    });
    let blocked: Vec<i64> = (0..3)
        .map(|i| {
            server.insert(&format!("blocked {i}"), |t| {
                t.queue_name = Some("dev".into());
                t.blocked_by_task_id = Some(blocker);
            })
        })
        .collect();
    let runnable: Vec<i64> = (0..2)
        .map(|i| queued(&server, &format!("free {i}"), "dev"))
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let ctx = sync_ctx(store.clone(), dir.path().to_path_buf());
    let queue = Queue::new(
        "Queue",
        "dev",
        QueueSpec {
            source: QueueSource::Tinytask,
            endpoint: Some(server.url()),
            poll_interval_seconds: Some(1),
            ..Default::default()
        },
    );
    ctx.queues.observe(store.create(&queue).unwrap());
    let agent = Agent::new(
        "Agent",
        "alice",
        AgentSpec {
            queue: Some("dev".into()),
            max_concurrency: 2,
            command: vec!["true".into()],
            ..Default::default()
        },
    );
    ctx.agents.observe(store.create(&agent).unwrap());
    let poll = || async {
        // Polls of one queue are at least 100 ms apart.
        tokio::time::sleep(Duration::from_millis(150)).await;
        tinytask_sync::reconcile("tinytask/dev".into(), ctx.clone())
            .await
            .unwrap();
    };

    // First poll: the two runnable tasks fill the window (the list is cut there), and the blocked
    // ones are mirrored, still Pending.
    poll().await;
    let phase = |id: i64| ctx.tasks.get(&format!("tt-{id}")).map(|t| t.status.phase);
    for id in runnable.iter().chain(&blocked) {
        assert_eq!(phase(*id), Some(TaskPhase::Pending), "tt-{id}");
    }
    assert!(tinytask_sync::has_more_work(&ctx), "the first list was cut");

    // The runnable ones run and complete (on the server too) before the assignment loop gets to
    // the blocked mirrors; a poll sees the server's change while they are still Pending.
    for id in &runnable {
        ctx.patch_task(&format!("tt-{id}"), |t| {
            t.status.phase = TaskPhase::Succeeded
        })
        .unwrap();
        server.mutate_task(*id, |t| {
            t.assigned_to = Some("alice".into());
            t.status = "complete".into();
        });
    }
    poll().await;

    // Now they are Blocked: nothing changes on the server and no slot is freed any more.
    for id in &blocked {
        ctx.patch_task(&format!("tt-{id}"), |t| t.status.phase = TaskPhase::Blocked)
            .unwrap();
    }
    poll().await;
    poll().await;
    assert!(
        !tinytask_sync::has_more_work(&ctx),
        "the server holds no runnable task: {:?}\n{:#?}",
        tinytask_sync::sources_with_more_work(&ctx),
        server.requests()
    );
    assert!(ctx
        .tasks
        .list()
        .iter()
        .all(|t| t.name() != format!("tt-{blocker}")));
    server.stop().await;
}

/// tinytask answers every failure but "not found" with 400, a locked database included: a
/// write-back refused with 400 is retried, never dropped with the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_back_refused_with_400_is_retried_and_the_result_reaches_the_server() {
    let w = World::new().await;
    let id = queued(&w.server, "once", "dev");
    w.tinytask_queue("dev", json!({}));
    w.agent("alice", Some("dev"), 1, RECORD);
    w.server
        .fail_matching("PATCH", &format!("/api/v1/tasks/{id}"), "complete", 400);
    for _ in 0..3 {
        w.run_once(Duration::from_secs(60)).await;
        if w.status(id).0 == "complete" {
            break;
        }
    }
    assert_eq!(w.status(id).0, "complete", "{}", w.request_log());
    assert_eq!(w.ran().len(), 1, "it ran once: {:?}", w.ran());
    assert!(!w.events().contains("WriteBackDropped"), "{}", w.events());
    let refused = w
        .server
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH" && r.body.contains("complete"))
        .count();
    assert!(
        refused >= 2,
        "the refused PATCH was sent again: {}",
        w.request_log()
    );
}

/// `run --daemon` against the fake server; killed when dropped.
fn daemon(w: &World, env: &[(&str, &str)]) -> tokio::process::Child {
    let mut cmd = w.cmd(&["run", "--daemon"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the daemon")
}

/// A blocker completed in another queue changes nothing in this queue's stats: the periodic list
/// (every resync period) still sees the task unblocked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_blocked_by_a_task_of_another_queue_runs_once_that_one_is_complete() {
    let w = World::new().await;
    let blocker = queued(&w.server, "elsewhere", "other");
    let blocked = w.server.insert("waits", |t| {
        t.queue_name = Some("dev".into());
        t.blocked_by_task_id = Some(blocker);
    });
    w.tinytask_queue("dev", json!({}));
    w.agent("alice", Some("dev"), 1, RECORD);
    let mut d = daemon(&w, &[("TINYSCHEDULER_LOOP_INTERVAL_SEC", "2")]);
    let name = format!("tt-{blocked}");
    wait_until(
        "the blocked task to be mirrored as Blocked",
        Duration::from_secs(30),
        || {
            w.task_json(&name)
                .is_some_and(|t| t["status"]["phase"] == "Blocked")
        },
    )
    .await;
    w.server
        .mutate_task(blocker, |t| t.status = "complete".into());
    wait_until(
        "the unblocked task to complete",
        Duration::from_secs(60),
        || w.status(blocked).0 == "complete",
    )
    .await;
    d.kill().await.ok();
    assert_eq!(w.ran(), [(name, "alice".to_string())]);
}

/// Archived is tinytask's delete, and a task moved to another queue is no longer this queue's:
/// neither is claimed again for a retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archived_or_moved_task_is_not_claimed_again() {
    let w = World::new().await;
    let archived = queued(&w.server, "archived later", "dev");
    let moved = queued(&w.server, "moved later", "dev");
    w.tinytask_queue("dev", json!({}));
    w.agent("alice", Some("dev"), 2, &format!("{RECORD}; exit 1"));
    // Three seconds between attempts: time to change the tasks on the server.
    let mut d = daemon(
        &w,
        &[
            ("TINYSCHEDULER_RETRY_BASE_SEC", "3"),
            ("TINYSCHEDULER_RETRY_MAX_SEC", "3"),
        ],
    );
    wait_until("both first attempts", Duration::from_secs(30), || {
        w.ran().len() == 2
    })
    .await;
    w.server.mutate_task(archived, |t| {
        t.archived_at = Some("2026-12-02T00:00:00Z".into())
    });
    w.server
        .mutate_task(moved, |t| t.queue_name = Some("qa".into()));
    wait_until("both claims refused", Duration::from_secs(30), || {
        w.events().matches("ClaimRefused").count() >= 2
    })
    .await;
    d.kill().await.ok();
    assert_eq!(w.ran().len(), 2, "no second attempt ran: {:?}", w.ran());
    let events = w.events();
    assert!(events.contains("archived on the server"), "{events}");
    assert!(events.contains("moved from queue dev to qa"), "{events}");
    for id in [archived, moved] {
        assert_ne!(w.status(id).0, "complete", "{id}");
    }
}

/// Queue `dev` and agent `alice` (one slot, a one-second heartbeat: its Lease lasts three
/// seconds), recording its runs, and the daemon; once task `id` is mirrored, its mirror gets no
/// retries, so that an attempt reclaimed as never started is its last. Returns the daemon.
async fn one_attempt_on_a_short_lease(w: &World, id: i64) -> tokio::process::Child {
    w.tinytask_queue("dev", json!({}));
    w.apply(
        "agent-alice",
        json!({"apiVersion": "tinyscheduler.io/v1alpha1", "kind": "Agent", "metadata": {"name": "alice"},
               "spec": {"queue": "dev", "maxConcurrency": 1, "heartbeatSeconds": 1,
                        "command": ["sh", "-c", RECORD], "env": {"RAN": w.ran_file().display().to_string()}}}),
    );
    let d = daemon(w, &[]);
    let name = format!("tt-{id}");
    wait_until("the mirror", Duration::from_secs(30), || {
        w.task_json(&name).is_some()
    })
    .await;
    let store = Store::open(w.env.state()).unwrap();
    // The daemon writes the Task's status meanwhile.
    support::update_retrying::<tinyscheduler::resources::Task>(&store, &name, |t| {
        t.spec.max_retries = 0
    });
    d
}

/// Waits up to `timeout` for task `id` to be complete on the server, stops the daemon `d`, and
/// checks that the task ran once.
async fn completes_once(w: &World, id: i64, mut d: tokio::process::Child, timeout: Duration) {
    wait_until("the task to complete on the server", timeout, || {
        w.status(id).0 == "complete"
    })
    .await;
    d.kill().await.ok();
    assert_eq!(w.ran().len(), 1, "it ran once: {:?}", w.ran());
}

/// A claim slower than the Lease's duration finds the run reclaimed as "never started": the task
/// goes back to the server as it was, not left working with nobody to run it, and runs later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_slower_than_the_lease_gives_the_task_back_and_it_runs_later() {
    let w = World::new().await;
    // The assignment's answer comes after the Lease's three seconds.
    claim_step_answered_late(&w, "assigned_to", Duration::from_secs(5)).await;
}

/// Runs one task whose claim PATCH with `body` in it is answered `delay` late, after its Lease's
/// duration, with no retry for the reclaimed attempt: only the claim's giving the task back lets
/// it run at all. Checks that it ran once, given back by the claim; returns the events.
async fn claim_step_answered_late(w: &World, body: &str, delay: Duration) -> String {
    let id = queued(&w.server, "slow claim", "dev");
    w.server
        .delay_matching("PATCH", &format!("/api/v1/tasks/{id}"), body, delay);
    let d = one_attempt_on_a_short_lease(w, id).await;
    completes_once(w, id, d, Duration::from_secs(60)).await;
    let events = w.events();
    assert!(
        events.contains("reclaimed while the claim was under way"),
        "{events}"
    );
    events
}

/// A claim whose last step (the `working` PATCH) is answered after the Lease's duration finds its
/// run reclaimed as "never started" only once that step landed: the release the reclaim queued
/// ran while the task was still idle, so only the claim itself can give the task back. It must,
/// rather than leave it working for an agent that runs nothing; the task then runs later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_cannot_be_given_back_at_once_is_released_later() {
    let w = World::new().await;
    let id = queued(&w.server, "slow working", "dev");
    // `status: working` lands after the Lease's three seconds, and every PATCH that would put the
    // task back to idle fails until the test says otherwise: the give-back cannot land at once.
    let path = format!("/api/v1/tasks/{id}");
    w.server
        .delay_matching("PATCH", &path, "working", Duration::from_secs(6));
    w.server
        .fail_every_matching("PATCH", &path, "\"status\":\"idle\"", 500);
    let d = one_attempt_on_a_short_lease(&w, id).await;
    wait_until("the claim to be refused", Duration::from_secs(60), || {
        w.events()
            .contains("reclaimed while the claim was under way")
    })
    .await;
    assert_eq!(w.status(id).0, "working", "the give-back could not land");
    // The release queued in its place lands once the server takes it; the task runs once.
    w.server.stop_failing();
    completes_once(&w, id, d, Duration::from_secs(90)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_working_patch_lands_after_the_reclaim_gives_the_task_back() {
    let w = World::new().await;
    // The assignment is answered at once; `status: working` after the Lease's three seconds. The
    // reclaimed attempt's outcome is the release that finds the task idle.
    let events = claim_step_answered_late(&w, "working", Duration::from_secs(6)).await;
    // One claim held a run: the one given back announced none.
    assert_eq!(
        events.matches("Claimed claimed tinytask task").count(),
        1,
        "{events}"
    );
}

/// The delays (in seconds) of the `ClaimPostponed` Events whose message contains `what`.
fn postponed_delays(w: &World, what: &str) -> Vec<u64> {
    let events: Vec<Event> = w
        .store()
        .list::<Event>(None)
        .map(|l| l.items)
        .unwrap_or_default();
    events
        .iter()
        .filter(|e| e.spec.reason == "ClaimPostponed" && e.spec.message.contains(what))
        .filter_map(|e| {
            let (_, rest) = e.spec.message.rsplit_once("trying again in ")?;
            rest.trim_end_matches('s').parse().ok()
        })
        .collect()
}

/// When a blocker succeeds here, its dependant must not be claimed before the blocker's result
/// reached the server: the server would still call it blocked, the claim would be refused and the
/// mirror dropped (a spurious `ClaimRefused` on every chain).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependant_waits_for_its_blockers_result_to_reach_the_server() {
    let w = World::new().await;
    let first = queued(&w.server, "first", "dev");
    let second = w.server.insert("second", |t| {
        t.queue_name = Some("dev".into());
        t.blocked_by_task_id = Some(first);
    });
    w.tinytask_queue("dev", json!({}));
    w.agent("alice", Some("dev"), 2, RECORD);
    // The blocker's completion takes a while to reach the server.
    w.server.delay_matching(
        "PATCH",
        &format!("/api/v1/tasks/{first}"),
        "complete",
        Duration::from_secs(3),
    );
    let mut d = daemon(&w, &[]);
    wait_until("the dependant to complete", Duration::from_secs(60), || {
        w.status(second).0 == "complete"
    })
    .await;
    d.kill().await.ok();
    assert_eq!(w.status(first).0, "complete");
    let events = w.events();
    assert!(!events.contains("ClaimRefused"), "{events}");
    assert_eq!(
        w.ran(),
        [
            (format!("tt-{first}"), "alice".to_string()),
            (format!("tt-{second}"), "alice".to_string())
        ]
    );
}

/// A blocker that succeeded here but is not complete on the server (someone took it over while it
/// ran, so its result was only a comment): the dependant's claims are refused as blocked. The
/// mirror is kept and its claims back off, instead of being dropped and mirrored again at once,
/// round after round; once the server's blocker is complete, it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependant_the_server_still_calls_blocked_backs_off_and_keeps_its_mirror() {
    let w = World::new().await;
    let first = queued(&w.server, "first", "dev");
    let second = w.server.insert("second", |t| {
        t.queue_name = Some("dev".into());
        t.blocked_by_task_id = Some(first);
    });
    w.tinytask_queue("dev", json!({}));
    let gate = w.env.tmp.path().join("gate");
    w.agent(
        "alice",
        Some("dev"),
        2,
        &format!(
            "if [ \"$TINYSCHEDULER_TASK\" = tt-{first} ]; then while [ ! -e {} ] && [ -d {} ]; do sleep 0.05; done; fi; {RECORD}",
            gate.display(),
            w.env.tmp.path().display()
        ),
    );
    let mut d = daemon(&w, &[]);
    let name = format!("tt-{second}");
    wait_until("the blocker's claim", Duration::from_secs(30), || {
        w.status(first) == ("working".into(), Some("alice".into()))
    })
    .await;
    let uid = w
        .task_json(&name)
        .expect("the dependant is mirrored")
        .pointer("/metadata/uid")
        .cloned()
        .expect("a uid");
    // Taken over on the server while it runs: our result is only a comment.
    w.server
        .mutate_task(first, |t| t.assigned_to = Some("stranger".into()));
    std::fs::write(&gate, "").unwrap();
    let path = format!("/api/v1/tasks/{second}");
    let reads = || {
        w.server
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path == path)
            .count()
    };
    wait_until(
        "three claims of the dependant",
        Duration::from_secs(60),
        || reads() >= 3,
    )
    .await;
    let mirror = w.task_json(&name);
    assert_eq!(
        mirror.as_ref().and_then(|m| m.pointer("/metadata/uid")),
        Some(&uid),
        "the mirror is kept: {mirror:?}\n{}",
        w.events()
    );
    assert!(!w.events().contains("ClaimRefused"), "{}", w.events());
    wait_until("three postponements", Duration::from_secs(60), || {
        postponed_delays(&w, "blocked by task").len() >= 3
    })
    .await;
    // Each claim waits longer than the one before (Events have one-second timestamps, so their
    // order is not told apart: three different delays show it).
    let delays: std::collections::BTreeSet<u64> = postponed_delays(&w, "blocked by task")
        .into_iter()
        .collect();
    assert!(delays.len() >= 3, "the claims back off: {delays:?}");
    assert!(
        !w.events().contains("its Lease was deleted"),
        "no attempt counted: {}",
        w.store_dump()
    );
    assert_eq!(w.status(first), ("working".into(), Some("stranger".into())));

    w.server
        .mutate_task(first, |t| t.status = "complete".into());
    wait_until("the dependant to complete", Duration::from_secs(90), || {
        w.status(second).0 == "complete"
    })
    .await;
    d.kill().await.ok();
    assert_eq!(
        w.ran().iter().filter(|(t, _)| *t == name).count(),
        1,
        "{:?}",
        w.ran()
    );
}

/// A server that answers, but refuses the claim's PATCH with 500 every time: each claim waits
/// longer than the one before (not the poll interval, for ever), and the queue's source stays
/// reachable (no `SourceUnreachable`, `/readyz` ready, `source_up` 1): every poll succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_refused_with_500_back_off_per_task_and_the_source_stays_reachable() {
    let w = World::new().await;
    let id = queued(&w.server, "refused", "dev");
    w.tinytask_queue("dev", json!({}));
    w.agent("alice", Some("dev"), 1, RECORD);
    let path = format!("/api/v1/tasks/{id}");
    w.server
        .fail_every_matching("PATCH", &path, "assigned_to", 500);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let http = format!("127.0.0.1:{port}");
    let mut child = w
        .cmd(&["run", "--daemon", "--http", &http])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until("three postponed claims", Duration::from_secs(90), || {
        postponed_delays(&w, "HTTP 500")
            .into_iter()
            .collect::<std::collections::BTreeSet<u64>>()
            .len()
            >= 3
            || w.events().contains("SourceUnreachable")
    })
    .await;
    let events = w.events();
    assert!(!events.contains("SourceUnreachable"), "{events}");
    let ready = reqwest::get(format!("http://{http}/readyz")).await.unwrap();
    assert_eq!(ready.status().as_u16(), 200, "{:?}", ready.text().await);
    let metrics = reqwest::get(format!("http://{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tinyscheduler_tinytask_source_up{queue=\"dev\"} 1"),
        "{metrics}"
    );
    let mirror = w.task_json(&format!("tt-{id}")).unwrap();
    assert_eq!(
        mirror["status"]["attempts"], 0,
        "no attempt counted: {mirror}"
    );

    w.server.stop_failing();
    wait_until("the task to complete", Duration::from_secs(60), || {
        w.status(id).0 == "complete"
    })
    .await;
    let _ = child.start_kill();
    let _ = child.wait().await;
    assert_eq!(w.ran().len(), 1, "{:?}", w.ran());
}

/// Blocked tasks assigned to our agent must not fill the window that its runnable ones are read
/// through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_tasks_assigned_to_an_agent_do_not_hide_its_runnable_one() {
    let w = World::new().await;
    let blocker = queued(&w.server, "never done", "elsewhere");
    for i in 0..20 {
        w.server.insert(&format!("blocked {i}"), |t| {
            t.queue_name = Some("dev".into());
            t.assigned_to = Some("alice".into());
            t.priority = 10.0;
            t.blocked_by_task_id = Some(blocker);
        });
    }
    let runnable = w.server.insert("runnable", |t| {
        t.queue_name = Some("dev".into());
        t.assigned_to = Some("alice".into());
    });
    w.tinytask_queue("dev", json!({}));
    w.agent("alice", Some("dev"), 1, RECORD);
    let mut d = daemon(&w, &[]);
    wait_until(
        "the runnable task to complete",
        Duration::from_secs(60),
        || w.status(runnable).0 == "complete",
    )
    .await;
    d.kill().await.ok();
    assert_eq!(w.ran(), [(format!("tt-{runnable}"), "alice".to_string())]);
}

/// A task taken over on the server while our run went on is not marked complete over the new
/// assignee's work; a comment says our run finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_reassigned_on_the_server_while_it_ran_is_not_completed_over_the_new_assignee() {
    let w = World::new().await;
    let id = queued(&w.server, "taken over", "dev");
    w.tinytask_queue("dev", json!({}));
    let gate = w.env.tmp.path().join("gate");
    w.agent(
        "alice",
        Some("dev"),
        1,
        &format!(
            "while [ ! -e {} ] && [ -d {} ]; do sleep 0.05; done; {RECORD}",
            gate.display(),
            w.env.tmp.path().display()
        ),
    );
    let mut d = daemon(&w, &[]);
    wait_until("the claim", Duration::from_secs(30), || {
        w.status(id) == ("working".into(), Some("alice".into()))
    })
    .await;
    w.server
        .mutate_task(id, |t| t.assigned_to = Some("bob".into()));
    std::fs::write(&gate, "").unwrap();
    wait_until("our run's comment", Duration::from_secs(30), || {
        w.server
            .comments(id)
            .iter()
            .any(|c| c.content.contains("assigned to bob now"))
    })
    .await;
    d.kill().await.ok();
    assert_eq!(w.ran().len(), 1);
    assert_eq!(w.status(id), ("working".into(), Some("bob".into())));
}

/// A daemon whose Queue dev (no agents) holds "second", blocked by "first": only the blocked task
/// is mirrored, and waits. Returns (blocker id, blocked id, the mirror's name, the daemon).
async fn one_blocked_mirror(w: &World) -> (i64, i64, String, tokio::process::Child) {
    let blocker = queued(&w.server, "first", "dev");
    let blocked = w.server.insert("second", |t| {
        t.queue_name = Some("dev".into());
        t.blocked_by_task_id = Some(blocker);
    });
    w.tinytask_queue("dev", json!({}));
    let name = format!("tt-{blocked}");
    let d = daemon(w, &[]);
    wait_until(
        "the blocked task to be mirrored",
        Duration::from_secs(30),
        || {
            w.task_json(&name)
                .is_some_and(|t| t["status"]["phase"] == "Blocked")
        },
    )
    .await;
    (blocker, blocked, name, d)
}

/// Task ids repeat across servers and mirror names (`tt-<id>`) do not tell servers apart: a task
/// of a second server with the id of a waiting mirror must not take that mirror over, which would
/// move it to the other Queue and send its result to the wrong server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_of_another_server_with_a_mirrored_id_leaves_that_mirror_alone() {
    let w = World::new().await;
    let other = TinytaskServer::start().await;
    // The first server: "second" waits for "first".
    let (blocker, blocked, name, mut d) = one_blocked_mirror(&w).await;

    // The second server has runnable tasks with the same ids.
    let free_id = queued(&other, "elsewhere-1", "ops");
    let same_id = queued(&other, "elsewhere-2", "ops");
    assert_eq!((free_id, same_id), (blocker, blocked));
    w.tinytask_queue("ops", json!({"endpoint": other.url()}));
    w.agent("bob", Some("ops"), 2, RECORD);
    wait_until(
        "the other server's free id to run",
        Duration::from_secs(60),
        || other.task(free_id).is_some_and(|t| t.status == "complete"),
    )
    .await;
    // A later poll of ops lists the other task again (with it, the old code took the mirror over).
    let taken_over = || {
        w.task_json(&name)
            .is_none_or(|t| t["spec"]["queue"] != "dev" || t["metadata"]["generation"] != 1)
    };
    wait_until(
        "the collision to be reported, or the mirror taken over",
        Duration::from_secs(30),
        || w.events().contains("NameCollision") || taken_over(),
    )
    .await;
    let mirror = w.task_json(&name).expect("the mirror is still there");
    assert_eq!(mirror["spec"]["queue"], "dev", "{mirror}");
    assert_eq!(mirror["spec"]["params"]["title"], "second", "{mirror}");
    assert_eq!(mirror["status"]["attempts"], 0, "{mirror}");
    // Not even for a moment: its spec never changed (each change bumps the generation).
    assert_eq!(mirror["metadata"]["generation"], 1, "{mirror}");
    d.kill().await.ok();
    let untouched = other.task(same_id).unwrap();
    assert_eq!(
        (untouched.status.as_str(), untouched.assigned_to.as_deref()),
        ("idle", None)
    );
    assert_eq!(w.status(blocked), ("idle".to_string(), None));
    assert_eq!(w.ran(), [(format!("tt-{free_id}"), "bob".to_string())]);
}

/// Deleting a running mirror stops its run, and the server's task, which the scheduler had set
/// `working`, is released with a comment rather than left working for an agent that no longer
/// runs it; the next poll mirrors it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_deleted_while_it_runs_has_its_task_released_on_the_server() {
    deleted_while_running(false).await;
}

/// The same with the server down when the mirror is deleted: the release waits in the Queue's
/// status (the Task that would hold it is gone) until the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_release_of_a_mirror_deleted_during_an_outage_waits_in_its_queue() {
    deleted_while_running(true).await;
}

async fn deleted_while_running(outage: bool) {
    let mut w = World::new().await;
    let id = queued(&w.server, "long", "dev");
    w.tinytask_queue("dev", json!({}));
    let first = w.env.tmp.path().join("first");
    let script = format!(
        "{RECORD}\nif [ ! -e {f} ]; then echo $$ > {f}; exec sleep 300; fi",
        f = first.display()
    );
    w.agent("alice", Some("dev"), 1, &script);
    let mut d = daemon(&w, &[]);
    let name = format!("tt-{id}");
    wait_until("the first run to start", Duration::from_secs(30), || {
        w.running() == 1 && std::fs::read_to_string(&first).is_ok_and(|s| s.ends_with('\n'))
    })
    .await;
    assert_eq!(w.status(id), ("working".to_string(), Some("alice".into())));
    let pid: i32 = std::fs::read_to_string(&first)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let queue = |w: &World| {
        w.store()
            .get::<tinyscheduler::resources::Queue>("dev")
            .unwrap()
    };

    if outage {
        w.server.stop().await;
    }
    let r = w.env.run(&["delete", "task", &name]);
    assert_eq!(r.code, 0, "{r:?}");
    if outage {
        // Queued on the Queue first, then the Lease is deleted.
        let url = w.server.url();
        wait_until(
            "the release to be queued on the Queue and the Lease deleted",
            Duration::from_secs(60),
            || {
                queue(&w)
                    .status
                    .write_backs
                    .iter()
                    .any(|o| o.task_id == id && o.endpoint == url)
                    && w.store().try_get::<Lease>(&name).unwrap().is_none()
            },
        )
        .await;
        assert_eq!(w.status(id), ("working".to_string(), Some("alice".into())));
        w.server.restart().await;
    }
    wait_until(
        "the server's task to be released",
        Duration::from_secs(60),
        || {
            w.server
                .comments(id)
                .iter()
                .any(|c| c.content.contains(&format!("task/{name} was deleted")))
        },
    )
    .await;
    wait_until(
        "the task, mirrored again, to complete",
        Duration::from_secs(60),
        || w.status(id).0 == "complete",
    )
    .await;
    d.kill().await.ok();
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the deleted mirror's agent was killed"
    );
    assert_eq!(
        w.ran(),
        [
            (name.clone(), "alice".to_string()),
            (name, "alice".to_string())
        ]
    );
    let q = queue(&w);
    assert!(q.status.write_backs.is_empty(), "{:?}", q.status);
}

/// A mirror deleted while it waits to run again holds the claim of its failed attempt: the
/// server shows the task `working` for our agent, and no poll lists a working task. Deleting it
/// releases the task on the server, so it is mirrored again and runs, instead of being lost. With
/// `timer`, no daemon runs when it is deleted: the next `run --once` sends the release.
async fn deleted_while_waiting_to_retry(timer: bool) {
    let w = World::new().await;
    let id = queued(&w.server, "flaky", "dev");
    w.tinytask_queue("dev", json!({}));
    // The first run fails; every later one succeeds.
    let script = format!("{RECORD}\n[ \"$(wc -l < \"$RAN\")\" -gt 1 ] || exit 3");
    w.agent("alice", Some("dev"), 1, &script);
    // World::cmd caps retry delays at 0.5 s: this retry must wait for the delete.
    let slow_retry = [
        ("TINYSCHEDULER_RETRY_BASE_SEC", "300"),
        ("TINYSCHEDULER_RETRY_MAX_SEC", "600"),
    ];
    let mut d = daemon(&w, &slow_retry);
    let name = format!("tt-{id}");
    wait_until("the first attempt to fail", Duration::from_secs(60), || {
        w.task_json(&name)
            .is_some_and(|t| t["status"]["reason"] == "Retrying" && t["status"]["attempts"] == 1)
            && w.server
                .comments(id)
                .iter()
                .any(|c| c.content.contains("attempt 1"))
    })
    .await;
    assert_eq!(w.status(id), ("working".to_string(), Some("alice".into())));
    if timer {
        d.kill().await.ok();
    }
    let r = w.env.run(&["delete", "task", &name]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stderr, "", "{r:?}");
    if timer {
        let r = w.run_once(Duration::from_secs(60)).await;
        assert_eq!(r.code, 0, "{r:?}");
    }
    wait_until(
        "the task, released and mirrored again, to complete",
        Duration::from_secs(60),
        || w.status(id).0 == "complete",
    )
    .await;
    d.kill().await.ok();
    assert!(
        w.server
            .comments(id)
            .iter()
            .any(|c| c.content.contains(&format!(
                "task/{name} was deleted from the scheduler with no run of it holding its claim"
            ))),
        "{:#?}",
        w.server.comments(id)
    );
    assert_eq!(w.ran().len(), 2, "{:?}", w.ran());
    let q = w
        .store()
        .get::<tinyscheduler::resources::Queue>("dev")
        .unwrap();
    assert!(q.status.write_backs.is_empty(), "{:?}", q.status);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_deleted_while_it_waits_to_retry_has_its_task_released_on_the_server() {
    deleted_while_waiting_to_retry(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_deleted_between_timer_runs_has_its_task_released_by_the_next_run() {
    deleted_while_waiting_to_retry(true).await;
}

/// A retry's claim refused while the server still shows the task working for the failed
/// attempt's agent (here: moved to another queue meanwhile) gives that claim back: dropping the
/// mirror alone would leave the task working for good, in a queue where nobody runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_retry_gives_back_the_claim_of_the_attempt_before() {
    let w = World::new().await;
    let id = queued(&w.server, "moves", "dev");
    w.tinytask_queue("dev", json!({}));
    // The first attempt fails once the test has moved the task; its retry's claim sees the move.
    let gate = w.env.tmp.path().join("gate");
    let script = format!(
        "{RECORD}\nwhile [ ! -e {} ] && [ -d {} ]; do sleep 0.05; done; exit 3",
        gate.display(),
        w.env.tmp.path().display()
    );
    w.agent("alice", Some("dev"), 1, &script);
    let mut d = daemon(&w, &[]);
    let name = format!("tt-{id}");
    wait_until("the first attempt to run", Duration::from_secs(60), || {
        w.running() == 1
    })
    .await;
    assert_eq!(w.status(id), ("working".to_string(), Some("alice".into())));
    w.server
        .mutate_task(id, |t| t.queue_name = Some("elsewhere".into()));
    std::fs::write(&gate, "").unwrap();
    wait_until(
        "the claim to be given back",
        Duration::from_secs(60),
        || w.status(id) == ("idle".to_string(), None),
    )
    .await;
    d.kill().await.ok();
    assert!(w.events().contains("ClaimRefused"), "{}", w.events());
    let last = w.server.comments(id).pop().unwrap().content;
    assert!(
        last.contains(&format!(
            "task/{name} was not run again: it moved from queue dev to elsewhere"
        )),
        "{last}"
    );
    assert_eq!(w.ran().len(), 1, "{:?}", w.ran());
    assert!(w.task_json(&name).is_none(), "the mirror is dropped");
}

/// A retry whose claim for bob was recorded but never reached the server finds the task still
/// working for alice, the agent of the attempt before: not bob's to claim, but ours to give back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_retry_gives_back_a_claim_another_of_our_agents_holds() {
    let w = World::new().await;
    let id = queued(&w.server, "held by alice", "dev");
    w.server.mutate_task(id, |t| {
        t.status = "working".into();
        t.assigned_to = Some("alice".into());
    });
    w.tinytask_queue("dev", json!({}));
    w.agent("alice", Some("dev"), 1, RECORD);
    w.agent("bob", Some("dev"), 1, RECORD);
    let name = hand_made_mirror(
        &w,
        id,
        "dev",
        "bob",
        |_| {},
        |status| {
            status.phase = tinyscheduler::resources::TaskPhase::Pending;
        },
    );
    let r = w.run_once(Duration::from_secs(60)).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(w.status(id).0, "complete");
    assert_eq!(w.ran().len(), 1, "{:?}", w.ran());
    assert!(
        w.server
            .comments(id)
            .iter()
            .any(|c| c.content.contains(&format!(
                "task/{name} was not run again: it is being worked on by alice"
            ))),
        "{:#?}",
        w.server.comments(id)
    );
}

/// A finished mirror deleted by hand before its result reached the server (down meanwhile): the
/// result goes to its Queue and is written once the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_mirror_deleted_before_its_result_was_sent_still_completes_its_task() {
    let mut w = World::new().await;
    let id = queued(&w.server, "quick", "dev");
    w.tinytask_queue("dev", json!({}));
    let go = w.env.tmp.path().join("go");
    let script = format!(
        "{RECORD}\nwhile [ ! -e {} ] && [ -d {} ]; do sleep 0.05; done",
        go.display(),
        w.env.tmp.path().display()
    );
    w.agent("alice", Some("dev"), 1, &script);
    let mut d = daemon(&w, &[]);
    let name = format!("tt-{id}");
    wait_until("the run to start", Duration::from_secs(60), || {
        w.running() == 1
    })
    .await;
    w.server.stop().await;
    std::fs::write(&go, "").unwrap();
    wait_until(
        "the success to wait for the server",
        Duration::from_secs(60),
        || {
            w.task_json(&name).is_some_and(|t| {
                t["status"]["phase"] == "Succeeded"
                    && t["status"]["writeBacks"][0]["op"] == "complete"
            })
        },
    )
    .await;
    let r = w.env.run(&["delete", "task", &name]);
    assert_eq!(r.code, 0, "{r:?}");
    let q = w
        .store()
        .get::<tinyscheduler::resources::Queue>("dev")
        .unwrap();
    assert_eq!(q.status.write_backs.len(), 1, "{:?}", q.status);
    assert_eq!(q.status.write_backs[0].task_id, id);
    w.server.restart().await;
    wait_until("the task to complete", Duration::from_secs(60), || {
        w.status(id).0 == "complete"
    })
    .await;
    d.kill().await.ok();
    assert_eq!(w.ran().len(), 1, "{:?}", w.ran());
}

/// A mirror of tinytask task `id` in Queue `queue`, written straight into the store as a
/// scheduler would have left it after its first attempt held a claim for `agent`: `status` then
/// sets the rest of its status. Returns its name.
fn hand_made_mirror(
    w: &World,
    id: i64,
    queue: &str,
    agent: &str,
    spec: impl FnOnce(&mut tinyscheduler::resources::TaskSpec),
    status: impl FnOnce(&mut tinyscheduler::resources::TaskStatus),
) -> String {
    let name = format!("tt-{id}");
    let store = Store::open(w.env.state()).unwrap();
    let mut t = Task::new("Task", &name, Default::default());
    t.spec.queue = Some(queue.into());
    spec(&mut t.spec);
    t.metadata.annotations.insert(
        tinyscheduler::resources::task::TINYTASK_ID_ANNOTATION.into(),
        id.to_string(),
    );
    let mut t = store.create(&t).unwrap();
    t.status.attempts = 1;
    t.status.remote_assignee = Some(agent.into());
    status(&mut t.status);
    store.update_status(&t).unwrap();
    name
}

/// Timer mode: a pass left a mirror's last attempt Assigned and exited; its Lease is deleted by
/// hand, and the shim, finding it gone, ends the agent before any scheduler looks. The next pass
/// finds no agent and no Lease, but the run's log says the shim ended a started agent: the task
/// failed for good (tagged), not "never started" (released, to run again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_its_shim_ended_for_a_deleted_lease_counts_as_started_in_the_next_pass() {
    let w = World::new().await;
    let id = queued(&w.server, "ended", "dev");
    w.server.mutate_task(id, |t| {
        t.status = "working".into();
        t.assigned_to = Some("alice".into());
    });
    w.tinytask_queue("dev", json!({}));
    w.agent("alice", Some("dev"), 1, RECORD);
    let name = hand_made_mirror(
        &w,
        id,
        "dev",
        "alice",
        |spec| spec.max_retries = 0,
        |status| {
            status.phase = tinyscheduler::resources::TaskPhase::Assigned;
            status.agent = Some("alice".into());
            status.lease = Some(format!("tt-{id}"));
        },
    );
    let logs = w.env.state().join("logs").join(&name);
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::write(
        logs.join("1.log"),
        format!(
            "working\n[tinyscheduler] lease/{name} was deleted: terminating the agent\n\
             [tinyscheduler] exited with signal 15 (SIGTERM)\n"
        ),
    )
    .unwrap();
    let r = w.run_once(Duration::from_secs(60)).await;
    assert_eq!(r.code, 0, "{r:?}");
    let t = w.server.task(id).unwrap();
    assert_eq!(
        (t.status.as_str(), t.assigned_to.as_deref()),
        ("idle", None)
    );
    assert!(
        t.tags
            .unwrap_or_default()
            .iter()
            .any(|t| t == "tinyscheduler-failed"),
        "tagged failed"
    );
    let last = w.server.comments(id).pop().unwrap().content;
    assert!(last.contains("its Lease was deleted"), "{last}");
    assert!(!last.contains("never started"), "{last}");
    assert!(w.ran().is_empty(), "{:?}", w.ran());
}

/// A mirror deleted while its claim had not landed (the server never set the task working): the
/// release it queued finds the task idle and leaves its assignee alone, which here pins it to bob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_leaves_a_task_that_is_not_working_with_its_assignee() {
    let w = World::new().await;
    let id = w.server.insert("pinned", |t| {
        t.queue_name = Some("dev".into());
        t.assigned_to = Some("bob".into());
    });
    w.tinytask_queue("dev", json!({}));
    w.agent("alice", Some("dev"), 1, RECORD);
    w.agent("bob", Some("dev"), 1, RECORD);
    // Waiting to run again, with the intent of a claim for bob that the server never got.
    let name = hand_made_mirror(
        &w,
        id,
        "dev",
        "bob",
        |_| {},
        |status| {
            status.phase = tinyscheduler::resources::TaskPhase::Pending;
            status.next_attempt_after = Some("2099-01-01T00:00:00Z".into());
        },
    );
    let r = w.env.run(&["delete", "task", &name]);
    assert_eq!(r.code, 0, "{r:?}");
    let r = w.run_once(Duration::from_secs(60)).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(w.ran(), [(name.clone(), "bob".to_string())]);
    assert_eq!(w.status(id), ("complete".to_string(), Some("bob".into())));
    assert!(
        w.server.comments(id).iter().any(|c| c
            .content
            .contains("was deleted from the scheduler with no run of it holding its claim")),
        "{:#?}",
        w.server.comments(id)
    );
}

/// Timer mode: a running mirror's Lease is deleted by hand, then the mirror, before any scheduler
/// looks. No run of it holds its claim any more, so the delete gives the claim back: the task is
/// mirrored again and runs, instead of staying working for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_deleted_after_its_lease_has_its_task_released_by_the_next_run() {
    let w = World::new().await;
    let id = queued(&w.server, "twice deleted", "dev");
    w.tinytask_queue("dev", json!({}));
    let gate = w.env.tmp.path().join("gate");
    let script = format!(
        "{RECORD}\nwhile [ ! -e {} ] && [ -d {} ]; do sleep 0.05; done",
        gate.display(),
        w.env.tmp.path().display()
    );
    w.agent("alice", Some("dev"), 1, &script);
    let name = format!("tt-{id}");
    let out = w.cmd(&["run", "--once"]).output().await.unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_until("the run to start", Duration::from_secs(60), || {
        w.running() == 1
    })
    .await;
    assert_eq!(w.status(id), ("working".to_string(), Some("alice".into())));
    let r = w.env.run(&["delete", "lease", &name]);
    assert_eq!(r.code, 0, "{r:?}");
    let r = w.env.run(&["delete", "task", &name]);
    assert_eq!(r.code, 0, "{r:?}");
    std::fs::write(&gate, "").unwrap();
    let r = w.run_once(Duration::from_secs(60)).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(w.status(id).0, "complete");
    assert_eq!(w.ran().len(), 2, "{:?}", w.ran());
    assert!(
        w.server.comments(id).iter().any(|c| c
            .content
            .contains("was deleted from the scheduler with no run of it holding its claim")),
        "{:#?}",
        w.server.comments(id)
    );
}

/// A waiting mirror whose Queue is gone has nobody to send its release: deleting it says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_waiting_mirror_whose_queue_is_gone_warns_that_the_server_task_is_left() {
    let w = World::new().await;
    hand_made_mirror(
        &w,
        41,
        "gone",
        "alice",
        |_| {},
        |status| {
            status.phase = tinyscheduler::resources::TaskPhase::Pending;
        },
    );
    let r = w.env.run(&["delete", "task", "tt-41"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("\"tt-41\" deleted"), "{r:?}");
    assert_eq!(
        r.stderr.trim(),
        "warning: task/tt-41 mirrors tinytask task 41, whose results and claim its Queue would \
         send to the server, but its Queue \"gone\" is gone: the server's task is left as it is"
    );
    assert!(w.task_json("tt-41").is_none());
}

/// A Lease deleted by hand on a run's last attempt fails the task for good, as any failed last
/// attempt does: the run started, so the server's task is tagged failed, not released as a run
/// that never started (which would have it run again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_deleted_on_the_last_attempt_tags_the_task_failed_on_the_server() {
    let w = World::new().await;
    let id = queued(&w.server, "last", "dev");
    w.tinytask_queue("dev", json!({}));
    let script = format!(
        "{RECORD}\n[ \"$TINYSCHEDULER_ATTEMPT\" -lt 4 ] && exit 3\nwhile [ -d {} ]; do sleep 0.05; done",
        w.env.tmp.path().display()
    );
    w.agent("alice", Some("dev"), 1, &script);
    let mut d = daemon(&w, &[]);
    let name = format!("tt-{id}");
    wait_until("the last attempt to run", Duration::from_secs(60), || {
        w.ran().len() == 4 && w.running() == 1
    })
    .await;
    let r = w.env.run(&["delete", "lease", &name]);
    assert_eq!(r.code, 0, "{r:?}");
    let failed = |w: &World| {
        w.server
            .task(id)
            .and_then(|t| t.tags)
            .is_some_and(|tags| tags.iter().any(|t| t == "tinyscheduler-failed"))
    };
    wait_until(
        "the task to be tagged failed",
        Duration::from_secs(60),
        || failed(&w),
    )
    .await;
    d.kill().await.ok();
    assert_eq!(w.status(id), ("idle".to_string(), None));
    let last = w.server.comments(id).pop().unwrap().content;
    assert!(last.contains("its Lease was deleted"), "{last}");
    assert!(!last.contains("never started"), "{last}");
    assert_eq!(w.ran().len(), 4, "{:?}", w.ran());
}

/// A crash between queueing a deleted mirror's release on its Queue and deleting its Lease gets
/// that run recorded, and released, twice. By the second flush the task may be mirrored and
/// running here again: the stale release must not take it from under the new run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_release_of_a_deleted_mirror_does_not_take_the_task_from_its_new_run() {
    let w = World::new().await;
    let id = queued(&w.server, "long", "dev");
    w.tinytask_queue("dev", json!({}));
    let gate = w.env.tmp.path().join("gate");
    // Agents outlive the daemon: one left by a failing test ends with the test's directory.
    let script = format!(
        "{RECORD}\nwhile [ ! -e {g} ] && [ -d {d} ]; do sleep 0.05; done",
        g = gate.display(),
        d = w.env.tmp.path().display()
    );
    w.agent("alice", Some("dev"), 1, &script);
    let mut d = daemon(&w, &[]);
    wait_until("the run to start", Duration::from_secs(30), || {
        w.running() == 1
    })
    .await;
    assert_eq!(w.status(id), ("working".to_string(), Some("alice".into())));

    // What the crashed scheduler left: a release of an earlier run, queued on the Queue.
    let store = Store::open(w.env.state()).unwrap();
    let stale = tinyscheduler::resources::queue::OrphanWriteBack {
        task_id: id,
        endpoint: w.server.url(),
        lease_uid: "an-earlier-lease".into(),
        write_back: tinyscheduler::resources::task::WriteBack {
            op: tinyscheduler::resources::task::WriteBackOp::Release,
            attempt: 1,
            message: Some("[tinyscheduler] stale release".into()),
            agent: Some("alice".into()),
            created: None,
        },
    };
    store
        .patch_status::<tinyscheduler::resources::Queue>("dev", |q| {
            q.status.write_backs.push(stale.clone())
        })
        .unwrap();
    wait_until(
        "the stale release to be dropped",
        Duration::from_secs(30),
        || {
            store
                .get::<tinyscheduler::resources::Queue>("dev")
                .unwrap()
                .status
                .write_backs
                .is_empty()
        },
    )
    .await;
    assert_eq!(w.status(id), ("working".to_string(), Some("alice".into())));
    assert!(
        w.server.comments(id).is_empty(),
        "{:?}",
        w.server.comments(id)
    );

    std::fs::write(&gate, "").unwrap();
    wait_until("the run to complete", Duration::from_secs(30), || {
        w.status(id).0 == "complete"
    })
    .await;
    d.kill().await.ok();
    assert_eq!(w.ran().len(), 1, "{:?}", w.ran());
}

/// A mirror's claim and result go to the server its task came from. Its Queue may point at
/// another server by the time the run ends (edited, or deleted and applied again), and that
/// server can have a task with the same id, which must be left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_goes_to_the_server_its_task_came_from_after_its_queue_moved_elsewhere() {
    let w = World::new().await;
    let other = TinytaskServer::start().await;
    let ours = queued(&w.server, "ours", "dev");
    let theirs = queued(&other, "theirs", "dev");
    assert_eq!(ours, theirs, "the same id on both servers");
    w.tinytask_queue("dev", json!({}));
    // While it runs, the agent moves the Queue to the other server, as an operator might.
    let moved = json!({"apiVersion": "tinyscheduler.io/v1alpha1", "kind": "Queue",
        "metadata": {"name": "dev"},
        "spec": {"source": "tinytask", "endpoint": other.url(), "pollIntervalSeconds": 1}});
    let moved = w
        .env
        .file("moved.json", &serde_json::to_string(&moved).unwrap());
    let script = format!(
        "'{}' --state-dir '{}' apply -f '{}' >/dev/null && {RECORD}",
        support::BIN,
        w.env.state().display(),
        moved.display()
    );
    w.agent("alice", Some("dev"), 1, &script);
    let r = w.run_once(Duration::from_secs(60)).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(w.ran(), [(format!("tt-{ours}"), "alice".to_string())]);
    let q = w.env.run(&["get", "queue", "dev", "-o", "json"]);
    assert!(
        q.stdout.contains(&other.url()),
        "the Queue moved: {}",
        q.stdout
    );
    assert_eq!(
        w.status(ours),
        ("complete".to_string(), Some("alice".into()))
    );
    let t = other.task(theirs).unwrap();
    assert_eq!(
        (t.status.as_str(), t.assigned_to.as_deref()),
        ("idle", None),
        "the other server's task of the same id was left alone"
    );
}

/// A waiting mirror (nothing claimed, nothing to write back) follows its Queue when the Queue's
/// endpoint is spelled anew or the server moves: it is not taken for another server's task, and
/// it goes on taking the server's changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_mirror_follows_its_queue_to_the_servers_new_address() {
    let w = World::new().await;
    let (_, blocked, name, mut d) = one_blocked_mirror(&w).await;
    // The same server, its address written another way; then a change there that the next
    // poll lists: a new task, and the mirrored one's priority.
    let respelled = format!("{}/api/v1", w.server.url());
    w.tinytask_queue("dev", json!({"endpoint": respelled}));
    // Time for the daemon to see the Queue change (its requests look the same: the spellings
    // name one URL). Were the change seen late, the mirror would not follow and the test fail.
    tokio::time::sleep(Duration::from_millis(500)).await;
    w.server.mutate_task(blocked, |t| t.priority = 7.0);
    queued(&w.server, "third", "dev");
    let annotation =
        |t: &Value| t["metadata"]["annotations"]["tinyscheduler.io/tinytask-endpoint"].clone();
    wait_until(
        "the mirror to follow, or a collision",
        Duration::from_secs(30),
        || {
            w.task_json(&name)
                .is_some_and(|t| t["spec"]["priority"] == 7)
                || w.events().contains("NameCollision")
        },
    )
    .await;
    d.kill().await.ok();
    assert!(!w.events().contains("NameCollision"), "{}", w.events());
    let mirror = w.task_json(&name).unwrap();
    assert_eq!(annotation(&mirror), respelled.as_str(), "{mirror}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_run_once_lets_the_poll_in_flight_finish_and_prints_the_summary() {
    let w = World::new().await;
    let id = queued(&w.server, "mirrored late", "dev");
    w.tinytask_queue("dev", json!({}));
    w.agent("alice", Some("dev"), 1, RECORD);
    // The poll's first request is answered late, so the signal comes while it is in flight.
    w.server.delay_next(1, Duration::from_secs(2));
    let arrived = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = arrived.clone();
    w.server
        .before_next_request(move |_| flag.store(true, std::sync::atomic::Ordering::SeqCst));
    let mut cmd = w.cmd(&["run", "--once"]);
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    wait_until(
        "the poll reaches the server",
        Duration::from_secs(30),
        || arrived.load(std::sync::atomic::Ordering::SeqCst),
    )
    .await;
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("run --once ends by itself")
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("leases scanned"), "the summary: {stdout}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    // The poll went on past its slow request and mirrored the task.
    let mirrored = w
        .store()
        .list::<tinyscheduler::resources::Task>(None)
        .unwrap()
        .items
        .iter()
        .any(|t| {
            t.metadata
                .annotations
                .get(tinyscheduler::resources::task::TINYTASK_ID_ANNOTATION)
                == Some(&id.to_string())
        });
    assert!(mirrored, "{}\n{stderr}", w.request_log());
}
