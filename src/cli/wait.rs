//! `wait KIND/NAME --for=condition=X[=V]|delete|jsonpath={.path}=VALUE [--timeout 30s]`: follows the
//! object with `store.watch` until the condition holds or the timeout passes.

use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

use super::args::WaitArgs;
use super::get::resolve_kind;
use super::printers::resource_name;
use super::{CliError, CliResult, Globals};
use crate::resources::{Agent, Event, Kind, Lease, Queue, Resource, Task};
use crate::store::{Store, WatchEvent, WatchOptions};

/// What to wait for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum For {
    Delete,
    /// A condition type and the status it must have (`True` unless given).
    Condition(String, String),
    /// A simple JSONPath (`.status.phase`, `.status.conditions[0].type`) and its wanted value.
    JsonPath(Vec<Step>, String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Index(usize),
}

/// Parses `--for`.
pub fn parse_for(s: &str) -> Result<For, CliError> {
    let bad = |why: &str| {
        CliError(format!(
            "error: unrecognized condition {s:?}: {why} (expected condition=NAME[=VALUE], delete or \
             jsonpath='{{.status.phase}}'=VALUE)"
        ))
    };
    if s == "delete" {
        return Ok(For::Delete);
    }
    if let Some(rest) = s.strip_prefix("condition=") {
        let (name, value) = match rest.split_once('=') {
            Some((n, v)) => (n, v),
            None => (rest, "True"),
        };
        if name.is_empty() {
            return Err(bad("no condition name"));
        }
        let mut v = value.to_ascii_lowercase();
        if let Some(first) = v.get_mut(0..1) {
            first.make_ascii_uppercase();
        }
        return Ok(For::Condition(name.to_string(), v));
    }
    if let Some(rest) = s.strip_prefix("jsonpath=") {
        let rest = rest.trim_matches('\'');
        let (path, value) = if let Some(inner) = rest.strip_prefix('{') {
            let end = inner.find('}').ok_or_else(|| bad("unclosed '{'"))?;
            let value = inner[end + 1..]
                .trim_start_matches('\'')
                .strip_prefix('=')
                .ok_or_else(|| bad("no '=VALUE' after the path"))?;
            (&inner[..end], value)
        } else {
            rest.rsplit_once('=')
                .ok_or_else(|| bad("no '=VALUE' after the path"))?
        };
        return Ok(For::JsonPath(
            parse_path(path).map_err(|e| bad(&e))?,
            value.trim_matches('\'').to_string(),
        ));
    }
    Err(bad("unknown form"))
}

fn parse_path(p: &str) -> Result<Vec<Step>, String> {
    let p = p.trim();
    let p = p.strip_prefix('$').unwrap_or(p);
    let mut steps = Vec::new();
    for part in p.split('.').filter(|s| !s.is_empty()) {
        let (key, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            steps.push(Step::Key(key.to_string()));
        }
        while let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']').ok_or("unclosed '['")?;
            let idx = r[..end]
                .parse()
                .map_err(|_| format!("bad index {:?}", &r[..end]))?;
            steps.push(Step::Index(idx));
            rest = &r[end + 1..];
        }
    }
    if steps.is_empty() {
        return Err("empty path".into());
    }
    Ok(steps)
}

fn lookup<'a>(v: &'a Value, steps: &[Step]) -> Option<&'a Value> {
    steps.iter().try_fold(v, |v, s| match s {
        Step::Key(k) => v.get(k),
        Step::Index(i) => v.get(*i),
    })
}

/// Whether `obj` satisfies a non-delete condition.
pub fn holds(f: &For, obj: &Value) -> bool {
    match f {
        For::Delete => false,
        For::Condition(name, want) => obj
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .is_some_and(|cs| {
                cs.iter().any(|c| {
                    // Case-insensitive, as kubectl compares condition types.
                    c.get("type")
                        .and_then(Value::as_str)
                        .is_some_and(|t| t.eq_ignore_ascii_case(name))
                        && c.get("status")
                            .and_then(Value::as_str)
                            .is_some_and(|s| s.eq_ignore_ascii_case(want))
                })
            }),
        For::JsonPath(steps, want) => lookup(obj, steps).is_some_and(|v| match v {
            Value::String(s) => s == want,
            other => serde_json::from_str::<Value>(want).is_ok_and(|w| w == *other),
        }),
    }
}

fn parse_timeout(s: &str) -> Result<Duration, CliError> {
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    // As kubectl: a negative timeout waits a week.
    if s.starts_with('-')
        && (s[1..].parse::<u64>().is_ok() || humantime::parse_duration(&s[1..]).is_ok())
    {
        return Ok(Duration::from_secs(7 * 24 * 3600));
    }
    humantime::parse_duration(s)
        .map_err(|e| CliError(format!("error: invalid --timeout {s:?}: {e}")))
}

/// `wait` entry point.
pub fn wait(g: &Globals, a: WaitArgs) -> CliResult {
    let (k, name) = a.target.split_once('/').ok_or_else(|| {
        CliError(format!(
            "error: expected KIND/NAME (e.g. task/fix-login), got {:?}",
            a.target
        ))
    })?;
    let kind = resolve_kind(k)?;
    // A name no object can have: waiting would report `--for=delete` met at once.
    crate::resources::validate::validate_name(name)
        .map_err(|e| CliError(format!("error: invalid name {name:?}: {e}")))?;
    let cond = parse_for(&a.for_)?;
    // Only Agents (Ready) and Queues (SourceReachable) have conditions: a wait for one on another
    // kind would always time out.
    if matches!(cond, For::Condition(..)) && !matches!(kind, Kind::Agent | Kind::Queue) {
        let hint = if kind == Kind::Task {
            ": wait for a phase, e.g. --for=jsonpath='{.status.phase}'=Succeeded"
        } else {
            ""
        };
        return Err(CliError(format!(
            "error: {} have no conditions{hint}",
            kind.plural()
        )));
    }
    let timeout = parse_timeout(&a.timeout)?;
    let store = Store::open_read_only(&g.state_dir);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError(format!("error: starting the runtime: {e}")))?;
    let met = rt.block_on(async {
        match kind {
            Kind::Agent => wait_kind::<Agent>(&store, name, &cond, timeout).await,
            Kind::Queue => wait_kind::<Queue>(&store, name, &cond, timeout).await,
            Kind::Task => wait_kind::<Task>(&store, name, &cond, timeout).await,
            Kind::Lease => wait_kind::<Lease>(&store, name, &cond, timeout).await,
            Kind::Event => wait_kind::<Event>(&store, name, &cond, timeout).await,
        }
    })?;
    if met {
        crate::outln!("{} condition met", resource_name(kind, name));
        Ok(ExitCode::SUCCESS)
    } else {
        Err(CliError(format!(
            "error: timed out waiting for the condition on {}/{name}",
            kind.plural()
        )))
    }
}

/// True when the condition was met within `timeout`.
async fn wait_kind<K: Resource>(
    store: &Store,
    name: &str,
    cond: &For,
    timeout: Duration,
) -> Result<bool, CliError> {
    let check = |o: &K| serde_json::to_value(o).is_ok_and(|v| holds(cond, &v));
    let current = store.try_get::<K>(name)?;
    match (&current, cond) {
        (None, For::Delete) => return Ok(true),
        (None, _) => {
            return Err(crate::store::StoreError::NotFound {
                plural: K::PLURAL.into(),
                name: name.into(),
            }
            .into())
        }
        (Some(o), _) if check(o) => return Ok(true),
        _ => {}
    }
    // For `delete`, the object waited for is this one: one created again under its name is
    // another (kubectl compares uids the same way), whose arrival means this one was deleted.
    let uid = current
        .as_ref()
        .map(|o| o.meta().uid.clone())
        .unwrap_or_default();
    let known: Vec<K> = current.into_iter().collect();
    let mut w = store.watch::<K>(
        &known,
        WatchOptions {
            relist_interval: Duration::from_secs(5),
        },
    )?;
    let follow = async {
        while let Some(ev) = w.next().await {
            match ev {
                WatchEvent::Added(o) | WatchEvent::Modified(o) if o.name() == name => {
                    let replaced = *cond == For::Delete && o.meta().uid != uid;
                    if replaced || check(&o) {
                        return true;
                    }
                }
                WatchEvent::Added(_) | WatchEvent::Modified(_) => {}
                WatchEvent::Deleted { name: n, .. } => {
                    if n == name && *cond == For::Delete {
                        return true;
                    }
                }
                WatchEvent::Error(m) => eprintln!("warning: watch: {m}"),
            }
        }
        false
    };
    Ok(tokio::time::timeout(timeout, follow).await.unwrap_or(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_negative_timeout_waits_a_week_as_kubectls_does() {
        let week = Duration::from_secs(7 * 24 * 3600);
        assert_eq!(parse_timeout("-1").unwrap(), week);
        assert_eq!(parse_timeout("-1s").unwrap(), week);
        assert_eq!(parse_timeout("30s").unwrap(), Duration::from_secs(30));
        assert!(parse_timeout("-x").is_err());
    }
    use serde_json::json;

    #[test]
    fn for_forms_parse() {
        assert_eq!(parse_for("delete").unwrap(), For::Delete);
        assert_eq!(
            parse_for("condition=Ready").unwrap(),
            For::Condition("Ready".into(), "True".into())
        );
        assert_eq!(
            parse_for("condition=Ready=false").unwrap(),
            For::Condition("Ready".into(), "False".into())
        );
        let f = parse_for("jsonpath={.status.phase}=Succeeded").unwrap();
        assert!(holds(&f, &json!({"status": {"phase": "Succeeded"}})));
        assert!(!holds(&f, &json!({"status": {"phase": "Running"}})));
        let f = parse_for("jsonpath='{.status.conditions[0].status}'=True").unwrap();
        assert!(holds(
            &f,
            &json!({"status": {"conditions": [{"status": "True"}]}})
        ));
        assert!(parse_for("jsonpath={.a").is_err());
        assert!(parse_for("ready").is_err());
    }
}
