//! Client for the tinytask REST API (`/api/v1`); see `/work/shared/tinytask-api.md` for the
//! server's contract. Only the tinytask sync controller (and `validate-config`) talk to the
//! server; everything else sees tinytask tasks as ordinary Task objects.
//!
//! A poller's cheap loop: `queue_stats_if_changed(queue, etag)` (a 304 means nothing changed),
//! and only then `runnable_tasks(queue, free_slots, respect_blocking)`, which pages through idle
//! tasks filtering assigned and blocked ones without letting them use up the fetch window.

pub mod client;
pub mod error;
pub mod types;

pub use client::{Client, ClientConfig, RetryPolicy, DEFAULT_ENDPOINT, SCAN_WINDOW_MAX};
pub use error::{Error, Result};
pub use types::{
    Comment, Conditional, Health, ListQuery, NewTask, QueueStats, RemoteTask, StatusCounts, TaskId,
    TaskPatch, TaskStatus, Transfer, FAILED_TAG,
};
