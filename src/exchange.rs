//! What the listener and the registry router both speak: the target of an intercepted
//! connection, and how requests and responses are rewritten from one hop to the next (hop-by-hop
//! headers go, everything else stays). Below both, so that neither imports the other's.

use http::header::{self, HeaderMap, HeaderName};
use http::{request, Request, Response, Uri, Version};
use hyper::body::Incoming;

use crate::body::{self, Body};

/// The host and port a client asked to CONNECT to.
#[derive(Debug, Clone)]
pub struct Target {
    /// Host name or IP literal, lower-case.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl Target {
    /// `host` alone for 443, `host:port` otherwise: the authority of upstream URLs.
    pub fn authority(&self) -> String {
        if self.port == 443 {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
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
