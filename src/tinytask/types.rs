//! Wire types of the tinytask REST API (`/api/v1`), parsed tolerantly: unknown fields are ignored,
//! optional fields may be missing or null, `priority` may be a float, `tags` may be null and
//! `queue_name` may be `""`.

use serde::{Deserialize, Deserializer, Serialize};

/// A task id on the server.
pub type TaskId = i64;

/// The tag a scheduler puts on a task that failed for good (tinytask has no failed state: the
/// task is idle again). A tagged task is not runnable until someone removes the tag.
pub const FAILED_TAG: &str = "tinyscheduler-failed";

/// A task's status on the server. There is no failed state; any transition is allowed.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    Idle,
    Working,
    Complete,
}

impl TaskStatus {
    /// The wire spelling (`idle`).
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Idle => "idle",
            TaskStatus::Working => "working",
            TaskStatus::Complete => "complete",
        }
    }

    /// Parses the wire spelling.
    pub fn parse(s: &str) -> Option<TaskStatus> {
        match s {
            "idle" => Some(TaskStatus::Idle),
            "working" => Some(TaskStatus::Working),
            "complete" => Some(TaskStatus::Complete),
            _ => None,
        }
    }
}

impl std::fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A task as the server returns it. Single-task reads also carry `comments` and `links`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RemoteTask {
    pub id: TaskId,
    #[serde(default, deserialize_with = "null_as_default")]
    pub title: String,
    #[serde(default)]
    pub description: Option<String>,
    pub status: TaskStatus,
    #[serde(default)]
    pub assigned_to: Option<String>,
    #[serde(default)]
    pub previous_assigned_to: Option<String>,
    #[serde(default)]
    pub created_by: Option<String>,
    /// A number: an integer via REST, but possibly a float if set another way.
    #[serde(default, deserialize_with = "null_as_default")]
    pub priority: f64,
    /// `null` on the wire reads as empty.
    #[serde(default, deserialize_with = "null_as_default")]
    pub tags: Vec<String>,
    #[serde(default)]
    pub parent_task_id: Option<TaskId>,
    /// As sent; may be `""`. Use [`RemoteTask::queue`] for "which queue, if any".
    #[serde(default)]
    pub queue_name: Option<String>,
    #[serde(default)]
    pub blocked_by_task_id: Option<TaskId>,
    /// Computed by the server on read: the blocker exists and is not `complete`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub is_currently_blocked: bool,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub updated_at: Option<String>,
    #[serde(default)]
    pub archived_at: Option<String>,
    /// Only on single-task reads (and transfer answers).
    #[serde(default, deserialize_with = "null_as_default")]
    pub comments: Vec<Comment>,
    /// Only on single-task reads; kept opaque.
    #[serde(default, deserialize_with = "null_as_default")]
    pub links: Vec<serde_json::Value>,
}

impl RemoteTask {
    /// Whether a scheduler gave the task up after its retries ([`FAILED_TAG`]).
    pub fn failed_for_good(&self) -> bool {
        self.tags.iter().any(|t| t == FAILED_TAG)
    }

    /// The queue the task belongs to; `None` when absent, null or `""`.
    pub fn queue(&self) -> Option<&str> {
        self.queue_name.as_deref().filter(|q| !q.is_empty())
    }

    /// The priority as an integer (rounded half away from zero, saturating).
    pub fn priority_i64(&self) -> i64 {
        if self.priority.is_finite() {
            self.priority.round() as i64
        } else {
            0
        }
    }

    /// Who the task is assigned to; `None` when nobody (null or `""`).
    pub fn assignee(&self) -> Option<&str> {
        self.assigned_to.as_deref().filter(|a| !a.is_empty())
    }

    /// Idle, unassigned, not given up for good ([`FAILED_TAG`]) and, when blockers count, not
    /// currently blocked: what a scheduler may claim.
    pub fn is_runnable(&self, respect_blocking: bool) -> bool {
        self.status == TaskStatus::Idle
            && self.assignee().is_none()
            && (!respect_blocking || !self.is_currently_blocked)
            && !self.failed_for_good()
    }
}

/// A comment on a task.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Comment {
    #[serde(default)]
    pub id: i64,
    #[serde(default)]
    pub task_id: Option<TaskId>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub content: String,
    #[serde(default)]
    pub created_by: Option<String>,
    #[serde(default)]
    pub created_at: Option<String>,
}

/// Counts by status in [`QueueStats`].
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct StatusCounts {
    #[serde(default, deserialize_with = "null_as_default")]
    pub idle: u64,
    #[serde(default, deserialize_with = "null_as_default")]
    pub working: u64,
    #[serde(default, deserialize_with = "null_as_default")]
    pub complete: u64,
}

/// `GET /queues/:name/stats`: a cheap change detector for a queue.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    #[serde(default, deserialize_with = "null_as_default")]
    pub queue_name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub total_tasks: u64,
    #[serde(default, deserialize_with = "null_as_default")]
    pub by_status: StatusCounts,
    #[serde(default, deserialize_with = "null_as_default")]
    pub assigned: u64,
    #[serde(default, deserialize_with = "null_as_default")]
    pub unassigned: u64,
    #[serde(default, deserialize_with = "null_as_default")]
    pub agents: Vec<String>,
}

/// `GET /health`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Health {
    #[serde(default, deserialize_with = "null_as_default")]
    pub status: String,
}

/// A change to a task (`PATCH /tasks/:id`). Only the fields that are set are sent; the server
/// applies them unconditionally (last write wins).
#[derive(Serialize, Clone, Debug, Default, PartialEq)]
pub struct TaskPatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<TaskStatus>,
    /// `Some(None)` sends `null`: unassign.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub assigned_to: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_name: Option<String>,
    /// `Some(None)` sends `null`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Option<Vec<String>>>,
}

impl TaskPatch {
    pub fn new() -> TaskPatch {
        TaskPatch::default()
    }
    pub fn status(mut self, s: TaskStatus) -> Self {
        self.status = Some(s);
        self
    }
    /// Assigns to `agent`.
    pub fn assign(mut self, agent: impl Into<String>) -> Self {
        self.assigned_to = Some(Some(agent.into()));
        self
    }
    /// Sends `assigned_to: null`.
    pub fn unassign(mut self) -> Self {
        self.assigned_to = Some(None);
        self
    }
    /// Sends `assigned_to`, `null` for `None` (puts back an assignee read earlier).
    pub fn assignee(mut self, agent: Option<String>) -> Self {
        self.assigned_to = Some(agent);
        self
    }
    pub fn priority(mut self, p: i64) -> Self {
        self.priority = Some(p);
        self
    }
    pub fn queue_name(mut self, q: impl Into<String>) -> Self {
        self.queue_name = Some(q.into());
        self
    }
    pub fn tags(mut self, tags: Option<Vec<String>>) -> Self {
        self.tags = Some(tags);
        self
    }
}

/// A new task (`POST /tasks`); it always starts `idle`.
#[derive(Serialize, Clone, Debug, Default, PartialEq)]
pub struct NewTask {
    pub title: String,
    pub created_by: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub assigned_to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked_by_task_id: Option<TaskId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_task_id: Option<TaskId>,
}

/// `POST /tasks/:id/transfer`: succeeds only if the task is assigned to `current_agent`.
#[derive(Serialize, Clone, Debug, Default, PartialEq)]
pub struct Transfer {
    pub current_agent: String,
    pub new_agent: String,
    pub comment: String,
}

/// The filters of a task list. A limit is always sent: the server has no default one.
#[derive(Clone, Debug, PartialEq)]
pub struct ListQuery {
    pub queue_name: Option<String>,
    /// Any of these (sent comma-separated); empty means any status.
    pub statuses: Vec<TaskStatus>,
    /// Exact match (the server cannot filter for "unassigned").
    pub assigned_to: Option<String>,
    /// At least 1 (the server reads 0 as "no limit").
    pub limit: u32,
    /// Skip this many. Accepted by the tinytask 2.0 server but not part of the documented
    /// contract, and unstable while tasks change: prefer [`crate::tinytask::Client::runnable_tasks`].
    pub offset: Option<u32>,
}

impl ListQuery {
    /// A query for at most `limit` tasks (a limit of 0 is raised to 1).
    pub fn new(limit: u32) -> ListQuery {
        ListQuery {
            queue_name: None,
            statuses: Vec::new(),
            assigned_to: None,
            limit: limit.max(1),
            offset: None,
        }
    }
    pub fn queue(mut self, q: impl Into<String>) -> Self {
        self.queue_name = Some(q.into());
        self
    }
    pub fn status(mut self, s: TaskStatus) -> Self {
        if !self.statuses.contains(&s) {
            self.statuses.push(s);
        }
        self
    }
    pub fn assigned_to(mut self, a: impl Into<String>) -> Self {
        self.assigned_to = Some(a.into());
        self
    }
    pub fn offset(mut self, n: u32) -> Self {
        self.offset = Some(n);
        self
    }
    pub fn limit(mut self, n: u32) -> Self {
        self.limit = n.max(1);
        self
    }

    /// The query pairs, each key once (a repeated key is a 400 on the server).
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut p = Vec::new();
        if let Some(q) = &self.queue_name {
            p.push(("queue_name", q.clone()));
        }
        if !self.statuses.is_empty() {
            let s: Vec<&str> = self.statuses.iter().map(|s| s.as_str()).collect();
            p.push(("status", s.join(",")));
        }
        if let Some(a) = &self.assigned_to {
            p.push(("assigned_to", a.clone()));
        }
        p.push(("limit", self.limit.max(1).to_string()));
        if let Some(o) = self.offset {
            p.push(("offset", o.to_string()));
        }
        p
    }
}

/// The answer to a conditional GET (`If-None-Match`).
#[derive(Clone, Debug, PartialEq)]
pub enum Conditional<T> {
    /// The resource changed (or no tag was sent): the new value and its `ETag`, if any.
    Modified { value: T, etag: Option<String> },
    /// 304: nothing changed since the tag that was sent.
    NotModified,
}

impl<T> Conditional<T> {
    /// The value, if it changed.
    pub fn into_value(self) -> Option<T> {
        match self {
            Conditional::Modified { value, .. } => Some(value),
            Conditional::NotModified => None,
        }
    }
    pub fn is_modified(&self) -> bool {
        matches!(self, Conditional::Modified { .. })
    }
}

/// Reads `null` as the type's default (serde's `default` covers only a missing field).
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_task_with_float_priority_null_tags_empty_queue_and_unknown_fields_parses() {
        let t: RemoteTask = serde_json::from_value(json!({
            "id": 7, "title": "x", "status": "idle", "priority": 2.5, "tags": null,
            "queue_name": "", "brand_new_field": {"a": 1}
        }))
        .unwrap();
        assert_eq!(t.priority, 2.5);
        assert_eq!(t.priority_i64(), 3);
        assert!(t.tags.is_empty());
        assert_eq!(t.queue(), None);
        assert_eq!(t.assignee(), None);
        assert!(t.is_runnable(true));
    }

    #[test]
    fn a_patch_sends_only_what_is_set_and_null_to_unassign() {
        let p = TaskPatch::new().unassign().status(TaskStatus::Idle);
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!({"status": "idle", "assigned_to": null})
        );
    }

    #[test]
    fn a_list_query_always_has_a_limit_and_joins_statuses_with_commas() {
        let q = ListQuery::new(0)
            .status(TaskStatus::Idle)
            .status(TaskStatus::Working);
        assert_eq!(
            q.pairs(),
            vec![
                ("status", "idle,working".to_string()),
                ("limit", "1".into())
            ]
        );
    }
}
