//! The shim: owns one agent process, renews its Lease and records how it ended.

use crate::cli::args::{Globals, ShimArgs};
use crate::cli::{CliError, CliResult};

/// Entry point of `tinyscheduler shim --lease NAME`.
pub fn main(_g: &Globals, _args: ShimArgs) -> CliResult {
    Err(CliError("error: `shim` is not implemented yet".into()))
}
