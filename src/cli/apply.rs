//! `apply -f FILE|DIR|- [-R] [--dry-run]`: create or update objects from manifests.
//!
//! Every document is read, admitted (decoded, defaulted, validated) and checked against the store
//! (resourceVersion preconditions, foreign files) before anything is written; only then are the
//! objects written, queues first, then agents, then tasks (`Kind::ALL` order). An invalid input
//! therefore changes nothing, and a dry run opens the store read-only.

use std::collections::HashMap;
use std::process::ExitCode;

use serde_json::Value;

use super::args::ApplyArgs;
use super::input::{self, Document};
use super::printers::resource_name;
use super::{CliError, CliResult, Globals};
use crate::resources::registry::admit;
use crate::resources::Kind;
use crate::store::{
    stored_size, Store, StoreError, WriteOutcome, MAX_APPLIED_BYTES, MAX_OBJECT_BYTES,
    STATUS_RESERVE,
};

/// What apply will do (or did) with one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Configured,
    Unchanged,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Configured => "configured",
            Outcome::Unchanged => "unchanged",
        }
    }
}

/// One admitted document, ready to write.
struct Planned {
    kind: Kind,
    name: String,
    label: String,
    object: Value,
    /// What the store held when checked; `None` when absent.
    current: Option<Value>,
}

/// The names every message uses for a document: `a.yaml: document 3 (Agent "x")`.
fn label(d: &Document, kind: Option<Kind>) -> String {
    match (kind, d.name()) {
        (Some(k), Some(n)) => format!("{} ({} {n:?})", d.origin(), k.name()),
        (Some(k), None) => format!("{} ({})", d.origin(), k.name()),
        (None, _) => d.origin(),
    }
}

/// The metadata by which the tinytask sync controller knows a Task as the mirror of a server
/// task (which task, from which queue of which server). A local Task given one would wait for a
/// claim on a server that never makes it, then fail as never started; a mirror losing one would
/// run as a local task and its result never go back.
const MIRROR_KEYS: [(&str, &str); 4] = [
    (
        "annotations",
        crate::resources::task::TINYTASK_ID_ANNOTATION,
    ),
    (
        "annotations",
        crate::controllers::tinytask_sync::QUEUE_ANNOTATION,
    ),
    (
        "annotations",
        crate::controllers::tinytask_sync::ENDPOINT_ANNOTATION,
    ),
    ("labels", crate::controllers::tinytask_sync::SOURCE_LABEL),
];

/// The [`MIRROR_KEYS`] (`metadata.annotations.KEY`) whose value in `object` differs from the
/// stored one's (`current`; none for a new object).
fn mirror_keys_changed(object: &Value, current: Option<&Value>) -> Vec<String> {
    MIRROR_KEYS
        .iter()
        .filter(|(map, key)| {
            let get = |v: &Value| v.get("metadata")?.get(map)?.get(key).cloned();
            get(object) != current.and_then(get)
        })
        .map(|(map, key)| format!("metadata.{map}.{key}"))
        .collect()
}

fn known_kinds() -> String {
    Kind::ALL.map(|k| k.name()).join(", ")
}

/// Resolves and admits every document and checks it against the store, collecting every error.
fn plan(store: &Store, docs: &[Document]) -> Result<Vec<Planned>, Vec<String>> {
    let mut planned = Vec::new();
    let mut errors = Vec::new();
    let mut seen: HashMap<(Kind, String), String> = HashMap::new();
    for d in docs {
        let kind = match d.value.get("kind") {
            None | Some(Value::Null) => {
                errors.push(format!(
                    "error: {}: kind: required: every object needs a kind (one of {})",
                    d.origin(),
                    known_kinds()
                ));
                continue;
            }
            Some(Value::String(s)) => match Kind::from_kind_field(s) {
                Some(k) => k,
                None => {
                    errors.push(format!(
                        "error: {}: kind: unknown kind {s:?}; known kinds are {}",
                        d.origin(),
                        known_kinds()
                    ));
                    continue;
                }
            },
            Some(other) => {
                errors.push(format!(
                    "error: {}: kind: must be a string (got {other})",
                    d.origin()
                ));
                continue;
            }
        };
        let label = label(d, Some(kind));
        // A Lease is the commit of an assignment (invariant 1): made by the assignment loop under
        // the agent's limit, never by hand, where it would start a run past that limit.
        if kind == Kind::Lease {
            errors.push(format!(
                "error: {label}: kind: Leases are created by the scheduler when it assigns a task, \
                 not applied (delete one with `tinyscheduler delete lease NAME`)"
            ));
            continue;
        }
        let object = match admit(kind, &d.value) {
            Ok(v) => v,
            Err(fes) => {
                for fe in fes {
                    errors.push(format!("error: {label}: {}: {}", fe.path, fe.message));
                }
                continue;
            }
        };
        // The name as admitted, the one the store will write (not a guess from the raw document).
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if let Some(first) = seen.insert((kind, name.clone()), d.origin()) {
            errors.push(format!(
                "error: {label}: metadata.name: {} {name:?} is also defined in {first}",
                kind.name()
            ));
            continue;
        }
        let wanted_rv = object
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let current = match store.get_raw(kind.plural(), &name) {
            Ok(cur) => Some(cur),
            Err(e) if e.is_not_found() => None,
            Err(e) => {
                errors.push(format!("Error from server ({}): {label}: {e}", e.reason()));
                continue;
            }
        };
        if kind == Kind::Task {
            let changed = mirror_keys_changed(&object, current.as_ref());
            for key in &changed {
                errors.push(format!(
                    "error: {label}: {key}: set by the tinytask sync controller on the Tasks it \
                     mirrors; a manifest may repeat it as stored, not add, change or remove it"
                ));
            }
            if !changed.is_empty() {
                continue;
            }
        }
        // Measured as the store will write it (its metadata, and on an update the stored status),
        // so that no write can fail on the size after others were made.
        let size = stored_size(&object, current.as_ref());
        if size > MAX_APPLIED_BYTES {
            errors.push(format!(
                "error: {label}: the stored object would be up to {size} bytes; the limit is \
                 {MAX_APPLIED_BYTES} bytes (the store's {MAX_OBJECT_BYTES} less {STATUS_RESERVE} \
                 kept for its status)"
            ));
            continue;
        }
        if !wanted_rv.is_empty() {
            match &current {
                None => {
                    errors.push(format!(
                        "error: {label}: metadata.resourceVersion: must not be set when creating an object \
                         ({} {name:?} does not exist)",
                        kind.plural()
                    ));
                    continue;
                }
                Some(cur) => {
                    let cur_rv = cur
                        .pointer("/metadata/resourceVersion")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    if cur_rv != wanted_rv {
                        let e = StoreError::Conflict {
                            plural: kind.plural().into(),
                            name: name.clone(),
                        };
                        errors.push(format!(
                            "Error from server (Conflict): {label}: metadata.resourceVersion: {e} \
                             (manifest has {wanted_rv}, the store has {cur_rv})"
                        ));
                        continue;
                    }
                }
            }
        }
        planned.push(Planned {
            kind,
            name,
            label,
            object,
            current,
        });
    }
    if errors.is_empty() {
        Ok(planned)
    } else {
        Err(errors)
    }
}

/// What a write of `object` over `current` would do (the store's own rule: spec, labels and
/// annotations are compared; status and store-owned metadata are not).
fn predict(object: &Value, current: Option<&Value>) -> Outcome {
    let Some(cur) = current else {
        return Outcome::Created;
    };
    let empty = Value::Object(Default::default());
    let field = |v: &Value, p: &str| -> Value {
        match v.pointer(p) {
            None | Some(Value::Null) => empty.clone(),
            Some(x) => x.clone(),
        }
    };
    let same = object.get("spec") == cur.get("spec")
        && field(object, "/metadata/labels") == field(cur, "/metadata/labels")
        && field(object, "/metadata/annotations") == field(cur, "/metadata/annotations");
    if same {
        Outcome::Unchanged
    } else {
        Outcome::Configured
    }
}

/// Writes one planned object: update when it exists, create when not (falling back to the other
/// when a concurrent writer got there first).
fn write(store: &Store, p: &Planned) -> Result<Outcome, StoreError> {
    let plural = p.kind.plural();
    let has_rv = p
        .object
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty());
    let update = |store: &Store| {
        store.update_raw(plural, &p.object).map(|(_, o)| match o {
            WriteOutcome::Unchanged => Outcome::Unchanged,
            _ => Outcome::Configured,
        })
    };
    if p.current.is_some() {
        match update(store) {
            Err(e) if e.is_not_found() && !has_rv => store
                .create_raw(plural, &p.object)
                .map(|_| Outcome::Created),
            r => r,
        }
    } else {
        match store.create_raw(plural, &p.object) {
            Ok(_) => Ok(Outcome::Created),
            Err(e) if e.is_already_exists() && !has_rv => update(store),
            Err(e) => Err(e),
        }
    }
}

/// `apply` entry point.
pub fn apply(g: &Globals, a: ApplyArgs) -> CliResult {
    let docs = input::read_all_reported(&a.files, a.recursive, "apply")?;
    let checker = Store::open_read_only(&g.state_dir);
    let mut planned = plan(&checker, &docs).map_err(|e| CliError(e.join("\n")))?;
    planned.sort_by_key(|p| Kind::ALL.iter().position(|k| *k == p.kind));

    if a.dry_run {
        for p in &planned {
            let o = predict(&p.object, p.current.as_ref());
            crate::outln!(
                "{} {} (dry run)",
                resource_name(p.kind, &p.name),
                o.as_str()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }

    let store = Store::open(&g.state_dir)?;
    let mut failed = false;
    for p in &planned {
        match write(&store, p) {
            Ok(o) => crate::outln!("{} {}", resource_name(p.kind, &p.name), o.as_str()),
            Err(e) => {
                failed = true;
                let field = if e.is_conflict() {
                    "metadata.resourceVersion: "
                } else {
                    ""
                };
                eprintln!(
                    "Error from server ({}): {}: {field}{e}",
                    e.reason(),
                    p.label
                );
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_label_change_is_configured_and_status_is_ignored() {
        let cur = json!({"metadata": {"name": "a", "resourceVersion": "3"}, "spec": {"x": 1},
                         "status": {"y": 2}});
        let same = json!({"metadata": {"name": "a", "labels": {}}, "spec": {"x": 1}});
        assert_eq!(predict(&same, Some(&cur)), Outcome::Unchanged);
        let labelled = json!({"metadata": {"name": "a", "labels": {"k": "v"}}, "spec": {"x": 1}});
        assert_eq!(predict(&labelled, Some(&cur)), Outcome::Configured);
        assert_eq!(predict(&same, None), Outcome::Created);
    }
}
