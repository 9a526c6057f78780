//! `tinyscheduler run --daemon` end to end, as a child process on a temporary state directory: the
//! systemd notify protocol and watchdog (against a datagram socket standing in for systemd), a
//! really stalled loop, `/metrics` and the health endpoints, logs, SIGTERM with agents running and
//! their adoption by the next daemon. Every process a test starts is stopped by pid; the agents
//! (started by the daemon's shims) wait on a gate file that each test opens on the way out.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tinyscheduler::agent::liveness::is_alive;
use tinyscheduler::resources::meta::format_time;
use tinyscheduler::resources::{
    Agent, AgentSpec, Lease, LeasePhase, Queue, QueueSpec, Task, TaskPhase, TaskSpec,
};
use tinyscheduler::store::Store;

const BIN: &str = support::BIN;
/// Generous: the machine is shared by several builders.
const LONG: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// A fake systemd: the NOTIFY_SOCKET end.

struct Systemd {
    path: PathBuf,
    rx: mpsc::Receiver<String>,
    /// Every message so far, in arrival order.
    seen: Vec<String>,
    stop: Arc<AtomicBool>,
    _dir: tempfile::TempDir,
}

impl Systemd {
    fn new() -> Systemd {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stopped.load(Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if tx.send(msg).is_err() {
                        return;
                    }
                }
            }
        });
        Systemd {
            path,
            rx,
            seen: Vec::new(),
            stop,
            _dir: dir,
        }
    }

    /// Waits for a message matching `pred` that arrives at or after position `from` of
    /// [`Systemd::seen`]; returns its position.
    fn wait_for(&mut self, from: usize, what: &str, pred: impl Fn(&str) -> bool) -> usize {
        let deadline = Instant::now() + LONG;
        loop {
            if let Some(i) = (from..self.seen.len()).find(|&i| pred(&self.seen[i])) {
                return i;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(m) => self.seen.push(m),
                Err(_) => panic!(
                    "no {what} after message {from}; got {:?}",
                    &self.seen[from.min(self.seen.len())..]
                ),
            }
        }
    }

    /// Collects every message arriving within `d`.
    fn collect_for(&mut self, d: Duration) -> Vec<String> {
        let start = self.seen.len();
        let deadline = Instant::now() + d;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if let Ok(m) = self.rx.recv_timeout(left) {
                self.seen.push(m);
            }
        }
        self.seen[start..].to_vec()
    }

    /// Waits until `quiet` passes with no `WATCHDOG=1`; panics if that does not happen within
    /// [`LONG`].
    fn wait_for_watchdog_silence(&mut self, quiet: Duration) {
        let deadline = Instant::now() + LONG;
        let mut last_ping = Instant::now();
        while Instant::now() < deadline {
            match self.rx.recv_timeout(Duration::from_millis(50)) {
                Ok(m) => {
                    if m == "WATCHDOG=1" {
                        last_ping = Instant::now();
                    }
                    self.seen.push(m);
                }
                Err(_) => {
                    if last_ping.elapsed() >= quiet {
                        return;
                    }
                }
            }
        }
        panic!("WATCHDOG=1 never stopped for {quiet:?}");
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon under test.

struct Daemon {
    child: Child,
    stderr: PathBuf,
}

/// A command for the binary with a clean environment: none of the settings the developer's shell
/// or a systemd session may carry.
fn command(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--state-dir")
        .arg(dir.join("state"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null());
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("TINYSCHEDULER_")
            || matches!(
                k.as_str(),
                "NOTIFY_SOCKET" | "WATCHDOG_USEC" | "WATCHDOG_PID" | "RUST_LOG"
            )
        {
            c.env_remove(k);
        }
    }
    c
}

impl Daemon {
    /// `run --daemon ARGS` with stderr (not a terminal) going to a file; notifications to
    /// `systemd` when given, with a 1 s watchdog.
    fn start(dir: &Path, systemd: Option<&Systemd>, args: &[&str]) -> Daemon {
        let n = std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("daemon-"))
            })
            .count();
        let stderr = dir.join(format!("daemon-{n}.err"));
        let mut all = vec!["run", "--daemon"];
        all.extend_from_slice(args);
        let mut c = command(dir, &all);
        c.stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap());
        if let Some(s) = systemd {
            c.env("NOTIFY_SOCKET", &s.path)
                .env("WATCHDOG_USEC", "1000000");
        }
        Daemon {
            child: c.spawn().expect("spawn the daemon"),
            stderr,
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).unwrap();
    }

    /// Waits for the daemon to exit by itself.
    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + LONG;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the daemon did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Every stderr line, each of which must be a JSON object.
    fn log_lines(&self) -> Vec<serde_json::Value> {
        self.stderr()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))
            })
            .collect()
    }

    /// The address `--http 127.0.0.1:0` bound, from the daemon's log line saying so.
    fn http_addr(&self) -> SocketAddr {
        let deadline = Instant::now() + LONG;
        loop {
            for line in self.stderr().lines() {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                    if let Some(a) = v["address"].as_str() {
                        return a.parse().unwrap();
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no HTTP address logged: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit status.
    fn stop(mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait_exit()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = kill(self.pid(), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// State, agents and the gate they wait on.

/// A temporary directory holding `state/`, the agents' gate file and their run records.
struct World {
    dir: tempfile::TempDir,
    store: Store,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("state")).unwrap();
        std::fs::create_dir(dir.path().join("runs")).unwrap();
        store
            .create(&Queue::new("Queue", "default", QueueSpec::default()))
            .unwrap();
        World { dir, store }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// An agent in queue `default` running `command`.
    fn agent(&self, name: &str, slots: i64, command: &[&str]) {
        let spec = AgentSpec {
            queue: Some("default".into()),
            max_concurrency: slots,
            command: command.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        self.store.create(&Agent::new("Agent", name, spec)).unwrap();
    }

    /// An agent whose runs append their pid to `runs/<task>` and then wait for the gate.
    fn gated_agent(&self, name: &str, slots: i64) {
        let dir = self.path().display().to_string();
        let script = format!(
            "echo $$ >> {dir}/runs/{{{{task.name}}}}; while [ ! -e {dir}/gate ] && [ -d {dir} ]; do sleep 0.05; done"
        );
        self.agent(name, slots, &["/bin/sh", "-c", &script]);
    }

    fn open_gate(&self) {
        std::fs::write(self.path().join("gate"), "").unwrap();
    }

    /// How many times the agent started for `task`.
    fn runs_of(&self, task: &str) -> usize {
        std::fs::read_to_string(self.path().join("runs").join(task))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    fn task(&self, name: &str) {
        let spec = TaskSpec {
            queue: Some("default".into()),
            ..Default::default()
        };
        self.store.create(&Task::new("Task", name, spec)).unwrap();
    }

    fn task_phase(&self, name: &str) -> Option<TaskPhase> {
        self.store
            .try_get::<Task>(name)
            .unwrap()
            .map(|t| t.status.phase)
    }

    fn wait_until(&self, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + LONG;
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_phase(&self, name: &str, phase: TaskPhase) {
        self.wait_until(&format!("task/{name} {phase:?}"), || {
            self.task_phase(name) == Some(phase)
        });
    }

    fn running_leases(&self) -> Vec<Lease> {
        self.store
            .list::<Lease>(None)
            .unwrap()
            .items
            .into_iter()
            .filter(|l| l.status.phase == LeasePhase::Running && l.status.pid.is_some())
            .collect()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Let every gated agent finish; kill (by recorded group) any that is somehow still there.
        let _ = std::fs::write(self.path().join("gate"), "");
        std::thread::sleep(Duration::from_millis(200));
        if let Ok(list) = self.store.list::<Lease>(None) {
            for l in list.items {
                if let (Some(pid), Some(st), Some(pgid)) =
                    (l.status.pid, l.status.process_start_time, l.status.pgid)
                {
                    if pgid > 1 && is_alive(pid, st) {
                        let _ = kill(Pid::from_raw(-pgid), Signal::SIGKILL);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP and the Prometheus text format.

struct Reply {
    status: u16,
    content_type: String,
    body: String,
}

fn get(addr: SocketAddr, path: &str) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(LONG)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP reply");
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let content_type = lines
        .filter_map(|l| l.split_once(": "))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.to_string())
        .unwrap_or_default();
    Reply {
        status,
        content_type,
        body: body.to_string(),
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A scrape, parsed and checked against the text format 0.0.4.
struct Scrape {
    samples: Vec<Sample>,
    types: BTreeMap<String, String>,
}

fn valid_metric_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().map_err(|e| format!("bad value {s:?}: {e}")),
    }
}

/// `{a="x",b="y\"z"}` → the labels and what follows the closing brace.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').unwrap();
    loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("label without =")?;
        let name = rest[..eq].trim();
        if !valid_metric_name(name) || name.contains(':') {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next().ok_or("unterminated label value")? {
                (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                    'n' => value.push('\n'),
                    c @ ('\\' | '"') => value.push(c),
                    c => return Err(format!("bad escape \\{c}")),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} twice"));
        }
        rest = &rest[end + 1..];
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return Err("labels not separated by commas".into());
        }
    }
}

/// The family a sample belongs to: a histogram's `_bucket`, `_sum` and `_count` series belong to
/// the histogram.
fn family_of<'a>(name: &'a str, types: &BTreeMap<String, String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if types
                .get(base)
                .is_some_and(|t| t == "histogram" || t == "summary")
            {
                return base;
            }
        }
    }
    name
}

fn parse_prometheus(text: &str) -> Result<Scrape, String> {
    let mut samples = Vec::new();
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helps: BTreeMap<String, String> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let err = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(c) = line.strip_prefix('#') {
            let mut parts = c.trim_start().splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("HELP"), Some(name), help) => {
                    if !valid_metric_name(name) {
                        return Err(err("bad metric name in HELP".into()));
                    }
                    if helps
                        .insert(name.into(), help.unwrap_or("").into())
                        .is_some()
                    {
                        return Err(err("second HELP for a family".into()));
                    }
                }
                (Some("TYPE"), Some(name), Some(t)) => {
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&t) {
                        return Err(err(format!("unknown type {t}")));
                    }
                    if samples
                        .iter()
                        .any(|s: &Sample| family_of(&s.name, &types) == name)
                    {
                        return Err(err("TYPE after the family's samples".into()));
                    }
                    if types.insert(name.into(), t.into()).is_some() {
                        return Err(err("second TYPE for a family".into()));
                    }
                }
                _ => {} // any other comment
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| err("no value".into()))?;
        let name = &line[..name_end];
        if !valid_metric_name(name) {
            return Err(err("bad metric name".into()));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(err)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut fields = rest.split_whitespace();
        let value =
            parse_value(fields.next().ok_or_else(|| err("no value".into()))?).map_err(err)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().map_err(|_| err("bad timestamp".into()))?;
        }
        if fields.next().is_some() {
            return Err(err("trailing text".into()));
        }
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    // Histograms: cumulative buckets ending in +Inf, which equals _count.
    for (family, t) in &types {
        if t != "histogram" {
            continue;
        }
        let mut series: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
        for s in samples
            .iter()
            .filter(|s| s.name == format!("{family}_bucket"))
        {
            let mut key = s.labels.clone();
            let le = key
                .remove("le")
                .ok_or(format!("{family}_bucket without le"))?;
            series
                .entry(key)
                .or_default()
                .push((parse_value(&le)?, s.value));
        }
        for (key, buckets) in series {
            if buckets
                .windows(2)
                .any(|w| w[0].0 >= w[1].0 || w[0].1 > w[1].1)
            {
                return Err(format!(
                    "{family}{key:?}: buckets not cumulative: {buckets:?}"
                ));
            }
            let inf = buckets.last().filter(|b| b.0.is_infinite()).map(|b| b.1);
            let count = samples
                .iter()
                .find(|s| s.name == format!("{family}_count") && s.labels == key)
                .map(|s| s.value);
            if inf.is_none() || inf != count {
                return Err(format!(
                    "{family}{key:?}: +Inf bucket {inf:?} != count {count:?}"
                ));
            }
        }
    }
    for s in &samples {
        let family = family_of(&s.name, &types);
        if !types.contains_key(family) {
            return Err(format!("sample {} has no TYPE", s.name));
        }
    }
    Ok(Scrape { samples, types })
}

impl Scrape {
    /// The sum of every `name` series whose labels include `with`.
    fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                with.iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    fn has(&self, name: &str, with: &[(&str, &str)]) -> bool {
        self.samples.iter().any(|s| {
            s.name == name
                && with
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }
}

fn scrape(addr: SocketAddr) -> Scrape {
    let r = get(addr, "/metrics");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.content_type, "text/plain; version=0.0.4; charset=utf-8");
    parse_prometheus(&r.body).unwrap_or_else(|e| panic!("{e}\n{}", r.body))
}

fn wait_ready(addr: SocketAddr) {
    let deadline = Instant::now() + LONG;
    while get(addr, "/readyz").status != 200 {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn the_prometheus_parser_accepts_the_text_format_and_refuses_what_it_must() {
    let ok = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\\n\"} 3\n\
              # TYPE h histogram\nh_bucket{le=\"0.5\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.7\nh_count 2\n";
    let s = parse_prometheus(ok).unwrap();
    assert_eq!(s.sum("a_total", &[("y", "q\"\n")]), 3.0);
    assert_eq!(s.types["h"], "histogram");
    for bad in [
        "a 1\n",                                                    // no TYPE
        "# TYPE a gauge\na{x=1} 1\n",                               // unquoted label
        "# TYPE a gauge\na one\n",                                  // bad value
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 3\n", // +Inf != count
        "# TYPE a gauge\n# TYPE a gauge\na 1\n",                    // TYPE twice
    ] {
        assert!(parse_prometheus(bad).is_err(), "accepted {bad:?}");
    }
}

#[test]
fn ready_comes_only_once_synced_and_locked_then_status_watchdog_reload_and_stopping_follow() {
    let w = World::new();
    w.task("waiting"); // no agent serves it: it stays queued
    let mut systemd = Systemd::new();
    let mut d = Daemon::start(w.path(), Some(&systemd), &["--http", "127.0.0.1:0"]);

    let ready = systemd.wait_for(0, "READY=1", |m| m == "READY=1");
    // By READY=1 the daemon holds the instance lock ...
    let second = command(w.path(), &["run", "--once"]).output().unwrap();
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("another scheduler holds the lock")
            && err.contains(&format!("pid {}", d.child.id())),
        "{err}"
    );
    // ... and its caches are synced.
    let r = get(d.http_addr(), "/readyz?verbose");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("[+]informers-synced ok\n"), "{}", r.body);
    assert!(r.body.contains("[+]lock ok\n"), "{}", r.body);

    systemd.wait_for(ready, "STATUS=", |m| {
        m == "STATUS=0 running, 1 queued, 0 failed"
    });
    let mut at = ready;
    for _ in 0..3 {
        at = systemd.wait_for(at + 1, "WATCHDOG=1", |m| m == "WATCHDOG=1");
    }

    d.signal(Signal::SIGHUP);
    let reloading = systemd.wait_for(at + 1, "RELOADING=1", |m| {
        m.starts_with("RELOADING=1\nMONOTONIC_USEC=")
    });
    systemd.wait_for(reloading + 1, "READY=1 after the reload", |m| {
        m == "READY=1"
    });

    d.signal(Signal::SIGTERM);
    systemd.wait_for(reloading + 1, "STOPPING=1", |m| m == "STOPPING=1");
    assert_eq!(d.wait_exit().code(), Some(0), "{}", d.stderr());
    // The lock died with it.
    let again = command(w.path(), &["run", "--once"]).output().unwrap();
    assert_eq!(again.status.code(), Some(0), "{again:?}");
}

#[test]
fn a_loop_stuck_behind_the_store_lock_withholds_watchdog_pings_until_it_moves_again() {
    let w = World::new();
    w.agent("worker", 1, &["true"]);
    let mut systemd = Systemd::new();
    let d = Daemon::start(w.path(), Some(&systemd), &["--http", "127.0.0.1:0"]);
    let ready = systemd.wait_for(0, "READY=1", |m| m == "READY=1");
    let addr = d.http_addr();
    let ping = systemd.wait_for(ready, "WATCHDOG=1", |m| m == "WATCHDOG=1");
    systemd.wait_for(ping + 1, "WATCHDOG=1", |m| m == "WATCHDOG=1");

    // A task that becomes runnable a little later: by then this test holds the store's write lock
    // (the flock every store write takes), so the assignment loop blocks on its first write.
    let due = SystemTime::now() + Duration::from_secs(3);
    let mut t = Task::new(
        "Task",
        "later",
        TaskSpec {
            queue: Some("default".into()),
            ..Default::default()
        },
    );
    t.status.next_attempt_after = Some(format_time(due));
    w.store.create(&t).unwrap();
    let lock_file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(w.path().join("state/store.lock"))
        .unwrap();
    let held = Flock::lock(lock_file, FlockArg::LockExclusive).unwrap();
    assert_eq!(
        w.task_phase("later"),
        Some(TaskPhase::Pending),
        "the task was assigned before the lock was taken: the test's premise failed"
    );

    while SystemTime::now() < due {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Four watchdog intervals without a ping: the daemon is stalled and says so.
    systemd.wait_for_watchdog_silence(Duration::from_secs(2));
    // Only the loop is stuck, not the process: the endpoints answer, and it logs why it is quiet.
    let r = get(addr, "/healthz?verbose");
    assert_eq!(r.status, 200, "{}", r.body);
    w.wait_until("the watchdog's warning", || {
        d.stderr().contains("withholding WATCHDOG=1")
    });
    assert_eq!(w.task_phase("later"), Some(TaskPhase::Pending));
    let before = systemd.seen.len();

    drop(held);
    systemd.wait_for(before, "WATCHDOG=1 after the lock was released", |m| {
        m == "WATCHDOG=1"
    });
    w.wait_phase("later", TaskPhase::Succeeded);
    let more = systemd.collect_for(Duration::from_millis(1500));
    assert!(
        more.iter().any(|m| m == "WATCHDOG=1"),
        "pings did not keep coming: {more:?}"
    );
    let log = d.stderr();
    assert!(
        log.contains("withholding WATCHDOG=1") && log.contains("resuming watchdog pings"),
        "{log}"
    );
    assert_eq!(d.stop().code(), Some(0));
}

#[test]
fn metrics_parse_as_prometheus_text_and_move_as_tasks_run_and_health_endpoints_answer() {
    let w = World::new();
    w.agent("worker", 2, &["true"]);
    let d = Daemon::start(w.path(), None, &["--http", "127.0.0.1:0"]);
    let addr = d.http_addr();
    wait_ready(addr);

    let r = get(addr, "/healthz");
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));
    let r = get(addr, "/readyz");
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));
    let r = get(addr, "/readyz?verbose");
    assert_eq!(r.status, 200);
    for line in [
        "[+]ping ok",
        "[+]reconcile-loop ok",
        "[+]informers-synced ok",
        "[+]lock ok",
        "readyz check passed",
    ] {
        assert!(r.body.lines().any(|l| l == line), "{line} in {}", r.body);
    }

    let before = scrape(addr);
    assert_eq!(
        before.types["tinyscheduler_reconcile_total"], "counter",
        "{:?}",
        before.types
    );
    assert_eq!(before.types["tinyscheduler_reclaims_total"], "counter");
    assert_eq!(
        before.types["tinyscheduler_dispatch_latency_seconds"],
        "histogram"
    );
    for reason in [
        "heartbeat",
        "max-runtime",
        "lost",
        "task-deleted",
        "never-started",
    ] {
        assert!(
            before.has("tinyscheduler_reclaims_total", &[("reason", reason)]),
            "reclaims_total{{reason={reason}}} is exported from the start"
        );
    }
    assert_eq!(
        before.sum("tinyscheduler_dispatch_latency_seconds_count", &[]),
        0.0
    );
    assert_eq!(
        before.sum("tinyscheduler_tasks", &[("phase", "Succeeded")]),
        0.0
    );
    let lease_reconciles =
        |s: &Scrape| s.sum("tinyscheduler_reconcile_total", &[("controller", "lease")]);
    let lease_before = lease_reconciles(&before);

    for name in ["one", "two", "three"] {
        w.task(name);
    }
    let deadline = Instant::now() + LONG;
    let after = loop {
        let s = scrape(addr);
        if s.sum("tinyscheduler_tasks", &[("phase", "Succeeded")]) == 3.0 {
            break s;
        }
        assert!(Instant::now() < deadline, "tasks never succeeded");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        lease_reconciles(&after) > lease_before,
        "lease reconciles did not move: {lease_before} -> {}",
        lease_reconciles(&after)
    );
    assert!(
        after.sum(
            "tinyscheduler_reconcile_total",
            &[("controller", "assignment")]
        ) > before.sum(
            "tinyscheduler_reconcile_total",
            &[("controller", "assignment")]
        )
    );
    assert_eq!(
        after.sum("tinyscheduler_dispatch_latency_seconds_count", &[]),
        3.0,
        "one dispatch measured per started run"
    );
    assert_eq!(after.sum("tinyscheduler_reclaims_total", &[]), 0.0);
    assert_eq!(d.stop().code(), Some(0));
}

#[test]
fn a_run_whose_task_is_deleted_is_reclaimed_and_counted_under_its_reason() {
    let w = World::new();
    w.gated_agent("worker", 1);
    let d = Daemon::start(w.path(), None, &["--http", "127.0.0.1:0"]);
    let addr = d.http_addr();
    wait_ready(addr);
    w.task("doomed");
    w.wait_until("the run to start", || w.running_leases().len() == 1);
    let lease = w.running_leases().remove(0);
    let (pid, start) = (
        lease.status.pid.unwrap(),
        lease.status.process_start_time.unwrap(),
    );

    w.store.delete::<Task>("doomed", None).unwrap();
    let deadline = Instant::now() + LONG;
    loop {
        let s = scrape(addr);
        if s.sum(
            "tinyscheduler_reclaims_total",
            &[("reason", "task-deleted")],
        ) == 1.0
        {
            assert_eq!(s.sum("tinyscheduler_reclaims_total", &[]), 1.0);
            break;
        }
        assert!(Instant::now() < deadline, "the reclaim was never counted");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !is_alive(pid, start),
        "the reclaimed agent was killed first"
    );
    assert_eq!(w.runs_of("doomed"), 1);
    assert_eq!(d.stop().code(), Some(0));
}

#[test]
fn sigterm_leaves_running_agents_alive_and_the_next_daemon_adopts_them_without_running_any_twice() {
    let w = World::new();
    w.gated_agent("worker", 2);
    w.task("first");
    w.task("second");
    let first = Daemon::start(w.path(), None, &[]);
    w.wait_until("both runs to start", || {
        w.running_leases().len() == 2
            && ["first", "second"]
                .iter()
                .all(|t| w.task_phase(t) == Some(TaskPhase::Running))
    });
    let runs: Vec<(String, i32, u64)> = w
        .running_leases()
        .iter()
        .map(|l| {
            (
                l.spec.task.clone(),
                l.status.pid.unwrap(),
                l.status.process_start_time.unwrap(),
            )
        })
        .collect();

    let status = first.stop();
    assert_eq!(status.code(), Some(0), "clean exit with agents running");
    for (task, pid, start) in &runs {
        assert!(
            is_alive(*pid, *start),
            "the agent of {task} outlived the daemon"
        );
        assert_eq!(w.task_phase(task), Some(TaskPhase::Running));
    }
    assert_eq!(w.running_leases().len(), 2, "the runs' Leases are kept");

    let mut systemd = Systemd::new();
    let second = Daemon::start(w.path(), Some(&systemd), &[]);
    systemd.wait_for(0, "READY=1", |m| m == "READY=1");
    // Adopted, not restarted: the same processes, counted as running.
    systemd.wait_for(0, "STATUS= with the adopted runs", |m| {
        m == "STATUS=2 running, 0 queued, 0 failed"
    });
    for (task, pid, start) in &runs {
        assert!(is_alive(*pid, *start), "the agent of {task} is left alone");
    }
    w.open_gate();
    for (task, _, _) in &runs {
        w.wait_phase(task, TaskPhase::Succeeded);
    }
    for (task, _, _) in &runs {
        let t = w.store.get::<Task>(task).unwrap();
        assert_eq!(t.status.attempts, 1, "{task}: {:?}", t.status);
        assert_eq!(t.status.exit_code, Some(0));
        assert_eq!(w.runs_of(task), 1, "{task} ran once");
    }
    w.wait_until("the Leases to be deleted", || {
        w.store.list::<Lease>(None).unwrap().items.is_empty()
    });
    assert_eq!(second.stop().code(), Some(0));
}

#[test]
fn the_daemon_logs_json_lines_and_its_assigned_line_names_the_task() {
    let w = World::new();
    w.agent("worker", 1, &["true"]);
    w.task("fix-login");
    let d = Daemon::start(w.path(), None, &[]);
    w.wait_phase("fix-login", TaskPhase::Succeeded);
    let d = {
        let mut d = d;
        d.signal(Signal::SIGTERM);
        assert_eq!(d.wait_exit().code(), Some(0));
        d
    };
    let lines = d.log_lines();
    assert!(!lines.is_empty());
    for l in &lines {
        assert!(l["timestamp"].is_string() && l["level"].is_string(), "{l}");
        if l.get("name").is_some() {
            assert!(
                l["kind"].is_string(),
                "a line about an object names its kind: {l}"
            );
        }
    }
    let assigned = lines
        .iter()
        .find(|l| l["reason"] == "Assigned")
        .unwrap_or_else(|| panic!("no Assigned line in {lines:#?}"));
    assert_eq!(assigned["kind"], "Task", "{assigned}");
    assert_eq!(assigned["name"], "fix-login", "{assigned}");
    assert_eq!(assigned["level"], "INFO");
    assert!(
        assigned["message"]
            .as_str()
            .unwrap()
            .contains("assigned to agent/worker"),
        "{assigned}"
    );
}

#[test]
fn an_invalid_log_level_exits_1_with_a_clear_error_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let by_flag = command(dir.path(), &["--log-level", "verbose", "run", "--daemon"])
        .output()
        .unwrap();
    let mut c = command(dir.path(), &["run", "--daemon"]);
    c.env("TINYSCHEDULER_LOG_LEVEL", "verbose");
    let by_env = c.output().unwrap();
    for out in [by_flag, by_env] {
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("error: "), "{err}");
        assert!(err.contains("invalid log level \"verbose\""), "{err}");
        assert!(err.contains("error, warn, info, debug, trace"), "{err}");
        assert_eq!(err.lines().count(), 1, "one clear line: {err}");
    }
    assert!(!dir.path().join("state").exists(), "nothing was created");
}

#[test]
fn tinyscheduler_workers_sets_how_many_threads_the_lease_and_reclaim_controllers_run() {
    let w = World::new();
    let err = w.path().join("workers.err");
    let mut child = command(w.path(), &["run", "--daemon"])
        .env("TINYSCHEDULER_WORKERS", "2")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let threads = |prefix: &str| -> Vec<String> {
        let dir = format!("/proc/{}/task", child.id());
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                    .map(|c| c.trim().to_string())
                    .filter(|c| c.starts_with(prefix))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    };
    let deadline = Instant::now() + LONG;
    while !std::fs::read_to_string(&err).is_ok_and(|e| e.contains("scheduler running")) {
        assert!(
            Instant::now() < deadline,
            "not running: {:?}",
            std::fs::read_to_string(&err)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (lease, reclaim) = (threads("lease-"), threads("reclaim-"));
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let _ = child.wait();
    assert_eq!(lease, ["lease-0", "lease-1"]);
    assert_eq!(reclaim, ["reclaim-0", "reclaim-1"]);
}

/// Makes the Task list fail for as long as `objects/tasks` is a file, not a directory; its path.
fn tasks_not_a_directory(w: &World) -> PathBuf {
    let tasks = w.path().join("state/objects/tasks");
    let _ = std::fs::remove_dir_all(&tasks);
    std::fs::write(&tasks, "not a directory").unwrap();
    tasks
}

#[test]
fn run_once_whose_store_cannot_be_listed_fails_at_once_naming_the_kind_and_the_path() {
    let w = World::new();
    let tasks = tasks_not_a_directory(&w);
    let mut child = command(w.path(), &["run", "--once"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + LONG;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("run --once waits for a list that keeps failing");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "error: cannot list tasks: {}: Not a directory",
            tasks.display()
        )),
        "{err}"
    );
}

#[test]
fn sigterm_while_the_caches_cannot_load_stops_the_daemon_with_0() {
    let w = World::new();
    tasks_not_a_directory(&w);
    let mut systemd = Systemd::new();
    let mut d = Daemon::start(w.path(), Some(&systemd), &[]);
    // Up (the lock held, the Task list failing) but never ready.
    let holder = w.path().join("state/scheduler.holder");
    let pid = format!("pid {}", d.pid());
    let deadline = Instant::now() + LONG;
    while !(std::fs::read_to_string(&holder).is_ok_and(|h| h.contains(&pid))
        && d.stderr().contains("informer"))
    {
        assert!(Instant::now() < deadline, "no failing list: {}", d.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", d.stderr());
    systemd.collect_for(Duration::from_millis(200));
    assert!(
        systemd.seen.iter().any(|m| m.contains("STOPPING=1")),
        "{:?}",
        systemd.seen
    );
    assert!(
        !systemd.seen.iter().any(|m| m.contains("READY=1")),
        "READY=1 from a daemon that never loaded its caches: {:?}",
        systemd.seen
    );
}

#[test]
fn a_taken_http_port_stops_the_daemon_with_1_before_it_starts_anything() {
    let w = World::new();
    w.gated_agent("worker", 1);
    w.task("waiting");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = command(w.path(), &["run", "--daemon", "--http", &addr])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!("error: --http {addr}: listen on {addr}")),
        "{err}"
    );
    // No controller ran: not a line of their logs, nothing assigned, no agent started.
    assert_eq!(err.lines().count(), 1, "one clear line: {err}");
    assert_eq!(w.task_phase("waiting"), Some(TaskPhase::Pending));
    assert!(w.store.list::<Lease>(None).unwrap().items.is_empty());
    assert_eq!(w.runs_of("waiting"), 0);
}

#[test]
fn a_daemon_whose_state_directory_is_removed_stops_with_1_rather_than_run_beside_a_new_one() {
    let w = World::new();
    let systemd = Systemd::new();
    let mut d = Daemon::start(w.path(), Some(&systemd), &[]);
    let mut systemd = systemd;
    systemd.wait_for(0, "READY=1", |m| m == "READY=1");
    // The daemon may write into the directory while it is being removed (a file appearing in a
    // directory being emptied fails the removal with ENOTEMPTY): remove until it is gone.
    let state = w.path().join("state");
    let deadline = Instant::now() + LONG;
    loop {
        match std::fs::remove_dir_all(&state) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
            Err(e) if Instant::now() < deadline => {
                eprintln!("removing {}: {e}; again", state.display());
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("cannot remove {}: {e}", state.display()),
        }
    }
    let status = d.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", d.stderr());
    assert!(
        d.stderr().contains("lost the instance lock"),
        "{}",
        d.stderr()
    );
    // A scheduler on the directory made again is the only one.
    let again = command(w.path(), &["run", "--once"]).output().unwrap();
    assert_eq!(again.status.code(), Some(0), "{again:?}");
}

#[test]
fn a_ready_notification_systemd_cannot_get_is_logged() {
    let w = World::new();
    let stderr = w.path().join("daemon-lost-notify.err");
    let mut child = command(w.path(), &["run", "--daemon"])
        .env("NOTIFY_SOCKET", w.path().join("no-such.sock"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + LONG;
    while !std::fs::read_to_string(&stderr)
        .unwrap_or_default()
        .contains("could not send READY=1")
    {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "no warning: {}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
