//! Blobs and manifests by digest: immutable, so a verified cached copy is always the answer.
//! A miss starts (or joins) the one download of that digest.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{request, Method, Request, Response, StatusCode};

use super::range::{ByteRange, Slice};
use super::{auth, bad_gateway, fetch_request, forward, Outcome};
use tokio::sync::oneshot;

use crate::body::{self, text, Body};
use crate::cache::flight::Leader;
use crate::cache::{Digest, Flight, Head, Join, State};
use crate::proxy::Target;
use crate::Shared;

/// One request for an object, with what answering it from the cache needs.
struct Ask<'a> {
    parts: &'a request::Parts,
    target: &'a Target,
    repo: &'a str,
    digest: &'a Digest,
    shared: &'a Arc<Shared>,
    range: Option<ByteRange>,
}

impl Ask<'_> {
    /// Answers from a cached or in-flight object, if the upstream would give it to this client.
    async fn cached(
        &self,
        flight: &Arc<Flight>,
        head_only: bool,
        outcome: Outcome,
    ) -> (Response<Body>, Outcome) {
        let digest = Some(self.digest);
        if let Err(refused) = auth::allowed(
            self.shared,
            self.parts,
            self.target,
            self.repo,
            digest,
            false,
        )
        .await
        {
            return (refused, "FORWARD");
        }
        (respond(flight, self.digest, head_only, self.range), outcome)
    }

    async fn forward(&self) -> (Response<Body>, Outcome) {
        let resp = forward(self.parts, body::empty(), self.target, self.shared, true).await;
        (resp, "FORWARD")
    }
}

/// Answers a GET or HEAD of an object by digest.
pub(super) async fn serve(
    parts: &request::Parts,
    target: &Target,
    repo: &str,
    digest: Digest,
    shared: &Arc<Shared>,
) -> (Response<Body>, Outcome) {
    let head_only = parts.method == Method::HEAD;
    let ask = Ask {
        parts,
        target,
        repo,
        digest: &digest,
        shared,
        range: ByteRange::from_headers(&parts.headers),
    };
    if let Some((flight, _)) = shared.cache.hit(&digest).await {
        return ask.cached(&flight, head_only, "HIT").await;
    }
    if head_only {
        // A HEAD is cheap upstream and says nothing worth caching, unless a download already knows.
        let known = shared
            .cache
            .flights
            .get(&digest)
            .filter(|f| f.head().is_some());
        return match known {
            Some(flight) => ask.cached(&flight, true, "JOINED").await,
            None => ask.forward().await,
        };
    }
    match shared.cache.flights.join(&digest) {
        Join::Follower(flight) => match flight.started().await {
            // The leader got no cacheable answer (or found it cached meanwhile).
            State::Abandoned => match shared.cache.hit(&digest).await {
                Some((flight, _)) => ask.cached(&flight, false, "HIT").await,
                None => ask.forward().await,
            },
            _ => {
                shared.metrics.joins.fetch_add(1, Ordering::Relaxed);
                ask.cached(&flight, false, "JOINED").await
            }
        },
        Join::Leader(leader) => {
            // It may have been committed between the lookup above and the join.
            if let Some((flight, _)) = shared.cache.hit(&digest).await {
                drop(leader);
                return ask.cached(&flight, false, "HIT").await;
            }
            let up = match fetch_request(target, parts, Method::GET) {
                Ok(r) => r,
                Err(reason) => return (text(StatusCode::BAD_REQUEST, reason), "FORWARD"),
            };
            let flight = leader.flight();
            let (tx, rx) = oneshot::channel();
            // The download runs apart from this client, which may leave without harming it.
            let source = (target.clone(), repo.to_owned(), digest.clone());
            let task = lead(leader, up, source, shared.clone(), tx);
            shared.cache.flights.spawn(task);
            match flight.started().await {
                State::Abandoned => match rx.await {
                    Ok(resp) => (resp, "FORWARD"),
                    Err(_) => (
                        text(StatusCode::BAD_GATEWAY, "the download was abandoned"),
                        "FORWARD",
                    ),
                },
                _ => (respond(&flight, &digest, false, ask.range), "MISS"),
            }
        }
    }
}

/// The leader's side: ask upstream; start the fill on a 200, else hand the answer (401, 404,
/// 502, …) to the leader's client and release the followers, who ask for themselves.
async fn lead(
    leader: Leader,
    up: Request<Body>,
    (target, repo, digest): (Target, String, Digest),
    shared: Arc<Shared>,
    answer: oneshot::Sender<Response<Body>>,
) {
    let sent = up.headers().clone();
    let resp = match auth::send(&shared, up, true).await {
        Ok(r) => r,
        Err(e) => {
            let _ = answer.send(bad_gateway(&target, &e));
            return;
        }
    };
    if resp.status() != StatusCode::OK {
        let _ = answer.send(crate::proxy::client_response(resp));
        return;
    }
    // Before followers are let in: they may then skip asking whether they may read it.
    shared
        .cache
        .store
        .note_source(&digest, &target.authority(), &repo);
    auth::served_to(&shared, &sent, &target, &repo).await;
    let head = Head {
        content_type: header_str(resp.headers(), header::CONTENT_TYPE),
        length: header_str(resp.headers(), header::CONTENT_LENGTH).and_then(|v| v.parse().ok()),
    };
    if resp.headers().contains_key(header::CONTENT_ENCODING) {
        let _ = answer.send(text(
            StatusCode::BAD_GATEWAY,
            "upstream sent an encoded blob although asked for identity",
        ));
        return;
    }
    if let Err(e) = leader.start(&shared.cache.store, head, resp.into_body()) {
        let _ = answer.send(text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot create a cache file: {e}"),
        ));
        return;
    }
    // Off the first byte's path: a follower that joins before this is recorded asks upstream.
    shared
        .cache
        .store
        .add_source(&digest, &target.authority(), &repo)
        .await;
    if sent.contains_key(header::AUTHORIZATION) {
        // Off the client's path: may anonymous clients pull this too (for serving it offline)?
        let path = format!("/v2/{repo}/blobs/{digest}");
        auth::probe_public(&shared, &target, &path, &repo).await;
    }
}

/// The response for a flight (complete or growing): whole, one range, or 416.
pub(super) fn respond(
    flight: &Arc<Flight>,
    digest: &Digest,
    head_only: bool,
    range: Option<ByteRange>,
) -> Response<Body> {
    let total = flight.head().and_then(|h| h.length);
    let slice = range.map_or(Slice::Whole, |r| r.slice(total));
    let (status, start, end) = match slice {
        Slice::Whole => (StatusCode::OK, 0, total),
        Slice::Part(s, e) => (StatusCode::PARTIAL_CONTENT, s, Some(e)),
        Slice::Unsatisfiable => {
            let mut resp = text(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable");
            if let Some(t) = total {
                insert(&mut resp, header::CONTENT_RANGE, format!("bytes */{t}"));
            }
            return resp;
        }
    };
    let body = if head_only {
        body::empty()
    } else {
        flight.reader(start, end)
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let content_type = flight
        .head()
        .and_then(|h| h.content_type.clone())
        .unwrap_or_else(|| "application/octet-stream".into());
    insert(&mut resp, header::CONTENT_TYPE, content_type);
    insert(&mut resp, super::DOCKER_CONTENT_DIGEST, digest.to_string());
    insert(&mut resp, header::ETAG, format!("\"{digest}\""));
    insert(&mut resp, header::ACCEPT_RANGES, "bytes".into());
    if let Some(e) = end {
        insert(&mut resp, header::CONTENT_LENGTH, (e - start).to_string());
    }
    if status == StatusCode::PARTIAL_CONTENT {
        let of = total.map_or("*".to_string(), |t| t.to_string());
        let last = end.unwrap_or(start + 1) - 1;
        insert(
            &mut resp,
            header::CONTENT_RANGE,
            format!("bytes {start}-{last}/{of}"),
        );
    }
    resp
}

/// Sets a header from a string; values that are not valid header text are skipped.
pub(super) fn insert<K: header::IntoHeaderName>(resp: &mut Response<Body>, name: K, value: String) {
    if let Ok(v) = HeaderValue::try_from(value) {
        resp.headers_mut().insert(name, v);
    }
}

/// A header's value as text, if present and printable.
pub(super) fn header_str(
    headers: &http::HeaderMap,
    name: impl header::AsHeaderName,
) -> Option<String> {
    headers.get(name)?.to_str().ok().map(str::to_owned)
}
