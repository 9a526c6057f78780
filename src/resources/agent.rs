//! Agent: a command that can run tasks, with a concurrency limit.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::meta::{Condition, Object};

/// An agent: pool membership, limits and the argv template it runs.
pub type Agent = Object<AgentSpec, AgentStatus>;
crate::impl_resource!(Agent, "Agent", "agents");

/// Default `maxConcurrency`.
pub const DEFAULT_MAX_CONCURRENCY: i64 = 1;
/// Default `heartbeatSeconds`.
pub const DEFAULT_HEARTBEAT_SECONDS: i64 = 15;
/// Default `maxRuntimeSeconds`.
pub const DEFAULT_MAX_RUNTIME_SECONDS: i64 = 3600;

/// What the user wants of an agent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentSpec {
    /// The Queue whose pool this agent serves; none means it only runs tasks pinned to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// How many runs may be live at once.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: i64,
    /// The argv template, no shell: `{{task.name}}`, `{{task.params.KEY}}`, … are substituted
    /// per argument. Empty means the Goose default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Directory the agent starts in (default: the scheduler's working directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Extra environment for the agent process.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// How often the shim renews the run's Lease.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_seconds: i64,
    /// A run longer than this is killed and the attempt fails.
    #[serde(default = "default_max_runtime")]
    pub max_runtime_seconds: i64,
    /// A paused agent gets no new tasks; running ones finish.
    #[serde(default)]
    pub paused: bool,
}

fn default_max_concurrency() -> i64 {
    DEFAULT_MAX_CONCURRENCY
}
fn default_heartbeat() -> i64 {
    DEFAULT_HEARTBEAT_SECONDS
}
fn default_max_runtime() -> i64 {
    DEFAULT_MAX_RUNTIME_SECONDS
}

impl Default for AgentSpec {
    fn default() -> Self {
        AgentSpec {
            queue: None,
            max_concurrency: DEFAULT_MAX_CONCURRENCY,
            command: Vec::new(),
            working_dir: None,
            env: BTreeMap::new(),
            heartbeat_seconds: DEFAULT_HEARTBEAT_SECONDS,
            max_runtime_seconds: DEFAULT_MAX_RUNTIME_SECONDS,
            paused: false,
        }
    }
}

/// The Goose command used when an Agent names no command.
pub fn default_goose_command(goose_bin: &str) -> Vec<String> {
    [
        goose_bin,
        "run",
        "--recipe",
        "recipes/{{agent.name}}.yaml",
        "--params",
        "task_id={{task.id}}",
        "--no-session",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// What the controllers observed of an agent.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Runs holding a slot of this agent: live Leases, and runs whose Lease was deleted until
    /// reclaim has ended and recorded them.
    #[serde(default)]
    pub active_leases: i64,
    /// `maxConcurrency` minus those runs (0 when paused).
    #[serde(default)]
    pub free_slots: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
