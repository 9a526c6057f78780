//! Lease: the record of one live run of a task. Named after its task, so a second run cannot exist.

use serde::{Deserialize, Serialize};

use super::meta::Object;
use super::Task;

/// A lease: which agent runs which task, and what the shim observed of the process.
pub type Lease = Object<LeaseSpec, LeaseStatus>;
crate::impl_resource!(Lease, "Lease", "leases");

/// For unit tests: a Lease for attempt `attempt` of task `task` on agent `agent`, named after the
/// task, with every other field at its default.
#[cfg(test)]
pub(crate) fn test_lease(task: &str, agent: &str, attempt: i64) -> Lease {
    Lease::new(
        "Lease",
        task,
        LeaseSpec {
            task: task.into(),
            agent: agent.into(),
            attempt,
            ..Default::default()
        },
    )
}

/// Who holds the run and for how long it may go unrenewed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LeaseSpec {
    pub task: String,
    pub agent: String,
    /// `host/pid` of the scheduler that created it.
    #[serde(default)]
    pub holder_identity: String,
    /// The lease is stale when not renewed for this long.
    pub lease_duration_seconds: i64,
    /// The run is killed when it lasts longer than this.
    pub max_runtime_seconds: i64,
    /// Which attempt of the task this run is (1-based).
    #[serde(default)]
    pub attempt: i64,
    /// The uid of the Task this run is for. A Task deleted and created again under the same name
    /// is another Task: this run must never write into it. Empty in Leases of earlier versions,
    /// which the name alone matches.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub task_uid: String,
}

impl LeaseSpec {
    /// Whether this run is a run of `task`: the same name and, when the Lease knows it, the same
    /// uid.
    pub fn runs(&self, task: &Task) -> bool {
        self.task == task.metadata.name
            && (self.task_uid.is_empty() || self.task_uid == task.metadata.uid)
    }
}

/// Lifecycle of one run.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LeasePhase {
    /// Created; no process yet.
    #[default]
    Pending,
    /// The shim started the agent (recorded once the run has lasted 5 ms, see
    /// `agent::shim::quick_exit`).
    Running,
    /// The agent exited and the shim recorded how (straight from Pending for a run that ended
    /// within those 5 ms).
    Completed,
    /// Being killed by the reclaim controller.
    Terminating,
}

/// What the shim and the reclaim controller observed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LeaseStatus {
    #[serde(default)]
    pub phase: LeasePhase,
    /// The agent process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// Start time of the agent process in clock ticks since boot (`/proc/<pid>/stat` field 22).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_start_time: Option<u64>,
    /// Process group of the agent (the shim's session).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgid: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shim_pid: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shim_start_time: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`) when the pids were recorded:
    /// after a reboot, pids and start times (ticks since boot) repeat, and a recorded pair may
    /// name an unrelated process; a Lease from another boot names no live process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acquire_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Signal that ended the agent, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
