//! `get`, `describe`, `delete`, `wait` and `get -w` against a real state directory.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;
use tinyscheduler::resources::{Event, EventSpec, EventType, ObjectReference, Task};

fn with_tasks() -> Env {
    let env = Env::new();
    let labelled =
        task("t-b", "default").replace("  name: t-b\n", "  name: t-b\n  labels:\n    team: core\n");
    env.apply_ok(
        "m.yaml",
        &format!(
            "{}---\n{}---\n{}---\n{}",
            queue("default"),
            agent("vaela", 2),
            task("t-a", "default"),
            labelled
        ),
    );
    env
}

#[test]
fn get_prints_a_kubectl_style_table() {
    let env = with_tasks();
    let r = env.run(&["get", "tasks"]);
    assert_eq!(r.code, 0, "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", r.stdout);
    assert!(
        lines[0].starts_with("NAME   QUEUE     PHASE     AGENT    PRIORITY   ATTEMPTS   AGE"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].starts_with("t-a    default   Pending   <none>   0          0          "),
        "{}",
        lines[1]
    );
    let r = env.run(&["get", "ag", "-o", "wide"]);
    let header: Vec<&str> = r
        .stdout
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "QUEUE", "RUNNING", "LIMIT", "AGE", "PAUSED", "FREE", "COMMAND"],
        "{}",
        r.stdout
    );
    let r = env.run(&["get", "tasks", "--no-headers"]);
    assert!(r.stdout.starts_with("t-a "), "{}", r.stdout);
    assert_eq!(r.stdout.lines().count(), 2);
}

#[test]
fn counts_no_scheduler_has_written_yet_show_as_unknown_not_zero() {
    let env = with_tasks();
    let columns = |kind: &str| -> Vec<String> {
        let r = env.run(&["get", kind, "-o", "wide", "--no-headers"]);
        assert_eq!(r.code, 0, "{r:?}");
        r.stdout
            .lines()
            .next()
            .unwrap()
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let a = columns("agents");
    assert_eq!(
        (a[2].as_str(), a[6].as_str()),
        ("<unknown>", "<unknown>"),
        "{a:?}"
    );
    let q = columns("queues");
    assert_eq!(q[2], "<unknown>", "PENDING: {q:?}");
    assert_eq!(q[8], "<unknown>", "CAPACITY: {q:?}");
    // Paused, so that the pass starts nothing: its counts are then exactly known.
    let mut paused = agent("vaela", 2);
    paused.push_str("  paused: true\n");
    env.apply_ok("paused.yaml", &paused);
    let r = env.run(&["run", "--once"]);
    assert_eq!(r.code, 0, "{r:?}");
    let a = columns("agents");
    assert_eq!(
        (a[2].as_str(), a[6].as_str()),
        ("0", "0"),
        "running, free: {a:?}"
    );
    let q = columns("queues");
    assert_eq!(
        (q[2].as_str(), q[8].as_str()),
        ("2", "0"),
        "pending, capacity: {q:?}"
    );
}

#[test]
fn get_prints_one_object_or_a_list_as_json_and_yaml() {
    let env = with_tasks();
    let one: Value =
        serde_json::from_str(&env.run(&["get", "task", "t-a", "-o", "json"]).stdout).unwrap();
    assert_eq!(one["kind"], "Task");
    assert_eq!(one["metadata"]["name"], "t-a");
    let list: Value =
        serde_json::from_str(&env.run(&["get", "tasks", "-o", "json"]).stdout).unwrap();
    assert_eq!(list["apiVersion"], "v1");
    assert_eq!(list["kind"], "List");
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    let y = env.run(&["get", "task", "t-a", "-o", "yaml"]).stdout;
    assert!(
        y.contains("kind: Task\n") && y.contains("  name: t-a\n"),
        "{y}"
    );
    let y = env.run(&["get", "tasks", "-o", "yaml"]).stdout;
    assert!(y.contains("kind: List\n") && y.contains("items:"), "{y}");
}

#[test]
fn get_prints_names_and_filters_by_label() {
    let env = with_tasks();
    let r = env.run(&["get", "tasks", "-o", "name"]);
    assert_eq!(
        r.stdout,
        "task.tinyscheduler.io/t-a\ntask.tinyscheduler.io/t-b\n"
    );
    let r = env.run(&["get", "tasks", "-l", "team=core", "-o", "name"]);
    assert_eq!(r.stdout, "task.tinyscheduler.io/t-b\n");
    let r = env.run(&["get", "tasks", "-l", "team!=core", "-o", "name"]);
    assert_eq!(r.stdout, "task.tinyscheduler.io/t-a\n");
    // A KIND/NAME without its name (or with more than one slash) is a usage error.
    for bad in ["tasks/", "/t-a", "tasks/t-a/x"] {
        let r = env.run(&["get", bad]);
        assert_eq!(r.code, 1, "{r:?}");
        assert!(
            r.stderr
                .contains("arguments in resource/name form must have a single resource and name"),
            "{bad}: {r:?}"
        );
    }
    // Names and a selector together are refused, as kubectl does.
    let r = env.run(&["get", "tasks", "t-a", "-l", "team=core"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(
        r.stderr.trim(),
        "error: name cannot be provided when a selector is specified"
    );
}

#[test]
fn an_empty_result_says_no_resources_found_on_stderr() {
    let env = with_tasks();
    let r = env.run(&["get", "leases"]);
    assert_eq!(
        (r.code, r.stdout.as_str(), r.stderr.as_str()),
        (0, "", "No resources found.\n")
    );
}

#[test]
fn a_missing_name_is_not_found_and_the_others_are_still_printed() {
    let env = with_tasks();
    let r = env.run(&["get", "tasks", "t-a", "nope", "-o", "name"]);
    assert_eq!(r.code, 1);
    assert_eq!(r.stdout, "task.tinyscheduler.io/t-a\n");
    assert_eq!(
        r.stderr,
        "Error from server (NotFound): tasks \"nope\" not found\n"
    );
}

#[test]
fn an_unknown_kind_is_an_error() {
    let env = with_tasks();
    let r = env.run(&["get", "pods"]);
    assert_eq!(r.code, 1);
    assert_eq!(
        r.stderr,
        "error: the server doesn't have a resource type \"pods\"\n"
    );
}

#[test]
fn a_torn_file_is_warned_about_and_the_rest_is_printed() {
    let env = with_tasks();
    let torn = env.state().join("objects/tasks/torn.json");
    std::fs::write(&torn, "{\"apiVersion\": \"tinysch").unwrap();
    let r = env.run(&["get", "tasks", "-o", "name"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout.lines().count(), 2);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.starts_with("warning: skipping ") && r.stderr.contains("objects/tasks/torn.json"),
        "{}",
        r.stderr
    );
    let d = env.run(&["describe", "tasks"]);
    assert_eq!(d.code, 0, "{d:?}");
    let described = d.stdout.lines().filter(|l| l.starts_with("Name:")).count();
    assert_eq!(described, 2, "{}", d.stdout);
    assert!(
        d.stderr.contains("warning: skipping ") && d.stderr.contains("objects/tasks/torn.json"),
        "describe says what it skipped: {}",
        d.stderr
    );
}

#[test]
fn describe_shows_every_name_it_finds_and_reports_each_it_does_not() {
    let env = with_tasks();
    let r = env.run(&["describe", "task/nosuch", "task/t-a", "task/gone"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.starts_with("Name:         t-a\n"), "{}", r.stdout);
    for missing in ["nosuch", "gone"] {
        assert!(
            r.stderr.contains(&format!("\"{missing}\" not found")),
            "{}",
            r.stderr
        );
    }
}

#[test]
fn get_never_creates_the_state_directory() {
    let env = Env::new();
    let r = env.run(&["get", "agents"]);
    assert_eq!(r.code, 0);
    assert_eq!(r.stderr, "No resources found.\n");
    assert!(!env.state().exists());
}

fn event(
    store: &tinyscheduler::store::Store,
    name: &str,
    reason: &str,
    count: i64,
    first: &str,
    last: &str,
) {
    let spec = EventSpec {
        involved_object: ObjectReference {
            kind: "Task".into(),
            name: "t-a".into(),
            uid: String::new(),
        },
        type_: if reason == "Failed" {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        message: format!("{reason} happened"),
        count,
        first_timestamp: first.into(),
        last_timestamp: last.into(),
        source: "assignment-controller".into(),
    };
    store.create(&Event::new("Event", name, spec)).unwrap();
}

#[test]
fn describe_shows_sections_conditions_and_the_objects_events_in_order() {
    let env = with_tasks();
    let store = env.store();
    let now = std::time::SystemTime::now();
    let ago = |s: u64| tinyscheduler::resources::meta::format_time(now - Duration::from_secs(s));
    event(
        &store,
        "t-a.0000000000000002",
        "Started",
        1,
        &ago(60),
        &ago(60),
    );
    event(
        &store,
        "t-a.0000000000000001",
        "Assigned",
        5,
        &ago(1800),
        &ago(900),
    );
    let other = EventSpec {
        involved_object: ObjectReference {
            kind: "Task".into(),
            name: "t-b".into(),
            uid: String::new(),
        },
        reason: "Other".into(),
        ..Default::default()
    };
    store.create(&Event::new("Event", "t-b.1", other)).unwrap();
    store
        .patch_status::<Task>("t-a", |t| {
            tinyscheduler::resources::meta::set_condition(
                &mut t.status.conditions,
                "Ready",
                true,
                "Assigned",
                "on vaela",
            );
        })
        .unwrap();
    let r = env.run(&["describe", "task", "t-a"]);
    assert_eq!(r.code, 0, "{r:?}");
    let out = &r.stdout;
    for needle in [
        "Name:         t-a\n",
        "API Version:  tinyscheduler.io/v1alpha1\n",
        "Kind:         Task\n",
        "Metadata:\n",
        "  Resource Version:",
        "Spec:\n",
        "  Queue:",
        "  Max Retries:",
        "Status:\n",
        "  Phase:",
        "Conditions:\n",
        "LastTransitionTime",
        "Ready",
        "on vaela",
        "Events:\n",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in\n{out}");
    }
    let assigned = out.find("Assigned happened").unwrap();
    let started = out.find("Started happened").unwrap();
    assert!(
        assigned < started,
        "events are sorted by lastTimestamp:\n{out}"
    );
    // Ages past ten minutes print in whole minutes, so a slow test machine changes nothing.
    assert!(out.contains("15m (x5 over 30m)"), "{out}");
    assert!(
        !out.contains("Other"),
        "another object's events are not shown:\n{out}"
    );
    let r = env.run(&["describe", "task", "t-b"]);
    assert!(
        r.stdout.contains("Events:  <none>") || r.stdout.contains("Other"),
        "{}",
        r.stdout
    );
    let r = env.run(&["describe", "agent", "vaela"]);
    assert!(r.stdout.contains("Events:  <none>\n"), "{}", r.stdout);
    let r = env.run(&["describe", "task", "nope"]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (
            1,
            "Error from server (NotFound): tasks \"nope\" not found\n"
        )
    );
}

#[test]
fn delete_removes_named_objects_and_reports_missing_ones() {
    let env = with_tasks();
    let r = env.run(&["delete", "task", "t-a", "nope", "t-b"]);
    assert_eq!(r.code, 1);
    assert_eq!(
        r.stdout,
        "task.tinyscheduler.io \"t-a\" deleted\ntask.tinyscheduler.io \"t-b\" deleted\n"
    );
    assert_eq!(
        r.stderr,
        "Error from server (NotFound): tasks \"nope\" not found\n"
    );
    let r = env.run(&["delete", "task", "nope", "--ignore-not-found"]);
    assert_eq!((r.code, r.stdout.as_str(), r.stderr.as_str()), (0, "", ""));
    let r = env.run(&["get", "tasks"]);
    assert_eq!(r.stderr, "No resources found.\n");
}

#[test]
fn delete_with_a_manifest_removes_what_it_names() {
    let env = with_tasks();
    let f = env.file(
        "d.yaml",
        &format!("{}---\n{}", agent("vaela", 2), task("t-a", "default")),
    );
    let r = env.run(&["delete", "-f", f.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        r.stdout,
        "task.tinyscheduler.io \"t-a\" deleted\nagent.tinyscheduler.io \"vaela\" deleted\n"
    );
}

#[test]
fn wait_returns_when_the_jsonpath_matches() {
    let env = with_tasks();
    let child = env
        .cmd(&[
            "wait",
            "task/t-a",
            "--for=jsonpath={.status.phase}=Succeeded",
            "--timeout",
            "20s",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    env.store()
        .patch_status::<Task>("t-a", |t| {
            t.status.phase = tinyscheduler::resources::TaskPhase::Succeeded
        })
        .unwrap();
    let r: Run = child.wait_with_output().unwrap().into();
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, "task.tinyscheduler.io/t-a condition met\n");
}

/// `wait task/t-b --for=delete`, started and given time to look.
fn waiting_for_delete_of_t_b(env: &Env) -> std::process::Child {
    let child = env
        .cmd(&["wait", "task/t-b", "--for=delete", "--timeout", "20s"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    child
}

/// The wait ended 0 with kubectl's line for t-b.
fn assert_wait_met(child: std::process::Child) {
    let r: Run = child.wait_with_output().unwrap().into();
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "task.tinyscheduler.io/t-b condition met\n")
    );
}

#[test]
fn wait_for_delete_returns_when_the_object_is_gone() {
    let env = with_tasks();
    let child = waiting_for_delete_of_t_b(&env);
    assert_eq!(env.run(&["delete", "task", "t-b"]).code, 0);
    assert_wait_met(child);
}

#[test]
fn wait_for_delete_returns_when_the_object_is_replaced_by_a_new_one_of_its_name() {
    let env = with_tasks();
    let child = waiting_for_delete_of_t_b(&env);
    // Deleted and created again faster than the watch looks: one rename puts another object
    // (another uid) where t-b was.
    let path = env.state().join("objects/tasks/t-b.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["metadata"]["uid"] = "another-uid".into();
    v["metadata"]["resourceVersion"] = "999999".into();
    let staged = env.state().join("tmp/replacement.json");
    std::fs::write(&staged, serde_json::to_vec(&v).unwrap()).unwrap();
    std::fs::rename(&staged, &path).unwrap();
    assert_wait_met(child);
}

#[test]
fn wait_times_out_with_kubectls_message() {
    let env = with_tasks();
    let r = env.run(&[
        "wait",
        "task/t-a",
        "--for=jsonpath={.status.phase}=Succeeded",
        "--timeout",
        "500ms",
    ]);
    assert_eq!(r.code, 1);
    assert_eq!(
        r.stderr,
        "error: timed out waiting for the condition on tasks/t-a\n"
    );
}

#[test]
fn get_watch_of_a_name_that_is_not_there_ends_with_not_found() {
    let env = with_tasks();
    let mut child = env
        .cmd(&["get", "queue", "ghost", "-w"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("get -w of a missing name kept watching");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(1));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(
        err,
        "Error from server (NotFound): queues \"ghost\" not found\n"
    );
}

#[test]
fn get_watch_prints_a_row_per_change() {
    let env = with_tasks();
    let s = Streaming::spawn(env.cmd(&["get", "agents", "-w"]));
    let t = Duration::from_secs(10);
    assert!(s.line(t).unwrap().starts_with("NAME"));
    assert!(s.line(t).unwrap().starts_with("vaela "));
    std::thread::sleep(Duration::from_millis(200));
    env.apply_ok("new.yaml", &agent("orrin", 3));
    let row = s.line(t).expect("a row for the new agent");
    assert!(row.starts_with("orrin ") && row.contains(" 3 "), "{row}");
    env.apply_ok("v.yaml", &agent("vaela", 7));
    let row = s.line(t).expect("a row for the change");
    assert!(row.starts_with("vaela ") && row.contains(" 7 "), "{row}");
}

#[test]
fn get_watch_with_a_selector_shows_an_object_leave_once_and_not_again_when_deleted() {
    let env = with_tasks();
    let labelled = |team: &str| {
        format!(
            "apiVersion: tinyscheduler.io/v1alpha1\nkind: Agent\nmetadata:\n  name: lab\n  \
             labels:\n    team: {team}\nspec:\n  maxConcurrency: 1\n"
        )
    };
    env.apply_ok("lab.yaml", &labelled("x"));
    let s = Streaming::spawn(env.cmd(&["get", "agents", "-l", "team=x", "-w"]));
    let t = Duration::from_secs(10);
    assert!(s.line(t).unwrap().starts_with("NAME"));
    assert!(s.line(t).unwrap().starts_with("lab "));
    std::thread::sleep(Duration::from_millis(200));
    env.apply_ok("lab.yaml", &labelled("y"));
    let row = s
        .line(t)
        .expect("a last row for the agent that stopped matching");
    assert!(row.starts_with("lab "), "{row}");
    assert_eq!(env.run(&["delete", "agent", "lab"]).code, 0);
    env.apply_ok("other.yaml", &agent("orrin", 3));
    assert_eq!(
        s.line(Duration::from_millis(1500)),
        None,
        "neither the deletion of an agent that no longer matched nor another agent is shown"
    );
    env.apply_ok("lab.yaml", &labelled("x"));
    let row = s.line(t).expect("a row for the agent matching again");
    assert!(row.starts_with("lab "), "{row}");
}

#[test]
fn a_usage_error_exits_1_like_every_other_error_and_help_exits_0() {
    let env = Env::new();
    for args in [
        &["--no-such-flag"][..],
        &["get"],
        &["logs", "x", "--attempt", "-1"],
    ] {
        let r = env.run(args);
        assert_eq!(r.code, 1, "{args:?}: {r:?}");
        assert!(!r.stderr.is_empty(), "{args:?}: the error is on stderr");
    }
    let help = env.run(&["--help"]);
    assert_eq!(help.code, 0, "{help:?}");
    assert!(help.stdout.contains("Usage"), "{help:?}");
}

#[test]
fn completion_into_a_closed_pipe_exits_quietly_as_head_expects() {
    let env = Env::new();
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    let r: Run = env
        .cmd(&["completion", "zsh"])
        .stdout(std::process::Stdio::from(write))
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!r.stderr.contains("panicked"), "{r:?}");
}

/// Runs `args` with stdout a pipe whose reader is gone, as `| head -0` leaves it.
fn into_closed_pipe(env: &Env, args: &[&str]) -> Run {
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    env.cmd(args)
        .stdout(std::process::Stdio::from(write))
        .output()
        .unwrap()
        .into()
}

#[test]
fn a_delete_whose_reader_left_still_deletes_every_object_it_names() {
    let env = Env::new();
    env.apply_ok(
        "t.yaml",
        &format!(
            "{}---\n{}---\n{}---\n{}",
            queue("q"),
            task("a", "q"),
            task("b", "q"),
            task("c", "q")
        ),
    );
    let r = into_closed_pipe(&env, &["delete", "task", "a", "b", "c"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!r.stderr.contains("panicked"), "{r:?}");
    let left = env.run(&["get", "tasks", "-o", "name"]);
    assert_eq!(left.stdout, "", "{left:?}");
    for args in [&["version"][..], &["config"], &["validate-config"]] {
        let r = into_closed_pipe(&env, args);
        assert!(!r.stderr.contains("panicked"), "{args:?}: {r:?}");
    }
}

#[test]
fn output_that_cannot_be_written_is_an_error() {
    let env = Env::new();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let r: Run = env
        .cmd(&["version"])
        .stdout(std::process::Stdio::from(full))
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("error: writing output"), "{r:?}");
}

#[test]
fn completion_bash_prints_a_script_that_completes_subcommands_and_hides_the_shim() {
    let env = Env::new();
    let script = env.run(&["completion", "bash"]);
    assert_eq!(script.code, 0, "{script:?}");
    let f = env.file("complete.bash", &script.stdout);
    // What bash offers after `tinyscheduler <prefix><TAB>`.
    let complete = |prefix: &str| {
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {}; COMP_WORDS=(tinyscheduler {prefix}); COMP_CWORD=1; \
                 _tinyscheduler tinyscheduler {prefix} tinyscheduler; echo \"${{COMPREPLY[@]}}\"",
                f.display()
            ))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    assert_eq!(complete("ge"), "get");
    assert_eq!(complete("s"), "", "the shim commands are not offered");
    let bad = env.run(&["completion", "tcsh"]);
    assert_eq!(bad.code, 1, "{bad:?}");
    assert!(bad.stderr.contains("possible values"), "{bad:?}");
}

#[test]
fn get_with_no_match_prints_an_empty_list_in_json_and_yaml_for_pipes() {
    let env = Env::new();
    env.apply_ok("q.yaml", &queue("default"));
    let json = env.run(&["get", "tasks", "-o", "json"]);
    assert_eq!(json.code, 0, "{json:?}");
    let v: Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["kind"], "List");
    assert_eq!(v["items"], serde_json::json!([]));
    let yaml = env.run(&["get", "queues", "-l", "no=such", "-o", "yaml"]);
    assert_eq!(yaml.code, 0, "{yaml:?}");
    assert!(
        yaml.stdout.contains("kind: List") && yaml.stdout.contains("items: []"),
        "{yaml:?}"
    );
    // A table says so on stderr, and prints nothing to parse.
    let table = env.run(&["get", "tasks"]);
    assert_eq!(
        (table.stdout.as_str(), table.stderr.trim()),
        ("", "No resources found.")
    );
}

#[test]
fn get_and_describe_take_kind_slash_name_and_describe_without_a_name_shows_every_object() {
    let env = Env::new();
    env.apply_ok(
        "m.yaml",
        &format!(
            "{}---\n{}---\n{}",
            queue("default"),
            task("a", "default"),
            task("b", "default")
        ),
    );
    let got = env.run(&["get", "task/b", "tk/a", "-o", "name"]);
    assert_eq!(got.code, 0, "{got:?}");
    assert_eq!(
        got.stdout,
        "task.tinyscheduler.io/b\ntask.tinyscheduler.io/a\n"
    );

    let one = env.run(&["describe", "task/a"]);
    assert_eq!(one.code, 0, "{one:?}");
    assert!(
        one.stdout.starts_with("Name:         a\n"),
        "{}",
        one.stdout
    );

    let all = env.run(&["describe", "tasks"]);
    assert_eq!(all.code, 0, "{all:?}");
    let names: Vec<&str> = all
        .stdout
        .lines()
        .filter(|l| l.starts_with("Name:"))
        .collect();
    assert_eq!(
        names,
        ["Name:         a", "Name:         b"],
        "{}",
        all.stdout
    );

    for bad in [
        &["get", "task/a", "queue/default"][..],
        &["get", "task", "task/a"],
    ] {
        let r = env.run(bad);
        assert_eq!(r.code, 1, "{bad:?}: {r:?}");
        assert!(r.stderr.starts_with("error: "), "{bad:?}: {r:?}");
    }
}

#[test]
fn delete_of_a_torn_object_file_leaves_it_and_says_how_to_remove_it() {
    let env = Env::new();
    env.apply_ok("q.yaml", &queue("default"));
    let torn = env.state().join("objects/tasks/torn.json");
    std::fs::create_dir_all(torn.parent().unwrap()).unwrap();
    std::fs::write(&torn, "{\"apiVersion\": \"tinys").unwrap();
    let r = env.run(&["delete", "task", "torn"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("torn.json: not a valid object"), "{r:?}");
    assert!(r.stderr.contains("move it away by hand"), "{r:?}");
    assert!(torn.exists());
}

#[test]
fn wait_refuses_a_name_no_object_can_have_and_matches_condition_types_in_any_case() {
    let env = with_tasks();
    let r = env.run(&["wait", "tasks/UPPER", "--for=delete", "--timeout", "1s"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.starts_with("error: invalid name \"UPPER\""),
        "{r:?}"
    );

    env.apply_ok("a.yaml", &agent("vaela", 1));
    env.store()
        .patch_status::<tinyscheduler::resources::Agent>("vaela", |a| {
            tinyscheduler::resources::meta::set_condition(
                &mut a.status.conditions,
                "Ready",
                true,
                "Available",
                "",
            );
        })
        .unwrap();
    let lower = env.run(&[
        "wait",
        "agent/vaela",
        "--for=condition=ready",
        "--timeout",
        "5s",
    ]);
    assert_eq!(lower.code, 0, "{lower:?}");

    // A Task has no conditions: waiting for one is refused at once, saying what to wait for.
    let r = env.run(&[
        "wait",
        "task/t-a",
        "--for=condition=Complete",
        "--timeout",
        "60s",
    ]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(
        r.stderr.trim(),
        "error: tasks have no conditions: wait for a phase, e.g. \
         --for=jsonpath='{.status.phase}'=Succeeded"
    );
}

#[test]
fn control_characters_in_values_are_written_out_in_tables_and_descriptions() {
    let env = Env::new();
    // A note that would start a forged row and turn the terminal red; a command argument with a
    // newline and a clear-screen sequence.
    env.apply_ok(
        "esc.yaml",
        &format!(
            "{}---\n{API}\nkind: Agent\nmetadata:\n  name: esc\n  annotations:\n    note: \"red\\e[31mRED\\e[0m\\nFAKE-LINE   x\"\nspec:\n  queue: default\n  command: [\"sh\", \"-c\", \"echo\\nNAME ROW\\e[2J\"]\n",
            queue("default")
        ),
    );
    let wide = env.run(&["get", "ag", "-o", "wide"]);
    assert_eq!(wide.code, 0, "{wide:?}");
    assert_eq!(wide.stdout.lines().count(), 2, "{}", wide.stdout);
    assert!(!wide.stdout.contains('\u{1b}'), "{:?}", wide.stdout);
    assert!(
        wide.stdout.contains(r"'echo\nNAME ROW\u{1b}[2J'"),
        "{}",
        wide.stdout
    );
    let described = env.run(&["describe", "agent", "esc"]);
    assert_eq!(described.code, 0, "{described:?}");
    assert!(
        !described.stdout.contains('\u{1b}'),
        "{:?}",
        described.stdout
    );
    assert!(
        described
            .stdout
            .contains(r"note=red\u{1b}[31mRED\u{1b}[0m\nFAKE-LINE   x"),
        "{}",
        described.stdout
    );
    assert!(
        !described.stdout.lines().any(|l| l.starts_with("FAKE-LINE")),
        "{}",
        described.stdout
    );
    // JSON keeps the value as it is.
    let json = env.run(&["get", "ag", "esc", "-o", "json"]);
    let v: Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(
        v["metadata"]["annotations"]["note"],
        "red\u{1b}[31mRED\u{1b}[0m\nFAKE-LINE   x"
    );
}
