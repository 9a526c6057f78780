//! Scheduler benchmarks with the release binary and real processes (no criterion).
//!
//! `cargo bench --bench scheduler` runs three measurements:
//!
//! - *dispatch latency*: an idle `run --daemon`; the bench stamps the wall clock, writes one Task
//!   through the Store API, and the agent — this bench executable re-invoked as
//!   `scheduler-bench --stamp FILE`, which writes its own wall-clock time and exits (no shell, no
//!   `date`) — records when it started. One task at a time, each finished before the next.
//! - *burst*: N tasks (default 10,000) already in the store, A agents × S slots (default 100 × 100)
//!   running `true`; a daemon is started and the bench polls its `/metrics` until every task has
//!   Succeeded. Peak RSS is the daemon's VmHWM; durable writes are counted from the store's global
//!   revision (every create, update and delete bumps it once); CPU is the daemon's own and the
//!   whole machine's busy time (`/proc/stat`), since shims are forked by the daemon's launcher and
//!   reaped by the kernel, so they are not the daemon's reaped children.
//! - *idle cost*: the same daemon afterwards, with the finished tasks still in the store: utime +
//!   stime over a window.
//!
//! Knobs: `BENCH_DISPATCH_N` (200), `BENCH_BURST_TASKS` (10000), `BENCH_BURST_AGENTS` (100),
//! `BENCH_BURST_SLOTS` (100), `BENCH_BURST_TIMEOUT_SEC` (120: then the agents are paused,
//! the running leases drain, and the idle cost is measured on the tasks as they are), `BENCH_IDLE_SEC` (30),
//! `BENCH_ONLY` (`dispatch`, `burst`: burst + idle), `BENCH_DIR` (where the state directories go;
//! default the system temp dir), `BENCH_BURST_PREFINISHED` (`1`: NOT a burst — the N tasks are
//! created already `Succeeded`, as a finished burst leaves them but without its Events, and the
//! daemon only has to list them; the bench waits for its work queues to drain before the idle
//! window. For measuring the idle cost without waiting minutes for a burst.), `BENCH_KEEP` (`1`:
//! leave the state directories behind, for A/B pairs that must not delete between runs).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tinyscheduler::resources::{Agent, AgentSpec, Queue, QueueSpec, Task, TaskPhase, TaskSpec};
use tinyscheduler::store::Store;

const BIN: &str = env!("CARGO_BIN_EXE_tinyscheduler");

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn summary(name: &str, mut v: Vec<f64>) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "{name:<48} p50 {:>8.2} ms  p90 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms  (n={})",
        pct(&v, 0.5),
        pct(&v, 0.9),
        pct(&v, 0.99),
        v[v.len() - 1],
        v.len()
    );
}

fn bench_dir() -> tempfile::TempDir {
    let mut dir = match std::env::var_os("BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    // A mass deletion slows the file creates of whatever runs next on a journal-less ext4 for
    // minutes (see docs/benchmarks.md): A/B pairs keep their directories and delete them later.
    if env_num("BENCH_KEEP", 0) == 1 {
        dir.disable_cleanup(true);
        println!("keeping {}", dir.path().display());
    }
    dir
}

/// A daemon child, killed by pid if the bench panics.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(state: &Path, extra: &[&str], log: PathBuf) -> Daemon {
        let err = std::fs::File::create(&log).unwrap();
        let child = Command::new(BIN)
            .arg("--state-dir")
            .arg(state)
            .args(["run", "--daemon"])
            .args(extra)
            .env("TINYSCHEDULER_LOG_LEVEL", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start the daemon");
        let d = Daemon { child, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !std::fs::read_to_string(&d.log)
            .unwrap_or_default()
            .contains("scheduler running")
        {
            assert!(Instant::now() < deadline, "the daemon did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        d
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn queue(store: &Store) {
    store
        .create(&Queue::new("Queue", "default", QueueSpec::default()))
        .unwrap();
}

fn agent(store: &Store, name: &str, max: i64, command: Vec<String>) {
    let spec = AgentSpec {
        queue: Some("default".into()),
        max_concurrency: max,
        command,
        heartbeat_seconds: 15,
        max_runtime_seconds: 600,
        ..Default::default()
    };
    store.create(&Agent::new("Agent", name, spec)).unwrap();
}

/// A task as a successful run leaves it (for `BENCH_BURST_PREFINISHED`).
fn finished_task(name: &str) -> Task {
    let mut t = task(name);
    let now = tinyscheduler::resources::meta::now_rfc3339();
    t.status.phase = TaskPhase::Succeeded;
    t.status.attempts = 1;
    t.status.agent = Some("agent-000".into());
    t.status.start_time = Some(now.clone());
    t.status.finish_time = Some(now);
    t.status.exit_code = Some(0);
    t.status.reason = Some("Succeeded".into());
    t.status.message = Some("exited 0 on agent/agent-000".into());
    t
}

fn task(name: &str) -> Task {
    Task::new(
        "Task",
        name,
        TaskSpec {
            queue: Some("default".into()),
            ..Default::default()
        },
    )
}

fn read_stamp(path: &Path) -> Option<u128> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn wait_until(limit: Duration, step: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !f() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(step);
    }
    true
}

/// Microseconds since the epoch of a JSON log line's `timestamp`.
fn log_time(line: &str) -> Option<u128> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let ts = v.get("timestamp")?.as_str()?;
    let t = humantime::parse_rfc3339_weak(ts).ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_nanos())
}

/// `(task, reason) -> time` for the daemon's Assigned and Started events.
fn event_times(log: &Path) -> std::collections::HashMap<(String, String), u128> {
    let mut out = std::collections::HashMap::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(reason)) = (
            v.get("name").and_then(|n| n.as_str()),
            v.get("reason").and_then(|n| n.as_str()),
        ) else {
            continue;
        };
        if let Some(t) = log_time(line) {
            out.entry((name.to_string(), reason.to_string()))
                .or_insert(t);
        }
    }
    out
}

/// The cost of one durable write right now (`Store::update_status` of a scratch object):
/// every scheduler number below is a multiple of it.
fn write_baseline(label: &str) {
    let tmp = bench_dir();
    let store = Store::open(tmp.path().join("state")).unwrap();
    let mut t = store.create(&task("scratch")).unwrap();
    let mut v = Vec::new();
    for i in 0..50 {
        t.status.attempts = i;
        let start = Instant::now();
        t = store.update_status(&t).unwrap();
        v.push(start.elapsed().as_secs_f64() * 1e3);
    }
    summary(&format!("durable write baseline ({label})"), v);
}

/// The cost of one process right now: spawning the burst's agent (`true`) and waiting for it,
/// one at a time. A burst runs two processes per task (the shim and its agent), so its time moves
/// with this figure from host to host; the durable write baseline alone does not show that.
fn spawn_baseline(label: &str) {
    let mut v = Vec::new();
    for _ in 0..200 {
        let start = Instant::now();
        let st = Command::new("true").status().unwrap();
        v.push(start.elapsed().as_secs_f64() * 1e3);
        assert!(st.success(), "`true` failed: {st}");
    }
    summary(&format!("process spawn+wait baseline ({label})"), v);
}

fn dispatch() {
    let n = env_num("BENCH_DISPATCH_N", 200) as usize;
    let me = std::env::current_exe().unwrap();
    let tmp = bench_dir();
    let out = tmp.path().join("stamps");
    std::fs::create_dir_all(&out).unwrap();

    // What the agent itself costs: fork/exec of this executable until it has read the clock.
    let mut exec = Vec::new();
    for i in 0..50 {
        let f = out.join(format!("direct-{i}"));
        let t0 = now_ns();
        Command::new(&me).arg("--stamp").arg(&f).status().unwrap();
        exec.push((read_stamp(&f).unwrap() - t0) as f64 / 1e6);
    }
    summary("agent exec alone (spawn -> stamp)", exec);

    let state = tmp.path().join("state");
    let store = Store::open(&state).unwrap();
    queue(&store);
    agent(
        &store,
        "lat",
        4,
        vec![
            me.display().to_string(),
            "--stamp".into(),
            format!("{}/{{{{task.name}}}}", out.display()),
        ],
    );
    let d = Daemon::start(&state, &[], tmp.path().join("daemon.log"));
    let warm = 5;
    let mut lat = Vec::new();
    let mut t0s = Vec::new();
    for i in 0..warm + n {
        let name = format!("lat-{i:04}");
        let t0 = now_ns();
        store.create(&task(&name)).unwrap();
        let f = out.join(&name);
        assert!(
            wait_until(Duration::from_secs(30), Duration::from_micros(200), || f
                .exists()
                && read_stamp(&f).is_some()),
            "task {name} never started"
        );
        if i >= warm {
            lat.push((read_stamp(&f).unwrap() - t0) as f64 / 1e6);
            t0s.push((name.clone(), t0));
        }
        // Back to idle: the outcome recorded and the Lease gone.
        assert!(wait_until(
            Duration::from_secs(30),
            Duration::from_millis(1),
            || store
                .try_get::<Task>(&name)
                .unwrap()
                .is_some_and(|t| t.status.phase == TaskPhase::Succeeded)
                && store
                    .try_get::<tinyscheduler::resources::Lease>(&name)
                    .unwrap()
                    .is_none()
        ));
    }
    summary("dispatch: task written -> agent started", lat);
    let ev = event_times(&d.log);
    let mut to_assigned = Vec::new();
    let mut assigned_to_agent = Vec::new();
    let mut agent_to_started = Vec::new();
    for (name, t0) in &t0s {
        let stamp = read_stamp(&out.join(name)).unwrap();
        if let (Some(a), Some(s)) = (
            ev.get(&(name.clone(), "Assigned".into())),
            ev.get(&(name.clone(), "Started".into())),
        ) {
            to_assigned.push(a.saturating_sub(*t0) as f64 / 1e6);
            assigned_to_agent.push(stamp.saturating_sub(*a) as f64 / 1e6);
            agent_to_started.push(s.saturating_sub(stamp) as f64 / 1e6);
        }
    }
    if !to_assigned.is_empty() {
        summary("  written -> Assigned event logged", to_assigned);
        summary("  Assigned event -> agent started", assigned_to_agent);
        summary(
            "  agent started -> Started event (see docs)",
            agent_to_started,
        );
    }
    d.stop();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn scrape(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

fn succeeded(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("tinyscheduler_tasks{") && l.contains("phase=\"Succeeded\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Reconciles per controller (every result), from `/metrics`, in the order first listed.
fn reconciles(metrics: &str) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    for l in metrics
        .lines()
        .filter(|l| l.starts_with("tinyscheduler_reconcile_total{"))
    {
        let Some(name) = l
            .split("controller=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
        else {
            continue;
        };
        let n = l
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
        match out.iter_mut().find(|(c, _)| c == name) {
            Some((_, total)) => *total += n,
            None => out.push((name.to_string(), n)),
        }
    }
    out
}

/// Keys waiting in every work queue, from `/metrics`.
fn queued(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("tinyscheduler_workqueue_depth{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    stat_fields(pid, 11) + stat_fields(pid, 12)
}

/// CPU time the whole machine spent busy (user, nice, system, irq, softirq of `/proc/stat`), in
/// clock ticks. Shims are forked by the daemon's launcher, which leaves their reaping to the
/// kernel, so the daemon's cutime/cstime no longer covers them: the rest of a run's cost is read
/// machine-wide, which also counts the kernel's own work on the store's behalf.
fn machine_busy_ticks() -> u64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    [0, 1, 2, 5, 6]
        .iter()
        .map(|&i| f.get(i).copied().unwrap_or(0))
        .sum()
}

/// One number of `/proc/<pid>/stat`, counted from the field after the comm (0 = state).
fn stat_fields(pid: u32, i: usize) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    rest.split_whitespace()
        .nth(i)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
}

fn clock_ticks_per_sec() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

fn revision(store: &Store) -> u64 {
    store.revision().unwrap()
}

fn burst_and_idle() {
    let n = env_num("BENCH_BURST_TASKS", 10_000);
    let agents = env_num("BENCH_BURST_AGENTS", 100);
    let slots = env_num("BENCH_BURST_SLOTS", 100);
    let timeout = Duration::from_secs(env_num("BENCH_BURST_TIMEOUT_SEC", 120));
    let idle_secs = env_num("BENCH_IDLE_SEC", 30);
    let prefinished = env_num("BENCH_BURST_PREFINISHED", 0) == 1;
    let tmp = bench_dir();
    let state = tmp.path().join("state");
    let store = Store::open(&state).unwrap();
    queue(&store);
    for a in 0..agents {
        agent(
            &store,
            &format!("agent-{a:03}"),
            slots as i64,
            vec!["true".into()],
        );
    }
    let t = Instant::now();
    for i in 0..n {
        let name = format!("burst-{i:05}");
        let obj = if prefinished {
            finished_task(&name)
        } else {
            task(&name)
        };
        store.create(&obj).unwrap();
    }
    println!(
        "burst: created {n} tasks{} in {:.1} s ({} agents x {slots} slots)",
        if prefinished {
            " ALREADY SUCCEEDED (BENCH_BURST_PREFINISHED=1: no burst is run)"
        } else {
            ""
        },
        t.elapsed().as_secs_f64(),
        agents
    );
    let rev0 = revision(&store);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let t0 = Instant::now();
    let busy0 = machine_busy_ticks();
    let d = Daemon::start(&state, &["--http", &addr], tmp.path().join("burst.log"));
    let pid = d.pid();
    let mut last = (0u64, Instant::now());
    let mut progress = Vec::new();
    let done = loop {
        let ok = scrape(port).map(|m| succeeded(&m)).unwrap_or(0);
        if ok >= n {
            break true;
        }
        if last.1.elapsed() >= Duration::from_secs(10) {
            progress.push(format!("{:.0}s:{ok}", t0.elapsed().as_secs_f64()));
            last = (ok, Instant::now());
        }
        if t0.elapsed() > timeout {
            println!("burst: TIMEOUT after {timeout:?} with {ok} of {n} Succeeded");
            break false;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let elapsed = t0.elapsed();
    let busy = machine_busy_ticks() - busy0;
    let end = scrape(port).unwrap_or_default();
    let ok = succeeded(&end);
    if !done {
        // Stop new work so that the idle measurement sees a quiet store: pause every agent and
        // let the running ones drain.
        for a in 0..agents {
            let name = format!("agent-{a:03}");
            let mut ag = store.get::<Agent>(&name).unwrap();
            ag.spec.paused = true;
            let _ = store.update(&ag);
        }
        let drained = wait_until(Duration::from_secs(120), Duration::from_millis(250), || {
            store
                .list::<tinyscheduler::resources::Lease>(None)
                .map(|l| l.items.is_empty())
                .unwrap_or(false)
        });
        println!("burst: agents paused; running leases drained: {drained}");
    }
    let writes = revision(&store) - rev0;
    let hwm = proc_status(pid, "VmHWM:");
    let hz = clock_ticks_per_sec();
    let (own, machine) = (cpu_ticks(pid) as f64 / hz, busy as f64 / hz);
    let rest = (machine - own).max(0.0);
    if prefinished {
        println!(
            "burst: none run (BENCH_BURST_PREFINISHED=1); daemon up with {ok} of {n} Succeeded"
        );
    } else {
        println!(
            "burst: {ok} of {n} Succeeded in {:.1} s ({:.0} tasks/s) {}; progress {}",
            elapsed.as_secs_f64(),
            ok as f64 / elapsed.as_secs_f64(),
            if done { "" } else { "(timed out)" },
            progress.join(" ")
        );
    }
    println!(
        "burst: daemon peak RSS (VmHWM) {:.1} MB; durable writes {writes} ({:.1} per task)",
        hwm as f64 / 1024.0,
        writes as f64 / ok.max(1) as f64
    );
    if !prefinished {
        println!(
            "burst: CPU machine {machine:.1} s ({:.2} ms/task) = daemon {own:.1} s ({:.2} ms/task) + the rest (launcher, shims, agents, kernel threads, the bench's polling) {rest:.1} s ({:.2} ms/task)",
            machine * 1000.0 / ok.max(1) as f64,
            own * 1000.0 / ok.max(1) as f64,
            rest * 1000.0 / ok.max(1) as f64
        );
    }
    let per_task: Vec<String> = reconciles(&end)
        .iter()
        .map(|(c, n)| format!("{c} {:.2}", *n as f64 / ok.max(1) as f64))
        .collect();
    println!("burst: reconciles per task: {}", per_task.join(", "));
    let by_kind = count_kinds(&store, rev0);
    println!("burst: objects now: {by_kind}");

    if prefinished {
        // The initial list wakes every key once; wait for that to be worked off.
        let drained = wait_until(Duration::from_secs(120), Duration::from_millis(250), || {
            scrape(port).is_some_and(|m| queued(&m) == 0)
        });
        println!("burst: work queues drained after start: {drained}");
    }
    // Idle: let the status batching and event writes settle, then measure.
    std::thread::sleep(Duration::from_secs(3));
    let c0 = cpu_ticks(pid);
    let w0 = Instant::now();
    let r0 = revision(&store);
    std::thread::sleep(Duration::from_secs(idle_secs));
    let c1 = cpu_ticks(pid);
    let secs = w0.elapsed().as_secs_f64();
    println!(
        "idle: {} tasks in the store; daemon CPU {:.2} s over {secs:.0} s = {:.2}% of one core; {} writes; RSS {:.1} MB",
        store.list::<Task>(None).map(|l| l.items.len()).unwrap_or(0),
        (c1 - c0) as f64 / hz,
        (c1 - c0) as f64 / hz / secs * 100.0,
        revision(&store) - r0,
        proc_status(pid, "VmRSS:") as f64 / 1024.0,
    );
    d.stop();
}

fn count_kinds(store: &Store, _rev0: u64) -> String {
    let tasks = store.list::<Task>(None).map(|l| l.items.len()).unwrap_or(0);
    let leases = store
        .list::<tinyscheduler::resources::Lease>(None)
        .map(|l| l.items.len())
        .unwrap_or(0);
    let events = store
        .list::<tinyscheduler::resources::Event>(None)
        .map(|l| l.items.len())
        .unwrap_or(0);
    format!("{tasks} tasks, {leases} leases, {events} events")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // The agent of the dispatch bench: write the wall clock (ns) and exit.
    if args.len() == 3 && args[1] == "--stamp" {
        let t = now_ns();
        std::fs::write(&args[2], format!("{t}\n")).unwrap();
        return;
    }
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    println!(
        "machine: {} cores, load {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    if only.is_empty() || only == "dispatch" {
        write_baseline("before dispatch");
        dispatch();
    }
    if only.is_empty() || only == "burst" {
        write_baseline("before burst");
        spawn_baseline("before burst");
        burst_and_idle();
        write_baseline("after idle");
    }
}
