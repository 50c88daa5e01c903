//! Intercepted CONNECT: terminate TLS with a leaf for the SNI host and serve the registry API.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio_rustls::LazyConfigAcceptor;

use crate::credentials::ProxyUser;
use crate::exchange::Target;
use crate::listener::{idle_or_shutdown, Ending, Tracked};
use crate::registry;
use crate::Shared;

/// Concurrent h2 streams per client connection (clients pull 3 to 6 blobs at a time).
const MAX_STREAMS: u32 = 100;
/// Bytes h2 buffers per stream ahead of the client's reading.
const MAX_SEND_BUF: usize = 256 * 1024;
/// Largest h2 header list accepted, as for HTTP/1.1 heads.
const MAX_HEADER_LIST: u32 = 64 * 1024;
/// A client that has not finished its TLS handshake within this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the TLS handshake on the upgraded CONNECT stream, then serves HTTP/1.1 or h2 inside it.
pub(super) async fn serve(
    upgrade: OnUpgrade,
    target: Target,
    user: Option<ProxyUser>,
    peer: SocketAddr,
    shared: Arc<Shared>,
) {
    let upgraded = match upgrade.await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(client = %peer, host = %target.host(), error = %e, "client left before TLS");
            return;
        }
    };
    let acceptor =
        LazyConfigAcceptor::new(rustls::server::Acceptor::default(), TokioIo::new(upgraded));
    let start = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor).await {
        Ok(Ok(start)) => start,
        Ok(Err(e)) => {
            tracing::warn!(client = %peer, host = %target.host(), error = %e, "bad TLS ClientHello; closing");
            return;
        }
        Err(_) => {
            tracing::warn!(client = %peer, host = %target.host(), "no TLS ClientHello in time; closing");
            return;
        }
    };
    let Some(sni) = start.client_hello().server_name().map(str::to_owned) else {
        tracing::warn!(client = %peer, host = %target.host(), "TLS ClientHello without SNI; closing");
        return;
    };
    // A leaf only for the host the client CONNECTed to: any other name would have the CA sign
    // certificates for hosts nobody chose to intercept, one per name a client cares to send.
    if !sni_matches(&sni, target.host()) {
        tracing::warn!(client = %peer, host = %target.host(), sni = %sni, "TLS SNI differs from the CONNECT host; closing");
        return;
    }
    let config = match shared.ca.server_config(target.host()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(client = %peer, sni = %sni, error = %e, "cannot issue a leaf certificate");
            return;
        }
    };
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, start.into_stream(config)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            match crate::hints::distrust(&e) {
                Some(alert) => {
                    let host = target.authority();
                    let fix = crate::hints::trust_fix(&shared.config, host);
                    tracing::warn!(client = %peer, sni = %sni, alert, "the client does not trust regproxy's CA (it rejected the certificate for {host}); {fix}");
                }
                None => {
                    tracing::warn!(client = %peer, sni = %sni, error = %e, "TLS handshake with client failed")
                }
            }
            return;
        }
        Err(_) => {
            tracing::warn!(client = %peer, sni = %sni, "TLS handshake with client timed out");
            return;
        }
    };
    if let Some(suite) = tls.get_ref().1.negotiated_cipher_suite() {
        // What the bench's CPU floor is computed for.
        tracing::debug!(target: "regproxy::tls", side = "client", host = %target.host(), suite = ?suite.suite(), "negotiated");
    }
    serve_http(tls, Some(target), user, peer, shared).await;
}

/// Whether a ClientHello's SNI names `host` (lower-case, no trailing dot, as in [`Target`]).
fn sni_matches(sni: &str, host: &str) -> bool {
    sni.trim_end_matches('.').eq_ignore_ascii_case(host)
}

/// Serves the registry API (HTTP/1.1 or h2) on a connection: for `target` when intercepted, or
/// in mirror mode (the upstream named by each request) when `None`. Closed when idle for the
/// configured idle time.
pub(super) async fn serve_http<I>(
    io: I,
    target: Option<Target>,
    user: Option<ProxyUser>,
    peer: SocketAddr,
    shared: Arc<Shared>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let target = target.map(Arc::new);
    let svc_shared = shared.clone();
    let budget = crate::body::Budget::for_connection();
    // Counted under the cap by the outer connection; tracked here for its own idle time (h2
    // has no header timer to close an idle connection).
    let io = Tracked::new(io);
    let activity = io.activity();
    let requests = activity.clone();
    let svc = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        let (target, shared) = (target.clone(), svc_shared.clone());
        let busy = requests.busy();
        req.extensions_mut().insert(budget.clone());
        if let Some(user) = &user {
            // Who sent the CONNECT decides which injected credentials its requests may use.
            req.extensions_mut().insert(user.clone());
        }
        async move {
            let resp = match &target {
                Some(t) => registry::handle(req, t, peer, &shared).await,
                None => Box::pin(registry::mirror::handle(req, peer, &shared)).await,
            };
            drop(busy);
            Ok::<_, Infallible>(resp)
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(60))
        // Larger request heads get a 431, as on the proxy listener.
        .max_buf_size(MAX_HEADER_LIST as usize);
    // Bounded per connection: streams, the bytes h2 buffers per stream for bodies that are not
    // charged to the connection's budget (forwarded answers), and header lists.
    builder
        .http2()
        .timer(TokioTimer::new())
        .adaptive_window(true)
        .max_concurrent_streams(MAX_STREAMS)
        .max_send_buf_size(MAX_SEND_BUF)
        .max_header_list_size(MAX_HEADER_LIST);
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let idle = shared.config.idle_timeout;
    let result = tokio::select! {
        r = conn.as_mut() => r,
        ending = idle_or_shutdown(&activity, idle, &shared.shutdown) => match ending {
            Ending::Idle => Ok(()),
            Ending::Shutdown => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        },
    };
    if let Err(e) = result {
        tracing::debug!(client = %peer, error = %e, "intercepted connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sni_must_name_the_connect_host() {
        assert!(super::sni_matches("Registry.Test.", "registry.test"));
        assert!(super::sni_matches("registry.test", "registry.test"));
        assert!(!super::sni_matches("www.google.com", "registry.test"));
        assert!(!super::sni_matches("registry.test.evil", "registry.test"));
        assert!(!super::sni_matches("", "registry.test"));
    }
}
