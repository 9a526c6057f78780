//! sd_notify and the watchdog against a unix datagram socket standing in for systemd's
//! NOTIFY_SOCKET.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use tinyscheduler::daemon::notify::monotonic_usec;
use tinyscheduler::daemon::{run_watchdog, Heartbeat, Notifier, WatchdogConfig};

/// A fake systemd: a bound datagram socket we read messages from.
struct FakeSystemd {
    socket: UnixDatagram,
    _dir: tempfile::TempDir,
    path: String,
}

impl FakeSystemd {
    fn new() -> FakeSystemd {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_nonblocking(true).unwrap();
        FakeSystemd {
            socket,
            path: path.to_str().unwrap().to_string(),
            _dir: dir,
        }
    }

    /// Every message received so far.
    fn drain(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.socket.recv(&mut buf) {
            out.push(String::from_utf8(buf[..n].to_vec()).unwrap());
        }
        out
    }
}

#[test]
fn each_state_change_arrives_as_one_datagram_in_sd_notify_syntax() {
    let systemd = FakeSystemd::new();
    let n = Notifier::connect(&systemd.path).unwrap();
    assert!(n.is_enabled());
    n.ready().unwrap();
    n.status("3 agents, 2 running\nsecond line").unwrap();
    n.watchdog().unwrap();
    let before = monotonic_usec().unwrap();
    n.reloading().unwrap();
    let after = monotonic_usec().unwrap();
    n.stopping().unwrap();
    let got = systemd.drain();
    assert_eq!(got.len(), 5, "{got:?}");
    assert_eq!(got[0], "READY=1");
    assert_eq!(got[1], "STATUS=3 agents, 2 running second line");
    assert_eq!(got[2], "WATCHDOG=1");
    let (first, usec) = got[3].split_once('\n').unwrap();
    assert_eq!(first, "RELOADING=1");
    let usec: u64 = usec
        .strip_prefix("MONOTONIC_USEC=")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        before <= usec && usec <= after,
        "{before} <= {usec} <= {after}"
    );
    assert_eq!(got[4], "STOPPING=1");
}

#[test]
fn an_abstract_socket_named_with_a_leading_at_sign_is_reached() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::SocketAddr;
    let name = format!("tinyscheduler-test-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let n = Notifier::connect(&format!("@{name}")).unwrap();
    n.ready().unwrap();
    let mut buf = [0u8; 64];
    let len = socket.recv(&mut buf).unwrap();
    assert_eq!(&buf[..len], b"READY=1");
}

#[test]
fn from_env_follows_notify_socket_and_is_a_no_op_without_it() {
    // The only test in this binary that touches the environment.
    let systemd = FakeSystemd::new();
    std::env::remove_var("NOTIFY_SOCKET");
    let off = Notifier::from_env();
    assert!(!off.is_enabled());
    off.ready().unwrap();
    std::env::set_var("NOTIFY_SOCKET", &systemd.path);
    let on = Notifier::from_env();
    std::env::remove_var("NOTIFY_SOCKET");
    assert!(on.is_enabled());
    on.status("up").unwrap();
    assert_eq!(systemd.drain(), vec!["STATUS=up".to_string()]);
}

#[test]
fn a_vanished_socket_is_an_error_to_log_not_a_panic() {
    let systemd = FakeSystemd::new();
    let n = Notifier::connect(&systemd.path).unwrap();
    let path = systemd.path.clone();
    drop(systemd);
    let e = n.ready().unwrap_err();
    assert!(e.to_string().contains(&path), "{e}");
}

/// Samples at half-second offsets so a ping due at second N is never raced by the sample.
#[tokio::test(start_paused = true)]
async fn the_watchdog_pings_every_half_timeout_while_the_loop_beats_and_stops_when_it_stalls() {
    let systemd = FakeSystemd::new();
    let notifier = Notifier::connect(&systemd.path).unwrap();
    let heartbeat = Heartbeat::new();
    let config = WatchdogConfig::new(Duration::from_secs(10)); // ping every 5 s
    assert_eq!(config.interval, Duration::from_secs(5));
    let task = tokio::spawn(run_watchdog(notifier, heartbeat.clone(), config));

    // The loop beats every second for t in [0, 12), stalls until 27, then beats again.
    let beating = |t: u64| !(12..27).contains(&t);
    let mut pings = Vec::new();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for t in 0..40u64 {
        if beating(t) {
            heartbeat.beat();
        }
        tokio::time::sleep(Duration::from_secs(1)).await; // now at t + 1.5 s
        for m in systemd.drain() {
            assert_eq!(m, "WATCHDOG=1");
            pings.push(t + 1);
        }
    }
    task.abort();
    // Pings at 5, 10, 15 (beaten at 11 after the ping at 10); none at 20 and 25 (stalled since
    // 12); back at 30 (beats resumed at 27), 35, 40.
    assert_eq!(pings, vec![5, 10, 15, 30, 35, 40]);
}

#[tokio::test(start_paused = true)]
async fn a_loop_that_never_beats_never_gets_a_ping() {
    let systemd = FakeSystemd::new();
    let notifier = Notifier::connect(&systemd.path).unwrap();
    let task = tokio::spawn(run_watchdog(
        notifier,
        Heartbeat::new(),
        WatchdogConfig::new(Duration::from_secs(2)),
    ));
    tokio::time::sleep(Duration::from_secs(30)).await;
    task.abort();
    assert!(systemd.drain().is_empty());
}
