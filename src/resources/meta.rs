//! Object metadata and the envelope every kind shares (Kubernetes object conventions).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::SystemTime;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The one API group and version every kind is served under.
pub const API_VERSION: &str = "tinyscheduler.io/v1alpha1";
/// The API group, used in kubectl-style output (`agent.tinyscheduler.io/x`).
pub const GROUP: &str = "tinyscheduler.io";

/// Metadata every object carries. The store owns `uid`, `resourceVersion`, `generation` and
/// `creationTimestamp`; users own `name`, `labels` and `annotations`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    /// Global store revision of the last write; compared for optimistic concurrency.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resource_version: String,
    /// Bumped by the store each time `spec` changes.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// A condition in `status.conditions`, as in Kubernetes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_transition_time: String,
}

/// Sets or replaces the condition of `type_`, keeping `lastTransitionTime` when the status is
/// unchanged (so the time says when it last flipped, not when it was last written).
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
) {
    let status = if status { "True" } else { "False" };
    if let Some(c) = conditions.iter_mut().find(|c| c.type_ == type_) {
        if c.status != status {
            c.last_transition_time = now_rfc3339();
        }
        c.status = status.to_string();
        c.reason = reason.to_string();
        c.message = message.to_string();
        return;
    }
    conditions.push(Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        last_transition_time: now_rfc3339(),
    });
}

/// The envelope shared by all kinds: `apiVersion`, `kind`, `metadata`, `spec`, `status`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Object<S, T> {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: S,
    #[serde(default)]
    pub status: T,
}

/// A kind the store can hold. Implemented for each `Object<Spec, Status>` alias.
pub trait Resource: Serialize + DeserializeOwned + Clone + Debug + Send + Sync + 'static {
    /// `Agent`, `Task`, …
    const KIND: &'static str;
    /// Lower-case plural, also the directory name in the store (`agents`).
    const PLURAL: &'static str;
    fn meta(&self) -> &ObjectMeta;
    fn meta_mut(&mut self) -> &mut ObjectMeta;
    /// The resourceVersion as a number (0 when unset or unparsable).
    fn revision(&self) -> u64 {
        self.meta().resource_version.parse().unwrap_or(0)
    }
    fn name(&self) -> &str {
        &self.meta().name
    }
    /// The object's `kind` field as read ("" when absent).
    fn kind_field(&self) -> &str;
}

impl<S, T> Object<S, T> {
    /// A new object of kind `kind` with the given name and spec, status defaulted.
    pub fn new(kind: &str, name: &str, spec: S) -> Self
    where
        T: Default,
    {
        Object {
            api_version: API_VERSION.to_string(),
            kind: kind.to_string(),
            metadata: ObjectMeta {
                name: name.to_string(),
                ..Default::default()
            },
            spec,
            status: T::default(),
        }
    }
}

/// Implements [`Resource`] for an `Object<Spec, Status>` alias.
#[macro_export]
macro_rules! impl_resource {
    ($ty:ty, $kind:literal, $plural:literal) => {
        impl $crate::resources::meta::Resource for $ty {
            const KIND: &'static str = $kind;
            const PLURAL: &'static str = $plural;
            fn meta(&self) -> &$crate::resources::meta::ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut $crate::resources::meta::ObjectMeta {
                &mut self.metadata
            }
            fn kind_field(&self) -> &str {
                &self.kind
            }
        }
    };
}

/// Now as an RFC 3339 UTC timestamp with second resolution (`2026-11-23T11:17:31Z`).
pub fn now_rfc3339() -> String {
    format_time(SystemTime::now())
}

/// Now as an RFC 3339 UTC timestamp with microseconds (`2026-11-23T11:17:31.123456Z`), as
/// Kubernetes' `MicroTime` for a Lease's renewTime: it is judged against durations of a few
/// seconds, which a time cut to the second would make look up to a second older.
pub fn now_rfc3339_micros() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

/// Formats a time as RFC 3339 UTC with second resolution.
pub fn format_time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A timestamp cut to the second, as a Task shows its times; one that does not parse as it is.
pub fn to_seconds(ts: &str) -> String {
    parse_time(ts).map_or_else(|| ts.to_string(), format_time)
}

/// Parses an RFC 3339 timestamp; `None` for anything else.
pub fn parse_time(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(s).ok()
}

/// Kubectl-style age: `45s`, `3m12s`, `5h3m`, `2d4h`, `400d`.
pub fn format_age(since: Option<SystemTime>, now: SystemTime) -> String {
    let Some(since) = since else {
        return "<unknown>".to_string();
    };
    let secs = now.duration_since(since).map(|d| d.as_secs()).unwrap_or(0);
    format_duration_short(secs)
}

/// Kubectl's short duration form for a number of seconds.
pub fn format_duration_short(secs: u64) -> String {
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86400);
    if secs < 120 {
        format!("{secs}s")
    } else if m < 10 {
        let s = secs % 60;
        if s == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{s}s")
        }
    } else if h < 3 {
        format!("{m}m")
    } else if h < 8 {
        let mm = m % 60;
        if mm == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{mm}m")
        }
    } else if h < 48 {
        format!("{h}h")
    } else if d < 8 {
        let hh = h % 24;
        if hh == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{hh}h")
        }
    } else if d < 365 * 2 {
        format!("{d}d")
    } else {
        format!("{}y", d / 365)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_in_microseconds_is_cut_to_its_second_and_anything_else_kept() {
        assert_eq!(
            to_seconds("2026-11-23T11:17:31.999999Z"),
            "2026-11-23T11:17:31Z"
        );
        assert_eq!(to_seconds("2026-11-23T11:17:31Z"), "2026-11-23T11:17:31Z");
        assert_eq!(to_seconds("yesterday"), "yesterday");
    }

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(format_duration_short(5), "5s");
        assert_eq!(format_duration_short(119), "119s");
        assert_eq!(format_duration_short(192), "3m12s");
        assert_eq!(format_duration_short(600), "10m");
        assert_eq!(format_duration_short(3 * 3600 + 120), "3h2m");
        assert_eq!(format_duration_short(9 * 3600), "9h");
        assert_eq!(format_duration_short(3 * 86400 + 4 * 3600), "3d4h");
        assert_eq!(format_duration_short(40 * 86400), "40d");
    }

    #[test]
    fn timestamps_round_trip() {
        let s = now_rfc3339();
        assert!(s.ends_with('Z'));
        let t = parse_time(&s).expect("parse");
        assert_eq!(format_time(t), s);
    }

    #[test]
    fn set_condition_keeps_transition_time_when_status_is_unchanged() {
        let mut c = vec![];
        set_condition(&mut c, "Ready", true, "A", "first");
        c[0].last_transition_time = "2000-01-01T00:00:00Z".into();
        set_condition(&mut c, "Ready", true, "B", "second");
        assert_eq!(c[0].last_transition_time, "2000-01-01T00:00:00Z");
        assert_eq!(c[0].reason, "B");
        set_condition(&mut c, "Ready", false, "C", "third");
        assert_ne!(c[0].last_transition_time, "2000-01-01T00:00:00Z");
        assert_eq!(c.len(), 1);
    }
}
