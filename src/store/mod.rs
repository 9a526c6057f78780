//! The object store: one pretty JSON file per object under `<state>/objects/<plural>/<name>.json`,
//! a global revision, optimistic concurrency, cross-process write serialization (flock), atomic and
//! durable writes, and a watch API (inotify plus periodic relist).
//!
//! The store knows object envelopes (`metadata`, `spec`, `status`) and nothing about what any kind
//! means.

mod dirsync;
pub mod fsio;
mod inotify;
mod owner;
pub mod revision;
pub mod selector;
pub mod spares;
pub mod watch;

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::resources::meta::{now_rfc3339, Resource};
use crate::resources::validate::validate_name;
pub use selector::Selector;
pub use watch::{Watch, WatchEvent, WatchOptions};

/// Largest object (and input document) the store accepts.
pub const MAX_OBJECT_BYTES: u64 = 1024 * 1024;

/// The file in a state directory whose lock serializes the store's writers.
pub const STORE_LOCK_FILE: &str = "store.lock";

/// Room kept for what the scheduler writes into an object's status (a Task's outcome, retry
/// message and write-backs; an Agent's or Queue's counters).
pub const STATUS_RESERVE: u64 = 64 * 1024;

/// Largest object `apply` admits, as stored: an object at the store's limit could never have its
/// status written, and its task would stay Pending beside a finished run for good.
pub const MAX_APPLIED_BYTES: u64 = MAX_OBJECT_BYTES - STATUS_RESERVE;

/// What went wrong in a store operation. `Display` reads like kubectl's server messages.
#[derive(Debug)]
pub enum StoreError {
    NotFound {
        plural: String,
        name: String,
    },
    AlreadyExists {
        plural: String,
        name: String,
    },
    /// A stale resourceVersion: someone else wrote the object since it was read.
    Conflict {
        plural: String,
        name: String,
    },
    /// The object itself is unacceptable (bad name, too large).
    Invalid {
        plural: String,
        name: String,
        message: String,
    },
    /// Something on disk is not what the store wrote: a symlink, a FIFO, a torn file.
    Refused {
        path: PathBuf,
        message: String,
    },
    /// The store was opened read-only.
    ReadOnly,
    Io {
        path: PathBuf,
        source: io::Error,
    },
}

impl StoreError {
    /// The kubectl-style reason: `NotFound`, `AlreadyExists`, `Conflict`, `Invalid`, …
    pub fn reason(&self) -> &'static str {
        match self {
            StoreError::NotFound { .. } => "NotFound",
            StoreError::AlreadyExists { .. } => "AlreadyExists",
            StoreError::Conflict { .. } => "Conflict",
            StoreError::Invalid { .. } => "Invalid",
            StoreError::Refused { .. } => "Forbidden",
            StoreError::ReadOnly => "MethodNotAllowed",
            StoreError::Io { .. } => "InternalError",
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }
    pub fn is_already_exists(&self) -> bool {
        matches!(self, StoreError::AlreadyExists { .. })
    }

    fn io(path: &Path, source: io::Error) -> StoreError {
        StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::NotFound { plural, name } => write!(f, "{plural} {name:?} not found"),
            StoreError::AlreadyExists { plural, name } => {
                write!(f, "{plural} {name:?} already exists")
            }
            StoreError::Conflict { plural, name } => write!(
                f,
                "Operation cannot be fulfilled on {plural} {name:?}: the object has been modified; \
                 please apply your changes to the latest version and try again"
            ),
            StoreError::Invalid {
                plural,
                name,
                message,
            } => write!(f, "{plural} {name:?} is invalid: {message}"),
            StoreError::Refused { path, message } => {
                write!(f, "refusing {}: {message}", path.display())
            }
            StoreError::ReadOnly => write!(f, "the store is open read-only"),
            StoreError::Io { path, source } => write!(f, "{}: {source}", path.display()),
        }
    }
}

impl std::error::Error for StoreError {}

/// A file in the objects directory that could not be read as an object; reported, then skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

/// The result of a list: the objects, the store revision when it was taken, and what was skipped.
#[derive(Debug, Clone)]
pub struct List<T> {
    pub items: Vec<T>,
    pub revision: u64,
    pub skipped: Vec<Skipped>,
}

/// How a write changed the stored object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    Created,
    Updated,
    /// Nothing differed; nothing was written.
    Unchanged,
}

/// Handle to a state directory's object store. Cheap to clone; safe to share between threads.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
    /// Whether writes through this handle are fsynced (see [`Store::relaxed`]).
    durable: bool,
}

struct Inner {
    root: PathBuf,
    objects: PathBuf,
    tmp: PathBuf,
    /// What writing needs, held open; `None` when read-only.
    writer: Option<WriteSide>,
    /// The directory fsyncs of this process's writers, shared when they overlap.
    dir_syncs: dirsync::DirSyncs,
}

/// The flock file (serializes writers across processes) and, behind a mutex that serializes this
/// process's threads, the revision file and the spare files.
struct WriteSide {
    lock: File,
    state: Mutex<Writer>,
}

struct Writer {
    revision: File,
    spares: spares::Pool,
}

impl Store {
    /// Opens (creating with mode 0700 if needed) the store in `root` for reading and writing.
    ///
    /// The store's directories (`root`, `objects`, every kind directory, `tmp`) and its own files
    /// (the lock, the revision counter, the spare table) are made private if they are not, as
    /// invariant 8 wants them whoever made them: group and other permissions are taken away from
    /// those that belong to this user. Object files are left as they are (a spare that was one
    /// becomes 0600 before it is reused) and so is anything else in the state directory.
    pub fn open(root: impl AsRef<Path>) -> Result<Store, StoreError> {
        let root = root.as_ref().to_path_buf();
        owner::check(&root)?;
        let objects = root.join("objects");
        let tmp = root.join("tmp");
        for d in [&root, &objects, &tmp] {
            fsio::ensure_durable_dir(d).map_err(|e| StoreError::io(d, e))?;
        }
        for kind in fs::read_dir(&objects).map_err(|e| StoreError::io(&objects, e))? {
            let kind = kind.map_err(|e| StoreError::io(&objects, e))?;
            let dir = kind.path();
            match kind.metadata() {
                Ok(m) if m.file_type().is_dir() => {
                    fsio::tighten_dir(&dir, &m).map_err(|e| StoreError::io(&dir, e))?
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io(&dir, e)),
            }
        }
        let open = |p: &Path| fsio::open_private(p).map_err(|e| StoreError::io(p, e));
        let spares_path = root.join("spares");
        let writer = WriteSide {
            lock: open(&root.join(STORE_LOCK_FILE))?,
            state: Mutex::new(Writer {
                revision: open(&root.join("revision"))?,
                spares: spares::Pool::open(&spares_path, &tmp, revision::boot_id())
                    .map_err(|e| StoreError::io(&spares_path, e))?,
            }),
        };
        let store = Store {
            inner: Arc::new(Inner {
                root,
                objects,
                tmp,
                writer: Some(writer),
                dir_syncs: Default::default(),
            }),
            durable: true,
        };
        Ok(store)
    }

    /// Opens the store for reading only: creates nothing, takes no lock. A missing state directory
    /// reads as empty.
    pub fn open_read_only(root: impl AsRef<Path>) -> Store {
        let root = root.as_ref().to_path_buf();
        Store {
            inner: Arc::new(Inner {
                objects: root.join("objects"),
                tmp: root.join("tmp"),
                root,
                writer: None,
                dir_syncs: Default::default(),
            }),
            durable: true,
        }
    }

    /// A handle on the same store whose writes are atomic but not durable: temp file and rename,
    /// no fsync. Readers never see a half-written object, but a machine crash may lose the latest
    /// writes or leave a torn file (reported and skipped like any other). Only for best-effort
    /// records that nothing is decided from, such as Events; objects that carry decisions are
    /// always written through a durable handle (DESIGN.md invariant 8).
    pub fn relaxed(&self) -> Store {
        Store {
            inner: self.inner.clone(),
            durable: false,
        }
    }

    /// Whether writes through this handle are fsynced.
    pub fn is_durable(&self) -> bool {
        self.durable
    }

    /// The state directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Directory holding the objects of one kind.
    pub fn kind_dir(&self, plural: &str) -> PathBuf {
        self.inner.objects.join(plural)
    }

    /// The file holding object `name` of kind `plural` (whether or not it exists).
    pub fn object_path(&self, plural: &str, name: &str) -> PathBuf {
        self.kind_dir(plural).join(format!("{name}.json"))
    }

    /// Removes temp files a crashed writer left behind. A write spans two holds of the store lock
    /// (it stages its file in the first, syncs it outside the lock and puts it in place in the
    /// second), so holding the lock does not mean no write is in flight: a file is kept if it is
    /// one of the spare pool's (never removed here; the pool accounts for them) or if its name
    /// says it belongs to another live process (a writer between its holds, or one that writes
    /// outside the store lock, such as the instance lock's holder file). This
    /// process's own temp files are removed, so it must be called before this process writes:
    /// the scheduler calls it when it starts, before its controllers; a shim does not (it would
    /// take the store lock once more per run for nothing).
    pub fn remove_orphaned_temp_files(&self) -> Result<(), StoreError> {
        self.with_lock(|_| {
            let entries =
                fs::read_dir(&self.inner.tmp).map_err(|e| StoreError::io(&self.inner.tmp, e))?;
            for e in entries.flatten() {
                let name = e.file_name();
                if spares::Pool::is_spare_name(&name) {
                    continue;
                }
                let owner_alive = fsio::temp_owner(&name)
                    .is_some_and(|pid| pid as u32 != std::process::id() && fsio::pid_alive(pid));
                if !owner_alive {
                    let _ = fs::remove_file(e.path());
                }
            }
            Ok(())
        })
    }

    /// Runs `f` holding the in-process mutex and the cross-process flock.
    fn with_lock<R>(
        &self,
        f: impl FnOnce(&mut Writer) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let Some(writer) = &self.inner.writer else {
            return Err(StoreError::ReadOnly);
        };
        let mut state = writer.state.lock().unwrap_or_else(|p| p.into_inner());
        let _held = fsio::Exclusive::lock(&writer.lock)
            .map_err(|e| StoreError::io(&self.inner.root.join(STORE_LOCK_FILE), e))?;
        f(&mut state)
    }

    /// The current global revision: the last one any writer may have handed out. Where the
    /// counter file is missing, empty or unreadable, the highest revision a stored object holds,
    /// which the next write re-bases the counter on.
    pub fn revision(&self) -> Result<u64, StoreError> {
        let path = self.inner.root.join("revision");
        let counter = match fs::read_to_string(&path) {
            Ok(s) => revision::Counter::parse(&s),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(StoreError::io(&path, e)),
        };
        match counter {
            Some(c) => Ok(c.last_handed_out(revision::boot_id())),
            None => self
                .highest_stored_revision()
                .map_err(|e| StoreError::io(&path, e)),
        }
    }

    /// Takes the next revision (see [`revision`]: a crash leaves a gap, never a repeat). A
    /// counter file that is missing, empty or unreadable is re-based on the highest revision a
    /// stored object holds, with a warning; if the objects cannot be looked at, the write is
    /// refused with an error naming the counter file.
    fn next_revision(&self, w: &mut Writer) -> Result<u64, StoreError> {
        let path = self.inner.root.join("revision");
        revision::take_next(&w.revision, revision::boot_id(), || {
            let floor = self.highest_stored_revision().map_err(|e| {
                io::Error::other(format!(
                    "the revision counter is missing or unreadable, and re-basing it on the \
                     stored objects failed: {e}"
                ))
            })?;
            // A new store's counter file starts empty: nothing to warn of.
            if floor > 0 || w.revision.metadata().is_ok_and(|m| m.len() > 0) {
                tracing::warn!(
                    path = %path.display(),
                    revision = floor,
                    "the revision counter was missing or unreadable; re-based it on the highest \
                     resourceVersion among the stored objects"
                );
            }
            Ok(floor)
        })
        .map_err(|e| StoreError::io(&path, e))
    }

    /// The highest `metadata.resourceVersion` among the objects in `objects/*/*.json`, for
    /// re-basing a lost revision counter. Files that are not objects the store wrote (not regular,
    /// too large, not JSON, no numeric resourceVersion) are passed over, as a list passes them
    /// over; a directory that cannot be read, or a file that cannot be read for another reason,
    /// is an error naming it, since the highest revision might be there.
    fn highest_stored_revision(&self) -> io::Result<u64> {
        let with_path =
            |p: &Path, e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", p.display()));
        let objects = &self.inner.objects;
        let kinds = match fs::read_dir(objects) {
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(with_path(objects, e)),
        };
        let mut highest = 0;
        for kind in kinds {
            let kind = kind.map_err(|e| with_path(objects, e))?;
            // The store never follows links; anything but a directory holds no objects.
            if !kind
                .file_type()
                .map_err(|e| with_path(&kind.path(), e))?
                .is_dir()
            {
                continue;
            }
            let dir = kind.path();
            for entry in fs::read_dir(&dir).map_err(|e| with_path(&dir, e))? {
                let path = entry.map_err(|e| with_path(&dir, e))?.path();
                if object_name_of(&path).is_none() {
                    continue;
                }
                let bytes = match fsio::read_regular(&path, MAX_OBJECT_BYTES) {
                    Ok(b) => b,
                    Err(fsio::ReadError::Io(e)) => return Err(with_path(&path, e)),
                    Err(_) => continue,
                };
                let rv = resource_version_in(&bytes).and_then(|rv| rv.parse::<u64>().ok());
                highest = highest.max(rv.unwrap_or(0));
            }
        }
        Ok(highest)
    }

    // ----- raw (JSON) operations: the CLI uses these for kinds chosen at run time -----

    /// Reads one object as JSON.
    pub fn get_raw(&self, plural: &str, name: &str) -> Result<Value, StoreError> {
        self.read_obj(plural, name)?
            .ok_or_else(|| not_found(plural, name))
    }

    fn read_obj<T: DeserializeOwned + HasName>(
        &self,
        plural: &str,
        name: &str,
    ) -> Result<Option<T>, StoreError> {
        if validate_name(name).is_err() {
            return Ok(None);
        }
        let path = self.object_path(plural, name);
        match read_object_file::<T>(&path, plural, name) {
            Ok(v) => Ok(Some(v)),
            Err(ReadFailure::Missing) => Ok(None),
            Err(ReadFailure::Bad(reason)) => Err(StoreError::Refused {
                path,
                message: reason,
            }),
        }
    }

    /// Lists the objects of one kind as JSON, optionally filtered by a label selector.
    pub fn list_raw(
        &self,
        plural: &str,
        selector: Option<&Selector>,
    ) -> Result<List<Value>, StoreError> {
        self.list_as::<Value>(plural, selector)
    }

    fn list_as<T: DeserializeOwned + HasName + Send>(
        &self,
        plural: &str,
        selector: Option<&Selector>,
    ) -> Result<List<T>, StoreError> {
        let revision = self.revision()?;
        let dir = self.kind_dir(plural);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(List {
                    items: Vec::new(),
                    revision,
                    skipped: Vec::new(),
                })
            }
            Err(e) => return Err(StoreError::io(&dir, e)),
        };
        let mut paths = Vec::new();
        let mut skipped = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io(&dir, e))?;
            let path = entry.path();
            match object_name_of(&path) {
                Some(name) => paths.push((path, name)),
                None => skipped.push(Skipped {
                    path,
                    reason: "not an object file (expected <name>.json)".into(),
                }),
            }
        }
        let read = read_many::<T>(plural, paths);
        let mut items = Vec::with_capacity(read.len());
        for r in read {
            match r {
                Ok(obj) => {
                    if selector.is_none_or(|s| s.matches(&obj.labels())) {
                        items.push(obj)
                    }
                }
                Err(Some(s)) => skipped.push(s),
                Err(None) => {} // deleted while listing
            }
        }
        items.sort_by(|a, b| a.name().cmp(b.name()));
        Ok(List {
            items,
            revision,
            skipped,
        })
    }

    /// Creates an object; fails with AlreadyExists if one of that name exists. Sets uid,
    /// resourceVersion, generation 1 and creationTimestamp.
    pub fn create_raw(&self, plural: &str, obj: &Value) -> Result<Value, StoreError> {
        let name = name_of(obj).to_string();
        self.check_name(plural, &name)?;
        let path = self.object_path(plural, &name);
        loop {
            // No look at the path first: the exclusive rename that puts the object in place finds
            // out whether the name is taken (almost every create is of a free name, and looking
            // up a free name in a directory of many thousand files is not free).
            let (created, staged) =
                self.with_lock(|w| self.stage_locked(w, plural, &name, as_created(obj)))?;
            if self.put_in_place(plural, &path, staged, None)? {
                return Ok(created);
            }
            // Taken: by an object, or by something the store never writes over. (Gone again
            // already: try once more.)
            if self.refuse_foreign(&path)? {
                return Err(StoreError::AlreadyExists {
                    plural: plural.into(),
                    name: name.clone(),
                });
            }
        }
    }

    /// Replaces spec, labels and annotations (status is kept as stored). A non-empty
    /// `metadata.resourceVersion` must match the stored one or the write is refused with Conflict.
    /// `generation` is bumped when spec changes; nothing is written when nothing changed.
    pub fn update_raw(
        &self,
        plural: &str,
        obj: &Value,
    ) -> Result<(Value, WriteOutcome), StoreError> {
        self.modify_raw(plural, obj, false)
    }

    /// Replaces status only (the status path). Same concurrency rules as [`Store::update_raw`].
    pub fn update_status_raw(
        &self,
        plural: &str,
        obj: &Value,
    ) -> Result<(Value, WriteOutcome), StoreError> {
        self.modify_raw(plural, obj, true)
    }

    fn modify_raw(
        &self,
        plural: &str,
        obj: &Value,
        status_only: bool,
    ) -> Result<(Value, WriteOutcome), StoreError> {
        let name = name_of(obj).to_string();
        self.modify_with(plural, &name, status_only, |current| {
            let wanted_rv = obj
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .unwrap_or("");
            let current_rv = current
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .unwrap_or("");
            if !wanted_rv.is_empty() && wanted_rv != current_rv {
                return Err(StoreError::Conflict {
                    plural: plural.into(),
                    name: name.clone(),
                });
            }
            Ok(obj.clone())
        })
    }

    /// The read-modify-write under the store lock: `wanted` gets the object as it is and returns
    /// the object the caller wants (of which only the status is taken with `status_only`, else the
    /// spec, labels and annotations). Run again if someone wrote the object between the lock's two
    /// holds.
    fn modify_with(
        &self,
        plural: &str,
        name: &str,
        status_only: bool,
        mut wanted: impl FnMut(&Value) -> Result<Value, StoreError>,
    ) -> Result<(Value, WriteOutcome), StoreError> {
        self.check_name(plural, name)?;
        let path = self.object_path(plural, name);
        loop {
            let step = self.with_lock(|w| {
                let file = fsio::FileId::at(&path)
                    .map_err(|e| StoreError::io(&path, e))?
                    .ok_or_else(|| not_found(plural, name))?;
                let current: Value = self
                    .read_obj(plural, name)?
                    .ok_or_else(|| not_found(plural, name))?;
                let base = Base {
                    file,
                    resource_version: current
                        .pointer("/metadata/resourceVersion")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                };
                let obj = wanted(&current)?;
                let next = if status_only {
                    let mut next = current.clone();
                    set_field(&mut next, "status", obj.get("status").cloned());
                    next
                } else {
                    as_updated(&current, &obj)
                };
                if next == current {
                    return Ok(Err(current));
                }
                let (written, staged) = self.stage_locked(w, plural, name, next)?;
                Ok(Ok((written, staged, base)))
            })?;
            match step {
                Err(current) => return Ok((current, WriteOutcome::Unchanged)),
                Ok((written, staged, base)) => {
                    // Someone wrote it between the two holds: read it again (a stale
                    // resourceVersion is then a Conflict).
                    if self.put_in_place(plural, &path, staged, Some(&base))? {
                        return Ok((written, WriteOutcome::Updated));
                    }
                }
            }
        }
    }

    /// Deletes an object, optionally only if its resourceVersion is `precondition`. Returns the object
    /// as it was.
    pub fn delete_raw(
        &self,
        plural: &str,
        name: &str,
        precondition: Option<&str>,
    ) -> Result<Value, StoreError> {
        if validate_name(name).is_err() {
            return Err(not_found(plural, name));
        }
        self.with_lock(|w| {
            let path = self.object_path(plural, name);
            let current: Value = self
                .read_obj(plural, name)?
                .ok_or_else(|| not_found(plural, name))?;
            if let Some(rv) = precondition {
                if current
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    != Some(rv)
                {
                    return Err(StoreError::Conflict {
                        plural: plural.into(),
                        name: name.into(),
                    });
                }
            }
            self.next_revision(w)?;
            let held = w
                .spares
                .remove(&path, self.durable)
                .map_err(|e| StoreError::io(&path, e))?;
            Ok((current, held))
        })
        .and_then(|(current, held)| {
            if self.durable {
                self.sync_kind_dir_then(plural, held)?;
            }
            Ok(current)
        })
    }

    fn check_name(&self, plural: &str, name: &str) -> Result<(), StoreError> {
        validate_name(name).map_err(|m| StoreError::Invalid {
            plural: plural.into(),
            name: name.into(),
            message: format!("metadata.name: {m}"),
        })
    }

    /// Refuses to write through or over anything the store did not put there; otherwise says
    /// whether an object file is there already (one `lstat` for both questions).
    fn refuse_foreign(&self, path: &Path) -> Result<bool, StoreError> {
        match fsio::entry_kind(path).map_err(|e| StoreError::io(path, e))? {
            Some(ft) if !ft.is_file() => Err(StoreError::Refused {
                path: path.to_path_buf(),
                message: if ft.is_symlink() {
                    "it is a symlink; the store never follows links".into()
                } else {
                    "it is not a regular file".into()
                },
            }),
            found => Ok(found.is_some()),
        }
    }

    /// Under the lock: takes the next revision and writes the object into a staged file, not yet
    /// in place and not yet synced. For an update the caller has checked, under the same hold,
    /// that `name`'s path is a regular file it just read; a create finds out in
    /// [`Store::put_in_place`] whether the name is free.
    fn stage_locked(
        &self,
        w: &mut Writer,
        plural: &str,
        name: &str,
        mut obj: Value,
    ) -> Result<(Value, spares::Staged), StoreError> {
        let dir = self.kind_dir(plural);
        fsio::ensure_durable_dir(&dir).map_err(|e| StoreError::io(&dir, e))?;
        let path = self.object_path(plural, name);
        let revision = self.next_revision(w)?;
        meta_mut(&mut obj).insert(
            "resourceVersion".into(),
            Value::String(revision.to_string()),
        );
        let mut bytes = serde_json::to_vec_pretty(&obj).map_err(|e| StoreError::Invalid {
            plural: plural.into(),
            name: name.into(),
            message: e.to_string(),
        })?;
        bytes.push(b'\n');
        if bytes.len() as u64 > MAX_OBJECT_BYTES {
            return Err(StoreError::Invalid {
                plural: plural.into(),
                name: name.into(),
                message: format!(
                    "the object is {} bytes; the limit is {MAX_OBJECT_BYTES}",
                    bytes.len()
                ),
            });
        }
        let staged = w
            .spares
            .stage(&bytes)
            .map_err(|e| StoreError::io(&path, e))?;
        Ok((obj, staged))
    }

    /// Syncs a staged write (outside the lock, so that writers' fsyncs overlap instead of queueing
    /// behind the lock), then, under the lock, puts it in place if `path` still holds the version
    /// that was read when it was staged (`base`, see [`holds_version`]), or, for a create
    /// (`None`), if nothing is at `path`; and fsyncs the directory (outside the lock again).
    /// `false`: the file changed in between, or the name is taken, and nothing was written.
    fn put_in_place(
        &self,
        plural: &str,
        path: &Path,
        staged: spares::Staged,
        base: Option<&Base>,
    ) -> Result<bool, StoreError> {
        let io_err = |e| StoreError::io(path, e);
        if self.durable {
            if let Err(e) = staged.sync() {
                self.with_lock(|w| {
                    w.spares.abandon(staged);
                    Ok(())
                })?;
                return Err(io_err(e));
            }
        }
        #[cfg(test)]
        if base.is_some() {
            tests::between_holds();
        }
        let placed = self.with_lock(|w| {
            // An update replaces only the version it read; a create's rename refuses a taken name.
            let unchanged = match base {
                Some(b) => holds_version(path, b).map_err(io_err)?,
                None => true,
            };
            if !unchanged {
                w.spares.abandon(staged);
                return Ok(None);
            }
            match w.spares.commit(staged, path, base.is_some(), self.durable) {
                Ok(held) => Ok(Some(held)),
                Err(e) if base.is_none() && e.kind() == std::io::ErrorKind::AlreadyExists => {
                    Ok(None)
                }
                Err(e) => Err(io_err(e)),
            }
        })?;
        let Some(held) = placed else {
            return Ok(false);
        };
        if self.durable {
            self.sync_kind_dir_then(plural, held)?;
        }
        Ok(true)
    }

    /// [`Store::sync_kind_dir`], then lets the inode the write took out of the namespace rest as
    /// a spare (or, if the fsync failed, gives it up): see `spares`' module docs.
    fn sync_kind_dir_then(
        &self,
        plural: &str,
        held: Option<spares::Held>,
    ) -> Result<(), StoreError> {
        let synced = self.sync_kind_dir(plural);
        if let Some(h) = held {
            self.with_lock(|w| {
                if synced.is_ok() {
                    w.spares.rest(h);
                } else {
                    w.spares.forget(h);
                }
                Ok(())
            })?;
        }
        synced
    }

    /// Makes the renames into a kind's directory durable (shared with this process's other
    /// writers of that directory, see [`dirsync`]).
    fn sync_kind_dir(&self, plural: &str) -> Result<(), StoreError> {
        let dir = self.kind_dir(plural);
        self.inner
            .dir_syncs
            .sync(&dir)
            .map_err(|e| StoreError::io(&dir, e))
    }

    // ----- typed operations -----

    /// Reads one object; NotFound if absent.
    pub fn get<K: Resource>(&self, name: &str) -> Result<K, StoreError> {
        self.read_obj::<K>(K::PLURAL, name)?
            .ok_or_else(|| not_found(K::PLURAL, name))
    }

    /// Reads one object; `None` if absent.
    pub fn try_get<K: Resource>(&self, name: &str) -> Result<Option<K>, StoreError> {
        self.read_obj::<K>(K::PLURAL, name)
    }

    /// Lists every object of a kind (torn or foreign files are in `skipped`).
    pub fn list<K: Resource>(&self, selector: Option<&Selector>) -> Result<List<K>, StoreError> {
        self.list_as::<K>(K::PLURAL, selector)
    }

    /// Creates an object (exclusive: AlreadyExists if the name is taken).
    pub fn create<K: Resource>(&self, obj: &K) -> Result<K, StoreError> {
        let v = self.create_raw(K::PLURAL, &to_value(obj)?)?;
        from_value(v)
    }

    /// Creates an object like [`Store::create`] without turning the stored object back into a
    /// `K`, for a writer that does not look at it (the event recorder, three times per run).
    pub fn create_only<K: Resource>(&self, obj: &K) -> Result<(), StoreError> {
        self.create_raw(K::PLURAL, &to_value(obj)?).map(drop)
    }

    /// Updates spec, labels and annotations with optimistic concurrency.
    pub fn update<K: Resource>(&self, obj: &K) -> Result<K, StoreError> {
        let (v, _) = self.update_raw(K::PLURAL, &to_value(obj)?)?;
        from_value(v)
    }

    /// Updates status only, with optimistic concurrency.
    pub fn update_status<K: Resource>(&self, obj: &K) -> Result<K, StoreError> {
        let (v, _) = self.update_status_raw(K::PLURAL, &to_value(obj)?)?;
        from_value(v)
    }

    /// Deletes an object, optionally only at a given resourceVersion.
    pub fn delete<K: Resource>(
        &self,
        name: &str,
        precondition: Option<&str>,
    ) -> Result<K, StoreError> {
        from_value(self.delete_raw(K::PLURAL, name, precondition)?)
    }

    /// Applies `f` to the object as it is under the store lock and writes its status back (a
    /// read-modify-write that cannot lose a concurrent update). `f` may run more than once, if
    /// another writer slips in between the lock's two holds. Returns the written object, or `None`
    /// if the object does not exist.
    pub fn patch_status<K: Resource>(
        &self,
        name: &str,
        mut f: impl FnMut(&mut K),
    ) -> Result<Option<K>, StoreError> {
        // One read, under the store lock: the object `f` sees is the one that gets replaced, so
        // there is no resourceVersion to compare and no conflict to retry.
        let res = self.modify_with(K::PLURAL, name, true, |current| {
            let mut obj: K = from_value(current.clone())?;
            f(&mut obj);
            to_value(&obj)
        });
        match res {
            Ok((v, _)) => from_value(v).map(Some),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// The version of an object file that an update read under the lock's first hold and means to
/// replace under the second.
#[derive(Debug, Clone)]
struct Base {
    /// The file's identity (inode and ctime) when it was read.
    file: fsio::FileId,
    /// Its `metadata.resourceVersion` ("" when it had none).
    resource_version: String,
}

/// Whether `path` still holds the version `base` describes: the same file (inode and ctime) with
/// the same resourceVersion. Called under the store lock, so no store writer can change the file
/// meanwhile.
///
/// The identity alone is not enough: the spare pool recycles inodes, and on a file system that
/// keeps whole-second timestamps (ext4 with 128-byte inodes, say) a recycled inode rewritten with
/// a newer version can come back at `path` with the very ctime the update saw, and the update
/// would replace a version it never read (its precondition checked against an older one, the
/// stored resourceVersion going backwards). Every write takes a new revision, so the
/// resourceVersion tells versions apart where the ctime cannot. It costs an open, an `fstat` and
/// a read of the file, the cost of the first hold's read again; only when the identity matches.
fn holds_version(path: &Path, base: &Base) -> io::Result<bool> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let opened = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path);
    let file = match opened {
        Ok(f) => f,
        // Gone, or a symlink now (O_NOFOLLOW): not what was read. The caller reads again.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => return Ok(false),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.file_type().is_file() || fsio::FileId::of(&meta) != base.file {
        return Ok(false);
    }
    let mut bytes = Vec::with_capacity(meta.len().min(MAX_OBJECT_BYTES) as usize);
    file.take(MAX_OBJECT_BYTES + 1).read_to_end(&mut bytes)?;
    Ok(resource_version_in(&bytes).as_deref() == Some(base.resource_version.as_str()))
}

/// The `metadata.resourceVersion` of an object file's content, read as the first hold reads it
/// (a JSON value, the last of repeated keys winning, "" when there is none or it is not a
/// string); `None` when the content is not a JSON object. Only `metadata` is built; every other
/// field is skipped.
fn resource_version_in(bytes: &[u8]) -> Option<String> {
    use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Rv(String);
    struct RvVisitor;
    impl<'de> Visitor<'de> for RvVisitor {
        type Value = Rv;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Rv, A::Error> {
            let mut rv = String::new();
            while let Some(key) = map.next_key::<String>()? {
                if key == "metadata" {
                    let meta: Value = map.next_value()?;
                    rv = meta
                        .get("resourceVersion")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(Rv(rv))
        }
    }
    impl<'de> Deserialize<'de> for Rv {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Rv, D::Error> {
            d.deserialize_map(RvVisitor)
        }
    }
    serde_json::from_slice::<Rv>(bytes).ok().map(|rv| rv.0)
}

fn not_found(plural: &str, name: &str) -> StoreError {
    StoreError::NotFound {
        plural: plural.into(),
        name: name.into(),
    }
}

fn to_value<K: Resource>(obj: &K) -> Result<Value, StoreError> {
    serde_json::to_value(obj).map_err(|e| StoreError::Invalid {
        plural: K::PLURAL.into(),
        name: obj.name().into(),
        message: e.to_string(),
    })
}

fn from_value<K: Resource>(v: Value) -> Result<K, StoreError> {
    let name = name_of(&v).to_string();
    serde_json::from_value(v).map_err(|e| StoreError::Invalid {
        plural: K::PLURAL.into(),
        name,
        message: e.to_string(),
    })
}

fn name_of(v: &Value) -> &str {
    v.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// `obj` as a create stores it: a new uid, generation 1 and the creation time (the
/// resourceVersion comes with the write).
fn as_created(obj: &Value) -> Value {
    let mut obj = obj.clone();
    let meta = meta_mut(&mut obj);
    meta.insert("uid".into(), Value::String(fsio::new_uid()));
    meta.insert("generation".into(), Value::from(1));
    meta.insert("creationTimestamp".into(), Value::String(now_rfc3339()));
    obj
}

/// `current` with the spec, labels and annotations of `obj`, as an update stores it: the status
/// and the store's metadata kept, `generation` bumped when the spec changed.
fn as_updated(current: &Value, obj: &Value) -> Value {
    let mut next = current.clone();
    let spec_changed = obj.get("spec") != current.get("spec");
    set_field(&mut next, "spec", obj.get("spec").cloned());
    for field in ["labels", "annotations"] {
        let v = obj.pointer(&format!("/metadata/{field}")).cloned();
        let v = v.filter(|v| v.as_object().is_some_and(|m| !m.is_empty()));
        let meta = meta_mut(&mut next);
        match v {
            Some(v) => meta.insert(field.into(), v),
            None => meta.remove(field),
        };
    }
    if spec_changed {
        let generation = current
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        meta_mut(&mut next).insert("generation".into(), Value::from(generation + 1));
    }
    next
}

/// How many bytes the store would write for `obj`: created when `current` is `None`, else as an
/// update of `current` (see [`Store::update_raw`]), with a resourceVersion as long as any can be.
/// What `apply` checks against [`MAX_APPLIED_BYTES`] before it writes anything, so that one object
/// over the limit cannot stop an apply halfway (invariant 10).
pub fn stored_size(obj: &Value, current: Option<&Value>) -> u64 {
    let mut stored = match current {
        None => as_created(obj),
        Some(cur) => as_updated(cur, obj),
    };
    meta_mut(&mut stored).insert(
        "resourceVersion".into(),
        Value::String(u64::MAX.to_string()),
    );
    serde_json::to_vec_pretty(&stored).map_or(u64::MAX, |b| b.len() as u64 + 1)
}

fn meta_mut(v: &mut Value) -> &mut serde_json::Map<String, Value> {
    if !v.is_object() {
        *v = Value::Object(Default::default());
    }
    let map = v.as_object_mut().expect("made an object above");
    let meta = map
        .entry("metadata")
        .or_insert_with(|| Value::Object(Default::default()));
    if !meta.is_object() {
        *meta = Value::Object(Default::default());
    }
    meta.as_object_mut().expect("made an object above")
}

fn set_field(v: &mut Value, field: &str, value: Option<Value>) {
    if let Some(map) = v.as_object_mut() {
        match value {
            Some(x) => map.insert(field.into(), x),
            None => map.remove(field),
        };
    }
}

/// The object name a file in an objects directory stands for, if it is named like one.
pub(crate) fn object_name_of(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let name = file.strip_suffix(".json")?;
    validate_name(name).ok()?;
    Some(name.to_string())
}

/// Access to name, kind and labels on both typed objects and raw JSON.
pub(crate) trait HasName {
    fn name(&self) -> &str;
    /// The `kind` field ("" when absent).
    fn kind(&self) -> &str;
    fn labels(&self) -> std::collections::BTreeMap<String, String>;
}

impl HasName for Value {
    fn name(&self) -> &str {
        name_of(self)
    }
    fn kind(&self) -> &str {
        self.get("kind").and_then(Value::as_str).unwrap_or_default()
    }
    fn labels(&self) -> std::collections::BTreeMap<String, String> {
        self.pointer("/metadata/labels")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl<K: Resource> HasName for K {
    fn name(&self) -> &str {
        &self.meta().name
    }
    fn kind(&self) -> &str {
        self.kind_field()
    }
    fn labels(&self) -> std::collections::BTreeMap<String, String> {
        self.meta().labels.clone()
    }
}

pub(crate) enum ReadFailure {
    Missing,
    Bad(String),
}

/// Reads and parses one object file of the `plural` directory, checking that it names itself and,
/// when it says its kind, that the kind is that directory's: an Agent's file copied into
/// `queues/` is reported, not read as a Queue (invariant 8).
pub(crate) fn read_object_file<T: DeserializeOwned + HasName>(
    path: &Path,
    plural: &str,
    name: &str,
) -> Result<T, ReadFailure> {
    let bytes = fsio::read_regular(path, MAX_OBJECT_BYTES).map_err(|e| match e {
        fsio::ReadError::Missing => ReadFailure::Missing,
        fsio::ReadError::NotRegular(what) => ReadFailure::Bad(format!(
            "{what}; the store never follows links or reads special files"
        )),
        fsio::ReadError::TooLarge(n) => ReadFailure::Bad(format!(
            "{n} bytes is over the {MAX_OBJECT_BYTES}-byte limit"
        )),
        fsio::ReadError::Io(e) => ReadFailure::Bad(e.to_string()),
    })?;
    let obj: T = serde_json::from_slice(&bytes)
        .map_err(|e| ReadFailure::Bad(format!("not a valid object: {e}")))?;
    if obj.name() != name {
        return Err(ReadFailure::Bad(format!(
            "metadata.name {:?} does not match the file name",
            obj.name()
        )));
    }
    if let Some(want) = crate::resources::registry::Kind::ALL
        .into_iter()
        .find(|k| k.plural() == plural)
        .map(|k| k.name())
    {
        if !obj.kind().is_empty() && obj.kind() != want {
            return Err(ReadFailure::Bad(format!(
                "kind {:?} does not belong in {plural}/ (it holds {want} objects)",
                obj.kind()
            )));
        }
    }
    Ok(obj)
}

/// Reads many object files, on two threads when there are enough to be worth it.
fn read_many<T: DeserializeOwned + HasName + Send>(
    plural: &str,
    paths: Vec<(PathBuf, String)>,
) -> Vec<Result<T, Option<Skipped>>> {
    let read_one =
        |(path, name): &(PathBuf, String)| match read_object_file::<T>(path, plural, name) {
            Ok(o) => Ok(o),
            Err(ReadFailure::Missing) => Err(None),
            Err(ReadFailure::Bad(reason)) => Err(Some(Skipped {
                path: path.clone(),
                reason,
            })),
        };
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(4);
    if paths.len() < 256 || threads < 2 {
        return paths.iter().map(read_one).collect();
    }
    let chunk = paths.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = paths
            .chunks(chunk)
            .map(|c| s.spawn(move || c.iter().map(read_one).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

#[cfg(test)]
mod tests;
