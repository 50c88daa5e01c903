//! The on-disk store: cacache's content layout and index, keyed by digest for immutable objects
//! and by host/repository:tag for tag mappings.
//!
//! Content is written by regproxy itself (a temporary file, hashed while it streams, renamed into
//! cacache's content path only after it verified), so that a blob is written to disk once and
//! served to clients while it is still arriving. Hits are served straight from the content file,
//! without re-hashing: the path is pinned by a test against cacache's own writer.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cacache::WriteOpts;
use serde::{Deserialize, Serialize};

use super::digest::Digest;

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

/// A verified object on disk.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The content file.
    pub path: PathBuf,
    /// Its metadata.
    pub meta: ObjectMeta,
}

/// Where a tag pointed when last checked.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TagRecord {
    /// The manifest digest.
    pub digest: String,
    /// The manifest's media type.
    pub content_type: String,
    /// The manifest's size.
    pub size: u64,
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens (creating) the store in `dir` and removes temporary files a previous run left.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let store = Store {
            dir: dir.to_owned(),
        };
        let tmp = store.tmp_dir();
        std::fs::create_dir_all(&tmp).map_err(io_err("create", &tmp))?;
        // A partial download whose process is gone is unverified and never served: remove it.
        // Partials of a live process (a `cache prefetch` beside the proxy) are left alone.
        for entry in std::fs::read_dir(&tmp)
            .map_err(io_err("read", &tmp))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name.split('-').next().unwrap_or_default();
            if pid.is_empty() || !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(store)
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where partial downloads live until they verify.
    pub fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    /// The content file of `digest` in cacache's layout (`content-v2/<alg>/<xx>/<yy>/<rest>`).
    pub fn content_path(&self, digest: &Digest) -> PathBuf {
        let alg = match digest.alg() {
            super::digest::Alg::Sha256 => "sha256",
            super::digest::Alg::Sha512 => "sha512",
        };
        let hex = digest.hex();
        self.dir
            .join("content-v2")
            .join(alg)
            .join(&hex[0..2])
            .join(&hex[2..4])
            .join(&hex[4..])
    }

    /// The verified object `digest`, if cached and its file is still there.
    pub async fn object(&self, digest: &Digest) -> Result<Option<Entry>, StoreError> {
        let Some(found) = self.find(&object_key(digest)).await? else {
            return Ok(None);
        };
        let Ok(meta) = serde_json::from_value::<ObjectMeta>(found.metadata) else {
            return Ok(None);
        };
        let path = self.content_path(digest);
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.len() == meta.size => Ok(Some(Entry { path, meta })),
            // Index without content (removed by hand, or the file does not match): a miss.
            _ => Ok(None),
        }
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
        tokio::fs::rename(tmp, &path)
            .await
            .map_err(io_err("commit", &path))?;
        let json = serde_json::to_value(meta).map_err(|e| StoreError::Index(e.to_string()))?;
        let opts = WriteOpts::new()
            .integrity(digest.integrity())
            .size(meta.size as usize)
            .metadata(json);
        cacache::index::insert_async(&self.dir, &object_key(digest), opts)
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

    /// A fresh, unused path in the temporary directory.
    pub fn new_tmp_path(&self) -> PathBuf {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        self.tmp_dir()
            .join(format!("{}-{n}.part", std::process::id()))
    }

    /// The tag record of `host/repo:tag` and how long ago it was last confirmed upstream.
    pub async fn tag(
        &self,
        name: &TagName<'_>,
    ) -> Result<Option<(TagRecord, Duration)>, StoreError> {
        let Some(found) = self.find(&name.key()).await? else {
            return Ok(None);
        };
        let Ok(record) = serde_json::from_value::<TagRecord>(found.metadata) else {
            return Ok(None);
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let age = Duration::from_millis(now.saturating_sub(found.time) as u64);
        Ok(Some((record, age)))
    }

    /// Records (or re-confirms, which resets its age) where a tag points.
    pub async fn set_tag(&self, name: &TagName<'_>, record: &TagRecord) -> Result<(), StoreError> {
        let digest = Digest::parse(&record.digest).map_err(StoreError::Index)?;
        let json = serde_json::to_value(record).map_err(|e| StoreError::Index(e.to_string()))?;
        let opts = WriteOpts::new()
            .integrity(digest.integrity())
            .size(record.size as usize)
            .metadata(json);
        cacache::index::insert_async(&self.dir, &name.key(), opts)
            .await
            .map_err(|e| StoreError::Index(e.to_string()))?;
        Ok(())
    }

    async fn find(&self, key: &str) -> Result<Option<cacache::Metadata>, StoreError> {
        cacache::index::find_async(&self.dir, key)
            .await
            .map_err(|e| StoreError::Index(e.to_string()))
    }
}

/// A tag in a repository on a registry host.
#[derive(Debug, Clone)]
pub struct TagName<'a> {
    /// Registry host (and port when not 443).
    pub host: &'a str,
    /// Repository path.
    pub repo: &'a str,
    /// Tag.
    pub tag: &'a str,
}

impl TagName<'_> {
    fn key(&self) -> String {
        format!("regproxy:tag:{}/{}:{}", self.host, self.repo, self.tag)
    }
}

fn object_key(digest: &Digest) -> String {
    format!("regproxy:object:{digest}")
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
        let store = Store::open(dir.path()).unwrap();
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
        let entry = store.object(&d2).await.unwrap().unwrap();
        assert_eq!(entry.meta, meta);
    }

    #[tokio::test]
    async fn tags_record_and_age() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let name = TagName {
            host: "registry.test:5000",
            repo: "a/b",
            tag: "latest",
        };
        assert!(store.tag(&name).await.unwrap().is_none());
        let record = TagRecord {
            digest: Digest::sha256_of(b"m").to_string(),
            content_type: "application/vnd.oci.image.manifest.v1+json".into(),
            size: 1,
        };
        store.set_tag(&name, &record).await.unwrap();
        let (got, age) = store.tag(&name).await.unwrap().unwrap();
        assert_eq!(got, record);
        assert!(age < Duration::from_secs(5));
    }

    #[test]
    fn leftover_partials_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        // No process has pid 0 in /proc, so this partial is an orphan.
        std::fs::write(dir.path().join("tmp/0-0.part"), b"half").unwrap();
        Store::open(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }
}
