//! The shim: owns one agent process, renews its Lease and records how it ended.

use std::path::{Path, PathBuf};

use crate::cli::args::{Globals, ShimArgs};
use crate::cli::{CliError, CliResult};

/// Where the output of one run goes: `<state>/logs/<task>/<attempt>.log`.
pub fn log_path(state_dir: &Path, task: &str, attempt: i64) -> PathBuf {
    state_dir
        .join("logs")
        .join(task)
        .join(format!("{attempt}.log"))
}

/// Entry point of `tinyscheduler shim --lease NAME`.
pub fn main(_g: &Globals, _args: ShimArgs) -> CliResult {
    Err(CliError("error: `shim` is not implemented yet".into()))
}
