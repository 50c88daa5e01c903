//! What the `regproxy cache …` commands do, safe to run beside a running proxy: every change is
//! a file removal or an index append, which the proxy already tolerates.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::time::SystemTime;

use super::digest::Digest;
use super::evict::{self, Bounds, Report};
use super::store::{OnDisk, Store, StoreError};
use super::{keys, MAX_MANIFEST};

/// One cached object as `cache ls` shows it.
#[derive(Debug, Clone)]
pub struct Listed {
    /// The object.
    pub object: OnDisk,
    /// Its media type, as the upstream sent it.
    pub media_type: Option<String>,
    /// `host/repo:tag` names whose manifest tree references it.
    pub refs: BTreeSet<String>,
}

/// Every object, with its media type and the tags that reference it.
pub fn list(store: &Store) -> Vec<Listed> {
    let meta = object_metadata(store);
    let refs = references(store);
    let mut out: Vec<Listed> = store
        .objects_on_disk()
        .into_iter()
        .map(|object| Listed {
            media_type: meta.get(&object.digest.to_string()).cloned().flatten(),
            refs: refs
                .get(&object.digest.to_string())
                .cloned()
                .unwrap_or_default(),
            object,
        })
        .collect();
    out.sort_by_key(|l| std::cmp::Reverse(l.object.accessed));
    out
}

/// Why `cache rm` removed nothing, or not all it meant to.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    /// Not a digest, though it starts like one.
    #[error(transparent)]
    Digest(#[from] crate::cache::digest::DigestError),
    /// A well-formed digest that is not in the cache.
    #[error("{digest} is not cached in {}; nothing removed", dir.display())]
    NotCached {
        digest: Digest,
        dir: std::path::PathBuf,
    },
    /// Neither a digest nor a cached tag.
    #[error("no cached tag {0} (expected DIGEST or HOST/REPO:TAG, as `cache ls` shows)")]
    NoTag(String),
    /// A file could not be removed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The tag's index entry could not be deleted.
    #[error("cache index: {0}")]
    Index(#[source] cacache::Error),
}

/// Removes one object by digest, or an image (`host/repo:tag`): its tag and every object of its
/// manifest tree that no other tag references. Returns the digests removed.
pub fn remove(store: &Store, what: &str) -> Result<Vec<String>, RemoveError> {
    if what.starts_with("sha256:") || what.starts_with("sha512:") {
        let digest = Digest::parse(what)?;
        let Some(object) = store
            .objects_on_disk()
            .into_iter()
            .find(|o| o.digest == digest)
        else {
            return Err(RemoveError::NotCached {
                digest,
                dir: store.dir().to_owned(),
            });
        };
        store.remove_object(&object)?;
        return Ok(vec![digest.to_string()]);
    }
    let tags = tag_records(store);
    let Some(roots) = tags.get(what) else {
        return Err(RemoveError::NoTag(what.to_owned()));
    };
    let mine: BTreeSet<String> = roots.iter().flat_map(|d| tree(store, d)).collect();
    let others: BTreeSet<String> = tags
        .iter()
        .filter(|(name, _)| name.as_str() != what)
        .flat_map(|(_, ds)| ds.iter().flat_map(|d| tree(store, d)))
        .collect();
    let mut removed = Vec::new();
    for object in store.objects_on_disk() {
        let d = object.digest.to_string();
        if mine.contains(&d) && !others.contains(&d) {
            store.remove_object(&object)?;
            removed.push(d);
        }
    }
    let key = keys::tag(what);
    cacache::index::delete(store.dir(), &key).map_err(RemoveError::Index)?;
    Ok(removed)
}

/// What `cache gc` did.
#[derive(Debug, Default)]
pub struct Gc {
    /// Eviction to the configured bounds.
    pub evicted: Report,
    /// Content files no index entry points to (a crash between rename and index write).
    pub orphans: u64,
}

/// Evicts to `bounds`, removes orphaned content files and compacts the index.
pub fn gc(store: &Store, bounds: &Bounds) -> Result<Gc, StoreError> {
    let indexed: BTreeSet<String> = object_metadata(store).into_keys().collect();
    let mut orphans = 0;
    for object in store.objects_on_disk() {
        if !indexed.contains(&object.digest.to_string()) && !store.is_pinned(&object.path) {
            store.remove_object(&object)?;
            orphans += 1;
        }
    }
    let evicted = evict::evict(store, bounds)?;
    Ok(Gc { evicted, orphans })
}

/// Re-hashes every object; removes and returns those whose bytes do not match their digest.
pub fn verify(store: &Store) -> Result<(usize, Vec<String>), StoreError> {
    let objects = store.objects_on_disk();
    let mut corrupt = Vec::new();
    for object in &objects {
        if !hashes_to(object) {
            store.remove_object(object)?;
            corrupt.push(object.digest.to_string());
        }
    }
    Ok((objects.len(), corrupt))
}

fn hashes_to(object: &OnDisk) -> bool {
    let Ok(mut file) = std::fs::File::open(&object.path) else {
        return false;
    };
    let mut hasher = object.digest.hasher();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return hasher.matches(&object.digest),
            Ok(n) => hasher.update(&buf[..n]),
            Err(_) => return false,
        }
    }
}

/// Media type of every indexed object, by digest.
fn object_metadata(store: &Store) -> BTreeMap<String, Option<String>> {
    cacache::index::ls(store.dir())
        .flatten()
        .filter_map(|m| {
            let digest = keys::object_digest(&m.key)?.to_owned();
            let ct = m
                .metadata
                .get("content_type")
                .and_then(|v| v.as_str())
                .map(str::to_owned);
            Some((digest, ct))
        })
        .collect()
}

/// `HOST/REPO:TAG` → the manifest digests its records point to (one per Accept class).
fn tag_records(store: &Store) -> BTreeMap<String, Vec<String>> {
    cacache::index::ls(store.dir())
        .flatten()
        .filter_map(|m| {
            let name = keys::tag_name(&m.key)?.to_owned();
            let entry: super::store::TagEntry = serde_json::from_value(m.metadata).ok()?;
            let digests = entry
                .by_accept
                .values()
                .map(|c| c.record.digest.to_string());
            Some((name, digests.collect()))
        })
        .collect()
}

/// The registry hosts that have tags in the cache.
pub fn registries(store: &Store) -> BTreeSet<String> {
    tag_records(store)
        .into_keys()
        .filter_map(|name| Some(name.split_once('/')?.0.to_owned()))
        .collect()
}

/// Digest → the `host/repo:tag` names whose manifest tree holds it.
fn references(store: &Store) -> BTreeMap<String, BTreeSet<String>> {
    let mut refs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, digests) in tag_records(store) {
        for d in digests.iter().flat_map(|d| tree(store, d)) {
            refs.entry(d).or_default().insert(name.clone());
        }
    }
    refs
}

/// A manifest's digest and every digest it references, down through indexes (cached ones only).
fn tree(store: &Store, root: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![root.to_owned()];
    while let Some(d) = todo.pop() {
        if !seen.insert(d.clone()) {
            continue;
        }
        let Ok(digest) = Digest::parse(&d) else {
            continue;
        };
        let path = store.content_path(&digest);
        // Only manifests and indexes have children, and they are small: never read a layer.
        if std::fs::metadata(&path).map_or(true, |m| m.len() > MAX_MANIFEST) {
            continue;
        }
        let Ok(data) = std::fs::read(&path) else {
            continue;
        };
        // Layers are not manifests: nothing to follow.
        if let Some(refs) = crate::manifest::Refs::of(&data) {
            todo.extend(refs.all().iter().map(|r| r.digest.clone()));
        }
    }
    seen
}

/// A cached image (a tag), as the status page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// `host/repo:tag`.
    pub name: String,
    /// Bytes of the objects of its manifest tree that are on disk.
    pub bytes: u64,
    /// How many of those objects there are.
    pub objects: usize,
    /// The latest access to any of them.
    pub accessed: SystemTime,
}

/// Every tag in the cache with the size of what it references on disk (blocking: one walk of
/// the index and the content directory, and a read of each cached manifest per tag).
pub fn images(store: &Store) -> Vec<Image> {
    let on_disk: BTreeMap<String, OnDisk> = store
        .objects_on_disk()
        .into_iter()
        .map(|o| (o.digest.to_string(), o))
        .collect();
    tag_records(store)
        .into_iter()
        .map(|(name, roots)| {
            let objects: Vec<&OnDisk> = roots
                .iter()
                .flat_map(|d| tree(store, d))
                .collect::<BTreeSet<_>>()
                .iter()
                .filter_map(|d| on_disk.get(d))
                .collect();
            Image {
                name,
                bytes: objects.iter().map(|o| o.size).sum(),
                objects: objects.len(),
                accessed: objects
                    .iter()
                    .map(|o| o.accessed)
                    .max()
                    .unwrap_or(SystemTime::UNIX_EPOCH),
            }
        })
        .collect()
}

/// Seconds since an access time, for display.
pub fn age(t: SystemTime) -> u64 {
    SystemTime::now()
        .duration_since(t)
        .map_or(0, |d| d.as_secs())
}
