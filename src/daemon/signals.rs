//! Unix signals as the daemon sees them: SIGINT/SIGTERM begin a graceful shutdown ([`Shutdown`],
//! a cloneable one-shot latch any part of the daemon can wait on or trigger); SIGHUP asks for a
//! reload ([`Reloads`], a coalescing stream: several HUPs during one reload make one more).
//!
//! A second SIGINT/SIGTERM while already shutting down exits at once (status 130 / 143), as
//! controller-runtime does: a stuck shutdown can always be cut short from the terminal.

use std::io;
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};

/// A cloneable shutdown latch: once triggered it stays triggered. Waiting is cheap and each
/// [`Shutdown::wait`] future is `'static`, so it can be handed to `Controller::run`,
/// `HttpServer::serve` and friends.
#[derive(Clone, Debug)]
pub struct Shutdown {
    tx: Arc<watch::Sender<Option<String>>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

impl Shutdown {
    /// A latch not yet triggered.
    pub fn new() -> Shutdown {
        Shutdown {
            tx: Arc::new(watch::Sender::new(None)),
        }
    }

    /// Begins shutdown, recording why (e.g. `"SIGTERM"`, `"lost the state lock"`). Only the first
    /// trigger's reason is kept; later calls are no-ops. Returns whether this call triggered it.
    pub fn trigger(&self, reason: impl Into<String>) -> bool {
        let reason = reason.into();
        self.tx.send_if_modified(|v| {
            if v.is_none() {
                *v = Some(reason);
                true
            } else {
                false
            }
        })
    }

    /// Whether shutdown has begun.
    pub fn is_triggered(&self) -> bool {
        self.tx.borrow().is_some()
    }

    /// Why shutdown began, once it has.
    pub fn reason(&self) -> Option<String> {
        self.tx.borrow().clone()
    }

    /// Resolves once shutdown has begun (at once if it already has).
    pub fn wait(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.tx.subscribe();
        async move {
            // The sender lives in `self`'s Arc, shared by every clone; it cannot be dropped while
            // a clone exists, and if none does, nobody can trigger: treat that as shutdown.
            let _ = rx.wait_for(|v| v.is_some()).await;
        }
    }
}

/// Reload requests (SIGHUP), coalesced: at most one is pending at a time.
#[derive(Debug)]
pub struct Reloads {
    rx: mpsc::Receiver<()>,
}

impl Reloads {
    /// Waits for the next reload request; `None` once the signal listener has stopped.
    pub async fn recv(&mut self) -> Option<()> {
        self.rx.recv().await
    }

    /// The requests as a `futures::Stream`.
    pub fn into_stream(self) -> impl futures::Stream<Item = ()> + Send + Unpin {
        Box::pin(futures::stream::unfold(self, |mut r| async move {
            r.recv().await.map(|()| ((), r))
        }))
    }
}

/// What [`install`] returns: the shutdown latch the signals trigger, and the reload requests.
#[derive(Debug)]
pub struct Signals {
    /// Triggered by SIGINT or SIGTERM (reason `"SIGINT"` / `"SIGTERM"`).
    pub shutdown: Shutdown,
    /// One item per SIGHUP (coalesced).
    pub reloads: Reloads,
}

/// Installs the SIGINT, SIGTERM and SIGHUP handlers (replacing the default "terminate" action for
/// the rest of the process's life) and starts the task that turns them into [`Signals`]. Call it
/// inside a tokio runtime, before anything that may take long, so an early SIGTERM is not lost.
pub fn install() -> io::Result<Signals> {
    install_with(Shutdown::new())
}

/// [`install`], triggering an existing latch.
pub fn install_with(shutdown: Shutdown) -> io::Result<Signals> {
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let (reload_tx, reload_rx) = mpsc::channel(1);
    let latch = shutdown.clone();
    tokio::spawn(async move {
        loop {
            let (name, code) = tokio::select! {
                Some(()) = int.recv() => ("SIGINT", 130),
                Some(()) = term.recv() => ("SIGTERM", 143),
                Some(()) = hup.recv() => {
                    tracing::info!("SIGHUP: reload requested");
                    // Full means a reload is already pending: this one is covered by it.
                    let _ = reload_tx.try_send(());
                    continue;
                }
                else => return,
            };
            if latch.trigger(name) {
                tracing::info!(
                    signal = name,
                    "shutting down (send it again to exit at once)"
                );
            } else {
                tracing::warn!(signal = name, "second signal during shutdown; exiting now");
                std::process::exit(code);
            }
        }
    });
    Ok(Signals {
        shutdown,
        reloads: Reloads { rx: reload_rx },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_triggered_latch_wakes_every_waiter_and_keeps_the_first_reason() {
        let s = Shutdown::new();
        let waiters: Vec<_> = (0..3).map(|_| tokio::spawn(s.clone().wait())).collect();
        assert!(!s.is_triggered());
        assert!(s.trigger("first"));
        assert!(!s.trigger("second"));
        for w in waiters {
            tokio::time::timeout(Duration::from_secs(5), w)
                .await
                .unwrap()
                .unwrap();
        }
        assert_eq!(s.reason().as_deref(), Some("first"));
        // Waiting after the fact returns at once.
        tokio::time::timeout(Duration::from_secs(1), s.wait())
            .await
            .unwrap();
    }
}
