//! Controller-runtime benchmarks (no criterion; `cargo bench --bench runtime`).
//!
//! 1. Work-queue throughput: add + get + done per second, with 1 and 4 workers.
//! 2. Event-to-reconcile latency through the real file store: a separate writer process (this same
//!    executable re-invoked with `--writer`) updates an object, stamping the wall-clock time just
//!    before the write in an annotation; a controller watching the kind measures the time until its
//!    reconciler sees that revision, then acks so the writer goes on. p50/p99 over N writes, on the
//!    disk (ext4, with every fsync the store does) and on tmpfs (`/dev/shm`).
//!
//! Environment: `BENCH_WRITES` (default 1000), `BENCH_QUEUE_ITEMS` (default 200000).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tinyscheduler::resources::meta::Resource;
use tinyscheduler::resources::queue::{Queue, QueueSpec};
use tinyscheduler::runtime::{
    Action, Backoff, Controller, Informer, InformerOptions, Metrics, WorkQueue,
};
use tinyscheduler::store::Store;

const STAMP: &str = "bench.tinyscheduler.io/written-at-ns";

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--writer") {
        return writer(Path::new(&args[i + 1]), args[i + 2].parse().unwrap());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "controller runtime benchmarks ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let items = env_usize("BENCH_QUEUE_ITEMS", 200_000);
    for workers in [1, 4] {
        let rate = rt.block_on(queue_throughput(items, workers));
        println!(
            "workqueue add+get+done, {workers} worker(s): {:.0} keys/s ({items} keys)",
            rate
        );
    }
    let writes = env_usize("BENCH_WRITES", 1000);
    let disk = tempfile::tempdir().unwrap();
    let shm = Path::new("/dev/shm")
        .is_dir()
        .then(|| tempfile::tempdir_in("/dev/shm").unwrap());
    let mut targets = vec![("disk", disk.path().to_path_buf())];
    if let Some(s) = &shm {
        targets.push(("tmpfs", s.path().to_path_buf()));
    }
    for (label, dir) in targets {
        let l = rt.block_on(event_latency(&dir, writes));
        println!(
            "event->reconcile latency, {label}, {} writes by another process:",
            l.from_stamp.len()
        );
        for (what, v) in [
            ("  write stamp -> reconcile     ", &l.from_stamp),
            ("  writer's store.update call   ", &l.write_call),
            ("  update returned -> reconcile ", &l.after_return),
        ] {
            println!(
                "{what} p50 {}  p90 {}  p99 {}  max {}",
                fmt(pct(v, 50.0)),
                fmt(pct(v, 90.0)),
                fmt(pct(v, 99.0)),
                fmt(pct(v, 100.0)),
            );
        }
    }
}

fn fmt(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn pct(v: &[Duration], p: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

async fn queue_throughput(items: usize, workers: usize) -> f64 {
    let q: WorkQueue<String> = WorkQueue::new(Backoff::default());
    let keys: Vec<String> = (0..items).map(|i| format!("key-{i}")).collect();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut handles = vec![];
    for _ in 0..workers {
        let q = q.clone();
        let done = done.clone();
        handles.push(tokio::spawn(async move {
            while let Some(k) = q.get().await {
                q.done(&k);
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    let start = Instant::now();
    for k in keys {
        q.add(k);
        // Let workers run now and then, as a real producer (an informer) would.
        if q.len() >= 1024 {
            tokio::task::yield_now().await;
        }
    }
    q.wait_idle().await;
    let elapsed = start.elapsed();
    q.shutdown();
    for h in handles {
        h.await.unwrap();
    }
    done.load(std::sync::atomic::Ordering::Relaxed) as f64 / elapsed.as_secs_f64()
}

/// Runs the writer child and a controller; returns per-write latencies and the writer's
/// store-call durations.
async fn event_latency(dir: &Path, writes: usize) -> Latency {
    let store = Store::open(dir).unwrap();
    let informer = Informer::<Queue>::new(
        store.clone(),
        InformerOptions {
            resync: Duration::from_secs(3600),
            relist: Duration::from_secs(3600),
        },
    );
    let _inf = informer.start();
    informer.wait_synced().await;

    let mut child = Command::new(std::env::current_exe().unwrap())
        .arg("--writer")
        .arg(dir)
        .arg(writes.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child_in = child.stdin.take().unwrap();
    let child_out = child.stdout.take().unwrap();
    let (ack_tx, ack_rx) = std::sync::mpsc::channel::<()>();
    let acker = std::thread::spawn(move || {
        // First write needs no ack; each later one follows the ack of the one before.
        while ack_rx.recv().is_ok() {
            if child_in
                .write_all(b"\n")
                .and_then(|_| child_in.flush())
                .is_err()
            {
                break;
            }
        }
    });

    struct Ctx {
        informer: Informer<Queue>,
        last: Mutex<u64>,
        samples: Mutex<Vec<Duration>>,
        pairs: Mutex<Vec<(u128, u128)>>,
        ack: Mutex<std::sync::mpsc::Sender<()>>,
        want: usize,
        done: tokio::sync::Notify,
    }
    let ctx = Arc::new(Ctx {
        informer: informer.clone(),
        last: Mutex::new(0),
        samples: Mutex::new(Vec::new()),
        pairs: Mutex::new(Vec::new()),
        ack: Mutex::new(ack_tx),
        want: writes,
        done: tokio::sync::Notify::new(),
    });
    let controller = Controller::new("bench", ctx.clone(), Metrics::default())
        .watches(&informer, |q: &Queue| vec![q.name().to_string()]);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(controller.run(
        |key: String, ctx: Arc<Ctx>| async move {
            let seen = now_ns();
            let Some(obj) = ctx.informer.get(&key) else {
                return Ok::<_, String>(Action::await_change());
            };
            let rev = obj.revision();
            let mut last = ctx.last.lock().unwrap();
            if rev <= *last {
                return Ok(Action::await_change());
            }
            *last = rev;
            let stamp: u128 = obj.metadata.annotations[STAMP].parse().unwrap();
            ctx.pairs.lock().unwrap().push((stamp, seen));
            let mut samples = ctx.samples.lock().unwrap();
            samples.push(Duration::from_nanos(seen.saturating_sub(stamp) as u64));
            if samples.len() >= ctx.want {
                ctx.done.notify_one();
            } else {
                let _ = ctx.ack.lock().unwrap().send(());
            }
            Ok(Action::await_change())
        },
        async {
            let _ = stop_rx.await;
        },
    ));
    tokio::time::timeout(Duration::from_secs(120), ctx.done.notified())
        .await
        .expect("all writes reconciled within 120 s");
    let _ = stop_tx.send(());
    run.await.unwrap();
    drop(ctx.ack.lock().unwrap().clone());
    let samples = ctx.samples.lock().unwrap().clone();
    // The writer prints "<stamp ns> <returned ns>" per write.
    let mut write_call = vec![];
    let mut returned = std::collections::HashMap::new();
    for line in BufReader::new(child_out).lines() {
        let line = line.unwrap();
        let mut it = line.split_whitespace().map(|x| x.parse::<u128>().unwrap());
        if let (Some(stamp), Some(end)) = (it.next(), it.next()) {
            write_call.push(Duration::from_nanos((end - stamp) as u64));
            returned.insert(stamp, end);
        }
    }
    // From the moment the writer's store call returned (the write fully durable) to the
    // reconcile; zero when the reconcile ran before the writer's final directory fsync returned.
    let after_return: Vec<Duration> = ctx
        .pairs
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(stamp, seen)| {
            returned
                .get(stamp)
                .map(|end| Duration::from_nanos(seen.saturating_sub(*end) as u64))
        })
        .collect();
    child.wait().unwrap();
    drop(ctx);
    let _ = acker;
    Latency {
        from_stamp: samples,
        write_call,
        after_return,
    }
}

struct Latency {
    /// From the writer's timestamp (taken just before `store.update`) to the reconcile.
    from_stamp: Vec<Duration>,
    /// The writer's `store.update` call (revision fsync, temp write + fsync, rename, dir fsync).
    write_call: Vec<Duration>,
    /// From the writer's `store.update` returning to the reconcile (0 if the reconcile came first).
    after_return: Vec<Duration>,
}

/// Writer mode: `writes` updates of one object, each after an ack line on stdin; prints each
/// stamp and the time its store call returned (ns since the epoch) on stdout at the end.
fn writer(dir: &Path, writes: usize) {
    let store = Store::open(dir).unwrap();
    let mut stdin = BufReader::new(std::io::stdin());
    let mut durations = Vec::with_capacity(writes);
    let mut obj: Option<Queue> = None;
    for i in 0..writes {
        if i > 0 {
            let mut line = String::new();
            if stdin.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
        }
        let mut q = obj
            .take()
            .unwrap_or_else(|| Queue::new(Queue::KIND, "bench", QueueSpec::default()));
        let stamp = now_ns();
        q.metadata
            .annotations
            .insert(STAMP.into(), stamp.to_string());
        let written = if i == 0 {
            store.create(&q).unwrap()
        } else {
            store.update(&q).unwrap()
        };
        durations.push((stamp, now_ns()));
        obj = Some(written);
    }
    let mut out = std::io::stdout().lock();
    for (stamp, end) in durations {
        let _ = writeln!(out, "{stamp} {end}");
    }
}
