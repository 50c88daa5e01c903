//! Single flight: one upstream download per digest, written once to a temporary file while it is
//! hashed, and read back by every client that wants it (the first one and any that join), each
//! at its own pace. A client that leaves cancels nothing.

use std::collections::HashMap;
use std::io::{Seek, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;

use parking_lot::Mutex;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::Body as _;
use tokio::sync::{mpsc, watch};

use super::digest::Digest;
use super::store::{ObjectMeta, Origin, Pin, StoreError};
use super::{Cache, Source};
use crate::body::{channel, Body, BoxError, Budget, Feed};

/// Bytes read from disk per chunk sent to a client: each read is a hand-off to a blocking thread
/// and back, which a loaded machine makes dear (at 128 KiB, a third more CPU for a warm pull).
const CHUNK: usize = 256 * 1024;
/// Upstream frames that are ready together are handed on in batches of about this many bytes
/// (kept as the frames they came in: copying them into one buffer cost 6% of a cold pull).
const BATCH: usize = 256 * 1024;
/// Frames smaller than this are copied together, so that an upstream's tiny frames cannot make
/// the in-memory tail a list of millions of entries, nor each reader's step a byte.
const MERGE_BELOW: usize = 16 * 1024;
/// Chunks buffered per client, and frames buffered between the network and the disk writer.
const QUEUE: usize = 4;
/// Readers are woken when at least this much more has landed (and at the first and last byte).
const PUBLISH_EVERY: u64 = 64 * 1024;
/// The most recently written bytes of a download kept in memory, so that readers that keep up
/// are fed from there rather than by reading the file back.
const RECENT: u64 = 2 * 1024 * 1024;
/// Free space asked for beyond a download's own size before it is cached.
pub const ROOM_MARGIN: u64 = 8 * 1024 * 1024;
/// The writer asks the kernel to start writing a download's pages to disk every this many bytes,
/// so that the flush before commit finds little left to do and a large download never piles up
/// as gigabytes of dirty pages that stall every writer on the host when they are flushed at once
/// (the same reasoning as PostgreSQL's `backend_flush_after` and RocksDB's `bytes_per_sync`).
const WRITEBACK_EVERY: u64 = 8 * 1024 * 1024;
/// A client that reads nothing of a response for this long loses it.
const CLIENT_STALL: Duration = Duration::from_secs(60);
/// A download that delivers nothing for this long is given up.
const STALL: Duration = Duration::from_secs(60);

/// Where a download stands.
#[derive(Debug, Clone)]
pub enum State {
    /// Waiting for the upstream's response head.
    Pending,
    /// This many bytes have arrived (readers get them from memory or from the file).
    Filling(u64),
    /// Complete and verified (being committed, or committed unless the disk refused).
    Done(u64),
    /// Broken: truncated, wrong digest, upstream error. Readers must abort their connection.
    Failed(Arc<str>),
    /// The leader got no cacheable answer (e.g. 401); followers go upstream themselves.
    Abandoned,
}

/// Why a download was given up; nothing of it is cached.
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    /// The upstream sent nothing for this long.
    #[error("upstream sent nothing for {0:?}")]
    Stalled(Duration),
    /// The source's body ended in an error.
    #[error("upstream body broke off")]
    BrokeOff(#[source] BoxError),
    /// The temporary file could not be written.
    #[error("writing the cache file")]
    Write(#[source] std::io::Error),
    /// Fewer (or more) bytes than announced.
    #[error("upstream sent {size} of {want} bytes")]
    Short { size: u64, want: u64 },
    /// The bytes are not the object.
    #[error("the {size} bytes received do not hash to {digest}")]
    Mismatch { size: u64, digest: Digest },
}

/// What clients are told about the object before its bytes.
#[derive(Debug, Clone)]
pub struct Head {
    /// `Content-Type` from upstream.
    pub content_type: Option<String>,
    /// Total size, when upstream announced it.
    pub length: Option<u64>,
}

/// One download (or, for a hit, one complete file) that readers stream from.
pub struct Flight {
    state: watch::Sender<State>,
    head: OnceLock<Head>,
    file: OnceLock<Arc<std::fs::File>>,
    recent: Mutex<Recent>,
    // Bytes the writer has put in the file; readers behind the in-memory tail read up to here.
    on_disk: AtomicU64,
    // The upstream a download reads from: only its clients may read the bytes before they are
    // cached and their sources recorded.
    origin: OnceLock<Origin>,
    // Where a download's bytes come from.
    source: OnceLock<Source>,
    // Held while any reader of a cached file lives, so that eviction passes it by.
    _pin: Option<Pin>,
}

impl Flight {
    fn pending() -> Flight {
        Flight {
            state: watch::Sender::new(State::Pending),
            head: OnceLock::new(),
            file: OnceLock::new(),
            recent: Mutex::default(),
            on_disk: AtomicU64::new(0),
            origin: OnceLock::new(),
            source: OnceLock::new(),
            _pin: None,
        }
    }

    /// A complete, verified file (a cache hit) served through the same reader.
    pub fn complete(file: std::fs::File, head: Head, size: u64, pin: Pin) -> Arc<Flight> {
        let flight = Flight {
            state: watch::Sender::new(State::Done(size)),
            head: OnceLock::from(head),
            file: OnceLock::from(Arc::new(file)),
            recent: Mutex::default(),
            on_disk: AtomicU64::new(size),
            origin: OnceLock::new(),
            source: OnceLock::new(),
            _pin: Some(pin),
        };
        Arc::new(flight)
    }

    /// A complete, verified object held in memory (a small hit), served through the same
    /// reader without touching the disk (so eviction may remove the file meanwhile).
    pub fn in_memory(data: Bytes, head: Head) -> Arc<Flight> {
        let size = data.len() as u64;
        let recent = Recent {
            start: 0,
            len: size,
            chunks: std::iter::once(data).collect(),
        };
        let flight = Flight {
            state: watch::Sender::new(State::Done(size)),
            head: OnceLock::from(head),
            recent: Mutex::new(recent),
            on_disk: AtomicU64::new(size),
            ..Flight::pending()
        };
        Arc::new(flight)
    }

    /// Bytes `start..end` of an object held in memory ([`Flight::in_memory`]), if this is one.
    pub fn held(&self, start: u64, end: u64) -> Option<Bytes> {
        if self.file.get().is_some() {
            return None;
        }
        let r = self.recent.lock();
        let whole = r
            .chunks
            .front()
            .filter(|_| r.chunks.len() == 1 && r.start == 0)?;
        let (start, end) = (usize::try_from(start).ok()?, usize::try_from(end).ok()?);
        (start <= end && end <= whole.len()).then(|| whole.slice(start..end))
    }

    /// The head, once the upstream answered.
    pub fn head(&self) -> Option<&Head> {
        self.head.get()
    }

    /// The upstream a download reads from (`None` for a cached file, whose sources the store has).
    pub fn origin(&self) -> Option<&Origin> {
        self.origin.get()
    }

    /// Where a download's bytes come from (`None` for a cached file).
    pub fn source(&self) -> Option<Source> {
        self.source.get().copied()
    }

    /// Waits until the upstream answered; returns the state then (never `Pending`).
    pub async fn started(&self) -> State {
        let mut rx = self.state.subscribe();
        let waited = rx.wait_for(|s| !matches!(s, State::Pending)).await;
        match waited {
            Ok(s) => s.clone(),
            Err(_) => State::Abandoned,
        }
    }

    /// A body streaming bytes `start..end` (end exclusive; `None` for to the end) as they land,
    /// queued within `budget`.
    pub fn reader(self: &Arc<Self>, start: u64, end: Option<u64>, budget: Budget) -> Body {
        let (tx, body) = channel(QUEUE, end.map(|e| e.saturating_sub(start)));
        tokio::spawn(pump(self.clone(), start, end, tx, budget));
        body
    }
}

/// The tail of what has been received: `chunks` hold bytes `start..start + len`.
#[derive(Default)]
struct Recent {
    start: u64,
    len: u64,
    chunks: std::collections::VecDeque<Bytes>,
}

impl Recent {
    /// Drops the oldest chunks beyond [`RECENT`] that end at or before `on_disk`.
    fn forget_written(&mut self, on_disk: u64) {
        while self.len > RECENT
            && self.chunks.len() > 1
            && self
                .chunks
                .front()
                .is_some_and(|c| self.start + c.len() as u64 <= on_disk)
        {
            let old = self.chunks.pop_front().map_or(0, |c| c.len() as u64);
            self.start += old;
            self.len -= old;
        }
    }
}

impl Flight {
    /// Keeps `data`, received after everything before, for readers; forgets the oldest beyond
    /// RECENT once the writer has put it in the file, so that what is not here can be read there.
    fn remember(&self, data: &[Bytes]) {
        let mut r = self.recent.lock();
        for d in data {
            r.len += d.len() as u64;
            r.chunks.push_back(d.clone());
        }
        r.forget_written(self.on_disk.load(Ordering::Acquire));
    }

    /// Forgets what [`Flight::remember`] would, now that the writer may have caught up.
    fn trim(&self) {
        let mut r = self.recent.lock();
        r.forget_written(self.on_disk.load(Ordering::Acquire));
    }

    /// Up to `n` bytes from `pos`, if they are still in memory.
    fn recent_at(&self, pos: u64, n: usize) -> Option<Bytes> {
        let r = self.recent.lock();
        if pos < r.start || pos >= r.start + r.len {
            return None;
        }
        let mut at = r.start;
        for c in &r.chunks {
            let end = at + c.len() as u64;
            if pos < end {
                let off = (pos - at) as usize;
                return Some(c.slice(off..c.len().min(off + n)));
            }
            at = end;
        }
        None
    }
}

/// The downloads in progress, by digest.
#[derive(Default)]
pub struct Flights {
    map: Mutex<HashMap<Digest, Arc<Flight>>>,
    // The download tasks (asking upstream, then filling): each ends after its file is committed,
    // which can be after its readers have finished or left.
    tasks: tokio_util::task::TaskTracker,
    settling: tokio::sync::Mutex<()>,
}

/// A download in flight, as the status page shows it.
#[derive(Debug, Clone)]
pub struct InFlight {
    /// The object.
    pub digest: Digest,
    /// Where it comes from (`None` while waiting for the upstream's answer).
    pub origin: Option<Origin>,
    /// Bytes received so far.
    pub received: u64,
    /// Its size, when the upstream announced it.
    pub length: Option<u64>,
}

/// The outcome of asking to download a digest.
pub enum Join {
    /// Nobody is downloading it: the caller must, and must call [`Leader::start`] or drop it.
    Leader(Leader),
    /// Someone is: read from their flight.
    Follower(Arc<Flight>),
}

impl Flights {
    /// Joins the download of `digest`, or registers the caller as the one to do it.
    pub fn join(self: &Arc<Self>, digest: &Digest) -> Join {
        let mut map = self.map.lock();
        if let Some(f) = map.get(digest) {
            return Join::Follower(f.clone());
        }
        let flight = Arc::new(Flight::pending());
        map.insert(digest.clone(), flight.clone());
        Join::Leader(Leader {
            flights: self.clone(),
            digest: digest.clone(),
            flight,
            started: false,
        })
    }

    /// The download of `digest` in progress, if any.
    pub fn get(&self, digest: &Digest) -> Option<Arc<Flight>> {
        let map = self.map.lock();
        map.get(digest).cloned()
    }

    /// Every download in flight: digest, origin, bytes received and announced length (a short
    /// lock; the caller sorts and bounds what it shows).
    pub fn in_flight(&self) -> Vec<InFlight> {
        let map = self.map.lock();
        map.iter()
            .map(|(digest, f)| InFlight {
                digest: digest.clone(),
                origin: f.origin().cloned(),
                received: match *f.state.borrow() {
                    State::Filling(n) | State::Done(n) => n,
                    _ => 0,
                },
                length: f.head().and_then(|h| h.length),
            })
            .collect()
    }

    /// How many downloads are in flight.
    pub fn downloads(&self) -> usize {
        self.map.lock().len()
    }

    /// Runs a leader's download task (the upstream request that leads to [`Leader::start`]) so
    /// that [`Flights::settled`] waits for it.
    pub fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task);
    }

    /// Waits until no download is running (those that start meanwhile included) and every file
    /// is committed.
    pub async fn settled(&self) {
        // One waiter at a time: another's reopen() between our close() and wait() would leave
        // us waiting for a close that never comes.
        let _one = self.settling.lock().await;
        self.tasks.close();
        self.tasks.wait().await;
        self.tasks.reopen();
    }

    fn remove(&self, digest: &Digest) {
        let mut map = self.map.lock();
        map.remove(digest);
    }
}

/// The right and duty to download one digest; dropping it unstarted releases the followers.
pub struct Leader {
    flights: Arc<Flights>,
    digest: Digest,
    flight: Arc<Flight>,
    started: bool,
}

impl Leader {
    /// The digest it downloads.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// The flight followers wait on.
    pub fn flight(&self) -> Arc<Flight> {
        self.flight.clone()
    }

    /// Starts filling from `body`, the object as `origin` served it (by way of `source`), in
    /// the background; returns the flight to read.
    pub fn start(
        mut self,
        cache: &Cache,
        head: Head,
        body: Body,
        (origin, source): (Origin, Source),
    ) -> std::io::Result<Arc<Flight>> {
        let tmp = cache.store.new_tmp_path();
        let writer = std::fs::File::create(&tmp)?;
        let reader = std::fs::File::open(&tmp)?;
        let _ = self.flight.file.set(Arc::new(reader));
        // The origin before the head: a request that sees the head must see where it is from.
        let _ = self.flight.origin.set(origin);
        let _ = self.flight.source.set(source);
        let _ = self.flight.head.set(head);
        self.flight.state.send_replace(State::Filling(0));
        self.started = true;
        let fill = Fill {
            flights: self.flights.clone(),
            flight: self.flight.clone(),
            digest: self.digest.clone(),
            cache: cache.clone(),
            tmp,
            finished: false,
        };
        self.flights.tasks.spawn(fill.run(body, writer));
        Ok(self.flight.clone())
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if !self.started {
            self.flight.state.send_replace(State::Abandoned);
            self.flights.remove(&self.digest);
        }
    }
}

struct Fill {
    flights: Arc<Flights>,
    flight: Arc<Flight>,
    digest: Digest,
    cache: Cache,
    tmp: PathBuf,
    finished: bool,
}

impl Drop for Fill {
    fn drop(&mut self) {
        // The task panicked or was cancelled: release the readers and let the next request retry.
        // Bytes already verified stay `Done` for readers; only the commit is lost.
        if !self.finished {
            self.flight.state.send_if_modified(|s| {
                let verified = matches!(s, State::Done(_));
                if !verified {
                    *s = State::Failed("download task ended".into());
                }
                !verified
            });
            self.flights.remove(&self.digest);
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl Fill {
    async fn run(mut self, body: Body, file: std::fs::File) {
        match self.download(body, file).await {
            Ok((size, file)) => {
                self.cache
                    .store
                    .metrics()
                    .bytes_from_upstream
                    .fetch_add(size, Ordering::Relaxed);
                // The bytes verified: readers get the last byte now, not after the disk flush.
                // The flight stays joinable (reading the temporary file) until it is committed.
                self.flight.state.send_replace(State::Done(size));
                self.commit(file, size).await;
            }
            Err(e) => {
                tracing::warn!(digest = %self.digest, error = %e, "download failed; nothing cached");
                let corrupt = matches!(e, FillError::Mismatch { .. } | FillError::Short { .. });
                if let (true, Some(Source::Shared), Some(tier)) =
                    (corrupt, self.flight.source(), &self.cache.shared)
                {
                    tier.forget(&self.digest);
                }
                let _ = tokio::fs::remove_file(&self.tmp).await;
                let reason = crate::upstream::error_chain(&e);
                self.flight.state.send_replace(State::Failed(reason.into()));
            }
        }
        self.flights.remove(&self.digest);
        self.finished = true;
    }

    /// Flushes the verified file to disk, then moves it into the store: a crash never leaves a
    /// named entry whose bytes are not on disk.
    async fn commit(&self, file: std::fs::File, size: u64) {
        let meta = ObjectMeta {
            content_type: self.flight.head().and_then(|h| h.content_type.clone()),
            size,
        };
        let synced = tokio::task::spawn_blocking(move || file.sync_all())
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        let source = self.flight.source().unwrap_or(Source::Upstream);
        // Before the object can be found: a hit without its source would be foreign bytes.
        // The fleet learns it from whoever fetched from the upstream.
        if let (Ok(()), Some(origin)) = (&synced, self.flight.origin()) {
            match source {
                Source::Upstream => self.cache.add_source(&self.digest, origin).await,
                _ => self.cache.store.add_source(&self.digest, origin).await,
            }
        }
        let committed = match synced {
            Ok(()) => {
                let store = &self.cache.store;
                let done = store.commit(&self.tmp, &self.digest, &meta).await;
                if done.is_ok() {
                    self.cache.after_commit(&self.digest, &meta, source);
                }
                done
            }
            Err(source) => Err(StoreError::Io {
                what: "flush",
                path: self.tmp.clone(),
                source,
            }),
        };
        if let Err(e) = committed {
            // The bytes verified, so readers finished; only caching them failed.
            tracing::warn!(digest = %self.digest, error = %e, "cannot commit to the cache");
            let _ = tokio::fs::remove_file(&self.tmp).await;
        }
    }

    /// Hands `body` to readers as it arrives and to a writer thread that writes and hashes it;
    /// returns the verified size and the file.
    async fn download(
        &self,
        mut body: Body,
        file: std::fs::File,
    ) -> Result<(u64, std::fs::File), FillError> {
        let (tx, rx) = mpsc::channel::<Vec<Bytes>>(QUEUE);
        let (flight, digest) = (self.flight.clone(), self.digest.clone());
        let store = self.cache.store.clone();
        let writer =
            tokio::task::spawn_blocking(move || write_all(file, rx, &flight, &digest, &store));
        let mut failure = None;
        let mut batch = Vec::new();
        let (mut received, mut published) = (0u64, 0u64);
        loop {
            match tokio::time::timeout(STALL, next_batch(&mut body, &mut batch)).await {
                Err(_) => failure = Some(FillError::Stalled(STALL)),
                Ok(Err(e)) => failure = Some(FillError::BrokeOff(e)),
                Ok(Ok(more)) => {
                    if !batch.is_empty() {
                        let data = std::mem::take(&mut batch);
                        received += data.iter().map(|d| d.len() as u64).sum::<u64>();
                        self.flight.remember(&data);
                        if published == 0 || received - published >= PUBLISH_EVERY || !more {
                            self.flight.state.send_replace(State::Filling(received));
                            published = received;
                        }
                        if tx.send(data).await.is_err() {
                            break;
                        }
                    }
                    if more {
                        continue;
                    }
                }
            }
            break;
        }
        if published != received {
            self.flight.state.send_replace(State::Filling(received));
        }
        drop(tx);
        let written = writer
            .await
            .map_err(|e| FillError::Write(std::io::Error::other(e)))?
            .map_err(FillError::Write)?;
        // Everything is in the file now: the tail shrinks back to its bound.
        self.flight.trim();
        if let Some(f) = failure {
            return Err(f);
        }
        let (size, matches, file) = written;
        if let Some(want) = self.flight.head().and_then(|h| h.length) {
            if want != size {
                return Err(FillError::Short { size, want });
            }
        }
        if !matches {
            return Err(FillError::Mismatch {
                size,
                digest: self.digest.clone(),
            });
        }
        Ok((size, file))
    }
}

/// Waits for at least one data frame, then takes whatever further frames are ready at once, up
/// to [`BATCH`] bytes, into `batch`: fewer, larger hand-offs to the writer and the readers than
/// one per (often 16 KiB) h2 frame. Frames under [`MERGE_BELOW`] are copied into one buffer,
/// larger ones kept as they are. `Ok(false)` at the end of the body.
async fn next_batch(body: &mut Body, batch: &mut Vec<Bytes>) -> Result<bool, BoxError> {
    let mut size = 0;
    let mut small = BytesMut::new();
    let more = std::future::poll_fn(|cx| loop {
        let ready = size + small.len();
        match std::pin::Pin::new(&mut *body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if data.len() < MERGE_BELOW {
                    small.extend_from_slice(&data);
                } else {
                    if !small.is_empty() {
                        size += small.len();
                        batch.push(small.split().freeze());
                    }
                    size += data.len();
                    batch.push(data);
                }
                if size + small.len() >= BATCH {
                    return Poll::Ready(Ok(true));
                }
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
            Poll::Ready(None) => return Poll::Ready(Ok(false)),
            Poll::Pending if ready == 0 => return Poll::Pending,
            Poll::Pending => return Poll::Ready(Ok(true)),
        }
    })
    .await;
    if !small.is_empty() {
        batch.push(small.freeze());
    }
    more
}

/// The writer thread: disk and hash for each batch; `(size, digest matches, file)` at the end
/// (not yet flushed to disk).
fn write_all(
    mut file: std::fs::File,
    mut rx: mpsc::Receiver<Vec<Bytes>>,
    flight: &Flight,
    digest: &Digest,
    store: &super::Store,
) -> std::io::Result<(u64, bool, std::fs::File)> {
    let mut hasher = digest.hasher();
    let (mut written, mut flushed) = (0u64, 0u64);
    for data in std::iter::from_fn(|| rx.blocking_recv()).flatten() {
        if let Err(e) = file.write_all(&data) {
            if !is_disk_full(&e) {
                return Err(e);
            }
            // A full disk: older objects make way, once; a failure after that fails the fill,
            // and the next request finds no room up front and streams past the cache.
            let want = flight.head().and_then(|h| h.length).unwrap_or(0);
            let want = want.saturating_sub(written).max(ROOM_MARGIN);
            super::evict::make_room(store, want);
            let at = file.stream_position()?;
            let done = at.saturating_sub(written) as usize;
            file.write_all(&data[done.min(data.len())..])?;
        }
        hasher.update(&data);
        written += data.len() as u64;
        flight.on_disk.store(written, Ordering::Release);
        if written - flushed >= WRITEBACK_EVERY {
            start_writeback(&file, flushed, written - flushed);
            flushed = written;
        }
    }
    Ok((written, hasher.matches(digest), file))
}

/// Starts writing `len` bytes of `file` at `pos` to disk without waiting for them. Only a hint:
/// the flush before commit is what makes them durable, so a failure here changes nothing.
fn start_writeback(file: &std::fs::File, pos: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(pos), Ok(len)) = (i64::try_from(pos), i64::try_from(len)) else {
        return;
    };
    // SAFETY: a plain system call on a descriptor that `file` keeps open for the call's duration;
    // it reads no memory of ours.
    let _ =
        unsafe { libc::sync_file_range(file.as_raw_fd(), pos, len, libc::SYNC_FILE_RANGE_WRITE) };
}

/// Sends `start..end` of the flight's file to a client, waiting for bytes that have not landed.
async fn pump(flight: Arc<Flight>, mut pos: u64, end: Option<u64>, tx: Feed, budget: Budget) {
    let mut rx = flight.state.subscribe();
    let total = flight.head().and_then(|h| h.length);
    let file = flight.file.get().cloned();
    let in_memory = {
        let held = flight.recent.lock().len;
        held > 0 && held == flight.on_disk.load(Ordering::Acquire)
    };
    if file.is_none() && !in_memory {
        let _ = tx.send(Err("download did not start".into())).await;
        return;
    }
    loop {
        let state = rx.borrow_and_update().clone();
        let (available, done) = match state {
            State::Done(n) => (n, true),
            State::Filling(n) => (n, false),
            State::Failed(reason) => {
                let _ = tx.send(Err(reason.to_string().into())).await;
                return;
            }
            State::Pending | State::Abandoned => {
                let _ = tx.send(Err("download was abandoned".into())).await;
                return;
            }
        };
        let mut limit = end.map_or(available, |e| e.min(available));
        if !done {
            // The last byte of this response (a range's too) waits for verification: no client
            // sees a clean end of bytes that may turn out corrupt.
            let last = end.or(total).unwrap_or(available);
            limit = limit.min(last.saturating_sub(1));
        }
        while pos < limit {
            let left = usize::try_from(limit - pos)
                .unwrap_or(usize::MAX)
                .min(CHUNK);
            // Room in the client's budget first, then the bytes: a reader held up by a client that
            // does not read holds no chunk of its own.
            // A client that takes nothing for CLIENT_STALL gives up its response (and its share
            // of the budget): a body that ends unfinished is aborted.
            let reserved = tokio::select! {
                r = budget.reserve(left, CLIENT_STALL) => r,
                _ = tx.closed() => return,
            };
            let Some(reserved) = reserved else { return };
            let chunk = match flight.recent_at(pos, left) {
                Some(c) => Ok(c),
                None => {
                    // Below the in-memory tail everything is on disk; never read past it.
                    let written = flight.on_disk.load(Ordering::Acquire).saturating_sub(pos);
                    let n = CHUNK
                        .min(left)
                        .min(usize::try_from(written).unwrap_or(usize::MAX));
                    match &file {
                        Some(file) => read_at(file.clone(), pos, n).await,
                        None => Err(std::io::Error::other("object not in memory")),
                    }
                }
            };
            let chunk = match chunk {
                Ok(c) if !c.is_empty() => c,
                Ok(_) => {
                    let _ = tx
                        .send(Err("cache file is shorter than expected".into()))
                        .await;
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Err(Box::new(e))).await;
                    return;
                }
            };
            pos += chunk.len() as u64;
            let sent = tokio::time::timeout(CLIENT_STALL, tx.send(Ok(reserved.attach(chunk))));
            if !matches!(sent.await, Ok(Ok(()))) {
                return; // the client left; the download goes on without it
            }
        }
        if end.is_some_and(|e| pos >= e) || (done && pos >= available) {
            tx.finish();
            return;
        }
        if rx.changed().await.is_err() {
            let _ = tx.send(Err("download ended unexpectedly".into())).await;
            return;
        }
    }
}

/// Whether a write failed because the file system is full.
pub fn is_disk_full(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error())
}

/// `n` bytes of `file` at `pos`: on this thread when the page cache holds them (a warm read costs
/// a copy, not a hand-off to the blocking pool and back), else on the blocking pool.
async fn read_at(file: Arc<std::fs::File>, pos: u64, n: usize) -> std::io::Result<Bytes> {
    if n == 0 {
        return Ok(Bytes::new());
    }
    let mut buf = match read_cached(&file, pos, n) {
        Ok(cached) => return Ok(cached),
        Err(buf) => buf,
    };
    tokio::task::spawn_blocking(move || {
        // The buffer the cached read could not fill, reused.
        rustix::io::pread(&*file, rustix::buffer::spare_capacity(&mut buf), pos)?;
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// The bytes at `pos` that the page cache holds, up to `n`, read without waiting for the disk
/// (`RWF_NOWAIT`); else an empty buffer with room for `n`, when none are cached or the kernel
/// cannot tell. Neither buffer is zeroed first: that cost 2% of a cold pull's CPU.
fn read_cached(file: &std::fs::File, pos: u64, n: usize) -> Result<Bytes, Vec<u8>> {
    let mut buf = Vec::with_capacity(n);
    match read_nowait(file, buf.spare_capacity_mut(), pos) {
        Some(got) if got > 0 => {
            // SAFETY: the kernel wrote the first `got` bytes of the spare capacity, and
            // `read_nowait` returns no count larger than that.
            unsafe { buf.set_len(got) };
            Ok(Bytes::from(buf))
        }
        _ => Err(buf),
    }
}

/// `preadv2(RWF_NOWAIT)` into memory that need not be initialized (rustix's `preadv2` takes
/// initialized slices only): the bytes read, or `None` on any error (`EAGAIN`: not cached).
fn read_nowait(
    file: &std::fs::File,
    buf: &mut [std::mem::MaybeUninit<u8>],
    pos: u64,
) -> Option<usize> {
    use std::os::fd::AsRawFd;
    // An offset beyond a `long` (on a 32-bit machine) reads on the blocking pool instead.
    let pos = libc::c_long::try_from(pos).ok()?;
    let (one, high): (libc::c_long, libc::c_long) = (1, 0);
    let len = buf.len();
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    // SAFETY: the kernel writes at most `iov_len` bytes into `buf`, which is borrowed mutably for
    // the call, on a descriptor `file` keeps open. The raw system call, not libc's wrapper, which
    // older musl lacks; the offset's high half is 0, as `pos` fits in the low one.
    let got = unsafe {
        libc::syscall(
            libc::SYS_preadv2,
            libc::c_long::from(file.as_raw_fd()),
            &iov as *const libc::iovec,
            one,
            pos,
            high,
            libc::c_long::from(libc::RWF_NOWAIT),
        )
    };
    // Never more than asked for, which the caller's `set_len` relies on.
    usize::try_from(got).ok().filter(|got| *got <= len)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read of cached pages gives exactly the file's bytes, stops at its end, and beyond the
    /// end gives nothing (the caller then reads on the blocking pool and sees the short file).
    #[tokio::test]
    async fn reads_of_cached_pages_are_the_files_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("object");
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let file = Arc::new(std::fs::File::open(&path).unwrap());
        let got = read_at(file.clone(), 1000, CHUNK).await.unwrap();
        assert_eq!(&got[..], &bytes[1000..1000 + CHUNK]);
        let tail = read_at(file.clone(), 290_000, CHUNK).await.unwrap();
        assert_eq!(&tail[..], &bytes[290_000..]);
        assert!(read_cached(&file, 300_000, CHUNK).is_err());
        assert!(read_at(file.clone(), 300_000, CHUNK)
            .await
            .unwrap()
            .is_empty());
        let cached = read_cached(&file, 123_457, 10)
            .map_err(|_| "not cached")
            .unwrap();
        assert_eq!(&cached[..], &bytes[123_457..123_467]);
        // Pages dropped from the cache (where the file system allows): read on the blocking pool.
        file.sync_all().unwrap();
        rustix::fs::fadvise(&*file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        let cold = read_at(file, 200_001, CHUNK).await.unwrap();
        assert_eq!(&cold[..], &bytes[200_001..]);
    }

    /// A batch keeps large frames as they came and copies small ones together, in order, so
    /// that an upstream of 1-byte frames makes a few entries, not one per byte.
    #[tokio::test]
    async fn batches_merge_small_frames_and_keep_large_ones() {
        let (feed, mut body) = channel(1024, None);
        let large = Bytes::from(vec![1u8; MERGE_BELOW]);
        for _ in 0..1000 {
            feed.send(Ok(Bytes::from_static(b"x"))).await.unwrap();
        }
        feed.send(Ok(large)).await.unwrap();
        feed.send(Ok(Bytes::from_static(b"yz"))).await.unwrap();
        feed.finish();
        let mut all = Vec::new();
        let mut entries = 0;
        loop {
            let mut batch = Vec::new();
            let more = next_batch(&mut body, &mut batch).await.unwrap();
            entries += batch.len();
            all.extend(batch.iter().flat_map(|b| b.iter().copied()));
            if !more {
                break;
            }
        }
        let mut want = vec![b'x'; 1000];
        want.extend(vec![1u8; MERGE_BELOW]);
        want.extend(b"yz");
        assert_eq!(all, want);
        // The runtime's budget ends a batch every 128 frames or so: a few entries in all.
        assert!(
            entries < 20,
            "{entries} entries for 1002 frames ready at once"
        );
    }

    /// Bytes leave the in-memory tail only once they are in the file, so a reader that falls
    /// behind the tail always finds them there.
    #[test]
    fn the_recent_tail_keeps_what_the_writer_has_not_written() {
        let flight = Flight::pending();
        let chunk = Bytes::from(vec![7u8; 512 * 1024]);
        for _ in 0..8 {
            flight.remember(std::slice::from_ref(&chunk)); // 4 MiB received, nothing written yet
        }
        assert_eq!(flight.recent_at(0, 10).as_deref(), Some(&[7u8; 10][..]));
        flight.on_disk.store(3 * 512 * 1024, Ordering::Release);
        flight.remember(std::slice::from_ref(&chunk)); // 4.5 MiB received, 1.5 MiB written
        assert!(flight.recent_at(0, 10).is_none());
        assert!(flight.recent_at(3 * 512 * 1024 - 1, 1).is_none());
        assert!(flight.recent_at(3 * 512 * 1024, 1).is_some());
        flight.on_disk.store(9 * 512 * 1024, Ordering::Release);
        flight.remember(&[chunk]);
        {
            let r = flight.recent.lock();
            assert!(r.len <= RECENT, "the tail shrinks back once written");
            assert_eq!(r.start + r.len, 10 * 512 * 1024);
        }
        // A tail left long by a writer that lagged at the last batch shrinks once it is written.
        flight.remember(&[Bytes::from(vec![7u8; 4 * 1024 * 1024])]);
        flight.remember(&[Bytes::from(vec![7u8; 512 * 1024])]);
        flight.on_disk.store(u64::MAX, Ordering::Release);
        flight.trim();
        assert!(flight.recent.lock().len <= RECENT);
    }

    /// Two callers waiting for the downloads to settle at once both return.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_settled_calls_both_return() {
        let flights = Arc::new(Flights::default());
        for i in 0..20_000 {
            let (a, b) = (flights.clone(), flights.clone());
            let both = async {
                tokio::join!(
                    tokio::spawn(async move { a.settled().await }),
                    tokio::spawn(async move { b.settled().await })
                )
            };
            let done = tokio::time::timeout(Duration::from_secs(2), both).await;
            assert!(done.is_ok(), "a settled() call hung at round {i}");
        }
    }
}
