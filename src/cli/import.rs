//! `tinyscheduler import`: Agent and Queue manifests from the Python scheduler's
//! `agent-control.json` and agent limits.
//!
//! Accepted shapes of the control file (unknown fields are ignored):
//! - the Python scheduler's list: `[{"agentName": "vaela", "agentType": "dev"}, …]`
//!   (`agentType` is the tinytask queue the agent serves);
//! - a list of names: `["vaela", "damien"]`;
//! - `{"agents": {"vaela": {"enabled": true, "queue": "dev", "recipe": "…", …}}}` or
//!   `{"agents": [ …either of the list forms… ]}`.
//!
//! Per agent: the name (`agentName`/`name`/`agent`, or the map key), the queue
//! (`agentType`/`queue`/`queueName`/`queue_name`), `enabled` (false → `paused: true`), a Goose
//! `recipe` path (otherwise the command stays empty and the Goose default applies), a slot count
//! (`maxConcurrency`/`max_concurrency`/`limit`/`slots`; `--limits` wins), `workingDir`
//! (default: `TINYSCHEDULER_BASE_PATH`, where the Python scheduler ran Goose), `env`.
//! Agents named only in the limits are imported without a queue (they run tasks assigned to them).
//! Each queue becomes a `source: tinytask` Queue.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::{json, Map, Value};

use super::args::ImportArgs;
use super::{CliError, CliResult, Globals};
use crate::config::{parse_agent_limits, settings_for, Settings, Source};
use crate::resources::meta::API_VERSION;
use crate::resources::registry::{admit, Kind};
use crate::resources::validate::validate_name;
use crate::store::Store;

/// Annotation recording where an imported object came from.
pub const IMPORTED_FROM_ANNOTATION: &str = "tinyscheduler.io/imported-from";

/// One agent as read from the control file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImportedAgent {
    pub name: String,
    pub queue: Option<String>,
    pub enabled: bool,
    pub recipe: Option<String>,
    pub limit: Option<u32>,
    pub working_dir: Option<String>,
    pub env: BTreeMap<String, String>,
    /// Where it was found, for messages (`agents[2]`, `agents.vaela`).
    pub field: String,
}

fn err(field: &str, msg: impl std::fmt::Display) -> String {
    format!("{field}: {msg}")
}

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(_) => "a boolean".into(),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// (field path, map key, value) of one agent entry.
type Entry<'a> = (String, Option<String>, &'a Value);

/// Parses the control file's JSON into agents; errors name the field.
pub fn parse_agent_control(doc: &Value) -> Result<Vec<ImportedAgent>, String> {
    let items: Vec<Entry> = match doc {
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("[{i}]"), None, v))
            .collect(),
        Value::Object(m) => match m.get("agents") {
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("agents[{i}]"), None, v))
                .collect(),
            Some(Value::Object(am)) => am
                .iter()
                .map(|(k, v)| (format!("agents.{k}"), Some(k.clone()), v))
                .collect(),
            Some(other) => {
                return Err(err(
                    "agents",
                    format!(
                        "expected a list or an object of agents, got {}",
                        describe(other)
                    ),
                ))
            }
            None => {
                return Err(err(
                    "(root)",
                    "expected a list of agents or an object with an \"agents\" field",
                ))
            }
        },
        other => {
            return Err(err(
                "(root)",
                format!(
                    "expected a list of agents or an object, got {}",
                    describe(other)
                ),
            ))
        }
    };
    let mut out = Vec::new();
    for (field, key, v) in items {
        out.push(parse_agent(&field, key, v)?);
    }
    Ok(out)
}

fn parse_agent(field: &str, key: Option<String>, v: &Value) -> Result<ImportedAgent, String> {
    let mut a = ImportedAgent {
        enabled: true,
        field: field.to_string(),
        ..Default::default()
    };
    let m: Map<String, Value> = match v {
        Value::String(s) if key.is_none() => {
            a.name = s.clone();
            return Ok(a);
        }
        Value::Object(m) => m.clone(),
        Value::Null if key.is_some() => Map::new(),
        other => {
            return Err(err(
                field,
                format!("expected an agent name or object, got {}", describe(other)),
            ))
        }
    };
    let string = |names: &[&str]| -> Result<Option<String>, String> {
        for n in names {
            match m.get(*n) {
                None | Some(Value::Null) => continue,
                Some(Value::String(s)) => return Ok(Some(s.clone())),
                Some(other) => {
                    return Err(err(
                        &format!("{field}.{n}"),
                        format!("expected a string, got {}", describe(other)),
                    ))
                }
            }
        }
        Ok(None)
    };
    a.name = match key {
        Some(k) => k,
        None => string(&["agentName", "name", "agent"])?
            .ok_or_else(|| err(field, "no agent name (expected \"agentName\" or \"name\")"))?,
    };
    a.queue = string(&["agentType", "queue", "queueName", "queue_name"])?
        .filter(|q| !q.trim().is_empty());
    a.recipe = string(&["recipe", "recipePath", "recipe_path"])?.filter(|r| !r.is_empty());
    a.working_dir = string(&["workingDir", "working_dir"])?.filter(|r| !r.is_empty());
    match m.get("enabled") {
        None | Some(Value::Null) => {}
        Some(Value::Bool(b)) => a.enabled = *b,
        Some(other) => {
            return Err(err(
                &format!("{field}.enabled"),
                format!("expected true or false, got {}", describe(other)),
            ))
        }
    }
    for n in ["maxConcurrency", "max_concurrency", "limit", "slots"] {
        match m.get(n) {
            None | Some(Value::Null) => continue,
            Some(v) => {
                let l = v
                    .as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .ok_or_else(|| {
                        err(
                            &format!("{field}.{n}"),
                            format!("expected a non-negative integer, got {}", describe(v)),
                        )
                    })?;
                a.limit = Some(l);
                break;
            }
        }
    }
    match m.get("env") {
        None | Some(Value::Null) => {}
        Some(Value::Object(e)) => {
            for (k, v) in e {
                let v = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    other => {
                        return Err(err(
                            &format!("{field}.env.{k}"),
                            format!("expected a string, got {}", describe(other)),
                        ))
                    }
                };
                a.env.insert(k.clone(), v);
            }
        }
        Some(other) => {
            return Err(err(
                &format!("{field}.env"),
                format!("expected an object, got {}", describe(other)),
            ))
        }
    }
    Ok(a)
}

/// A Queue name for a tinytask queue name: itself when valid, else a sanitized form (the
/// original goes to `remoteQueue`).
fn queue_object_name(remote: &str) -> Option<String> {
    if validate_name(remote).is_ok() {
        return Some(remote.to_string());
    }
    let mut s: String = remote
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    while s.contains("--") {
        s = s.replace("--", "-");
    }
    // Cut to length first, so that the cut cannot leave a '-' or '.' at the end.
    s.truncate(crate::resources::validate::MAX_NAME_LEN);
    let s = s.trim_matches(|c| c == '-' || c == '.').to_string();
    validate_name(&s).ok().map(|_| s)
}

/// The largest control file read (the Python scheduler's held a few agents).
const MAX_CONTROL_BYTES: u64 = 64 * 1024 * 1024;

/// Reads a control file of at most [`MAX_CONTROL_BYTES`]: `/dev/zero` or a wrong path to a huge
/// file is an error, not all the memory there is.
fn read_control_file(path: &Path) -> Result<String, CliError> {
    let cannot =
        |e: std::io::Error| CliError(format!("error: cannot read {}: {e}", path.display()));
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(cannot)?
        .take(MAX_CONTROL_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(cannot)?;
    if text.len() as u64 > MAX_CONTROL_BYTES {
        return Err(CliError(format!(
            "error: {}: larger than {MAX_CONTROL_BYTES} bytes, too large for a control file",
            path.display()
        )));
    }
    Ok(text)
}

/// Builds the Queue and Agent documents (queues first), each admitted by the registry.
pub fn build_manifests(
    agents: &[ImportedAgent],
    limits: &BTreeMap<String, u32>,
    settings: &Settings,
    source_file: Option<&Path>,
) -> Result<Vec<Value>, String> {
    let mut agents = agents.to_vec();
    for name in limits.keys() {
        if !agents.iter().any(|a| &a.name == name) {
            agents.push(ImportedAgent {
                name: name.clone(),
                enabled: true,
                field: format!("limits.{name}"),
                ..Default::default()
            });
        }
    }
    if agents.is_empty() {
        return Err("nothing to import: no agents in the control file or the limits".into());
    }
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for a in &agents {
        if let Err(m) = validate_name(&a.name) {
            return Err(err(
                &a.field,
                format!("{:?} is not a valid agent name: {m}", a.name),
            ));
        }
        if let Some(prev) = seen.insert(&a.name, &a.field) {
            return Err(err(
                &a.field,
                format!("agent {:?} is also defined at {prev}", a.name),
            ));
        }
    }
    let annotations = |kind: &str| -> Value {
        match source_file {
            Some(p) => json!({ IMPORTED_FROM_ANNOTATION: p.display().to_string() }),
            None => {
                let _ = kind;
                json!({ IMPORTED_FROM_ANNOTATION: "agent-limits" })
            }
        }
    };

    // Queues.
    let mut queue_names: BTreeMap<String, String> = BTreeMap::new(); // remote -> object name
    let mut docs = Vec::new();
    for a in &agents {
        let Some(remote) = &a.queue else { continue };
        if queue_names.contains_key(remote) {
            continue;
        }
        let name = queue_object_name(remote).ok_or_else(|| {
            err(
                &format!("{}.queue", a.field),
                format!("{remote:?} cannot be made into a Queue name"),
            )
        })?;
        if let Some((other, _)) = queue_names.iter().find(|(_, n)| **n == name) {
            return Err(err(
                &format!("{}.queue", a.field),
                format!("queues {other:?} and {remote:?} both map to the Queue name {name:?}"),
            ));
        }
        let mut spec = Map::new();
        spec.insert("source".into(), json!("tinytask"));
        if settings.disable_blocking.value {
            spec.insert("blocking".into(), json!("ignore"));
        }
        if &name != remote {
            spec.insert("remoteQueue".into(), json!(remote));
        }
        docs.push(json!({
            "apiVersion": API_VERSION, "kind": "Queue",
            "metadata": {"name": name, "annotations": annotations("Queue")},
            "spec": spec,
        }));
        queue_names.insert(remote.clone(), name);
    }

    // Agents.
    for a in &agents {
        let mut spec = Map::new();
        if let Some(q) = &a.queue {
            spec.insert("queue".into(), json!(queue_names[q]));
        }
        let limit = limits.get(&a.name).copied().or(a.limit).unwrap_or(1);
        spec.insert("maxConcurrency".into(), json!(limit.max(1)));
        if let Some(r) = &a.recipe {
            let default_recipe = format!("recipes/{}.yaml", a.name);
            if r != &default_recipe {
                let mut cmd =
                    crate::resources::agent::default_goose_command(&settings.goose_bin.value);
                cmd[3] = r.clone();
                spec.insert("command".into(), json!(cmd));
            }
        }
        let wd = a.working_dir.clone().or_else(|| {
            settings
                .base_path
                .value
                .as_ref()
                .map(|b| b.display().to_string())
        });
        if let Some(wd) = wd {
            spec.insert("workingDir".into(), json!(wd));
        }
        if !a.env.is_empty() {
            spec.insert("env".into(), json!(a.env));
        }
        if settings.heartbeat_sec.source != Source::Default {
            spec.insert(
                "heartbeatSeconds".into(),
                json!(settings.heartbeat_sec.value),
            );
        }
        if settings.max_runtime_sec.source != Source::Default {
            spec.insert(
                "maxRuntimeSeconds".into(),
                json!(settings.max_runtime_sec.value),
            );
        }
        if !a.enabled || limit == 0 {
            spec.insert("paused".into(), json!(true));
        }
        docs.push(json!({
            "apiVersion": API_VERSION, "kind": "Agent",
            "metadata": {"name": a.name, "annotations": annotations("Agent")},
            "spec": spec,
        }));
    }

    for d in &docs {
        let kind = Kind::from_kind_field(d["kind"].as_str().unwrap()).unwrap();
        if let Err(errs) = admit(kind, d) {
            let name = d["metadata"]["name"].as_str().unwrap_or("");
            let msgs: Vec<String> = errs
                .iter()
                .map(|e| format!("{}: {}", e.path, e.message))
                .collect();
            return Err(format!(
                "{}/{name} would be invalid: {}",
                kind.singular(),
                msgs.join("; ")
            ));
        }
    }
    Ok(docs)
}

/// `tinyscheduler import`.
/// The Queue and Agent documents for a Python-era agent-control file (`control`, else the
/// configured `TINYSCHEDULER_AGENT_CONTROL_FILE`) and limits (`limits`, else
/// `TINYSCHEDULER_AGENT_LIMITS`); `Ok(None)` when neither is given.
pub fn python_era_documents(
    g: &Globals,
    control: Option<PathBuf>,
    limits: Option<&str>,
) -> Result<Option<Vec<Value>>, CliError> {
    let settings = settings_for(g).map_err(|e| CliError(format!("error: {e}")))?;
    let control = control.or_else(|| settings.agent_control_file.value.clone());
    let limits = match limits {
        Some(spec) => {
            parse_agent_limits(spec).map_err(|m| CliError(format!("error: --limits: {m}")))?
        }
        None => settings.agent_limits.value.clone(),
    };
    let agents = match &control {
        Some(path) => {
            let text = read_control_file(path)?;
            let super::unique_json::UniqueKeys(doc) = serde_json::from_str(&text)
                .map_err(|e| CliError(format!("error: {}: invalid JSON: {e}", path.display())))?;
            parse_agent_control(&doc)
                .map_err(|m| CliError(format!("error: {}: {m}", path.display())))?
        }
        None if limits.is_empty() => return Ok(None),
        None => Vec::new(),
    };
    let docs = build_manifests(&agents, &limits, &settings, control.as_deref()).map_err(|m| {
        CliError(match &control {
            Some(p) => format!("error: {}: {m}", p.display()),
            None => format!("error: {m}"),
        })
    })?;
    Ok(Some(docs))
}

/// `run` honours the Python-era environment: the Agents and Queues that the agent-control file and
/// limits describe are created when missing, and kept in step when they were imported before (an
/// object without the import annotation belongs to the user and is left alone). Returns one
/// kubectl-style line per object written.
pub fn apply_python_era(g: &Globals, store: &Store) -> Result<Vec<String>, CliError> {
    let Some(docs) = python_era_documents(g, None, None)? else {
        return Ok(Vec::new());
    };
    let mut lines = Vec::new();
    for d in &docs {
        let Some(kind) = d["kind"].as_str().and_then(Kind::from_kind_field) else {
            continue;
        };
        let name = d["metadata"]["name"].as_str().unwrap_or_default();
        let line = |verb: &str| {
            format!(
                "{}.{}/{name} {verb}",
                kind.singular(),
                crate::resources::meta::GROUP
            )
        };
        match store.get_raw(kind.plural(), name) {
            Err(e) if e.is_not_found() => {
                store.create_raw(kind.plural(), d)?;
                lines.push(line("created (from the agent-control settings)"));
            }
            Err(e) => return Err(e.into()),
            Ok(current) => {
                if current["metadata"]["annotations"][IMPORTED_FROM_ANNOTATION].is_null() {
                    continue;
                }
                let (_, outcome) = store.update_raw(kind.plural(), d)?;
                if outcome == crate::store::WriteOutcome::Updated {
                    lines.push(line("configured (from the agent-control settings)"));
                }
            }
        }
    }
    Ok(lines)
}

pub fn import(g: &Globals, a: ImportArgs) -> CliResult {
    let Some(docs) = python_era_documents(g, a.agent_control.clone(), a.limits.as_deref())? else {
        return Err(CliError(
            "error: nothing to import: give --agent-control FILE or --limits SPEC \
             (or set TINYSCHEDULER_AGENT_CONTROL_FILE / TINYSCHEDULER_AGENT_LIMITS)"
                .into(),
        ));
    };

    if a.output == "-" {
        let yaml = serde_saphyr::to_string_multiple(&docs)
            .map_err(|e| CliError(format!("error: cannot write YAML: {e}")))?;
        crate::stdout::write(yaml.as_bytes());
        if !yaml.ends_with('\n') {
            crate::outln!();
        }
        return Ok(ExitCode::SUCCESS);
    }
    write_manifests(&PathBuf::from(&a.output), &docs, a.overwrite)
}

/// Writes one manifest per document into `dir`: every one rendered and every target checked
/// before the first is written, each written whole (a temp file renamed into place). A target
/// that is not a regular file (a directory, a symlink) is refused, and so is one that says
/// something else unless `overwrite`.
fn write_manifests(dir: &Path, docs: &[Value], overwrite: bool) -> CliResult {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for d in docs {
        let Some(kind) = d["kind"].as_str().and_then(Kind::from_kind_field) else {
            continue;
        };
        let name = d["metadata"]["name"].as_str().unwrap_or_default();
        let path = dir.join(format!("{}-{name}.yaml", kind.singular()));
        let yaml = serde_saphyr::to_string(d)
            .map_err(|e| CliError(format!("error: cannot write YAML: {e}")))?;
        match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("error: cannot look at {}: {e}", path.display())),
            Ok(m) if !m.file_type().is_file() => errors.push(format!(
                "error: {} exists and is not a regular file",
                path.display()
            )),
            Ok(_) if overwrite => {}
            Ok(_) => match std::fs::read(&path) {
                Ok(old) if old == yaml.as_bytes() => {}
                Ok(_) => errors.push(format!(
                    "error: {} exists and says something else (--overwrite replaces it)",
                    path.display()
                )),
                Err(e) => errors.push(format!("error: cannot read {}: {e}", path.display())),
            },
        }
        files.push((kind, name.to_string(), path, yaml));
    }
    if !errors.is_empty() {
        errors.push("nothing was written".into());
        return Err(CliError(errors.join("\n")));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError(format!("error: cannot create {}: {e}", dir.display())))?;
    for (kind, name, path, yaml) in files {
        crate::store::fsio::write_atomic(dir, &path, yaml.as_bytes(), true)
            .map_err(|e| CliError(format!("error: cannot write {}: {e}", path.display())))?;
        crate::outln!(
            "{}.{}/{name} written to {}",
            kind.singular(),
            crate::resources::meta::GROUP,
            path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_control_file_shape_is_read() {
        let py = json!([{"agentName": "vaela", "agentType": "dev"}, {"agentName": "oscar", "agentType": "qa", "extra": 1}]);
        let a = parse_agent_control(&py).unwrap();
        assert_eq!(a[0].name, "vaela");
        assert_eq!(a[1].queue.as_deref(), Some("qa"));
        let names = parse_agent_control(&json!(["a", "b"])).unwrap();
        assert_eq!(names.len(), 2);
        let map = parse_agent_control(
            &json!({"agents": {"vaela": {"enabled": false, "queue": "dev", "recipe": "r/x.yaml"}}}),
        )
        .unwrap();
        assert!(!map[0].enabled);
        assert_eq!(map[0].recipe.as_deref(), Some("r/x.yaml"));
    }

    #[test]
    fn unusable_fields_are_named() {
        let e = parse_agent_control(&json!({"agents": {"vaela": {"queue": 3}}})).unwrap_err();
        assert_eq!(e, "agents.vaela.queue: expected a string, got the number 3");
        let e = parse_agent_control(&json!([{"agentType": "dev"}])).unwrap_err();
        assert!(e.starts_with("[0]: no agent name"), "{e}");
        let e =
            parse_agent_control(&json!({"agents": [{"name": "x", "enabled": "yes"}]})).unwrap_err();
        assert!(e.starts_with("agents[0].enabled:"), "{e}");
        let e = parse_agent_control(&json!(42)).unwrap_err();
        assert!(e.starts_with("(root):"), "{e}");
    }

    #[test]
    fn odd_queue_names_get_a_valid_object_name() {
        assert_eq!(queue_object_name("dev").as_deref(), Some("dev"));
        assert_eq!(queue_object_name("Dev_Team").as_deref(), Some("dev-team"));
        assert_eq!(queue_object_name("___"), None);
    }
}
