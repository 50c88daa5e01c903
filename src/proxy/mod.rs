//! The client-facing listener: CONNECT (intercept or tunnel), absolute-form HTTP forwarding, and
//! clear errors for everything else.

mod connect;
mod forward;
pub mod gate;
mod intercept;
mod tunnel;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use crate::listener::{self, accept_loop, Limits, Tracked};

use crate::body::{text, Body};
use crate::Shared;

/// Largest request head accepted from a client; larger ones get a 431.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// A client that has not sent a full request head within this time is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts connections until `shutdown` resolves, then waits up to the grace time for in-flight work.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: impl Future<Output = ()>) {
    tracing::info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "regproxy listening");
    let limits = limits(&shared);
    accept_loop(
        || listener.accept(),
        limits.max_connections,
        &shared.tasks,
        shutdown,
        |tcp, peer| {
            let _ = tcp.get_ref().set_nodelay(true);
            connection(tcp, peer, limits, shared.clone())
        },
    )
    .await;
    drop(listener);
    let grace = shared.config.shutdown_grace;
    tracing::info!(in_flight = shared.tasks.len(), grace = ?grace, "shutting down");
    shared.shutdown.cancel();
    shared.tasks.close();
    let drained = async {
        shared.tasks.wait().await;
        // Downloads whose clients are gone still finish and commit, within the same grace.
        shared.cache.flights.settled().await;
    };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!(
            cut = shared.tasks.len(),
            "grace time over; closing remaining transfers"
        );
    }
}

/// Serves mirror mode on its own listener (TLS when `tls` is given) until shutdown.
pub async fn serve_mirror(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
) {
    let max = shared.config.max_connections;
    let stop = shared.shutdown.clone().cancelled_owned();
    accept_loop(
        || listener.accept(),
        max,
        &shared.tasks,
        stop,
        |tcp, peer| {
            let _ = tcp.get_ref().set_nodelay(true);
            let (tls, shared) = (tls.clone(), shared.clone());
            async move {
                let metrics = shared.metrics.clone();
                let _open = crate::metrics::Open::new(&metrics.open_connections);
                match tls {
                    None => intercept::serve_http(tcp, None, None, peer, shared).await,
                    Some(acceptor) => {
                        let handshake = tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(tcp));
                        match handshake.await {
                            Ok(Ok(stream)) => {
                                intercept::serve_http(stream, None, None, peer, shared).await
                            }
                            _ => tracing::debug!(client = %peer, "mirror TLS handshake failed"),
                        }
                    }
                }
            }
        },
    )
    .await;
}

/// The proxy listener's bounds: the configured cap and idle time, the fixed header timeout.
fn limits(shared: &Shared) -> Limits {
    Limits {
        max_connections: shared.config.max_connections,
        header_timeout: HEADER_TIMEOUT,
        idle_timeout: shared.config.idle_timeout,
    }
}

async fn connection(
    tcp: Tracked<TcpStream>,
    peer: SocketAddr,
    limits: Limits,
    shared: Arc<Shared>,
) {
    let _open = crate::metrics::Open::new(&shared.metrics.open_connections);
    let svc_shared = shared.clone();
    let activity = tcp.activity();
    let requests = activity.clone();
    let svc = service_fn(move |req| {
        let shared = svc_shared.clone();
        // Not idle while an answer is being made, however long the upstream takes.
        let busy = requests.busy();
        async move {
            let resp = handle(req, peer, shared).await;
            drop(busy);
            Ok::<_, Infallible>(resp)
        }
    });
    // hyper's header timer also runs while a keep-alive connection waits for its next request,
    // so an idle connection closes after the shorter of the header and idle timeouts.
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(tcp), svc)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        ending = listener::idle_or_shutdown(&activity, limits.idle_timeout, &shared.shutdown) => {
            match ending {
                listener::Ending::Idle => Ok(()),
                listener::Ending::Shutdown => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(client = %peer, error = %e, "client connection ended with an error");
    }
}

async fn handle(req: Request<Incoming>, peer: SocketAddr, shared: Arc<Shared>) -> Response<Body> {
    // hyper bounds its read buffer, but a head that arrives in one large read can exceed it.
    let head_bytes: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if head_bytes > MAX_HEAD_BYTES {
        let mut resp = text(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("request headers are {head_bytes} bytes; the limit is {MAX_HEAD_BYTES}"),
        );
        // A client that sends such heads is broken or hostile: do not wait for its next request.
        resp.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
        return resp;
    }
    let mut req = req;
    if let Err(refusal) = shared.gate.admit(peer.ip(), &mut req) {
        tracing::warn!(client = %peer, refusal = ?refusal, "client refused");
        let mirror = req.uri().scheme().is_none() && req.method() != Method::CONNECT;
        return refusal.response(mirror);
    }
    if req.method() == Method::CONNECT {
        return connect::handle(req, peer, shared).await;
    }
    match req.uri().scheme_str() {
        // Sent straight to regproxy: mirror mode (containerd hosts.toml, docker registry-mirrors).
        None if req.uri().path().starts_with("/v2") => {
            crate::registry::mirror::handle(req, peer, &shared).await
        }
        Some("http") => forward::plain(req, peer, shared).await,
        Some(other) => text(
            StatusCode::BAD_REQUEST,
            format!("only http:// URLs are forwarded in absolute form (got {other}://); use CONNECT for https"),
        ),
        None => text(
            StatusCode::BAD_REQUEST,
            format!(
                "regproxy is an HTTP proxy: send CONNECT host:port (set HTTPS_PROXY), an absolute http:// URL, \
                 or, as a registry mirror, /v2/ requests; not {} {}",
                req.method(),
                req.uri().path()
            ),
        ),
    }
}
