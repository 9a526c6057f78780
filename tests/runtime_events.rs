//! The event recorder (aggregation, garbage collection, names) and the metrics text format.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tinyscheduler::resources::event::{Event, EventType, ObjectReference};
use tinyscheduler::resources::meta::Resource;
use tinyscheduler::resources::validate::validate_name;
use tinyscheduler::runtime::events::{event_name, list_for};
use tinyscheduler::runtime::{Metrics, Recorder};
use tinyscheduler::store::Store;

fn obj(kind: &str, name: &str) -> ObjectReference {
    ObjectReference {
        kind: kind.into(),
        name: name.into(),
        uid: String::new(),
    }
}

/// A recorder on a clock the test moves by hand.
fn recorder(store: &Store) -> (Recorder, Arc<Mutex<SystemTime>>) {
    let now = Arc::new(Mutex::new(
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    ));
    let n = now.clone();
    (
        Recorder::new(store.clone(), "test-controller").with_clock(move || *n.lock().unwrap()),
        now,
    )
}

fn tick(now: &Arc<Mutex<SystemTime>>, d: Duration) {
    *now.lock().unwrap() += d;
}

#[test]
fn an_identical_event_within_ten_minutes_bumps_count_and_last_timestamp() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (rec, now) = recorder(&store);
    let t = obj("Task", "build-1");
    rec.publish(&t, EventType::Normal, "Scheduled", "assigned to vaela")
        .unwrap();
    tick(&now, Duration::from_secs(300));
    rec.publish(&t, EventType::Normal, "Scheduled", "assigned to vaela")
        .unwrap();
    tick(&now, Duration::from_secs(60));
    rec.publish(&t, EventType::Warning, "Failed", "exit code 1")
        .unwrap();
    let evs = list_for(&store, "Task", "build-1");
    assert_eq!(evs.len(), 2);
    let sched = &evs[0].spec;
    assert_eq!((sched.reason.as_str(), sched.count), ("Scheduled", 2));
    assert_ne!(sched.first_timestamp, sched.last_timestamp);
    assert_eq!(sched.source, "test-controller");
    assert_eq!(evs[1].spec.reason, "Failed", "newest last");
    assert!(list_for(&store, "Task", "other").is_empty());
}

#[test]
fn the_same_event_after_the_window_starts_a_new_count() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (rec, now) = recorder(&store);
    let t = obj("Agent", "vaela");
    rec.publish(&t, EventType::Warning, "Unhealthy", "no heartbeat")
        .unwrap();
    rec.publish(&t, EventType::Warning, "Unhealthy", "no heartbeat")
        .unwrap();
    tick(&now, Duration::from_secs(11 * 60));
    rec.publish(&t, EventType::Warning, "Unhealthy", "no heartbeat")
        .unwrap();
    let evs = list_for(&store, "Agent", "vaela");
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].spec.count, 1);
    assert_eq!(evs[0].spec.first_timestamp, evs[0].spec.last_timestamp);
}

#[test]
fn two_recorders_racing_to_create_the_same_event_both_count() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let t = obj("Task", "raced");
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let rec = Recorder::new(Store::open(dir.path()).unwrap(), "racer");
            let t = t.clone();
            std::thread::spawn(move || {
                for _ in 0..5 {
                    rec.publish(&t, EventType::Normal, "Tick", "same").unwrap();
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    let evs = list_for(&store, "Task", "raced");
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].spec.count, 20);
}

#[test]
fn garbage_collection_keeps_the_newest_fifty_per_object_and_nothing_older_than_an_hour() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (rec, now) = recorder(&store);
    let busy = obj("Task", "busy");
    let old = obj("Task", "old");
    rec.publish(&old, EventType::Normal, "Started", "long ago")
        .unwrap();
    tick(&now, Duration::from_secs(30 * 60));
    for i in 0..60 {
        rec.publish(&busy, EventType::Normal, "Step", &format!("step {i}"))
            .unwrap();
        tick(&now, Duration::from_secs(1));
    }
    tick(&now, Duration::from_secs(31 * 60));
    let deleted = rec.gc().unwrap();
    assert_eq!(deleted, 11);
    assert!(list_for(&store, "Task", "old").is_empty());
    let left = list_for(&store, "Task", "busy");
    assert_eq!(left.len(), 50);
    assert_eq!(left[0].spec.message, "step 10");
    assert_eq!(left[49].spec.message, "step 59");
    assert_eq!(rec.gc().unwrap(), 0);
}

#[test]
fn event_names_are_valid_names_even_for_long_or_odd_object_names() {
    let long = "a".repeat(250);
    for name in [long.as_str(), "x", "a.b-c", "--", "Weird_Name"] {
        let n = event_name(&obj("Task", name), EventType::Normal, "R", "m");
        assert!(validate_name(&n).is_ok(), "{n}");
        assert!(n.len() <= 250);
    }
    let a = event_name(&obj("Task", "t"), EventType::Normal, "R", "m");
    assert_eq!(
        a,
        event_name(&obj("Task", "t"), EventType::Normal, "R", "m")
    );
    assert_ne!(
        a,
        event_name(&obj("Task", "t"), EventType::Warning, "R", "m")
    );
    assert_ne!(
        a,
        event_name(&obj("Agent", "t"), EventType::Normal, "R", "m")
    );
    let mut again = obj("Task", "t");
    again.uid = "another-incarnation".into();
    assert_ne!(
        a,
        event_name(&again, EventType::Normal, "R", "m"),
        "a Task created again under the name has events of its own"
    );
    assert!(a.starts_with("t."));
    let _ = Event::KIND;
}

#[test]
fn metrics_render_valid_prometheus_text() {
    let m = Metrics::default();
    let c = m.counter(
        "t_total",
        "A counter.\nSecond line with \\.",
        &[("controller", "a\"b\\c\nd")],
    );
    c.inc();
    c.inc_by(2);
    assert_eq!(
        m.counter("t_total", "ignored", &[("controller", "a\"b\\c\nd")])
            .get(),
        3
    );
    m.gauge("t_depth", "A gauge.", &[("name", "q")]).set(4.5);
    let h = m.histogram(
        "t_seconds",
        "A histogram.",
        &[("controller", "x")],
        &[0.1, 1.0],
    );
    h.observe(0.05);
    h.observe(0.5);
    h.observe(5.0);
    let text = m.render();
    let expected = "\
# HELP t_depth A gauge.
# TYPE t_depth gauge
t_depth{name=\"q\"} 4.5
# HELP t_seconds A histogram.
# TYPE t_seconds histogram
t_seconds_bucket{controller=\"x\",le=\"0.1\"} 1
t_seconds_bucket{controller=\"x\",le=\"1\"} 2
t_seconds_bucket{controller=\"x\",le=\"+Inf\"} 3
t_seconds_sum{controller=\"x\"} 5.55
t_seconds_count{controller=\"x\"} 3
# HELP t_total A counter.\\nSecond line with \\\\.
# TYPE t_total counter
t_total{controller=\"a\\\"b\\\\c\\nd\"} 3
";
    assert_eq!(text, expected);
}
