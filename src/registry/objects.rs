//! Blobs and manifests by digest: immutable, so a verified cached copy is always the answer.
//! A miss starts (or joins) the one download of that digest.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{request, Method, Request, Response, StatusCode};

use hyper::body::Incoming;
use tokio::sync::oneshot;

use super::range::{ByteRange, Slice};
use super::{bad_gateway, forward, Outcome};
use crate::access::{self, Provenance, Verdict};
use crate::body::{self, text, Body};
use crate::cache::flight::{Leader, ROOM_MARGIN};
use crate::cache::{evict, shared_origin, Digest, Flight, Head, Join, Origin, Source, State};
use crate::credentials::ProxyUser;
use crate::exchange::Target;
use crate::exchange::{fetch_request, upstream_is_down, DOCKER_CONTENT_DIGEST};
use crate::fleet::FromMember;
use crate::upstream::pieces::Ranged;
use crate::upstream::How;
use crate::upstream::OwnConnection;
use crate::Shared;
use http::HeaderMap;

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
    fn origin(&self) -> Origin {
        Origin::new(self.target.authority(), self.repo)
    }

    /// Answers from a cached or in-flight object, if the upstream would give it to this client;
    /// bytes this origin never served come from it anew.
    async fn cached(&self, flight: &Arc<Flight>, outcome: Outcome) -> (Response<Body>, Outcome) {
        let shared = self.shared;
        let prov = Provenance::of(shared, self.digest, flight.origin(), &self.origin()).await;
        match access::allowed(shared, self.parts, self.target, self.repo, prov, false).await {
            Verdict::Serve => (
                respond(flight, self.digest, self.parts, self.range),
                outcome,
            ),
            Verdict::Refuse(answer) => (answer, Outcome::Refused),
            Verdict::Miss if self.parts.method == Method::HEAD => Box::pin(self.forward()).await,
            Verdict::Miss => Box::pin(self.passthrough(None)).await,
        }
    }

    /// A `HEAD` as the upstream answers it: no bytes, nothing to verify.
    async fn forward(&self) -> (Response<Body>, Outcome) {
        let resp = forward(self.parts, body::empty(), self.target, self.shared, true).await;
        (resp, Outcome::Forward)
    }

    /// Streams the object from the upstream without caching it, verified on the way: the last
    /// byte goes out only once the digest checks out. For bytes another origin served (this
    /// one must show its own) and for a disk that has no room. `resp` is the upstream's answer
    /// (a 200, plain) when the caller already has it.
    async fn passthrough(&self, resp: Option<Response<Body>>) -> (Response<Body>, Outcome) {
        let shared = self.shared;
        let resp = match resp {
            Some(resp) => resp,
            None => match self.fetch_whole().await {
                Ok(resp) => resp,
                Err(answer) => return answer,
            },
        };
        let length =
            header_str(resp.headers(), header::CONTENT_LENGTH).and_then(|v| v.parse().ok());
        let content_type = header_str(resp.headers(), header::CONTENT_TYPE);
        let (cache, digest, origin) = (shared.cache.clone(), self.digest.clone(), self.origin());
        let on_verified = move || {
            // The origin has shown it holds these bytes: its clients may have the cached copy.
            tokio::spawn(async move { cache.add_source(&digest, &origin).await });
        };
        let metrics = shared.metrics.clone();
        let verified = crate::cache::verified::verified(
            resp.into_body(),
            self.digest.clone(),
            length,
            metrics,
            on_verified,
        );
        let flightless = Head {
            content_type,
            length,
        };
        (
            passthrough_response(verified, self.digest, &flightless),
            Outcome::Miss,
        )
    }

    /// The upstream's 200 of the whole object, on a connection of its own, its bytes not
    /// encoded; else what to answer the client.
    async fn fetch_whole(&self) -> Result<Response<Body>, (Response<Body>, Outcome)> {
        let shared = self.shared;
        let mut up = fetch_request(self.target, self.parts, Method::GET)
            .map_err(|reason| (text(StatusCode::BAD_REQUEST, reason), Outcome::Refused))?;
        up.extensions_mut().insert(OwnConnection);
        let sent = up.headers().clone();
        let resp = match shared.client.send(up, How::following()).await {
            Ok(r) => r,
            Err(e) => return Err((bad_gateway(self.target, &e), Outcome::Failed)),
        };
        if resp.status() != StatusCode::OK {
            return Err((not_whole(resp), Outcome::Forward));
        }
        if resp.headers().contains_key(header::CONTENT_ENCODING) {
            let reason = "upstream sent an encoded blob although asked for identity";
            return Err((text(StatusCode::BAD_GATEWAY, reason), Outcome::Failed));
        }
        let user = self.parts.extensions.get::<ProxyUser>();
        access::served_to(shared, &sent, user, self.target, self.repo).await;
        Ok(resp.map(body::incoming))
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
    if let Some(flight) = shared.cache.hit(&digest).await {
        return ask.cached(&flight, Outcome::Hit).await;
    }
    if head_only {
        // A HEAD is cheap upstream and says nothing worth caching, unless a download already knows.
        let known = shared
            .cache
            .flights
            .get(&digest)
            .filter(|f| f.head().is_some());
        return match known {
            Some(flight) => ask.cached(&flight, Outcome::Joined).await,
            None => {
                tracing::debug!(digest = %digest, "HEAD of an object not cached: forwarded");
                Box::pin(ask.forward()).await
            }
        };
    }
    // Boxed: a download's future is several KiB, which every hit would carry (and copy) inline.
    Box::pin(download(&ask)).await
}

/// Answers a `GET` of an object the cache does not hold: joins the download in flight, or
/// leads one.
async fn download(ask: &Ask<'_>) -> (Response<Body>, Outcome) {
    let Ask {
        parts,
        target,
        repo,
        digest,
        shared,
        ..
    } = *ask;
    match shared.cache.flights.join(digest) {
        Join::Follower(flight) => {
            tracing::debug!(digest = %digest, "joining the download already in flight");
            match flight.started().await {
                // The leader got no cacheable answer (or found it cached meanwhile, or no room).
                State::Abandoned => match shared.cache.hit(digest).await {
                    Some(flight) => ask.cached(&flight, Outcome::Hit).await,
                    None => Box::pin(ask.passthrough(None)).await,
                },
                _ => {
                    shared.metrics.joins.fetch_add(1, Ordering::Relaxed);
                    ask.cached(&flight, Outcome::Joined).await
                }
            }
        }
        Join::Leader(leader) => {
            // It may have been committed between the lookup above and the join.
            if let Some(flight) = shared.cache.hit(digest).await {
                drop(leader);
                return ask.cached(&flight, Outcome::Hit).await;
            }
            let up = match fetch_request(target, parts, Method::GET) {
                Ok(r) => r,
                Err(reason) => return (text(StatusCode::BAD_REQUEST, reason), Outcome::Refused),
            };
            tracing::debug!(digest = %digest, "no download in flight: leading one from the upstream");
            let flight = leader.flight();
            let (tx, rx) = oneshot::channel();
            // The download runs apart from this client, which may leave without harming it.
            let source = (target.clone(), repo.to_owned(), digest.clone());
            let ask_fleet = parts.extensions.get::<FromMember>().is_none();
            let task = lead(leader, up, source, (shared.clone(), ask_fleet), tx);
            shared.cache.flights.spawn(task);
            match flight.started().await {
                State::Abandoned => match rx.await {
                    Ok(Answer::Upstream(resp)) => (resp, Outcome::Forward),
                    Ok(Answer::NoRoom(resp)) => ask.passthrough(Some(resp)).await,
                    Err(_) => (
                        text(StatusCode::BAD_GATEWAY, "the download was abandoned"),
                        Outcome::Failed,
                    ),
                },
                // The shared tier's bytes go to clients the upstream authorizes, as cached ones.
                _ if flight.source() == Some(Source::Shared) => {
                    ask.cached(&flight, Outcome::Shared).await
                }
                _ if flight.source() == Some(Source::Peer) => {
                    (respond(&flight, digest, parts, ask.range), Outcome::Peer)
                }
                _ => (respond(&flight, digest, parts, ask.range), Outcome::Miss),
            }
        }
    }
}

/// What a leader hands its client when no fill started.
enum Answer {
    /// The upstream's (or the proxy's) answer as it stands: 401, 404, 502, …
    Upstream(Response<Body>),
    /// A 200 whose object the disk has no room for: stream it past the cache.
    NoRoom(Response<Body>),
}

/// The leader's side: the shared tier first, then the fleet member that owns the digest, then
/// the upstream. A 200 starts the fill; any other answer (401, 404, 502, …) goes to the leader's
/// client and releases the followers, who ask for themselves.
async fn lead(
    leader: Leader,
    mut up: Request<Body>,
    (target, repo, digest): (Target, String, Digest),
    (shared, ask_fleet): (Arc<Shared>, bool),
    answer: oneshot::Sender<Answer>,
) {
    let origin = Origin::new(target.authority(), repo.as_str());
    let Err(leader) = from_shared_tier(leader, &digest, &origin, &shared).await else {
        return;
    };
    let sent = up.headers().clone();
    let user = up.extensions().get::<ProxyUser>().cloned();
    let (leader, answer) = match ask_fleet {
        true => {
            let client = (up.uri().path(), (sent.clone(), user.clone()));
            match from_owner(leader, client, &origin, &shared, answer).await {
                Some(unused) => unused,
                None => return,
            }
        }
        false => (leader, answer),
    };
    if up.uri().path().contains("/blobs/") {
        // Blobs fill on connections of their own (a large one on several), so that no flow's
        // limit on a long path caps every download.
        up.extensions_mut().insert(OwnConnection);
    }
    let mut ranged = Ranged::of(&up);
    let resp = match ranged.send(&shared.client, up).await {
        Ok(r) => r,
        Err(e) => {
            let _ = answer.send(Answer::Upstream(bad_gateway(&target, &e)));
            return;
        }
    };
    if resp.status() != StatusCode::OK {
        let _ = answer.send(Answer::Upstream(not_whole(resp)));
        return;
    }
    access::served_to(&shared, &sent, user.as_ref(), &target, &repo).await;
    let from = (origin, Source::Upstream);
    if !fill(leader, (resp, Some(ranged)), from, &shared, answer).await {
        return;
    }
    if sent.contains_key(header::AUTHORIZATION) {
        // Off the client's path: may anonymous clients pull this too (for serving it offline)?
        let path = format!("/v2/{repo}/blobs/{digest}");
        access::probe_public(&shared, &target, &path, &repo).await;
    }
}

/// Starts the fill from the shared tier if it holds the object for this origin (or a public
/// one); gives the leader back otherwise.
async fn from_shared_tier(
    leader: Leader,
    digest: &Digest,
    asked: &Origin,
    shared: &Arc<Shared>,
) -> Result<(), Leader> {
    let Some(tier) = &shared.cache.shared else {
        return Err(leader);
    };
    let Some(from) = shared_origin(&shared.cache, tier, digest, asked).await else {
        return Err(leader);
    };
    let Some((head, body)) = tier.object(digest).await else {
        return Err(leader);
    };
    if !room_for(shared, head.length).await {
        return Err(leader);
    }
    tracing::debug!(%digest, "filling from the shared store");
    if let Err(e) = leader.start(&shared.cache, head, body, (from, Source::Shared)) {
        tracing::warn!(%digest, error = %e, "cannot create a cache file");
    }
    Ok(())
}

/// Asks the fleet member that owns the digest, which fetches it from the upstream once for the
/// whole fleet. Its 200 starts the fill, its refusal is the answer; `None` when it did either,
/// the leader back when the fleet cannot help (no other owner, owner down or failing).
async fn from_owner(
    leader: Leader,
    (path, client): (&str, (HeaderMap, Option<ProxyUser>)),
    origin: &Origin,
    shared: &Arc<Shared>,
    answer: oneshot::Sender<Answer>,
) -> Option<(Leader, oneshot::Sender<Answer>)> {
    let Some(fleet) = &shared.fleet else {
        return Some((leader, answer));
    };
    let Some(owner) = fleet.owner(leader.digest()) else {
        return Some((leader, answer));
    };
    let ask = (path, &client.0, client.1.as_ref());
    let resp = match fleet.fetch(&owner, &origin.host, ask).await {
        Ok(r) if r.status() == StatusCode::OK => r,
        Ok(r) if !upstream_is_down(r.status()) && !r.status().is_server_error() => {
            let _ = answer.send(Answer::Upstream(not_whole(r)));
            return None;
        }
        Ok(r) => {
            tracing::warn!(%owner, status = %r.status(), "fleet owner failed; asking the upstream");
            return Some((leader, answer));
        }
        Err(e) => {
            tracing::warn!(%owner, error = %crate::upstream::error_chain(&e), "fleet owner unreachable; asking the upstream");
            return Some((leader, answer));
        }
    };
    shared.metrics.peer_fetches.fetch_add(1, Ordering::Relaxed);
    fill(
        leader,
        (resp, None),
        (origin.clone(), Source::Peer),
        shared,
        answer,
    )
    .await;
    None
}

/// Starts the fill from a 200 of `origin` (by way of `source`), continued in ranged pieces where
/// `ranged` says so; `false` when it could not start (the client then has its answer, or streams
/// past a cache without room).
async fn fill(
    leader: Leader,
    (resp, ranged): (Response<Incoming>, Option<Ranged>),
    from: (Origin, Source),
    shared: &Arc<Shared>,
    answer: oneshot::Sender<Answer>,
) -> bool {
    let digest = leader.digest().clone();
    let head = Head {
        content_type: header_str(resp.headers(), header::CONTENT_TYPE),
        length: header_str(resp.headers(), header::CONTENT_LENGTH).and_then(|v| v.parse().ok()),
    };
    if resp.headers().contains_key(header::CONTENT_ENCODING) {
        let _ = answer.send(Answer::Upstream(text(
            StatusCode::BAD_GATEWAY,
            "upstream sent an encoded blob although asked for identity",
        )));
        return false;
    }
    let (parts, body) = resp.into_parts();
    let body = match ranged {
        Some(ranged) => ranged.body(shared.clone(), body),
        None => body::incoming(body),
    };
    if !room_for(shared, head.length).await {
        shared.metrics.passthrough.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%digest, bytes = head.length, "no room in the cache even after eviction; streaming past it");
        let _ = answer.send(Answer::NoRoom(Response::from_parts(parts, body)));
        return false;
    }
    if let Err(e) = leader.start(&shared.cache, head, body, from) {
        let _ = answer.send(Answer::Upstream(text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot create a cache file: {e}"),
        )));
        return false;
    }
    true
}

/// The answer to pass on for an upstream status other than 200 (the only one that carries a
/// whole object to verify): the upstream's own (`resp`), but a 502 for another success (a 206, a
/// 203), whose bytes nobody would verify.
fn not_whole(resp: Response<Incoming>) -> Response<Body> {
    match resp.status() {
        s if s.is_success() => text(
            StatusCode::BAD_GATEWAY,
            format!("upstream answered {s} to a GET of a whole object"),
        ),
        _ => crate::exchange::client_response(resp),
    }
}

/// Whether the cache's disk has room for an object of `length` bytes, evicting least recently
/// used objects to make it; an unknown length is given its chance (a full disk then fails the
/// fill, and the client's retry streams past the cache).
async fn room_for(shared: &Shared, length: Option<u64>) -> bool {
    let Some(length) = length else { return true };
    let want = length.saturating_add(ROOM_MARGIN);
    let store = shared.cache.store.clone();
    let room = tokio::task::spawn_blocking(move || {
        evict::make_room(&store, want);
        evict::free_space(store.dir()).map_or(true, |free| free >= want)
    });
    room.await.unwrap_or(true)
}

/// The headers of an object's answer, for a body that is the whole object.
fn passthrough_response(body: Body, digest: &Digest, head: &Head) -> Response<Body> {
    let mut resp = Response::new(body);
    let content_type = head
        .content_type
        .clone()
        .unwrap_or_else(|| "application/octet-stream".into());
    insert(&mut resp, header::CONTENT_TYPE, content_type);
    digest_headers(&mut resp, digest);
    if let Some(len) = head.length {
        insert(&mut resp, header::CONTENT_LENGTH, len.to_string());
    }
    resp
}

/// The response for a flight (complete or growing): whole, one range, or 416.
pub(super) fn respond(
    flight: &Arc<Flight>,
    digest: &Digest,
    parts: &request::Parts,
    range: Option<ByteRange>,
) -> Response<Body> {
    let head_only = parts.method == Method::HEAD;
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
    let held = end.and_then(|e| flight.held(start, e));
    let body = if head_only {
        body::empty()
    } else if let Some(data) = held {
        // Already in memory and shared with the cache's copy: no reader task, nothing queued.
        body::full(data)
    } else {
        flight.reader(start, end, body::Budget::of(&parts.extensions))
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let content_type = flight
        .head()
        .and_then(|h| h.content_type.clone())
        .unwrap_or_else(|| "application/octet-stream".into());
    insert(&mut resp, header::CONTENT_TYPE, content_type);
    digest_headers(&mut resp, digest);
    let headers = resp.headers_mut();
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Some(e) = end {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(e - start));
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

/// `Docker-Content-Digest` and `ETag` of an object's answer: both values share one buffer, the
/// digest formatted once (this runs for every cached manifest answered).
pub(super) fn digest_headers(resp: &mut Response<Body>, digest: &Digest) {
    let quoted = bytes::Bytes::from(format!("\"{digest}\""));
    let bare = quoted.slice(1..quoted.len() - 1);
    for (name, value) in [(header::ETAG, quoted), (DOCKER_CONTENT_DIGEST, bare)] {
        if let Ok(v) = HeaderValue::from_maybe_shared(value) {
            resp.headers_mut().insert(name, v);
        }
    }
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
