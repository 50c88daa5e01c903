//! The upstream side: a pooled, verified HTTP client (h2 where offered) with resolve overrides.

pub mod auth;
pub mod client;
mod connector;
pub mod pieces;
pub mod resolve;

use std::error::Error as _;
use std::path::PathBuf;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper_util::client::legacy::Client as Pool;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

pub use client::{Client, How};
pub use connector::{ConnectError, Connector};
pub use resolve::Resolver;

use crate::body::Body;
use crate::config::Config;

/// Failures talking to an upstream; the message is safe to show to clients (no secrets).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Could not reach the upstream: DNS, refused, unreachable, timed out.
    #[error("{reason}")]
    Connect {
        /// What went wrong, as an operator reads it.
        reason: String,
        /// The error as it came.
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    /// The destination policy refuses the upstream's address (loopback, link-local, …).
    #[error("refused: {reason}")]
    Refused {
        /// Which address, and why.
        reason: String,
        /// The error as it came.
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    /// The caller knows the upstream cannot answer now (it just failed to).
    #[error("the upstream is down")]
    Down,
    /// Authentication with the upstream failed (challenge, token endpoint).
    #[error("upstream authentication: {0}")]
    Auth(String),
    /// The upstream's `WWW-Authenticate` challenge does not parse.
    #[error("upstream authentication: {0}")]
    Challenge(#[from] auth::ChallengeError),
    /// A redirect that regproxy will not follow.
    #[error("{0}")]
    Redirect(String),
    /// It did not start answering in time.
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    /// Reached it, but its TLS did not verify (or the handshake failed).
    #[error("{reason}")]
    Tls {
        /// Expired, unknown issuer, wrong name, … (see `tls_reason`).
        reason: String,
        /// The error as it came.
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    /// The TLS client could not be set up.
    #[error("upstream TLS configuration: {0}")]
    TlsConfig(#[source] rustls::Error),
    /// The request failed after connecting (reset, protocol error, ...).
    #[error("upstream request failed: {}", error_chain(.0))]
    Request(#[source] hyper_util::client::legacy::Error),
    /// An extra root CA file is unusable.
    #[error("upstream CA file {path}: {reason}")]
    RootFile { path: PathBuf, reason: String },
}

/// Marks a request whose response is passed to a client as it is read (not cached), so that it
/// goes on a connection of its own (see [`Upstream::send`]).
#[derive(Debug, Clone, Copy)]
pub struct OwnConnection;

/// The pooled client that every upstream request goes through.
#[derive(Clone)]
pub struct Upstream {
    client: Pool<Connector, Body>,
    // HTTP/1.1 only: a response that a client may leave unread for long holds one connection,
    // not the flow-control window of the h2 connection every other request shares.
    own_connections: Pool<Connector, Body>,
    metrics: Arc<crate::metrics::Metrics>,
    timeout: std::time::Duration,
    // Connections at once for one large blob's ranged pieces (see `pieces`).
    blob_connections: usize,
}

impl Upstream {
    /// Builds the client: platform roots plus `config.upstream_ca`, timeouts and overrides from `config`.
    pub fn new(
        config: &Config,
        resolver: Arc<Resolver>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Upstream, UpstreamError> {
        let roots = root_store(&config.upstream_ca)?;
        let mut tls = rustls::ClientConfig::builder_with_provider(crate::tls_provider())
            .with_safe_default_protocol_versions()
            .map_err(UpstreamError::TlsConfig)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut h1_only = tls.clone();
        h1_only.alpn_protocols = vec![b"http/1.1".to_vec()];
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let timeout = config.connect_timeout;
        let own = Connector::new(resolver.clone(), Arc::new(h1_only), timeout);
        let own_connections = Pool::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(config.idle_timeout)
            .build(own);
        let connector = Connector::new(resolver, Arc::new(tls), timeout);
        let client = Pool::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(config.idle_timeout)
            .pool_max_idle_per_host(64)
            .http2_adaptive_window(true)
            // A pooled h2 connection that died silently is found out, not waited on forever.
            .http2_keep_alive_interval(std::time::Duration::from_secs(30))
            .http2_keep_alive_timeout(std::time::Duration::from_secs(10))
            .build(connector);
        Ok(Upstream {
            client,
            own_connections,
            metrics,
            timeout: config.upstream_timeout,
            blob_connections: config.blob_connections,
        })
    }

    /// Sends one request, returning the response head with its body still streaming. A `GET` or
    /// `HEAD` whose connection closed or was reset before any answer is sent once more: a pooled
    /// connection the server dropped just as it was reused (distribution closes one after a 416,
    /// unsaid). The attempt given up is counted as `retried`, not as an error.
    pub async fn send(
        &self,
        req: http::Request<Body>,
    ) -> Result<http::Response<Incoming>, UpstreamError> {
        let registry = req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let idempotent = matches!(*req.method(), http::Method::GET | http::Method::HEAD);
        let again =
            (idempotent && http_body::Body::is_end_stream(req.body())).then(|| head_of(&req));
        let result = match (self.send_once(req).await, again) {
            (Err(e), Some(again)) if e.closed_before_answer() => {
                self.metrics.upstream(&registry, "retried");
                tracing::debug!(error = %error_chain(&e), "the connection dropped before an answer; sending again");
                self.send_once(again).await
            }
            (result, _) => result,
        };
        match &result {
            Ok(resp) => {
                self.metrics.upstream(&registry, resp.status().as_str());
                self.metrics.ratelimit(&registry, resp.headers());
            }
            Err(UpstreamError::Timeout(_)) => self.metrics.upstream(&registry, "timeout"),
            Err(_) => self.metrics.upstream(&registry, "error"),
        }
        result
    }

    async fn send_once(
        &self,
        req: http::Request<Body>,
    ) -> Result<http::Response<Incoming>, UpstreamError> {
        let client = match req.extensions().get::<OwnConnection>() {
            Some(_) => &self.own_connections,
            None => &self.client,
        };
        match tokio::time::timeout(self.timeout, client.request(req)).await {
            Ok(result) => result.map_err(classify),
            Err(_) => Err(UpstreamError::Timeout(self.timeout)),
        }
    }
}

/// A body-less copy of `req`'s head, to send it again (or follow it elsewhere).
pub(crate) fn head_of(req: &http::Request<Body>) -> http::Request<Body> {
    let mut again = http::Request::new(crate::body::empty());
    *again.method_mut() = req.method().clone();
    *again.uri_mut() = req.uri().clone();
    *again.version_mut() = req.version();
    *again.headers_mut() = req.headers().clone();
    *again.extensions_mut() = req.extensions().clone();
    again
}

/// Names a failed request by where it failed: connecting (refused by policy, TLS, or the network)
/// or after; the original error stays as the source.
fn classify(e: hyper_util::client::legacy::Error) -> UpstreamError {
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(c) = s.downcast_ref::<ConnectError>() {
            let reason = c.to_string();
            return match c {
                ConnectError::Tls { .. } => UpstreamError::Tls { reason, source: e },
                ConnectError::Connect(io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
                    UpstreamError::Refused { reason, source: e }
                }
                _ => UpstreamError::Connect { reason, source: e },
            };
        }
        source = s.source();
    }
    UpstreamError::Request(e)
}

impl UpstreamError {
    /// Whether the connection closed or was reset before any answer came (a request, not a
    /// connect, failed).
    fn closed_before_answer(&self) -> bool {
        let UpstreamError::Request(e) = self else {
            return false;
        };
        let mut source = e.source();
        while let Some(s) = source {
            if s.downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_incomplete_message)
            {
                return true;
            }
            if let Some(io) = s.downcast_ref::<std::io::Error>() {
                use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
                return matches!(io.kind(), ConnectionReset | BrokenPipe);
            }
            source = s.source();
        }
        false
    }

    /// Whether a cached tag should be served stale: the upstream (or its token endpoint) is out
    /// of reach or answering nonsense, as opposed to TLS that does not verify.
    pub fn is_outage(&self) -> bool {
        self.is_unreachable()
            || matches!(self, UpstreamError::Auth(_) | UpstreamError::Challenge(_))
    }

    /// Whether the upstream is out of reach (serve stale), rather than misconfigured or broken.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect { .. }
                | UpstreamError::Down
                | UpstreamError::Request(_)
                | UpstreamError::Timeout(_)
        )
    }
}

/// Formats an error and its sources as `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn root_store(extra: &[PathBuf]) -> Result<rustls::RootCertStore, UpstreamError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    for path in extra {
        let bad = |reason: String| UpstreamError::RootFile {
            path: path.clone(),
            reason,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| bad(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("no PEM certificate in file".into()));
        }
        for c in certs {
            roots.add(c).map_err(|e| bad(e.to_string()))?;
        }
    }
    Ok(roots)
}
