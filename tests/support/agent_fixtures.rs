//! Fixtures for the agent tests: a temporary state directory with Agents, Tasks and Leases, the
//! real binary, and waiting for conditions with generous timeouts.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tinyscheduler::resources::{Agent, AgentSpec, Lease, LeaseSpec, Task, TaskSpec};
use tinyscheduler::store::Store;

/// The `tinyscheduler` binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tinyscheduler"))
}

pub struct State {
    pub dir: tempfile::TempDir,
    pub store: Store,
}

impl State {
    pub fn new() -> State {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("state")).unwrap();
        State { dir, store }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn agent(&self, name: &str, command: &[&str], heartbeat: i64) -> Agent {
        let spec = AgentSpec {
            command: command.iter().map(|s| s.to_string()).collect(),
            heartbeat_seconds: heartbeat,
            ..Default::default()
        };
        self.agent_with(name, spec)
    }

    pub fn agent_with(&self, name: &str, spec: AgentSpec) -> Agent {
        self.store.create(&Agent::new("Agent", name, spec)).unwrap()
    }

    pub fn task(&self, name: &str, params: &[(&str, serde_json::Value)]) -> Task {
        let spec = TaskSpec {
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect::<BTreeMap<_, _>>(),
            ..Default::default()
        };
        self.store.create(&Task::new("Task", name, spec)).unwrap()
    }

    pub fn lease(&self, task: &str, agent: &str, attempt: i64) -> Lease {
        self.lease_lasting(task, agent, attempt, 60)
    }

    /// [`State::lease`] with a duration of `seconds` (its shim renews at least every third).
    pub fn lease_lasting(&self, task: &str, agent: &str, attempt: i64, seconds: i64) -> Lease {
        let spec = LeaseSpec {
            task: task.into(),
            agent: agent.into(),
            holder_identity: "test/1".into(),
            lease_duration_seconds: seconds,
            max_runtime_seconds: 3600,
            attempt,
            // Empty, as in a Lease of an earlier version: the task's name alone matches it.
            ..Default::default()
        };
        self.store.create(&Lease::new("Lease", task, spec)).unwrap()
    }

    /// An Agent running `command`, a Task and its Lease (attempt 1), all named `name`.
    pub fn run_of(&self, name: &str, command: &[&str]) -> Lease {
        self.agent(name, command, 15);
        self.task(name, &[]);
        self.lease(name, name, 1)
    }

    pub fn get_lease(&self, name: &str) -> Option<Lease> {
        self.store.try_get::<Lease>(name).unwrap()
    }

    /// Runs `tinyscheduler --state-dir D shim --lease NAME` to completion.
    pub fn shim(&self, lease: &str) -> Output {
        self.shim_cmd(lease).output().unwrap()
    }

    pub fn shim_cmd(&self, lease: &str) -> Command {
        let mut c = Command::new(bin());
        c.arg("--state-dir")
            .arg(self.path())
            .args(["shim", "--lease", lease]);
        c
    }

    pub fn log(&self, task: &str, attempt: i64) -> String {
        std::fs::read_to_string(self.path().join(format!("logs/{task}/{attempt}.log")))
            .unwrap_or_default()
    }
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

/// Writes an executable shell script into `dir`.
pub fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

pub const LONG: Duration = Duration::from_secs(30);
