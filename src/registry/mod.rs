//! The OCI distribution API as seen inside an intercepted connection: classify, then answer from
//! the cache or the upstream.

pub mod mirror;
mod objects;
mod range;
pub mod route;
mod tags;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{request, Request, Response, StatusCode};
use hyper::body::Incoming;
use tracing::Instrument;

use crate::body::{self, metered, text, AccessLog, Body};
use crate::exchange::{client_response, upstream_is_down, upstream_request, upstream_uri, Target};
use crate::upstream::{How, UpstreamError};
use crate::Shared;
use route::Route;

pub use crate::body::Outcome;

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
            client: peer,
            host: target.authority().to_owned(),
            method: req.method().to_string(),
            path: req.uri().path().to_owned(),
            outcome: Outcome::Forward,
            status: 0,
            start: Instant::now(),
            metrics: shared.metrics.clone(),
        };
        let (parts, incoming) = req.into_parts();
        let (resp, outcome) = match Route::classify(&parts.method, parts.uri.path()) {
            Route::Other => {
                let body = body::incoming(incoming);
                let forwarded = Box::pin(forward(&parts, body, target, shared, false));
                (forwarded.await, Outcome::Forward)
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
        Route::Invalid(reason) => (text(StatusCode::BAD_REQUEST, reason), Outcome::Refused),
        Route::Ping => Box::pin(ping(parts, target, shared)).await,
        Route::Blob { repo, digest } | Route::ManifestByDigest { repo, digest } => {
            objects::serve(parts, target, &repo, digest, shared).await
        }
        Route::ManifestByTag { repo, tag } => {
            let answer = tags::serve(parts, target, &repo, &tag, shared).await;
            if answer.0.status().is_success() {
                shared.metrics.pulled(target.authority(), &repo, &tag);
            }
            answer
        }
        Route::Other => {
            let resp = Box::pin(forward(parts, body::empty(), target, shared, false)).await;
            (resp, Outcome::Forward)
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
        Ok(uri) => {
            shared
                .client
                .send(upstream_request(parts, uri, body::empty()), How::default())
                .await
        }
        Err(reason) => return (text(StatusCode::BAD_REQUEST, reason), Outcome::Refused),
    };
    match result {
        Ok(resp) if !upstream_is_down(resp.status()) => (client_response(resp), Outcome::Forward),
        Err(e) if !e.is_unreachable() => (bad_gateway(target, &e), Outcome::Failed),
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
            (resp, Outcome::Stale)
        }
    }
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
    // A body streamed to the client as it reads goes on a connection of its own (see
    // OwnConnection); a HEAD's answer has none.
    if parts.method != http::Method::HEAD {
        req.extensions_mut().insert(crate::upstream::OwnConnection);
    }
    let how = How {
        follow,
        ..How::default()
    };
    let result = shared.client.send(req, how).await;
    match result {
        Ok(resp) => client_response(resp),
        Err(e) => bad_gateway(target, &e),
    }
}

/// A `502` naming the upstream and the cause.
fn bad_gateway(target: &Target, e: &UpstreamError) -> Response<Body> {
    tracing::warn!(error = %e, "upstream failed");
    text(
        StatusCode::BAD_GATEWAY,
        format!("upstream {}: {e}", target.authority()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// hyper moves each request's future a few times on its way in, so its size is copied per
    /// request: the paths that go upstream are boxed, and a cached answer's future stays small
    /// (the whole of it was 11.8 KiB before, 7.4 KiB of that for this part).
    #[tokio::test]
    async fn a_cached_answers_future_carries_no_upstream_path() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Shared::in_dir(dir.path());
        let target = Target::new("registry.test".into(), 443);
        let (parts, ()) = Request::new(()).into_parts();
        let route = Route::classify(&parts.method, "/v2/a/manifests/latest");
        let future = serve(&parts, route, &target, &shared);
        let size = std::mem::size_of_val(&future);
        assert!(size <= 2048, "{size} bytes");
    }
}
