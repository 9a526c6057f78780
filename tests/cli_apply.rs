//! `apply`: every bad input is refused with an error naming the file, the document and the field,
//! exit status 1, and a state directory left byte-for-byte as it was; good input is created,
//! configured or left unchanged like kubectl.

mod support;

use std::process::Stdio;

use serde_json::Value;
use support::*;

/// A store holding queue `default` and agent `existing`, ready for a bad apply.
fn seeded() -> Env {
    let env = Env::new();
    env.apply_ok(
        "seed.yaml",
        &format!("{}---\n{}", queue("default"), agent("existing", 1)),
    );
    env
}

/// Applies `content` as `file` in a seeded store and asserts the refusal: exit 1, every `needle` in
/// stderr, nothing on disk changed. Returns stderr.
fn refused(file: &str, content: &str, needles: &[&str]) -> String {
    let env = seeded();
    refused_in(&env, file, content, needles)
}

fn refused_in(env: &Env, file: &str, content: &str, needles: &[&str]) -> String {
    let before = env.snapshot();
    let f = env.file(file, content);
    let r = env.run(&["apply", "-f", f.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.is_empty(),
        "nothing may be reported as applied: {r:?}"
    );
    for n in needles {
        assert!(r.stderr.contains(n), "stderr lacks {n:?}:\n{}", r.stderr);
    }
    assert_eq!(env.snapshot(), before, "the state directory changed");
    r.stderr
}

fn agent_named(name: &str) -> String {
    format!("{API}\nkind: Agent\nmetadata:\n  name: {name:?}\nspec:\n  maxConcurrency: 1\n")
}

#[test]
fn malformed_yaml_is_reported_with_its_line_and_column() {
    let content = format!(
        "{}---\n{API}\nkind: Agent\nmetadata:\n  name: b\n   bad: indent\nspec: {{}}\n",
        agent("a", 1)
    );
    let err = refused(
        "broken.yaml",
        &content,
        &[
            "broken.yaml",
            "document 2",
            "invalid YAML at line 14, column",
        ],
    );
    assert!(err.starts_with("error: "), "{err}");
}

#[test]
fn an_unknown_kind_lists_the_known_ones() {
    let content = format!("{API}\nkind: Pod\nmetadata:\n  name: p\nspec: {{}}\n");
    refused(
        "pod.yaml",
        &content,
        &[
            "pod.yaml",
            "document 1",
            "kind: unknown kind \"Pod\"",
            "Agent",
            "Queue",
            "Task",
        ],
    );
}

#[test]
fn an_unknown_field_is_named_with_its_path() {
    let content = format!("{API}\nkind: Agent\nmetadata:\n  name: a\nspec:\n  colour: red\n");
    refused(
        "a.yaml",
        &content,
        &[
            "a.yaml",
            "document 1 (Agent \"a\")",
            "spec.colour",
            "unknown field `colour`",
        ],
    );
}

#[test]
fn a_field_of_the_wrong_type_is_named_with_its_path() {
    let content =
        format!("{API}\nkind: Agent\nmetadata:\n  name: a\nspec:\n  maxConcurrency: three\n");
    refused(
        "a.yaml",
        &content,
        &[
            "a.yaml",
            "document 1 (Agent \"a\")",
            "spec.maxConcurrency",
            "invalid type",
        ],
    );
}

#[test]
fn a_list_where_a_mapping_belongs_is_refused_not_read_field_by_field() {
    // A good first document, then metadata and spec given as lists (which serde would otherwise
    // read positionally: a Queue named "default", taken for an update of the seeded one).
    let content = format!(
        "{}---\n{API}\nkind: Queue\nmetadata: [default]\nspec: [local, ignore]\n",
        queue("fresh")
    );
    refused(
        "q.yaml",
        &content,
        &[
            "q.yaml: document 2 (Queue): metadata: expected a mapping, got a list",
            "q.yaml: document 2 (Queue): spec: expected a mapping, got a list",
        ],
    );
}

#[test]
fn a_document_over_a_torn_object_file_keeps_the_others_from_being_written() {
    let env = seeded();
    std::fs::write(env.state().join("objects/queues/default.json"), "{not json").unwrap();
    let content = format!("{}---\n{}", queue("fresh"), queue("default"));
    refused_in(
        &env,
        "q.yaml",
        &content,
        &[
            "q.yaml: document 2 (Queue \"default\")",
            "not a valid object",
        ],
    );
}

#[test]
fn the_yaml_readers_own_terms_are_put_in_a_users_words() {
    refused(
        "dup.yaml",
        &format!(
            "{API}\nkind: Queue\nmetadata:\n  name: q\nspec:\n  source: local\n  source: local\n"
        ),
        &["dup.yaml: document 1", "line 7", "duplicate key \"source\""],
    );
    let deep = format!(
        "{API}\nkind: Queue\nmetadata: {}{}\n",
        "[".repeat(70),
        "]".repeat(70)
    );
    refused(
        "deep.yaml",
        &deep,
        &["nested too deeply (more than 64 levels)"],
    );
    refused(
        "big.yaml",
        &format!("{API}\nkind: Task\nmetadata:\n  name: t\nspec:\n  queue: default\n  priority: 99999999999999999999\n"),
        &["spec.priority", "expected a whole number (at most 9223372036854775807)"],
    );
    for shown in [
        refused(
            "dup.yaml",
            &format!("{API}\nkind: Queue\nmetadata: {{name: q, name: r}}\nspec: {{}}\n"),
            &[],
        ),
        refused("deep.yaml", &deep, &[]),
    ] {
        assert!(
            !shown.contains("DuplicateKeyPolicy") && !shown.contains("budget"),
            "{shown}"
        );
    }
}

#[test]
fn a_name_with_a_slash_is_refused() {
    refused(
        "n.yaml",
        &agent_named("a/b"),
        &["n.yaml", "document 1", "metadata.name", "RFC 1123"],
    );
}

#[test]
fn a_name_with_dot_dot_is_refused() {
    refused(
        "n.yaml",
        &agent_named(".."),
        &["n.yaml", "document 1", "metadata.name"],
    );
}

#[test]
fn an_upper_case_name_is_refused() {
    refused(
        "n.yaml",
        &agent_named("Vaela"),
        &["n.yaml", "document 1", "metadata.name", "lower case"],
    );
}

#[test]
fn the_longest_valid_name_is_stored_and_one_more_character_is_refused() {
    let env = seeded();
    let longest = "a".repeat(250);
    env.apply_ok("long.yaml", &agent_named(&longest));
    let got = env.run(&["get", "agent", &longest, "-o", "name"]);
    assert_eq!(
        got.stdout.trim(),
        format!("agent.tinyscheduler.io/{longest}")
    );
    refused(
        "n.yaml",
        &agent_named(&"a".repeat(251)),
        &["metadata.name", "no more than 250 characters (got 251)"],
    );
}

#[test]
fn a_300_character_name_is_refused() {
    let name = "a".repeat(300);
    refused(
        "n.yaml",
        &agent_named(&name),
        &[
            "n.yaml",
            "document 1",
            "metadata.name",
            "no more than 250 characters (got 300)",
        ],
    );
}

#[test]
fn a_zero_limit_is_refused() {
    refused(
        "z.yaml",
        &agent("a", 0),
        &[
            "z.yaml",
            "document 1 (Agent \"a\")",
            "spec.maxConcurrency: must be greater than 0 (got 0)",
        ],
    );
}

#[test]
fn a_negative_limit_is_refused() {
    refused(
        "z.yaml",
        &agent("a", -4),
        &[
            "z.yaml",
            "document 1 (Agent \"a\")",
            "spec.maxConcurrency: must be greater than 0 (got -4)",
        ],
    );
}

#[test]
fn a_document_over_one_mebibyte_is_refused() {
    let big = "x".repeat(2 * 1024 * 1024);
    let content = format!("{}---\n{API}\nkind: Task\nmetadata:\n  name: big\nspec:\n  queue: default\n  params:\n    blob: {big}\n", agent("a", 1));
    refused(
        "big.yaml",
        &content,
        &["big.yaml", "document 2", "the limit is 1048576 bytes"],
    );
}

#[test]
fn an_object_that_only_the_stores_metadata_takes_over_the_limit_is_refused_before_any_write() {
    // Under the limit as written; over it once the store adds the uid, times and version.
    let note = "x".repeat(1_048_200);
    let content = format!(
        "{}---\n{API}\nkind: Task\nmetadata:\n  name: big\n  annotations:\n    note: {note}\nspec:\n  queue: default\n",
        queue("bigq")
    );
    refused(
        "big.yaml",
        &content,
        &[
            "big.yaml",
            "document 2",
            "the stored object would be",
            "the limit is 983040 bytes (the store's 1048576 less 65536 kept for its status)",
        ],
    );
}

#[test]
fn leases_and_events_are_the_schedulers_and_cannot_be_applied() {
    let lease = format!(
        "{}---\n{API}\nkind: Lease\nmetadata:\n  name: t1\nspec:\n  task: t1\n  agent: a\n  \
         leaseDurationSeconds: 30\n  maxRuntimeSeconds: 60\n  attempt: 1\n",
        queue("q")
    );
    refused(
        "lease.yaml",
        &lease,
        &[
            "document 2 (Lease \"t1\")",
            "Leases are created by the scheduler",
        ],
    );
    let event = format!(
        "{API}\nkind: Event\nmetadata:\n  name: e1\nspec:\n  involvedObject: {{kind: Task, name: t1}}\n  \
         type: Normal\n  reason: X\n  message: x\n"
    );
    refused(
        "event.yaml",
        &event,
        &["Events are written by the scheduler"],
    );
}

#[test]
fn an_empty_file_is_an_error() {
    refused("empty.yaml", "", &["empty.yaml", "no objects"]);
    refused(
        "comments.yaml",
        "# nothing here\n---\n",
        &["comments.yaml", "no objects"],
    );
}

#[test]
fn a_document_without_kind_says_so() {
    let content = format!(
        "{}---\n{API}\nmetadata:\n  name: a\nspec: {{}}\n",
        queue("q")
    );
    refused(
        "nokind.yaml",
        &content,
        &["nokind.yaml", "document 2", "kind: required"],
    );
}

#[test]
fn a_stale_resource_version_is_a_conflict() {
    let env = seeded();
    let current: Value =
        serde_json::from_str(&env.run(&["get", "agent", "existing", "-o", "json"]).stdout).unwrap();
    let rv = current["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    env.apply_ok("bump.yaml", &agent("existing", 2));
    let stale = format!("{API}\nkind: Agent\nmetadata:\n  name: existing\n  resourceVersion: \"{rv}\"\nspec:\n  maxConcurrency: 3\n");
    refused_in(&env, "stale.yaml", &stale, &["Error from server (Conflict)", "stale.yaml", "document 1 (Agent \"existing\")", "metadata.resourceVersion", "the object has been modified; please apply your changes to the latest version and try again"]);
}

#[test]
fn an_invalid_third_document_keeps_the_first_two_from_being_written() {
    let content = format!(
        "{}---\n{}---\n{}",
        queue("q2"),
        agent("fine", 1),
        agent("broken", 0)
    );
    refused(
        "three.yaml",
        &content,
        &[
            "three.yaml",
            "document 3 (Agent \"broken\")",
            "spec.maxConcurrency",
        ],
    );
}

#[test]
fn a_symlink_planted_in_the_objects_directory_is_refused() {
    let env = seeded();
    let link = env.state().join("objects/agents/x.json");
    std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
    let passwd = std::fs::read("/etc/passwd").unwrap();
    refused_in(
        &env,
        "x.yaml",
        &agent("x", 1),
        &[
            "x.yaml",
            "document 1 (Agent \"x\")",
            "objects/agents/x.json",
            "symlink",
        ],
    );
    assert_eq!(std::fs::read("/etc/passwd").unwrap(), passwd);
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn every_invalid_document_is_reported_at_once() {
    let content = format!("{}---\n{}", agent("a", 0), agent("b", -1));
    let err = refused(
        "two.yaml",
        &content,
        &["document 1 (Agent \"a\")", "document 2 (Agent \"b\")"],
    );
    assert_eq!(err.lines().count(), 2, "{err}");
}

#[test]
fn a_failed_apply_does_not_create_a_missing_state_directory() {
    let env = Env::new();
    let f = env.file("z.yaml", &agent("a", 0));
    let r = env.run(&["apply", "-f", f.to_str().unwrap()]);
    assert_eq!(r.code, 1);
    assert!(!env.state().exists());
}

// ----- happy paths -----

fn get_json(env: &Env, kind: &str, name: &str) -> Value {
    let r = env.run(&["get", kind, name, "-o", "json"]);
    assert_eq!(r.code, 0, "{r:?}");
    serde_json::from_str(&r.stdout).unwrap()
}

#[test]
fn apply_creates_then_leaves_unchanged_then_configures() {
    let env = Env::new();
    let r = env.apply_ok("a.yaml", &agent("vaela", 1));
    assert_eq!(r.stdout, "agent.tinyscheduler.io/vaela created\n");
    assert!(env.state().is_dir(), "apply creates the state directory");
    let r = env.apply_ok("a.yaml", &agent("vaela", 1));
    assert_eq!(r.stdout, "agent.tinyscheduler.io/vaela unchanged\n");
    let r = env.apply_ok("a.yaml", &agent("vaela", 2));
    assert_eq!(r.stdout, "agent.tinyscheduler.io/vaela configured\n");
}

#[test]
fn generation_is_bumped_only_when_the_spec_changes() {
    let env = Env::new();
    env.apply_ok("a.yaml", &agent("vaela", 1));
    assert_eq!(
        get_json(&env, "agent", "vaela")["metadata"]["generation"],
        1
    );
    let labelled = agent("vaela", 1).replace(
        "  name: vaela\n",
        "  name: vaela\n  labels:\n    team: core\n",
    );
    let r = env.apply_ok("a.yaml", &labelled);
    assert!(r.stdout.contains("configured"), "{r:?}");
    let v = get_json(&env, "agent", "vaela");
    assert_eq!(v["metadata"]["generation"], 1);
    assert_eq!(v["metadata"]["labels"]["team"], "core");
    env.apply_ok("a.yaml", &agent("vaela", 5));
    let v = get_json(&env, "agent", "vaela");
    assert_eq!(v["metadata"]["generation"], 2);
    assert!(
        v["metadata"].get("labels").is_none(),
        "labels are replaced, not merged"
    );
}

#[test]
fn dry_run_reports_what_would_happen_and_creates_nothing() {
    let env = Env::new();
    let f = env.file(
        "a.yaml",
        &format!("{}---\n{}", agent("vaela", 1), queue("default")),
    );
    let r = env.run(&["apply", "--dry-run", "-f", f.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        r.stdout,
        "queue.tinyscheduler.io/default created (dry run)\nagent.tinyscheduler.io/vaela created (dry run)\n"
    );
    assert!(!env.state().exists());
    env.apply_ok("a.yaml", &agent("vaela", 1));
    let before = env.snapshot();
    let f = env.file(
        "b.yaml",
        &format!("{}---\n{}", agent("vaela", 1), agent("other", 1)),
    );
    let r = env.run(&["apply", "--dry-run", "-f", f.to_str().unwrap()]);
    assert!(r.stdout.contains("vaela unchanged (dry run)"), "{r:?}");
    assert!(r.stdout.contains("other created (dry run)"), "{r:?}");
    assert_eq!(env.snapshot(), before);
}

#[test]
fn a_directory_is_applied_in_kind_order_and_recursion_is_opt_in() {
    let env = Env::new();
    env.file("m/tasks.yaml", &task("t1", "default"));
    env.file("m/agents.json", &serde_json::to_string(&serde_json::json!({
        "apiVersion": "tinyscheduler.io/v1alpha1", "kind": "List", "items": [
            {"apiVersion": "tinyscheduler.io/v1alpha1", "kind": "Agent", "metadata": {"name": "a1"}, "spec": {}},
            {"apiVersion": "tinyscheduler.io/v1alpha1", "kind": "Agent", "metadata": {"name": "a2"}, "spec": {}}
        ]})).unwrap());
    env.file("m/queues.yml", &queue("default"));
    env.file("m/README.txt", "not a manifest");
    env.file("m/sub/more.yaml", &queue("nested"));
    let dir = env.tmp.path().join("m");
    let r = env.run(&["apply", "-f", dir.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        r.stdout,
        "queue.tinyscheduler.io/default created\nagent.tinyscheduler.io/a1 created\n\
         agent.tinyscheduler.io/a2 created\ntask.tinyscheduler.io/t1 created\n"
    );
    let r = env.run(&["apply", "-R", "-f", dir.to_str().unwrap()]);
    assert!(
        r.stdout.contains("queue.tinyscheduler.io/nested created"),
        "{r:?}"
    );
}

#[test]
fn an_empty_file_beside_manifests_is_skipped_and_only_no_objects_at_all_is_an_error() {
    let env = Env::new();
    env.file("m/queues.yaml", &queue("default"));
    env.file("m/placeholder.yaml", "# filled in later\n");
    env.file("m/empty.yml", "---\n");
    let dir = env.tmp.path().join("m");
    let r = env.run(&["apply", "-f", dir.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, "queue.tinyscheduler.io/default created\n");
    let r = env.run(&["delete", "-f", dir.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{r:?}");
    env.file("n/placeholder.yaml", "# filled in later\n");
    let empty = env.tmp.path().join("n");
    let r = env.run(&["delete", "-f", empty.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("no objects passed to delete"), "{r:?}");
}

#[test]
fn standard_input_is_read_with_dash() {
    let env = Env::new();
    let r = env.run_stdin(&["apply", "-f", "-"], &queue("from-stdin"));
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, "queue.tinyscheduler.io/from-stdin created\n");
    let r = env.run_stdin(&["apply", "-f", "-"], "kind: Agent\n");
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("<stdin>: document 1 (Agent)"), "{r:?}");
}

#[test]
fn the_example_manifests_apply_cleanly() {
    let env = Env::new();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/manifests");
    let r = env.run(&["apply", "-f", dir]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.starts_with("queue.tinyscheduler.io/"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.lines().count() >= 10, "{}", r.stdout);
    assert!(r.stdout.lines().all(|l| l.ends_with(" created")));
    let r = env.run(&["apply", "-f", dir]);
    assert!(
        r.stdout.lines().all(|l| l.ends_with(" unchanged")),
        "{}",
        r.stdout
    );
}

// ----- concurrency -----

#[test]
fn concurrent_applies_of_one_object_either_succeed_or_report_a_conflict() {
    let env = Env::new();
    env.apply_ok("seed.yaml", &agent("shared", 1));
    let rv = get_json(&env, "agent", "shared")["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let children: Vec<_> = (0..16)
        .map(|i| {
            let m = format!(
                "{API}\nkind: Agent\nmetadata:\n  name: shared\n  resourceVersion: \"{rv}\"\nspec:\n  maxConcurrency: {}\n",
                i + 2
            );
            let f = env.file(&format!("c{i}.yaml"), &m);
            env.cmd(&["apply", "-f", f.to_str().unwrap()])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut won = 0;
    for c in children {
        let r: Run = c.wait_with_output().unwrap().into();
        if r.code == 0 {
            assert_eq!(r.stdout, "agent.tinyscheduler.io/shared configured\n");
            won += 1;
        } else {
            assert_eq!(r.code, 1);
            assert!(r.stderr.contains("Conflict"), "{r:?}");
        }
    }
    assert_eq!(won, 1, "exactly one writer holds the version they all read");
    assert_eq!(
        get_json(&env, "agent", "shared")["metadata"]["generation"],
        2
    );
}

#[test]
fn concurrent_creates_of_distinct_objects_all_land_with_unique_versions() {
    let env = Env::new();
    let children: Vec<_> = (0..16)
        .map(|i| {
            let f = env.file(
                &format!("t{i}.yaml"),
                &task(&format!("task-{i}"), "default"),
            );
            env.cmd(&["apply", "-f", f.to_str().unwrap()])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let r: Run = c.wait_with_output().unwrap().into();
        assert_eq!(r.code, 0, "{r:?}");
    }
    let r = env.run(&["get", "tasks", "-o", "json"]);
    let list: Value = serde_json::from_str(&r.stdout).unwrap();
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 16);
    let mut rvs: Vec<u64> = items
        .iter()
        .map(|i| {
            i["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    rvs.sort();
    rvs.dedup();
    assert_eq!(rvs.len(), 16, "resourceVersions must be unique");
}

#[test]
fn a_duration_beyond_ten_years_is_refused_naming_its_field() {
    let content = format!(
        "{}---\n{API}\nkind: Task\nmetadata:\n  name: t\nspec:\n  queue: q\n  ttlSecondsAfterFinished: 9223372036854775807\n",
        agent("a", 1)
    );
    refused(
        "t.yaml",
        &content,
        &[
            "t.yaml",
            "document 2 (Task \"t\")",
            "spec.ttlSecondsAfterFinished",
            "at most 315360000",
        ],
    );
}

#[test]
fn a_list_larger_than_one_object_may_be_is_applied_item_by_item_and_back() {
    let env = seeded();
    // 300 tasks with long prompts: over the 1 MiB limit of one object, all together.
    let items: Vec<Value> = (0..300)
        .map(|i| {
            serde_json::json!({
                "apiVersion": "tinyscheduler.io/v1alpha1",
                "kind": "Task",
                "metadata": {"name": format!("task-{i:04}"), "labels": {"batch": "a-label-that-takes-some-room"}},
                "spec": {"queue": "default", "params": {"prompt": "x".repeat(4000)}}
            })
        })
        .collect();
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
    let text = serde_json::to_string(&list).unwrap();
    assert!(text.len() > 1024 * 1024, "{}", text.len());
    let f = env.file("big.json", &text);
    let r = env.run(&["apply", "-f", f.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.lines().count(), 300);

    // And back, as YAML: the round trip users do with kubectl.
    let yaml = env.run(&["get", "tasks", "-o", "yaml"]);
    assert_eq!(yaml.code, 0, "{}", yaml.stderr);
    let again = env.run_stdin(&["apply", "-f", "-"], &yaml.stdout);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(
        again.stdout.lines().all(|l| l.ends_with(" unchanged")),
        "{}",
        again.stdout
    );
}

#[test]
fn a_document_after_an_end_marker_is_applied_too() {
    let env = seeded();
    let content = format!(
        "{}...\n{}",
        task("first", "default"),
        task("second", "default")
    );
    let r = env.apply_ok("two.yaml", &content);
    assert!(
        r.stdout.contains("task.tinyscheduler.io/first created"),
        "{r:?}"
    );
    assert!(
        r.stdout.contains("task.tinyscheduler.io/second created"),
        "{r:?}"
    );
}

#[test]
fn yaml_scalars_follow_yaml_1_2_core() {
    let env = seeded();
    let content = format!(
        "{API}\nkind: Task\nmetadata:\n  name: t\n  labels:\n    answer: no\nspec:\n  queue: default\n  params:\n    country: NO\n    pr: 0042\n    big: 1_000\n    flag: true\n"
    );
    env.apply_ok("t.yaml", &content);
    let t: Value =
        serde_json::from_str(&env.run(&["get", "task", "t", "-o", "json"]).stdout).unwrap();
    assert_eq!(t["metadata"]["labels"]["answer"], "no");
    assert_eq!(t["spec"]["params"]["country"], "NO");
    assert_eq!(t["spec"]["params"]["pr"], "0042");
    assert_eq!(t["spec"]["params"]["big"], "1_000");
    assert_eq!(t["spec"]["params"]["flag"], true);
}

#[test]
fn apply_recursive_does_not_follow_a_symlinked_directory_back_up_the_tree() {
    let env = seeded();
    let dir = env.tmp.path().join("manifests");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("sub/t.yaml"), task("t", "default")).unwrap();
    std::os::unix::fs::symlink(&dir, dir.join("sub/loop")).unwrap();
    let r = env.run(&["apply", "-R", "-f", dir.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, "task.tinyscheduler.io/t created\n");
}

#[test]
fn a_label_that_no_selector_could_match_is_refused_naming_it() {
    let content = format!(
        "{API}\nkind: Task\nmetadata:\n  name: t\n  labels:\n    'a b': x\nspec:\n  queue: default\n"
    );
    refused(
        "t.yaml",
        &content,
        &[
            "t.yaml",
            "document 1 (Task \"t\")",
            "metadata.labels.a b",
            "invalid key",
        ],
    );
    let content = format!(
        "{API}\nkind: Task\nmetadata:\n  name: t\n  labels:\n    team: 'two words'\nspec:\n  queue: default\n"
    );
    refused(
        "t.yaml",
        &content,
        &["metadata.labels.team", "invalid value"],
    );

    let env = seeded();
    let good = format!(
        "{API}\nkind: Task\nmetadata:\n  name: t\n  labels:\n    app.example.com/tier: back-end_1\n    empty: ''\nspec:\n  queue: default\n"
    );
    env.apply_ok("t.yaml", &good);
    let r = env.run(&[
        "get",
        "tasks",
        "-l",
        "app.example.com/tier=back-end_1",
        "-o",
        "name",
    ]);
    assert_eq!(r.stdout, "task.tinyscheduler.io/t\n", "{r:?}");
}

#[test]
fn a_task_cannot_be_made_to_look_like_a_tinytask_mirror_or_stop_looking_like_one() {
    let env = seeded();
    let task = |annotations: &str| {
        format!(
            "{API}\nkind: Task\nmetadata:\n  name: t\n  annotations:\n{annotations}spec:\n  queue: default\n"
        )
    };
    // A local Task given the id would wait for a claim no server makes.
    refused_in(
        &env,
        "t.yaml",
        &task("    tinyscheduler.io/tinytask-id: \"abc\"\n"),
        &[
            "t.yaml",
            "document 1 (Task \"t\")",
            "metadata.annotations.tinyscheduler.io/tinytask-id: set by the tinytask sync \
             controller",
        ],
    );
    // An annotation key is a key: not empty.
    refused_in(
        &env,
        "e.yaml",
        &task("    \"\": x\n"),
        &["e.yaml", "metadata.annotations.: invalid key \"\""],
    );
    // A mirror's own manifest may be applied again as it is stored (another priority, say), but
    // not with another id, nor without it.
    let mut mirror = tinyscheduler::resources::Task::new(
        "Task",
        "tt-7",
        tinyscheduler::resources::TaskSpec {
            queue: Some("default".into()),
            ..Default::default()
        },
    );
    mirror
        .metadata
        .annotations
        .insert("tinyscheduler.io/tinytask-id".into(), "7".into());
    env.store().create(&mirror).unwrap();
    let again = |annotations: &str, priority: i64| {
        format!(
            "{API}\nkind: Task\nmetadata:\n  name: tt-7\n{annotations}spec:\n  queue: default\n  priority: {priority}\n"
        )
    };
    let ok = env.file(
        "same.yaml",
        &again(
            "  annotations:\n    tinyscheduler.io/tinytask-id: \"7\"\n",
            3,
        ),
    );
    let r = env.run(&["apply", "-f", ok.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout.trim(), "task.tinyscheduler.io/tt-7 configured");
    refused_in(
        &env,
        "other.yaml",
        &again(
            "  annotations:\n    tinyscheduler.io/tinytask-id: \"8\"\n",
            3,
        ),
        &["metadata.annotations.tinyscheduler.io/tinytask-id: set by"],
    );
    refused_in(
        &env,
        "none.yaml",
        &again("", 3),
        &["metadata.annotations.tinyscheduler.io/tinytask-id: set by"],
    );
}

#[test]
fn a_repeated_key_is_refused_in_json_as_in_yaml() {
    let json = r#"{"apiVersion": "tinyscheduler.io/v1alpha1", "kind": "Agent",
 "metadata": {"name": "dup"},
 "spec": {"maxConcurrency": 1, "maxConcurrency": 5}}
"#;
    refused(
        "dup.json",
        json,
        &[
            "dup.json",
            "document 1",
            "invalid JSON at line 3",
            "duplicate key \"maxConcurrency\": a key may appear once in an object",
        ],
    );
}

#[test]
fn a_spec_left_out_takes_every_default_and_a_task_still_needs_a_queue() {
    let env = seeded();
    let f = env.file(
        "q.yaml",
        &format!("{API}\nkind: Queue\nmetadata:\n  name: bare\n"),
    );
    let r = env.run(&["apply", "-f", f.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout.trim(), "queue.tinyscheduler.io/bare created");
    let q = env.run(&["get", "queue", "bare", "-o", "json"]);
    let q: Value = serde_json::from_str(&q.stdout).unwrap();
    assert_eq!(q["spec"]["source"], "local", "{q}");
    refused_in(
        &env,
        "t.yaml",
        &format!("{API}\nkind: Task\nmetadata:\n  name: bare\n"),
        &["t.yaml", "document 1 (Task \"bare\")", "spec.queue"],
    );
}

#[test]
fn a_recursive_apply_of_the_working_directory_leaves_the_state_directory_out() {
    let env = Env::new();
    // The default state directory sits in the working directory, beside the manifests.
    let dir = env.tmp.path().join("work");
    std::fs::create_dir_all(dir.join("manifests")).unwrap();
    std::fs::write(dir.join("manifests/q.yaml"), queue("default")).unwrap();
    let apply = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_tinyscheduler"))
            .args(["--state-dir", "./state", "apply", "-R", "-f", "."])
            .current_dir(&dir)
            .output()
            .unwrap()
    };
    let first = apply();
    assert!(first.status.success(), "{first:?}");
    assert!(dir.join("state/objects/queues/default.json").is_file());
    let again = apply();
    assert!(again.status.success(), "{again:?}");
    assert_eq!(
        String::from_utf8_lossy(&again.stdout).trim(),
        "queue.tinyscheduler.io/default unchanged"
    );
}

#[test]
fn standard_input_named_twice_is_refused_rather_than_read_empty_the_second_time() {
    let env = seeded();
    let before = env.snapshot();
    let r = env.run_stdin(&["apply", "-f", "-", "-f", "-"], &queue("twice"));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr
            .contains("standard input (-f -) may be named only once"),
        "{r:?}"
    );
    assert_eq!(env.snapshot(), before);
}

#[test]
fn root_writing_into_another_users_state_directory_is_refused_before_a_byte_is_written() {
    if !nix::unistd::Uid::effective().is_root() {
        // Only root can make a directory that belongs to someone else; the refusal itself is
        // covered by store::owner's unit test for any user.
        eprintln!("not root: nothing to chown; skipped");
        return;
    }
    let env = Env::new();
    std::fs::create_dir(env.state()).unwrap();
    nix::unistd::chown(&env.state(), Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let f = env.file("q.yaml", &queue("default"));
    for args in [
        vec!["apply", "-f", f.to_str().unwrap()],
        vec!["run", "--once"],
    ] {
        let r = env.run(&args);
        assert_eq!(r.code, 1, "{args:?}: {r:?}");
        assert!(
            r.stderr.contains("the state directory belongs to") && r.stderr.contains("uid 65534"),
            "{args:?}: {r:?}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(env.state()).unwrap().collect();
    assert!(left.is_empty(), "nothing written: {left:?}");
}
