//! Group commit of directory fsyncs within one process.
//!
//! A durable write ends with an fsync of its object's directory, which makes its rename (and every
//! rename into that directory before the fsync began) survive a crash. When several threads of one
//! process write into the same directory at once — the daemon's lease workers recording outcomes,
//! say — one fsync that starts after all their renames covers them all. So a writer that finds an
//! fsync of its directory already running waits for it to end and then either is covered by the
//! next one, which one of the waiters starts for all of them, or starts it itself.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::fsio;

/// One [`Syncer`] per directory, made on first use.
#[derive(Default)]
pub struct DirSyncs {
    dirs: Mutex<HashMap<PathBuf, Arc<Syncer>>>,
}

impl DirSyncs {
    /// Makes every rename into `dir` that finished before this call durable: by an fsync of `dir`
    /// that starts after the call began, this caller's own or another thread's.
    pub fn sync(&self, dir: &Path) -> io::Result<()> {
        let syncer = {
            let mut dirs = lock(&self.dirs);
            dirs.entry(dir.to_path_buf()).or_default().clone()
        };
        syncer.sync(|| fsio::fsync_dir(dir))
    }
}

/// The fsyncs of one directory: requests are numbered as they come, and an fsync covers every
/// request numbered before it started.
#[derive(Default)]
pub struct Syncer {
    state: Mutex<State>,
    done: Condvar,
}

#[derive(Default)]
struct State {
    /// The number of the latest request.
    requested: u64,
    /// Every request up to this number is covered by a finished fsync.
    synced: u64,
    /// Whether an fsync is running.
    running: bool,
}

impl Syncer {
    /// Runs `fsync` unless one that starts after this call is run by another thread (and
    /// succeeds) first. An error is returned to the caller whose `fsync` failed; the callers it
    /// would have covered run their own.
    pub fn sync(&self, fsync: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let mut st = lock(&self.state);
        st.requested += 1;
        let mine = st.requested;
        loop {
            if st.synced >= mine {
                return Ok(());
            }
            if !st.running {
                st.running = true;
                let covers = st.requested;
                drop(st);
                let result = fsync();
                let mut st = lock(&self.state);
                st.running = false;
                if result.is_ok() {
                    st.synced = st.synced.max(covers);
                }
                self.done.notify_all();
                return result;
            }
            st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// How many requests have come so far (for tests that line threads up).
    #[cfg(test)]
    fn requested(&self) -> u64 {
        lock(&self.state).requested
    }
}

/// A poisoned lock still holds consistent counters: every update is one assignment.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    /// Waits until `n` requests have come in (each thread takes its number before it can block).
    fn until_requested(s: &Syncer, n: u64) {
        while s.requested() < n {
            std::thread::yield_now();
        }
    }

    #[test]
    fn writers_that_arrive_during_an_fsync_share_the_next_one() {
        let s = Arc::new(Syncer::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let (release, gate) = mpsc::channel::<()>();
        let first = {
            let (s, calls) = (s.clone(), calls.clone());
            std::thread::spawn(move || {
                s.sync(|| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    gate.recv().map_err(io::Error::other)
                })
            })
        };
        until_requested(&s, 1);
        while calls.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        // Two writers come while the first fsync runs: it started before their renames, so it
        // does not cover them; one more fsync covers both.
        let later: Vec<_> = (0..2)
            .map(|_| {
                let (s, calls) = (s.clone(), calls.clone());
                std::thread::spawn(move || {
                    s.sync(|| {
                        calls.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    })
                })
            })
            .collect();
        until_requested(&s, 3);
        release.send(()).unwrap();
        assert!(first.join().unwrap().is_ok());
        for t in later {
            assert!(t.join().unwrap().is_ok());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_writer_after_a_finished_fsync_runs_its_own() {
        let s = Syncer::default();
        let calls = AtomicUsize::new(0);
        for _ in 0..3 {
            s.sync(|| {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_failed_fsync_covers_nobody_and_is_reported_to_its_caller() {
        let s = Arc::new(Syncer::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let (release, gate) = mpsc::channel::<()>();
        let failing = {
            let (s, calls) = (s.clone(), calls.clone());
            std::thread::spawn(move || {
                s.sync(|| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    gate.recv().map_err(io::Error::other)?;
                    Err(io::Error::other("disk on fire"))
                })
            })
        };
        until_requested(&s, 1);
        while calls.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        let waiter = {
            let (s, calls) = (s.clone(), calls.clone());
            std::thread::spawn(move || {
                s.sync(|| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                })
            })
        };
        until_requested(&s, 2);
        release.send(()).unwrap();
        assert!(failing.join().unwrap().is_err());
        assert!(
            waiter.join().unwrap().is_ok(),
            "the waiter ran its own fsync"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
