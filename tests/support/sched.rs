//! Fixtures for the scheduler tests: a state directory seeded through the Store API, agents that
//! are small `sh -c` scripts, the real binary as `run --once` or a `run --daemon` child, and
//! cleanup that stops every process the test started — by pid, never by name.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tinyscheduler::resources::{
    Agent, AgentSpec, Lease, Queue, QueueSpec, Task, TaskPhase, TaskSpec,
};
use tinyscheduler::store::Store;

use crate::support::{Env, Run};

/// A generous bound for anything a test waits on.
pub const LONG: Duration = Duration::from_secs(60);

/// The environment every scheduler this fixture starts gets: fast retries and kills.
pub const FAST_ENV: &[(&str, &str)] = &[
    ("TINYSCHEDULER_RETRY_BASE_SEC", "0.2"),
    ("TINYSCHEDULER_RETRY_MAX_SEC", "5"),
    ("TINYSCHEDULER_KILL_GRACE_SEC", "0.5"),
    ("TINYSCHEDULER_LOG_LEVEL", "info"),
];

/// A scheduler test: temp state, the processes it started, and a unique token that every agent
/// carries in its argv so that an observer can find exactly this test's agents in /proc.
pub struct Sched {
    pub env: Env,
    pub store: Store,
    pub token: String,
    pub extra_env: Vec<(String, String)>,
    daemons: Vec<Child>,
    others: Vec<Child>,
    /// Processes that are not this test's children (left behind by an agent), with their start
    /// times, to kill at the end if still the same process.
    strays: Vec<(i32, u64)>,
}

impl Sched {
    pub fn new() -> Sched {
        let env = Env::new();
        let store = Store::open(env.state()).unwrap();
        std::fs::create_dir_all(env.tmp.path().join("out")).unwrap();
        let token = format!(
            "tstok{}x{}",
            std::process::id(),
            fastrand::u64(1_000_000..u64::MAX)
        );
        Sched {
            env,
            store,
            token,
            extra_env: Vec::new(),
            daemons: Vec::new(),
            others: Vec::new(),
            strays: Vec::new(),
        }
    }

    /// `<tmp>/out/<name>`: where agents write what the test reads.
    pub fn out(&self, name: &str) -> PathBuf {
        self.env.tmp.path().join("out").join(name)
    }

    pub fn read_out(&self, name: &str) -> String {
        std::fs::read_to_string(self.out(name)).unwrap_or_default()
    }

    pub fn lines(&self, name: &str) -> Vec<String> {
        self.read_out(name).lines().map(str::to_string).collect()
    }

    pub fn queue(&self, name: &str) {
        self.store
            .create(&Queue::new("Queue", name, QueueSpec::default()))
            .unwrap();
    }

    /// An Agent in queue `default` running `sh -c SCRIPT <token>-<agent>`. Every agent appends its
    /// pid to `out/pids` first (so that cleanup can find it) and exports `OUT` (the out dir).
    pub fn agent(&self, name: &str, max: i64, script: &str) -> Agent {
        self.agent_with(name, max, script, |_| {})
    }

    pub fn agent_with(
        &self,
        name: &str,
        max: i64,
        script: &str,
        f: impl FnOnce(&mut AgentSpec),
    ) -> Agent {
        let out = self.env.tmp.path().join("out");
        // The trailing `exit` keeps dash from exec-ing the last command in place of the shell.
        let body = format!("echo $$ >> \"$OUT/pids\"\n{script}\nexit $?");
        let mut spec = AgentSpec {
            queue: Some("default".into()),
            max_concurrency: max,
            command: vec![
                "sh".into(),
                "-c".into(),
                body,
                format!("{}-{name}", self.token),
            ],
            heartbeat_seconds: 1,
            max_runtime_seconds: 600,
            env: BTreeMap::from([("OUT".to_string(), out.display().to_string())]),
            ..Default::default()
        };
        f(&mut spec);
        self.store.create(&Agent::new("Agent", name, spec)).unwrap()
    }

    pub fn task(&self, name: &str) -> Task {
        self.task_with(name, |_| {})
    }

    pub fn task_with(&self, name: &str, f: impl FnOnce(&mut TaskSpec)) -> Task {
        let mut spec = TaskSpec {
            queue: Some("default".into()),
            ..Default::default()
        };
        f(&mut spec);
        self.store.create(&Task::new("Task", name, spec)).unwrap()
    }

    pub fn get_task(&self, name: &str) -> Task {
        self.store.get::<Task>(name).unwrap()
    }

    pub fn phase(&self, name: &str) -> TaskPhase {
        self.get_task(name).status.phase
    }

    pub fn tasks(&self) -> Vec<Task> {
        self.store.list::<Task>(None).unwrap().items
    }

    pub fn leases(&self) -> Vec<Lease> {
        self.store.list::<Lease>(None).unwrap().items
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = self.env.cmd(args);
        for (k, v) in FAST_ENV {
            c.env(k, v);
        }
        for (k, v) in &self.extra_env {
            c.env(k, v);
        }
        c
    }

    /// Runs the binary to completion.
    pub fn run(&self, args: &[&str]) -> Run {
        self.cmd(args).output().expect("run binary").into()
    }

    /// Starts `run --daemon` (plus `extra` args), stderr to `out/daemon-N.log`, stdout to
    /// `out/daemon-N.out`. Returns its pid.
    pub fn daemon(&mut self, extra: &[&str]) -> u32 {
        let n = self.daemons.len();
        let mut args = vec!["run", "--daemon"];
        args.extend_from_slice(extra);
        let err = std::fs::File::create(self.out(&format!("daemon-{n}.log"))).unwrap();
        let out = std::fs::File::create(self.out(&format!("daemon-{n}.out"))).unwrap();
        let child = self
            .cmd(&args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn daemon");
        let pid = child.id();
        self.daemons.push(child);
        pid
    }

    /// Sends `sig` to daemon `pid` and waits for it; returns its exit code (-1 for a signal).
    pub fn stop_daemon(&mut self, pid: u32, sig: Signal) -> i32 {
        let i = self
            .daemons
            .iter()
            .position(|c| c.id() == pid)
            .expect("a daemon of this test");
        let mut child = self.daemons.remove(i);
        let _ = kill(Pid::from_raw(pid as i32), sig);
        let deadline = Instant::now() + LONG;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("daemon {pid} did not exit on {sig}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for `child` (spawned from [`Sched::cmd`]) to end by itself and returns its output.
    /// A child still running after [`LONG`] is a hang: it is kept for the fixture to kill, and
    /// the test fails with `hang`.
    pub fn ends_by_itself(&mut self, mut child: Child, what: &str, hang: &str) -> Output {
        let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_for(what, LONG, || child.try_wait().unwrap().is_some())
        }));
        if waited.is_err() {
            self.keep(child);
            panic!("{hang}");
        }
        child.wait_with_output().unwrap()
    }

    /// Keeps a helper process to kill at the end.
    pub fn keep(&mut self, child: Child) {
        self.others.push(child);
    }

    /// Keeps a process that is not a child of the test (an agent's leftover) to kill at the end,
    /// unless it is gone by then (its pid is checked against its start time first).
    pub fn keep_pid(&mut self, pid: i32) {
        if let Some(st) = tinyscheduler::agent::liveness::start_time_of(pid) {
            self.strays.push((pid, st));
        }
    }

    /// Waits until every task is Succeeded or Failed.
    pub fn wait_all_finished(&self, timeout: Duration) {
        wait_for("every task to finish", timeout, || {
            self.tasks().iter().all(|t| t.status.phase.is_finished())
        });
    }

    pub fn wait_phase(&self, task: &str, phase: TaskPhase, timeout: Duration) {
        wait_for(&format!("task/{task} to be {phase:?}"), timeout, || {
            self.store
                .try_get::<Task>(task)
                .unwrap()
                .is_some_and(|t| t.status.phase == phase)
        });
    }

    /// The daemon logs, for assertion messages.
    pub fn daemon_logs(&self) -> String {
        (0..8)
            .map(|n| self.read_out(&format!("daemon-{n}.log")))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Sched {
    fn drop(&mut self) {
        for mut c in self.daemons.drain(..).chain(self.others.drain(..)) {
            let _ = c.kill();
            let _ = c.wait();
        }
        for (pid, st) in self.strays.drain(..) {
            if tinyscheduler::agent::liveness::is_alive(pid, st) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        // Shims of live leases, then every agent's group (each agent leads its own group).
        if let Ok(list) = self.store.list::<Lease>(None) {
            for l in list.items {
                if let (Some(p), Some(st)) = (l.status.shim_pid, l.status.shim_start_time) {
                    if tinyscheduler::agent::liveness::is_alive(p, st) {
                        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                    }
                }
            }
        }
        for pid in pids_in(&self.out("pids")) {
            if agent_pid_is_ours(pid, &self.token) {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

/// The reasons of `task`'s events, oldest first (in the order they were written).
pub fn story(s: &Sched, task: &str) -> Vec<String> {
    let mut evs: Vec<tinyscheduler::resources::Event> = s
        .store
        .list::<tinyscheduler::resources::Event>(None)
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.spec.involved_object.name == task)
        .collect();
    evs.sort_by_key(|e| e.metadata.resource_version.parse::<u64>().unwrap_or(0));
    evs.into_iter().map(|e| e.spec.reason).collect()
}

/// Pids listed one per line in `path`.
pub fn pids_in(path: &Path) -> Vec<i32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// True if `pid` is still the agent shell of this test (its argv carries the token), so a
/// recycled pid is never signalled.
fn agent_pid_is_ours(pid: i32, token: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(token))
        .unwrap_or(false)
}

/// Alive and not a zombie.
pub fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// The process group of `pid` if it is alive and not a zombie.
pub fn live_pgid(pid: i32) -> Option<i32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut f = s.rsplit_once(')')?.1.split_whitespace();
    let state = f.next()?;
    if matches!(state, "Z" | "X") {
        return None;
    }
    f.nth(1)?.parse().ok()
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Counts this test's live agent shells per agent by scanning /proc, from a thread, and keeps the
/// maximum seen for each agent.
pub struct Observer {
    stop: Arc<AtomicBool>,
    max: Arc<Mutex<BTreeMap<String, usize>>>,
    handle: Option<std::thread::JoinHandle<()>>,
    pub samples: Arc<std::sync::atomic::AtomicU64>,
}

impl Observer {
    pub fn start(token: &str) -> Observer {
        let stop = Arc::new(AtomicBool::new(false));
        let max: Arc<Mutex<BTreeMap<String, usize>>> = Default::default();
        let samples = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (s, m, n, tok) = (
            stop.clone(),
            max.clone(),
            samples.clone(),
            token.to_string(),
        );
        let handle = std::thread::spawn(move || {
            let prefix = format!("{tok}-");
            while !s.load(Ordering::Relaxed) {
                // Distinct process groups per agent: each run leads its own group, and a shell's
                // forked child carries the shell's argv until it execs.
                let mut groups: BTreeMap<String, std::collections::BTreeSet<i32>> = BTreeMap::new();
                if let Ok(rd) = std::fs::read_dir("/proc") {
                    for e in rd.flatten() {
                        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok())
                        else {
                            continue;
                        };
                        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                            continue;
                        };
                        // argv: sh -c SCRIPT <token>-<agent>
                        let Some(last) = cmd.split(|b| *b == 0).rfind(|a| !a.is_empty()) else {
                            continue;
                        };
                        let last = String::from_utf8_lossy(last);
                        if let Some(agent) = last.strip_prefix(&prefix) {
                            if let Some(pgid) = live_pgid(pid) {
                                groups.entry(agent.to_string()).or_default().insert(pgid);
                            }
                        }
                    }
                }
                let mut m = m.lock().unwrap();
                for (a, c) in groups.into_iter().map(|(a, g)| (a, g.len())) {
                    let e = m.entry(a).or_default();
                    *e = (*e).max(c);
                }
                n.fetch_add(1, Ordering::Relaxed);
                drop(m);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Observer {
            stop,
            max,
            handle: Some(handle),
            samples,
        }
    }

    /// Stops observing and returns the maximum number of live agents seen per agent.
    pub fn finish(mut self) -> BTreeMap<String, usize> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.max.lock().unwrap().clone()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A Task's creation time moves in whole seconds: wait for the next one so that `age` orders.
pub fn next_second() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    std::thread::sleep(Duration::from_nanos(
        1_000_000_000 - now.subsec_nanos() as u64 + 20_000_000,
    ));
}
