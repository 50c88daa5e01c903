//! The on-disk store: cacache's content layout and index, keyed by digest for immutable objects
//! and by host/repository:tag for tag mappings.
//!
//! Content is written by regproxy itself (a temporary file, hashed while it streams, renamed into
//! cacache's content path only after it verified), so that a blob is written to disk once and
//! served to clients while it is still arriving. Hits are served straight from the content file,
//! without re-hashing: the path is pinned by a test against cacache's own writer.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cacache::WriteOpts;
use serde::{Deserialize, Serialize};

use super::digest::Digest;
use super::flight::Flight;
use super::memo::Memo;
use super::{keys, layout};
use crate::metrics::Metrics;

/// What the store could not do; never holds content or secrets.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("cache {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// The cacache index could not be read or written.
    #[error("cache index: {0}")]
    Index(String),
}

/// What is remembered about an immutable object besides its bytes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ObjectMeta {
    /// `Content-Type` as the upstream sent it (manifests need it exactly).
    pub content_type: Option<String>,
    /// Size in bytes.
    pub size: u64,
}

/// A registry host (with its port when not 443) and a repository on it: where bytes came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    /// Registry host, as in [`TagName::host`].
    pub host: String,
    /// Repository path.
    pub repo: String,
}

impl Origin {
    /// The origin `host/repo`.
    pub fn new(host: impl Into<String>, repo: impl Into<String>) -> Origin {
        Origin {
            host: host.into(),
            repo: repo.into(),
        }
    }

    /// Parses `host/repo` as written by [`Origin`]'s `Display`.
    fn parse(name: &str) -> Option<Origin> {
        let (host, repo) = name.split_once('/')?;
        (!host.is_empty() && !repo.is_empty()).then(|| Origin::new(host, repo))
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.host, self.repo)
    }
}

/// Objects up to this size are kept in memory once looked up.
const SMALL: u64 = 16 * 1024;
/// Small objects kept in memory at most (4 MiB at most in all).
const MAX_SMALL: usize = 256;
/// Tag entries kept in memory at most.
const MAX_TAGS: usize = 1024;

/// A verified object on disk.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The content file.
    pub path: PathBuf,
    /// Its metadata.
    pub meta: ObjectMeta,
}

/// A cached object found on disk: its open file, its entry, and its bytes if it is small.
pub type Found = (std::fs::File, Entry, Option<bytes::Bytes>);

/// Where a tag pointed when last checked.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TagRecord {
    /// The manifest digest.
    pub digest: Digest,
    /// The manifest's media type.
    pub content_type: String,
    /// The manifest's size.
    pub size: u64,
}

/// The cache directory.
#[derive(Clone)]
pub struct Store {
    dir: PathBuf,
    metrics: Arc<Metrics>,
    // Content files being read by clients, which eviction must leave alone.
    pins: Arc<Mutex<HashMap<PathBuf, usize>>>,
    // Woken on each commit, so that eviction looks at the bounds when the cache grew.
    committed: Arc<tokio::sync::Notify>,
    // Where objects came from, as read from or written to the index by this process (a bounded
    // cache of the index), and the lock that orders its updates.
    sources: Arc<Mutex<HashMap<Digest, Vec<Origin>>>>,
    // Small objects (manifests, configs) and tag entries as last read from the disk, so that
    // their hits need no disk at all.
    small: Arc<Memo<Digest, Arc<Flight>>>,
    tags: Arc<Memo<String, Arc<TagEntry>>>,
    adding: Arc<tokio::sync::Mutex<()>>,
    // This process's directory for partial downloads, and the lock that marks it alive.
    run_dir: PathBuf,
    _run_lock: Arc<std::fs::File>,
}

/// An object file on disk, as eviction and the cache commands see it.
#[derive(Debug, Clone)]
pub struct OnDisk {
    /// Its digest (from the path).
    pub digest: Digest,
    /// The content file.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Last access: set when committed and refreshed by hits.
    pub accessed: SystemTime,
}

/// Keeps a content file out of eviction while it is being served.
pub struct Pin {
    pins: Arc<Mutex<HashMap<PathBuf, usize>>>,
    path: PathBuf,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut pins = self.pins.lock();
        if let Some(n) = pins.get_mut(&self.path) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.path);
            }
        }
    }
}

impl Store {
    /// Whether `dir` holds a cache: [`Store::open`] has been there (it always makes `tmp/`), or
    /// objects or an index are in it.
    pub fn exists(dir: &Path) -> bool {
        ["tmp", "content-v2", "index-v5"]
            .iter()
            .any(|sub| dir.join(sub).is_dir())
    }

    /// Opens (creating) the store in `dir`, removes temporary files a dead run left, and counts
    /// what is on disk into `metrics`.
    pub fn open(dir: &Path, metrics: Arc<Metrics>) -> Result<Store, StoreError> {
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(io_err("create", &tmp))?;
        remove_dead_partials(&tmp)?;
        let (run_dir, run_lock) = lock_run_dir(&tmp)?;
        let store = Store {
            dir: dir.to_owned(),
            metrics,
            pins: Arc::default(),
            committed: Arc::default(),
            sources: Arc::default(),
            small: Arc::new(Memo::new(MAX_SMALL)),
            tags: Arc::new(Memo::new(MAX_TAGS)),
            adding: Arc::default(),
            run_dir,
            _run_lock: Arc::new(run_lock),
        };
        store.recount();
        Ok(store)
    }

    /// Sets the entry and byte gauges from what is on disk (blocking), which also corrects them
    /// after `cache` commands run by another process removed objects.
    pub fn recount(&self) {
        let objects = self.objects_on_disk();
        let bytes = objects.iter().map(|o| o.size).sum();
        let entries = objects.len() as u64;
        self.metrics.cache_entries.store(entries, Ordering::Relaxed);
        self.metrics.cache_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Every content file in the store (a blocking directory walk).
    pub fn objects_on_disk(&self) -> Vec<OnDisk> {
        layout::content_files(&self.dir)
            .into_iter()
            .map(|(digest, path, meta)| OnDisk {
                digest,
                path,
                size: meta.len(),
                accessed: meta.modified().unwrap_or(UNIX_EPOCH),
            })
            .collect()
    }

    /// Marks `path` as being served until the returned guard is dropped.
    pub fn pin(&self, path: &Path) -> Pin {
        let mut pins = self.pins.lock();
        *pins.entry(path.to_owned()).or_default() += 1;
        Pin {
            pins: self.pins.clone(),
            path: path.to_owned(),
        }
    }

    /// Whether `path` is being served.
    pub fn is_pinned(&self, path: &Path) -> bool {
        let pins = self.pins.lock();
        pins.contains_key(path)
    }

    /// Removes an object's file and index entry; the gauges follow.
    pub fn remove_object(&self, object: &OnDisk) -> Result<(), StoreError> {
        match std::fs::remove_file(&object.path) {
            Ok(()) => {
                self.metrics.cache_entries.fetch_sub(1, Ordering::Relaxed);
                self.metrics
                    .cache_bytes
                    .fetch_sub(object.size, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &object.path)(e)),
        }
        self.sources.lock().remove(&object.digest);
        self.small.remove(&object.digest);
        cacache::index::delete(&self.dir, &keys::object(&object.digest))
            .map_err(|e| StoreError::Index(e.to_string()))
    }

    /// Notified after a commit that grew the cache.
    pub fn commit_hint(&self) -> Arc<tokio::sync::Notify> {
        self.committed.clone()
    }

    /// Rewrites the index to its latest entry per key, dropping removed keys and objects whose
    /// content is gone: cacache's index only ever appends (blocking I/O).
    pub fn compact_index(&self) -> Result<(), StoreError> {
        // An object's entry, and the record of its sources, go with its content.
        let live = |key: &str| match keys::object_digest(key).or(keys::sources_digest(key)) {
            Some(d) => Digest::parse(d).is_ok_and(|d| self.content_path(&d).exists()),
            None => true,
        };
        let compacted = layout::compact_index(&self.dir, live)
            .map_err(|(what, path, source)| StoreError::Io { what, path, source });
        // What was read from the index before may be gone from it now.
        self.small.clear();
        self.tags.clear();
        compacted
    }

    /// The metrics the store keeps current.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The content file of `digest` in cacache's layout.
    pub fn content_path(&self, digest: &Digest) -> PathBuf {
        layout::content_path(&self.dir, digest)
    }

    /// The verified object `digest`, if cached and its file is still there.
    ///
    /// The file comes open, checked against the recorded size, and its access time refreshed:
    /// one trip to the blocking pool per hit. A small object's bytes come too, read whole.
    pub async fn object(&self, digest: &Digest) -> Result<Option<Found>, StoreError> {
        let (dir, key, path) = (
            self.dir.clone(),
            keys::object(digest),
            self.content_path(digest),
        );
        // The index read and the open in one blocking task: each hand-off to the blocking pool
        // and back costs more than a small hit's whole answer.
        let found = blocking(move || {
            let Some(found) = find_in(&dir, &key)? else {
                return Ok(None);
            };
            let Ok(meta) = serde_json::from_value::<ObjectMeta>(found.metadata) else {
                return Ok(None);
            };
            let Some(file) = open_sized(&path, meta.size) else {
                return Ok(None);
            };
            let data = (meta.size > 0 && meta.size <= SMALL)
                .then(|| read_whole(&file, meta.size))
                .flatten();
            Ok(Some((file, Entry { path, meta }, data)))
        })
        .await?;
        if found.is_none() {
            self.small.remove(digest);
        }
        Ok(found)
    }

    /// Holds a small object's flight in memory for a moment, for [`Store::remembered`].
    pub fn remember(&self, digest: &Digest, flight: Arc<Flight>) {
        self.small.put(digest.clone(), flight);
    }

    /// A small object's flight in memory, if read from the disk a moment ago.
    pub fn remembered(&self, digest: &Digest) -> Option<Arc<Flight>> {
        self.small.get(digest)
    }

    /// Moves the verified file `tmp` into place as `digest` and records it in the index.
    pub async fn commit(
        &self,
        tmp: &Path,
        digest: &Digest,
        meta: &ObjectMeta,
    ) -> Result<(), StoreError> {
        let path = self.content_path(digest);
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(io_err("create", parent))?;
        }
        let existed = tokio::fs::try_exists(&path).await.unwrap_or(false);
        tokio::fs::rename(tmp, &path)
            .await
            .map_err(io_err("commit", &path))?;
        if let Err(e) = self.index_object(digest, meta).await {
            // Without its index entry the file would be neither served nor counted nor evicted.
            if !existed {
                let _ = tokio::fs::remove_file(&path).await;
            }
            return Err(e);
        }
        if !existed {
            self.metrics.cache_entries.fetch_add(1, Ordering::Relaxed);
            self.metrics
                .cache_bytes
                .fetch_add(meta.size, Ordering::Relaxed);
            self.committed.notify_one();
        }
        Ok(())
    }

    /// Appends the index entry that makes a content file an object of the store.
    async fn index_object(&self, digest: &Digest, meta: &ObjectMeta) -> Result<(), StoreError> {
        let json = serde_json::to_value(meta).map_err(|e| StoreError::Index(e.to_string()))?;
        let opts = WriteOpts::new()
            .integrity(digest.integrity())
            .size(meta.size as usize)
            .metadata(json);
        cacache::index::insert_async(&self.dir, &keys::object(digest), opts)
            .await
            .map_err(|e| StoreError::Index(e.to_string()))?;
        Ok(())
    }

    /// Writes a small verified object (a manifest) held in memory.
    pub async fn put(
        &self,
        digest: &Digest,
        data: &[u8],
        meta: &ObjectMeta,
    ) -> Result<(), StoreError> {
        let tmp = self.new_tmp_path();
        let write = async {
            let mut f = tokio::fs::File::create(&tmp).await?;
            tokio::io::AsyncWriteExt::write_all(&mut f, data).await?;
            f.sync_all().await
        };
        write.await.map_err(io_err("write", &tmp))?;
        let result = self.commit(&tmp, digest, meta).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    /// A fresh, unused path in this process's directory for partial downloads.
    pub fn new_tmp_path(&self) -> PathBuf {
        use std::sync::atomic::AtomicU64;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        self.run_dir.join(format!("{n}.part"))
    }

    /// The record of `name` for its Accept class, and how long ago it was last confirmed.
    pub async fn tag(
        &self,
        name: &TagName<'_>,
    ) -> Result<Option<(TagRecord, Duration)>, StoreError> {
        let entry = self.tag_entry(name).await?;
        Ok(entry.by_accept.get(name.accept).map(|c| {
            let age = now_ms().saturating_sub(c.checked_ms);
            (c.record.clone(), Duration::from_millis(age as u64))
        }))
    }

    /// Every record of the tag, whatever Accept class it was fetched for (for stale serving).
    pub async fn tag_records(&self, name: &TagName<'_>) -> Result<Vec<TagRecord>, StoreError> {
        let entry = self.tag_entry(name).await?;
        Ok(entry.by_accept.values().map(|c| c.record.clone()).collect())
    }

    /// Records (or re-confirms, which resets its age) where a tag points for `name.accept`.
    pub async fn set_tag(&self, name: &TagName<'_>, record: &TagRecord) -> Result<(), StoreError> {
        self.set_tag_checked(name, record, now_ms()).await
    }

    /// Records where a tag pointed for `name.accept` when it was confirmed at `checked_ms` (by
    /// another node of the fleet, say).
    pub async fn set_tag_checked(
        &self,
        name: &TagName<'_>,
        record: &TagRecord,
        checked_ms: u128,
    ) -> Result<(), StoreError> {
        // Read-modify-append: a concurrent update of another class may be lost, which costs
        // that class one refetch.
        let mut entry = TagEntry::clone(&*self.tag_entry(name).await?);
        let checked = Checked {
            record: record.clone(),
            checked_ms,
        };
        entry.by_accept.insert(name.accept.to_owned(), checked);
        let json = serde_json::to_value(&entry).map_err(|e| StoreError::Index(e.to_string()))?;
        let opts = WriteOpts::new()
            .integrity(record.digest.integrity())
            .size(record.size as usize)
            .metadata(json);
        let key = name.key();
        let written = cacache::index::insert_async(&self.dir, &key, opts).await;
        match written {
            Ok(_) => self.tags.put(key, Arc::new(entry)),
            Err(e) => {
                self.tags.remove(&key);
                return Err(StoreError::Index(e.to_string()));
            }
        }
        Ok(())
    }

    /// Remembers that `repo` on `host` was served to an anonymous client (it is public), so that
    /// its cached content may be served while the upstream is down.
    pub async fn set_public(&self, host: &str, repo: &str) {
        let key = keys::public(host, repo);
        let opts = WriteOpts::new().integrity(cacache::Integrity::from(key.as_bytes()));
        if let Err(e) = cacache::index::insert_async(&self.dir, &key, opts).await {
            tracing::warn!(error = %e, "cannot record a public repository");
        }
    }

    /// Forgets that `repo` on `host` is public.
    pub async fn clear_public(&self, host: &str, repo: &str) {
        let key = keys::public(host, repo);
        let _ = cacache::index::delete_async(&self.dir, &key).await;
    }

    /// Records that the upstream `origin` served `digest` and the bytes verified, in memory and
    /// in the index (which outlives the process). Call it only after verification: a source is
    /// what lets that origin's clients have the cached bytes.
    pub async fn add_source(&self, digest: &Digest, origin: &Origin) {
        // One read-modify-write at a time: two origins recorded at once must both stay.
        let _one = self.adding.lock().await;
        let mut sources = self.sources(digest).await;
        if sources.contains(origin) {
            return;
        }
        sources.push(origin.clone());
        self.remember_sources(digest, &sources);
        let names: Vec<String> = sources.iter().map(Origin::to_string).collect();
        let opts = WriteOpts::new()
            .integrity(digest.integrity())
            .metadata(serde_json::Value::from(names));
        if let Err(e) = cacache::index::insert_async(&self.dir, &keys::sources(digest), opts).await
        {
            tracing::warn!(error = %e, "cannot record where an object came from");
        }
    }

    /// The origins known to have served `digest` (verified).
    pub async fn sources(&self, digest: &Digest) -> Vec<Origin> {
        if let Some(known) = self.sources.lock().get(digest) {
            return known.clone();
        }
        let Ok(Some(found)) = self.find(&keys::sources(digest)).await else {
            return Vec::new();
        };
        let names: Vec<String> = serde_json::from_value(found.metadata).unwrap_or_default();
        let sources: Vec<Origin> = names.iter().filter_map(|n| Origin::parse(n)).collect();
        self.remember_sources(digest, &sources);
        sources
    }

    /// Whether `origin` is among `digest`'s sources as already held in memory: a hit's usual
    /// question, answered without copying the list (`false` says only "not known here").
    pub fn known_source(&self, digest: &Digest, origin: &Origin) -> bool {
        self.sources
            .lock()
            .get(digest)
            .is_some_and(|known| known.contains(origin))
    }

    /// Keeps what the index says of `digest`'s sources in memory, within a bound (it is only a
    /// cache of the index).
    fn remember_sources(&self, digest: &Digest, sources: &[Origin]) {
        const MAX_REMEMBERED: usize = 16_384;
        let mut known = self.sources.lock();
        if known.len() >= MAX_REMEMBERED && !known.contains_key(digest) {
            known.clear();
        }
        known.insert(digest.clone(), sources.to_vec());
    }

    /// Whether `repo` on `host` was recorded public.
    pub async fn is_public(&self, host: &str, repo: &str) -> bool {
        let key = keys::public(host, repo);
        matches!(self.find(&key).await, Ok(Some(_)))
    }

    /// Shared, as the memo holds it: a hit clones a pointer, not every record of the tag.
    async fn tag_entry(&self, name: &TagName<'_>) -> Result<Arc<TagEntry>, StoreError> {
        let key = name.key();
        if let Some(entry) = self.tags.get(&key) {
            return Ok(entry);
        }
        let found = self.find(&key).await?;
        let entry: Arc<TagEntry> = Arc::new(
            found
                .and_then(|f| serde_json::from_value(f.metadata).ok())
                .unwrap_or_default(),
        );
        self.tags.put(key, entry.clone());
        Ok(entry)
    }

    async fn find(&self, key: &str) -> Result<Option<cacache::Metadata>, StoreError> {
        let (dir, key) = (self.dir.clone(), key.to_owned());
        blocking(move || find_in(&dir, &key)).await
    }
}

/// The index entry under `key`, read with the blocking reader: cacache's async one hands each
/// read of the bucket to the blocking pool on its own.
fn find_in(dir: &Path, key: &str) -> Result<Option<cacache::Metadata>, StoreError> {
    cacache::index::find(dir, key).map_err(|e| StoreError::Index(e.to_string()))
}

/// Runs a lookup on the blocking pool, in one hand-off there and back.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Index(e.to_string()))?
}

/// All `size` bytes of a small content file, or `None` if it does not have them.
fn read_whole(file: &std::fs::File, size: u64) -> Option<bytes::Bytes> {
    let mut data = vec![0u8; usize::try_from(size).ok()?];
    rustix::io::pread(file, &mut data, 0)
        .ok()
        .filter(|n| *n as u64 == size)?;
    Some(data.into())
}

/// The content file at `path`, touched, if it is there with `size` bytes: an index entry
/// without content (removed by hand) or a file of the wrong size is a miss.
fn open_sized(path: &Path, size: u64) -> Option<std::fs::File> {
    let file = std::fs::File::open(path).ok()?;
    (file.metadata().ok()?.len() == size).then(|| {
        touch(&file);
        file
    })
}

/// Where a tag pointed for each Accept class, as stored in its index entry.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TagEntry {
    /// Accept class (see [`accept_class`]) → record.
    pub by_accept: std::collections::BTreeMap<String, Checked>,
}

/// A tag record and when the upstream last confirmed it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checked {
    /// Where the tag pointed.
    #[serde(flatten)]
    pub record: TagRecord,
    /// When that was last confirmed, in ms since the epoch.
    pub checked_ms: u128,
}

pub(crate) fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
}

/// A tag in a repository on a registry host, as asked for with one `Accept` list.
///
/// The media types a client accepts decide what a tag resolves to (an index, or one platform's
/// manifest for an old client), so each distinct `Accept` list has its own record in the tag's
/// entry.
#[derive(Debug, Clone)]
pub struct TagName<'a> {
    /// Registry host (and port when not 443).
    pub host: &'a str,
    /// Repository path.
    pub repo: &'a str,
    /// Tag.
    pub tag: &'a str,
    /// The client's accepted media types, normalized (see [`accept_class`]).
    pub accept: &'a str,
}

impl TagName<'_> {
    /// The index key: `regproxy:tag:HOST/REPO:TAG`.
    pub fn key(&self) -> String {
        keys::tag_of(self.host, self.repo, self.tag)
    }
}

/// The media types of an `Accept` header list, lower-case, sorted and deduplicated (`*` when
/// there are none), so that equivalent lists share a tag record.
pub fn accept_class(headers: &http::HeaderMap) -> String {
    use std::borrow::Cow;
    // Borrowed where already lower-case (what clients send): one allocation for the list, one
    // for the result, rather than one per media type (this runs for every tag request).
    let mut types: Vec<Cow<'_, str>> = headers
        .get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.split(';').next().unwrap_or("").trim())
        .filter(|v| !v.is_empty())
        .map(|v| match v.bytes().any(|b| b.is_ascii_uppercase()) {
            true => Cow::Owned(v.to_ascii_lowercase()),
            false => Cow::Borrowed(v),
        })
        .collect();
    types.sort();
    types.dedup();
    if types.is_empty() {
        "*".into()
    } else {
        types.join(",")
    }
}

/// Records an access in the file's mtime (what LRU eviction sorts by), at most once a minute.
fn touch(file: &std::fs::File) {
    let now = SystemTime::now();
    let recent = file
        .metadata()
        .and_then(|m| m.modified())
        .is_ok_and(|m| now.duration_since(m).is_ok_and(|age| age.as_secs() < 60));
    if !recent {
        let _ = file.set_modified(now);
    }
}

/// Removes the partial downloads of processes that are gone: their run directory's lock is free.
/// Partials of a live process (a second proxy or a `cache` command on the same directory) stay.
fn remove_dead_partials(tmp: &Path) -> Result<(), StoreError> {
    use rustix::fs::{flock, FlockOperation};
    for entry in std::fs::read_dir(tmp)
        .map_err(io_err("read", tmp))?
        .flatten()
    {
        let path = entry.path();
        if !path.is_dir() {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        let alive = std::fs::File::open(path.join("lock"))
            .is_ok_and(|f| flock(&f, FlockOperation::NonBlockingLockExclusive).is_err());
        if !alive {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
    Ok(())
}

/// Creates and locks this process's run directory under `tmp`.
fn lock_run_dir(tmp: &Path) -> Result<(PathBuf, std::fs::File), StoreError> {
    use rustix::fs::{flock, FlockOperation};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let dir = tmp.join(format!("run-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
    let lock_path = dir.join("lock");
    let lock = std::fs::File::create(&lock_path).map_err(io_err("create", &lock_path))?;
    flock(&lock, FlockOperation::NonBlockingLockExclusive)
        .map_err(|e| io_err("lock", &lock_path)(e.into()))?;
    Ok((dir, lock))
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io { what, path, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins the layout: if a cacache upgrade moves content files, this fails instead of every
    /// hit silently turning into a miss (or worse, a wrong path being served).
    #[tokio::test]
    async fn content_path_is_cacaches_own_layout() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Arc::default()).unwrap();
        let data = b"pinned layout".to_vec();
        let sri = cacache::write_hash(dir.path(), &data).await.unwrap();
        let digest = Digest::sha256_of(&data);
        assert_eq!(sri, digest.integrity());
        assert_eq!(std::fs::read(store.content_path(&digest)).unwrap(), data);

        // And the other way: what regproxy commits, cacache reads and verifies.
        let other = b"committed by regproxy".to_vec();
        let d2 = Digest::sha256_of(&other);
        let meta = ObjectMeta {
            content_type: Some("application/octet-stream".into()),
            size: other.len() as u64,
        };
        store.put(&d2, &other, &meta).await.unwrap();
        assert_eq!(
            cacache::read_hash(dir.path(), &d2.integrity())
                .await
                .unwrap(),
            other
        );
        let (_, entry, _) = store.object(&d2).await.unwrap().unwrap();
        assert_eq!(entry.meta, meta);
    }

    /// A small object comes with its bytes, and is remembered once the cache holds it so; removing
    /// it (as eviction does) makes it a miss at once.
    #[tokio::test]
    async fn small_objects_answer_from_memory_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Arc::default()).unwrap();
        let data = br#"{"schemaVersion":2}"#.to_vec();
        let digest = Digest::sha256_of(&data);
        let meta = ObjectMeta {
            content_type: Some("application/vnd.oci.image.manifest.v1+json".into()),
            size: data.len() as u64,
        };
        store.put(&digest, &data, &meta).await.unwrap();
        assert!(store.remembered(&digest).is_none(), "not looked up yet");
        let (_, entry, bytes) = store.object(&digest).await.unwrap().unwrap();
        assert_eq!(&bytes.unwrap()[..], &data[..]);
        assert_eq!(entry.meta, meta);
        let head = crate::cache::flight::Head {
            content_type: meta.content_type.clone(),
            length: Some(meta.size),
        };
        let flight = Flight::in_memory(bytes::Bytes::from(data.clone()), head);
        store.remember(&digest, flight);
        let held = store
            .remembered(&digest)
            .unwrap()
            .held(0, data.len() as u64);
        assert_eq!(held.as_deref(), Some(&data[..]));

        let on_disk = store.objects_on_disk();
        let object = on_disk.iter().find(|o| o.digest == digest).unwrap();
        store.remove_object(object).unwrap();
        assert!(store.remembered(&digest).is_none());
        assert!(store.object(&digest).await.unwrap().is_none());

        // Larger objects are not held in memory.
        let big = vec![7u8; SMALL as usize + 1];
        let d2 = Digest::sha256_of(&big);
        let meta2 = ObjectMeta {
            content_type: None,
            size: big.len() as u64,
        };
        store.put(&d2, &big, &meta2).await.unwrap();
        let (_, _, bytes) = store.object(&d2).await.unwrap().unwrap();
        assert!(bytes.is_none());
    }

    /// An object whose index entry cannot be written is not left on disk or counted: it could
    /// never be served, evicted or listed.
    #[tokio::test]
    async fn a_commit_whose_index_write_fails_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let store = Store::open(dir.path(), metrics.clone()).unwrap();
        let index = dir.path().join("index-v5");
        let _ = std::fs::remove_dir_all(&index);
        std::fs::write(&index, b"not a directory").unwrap();
        let data = b"never indexed".to_vec();
        let digest = Digest::sha256_of(&data);
        let meta = ObjectMeta {
            content_type: None,
            size: data.len() as u64,
        };
        assert!(store.put(&digest, &data, &meta).await.is_err());
        assert!(!store.content_path(&digest).exists());
        assert_eq!(metrics.cache_entries.load(Ordering::Relaxed), 0);
        assert_eq!(metrics.cache_bytes.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn tags_record_and_age() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Arc::default()).unwrap();
        let name = TagName {
            host: "registry.test:5000",
            repo: "a/b",
            tag: "latest",
            accept: "*",
        };
        assert!(store.tag(&name).await.unwrap().is_none());
        let record = TagRecord {
            digest: Digest::sha256_of(b"m"),
            content_type: "application/vnd.oci.image.manifest.v1+json".into(),
            size: 1,
        };
        store.set_tag(&name, &record).await.unwrap();
        let (got, age) = store.tag(&name).await.unwrap().unwrap();
        assert_eq!(got, record);
        assert!(age < Duration::from_secs(5));
    }

    /// Pins cacache's index line format too: compaction leaves one line per key, which cacache
    /// still reads, and drops removed keys.
    #[tokio::test]
    async fn compaction_keeps_the_latest_entry_per_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Arc::default()).unwrap();
        let name = TagName {
            host: "h",
            repo: "r",
            tag: "t",
            accept: "*",
        };
        for n in 1..=3u64 {
            let record = TagRecord {
                digest: Digest::sha256_of(&[n as u8]),
                content_type: "x".into(),
                size: n,
            };
            store.set_tag(&name, &record).await.unwrap();
        }
        let gone = TagName {
            tag: "gone",
            ..name.clone()
        };
        store
            .set_tag(
                &gone,
                &TagRecord {
                    digest: Digest::sha256_of(b"g"),
                    content_type: "x".into(),
                    size: 1,
                },
            )
            .await
            .unwrap();
        cacache::index::delete(dir.path(), &gone.key()).unwrap();
        store.compact_index().unwrap();
        let lines: usize = walkdir::WalkDir::new(dir.path().join("index-v5"))
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .map(|e| {
                std::fs::read_to_string(e.path())
                    .unwrap()
                    .lines()
                    .filter(|l| !l.is_empty())
                    .count()
            })
            .sum();
        assert_eq!(lines, 1);
        assert_eq!(store.tag(&name).await.unwrap().unwrap().0.size, 3);
        assert!(store.tag(&gone).await.unwrap().is_none());
    }

    /// Equivalent Accept lists make one class: case, parameters, order, spacing, duplicates and
    /// the split over header lines do not matter; no list at all is `*`.
    #[test]
    fn accept_lists_normalize_to_one_class() {
        let class = |lines: &[&str]| {
            let mut h = http::HeaderMap::new();
            for l in lines {
                h.append(http::header::ACCEPT, l.parse().unwrap());
            }
            accept_class(&h)
        };
        let want = "application/a+json,application/b+json";
        assert_eq!(class(&["application/a+json,application/b+json"]), want);
        assert_eq!(
            class(&["Application/B+JSON; q=0.5 , application/a+json"]),
            want
        );
        assert_eq!(
            class(&[
                "application/b+json",
                "application/a+json",
                "application/B+json"
            ]),
            want
        );
        assert_eq!(class(&[]), "*");
        assert_eq!(class(&[" , ;q=1"]), "*");
    }

    /// Each Accept class has its own record under one key; all of them are there for stale use.
    #[tokio::test]
    async fn tag_records_per_accept_class() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Arc::default()).unwrap();
        let a = TagName {
            host: "h",
            repo: "r",
            tag: "t",
            accept: "a",
        };
        let b = TagName {
            accept: "b",
            ..a.clone()
        };
        let rec = |data: &[u8]| TagRecord {
            digest: Digest::sha256_of(data),
            content_type: "ct".into(),
            size: 1,
        };
        store.set_tag(&a, &rec(b"x")).await.unwrap();
        store.set_tag(&b, &rec(b"y")).await.unwrap();
        assert_eq!(store.tag(&a).await.unwrap().unwrap().0, rec(b"x"));
        assert_eq!(store.tag(&b).await.unwrap().unwrap().0, rec(b"y"));
        let star = TagName {
            accept: "*",
            ..a.clone()
        };
        assert!(store.tag(&star).await.unwrap().is_none());
        assert_eq!(store.tag_records(&star).await.unwrap().len(), 2);
    }

    #[test]
    fn partials_of_dead_runs_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let dead = dir.path().join("tmp/run-1-1");
        std::fs::create_dir_all(&dead).unwrap();
        std::fs::write(dead.join("lock"), b"").unwrap();
        std::fs::write(dead.join("0.part"), b"half").unwrap();
        let live = Store::open(dir.path(), Arc::default()).unwrap();
        let partial = live.new_tmp_path();
        std::fs::write(&partial, b"in progress").unwrap();
        assert!(!dead.exists());
        let _second = Store::open(dir.path(), Arc::default()).unwrap();
        assert!(partial.exists(), "a live run's partial was removed");
    }
}
