//! Manifests by tag: the one mutable thing in a registry. A tag → digest mapping is served from
//! the cache while fresh, revalidated with an upstream `HEAD` when stale, and served stale when
//! the upstream cannot answer.

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{request, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::objects::{header_str, insert};
use super::{bad_gateway, fetch_request, upstream_is_down, Outcome, DOCKER_CONTENT_DIGEST};
use crate::body::{self, text, Body};
use crate::cache::{Digest, ObjectMeta, TagName, TagRecord};
use crate::proxy::{client_response, Target};
use crate::Shared;

/// Manifests above this size are not accepted (the OCI spec lets registries refuse them too).
const MAX_MANIFEST: usize = 4 << 20;

/// Answers a GET or HEAD of a manifest by tag.
pub(super) async fn serve(
    req: Request<Incoming>,
    target: &Target,
    repo: &str,
    tag: &str,
    shared: &Shared,
) -> (Response<Body>, Outcome) {
    let host = target.authority();
    let name = TagName {
        host: &host,
        repo,
        tag,
    };
    let head_only = req.method() == Method::HEAD;
    let cached = shared.cache.store.tag(&name).await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "tag lookup failed; treating as a miss");
        None
    });
    // A client that cannot take the cached media type gets what the upstream gives it.
    let cached = cached.filter(|(r, _)| accepts(req.headers(), &r.content_type));
    let (parts, _) = req.into_parts();
    let Some((record, age)) = cached else {
        return fetch(&parts, target, &name, head_only, shared).await;
    };
    if !head_only && !has_manifest(shared, &record).await {
        // Known only from a HEAD: the bytes are needed, so one GET says all a HEAD would.
        return fetch(&parts, target, &name, head_only, shared).await;
    }
    if age < shared.config.tag_ttl_for(&host, repo) {
        if let Some(resp) = cached_response(&record, head_only, shared, false).await {
            return (resp, "HIT");
        }
        return fetch(&parts, target, &name, head_only, shared).await;
    }
    revalidate(&parts, target, &name, record, head_only, shared).await
}

/// A stale tag: one upstream `HEAD` (not counted against Docker Hub's pull limit) decides.
async fn revalidate(
    parts: &request::Parts,
    target: &Target,
    name: &TagName<'_>,
    record: TagRecord,
    head_only: bool,
    shared: &Shared,
) -> (Response<Body>, Outcome) {
    let up = match fetch_request(target, parts, Method::HEAD) {
        Ok(r) => r,
        Err(reason) => return (text(StatusCode::BAD_REQUEST, reason), "FORWARD"),
    };
    let cause = match shared.upstream.send(up).await {
        Ok(resp) if resp.status() == StatusCode::OK => {
            let digest = header_str(resp.headers(), DOCKER_CONTENT_DIGEST);
            if digest.as_deref() == Some(record.digest.as_str()) {
                save_tag(shared, name, &record).await;
                if let Some(resp) = cached_response(&record, head_only, shared, false).await {
                    return (resp, "REVALIDATED");
                }
            }
            // Moved (or the manifest is gone from disk): fetch it anew.
            return fetch(parts, target, name, head_only, shared).await;
        }
        Ok(resp) if upstream_is_down(resp.status()) => format!("upstream status {}", resp.status()),
        Ok(resp) => return (client_response(resp), "FORWARD"),
        Err(e) if !e.is_unreachable() => return (bad_gateway(target, &e), "FORWARD"),
        Err(e) => e.to_string(),
    };
    tracing::warn!(cause = %cause, tag = %name.tag, "upstream cannot answer; serving the tag stale");
    match cached_response(&record, head_only, shared, true).await {
        Some(resp) => (resp, "STALE"),
        None => (
            text(
                StatusCode::BAD_GATEWAY,
                format!("upstream {}: {cause}", target.authority()),
            ),
            "FORWARD",
        ),
    }
}

/// Asks the upstream for the tag (`HEAD` stays `HEAD`), records and caches what it answers.
async fn fetch(
    parts: &request::Parts,
    target: &Target,
    name: &TagName<'_>,
    head_only: bool,
    shared: &Shared,
) -> (Response<Body>, Outcome) {
    let method = if head_only { Method::HEAD } else { Method::GET };
    let up = match fetch_request(target, parts, method) {
        Ok(r) => r,
        Err(reason) => return (text(StatusCode::BAD_REQUEST, reason), "FORWARD"),
    };
    let resp = match shared.upstream.send(up).await {
        Ok(r) => r,
        Err(e) => return (bad_gateway(target, &e), "FORWARD"),
    };
    if resp.status() != StatusCode::OK {
        return (client_response(resp), "FORWARD");
    }
    if head_only {
        if let Some(record) = record_from(resp.headers(), None) {
            save_tag(shared, name, &record).await;
        }
        return (client_response(resp), "MISS");
    }
    let (head, incoming) = resp.into_parts();
    let data = match Limited::new(incoming, MAX_MANIFEST).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            let reason = format!("manifest body from upstream: {e}");
            return (text(StatusCode::BAD_GATEWAY, reason), "FORWARD");
        }
    };
    let Some(record) = record_from(&head.headers, Some(&data)) else {
        let reason = "upstream manifest does not match its Docker-Content-Digest";
        tracing::warn!(tag = %name.tag, "{reason}");
        return (text(StatusCode::BAD_GATEWAY, reason), "FORWARD");
    };
    store_manifest(shared, &record, &data).await;
    save_tag(shared, name, &record).await;
    (manifest_response(&record, data, false), "MISS")
}

/// The record an upstream answer describes; with the body, the digest is verified (or computed).
fn record_from(headers: &HeaderMap, data: Option<&Bytes>) -> Option<TagRecord> {
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
        digest: digest.to_string(),
        content_type,
        size,
    })
}

async fn store_manifest(shared: &Shared, record: &TagRecord, data: &[u8]) {
    let Ok(digest) = Digest::parse(&record.digest) else {
        return;
    };
    let meta = ObjectMeta {
        content_type: Some(record.content_type.clone()),
        size: record.size,
    };
    shared
        .metrics
        .bytes_from_upstream
        .fetch_add(record.size, std::sync::atomic::Ordering::Relaxed);
    if let Err(e) = shared.cache.store.put(&digest, data, &meta).await {
        tracing::warn!(error = %e, "cannot cache a manifest");
    }
}

async fn save_tag(shared: &Shared, name: &TagName<'_>, record: &TagRecord) {
    if let Err(e) = shared.cache.store.set_tag(name, record).await {
        tracing::warn!(error = %e, "cannot record a tag");
    }
}

async fn has_manifest(shared: &Shared, record: &TagRecord) -> bool {
    match Digest::parse(&record.digest) {
        Ok(d) => matches!(shared.cache.store.object(&d).await, Ok(Some(_))),
        Err(_) => false,
    }
}

/// The cached manifest for `record` (headers only for `HEAD`), if its bytes are on disk.
async fn cached_response(
    record: &TagRecord,
    head_only: bool,
    shared: &Shared,
    stale: bool,
) -> Option<Response<Body>> {
    let data = if head_only {
        Bytes::new()
    } else {
        let digest = Digest::parse(&record.digest).ok()?;
        let entry = shared.cache.store.object(&digest).await.ok()??;
        Bytes::from(tokio::fs::read(&entry.path).await.ok()?)
    };
    let mut resp = manifest_response(record, data, head_only);
    if stale {
        insert(
            &mut resp,
            header::WARNING,
            "110 regproxy \"Response is Stale\"".into(),
        );
    }
    Some(resp)
}

fn manifest_response(record: &TagRecord, data: Bytes, head_only: bool) -> Response<Body> {
    let body = if head_only {
        body::empty()
    } else {
        body::full(data)
    };
    let mut resp = Response::new(body);
    insert(&mut resp, header::CONTENT_TYPE, record.content_type.clone());
    insert(&mut resp, DOCKER_CONTENT_DIGEST, record.digest.clone());
    insert(&mut resp, header::ETAG, format!("\"{}\"", record.digest));
    insert(&mut resp, header::CONTENT_LENGTH, record.size.to_string());
    resp
}

/// Whether the client's `Accept` admits `media_type` (no `Accept`, or `*/*`, admits anything).
fn accepts(headers: &HeaderMap, media_type: &str) -> bool {
    let mut offered = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.split(';').next().unwrap_or("").trim())
        .filter(|v| !v.is_empty())
        .peekable();
    if offered.peek().is_none() {
        return true;
    }
    offered.any(|v| v == "*/*" || v.eq_ignore_ascii_case(media_type))
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
