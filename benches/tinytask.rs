//! tinytask sync throughput: the fake tinytask server (in this process, 127.0.0.1) holds
//! `BENCH_TASKS` (default 1000) idle tasks in 2 queues; 10 agents × 10 slots (5 per queue) run
//! `true`. Measures the time from starting `tinyscheduler run --daemon` until every task is
//! `complete` on the server, and the requests it took.
//!
//! `cargo bench --bench tinytask` (harness = false, no criterion).

#[path = "../tests/support/tinytask_server.rs"]
mod tinytask_server;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use tinytask_server::TinytaskServer;

const BIN: &str = env!("CARGO_BIN_EXE_tinyscheduler");

fn main() {
    let n: usize = std::env::var("BENCH_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(n));
}

async fn run(n: usize) {
    let server = TinytaskServer::start().await;
    let ids: Vec<i64> = (0..n)
        .map(|i| {
            let q = if i % 2 == 0 { "q1" } else { "q2" };
            server.insert(&format!("task {i}"), |t| t.queue_name = Some(q.into()))
        })
        .collect();
    // BENCH_DIR=DIR: put the state directory there (e.g. /dev/shm to take the disk out).
    let tmp = match std::env::var_os("BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let state = tmp.path().join("state");
    let mut docs = String::new();
    // BENCH_LOCAL=1: the same work as local Tasks, no server (the baseline).
    let local = std::env::var_os("BENCH_LOCAL").is_some();
    for q in ["q1", "q2"] {
        if local {
            docs.push_str(&format!(
                "---\napiVersion: tinyscheduler.io/v1alpha1\nkind: Queue\nmetadata:\n  name: {q}\nspec:\n  source: local\n"
            ));
        } else {
            docs.push_str(&format!(
                "---\napiVersion: tinyscheduler.io/v1alpha1\nkind: Queue\nmetadata:\n  name: {q}\nspec:\n  source: tinytask\n  endpoint: {}\n  pollIntervalSeconds: 1\n",
                server.url()
            ));
        }
    }
    if local {
        for i in 0..n {
            let q = if i % 2 == 0 { "q1" } else { "q2" };
            docs.push_str(&format!(
                "---\napiVersion: tinyscheduler.io/v1alpha1\nkind: Task\nmetadata:\n  name: task-{i}\nspec:\n  queue: {q}\n"
            ));
        }
    }
    for a in 0..10 {
        let q = if a % 2 == 0 { "q1" } else { "q2" };
        docs.push_str(&format!(
            "---\napiVersion: tinyscheduler.io/v1alpha1\nkind: Agent\nmetadata:\n  name: agent-{a}\nspec:\n  queue: {q}\n  maxConcurrency: 10\n  command: [\"true\"]\n"
        ));
    }
    let manifest = tmp.path().join("bench.yaml");
    std::fs::write(&manifest, docs).unwrap();
    let ok = Command::new(BIN)
        .arg("--state-dir")
        .arg(&state)
        .args(["apply", "-f"])
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(ok.status.success(), "{ok:?}");

    // BENCH_LOG=FILE: the daemon's log (info level) goes there.
    let log = std::env::var_os("BENCH_LOG");
    let start = Instant::now();
    let mut child = tokio::process::Command::new(BIN)
        .arg("--state-dir")
        .arg(&state)
        .args(["run", "--daemon"])
        .args(match std::env::var("BENCH_HTTP") {
            Ok(a) => vec!["--http".to_string(), a],
            Err(_) => vec![],
        })
        .env(
            "TINYSCHEDULER_LOG_LEVEL",
            if log.is_some() { "info" } else { "warn" },
        )
        .current_dir(tmp.path())
        .stdout(std::process::Stdio::null())
        .stderr(match &log {
            Some(p) => std::process::Stdio::from(std::fs::File::create(p).unwrap()),
            None => std::process::Stdio::null(),
        })
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut half = None;
    loop {
        let done = if local {
            tinyscheduler::store::Store::open_read_only(&state)
                .list::<tinyscheduler::resources::Task>(None)
                .map(|l| {
                    l.items
                        .iter()
                        .filter(|t| {
                            t.status.phase == tinyscheduler::resources::TaskPhase::Succeeded
                        })
                        .count()
                })
                .unwrap_or(0)
        } else {
            server.with_db(|db| {
                ids.iter()
                    .filter(|id| db.task(**id).is_some_and(|t| t.status == "complete"))
                    .count()
            })
        };
        if half.is_none() && done * 2 >= n {
            half = Some(start.elapsed());
        }
        if done == n {
            break;
        }
        if start.elapsed() > Duration::from_secs(900) {
            panic!("only {done} of {n} complete after 900 s");
        }
        tokio::time::sleep(Duration::from_millis(if local { 200 } else { 20 })).await;
    }
    let total = start.elapsed();
    if let Ok(a) = std::env::var("BENCH_HTTP") {
        if let Ok(r) = reqwest::get(format!("http://{a}/metrics")).await {
            let _ = std::fs::write("/tmp/bench_metrics.txt", r.text().await.unwrap_or_default());
        }
    }
    let _ = child.start_kill();
    let _ = child.wait().await;

    let reqs = server.requests();
    // The server's own cost, for scale: 100 claim-like round trips from one client.
    let client = tinyscheduler::tinytask::Client::new(&server.url()).unwrap();
    let t0 = Instant::now();
    for id in ids.iter().take(100) {
        client.get_task(*id).await.unwrap();
        client
            .patch_task(
                *id,
                &tinyscheduler::tinytask::TaskPatch::new()
                    .status(tinyscheduler::tinytask::TaskStatus::Complete),
            )
            .await
            .unwrap();
    }
    let round_trip = t0.elapsed() / 200;

    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for r in &reqs {
        let path = if r.path.ends_with("/stats") {
            "/queues/:q/stats".to_string()
        } else if r.path.starts_with("/api/v1/tasks/") {
            "/tasks/:id".to_string()
        } else {
            r.path.trim_start_matches("/api/v1").to_string()
        };
        let not_modified = if r.status == 304 { " (304)" } else { "" };
        *by_kind
            .entry(format!("{} {path}{not_modified}", r.method))
            .or_default() += 1;
    }
    let what = if local {
        "local baseline"
    } else {
        "tinytask sync"
    };
    println!("{what}: {n} tasks, 2 queues, 10 agents x 10 slots, agents run `true`");
    println!(
        "  all complete on the server after {:.2} s ({:.1} tasks/s); half after {:.2} s",
        total.as_secs_f64(),
        n as f64 / total.as_secs_f64(),
        half.unwrap_or_default().as_secs_f64()
    );
    println!(
        "  one request to the fake server takes {:.2} ms (mean of 200, after the run)",
        round_trip.as_secs_f64() * 1000.0
    );
    println!(
        "  {} requests ({:.1} per task):",
        reqs.len(),
        reqs.len() as f64 / n as f64
    );
    for (k, v) in by_kind {
        println!("    {v:6}  {k}");
    }
}
