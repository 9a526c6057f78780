//! The shim, driven through the real binary against a temporary state directory.

#[path = "support/agent_fixtures.rs"]
mod support;

use std::time::Duration;

use support::*;
use tinyscheduler::resources::LeasePhase;

#[test]
fn the_shim_records_exit_code_zero_and_the_log_of_a_successful_run() {
    let s = State::new();
    s.run_of(
        "ok",
        &["sh", "-c", "echo hello {{task.name}}; echo err >&2"],
    );
    let out = s.shim("ok");
    assert!(out.status.success(), "{out:?}");
    let l = s.get_lease("ok").unwrap();
    assert_eq!(l.status.phase, LeasePhase::Completed);
    assert_eq!(l.status.exit_code, Some(0));
    assert_eq!(l.status.signal, None);
    assert!(l.status.finish_time.is_some());
    assert!(l.status.pid.is_some() && l.status.process_start_time.is_some());
    assert_eq!(l.status.pgid, l.status.pid);
    assert!(l.status.shim_pid.is_some() && l.status.shim_start_time.is_some());
    assert!(l.status.acquire_time.is_some() && l.status.renew_time.is_some());
    assert!(l.status.host.is_some());
    let log_path = s.path().join("logs/ok/1.log");
    assert_eq!(
        l.status.log_path.as_deref(),
        Some(log_path.to_str().unwrap())
    );
    assert_eq!(
        s.log("ok", 1),
        "hello ok\nerr\n[tinyscheduler] exited with code 0\n"
    );
}
