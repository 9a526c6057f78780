//! `tinyscheduler validate-config [--fix]` on a good and a broken setup, driving the binary
//! (tinytask reachability against the fake server on 127.0.0.1).

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::tinytask_server::TinytaskServer;
use tinyscheduler::resources::{Agent, AgentSpec, Queue, QueueSource, QueueSpec};
use tinyscheduler::store::Store;

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

async fn run(mut c: Command) -> Output {
    tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap()
}

fn executable(path: &Path) {
    std::fs::write(path, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn agent(name: &str, command: &[&str], working_dir: &Path) -> Agent {
    Agent::new(
        "Agent",
        name,
        AgentSpec {
            command: command.iter().map(|s| s.to_string()).collect(),
            working_dir: Some(working_dir.display().to_string()),
            ..AgentSpec::default()
        },
    )
}

fn tinytask_queue(name: &str, endpoint: &str) -> Queue {
    Queue::new(
        "Queue",
        name,
        QueueSpec {
            source: QueueSource::Tinytask,
            endpoint: Some(endpoint.to_string()),
            ..QueueSpec::default()
        },
    )
}

/// A base directory with a state dir (+ logs), a recipes dir and a fake goose.
fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_path_buf();
    let state = base.join("state");
    std::fs::create_dir_all(state.join("logs")).unwrap();
    std::fs::create_dir_all(base.join("recipes")).unwrap();
    let goose = base.join("goose");
    executable(&goose);
    (dir, state, goose)
}

fn lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_setup_passes_every_check() {
    let server = TinytaskServer::start().await;
    let (dir, state, goose) = setup();
    let base = dir.path();
    std::fs::write(base.join("recipes/vaela.yaml"), "title: vaela\n").unwrap();
    std::fs::write(base.join("recipes/special.yaml"), "title: special\n").unwrap();
    let store = Store::open(&state).unwrap();
    store.create(&agent("vaela", &[], base)).unwrap();
    store
        .create(&agent(
            "damien",
            &[
                goose.to_str().unwrap(),
                "run",
                "--recipe",
                "recipes/special.yaml",
            ],
            base,
        ))
        .unwrap();
    store
        .create(&agent("scripted", &["sh", "-c", "true"], base))
        .unwrap();
    store.create(&tinytask_queue("dev", &server.url())).unwrap();

    let mut c = cmd(base);
    c.arg("validate-config")
        .env("TINYSCHEDULER_BASE_PATH", base)
        .env("TINYSCHEDULER_GOOSE_BIN", &goose);
    let out = run(c).await;
    let l = lines(&out);
    assert!(
        out.status.success(),
        "{l:#?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(l.iter().all(|x| x.starts_with("[+] ")), "{l:#?}");
    assert!(
        l.iter()
            .any(|x| x.contains("agent vaela: recipe recipes/vaela.yaml ok")),
        "{l:#?}"
    );
    assert!(
        l.iter()
            .any(|x| x.contains(&format!("tinytask {} reachable", server.url()))),
        "{l:#?}"
    );
    assert!(server.requests().iter().any(|r| r.path == "/health"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_setup_reports_each_failure_and_exits_1() {
    let mut server = TinytaskServer::start().await;
    let down = server.url();
    server.stop().await;
    let (dir, state, goose) = setup();
    let base = dir.path();
    // A log directory that is missing is made by the first run; a file in its place is not.
    std::fs::remove_dir(state.join("logs")).unwrap();
    std::fs::write(state.join("logs"), "not a directory\n").unwrap();
    std::fs::write(base.join("escape.yaml"), "outside\n").unwrap();
    std::fs::write(base.join("not-executable"), "data\n").unwrap();
    let store = Store::open(&state).unwrap();
    store.create(&agent("vaela", &[], base)).unwrap(); // recipes/vaela.yaml missing
    store
        .create(&agent("ghost", &["no-such-program-xyz"], base))
        .unwrap();
    store
        .create(&agent("plain", &["./not-executable"], base))
        .unwrap();
    store
        .create(&agent(
            "sneaky",
            &[
                goose.to_str().unwrap(),
                "run",
                "--recipe",
                "recipes/../escape.yaml",
            ],
            base,
        ))
        .unwrap();
    let outside = base.join("escape.yaml");
    store
        .create(&agent(
            "absolute",
            &[
                goose.to_str().unwrap(),
                "run",
                "--recipe",
                outside.to_str().unwrap(),
            ],
            base,
        ))
        .unwrap();
    store.create(&tinytask_queue("dev", &down)).unwrap();

    let mut c = cmd(base);
    c.arg("validate-config")
        .env("TINYSCHEDULER_BASE_PATH", base)
        .env("TINYSCHEDULER_GOOSE_BIN", &goose);
    let out = run(c).await;
    assert_eq!(out.status.code(), Some(1));
    let l = lines(&out);
    let failed = |needle: &str| {
        assert!(
            l.iter()
                .any(|x| x.starts_with("[-] ") && x.contains(needle)),
            "no failure containing {needle:?} in {l:#?}"
        )
    };
    failed("log directory");
    failed("agent vaela: recipe recipes/vaela.yaml failed");
    failed("agent ghost: program failed: \"no-such-program-xyz\" not found in PATH");
    failed("not an executable file");
    failed("agent sneaky: recipe recipes/../escape.yaml failed: contains `..`");
    failed("is outside the recipes directory");
    failed(&format!("tinytask {down} reachable failed"));
    assert!(
        l.iter().any(|x| x.starts_with("[+] state directory")),
        "{l:#?}"
    );

    // --fix creates the missing log directory (0700) and nothing else.
    std::fs::remove_file(state.join("logs")).unwrap();
    let mut c = cmd(base);
    c.args(["validate-config", "--fix"])
        .env("TINYSCHEDULER_BASE_PATH", base)
        .env("TINYSCHEDULER_GOOSE_BIN", &goose);
    let out = run(c).await;
    assert_eq!(out.status.code(), Some(1), "the other failures remain");
    let logs = std::fs::metadata(state.join("logs")).unwrap();
    assert_eq!(logs.permissions().mode() & 0o777, 0o700);
    assert!(lines(&out)
        .iter()
        .any(|x| x.contains("created (mode 0700)")));
    assert!(!base.join("recipes/vaela.yaml").exists());
}

#[test]
fn validate_config_without_tinytask_queues_does_not_contact_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let out = cmd(dir.path())
        .args(["validate-config", "--fix"])
        .env("TINYSCHEDULER_MCP_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap();
    let l = lines(&out);
    assert!(out.status.success(), "{l:#?}");
    assert!(
        l.iter().any(|x| x.contains("reachability not checked")),
        "{l:#?}"
    );
    let state = std::fs::metadata(dir.path().join("state")).unwrap();
    assert_eq!(state.permissions().mode() & 0o777, 0o700);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn programs_are_looked_for_where_and_as_the_shim_runs_them() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    // A store applied to but never run: no log directory yet.
    let state = base.join("state");
    let store = Store::open(&state).unwrap();
    std::fs::remove_dir_all(state.join("logs")).ok();
    std::fs::create_dir_all(base.join("wd")).unwrap();
    executable(&base.join("wd/run.sh"));
    std::fs::create_dir_all(base.join("bin")).unwrap();
    executable(&base.join("bin/own-tool"));
    // A relative workingDir is taken from the state directory's parent, not from where the
    // command runs; a bare name is looked up in the agent's own PATH.
    let mut rel = agent("rel", &["./run.sh"], Path::new("wd"));
    rel.spec.working_dir = Some("wd".into());
    store.create(&rel).unwrap();
    let mut own = agent("own", &["own-tool"], base);
    own.spec
        .env
        .insert("PATH".into(), base.join("bin").display().to_string());
    store.create(&own).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let mut c = cmd(elsewhere.path());
    c.arg("validate-config")
        .arg("--state-dir")
        .arg(&state)
        .env("TINYSCHEDULER_RECIPES_DIR", base);
    let out = run(c).await;
    let l = lines(&out);
    assert!(out.status.success(), "{l:#?}");
    assert!(
        l.iter()
            .any(|x| x.contains("agent rel: program ./run.sh found at")
                && x.contains("/wd/./run.sh")),
        "{l:#?}"
    );
    assert!(
        l.iter()
            .any(|x| x.contains("agent own: program own-tool found at")),
        "{l:#?}"
    );
    assert!(
        l.iter()
            .any(|x| x.contains("log directory") && x.contains("the first run creates it")),
        "{l:#?}"
    );

    // A workingDir that does not exist fails the check, naming it.
    let mut gone = agent("gone", &["sh"], base);
    gone.spec.working_dir = Some("missing".into());
    store.create(&gone).unwrap();
    let mut c = cmd(elsewhere.path());
    c.arg("validate-config").arg("--state-dir").arg(&state);
    let out = run(c).await;
    assert_eq!(out.status.code(), Some(1));
    let l = lines(&out);
    assert!(
        l.iter()
            .any(|x| x.starts_with("[-] agent gone: workingDir") && x.contains("missing")),
        "{l:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_era_control_file_is_checked_as_run_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let mut c = cmd(base);
    c.args(["validate-config", "--state-dir"])
        .arg(base.join("state"))
        .env(
            "TINYSCHEDULER_AGENT_CONTROL_FILE",
            base.join("missing.json"),
        );
    let out = run(c).await;
    assert_eq!(out.status.code(), Some(1));
    let l = lines(&out);
    assert!(
        l.iter().any(
            |x| x.starts_with("[-] agent-control settings failed: cannot read")
                && x.contains("missing.json")
        ),
        "{l:#?}"
    );
    std::fs::write(base.join("ac.json"), r#"["vaela"]"#).unwrap();
    let mut c = cmd(base);
    c.args(["validate-config", "--state-dir"])
        .arg(base.join("state"))
        .env("TINYSCHEDULER_AGENT_CONTROL_FILE", base.join("ac.json"));
    let out = run(c).await;
    let l = lines(&out);
    assert!(
        l.iter()
            .any(|x| x.starts_with("[+] agent-control settings ok")),
        "{l:#?}"
    );
}
