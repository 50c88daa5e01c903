//! `regproxy cache prefetch IMAGE…`: warms the cache through the very code that serves clients
//! (the registry router, single flight, verification), as a client would pull: tag, index,
//! the chosen platforms' manifests, configs and layers.

use std::collections::BTreeSet;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{request, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;

use crate::body::Body;
use crate::body::Outcome;
use crate::dockerhub;
use crate::exchange::Target;
use crate::manifest::{Platform, Ref, Refs};
use crate::registry::route::Route;
use crate::Shared;

/// Every manifest type prefetch understands, as its `Accept`.
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// An image reference split for the registry API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The registry host (and port) the API is served on.
    pub host: String,
    /// Repository path.
    pub repo: String,
    /// Tag or digest.
    pub reference: String,
}

/// Parses `[HOST[:PORT]/]REPO[:TAG|@DIGEST]` the way docker does: no host means Docker Hub,
/// whose API lives on registry-1.docker.io and whose single names live under `library/`.
pub fn parse_image(s: &str) -> Result<ImageRef, PrefetchError> {
    let (name, reference) = match s.split_once('@') {
        Some((n, d)) => (n, d.to_owned()),
        None => match s.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, t.to_owned()),
            _ => (s, "latest".to_owned()),
        },
    };
    let (host, repo) = match name.split_once('/') {
        Some((h, r)) if h.contains('.') || h.contains(':') || h == "localhost" => {
            (h.to_owned(), r.to_owned())
        }
        _ => (dockerhub::NAME.to_owned(), name.to_owned()),
    };
    let host = dockerhub::api_host(&host).to_owned();
    let repo = if host == dockerhub::API_HOST {
        dockerhub::qualified(&repo)
    } else {
        repo
    };
    if repo.is_empty() || reference.is_empty() {
        return Err(PrefetchError::NotAnImage(s.to_owned()));
    }
    Ok(ImageRef {
        host,
        repo,
        reference,
    })
}

/// Which platforms of a multi-platform image to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Platforms {
    /// Every one in the index.
    All,
    /// `os/arch[/variant]`.
    One(String),
}

impl Platforms {
    /// This machine's platform, as registries name it.
    pub fn native() -> Platforms {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            other => other,
        };
        Platforms::One(format!("linux/{arch}"))
    }

    fn wants(&self, platform: &Platform) -> bool {
        let Platforms::One(want) = self else {
            return true;
        };
        let have = format!("{}/{}", platform.os, platform.architecture);
        match &platform.variant {
            Some(variant) => want == &have || *want == format!("{have}/{variant}"),
            None => want == &have,
        }
    }
}

/// What prefetch tells its caller as it goes.
#[derive(Debug, Clone)]
pub enum Event {
    /// An object is about to be fetched (size from the manifest, when known).
    Start { digest: String, size: Option<u64> },
    /// Bytes of it arrived.
    Bytes { digest: String, n: u64 },
    /// It is in the cache; `outcome` says whether it already was (HIT) or was fetched (MISS).
    Done {
        digest: String,
        outcome: &'static str,
    },
}

/// Why prefetching an image failed.
#[derive(Debug, thiserror::Error)]
pub enum PrefetchError {
    /// The image reference does not parse.
    #[error("{0:?} is not an image reference (HOST/REPO:TAG)")]
    NotAnImage(String),
    /// The reference does not make a valid request.
    #[error("{0}")]
    Reference(String),
    /// The registry answered something other than the object.
    #[error("{what}: {status} {body}")]
    Status {
        what: String,
        status: StatusCode,
        body: String,
    },
    /// Fetching failed on the way.
    #[error("{0}")]
    Other(String),
}

/// Fetches `image` into the cache; returns the digests it holds now.
pub async fn prefetch(
    shared: &Arc<Shared>,
    image: &str,
    platforms: &Platforms,
    events: &(dyn Fn(Event) + Sync),
) -> Result<BTreeSet<String>, PrefetchError> {
    let image = parse_image(image)?;
    let (host, port) = match image.host.rsplit_once(':') {
        Some((h, p)) => (h.to_owned(), p.parse().unwrap_or(443)),
        None => (image.host.clone(), 443),
    };
    let mut client = Client {
        shared: shared.clone(),
        target: Target::new(host, port),
        repo: image.repo.clone(),
        token: None,
    };
    let mut done = BTreeSet::new();
    let top = client
        .fetch("manifests", &image.reference, None, events)
        .await?;
    done.insert(top.digest.clone());
    let mut manifests = vec![top];
    if let Some(Refs::Index(entries)) = &manifests[0].refs {
        let chosen: Vec<Ref> = entries
            .iter()
            .filter(|e| e.platform.as_ref().map_or(true, |p| platforms.wants(p)))
            .cloned()
            .collect();
        if chosen.is_empty() {
            return Err(PrefetchError::Other(format!(
                "no manifest for {platforms:?} in the index"
            )));
        }
        for entry in chosen {
            let size = Some(entry.size);
            let m = client
                .fetch("manifests", &entry.digest, size, events)
                .await?;
            done.insert(m.digest.clone());
            manifests.push(m);
        }
    }
    for m in &manifests {
        let Some(Refs::Manifest(blobs)) = &m.refs else {
            continue;
        };
        for blob in blobs {
            if done.contains(&blob.digest) {
                continue;
            }
            client
                .fetch("blobs", &blob.digest, Some(blob.size), events)
                .await?;
            done.insert(blob.digest.clone());
        }
    }
    Ok(done)
}

struct Fetched {
    digest: String,
    /// What it refers to, for a manifest or an index.
    refs: Option<Refs>,
}

/// Requests as a client would make them, with an anonymous token when the registry asks.
struct Client {
    shared: Arc<Shared>,
    target: Target,
    repo: String,
    token: Option<HeaderValue>,
}

impl Client {
    /// GETs `/v2/REPO/KIND/REFERENCE` through the router, draining the body into the cache.
    async fn fetch(
        &mut self,
        kind: &str,
        reference: &str,
        size: Option<u64>,
        events: &(dyn Fn(Event) + Sync),
    ) -> Result<Fetched, PrefetchError> {
        let path = format!("/v2/{}/{kind}/{reference}", self.repo);
        events(Event::Start {
            digest: reference.to_owned(),
            size,
        });
        let (mut resp, mut outcome) = self.get(&path).await?;
        if resp.status() == StatusCode::UNAUTHORIZED && self.token.is_none() {
            self.token = Some(self.authenticate(&resp).await?);
            (resp, outcome) = self.get(&path).await?;
        }
        let status = resp.status();
        let digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .unwrap_or(reference)
            .to_owned();
        let is_manifest = kind == "manifests";
        let mut body = resp.into_body();
        let mut kept = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| PrefetchError::Other(format!("{path}: {e}")))?;
            if let Ok(data) = frame.into_data() {
                events(Event::Bytes {
                    digest: reference.to_owned(),
                    n: data.len() as u64,
                });
                if is_manifest || !status.is_success() {
                    kept.extend_from_slice(&data);
                }
            }
        }
        if status != StatusCode::OK {
            return Err(PrefetchError::Status {
                what: format!("{}{path}", self.target.authority()),
                status,
                body: String::from_utf8_lossy(&kept).chars().take(200).collect(),
            });
        }
        events(Event::Done {
            digest: reference.to_owned(),
            outcome: if matches!(outcome, Outcome::Hit | Outcome::Revalidated) {
                "HIT"
            } else {
                "MISS"
            },
        });
        let refs = match is_manifest {
            true => Some(Refs::of(&kept).ok_or_else(|| {
                PrefetchError::Other(format!("{path}: not a manifest or an index"))
            })?),
            false => None,
        };
        Ok(Fetched { digest, refs })
    }

    async fn get(&self, path: &str) -> Result<(Response<Body>, Outcome), PrefetchError> {
        let parts = self.parts(path)?;
        let route = Route::classify(&parts.method, parts.uri.path());
        if let Route::Invalid(reason) = route {
            return Err(PrefetchError::Reference(reason));
        }
        Ok(crate::registry::serve(&parts, route, &self.target, &self.shared).await)
    }

    fn parts(&self, path: &str) -> Result<request::Parts, PrefetchError> {
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(path)
            .header(header::ACCEPT, ACCEPT)
            .body(())
            .map_err(|e| PrefetchError::Reference(e.to_string()))?;
        if let Some(token) = &self.token {
            req.headers_mut()
                .insert(header::AUTHORIZATION, token.clone());
        }
        Ok(req.into_parts().0)
    }

    /// Answers a 401's bearer challenge with an anonymous pull token.
    async fn authenticate(&self, resp: &Response<Body>) -> Result<HeaderValue, PrefetchError> {
        let token = self
            .shared
            .client
            .anonymous_token(resp.headers(), &self.repo);
        token.await.map_err(|e| {
            let host = self.target.authority();
            PrefetchError::Other(format!("{host}: {e}; prefetch pulls anonymously"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_like_docker() {
        let r = parse_image("alpine").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repo.as_str(), r.reference.as_str()),
            ("registry-1.docker.io", "library/alpine", "latest")
        );
        let r = parse_image("docker.io/grafana/grafana:11").unwrap();
        assert_eq!(
            (r.repo.as_str(), r.reference.as_str()),
            ("grafana/grafana", "11")
        );
        let r = parse_image("registry.test:5000/test/img:v1").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repo.as_str(), r.reference.as_str()),
            ("registry.test:5000", "test/img", "v1")
        );
        let d = format!("sha256:{}", "a".repeat(64));
        let r = parse_image(&format!("ghcr.io/o/r@{d}")).unwrap();
        assert_eq!(r.reference, d);
        let r = parse_image("localhost/x").unwrap();
        assert_eq!(
            (r.host.as_str(), r.reference.as_str()),
            ("localhost", "latest")
        );
    }

    #[test]
    fn platform_selection() {
        let p = Platform {
            os: "linux".into(),
            architecture: "arm64".into(),
            variant: Some("v8".into()),
        };
        assert!(Platforms::One("linux/arm64".into()).wants(&p));
        assert!(Platforms::One("linux/arm64/v8".into()).wants(&p));
        assert!(!Platforms::One("linux/amd64".into()).wants(&p));
        assert!(Platforms::All.wants(&p));
    }
}
