//! Process supervision: the per-run shim, its launcher, spawning, liveness (pid + start time) and killing.

pub mod claim;
pub mod kill;
pub mod launcher;
pub mod liveness;
pub mod shim;
pub mod signal_pipe;
pub mod spawn;
pub mod template;

pub use kill::{terminate_group, KillOutcome};
pub use liveness::{group_alive, is_alive, start_time_of};
pub use shim::log_path;
pub use spawn::spawn_shim;
pub use template::{render, TemplateError};

/// This host's name (`/proc/sys/kernel/hostname`, else `$HOSTNAME`, else `localhost`).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "localhost".to_string())
}
