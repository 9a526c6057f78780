//! The kind registry: names by which each kind is known, and admission (decode, default, validate)
//! of user documents.

use serde_json::Value;

use super::agent::Agent;
use super::event::Event;
use super::lease::Lease;
use super::meta::{Resource, API_VERSION};
use super::queue::Queue;
use super::task::Task;
use super::validate::{self, FieldError};

/// Every kind the API serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Agent,
    Queue,
    Task,
    Lease,
    Event,
}

impl Kind {
    /// All kinds, in the order `apply` writes them (pools before their work).
    pub const ALL: [Kind; 5] = [
        Kind::Queue,
        Kind::Agent,
        Kind::Task,
        Kind::Lease,
        Kind::Event,
    ];

    /// The `kind:` field value (`Agent`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Agent => Agent::KIND,
            Kind::Queue => Queue::KIND,
            Kind::Task => Task::KIND,
            Kind::Lease => Lease::KIND,
            Kind::Event => Event::KIND,
        }
    }

    /// Lower-case plural, also the store directory (`agents`).
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Agent => Agent::PLURAL,
            Kind::Queue => Queue::PLURAL,
            Kind::Task => Task::PLURAL,
            Kind::Lease => Lease::PLURAL,
            Kind::Event => Event::PLURAL,
        }
    }

    /// Lower-case singular (`agent`), as in `agent.tinyscheduler.io/x`.
    pub fn singular(self) -> &'static str {
        match self {
            Kind::Agent => "agent",
            Kind::Queue => "queue",
            Kind::Task => "task",
            Kind::Lease => "lease",
            Kind::Event => "event",
        }
    }

    /// The short name (`ag`).
    pub fn short(self) -> &'static str {
        match self {
            Kind::Agent => "ag",
            Kind::Queue => "q",
            Kind::Task => "tk",
            Kind::Lease => "ls",
            Kind::Event => "ev",
        }
    }

    /// Resolves a kind as typed on the command line: singular, plural, short or `Kind`, any case,
    /// optionally qualified with the group (`agents.tinyscheduler.io`).
    pub fn from_cli(s: &str) -> Option<Kind> {
        let lower = s.to_ascii_lowercase();
        let base = lower
            .strip_suffix(&format!(".{}", super::meta::GROUP))
            .unwrap_or(&lower);
        Kind::ALL
            .into_iter()
            .find(|k| base == k.singular() || base == k.plural() || base == k.short())
    }

    /// Resolves the `kind:` field of a document (exact, as in Kubernetes).
    pub fn from_kind_field(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }

    /// The names a user may type for `get`, for error messages.
    pub fn cli_names() -> String {
        Kind::ALL
            .iter()
            .map(|k| format!("{} ({})", k.plural(), k.short()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Decodes a user document of a known kind into its normalized JSON form: types checked, unknown
/// fields refused, defaults filled, spec rules validated; `status` and store-owned metadata dropped.
pub fn admit(kind: Kind, doc: &Value) -> Result<Value, Vec<FieldError>> {
    let mut doc = doc.clone();
    if let Some(map) = doc.as_object_mut() {
        map.remove("status");
    }
    match kind {
        Kind::Agent => admit_typed::<Agent>(doc, |a| validate::validate_agent(&a.spec)),
        Kind::Queue => admit_typed::<Queue>(doc, |q| validate::validate_queue(&q.spec)),
        Kind::Task => {
            admit_typed::<Task>(doc, |t| validate::validate_task(&t.metadata.name, &t.spec))
        }
        Kind::Lease => admit_typed::<Lease>(doc, |l| validate::validate_lease(&l.spec)),
        Kind::Event => Err(vec![FieldError {
            path: "kind".into(),
            message: "Events are written by the scheduler, not applied".into(),
        }]),
    }
}

/// serde's `expected i64` (and kin), said as the range a user may write.
fn integer_words(msg: &str) -> String {
    [
        (
            "expected i64",
            "expected a whole number (at most 9223372036854775807)",
        ),
        (
            "expected i32",
            "expected a whole number (at most 2147483647)",
        ),
        (
            "expected u32",
            "expected a whole number from 0 to 4294967295",
        ),
        (
            "expected u64",
            "expected a whole number from 0 to 18446744073709551615",
        ),
    ]
    .iter()
    .fold(msg.to_string(), |m, (from, to)| m.replace(from, to))
}

/// What a JSON value is, in the words of an error message.
fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

fn admit_typed<K: Resource>(
    mut doc: Value,
    rules: impl Fn(&K) -> Vec<FieldError>,
) -> Result<Value, Vec<FieldError>> {
    let mut errors = Vec::new();
    match doc.get("apiVersion").and_then(Value::as_str) {
        Some(API_VERSION) => {}
        Some(other) => errors.push(FieldError {
            path: "apiVersion".into(),
            message: format!("unsupported version {other:?}, expected {API_VERSION:?}"),
        }),
        None => errors.push(FieldError {
            path: "apiVersion".into(),
            message: format!("required (expected {API_VERSION:?})"),
        }),
    }
    // No spec, or an empty `spec:`, is every field at its default, as in kubectl; a Task's rules
    // then say what it lacks. (Only here: a file in the store without a spec is not an object.)
    if let Some(obj) = doc.as_object_mut() {
        if obj.get("spec").is_none_or(Value::is_null) {
            obj.insert("spec".into(), Value::Object(Default::default()));
        }
    }
    // serde fills a struct from a list too, field by field in order (`metadata: [x]` would be
    // named "x"): where a mapping belongs, only a mapping is taken.
    for field in ["metadata", "spec"] {
        match doc.get(field) {
            Some(v) if !v.is_object() => errors.push(FieldError {
                path: field.into(),
                message: format!("expected a mapping, got {}", json_type(v)),
            }),
            _ => {}
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let obj: K = match serde_path_to_error::deserialize(doc) {
        Ok(o) => o,
        Err(e) => {
            let path = e.path().to_string();
            errors.push(FieldError {
                path: if path == "." { "(root)".into() } else { path },
                message: integer_words(&e.into_inner().to_string()),
            });
            return Err(errors);
        }
    };
    if let Err(m) = validate::validate_name(&obj.meta().name) {
        errors.push(FieldError {
            path: "metadata.name".into(),
            message: m,
        });
    }
    for (k, v) in &obj.meta().labels {
        if let Err(m) = validate::validate_label(k, v) {
            errors.push(FieldError {
                path: format!("metadata.labels.{k}"),
                message: m,
            });
        }
    }
    for k in obj.meta().annotations.keys() {
        if let Err(m) = validate::validate_key(k) {
            errors.push(FieldError {
                path: format!("metadata.annotations.{k}"),
                message: m,
            });
        }
    }
    errors.extend(rules(&obj));
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut obj = obj;
    let meta = obj.meta_mut();
    meta.uid.clear();
    meta.generation = 0;
    meta.creation_timestamp = None;
    serde_json::to_value(&obj).map_err(|e| {
        vec![FieldError {
            path: "(root)".into(),
            message: e.to_string(),
        }]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kinds_resolve_by_every_name() {
        for s in ["agent", "agents", "ag", "Agent", "agents.tinyscheduler.io"] {
            assert_eq!(Kind::from_cli(s), Some(Kind::Agent), "{s}");
        }
        assert_eq!(Kind::from_cli("tk"), Some(Kind::Task));
        assert_eq!(Kind::from_cli("pods"), None);
    }

    #[test]
    fn admission_fills_defaults() {
        let v = admit(
            Kind::Agent,
            &json!({"apiVersion": API_VERSION, "kind": "Agent", "metadata": {"name": "a"}, "spec": {}}),
        )
        .expect("valid");
        assert_eq!(v["spec"]["maxConcurrency"], 1);
        assert_eq!(v["spec"]["heartbeatSeconds"], 15);
        assert_eq!(v["spec"]["maxRuntimeSeconds"], 3600);
    }

    #[test]
    fn admission_names_the_wrong_field() {
        let errs = admit(
            Kind::Agent,
            &json!({"apiVersion": API_VERSION, "kind": "Agent", "metadata": {"name": "a"},
                    "spec": {"maxConcurrency": "three"}}),
        )
        .unwrap_err();
        assert_eq!(errs[0].path, "spec.maxConcurrency");
        let errs = admit(
            Kind::Queue,
            &json!({"apiVersion": API_VERSION, "kind": "Queue", "metadata": {"name": "a"},
                    "spec": {"colour": "red"}}),
        )
        .unwrap_err();
        assert!(
            errs[0].message.contains("unknown field `colour`"),
            "{errs:?}"
        );
    }
}
