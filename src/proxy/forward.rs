//! Request and response rewriting for forwarding: hop-by-hop headers go, everything else stays.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderName};
use http::{request, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;

use crate::body::{self, metered, text, AccessLog, Body};
use crate::Shared;

/// Headers that describe one hop and must not be forwarded (RFC 9110 7.6.1), plus proxy auth.
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those named by `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(&named) {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// Builds the upstream request for `uri` from a client request's head and body.
pub fn upstream_request(parts: &request::Parts, uri: Uri, body: Body) -> Request<Body> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    // The pooled client speaks h2 or HTTP/1.1 as negotiated; the client's version is irrelevant.
    *req.version_mut() = Version::HTTP_11;
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    *req.headers_mut() = headers;
    // Which injected credentials may be used is decided by who sent the request.
    if let Some(user) = parts.extensions.get::<crate::credentials::ProxyUser>() {
        req.extensions_mut().insert(user.clone());
    }
    req
}

/// Turns an upstream response into one for the client, body still streaming.
pub fn client_response(resp: Response<Incoming>) -> Response<Body> {
    let (mut parts, incoming) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_11;
    Response::from_parts(parts, body::incoming(incoming))
}

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
        client: peer.to_string(),
        host: host.clone(),
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        outcome: "FORWARD",
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
    let resp = match shared.upstream.send(upstream_req).await {
        Ok(resp) => client_response(resp),
        Err(e) => {
            tracing::warn!(client = %peer, host = %host, error = %e, "forward failed");
            text(StatusCode::BAD_GATEWAY, format!("upstream {host}: {e}"))
        }
    };
    metered(resp, log)
}
