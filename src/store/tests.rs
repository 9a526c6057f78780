use super::*;
use crate::resources::{Agent, AgentSpec, Task, TaskSpec};
use std::cell::RefCell;
use std::os::unix::fs::PermissionsExt;

thread_local! {
    /// Run once by the next update on this thread between the two holds of the store lock (see
    /// `Store::put_in_place`): where another writer may slip in.
    static BETWEEN_HOLDS: RefCell<Option<Box<dyn FnOnce()>>> = const { RefCell::new(None) };
}

/// The test seam `Store::put_in_place` calls between its holds.
pub(super) fn between_holds() {
    if let Some(f) = BETWEEN_HOLDS.with(|h| h.borrow_mut().take()) {
        f();
    }
}

fn agent(name: &str) -> Agent {
    Agent::new("Agent", name, AgentSpec::default())
}

#[test]
fn create_sets_identity_and_refuses_a_second_create() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = store.create(&agent("a")).unwrap();
    assert_eq!(a.metadata.generation, 1);
    assert_eq!(a.metadata.uid.len(), 36);
    assert!(a.metadata.creation_timestamp.is_some());
    assert_eq!(a.revision(), 1);
    let mut other = agent("a");
    other.spec.max_concurrency = 9;
    let e = store.create(&other).unwrap_err();
    assert!(e.is_already_exists(), "{e}");
    // The refused create wrote nothing over the object.
    let stored = store.get::<Agent>("a").unwrap();
    assert_eq!(stored.metadata.uid, a.metadata.uid);
    assert_eq!(stored.spec.max_concurrency, a.spec.max_concurrency);
    assert_eq!(stored.revision(), 1);
}

#[test]
fn revisions_strictly_increase_across_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = store.create(&agent("a")).unwrap();
    let spec = TaskSpec {
        queue: Some("q".into()),
        ..Default::default()
    };
    let t = store.create(&Task::new("Task", "t", spec)).unwrap();
    let b = store.create(&agent("b")).unwrap();
    assert!(a.revision() < t.revision() && t.revision() < b.revision());
}

#[test]
fn a_stale_resource_version_is_a_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = store.create(&agent("a")).unwrap();
    let mut first = a.clone();
    first.spec.max_concurrency = 2;
    let updated = store.update(&first).unwrap();
    assert_eq!(updated.metadata.generation, 2);
    let mut stale = a;
    stale.spec.max_concurrency = 3;
    let e = store.update(&stale).unwrap_err();
    assert!(e.is_conflict());
    assert!(e.to_string().contains("agents \"a\""), "{e}");
}

#[test]
fn status_updates_keep_spec_and_generation() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = store.create(&agent("a")).unwrap();
    let mut s = a.clone();
    s.spec.max_concurrency = 9;
    s.status.free_slots = 1;
    let w = store.update_status(&s).unwrap();
    assert_eq!(w.spec.max_concurrency, 1);
    assert_eq!(w.status.free_slots, 1);
    assert_eq!(w.metadata.generation, 1);
}

#[test]
fn an_unchanged_update_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = store.create(&agent("a")).unwrap();
    let (_, outcome) = store
        .update_raw("agents", &serde_json::to_value(&a).unwrap())
        .unwrap();
    assert_eq!(outcome, WriteOutcome::Unchanged);
    assert_eq!(store.revision().unwrap(), 1);
}

#[test]
fn files_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("s")).unwrap();
    store.create(&agent("a")).unwrap();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.path().join("s/objects/agents/a.json")), 0o600);
    assert_eq!(mode(&dir.path().join("s/objects/agents")), 0o700);
    assert_eq!(mode(&dir.path().join("s")), 0o700);
}

#[test]
fn an_object_file_made_by_hand_with_other_permissions_passes_none_on_through_its_inode() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = store.create(&agent("a")).unwrap();
    let path = store.kind_dir("agents").join("a.json");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let old_inode = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&path).unwrap());
    // The update puts the 0644 inode into the spare pool; after its rest, a create reuses it.
    let mut changed = a.clone();
    changed.spec.max_concurrency = 7;
    store.update(&changed).unwrap();
    std::thread::sleep(quarantine(&store) * 2);
    store.create(&agent("b")).unwrap();
    let b = store.kind_dir("agents").join("b.json");
    let m = fs::metadata(&b).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&m),
        old_inode,
        "the create reused the spare"
    );
    assert_eq!(m.permissions().mode() & 0o7777, 0o600);
    let m = fs::metadata(&path).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o600);
}

#[test]
fn a_torn_file_is_skipped_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.create(&agent("a")).unwrap();
    fs::write(dir.path().join("objects/agents/b.json"), "{\"apiVers").unwrap();
    let list = store.list::<Agent>(None).unwrap();
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.skipped.len(), 1);
    assert!(list.skipped[0].path.ends_with("b.json"));
}

#[test]
fn a_file_of_another_kind_is_skipped_and_reported_not_read_as_its_directorys_kind() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.create(&agent("a")).unwrap();
    // An Agent's file copied among the Queues, and one in the Queues' own format.
    fs::create_dir_all(dir.path().join("objects/queues")).unwrap();
    fs::copy(
        dir.path().join("objects/agents/a.json"),
        dir.path().join("objects/queues/a.json"),
    )
    .unwrap();
    let queues = store.list_raw("queues", None).unwrap();
    assert!(queues.items.is_empty(), "{:?}", queues.items);
    assert_eq!(queues.skipped.len(), 1);
    assert!(
        queues.skipped[0]
            .reason
            .contains("kind \"Agent\" does not belong in queues/ (it holds Queue objects)"),
        "{:?}",
        queues.skipped[0]
    );
    let e = store.get_raw("queues", "a").unwrap_err();
    assert!(matches!(e, StoreError::Refused { .. }), "{e}");
    assert_eq!(store.get::<Agent>("a").unwrap().metadata.name, "a");
    // A file without a spec is not an object either (apply fills one in; the store does not).
    fs::write(
        dir.path().join("objects/agents/zz.json"),
        r#"{"metadata":{"name":"zz"}}"#,
    )
    .unwrap();
    let agents = store.list::<Agent>(None).unwrap();
    assert_eq!(agents.items.len(), 1);
    assert!(
        agents.skipped[0].path.ends_with("zz.json"),
        "{:?}",
        agents.skipped
    );
}

#[test]
fn a_symlink_is_neither_followed_nor_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.create(&agent("a")).unwrap();
    let target = dir.path().join("outside.json");
    fs::write(&target, "secret").unwrap();
    std::os::unix::fs::symlink(&target, dir.path().join("objects/agents/b.json")).unwrap();
    assert!(matches!(
        store.get::<Agent>("b"),
        Err(StoreError::Refused { .. })
    ));
    let e = store.create(&agent("b")).unwrap_err();
    assert!(e.to_string().contains("symlink"), "{e}");
    let e = store
        .patch_status::<Agent>("b", |a| a.status.free_slots = 7)
        .unwrap_err();
    assert!(e.to_string().contains("symlink"), "{e}");
    assert_eq!(fs::read_to_string(&target).unwrap(), "secret");
    assert_eq!(store.list::<Agent>(None).unwrap().skipped.len(), 1);
}

#[test]
fn a_read_only_store_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_read_only(dir.path().join("missing"));
    assert!(store.list::<Agent>(None).unwrap().items.is_empty());
    assert!(matches!(
        store.create(&agent("a")),
        Err(StoreError::ReadOnly)
    ));
    assert!(!dir.path().join("missing").exists());
}

#[tokio::test]
async fn watch_reports_adds_modifications_and_deletes_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let pre = store.create(&agent("pre")).unwrap();
    let mut w = store
        .watch::<Agent>(std::slice::from_ref(&pre), WatchOptions::default())
        .unwrap();
    let a = store.create(&agent("a")).unwrap();
    let mut a2 = a.clone();
    a2.spec.max_concurrency = 5;
    store.update(&a2).unwrap();
    store.delete::<Agent>("pre", None).unwrap();
    let mut seen = Vec::new();
    let done = |seen: &Vec<String>| {
        seen.iter().any(|s| s == "deleted pre")
            && seen.iter().any(|s| s == "modified a 5" || s == "added a 5")
    };
    while !done(&seen) {
        let ev = tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .expect("event within 10s")
            .expect("open");
        match ev {
            WatchEvent::Added(o) => seen.push(format!(
                "added {} {}",
                o.metadata.name, o.spec.max_concurrency
            )),
            WatchEvent::Modified(o) => seen.push(format!(
                "modified {} {}",
                o.metadata.name, o.spec.max_concurrency
            )),
            WatchEvent::Deleted { name, .. } => seen.push(format!("deleted {name}")),
            WatchEvent::Error(e) => panic!("{e}"),
        }
    }
    // The create and update of `a` may be coalesced into one Added carrying the newest version,
    // but `a` is never reported after its newest version.
    assert!(seen.iter().all(|s| !s.starts_with("deleted a")), "{seen:?}");
}

use std::time::Duration;

#[test]
fn a_relaxed_handle_writes_into_the_same_store_and_revision_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let relaxed = store.relaxed();
    assert!(store.is_durable() && !relaxed.is_durable());
    let a = store.create(&agent("a")).unwrap();
    let b = relaxed.create(&agent("b")).unwrap();
    assert!(b.revision() > a.revision());
    assert_eq!(store.get::<Agent>("b").unwrap().revision(), b.revision());
    relaxed.delete::<Agent>("b", None).unwrap();
    assert!(store.try_get::<Agent>("b").unwrap().is_none());
    let leftovers: Vec<_> = fs::read_dir(dir.path().join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| !spares::Pool::is_spare_name(n))
        .collect();
    assert!(leftovers.is_empty(), "no temp file is left: {leftovers:?}");
}

#[test]
fn orphaned_temp_files_are_removed_but_spares_and_live_writers_files_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = store.create(&agent("a")).unwrap();
    store.update(&a).unwrap();
    store.delete::<Agent>("a", None).unwrap();
    let tmp = dir.path().join("tmp");
    // A crashed writer's file (pid 2^22 + 1 is above the kernel's pid limit, never alive) and one
    // of a live process writing outside the store lock (our parent, the test runner).
    fs::write(tmp.join("4194305.0.tmp"), b"x").unwrap();
    let live = format!("{}.7.tmp", nix::unistd::getppid());
    fs::write(tmp.join(&live), b"x").unwrap();
    let spares_before: Vec<_> = fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| spares::Pool::is_spare_name(n))
        .collect();
    assert!(!spares_before.is_empty());
    store.remove_orphaned_temp_files().unwrap();
    let mut left: Vec<String> = fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert!(!left.contains(&"4194305.0.tmp".to_string()), "{left:?}");
    assert!(left.contains(&live), "{left:?}");
    for s in &spares_before {
        assert!(left.contains(&s.to_string_lossy().into_owned()), "{left:?}");
    }
}

#[test]
fn concurrent_read_modify_writes_of_one_object_lose_no_update() {
    let dir = tempfile::tempdir().unwrap();
    let durable = Store::open(dir.path()).unwrap();
    let mut a = agent("counter");
    a.status.free_slots = 0;
    durable.create(&a).unwrap();
    // Durable and relaxed handles, in this process and sharing its lock; each increment is a
    // read, then an update that must fail with Conflict if anyone wrote in between.
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let store = if i % 2 == 0 {
                durable.clone()
            } else {
                durable.relaxed()
            };
            std::thread::spawn(move || {
                for _ in 0..25 {
                    loop {
                        let mut a = store.get::<Agent>("counter").unwrap();
                        a.status.free_slots += 1;
                        match store.update_status(&a) {
                            Ok(_) => break,
                            Err(e) if e.is_conflict() => continue,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(
        durable.get::<Agent>("counter").unwrap().status.free_slots,
        100
    );
}

#[test]
fn concurrent_status_patches_of_one_object_lose_no_update() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut a = agent("counter");
    a.status.free_slots = 0;
    store.create(&a).unwrap();
    // Each patch sees the object as it is under the lock, so no increment can be lost, and a
    // patch by another process handle (a second Store::open) is seen as well.
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let store = if i % 2 == 0 {
                store.clone()
            } else {
                Store::open(dir.path()).unwrap()
            };
            std::thread::spawn(move || {
                for _ in 0..25 {
                    let patched = store
                        .patch_status::<Agent>("counter", |a| a.status.free_slots += 1)
                        .unwrap();
                    assert!(patched.is_some());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(
        store.get::<Agent>("counter").unwrap().status.free_slots,
        100
    );
    assert!(store
        .patch_status::<Agent>("absent", |_| unreachable!("no object, no call"))
        .unwrap()
        .is_none());
}

/// How long a spare released by `store` rests before it is rewritten.
fn quarantine(store: &Store) -> Duration {
    let w = store.inner.writer.as_ref().expect("a writable store");
    let state = w.state.lock().unwrap();
    state.spares.quarantine()
}

#[test]
fn an_update_is_a_conflict_when_a_newer_version_came_back_in_the_same_inode_with_the_same_ctime() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let other = Store::open(dir.path()).unwrap();
    let a = store.create(&agent("a")).unwrap();
    let path = store.object_path("agents", "a");
    let first_inode = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&path).unwrap());
    // A file system with whole-second ctimes, and writes within one second of each other.
    fsio::tests::CTIME_FROZEN.set(true);
    let rest = quarantine(&other) * 2;
    let writer = other.clone();
    let inode_path = path.clone();
    BETWEEN_HOLDS.with(|h| {
        *h.borrow_mut() = Some(Box::new(move || {
            // Another writer updates twice: the first update puts the read version's inode in
            // the spare pool, the second (after its rest) rewrites it and exchanges it back in.
            for n in [2, 3] {
                let mut cur = writer.get::<Agent>("a").unwrap();
                cur.spec.max_concurrency = n;
                writer.update(&cur).unwrap();
                std::thread::sleep(rest);
            }
            assert_eq!(
                std::os::unix::fs::MetadataExt::ino(&fs::metadata(&inode_path).unwrap()),
                first_inode,
                "the read version's inode is back at the path (else this test shows nothing)"
            );
        }))
    });
    let mut stale = a.clone();
    stale.spec.max_concurrency = 9;
    let result = store.update(&stale);
    fsio::tests::CTIME_FROZEN.set(false);
    let stored = store.get::<Agent>("a").unwrap();
    assert!(
        matches!(&result, Err(e) if e.is_conflict()),
        "the update of a version since replaced must be a Conflict: {result:?}"
    );
    assert_eq!(stored.spec.max_concurrency, 3);
    assert!(stored.revision() > a.revision() + 1);
}

#[test]
fn the_resource_version_is_read_from_an_object_file_without_building_the_object() {
    let rv = |s: &str| resource_version_in(s.as_bytes());
    assert_eq!(
        rv(r#"{"apiVersion": "v", "metadata": {"name": "a", "resourceVersion": "42"}, "spec": {"x": [1, {"y": null}]}}"#).as_deref(),
        Some("42")
    );
    assert_eq!(rv(r#"{"metadata": {"name": "a"}}"#).as_deref(), Some(""));
    assert_eq!(
        rv(r#"{"metadata": {"resourceVersion": 42}}"#).as_deref(),
        Some(""),
        "not a string: as the first hold reads it"
    );
    assert_eq!(
        rv(r#"{"metadata": {"resourceVersion": "1"}, "metadata": {"resourceVersion": "2"}}"#)
            .as_deref(),
        Some("2"),
        "the last of repeated keys, as serde_json's Value keeps it"
    );
    assert_eq!(rv("[1, 2]"), None);
    assert_eq!(rv(r#"{"metadata": {"#), None);
}

#[test]
fn a_lost_revision_counter_goes_on_after_every_stored_resource_version() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let counter = dir.path().join("revision");
    let a = store.create(&agent("a")).unwrap();
    let spec = TaskSpec {
        queue: Some("q".into()),
        ..Default::default()
    };
    store.create(&Task::new("Task", "t", spec)).unwrap();
    let mut a2 = a.clone();
    a2.spec.max_concurrency = 4;
    let a2 = store.update(&a2).unwrap();
    store.create(&agent("doomed")).unwrap();
    store.delete::<Agent>("doomed", None).unwrap();
    let highest = a2.revision();

    // Truncated under an open store.
    fs::OpenOptions::new()
        .write(true)
        .open(&counter)
        .unwrap()
        .set_len(0)
        .unwrap();
    assert_eq!(store.revision().unwrap(), highest, "a list's revision too");
    let b = store.create(&agent("b")).unwrap();
    assert!(b.revision() > highest, "{} after {highest}", b.revision());

    // Removed, and the store opened again.
    fs::remove_file(&counter).unwrap();
    let reopened = Store::open(dir.path()).unwrap();
    let c = reopened.create(&agent("c")).unwrap();
    assert!(
        c.revision() > b.revision(),
        "{} after {}",
        c.revision(),
        b.revision()
    );

    // Overwritten with garbage.
    fs::write(&counter, "not a counter").unwrap();
    let mut b2 = b.clone();
    b2.spec.max_concurrency = 2;
    let b2 = reopened.update(&b2).unwrap();
    assert!(
        b2.revision() > c.revision(),
        "{} after {}",
        b2.revision(),
        c.revision()
    );
}

#[test]
fn opening_and_writing_make_the_stores_own_directories_and_files_private_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s");
    let store = Store::open(&root).unwrap();
    store.create(&agent("a")).unwrap();
    drop(store);
    let mode = |p: &str| {
        fs::symlink_metadata(root.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    let set =
        |p: &str, m: u32| fs::set_permissions(root.join(p), fs::Permissions::from_mode(m)).unwrap();
    // Made or loosened by hand, or by an older version.
    for d in [".", "objects", "objects/agents", "tmp"] {
        set(d, 0o755);
    }
    for f in ["revision", "store.lock", "spares", "objects/agents/a.json"] {
        set(f, 0o644);
    }
    fs::write(root.join("notes.txt"), "mine").unwrap();
    set("notes.txt", 0o644);
    fs::create_dir(root.join("objects/queues")).unwrap();
    set("objects/queues", 0o750);

    let store = Store::open(&root).unwrap();
    for d in [".", "objects", "objects/agents", "objects/queues", "tmp"] {
        assert_eq!(mode(d), 0o700, "{d}");
    }
    for f in ["revision", "store.lock", "spares"] {
        assert_eq!(mode(f), 0o600, "{f}");
    }
    assert_eq!(mode("notes.txt"), 0o644, "not the store's");
    assert_eq!(
        mode("objects/agents/a.json"),
        0o644,
        "an object is left as it is"
    );

    // A kind directory loosened while the store is open is made private by the next write to it.
    set("objects/queues", 0o755);
    let q = serde_json::json!({
        "apiVersion": "tinyscheduler.io/v1alpha1",
        "kind": "Queue",
        "metadata": {"name": "q"},
        "spec": {"source": "local"}
    });
    store.create_raw("queues", &q).unwrap();
    assert_eq!(mode("objects/queues"), 0o700);
}

#[test]
fn a_store_directory_of_another_user_keeps_its_mode() {
    if !nix::unistd::geteuid().is_root() {
        return; // only root can give a directory away
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s");
    Store::open(&root).unwrap();
    let kind = root.join("objects/agents");
    fs::create_dir(&kind).unwrap();
    fs::set_permissions(&kind, fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&kind, Some(4_000_000), None).unwrap();
    Store::open(&root).unwrap();
    assert_eq!(
        fs::metadata(&kind).unwrap().permissions().mode() & 0o7777,
        0o755
    );
}
