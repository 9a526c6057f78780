//! Global settings: what each one is, where it came from, and how the process gets them.
//!
//! Precedence, highest first: command-line flags, the process environment, a `.env` file (the
//! one named by `--env-file FILE`, else `./.env` when it exists), built-in defaults. Environment
//! variables keep the Python tinyscheduler's names (`TINYSCHEDULER_*`) so an existing `.env`
//! keeps working; an empty value counts as unset.
//!
//! `TINYSCHEDULER_BASE_PATH`: when set and no state directory is given (flag or
//! `TINYSCHEDULER_STATE_DIR`), the state directory defaults to `<base>/state`, the recipes
//! directory to `<base>/recipes`, and relative `TINYSCHEDULER_RECIPES_DIR` and
//! `TINYSCHEDULER_AGENT_CONTROL_FILE` paths are taken relative to the base (as the Python
//! scheduler did).
//!
//! The binary loads the `.env` file once at start ([`parse_cli`]): its variables are exported
//! into the process environment where they are not already set, so every part that reads a
//! `TINYSCHEDULER_*` variable sees the same values, and the resolved [`Settings`] (with sources)
//! are kept for [`current`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{json, Value};

/// Default `TINYSCHEDULER_LOOP_INTERVAL_SEC` (the informers' resync period).
pub const DEFAULT_LOOP_INTERVAL_SEC: u64 = 30;
/// Default tinytask endpoint.
pub const DEFAULT_TINYTASK_ENDPOINT: &str = crate::tinytask::DEFAULT_ENDPOINT;

/// Where a setting's value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A command-line flag.
    Flag,
    /// The process environment.
    Env,
    /// The `.env` file (its path is [`Settings::env_file`]).
    DotEnv,
    /// The built-in default.
    Default,
    /// Derived from `TINYSCHEDULER_BASE_PATH`.
    BasePath,
}

impl Source {
    pub fn as_str(&self) -> &'static str {
        match self {
            Source::Flag => "flag",
            Source::Env => "env",
            Source::DotEnv => ".env",
            Source::Default => "default",
            Source::BasePath => "base-path",
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One setting: its value, where it came from, and how to set it.
#[derive(Clone, Debug, PartialEq)]
pub struct Setting<T> {
    pub value: T,
    pub source: Source,
    /// The environment variable.
    pub env: &'static str,
    /// The command-line flag, if there is one.
    pub flag: Option<&'static str>,
}

/// Every global setting, resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub state_dir: Setting<PathBuf>,
    pub base_path: Setting<Option<PathBuf>>,
    pub recipes_dir: Setting<PathBuf>,
    pub loop_interval: Setting<Duration>,
    pub heartbeat_sec: Setting<u64>,
    pub max_runtime_sec: Setting<u64>,
    pub goose_bin: Setting<String>,
    pub tinytask_endpoint: Setting<String>,
    /// The log filter; `None`: warn, or info for `run --daemon` (chosen per command).
    pub log_level: Setting<Option<String>>,
    /// `human` or `json`; `None`: human on a terminal, json otherwise (decided at start).
    pub log_format: Setting<Option<String>>,
    /// Where `run --daemon` serves /metrics and the health endpoints; `None`: nowhere.
    pub http_addr: Setting<Option<String>>,
    pub dry_run: Setting<bool>,
    pub disable_blocking: Setting<bool>,
    /// Delay before a failed attempt's first retry; it doubles per attempt.
    pub retry_base: Setting<Duration>,
    /// Longest delay between attempts.
    pub retry_max: Setting<Duration>,
    /// Time between SIGTERM and SIGKILL when a run's process group is ended.
    pub kill_grace: Setting<Duration>,
    /// Workers of each controller that works on many keys at once (lease, reclaim, tinytask
    /// sync); assignment and status always have one.
    pub workers: Setting<u64>,
    pub agent_limits: Setting<BTreeMap<String, u32>>,
    pub agent_control_file: Setting<Option<PathBuf>>,
    /// The `.env` file that was read, if any.
    pub env_file: Option<PathBuf>,
    /// Python-era variables that are set but have no effect here, with what to do instead.
    pub ignored: Vec<(String, &'static str)>,
}

/// A settings error: names the variable (or file and line) and what was wrong.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Values given as command-line flags (`None` = not given).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Flags {
    pub state_dir: Option<PathBuf>,
    pub tinytask_endpoint: Option<String>,
    pub dry_run: Option<bool>,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
    pub http_addr: Option<String>,
}

/// A parsed `.env` file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DotEnv {
    pub path: PathBuf,
    pub vars: BTreeMap<String, String>,
}

/// Python-era variables this scheduler does not use, and what replaces them.
pub const IGNORED_VARS: &[(&str, &str)] = &[
    (
        "TINYSCHEDULER_RUNNING_DIR",
        "runs are Lease objects in the state directory",
    ),
    (
        "TINYSCHEDULER_LOG_DIR",
        "run logs live in <state>/logs/<task>/<attempt>.log",
    ),
    (
        "TINYSCHEDULER_TASK_CACHE_DIR",
        "tasks are Task objects in the state directory",
    ),
    (
        "TINYSCHEDULER_LOCK_FILE",
        "the lock lives in the state directory",
    ),
    (
        "TINYSCHEDULER_BIN_DIR",
        "the wrapper scripts are not needed",
    ),
    (
        "TINYSCHEDULER_ENABLED",
        "enable or disable the systemd unit instead",
    ),
];

impl DotEnv {
    /// Parses `.env` text: `KEY=VALUE` lines, blank lines and `#` comments, an optional
    /// `export ` prefix, values optionally in single quotes (literal) or double quotes (`\n`,
    /// `\"`, `\\` escapes), an unquoted value ends at ` #`. A bad line is an error naming the
    /// file and line.
    pub fn parse(path: &Path, text: &str) -> Result<DotEnv, ConfigError> {
        let mut vars = BTreeMap::new();
        // A byte-order mark, as some editors write, is not part of the first name.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (i, raw) in text.lines().enumerate() {
            let at = || format!("{}:{}", path.display(), i + 1);
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let line = line
                .strip_prefix("export ")
                .map(str::trim_start)
                .unwrap_or(line);
            let Some((key, value)) = line.split_once('=') else {
                return Err(ConfigError(format!(
                    "{}: expected KEY=VALUE, got {line:?}",
                    at()
                )));
            };
            let key = key.trim();
            let valid = key
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(ConfigError(format!(
                    "{}: invalid variable name {key:?}",
                    at()
                )));
            }
            let value =
                parse_value(value.trim()).map_err(|m| ConfigError(format!("{}: {m}", at())))?;
            vars.insert(key.to_string(), value);
        }
        Ok(DotEnv {
            path: path.to_path_buf(),
            vars,
        })
    }

    /// Reads and parses a `.env` file.
    pub fn load(path: &Path) -> Result<DotEnv, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read env file {}: {e}", path.display())))?;
        DotEnv::parse(path, &text)
    }

    /// The file named by `--env-file` (which must exist), else `./.env` if it exists.
    pub fn discover(explicit: Option<&Path>) -> Result<Option<DotEnv>, ConfigError> {
        match explicit {
            Some(p) => DotEnv::load(p).map(Some),
            None => {
                let p = Path::new(".env");
                if p.is_file() {
                    DotEnv::load(p).map(Some)
                } else {
                    Ok(None)
                }
            }
        }
    }
}

fn parse_value(v: &str) -> Result<String, String> {
    if let Some(rest) = v.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = rest.chars();
        loop {
            match chars.next() {
                None => return Err("unterminated double quote".into()),
                Some('"') => break,
                Some('\\') => match chars.next() {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some(c @ ('"' | '\\' | '$')) => out.push(c),
                    Some(c) => {
                        out.push('\\');
                        out.push(c);
                    }
                    None => return Err("unterminated double quote".into()),
                },
                Some(c) => out.push(c),
            }
        }
        trailing(chars.as_str())?;
        Ok(out)
    } else if let Some(rest) = v.strip_prefix('\'') {
        let Some(end) = rest.find('\'') else {
            return Err("unterminated single quote".into());
        };
        trailing(&rest[end + 1..])?;
        Ok(rest[..end].to_string())
    } else {
        let v = match v.find(" #").or_else(|| v.find("\t#")) {
            Some(i) => &v[..i],
            None => v,
        };
        Ok(v.trim().to_string())
    }
}

fn trailing(rest: &str) -> Result<(), String> {
    let rest = rest.trim();
    if rest.is_empty() || rest.starts_with('#') {
        Ok(())
    } else {
        Err(format!("unexpected text after the closing quote: {rest:?}"))
    }
}

/// Resolves every setting from flags, an environment lookup and an optional `.env` file.
pub fn resolve(
    flags: &Flags,
    env: &dyn Fn(&str) -> Option<String>,
    dotenv: Option<&DotEnv>,
) -> Result<Settings, ConfigError> {
    let lookup = |name: &'static str| -> Option<(String, Source)> {
        if let Some(v) = env(name).filter(|v| !v.is_empty()) {
            return Some((v, Source::Env));
        }
        dotenv
            .and_then(|d| d.vars.get(name))
            .filter(|v| !v.is_empty())
            .map(|v| (v.clone(), Source::DotEnv))
    };
    fn setting<T>(
        value: T,
        source: Source,
        env: &'static str,
        flag: Option<&'static str>,
    ) -> Setting<T> {
        Setting {
            value,
            source,
            env,
            flag,
        }
    }

    const BASE: &str = "TINYSCHEDULER_BASE_PATH";
    let base_path = match lookup(BASE) {
        Some((v, s)) => setting(Some(PathBuf::from(v)), s, BASE, None),
        None => setting(None, Source::Default, BASE, None),
    };
    let base = base_path.value.clone();
    let under_base = |p: PathBuf| match (&base, p.is_absolute()) {
        (Some(b), false) => b.join(p),
        _ => p,
    };

    const STATE: &str = "TINYSCHEDULER_STATE_DIR";
    let state_dir = if let Some(p) = &flags.state_dir {
        setting(p.clone(), Source::Flag, STATE, Some("--state-dir"))
    } else if let Some((v, s)) = lookup(STATE) {
        setting(PathBuf::from(v), s, STATE, Some("--state-dir"))
    } else if let Some(b) = &base {
        setting(
            b.join("state"),
            Source::BasePath,
            STATE,
            Some("--state-dir"),
        )
    } else {
        setting(
            PathBuf::from("./state"),
            Source::Default,
            STATE,
            Some("--state-dir"),
        )
    };

    const RECIPES: &str = "TINYSCHEDULER_RECIPES_DIR";
    let recipes_dir = if let Some((v, s)) = lookup(RECIPES) {
        setting(under_base(PathBuf::from(v)), s, RECIPES, None)
    } else if let Some(b) = &base {
        setting(b.join("recipes"), Source::BasePath, RECIPES, None)
    } else {
        setting(PathBuf::from("./recipes"), Source::Default, RECIPES, None)
    };

    let positive = |name: &'static str, default: u64| -> Result<Setting<u64>, ConfigError> {
        match lookup(name) {
            None => Ok(setting(default, Source::Default, name, None)),
            Some((v, s)) => match v.trim().parse::<u64>() {
                Ok(n) if n > 0 && n as f64 <= MAX_SECONDS => Ok(setting(n, s, name, None)),
                Ok(n) if n > 0 => Err(ConfigError(format!(
                    "{name}: {n} seconds is more than a year ({MAX_SECONDS} s), the most it takes"
                ))),
                _ => Err(ConfigError(format!(
                    "{name}: expected a positive integer, got {v:?}"
                ))),
            },
        }
    };
    let loop_secs = positive("TINYSCHEDULER_LOOP_INTERVAL_SEC", DEFAULT_LOOP_INTERVAL_SEC)?;
    let loop_interval = Setting {
        value: Duration::from_secs(loop_secs.value),
        source: loop_secs.source,
        env: loop_secs.env,
        flag: None,
    };
    let heartbeat_sec = positive(
        "TINYSCHEDULER_HEARTBEAT_SEC",
        crate::resources::agent::DEFAULT_HEARTBEAT_SECONDS as u64,
    )?;
    let max_runtime_sec = positive(
        "TINYSCHEDULER_MAX_RUNTIME_SEC",
        crate::resources::agent::DEFAULT_MAX_RUNTIME_SECONDS as u64,
    )?;

    const GOOSE: &str = "TINYSCHEDULER_GOOSE_BIN";
    let goose_bin = match lookup(GOOSE) {
        Some((v, s)) => setting(v, s, GOOSE, None),
        None => setting("goose".to_string(), Source::Default, GOOSE, None),
    };

    const ENDPOINT: &str = "TINYSCHEDULER_MCP_ENDPOINT";
    let tinytask_endpoint = if let Some(v) = &flags.tinytask_endpoint {
        check_endpoint("--tinytask-endpoint", v)?;
        setting(
            crate::tinytask::client::normalize_endpoint(v).unwrap_or_else(|| v.clone()),
            Source::Flag,
            ENDPOINT,
            Some("--tinytask-endpoint"),
        )
    } else if let Some((v, s)) = lookup(ENDPOINT) {
        check_endpoint(ENDPOINT, &v)?;
        // As the client uses it (a trailing /mcp or /api/v1 dropped), which `config` shows.
        let v = crate::tinytask::client::normalize_endpoint(&v).unwrap_or(v);
        setting(v, s, ENDPOINT, Some("--tinytask-endpoint"))
    } else {
        setting(
            DEFAULT_TINYTASK_ENDPOINT.to_string(),
            Source::Default,
            ENDPOINT,
            Some("--tinytask-endpoint"),
        )
    };

    // A flag, else the environment or .env, else the default (`None`), as a string.
    let text = |name: &'static str, flag_name: &'static str, flag: &Option<String>| match (
        flag,
        lookup(name),
    ) {
        (Some(v), _) => setting(Some(v.clone()), Source::Flag, name, Some(flag_name)),
        (None, Some((v, s))) => setting(Some(v), s, name, Some(flag_name)),
        (None, None) => setting(None, Source::Default, name, Some(flag_name)),
    };
    const LOG: &str = "TINYSCHEDULER_LOG_LEVEL";
    let mut log_level = text(LOG, "--log-level", &flags.log_level);
    if let Some(v) = &log_level.value {
        // The same grammar as `--log-level` (levels, Python-era names, RUST_LOG-style filters).
        let what = if log_level.source == Source::Flag {
            "--log-level"
        } else {
            LOG
        };
        let level = crate::daemon::logging::normalize_level(v)
            .map_err(|e| ConfigError(format!("{what}: {e}")))?;
        log_level.value = Some(level);
    }
    const FORMAT: &str = "TINYSCHEDULER_LOG_FORMAT";
    let log_format = text(FORMAT, "--log-format", &flags.log_format);
    if let Some(v) = log_format
        .value
        .as_deref()
        .filter(|v| !["human", "json"].contains(v))
    {
        return Err(ConfigError(format!(
            "{FORMAT}: expected human or json, got {v:?}"
        )));
    }
    let http_addr = text("TINYSCHEDULER_HTTP_ADDR", "run --http", &flags.http_addr);
    if let Some(v) = &http_addr.value {
        let what = if http_addr.source == Source::Flag {
            "--http"
        } else {
            "TINYSCHEDULER_HTTP_ADDR"
        };
        crate::daemon::http::parse_listen_addr(v)
            .map_err(|e| ConfigError(format!("{what}: {e}")))?;
    }

    let boolean = |name: &'static str, flag_name: Option<&'static str>, flag: Option<bool>| {
        if let Some(b) = flag {
            return Ok(setting(b, Source::Flag, name, flag_name));
        }
        match lookup(name) {
            None => Ok(setting(false, Source::Default, name, flag_name)),
            Some((v, s)) => match parse_bool(&v) {
                Some(b) => Ok(setting(b, s, name, flag_name)),
                None => Err(ConfigError(format!(
                    "{name}: expected true or false, got {v:?}"
                ))),
            },
        }
    };
    let dry_run = boolean(
        "TINYSCHEDULER_DRY_RUN",
        Some("run --dry-run"),
        flags.dry_run,
    )?;
    let disable_blocking = boolean("TINYSCHEDULER_DISABLE_BLOCKING", None, None)?;

    // A number of seconds, fractions allowed (tests and impatient operators use 0.1).
    let seconds =
        |name: &'static str, default: Duration| -> Result<Setting<Duration>, ConfigError> {
            match lookup(name) {
                None => Ok(setting(default, Source::Default, name, None)),
                Some((v, s)) => match parse_seconds(&v) {
                    Some(d) => Ok(setting(d, s, name, None)),
                    None => Err(ConfigError(format!(
                        "{name}: expected a number of seconds, got {v:?}"
                    ))),
                },
            }
        };
    let retry_base = seconds(
        "TINYSCHEDULER_RETRY_BASE_SEC",
        crate::controllers::DEFAULT_RETRY_BASE,
    )?;
    let retry_max = seconds(
        "TINYSCHEDULER_RETRY_MAX_SEC",
        crate::controllers::DEFAULT_RETRY_CAP,
    )?;
    let kill_grace = seconds(
        crate::agent::shim::KILL_GRACE_ENV,
        crate::agent::shim::DEFAULT_KILL_GRACE,
    )?;
    const WORKERS: &str = "TINYSCHEDULER_WORKERS";
    let workers = match lookup(WORKERS) {
        None => setting(DEFAULT_WORKERS, Source::Default, WORKERS, None),
        Some((v, s)) => match v.trim().parse::<u64>() {
            Ok(n) if (1..=MAX_WORKERS).contains(&n) => setting(n, s, WORKERS, None),
            _ => {
                return Err(ConfigError(format!(
                    "{WORKERS}: expected a whole number from 1 to {MAX_WORKERS}, got {v:?}"
                )))
            }
        },
    };
    // A retry never follows a failure at once (invariant 6), and the cap is a cap.
    if retry_base.value < MIN_RETRY_BASE {
        return Err(ConfigError(format!(
            "TINYSCHEDULER_RETRY_BASE_SEC: must be at least {} (a failed task is never retried \
             at once), got {}",
            MIN_RETRY_BASE.as_secs_f64(),
            retry_base.value.as_secs_f64()
        )));
    }
    if retry_max.value < retry_base.value {
        return Err(ConfigError(format!(
            "TINYSCHEDULER_RETRY_MAX_SEC: must be at least TINYSCHEDULER_RETRY_BASE_SEC ({}), \
             got {}",
            retry_base.value.as_secs_f64(),
            retry_max.value.as_secs_f64()
        )));
    }
    // Read where they are used (the shim, the spawner), and checked here so that a typo is an
    // error naming the variable rather than a default taken in silence.
    const QUICK: &str = crate::agent::shim::QUICK_EXIT_ENV;
    if let Some((v, _)) = lookup(QUICK) {
        if v.trim().parse::<u64>().is_err() {
            return Err(ConfigError(format!(
                "{QUICK}: expected a whole number of milliseconds, got {v:?}"
            )));
        }
    }
    const SHIM_EXE: &str = crate::agent::spawn::SHIM_EXE_ENV;
    if let Some((v, _)) = lookup(SHIM_EXE) {
        // Every run would fail to start (and `run --once --wait` wait for its Lease to expire).
        if !crate::agent::spawn::is_executable(Path::new(&v)) {
            return Err(ConfigError(format!(
                "{SHIM_EXE}: {v:?} is not an executable file"
            )));
        }
    }
    const LAUNCHER: &str = crate::agent::launcher::LAUNCHER_ENV;
    if let Some((v, _)) = lookup(LAUNCHER) {
        if parse_bool(&v).is_none() {
            return Err(ConfigError(format!(
                "{LAUNCHER}: expected true or false (1/0, yes/no, on/off), got {v:?}"
            )));
        }
    }

    const LIMITS: &str = "TINYSCHEDULER_AGENT_LIMITS";
    let agent_limits = match lookup(LIMITS) {
        None => setting(BTreeMap::new(), Source::Default, LIMITS, None),
        Some((v, s)) => setting(
            parse_agent_limits(&v).map_err(|m| ConfigError(format!("{LIMITS}: {m}")))?,
            s,
            LIMITS,
            None,
        ),
    };

    const CONTROL: &str = "TINYSCHEDULER_AGENT_CONTROL_FILE";
    let agent_control_file = match lookup(CONTROL) {
        Some((v, s)) => setting(Some(under_base(PathBuf::from(v))), s, CONTROL, None),
        None => setting(None, Source::Default, CONTROL, None),
    };

    let ignored = IGNORED_VARS
        .iter()
        .filter(|(name, _)| lookup(name).is_some())
        .map(|(name, why)| (name.to_string(), *why))
        .collect();

    Ok(Settings {
        state_dir,
        base_path,
        recipes_dir,
        loop_interval,
        heartbeat_sec,
        max_runtime_sec,
        goose_bin,
        tinytask_endpoint,
        log_level,
        log_format,
        http_addr,
        dry_run,
        disable_blocking,
        retry_base,
        retry_max,
        kill_grace,
        workers,
        agent_limits,
        agent_control_file,
        env_file: dotenv.map(|d| d.path.clone()),
        ignored,
    })
}

/// Default [`Settings::workers`] (`TINYSCHEDULER_WORKERS`).
pub const DEFAULT_WORKERS: u64 = 4;
/// The most workers a controller may have: each is a thread of its own.
pub const MAX_WORKERS: u64 = 64;

/// The shortest first retry delay (`TINYSCHEDULER_RETRY_BASE_SEC`).
pub const MIN_RETRY_BASE: Duration = Duration::from_millis(100);

/// The most seconds a duration setting takes (a year): more is a typo, and would overflow.
pub const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

/// A number of seconds (`10`, `0.5`), from none up to a year; `None` for anything else.
pub fn parse_seconds(v: &str) -> Option<Duration> {
    v.trim()
        .parse::<f64>()
        .ok()
        .filter(|n| n.is_finite() && (0.0..=MAX_SECONDS).contains(n))
        .map(Duration::from_secs_f64)
}

/// A duration as seconds: whole ones as an integer, others with their fraction.
fn seconds_json(d: Duration) -> Value {
    if d.subsec_nanos() == 0 {
        json!(d.as_secs())
    } else {
        json!(d.as_secs_f64())
    }
}

fn check_endpoint(name: &str, v: &str) -> Result<(), ConfigError> {
    crate::tinytask::Client::new(v)
        .map(|_| ())
        .map_err(|e| match e {
            // Never repeat a password.
            _ if crate::resources::validate::has_credentials(v.trim()) => ConfigError(format!(
                "{name}: {}",
                crate::resources::validate::CREDENTIALS
            )),
            crate::tinytask::Error::InvalidEndpoint { message, .. } => ConfigError(format!(
                "{name}: expected an http:// or https:// URL, got {v:?} ({message})"
            )),
            other => ConfigError(format!("{name}: {other}")),
        })
}

/// `true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`, any case.
pub fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// Parses agent limits: a JSON object `{"vaela": 2}` or `vaela:2,damien:1` (`=` also accepted).
/// Counts are non-negative integers; 0 means "no slots" (imported as a paused agent).
pub fn parse_agent_limits(s: &str) -> Result<BTreeMap<String, u32>, String> {
    let s = s.trim();
    let mut out = BTreeMap::new();
    if s.starts_with('{') {
        let v: Value = serde_json::from_str(s).map_err(|e| format!("invalid JSON: {e}"))?;
        let Value::Object(m) = v else {
            return Err("the JSON must be an object".into());
        };
        for (agent, n) in m {
            let n = n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| format!("{agent}: expected a non-negative integer, got {n}"))?;
            out.insert(agent, n);
        }
        return Ok(out);
    }
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((agent, n)) = part.split_once(':').or_else(|| part.split_once('=')) else {
            return Err(format!("expected agent:slots, got {part:?}"));
        };
        let agent = agent.trim();
        if agent.is_empty() {
            return Err(format!("expected agent:slots, got {part:?}"));
        }
        let n = n.trim().parse::<u32>().map_err(|_| {
            format!(
                "{agent}: expected a non-negative integer, got {:?}",
                n.trim()
            )
        })?;
        out.insert(agent.to_string(), n);
    }
    Ok(out)
}

impl Settings {
    /// Rows of (name, value, source, env var, flag) for printing.
    pub fn rows(
        &self,
    ) -> Vec<(
        &'static str,
        Value,
        &Source,
        &'static str,
        Option<&'static str>,
    )> {
        fn row<'a, T>(
            name: &'static str,
            s: &'a Setting<T>,
            v: Value,
        ) -> (
            &'static str,
            Value,
            &'a Source,
            &'static str,
            Option<&'static str>,
        ) {
            (name, v, &s.source, s.env, s.flag)
        }
        vec![
            row("state_dir", &self.state_dir, json!(self.state_dir.value)),
            row("base_path", &self.base_path, json!(self.base_path.value)),
            row(
                "recipes_dir",
                &self.recipes_dir,
                json!(self.recipes_dir.value),
            ),
            row(
                "loop_interval",
                &self.loop_interval,
                json!(self.loop_interval.value.as_secs()),
            ),
            row(
                "heartbeat_sec",
                &self.heartbeat_sec,
                json!(self.heartbeat_sec.value),
            ),
            row(
                "max_runtime_sec",
                &self.max_runtime_sec,
                json!(self.max_runtime_sec.value),
            ),
            row("goose_bin", &self.goose_bin, json!(self.goose_bin.value)),
            row(
                "tinytask_endpoint",
                &self.tinytask_endpoint,
                json!(self.tinytask_endpoint.value),
            ),
            row("log_level", &self.log_level, json!(self.log_level.value)),
            row("log_format", &self.log_format, json!(self.log_format.value)),
            row("http_addr", &self.http_addr, json!(self.http_addr.value)),
            row("dry_run", &self.dry_run, json!(self.dry_run.value)),
            row(
                "disable_blocking",
                &self.disable_blocking,
                json!(self.disable_blocking.value),
            ),
            row(
                "retry_base_sec",
                &self.retry_base,
                seconds_json(self.retry_base.value),
            ),
            row(
                "retry_max_sec",
                &self.retry_max,
                seconds_json(self.retry_max.value),
            ),
            row(
                "kill_grace_sec",
                &self.kill_grace,
                seconds_json(self.kill_grace.value),
            ),
            row("workers", &self.workers, json!(self.workers.value)),
            row(
                "agent_limits",
                &self.agent_limits,
                json!(self.agent_limits.value),
            ),
            row(
                "agent_control_file",
                &self.agent_control_file,
                json!(self.agent_control_file.value),
            ),
        ]
    }

    /// `{"settings": {name: {value, source, env, flag}}, "envFile": …, "ignored": […]}`.
    pub fn to_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        for (name, value, source, env, flag) in self.rows() {
            m.insert(
                name.to_string(),
                json!({"value": value, "source": source.as_str(), "env": env, "flag": flag}),
            );
        }
        json!({
            "settings": m,
            "envFile": self.env_file,
            "ignored": self.ignored.iter().map(|(k, why)| json!({"env": k, "reason": why})).collect::<Vec<_>>(),
        })
    }
}

// ---- process integration ----

static CURRENT: OnceLock<Settings> = OnceLock::new();

/// The settings the binary resolved at start ([`parse_cli`]); `None` in library use or for
/// commands that do not read settings (`version`, `shim`).
pub fn current() -> Option<&'static Settings> {
    CURRENT.get()
}

/// Prints a command-line error (or the help or version asked for) and exits: 0 for help and
/// version, 1 for a usage error, like every other error (DESIGN.md §6; clap would use 2).
fn exit_on(e: clap::Error) -> ! {
    let _ = e.print();
    std::process::exit(if e.use_stderr() { 1 } else { 0 })
}

/// The variables the command line parser reads itself (`env = ...` on an argument, at any
/// depth); the rest are read by [`resolve`].
fn clap_env(cmd: &clap::Command) -> Vec<std::ffi::OsString> {
    cmd.get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_os_string()))
        .chain(cmd.get_subcommands().flat_map(clap_env))
        .collect()
}

/// Parses the command line for the binary: reads the `.env` file (exporting its variables where
/// the environment does not set them, before any thread starts), re-parses so flags with an
/// `env` fallback see them, resolves [`Settings`] and applies the effective state directory
/// (`TINYSCHEDULER_BASE_PATH`) to the parsed globals.
pub fn parse_cli() -> Result<crate::cli::Cli, ConfigError> {
    use crate::cli::Command;
    use clap::{CommandFactory, FromArgMatches};

    // An empty value means unset, as for every other setting; clap would call it a missing value.
    // Single-threaded here: nothing else reads the environment concurrently.
    for k in clap_env(&crate::cli::Cli::command()) {
        if std::env::var_os(&k).is_some_and(|v| v.is_empty()) {
            std::env::remove_var(&k);
        }
    }
    // Built anew for each parse: clap reads an argument's env variable when the command is
    // built, so it must see the environment as cleaned above (and as .env extends it below).
    let parse = || -> clap::ArgMatches {
        crate::cli::Cli::command()
            .try_get_matches()
            .unwrap_or_else(|e| exit_on(e))
    };
    let from =
        |m: &clap::ArgMatches| crate::cli::Cli::from_arg_matches(m).unwrap_or_else(|e| exit_on(e));
    let matches = parse();
    let cli = from(&matches);
    if matches!(
        cli.command,
        Command::Version | Command::Completion(_) | Command::Shim(_) | Command::ShimLauncher
    ) {
        return Ok(cli);
    }
    let dotenv = DotEnv::discover(cli.globals.env_file.as_deref())?;
    let mut injected = BTreeSet::new();
    if let Some(d) = &dotenv {
        for (k, v) in &d.vars {
            if !v.is_empty() && std::env::var_os(k).is_none_or(|x| x.is_empty()) {
                // Single-threaded here: nothing else reads the environment concurrently.
                std::env::set_var(k, v);
                injected.insert(k.clone());
            }
        }
    }
    let (matches, mut cli) = if injected.is_empty() {
        (matches, cli)
    } else {
        let m = parse();
        let c = from(&m);
        (m, c)
    };
    let given = |m: &clap::ArgMatches, id: &str| {
        matches!(
            m.try_get_raw(id)
                .ok()
                .flatten()
                .and_then(|_| m.value_source(id)),
            Some(clap::parser::ValueSource::CommandLine)
        )
    };
    let flags = Flags {
        state_dir: given(&matches, "state_dir").then(|| cli.globals.state_dir.clone()),
        tinytask_endpoint: cli.globals.tinytask_endpoint.clone(),
        dry_run: matches
            .subcommand_matches("run")
            .filter(|m| given(m, "dry_run"))
            .map(|_| true),
        log_level: given(&matches, "log_level")
            .then(|| cli.globals.log_level.clone())
            .flatten(),
        log_format: given(&matches, "log_format")
            .then(|| cli.globals.log_format.map(|f| f.name().to_string()))
            .flatten(),
        http_addr: match &cli.command {
            Command::Run(r) => matches
                .subcommand_matches("run")
                .filter(|m| given(m, "http"))
                .and(r.http.clone()),
            _ => None,
        },
    };
    let env = |k: &str| {
        if injected.contains(k) {
            None
        } else {
            std::env::var(k).ok()
        }
    };
    let settings = resolve(&flags, &env, dotenv.as_ref())?;
    cli.globals.state_dir = settings.state_dir.value.clone();
    // From the flag, the environment or .env, checked by `resolve`.
    cli.globals.log_format = match settings.log_format.value.as_deref() {
        Some("human") => Some(crate::daemon::logging::LogFormat::Human),
        Some("json") => Some(crate::daemon::logging::LogFormat::Json),
        _ => None,
    };
    let _ = CURRENT.set(settings);
    Ok(cli)
}

/// The settings for a command: those resolved at start, or (library use) resolved now from the
/// globals and the process environment.
pub fn settings_for(g: &crate::cli::Globals) -> Result<Settings, ConfigError> {
    if let Some(s) = current() {
        return Ok(s.clone());
    }
    let dotenv = DotEnv::discover(g.env_file.as_deref())?;
    let flags = Flags {
        state_dir: Some(g.state_dir.clone()),
        tinytask_endpoint: g.tinytask_endpoint.clone(),
        ..Flags::default()
    };
    resolve(&flags, &|k| std::env::var(k).ok(), dotenv.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| m.get(k).cloned()
    }

    fn dotenv(text: &str) -> DotEnv {
        DotEnv::parse(Path::new("test.env"), text).unwrap()
    }

    #[test]
    fn a_flag_beats_the_environment_which_beats_dotenv_which_beats_the_default() {
        let d =
            dotenv("TINYSCHEDULER_MCP_ENDPOINT=http://dotenv:1\nTINYSCHEDULER_HEARTBEAT_SEC=7\n");
        let env = env_of(&[("TINYSCHEDULER_MCP_ENDPOINT", "http://env:1")]);
        let flags = Flags {
            tinytask_endpoint: Some("http://flag:1".into()),
            ..Flags::default()
        };
        let s = resolve(&flags, &env, Some(&d)).unwrap();
        assert_eq!(s.tinytask_endpoint.value, "http://flag:1");
        assert_eq!(s.tinytask_endpoint.source, Source::Flag);
        let s = resolve(&Flags::default(), &env, Some(&d)).unwrap();
        assert_eq!(s.tinytask_endpoint.source, Source::Env);
        assert_eq!(s.heartbeat_sec.value, 7);
        assert_eq!(s.heartbeat_sec.source, Source::DotEnv);
        let s = resolve(&Flags::default(), &env_of(&[]), None).unwrap();
        assert_eq!(s.tinytask_endpoint.value, "http://localhost:3000");
        assert_eq!(s.tinytask_endpoint.source, Source::Default);
        assert_eq!(s.loop_interval.value, Duration::from_secs(30));
    }

    #[test]
    fn a_base_path_moves_the_default_state_dir_but_not_an_explicit_one() {
        let env = env_of(&[("TINYSCHEDULER_BASE_PATH", "/srv/calypso")]);
        let s = resolve(&Flags::default(), &env, None).unwrap();
        assert_eq!(s.state_dir.value, PathBuf::from("/srv/calypso/state"));
        assert_eq!(s.state_dir.source, Source::BasePath);
        assert_eq!(s.recipes_dir.value, PathBuf::from("/srv/calypso/recipes"));
        let env = env_of(&[
            ("TINYSCHEDULER_BASE_PATH", "/srv/calypso"),
            ("TINYSCHEDULER_STATE_DIR", "/var/lib/ts"),
        ]);
        let s = resolve(&Flags::default(), &env, None).unwrap();
        assert_eq!(s.state_dir.value, PathBuf::from("/var/lib/ts"));
    }

    #[test]
    fn invalid_values_name_the_variable_and_the_value() {
        let env = env_of(&[("TINYSCHEDULER_LOOP_INTERVAL_SEC", "abc")]);
        let e = resolve(&Flags::default(), &env, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "TINYSCHEDULER_LOOP_INTERVAL_SEC: expected a positive integer, got \"abc\""
        );
        let env = env_of(&[("TINYSCHEDULER_AGENT_LIMITS", "vaela:x")]);
        let e = resolve(&Flags::default(), &env, None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("TINYSCHEDULER_AGENT_LIMITS: vaela"),
            "{e}"
        );
        let env = env_of(&[("TINYSCHEDULER_DRY_RUN", "maybe")]);
        assert!(resolve(&Flags::default(), &env, None).is_err());
        let env = env_of(&[("TINYSCHEDULER_MCP_ENDPOINT", "localhost:3000")]);
        let e = resolve(&Flags::default(), &env, None).unwrap_err();
        assert!(
            e.to_string().starts_with("TINYSCHEDULER_MCP_ENDPOINT:"),
            "{e}"
        );
    }

    #[test]
    fn agent_limits_read_json_or_the_simple_form() {
        let want: BTreeMap<String, u32> = [("a".to_string(), 1), ("b".to_string(), 2)].into();
        assert_eq!(parse_agent_limits(r#"{"a": 1, "b": 2}"#).unwrap(), want);
        assert_eq!(parse_agent_limits("a:1, b:2").unwrap(), want);
        assert_eq!(parse_agent_limits("a=1,b=2").unwrap(), want);
        assert!(parse_agent_limits(r#"{"a": -1}"#).is_err());
        assert!(parse_agent_limits("a").is_err());
    }

    #[test]
    fn dotenv_reads_quotes_comments_and_export_prefixes() {
        let d = dotenv(
            "# comment\n\nexport A=1\nB=\"two words # not a comment\"\nC='lit\\n' # c\nD=plain # trailing\nE=\n",
        );
        assert_eq!(d.vars["A"], "1");
        assert_eq!(d.vars["B"], "two words # not a comment");
        assert_eq!(d.vars["C"], "lit\\n");
        assert_eq!(d.vars["D"], "plain");
        assert_eq!(d.vars["E"], "");
    }

    #[test]
    fn dotenv_errors_name_the_file_and_line() {
        let e = DotEnv::parse(Path::new("/x/.env"), "A=1\nthis is not valid\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "/x/.env:2: expected KEY=VALUE, got \"this is not valid\""
        );
        let e = DotEnv::parse(Path::new(".env"), "A=\"open\n").unwrap_err();
        assert_eq!(e.to_string(), ".env:1: unterminated double quote");
        let e = DotEnv::parse(Path::new(".env"), "\n\n1A=x\n").unwrap_err();
        assert!(
            e.to_string().starts_with(".env:3: invalid variable name"),
            "{e}"
        );
    }
}
