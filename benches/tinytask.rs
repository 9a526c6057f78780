//! tinytask sync throughput: the fake tinytask server (in this process, 127.0.0.1) holds
//! `BENCH_TASKS` (default 1000) idle tasks in 2 queues; 10 agents × 10 slots (5 per queue) run
//! `true`. Measures the time from starting `tinyscheduler run --daemon` until every task is
//! `complete` on the server, and the requests it took.
//!
//! `cargo bench --bench tinytask` (harness = false, no criterion).

#[path = "../tests/support/tinytask_server.rs"]
#[allow(dead_code)]
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
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let mut docs = String::new();
    for q in ["q1", "q2"] {
        docs.push_str(&format!(
            "---\napiVersion: tinyscheduler.io/v1alpha1\nkind: Queue\nmetadata:\n  name: {q}\nspec:\n  source: tinytask\n  endpoint: {}\n  pollIntervalSeconds: 1\n",
            server.url()
        ));
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

    let start = Instant::now();
    let mut child = tokio::process::Command::new(BIN)
        .arg("--state-dir")
        .arg(&state)
        .args(["run", "--daemon"])
        .env("TINYSCHEDULER_LOG_LEVEL", "warn")
        .current_dir(tmp.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut half = None;
    loop {
        let done = server.with_db(|db| {
            ids.iter()
                .filter(|id| db.task(**id).is_some_and(|t| t.status == "complete"))
                .count()
        });
        if half.is_none() && done * 2 >= n {
            half = Some(start.elapsed());
        }
        if done == n {
            break;
        }
        if start.elapsed() > Duration::from_secs(900) {
            panic!("only {done} of {n} complete after 900 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total = start.elapsed();
    let _ = child.start_kill();
    let _ = child.wait().await;

    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    let reqs = server.requests();
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
    println!("tinytask sync: {n} tasks, 2 queues, 10 agents x 10 slots, agents run `true`");
    println!(
        "  all complete on the server after {:.2} s ({:.1} tasks/s); half after {:.2} s",
        total.as_secs_f64(),
        n as f64 / total.as_secs_f64(),
        half.unwrap_or_default().as_secs_f64()
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
