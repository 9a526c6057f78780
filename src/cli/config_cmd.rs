//! `config [--json]` (the effective settings and their sources) and `validate-config [--fix]`
//! (checks that the settings, agents and recipes can work).

use std::collections::BTreeSet;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use super::args::{ConfigArgs, ValidateConfigArgs};
use super::{CliError, CliResult, Globals};
use crate::config::{settings_for, Settings};
use crate::resources::{Agent, Queue, QueueSource};
use crate::store::Store;

/// `tinyscheduler config [--json]`.
pub fn config(g: &Globals, a: ConfigArgs) -> CliResult {
    let s = settings_for(g).map_err(|e| CliError(format!("error: {e}")))?;
    if a.json {
        crate::outln!("{:#}", s.to_json());
    } else {
        crate::stdout::write(render_table(&s).as_bytes());
    }
    for (var, why) in &s.ignored {
        eprintln!("warning: {var} is set but has no effect: {why}");
    }
    Ok(ExitCode::SUCCESS)
}

fn render_table(s: &Settings) -> String {
    let rows: Vec<[String; 4]> = s
        .rows()
        .into_iter()
        .map(|(name, value, source, env, flag)| {
            let value = match value {
                serde_json::Value::String(v) => v,
                serde_json::Value::Null => unset(name).to_string(),
                v => v.to_string(),
            };
            let how = match flag {
                Some(f) => format!("{f}, {env}"),
                None => env.to_string(),
            };
            [name.to_string(), value, source.to_string(), how]
        })
        .collect();
    let header = ["NAME", "VALUE", "SOURCE", "SET WITH"].map(str::to_string);
    let mut widths = [0usize; 3];
    for r in std::iter::once(&header).chain(rows.iter()) {
        for i in 0..3 {
            widths[i] = widths[i].max(r[i].chars().count());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(&header).chain(rows.iter()) {
        out.push_str(&format!(
            "{:w0$}   {:w1$}   {:w2$}   {}\n",
            r[0],
            r[1],
            r[2],
            r[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        ));
    }
    match &s.env_file {
        Some(p) => out.push_str(&format!("env file: {}\n", p.display())),
        None => out.push_str("env file: none\n"),
    }
    out
}

/// What an unset setting means, for the table.
fn unset(name: &str) -> &'static str {
    match name {
        "log_level" => "<warn; info for run --daemon>",
        "log_format" => "<human on a terminal, else json>",
        "http_addr" => "<off>",
        _ => "<none>",
    }
}

/// Accumulates `[+]` / `[-]` lines.
struct Report {
    failed: usize,
}

impl Report {
    fn ok(&mut self, what: impl std::fmt::Display) {
        crate::outln!("[+] {what}");
    }
    fn fail(&mut self, what: impl std::fmt::Display, why: impl std::fmt::Display) {
        self.failed += 1;
        crate::outln!("[-] {what} failed: {why}");
    }
}

/// `tinyscheduler validate-config [--fix]`.
pub fn validate(g: &Globals, a: ValidateConfigArgs) -> CliResult {
    let mut r = Report { failed: 0 };
    let s = match settings_for(g) {
        Ok(s) => {
            r.ok("settings ok");
            for (var, why) in &s.ignored {
                eprintln!("warning: {var} is set but has no effect: {why}");
            }
            s
        }
        Err(e) => {
            r.fail("settings", e);
            return Ok(ExitCode::from(1));
        }
    };
    // What `run` reads from the Python-era control file and limits, read the same way.
    match crate::cli::import::python_era_documents(g, None, None) {
        Ok(None) => {}
        Ok(Some(docs)) => r.ok(format!(
            "agent-control settings ok ({} Agents and Queues)",
            docs.len()
        )),
        Err(e) => r.fail(
            "agent-control settings",
            e.to_string().trim_start_matches("error: "),
        ),
    }
    let state = s.state_dir.value.clone();
    check_dir(&mut r, "state directory", &state, a.fix);
    let logs = state.join("logs");
    if !a.fix && state.is_dir() && !logs.exists() {
        // A store that was applied to but never run has none yet; the first run makes it.
        r.ok(format!(
            "log directory {} does not exist yet (the first run creates it)",
            logs.display()
        ));
    } else {
        check_dir(&mut r, "log directory", &logs, a.fix);
    }

    let (agents, queues) = if state.is_dir() {
        let store = Store::open_read_only(&state);
        let agents = match store.list::<Agent>(None) {
            Ok(l) => {
                for sk in &l.skipped {
                    r.fail(format!("agent {}", sk.path.display()), &sk.reason);
                }
                l.items
            }
            Err(e) => {
                r.fail("agent store", e);
                Vec::new()
            }
        };
        let queues = match store.list::<Queue>(None) {
            Ok(l) => l.items,
            Err(e) => {
                r.fail("queue store", e);
                Vec::new()
            }
        };
        (agents, queues)
    } else {
        (Vec::new(), Vec::new())
    };
    if agents.is_empty() {
        r.ok("no agents in the store (nothing to check)");
    }

    let recipes_dir = s.recipes_dir.value.clone();
    let recipes_canon = recipes_dir.canonicalize().ok();
    let mut recipes_checked = false;
    // As the shim resolves it: a relative workingDir from the state directory's parent, none as
    // the scheduler's (here: this command's) directory.
    let state_parent = std::path::absolute(&state)
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/"));
    for agent in &agents {
        let name = &agent.metadata.name;
        let base = match agent.spec.working_dir.as_deref().filter(|w| !w.is_empty()) {
            Some(w) => {
                let dir = state_parent.join(w);
                if !dir.is_dir() {
                    r.fail(
                        format!("agent {name}: workingDir"),
                        format!("{} does not exist or is not a directory", dir.display()),
                    );
                }
                dir
            }
            None => PathBuf::from("."),
        };
        let argv = if agent.spec.command.is_empty() {
            crate::resources::agent::default_goose_command(&s.goose_bin.value)
        } else {
            agent.spec.command.clone()
        };
        let what = format!("agent {name}: program");
        let program = &argv[0];
        if program.contains("{{") {
            r.ok(format!("{what} {program:?} is templated (not checked)"));
        } else {
            match find_program(program, &base, agent.spec.env.get("PATH")) {
                Ok(p) => r.ok(format!("{what} {program} found at {}", p.display())),
                Err(why) => r.fail(&what, why),
            }
        }
        for recipe in recipes_in(&argv) {
            if !recipes_checked {
                recipes_checked = true;
                if recipes_canon.is_none() {
                    r.fail(
                        "recipes directory",
                        format!("{} does not exist", recipes_dir.display()),
                    );
                }
            }
            let recipe = recipe.replace("{{agent.name}}", name);
            let what = format!("agent {name}: recipe {recipe}");
            if recipe.contains("{{") {
                r.ok(format!("{what} is templated (not checked)"));
                continue;
            }
            match check_recipe(&recipe, &base, recipes_canon.as_deref(), &recipes_dir) {
                Ok(()) => r.ok(format!("{what} ok")),
                Err(why) => r.fail(&what, why),
            }
        }
    }

    let endpoints: BTreeSet<String> = queues
        .iter()
        .filter(|q| q.spec.source == QueueSource::Tinytask)
        .map(|q| {
            q.spec
                .endpoint
                .clone()
                .unwrap_or_else(|| s.tinytask_endpoint.value.clone())
        })
        .collect();
    if endpoints.is_empty() {
        r.ok("tinytask not used by any Queue (reachability not checked)");
    } else {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CliError(format!("error: cannot start the runtime: {e}")))?;
        for ep in endpoints {
            let what = format!("tinytask {ep} reachable");
            let cfg = crate::tinytask::ClientConfig::new(ep.clone())
                .timeout(Duration::from_secs(3))
                .retry(crate::tinytask::RetryPolicy {
                    max_attempts: 2,
                    ..Default::default()
                });
            match crate::tinytask::Client::with_config(cfg) {
                Err(e) => r.fail(&what, e),
                Ok(c) => match rt.block_on(c.health()) {
                    Ok(h) => r.ok(format!("{what} ({})", h.status)),
                    Err(e) => r.fail(&what, e),
                },
            }
        }
    }

    if r.failed > 0 {
        crate::outln!("{} check(s) failed", r.failed);
        Ok(ExitCode::from(1))
    } else {
        Ok(ExitCode::SUCCESS)
    }
}

fn check_dir(r: &mut Report, what: &str, dir: &Path, fix: bool) {
    if dir.is_dir() {
        let writable = nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_ok();
        if writable {
            r.ok(format!("{what} {} exists", dir.display()));
        } else {
            r.fail(format!("{what} {}", dir.display()), "not writable");
        }
    } else if dir.exists() {
        r.fail(
            format!("{what} {}", dir.display()),
            "exists but is not a directory",
        );
    } else if fix {
        match std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
        {
            Ok(()) => r.ok(format!("{what} {} created (mode 0700)", dir.display())),
            Err(e) => r.fail(
                format!("{what} {}", dir.display()),
                format!("cannot create: {e}"),
            ),
        }
    } else {
        r.fail(
            format!("{what} {}", dir.display()),
            "does not exist (validate-config --fix creates it)",
        );
    }
}

/// Where `program` is found as the shim looks for it: a path with a `/` from `base` (the
/// agent's working directory), a bare name in the agent's `PATH` (`path`, from its `env`) or else
/// the scheduler's.
fn find_program(program: &str, base: &Path, path: Option<&String>) -> Result<PathBuf, String> {
    if program.contains('/') {
        let p = if Path::new(program).is_absolute() {
            PathBuf::from(program)
        } else {
            base.join(program)
        };
        return if crate::agent::spawn::is_executable(&p) {
            Ok(p)
        } else if p.exists() {
            Err(format!("{} is not an executable file", p.display()))
        } else {
            Err(format!("{} does not exist", p.display()))
        };
    }
    let path = path
        .cloned()
        .or_else(|| std::env::var("PATH").ok())
        .unwrap_or_default();
    // The shim's own lookup (which stops at the first relative entry, as the shim does).
    crate::agent::shim::find_in_path(program, &path)
        .ok_or_else(|| format!("{program:?} not found in PATH"))
}

/// The values of `--recipe X` / `--recipe=X` in an argv.
fn recipes_in(argv: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        if a == "--recipe" {
            if let Some(v) = it.next() {
                out.push(v.clone());
            }
        } else if let Some(v) = a.strip_prefix("--recipe=") {
            out.push(v.to_string());
        }
    }
    out
}

fn check_recipe(
    recipe: &str,
    base: &Path,
    recipes_canon: Option<&Path>,
    recipes_dir: &Path,
) -> Result<(), String> {
    let rp = Path::new(recipe);
    if rp.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err("contains `..`: recipes must stay inside the recipes directory".into());
    }
    let full = if rp.is_absolute() {
        rp.to_path_buf()
    } else {
        base.join(rp)
    };
    if !full.is_file() {
        return Err(format!("{} does not exist", full.display()));
    }
    let Some(dir) = recipes_canon else {
        return Err(format!(
            "the recipes directory {} does not exist",
            recipes_dir.display()
        ));
    };
    let canon = full
        .canonicalize()
        .map_err(|e| format!("{}: {e}", full.display()))?;
    if canon.starts_with(dir) {
        Ok(())
    } else {
        Err(format!(
            "{} is outside the recipes directory {}",
            canon.display(),
            dir.display()
        ))
    }
}
