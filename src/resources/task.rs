//! Task: one unit of work for an agent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::meta::{Condition, Object};

/// A task: where it may run, what it waits for, and how its attempts went.
pub type Task = Object<TaskSpec, TaskStatus>;
crate::impl_resource!(Task, "Task", "tasks");

/// Default `maxRetries`.
pub const DEFAULT_MAX_RETRIES: i64 = 3;
/// Annotation holding the remote id of a task reflected from tinytask.
pub const TINYTASK_ID_ANNOTATION: &str = "tinyscheduler.io/tinytask-id";

/// The environment variable that carries param `key` to the agent: `TINYSCHEDULER_PARAM_` and
/// the key in upper case, every character but a letter or digit as `_`.
pub fn param_env_name(key: &str) -> String {
    let key: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("TINYSCHEDULER_PARAM_{key}")
}

/// What the user wants of a task.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TaskSpec {
    /// The queue whose agent pool may run it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Pins the task to one agent (direct mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_to: Option<String>,
    /// Higher runs first.
    #[serde(default)]
    pub priority: i64,
    /// Tasks that must succeed first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocked_by: Vec<String>,
    /// Values for `{{task.params.KEY}}` and the agent's environment (scalars only).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, serde_json::Value>,
    /// Failed attempts retried before the task is `Failed`.
    #[serde(default = "default_max_retries")]
    pub max_retries: i64,
    /// A run longer than this is killed (overrides the agent's `maxRuntimeSeconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i64>,
    /// A finished task is deleted this long after it finished (default 7 days; 1 hour for tinytask).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds_after_finished: Option<i64>,
}

fn default_max_retries() -> i64 {
    DEFAULT_MAX_RETRIES
}

impl Default for TaskSpec {
    fn default() -> Self {
        TaskSpec {
            queue: None,
            assigned_to: None,
            priority: 0,
            blocked_by: Vec::new(),
            params: BTreeMap::new(),
            max_retries: DEFAULT_MAX_RETRIES,
            timeout_seconds: None,
            ttl_seconds_after_finished: None,
        }
    }
}

/// Where a task is in its life.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
pub enum TaskPhase {
    #[default]
    Pending,
    Blocked,
    Assigned,
    Running,
    Succeeded,
    Failed,
}

impl TaskPhase {
    /// Succeeded or Failed: nothing more will happen to it.
    pub fn is_finished(self) -> bool {
        matches!(self, TaskPhase::Succeeded | TaskPhase::Failed)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            TaskPhase::Pending => "Pending",
            TaskPhase::Blocked => "Blocked",
            TaskPhase::Assigned => "Assigned",
            TaskPhase::Running => "Running",
            TaskPhase::Succeeded => "Succeeded",
            TaskPhase::Failed => "Failed",
        }
    }
}

/// What the controllers observed of a task.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TaskStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub phase: TaskPhase,
    /// Attempts started so far.
    #[serde(default)]
    pub attempts: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// A failed task is not retried before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// tinytask only: the agent this scheduler last assigned the remote task to, written before
    /// the claim is sent, so a retry (possibly on another agent) recognises its own claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_assignee: Option<String>,
    /// tinytask only: results still to be written back to the server, oldest first. Appended in
    /// the same status write as the attempt's outcome; each is removed only once the server
    /// acknowledged it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub write_backs: Vec<WriteBack>,
}

/// What a pending write-back does on the tinytask server.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WriteBackOp {
    /// `status = complete`.
    Complete,
    /// Adds `message` as a comment (once: an identical comment already there counts as done).
    Comment,
    /// Adds `message` as a comment, then sets the task idle and unassigned (unless someone else
    /// has taken it meanwhile).
    Release,
    /// As Release, and tags the task `tinyscheduler-failed`: it failed for good, and is not
    /// picked up again until someone removes the tag.
    Fail,
}

/// One pending write-back to the tinytask server.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WriteBack {
    pub op: WriteBackOp,
    /// The attempt whose outcome this reports.
    #[serde(default)]
    pub attempt: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Release, Fail and Complete: the assignee this scheduler set; the task is released or completed
    /// only while it still has it (or none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// When it was queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
}
