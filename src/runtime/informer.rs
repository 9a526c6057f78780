//! Informers: one shared, in-memory cache per kind, kept current from the store.
//!
//! An informer lists its kind once, then follows `store.watch` seeded with that list. Subscribers
//! hear `Applied`/`Deleted` for every change the cache takes, and `Resync` on a period. As in
//! client-go, a resync replays the cache — it reads nothing from the store: it exists so that
//! controllers look again at keys whose level may need acting on, not to find lost changes. Changes
//! inotify dropped are found by the watch itself, which rescans the directory (one stat per file,
//! a read only of files whose inode changed) every [`InformerOptions::relist`]. The store is listed
//! again only at start and after the watch failed.
//!
//! Writers in this process call [`Informer::observe`] right after a write so their next read sees
//! it (read-your-writes); the watch event for the same revision arrives later and is ignored, since
//! the cache only ever moves forward in revision.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::resources::meta::Resource;
use crate::store::watch::{WatchEvent, WatchOptions};
use crate::store::Store;

/// What subscribers hear.
#[derive(Debug)]
pub enum InformerEvent<K> {
    /// The cache took this object (new, or a newer revision).
    Applied(Arc<K>),
    /// The object is gone; this is its last known state.
    Deleted(Arc<K>),
    /// Periodic: re-check everything in the cache (a replay; the store is not read).
    Resync,
}

impl<K> Clone for InformerEvent<K> {
    fn clone(&self) -> Self {
        match self {
            InformerEvent::Applied(o) => InformerEvent::Applied(o.clone()),
            InformerEvent::Deleted(o) => InformerEvent::Deleted(o.clone()),
            InformerEvent::Resync => InformerEvent::Resync,
        }
    }
}

/// Env variable overriding the resync period, in seconds.
pub const LOOP_INTERVAL_ENV: &str = "TINYSCHEDULER_LOOP_INTERVAL_SEC";

/// Informer tuning.
#[derive(Debug, Clone)]
pub struct InformerOptions {
    /// How often subscribers get `Resync`, a replay of the cache. Default 30 s, or
    /// `TINYSCHEDULER_LOOP_INTERVAL_SEC`.
    pub resync: Duration,
    /// The watch's own directory rescan period: what catches changes inotify dropped. Default 30 s.
    pub relist: Duration,
}

impl Default for InformerOptions {
    fn default() -> Self {
        Self::from_env()
    }
}

impl InformerOptions {
    /// Defaults, with the resync period from `TINYSCHEDULER_LOOP_INTERVAL_SEC` when it is set to a
    /// positive number of seconds (fractions allowed).
    pub fn from_env() -> Self {
        let resync = std::env::var(LOOP_INTERVAL_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(|s| Duration::from_secs_f64(s.min(crate::config::MAX_SECONDS)))
            .unwrap_or(Duration::from_secs(30));
        InformerOptions {
            resync,
            relist: Duration::from_secs(30),
        }
    }
}

type IndexFn<K> = Arc<dyn Fn(&K) -> Vec<String> + Send + Sync>;
type Handler<K> = Arc<dyn Fn(&InformerEvent<K>, &[Arc<K>]) + Send + Sync>;

struct Index<K> {
    f: IndexFn<K>,
    /// value -> names
    entries: HashMap<String, BTreeSet<String>>,
}

struct Cache<K> {
    objects: HashMap<String, Arc<K>>,
    indexes: HashMap<&'static str, Index<K>>,
    /// Names deleted lately, and when. A read-your-writes `observe` of such a name may come
    /// after the deletion (another process deleted the object a moment after this one wrote it,
    /// and the watch may never have read that version): it asks the store instead of trusting
    /// the write, so that no ghost that no later event would remove comes back.
    gone: HashMap<String, std::time::Instant>,
    /// When `gone` is swept of old names next (by size, so that a burst of deletions costs
    /// amortized constant time).
    sweep_at: usize,
}

/// How long a deletion is remembered against a late read-your-writes `observe`.
const GONE_FOR: std::time::Duration = std::time::Duration::from_secs(60);

impl<K: Resource> Cache<K> {
    fn unindex(&mut self, obj: &K) {
        for idx in self.indexes.values_mut() {
            for v in (idx.f)(obj) {
                if let Some(set) = idx.entries.get_mut(&v) {
                    set.remove(obj.name());
                    if set.is_empty() {
                        idx.entries.remove(&v);
                    }
                }
            }
        }
    }

    fn index(&mut self, obj: &K) {
        for idx in self.indexes.values_mut() {
            for v in (idx.f)(obj) {
                idx.entries
                    .entry(v)
                    .or_default()
                    .insert(obj.name().to_string());
            }
        }
    }

    /// Puts `obj` in unless the cache already has this revision or a newer one.
    /// `read`: the object was just read from the store (a list, a watch event), so it exists;
    /// otherwise it is this process's own write, which a deletion may have overtaken.
    fn apply(&mut self, obj: K, read: bool) -> Option<Arc<K>> {
        if read {
            self.gone.remove(obj.name());
        }
        if let Some(old) = self.objects.get(obj.name()) {
            if old.revision() >= obj.revision() {
                return None;
            }
            let old = old.clone();
            self.unindex(&old);
        }
        let obj = Arc::new(obj);
        self.index(&obj);
        self.objects.insert(obj.name().to_string(), obj.clone());
        Some(obj)
    }

    fn remove(&mut self, name: &str) -> Option<Arc<K>> {
        let old = self.objects.remove(name)?;
        self.unindex(&old);
        self.forget(name);
        Some(old)
    }

    /// Remembers that `name` was deleted (for a while: see [`Cache::gone`]).
    fn forget(&mut self, name: &str) {
        let now = std::time::Instant::now();
        if self.gone.len() >= self.sweep_at.max(1024) {
            self.gone.retain(|_, at| now.duration_since(*at) < GONE_FOR);
            self.sweep_at = 2 * self.gone.len();
        }
        self.gone.insert(name.to_string(), now);
    }
}

struct Inner<K> {
    store: Store,
    opts: InformerOptions,
    cache: RwLock<Cache<K>>,
    synced: watch::Sender<bool>,
    /// Why the latest list failed; `None` once one succeeded.
    list_failed: watch::Sender<Option<String>>,
    started: AtomicBool,
    handlers: Mutex<Vec<Handler<K>>>,
}

/// A shared cache of one kind. Clones share everything.
pub struct Informer<K: Resource> {
    inner: Arc<Inner<K>>,
}

impl<K: Resource> Clone for Informer<K> {
    fn clone(&self) -> Self {
        Informer {
            inner: self.inner.clone(),
        }
    }
}

impl<K: Resource> Informer<K> {
    pub fn new(store: Store, opts: InformerOptions) -> Self {
        Informer {
            inner: Arc::new(Inner {
                store,
                opts,
                cache: RwLock::new(Cache {
                    objects: HashMap::new(),
                    indexes: HashMap::new(),
                    gone: HashMap::new(),
                    sweep_at: 0,
                }),
                synced: watch::channel(false).0,
                list_failed: watch::channel(None).0,
                started: AtomicBool::new(false),
                handlers: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The store this informer reads.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Cache<K>> {
        self.inner.cache.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Cache<K>> {
        self.inner.cache.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a secondary index: `f` gives the values an object is found under with
    /// [`Informer::by_index`]. Meant to be called before `start`; later, the index is built from
    /// the current cache.
    pub fn add_index(
        &self,
        name: &'static str,
        f: impl Fn(&K) -> Vec<String> + Send + Sync + 'static,
    ) {
        let mut cache = self.write();
        let mut idx = Index {
            f: Arc::new(f),
            entries: HashMap::new(),
        };
        for obj in cache.objects.values() {
            for v in (idx.f)(obj) {
                idx.entries
                    .entry(v)
                    .or_default()
                    .insert(obj.name().to_string());
            }
        }
        cache.indexes.insert(name, idx);
    }

    /// Starts following the store (once; later calls return a handle that finishes at once).
    /// Must be called inside a tokio runtime. Aborting the handle stops the informer.
    pub fn start(&self) -> JoinHandle<()> {
        if self.inner.started.swap(true, Ordering::SeqCst) {
            return tokio::spawn(async {});
        }
        let this = self.clone();
        tokio::spawn(async move { this.run().await })
    }

    /// True once the initial list is in the cache and the watch that follows it is set up (or
    /// was tried: one that cannot be leaves the informer to relists).
    pub fn is_synced(&self) -> bool {
        *self.inner.synced.borrow()
    }

    /// Waits until the informer is synced (see [`Informer::is_synced`]).
    pub async fn wait_synced(&self) {
        let mut rx = self.inner.synced.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Waits until the informer is synced (`Ok`), or until a list before that failed
    /// (`Err`, with why). The informer itself keeps retrying; this is for a caller that cannot
    /// wait for a retry, such as a one-shot run, which should fail and say why.
    pub async fn wait_synced_or_failed(&self) -> Result<(), String> {
        let mut synced = self.inner.synced.subscribe();
        let mut failed = self.inner.list_failed.subscribe();
        loop {
            if *synced.borrow_and_update() {
                return Ok(());
            }
            if let Some(why) = failed.borrow_and_update().clone() {
                return Err(why);
            }
            tokio::select! {
                r = synced.changed() => if r.is_err() { return Err("the informer stopped".into()) },
                r = failed.changed() => if r.is_err() { return Err("the informer stopped".into()) },
            }
        }
    }

    /// The cached object named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<K>> {
        self.read().objects.get(name).cloned()
    }

    /// Every cached object, sorted by name.
    pub fn list(&self) -> Vec<Arc<K>> {
        let mut v: Vec<Arc<K>> = self.read().objects.values().cloned().collect();
        v.sort_by(|a, b| a.name().cmp(b.name()));
        v
    }

    /// Every cached object in no particular order: for callers that look at all of them and do not
    /// need [`Informer::list`]'s sort by name (a sort of 10,000 names per call).
    pub fn snapshot(&self) -> Vec<Arc<K>> {
        self.read().objects.values().cloned().collect()
    }

    /// Cached objects that index `index` files under `value`, sorted by name.
    pub fn by_index(&self, index: &str, value: &str) -> Vec<Arc<K>> {
        let cache = self.read();
        let Some(idx) = cache.indexes.get(index) else {
            return Vec::new();
        };
        idx.entries
            .get(value)
            .map(|names| {
                names
                    .iter()
                    .filter_map(|n| cache.objects.get(n).cloned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Read-your-writes: puts an object this process just wrote into the cache (only if its
    /// revision is newer than the cached one) and notifies subscribers before returning.
    pub fn observe(&self, obj: K) {
        self.take(obj, false);
    }

    /// Puts an object in the cache (see [`Cache::apply`]) and notifies subscribers.
    fn take(&self, obj: K, read: bool) {
        // The check and the apply under one lock: a watch's Deleted for a name not cached yet
        // (`on_watch_deleted`) landing between the two would leave a ghost no event removes.
        let applied = {
            let mut cache = self.write();
            if !read && cache.gone.contains_key(obj.name()) {
                Err(obj.name().to_string())
            } else {
                Ok(cache.apply(obj, read))
            }
        };
        match applied {
            // Deleted lately: the store says whether this write outlived the deletion.
            Err(name) => {
                let _ = self.reread(&name);
            }
            Ok(Some(obj)) => self.dispatch(InformerEvent::Applied(obj)),
            Ok(None) => {}
        }
    }

    /// Read-your-writes for a delete this process just did.
    pub fn observe_deleted(&self, name: &str) {
        let removed = self.write().remove(name);
        if let Some(obj) = removed {
            self.dispatch(InformerEvent::Deleted(obj));
        }
    }

    /// For a caller that found `name` missing from the store while the cache held it at
    /// `revision`: removes it and notifies subscribers, unless a newer version was cached
    /// meanwhile. A deletion the watch could not report (an object made and removed between two
    /// looks after an inotify overflow, known only from a read-your-writes `observe`) would
    /// otherwise stay in the cache for good.
    pub fn drop_missing(&self, name: &str, revision: u64) {
        let removed = {
            let mut cache = self.write();
            match cache.objects.get(name) {
                Some(o) if o.revision() <= revision => cache.remove(name),
                _ => None,
            }
        };
        if let Some(obj) = removed {
            self.dispatch(InformerEvent::Deleted(obj));
        }
    }

    /// A channel of every event from now on.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<InformerEvent<K>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.on_event(move |ev, _| {
            let _ = tx.send(ev.clone());
        });
        rx
    }

    /// Registers a handler called synchronously (outside the cache lock) for every event, in the
    /// thread that caused it; for `Resync`, the second argument is a snapshot of the cache (empty
    /// for other events). Handlers must be quick and must not block: mapping to work-queue keys is
    /// the intended use.
    pub fn on_event(&self, f: impl Fn(&InformerEvent<K>, &[Arc<K>]) + Send + Sync + 'static) {
        self.inner
            .handlers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::new(f));
    }

    fn dispatch(&self, ev: InformerEvent<K>) {
        let handlers: Vec<Handler<K>> = self
            .inner
            .handlers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if handlers.is_empty() {
            return;
        }
        let snapshot = match ev {
            InformerEvent::Resync => self.list(),
            _ => Vec::new(),
        };
        for h in handlers {
            // A panicking handler (a buggy mapper) must not take the shared informer down.
            let call = std::panic::AssertUnwindSafe(|| h(&ev, &snapshot));
            if std::panic::catch_unwind(call).is_err() {
                tracing::error!(
                    kind = K::KIND,
                    "an informer event handler panicked; skipped"
                );
            }
        }
    }

    /// Brings the cache to a fresh list of the store: applies newer objects, drops objects that
    /// are gone (unless they were observed after the list was taken). An object whose file is
    /// there but could not be read (`unreadable`: torn, say) keeps its cached version, as the
    /// watch does: a Deleted event for it would have its run reclaimed.
    ///
    /// A list does not prove an object absent: the store takes a write's revision before it puts
    /// the file in place, so a list whose revision covers a create (or an update through a fresh
    /// file) can miss it, and another thread may have observed that write already. So every cached
    /// object the list lacks is read from the store once more and dropped only if it is not
    /// there, and only if the cache still holds the version that was looked for (anything
    /// observed meanwhile is newer than the read). Relists are rare, and so are such objects.
    fn replace(
        &self,
        items: &[K],
        list_revision: u64,
        unreadable: &std::collections::HashSet<String>,
    ) {
        let missing: Vec<Arc<K>> = {
            let cache = self.read();
            let listed: std::collections::HashSet<&str> = items.iter().map(|o| o.name()).collect();
            cache
                .objects
                .values()
                .filter(|o| {
                    !listed.contains(o.name())
                        && !unreadable.contains(o.name())
                        && o.revision() <= list_revision
                })
                .cloned()
                .collect()
        };
        // Outside the cache lock: reads of the store.
        let mut gone = Vec::new();
        let mut found = Vec::new();
        for cached in missing {
            match self.inner.store.try_get::<K>(cached.name()) {
                Ok(None) => gone.push(cached),
                Ok(Some(obj)) => found.push(obj),
                Err(e) => tracing::warn!(
                    kind = K::KIND,
                    name = cached.name(),
                    error = %e,
                    "informer re-read failed; keeping the cached object"
                ),
            }
        }
        let mut applied = Vec::new();
        let mut deleted = Vec::new();
        {
            let mut cache = self.write();
            for cached in gone {
                let unchanged = cache
                    .objects
                    .get(cached.name())
                    .is_some_and(|now| Arc::ptr_eq(now, &cached));
                if unchanged {
                    if let Some(o) = cache.remove(cached.name()) {
                        deleted.push(o);
                    }
                }
            }
            for obj in items.iter().cloned().chain(found) {
                if let Some(o) = cache.apply(obj, true) {
                    applied.push(o);
                }
            }
        }
        for o in deleted {
            self.dispatch(InformerEvent::Deleted(o));
        }
        for o in applied {
            self.dispatch(InformerEvent::Applied(o));
        }
    }

    fn on_watch_deleted(&self, name: &str, resource_version: u64) {
        // Looked up and remembered as gone under one lock: a read-your-writes `observe` between
        // the two would put in an object whose deletion is then never applied.
        let cached = {
            let mut cache = self.write();
            let cached = cache.objects.get(name).cloned();
            if cached.is_none() {
                cache.forget(name);
            }
            cached
        };
        let Some(cached) = cached else {
            return;
        };
        // We observed a newer write the watcher had not seen; the file may be back. Ask the
        // store rather than guess (a failed read keeps what the cache has).
        if cached.revision() > resource_version && self.reread(name) != Some(false) {
            return;
        }
        // Only the version looked at: one this process wrote since (a new object of the name)
        // stays.
        self.drop_missing(name, cached.revision());
    }

    /// Takes object `name` as the store has it now: `Some(true)` when it is there (and in the
    /// cache now), `Some(false)` when it is not, `None` when the read failed (logged).
    fn reread(&self, name: &str) -> Option<bool> {
        match self.inner.store.try_get::<K>(name) {
            Ok(Some(obj)) => {
                self.take(obj, true);
                Some(true)
            }
            Ok(None) => Some(false),
            Err(e) => {
                tracing::warn!(kind = K::KIND, name, error = %e, "informer re-read failed");
                None
            }
        }
    }

    /// Called once a watch is set up: re-reads every cached object the list that the watch
    /// started from lacks, and drops those the store no longer has. After a watch error the
    /// controllers go on between the relist and the new watch: an object one of them wrote and
    /// observed meanwhile, deleted before the watch began, is in neither the list nor any of the
    /// watch's events, and would otherwise stay in the cache for good.
    fn recheck_unlisted(&self, items: &[K]) {
        let unlisted: Vec<(String, u64)> = {
            let cache = self.read();
            let listed: std::collections::HashSet<&str> = items.iter().map(|o| o.name()).collect();
            cache
                .objects
                .values()
                .filter(|o| !listed.contains(o.name()))
                .map(|o| (o.name().to_string(), o.revision()))
                .collect()
        };
        for (name, revision) in unlisted {
            // A failed read keeps what the cache has (and is logged by `reread`).
            if self.reread(&name) == Some(false) {
                self.drop_missing(&name, revision);
            }
        }
    }

    /// Lists the store into the cache; `Some(revision, items)` on success.
    fn relist(&self) -> Option<Vec<K>> {
        match self.inner.store.list::<K>(None) {
            Ok(list) => {
                for s in &list.skipped {
                    tracing::debug!(kind = K::KIND, path = %s.path.display(), reason = %s.reason, "informer skipped a file");
                }
                let unreadable = list
                    .skipped
                    .iter()
                    .filter_map(|s| crate::store::object_name_of(&s.path))
                    .collect();
                self.replace(&list.items, list.revision, &unreadable);
                self.inner
                    .list_failed
                    .send_if_modified(|f| f.take().is_some());
                Some(list.items)
            }
            Err(e) => {
                tracing::warn!(kind = K::KIND, error = %e, "informer list failed; retrying");
                self.inner.list_failed.send_replace(Some(e.to_string()));
                None
            }
        }
    }

    async fn run(self) {
        const RETRY_BASE: Duration = Duration::from_millis(800);
        const RETRY_CAP: Duration = Duration::from_secs(30);
        let mut retry = RETRY_BASE;
        // At least a millisecond, and at most a year: `now + period` must not overflow.
        let period = self.inner.opts.resync.clamp(
            Duration::from_millis(1),
            Duration::from_secs(365 * 24 * 3600),
        );
        let mut resync = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // List (or relist after an error), then watch from that list.
            let items = match self.relist() {
                Some(items) => items,
                None => {
                    self.backoff_sleep(&mut retry, RETRY_CAP, &mut resync).await;
                    continue;
                }
            };
            let watch = self.inner.store.watch::<K>(
                &items,
                WatchOptions {
                    relist_interval: self.inner.opts.relist,
                },
            );
            // Synced only once the watch is set up: the controllers start on it, so every object
            // they write is written under the watch, and its deletion, however soon, is an event.
            // (A watch that cannot be set up leaves the informer to relists, synced all the same.)
            if !self.is_synced() {
                self.inner.synced.send_replace(true);
                tracing::debug!(kind = K::KIND, objects = items.len(), "informer synced");
            }
            let mut watch = match watch {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(kind = K::KIND, error = %e, retry_in = ?retry, "informer watch failed; retrying");
                    self.backoff_sleep(&mut retry, RETRY_CAP, &mut resync).await;
                    continue;
                }
            };
            self.recheck_unlisted(&items);
            drop(items);
            loop {
                tokio::select! {
                    ev = watch.next() => match ev {
                        Some(WatchEvent::Added(o)) | Some(WatchEvent::Modified(o)) => {
                            retry = RETRY_BASE;
                            self.take(o, true);
                        }
                        Some(WatchEvent::Deleted { name, resource_version }) => {
                            retry = RETRY_BASE;
                            self.on_watch_deleted(&name, resource_version);
                        }
                        Some(WatchEvent::Error(e)) => {
                            tracing::warn!(kind = K::KIND, error = %e, retry_in = ?retry, "informer watch error; relisting");
                            self.backoff_sleep(&mut retry, RETRY_CAP, &mut resync).await;
                            break;
                        }
                        None => {
                            tracing::warn!(kind = K::KIND, retry_in = ?retry, "informer watch ended; relisting");
                            self.backoff_sleep(&mut retry, RETRY_CAP, &mut resync).await;
                            break;
                        }
                    },
                    _ = resync.tick() => self.resync(),
                }
            }
        }
    }

    /// Periodic resync: tells every subscriber to re-check everything in the cache. It does not
    /// read the store — with 10,000 objects a relist every period was most of an idle daemon's
    /// CPU, and the watch's own rescan already catches what inotify missed.
    fn resync(&self) {
        self.dispatch(InformerEvent::Resync);
    }

    /// Sleeps for the current retry delay (doubling it up to `cap`), still serving resyncs (of
    /// the cache as it is; the relist after the sleep brings it up to date).
    async fn backoff_sleep(
        &self,
        retry: &mut Duration,
        cap: Duration,
        resync: &mut tokio::time::Interval,
    ) {
        let sleep = tokio::time::sleep(*retry);
        tokio::pin!(sleep);
        *retry = (*retry * 2).min(cap);
        loop {
            tokio::select! {
                _ = &mut sleep => return,
                _ = resync.tick() => {
                    if self.is_synced() {
                        self.resync();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::queue::{Queue, QueueSpec};
    use std::collections::HashSet;

    fn queue(name: &str) -> Queue {
        Queue::new("Queue", name, QueueSpec::default())
    }

    #[tokio::test]
    async fn a_relist_that_missed_an_object_the_store_has_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let inf = Informer::<Queue>::new(store.clone(), InformerOptions::default());
        let mut rx = inf.subscribe();
        let kept = store.create(&queue("kept")).unwrap();
        inf.observe(kept.clone());
        let gone = store.create(&queue("gone")).unwrap();
        inf.observe(gone);
        store.delete::<Queue>("gone", None).unwrap();
        let listed = store.create(&queue("listed")).unwrap();
        // A list whose revision covers `kept` but that did not see its file (a write's revision
        // is taken before its file is in place), and rightly lacks `gone`.
        inf.replace(
            std::slice::from_ref(&listed),
            store.revision().unwrap(),
            &HashSet::new(),
        );
        assert_eq!(
            inf.get("kept").map(|q| q.revision()),
            Some(kept.revision()),
            "an object the store has stays"
        );
        assert!(inf.get("gone").is_none(), "an object the store lacks goes");
        assert!(inf.get("listed").is_some());
        let mut deleted = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            if let InformerEvent::Deleted(q) = ev {
                deleted.push(q.metadata.name.clone());
            }
        }
        assert_eq!(deleted, ["gone"]);
    }

    #[test]
    fn a_write_observed_while_the_watch_reports_it_deleted_never_stays_as_a_ghost() {
        // Another process deletes an object the moment this one wrote it: the watch reports it
        // Deleted (version 0: it never read it) while the writer observes it, in any order.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let inf = Informer::<Queue>::new(store.clone(), InformerOptions::default());
        let barrier = std::sync::Barrier::new(2);
        for i in 0..1000 {
            let name = format!("q{i}");
            let written = store.create(&queue(&name)).unwrap();
            store.delete::<Queue>(&name, None).unwrap();
            std::thread::scope(|sc| {
                sc.spawn(|| {
                    barrier.wait();
                    inf.on_watch_deleted(&name, 0);
                });
                barrier.wait();
                inf.observe(written);
            });
            assert!(inf.get(&name).is_none(), "{name} stayed in the cache");
        }
    }

    #[tokio::test]
    async fn an_object_written_and_deleted_before_the_watch_began_does_not_stay_cached() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let inf = Informer::<Queue>::new(store.clone(), InformerOptions::default());
        let listed = inf.relist().expect("a list");
        // Written (and observed) after the list, then deleted by another process, all before
        // the watch was set up: no event will ever tell of it.
        let gone = store.create(&queue("gone")).unwrap();
        inf.observe(gone);
        store.delete::<Queue>("gone", None).unwrap();
        let kept = store.create(&queue("kept")).unwrap();
        inf.observe(kept);
        inf.recheck_unlisted(&listed);
        assert!(inf.get("gone").is_none(), "what the store lacks goes");
        assert!(inf.get("kept").is_some(), "what the store has stays");
    }

    #[tokio::test]
    async fn an_object_found_missing_from_the_store_is_dropped_unless_a_newer_one_was_cached() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let inf = Informer::<Queue>::new(store.clone(), InformerOptions::default());
        let mut rx = inf.subscribe();
        let old = store.create(&queue("q")).unwrap();
        // A later write of it, as this process would observe it.
        let mut new = old.clone();
        new.metadata.resource_version = (old.revision() + 5).to_string();
        inf.observe(new.clone());
        store.delete::<Queue>("q", None).unwrap();
        // The caller judged the older version: what the cache holds now is not what it found
        // missing.
        inf.drop_missing("q", old.revision());
        assert_eq!(inf.get("q").map(|q| q.revision()), Some(new.revision()));
        inf.drop_missing("q", new.revision());
        assert!(inf.get("q").is_none(), "the version found missing goes");
        let deleted: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok())
            .filter_map(|ev| match ev {
                InformerEvent::Deleted(q) => Some(q.metadata.name.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(deleted, ["q"], "subscribers hear of it once");
    }
}
