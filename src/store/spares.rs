//! Recycled inodes for the store's atomic writes.
//!
//! A write replaces an object file by renaming a fully written file over it. Allocating a fresh
//! inode for every write and freeing the old one was most of a write's cost on ext4 without a
//! journal, whose allocator skips, one by one, every recently freed inode of the group (1.2 ms a
//! write once thousands of writes had happened, against 0.3 ms when inodes are reused;
//! docs/benchmarks.md).
//! So the store keeps up to [`SLOTS`] spare files, `<state>/tmp/spare-<k>`, and replaces an
//! existing object by *exchanging* it with a written spare (`renameat2(RENAME_EXCHANGE)`): the
//! old version's inode becomes the spare, to be overwritten and reused by a later write. Deletes move
//! the file into an empty slot instead of unlinking it, and creates take a spare when one is free.
//!
//! Reuse is safe for readers because a spare is rewritten only after a quarantine (at least
//! [`QUARANTINE`]) since it left the object namespace, and readers compare the file's ctime and
//! size before and after reading (`fsio::read_regular`): rewriting a spare changes its ctime, so a
//! reader that still held the old version open reads the path again instead of returning a mix of
//! two versions. That holds only while the quarantine is longer than the file system's timestamp
//! granularity (plus a clock tick), so [`Pool::open`] looks at how fine the file system's ctimes
//! are and lengthens the quarantine past it: to two seconds and more on a file system that keeps
//! whole seconds (ext4 with 128-byte inodes, FAT). Writers do not rely on the ctime alone: an update
//! also confirms the resourceVersion it read (`Store::put_in_place`).
//!
//! Reuse is safe across a power loss because an inode becomes a spare only once the directory
//! change that took it out of the namespace is durable: a durable write keeps its slot [`Held`]
//! until its directory fsync is done ([`Pool::rest`]), and an inode that a non-durable write
//! replaced is unlinked, never kept. Otherwise a spare rewritten (and fdatasynced) before that
//! fsync could, after a crash, be what the old name still points to: an object lost, its file
//! holding another object. ext4 without a journal guards unlinked inodes the same way (its
//! allocator skips recently deleted ones); a pool that recycles them itself has to as well.
//!
//! The slot table is the file `<state>/spares`, read and written under the store lock, so every
//! process (daemon, shims, CLI) shares one pool. It is advisory and never fsynced: a slot that
//! names a missing file is simply refilled. It carries the boot id; after a machine crash the table
//! and every spare file are discarded rather than trusted, since an unfinished rename may have left
//! a spare linked where an object is.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::fsio;

/// How many spare files the pool keeps at most.
pub const SLOTS: usize = 64;

/// How long a released inode rests at least before it is rewritten, on a file system with
/// timestamps finer than a millisecond: longer than a clock tick (the kernel stamps ctimes from a
/// clock that advances once per tick, 10 ms at most), so that the rewrite's ctime differs from
/// anything a reader saw before. A pool on a coarser file system rests its spares longer (see
/// [`quarantine_for`]).
pub const QUARANTINE: Duration = Duration::from_millis(20);

/// How long spares must rest on a file system whose recorded ctimes have these nanosecond parts
/// (samples of timestamps the file system itself recorded): [`QUARANTINE`] beyond the
/// granularity the samples show, or just [`QUARANTINE`] when that is under a millisecond.
///
/// A sample's granularity is the largest power of ten dividing its nanoseconds; a whole second
/// (nanoseconds 0) is taken as two seconds, since FAT's 2-second times look the same. A file
/// system with fine timestamps shows a coarse sample by chance only (one in a million for a
/// millisecond), so the finest sample is taken: with two samples, a fine file system is taken
/// for a coarse one about once in 10^12 opens, and then only rests its spares longer. A coarse
/// file system can never show a fine sample.
pub fn quarantine_for(ctime_nsecs: &[i64]) -> Duration {
    let granularity = |nsec: i64| {
        if nsec <= 0 {
            return Duration::from_secs(2);
        }
        let (mut n, mut g) = (nsec as u64, 1u64);
        while n % 10 == 0 {
            n /= 10;
            g *= 10;
        }
        Duration::from_nanos(g)
    };
    let finest = ctime_nsecs
        .iter()
        .map(|n| granularity(*n))
        .min()
        .unwrap_or(Duration::from_secs(2));
    if finest < Duration::from_millis(1) {
        QUARANTINE
    } else {
        finest + QUARANTINE
    }
}

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
    /// How long a released spare rests before it is rewritten (see [`quarantine_for`]).
    quarantine: Duration,
}

/// The slot table: per slot 0 for "no spare", [`IN_USE`] plus a pid while a writer has the spare
/// staged, else the CLOCK_BOOTTIME millisecond it was released at, plus one.
struct Table {
    slots: [u64; SLOTS],
}

/// Slot value of a spare that a writer has taken and not yet put in place: this flag plus the
/// writer's pid, so that the slot of a writer that died in between can be taken back.
const IN_USE: u64 = 1 << 63;

/// New content written into a file of the pool (or a plain temp file), not yet in place. Made by
/// [`Pool::stage`] and consumed by [`Pool::commit`] or [`Pool::abandon`]; between the two the
/// store lock may be released, so that the data's fsync ([`Staged::sync`]) does not hold it.
#[derive(Debug)]
pub struct Staged {
    path: PathBuf,
    slot: Option<usize>,
    file: File,
}

impl Staged {
    /// Makes the staged data durable (`fdatasync`: the data and whatever metadata reading it back
    /// needs, such as the size; not the timestamps). Needs no lock: nobody else touches a staged
    /// file.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// A slot whose file left the object namespace by a durable write whose directory fsync is still
/// to come: it stays in use until [`Pool::rest`] (or [`Pool::forget`]) takes it.
#[must_use = "a held spare stays in use until it is rested or forgotten"]
#[derive(Debug)]
pub struct Held(usize);

/// The slot value of a spare this process has in use (staged, or held until an fsync).
fn in_use_by_me() -> u64 {
    IN_USE | u64::from(std::process::id())
}

fn slot_free(s: u64) -> bool {
    s == 0 || (s & IN_USE != 0 && !fsio::pid_alive((s & !IN_USE) as i32))
}

/// Whether slot value `s` is a spare that has rested `quarantine` by `now` (milliseconds).
fn slot_rested(s: u64, now: u64, quarantine: Duration) -> bool {
    s != 0 && s & IN_USE == 0 && now.saturating_sub(s - 1) >= quarantine.as_millis() as u64
}

impl Pool {
    /// Opens the pool whose table is `table` and whose spares live in `dir` (the store's temp
    /// directory, on the objects' file system). `boot` is this machine run's boot id; an empty
    /// one disables reuse (every write allocates, as without a pool).
    ///
    /// The quarantine comes from the ctimes of `dir` and of the table, which the file system
    /// holding the spares recorded (both are in the state directory, and the store renames
    /// between the temp and the objects directories, which only works within one file system).
    pub fn open(table: &Path, dir: &Path, boot: &'static str) -> io::Result<Pool> {
        let table = fsio::open_private(table)?;
        let samples = [
            table.metadata()?.ctime_nsec(),
            fs::metadata(dir)?.ctime_nsec(),
        ];
        let quarantine = quarantine_for(&samples);
        if quarantine > Duration::from_millis(100) {
            tracing::debug!(
                dir = %dir.display(),
                ?quarantine,
                "the file system keeps coarse timestamps; spare inodes rest longer before reuse"
            );
        }
        Ok(Pool {
            table,
            dir: dir.to_path_buf(),
            boot,
            quarantine,
        })
    }

    /// How long a released spare rests before it is rewritten.
    pub fn quarantine(&self) -> Duration {
        self.quarantine
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

    /// Replaces (or, when `exists` is false, creates) `target` with `bytes` atomically in one
    /// go: [`Pool::stage`], [`Staged::sync`] (with `durable`), [`Pool::commit`], and an fsync of
    /// the target's directory (with `durable`). The store splits these steps around its lock
    /// (`Store::put_in_place`); the tests use this one-hold form.
    #[cfg(test)]
    fn write(&self, target: &Path, bytes: &[u8], durable: bool, exists: bool) -> io::Result<()> {
        let staged = self.stage(bytes)?;
        if durable {
            if let Err(e) = staged.sync() {
                self.abandon(staged);
                return Err(e);
            }
        }
        let held = self.commit(staged, target, exists, durable)?;
        if durable {
            if let Some(parent) = target.parent() {
                fsio::fsync_dir(parent)?;
            }
        }
        if let Some(h) = held {
            self.rest(h);
        }
        Ok(())
    }

    /// Writes `bytes` into an empty file of the pool (a rested spare, else a new file in a free
    /// slot, else a plain temp file) and marks its slot in use. Under the store lock.
    pub fn stage(&self, bytes: &[u8]) -> io::Result<Staged> {
        if self.boot.is_empty() {
            let path = fsio::temp_path(&self.dir);
            return finish_staging(path.clone(), None, create_empty(&path), bytes);
        }
        let mut table = self.load()?;
        let now = boottime_ms();
        let mine = in_use_by_me();
        let (path, slot, file) = if let Some(k) = table
            .slots
            .iter()
            .position(|s| slot_rested(*s, now, self.quarantine))
        {
            let path = self.spare_path(k);
            let file = reopen_spare(&path).or_else(|_| create_empty(&path));
            (path, Some(k), file)
        } else if let Some(k) = table.slots.iter().position(|s| slot_free(*s)) {
            let path = self.spare_path(k);
            // A free slot should have no file; one left by a crashed writer is replaced.
            let file = create_empty(&path);
            (path, Some(k), file)
        } else {
            let path = fsio::temp_path(&self.dir);
            let file = create_empty(&path);
            (path, None, file)
        };
        if let (Some(k), Ok(_)) = (slot, &file) {
            table.slots[k] = mine;
            self.save(&table)?;
        }
        finish_staging(path, slot, file, bytes).inspect_err(|_| {
            if let Some(k) = slot {
                table.slots[k] = 0;
                let _ = self.save(&table);
            }
        })
    }

    /// Puts staged content in place: exchanges it with `target`, or, when `exists` is false,
    /// renames it there unless something is there already (`AlreadyExists`, and the staged content
    /// is given up): a create needs no look beforehand. Under the store lock.
    ///
    /// An exchanged-out old version stays in its slot, [`Held`] for the `durable` caller to
    /// [`Pool::rest`] once it fsynced the directory; a non-durable write removes it.
    pub fn commit(
        &self,
        staged: Staged,
        target: &Path,
        exists: bool,
        durable: bool,
    ) -> io::Result<Option<Held>> {
        let Staged { path, slot, file } = staged;
        drop(file);
        let exchanged = exists && !NO_EXCHANGE.load(Ordering::Relaxed) && {
            match exchange(&path, target) {
                Ok(()) => true,
                Err(e) if is_unsupported(&e) => {
                    NO_EXCHANGE.store(true, Ordering::Relaxed);
                    false
                }
                // The target vanished (someone removed it by hand): a plain rename creates it.
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => {
                    self.release(&path, slot, false);
                    return Err(e);
                }
            }
        };
        if exchanged {
            return Ok(match slot {
                Some(k) if durable => Some(Held(k)),
                _ => {
                    self.release(&path, slot, false);
                    None
                }
            });
        }
        let renamed = if exists {
            fs::rename(&path, target)
        } else {
            rename_noreplace(&path, target)
        };
        if let Err(e) = renamed {
            // Kept as a spare when it has a slot: it will be rewritten anyway.
            self.release(&path, slot, slot.is_some());
            return Err(e);
        }
        // The file is the object now; the slot is empty (and there is nothing at `path` to remove).
        self.mark(slot, false);
        Ok(None)
    }

    /// Lets a held spare rest from now on: the directory fsync that took it out of the object
    /// namespace is done. Under the store lock.
    pub fn rest(&self, held: Held) {
        self.mark(Some(held.0), true);
    }

    /// Gives up a held spare whose directory fsync failed: its file is unlinked (which the file
    /// system guards) rather than rewritten. Under the store lock.
    pub fn forget(&self, held: Held) {
        self.release(&self.spare_path(held.0), Some(held.0), false);
    }

    /// Gives staged content up (the target changed meanwhile, or its sync failed). Under the
    /// store lock.
    pub fn abandon(&self, staged: Staged) {
        let Staged { path, slot, file } = staged;
        drop(file);
        self.release(&path, slot, slot.is_some());
    }

    /// Ends a slot's use: `keep` leaves the file at `path` as a spare resting from now on, else
    /// the slot is emptied (and a file still at `path` removed).
    fn release(&self, path: &Path, slot: Option<usize>, keep: bool) {
        if !keep {
            let _ = fs::remove_file(path);
        }
        self.mark(slot, keep);
    }

    /// Records in the table that `slot` holds a spare resting from now on (`keep`) or is empty.
    fn mark(&self, slot: Option<usize>, keep: bool) {
        let Some(k) = slot else { return };
        if let Ok(mut table) = self.load() {
            table.slots[k] = if keep { boottime_ms() + 1 } else { 0 };
            let _ = self.save(&table);
        }
    }

    /// Removes `target`. A `durable` caller's inode is kept as a spare when a slot is free,
    /// [`Held`] until the caller fsynced the directory and calls [`Pool::rest`]. Under the store
    /// lock.
    pub fn remove(&self, target: &Path, durable: bool) -> io::Result<Option<Held>> {
        if self.boot.is_empty() || !durable {
            return fs::remove_file(target).map(|()| None);
        }
        let mut table = self.load()?;
        match table.slots.iter().position(|s| slot_free(*s)) {
            Some(k) => {
                fs::rename(target, self.spare_path(k))?;
                table.slots[k] = in_use_by_me();
                self.save(&table)?;
                Ok(Some(Held(k)))
            }
            None => fs::remove_file(target).map(|()| None),
        }
    }
}

/// Writes `bytes` over the start of `file` (`old_len` bytes long) and cuts what is left of the old
/// content. Overwriting in place instead of emptying the file first keeps its data blocks: no
/// blocks are freed and allocated again, and the later fsync has no allocation to write out.
fn finish_staging(
    path: PathBuf,
    slot: Option<usize>,
    file: io::Result<(File, u64)>,
    bytes: &[u8],
) -> io::Result<Staged> {
    let (file, old_len) = file?;
    let written = file.write_all_at(bytes, 0).and_then(|()| {
        let len = bytes.len() as u64;
        if old_len > len {
            file.set_len(len)
        } else {
            Ok(())
        }
    });
    if let Err(e) = written {
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    Ok(Staged { path, slot, file })
}

/// Opens a spare for rewriting: a regular file with exactly one link (so it can be nothing but a
/// spare). Returns it with its current length; [`finish_staging`] overwrites it. A spare that was
/// an object file someone wrote by hand may have other permissions: it becomes 0600 again, as
/// every file the store writes (invariant 8).
fn reopen_spare(path: &Path) -> io::Result<(File, u64)> {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)?;
    let m = f.metadata()?;
    if !m.file_type().is_file() || m.nlink() != 1 {
        return Err(io::Error::other("not a lone regular file"));
    }
    if m.permissions().mode() & 0o7777 != 0o600 {
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
    }
    Ok((f, m.len()))
}

/// Creates an empty file at `path` (length 0, for [`finish_staging`]), replacing whatever is
/// there: a file a crashed writer left, or one that is not a lone regular file. Tries the create
/// first, as there is nearly always nothing to remove.
fn create_empty(path: &Path) -> io::Result<(File, u64)> {
    let create = || {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)
    };
    let file = match create() {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::remove_file(path)?;
            create()?
        }
        other => other?,
    };
    Ok((file, 0))
}

/// Atomically swaps the directory entries `a` and `b` (both must exist).
fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    nix::fcntl::renameat2(None, a, None, b, nix::fcntl::RenameFlags::RENAME_EXCHANGE)
        .map_err(io::Error::from)
}

/// Set once `renameat2(RENAME_NOREPLACE)` was refused by the file system: creates then look first.
static NO_NOREPLACE: AtomicBool = AtomicBool::new(false);

/// Renames `from` to `to` unless `to` exists (a symlink counts): `AlreadyExists` then. Where the
/// file system cannot do that in one step, it looks and then renames, which is as exclusive under
/// the store lock that every writer holds.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    if !NO_NOREPLACE.load(Ordering::Relaxed) {
        match nix::fcntl::renameat2(
            None,
            from,
            None,
            to,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => return Ok(()),
            Err(e) => {
                let e = io::Error::from(e);
                if !is_unsupported(&e) {
                    return Err(e);
                }
                NO_NOREPLACE.store(true, Ordering::Relaxed);
            }
        }
    }
    if fsio::entry_kind(to)?.is_some() {
        return Err(io::Error::from(io::ErrorKind::AlreadyExists));
    }
    fs::rename(from, to)
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
    fn a_shorter_version_written_over_a_longer_spare_keeps_none_of_its_bytes() {
        let d = tempfile::tempdir().unwrap();
        let p = pool(d.path());
        let target = d.path().join("x.json");
        p.write(&target, b"a long first version", true, false)
            .unwrap();
        let first = fs::metadata(&target).unwrap().ino();
        p.write(&target, b"second", true, true).unwrap();
        rest();
        p.write(&target, b"third", true, true).unwrap();
        assert_eq!(
            fs::metadata(&target).unwrap().ino(),
            first,
            "the spare was reused"
        );
        assert_eq!(fs::read(&target).unwrap(), b"third");
    }

    #[test]
    fn a_resting_spare_is_not_rewritten() {
        let d = tempfile::tempdir().unwrap();
        let p = pool(d.path());
        let target = d.path().join("x.json");
        p.write(&target, b"one", true, false).unwrap();
        let mut held = File::open(&target).unwrap();
        p.write(&target, b"two", true, true).unwrap();
        p.write(&target, b"three", true, true).unwrap();
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
        let held = p.remove(&a, true).unwrap().expect("kept as a spare");
        assert!(!a.exists());
        p.rest(held);
        rest();
        p.write(&b, b"b", true, false).unwrap();
        assert_eq!(fs::metadata(&b).unwrap().ino(), ino);
        assert_eq!(fs::read(&b).unwrap(), b"b");
    }

    fn inode(p: &Path) -> u64 {
        fs::metadata(p).unwrap().ino()
    }

    fn temp_files(d: &Path) -> Vec<String> {
        fs::read_dir(d.join("tmp"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn an_old_version_is_not_reused_before_the_directory_fsync_that_replaced_it() {
        let d = tempfile::tempdir().unwrap();
        let p = pool(d.path());
        let (a, b) = (d.path().join("a.json"), d.path().join("b.json"));
        p.write(&a, b"a0", true, false).unwrap();
        let old = inode(&a);
        let staged = p.stage(b"a1").unwrap();
        staged.sync().unwrap();
        let held = p.commit(staged, &a, true, true).unwrap().expect("held");
        rest();
        // The replacing write has not synced its directory yet: a power loss now could leave
        // a.json naming the old inode, so nobody may write into it.
        p.write(&b, b"b0", true, false).unwrap();
        assert_ne!(inode(&b), old, "a held spare was rewritten");
        p.rest(held);
        rest();
        p.write(&b, b"b1", true, true).unwrap();
        assert_eq!(inode(&b), old, "a rested spare is reused");
        assert_eq!(fs::read(&b).unwrap(), b"b1");
    }

    #[test]
    fn a_deleted_file_is_not_reused_before_the_directory_fsync_of_the_delete() {
        let d = tempfile::tempdir().unwrap();
        let p = pool(d.path());
        let (a, b) = (d.path().join("a.json"), d.path().join("b.json"));
        p.write(&a, b"a", true, false).unwrap();
        let old = inode(&a);
        let held = p.remove(&a, true).unwrap().expect("held");
        rest();
        p.write(&b, b"b", true, false).unwrap();
        assert_ne!(inode(&b), old, "a held spare was rewritten");
        // Given up after a failed fsync: unlinked, never rewritten.
        p.forget(held);
        assert!(!d.path().join("tmp/spare-0").exists());
    }

    #[test]
    fn what_a_write_without_a_durable_directory_replaces_or_deletes_is_unlinked() {
        let d = tempfile::tempdir().unwrap();
        let p = pool(d.path());
        let a = d.path().join("a.json");
        p.write(&a, b"a0", false, false).unwrap();
        let held = File::open(&a).unwrap();
        p.write(&a, b"a1", false, true).unwrap();
        assert_eq!(
            held.metadata().unwrap().nlink(),
            0,
            "the old version is gone"
        );
        let held = File::open(&a).unwrap();
        assert!(p.remove(&a, false).unwrap().is_none());
        assert_eq!(
            held.metadata().unwrap().nlink(),
            0,
            "the deleted file is gone"
        );
    }

    #[test]
    fn an_update_made_without_a_free_slot_leaves_no_old_version_behind() {
        let d = tempfile::tempdir().unwrap();
        let p = pool(d.path());
        let a = d.path().join("a.json");
        p.write(&a, b"a0", true, false).unwrap();
        let mut t = p.load().unwrap();
        // Every slot in use by a live writer (this process): the write goes through a temp file.
        t.slots = [in_use_by_me(); SLOTS];
        p.save(&t).unwrap();
        p.write(&a, b"a1", true, true).unwrap();
        p.write(&a, b"a2", true, true).unwrap();
        assert_eq!(fs::read(&a).unwrap(), b"a2");
        assert_eq!(temp_files(d.path()), Vec::<String>::new());
    }

    #[test]
    fn a_staged_spare_is_never_handed_to_another_writer_until_it_is_committed() {
        let d = tempfile::tempdir().unwrap();
        let p = pool(d.path());
        let a = d.path().join("a.json");
        let b = d.path().join("b.json");
        p.write(&a, b"a0", true, false).unwrap();
        p.write(&a, b"a1", true, true).unwrap();
        rest();
        // One writer stages (and would sync outside the lock); another writes meanwhile.
        let staged = p.stage(b"a2").unwrap();
        p.write(&b, b"b0", true, false).unwrap();
        p.write(&b, b"b1", true, true).unwrap();
        staged.sync().unwrap();
        let _ = p.commit(staged, &a, true, false).unwrap();
        assert_eq!(fs::read(&a).unwrap(), b"a2");
        assert_eq!(fs::read(&b).unwrap(), b"b1");
    }

    #[test]
    fn the_slot_of_a_writer_that_died_while_staging_is_taken_back() {
        let d = tempfile::tempdir().unwrap();
        let p = pool(d.path());
        let mut t = p.load().unwrap();
        // Every slot held by a writer that no longer exists (pid above the kernel's limit).
        t.slots = [IN_USE | 4_194_305; SLOTS];
        p.save(&t).unwrap();
        let target = d.path().join("x.json");
        p.write(&target, b"one", true, false).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"one");
        assert!(
            !fs::read_dir(d.path().join("tmp")).unwrap().any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".tmp")),
            "a dead writer's slot was reused, not bypassed with a temp file"
        );
    }

    #[test]
    fn a_table_from_another_boot_is_discarded_with_its_spares() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("x.json");
        {
            let p = pool(d.path());
            p.write(&target, b"one", true, false).unwrap();
            p.write(&target, b"two", true, true).unwrap();
        }
        let spares = || {
            fs::read_dir(d.path().join("tmp"))
                .unwrap()
                .filter(|e| Pool::is_spare_name(&e.as_ref().unwrap().file_name()))
                .count()
        };
        assert_eq!(spares(), 1);
        let p = Pool::open(&d.path().join("spares"), &d.path().join("tmp"), "boot-b").unwrap();
        p.write(&target, b"three", true, true).unwrap();
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
        p.write(&target, b"one", true, false).unwrap();
        p.write(&target, b"two", true, true).unwrap();
        // As an unfinished rename before a crash might leave it: the spare also linked elsewhere.
        let other = d.path().join("other.json");
        fs::hard_link(d.path().join("tmp").join("spare-0"), &other).unwrap();
        rest();
        p.write(&target, b"three", true, true).unwrap();
        assert_eq!(fs::read(&other).unwrap(), b"one");
        assert_eq!(fs::read(&target).unwrap(), b"three");
    }

    #[test]
    fn spares_rest_past_the_timestamp_granularity_the_file_systems_ctimes_show() {
        let ms = Duration::from_millis;
        // Nanosecond timestamps (ext4 with large inodes, tmpfs, xfs, btrfs).
        assert_eq!(quarantine_for(&[123_456_789, 987_654_320]), QUARANTINE);
        // Whole seconds (ext4 with 128-byte inodes): past 2 s, in case they are FAT's 2 s.
        assert_eq!(quarantine_for(&[0, 0]), ms(2000) + QUARANTINE);
        assert!(quarantine_for(&[0, 0]) > ms(1000) + QUARANTINE);
        // Hundredths of a second.
        assert_eq!(
            quarantine_for(&[730_000_000, 10_000_000]),
            ms(10) + QUARANTINE
        );
        // One fine sample shows a fine file system; a round one was chance.
        assert_eq!(quarantine_for(&[0, 123_456_789]), QUARANTINE);
        assert_eq!(quarantine_for(&[]), ms(2000) + QUARANTINE);
    }

    #[test]
    fn a_spare_is_not_reused_before_the_pools_quarantine_for_a_coarse_file_system() {
        let d = tempfile::tempdir().unwrap();
        let mut p = pool(d.path());
        p.quarantine = quarantine_for(&[0, 0]);
        let target = d.path().join("x.json");
        p.write(&target, b"one", true, false).unwrap();
        let first = inode(&target);
        p.write(&target, b"two", true, true).unwrap();
        rest();
        p.write(&target, b"three", true, true).unwrap();
        assert_ne!(
            inode(&target),
            first,
            "reused within the file system's tick"
        );
        assert_eq!(fs::read(&target).unwrap(), b"three");
    }

    #[test]
    fn a_file_a_crashed_writer_left_in_a_free_slot_is_replaced_not_written_through() {
        let d = tempfile::tempdir().unwrap();
        let p = pool(d.path());
        // The table says slot 0 is free, but a file is there, also linked elsewhere.
        let leftover = d.path().join("tmp").join("spare-0");
        fs::write(&leftover, b"left over").unwrap();
        let other = d.path().join("other.json");
        fs::hard_link(&leftover, &other).unwrap();
        let target = d.path().join("x.json");
        p.write(&target, b"new", true, false).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"new");
        assert_eq!(fs::read(&other).unwrap(), b"left over");
    }
}
