//! `tinyscheduler run --once | --daemon`: the scheduler's entry point.

use super::args::{Globals, RunArgs};
use super::{CliError, CliResult};

/// Runs the scheduler in the mode `args` asks for.
pub fn run(_g: &Globals, _args: RunArgs) -> CliResult {
    Err(CliError("error: `run` is not implemented yet".into()))
}
