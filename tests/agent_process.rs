//! Liveness, group termination and shim spawning, with real processes.

#[path = "support/agent_fixtures.rs"]
mod support;

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::*;
use tinyscheduler::agent::liveness::{group_alive, read_stat};
use tinyscheduler::agent::{is_alive, start_time_of, terminate_group, KillOutcome};
use tinyscheduler::resources::LeasePhase;

/// Reaps a child from a background thread, like a supervisor would.
fn reap_in_background(mut child: Child) {
    std::thread::spawn(move || {
        let _ = child.wait();
    });
}

/// Gone, or a zombie waiting for a parent that is not us.
fn pid_gone(pid: i32) -> bool {
    read_stat(pid).map_or(true, |s| s.is_zombie_or_dead())
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

// ----- liveness -----

#[test]
fn a_running_child_is_alive_and_dead_once_it_has_exited() {
    let mut child = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = child.id() as i32;
    let st = start_time_of(pid).unwrap();
    assert!(is_alive(pid, st));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!is_alive(pid, st));
}

#[test]
fn a_zombie_child_not_yet_reaped_is_dead() {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id() as i32;
    wait_for("the child to become a zombie", LONG, || {
        read_stat(pid).unwrap().state == 'Z'
    });
    let st = start_time_of(pid).expect("a zombie still has /proc/<pid>/stat");
    assert!(!is_alive(pid, st));
    child.wait().unwrap();
}

#[test]
fn a_pid_with_a_different_start_time_is_dead() {
    let mut child = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = child.id() as i32;
    let st = start_time_of(pid).unwrap();
    // What a reused pid looks like: same number, another process start.
    assert!(!is_alive(pid, st + 1));
    assert!(!is_alive(pid, st.saturating_sub(1)));
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn pid_1_is_alive_even_where_signalling_it_is_not_permitted() {
    let st = start_time_of(1).expect("pid 1 is visible");
    assert!(is_alive(1, st));
    if nix::unistd::getuid().is_root() {
        // As root kill(1, 0) succeeds; check EPERM honestly from an unprivileged helper.
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "probe_as_unprivileged_helper",
                "--include-ignored",
            ])
            .env("PROBE_PID", "1")
            .env("PROBE_START", st.to_string())
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("1 passed"),
            "{out:?}"
        );
    } else {
        assert_eq!(kill(Pid::from_raw(1), None), Err(nix::errno::Errno::EPERM));
    }
}

/// Run by `pid_1_is_alive_even_where_signalling_it_is_not_permitted` as an unprivileged user.
#[test]
#[ignore = "helper: run as another user by a test above"]
fn probe_as_unprivileged_helper() {
    let pid: i32 = std::env::var("PROBE_PID").unwrap().parse().unwrap();
    let st: u64 = std::env::var("PROBE_START").unwrap().parse().unwrap();
    assert_eq!(
        kill(Pid::from_raw(pid), None),
        Err(nix::errno::Errno::EPERM)
    );
    assert!(is_alive(pid, st));
    assert!(!is_alive(pid, st + 1));
}

#[test]
fn a_group_whose_members_are_all_zombies_is_not_alive() {
    let mut child = Command::new("true").process_group(0).spawn().unwrap();
    let pid = child.id() as i32;
    wait_for("the leader to become a zombie", LONG, || {
        read_stat(pid).unwrap().state == 'Z'
    });
    assert!(!group_alive(pid));
    child.wait().unwrap();
    assert!(!group_alive(pid));
}

#[test]
fn a_process_whose_first_thread_exited_while_another_runs_is_alive_until_its_group_is_ended() {
    // SAFETY: the child only joins a group of its own, starts a thread and ends its first thread
    // with the bare exit system call (nothing unwinds through Rust frames); glibc's fork leaves
    // malloc usable in the child.
    let pid = match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => unsafe {
            nix::libc::setpgid(0, 0);
            std::thread::spawn(|| std::thread::sleep(Duration::from_secs(300)));
            nix::libc::syscall(nix::libc::SYS_exit, 0);
            nix::libc::_exit(1)
        },
        nix::unistd::ForkResult::Parent { child } => child,
    };
    let _ = nix::unistd::setpgid(pid, pid);
    let pid = pid.as_raw();
    let guard = KillGroupOnDrop(pid);
    // `ps` shows it as `Zl`: the first thread is a zombie, the process runs on.
    wait_for("the first thread to exit", LONG, || {
        read_stat(pid).unwrap().state == 'Z'
    });
    let st = start_time_of(pid).unwrap();
    assert!(is_alive(pid, st), "a process that still runs a thread");
    assert!(group_alive(pid));

    let out = rt().block_on(terminate_group(pid, Duration::from_secs(60)));
    assert_eq!(
        out,
        KillOutcome {
            terminated: true,
            killed: false
        }
    );
    let status = nix::sys::wait::waitpid(Pid::from_raw(pid), None).unwrap();
    assert_eq!(
        status,
        nix::sys::wait::WaitStatus::Signaled(Pid::from_raw(pid), Signal::SIGTERM, false)
    );
    std::mem::forget(guard);
}

/// SIGKILLs a process group when dropped, so that a failing test leaves no process behind.
struct KillGroupOnDrop(i32);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(-self.0), Signal::SIGKILL);
    }
}

// ----- kill -----

#[test]
fn an_agent_ignoring_sigterm_is_killed_together_with_its_grandchildren() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let body = format!(
        "trap '' TERM\nsleep 300 & echo $! >> {p}\n(trap '' TERM; sleep 300 & echo $! >> {p}; wait) & echo $! >> {p}\necho $$ >> {p}\nwait",
        p = pids.display()
    );
    let child = Command::new("sh")
        .args(["-c", &body])
        .process_group(0)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pgid = child.id() as i32;
    reap_in_background(child);
    wait_for("all four pids to be written", LONG, || {
        std::fs::read_to_string(&pids).map_or(0, |s| s.lines().count()) == 4
    });
    let all: Vec<i32> = std::fs::read_to_string(&pids)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert!(all.iter().all(|&p| !pid_gone(p)));

    let out = rt().block_on(terminate_group(pgid, Duration::from_millis(300)));
    assert_eq!(
        out,
        KillOutcome {
            terminated: true,
            killed: true
        }
    );
    for p in all {
        assert!(pid_gone(p), "pid {p} survived");
    }
    assert!(!group_alive(pgid));
}

#[test]
fn a_well_behaved_agent_ends_on_sigterm_without_sigkill() {
    let child = Command::new("sleep")
        .arg("300")
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = child.id() as i32;
    reap_in_background(child);
    let out = rt().block_on(terminate_group(pgid, Duration::from_secs(60)));
    assert_eq!(
        out,
        KillOutcome {
            terminated: true,
            killed: false
        }
    );
    assert!(pid_gone(pgid));
}

#[test]
fn terminate_group_refuses_pid_1_0_and_its_own_group() {
    let rt = rt();
    for pgid in [-5, 0, 1, nix::unistd::getpgrp().as_raw()] {
        let out = rt.block_on(terminate_group(pgid, Duration::from_millis(10)));
        assert_eq!(out, KillOutcome::default(), "pgid {pgid}");
    }
    assert!(is_alive(1, start_time_of(1).unwrap()));
}

#[test]
fn an_already_empty_group_counts_as_terminated() {
    let mut child = Command::new("true").process_group(0).spawn().unwrap();
    let pgid = child.id() as i32;
    child.wait().unwrap();
    let out = rt().block_on(terminate_group(pgid, Duration::from_secs(1)));
    assert_eq!(
        out,
        KillOutcome {
            terminated: true,
            killed: false
        }
    );
}

// ----- spawn -----

#[test]
fn a_spawned_shim_is_reaped_in_the_background_so_no_zombie_lingers() {
    let s = State::new();
    // No such lease: the shim exits at once. (From a test harness, spawn_shim runs the
    // tinyscheduler binary beside `deps/`.)
    let pid = tinyscheduler::agent::spawn_shim(&s.path(), "absent").unwrap() as i32;
    wait_for("the shim to be reaped", LONG, || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    });
}

#[test]
fn a_shim_survives_the_process_that_spawned_it_and_records_the_exit() {
    let s = State::new();
    let go = s.dir.path().join("go");
    let cmd = format!(
        "while [ ! -e {} ] && [ -d {} ]; do sleep 0.05; done; exit 5",
        go.display(),
        s.dir.path().display()
    );
    s.run_of("survivor", &["sh", "-c", &cmd]);
    // A short-lived "scheduler" spawns the shim and exits at once.
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "spawn_shim_and_exit_helper",
            "--include-ignored",
            "--nocapture",
        ])
        .env("SPAWN_STATE", s.path())
        .env("SPAWN_LEASE", "survivor")
        .env("TINYSCHEDULER_SHIM_EXE", bin())
        .env("SCHEDULER_ONLY_SECRET", "must not reach the shim")
        .env("TINYSCHEDULER_GOOSE_BIN", "/opt/goose")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let shim_pid: i32 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("SHIM_PID="))
        .expect("the helper prints the shim pid")
        .parse()
        .unwrap();
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .to_string()
    };
    // It was forked by a launcher, which went away with the process that started it.
    assert!(
        field("LAUNCHER_CMDLINE=").contains("shim-launcher"),
        "{stdout}"
    );
    let launcher: i32 = field("LAUNCHER_PID=").parse().unwrap();
    wait_for("the launcher to exit with its scheduler", LONG, || {
        pid_gone(launcher)
    });
    wait_for("the run to be recorded", LONG, || {
        s.get_lease("survivor").unwrap().status.phase == LeasePhase::Running
    });
    // The parent is gone; the shim is running in its own session, with a minimal environment.
    let stat = read_stat(shim_pid).unwrap();
    assert!(!stat.is_zombie_or_dead());
    assert_eq!(stat.session, shim_pid);
    let environ = std::fs::read(format!("/proc/{shim_pid}/environ")).unwrap();
    let mut names: Vec<String> = environ
        .split(|&b| b == 0)
        .filter(|e| !e.is_empty())
        .map(|e| {
            String::from_utf8_lossy(e)
                .split('=')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    names.sort();
    assert!(
        names
            .iter()
            .all(|n| matches!(n.as_str(), "PATH" | "HOME" | "LANG")
                || n.starts_with("TINYSCHEDULER_")),
        "{names:?}"
    );
    assert!(names.contains(&"TINYSCHEDULER_GOOSE_BIN".to_string()));

    std::fs::write(&go, "").unwrap();
    wait_for("the exit to be recorded", LONG, || {
        s.get_lease("survivor").unwrap().status.phase == LeasePhase::Completed
    });
    let l = s.get_lease("survivor").unwrap();
    assert_eq!(l.status.exit_code, Some(5));
    assert_eq!(l.status.shim_pid, Some(shim_pid));
    wait_for("the shim to exit", LONG, || pid_gone(shim_pid));
}

#[test]
fn shims_still_start_after_their_launcher_is_killed() {
    let s = State::new();
    let go = s.dir.path().join("go");
    let cmd = format!(
        "while [ ! -e {} ] && [ -d {} ]; do sleep 0.05; done",
        go.display(),
        s.dir.path().display()
    );
    s.run_of("first", &["sh", "-c", &cmd]);
    s.run_of("second", &["sh", "-c", &cmd]);
    let first = tinyscheduler::agent::spawn_shim(&s.path(), "first").unwrap() as i32;
    let launcher = read_stat(first).unwrap().ppid;
    assert!(std::fs::read(format!("/proc/{launcher}/cmdline"))
        .unwrap()
        .windows(13)
        .any(|w| w == b"shim-launcher"));
    kill(Pid::from_raw(launcher), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_for("the launcher to die", LONG, || pid_gone(launcher));
    // The next shim still starts (executed while the launcher is down), and runs.
    let second = tinyscheduler::agent::spawn_shim(&s.path(), "second").unwrap() as i32;
    wait_for("both runs to be recorded", LONG, || {
        ["first", "second"]
            .iter()
            .all(|n| s.get_lease(n).unwrap().status.phase == LeasePhase::Running)
    });
    assert_eq!(s.get_lease("second").unwrap().status.shim_pid, Some(second));
    std::fs::write(&go, "").unwrap();
    wait_for("both runs to complete", LONG, || {
        ["first", "second"]
            .iter()
            .all(|n| s.get_lease(n).unwrap().status.phase == LeasePhase::Completed)
    });
}

/// Run by the test above as a separate process: spawns a shim and exits without waiting.
#[test]
#[ignore = "helper: run as a short-lived scheduler by a test above"]
fn spawn_shim_and_exit_helper() {
    let state = std::env::var_os("SPAWN_STATE").unwrap();
    let lease = std::env::var("SPAWN_LEASE").unwrap();
    let pid = tinyscheduler::agent::spawn_shim(std::path::Path::new(&state), &lease).unwrap();
    println!("SHIM_PID={pid}");
    // The shim was forked by this process's launcher: its parent, while the launcher lives.
    let launcher = read_stat(pid as i32).unwrap().ppid;
    let cmdline = std::fs::read(format!("/proc/{launcher}/cmdline")).unwrap_or_default();
    println!("LAUNCHER_PID={launcher}");
    println!(
        "LAUNCHER_CMDLINE={}",
        String::from_utf8_lossy(&cmdline).replace('\0', " ")
    );
}
