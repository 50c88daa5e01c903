//! Plain `http://` forwarding, as an ordinary HTTP proxy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::{self, metered, text, AccessLog, Body};
use crate::exchange::{client_response, upstream_request};
use crate::upstream::How;
use crate::Shared;

/// Forwards an absolute-form `http://` request as an ordinary HTTP proxy.
pub(super) async fn plain(
    req: Request<Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared>,
) -> Response<Body> {
    let start = Instant::now();
    let (parts, incoming) = req.into_parts();
    let host = parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let log = AccessLog {
        client: peer,
        host: host.clone(),
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        outcome: crate::body::Outcome::Forward,
        status: 0,
        start,
        metrics: shared.metrics.clone(),
    };
    let port = parts.uri.port_u16().unwrap_or(80);
    if port != 80 && !shared.config.allow_port.contains(&port) {
        let resp = text(
            StatusCode::FORBIDDEN,
            format!("forwarding to port {port} is not allowed (add it with --allow-port)"),
        );
        return metered(resp, log);
    }
    // The connector checks the destination again when it connects; asking first is what lets a
    // refusal be a 403 with its reason rather than a 502 about an upstream never contacted.
    let name = parts.uri.host().unwrap_or_default();
    if let Err(e) = shared.resolver.resolve(name, port).await {
        let resp = if e.kind() == std::io::ErrorKind::PermissionDenied {
            tracing::warn!(client = %peer, host = %host, error = %e, "forward refused");
            text(StatusCode::FORBIDDEN, format!("refused: {e}"))
        } else {
            tracing::warn!(client = %peer, host = %host, error = %e, "forward failed");
            text(StatusCode::BAD_GATEWAY, format!("upstream {host}: {e}"))
        };
        return metered(resp, log);
    }
    let upstream_req = upstream_request(&parts, parts.uri.clone(), body::incoming(incoming));
    let resp = match shared.client.send(upstream_req, How::default()).await {
        Ok(resp) => client_response(resp),
        Err(e) => {
            tracing::warn!(client = %peer, host = %host, error = %e, "forward failed");
            text(StatusCode::BAD_GATEWAY, format!("upstream {host}: {e}"))
        }
    };
    metered(resp, log)
}
