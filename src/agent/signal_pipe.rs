//! The shim's signals as a pipe it can poll (the self-pipe trick).
//!
//! SIGTERM and SIGINT ask the shim to terminate its agent's group; SIGCHLD says the agent may have
//! exited. Their handlers write the signal's number into a non-blocking pipe, which the shim's one
//! loop polls together with its heartbeat timer. Handled rather than blocked for a signalfd:
//! blocked signals would stay blocked in the agent, handled ones are back to their defaults there
//! after exec.

use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Instant;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

/// The read end of the pipe the handlers of SIGTERM, SIGINT and SIGCHLD write to. The shim is one
/// thread with one child, so a poll loop on it does what an async runtime did, without the
/// runtime's start-up and tear-down in every run.
pub struct Signals {
    wake: OwnedFd,
}

/// The write end of the [`Signals`] pipe, for the handler.
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: nix::libc::c_int) {
    let saved = Errno::last_raw();
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = sig as u8;
        // SAFETY: write(2) is async-signal-safe; the pipe is non-blocking, so a full pipe (a
        // flood of signals not yet read) drops the byte instead of blocking the handler.
        unsafe {
            nix::libc::write(fd, std::ptr::addr_of!(byte).cast(), 1);
        }
    }
    Errno::set_raw(saved);
}

impl Signals {
    /// Installs the handlers, opens the pipe and unblocks every signal; once per process.
    pub fn take() -> nix::Result<Signals> {
        let (wake, notify) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        // The write end lives as long as the process: the handler may run at any time.
        SIGNAL_PIPE.store(notify.into_raw_fd(), Ordering::Relaxed);
        let action = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::SA_RESTART | SaFlags::SA_NOCLDSTOP,
            SigSet::empty(),
        );
        for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
            // SAFETY: the handler only writes to a pipe and restores errno.
            unsafe { sigaction(sig, &action) }?;
        }
        // Whatever mask the shim inherited, none: the agent inherits this one through
        // posix_spawn, and the handlers must be able to run.
        SigSet::empty().thread_set_mask()?;
        Ok(Signals { wake })
    }

    /// Waits until a signal comes or `until` passes; returns the termination request received,
    /// if any (SIGCHLD only wakes the caller, who then looks at its child).
    pub fn wait(&self, until: Instant) -> Option<&'static str> {
        let left = until.saturating_duration_since(Instant::now());
        // Rounded up, so that a wake-up never comes just before `until` and spins.
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        let mut fds = [PollFd::new(self.wake.as_fd(), PollFlags::POLLIN)];
        let _ = poll(
            &mut fds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        );
        let mut request = None;
        let mut buf = [0u8; 64];
        while let Ok(n @ 1..) = nix::unistd::read(self.wake.as_raw_fd(), &mut buf) {
            for &b in &buf[..n] {
                match Signal::try_from(i32::from(b)) {
                    Ok(Signal::SIGTERM) => request = request.or(Some("SIGTERM")),
                    Ok(Signal::SIGINT) => request = request.or(Some("SIGINT")),
                    _ => {}
                }
            }
        }
        request
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_signal_ends_the_wait_at_once_and_says_which_termination_was_asked_for() {
        let signals = Signals::take().unwrap();
        assert_eq!(signals.wait(Instant::now()), None);
        nix::sys::signal::raise(Signal::SIGINT).unwrap();
        // Were the signal lost, this would wait a minute and then fail.
        let asked = signals.wait(Instant::now() + Duration::from_secs(60));
        assert_eq!(asked, Some("SIGINT"));
        assert_eq!(signals.wait(Instant::now()), None, "read once, not twice");
    }
}
