//! Store and CLI benchmarks (no criterion: plain timings, medians printed).
//!
//! Run with `cargo bench --bench store`. Library operations are timed one by one over 10,000
//! objects; the CLI is timed end to end (process start to exit) with the release binary.
//! Set `TS_BENCH_N` to change the object count.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tinyscheduler::resources::{Task, TaskSpec};
use tinyscheduler::store::Store;

const BIN: &str = env!("CARGO_BIN_EXE_tinyscheduler");

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn report(what: &str, samples: Vec<Duration>) {
    let n = samples.len();
    let total: Duration = samples.iter().sum();
    let med = median(samples);
    println!(
        "{what:<44} median {:>9.3} ms   {:>9.0} ops/s   ({n} samples, total {:.2} s)",
        med.as_secs_f64() * 1e3,
        n as f64 / total.as_secs_f64(),
        total.as_secs_f64()
    );
}

fn task(i: usize) -> Task {
    let mut params = std::collections::BTreeMap::new();
    params.insert(
        "goal".to_string(),
        serde_json::json!(format!("do thing number {i}")),
    );
    Task::new(
        "Task",
        &format!("task-{i:05}"),
        TaskSpec {
            queue: Some("default".into()),
            priority: (i % 10) as i64,
            params,
            ..Default::default()
        },
    )
}

fn run_cli(state: &std::path::Path, args: &[&str]) -> Duration {
    let start = Instant::now();
    let status = Command::new(BIN)
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run the binary");
    let d = start.elapsed();
    assert!(status.success(), "{args:?} failed");
    d
}

fn main() {
    let n: usize = std::env::var("TS_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let store = Store::open(&state).expect("open");
    println!("store benchmarks over {n} tasks in {}", state.display());

    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let t = task(i);
        let s = Instant::now();
        store.create(&t).expect("create");
        samples.push(s.elapsed());
    }
    report("create (durable: fsync file, dir, revision)", samples);

    // As the event recorder writes: atomic, not fsynced, into a directory of `n` files already.
    let relaxed = store.relaxed();
    let mut samples = Vec::with_capacity(n);
    for i in n..2 * n {
        let t = task(i);
        let s = Instant::now();
        relaxed.create(&t).expect("create");
        samples.push(s.elapsed());
    }
    report(&format!("create, relaxed (no fsync), beside {n}+"), samples);
    for i in n..2 * n {
        relaxed
            .delete::<Task>(&format!("task-{i:05}"), None)
            .expect("delete");
    }

    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let mut t: Task = store.get(&format!("task-{i:05}")).expect("get");
        t.spec.priority += 100;
        let s = Instant::now();
        store.update(&t).expect("update");
        samples.push(s.elapsed());
    }
    report("update (spec change, with resourceVersion)", samples);

    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("task-{:05}", (i * 7919) % n);
        let s = Instant::now();
        let t: Task = store.get(&name).expect("get");
        samples.push(s.elapsed());
        std::hint::black_box(t);
    }
    report("get (one typed object)", samples);

    let mut samples = Vec::new();
    for _ in 0..10 {
        let s = Instant::now();
        let l = store.list::<Task>(None).expect("list");
        samples.push(s.elapsed());
        assert_eq!(l.items.len(), n);
    }
    let med = median(samples.clone());
    report(&format!("list (all {n} typed tasks)"), samples);
    println!(
        "{:<44} {:>9.0} objects/s",
        "  list throughput",
        n as f64 / med.as_secs_f64()
    );

    // End to end, process start to exit.
    run_cli(&state, &["get", "tasks"]); // warm the page cache
    let samples: Vec<Duration> = (0..15)
        .map(|_| run_cli(&state, &["get", "tasks"]))
        .collect();
    report(
        &format!("CLI `get tasks` over {n} tasks (process)"),
        samples,
    );
    let samples: Vec<Duration> = (0..10)
        .map(|_| run_cli(&state, &["get", "tasks", "-o", "json"]))
        .collect();
    report(&format!("CLI `get tasks -o json` over {n} tasks"), samples);

    let manifests = dir.path().join("m");
    std::fs::create_dir_all(&manifests).unwrap();
    let mut created = Vec::new();
    for i in 0..25 {
        let f = manifests.join(format!("a{i}.yaml"));
        std::fs::write(
            &f,
            format!(
                "apiVersion: tinyscheduler.io/v1alpha1\nkind: Agent\nmetadata:\n  name: bench-{i}\n\
                 spec:\n  queue: default\n  maxConcurrency: 2\n  command: [\"true\"]\n"
            ),
        )
        .unwrap();
        created.push(run_cli(&state, &["apply", "-f", f.to_str().unwrap()]));
    }
    report("CLI `apply` of one new object (process)", created);
    let f = manifests.join("a0.yaml");
    let samples: Vec<Duration> = (0..25)
        .map(|_| run_cli(&state, &["apply", "-f", f.to_str().unwrap()]))
        .collect();
    report("CLI `apply` of one unchanged object", samples);
}
