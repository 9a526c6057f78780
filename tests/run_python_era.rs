//! A Python-era installation swapped to this binary keeps working: `run` turns the agent-control
//! file and limits from the environment into Agents and Queues.

mod support;

use support::*;
use tinyscheduler::resources::{Agent, Queue};

fn python_env(env: &Env, args: &[&str]) -> Run {
    let control = env.file(
        "agent-control.json",
        r#"[{"agentName": "vaela", "agentType": "dev"}]"#,
    );
    env.cmd(args)
        .env("TINYSCHEDULER_AGENT_CONTROL_FILE", control)
        .env("TINYSCHEDULER_AGENT_LIMITS", "vaela:2,oscar:1")
        // The imported queue is a tinytask queue; nothing listens on this port.
        .env("TINYSCHEDULER_MCP_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .expect("run")
        .into()
}

#[test]
fn run_creates_the_agents_and_queues_the_python_environment_describes() {
    let env = Env::new();
    python_env(&env, &["run", "--once"]);
    let store = env.store();
    let vaela = store.get::<Agent>("vaela").expect("vaela imported");
    assert_eq!(vaela.spec.max_concurrency, 2);
    assert_eq!(vaela.spec.queue.as_deref(), Some("dev"));
    assert!(vaela.spec.command.is_empty(), "the Goose default is used");
    assert_eq!(
        store
            .get::<Agent>("oscar")
            .expect("oscar from the limits")
            .spec
            .max_concurrency,
        1
    );
    assert!(store.get::<Queue>("dev").is_ok());
}

#[test]
fn a_second_run_leaves_imported_objects_unchanged_and_user_objects_alone() {
    let env = Env::new();
    env.apply_ok("mine.yaml", &agent("oscar", 7));
    python_env(&env, &["run", "--once"]);
    let store = env.store();
    let first = store.get::<Agent>("vaela").unwrap();
    assert_eq!(
        store.get::<Agent>("oscar").unwrap().spec.max_concurrency,
        7,
        "user-owned"
    );
    python_env(&env, &["run", "--once"]);
    let second = store.get::<Agent>("vaela").unwrap();
    assert_eq!(
        first.metadata.resource_version,
        second.metadata.resource_version
    );
}

#[test]
fn a_dry_run_imports_nothing() {
    let env = Env::new();
    let out = python_env(&env, &["run", "--once", "--dry-run"]);
    assert!(!env.state().exists(), "{}", out.stderr);
}
