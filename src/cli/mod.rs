//! The kubectl-style command line: argument parsing and dispatch to one module per command.

pub mod args;
pub mod config_cmd;
pub mod import;
pub mod run;

use std::process::ExitCode;

pub use args::{Cli, Command, Globals};

/// An error a command reports: printed to stderr as is, exit status 1.
#[derive(Debug)]
pub struct CliError(pub String);

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CliError {}

impl From<crate::store::StoreError> for CliError {
    fn from(e: crate::store::StoreError) -> Self {
        CliError(format!("Error from server ({}): {e}", e.reason()))
    }
}

/// What every command returns.
pub type CliResult = Result<ExitCode, CliError>;

/// Parses the command line, runs the command, prints any error and returns the exit status.
pub fn main() -> ExitCode {
    let cli = match crate::config::parse_cli() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

fn dispatch(cli: Cli) -> CliResult {
    let g = cli.globals;
    match cli.command {
        Command::Run(a) => run::run(&g, a),
        Command::Shim(a) => crate::agent::shim::main(&g, a),
        Command::Config(a) => config_cmd::config(&g, a),
        Command::ValidateConfig(a) => config_cmd::validate(&g, a),
        Command::Import(a) => import::import(&g, a),
        Command::Version => {
            println!("tinyscheduler {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        other => Err(CliError(format!(
            "error: `{}` is not implemented yet",
            args::command_name(&other)
        ))),
    }
}
