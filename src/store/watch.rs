//! Watching one kind: inotify on the kind's directory (raw `inotify(7)` through `nix`, see
//! `inotify`) says which files changed; a periodic relist catches anything inotify dropped or
//! overflowed. Events are diffs against the revisions the watcher already knows, so every change
//! since the starting list is delivered, in order per object.

use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;

use super::fsio::FileId;
use super::inotify::DirWatch;
use super::{fsio, object_name_of, read_object_file, ReadFailure, Store, StoreError};
use crate::resources::meta::Resource;

/// One change to an object of the watched kind.
#[derive(Debug, Clone)]
pub enum WatchEvent<K> {
    /// An object the watcher did not know.
    Added(K),
    /// A known object with a new resourceVersion.
    Modified(K),
    /// A known object is gone; its name and last known resourceVersion.
    Deleted { name: String, resource_version: u64 },
    /// The watch could not read its directory; it retries on its own (relist with backoff).
    Error(String),
}

/// Tuning for a watch.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// How often the whole directory is rescanned regardless of inotify.
    pub relist_interval: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            relist_interval: Duration::from_secs(30),
        }
    }
}

/// A running watch; dropping it stops the watcher.
pub struct Watch<K> {
    rx: mpsc::UnboundedReceiver<WatchEvent<K>>,
    task: tokio::task::JoinHandle<()>,
}

impl<K> Watch<K> {
    /// The next event; `None` only once the watcher stopped.
    pub async fn next(&mut self) -> Option<WatchEvent<K>> {
        self.rx.recv().await
    }
}

impl<K> Drop for Watch<K> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the watcher remembers of one object: its revision and the identity of the file holding it.
#[derive(Clone, Copy)]
struct Known {
    revision: u64,
    file: FileId,
}

struct Watcher_<K> {
    dir: PathBuf,
    known: HashMap<String, Known>,
    /// Files already reported as unreadable, with the version seen, so each is reported once.
    reported: HashMap<String, FileId>,
    tx: mpsc::UnboundedSender<WatchEvent<K>>,
    _k: PhantomData<K>,
}

impl Store {
    /// Watches kind `K`, starting from `known` (the objects of a list the caller already has):
    /// everything that differs from it is delivered as an event. Must be called inside a tokio
    /// runtime.
    pub fn watch<K: Resource>(
        &self,
        known: &[K],
        opts: WatchOptions,
    ) -> Result<Watch<K>, StoreError> {
        let dir = self.kind_dir(K::PLURAL);
        if self.inner.writer.is_some() {
            fsio::ensure_durable_dir(&dir).map_err(|e| StoreError::io(&dir, e))?;
        }
        let mut inotify = DirWatch::new(&dir).map_err(|e| StoreError::io(&dir, e))?;
        let watching = inotify.watch();
        let (tx, rx) = mpsc::unbounded_channel();
        let mut w = Watcher_::<K> {
            dir: dir.clone(),
            known: known
                .iter()
                .map(|o| {
                    (
                        o.name().to_string(),
                        Known {
                            revision: o.revision(),
                            file: FileId::default(),
                        },
                    )
                })
                .collect(),
            reported: HashMap::new(),
            tx,
            _k: PhantomData,
        };
        let task = tokio::spawn(async move {
            let mut watching = watching.is_ok();
            let mut retry = Duration::from_millis(800);
            // Catch up on anything written between the caller's list and the inotify watch.
            w.relist();
            let mut relist = tokio::time::interval_at(
                tokio::time::Instant::now() + opts.relist_interval,
                opts.relist_interval,
            );
            relist.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                if !watching {
                    // The directory could not be watched (it does not exist yet, say, in a
                    // read-only store, or it was removed): relist and retry with backoff until it
                    // can be.
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(Duration::from_secs(30));
                    watching = inotify.watch().is_ok();
                    if watching {
                        retry = Duration::from_millis(800);
                    }
                    w.relist();
                    if w.tx.is_closed() {
                        return;
                    }
                    continue;
                }
                tokio::select! {
                    changes = inotify.changes() => match changes {
                        Ok(c) if c.rescan => {
                            w.relist();
                            watching = inotify.is_watching();
                        }
                        Ok(c) => {
                            for n in c.names {
                                w.check(&n);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(dir = %w.dir.display(), "cannot read inotify events: {e}; relisting");
                            w.relist();
                            watching = false;
                        }
                    },
                    _ = relist.tick() => {
                        // A directory swapped in under the watch (its parent replaced) sends no
                        // event: found here, it is watched from now on.
                        if !inotify.is_current() {
                            tracing::info!(dir = %w.dir.display(), "the directory was replaced; watching the new one");
                            watching = inotify.watch().is_ok();
                        }
                        w.relist();
                    }
                }
                if w.tx.is_closed() {
                    return;
                }
            }
        });
        Ok(Watch { rx, task })
    }
}

impl<K: Resource> Watcher_<K> {
    fn send(&self, ev: WatchEvent<K>) {
        let _ = self.tx.send(ev);
    }

    /// Re-reads one object's file and emits whatever changed. A `stat` that fails other than with
    /// "no such file" says nothing of whether the object is there: the object is left as it is
    /// known, and the next rescan looks again (its file's version still differs from the known
    /// one if it changed).
    fn check(&mut self, name: &str) {
        let path = self.dir.join(format!("{name}.json"));
        match FileId::at(&path) {
            Ok(file) => self.check_version(name, file),
            Err(e) => self.skip(name, &e),
        }
    }

    /// Leaves `name` as it is known this round: its file could not be looked at (`e`).
    fn skip(&self, name: &str, e: &std::io::Error) {
        tracing::warn!(
            path = %self.dir.join(format!("{name}.json")).display(),
            error = %e,
            "cannot look at an object file; keeping what is known of it until the next rescan"
        );
    }

    /// Like [`Self::check`] with the file's version already known (`None`: there is no file).
    fn check_version(&mut self, name: &str, file: Option<FileId>) {
        let path = self.dir.join(format!("{name}.json"));
        let Some(file) = file else {
            self.reported.remove(name);
            match self.known.remove(name) {
                Some(k) => self.send(WatchEvent::Deleted {
                    name: name.to_string(),
                    resource_version: k.revision,
                }),
                // Made and removed before it could be read: no version of it is known (0). A
                // process that put the object in its cache by itself (read-your-writes) learns
                // it is gone, after asking the store (any version it has is newer than 0).
                None => self.send(WatchEvent::Deleted {
                    name: name.to_string(),
                    resource_version: 0,
                }),
            }
            return;
        };
        match read_object_file::<K>(&path, K::PLURAL, name) {
            Ok(obj) => {
                self.reported.remove(name);
                let revision = obj.revision();
                match self.known.get_mut(name) {
                    Some(k) if k.revision == revision => k.file = file,
                    Some(k) => {
                        *k = Known { revision, file };
                        self.send(WatchEvent::Modified(obj));
                    }
                    None => {
                        self.known
                            .insert(name.to_string(), Known { revision, file });
                        self.send(WatchEvent::Added(obj));
                    }
                }
            }
            Err(ReadFailure::Missing) => self.check_version(name, None),
            Err(ReadFailure::Bad(reason)) => {
                if self.reported.insert(name.to_string(), file) != Some(file) {
                    tracing::warn!(path = %path.display(), %reason, "skipping unreadable object file");
                }
            }
        }
    }

    /// Rescans the directory: stats every file, re-reads those whose inode or ctime changed, and reports
    /// deletions of names no longer present.
    fn relist(&mut self) {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let gone: Vec<String> = self.known.keys().cloned().collect();
                for n in gone {
                    self.check_version(&n, None);
                }
                return;
            }
            Err(e) => {
                self.send(WatchEvent::Error(format!("{}: {e}", self.dir.display())));
                return;
            }
        };
        let scan = entries.filter_map(|entry| {
            entry
                .map(|entry| {
                    let name = object_name_of(&entry.path())?;
                    let file = match entry.metadata() {
                        Ok(m) => Ok(Some(FileId::of(&m))),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                        Err(e) => Err(e),
                    };
                    Some((name, file))
                })
                .transpose()
        });
        self.rescan(scan);
    }

    /// The second half of [`Self::relist`]: takes what the directory scan found, per object file
    /// its name and version (`None`: gone since the directory was read), and reports what changed.
    /// A file whose `stat` failed is left as it is known; a scan that failed partway reports
    /// nothing gone (a name it did not reach may well be there) and an error, after which the
    /// caller lists the store again.
    fn rescan(
        &mut self,
        scan: impl Iterator<Item = std::io::Result<(String, std::io::Result<Option<FileId>>)>>,
    ) {
        let mut seen = HashSet::new();
        for entry in scan {
            let (name, file) = match entry {
                Ok(e) => e,
                Err(e) => {
                    self.send(WatchEvent::Error(format!(
                        "{}: reading the directory: {e}",
                        self.dir.display()
                    )));
                    return;
                }
            };
            seen.insert(name.clone());
            match (self.known.get(&name), file) {
                (Some(k), Ok(Some(i))) if k.file == i => {}
                (_, Ok(file)) => self.check_version(&name, file),
                (_, Err(e)) => self.skip(&name, &e),
            }
        }
        let gone: Vec<String> = self
            .known
            .keys()
            .filter(|n| !seen.contains(*n))
            .cloned()
            .collect();
        for n in gone {
            self.check_version(&n, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::Agent;
    use std::io;

    /// A watcher of `dir` that knows objects `a` and `b` at revision 1, and its event channel.
    fn watcher(dir: PathBuf) -> (Watcher_<Agent>, mpsc::UnboundedReceiver<WatchEvent<Agent>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let known = ["a", "b"]
            .into_iter()
            .map(|n| {
                let k = Known {
                    revision: 1,
                    file: FileId::default(),
                };
                (n.to_string(), k)
            })
            .collect();
        let w = Watcher_ {
            dir,
            known,
            reported: HashMap::new(),
            tx,
            _k: PhantomData,
        };
        (w, rx)
    }

    fn events(rx: &mut mpsc::UnboundedReceiver<WatchEvent<Agent>>) -> Vec<String> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|ev| match ev {
                WatchEvent::Added(o) => format!("added {}", o.metadata.name),
                WatchEvent::Modified(o) => format!("modified {}", o.metadata.name),
                WatchEvent::Deleted { name, .. } => format!("deleted {name}"),
                WatchEvent::Error(_) => "error".to_string(),
            })
            .collect()
    }

    #[test]
    fn a_file_that_cannot_be_looked_at_is_not_reported_deleted() {
        let d = tempfile::tempdir().unwrap();
        // Every stat below the "directory" fails with ENOTDIR, not with "no such file".
        let not_a_dir = d.path().join("agents");
        std::fs::write(&not_a_dir, b"").unwrap();
        let (mut w, mut rx) = watcher(not_a_dir);
        w.check("a");
        assert_eq!(events(&mut rx), Vec::<String>::new());
        assert!(w.known.contains_key("a"));
    }

    #[test]
    fn a_rescan_reports_nothing_gone_for_a_stat_error_or_a_directory_read_that_failed_partway() {
        let d = tempfile::tempdir().unwrap();
        let (mut w, mut rx) = watcher(d.path().to_path_buf());
        let eio = || io::Error::from_raw_os_error(nix::libc::EIO);
        // `a`'s stat failed; the directory read failed before it reached `b`.
        w.rescan([Ok(("a".to_string(), Err(eio()))), Err(eio())].into_iter());
        assert_eq!(events(&mut rx), ["error"]);
        assert!(w.known.contains_key("a") && w.known.contains_key("b"));
        // A whole scan in which `a`'s stat failed and `b` is missing: only `b` is gone.
        w.rescan([Ok(("a".to_string(), Err(eio())))].into_iter());
        assert_eq!(events(&mut rx), ["deleted b"]);
        assert!(w.known.contains_key("a"));
    }

    #[test]
    fn a_rescan_reports_a_file_gone_between_the_directory_read_and_its_stat() {
        let d = tempfile::tempdir().unwrap();
        let (mut w, mut rx) = watcher(d.path().to_path_buf());
        w.rescan([Ok(("a".to_string(), Ok(None)))].into_iter());
        let mut got = events(&mut rx);
        got.sort();
        assert_eq!(got, ["deleted a", "deleted b"]);
    }
}
