//! `tinyscheduler import`: manifests from a Python-era agent-control.json, driving the binary.

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use tinyscheduler::resources::registry::{admit, Kind};

fn cmd(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tinyscheduler"));
    c.current_dir(dir);
    for (k, _) in std::env::vars() {
        if k.starts_with("TINYSCHEDULER_") {
            c.env_remove(k);
        }
    }
    c
}

/// Decodes multi-document YAML and admits every document as `apply` would.
fn admitted(yaml: &str) -> Vec<Value> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).expect("valid YAML");
    docs.iter()
        .map(|d| {
            let kind = Kind::from_kind_field(d["kind"].as_str().unwrap()).unwrap();
            admit(kind, d).unwrap_or_else(|e| panic!("{d}: {e:?}"))
        })
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} in {docs:?}"))
}

#[test]
fn a_python_agent_control_list_with_limits_becomes_admissible_agents_and_tinytask_queues() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("agent-control.json"),
        r#"[{"agentName": "vaela", "agentType": "dev"},
            {"agentName": "damien", "agentType": "dev", "comment": "ignored"},
            {"agentName": "oscar", "agentType": "QA_Team"}]"#,
    )
    .unwrap();
    let out = cmd(dir.path())
        .args(["import", "--agent-control", "agent-control.json"])
        .args(["--limits", r#"{"vaela": 3, "dispatcher": 1}"#])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs = admitted(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(docs.len(), 6, "2 queues + 4 agents");
    assert_eq!(find(&docs, "Queue", "dev")["spec"]["source"], "tinytask");
    assert_eq!(
        find(&docs, "Queue", "qa-team")["spec"]["remoteQueue"],
        "QA_Team"
    );
    let vaela = find(&docs, "Agent", "vaela");
    assert_eq!(vaela["spec"]["maxConcurrency"], 3);
    assert_eq!(vaela["spec"]["queue"], "dev");
    assert!(vaela["spec"].get("command").is_none(), "Goose default");
    assert_eq!(find(&docs, "Agent", "oscar")["spec"]["queue"], "qa-team");
    assert!(find(&docs, "Agent", "dispatcher")["spec"]
        .get("queue")
        .is_none());
}

#[test]
fn an_agents_map_with_recipes_and_disabled_agents_is_written_one_file_per_object() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ac.json"),
        r#"{"agents": {
             "vaela": {"enabled": true, "queue": "dev", "recipe": "recipes/dev-special.yaml", "future": [1]},
             "sage": {"enabled": false, "queue": "product"}
           }}"#,
    )
    .unwrap();
    let out = cmd(dir.path())
        .args(["import", "--agent-control", "ac.json", "-o", "manifests"])
        .env("TINYSCHEDULER_GOOSE_BIN", "/opt/goose")
        .env("TINYSCHEDULER_BASE_PATH", "/srv/calypso")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("agent.tinyscheduler.io/vaela written to manifests/agent-vaela.yaml"));
    let mut docs = Vec::new();
    for e in std::fs::read_dir(dir.path().join("manifests")).unwrap() {
        docs.extend(admitted(
            &std::fs::read_to_string(e.unwrap().path()).unwrap(),
        ));
    }
    assert_eq!(docs.len(), 4);
    let vaela = find(&docs, "Agent", "vaela");
    assert_eq!(vaela["spec"]["command"][0], "/opt/goose");
    assert_eq!(vaela["spec"]["command"][3], "recipes/dev-special.yaml");
    assert_eq!(vaela["spec"]["workingDir"], "/srv/calypso");
    assert_eq!(find(&docs, "Agent", "sage")["spec"]["paused"], true);
}

#[test]
fn an_unusable_field_is_an_error_naming_the_file_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ac.json"),
        r#"{"agents": {"vaela": {"queue": ["dev"]}}}"#,
    )
    .unwrap();
    let out = cmd(dir.path())
        .args(["import", "--agent-control", "ac.json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: ac.json: agents.vaela.queue: expected a string, got a list"
    );
    std::fs::write(
        dir.path().join("bad.json"),
        r#"[{"agentName": "Not_Valid"}]"#,
    )
    .unwrap();
    let out = cmd(dir.path())
        .args(["import", "--agent-control", "bad.json"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("[0]: \"Not_Valid\" is not a valid agent name"));
    assert!(out.stdout.is_empty(), "nothing written on error");
}

#[test]
fn the_control_file_and_limits_default_to_the_python_era_variables() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("docs/technical")).unwrap();
    std::fs::write(
        dir.path().join("docs/technical/agent-control.json"),
        r#"["vaela"]"#,
    )
    .unwrap();
    let out = cmd(dir.path())
        .arg("import")
        .env("TINYSCHEDULER_BASE_PATH", dir.path())
        .env(
            "TINYSCHEDULER_AGENT_CONTROL_FILE",
            "docs/technical/agent-control.json",
        )
        .env("TINYSCHEDULER_AGENT_LIMITS", "vaela:2")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs = admitted(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(find(&docs, "Agent", "vaela")["spec"]["maxConcurrency"], 2);
}

#[test]
fn an_output_directory_is_written_whole_or_not_at_all_and_never_through_a_symlink() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ac.json"),
        r#"{"agents": {"vaela": {"queue": "dev"}, "sage": {"queue": "dev"}}}"#,
    )
    .unwrap();
    let import = |extra: &[&str]| {
        cmd(dir.path())
            .args(["import", "--agent-control", "ac.json", "-o", "out"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    // One target is a directory, one a symlink to a file of the user's: both refused, and
    // nothing written, not even the targets that were fine.
    std::fs::create_dir(out.join("agent-vaela.yaml")).unwrap();
    std::fs::write(dir.path().join("precious"), "mine\n").unwrap();
    std::os::unix::fs::symlink("../precious", out.join("queue-dev.yaml")).unwrap();
    let r = import(&[]);
    assert_eq!(r.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(
        stderr.contains("out/agent-vaela.yaml exists and is not a regular file"),
        "{stderr}"
    );
    assert!(
        stderr.contains("out/queue-dev.yaml exists and is not a regular file"),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was written"), "{stderr}");
    assert!(!out.join("agent-sage.yaml").exists());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("precious")).unwrap(),
        "mine\n"
    );

    // Cleared, it writes all three; again, the same files are fine.
    std::fs::remove_dir(out.join("agent-vaela.yaml")).unwrap();
    std::fs::remove_file(out.join("queue-dev.yaml")).unwrap();
    assert!(import(&[]).status.success());
    let r = import(&[]);
    assert!(r.status.success(), "{r:?}");
    // A hand edit is not lost unless asked.
    let sage = out.join("agent-sage.yaml");
    let edited = std::fs::read_to_string(&sage).unwrap() + "# edited\n";
    std::fs::write(&sage, &edited).unwrap();
    let r = import(&[]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr)
        .contains("out/agent-sage.yaml exists and says something else (--overwrite replaces it)"));
    assert_eq!(std::fs::read_to_string(&sage).unwrap(), edited);
    assert!(import(&["--overwrite"]).status.success());
    assert!(!std::fs::read_to_string(&sage).unwrap().contains("# edited"));
}

#[test]
fn a_long_remote_queue_name_is_cut_to_a_valid_name_and_a_repeated_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let remote = format!("{}_b", "a".repeat(249));
    std::fs::write(
        dir.path().join("ac.json"),
        format!(r#"{{"agents": {{"x": {{"queue": "{remote}"}}}}}}"#),
    )
    .unwrap();
    let out = cmd(dir.path())
        .args(["import", "--agent-control", "ac.json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let docs = admitted(&String::from_utf8_lossy(&out.stdout));
    assert!(docs
        .iter()
        .any(|d| d["kind"] == "Queue" && d["metadata"]["name"] == "a".repeat(249)));

    std::fs::write(
        dir.path().join("dup.json"),
        r#"{"agents": {"a1": {}, "a1": {"queue": "z"}}}"#,
    )
    .unwrap();
    let out = cmd(dir.path())
        .args(["import", "--agent-control", "dup.json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(
        "dup.json: invalid JSON: duplicate key \"a1\": a key may appear once in an object"
    ));
}
