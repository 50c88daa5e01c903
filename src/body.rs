//! Body types shared by the proxy and upstream sides, error responses, and the access log line
//! that is written when a response body finishes.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A boxed error for body streams.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The one body type that flows through regproxy in both directions.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A body holding `data`.
pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|e| match e {}).boxed_unsync()
}

/// Wraps a hyper body that streams from a peer.
pub fn incoming(b: hyper::body::Incoming) -> Body {
    b.map_err(BoxError::from).boxed_unsync()
}

/// A plain-text response whose body explains `reason` (a message, or an error's), and whose
/// HTTP/1.1 status line does too.
pub fn text(status: StatusCode, reason: impl std::fmt::Display) -> Response<Body> {
    let mut msg = reason.to_string();
    let phrase = reason_phrase(status, &msg);
    msg.push('\n');
    let mut resp = Response::new(full(msg));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Some(phrase) = phrase {
        resp.extensions_mut().insert(phrase);
    }
    resp
}

/// Longest reason phrase written, in bytes.
const MAX_REASON_PHRASE: usize = 300;

/// `Forbidden: WHY` as an HTTP/1.1 reason phrase: Go clients (skopeo, podman, docker,
/// containerd) show a refusal's status line and not its body. h2 has no reason phrase; hyper
/// writes it for HTTP/1.1 only.
fn reason_phrase(status: StatusCode, reason: &str) -> Option<hyper::ext::ReasonPhrase> {
    let canonical = status.canonical_reason()?;
    let mut phrase: String = format!("{canonical}: {}", reason.trim())
        .chars()
        // Printable ASCII only: anything else could end the line or garble it.
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                ' '
            }
        })
        .collect();
    phrase.truncate(MAX_REASON_PHRASE);
    hyper::ext::ReasonPhrase::try_from(phrase).ok()
}

/// How a request was answered, for the access log and the metrics' `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// From a verified object (or tag record) in the cache.
    Hit,
    /// Fetched from the upstream now (and cached, or streamed past the cache, verified).
    Miss,
    /// Joined a download already in flight.
    Joined,
    /// From the shared store of the fleet (verified as it streamed).
    Shared,
    /// From the fleet member that owns the object (verified as it streamed).
    Peer,
    /// A stale tag the upstream confirmed with a `HEAD`.
    Revalidated,
    /// A cached answer given while the upstream cannot answer.
    Stale,
    /// The upstream's own answer, passed on.
    Forward,
    /// A blind tunnel.
    Tunnel,
    /// Refused: a malformed request, a policy, or an upstream that does not authorize this
    /// client for cached content.
    Refused,
    /// The upstream or the proxy failed (a 5xx made by the proxy).
    Failed,
}

impl Outcome {
    /// The word in log lines and in the `outcome` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "HIT",
            Outcome::Miss => "MISS",
            Outcome::Joined => "JOINED",
            Outcome::Shared => "SHARED",
            Outcome::Peer => "PEER",
            Outcome::Revalidated => "REVALIDATED",
            Outcome::Stale => "STALE",
            Outcome::Forward => "FORWARD",
            Outcome::Tunnel => "TUNNEL",
            Outcome::Refused => "REFUSED",
            Outcome::Failed => "FAILED",
        }
    }
}

/// One access-log line, written once the response body has finished (or was dropped).
#[derive(Debug)]
pub struct AccessLog {
    /// Client socket address.
    pub client: std::net::SocketAddr,
    /// Target host (and port when not 443).
    pub host: String,
    /// Request method.
    pub method: String,
    /// Request path (never the query, which may hold signed-URL tokens).
    pub path: String,
    /// How it was answered.
    pub outcome: Outcome,
    /// Response status.
    pub status: u16,
    /// When the request arrived.
    pub start: Instant,
    /// Where the request is counted.
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl AccessLog {
    /// Writes the line with the number of body bytes sent and whether the body ended cleanly.
    pub fn emit(&self, bytes: u64, complete: bool) {
        self.metrics
            .request(&self.host, self.outcome.as_str(), bytes);
        let duration_ms = self.start.elapsed().as_millis() as u64;
        let line = |out: &mut Vec<u8>| self.write_fields(out, bytes, complete, duration_ms);
        if !tracing::enabled!(target: crate::log_writer::ACCESS, tracing::Level::INFO)
            || !crate::log_writer::access_line(line)
        {
            self.trace(bytes, complete, duration_ms);
        }
    }

    /// The line through the log subscriber, for the formats `access_line` does not write.
    fn trace(&self, bytes: u64, complete: bool, duration_ms: u64) {
        // A root event: the line carries its own fields, and a request span around it (where
        // a body-less answer is logged) would print host, method and path a second time.
        tracing::info!(
            target: crate::log_writer::ACCESS,
            parent: None,
            client = %self.client,
            host = %self.host,
            method = %self.method,
            path = %self.path,
            status = self.status,
            bytes,
            complete,
            duration_ms,
            "{}",
            self.outcome.as_str()
        );
    }

    /// The message and fields of [`AccessLog::trace`]'s event, as the subscriber's text format
    /// writes them.
    fn write_fields(&self, out: &mut Vec<u8>, bytes: u64, complete: bool, duration_ms: u64) {
        use std::io::Write as _;
        let _ = write!(
            out,
            "{} client={} host={} method={} path={} status={} bytes={bytes} complete={complete} \
             duration_ms={duration_ms}",
            self.outcome.as_str(),
            self.client,
            self.host,
            self.method,
            self.path,
            self.status,
        );
    }
}

/// A body wrapper that counts bytes and writes the access log line at the end.
pub struct Metered<B> {
    inner: B,
    log: Option<AccessLog>,
    bytes: u64,
    // hyper stops polling once Content-Length bytes are out, so "complete" is judged by length.
    expected: Option<u64>,
}

impl<B> Metered<B> {
    /// Wraps `inner`; `log` is emitted when the stream ends, fails or is dropped.
    pub fn new(inner: B, log: AccessLog) -> Metered<B>
    where
        B: HttpBody,
    {
        let expected = inner.size_hint().exact();
        Metered {
            inner,
            log: Some(log),
            bytes: 0,
            expected,
        }
    }

    fn finish(&mut self, complete: bool) {
        if let Some(log) = self.log.take() {
            log.emit(self.bytes, complete);
        }
    }
}

impl<B> Drop for Metered<B> {
    fn drop(&mut self) {
        // Dropped before the end of the stream: complete only if every announced byte went out.
        let complete = self.expected == Some(self.bytes);
        self.finish(complete);
    }
}

impl<B> HttpBody for Metered<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.bytes += d.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.finish(true);
                }
            }
            Poll::Ready(Some(Err(_))) => self.finish(false),
            Poll::Ready(None) => self.finish(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Wraps a response so that its access-log line is written when the body completes.
pub fn metered(resp: Response<Body>, mut log: AccessLog) -> Response<Body> {
    log.status = resp.status().as_u16();
    let empty_body = resp.body().is_end_stream();
    let (mut parts, body) = resp.into_parts();
    let bodiless = parts.status.is_informational()
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED;
    if log.method != "HEAD" && !bodiless {
        // A Content-Length that the body will not match (an upstream HEAD's, say) is a protocol
        // error for h2 clients: the body's own length wins.
        if let Some(n) = body.size_hint().exact() {
            if parts
                .headers
                .get(header::CONTENT_LENGTH)
                .map(|v| v.as_bytes())
                != Some(n.to_string().as_bytes())
            {
                parts.headers.insert(header::CONTENT_LENGTH, n.into());
            }
        }
    }
    let mut m = Metered::new(body, log);
    if empty_body {
        // hyper never polls an empty body, so the line is written now with complete = true.
        m.finish(true);
    }
    Response::from_parts(parts, m.boxed_unsync())
}

/// Bytes of cached objects that one client connection may have queued in the proxy, not yet
/// written to its socket: a client that never reads holds this much and no more.
pub const PER_CONNECTION: usize = 8 << 20;
/// The same across every connection of the process.
pub const PER_PROCESS: usize = 256 << 20;

static PROCESS: std::sync::LazyLock<Arc<Semaphore>> =
    std::sync::LazyLock::new(|| Arc::new(Semaphore::new(PER_PROCESS)));

/// The caps on queued bytes that a response body draws from: its connection's and the
/// process's. Requests carry their connection's in their extensions.
#[derive(Clone)]
pub struct Budget {
    connection: Arc<Semaphore>,
}

impl Budget {
    /// A new connection's budget.
    pub fn for_connection() -> Budget {
        Budget {
            connection: Arc::new(Semaphore::new(PER_CONNECTION)),
        }
    }

    /// The budget of the connection a request came on (a fresh one for requests made inside the
    /// proxy, which have no connection).
    pub fn of(extensions: &http::Extensions) -> Budget {
        extensions
            .get::<Budget>()
            .cloned()
            .unwrap_or_else(Budget::for_connection)
    }

    /// Takes `n` bytes of both caps, waiting while either is spent; `None` if `n` is beyond
    /// what a cap can ever give, or if the connection's own cap stays spent for `stall` (its
    /// client reads nothing). Waiting for the process's cap has no such limit: others' stalled
    /// clients must not cost this one its response.
    pub async fn reserve(&self, n: usize, stall: std::time::Duration) -> Option<Reserved> {
        let n = u32::try_from(n).ok()?;
        let connection = self.connection.clone().acquire_many_owned(n);
        let connection = tokio::time::timeout(stall, connection).await.ok()?.ok()?;
        let process = PROCESS.clone().acquire_many_owned(n).await.ok()?;
        Some(Reserved {
            _connection: connection,
            _process: process,
        })
    }
}

/// Takes `n` bytes of the process's cap alone, for data a download holds apart from any client
/// connection (pieces fetched ahead of their turn); waits while it is spent. `None` if `n` is
/// beyond what the cap can ever give.
pub async fn reserve_process(n: usize) -> Option<OwnedSemaphorePermit> {
    let n = u32::try_from(n).ok()?;
    PROCESS.clone().acquire_many_owned(n).await.ok()
}

/// Bytes of both caps, taken for data about to be queued for a client; given back on drop.
pub struct Reserved {
    _connection: OwnedSemaphorePermit,
    _process: OwnedSemaphorePermit,
}

impl Reserved {
    /// `data` holding the reservation until every copy of it is dropped, which is once it has
    /// been written out to the client.
    /// What was reserved beyond `data`'s length (a chunk shorter than asked for) goes back at once.
    pub fn attach(mut self, data: Bytes) -> Bytes {
        let held = u32::try_from(data.len()).unwrap_or(u32::MAX) as usize;
        let extra = self._connection.num_permits().saturating_sub(held);
        if extra > 0 {
            drop(self._connection.split(extra));
            drop(self._process.split(extra));
        }
        Bytes::from_owner(Charged {
            data,
            _reserved: self,
        })
    }
}

/// Bytes that hold their share of the caps.
struct Charged {
    data: Bytes,
    _reserved: Reserved,
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

/// A body fed by a task through a bounded channel; an `Err` item aborts the client's response.
pub struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, BoxError>>,
    remaining: Option<u64>,
    finished: Arc<AtomicBool>,
}

/// A bounded channel whose receiving end is a response body of `len` bytes (if known).
pub fn channel(capacity: usize, len: Option<u64>) -> (Feed, Body) {
    let (tx, rx) = tokio::sync::mpsc::channel(capacity);
    let finished = Arc::new(AtomicBool::new(false));
    let body = ChannelBody {
        rx,
        remaining: len,
        finished: finished.clone(),
    };
    (Feed { tx, finished }, body.boxed_unsync())
}

/// The sending end of a [`channel`] body. The body ends cleanly only after [`Feed::finish`]: a
/// feeder that gives up (or is dropped) without it aborts the response, even one whose length
/// was not announced.
pub struct Feed {
    tx: tokio::sync::mpsc::Sender<Result<Bytes, BoxError>>,
    finished: Arc<AtomicBool>,
}

impl Feed {
    /// Queues bytes (or an error that aborts the response); `Err` once the client has gone.
    pub async fn send(&self, item: Result<Bytes, BoxError>) -> Result<(), ()> {
        self.tx.send(item).await.map_err(|_| ())
    }

    /// Resolves when the client has gone.
    pub async fn closed(&self) {
        self.tx.closed().await
    }

    /// Ends the body cleanly after what was queued.
    pub fn finish(self) {
        self.finished.store(true, Ordering::Release);
    }
}

impl HttpBody for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(data))) => {
                if let Some(r) = self.remaining.as_mut() {
                    *r = r.saturating_sub(data.len() as u64);
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) if self.remaining.is_some_and(|r| r > 0) => {
                Poll::Ready(Some(Err("body ended before its announced length".into())))
            }
            Poll::Ready(None) if !self.finished.load(Ordering::Acquire) => {
                Poll::Ready(Some(Err("body ended before it was finished".into())))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(r) => SizeHint::with_exact(r),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The access line written without the subscriber is the one the subscriber writes.
    #[test]
    fn access_lines_match_the_subscribers_text_format() {
        use std::sync::Mutex;
        #[derive(Clone, Default)]
        struct Capture(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Capture {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let capture = Capture::default();
        let sink = capture.clone();
        let subscriber = tracing::Dispatch::new(
            tracing_subscriber::fmt()
                .with_ansi(false)
                .with_writer(move || sink.clone())
                .finish(),
        );
        let log = |outcome, method: &str, path: &str| AccessLog {
            client: "127.0.0.1:40312".parse().unwrap(),
            host: "registry.test:5000".into(),
            method: method.into(),
            path: path.into(),
            outcome,
            status: 200,
            start: Instant::now(),
            metrics: Arc::default(),
        };
        let path = "/v2/library/alpine/manifests/sha256:a363686650341f14f7858d51a46c2d83";
        for log in [
            log(Outcome::Hit, "GET", path),
            log(Outcome::Tunnel, "CONNECT", ""),
        ] {
            capture.0.lock().unwrap().clear();
            tracing::dispatcher::with_default(&subscriber, || log.trace(4321, true, 17));
            let theirs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
            let at = std::time::UNIX_EPOCH + std::time::Duration::new(1_700_000_000, 123_456_789);
            let mut ours = Vec::new();
            let mut second = crate::log_writer::Second::NONE;
            crate::log_writer::text_line(&mut ours, &mut second, at, |out| {
                log.write_fields(out, 4321, true, 17)
            });
            let ours = String::from_utf8(ours).unwrap();
            let (their_time, their_rest) = theirs.split_at(27);
            assert_eq!(ours[27..], *their_rest);
            assert_eq!(&ours[..27], "2023-11-14T22:13:20.123456Z");
            // The same second again reuses its text; the next one is formatted anew.
            for (later, want) in [
                (1, "2023-11-14T22:13:20.123457Z"),
                (1_000_000, "2023-11-14T22:13:21.123456Z"),
            ] {
                let mut again = Vec::new();
                let at = at + std::time::Duration::from_micros(later);
                crate::log_writer::text_line(&mut again, &mut second, at, |_| {});
                assert_eq!(&again[..27], want.as_bytes());
            }
            let shape = |t: &str| {
                t.bytes()
                    .map(|b| if b.is_ascii_digit() { b'0' } else { b })
                    .collect::<Vec<_>>()
            };
            assert_eq!(shape(their_time), shape(&ours[..27]), "{theirs}");
        }
    }

    /// A chunk shorter than what was reserved for it holds only its own length.
    #[test]
    fn a_refusal_says_why_in_its_status_line() {
        let resp = text(
            StatusCode::FORBIDDEN,
            "port 5000 is not allowed;\r\nX: y\u{e9}",
        );
        let phrase = resp.extensions().get::<hyper::ext::ReasonPhrase>().unwrap();
        assert_eq!(
            phrase.as_bytes(),
            b"Forbidden: port 5000 is not allowed;  X: y "
        );
        let long = text(StatusCode::BAD_GATEWAY, "x".repeat(1000));
        let phrase = long.extensions().get::<hyper::ext::ReasonPhrase>().unwrap();
        assert_eq!(phrase.as_bytes().len(), MAX_REASON_PHRASE);
    }

    #[tokio::test]
    async fn a_chunk_holds_only_its_length_of_the_budget() {
        let budget = Budget::for_connection();
        let reserved = budget
            .reserve(1000, std::time::Duration::from_secs(1))
            .await
            .unwrap();
        let data = reserved.attach(Bytes::from_static(b"0123456789"));
        assert_eq!(budget.connection.available_permits(), PER_CONNECTION - 10);
        drop(data);
        assert_eq!(budget.connection.available_permits(), PER_CONNECTION);
    }

    /// A feeder that gives up without finishing aborts the body, even one of unknown length;
    /// one that finishes ends it cleanly.
    #[tokio::test]
    async fn a_channel_body_ends_cleanly_only_when_finished() {
        for finish in [false, true] {
            let (feed, body) = channel(4, None);
            feed.send(Ok(Bytes::from_static(b"partial"))).await.unwrap();
            if finish {
                feed.finish();
            } else {
                drop(feed);
            }
            let collected = body.collect().await;
            assert_eq!(collected.is_ok(), finish, "finish = {finish}");
        }
    }
}
