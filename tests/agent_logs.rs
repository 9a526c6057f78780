//! `tinyscheduler logs`, through the real binary.

#[path = "support/agent_fixtures.rs"]
mod support;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn logs(state: &std::path::Path, args: &[&str]) -> Output {
    Command::new(bin())
        .arg("--state-dir")
        .arg(state)
        .arg("logs")
        .args(args)
        .output()
        .unwrap()
}

fn write_log(s: &State, task: &str, attempt: u32, text: &str) {
    let dir = s.path().join("logs").join(task);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{attempt}.log")), text).unwrap();
}

#[test]
fn logs_prints_the_latest_attempt_by_default_in_numeric_order() {
    let s = State::new();
    write_log(&s, "t", 1, "first\n");
    write_log(&s, "t", 2, "second\n");
    write_log(&s, "t", 10, "tenth\n");
    let out = logs(&s.path(), &["t"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "tenth\n");
}

#[test]
fn logs_takes_the_task_in_kind_slash_name_form_too() {
    let s = State::new();
    write_log(&s, "t", 1, "first\n");
    for arg in ["task/t", "tk/t", "tasks/t"] {
        let out = logs(&s.path(), &[arg]);
        assert!(out.status.success(), "{arg}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "first\n", "{arg}");
    }
    let out = logs(&s.path(), &["agent/t"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: logs are a task's: got \"agent/t\"\n"
    );
}

#[test]
fn logs_prints_the_attempt_asked_for() {
    let s = State::new();
    write_log(&s, "t", 1, "first\n");
    write_log(&s, "t", 2, "second\n");
    let out = logs(&s.path(), &["t", "--attempt", "1"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "first\n");
    let out = logs(&s.path(), &["t", "--attempt", "7"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: no logs for attempt 7 of task \"t\"\n"
    );
}

#[test]
fn logs_of_a_task_that_does_not_exist_say_so_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    for args in [&["x"][..], &["x", "-f"]] {
        let out = logs(&state, args);
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            "Error from server (NotFound): tasks \"x\" not found\n"
        );
    }
    assert!(!state.exists());
}

#[test]
fn logs_of_a_task_that_has_not_run_say_so_and_follow_waits_for_its_first_run() {
    let s = State::new();
    s.task("t", &[]);
    let out = logs(&s.path(), &["t"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: task \"t\" has no logs: it has not run (phase Pending)\n"
    );

    let mut follower = Command::new(bin())
        .arg("--state-dir")
        .arg(s.path())
        .args(["logs", "t", "-f"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let early = follower.try_wait().unwrap();
    if early.is_some() {
        panic!("logs -f ended before the task ran: {early:?}");
    }
    // The run's log appears whole (renamed into place), and with no Lease the run is over once
    // it is printed.
    let dir = s.path().join("logs/t");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("partial"), "hello from the first run\n").unwrap();
    std::fs::rename(dir.join("partial"), dir.join("1.log")).unwrap();
    let out = follower.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the first run\n"
    );
}

#[test]
fn a_task_name_that_is_a_path_is_refused() {
    let s = State::new();
    let out = logs(&s.path(), &["../etc"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: invalid task name"));
}

#[test]
fn logs_follow_prints_output_as_it_arrives_and_stops_when_the_run_is_recorded() {
    let s = State::new();
    let go = s.dir.path().join("go");
    let cmd = format!(
        "echo one; while [ ! -e {} ] && [ -d {} ]; do sleep 0.05; done; echo two",
        go.display(),
        s.dir.path().display()
    );
    s.run_of("follow", &["sh", "-c", &cmd]);
    let mut shim = s.shim_cmd("follow").spawn().unwrap();
    wait_for("the first line", LONG, || {
        s.log("follow", 1).contains("one")
    });
    let mut follower = Command::new(bin())
        .arg("--state-dir")
        .arg(s.path())
        .args(["logs", "follow", "-f"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        follower.try_wait().unwrap().is_none(),
        "-f ended while the run was live"
    );
    std::fs::write(&go, "").unwrap();
    assert!(shim.wait().unwrap().success());
    let deadline = Instant::now() + LONG;
    while follower.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "logs -f did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = follower.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "one\ntwo\n[tinyscheduler] exited with code 0\n"
    );
}
