//! The systemd notification protocol (`sd_notify(3)`), hand-written over a unix datagram socket.
//!
//! When systemd starts a `Type=notify` service it sets `NOTIFY_SOCKET` to the path of a datagram
//! socket (or, when it starts with `@`, the name of a socket in the abstract namespace). The service
//! sends newline-separated `KEY=VALUE` assignments there: `READY=1` once it serves, `STATUS=…` for
//! `systemctl status`, `RELOADING=1` / `STOPPING=1` around reloads and shutdown, `WATCHDOG=1` as a
//! keep-alive. Without `NOTIFY_SOCKET` every call is a no-op, so the daemon can call these
//! unconditionally.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

/// Sends state changes to systemd's notification socket; a no-op when there is none.
///
/// Cheap to clone (the socket is shared). Every method returns `Ok(())` when notification is
/// disabled; errors are worth a log line, never fatal.
#[derive(Clone, Debug, Default)]
pub struct Notifier {
    target: Option<Arc<Target>>,
}

#[derive(Debug)]
struct Target {
    socket: UnixDatagram,
    addr: SocketAddr,
    display: String,
}

impl Notifier {
    /// Notifies the socket named by `NOTIFY_SOCKET`, if it is set and non-empty; otherwise a
    /// disabled notifier. An unusable value (e.g. a `vsock:` address) is logged and disables it.
    pub fn from_env() -> Notifier {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(v) if !v.is_empty() => match Notifier::connect(&v.to_string_lossy()) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "NOTIFY_SOCKET is set but unusable; systemd notifications are off");
                    Notifier::disabled()
                }
            },
            _ => Notifier::disabled(),
        }
    }

    /// A notifier that does nothing.
    pub fn disabled() -> Notifier {
        Notifier { target: None }
    }

    /// Notifies the socket at `address`: a filesystem path, or `@name` for the abstract namespace.
    pub fn connect(address: &str) -> io::Result<Notifier> {
        let addr = if let Some(name) = address.strip_prefix('@') {
            abstract_addr(name.as_bytes())?
        } else if address.starts_with('/') {
            SocketAddr::from_pathname(address)?
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unsupported NOTIFY_SOCKET address {address:?} (want /path or @name)"),
            ));
        };
        let socket = UnixDatagram::unbound()?;
        // systemd drains its socket promptly; never let a stuck manager wedge the daemon.
        socket.set_write_timeout(Some(Duration::from_secs(2)))?;
        Ok(Notifier {
            target: Some(Arc::new(Target {
                socket,
                addr,
                display: address.to_string(),
            })),
        })
    }

    /// Whether messages go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends a raw message: newline-separated `KEY=VALUE` assignments.
    pub fn notify(&self, message: &str) -> io::Result<()> {
        let Some(t) = &self.target else {
            return Ok(());
        };
        let sent = t.socket.send_to_addr(message.as_bytes(), &t.addr);
        match sent {
            Ok(n) if n == message.len() => Ok(()),
            Ok(n) => Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!(
                    "short write to {}: {n} of {} bytes",
                    t.display,
                    message.len()
                ),
            )),
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!("notify {}: {e}", t.display),
            )),
        }
    }

    /// `READY=1`: startup is finished, the service is up (`systemctl start` returns).
    pub fn ready(&self) -> io::Result<()> {
        self.notify("READY=1")
    }

    /// `STATUS=…`: a one-line status for `systemctl status` (newlines become spaces).
    pub fn status(&self, status: &str) -> io::Result<()> {
        self.notify(&format!("STATUS={}", one_line(status)))
    }

    /// `STOPPING=1`: shutdown has begun.
    pub fn stopping(&self) -> io::Result<()> {
        self.notify("STOPPING=1")
    }

    /// `RELOADING=1` with `MONOTONIC_USEC=<CLOCK_MONOTONIC now>`, as systemd ≥ 253 expects for
    /// `Type=notify-reload` (older versions ignore the extra field). Send [`Notifier::ready`]
    /// when the reload is done.
    pub fn reloading(&self) -> io::Result<()> {
        self.notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}",
            monotonic_usec()?
        ))
    }

    /// `WATCHDOG=1`: the keep-alive ping. Send it only from a loop that proves the daemon works
    /// (see [`crate::daemon::watchdog`]).
    pub fn watchdog(&self) -> io::Result<()> {
        self.notify("WATCHDOG=1")
    }

    /// `EXTEND_TIMEOUT_USEC=…`: ask for more time to start or stop.
    pub fn extend_timeout(&self, by: Duration) -> io::Result<()> {
        self.notify(&format!("EXTEND_TIMEOUT_USEC={}", by.as_micros()))
    }
}

fn one_line(s: &str) -> String {
    s.trim()
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect()
}

/// The current `CLOCK_MONOTONIC` reading in microseconds, the clock systemd compares against.
pub fn monotonic_usec() -> io::Result<u64> {
    let ts =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_err(io::Error::from)?;
    Ok(ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1_000)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &[u8]) -> io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract unix sockets exist only on Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_flattened_to_one_line() {
        assert_eq!(one_line(" a\nb\r\nc \n"), "a b  c");
    }

    #[test]
    fn a_relative_or_vsock_address_is_refused() {
        assert!(Notifier::connect("vsock:2:1234").is_err());
        assert!(Notifier::connect("relative/path").is_err());
    }

    #[test]
    fn a_disabled_notifier_accepts_everything_silently() {
        let n = Notifier::disabled();
        assert!(!n.is_enabled());
        n.ready().unwrap();
        n.status("x").unwrap();
        n.watchdog().unwrap();
        n.reloading().unwrap();
        n.stopping().unwrap();
    }
}
