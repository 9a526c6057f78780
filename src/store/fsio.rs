//! Durable file primitives: atomic replace (temp, fsync, rename, fsync dir) and guarded reads that
//! refuse symlinks and non-regular files.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Creates `dir` and its parents with mode 0700; an existing symlink or non-directory is refused.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    match fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_dir() => Ok(()),
        Ok(_) => Err(io::Error::other(format!(
            "{} exists and is not a directory (symlinks are not followed)",
            dir.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir),
        Err(e) => Err(e),
    }
}

/// Like [`ensure_private_dir`], and every directory it creates is made durable: each is created
/// on its own and its parent fsynced, so that a power loss cannot drop a new kind directory (and
/// every object durably written into it) from a file system that does not order metadata, such as
/// ext4 without a journal. An existing directory costs one `lstat`, as before, and loses any
/// group and other permissions (see [`tighten_dir`]): only the store calls this, on directories
/// it owns (the state, objects, temp and kind directories), which are 0700 (invariant 8).
pub fn ensure_durable_dir(dir: &Path) -> io::Result<()> {
    match fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_dir() => tighten_dir(dir, &m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            create_durably(dir)?;
            // Judges what a concurrent writer may have made there meanwhile.
            ensure_private_dir(dir)
        }
        _ => ensure_private_dir(dir),
    }
}

/// Creates the missing `dir` and its missing ancestors (mode 0700), each followed by an fsync of
/// its parent. Existing ancestors are taken as they are, symlinks included.
fn create_durably(dir: &Path) -> io::Result<()> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(p) = parent {
        match fs::metadata(p) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => create_durably(p)?,
            Err(e) => return Err(e),
            Ok(_) => {}
        }
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        // Made by another writer meanwhile, which may not have synced its parent yet: this
        // writer's object must not be durable before its directory is.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        other => other?,
    }
    fsync_dir(parent.unwrap_or(Path::new(".")))
}

/// Opens `path` for reading and writing, creating it with mode 0600, never truncating it and never
/// following a symlink: the shape of every long-lived file the state directory holds open (locks,
/// the revision counter, the spare table). An existing file of this process's user loses any
/// group and other permissions, as every file the store keeps is 0600 (invariant 8).
pub fn open_private(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)?;
    let m = file.metadata()?;
    if let Some(mode) = tightened(&m, 0o600) {
        file.set_permissions(fs::Permissions::from_mode(mode))?;
    }
    Ok(file)
}

/// Takes group and other permissions away from the directory `dir` (whose `lstat` is `m`), if it
/// has any and belongs to this process's effective user: the mode becomes its owner bits alone
/// (0700 for any usable state directory). A directory of another user is left as it is; the store
/// does not own it. Costs nothing when there is nothing to take away; otherwise the directory is
/// opened without following links and changed through its descriptor.
pub fn tighten_dir(dir: &Path, m: &fs::Metadata) -> io::Result<()> {
    if tightened(m, 0o700).is_none() {
        return Ok(());
    }
    let d = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_DIRECTORY)
        .open(dir)?;
    // Looked at again through the descriptor: what is there now may not be what `m` described.
    if let Some(mode) = tightened(&d.metadata()?, 0o700) {
        d.set_permissions(fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// The mode to set on a file or directory described by `m` so that it keeps at most the bits of
/// `private` (0600 or 0700); `None` when it already does, or when it belongs to another user.
fn tightened(m: &fs::Metadata, private: u32) -> Option<u32> {
    let mode = m.mode() & 0o7777;
    let mine = m.uid() == nix::unistd::geteuid().as_raw();
    (mine && mode & !private != 0).then_some(mode & private)
}

/// Fsyncs a directory so that renames and unlinks in it are durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A fresh temp file name in `tmp_dir`: `<pid>.<seq>.tmp`, so that a cleaner can tell whose it is.
pub fn temp_path(tmp_dir: &Path) -> std::path::PathBuf {
    tmp_dir.join(format!(
        "{}.{}.tmp",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ))
}

/// The pid a temp file name made by [`temp_path`] belongs to.
pub fn temp_owner(name: &std::ffi::OsStr) -> Option<i32> {
    let name = name.to_str()?;
    let (pid, rest) = name.split_once('.')?;
    rest.ends_with(".tmp").then_some(())?;
    pid.parse().ok()
}

/// Replaces `target` with `bytes` atomically: a 0600 temp file in `tmp_dir` (same file system),
/// rename over `target`. With `durable`, the temp file is fsynced before the rename and `target`'s
/// directory after it, so the write survives a machine crash once this returns.
pub fn write_atomic(tmp_dir: &Path, target: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    let tmp = temp_path(tmp_dir);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        fs::rename(&tmp, target)?;
        if let Some(parent) = target.parent().filter(|_| durable) {
            fsync_dir(parent)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Why a file in the objects directory could not be read as an object.
#[derive(Debug)]
pub enum ReadError {
    /// The file does not exist (any more).
    Missing,
    /// A symlink, FIFO, device or directory where a regular file belongs.
    NotRegular(&'static str),
    /// Larger than the per-object limit.
    TooLarge(u64),
    Io(io::Error),
}

/// Reads a regular file of at most `max` bytes without following symlinks or blocking on FIFOs.
///
/// The store recycles the inodes of replaced versions (see `spares`), so a file that was open
/// while its version was replaced may later be rewritten. The read is therefore checked: the
/// file's ctime and size must be the same after reading as before, or the path is read again.
pub fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    const TRIES: usize = 64;
    for _ in 0..TRIES {
        if let Some(bytes) = read_regular_once(path, max)? {
            return Ok(bytes);
        }
    }
    Err(ReadError::Io(io::Error::other(format!(
        "it changed while being read, {TRIES} times in a row"
    ))))
}

/// One read; `None` when the file changed while it was read.
fn read_regular_once(path: &Path, max: u64) -> Result<Option<Vec<u8>>, ReadError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path);
    let file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ReadError::Missing),
        // O_NOFOLLOW on a symlink fails with ELOOP.
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
            return Err(ReadError::NotRegular("a symlink"))
        }
        Err(e) => return Err(ReadError::Io(e)),
    };
    read_opened(&file, path, max)
}

/// Reads `file`, opened at `path`; `None` when it changed while it was read, or when `path` no
/// longer names it. The second matters to a reader that stalled between its open and its first
/// `fstat`: meanwhile the version it opened may have been replaced at `path` and, after the
/// quarantine, its inode rewritten with another object, which both `fstat`s would agree on.
fn read_opened(file: &File, path: &Path, max: u64) -> Result<Option<Vec<u8>>, ReadError> {
    let meta = file.metadata().map_err(ReadError::Io)?;
    let ft = meta.file_type();
    if !ft.is_file() {
        return Err(ReadError::NotRegular(if ft.is_dir() {
            "a directory"
        } else if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        }));
    }
    if meta.len() > max {
        return Err(ReadError::TooLarge(meta.len()));
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    let reader = file;
    reader
        .take(max + 1)
        .read_to_end(&mut buf)
        .map_err(ReadError::Io)?;
    let after = file.metadata().map_err(ReadError::Io)?;
    if !same_version(&meta, &after) || buf.len() as u64 != meta.len() {
        return Ok(None);
    }
    if FileId::at(path).ok().flatten() != Some(FileId::of(&after)) {
        return Ok(None);
    }
    Ok(Some(buf))
}

/// Whether two `stat`s of one open file saw the same content: same version and size.
fn same_version(before: &fs::Metadata, after: &fs::Metadata) -> bool {
    FileId::of(before) == FileId::of(after) && before.len() == after.len()
}

/// Which version of a file sits at a path, as `stat` tells it: inode and ctime. Every store write
/// puts a different inode in place, or a recycled one that was rewritten and exchanged in after
/// its quarantine (see `spares`), which the pool makes longer than the file system's timestamp
/// granularity so that its ctime has moved. A changed `FileId` therefore means a changed file; an
/// unchanged one means an unchanged file only as far as the ctime's granularity and the
/// quarantine can tell. A writer that must not replace a version it did not read also compares
/// the resourceVersion (`Store::put_in_place`).
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
pub struct FileId {
    inode: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl FileId {
    /// The version `m` describes.
    pub fn of(m: &fs::Metadata) -> FileId {
        #[cfg(test)]
        if tests::CTIME_FROZEN.get() {
            return FileId {
                inode: m.ino(),
                ..FileId::default()
            };
        }
        FileId {
            inode: m.ino(),
            ctime: m.ctime(),
            ctime_nsec: m.ctime_nsec(),
        }
    }

    /// The version of what sits at `path` (not following links); `None` when nothing does.
    pub fn at(path: &Path) -> io::Result<Option<FileId>> {
        match fs::symlink_metadata(path) {
            Ok(m) => Ok(Some(FileId::of(&m))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Whether process `pid` exists (EPERM counts as existing). For telling whose temp and spare
/// files may still be in use.
pub fn pid_alive(pid: i32) -> bool {
    pid > 0
        && !matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        )
}

/// An exclusive `flock` on a file the caller keeps open, released when dropped. Locking the
/// descriptor itself rather than a duplicate saves a `dup` and a `close` per hold, and a store
/// takes its lock twice for every write.
pub struct Exclusive<'a>(&'a File);

impl<'a> Exclusive<'a> {
    /// Blocks until the lock is held.
    pub fn lock(file: &'a File) -> io::Result<Exclusive<'a>> {
        loop {
            // SAFETY: flock(2) on a descriptor that `file` keeps open for the guard's lifetime.
            if unsafe { nix::libc::flock(file.as_raw_fd(), nix::libc::LOCK_EX) } == 0 {
                return Ok(Exclusive(file));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Drop for Exclusive<'_> {
    fn drop(&mut self) {
        // SAFETY: as in `lock`; closing the file would release the lock anyway.
        unsafe {
            nix::libc::flock(self.0.as_raw_fd(), nix::libc::LOCK_UN);
        }
    }
}

/// What sits at `path` without following links: `None` when nothing does.
pub fn entry_kind(path: &Path) -> io::Result<Option<fs::FileType>> {
    match fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(m.file_type())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// A random RFC 4122 version-4 UUID from the kernel's generator.
pub fn new_uid() -> String {
    let mut b = [0u8; 16];
    // One getrandom(2) call instead of opening, reading and closing /dev/urandom: every create
    // (a Lease and three Events per run) takes a uid.
    // SAFETY: `b` is valid for writes of `b.len()` bytes for the duration of the call.
    let got = unsafe { nix::libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    let filled = if got == b.len() as isize {
        Ok(())
    } else {
        File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b))
    };
    if filled.is_err() {
        // Fall back to time and pid; uniqueness matters, unpredictability does not.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b[..16].copy_from_slice(&(now ^ ((std::process::id() as u128) << 64)).to_le_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::Cell;
    use std::os::unix::fs::PermissionsExt;

    thread_local! {
        /// While set, [`FileId::of`] on this thread sees every ctime as the same: what a file
        /// system with coarse timestamps shows of writes that fall within one tick of its clock.
        pub(crate) static CTIME_FROZEN: Cell<bool> = const { Cell::new(false) };
    }

    #[test]
    fn a_durable_dir_creates_every_missing_level_private_through_a_symlinked_ancestor() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        fs::create_dir(&real).unwrap();
        fs::set_permissions(&real, fs::Permissions::from_mode(0o755)).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let target = link.join("state/objects/tasks");
        ensure_durable_dir(&target).unwrap();
        for level in ["state", "state/objects", "state/objects/tasks"] {
            let m = fs::symlink_metadata(real.join(level)).unwrap();
            assert!(m.is_dir(), "{level}");
            assert_eq!(m.permissions().mode() & 0o777, 0o700, "{level}");
        }
        let kept = fs::symlink_metadata(&real).unwrap().permissions().mode() & 0o777;
        assert_eq!(kept, 0o755, "an existing ancestor keeps its mode");
        ensure_durable_dir(&target).unwrap();
    }

    #[test]
    fn a_durable_dir_refuses_a_symlink_or_file_where_the_directory_belongs() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, b"x").unwrap();
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        for p in [&file, &link] {
            let err = ensure_durable_dir(p).unwrap_err();
            assert!(err.to_string().contains("is not a directory"), "{err}");
        }
        assert!(ensure_durable_dir(&file.join("below")).is_err());
    }

    #[test]
    fn a_same_size_rewrite_after_the_quarantine_is_seen_as_another_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        fs::write(&path, b"{\"n\": 1}").unwrap();
        let f = File::open(&path).unwrap();
        let before = f.metadata().unwrap();
        std::thread::sleep(crate::store::spares::QUARANTINE);
        let mut w = OpenOptions::new().write(true).open(&path).unwrap();
        w.set_len(0).unwrap();
        w.write_all(b"{\"n\": 2}").unwrap();
        let after = f.metadata().unwrap();
        assert_eq!(before.len(), after.len());
        assert!(!same_version(&before, &after));
        assert!(same_version(&after, &f.metadata().unwrap()));
    }

    #[test]
    fn a_read_of_an_inode_since_replaced_at_its_path_and_rewritten_is_not_returned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        fs::write(&path, b"{\"name\": \"x\"}").unwrap();
        // The reader opens x, then stalls before it looks at what it opened.
        let opened = File::open(&path).unwrap();
        // Meanwhile x is replaced, and its old inode (kept as a spare) rewritten with y.
        let spare = dir.path().join("spare");
        fs::hard_link(&path, &spare).unwrap();
        let next = dir.path().join("next");
        fs::write(&next, b"{\"name\": \"x\", \"v\": 2}").unwrap();
        fs::rename(&next, &path).unwrap();
        fs::write(&spare, b"{\"name\": \"y\"}").unwrap();

        assert_eq!(read_opened(&opened, &path, 1024).unwrap(), None);
        assert_eq!(
            read_regular(&path, 1024).unwrap(),
            b"{\"name\": \"x\", \"v\": 2}"
        );
    }

    #[test]
    fn uids_are_version_4_uuids_and_never_repeat() {
        let uids: std::collections::HashSet<String> = (0..1000).map(|_| new_uid()).collect();
        assert_eq!(uids.len(), 1000);
        for u in &uids {
            let parts: Vec<&str> = u.split('-').collect();
            let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
            assert_eq!(lens, [8, 4, 4, 4, 12], "{u}");
            assert!(parts[2].starts_with('4'), "version 4: {u}");
            assert!("89ab".contains(&parts[3][..1]), "RFC 4122 variant: {u}");
            assert!(u.chars().all(|c| c == '-' || c.is_ascii_hexdigit()), "{u}");
        }
    }
}
