//! Which files of one directory changed, from inotify, read on the tokio runtime.
//!
//! The watch only asks for what changes a file's content or presence: a write closed
//! (`IN_CLOSE_WRITE`), a rename in or out (`IN_MOVED_TO`/`IN_MOVED_FROM`, which is also how every
//! store write and delete lands), a create, a delete, an attribute change. Not for opens, reads or
//! each `write(2)` — a general-purpose watcher (the `notify` crate, used before) subscribes to
//! those too, so every read of an object file by any process, the watch's own re-reads included,
//! woke the watcher, which had to be filtered out again: 5 % of all CPU during a burst, and one
//! extra thread per watched kind.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// What the directory watch asks the kernel for.
fn mask() -> AddWatchFlags {
    AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ONLYDIR
}

struct Fd(Inotify);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Changes seen since the last call: file names, and whether the caller must rescan the
/// directory because events were lost (queue overflow) or the directory itself went away.
#[derive(Debug, Default)]
pub struct Changes {
    pub names: HashSet<String>,
    pub rescan: bool,
}

/// An inotify watch on one directory (not recursive).
pub struct DirWatch {
    fd: AsyncFd<Fd>,
    dir: PathBuf,
    wd: Option<WatchDescriptor>,
    /// Device and inode of the directory the watch was added to.
    watched: Option<(u64, u64)>,
}

impl DirWatch {
    /// An inotify instance for `dir`, not watching yet; see [`DirWatch::watch`]. Needs a tokio
    /// runtime with I/O enabled.
    pub fn new(dir: &Path) -> io::Result<DirWatch> {
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        // SAFETY: `Fd` owns the inotify descriptor for as long as the AsyncFd holds it, and always
        // returns that same descriptor.
        let fd = unsafe { AsyncFd::register_with_interest(Fd(ino), Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(DirWatch {
            fd,
            dir: dir.to_path_buf(),
            wd: None,
            watched: None,
        })
    }

    /// Starts (or restarts) watching the directory at its path. Fails if it does not exist.
    pub fn watch(&mut self) -> io::Result<()> {
        if let Some(wd) = self.wd.take() {
            let _ = self.fd.get_ref().0.rm_watch(wd);
        }
        self.wd = Some(self.fd.get_ref().0.add_watch(&self.dir, mask())?);
        // Looked at after the watch was added: a directory swapped in between is caught by the
        // next look at [`DirWatch::is_current`].
        self.watched = identity(&self.dir);
        Ok(())
    }

    /// Whether the directory at the path is still the one watched. A directory whose *parent*
    /// was moved away and replaced (`mv objects objects.old; mv objects.new objects`) sends no
    /// event to its watch, which goes on watching the old one: only looking at the path tells.
    pub fn is_current(&self) -> bool {
        self.wd.is_some() && self.watched.is_some() && identity(&self.dir) == self.watched
    }

    /// Whether the directory is being watched (it stops being when it is deleted or moved).
    pub fn is_watching(&self) -> bool {
        self.wd.is_some()
    }

    /// Waits for events and returns all that are queued. After `rescan` because the directory
    /// went away, [`DirWatch::is_watching`] is false until [`DirWatch::watch`] succeeds again.
    pub async fn changes(&mut self) -> io::Result<Changes> {
        let mut out = Changes::default();
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| fd.get_ref().0.read_events().map_err(io::Error::from)) {
                Ok(Ok(events)) => {
                    for ev in events {
                        self.take(ev, &mut out);
                    }
                    // More may be queued than one read returns: take those too, without waiting.
                    while let Ok(events) = self.fd.get_ref().0.read_events() {
                        for ev in events {
                            self.take(ev, &mut out);
                        }
                    }
                    return Ok(out);
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    fn take(&mut self, ev: nix::sys::inotify::InotifyEvent, out: &mut Changes) {
        let gone = AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF
            | AddWatchFlags::IN_IGNORED
            | AddWatchFlags::IN_UNMOUNT;
        if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
            out.rescan = true;
        }
        if ev.mask.intersects(gone) && Some(ev.wd) == self.wd {
            // The directory at our path is not the one watched any more.
            if let Some(wd) = self.wd.take() {
                let _ = self.fd.get_ref().0.rm_watch(wd);
            }
            out.rescan = true;
            return;
        }
        if Some(ev.wd) != self.wd {
            return;
        }
        if let Some(n) = ev
            .name
            .as_ref()
            .and_then(|n| super::object_name_of(Path::new(n)))
        {
            out.names.insert(n);
        }
    }
}

/// Device and inode of `dir`, if it can be looked at.
fn identity(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_directory_replaced_by_moving_its_parent_is_not_current_until_watched_again() {
        let d = tempfile::tempdir().unwrap();
        let (objects, dir) = (d.path().join("objects"), d.path().join("objects/tasks"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = DirWatch::new(&dir).unwrap();
        w.watch().unwrap();
        assert!(w.is_current());
        // A copy of the tree swapped in: the watched directory itself never moved.
        std::fs::create_dir_all(d.path().join("objects.new/tasks")).unwrap();
        std::fs::rename(&objects, d.path().join("objects.old")).unwrap();
        std::fs::rename(d.path().join("objects.new"), &objects).unwrap();
        assert!(w.is_watching(), "no event tells the watch");
        assert!(!w.is_current(), "but the path names another directory now");
        w.watch().unwrap();
        assert!(w.is_current());
        std::fs::write(dir.join("d.json"), "{}").unwrap();
        until(&mut w, |c| c.names.contains("d")).await;
    }

    /// Collects changes until `done` holds for everything collected (10 s at most).
    async fn until(w: &mut DirWatch, done: impl Fn(&Changes) -> bool) -> Changes {
        let mut all = Changes::default();
        let collect = async {
            while !done(&all) {
                let c = w.changes().await.unwrap();
                all.names.extend(c.names);
                all.rescan |= c.rescan;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), collect)
            .await
            .expect("the expected events within 10 s");
        all
    }

    #[tokio::test]
    async fn a_rename_into_the_directory_is_reported_by_object_name() {
        let d = tempfile::tempdir().unwrap();
        let mut w = DirWatch::new(d.path()).unwrap();
        w.watch().unwrap();
        std::fs::write(d.path().join("staged"), "{}").unwrap();
        std::fs::rename(d.path().join("staged"), d.path().join("a.json")).unwrap();
        let c = until(&mut w, |c| c.names.contains("a")).await;
        assert_eq!(c.names.len(), 1, "only object files count: {c:?}");
    }

    #[tokio::test]
    async fn reading_a_file_is_not_a_change() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.json"), "{}").unwrap();
        let mut w = DirWatch::new(d.path()).unwrap();
        w.watch().unwrap();
        let _ = std::fs::read(d.path().join("a.json")).unwrap();
        // Events arrive in order: once b's write is in, a's read would have been too.
        std::fs::write(d.path().join("b.json"), "{}").unwrap();
        let c = until(&mut w, |c| c.names.contains("b")).await;
        assert!(
            !c.names.contains("a"),
            "the read of a.json was reported: {c:?}"
        );
    }

    #[tokio::test]
    async fn a_deleted_directory_asks_for_a_rescan_and_is_watched_again_once_back() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("tasks");
        std::fs::create_dir(&dir).unwrap();
        let mut w = DirWatch::new(&dir).unwrap();
        w.watch().unwrap();
        std::fs::remove_dir(&dir).unwrap();
        until(&mut w, |c| c.rescan).await;
        assert!(!w.is_watching());
        std::fs::create_dir(&dir).unwrap();
        w.watch().unwrap();
        std::fs::write(dir.join("c.json"), "{}").unwrap();
        until(&mut w, |c| c.names.contains("c")).await;
    }
}
