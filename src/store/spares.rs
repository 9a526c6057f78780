//! Recycled inodes for the store's atomic writes.
//!
//! A write replaces an object file by renaming a fully written file over it. Allocating a fresh
//! inode for every write and freeing the old one was most of a write's cost on ext4 without a
//! journal, whose allocator scans past every inode freed in the last 30 s (1.2 ms a write once
//! thousands of writes had happened, against 0.3 ms when inodes are reused; docs/benchmarks.md).
//! So the store keeps up to [`SLOTS`] spare files, `<state>/tmp/spare-<k>`, and replaces an
//! existing object by *exchanging* it with a written spare (`renameat2(RENAME_EXCHANGE)`): the
//! old version's inode becomes the spare, to be truncated and reused by a later write. Deletes move
//! the file into an empty slot instead of unlinking it, and creates take a spare when one is free.
//!
//! Reuse is safe for readers because a spare is rewritten only [`QUARANTINE`] after it left the
//! object namespace, and readers compare the file's ctime and size before and after reading
//! (`fsio::read_regular`): rewriting a spare changes its ctime, so a reader that still held the old
//! version open reads the path again instead of returning a mix of two versions.
//!
//! The slot table is the file `<state>/spares`, read and written under the store lock, so every
//! process (daemon, shims, CLI) shares one pool. It is advisory and never fsynced: a slot that
//! names a missing file is simply refilled. It carries the boot id; after a machine crash the table
//! and every spare file are discarded rather than trusted, since an unfinished rename may have left
//! a spare linked where an object is.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::fsio;

/// How many spare files the pool keeps at most.
pub const SLOTS: usize = 64;

/// How long a released inode rests before it is rewritten: longer than the file system's timestamp
/// granularity, so that the rewrite's ctime differs from anything a reader saw before.
pub const QUARANTINE: Duration = Duration::from_millis(20);

/// Bytes of the table's header, which holds the boot id.
const HEADER: usize = 64;

/// Prefix of the spare files' names in the temp directory.
const SPARE_PREFIX: &str = "spare-";

/// Set once `renameat2(RENAME_EXCHANGE)` was refused by the file system: writes then rename.
static NO_EXCHANGE: AtomicBool = AtomicBool::new(false);

/// The shared pool of spare inodes; every method expects the caller to hold the store lock.
pub struct Pool {
    table: File,
    dir: PathBuf,
    boot: &'static str,
}

/// The slot table: per slot 0 for "no spare", else the CLOCK_BOOTTIME millisecond it was released
/// at, plus one.
struct Table {
    slots: [u64; SLOTS],
}

/// Where an atomic write's new content was written before it replaced the target.
struct Staged {
    path: PathBuf,
    slot: Option<usize>,
}

impl Pool {
    /// Opens the pool whose table is `table` and whose spares live in `dir` (the store's temp
    /// directory, on the objects' file system). `boot` is this machine run's boot id; an empty
    /// one disables reuse (every write allocates, as without a pool).
    pub fn open(table: &Path, dir: &Path, boot: &'static str) -> io::Result<Pool> {
        Ok(Pool {
            table: fsio::open_private(table)?,
            dir: dir.to_path_buf(),
            boot,
        })
    }

    /// Whether `name` (a file name in the temp directory) is one of the pool's spares.
    pub fn is_spare_name(name: &std::ffi::OsStr) -> bool {
        name.as_bytes()
            .strip_prefix(SPARE_PREFIX.as_bytes())
            .and_then(|k| std::str::from_utf8(k).ok())
            .and_then(|k| k.parse::<usize>().ok())
            .is_some_and(|k| k < SLOTS)
    }

    fn spare_path(&self, k: usize) -> PathBuf {
        self.dir.join(format!("{SPARE_PREFIX}{k}"))
    }

    /// Reads the table; a table from another boot (or none) is discarded with its spare files.
    fn load(&self) -> io::Result<Table> {
        let mut buf = [0u8; HEADER + SLOTS * 8];
        let n = self.table.read_at(&mut buf, 0)?;
        let header = String::from_utf8_lossy(&buf[..HEADER.min(n)]);
        if n < buf.len() || header.trim_end() != self.boot {
            for k in 0..SLOTS {
                let _ = fs::remove_file(self.spare_path(k));
            }
            return Ok(Table { slots: [0; SLOTS] });
        }
        let mut slots = [0u64; SLOTS];
        for (k, s) in slots.iter_mut().enumerate() {
            let at = HEADER + k * 8;
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[at..at + 8]);
            *s = u64::from_le_bytes(b);
        }
        Ok(Table { slots })
    }

    fn save(&self, t: &Table) -> io::Result<()> {
        let mut buf = Vec::with_capacity(HEADER + SLOTS * 8);
        buf.extend_from_slice(format!("{:<HEADER$}", self.boot).as_bytes());
        buf.truncate(HEADER);
        for s in t.slots {
            buf.extend_from_slice(&s.to_le_bytes());
        }
        self.table.write_all_at(&buf, 0)
    }

    /// Replaces (or, when `exists` is false, creates) `target` with `bytes` atomically: no reader
    /// ever sees a partial file. With `durable`, the data is fsynced before it replaces the target
    /// and the target's directory after, so the write survives a machine crash once this returns.
    pub fn write(
        &self,
        target: &Path,
        bytes: &[u8],
        durable: bool,
        exists: bool,
    ) -> io::Result<()> {
        if self.boot.is_empty() {
            return fsio::write_atomic(&self.dir, target, bytes, durable);
        }
        let mut table = self.load()?;
        let now = boottime_ms();
        let (staged, mut file) = self.stage(&mut table, now)?;
        let written = (|| {
            file.write_all(bytes)?;
            if durable {
                file.sync_all()?;
            }
            Ok(())
        })();
        drop(file);
        if let Err(e) = written {
            let _ = fs::remove_file(&staged.path);
            if let Some(k) = staged.slot {
                table.slots[k] = 0;
            }
            let _ = self.save(&table);
            return Err(e);
        }
        let exchanged = exists && !NO_EXCHANGE.load(Ordering::Relaxed) && {
            match exchange(&staged.path, target) {
                Ok(()) => true,
                Err(e) if is_unsupported(&e) => {
                    NO_EXCHANGE.store(true, Ordering::Relaxed);
                    false
                }
                // The target vanished (someone removed it by hand): a plain rename creates it.
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => {
                    let _ = fs::remove_file(&staged.path);
                    return Err(e);
                }
            }
        };
        match (exchanged, staged.slot) {
            // The old version now sits in the slot's file, resting until it may be rewritten.
            (true, Some(k)) => table.slots[k] = now + 1,
            (true, None) => {
                let _ = fs::remove_file(&staged.path);
            }
            (false, slot) => {
                if let Err(e) = fs::rename(&staged.path, target) {
                    let _ = fs::remove_file(&staged.path);
                    return Err(e);
                }
                if let Some(k) = slot {
                    table.slots[k] = 0;
                }
            }
        }
        if durable {
            if let Some(parent) = target.parent() {
                fsio::fsync_dir(parent)?;
            }
        }
        self.save(&table)
    }

    /// Removes `target`, keeping its inode as a spare when a slot is free.
    pub fn remove(&self, target: &Path, durable: bool) -> io::Result<()> {
        let mut table = if self.boot.is_empty() {
            None
        } else {
            Some(self.load()?)
        };
        let slot = table
            .as_ref()
            .and_then(|t| t.slots.iter().position(|s| *s == 0));
        match (table.as_mut(), slot) {
            (Some(t), Some(k)) => {
                fs::rename(target, self.spare_path(k))?;
                t.slots[k] = boottime_ms() + 1;
            }
            _ => fs::remove_file(target)?,
        }
        if durable {
            if let Some(parent) = target.parent() {
                fsio::fsync_dir(parent)?;
            }
        }
        match table {
            Some(t) => self.save(&t),
            None => Ok(()),
        }
    }

    /// Opens an empty file to write the new content into: a rested spare, else a new file in an
    /// empty slot, else a plain temp file outside the pool.
    fn stage(&self, table: &mut Table, now: u64) -> io::Result<(Staged, File)> {
        let rested = table
            .slots
            .iter()
            .position(|s| *s != 0 && now.saturating_sub(s - 1) >= QUARANTINE.as_millis() as u64);
        if let Some(k) = rested {
            table.slots[k] = 0;
            let path = self.spare_path(k);
            if let Ok(f) = reopen_spare(&path) {
                return Ok((
                    Staged {
                        path,
                        slot: Some(k),
                    },
                    f,
                ));
            }
            let _ = fs::remove_file(&path);
            return Ok((
                Staged {
                    path: path.clone(),
                    slot: Some(k),
                },
                create_new(&path)?,
            ));
        }
        if let Some(k) = table.slots.iter().position(|s| *s == 0) {
            let path = self.spare_path(k);
            // An empty slot should have no file; one left by a crashed writer is replaced.
            let _ = fs::remove_file(&path);
            return Ok((
                Staged {
                    path: path.clone(),
                    slot: Some(k),
                },
                create_new(&path)?,
            ));
        }
        let path = fsio::temp_path(&self.dir);
        let f = create_new(&path)?;
        Ok((Staged { path, slot: None }, f))
    }
}

/// Opens a spare for rewriting: a regular file with exactly one link (so it can be nothing but a
/// spare), emptied.
fn reopen_spare(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)?;
    let m = f.metadata()?;
    if !m.file_type().is_file() || m.nlink() != 1 {
        return Err(io::Error::other("not a lone regular file"));
    }
    f.set_len(0)?;
    Ok(f)
}

fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
}

/// Atomically swaps the directory entries `a` and `b` (both must exist).
fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    nix::fcntl::renameat2(None, a, None, b, nix::fcntl::RenameFlags::RENAME_EXCHANGE)
        .map_err(io::Error::from)
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EINVAL) | Some(nix::libc::ENOSYS) | Some(nix::libc::EOPNOTSUPP)
    )
}

/// Milliseconds since boot, suspend included: one clock for every process of this boot.
fn boottime_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn pool(dir: &Path) -> Pool {
        let tmp = dir.join("tmp");
        fs::create_dir_all(&tmp).unwrap();
        Pool::open(&dir.join("spares"), &tmp, "boot-a").unwrap()
    }

    fn rest() {
        std::thread::sleep(QUARANTINE + Duration::from_millis(5));
    }

    #[test]
    fn an_update_reuses_the_inode_of_an_earlier_version() {
        let d = tempfile::tempdir().unwrap();
        let p = pool(d.path());
        let target = d.path().join("x.json");
        p.write(&target, b"one", true, false).unwrap();
        let first = fs::metadata(&target).unwrap().ino();
        p.write(&target, b"two", true, true).unwrap();
        rest();
        p.write(&target, b"three", true, true).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"three");
        assert_eq!(
            fs::metadata(&target).unwrap().ino(),
            first,
            "the first version's inode came back once it had rested"
        );
    }

    #[test]
    fn a_resting_spare_is_not_rewritten() {
        let d = tempfile::tempdir().unwrap();
        let p = pool(d.path());
        let target = d.path().join("x.json");
        p.write(&target, b"one", false, false).unwrap();
        let mut held = File::open(&target).unwrap();
        p.write(&target, b"two", false, true).unwrap();
        p.write(&target, b"three", false, true).unwrap();
        let mut s = String::new();
        io::Read::read_to_string(&mut held, &mut s).unwrap();
        assert_eq!(s, "one", "a reader of the old version still sees it whole");
    }

    #[test]
    fn a_delete_keeps_the_inode_for_the_next_create() {
        let d = tempfile::tempdir().unwrap();
        let p = pool(d.path());
        let a = d.path().join("a.json");
        let b = d.path().join("b.json");
        p.write(&a, b"a", true, false).unwrap();
        let ino = fs::metadata(&a).unwrap().ino();
        p.remove(&a, true).unwrap();
        assert!(!a.exists());
        rest();
        p.write(&b, b"b", true, false).unwrap();
        assert_eq!(fs::metadata(&b).unwrap().ino(), ino);
        assert_eq!(fs::read(&b).unwrap(), b"b");
    }

    #[test]
    fn a_table_from_another_boot_is_discarded_with_its_spares() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("x.json");
        {
            let p = pool(d.path());
            p.write(&target, b"one", false, false).unwrap();
            p.write(&target, b"two", false, true).unwrap();
        }
        let spares = || {
            fs::read_dir(d.path().join("tmp"))
                .unwrap()
                .filter(|e| Pool::is_spare_name(&e.as_ref().unwrap().file_name()))
                .count()
        };
        assert_eq!(spares(), 1);
        let p = Pool::open(&d.path().join("spares"), &d.path().join("tmp"), "boot-b").unwrap();
        p.write(&target, b"three", false, true).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"three");
        assert_eq!(
            spares(),
            1,
            "the old boot's spare is gone; the new one holds 'two'"
        );
        let spare = d.path().join("tmp").join("spare-0");
        assert_eq!(fs::read(spare).unwrap(), b"two");
    }

    #[test]
    fn a_spare_linked_elsewhere_is_never_rewritten() {
        let d = tempfile::tempdir().unwrap();
        let p = pool(d.path());
        let target = d.path().join("x.json");
        p.write(&target, b"one", false, false).unwrap();
        p.write(&target, b"two", false, true).unwrap();
        // As an unfinished rename before a crash might leave it: the spare also linked elsewhere.
        let other = d.path().join("other.json");
        fs::hard_link(d.path().join("tmp").join("spare-0"), &other).unwrap();
        rest();
        p.write(&target, b"three", false, true).unwrap();
        assert_eq!(fs::read(&other).unwrap(), b"one");
        assert_eq!(fs::read(&target).unwrap(), b"three");
    }
}
