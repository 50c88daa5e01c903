//! The OCI distribution API as seen inside an intercepted connection: classify, then serve.

pub mod route;

use std::net::SocketAddr;
use std::time::Instant;

use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use tracing::Instrument;

use crate::body::{self, metered, text, AccessLog, Body};
use crate::proxy::Target;
use crate::proxy::{client_response, upstream_request};
use crate::upstream::UpstreamError;
use crate::Shared;
use route::Route;

/// Redirect hops followed upstream-side before giving up.
const MAX_REDIRECTS: usize = 5;

/// Serves one request that arrived inside an intercepted TLS connection.
pub async fn handle(
    req: Request<Incoming>,
    target: &Target,
    peer: SocketAddr,
    shared: &Shared,
) -> Response<Body> {
    let span = tracing::info_span!("request", host = %target.authority(), method = %req.method(), path = %req.uri().path());
    async move {
        let log = AccessLog {
            client: peer.to_string(),
            host: target.authority(),
            method: req.method().to_string(),
            path: req.uri().path().to_owned(),
            outcome: "FORWARD",
            status: 0,
            start: Instant::now(),
        };
        let route = Route::classify(req.method(), req.uri().path());
        let resp = match route {
            Route::Invalid(reason) => text(StatusCode::BAD_REQUEST, reason),
            _ => forward(req, target, shared, route.follows_redirects()).await,
        };
        metered(resp, log)
    }
    .instrument(span)
    .await
}

/// Forwards the request unchanged to the upstream and streams the answer back.
async fn forward(
    req: Request<Incoming>,
    target: &Target,
    shared: &Shared,
    follow: bool,
) -> Response<Body> {
    let (parts, incoming) = req.into_parts();
    let uri = match upstream_uri(target, &parts.uri) {
        Ok(u) => u,
        Err(reason) => return text(StatusCode::BAD_REQUEST, reason),
    };
    let req = upstream_request(&parts, uri, body::incoming(incoming));
    let result = if follow {
        send_following_redirects(shared, req).await
    } else {
        shared.upstream.send(req).await
    };
    match result {
        Ok(resp) => client_response(resp),
        Err(e) => {
            tracing::warn!(error = %e, "upstream failed");
            text(
                StatusCode::BAD_GATEWAY,
                format!("upstream {}: {e}", target.authority()),
            )
        }
    }
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
/// The signed URL is fetched directly; `Authorization` is dropped once the redirect leaves the
/// original host, because the registry's token means nothing (and must not leak) elsewhere.
pub async fn send_following_redirects(
    shared: &Shared,
    req: Request<Body>,
) -> Result<Response<Incoming>, UpstreamError> {
    let (parts, body) = req.into_parts();
    let origin = parts.uri.clone();
    let mut headers = parts.headers.clone();
    let mut resp = shared
        .upstream
        .send(Request::from_parts(parts.clone(), body))
        .await?;
    for _ in 0..MAX_REDIRECTS {
        let Some(next) = redirect_target(&resp, &origin) else {
            break;
        };
        if next.authority() != origin.authority() {
            headers.remove(header::AUTHORIZATION);
        }
        tracing::debug!(to = %next.host().unwrap_or(""), "following redirect upstream-side");
        resp = shared
            .upstream
            .send(request_to(&parts.method, &next, &headers))
            .await?;
    }
    Ok(resp)
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
