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
    use std::thread::JoinHandle;

    type Calls = Arc<AtomicUsize>;

    /// Waits until `n` requests have come in (each thread takes its number before it can block).
    fn until_requested(s: &Syncer, n: u64) {
        while s.requested() < n {
            std::thread::yield_now();
        }
    }

    /// A writer whose fsync is running and holds on until the sender is used (or dropped); it then
    /// succeeds.
    fn writer_in_fsync(
        s: &Arc<Syncer>,
        calls: &Calls,
    ) -> (JoinHandle<io::Result<()>>, mpsc::Sender<()>) {
        let (release, gate) = mpsc::channel::<()>();
        let before = calls.load(Ordering::SeqCst);
        let t = {
            let (s, calls) = (s.clone(), calls.clone());
            std::thread::spawn(move || {
                s.sync(|| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let _ = gate.recv();
                    Ok(())
                })
            })
        };
        while calls.load(Ordering::SeqCst) == before {
            std::thread::yield_now();
        }
        (t, release)
    }

    /// A writer whose fsync, if it runs one, ends at once: with an error if it is the fsync
    /// numbered `fail_on` (from 0) among all of them.
    fn writer_failing_on(
        s: &Arc<Syncer>,
        calls: &Calls,
        fail_on: Option<usize>,
    ) -> JoinHandle<io::Result<()>> {
        let (s, calls) = (s.clone(), calls.clone());
        std::thread::spawn(move || {
            s.sync(|| {
                if Some(calls.fetch_add(1, Ordering::SeqCst)) == fail_on {
                    return Err(io::Error::other("disk on fire"));
                }
                Ok(())
            })
        })
    }

    fn writer(s: &Arc<Syncer>, calls: &Calls) -> JoinHandle<io::Result<()>> {
        writer_failing_on(s, calls, None)
    }

    #[test]
    fn writers_that_arrive_during_an_fsync_share_the_next_one() {
        let (s, calls) = (Arc::new(Syncer::default()), Calls::default());
        let (first, release) = writer_in_fsync(&s, &calls);
        // Two writers come while the first fsync runs: it started before their renames, so it
        // does not cover them; one more fsync covers both.
        let later = [writer(&s, &calls), writer(&s, &calls)];
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
        let (s, calls) = (Arc::new(Syncer::default()), Calls::default());
        for _ in 0..3 {
            writer(&s, &calls).join().unwrap().unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_failed_fsync_covers_nobody_and_is_reported_to_its_caller() {
        let (s, calls) = (Arc::new(Syncer::default()), Calls::default());
        let (first, release) = writer_in_fsync(&s, &calls);
        // Two writers wait for the next fsync; it fails, so the one that ran it gets the error and
        // the other, which it would have covered, runs its own.
        let later = [
            writer_failing_on(&s, &calls, Some(1)),
            writer_failing_on(&s, &calls, Some(1)),
        ];
        until_requested(&s, 3);
        release.send(()).unwrap();
        assert!(first.join().unwrap().is_ok());
        let results: Vec<bool> = later.map(|t| t.join().unwrap().is_ok()).into();
        assert_eq!(results.iter().filter(|ok| **ok).count(), 1, "{results:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }
}
