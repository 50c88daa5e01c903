//! The admin endpoint, on its own listener: the status page (`/`, `/status.json`), `/healthz`,
//! `/readyz`, `/metrics`, `/ca.crt`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;

use crate::body::{self, text, Body};
use crate::listener::{accept_loop, idle_or_shutdown, Ending, Limits, Tracked};
use crate::status::{self, Status};
use crate::Shared;

/// The admin listener's bounds: monitoring needs few connections and short requests, so a
/// client that holds one without asking anything is let go soon.
pub const LIMITS: Limits = Limits {
    max_connections: 64,
    header_timeout: Duration::from_secs(10),
    idle_timeout: Duration::from_secs(30),
};

/// Serves the admin endpoint on `listener` until shutdown starts.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    serve_with(listener, shared, LIMITS).await
}

/// [`serve`] with other bounds (tests use short ones).
pub async fn serve_with(listener: TcpListener, shared: Arc<Shared>, limits: Limits) {
    // Its own tracker: shutdown does not wait for monitoring connections.
    let tasks = TaskTracker::new();
    let stop = shared.shutdown.clone().cancelled_owned();
    let status = Arc::new(Status::default());
    accept_loop(
        || listener.accept(),
        limits.max_connections,
        &tasks,
        stop,
        |tcp, _| connection(tcp, limits, shared.clone(), status.clone()),
    )
    .await;
}

async fn connection(
    tcp: Tracked<TcpStream>,
    limits: Limits,
    shared: Arc<Shared>,
    status: Arc<Status>,
) {
    let activity = tcp.activity();
    let stop = shared.shutdown.clone();
    let svc = service_fn(move |req| {
        let (shared, status) = (shared.clone(), status.clone());
        async move { Ok::<_, Infallible>(answer(&req, &shared, &status).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(TokioIo::new(tcp), svc);
    tokio::pin!(conn);
    let idle = limits.idle_timeout;
    tokio::select! {
        _ = conn.as_mut() => {}
        ending = idle_or_shutdown(&activity, idle, &stop) => {
            if ending == Ending::Shutdown {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    }
}

async fn answer(req: &Request<Incoming>, shared: &Shared, status: &Status) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only");
    }
    match req.uri().path() {
        "/" => page(),
        "/status.json" => {
            let snapshot = status.snapshot(shared).await;
            let json = serde_json::to_vec(&snapshot).unwrap_or_default();
            typed(json, "application/json")
        }
        "/healthz" => text(StatusCode::OK, "ok"),
        "/readyz" => match ready(shared).await {
            // The shared store's state is shown, but it never makes a node unready: pulls go on
            // from the disk and the upstream without it.
            Ok(()) => match &shared.cache.shared {
                Some(tier) if tier.is_up() => text(StatusCode::OK, "ready; shared store up"),
                Some(_) => text(StatusCode::OK, "ready; shared store down"),
                None => text(StatusCode::OK, "ready"),
            },
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, reason),
        },
        "/metrics" => {
            let live = status::live(shared).await;
            let text = shared.metrics.render(&live);
            typed(text, "text/plain; version=0.0.4; charset=utf-8")
        }
        "/ca.crt" => typed(shared.ca.cert_pem().to_owned(), "application/x-pem-file"),
        other => text(
            StatusCode::NOT_FOUND,
            format!("no {other}; try / (the status page), /healthz, /readyz, /metrics or /ca.crt"),
        ),
    }
}

/// Why `/readyz` answers 503; the message is its body.
#[derive(Debug, thiserror::Error)]
enum NotReady {
    /// A probe file could not be written to the cache directory.
    #[error("cache not writable: {0}")]
    Cache(#[source] std::io::Error),
}

/// A 200 with `data` as `content_type`.
fn typed(data: impl Into<bytes::Bytes>, content_type: &'static str) -> Response<Body> {
    let mut resp = Response::new(body::full(data));
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// The status page, allowed to run only its own inline script and style.
fn page() -> Response<Body> {
    let page = status::page();
    let mut resp = typed(page.html, "text/html; charset=utf-8");
    if let Ok(csp) = HeaderValue::from_str(&page.csp) {
        resp.headers_mut()
            .insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    resp
}

/// Ready when the CA is loaded (it is, or `run` would not have started) and the cache is writable.
async fn ready(shared: &Shared) -> Result<(), NotReady> {
    let probe = shared.cache.store.new_tmp_path();
    let written = tokio::fs::write(&probe, b"ready?").await;
    let _ = tokio::fs::remove_file(&probe).await;
    match written {
        // A full disk costs capacity, not availability: pulls stream past the cache.
        Err(e) if crate::cache::flight::is_disk_full(&e) => Ok(()),
        Err(e) => Err(NotReady::Cache(e)),
        Ok(()) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::Instant;

    async fn healthz(stream: &mut TcpStream) -> String {
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = stream.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Reads until the peer closes; how long that took.
    async fn closed_after(stream: &mut TcpStream, limit: Duration) -> Duration {
        let start = Instant::now();
        let mut buf = [0u8; 64];
        loop {
            match tokio::time::timeout(limit, stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
                Ok(Ok(_)) => {}
                Err(_) => panic!("still open after {limit:?}"),
            }
        }
    }

    #[tokio::test]
    async fn idle_and_silent_connections_close_and_a_full_listener_answers_soon() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Shared::in_dir(dir.path());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            max_connections: 4,
            header_timeout: Duration::from_millis(600),
            idle_timeout: Duration::from_millis(300),
        };
        tokio::spawn(serve_with(listener, shared.clone(), limits));

        // A keep-alive connection that asks once and then nothing is closed when idle.
        let mut kept = TcpStream::connect(addr).await.unwrap();
        assert!(healthz(&mut kept).await.starts_with("HTTP/1.1 200"));
        let took = closed_after(&mut kept, Duration::from_secs(5)).await;
        assert!(took < Duration::from_secs(2), "{took:?}");

        // Silent connections fill the cap; /healthz waits its turn, not forever.
        let mut hogs = Vec::new();
        for _ in 0..limits.max_connections * 2 {
            hogs.push(TcpStream::connect(addr).await.unwrap());
        }
        let start = Instant::now();
        let mut late = TcpStream::connect(addr).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), healthz(&mut late))
            .await
            .expect("healthz starved");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        for hog in &mut hogs {
            closed_after(hog, Duration::from_secs(5)).await;
        }
        shared.shutdown.cancel();
    }
}
