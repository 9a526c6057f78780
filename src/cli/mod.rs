//! The kubectl-style command line: argument parsing and dispatch to one module per command.

pub mod apply;
pub mod args;
pub mod config_cmd;
pub mod delete;
pub mod describe;
pub mod get;
pub mod import;
pub mod input;
pub mod logs;
pub mod printers;
pub mod run;
pub mod unique_json;
pub mod wait;

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
    crate::agent::spawn::keep_inherited_descriptors_from_children();
    let cli = match crate::config::parse_cli() {
        Ok(cli) => cli,
        Err(e) => {
            crate::daemon::logging::print_error(&format!("error: {e}"));
            return ExitCode::from(1);
        }
    };
    let g = &cli.globals;
    // The daemon reports what it does at info; a command run by hand stays quiet but for warnings.
    let default_level = match &cli.command {
        Command::Run(r) if r.daemon => "info",
        _ => "warn",
    };
    let level = g.log_level.as_deref().unwrap_or(default_level);
    if let Err(e) = crate::daemon::logging::init_logging(g.log_format, Some(level)) {
        crate::daemon::logging::print_error(&format!("error: {e}"));
        return ExitCode::from(1);
    }
    tracing::debug!(
        command = args::command_name(&cli.command),
        version = env!("CARGO_PKG_VERSION"),
        pid = std::process::id(),
        "starting"
    );
    match dispatch(cli) {
        // Output that could not be written (not a closed pipe: a full disk) is a failure too.
        Ok(_) if crate::stdout::failed() => ExitCode::from(1),
        Ok(code) => code,
        Err(e) => {
            crate::daemon::logging::print_error(&e.to_string());
            ExitCode::from(1)
        }
    }
}

/// The command line without its hidden subcommands (the shim's), which clap_complete would offer.
fn for_completion() -> clap::Command {
    use clap::CommandFactory;
    let full = Cli::command();
    let shown: Vec<clap::Command> = full
        .get_subcommands()
        .filter(|c| !c.is_hide_set())
        .cloned()
        .collect();
    clap::Command::new("tinyscheduler")
        .args(full.get_arguments().cloned())
        .subcommands(shown)
}

fn dispatch(cli: Cli) -> CliResult {
    let g = cli.globals;
    match cli.command {
        Command::Logs(a) => logs::logs(&g, a),
        Command::Apply(a) => apply::apply(&g, a),
        Command::Get(a) => get::get(&g, a),
        Command::Describe(a) => describe::describe(&g, a),
        Command::Delete(a) => delete::delete(&g, a),
        Command::Wait(a) => wait::wait(&g, a),
        Command::Run(a) => run::run(&g, a),
        Command::Shim(a) => crate::agent::shim::main(&g, a),
        Command::ShimLauncher => crate::agent::launcher::serve(&g),
        Command::Config(a) => config_cmd::config(&g, a),
        Command::ValidateConfig(a) => config_cmd::validate(&g, a),
        Command::Import(a) => import::import(&g, a),
        Command::Completion(a) => {
            // Generated into memory: clap_complete panics when its writer fails, as a closed
            // pipe (`completion zsh | head`) makes it; written out, a closed pipe is no error.
            let mut script = Vec::new();
            clap_complete::generate(a.shell, &mut for_completion(), "tinyscheduler", &mut script);
            printers::with_stdout(|out| std::io::Write::write_all(out, &script))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Version => {
            crate::outln!("tinyscheduler {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
    }
}
