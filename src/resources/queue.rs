//! Queue: a pool of agents and where its tasks come from.

use serde::{Deserialize, Serialize};

use super::meta::{Condition, Object};

/// A queue: the source of its tasks and whether blockers are respected.
pub type Queue = Object<QueueSpec, QueueStatus>;
crate::impl_resource!(Queue, "Queue", "queues");

/// Default poll interval for a tinytask queue.
pub const DEFAULT_POLL_INTERVAL_SECONDS: i64 = 2;

/// Where a queue's tasks come from.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QueueSource {
    /// Tasks are Task objects written to the store.
    #[default]
    Local,
    /// Tasks are reflected from a tinytask server.
    Tinytask,
}

/// Whether `blockedBy` holds tasks back.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BlockingPolicy {
    /// A task waits until every blocker has succeeded.
    #[default]
    Respect,
    /// Blockers are ignored.
    Ignore,
}

/// What the user wants of a queue.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QueueSpec {
    #[serde(default)]
    pub source: QueueSource,
    #[serde(default)]
    pub blocking: BlockingPolicy,
    /// tinytask only: how often the server is polled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_interval_seconds: Option<i64>,
    /// tinytask only: base URL of the server (default from the global setting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// tinytask only: the queue's name on the server (default: this Queue's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_queue: Option<String>,
}

/// What the controllers observed of a queue.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QueueStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub pending: i64,
    #[serde(default)]
    pub blocked: i64,
    #[serde(default)]
    pub running: i64,
    #[serde(default)]
    pub succeeded: i64,
    #[serde(default)]
    pub failed: i64,
    /// Agents serving this queue.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<String>,
    /// Sum of the agents' `maxConcurrency`.
    #[serde(default)]
    pub capacity: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// tinytask: results still to write back for mirrors deleted while they ran. The Task that
    /// would have queued them is gone, so its Queue holds them, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub write_backs: Vec<OrphanWriteBack>,
}

/// A write-back for a mirror that no longer exists: the server's task id beside it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OrphanWriteBack {
    /// The tinytask task id.
    pub task_id: i64,
    /// The server it is on (the Queue's endpoint when the write-back was queued).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub endpoint: String,
    /// The uid of the Lease whose run it reports.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub lease_uid: String,
    pub write_back: super::task::WriteBack,
}
