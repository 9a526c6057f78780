//! The shim, driven through the real binary against a temporary state directory.

#[path = "support/agent_fixtures.rs"]
mod support;

use std::os::unix::process::CommandExt;
use std::time::Duration;

use support::*;
use tinyscheduler::resources::{LeasePhase, Resource};

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
    // Judged against durations of a few seconds: kept to the microsecond, as Kubernetes does.
    for time in [&l.status.renew_time, &l.status.acquire_time] {
        let time = time.as_deref().unwrap();
        let (_, fraction) = time.split_once('.').expect("a fraction of a second");
        assert_eq!(fraction.len(), "123456Z".len(), "{time}");
        assert!(tinyscheduler::resources::meta::parse_time(time).is_some());
    }
    assert!(l.status.host.is_some());
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(
        l.status.boot_id.as_deref(),
        Some(boot.trim()),
        "the pids' boot"
    );
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

#[test]
fn the_shim_records_a_nonzero_exit_code() {
    let s = State::new();
    s.run_of("three", &["sh", "-c", "exit 3"]);
    assert!(s.shim("three").status.success());
    let l = s.get_lease("three").unwrap();
    assert_eq!(l.status.phase, LeasePhase::Completed);
    assert_eq!(l.status.exit_code, Some(3));
    assert!(s
        .log("three", 1)
        .ends_with("[tinyscheduler] exited with code 3\n"));
}

#[test]
fn the_shim_records_the_signal_that_ended_the_agent() {
    let s = State::new();
    s.run_of("sig", &["sh", "-c", "kill -USR1 $$"]);
    assert!(s.shim("sig").status.success());
    let l = s.get_lease("sig").unwrap();
    assert_eq!(l.status.phase, LeasePhase::Completed);
    assert_eq!(l.status.exit_code, None);
    assert_eq!(l.status.signal, Some(10));
    assert!(
        s.log("sig", 1)
            .ends_with("[tinyscheduler] exited with signal 10 (SIGUSR1)\n"),
        "{}",
        s.log("sig", 1)
    );
}

/// Runs the shim of `lease` to its end with `TINYSCHEDULER_QUICK_EXIT_MS=ms`; the Lease it left.
fn shim_with_quick_exit(s: &State, lease: &str, ms: &str) -> tinyscheduler::resources::Lease {
    let out = s
        .shim_cmd(lease)
        .env(tinyscheduler::agent::shim::QUICK_EXIT_ENV, ms)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    s.get_lease(lease).unwrap()
}

#[test]
fn a_run_that_ends_before_the_quick_exit_wait_is_recorded_with_one_write_of_its_lease() {
    let s = State::new();
    let pending = s.run_of("quick", &["true"]);
    let l = shim_with_quick_exit(&s, "quick", "60000");
    assert_eq!(l.status.phase, LeasePhase::Completed);
    assert_eq!(l.status.exit_code, Some(0));
    assert_eq!(
        l.revision(),
        pending.revision() + 1,
        "Pending straight to Completed"
    );
    // The one write says everything the Running record would have said.
    assert!(l.status.pid.is_some() && l.status.process_start_time.is_some());
    assert_eq!(l.status.pgid, l.status.pid);
    assert!(l.status.shim_pid.is_some() && l.status.shim_start_time.is_some());
    assert!(l.status.acquire_time.is_some() && l.status.renew_time.is_some());
    assert!(l.status.host.is_some() && l.status.log_path.is_some());
}

#[test]
fn a_run_still_going_after_the_quick_exit_wait_is_recorded_running_then_completed() {
    let s = State::new();
    let pending = s.run_of("slow", &["sleep", "0.3"]);
    let l = shim_with_quick_exit(&s, "slow", "0");
    assert_eq!(l.status.phase, LeasePhase::Completed);
    assert_eq!(
        l.revision(),
        pending.revision() + 2,
        "Running, then Completed"
    );
}

#[test]
fn the_agent_starts_in_its_own_group_with_default_signals_and_an_empty_mask() {
    let s = State::new();
    // The agent's own status as it starts (`exec`: the same process, no shell in between).
    s.run_of("sigs", &["sh", "-c", "exec cat /proc/self/status"]);
    // A shim that inherits blocked or ignored signals must not hand them on.
    let mut shim = s.shim_cmd("sigs");
    // SAFETY: only sigprocmask and signal run between fork and exec.
    unsafe {
        shim.pre_exec(|| {
            let mut mask = nix::sys::signal::SigSet::empty();
            mask.add(nix::sys::signal::Signal::SIGUSR1);
            for sig in [
                nix::sys::signal::Signal::SIGQUIT,
                nix::sys::signal::Signal::SIGINT,
                nix::sys::signal::Signal::SIGUSR2,
            ] {
                nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigIgn)
                    .map_err(std::io::Error::from)?;
            }
            mask.thread_block().map_err(std::io::Error::from)
        });
    }
    assert!(shim.output().unwrap().status.success());
    let log = s.log("sigs", 1);
    let text = |name: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("{name} in {log}"))
    };
    let field = |name: &str| u64::from_str_radix(&text(name), 16).unwrap();
    let ignored = field("SigIgn:");
    // SIGHUP is 1, SIGPIPE 13: bit n-1. The shim ignores both; its agent must not.
    assert_eq!(ignored & (1 << 0), 0, "SIGHUP ignored in the agent: {log}");
    assert_eq!(
        ignored & (1 << 12),
        0,
        "SIGPIPE ignored in the agent: {log}"
    );
    // SIGINT 2, SIGQUIT 3, SIGUSR2 12: ignored by whoever started the shim, not by the agent.
    // (Of the standard signals 1-31; the C library keeps two real-time ones for itself.)
    assert_eq!(
        ignored & 0x7fff_ffff,
        0,
        "signals ignored in the agent: {log}"
    );
    assert_eq!(field("SigBlk:"), 0, "signals blocked in the agent: {log}");
    let (pgrp, pid) = (text("NSpgid:"), text("Pid:"));
    assert_eq!(pgrp, pid, "the agent leads its own group: {log}");
    let l = s.get_lease("sigs").unwrap();
    assert_eq!(l.status.pgid.map(|g| g.to_string()), Some(pgrp));
}

#[test]
fn the_agent_gets_no_descriptor_but_stdin_stdout_and_stderr() {
    let s = State::new();
    // The agent lists its own descriptors (`exec`: no shell in between).
    s.run_of("fds", &["sh", "-c", "exec ls /proc/self/fd"]);
    let held = std::fs::File::create(s.path().join("held")).unwrap();
    let mut shim = s.shim_cmd("fds");
    let raw = std::os::fd::AsRawFd::as_raw_fd(&held);
    // SAFETY: only dup2 runs between fork and exec. Descriptor 7 is inherited without
    // close-on-exec, as a cron job's `flock 7>lock` would hand it on.
    unsafe {
        shim.pre_exec(move || {
            if nix::libc::dup2(raw, 7) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    assert!(shim.output().unwrap().status.success());
    let log = s.log("fds", 1);
    let mut fds: Vec<&str> = log
        .lines()
        .filter(|l| !l.starts_with("[tinyscheduler]"))
        .collect();
    fds.sort_unstable();
    // `ls` opens one descriptor of its own to read the directory.
    assert_eq!(fds.len(), 4, "{log}");
    assert_eq!(&fds[..3], ["0", "1", "2"], "{log}");
    assert_ne!(
        fds[3], "7",
        "an inherited descriptor reached the agent: {log}"
    );
}

#[test]
fn the_agent_gets_exactly_the_documented_environment() {
    let s = State::new();
    let mut spec = tinyscheduler::resources::AgentSpec {
        command: vec!["env".into()],
        ..Default::default()
    };
    spec.env.insert("EXTRA".into(), "from agent".into());
    spec.env
        .insert("TINYSCHEDULER_AGENT".into(), "overridden".into());
    s.agent_with("envy", spec);
    s.task(
        "envy",
        &[
            ("branch", serde_json::json!("feature/x y")),
            ("max-steps", serde_json::json!(7)),
            ("dry.run", serde_json::json!(true)),
        ],
    );
    s.lease("envy", "envy", 2);
    let out = s
        .shim_cmd("envy")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", "/home/nobody-in-particular")
        .env("SECRET_OF_THE_SCHEDULER", "leak")
        .env("LANG", "C.UTF-8")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let log = s.log("envy", 2);
    let mut lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.pop(), Some("[tinyscheduler] exited with code 0"));
    lines.sort_unstable();
    assert_eq!(
        lines,
        vec![
            "EXTRA=from agent",
            "HOME=/home/nobody-in-particular",
            "PATH=/usr/bin:/bin",
            "TINYSCHEDULER_AGENT=overridden",
            "TINYSCHEDULER_ATTEMPT=2",
            "TINYSCHEDULER_LEASE=envy",
            "TINYSCHEDULER_PARAM_BRANCH=feature/x y",
            "TINYSCHEDULER_PARAM_DRY_RUN=true",
            "TINYSCHEDULER_PARAM_MAX_STEPS=7",
            "TINYSCHEDULER_TASK=envy",
        ]
    );
}

#[test]
fn the_program_is_found_in_the_path_the_agent_gets_not_the_schedulers() {
    let s = State::new();
    let dir = s.path().parent().unwrap().to_path_buf();
    for (sub, says) in [("schedbin", "scheduler"), ("agentbin", "agent")] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        script(&dir.join(sub), "mytool", &format!("echo {says}"));
    }
    let agent_path = format!("{}:/usr/bin:/bin", dir.join("agentbin").display());
    let mut spec = tinyscheduler::resources::AgentSpec {
        command: vec!["mytool".into()],
        ..Default::default()
    };
    spec.env.insert("PATH".into(), agent_path);
    s.agent_with("tool", spec);
    s.task("tool", &[]);
    s.lease("tool", "tool", 1);
    let out = s
        .shim_cmd("tool")
        .env(
            "PATH",
            format!("{}:/usr/bin:/bin", dir.join("schedbin").display()),
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(s.log("tool", 1).lines().next(), Some("agent"));
}

#[test]
fn the_shim_renews_as_often_as_its_leases_duration_needs_whatever_the_agent_says_now() {
    let s = State::new();
    // The Agent's heartbeat was raised to a minute after the Lease was made for a 1 s one (a
    // 3 s duration): renewing every minute would let the Lease expire.
    s.agent("slow-beat", &["sleep", "4"], 60);
    s.task("slow-beat", &[]);
    s.lease_lasting("slow-beat", "slow-beat", 1, 3);
    let mut shim = s.shim_cmd("slow-beat").spawn().unwrap();
    let mut renewals = std::collections::BTreeSet::new();
    while shim.try_wait().unwrap().is_none() {
        if let Some(t) = s.get_lease("slow-beat").and_then(|l| l.status.renew_time) {
            renewals.insert(t);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        renewals.len() >= 3,
        "renewed at {renewals:?} during a 4 s run of a 3 s Lease"
    );
}

#[test]
fn a_shim_whose_lease_is_deleted_and_made_anew_ends_its_agent_long_before_its_heartbeat() {
    let s = State::new();
    s.agent("redo", &["sleep", "120"], 60);
    s.task("redo", &[]);
    // Renewed once a minute: far later than the test waits.
    let first = s.lease_lasting("redo", "redo", 1, 180);
    let mut shim = s.shim_cmd("redo").spawn().unwrap();
    wait_for("the agent to run", LONG, || {
        s.get_lease("redo")
            .is_some_and(|l| l.status.phase == LeasePhase::Running)
    });
    // Deleted and made anew at once: the path is never missing when the shim looks.
    s.store
        .delete::<tinyscheduler::resources::Lease>("redo", None)
        .unwrap();
    let second = s.lease("redo", "redo", 2);
    assert_ne!(first.metadata.uid, second.metadata.uid);
    exits(&mut shim);
    assert!(
        s.log("redo", 1)
            .contains("was replaced by a new Lease of its name"),
        "{}",
        s.log("redo", 1)
    );
    assert_eq!(
        s.get_lease("redo").unwrap(),
        second,
        "the new Lease left alone"
    );
}

#[test]
fn template_variables_reach_the_agent_as_separate_arguments_without_a_shell() {
    let s = State::new();
    s.agent(
        "argv",
        &[
            "printf",
            "[%s]\\n",
            "{{task.name}}",
            "{{ task.id }}",
            "{{task.params.msg}}",
            "{{agent.name}}/{{lease.name}}#{{attempt}}",
        ],
        15,
    );
    let mut t = tinyscheduler::resources::Task::new(
        "Task",
        "argv",
        tinyscheduler::resources::TaskSpec {
            params: [("msg".to_string(), serde_json::json!("a b; $(rm -rf /)"))].into(),
            ..Default::default()
        },
    );
    t.metadata.annotations.insert(
        tinyscheduler::resources::task::TINYTASK_ID_ANNOTATION.into(),
        "417".into(),
    );
    s.store.create(&t).unwrap();
    s.lease("argv", "argv", 1);
    assert!(s.shim("argv").status.success());
    assert_eq!(
        s.log("argv", 1),
        "[argv]\n[417]\n[a b; $(rm -rf /)]\n[argv/argv#1]\n[tinyscheduler] exited with code 0\n"
    );
}

#[test]
fn a_relative_working_dir_is_resolved_against_the_state_dirs_parent() {
    let s = State::new();
    std::fs::create_dir(s.dir.path().join("repo")).unwrap();
    s.agent_with(
        "wd",
        tinyscheduler::resources::AgentSpec {
            command: vec!["pwd".into()],
            working_dir: Some("repo".into()),
            ..Default::default()
        },
    );
    s.task("wd", &[]);
    s.lease("wd", "wd", 1);
    assert!(s.shim("wd").status.success());
    let want = s.dir.path().join("repo").canonicalize().unwrap();
    assert_eq!(
        s.log("wd", 1).lines().next().map(std::path::PathBuf::from),
        Some(want)
    );
}

#[test]
fn the_shim_renews_the_lease_every_heartbeat() {
    let s = State::new();
    s.agent("hb", &["sleep", "30"], 1);
    s.task("hb", &[]);
    s.lease("hb", "hb", 1);
    let mut child = s.shim_cmd("hb").spawn().unwrap();
    wait_for("the run to be recorded", LONG, || {
        s.get_lease("hb").unwrap().status.phase == LeasePhase::Running
    });
    let first = s.get_lease("hb").unwrap().status.renew_time.unwrap();
    wait_for("renewTime to advance", LONG, || {
        s.get_lease("hb").unwrap().status.renew_time.unwrap() > first
    });
    let l = s.get_lease("hb").unwrap();
    assert_eq!(l.status.phase, LeasePhase::Running);
    // Ending the shim with SIGTERM ends the agent and records it.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    let l = s.get_lease("hb").unwrap();
    assert_eq!(l.status.phase, LeasePhase::Completed);
    assert_eq!(l.status.signal, Some(15));
    assert!(
        l.status
            .message
            .as_deref()
            .unwrap_or("")
            .contains("SIGTERM"),
        "{:?}",
        l.status.message
    );
    assert!(!tinyscheduler::agent::is_alive(
        l.status.pid.unwrap(),
        l.status.process_start_time.unwrap()
    ));
}

#[test]
fn a_missing_program_is_recorded_as_exit_code_127_with_a_message() {
    let s = State::new();
    s.run_of("nope", &["/definitely/not/a/program", "x"]);
    assert!(s.shim("nope").status.success());
    let l = s.get_lease("nope").unwrap();
    assert_eq!(l.status.phase, LeasePhase::Completed);
    assert_eq!(l.status.exit_code, Some(127));
    let msg = l.status.message.unwrap();
    assert!(msg.contains("/definitely/not/a/program"), "{msg}");
    assert!(msg.contains("No such file"), "{msg}");
    assert!(s
        .log("nope", 1)
        .contains("[tinyscheduler] exited with code 127"));
}

#[test]
fn a_program_that_is_not_executable_is_recorded_as_exit_code_126() {
    let s = State::new();
    let p = s.dir.path().join("not-exec");
    std::fs::write(&p, "#!/bin/sh\necho hi\n").unwrap();
    s.run_of("noexec", &[p.to_str().unwrap()]);
    assert!(s.shim("noexec").status.success());
    let l = s.get_lease("noexec").unwrap();
    assert_eq!(l.status.exit_code, Some(126), "{:?}", l.status.message);
}

#[test]
fn an_unknown_template_variable_is_recorded_as_exit_code_127_naming_it() {
    let s = State::new();
    s.run_of("tmpl", &["echo", "{{task.params.nope}}"]);
    assert!(s.shim("tmpl").status.success());
    let l = s.get_lease("tmpl").unwrap();
    assert_eq!(l.status.exit_code, Some(127));
    let msg = l.status.message.unwrap();
    assert!(
        msg.contains("task.params.nope") && msg.contains("argument 1"),
        "{msg}"
    );
}

#[test]
fn the_default_command_is_goose_from_the_environment() {
    let s = State::new();
    let fake = script(s.dir.path(), "fake-goose", "echo \"$@\"");
    s.run_of("dflt", &[]);
    let out = s
        .shim_cmd("dflt")
        .env("TINYSCHEDULER_GOOSE_BIN", &fake)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        s.log("dflt", 1),
        "run --recipe recipes/dflt.yaml --params task_id=dflt --no-session\n[tinyscheduler] exited with code 0\n"
    );
}

#[test]
fn a_missing_or_completed_lease_runs_nothing() {
    let s = State::new();
    let marker = s.dir.path().join("ran");
    let cmd = format!("touch {}", marker.display());
    // No lease at all.
    assert!(s.shim("ghost").status.success());
    // A Completed lease.
    s.run_of("done", &["sh", "-c", &cmd]);
    s.store
        .patch_status::<tinyscheduler::resources::Lease>("done", |l| {
            l.status.phase = LeasePhase::Completed
        })
        .unwrap();
    assert!(s.shim("done").status.success());
    assert!(!marker.exists());
    assert!(!s.path().join("logs/done").exists());
}

#[test]
fn a_second_shim_for_a_running_lease_runs_nothing() {
    let s = State::new();
    let counter = s.dir.path().join("runs");
    let cmd = format!("echo x >> {}; sleep 2", counter.display());
    s.run_of("once", &["sh", "-c", &cmd]);
    let mut first = s.shim_cmd("once").spawn().unwrap();
    wait_for("the first run", LONG, || {
        s.get_lease("once").unwrap().status.phase == LeasePhase::Running
    });
    assert!(s.shim("once").status.success());
    assert!(first.wait().unwrap().success());
    assert_eq!(std::fs::read_to_string(&counter).unwrap(), "x\n");
}

#[test]
fn of_shims_started_together_for_one_pending_lease_exactly_one_runs_it() {
    let s = State::new();
    let counter = s.dir.path().join("runs");
    let cmd = format!("echo x >> {}; sleep 1", counter.display());
    s.run_of("race", &["sh", "-c", &cmd]);
    // All of them see the Lease Pending; only the holder of its claim may start the agent.
    let shims: Vec<_> = (0..6)
        .map(|_| s.shim_cmd("race").spawn().unwrap())
        .collect();
    for mut c in shims {
        assert!(c.wait().unwrap().success());
    }
    assert_eq!(std::fs::read_to_string(&counter).unwrap(), "x\n");
    assert_eq!(
        s.get_lease("race").unwrap().status.phase,
        LeasePhase::Completed
    );
}

/// Starts a shim for a run whose agent ignores SIGTERM and loops until the test's directory is
/// gone, and waits until it runs. Returns the shim.
fn stubborn_run(s: &State, name: &str) -> std::process::Child {
    let cmd = format!(
        "trap '' TERM; echo ready; while [ -d {} ]; do sleep 0.05; done",
        s.dir.path().display()
    );
    s.agent(name, &["sh", "-c", &cmd], 1);
    s.task(name, &[]);
    s.lease(name, name, 1);
    let child = s
        .shim_cmd(name)
        .env("TINYSCHEDULER_KILL_GRACE_SEC", "0.3")
        .spawn()
        .unwrap();
    wait_for("the run", LONG, || {
        s.get_lease(name).unwrap().status.phase == LeasePhase::Running
            && s.log(name, 1).contains("ready")
    });
    child
}

/// Waits for the shim to exit by itself.
fn exits(child: &mut std::process::Child) -> std::process::ExitStatus {
    let mut status = None;
    wait_for("the shim to exit", LONG, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    status.unwrap()
}

#[test]
fn the_shim_ends_its_agent_when_its_lease_is_deleted() {
    let s = State::new();
    let mut child = stubborn_run(&s, "gone");
    let pgid = s.get_lease("gone").unwrap().status.pgid.unwrap();
    s.store
        .delete::<tinyscheduler::resources::Lease>("gone", None)
        .unwrap();
    assert!(exits(&mut child).success());
    assert!(
        !tinyscheduler::agent::group_alive(pgid),
        "the agent's group ended"
    );
    let log = s.log("gone", 1);
    assert!(
        log.contains("[tinyscheduler] lease/gone was deleted: terminating the agent"),
        "{log}"
    );
    assert!(log.ends_with("exited with signal 9 (SIGKILL)\n"), "{log}");
    assert!(
        s.get_lease("gone").is_none(),
        "nothing wrote the Lease again"
    );
}

#[test]
fn the_shim_ends_its_agent_and_leaves_a_new_lease_of_its_name_alone() {
    let s = State::new();
    let mut child = stubborn_run(&s, "next");
    let pgid = s.get_lease("next").unwrap().status.pgid.unwrap();
    s.store
        .delete::<tinyscheduler::resources::Lease>("next", None)
        .unwrap();
    // The next attempt's Lease, created (almost always) before the old shim's next write; a write
    // in between finds the Lease deleted instead, which ends the agent all the same. Which of the
    // two a write sees is the unit test `a_write_tells_a_deleted_or_replaced_lease_…`.
    let fresh = s.lease("next", "next", 2);
    assert!(exits(&mut child).success());
    assert!(
        !tinyscheduler::agent::group_alive(pgid),
        "the agent's group ended"
    );
    let log = s.log("next", 1);
    assert!(
        log.contains("lease/next was replaced by a new Lease of its name: terminating the agent")
            || log.contains("lease/next was deleted: terminating the agent"),
        "{log}"
    );
    let now = s.get_lease("next").unwrap();
    assert_eq!(now.metadata, fresh.metadata, "not written at all");
    assert_eq!(now.status, fresh.status);
}

#[test]
fn the_shim_keeps_supervising_when_the_whole_state_directory_is_gone() {
    let s = State::new();
    let go = s.dir.path().join("go");
    let cmd = format!(
        "while [ ! -e {} ]; do sleep 0.05; done; exit 4",
        go.display()
    );
    s.agent("lost", &["sh", "-c", &cmd], 1);
    s.task("lost", &[]);
    s.lease("lost", "lost", 1);
    let mut child = s.shim_cmd("lost").spawn().unwrap();
    wait_for("the run", LONG, || {
        s.get_lease("lost").unwrap().status.phase == LeasePhase::Running
    });
    let pgid = s.get_lease("lost").unwrap().status.pgid.unwrap();
    // As a lost mount would look: not a Lease deleted, but the objects beside it gone too.
    std::fs::rename(s.path().join("objects"), s.dir.path().join("objects-away")).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the shim still supervises"
    );
    assert!(
        tinyscheduler::agent::group_alive(pgid),
        "the agent still runs"
    );
    std::fs::write(&go, "").unwrap();
    assert!(exits(&mut child).success());
    assert!(s.log("lost", 1).ends_with("exited with code 4\n"));
}

#[test]
fn log_files_and_directories_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let s = State::new();
    s.run_of("priv", &["true"]);
    assert!(s.shim("priv").status.success());
    let mode = |p: &str| {
        std::fs::metadata(s.path().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("logs"), 0o700);
    assert_eq!(mode("logs/priv"), 0o700);
    assert_eq!(mode("logs/priv/1.log"), 0o600);
}

#[test]
fn sigterm_to_the_shim_kills_an_agent_that_ignores_it_and_records_sigkill() {
    let s = State::new();
    s.run_of(
        "stubborn",
        &[
            "sh",
            "-c",
            "trap '' TERM; echo ready; while :; do sleep 0.05; done",
        ],
    );
    let mut child = s
        .shim_cmd("stubborn")
        .env("TINYSCHEDULER_KILL_GRACE_SEC", "0.3")
        .spawn()
        .unwrap();
    wait_for("the agent to be ready", LONG, || {
        s.log("stubborn", 1).contains("ready")
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    let l = s.get_lease("stubborn").unwrap();
    assert_eq!(l.status.phase, LeasePhase::Completed);
    assert_eq!(l.status.signal, Some(9));
    let msg = l.status.message.unwrap();
    assert!(msg.contains("SIGKILL"), "{msg}");
    assert!(!tinyscheduler::agent::group_alive(l.status.pgid.unwrap()));
}

#[test]
fn processes_the_agent_leaves_behind_in_its_group_end_with_the_run() {
    let s = State::new();
    let pidfile = s.dir.path().join("bg");
    let cmd = format!("sleep 300 & echo $! > {}; exit 0", pidfile.display());
    s.run_of("leaver", &["sh", "-c", &cmd]);
    assert!(s.shim("leaver").status.success());
    let bg: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let gone =
        tinyscheduler::agent::liveness::read_stat(bg).map_or(true, |st| st.is_zombie_or_dead());
    assert!(gone, "background pid {bg} outlived the run");
    let l = s.get_lease("leaver").unwrap();
    assert_eq!(l.status.exit_code, Some(0));
    assert!(l.status.message.unwrap().contains("left in its group"));
}

#[test]
fn a_fifo_or_a_hard_link_at_the_log_path_is_refused_and_the_run_recorded_as_not_started() {
    let s = State::new();
    let victim = s.dir.path().join("victim.txt");
    std::fs::write(&victim, "victim original\n").unwrap();
    for (name, make) in [("ff", "fifo"), ("hl", "hard link")] {
        let dir = s.path().join("logs").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("1.log");
        if make == "fifo" {
            nix::unistd::mkfifo(&log, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        } else {
            std::fs::hard_link(&victim, &log).unwrap();
        }
        s.run_of(name, &["echo", "OUTPUT"]);
        let mut child = s.shim_cmd(name).spawn().unwrap();
        let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_for("the shim to end", Duration::from_secs(30), || {
                child.try_wait().unwrap().is_some()
            })
        }));
        if waited.is_err() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the shim hung on a {make} at its log path");
        }
        let l = s.get_lease(name).unwrap();
        assert_eq!(l.status.phase, LeasePhase::Completed, "{make}");
        assert_eq!(l.status.exit_code, Some(127), "{make}: {:?}", l.status);
        let msg = l.status.message.unwrap_or_default();
        assert!(
            msg.contains("the log must be a file of its own"),
            "{make}: {msg}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "victim original\n",
        "nothing was written through the hard link"
    );
}
