//! Durable file primitives: atomic replace (temp, fsync, rename, fsync dir) and guarded reads that
//! refuse symlinks and non-regular files.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
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

/// Opens `path` for reading and writing, creating it with mode 0600, never truncating it and never
/// following a symlink: the shape of every long-lived file the state directory holds open (locks,
/// the revision counter).
pub fn open_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
}

/// Fsyncs a directory so that renames and unlinks in it are durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Replaces `target` with `bytes` atomically: a 0600 temp file in `tmp_dir` (same file system),
/// rename over `target`. With `durable`, the temp file is fsynced before the rename and `target`'s
/// directory after it, so the write survives a machine crash once this returns.
pub fn write_atomic(tmp_dir: &Path, target: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    let tmp = tmp_dir.join(format!(
        "{}.{}.tmp",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
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
pub fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
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
    file.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(ReadError::Io)?;
    if buf.len() as u64 > max {
        return Err(ReadError::TooLarge(buf.len() as u64));
    }
    Ok(buf)
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
    let filled = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
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
