//! The OCI distribution API as seen inside an intercepted connection: classify, then answer from
//! the cache or the upstream.

pub mod auth;
pub mod mirror;
mod objects;
mod range;
pub mod route;
mod tags;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderValue};
use http::{request, Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use tracing::Instrument;

use crate::body::{self, metered, text, AccessLog, Body};
use crate::exchange::{client_response, strip_hop_by_hop, upstream_request, Target};
use crate::upstream::UpstreamError;
use crate::Shared;
use route::Route;

/// Redirect hops followed upstream-side before giving up.
const MAX_REDIRECTS: usize = 5;

/// The header in which registries name a manifest's or blob's digest.
const DOCKER_CONTENT_DIGEST: header::HeaderName =
    header::HeaderName::from_static("docker-content-digest");

/// How a request was answered, for the access log and metrics.
pub type Outcome = &'static str;

/// Serves one request that arrived inside an intercepted TLS connection.
pub async fn handle(
    req: Request<Incoming>,
    target: &Target,
    peer: SocketAddr,
    shared: &Arc<Shared>,
) -> Response<Body> {
    let span = tracing::info_span!("request", host = %target.authority(), method = %req.method(), path = %req.uri().path());
    async move {
        let mut log = AccessLog {
            client: peer.to_string(),
            host: target.authority(),
            method: req.method().to_string(),
            path: req.uri().path().to_owned(),
            outcome: "FORWARD",
            status: 0,
            start: Instant::now(),
            metrics: shared.metrics.clone(),
        };
        let (parts, incoming) = req.into_parts();
        let (resp, outcome) = match Route::classify(&parts.method, parts.uri.path()) {
            Route::Other => {
                let body = body::incoming(incoming);
                (
                    forward(&parts, body, target, shared, false).await,
                    "FORWARD",
                )
            }
            route => serve(&parts, route, target, shared).await,
        };
        log.outcome = outcome;
        metered(resp, log)
    }
    .instrument(span)
    .await
}

/// Answers a body-less registry request (`GET`/`HEAD`) from its head: what intercepted clients
/// and `cache prefetch` both go through.
pub async fn serve(
    parts: &request::Parts,
    route: Route,
    target: &Target,
    shared: &Arc<Shared>,
) -> (Response<Body>, Outcome) {
    match route {
        Route::Invalid(reason) => (text(StatusCode::BAD_REQUEST, reason), "FORWARD"),
        Route::Ping => ping(parts, target, shared).await,
        Route::Blob { repo, digest } | Route::ManifestByDigest { repo, digest } => {
            objects::serve(parts, target, &repo, digest, shared).await
        }
        Route::ManifestByTag { repo, tag } => tags::serve(parts, target, &repo, &tag, shared).await,
        Route::Other => {
            let resp = forward(parts, body::empty(), target, shared, false).await;
            (resp, "FORWARD")
        }
    }
}

/// The `/v2/` version check: the upstream's answer (its auth challenge included), or a local
/// `200` when the upstream is down, so that clients go on to pull what the cache holds.
async fn ping(
    parts: &request::Parts,
    target: &Target,
    shared: &Shared,
) -> (Response<Body>, Outcome) {
    let result = match upstream_uri(target, &parts.uri) {
        Ok(uri) => auth::send(shared, upstream_request(parts, uri, body::empty()), false).await,
        Err(reason) => return (text(StatusCode::BAD_REQUEST, reason), "FORWARD"),
    };
    match result {
        Ok(resp) if !upstream_is_down(resp.status()) => (client_response(resp), "FORWARD"),
        Err(e) if !e.is_unreachable() => (bad_gateway(target, &e), "FORWARD"),
        down => {
            let cause = down.map_or_else(|e| e.to_string(), |r| format!("status {}", r.status()));
            tracing::warn!(cause = %cause, "upstream down; answering /v2/ locally");
            let mut resp = Response::new(body::full("{}"));
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            h.insert(
                "docker-distribution-api-version",
                HeaderValue::from_static("registry/2.0"),
            );
            (resp, "STALE")
        }
    }
}

/// Whether an upstream status means "cannot answer now" (serve stale) rather than a real answer.
fn upstream_is_down(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
}

/// Forwards the request unchanged to the upstream and streams the answer back.
async fn forward(
    parts: &request::Parts,
    body: Body,
    target: &Target,
    shared: &Shared,
    follow: bool,
) -> Response<Body> {
    let uri = match upstream_uri(target, &parts.uri) {
        Ok(u) => u,
        Err(reason) => return text(StatusCode::BAD_REQUEST, reason),
    };
    let mut req = upstream_request(parts, uri, body);
    // Streamed to the client as it reads: a connection of its own (see OwnConnection).
    req.extensions_mut().insert(crate::upstream::OwnConnection);
    let result = auth::send(shared, req, follow).await;
    match result {
        Ok(resp) => client_response(resp),
        Err(e) => bad_gateway(target, &e),
    }
}

/// The upstream's answer to a `HEAD` the proxy sent, as the answer to the client's own request.
///
/// For a `GET` the status and headers (an auth challenge above all) stay, and an OCI error body
/// replaces the body that a `HEAD` never has: its `Content-Length` described bytes that will not
/// come, which an h2 client takes as a protocol error.
pub(crate) fn head_answer(resp: Response<Incoming>, client: &Method, host: &str) -> Response<Body> {
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

/// A `502` naming the upstream and the cause.
fn bad_gateway(target: &Target, e: &UpstreamError) -> Response<Body> {
    tracing::warn!(error = %e, "upstream failed");
    text(
        StatusCode::BAD_GATEWAY,
        format!("upstream {}: {e}", target.authority()),
    )
}

/// A body-less upstream request for the client's `parts` with `method`, without the client's
/// conditional and range headers (the proxy fetches whole objects for the cache).
fn fetch_request(
    target: &Target,
    parts: &request::Parts,
    method: Method,
) -> Result<Request<Body>, String> {
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
pub fn upstream_uri(target: &Target, uri: &Uri) -> Result<Uri, String> {
    let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    format!("https://{}{pq}", target.authority())
        .parse()
        .map_err(|e| format!("bad request path {pq:?}: {e}"))
}

/// Sends a body-less request and follows redirects (CDN, object store) on the proxy's side.
///
/// The signed URL is fetched directly. `Authorization` is dropped once a redirect leaves the
/// original scheme and authority, because the registry's token means nothing (and must not leak)
/// elsewhere; a redirect from https to plain http, or to a port not allowed, is refused.
pub async fn send_following_redirects(
    shared: &Shared,
    req: Request<Body>,
) -> Result<Response<Incoming>, UpstreamError> {
    let (parts, body) = req.into_parts();
    let origin = parts.uri.clone();
    let mut current = origin.clone();
    let mut headers = parts.headers.clone();
    let mut resp = shared
        .upstream
        .send(Request::from_parts(parts.clone(), body))
        .await?;
    for _ in 0..MAX_REDIRECTS {
        let Some(next) = redirect_target(&resp, &current) else {
            break;
        };
        check_redirect(shared, &current, &next)?;
        if next.scheme() != origin.scheme() || next.authority() != origin.authority() {
            headers.remove(header::AUTHORIZATION);
        }
        tracing::debug!(to = %next.host().unwrap_or(""), "following redirect upstream-side");
        let mut req = request_to(&parts.method, &next, &headers);
        *req.extensions_mut() = parts.extensions.clone();
        resp = shared.upstream.send(req).await?;
        current = next;
    }
    Ok(resp)
}

/// Refuses downgrades to plain http and ports that CONNECT could not reach either.
fn check_redirect(shared: &Shared, from: &Uri, to: &Uri) -> Result<(), UpstreamError> {
    let refuse = |why: String| Err(UpstreamError::Redirect(why));
    if from.scheme_str() == Some("https") && to.scheme_str() != Some("https") {
        return refuse(format!(
            "refused redirect from https to {}",
            to.scheme_str().unwrap_or("?")
        ));
    }
    let port = to.port_u16().unwrap_or(443);
    if port != 443 && !shared.config.allow_port.contains(&port) {
        return refuse(format!(
            "refused redirect to port {port} (not an allowed port)"
        ));
    }
    Ok(())
}

fn redirect_target(resp: &Response<Incoming>, base: &Uri) -> Option<Uri> {
    if !matches!(resp.status().as_u16(), 301 | 302 | 303 | 307 | 308) {
        return None;
    }
    let location = resp.headers().get(header::LOCATION)?.to_str().ok()?;
    let uri: Uri = location.parse().ok()?;
    if uri.scheme().is_some() {
        return Some(uri);
    }
    // A relative Location resolves against the URL that was requested.
    let scheme = base.scheme_str().unwrap_or("https");
    format!("{scheme}://{}{}", base.authority()?, uri.path_and_query()?)
        .parse()
        .ok()
}

fn request_to(method: &Method, uri: &Uri, headers: &HeaderMap) -> Request<Body> {
    let mut req = Request::new(body::empty());
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri.clone();
    *req.headers_mut() = headers.clone();
    req
}
