//! `describe KIND NAME`: one object in human-readable sections, its conditions, and its events.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::SystemTime;

use serde_json::Value;

use super::args::DescribeArgs;
use super::get::kind_and_names;
use super::printers::{self, shell_join};
use super::{CliError, CliResult, Globals};
use crate::resources::meta::{format_age, parse_time};
use crate::resources::{Event, Kind, Resource};
use crate::store::Store;

/// `describe` entry point.
pub fn describe(g: &Globals, a: DescribeArgs) -> CliResult {
    let (kind, names) = kind_and_names(&a.kind, &a.names, "describe")?;
    let store = Store::open_read_only(&g.state_dir);
    let name_of = |o: &Value| {
        o.pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    // No name: every object of the kind, as kubectl describes them. Names: each one found is
    // described and each one not found reported, as kubectl does; then the exit code is 1.
    let mut errors: Vec<CliError> = Vec::new();
    let objects = if names.is_empty() {
        let list = store.list_raw(kind.plural(), None)?;
        for s in &list.skipped {
            eprintln!("warning: skipping {}: {}", s.path.display(), s.reason);
        }
        let mut all = list.items;
        all.sort_by_key(|o| name_of(o));
        if all.is_empty() && list.skipped.is_empty() {
            eprintln!("No resources found.");
        }
        all
    } else {
        let mut found = Vec::new();
        for n in &names {
            match store.get_raw(kind.plural(), n) {
                Ok(o) => found.push(o),
                Err(e) => errors.push(e.into()),
            }
        }
        found
    };
    // Events are listed once, for all the objects.
    let events = list_events(&store)?;
    let mut texts = Vec::new();
    for obj in &objects {
        let uid = obj.pointer("/metadata/uid").and_then(Value::as_str);
        let mine = events_of(&events, kind, &name_of(obj), uid);
        texts.push(render(obj, &mine, SystemTime::now()));
    }
    // Objects one after another, a blank line between, as kubectl separates them.
    let text = texts.join("\n");
    printers::with_stdout(|out| std::io::Write::write_all(out, text.as_bytes()))?;
    let failed = !errors.is_empty();
    for e in errors {
        eprintln!("{e}");
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Every Event in the store (files that cannot be read are reported and skipped).
fn list_events(store: &Store) -> Result<Vec<Event>, CliError> {
    let list = store.list::<Event>(None)?;
    for s in &list.skipped {
        eprintln!("warning: skipping {}: {}", s.path.display(), s.reason);
    }
    Ok(list.items)
}

/// Of `events`, those whose `involvedObject` is this object, oldest first (by lastTimestamp).
/// With `uid`, not those of an earlier object of the same name (deleted and created again); an
/// event that names no uid is kept.
pub fn events_of(events: &[Event], kind: Kind, name: &str, uid: Option<&str>) -> Vec<Event> {
    let mut events: Vec<Event> = events
        .iter()
        .filter(|e| {
            let o = &e.spec.involved_object;
            o.kind == kind.name()
                && o.name == name
                && (o.uid.is_empty() || uid.is_none_or(|u| u == o.uid))
        })
        .cloned()
        .collect();
    events.sort_by(|a, b| {
        parse_time(&a.spec.last_timestamp)
            .cmp(&parse_time(&b.spec.last_timestamp))
            .then_with(|| a.revision().cmp(&b.revision())) // same second: write order
    });
    events
}

/// `Max Concurrency` for `maxConcurrency`.
fn humanize(key: &str) -> String {
    let mut s = String::new();
    for (i, c) in key.chars().enumerate() {
        if i == 0 {
            s.extend(c.to_uppercase());
        } else if c.is_ascii_uppercase() {
            s.push(' ');
            s.push(c);
        } else {
            s.push(c);
        }
    }
    s
}

/// A value as one line of text, control characters written out (see
/// [`printers::escape_controls`]).
fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => printers::escape_controls(s).into_owned(),
        Value::Null => "<none>".into(),
        other => other.to_string(),
    }
}

fn is_scalar(v: &Value) -> bool {
    !(v.is_object() || v.is_array())
}

/// Writes `key: value` lines of a map at `indent`, values aligned; `human` turns field names into
/// words (user keys such as env or params are kept as written).
fn write_fields(
    out: &mut String,
    map: &serde_json::Map<String, Value>,
    indent: usize,
    human: bool,
) {
    let keys: Vec<(String, &Value)> = map
        .iter()
        .filter(|(k, _)| k.as_str() != "conditions")
        .map(|(k, v)| {
            let k = printers::escape_controls(k);
            (if human { humanize(&k) } else { k.into_owned() }, v)
        })
        .collect();
    let width = keys
        .iter()
        .filter(|(_, v)| is_scalar(v) || v.as_array().is_some_and(|a| a.iter().all(is_scalar)))
        .map(|(k, _)| k.chars().count() + 1)
        .max()
        .unwrap_or(0);
    let pad = " ".repeat(indent);
    for ((key, v), raw_key) in keys.iter().zip(map.keys().filter(|k| *k != "conditions")) {
        let label = format!("{key}:");
        match v {
            Value::Object(m) if m.is_empty() => {
                let _ = writeln!(out, "{pad}{label:width$}  <none>");
            }
            Value::Object(m) => {
                let _ = writeln!(out, "{pad}{label}");
                write_fields(out, m, indent + 2, false);
            }
            Value::Array(a) if a.iter().all(is_scalar) => {
                let text = if a.is_empty() {
                    "<none>".to_string()
                } else if raw_key == "command" {
                    let argv: Vec<String> = a.iter().map(scalar).collect();
                    shell_join(&argv)
                } else {
                    a.iter().map(scalar).collect::<Vec<_>>().join(", ")
                };
                let _ = writeln!(out, "{pad}{label:width$}  {text}");
            }
            Value::Array(a) => {
                let _ = writeln!(out, "{pad}{label}");
                for (i, item) in a.iter().enumerate() {
                    match item {
                        Value::Object(m) => {
                            let _ = writeln!(out, "{pad}  [{i}]:");
                            write_fields(out, m, indent + 4, false);
                        }
                        other => {
                            let _ = writeln!(out, "{pad}  [{i}]:  {}", scalar(other));
                        }
                    }
                }
            }
            other => {
                let _ = writeln!(out, "{pad}{label:width$}  {}", scalar(other));
            }
        }
    }
}

fn kv_block(out: &mut String, title: &str, map: Option<&Value>) {
    let entries: Vec<String> = map
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{}={}", printers::escape_controls(k), scalar(v)))
                .collect()
        })
        .unwrap_or_default();
    let label = format!("{title}:");
    if entries.is_empty() {
        let _ = writeln!(out, "{label:<13} <none>");
    }
    for (i, e) in entries.iter().enumerate() {
        if i == 0 {
            let _ = writeln!(out, "{label:<13} {e}");
        } else {
            let _ = writeln!(out, "{:<13} {e}", "");
        }
    }
}

/// Renders the whole description.
pub fn render(obj: &Value, events: &[Event], now: SystemTime) -> String {
    let mut out = String::new();
    let meta = obj.get("metadata").cloned().unwrap_or(Value::Null);
    let _ = writeln!(
        out,
        "{:<13} {}",
        "Name:",
        scalar(meta.get("name").unwrap_or(&Value::Null))
    );
    kv_block(&mut out, "Labels", meta.get("labels"));
    kv_block(&mut out, "Annotations", meta.get("annotations"));
    let _ = writeln!(
        out,
        "{:<13} {}",
        "API Version:",
        scalar(obj.get("apiVersion").unwrap_or(&Value::Null))
    );
    let _ = writeln!(
        out,
        "{:<13} {}",
        "Kind:",
        scalar(obj.get("kind").unwrap_or(&Value::Null))
    );
    let _ = writeln!(out, "Metadata:");
    for (k, label) in [
        ("uid", "UID:"),
        ("resourceVersion", "Resource Version:"),
        ("generation", "Generation:"),
        ("creationTimestamp", "Creation Timestamp:"),
    ] {
        let v = meta.get(k).map(scalar).unwrap_or_else(|| "<none>".into());
        let _ = writeln!(out, "  {label:<20} {v}");
    }
    for (section, key) in [("Spec", "spec"), ("Status", "status")] {
        match obj.get(key).and_then(Value::as_object) {
            Some(map) if map.keys().any(|k| k != "conditions") => {
                let _ = writeln!(out, "{section}:");
                write_fields(&mut out, map, 2, true);
            }
            _ => {
                let _ = writeln!(out, "{section}:  <none>");
            }
        }
    }
    let conditions = obj
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty());
    match conditions {
        None => {
            let _ = writeln!(out, "Conditions:  <none>");
        }
        Some(cs) => {
            let _ = writeln!(out, "Conditions:");
            let mut t = printers::Table::new(vec![
                "Type",
                "Status",
                "Reason",
                "Message",
                "LastTransitionTime",
            ]);
            t.rows.push(
                vec!["----", "------", "------", "-------", "------------------"]
                    .into_iter()
                    .map(String::from)
                    .collect(),
            );
            for c in cs {
                let f = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                t.rows.push(vec![
                    f("type"),
                    f("status"),
                    f("reason"),
                    f("message"),
                    f("lastTransitionTime"),
                ]);
            }
            indent_table(&mut out, &t);
        }
    }
    if events.is_empty() {
        let _ = writeln!(out, "Events:  <none>");
    } else {
        let _ = writeln!(out, "Events:");
        let mut t = printers::Table::new(vec!["Type", "Reason", "Age", "From", "Message"]);
        t.rows.push(
            ["----", "------", "----", "----", "-------"]
                .into_iter()
                .map(String::from)
                .collect(),
        );
        for e in events {
            t.rows.push(vec![
                format!("{:?}", e.spec.type_),
                e.spec.reason.clone(),
                event_age(e, now),
                if e.spec.source.is_empty() {
                    "<unknown>".into()
                } else {
                    e.spec.source.clone()
                },
                e.spec.message.clone(),
            ]);
        }
        indent_table(&mut out, &t);
    }
    out
}

/// `3m` or, for folded events, `3m (x5 over 12m)`.
pub fn event_age(e: &Event, now: SystemTime) -> String {
    let last = format_age(parse_time(&e.spec.last_timestamp), now);
    if e.spec.count > 1 {
        let first = format_age(parse_time(&e.spec.first_timestamp), now);
        format!("{last} (x{} over {first})", e.spec.count)
    } else {
        last
    }
}

fn indent_table(out: &mut String, t: &printers::Table) {
    let mut buf = Vec::new();
    let _ = t.write(&mut buf, false);
    for line in String::from_utf8_lossy(&buf).lines() {
        let _ = writeln!(out, "  {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_read_as_words() {
        assert_eq!(humanize("maxConcurrency"), "Max Concurrency");
        assert_eq!(humanize("queue"), "Queue");
    }
}
