//! The systemd watchdog, driven by the main loop's heartbeat.
//!
//! With `WatchdogSec=` systemd sets `WATCHDOG_USEC` (and `WATCHDOG_PID`) and kills and restarts
//! the service when no `WATCHDOG=1` arrives within that time. A timer that pings blindly would
//! only prove the runtime is alive; here the main reconcile loop calls [`Heartbeat::beat`] each
//! time round, and [`run_watchdog`] forwards a ping every half-timeout **only if the loop beat
//! since the previous ping**. A wedged loop therefore stops the pings and systemd restarts the
//! daemon (which adopts the running agents on start).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::notify::Notifier;

/// How often to ping, from systemd's `WATCHDOG_USEC`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchdogConfig {
    /// systemd's timeout: no ping for this long means a restart.
    pub timeout: Duration,
    /// How often [`run_watchdog`] considers sending a ping: half the timeout.
    pub interval: Duration,
}

impl WatchdogConfig {
    /// A config for a given timeout; pings every half of it.
    pub fn new(timeout: Duration) -> WatchdogConfig {
        WatchdogConfig {
            timeout,
            interval: timeout / 2,
        }
    }

    /// Reads `WATCHDOG_USEC` / `WATCHDOG_PID`. `None` when the watchdog is off: the variable is
    /// missing, zero or malformed, or `WATCHDOG_PID` names another process (we inherited it).
    pub fn from_env() -> Option<WatchdogConfig> {
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        WatchdogConfig::from_values(usec.as_deref(), pid.as_deref(), std::process::id())
    }

    /// [`WatchdogConfig::from_env`] on given values, for tests and callers with their own source.
    pub fn from_values(
        usec: Option<&str>,
        pid: Option<&str>,
        our_pid: u32,
    ) -> Option<WatchdogConfig> {
        let usec: u64 = usec?.trim().parse().ok()?;
        if usec == 0 {
            return None;
        }
        if let Some(pid) = pid {
            if pid.trim().parse::<u32>().ok()? != our_pid {
                return None;
            }
        }
        Some(WatchdogConfig::new(Duration::from_micros(usec)))
    }
}

/// The main loop's proof of life. Clone it into the loop; call [`Heartbeat::beat`] every time
/// round (at least once per [`WatchdogConfig::interval`], so the loop needs a tick of its own when
/// it is otherwise idle).
#[derive(Clone, Debug, Default)]
pub struct Heartbeat {
    beats: Arc<AtomicU64>,
    last: Arc<Mutex<Option<Instant>>>,
}

impl Heartbeat {
    pub fn new() -> Heartbeat {
        Heartbeat::default()
    }

    /// Records that the loop went round.
    pub fn beat(&self) {
        self.beats.fetch_add(1, Ordering::Relaxed);
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// How long ago the loop last went round; `None` before its first time (while the daemon
    /// still loads its caches).
    pub fn since_last(&self) -> Option<Duration> {
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| t.elapsed())
    }

    /// The liveness check: failing once the loop has not gone round for `limit`, measured from
    /// its last beat (not from when someone last looked), and passing before the first beat,
    /// when readiness, not liveness, says the daemon is still starting.
    pub fn check_alive(&self, limit: Duration) -> Result<(), String> {
        match self.since_last() {
            Some(idle) if idle > limit => Err(format!(
                "the assignment loop has not gone round for {}s",
                idle.as_secs()
            )),
            _ => Ok(()),
        }
    }

    /// How many beats so far.
    pub fn count(&self) -> u64 {
        self.beats.load(Ordering::Relaxed)
    }
}

/// Sends `WATCHDOG=1` every `config.interval`, but only when `heartbeat` has beaten since the last
/// ping. Runs until dropped or aborted: spawn it and abort it at shutdown.
pub async fn run_watchdog(notifier: Notifier, heartbeat: Heartbeat, config: WatchdogConfig) {
    let start = tokio::time::Instant::now();
    let mut ticks = tokio::time::interval_at(start + config.interval, config.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = heartbeat.count();
    let mut last_progress = start;
    let mut warned = false;
    loop {
        ticks.tick().await;
        let now = heartbeat.count();
        if now != seen {
            seen = now;
            last_progress = tokio::time::Instant::now();
            if warned {
                tracing::info!("main loop is beating again; resuming watchdog pings");
                warned = false;
            }
            if let Err(e) = notifier.watchdog() {
                tracing::warn!(error = %e, "could not send WATCHDOG=1");
            }
        } else if !warned {
            warned = true;
            tracing::warn!(
                stalled_for = ?last_progress.elapsed(),
                timeout = ?config.timeout,
                "main loop has not gone round since the last watchdog ping; withholding WATCHDOG=1 \
                 (systemd restarts the daemon if this lasts)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_counts_from_the_last_beat_and_passes_before_the_first() {
        let h = Heartbeat::new();
        assert!(h.check_alive(Duration::ZERO).is_ok(), "still starting");
        h.beat();
        std::thread::sleep(Duration::from_millis(30));
        let e = h.check_alive(Duration::from_millis(10)).unwrap_err();
        assert!(e.contains("has not gone round"), "{e}");
        // Looking again does not restart the clock.
        assert!(h.check_alive(Duration::from_millis(10)).is_err());
        h.beat();
        assert!(h.check_alive(Duration::from_secs(60)).is_ok());
    }

    #[test]
    fn the_interval_is_half_the_timeout() {
        let c = WatchdogConfig::from_values(Some("30000000"), None, 7).unwrap();
        assert_eq!(c.timeout, Duration::from_secs(30));
        assert_eq!(c.interval, Duration::from_secs(15));
    }

    #[test]
    fn a_watchdog_pid_of_another_process_means_no_watchdog() {
        assert!(WatchdogConfig::from_values(Some("1000"), Some("8"), 7).is_none());
        assert!(WatchdogConfig::from_values(Some("1000"), Some("7"), 7).is_some());
        assert!(WatchdogConfig::from_values(Some("1000"), Some("junk"), 7).is_none());
    }

    #[test]
    fn a_missing_zero_or_malformed_timeout_means_no_watchdog() {
        assert!(WatchdogConfig::from_values(None, None, 7).is_none());
        assert!(WatchdogConfig::from_values(Some("0"), None, 7).is_none());
        assert!(WatchdogConfig::from_values(Some("1s"), None, 7).is_none());
    }
}
