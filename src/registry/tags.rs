//! Manifests by tag: the one mutable thing in a registry. A tag → digest mapping is served from
//! the cache while fresh, revalidated with an upstream `HEAD` when stale, and served stale when
//! the upstream cannot answer.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{request, Method, Response, StatusCode};
use http_body_util::{BodyExt, Limited};

use super::objects::{digest_headers, header_str, insert, respond};
use super::range::ByteRange;
use super::{bad_gateway, Outcome};
use crate::access::{self, Provenance, Verdict};
use crate::body::{self, text, Body};
use crate::cache::herd::Turn;
use crate::cache::{accept_class, Digest, ObjectMeta, Origin, TagName, TagRecord, MAX_MANIFEST};
use crate::exchange::{client_response, Target};
use crate::exchange::{fetch_request, head_answer, upstream_is_down, DOCKER_CONTENT_DIGEST};
use crate::upstream::How;
use crate::Shared;

/// What a tag request asks for, besides the name.
struct Ask {
    head_only: bool,
    range: Option<ByteRange>,
}

/// What the cache can do for a tag request.
enum Look {
    /// Answer with this (served from the cache, or refused).
    Answer((Response<Body>, Outcome)),
    /// The record is stale: revalidate it upstream.
    Stale(TagRecord),
    /// Nothing usable: ask the upstream for the tag.
    Fetch,
}

/// Answers a GET or HEAD of a manifest by tag.
pub(super) async fn serve(
    parts: &request::Parts,
    target: &Target,
    repo: &str,
    tag: &str,
    shared: &Shared,
) -> (Response<Body>, Outcome) {
    let host = target.authority();
    let accept = accept_class(&parts.headers);
    let name = TagName {
        host,
        repo,
        tag,
        accept: &accept,
    };
    let ask = Ask {
        head_only: parts.method == Method::HEAD,
        range: ByteRange::from_headers(&parts.headers),
    };
    // One upstream request per tag and Accept list at a time (each counts against Docker Hub's
    // pull limit): a caller that cannot be answered from the cache takes the lead, or waits for
    // whoever has it and looks again; it goes upstream only while it holds the lead.
    loop {
        if let Look::Answer(answer) = look(parts, target, &name, &ask, shared).await {
            return answer;
        }
        let key = format!("{}\n{}", name.key(), name.accept);
        let _lead = match shared.cache.tags.turn(key) {
            Turn::Lead(lead) => lead,
            Turn::Follow(leader) => {
                tracing::debug!(tag = %name.tag, "another request is asking the upstream for this tag: waiting for it");
                leader.finished().await;
                continue;
            }
        };
        // Look again with the lead: a leader that finished just before may have filled it.
        return match look(parts, target, &name, &ask, shared).await {
            Look::Answer(answer) => answer,
            Look::Stale(record) => {
                Box::pin(revalidate(parts, target, &name, record, &ask, shared)).await
            }
            Look::Fetch => Box::pin(fetch(parts, target, &name, &ask, shared)).await,
        };
    }
}

/// What the cache holds for the tag, and whether it may answer.
async fn look(
    parts: &request::Parts,
    target: &Target,
    name: &TagName<'_>,
    ask: &Ask,
    shared: &Shared,
) -> Look {
    let ttl = shared.config.tag_ttl_for(name.host, name.repo);
    let Some((record, age)) = shared.cache.tag(name, ttl).await else {
        tracing::debug!(tag = %name.tag, "tag not cached: asking the upstream");
        return Look::Fetch;
    };
    if age >= ttl {
        if !ask.head_only && shared.cache.hit(&record.digest).await.is_none() {
            // Known only from a HEAD: the bytes are needed, so one GET says all a HEAD would.
            tracing::debug!(tag = %name.tag, digest = %record.digest, "tag stale and its manifest not cached: fetching it");
            return Look::Fetch;
        }
        tracing::debug!(tag = %name.tag, digest = %record.digest, age = ?age, ttl = ?ttl, "tag stale: revalidating it with a HEAD");
        return Look::Stale(record);
    }
    tracing::debug!(tag = %name.tag, digest = %record.digest, age = ?age, ttl = ?ttl, "tag fresh in the cache");
    match answer_from(&record, parts, target, name.repo, ask, shared, false).await {
        Some(Ok(resp)) => Look::Answer((resp, Outcome::Hit)),
        Some(Err(refused)) => Look::Answer((refused, Outcome::Refused)),
        None => Look::Fetch,
    }
}

/// A stale tag: one upstream `HEAD` (not counted against Docker Hub's pull limit) decides.
async fn revalidate(
    parts: &request::Parts,
    target: &Target,
    name: &TagName<'_>,
    record: TagRecord,
    ask: &Ask,
    shared: &Shared,
) -> (Response<Body>, Outcome) {
    let up = match fetch_request(target, parts, Method::HEAD) {
        Ok(r) => r,
        Err(reason) => return (text(StatusCode::BAD_REQUEST, reason), Outcome::Refused),
    };
    let repo = name.repo;
    let cause = match shared.client.send(up, How::default()).await {
        Ok(resp) if resp.status() == StatusCode::OK => {
            access::served(shared, parts, target, repo).await;
            let digest = header_str(resp.headers(), DOCKER_CONTENT_DIGEST);
            let same = digest == Some(record.digest.to_string());
            tracing::debug!(tag = %name.tag, cached = %record.digest, upstream = digest.as_deref().unwrap_or("-"), same, "revalidated the tag");
            if same {
                save_tag(shared, name, &record).await;
                match answer_from(&record, parts, target, repo, ask, shared, false).await {
                    Some(Ok(resp)) => return (resp, Outcome::Revalidated),
                    Some(Err(refused)) => return (refused, Outcome::Refused),
                    None => {}
                }
            }
            // Moved, gone from disk, or bytes this origin has not shown us: fetch it anew.
            return fetch(parts, target, name, ask, shared).await;
        }
        Ok(resp) if upstream_is_down(resp.status()) => {
            format!("upstream status {}", resp.status())
        }
        Ok(resp) => {
            let answer = head_answer(resp, &parts.method, target.authority());
            return (answer, Outcome::Forward);
        }
        Err(e) if !e.is_outage() => return (bad_gateway(target, &e), Outcome::Failed),
        Err(e) => e.to_string(),
    };
    tracing::warn!(cause = %cause, tag = %name.tag, "upstream cannot answer; serving the tag stale");
    match answer_from(&record, parts, target, repo, ask, shared, true).await {
        Some(Ok(resp)) => (resp, Outcome::Stale),
        Some(Err(refused)) => (refused, Outcome::Refused),
        None => (
            text(
                StatusCode::BAD_GATEWAY,
                format!("upstream {}: {cause}", target.authority()),
            ),
            Outcome::Failed,
        ),
    }
}

/// Asks the upstream for the tag (`HEAD` stays `HEAD`), records and caches what it answers.
async fn fetch(
    parts: &request::Parts,
    target: &Target,
    name: &TagName<'_>,
    ask: &Ask,
    shared: &Shared,
) -> (Response<Body>, Outcome) {
    let method = if ask.head_only {
        Method::HEAD
    } else {
        Method::GET
    };
    let up = match fetch_request(target, parts, method) {
        Ok(r) => r,
        Err(reason) => return (text(StatusCode::BAD_REQUEST, reason), Outcome::Refused),
    };
    let resp = match shared.client.send(up, How::default()).await {
        Ok(r) if upstream_is_down(r.status()) => {
            let cause = format!("upstream status {}", r.status());
            return stale_any(parts, target, name, ask, shared, cause, client_response(r)).await;
        }
        Ok(r) => r,
        Err(e) if e.is_outage() => {
            let fallback = bad_gateway(target, &e);
            return stale_any(parts, target, name, ask, shared, e.to_string(), fallback).await;
        }
        Err(e) => return (bad_gateway(target, &e), Outcome::Failed),
    };
    if resp.status() != StatusCode::OK {
        return (client_response(resp), Outcome::Forward);
    }
    access::served(shared, parts, target, name.repo).await;
    if ask.head_only {
        if let Some(record) = record_from(resp.headers(), None) {
            save_tag(shared, name, &record).await;
        }
        return (client_response(resp), Outcome::Miss);
    }
    let (head, incoming) = resp.into_parts();
    let read = Limited::new(incoming, MAX_MANIFEST as usize).collect();
    let data = match tokio::time::timeout(shared.config.upstream_timeout, read).await {
        Ok(Ok(c)) => c.to_bytes(),
        Ok(Err(e)) => {
            let reason = format!("manifest body from upstream: {e}");
            return (text(StatusCode::BAD_GATEWAY, reason), Outcome::Failed);
        }
        Err(_) => {
            let reason = "manifest body from upstream timed out";
            return (text(StatusCode::GATEWAY_TIMEOUT, reason), Outcome::Failed);
        }
    };
    let Some(record) = record_from(&head.headers, Some(&data)) else {
        let reason = "upstream manifest does not match its Docker-Content-Digest";
        tracing::warn!(tag = %name.tag, "{reason}");
        return (text(StatusCode::BAD_GATEWAY, reason), Outcome::Failed);
    };
    let origin = Origin::new(target.authority(), name.repo);
    store_manifest(shared, &record, &data, &origin).await;
    save_tag(shared, name, &record).await;
    (manifest_response(&record, data), Outcome::Miss)
}

/// The upstream cannot answer and this client's Accept class has no record: serve a record
/// fetched for another class whose media type this client takes, else `fallback`.
async fn stale_any(
    parts: &request::Parts,
    target: &Target,
    name: &TagName<'_>,
    ask: &Ask,
    shared: &Shared,
    cause: String,
    fallback: Response<Body>,
) -> (Response<Body>, Outcome) {
    let records = shared
        .cache
        .store
        .tag_records(name)
        .await
        .unwrap_or_default();
    for record in records
        .iter()
        .filter(|r| accepts(&parts.headers, &r.content_type))
    {
        match answer_from(record, parts, target, name.repo, ask, shared, true).await {
            Some(Ok(resp)) => {
                tracing::warn!(cause = %cause, tag = %name.tag, "upstream cannot answer; serving the tag stale");
                return (resp, Outcome::Stale);
            }
            Some(Err(refused)) => return (refused, Outcome::Refused),
            None => {}
        }
    }
    (fallback, Outcome::Forward)
}

/// Whether the client's `Accept` admits `media_type` (no `Accept`, or `*/*`, admits anything).
fn accepts(headers: &HeaderMap, media_type: &str) -> bool {
    let class = accept_class(headers);
    class == "*"
        || class
            .split(',')
            .any(|t| t == "*/*" || t.eq_ignore_ascii_case(media_type))
}

/// The record an upstream answer describes; with the body, the digest is verified (or computed).
fn record_from(headers: &HeaderMap, data: Option<&Bytes>) -> Option<TagRecord> {
    if headers.contains_key(header::CONTENT_ENCODING) {
        return None; // encoded bytes are not the manifest
    }
    let content_type = header_str(headers, header::CONTENT_TYPE)?;
    let announced = header_str(headers, DOCKER_CONTENT_DIGEST)
        .map(|d| Digest::parse(&d))
        .transpose()
        .ok()?;
    let (digest, size) = match (data, announced) {
        (Some(data), Some(d)) => {
            let mut h = d.hasher();
            h.update(data);
            (h.matches(&d).then_some(d)?, data.len() as u64)
        }
        (Some(data), None) => (Digest::sha256_of(data), data.len() as u64),
        (None, Some(d)) => (
            d,
            header_str(headers, header::CONTENT_LENGTH)?.parse().ok()?,
        ),
        (None, None) => return None,
    };
    Some(TagRecord {
        digest,
        content_type,
        size,
    })
}

async fn store_manifest(shared: &Shared, record: &TagRecord, data: &[u8], origin: &Origin) {
    let meta = ObjectMeta {
        content_type: Some(record.content_type.clone()),
        size: record.size,
    };
    shared
        .metrics
        .bytes_from_upstream
        .fetch_add(record.size, std::sync::atomic::Ordering::Relaxed);
    let cache = &shared.cache;
    cache
        .put_verified(&record.digest, data, &meta, origin)
        .await;
}

async fn save_tag(shared: &Shared, name: &TagName<'_>, record: &TagRecord) {
    shared.cache.set_tag(name, record).await;
}

/// The cached answer for `record` if this client may have it (`Ok`), the refusal (`Err`), or
/// `None` when the manifest must come from the upstream: not on disk, or bytes this origin has
/// not shown us itself (another upstream's `Docker-Content-Digest` unlocks nothing). A `HEAD`
/// holds only the origin's own claims about its tag. `stale` marks an answer given while the
/// upstream cannot be asked.
async fn answer_from(
    record: &TagRecord,
    parts: &request::Parts,
    target: &Target,
    repo: &str,
    ask: &Ask,
    shared: &Shared,
    stale: bool,
) -> Option<Result<Response<Body>, Response<Body>>> {
    // A HEAD needs neither the bytes nor where they came from: no origin is built for it.
    let (hit, prov) = match ask.head_only {
        true => (None, Provenance::OWN),
        false => {
            let origin = Origin::new(target.authority(), repo);
            let flight = manifest_hit(&record.digest, &origin, shared).await?;
            let prov = Provenance::of(shared, &record.digest, None, &origin).await;
            (Some(flight), prov)
        }
    };
    match access::allowed(shared, parts, target, repo, prov, stale).await {
        Verdict::Serve => {}
        Verdict::Refuse(refused) => return Some(Err(refused)),
        Verdict::Miss => return None,
    }
    let mut resp = match hit {
        None => {
            let mut resp = manifest_response(record, Bytes::new());
            *resp.body_mut() = body::empty();
            resp
        }
        Some(flight) => {
            let mut resp = respond(&flight, &record.digest, parts, ask.range);
            // The manifest's media type as recorded for this tag (the object's own is the same).
            insert(&mut resp, header::CONTENT_TYPE, record.content_type.clone());
            resp
        }
    };
    if stale {
        insert(
            &mut resp,
            header::WARNING,
            "110 regproxy \"Response is Stale\"".into(),
        );
    }
    Some(Ok(resp))
}

/// The manifest `digest` from the disk, or else from the fleet's shared store.
async fn manifest_hit(
    digest: &Digest,
    origin: &Origin,
    shared: &Shared,
) -> Option<std::sync::Arc<crate::cache::Flight>> {
    let cache = &shared.cache;
    match cache.hit(digest).await {
        Some(flight) => Some(flight),
        // Boxed: the shared tier's request is a large future that hits need not carry.
        None => Box::pin(cache.pull_small(digest, origin, MAX_MANIFEST)).await,
    }
}

fn manifest_response(record: &TagRecord, data: Bytes) -> Response<Body> {
    let mut resp = Response::new(body::full(data));
    insert(&mut resp, header::CONTENT_TYPE, record.content_type.clone());
    digest_headers(&mut resp, &record.digest);
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(record.size));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_negotiation() {
        let oci = "application/vnd.oci.image.index.v1+json";
        let mut h = HeaderMap::new();
        assert!(accepts(&h, oci));
        h.append(
            header::ACCEPT,
            "application/vnd.docker.distribution.manifest.v2+json"
                .parse()
                .unwrap(),
        );
        assert!(!accepts(&h, oci));
        h.append(
            header::ACCEPT,
            format!("{oci}; q=0.5, text/plain").parse().unwrap(),
        );
        assert!(accepts(&h, oci));
    }
}
