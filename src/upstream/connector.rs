//! The connector behind the pooled upstream client: resolve overrides, connect timeout, verified
//! TLS with ALPN, and errors that name why a handshake failed.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::resolve::{connect, Resolver};

/// Why an upstream connection could not be made; the message is safe to show to clients.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URI has no host.
    #[error("upstream URI {0} has no host")]
    NoHost(String),
    /// DNS, refused, unreachable or timed out.
    #[error("{0}")]
    Connect(io::Error),
    /// The TLS handshake failed, e.g. the certificate did not verify.
    #[error("TLS handshake with {host} failed: {reason}")]
    Tls { host: String, reason: String },
}

/// Makes TCP or TLS connections for the upstream client.
#[derive(Clone)]
pub struct Connector {
    resolver: Arc<Resolver>,
    tls: TlsConnector,
    timeout: Duration,
}

impl Connector {
    /// A connector using `tls` (roots and ALPN set by the caller).
    pub fn new(
        resolver: Arc<Resolver>,
        tls: Arc<rustls::ClientConfig>,
        timeout: Duration,
    ) -> Connector {
        Connector {
            resolver,
            tls: TlsConnector::from(tls),
            timeout,
        }
    }

    async fn open(self, uri: Uri) -> Result<Conn, ConnectError> {
        let host = uri
            .host()
            .ok_or_else(|| ConnectError::NoHost(uri.to_string()))?
            .to_owned();
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = connect(&self.resolver, &host, port, self.timeout)
            .await
            .map_err(ConnectError::Connect)?;
        if !https {
            return Ok(Conn::Plain(TokioIo::new(tcp)));
        }
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let name = ServerName::try_from(bare.clone()).map_err(|e| ConnectError::Tls {
            host: host.clone(),
            reason: e.to_string(),
        })?;
        let handshake = tokio::time::timeout(self.timeout, self.tls.connect(name, tcp));
        match handshake.await {
            Ok(Ok(tls)) => {
                if let Some(suite) = tls.get_ref().1.negotiated_cipher_suite() {
                    tracing::debug!(target: "regproxy::tls", side = "upstream", host = %bare, suite = ?suite.suite(), "negotiated");
                }
                Ok(Conn::Tls(Box::new(TokioIo::new(tls))))
            }
            Ok(Err(e)) => Err(ConnectError::Tls {
                reason: tls_reason(&e, &bare),
                host,
            }),
            Err(_) => Err(ConnectError::Tls {
                host,
                reason: format!("timed out after {:?}", self.timeout),
            }),
        }
    }
}

/// Names a TLS failure the way an operator thinks of it: expired, unknown issuer, wrong name.
pub fn tls_reason(e: &io::Error, host: &str) -> String {
    use rustls::CertificateError as C;
    let Some(rustls_err) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return e.to_string();
    };
    match rustls_err {
        rustls::Error::InvalidCertificate(c) => match c {
            C::Expired | C::ExpiredContext { .. } => "certificate expired".into(),
            C::NotValidYet | C::NotValidYetContext { .. } => "certificate not valid yet".into(),
            C::UnknownIssuer => {
                "certificate signed by an unknown issuer (not in the system roots or --upstream-ca)"
                    .into()
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                format!("certificate not valid for name {host} (wrong name)")
            }
            C::Revoked => "certificate revoked".into(),
            other => format!("invalid certificate: {other:?}"),
        },
        other => other.to_string(),
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = Conn;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(self.clone().open(uri))
    }
}

/// An upstream connection, plain or TLS.
pub enum Conn {
    /// Plain TCP (for `http://` forwarding).
    Plain(TokioIo<TcpStream>),
    /// Verified TLS.
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        match self {
            Conn::Plain(_) => Connected::new(),
            Conn::Tls(s) if s.inner().get_ref().1.alpn_protocol() == Some(b"h2") => {
                Connected::new().negotiated_h2()
            }
            Conn::Tls(_) => Connected::new(),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Conn::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Conn::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }
}
