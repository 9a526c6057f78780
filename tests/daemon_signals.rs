//! Real signals: sent to this test process (after its handlers are installed) or to a child copy
//! of it. Signal delivery is process-wide, so the in-process tests take a lock.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tinyscheduler::daemon::signals;

static SIGNALS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn raise(sig: Signal) {
    kill(Pid::this(), sig).unwrap();
}

#[tokio::test]
async fn sighup_asks_for_a_reload_and_a_burst_of_them_coalesces_into_one() {
    let _g = SIGNALS.lock().await;
    let mut s = signals::install().unwrap();
    raise(Signal::SIGHUP);
    tokio::time::timeout(Duration::from_secs(5), s.reloads.recv())
        .await
        .expect("a reload request")
        .unwrap();
    // Three HUPs while nobody is reloading: one pending request covers them all.
    for _ in 0..3 {
        raise(Signal::SIGHUP);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::time::timeout(Duration::from_secs(5), s.reloads.recv())
        .await
        .expect("a reload request")
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), s.reloads.recv())
            .await
            .is_err(),
        "the burst made more than one reload"
    );
    assert!(!s.shutdown.is_triggered(), "SIGHUP is not a shutdown");
}

#[tokio::test]
async fn sigint_begins_shutdown_and_wakes_every_clone() {
    let _g = SIGNALS.lock().await;
    let s = signals::install().unwrap();
    let a = tokio::spawn(s.shutdown.wait());
    let b = tokio::spawn(s.shutdown.clone().wait());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!a.is_finished() && !b.is_finished());
    raise(Signal::SIGINT);
    tokio::time::timeout(Duration::from_secs(5), async {
        a.await.unwrap();
        b.await.unwrap();
    })
    .await
    .expect("both waiters woke");
    assert_eq!(s.shutdown.reason().as_deref(), Some("SIGINT"));
}

/// The child half of the next test: does nothing unless started by it.
#[tokio::test]
async fn child_waits_for_sigterm_then_hangs_in_shutdown() {
    if std::env::var_os("TS_SIGNALS_CHILD").is_none() {
        return;
    }
    let s = signals::install().unwrap();
    println!("child: ready");
    s.shutdown.wait().await;
    println!("child: shutting down ({})", s.shutdown.reason().unwrap());
    // A shutdown that never finishes: only a second signal gets us out.
    tokio::time::sleep(Duration::from_secs(60)).await;
    println!("child: shutdown timed out");
}

#[test]
fn sigterm_begins_shutdown_and_a_second_one_exits_at_once_with_143() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_waits_for_sigterm_then_hangs_in_shutdown",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("TS_SIGNALS_CHILD", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = Pid::from_raw(child.id() as i32);
    // libtest prints "test NAME ... " before the child's first line: match anywhere in a line.
    // Read on a thread so a silent child fails the test instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut wait_for = |want: &str| -> String {
        loop {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => {
                    if let Some(i) = line.find(want) {
                        return line[i..].to_string();
                    }
                }
                Err(e) => {
                    let _ = child.kill();
                    panic!("child never printed {want:?}: {e}");
                }
            }
        }
    };
    wait_for("child: ready");
    kill(pid, Signal::SIGTERM).unwrap();
    assert_eq!(
        wait_for("child: shutting down"),
        "child: shutting down (SIGTERM)"
    );
    kill(pid, Signal::SIGTERM).unwrap();
    let started = std::time::Instant::now();
    let status = child.wait().unwrap();
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(status.code(), Some(143), "{status:?}");
}
