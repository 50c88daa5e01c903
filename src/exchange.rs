//! What the listener and the registry router both speak: the target of an intercepted
//! connection, and how requests and responses are rewritten from one hop to the next (hop-by-hop
//! headers go, everything else stays). Below both, so that neither imports the other's.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{request, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;

use crate::body::{self, Body};

/// The host and port a client asked to CONNECT to.
#[derive(Debug, Clone)]
pub struct Target {
    // Private, so that the authority formatted from them cannot go stale.
    host: String,
    port: u16,
    // Formatted once: every request on the connection names it (logs, keys, upstream URLs).
    authority: String,
}

impl Target {
    /// The target `host`:`port`.
    pub fn new(host: String, port: u16) -> Target {
        let authority = if port == 443 {
            host.clone()
        } else {
            format!("{host}:{port}")
        };
        Target {
            host,
            port,
            authority,
        }
    }

    /// Host name or IP literal, lower-case.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `host` alone for 443, `host:port` otherwise: the authority of upstream URLs.
    pub fn authority(&self) -> &str {
        &self.authority
    }
}

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

/// The header in which registries name a manifest's or blob's digest.
pub const DOCKER_CONTENT_DIGEST: header::HeaderName =
    header::HeaderName::from_static("docker-content-digest");

/// Whether an upstream status means "cannot answer now" (serve stale) rather than a real answer.
pub fn upstream_is_down(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
}

/// The upstream's answer to a `HEAD` the proxy sent, as the answer to the client's own request.
///
/// For a `GET` the status and headers (an auth challenge above all) stay, and an OCI error body
/// replaces the body that a `HEAD` never has: its `Content-Length` described bytes that will not
/// come, which an h2 client takes as a protocol error.
pub fn head_answer(resp: Response<Incoming>, client: &Method, host: &str) -> Response<Body> {
    if client == Method::HEAD {
        return client_response(resp);
    }
    let (mut parts, _) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    for h in [
        header::CONTENT_LENGTH,
        header::CONTENT_TYPE,
        header::CONTENT_ENCODING,
        header::CONTENT_RANGE,
        header::ETAG,
        DOCKER_CONTENT_DIGEST,
    ] {
        parts.headers.remove(h);
    }
    let code = match parts.status.as_u16() {
        401 => "UNAUTHORIZED",
        403 => "DENIED",
        404 => "NAME_UNKNOWN",
        429 => "TOOMANYREQUESTS",
        _ => "UNKNOWN",
    };
    let message = format!("{host} answered {}", parts.status);
    let json = serde_json::json!({ "errors": [{ "code": code, "message": message }] });
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.version = http::Version::HTTP_11;
    Response::from_parts(parts, body::full(json.to_string()))
}

/// A request path that cannot be put on an upstream URL.
#[derive(Debug, thiserror::Error)]
#[error("bad request path {path:?}: {source}")]
pub struct BadPath {
    /// The path and query as the client sent them.
    path: String,
    /// Why the URL does not parse.
    source: http::uri::InvalidUri,
}

/// A body-less upstream request for the client's `parts` with `method`, without the client's
/// conditional and range headers (the proxy fetches whole objects for the cache).
pub fn fetch_request(
    target: &Target,
    parts: &request::Parts,
    method: Method,
) -> Result<Request<Body>, BadPath> {
    let uri = upstream_uri(target, &parts.uri)?;
    let mut req = upstream_request(parts, uri, body::empty());
    *req.method_mut() = method;
    for h in [
        header::RANGE,
        header::IF_RANGE,
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::CONTENT_LENGTH,
    ] {
        req.headers_mut().remove(h);
    }
    // What is cached must be the object's own bytes: a compressed body would never verify.
    req.headers_mut().insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    Ok(req)
}

/// The upstream URL for a request path on the CONNECT target.
pub fn upstream_uri(target: &Target, uri: &Uri) -> Result<Uri, BadPath> {
    let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    format!("https://{}{pq}", target.authority())
        .parse()
        .map_err(|source| BadPath {
            path: pq.to_owned(),
            source,
        })
}
