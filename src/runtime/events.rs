//! The event recorder: Kubernetes-style Events with aggregation and garbage collection.
//!
//! An event is named after what it says (`<object-name-prefix>.<16 hex of a hash of the involved
//! kind and name, the type, reason and message>`), so publishing the same thing again within
//! [`AGGREGATION_WINDOW`] finds the existing object with one read and bumps its `count` and
//! `lastTimestamp` with one write. Events are best effort: errors are returned for the caller to
//! log, never to fail on, and they are written through [`Store::relaxed`] (atomic, not fsynced):
//! nothing is decided from an Event, and a run's few Events would otherwise cost as many fsyncs as
//! the writes that carry its decisions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::resources::event::{Event, EventSpec, EventType, ObjectReference};
use crate::resources::meta::{format_time, parse_time, Object, Resource};
use crate::resources::validate::MAX_NAME_LEN;
use crate::store::{Store, StoreError};

/// An identical event within this window is folded into the existing one.
pub const AGGREGATION_WINDOW: Duration = Duration::from_secs(10 * 60);
/// Garbage collection keeps at most this many events per involved object…
pub const MAX_EVENTS_PER_OBJECT: usize = 50;
/// …and none whose last occurrence is older than this.
pub const MAX_EVENT_AGE: Duration = Duration::from_secs(60 * 60);

/// Rounds of read-and-write before a contended publish gives up.
const MAX_ATTEMPTS: usize = 20;

type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// Publishes events into a store.
#[derive(Clone)]
pub struct Recorder {
    store: Store,
    source: String,
    clock: Clock,
}

impl Recorder {
    /// A recorder writing to `store` (without fsync, see the module docs), stamping events with
    /// `source` (the reporting component).
    pub fn new(store: Store, source: &str) -> Self {
        Recorder {
            store: store.relaxed(),
            source: source.to_string(),
            clock: Arc::new(SystemTime::now),
        }
    }

    /// Replaces the wall clock (for tests of the aggregation window and garbage collection).
    pub fn with_clock(mut self, clock: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Records that `type_`/`reason`/`message` happened to `obj`. An identical event within ten
    /// minutes bumps the existing one's `count` and `lastTimestamp`; otherwise a new one (count 1)
    /// is written. A new event costs one write (it is created outright); a repeated one a failed
    /// create, a read and a write.
    pub fn publish(
        &self,
        obj: &ObjectReference,
        type_: EventType,
        reason: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        let name = event_name(obj, type_, reason, message);
        let now = (self.clock)();
        let stamp = format_time(now);
        // Retries cover a create race (AlreadyExists) or a concurrent bump (Conflict); with one
        // writer of decisions there is rarely more than one round.
        let mut last_err = None;
        for attempt in 0..MAX_ATTEMPTS {
            if attempt > 0 {
                std::thread::yield_now();
            }
            // Most events are new: the first round creates, and only an AlreadyExists reads.
            let existing = if attempt == 0 {
                None
            } else {
                self.store.try_get::<Event>(&name)?
            };
            let result = match existing {
                Some(mut ev) => {
                    let recent = parse_time(&ev.spec.last_timestamp)
                        .and_then(|t| now.duration_since(t).ok().or(Some(Duration::ZERO)))
                        .is_some_and(|age| age < AGGREGATION_WINDOW);
                    let same = ev.spec.involved_object.kind == obj.kind
                        && ev.spec.involved_object.name == obj.name
                        && ev.spec.type_ == type_
                        && ev.spec.reason == reason
                        && ev.spec.message == message;
                    if recent && same {
                        ev.spec.count += 1;
                    } else {
                        // Too old to fold into (or a hash collision): start the series over.
                        ev.spec = self.spec(obj, type_, reason, message, &stamp);
                    }
                    ev.spec.last_timestamp = stamp.clone();
                    if !obj.uid.is_empty() {
                        ev.spec.involved_object.uid = obj.uid.clone();
                    }
                    self.store.update(&ev).map(|_| ())
                }
                None => {
                    let ev: Event = Object::new(
                        Event::KIND,
                        &name,
                        self.spec(obj, type_, reason, message, &stamp),
                    );
                    self.store.create_only(&ev)
                }
            };
            match result {
                Ok(()) => return Ok(()),
                Err(e) if e.is_already_exists() || e.is_conflict() || e.is_not_found() => {
                    last_err = Some(e)
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err.expect("the loop ran"))
    }

    fn spec(
        &self,
        obj: &ObjectReference,
        type_: EventType,
        reason: &str,
        message: &str,
        stamp: &str,
    ) -> EventSpec {
        EventSpec {
            involved_object: obj.clone(),
            type_,
            reason: reason.to_string(),
            message: message.to_string(),
            count: 1,
            first_timestamp: stamp.to_string(),
            last_timestamp: stamp.to_string(),
            source: self.source.clone(),
        }
    }

    /// Events about `kind`/`name`, oldest first (newest last).
    pub fn list_for(store: &Store, kind: &str, name: &str) -> Vec<Event> {
        list_for(store, kind, name)
    }

    /// Deletes events older than an hour and all but the newest 50 per object; returns how many
    /// were deleted.
    pub fn gc(&self) -> Result<usize, StoreError> {
        let now = (self.clock)();
        let list = self.store.list::<Event>(None)?;
        let mut by_object: BTreeMap<(String, String), Vec<Event>> = BTreeMap::new();
        let mut doomed: Vec<Event> = Vec::new();
        for ev in list.items {
            let age = parse_time(&ev.spec.last_timestamp)
                .map(|t| now.duration_since(t).unwrap_or(Duration::ZERO));
            // An event without a readable timestamp is treated as expired.
            if age.is_none_or(|a| a > MAX_EVENT_AGE) {
                doomed.push(ev);
                continue;
            }
            let key = (
                ev.spec.involved_object.kind.clone(),
                ev.spec.involved_object.name.clone(),
            );
            by_object.entry(key).or_default().push(ev);
        }
        for (_, mut evs) in by_object {
            if evs.len() > MAX_EVENTS_PER_OBJECT {
                sort_oldest_first(&mut evs);
                let excess = evs.len() - MAX_EVENTS_PER_OBJECT;
                doomed.extend(evs.drain(..excess));
            }
        }
        let mut deleted = 0;
        for ev in doomed {
            match self
                .store
                .delete::<Event>(ev.name(), Some(&ev.metadata.resource_version))
            {
                Ok(_) => deleted += 1,
                // Bumped (so it is fresh again) or already gone: leave it.
                Err(e) if e.is_conflict() || e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(deleted)
    }

    /// Runs [`Recorder::gc`] every `period` until the task is aborted, logging failures. Each
    /// pass runs on a blocking thread: it lists every Event and waits on the store's lock, and the
    /// runtime's own threads serve health checks, signals and the watchdog meanwhile.
    pub fn spawn_gc(&self, period: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let pass = this.clone();
                match tokio::task::spawn_blocking(move || pass.gc()).await {
                    Ok(Ok(0)) => {}
                    Ok(Ok(n)) => tracing::debug!(deleted = n, "event garbage collection"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "event garbage collection failed"),
                    Err(e) => tracing::error!(error = %e, "event garbage collection panicked"),
                }
            }
        })
    }
}

/// Events about `kind`/`name`, oldest first (newest last).
pub fn list_for(store: &Store, kind: &str, name: &str) -> Vec<Event> {
    let Ok(list) = store.list::<Event>(None) else {
        return Vec::new();
    };
    let mut evs: Vec<Event> = list
        .items
        .into_iter()
        .filter(|e| e.spec.involved_object.kind == kind && e.spec.involved_object.name == name)
        .collect();
    sort_oldest_first(&mut evs);
    evs
}

fn sort_oldest_first(evs: &mut [Event]) {
    evs.sort_by_key(|e| (parse_time(&e.spec.last_timestamp), e.revision()));
}

/// The event object's name: a DNS-subdomain-safe prefix of the involved object's name, a dot, and
/// 16 hex digits of a stable hash of (kind, name, uid, type, reason, message). The uid, as in
/// Kubernetes' event aggregation key, keeps an object created again under the same name from
/// folding its events into its predecessor's.
pub fn event_name(obj: &ObjectReference, type_: EventType, reason: &str, message: &str) -> String {
    let type_s = match type_ {
        EventType::Normal => "Normal",
        EventType::Warning => "Warning",
    };
    let mut h = Fnv64::new();
    for part in [
        obj.kind.as_str(),
        obj.name.as_str(),
        obj.uid.as_str(),
        type_s,
        reason,
        message,
    ] {
        h.write(part.as_bytes());
        h.write(&[0]);
    }
    let suffix = format!("{:016x}", h.finish());
    // Keep only characters a name may have, and room for ".<16 hex>".
    let max_prefix = MAX_NAME_LEN - 1 - suffix.len();
    let mut prefix: String = obj
        .name
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '.')
        .take(max_prefix)
        .collect();
    // Labels must not be empty nor start or end with '-'.
    let cleaned: Vec<String> = prefix
        .split('.')
        .map(|l| l.trim_matches('-').to_string())
        .filter(|l| !l.is_empty())
        .collect();
    prefix = cleaned.join(".");
    if prefix.is_empty() {
        suffix
    } else {
        format!("{prefix}.{suffix}")
    }
}

/// FNV-1a, 64 bit: stable across processes and Rust versions (unlike `DefaultHasher`).
struct Fnv64(u64);

impl Fnv64 {
    fn new() -> Self {
        Fnv64(0xcbf29ce484222325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x100000001b3);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}
