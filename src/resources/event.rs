//! Event: something that happened to an object, for `describe`.

use serde::{Deserialize, Serialize};

use super::meta::Object;

/// An event; its fields live in `spec` so every kind has the same envelope.
pub type Event = Object<EventSpec, EventStatus>;
crate::impl_resource!(Event, "Event", "events");

/// Which object an event is about.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectReference {
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
}

/// `Normal` or `Warning`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum EventType {
    #[default]
    Normal,
    Warning,
}

/// The event itself.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventSpec {
    pub involved_object: ObjectReference,
    #[serde(rename = "type", default)]
    pub type_: EventType,
    pub reason: String,
    #[serde(default)]
    pub message: String,
    /// How many identical events were folded into this one.
    #[serde(default = "one")]
    pub count: i64,
    #[serde(default)]
    pub first_timestamp: String,
    #[serde(default)]
    pub last_timestamp: String,
    /// The component that reported it (`assignment-controller`, …).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
}

fn one() -> i64 {
    1
}

/// Events have no observed state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EventStatus {}
