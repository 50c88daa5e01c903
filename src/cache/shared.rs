//! The shared tier: an S3-compatible object store, reached through Apache OpenDAL, that a fleet
//! of nodes shares as a second cache behind each node's disk.
//!
//! Objects are content-addressed (`blobs/sha256/<hex>`), so writes are idempotent: two nodes
//! that upload one digest upload the same bytes (Garage ignores `If-None-Match`, which makes
//! that the only safe design). The store is not trusted for bytes: what comes back is verified
//! against its digest as it streams, like an upstream fill. Beside the objects it holds what the
//! access rules need across the fleet (`origins/…`: where an object came from; `public/…`: which
//! repositories anonymous clients may pull) and tag records (`tags/…`), so that a tag confirmed
//! by one node is fresh for all.
//!
//! Everything here is best effort: a store that fails or is slow trips a breaker, after which
//! pulls go on from the local disk and the upstream, and uploads are dropped and counted.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body::Frame;
use http_body_util::BodyExt;
use opendal::{ErrorKind, Operator};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::store::{now_ms, Pin};
use super::{Digest, Head, ObjectMeta, Origin, TagName, TagRecord};
use crate::body::{Body, BoxError};
use crate::metrics::Metrics;

/// Time a metadata call (stat, list, small write) may take before the store counts as slow.
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Time one read or write of a chunk may take.
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// Failures in a row that open the breaker.
const TRIP_AFTER: u32 = 3;
/// How long an open breaker keeps the store out of the path before one call tries it again.
const COOL_OFF: Duration = Duration::from_secs(30);
/// Uploads waiting at most; beyond that they are dropped (and counted).
const QUEUE: usize = 256;
/// Uploads running at once.
const UPLOADERS: usize = 2;
/// Bytes read from a local file per write to the store.
const UPLOAD_CHUNK: usize = 1 << 20;
/// Part size of multipart uploads.
const PART: usize = 8 << 20;
/// Origin facts listed per object at most (a hostile bucket could hold any number).
const MAX_ORIGINS: usize = 256;

/// Where the shared tier lives: `s3://BUCKET[/PREFIX]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUrl {
    /// The bucket.
    pub bucket: String,
    /// The key prefix inside it, without slashes at either end (may be empty).
    pub prefix: String,
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.prefix.as_str() {
            "" => write!(f, "s3://{}", self.bucket),
            p => write!(f, "s3://{}/{p}", self.bucket),
        }
    }
}

/// How to reach the store: what the configuration says of it.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// Bucket and prefix.
    pub url: StoreUrl,
    /// The S3 endpoint; `None` for AWS.
    pub endpoint: Option<String>,
    /// The region.
    pub region: String,
    /// The access key id, when not from the environment.
    pub access_key_id: Option<String>,
    /// The file holding the secret access key, when not from the environment.
    pub secret_access_key_file: Option<PathBuf>,
}

/// What could not be set up; at run time the store only ever fails softly.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// OpenDAL refused the S3 settings.
    #[error("shared store {url}: {source}")]
    Setup {
        url: String,
        #[source]
        source: opendal::Error,
    },
    /// The secret access key file could not be read.
    #[error("secret_access_key_file {path}: {source}")]
    Secret {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The object-store tier: reads, fact lookups, and a bounded queue of uploads.
pub struct SharedTier {
    op: Operator,
    breaker: Breaker,
    queue: mpsc::Sender<Upload>,
    metrics: Arc<Metrics>,
}

/// One write waiting for the store.
enum Upload {
    /// A verified object, held out of eviction until it is uploaded.
    Object {
        digest: Digest,
        path: PathBuf,
        meta: ObjectMeta,
        _pin: Pin,
    },
    /// A small record (origin fact, public fact, tag record).
    Record { key: String, data: Bytes },
    /// A fact that no longer holds.
    Delete { key: String },
}

/// A tag record as the store keeps it: where the tag pointed and when that was confirmed.
#[derive(Debug, Serialize, Deserialize)]
struct StoredTag {
    #[serde(flatten)]
    record: TagRecord,
    checked_ms: u128,
}

impl SharedTier {
    /// The tier `settings` describe, if any; its uploaders run on the current runtime.
    pub fn start(
        settings: Option<StoreSettings>,
        metrics: Arc<Metrics>,
    ) -> Result<Option<Arc<SharedTier>>, SharedError> {
        let Some(settings) = settings else {
            return Ok(None);
        };
        let op = operator(&settings)?;
        let (queue, rx) = mpsc::channel(QUEUE);
        let tier = Arc::new(SharedTier {
            op,
            breaker: Breaker::default(),
            queue,
            metrics,
        });
        tier.metrics.shared_store_up.store(1, Ordering::Relaxed);
        tier.metrics
            .shared_store_configured
            .store(true, Ordering::Relaxed);
        tokio::spawn(upload_loop(tier.clone(), rx));
        Ok(Some(tier))
    }

    /// Whether the breaker lets calls through now.
    pub fn is_up(&self) -> bool {
        !self.breaker.is_open()
    }

    /// The object `digest`, as a head and a body that the caller must verify as it streams;
    /// `None` when the store does not have it or cannot be asked.
    pub async fn object(&self, digest: &Digest) -> Option<(Head, Body)> {
        let key = object_key(digest);
        let meta = self.call(self.op.stat(&key)).await?;
        let reader = self
            .call(self.op.reader_with(&key).chunk(UPLOAD_CHUNK))
            .await?;
        let stream = self.call(reader.into_bytes_stream(..)).await?;
        let body = http_body_util::StreamBody::new(
            stream.map(|r| r.map(Frame::data).map_err(|e| Box::new(e) as BoxError)),
        );
        let head = Head {
            content_type: meta.content_type().map(str::to_owned),
            length: Some(meta.content_length()),
        };
        self.metrics
            .shared_store_reads
            .fetch_add(1, Ordering::Relaxed);
        Some((head, BodyExt::boxed_unsync(body)))
    }

    /// The object `digest` whole, if the store has it and it is at most `max` bytes (manifests);
    /// not yet verified.
    pub async fn small_object(&self, digest: &Digest, max: u64) -> Option<(Option<String>, Bytes)> {
        let key = object_key(digest);
        let meta = self.call(self.op.stat(&key)).await?;
        if meta.content_length() > max {
            return None;
        }
        let data = self.call(self.op.read(&key)).await?.to_bytes();
        self.metrics
            .shared_store_reads
            .fetch_add(1, Ordering::Relaxed);
        Some((meta.content_type().map(str::to_owned), data))
    }

    /// The origins the fleet recorded for `digest` (each verified by the node that recorded it).
    pub async fn sources(&self, digest: &Digest) -> Vec<Origin> {
        let dir = format!("origins/{}/{}/", digest.alg().name(), digest.hex());
        let lister = self.op.list_with(&dir).recursive(true);
        let Some(entries) = self.call(lister).await else {
            return Vec::new();
        };
        let names = entries.iter().filter(|e| e.metadata().is_file());
        names
            .filter_map(|e| e.path().strip_prefix(&dir))
            .filter_map(origin_of)
            .take(MAX_ORIGINS)
            .collect()
    }

    /// Whether some node recorded `repo` on `host` as public.
    pub async fn is_public(&self, host: &str, repo: &str) -> bool {
        let key = public_key(host, repo);
        self.call(self.op.stat(&key)).await.is_some()
    }

    /// The fleet's record of a tag for its Accept class, and its age.
    pub async fn tag(&self, name: &TagName<'_>) -> Option<(TagRecord, u128)> {
        let data = self.call(self.op.read(&tag_key(name))).await?.to_bytes();
        let stored: StoredTag = serde_json::from_slice(&data).ok()?;
        Some((stored.record, stored.checked_ms))
    }

    /// Queues the upload of a verified, committed object.
    pub fn upload(&self, digest: &Digest, path: PathBuf, meta: &ObjectMeta, pin: Pin) {
        self.enqueue(Upload::Object {
            digest: digest.clone(),
            path,
            meta: meta.clone(),
            _pin: pin,
        });
    }

    /// Queues the removal of an object whose bytes did not verify, so that the next fill goes
    /// to the upstream and uploads the real ones.
    pub fn forget(&self, digest: &Digest) {
        tracing::warn!(%digest, "the shared store holds corrupt bytes; removing them");
        let key = object_key(digest);
        self.enqueue(Upload::Delete { key });
    }

    /// Queues the fact that `origin` served `digest` (verified).
    pub fn add_source(&self, digest: &Digest, origin: &Origin) {
        let key = format!(
            "origins/{}/{}/{}/{}",
            digest.alg().name(),
            digest.hex(),
            origin.host,
            origin.repo
        );
        self.enqueue(Upload::Record {
            key,
            data: Bytes::new(),
        });
    }

    /// Queues the fact that `repo` on `host` is public, or (`false`) that it no longer is.
    pub fn set_public(&self, host: &str, repo: &str, public: bool) {
        let key = public_key(host, repo);
        self.enqueue(match public {
            true => Upload::Record {
                key,
                data: Bytes::new(),
            },
            false => Upload::Delete { key },
        });
    }

    /// Queues a tag record confirmed at `checked_ms`.
    pub fn set_tag(&self, name: &TagName<'_>, record: &TagRecord, checked_ms: u128) {
        let stored = StoredTag {
            record: record.clone(),
            checked_ms,
        };
        if let Ok(json) = serde_json::to_vec(&stored) {
            let key = tag_key(name);
            self.enqueue(Upload::Record {
                key,
                data: json.into(),
            });
        }
    }

    fn enqueue(&self, upload: Upload) {
        let pending = &self.metrics.shared_store_pending;
        pending.fetch_add(1, Ordering::Relaxed);
        if self.breaker.is_open() || self.queue.try_send(upload).is_err() {
            pending.fetch_sub(1, Ordering::Relaxed);
            self.metrics
                .shared_store_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Runs one store call through the breaker and a timeout; `None` for "not there" and for
    /// any failure (which counts against the breaker).
    async fn call<T>(
        &self,
        call: impl std::future::IntoFuture<Output = opendal::Result<T>>,
    ) -> Option<T> {
        if !self.breaker.allow() {
            return None;
        }
        let outcome = tokio::time::timeout(OP_TIMEOUT, call.into_future()).await;
        match outcome {
            Ok(Ok(v)) => {
                self.succeeded();
                Some(v)
            }
            Ok(Err(e)) if e.kind() == ErrorKind::NotFound => {
                self.succeeded();
                None
            }
            Ok(Err(e)) => {
                self.failed(&e.to_string());
                None
            }
            Err(_) => {
                self.failed("timed out");
                None
            }
        }
    }

    fn succeeded(&self) {
        if self.breaker.success() {
            tracing::info!("shared store answers again");
        }
        self.metrics.shared_store_up.store(1, Ordering::Relaxed);
    }

    fn failed(&self, cause: &str) {
        self.metrics
            .shared_store_errors
            .fetch_add(1, Ordering::Relaxed);
        if self.breaker.failure() {
            tracing::warn!(
                cause,
                "shared store failing; pulls go on without it for {COOL_OFF:?}"
            );
            self.metrics.shared_store_up.store(0, Ordering::Relaxed);
        }
    }

    /// Writes one queued upload.
    async fn write(&self, upload: Upload) {
        match upload {
            Upload::Object {
                digest, path, meta, ..
            } => {
                let key = object_key(&digest);
                // Content-addressed: an object some node uploaded already is the same bytes.
                if let Some(there) = self.call(self.op.stat(&key)).await {
                    if there.content_length() == meta.size {
                        return;
                    }
                }
                // A file evicted or unreadable meanwhile says nothing about the store.
                let Ok(file) = tokio::fs::File::open(&path).await else {
                    return;
                };
                if !self.breaker.allow() {
                    return;
                }
                match self.upload_file(&key, file, &meta).await {
                    Ok(()) => {
                        self.succeeded();
                        self.metrics
                            .shared_store_uploads
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::warn!(%digest, error = %e, "upload to the shared store failed");
                        self.failed(&e.to_string());
                    }
                }
            }
            Upload::Record { key, data } => {
                self.call(self.op.write(&key, data)).await;
            }
            Upload::Delete { key } => {
                self.call(self.op.delete(&key)).await;
            }
        }
    }

    async fn upload_file(
        &self,
        key: &str,
        mut file: tokio::fs::File,
        meta: &ObjectMeta,
    ) -> Result<(), BoxError> {
        use tokio::io::AsyncReadExt;
        let mut writer = self.op.writer_with(key).chunk(PART);
        if let Some(ct) = &meta.content_type {
            writer = writer.content_type(ct);
        }
        let mut writer = writer.await?;
        let mut sent = 0u64;
        loop {
            let mut buf = bytes::BytesMut::with_capacity(UPLOAD_CHUNK);
            let n = file.read_buf(&mut buf).await?;
            if n == 0 {
                break;
            }
            sent += n as u64;
            writer.write(buf.freeze()).await?;
        }
        if sent != meta.size {
            writer.abort().await?;
            return Err(format!("the cached file has {sent} of {} bytes", meta.size).into());
        }
        writer.close().await?;
        Ok(())
    }
}

/// Writes queued uploads, a few at a time, until the tier is dropped.
async fn upload_loop(tier: Arc<SharedTier>, rx: mpsc::Receiver<Upload>) {
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let workers = (0..UPLOADERS).map(|_| {
        let (tier, rx) = (tier.clone(), rx.clone());
        tokio::spawn(async move {
            loop {
                let next = rx.lock().await.recv().await;
                let Some(upload) = next else { return };
                tier.write(upload).await;
                tier.metrics
                    .shared_store_pending
                    .fetch_sub(1, Ordering::Relaxed);
            }
        })
    });
    let workers: Vec<_> = workers.collect();
    drop(tier);
    for w in workers {
        let _ = w.await;
    }
}

/// The OpenDAL operator for the store `config` describes.
pub(crate) fn operator(config: &StoreSettings) -> Result<Operator, SharedError> {
    let url = &config.url;
    let setup = |source| SharedError::Setup {
        url: url.to_string(),
        source,
    };
    let mut s3 = opendal::services::S3::default()
        .bucket(&url.bucket)
        .root(&format!("/{}", url.prefix))
        .region(&config.region);
    if let Some(endpoint) = &config.endpoint {
        s3 = s3.endpoint(endpoint);
    }
    // Explicit settings win; otherwise OpenDAL reads AWS_* and the AWS config files itself.
    let key_id = config
        .access_key_id
        .clone()
        .or_else(|| std::env::var("AWS_ACCESS_KEY_ID").ok());
    if let Some(id) = key_id {
        s3 = s3.access_key_id(&id);
    }
    if let Some(path) = &config.secret_access_key_file {
        let secret = std::fs::read_to_string(path).map_err(|source| SharedError::Secret {
            path: path.clone(),
            source,
        })?;
        s3 = s3.secret_access_key(secret.trim());
    }
    let timeouts = opendal::layers::TimeoutLayer::new()
        .with_timeout(OP_TIMEOUT)
        .with_io_timeout(IO_TIMEOUT);
    Ok(Operator::new(s3).map_err(setup)?.layer(timeouts).finish())
}

fn object_key(digest: &Digest) -> String {
    format!("blobs/{}/{}", digest.alg().name(), digest.hex())
}

fn public_key(host: &str, repo: &str) -> String {
    format!("public/{host}/{repo}/_")
}

/// `tags/HOST/REPO/@TAG/<hash of the Accept class>`: `@` appears in no repository or tag name.
fn tag_key(name: &TagName<'_>) -> String {
    use sha2::Digest as _;
    let class = hex::encode(&sha2::Sha256::digest(name.accept.as_bytes())[..16]);
    format!("tags/{}/{}/@{}/{class}", name.host, name.repo, name.tag)
}

/// `HOST/REPO` from the tail of an origin fact's key.
fn origin_of(tail: &str) -> Option<Origin> {
    let (host, repo) = tail.split_once('/')?;
    (!host.is_empty() && !repo.is_empty()).then(|| Origin::new(host, repo))
}

/// When a tag record confirmed at `checked_ms` was confirmed, as an age.
pub fn age_of(checked_ms: u128) -> Duration {
    Duration::from_millis(now_ms().saturating_sub(checked_ms) as u64)
}

/// Failures in a row open it; an open breaker lets one call through after [`COOL_OFF`].
#[derive(Debug, Default)]
struct Breaker {
    state: Mutex<BreakerState>,
}

#[derive(Debug, Default)]
struct BreakerState {
    failures: u32,
    open_until: Option<Instant>,
}

impl Breaker {
    fn is_open(&self) -> bool {
        let s = self.state.lock();
        s.open_until.is_some_and(|t| Instant::now() < t)
    }

    /// Whether a call may go now; after the cool-off, one goes and the rest wait for its end.
    fn allow(&self) -> bool {
        let mut s = self.state.lock();
        match s.open_until {
            Some(t) if Instant::now() < t => false,
            Some(_) => {
                s.open_until = Some(Instant::now() + COOL_OFF);
                true
            }
            None => true,
        }
    }

    /// Records a success; `true` when that closed an open breaker.
    fn success(&self) -> bool {
        let mut s = self.state.lock();
        let was_open = s.open_until.take().is_some();
        s.failures = 0;
        was_open
    }

    /// Records a failure; `true` when that opened the breaker.
    fn failure(&self) -> bool {
        let mut s = self.state.lock();
        s.failures += 1;
        let opens = s.failures >= TRIP_AFTER;
        let was_closed = s.open_until.is_none();
        if opens {
            s.open_until = Some(Instant::now() + COOL_OFF);
        }
        opens && was_closed
    }
}

/// The bucket lifecycle rules a shared store wants: objects expire `days` after their upload
/// (a node re-uploads what it still pulls), abandoned multipart uploads after a day. JSON for
/// `aws s3api put-bucket-lifecycle-configuration`, or S3's XML (`format = "xml"`).
pub fn lifecycle(url: &StoreUrl, days: u32, xml: bool) -> String {
    let prefix = if url.prefix.is_empty() {
        String::new()
    } else {
        format!("{}/", url.prefix)
    };
    if xml {
        return format!(
            "<LifecycleConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\n\
             <Rule><ID>regproxy-expire-objects</ID><Status>Enabled</Status>\
             <Filter><Prefix>{prefix}</Prefix></Filter><Expiration><Days>{days}</Days></Expiration></Rule>\n\
             <Rule><ID>regproxy-abort-multipart</ID><Status>Enabled</Status>\
             <Filter><Prefix>{prefix}</Prefix></Filter>\
             <AbortIncompleteMultipartUpload><DaysAfterInitiation>1</DaysAfterInitiation></AbortIncompleteMultipartUpload></Rule>\n\
             </LifecycleConfiguration>\n"
        );
    }
    let rules = serde_json::json!({
        "Rules": [
            {
                "ID": "regproxy-expire-objects",
                "Status": "Enabled",
                "Filter": { "Prefix": prefix },
                "Expiration": { "Days": days }
            },
            {
                "ID": "regproxy-abort-multipart",
                "Status": "Enabled",
                "Filter": { "Prefix": prefix },
                "AbortIncompleteMultipartUpload": { "DaysAfterInitiation": 1 }
            }
        ]
    });
    serde_json::to_string_pretty(&rules).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_after_failures_in_a_row_and_closes_on_success() {
        let b = Breaker::default();
        assert!(!b.failure() && !b.failure());
        assert!(b.allow());
        assert!(b.failure(), "the third failure opens it");
        assert!(b.is_open() && !b.allow());
        assert!(b.success(), "a success closes it");
        assert!(!b.is_open() && b.allow());
    }

    #[test]
    fn keys_keep_names_apart() {
        let name = TagName {
            host: "registry.test:5000",
            repo: "a/b",
            tag: "v1",
            accept: "*",
        };
        let key = tag_key(&name);
        assert!(key.starts_with("tags/registry.test:5000/a/b/@v1/"), "{key}");
        assert_eq!(
            origin_of("registry.test:5000/a/b"),
            Some(Origin::new("registry.test:5000", "a/b"))
        );
        assert_eq!(origin_of("host-only"), None);
    }
}
