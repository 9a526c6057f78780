//! Command-line grammar (clap derive). Global settings come from flags, then `TINYSCHEDULER_*`
//! environment variables, then defaults.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// TinyScheduler: a Kubernetes-style control plane for AI coding agents.
#[derive(Parser, Debug)]
#[command(name = "tinyscheduler", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub globals: Globals,
    #[command(subcommand)]
    pub command: Command,
}

/// Settings shared by every command.
#[derive(Args, Debug, Clone)]
pub struct Globals {
    /// State directory holding the object store, logs and the lock [default: ./state, or
    /// <TINYSCHEDULER_BASE_PATH>/state when that is set].
    #[arg(
        long,
        global = true,
        env = "TINYSCHEDULER_STATE_DIR",
        default_value = "./state",
        hide_default_value = true
    )]
    pub state_dir: PathBuf,
    /// Log format: human (default on a terminal) or json (default otherwise). Logs go to stderr.
    /// [env: TINYSCHEDULER_LOG_FORMAT]
    // The variable is read with the other settings (`config::resolve`), so that a bad value is an
    // error naming it rather than clap's, which names the flag.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<crate::daemon::logging::LogFormat>,
    /// Log level or filter: error, warn, info, debug, trace, off; DEBUG/INFO/WARNING/ERROR/CRITICAL;
    /// or a RUST_LOG-style filter such as `info,tinyscheduler::controllers=debug`. Default: info for
    /// `run --daemon`, warn for every other command.
    #[arg(long, global = true, env = "TINYSCHEDULER_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Read settings from this .env file instead of ./.env (below flags and the environment).
    #[arg(long, global = true, value_name = "FILE")]
    pub env_file: Option<PathBuf>,
    /// tinytask server URL [env: TINYSCHEDULER_MCP_ENDPOINT] [default: http://localhost:3000]
    #[arg(long, global = true, value_name = "URL")]
    pub tinytask_endpoint: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create or update objects from YAML or JSON manifests.
    Apply(ApplyArgs),
    /// List objects of a kind.
    Get(GetArgs),
    /// Show one object in detail, with its events.
    Describe(DescribeArgs),
    /// Delete objects by kind and name, or those named in a manifest.
    Delete(DeleteArgs),
    /// Print the output of a task's run.
    Logs(LogsArgs),
    /// Wait for a condition on an object.
    Wait(WaitArgs),
    /// Run the scheduler: once to a fixed point, or as a daemon.
    Run(RunArgs),
    /// Supervise one agent run (started by the scheduler; not for direct use).
    #[command(hide = true)]
    Shim(ShimArgs),
    /// Fork shims on request (started by the scheduler; not for direct use).
    #[command(hide = true)]
    ShimLauncher,
    /// Print the effective settings and where each one comes from.
    Config(ConfigArgs),
    /// Check settings, agents and recipes; exit 1 if any check fails.
    ValidateConfig(ValidateConfigArgs),
    /// Write Agent and Queue manifests from a Python-era agent-control.json.
    Import(ImportArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion(CompletionArgs),
    /// Print the version.
    Version,
}

#[derive(Args, Debug)]
pub struct CompletionArgs {
    /// The shell to complete for, e.g. `source <(tinyscheduler completion bash)`.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Args, Debug)]
pub struct ConfigArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ValidateConfigArgs {
    /// Create missing directories (state, logs) with mode 0700; nothing else is changed.
    #[arg(long)]
    pub fix: bool,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The Python scheduler's agent-control.json [default: TINYSCHEDULER_AGENT_CONTROL_FILE].
    #[arg(long = "agent-control", value_name = "FILE")]
    pub agent_control: Option<PathBuf>,
    /// Per-agent slots, `{"a":1}` or `a:1,b:2` [default: TINYSCHEDULER_AGENT_LIMITS].
    #[arg(long, value_name = "SPEC")]
    pub limits: Option<String>,
    /// Directory to write one manifest per object into, or `-` for standard output.
    #[arg(
        short = 'o',
        long = "output",
        value_name = "DIR|-",
        default_value = "-"
    )]
    pub output: String,
    /// Replace manifests in the output directory that say something else (by default an import
    /// refuses, writing nothing, rather than lose a hand edit).
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// File, directory or `-` for standard input (repeatable).
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<String>,
    /// Recurse into subdirectories.
    #[arg(short = 'R', long)]
    pub recursive: bool,
    /// Validate and report what would change without writing anything.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    /// Kind: singular, plural or short name (agents, ag, tasks, tk, …).
    pub kind: String,
    /// Names to show (default: all).
    pub names: Vec<String>,
    /// Output format: wide, yaml, json or name.
    #[arg(short = 'o', long)]
    pub output: Option<String>,
    /// Label selector (key=value,key2!=value2).
    #[arg(short = 'l', long)]
    pub selector: Option<String>,
    /// Omit the header line.
    #[arg(long)]
    pub no_headers: bool,
    /// After listing, print changes as they happen until interrupted.
    #[arg(short = 'w', long)]
    pub watch: bool,
}

#[derive(Args, Debug)]
pub struct DescribeArgs {
    /// Kind (singular, plural or short name), or KIND/NAME.
    pub kind: String,
    /// The objects to describe (default: every object of the kind); KIND/NAME forms may follow.
    pub names: Vec<String>,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// Kind, then one or more names.
    pub args: Vec<String>,
    /// Delete the objects named in these manifests.
    #[arg(short = 'f', long = "filename")]
    pub files: Vec<String>,
    /// Recurse into the subdirectories of a directory given with -f.
    #[arg(short = 'R', long)]
    pub recursive: bool,
    /// Succeed when an object is already gone.
    #[arg(long)]
    pub ignore_not_found: bool,
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    /// Task name.
    pub task: String,
    /// Keep printing as the run writes.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Which attempt (default: the latest).
    #[arg(long)]
    pub attempt: Option<u32>,
}

#[derive(Args, Debug)]
pub struct WaitArgs {
    /// KIND/NAME, e.g. task/fix-login.
    pub target: String,
    /// `condition=NAME`, `jsonpath={.status.phase}=Succeeded` or `delete`.
    #[arg(long = "for")]
    pub for_: String,
    /// Give up after this long (e.g. 30s, 5m).
    #[arg(long, default_value = "30s")]
    pub timeout: String,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Reconcile everything to a fixed point, print a summary and exit.
    #[arg(long, conflicts_with = "daemon")]
    pub once: bool,
    /// Keep running, reacting to changes as they happen.
    #[arg(long)]
    pub daemon: bool,
    /// Print each decision and change nothing.
    #[arg(
        long,
        env = "TINYSCHEDULER_DRY_RUN",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub dry_run: bool,
    /// With --once: keep going until no task is pending or running (the quick start uses this).
    #[arg(long, requires = "once")]
    pub wait: bool,
    /// Serve /metrics, /healthz, /livez and /readyz on this address (HOST:PORT, e.g.
    /// 127.0.0.1:9464; `:PORT` for every interface). Off unless set.
    #[arg(long = "http", value_name = "ADDR", env = "TINYSCHEDULER_HTTP_ADDR")]
    pub http: Option<String>,
}

#[derive(Args, Debug)]
pub struct ShimArgs {
    /// The Lease whose run this shim supervises.
    #[arg(long)]
    pub lease: String,
}

/// The command's name as typed, for messages.
pub fn command_name(c: &Command) -> &'static str {
    match c {
        Command::Apply(_) => "apply",
        Command::Get(_) => "get",
        Command::Describe(_) => "describe",
        Command::Delete(_) => "delete",
        Command::Logs(_) => "logs",
        Command::Wait(_) => "wait",
        Command::Run(_) => "run",
        Command::Shim(_) => "shim",
        Command::ShimLauncher => "shim-launcher",
        Command::Config(_) => "config",
        Command::ValidateConfig(_) => "validate-config",
        Command::Import(_) => "import",
        Command::Completion(_) => "completion",
        Command::Version => "version",
    }
}
