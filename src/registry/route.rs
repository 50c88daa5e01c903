//! Classification of distribution API requests.

use http::Method;

use crate::cache::Digest;

/// What a request inside an intercepted connection asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /v2/` or `HEAD /v2/`: the API version check.
    Ping,
    /// GET or HEAD of a blob by digest.
    Blob { repo: String, digest: Digest },
    /// GET or HEAD of a manifest by digest.
    ManifestByDigest { repo: String, digest: Digest },
    /// GET or HEAD of a manifest by tag.
    ManifestByTag { repo: String, tag: String },
    /// Anything else: pushes, catalog, tag lists, referrers, token endpoints.
    Other,
    /// A digest reference that can never be valid.
    Invalid(String),
}

impl Route {
    /// Classifies `method` and `path`.
    pub fn classify(method: &Method, path: &str) -> Route {
        if method != Method::GET && method != Method::HEAD {
            return Route::Other;
        }
        if path == "/v2/" || path == "/v2" {
            return Route::Ping;
        }
        let Some(rest) = path.strip_prefix("/v2/") else {
            return Route::Other;
        };
        for (marker, is_blob) in [("/blobs/", true), ("/manifests/", false)] {
            let Some(at) = rest.rfind(marker) else {
                continue;
            };
            let (repo, reference) = (&rest[..at], &rest[at + marker.len()..]);
            if repo.is_empty() || reference.is_empty() || reference.contains('/') {
                // Not this marker: `blobs` may be a component of a repository whose manifest
                // is asked for (`/v2/a/blobs/b/manifests/latest`).
                continue;
            }
            let (repo, reference) = (repo.to_owned(), reference.to_owned());
            return match (reference.contains(':'), is_blob) {
                (true, _) => match Digest::parse(&reference) {
                    Err(reason) => Route::Invalid(reason),
                    Ok(digest) if is_blob => Route::Blob { repo, digest },
                    Ok(digest) => Route::ManifestByDigest { repo, digest },
                },
                (false, true) => Route::Other, // e.g. /blobs/uploads/ without a digest
                (false, false) => Route::ManifestByTag {
                    repo,
                    tag: reference,
                },
            };
        }
        Route::Other
    }

    /// Whether redirects are followed by the proxy (blob downloads go to CDNs and object stores).
    pub fn follows_redirects(&self) -> bool {
        matches!(self, Route::Blob { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(Route::classify(&Method::GET, "/v2/"), Route::Ping);
        assert_eq!(
            Route::classify(&Method::HEAD, &format!("/v2/library/busybox/blobs/{d}")),
            Route::Blob {
                repo: "library/busybox".into(),
                digest: Digest::parse(&d).unwrap()
            }
        );
        assert_eq!(
            Route::classify(&Method::GET, "/v2/a/b/c/manifests/latest"),
            Route::ManifestByTag {
                repo: "a/b/c".into(),
                tag: "latest".into()
            }
        );
        assert_eq!(
            Route::classify(&Method::POST, "/v2/a/blobs/uploads/"),
            Route::Other
        );
        assert_eq!(
            Route::classify(&Method::GET, "/v2/a/tags/list"),
            Route::Other
        );
        assert!(matches!(
            Route::classify(&Method::GET, "/v2/a/blobs/md5:abc"),
            Route::Invalid(_)
        ));
        assert!(matches!(
            Route::classify(&Method::GET, "/v2/a/blobs/sha256:abc"),
            Route::Invalid(_)
        ));
    }

    #[test]
    fn a_repository_with_a_blobs_component_has_manifests() {
        // These were `Other` (forwarded, never cached) or a missed `Invalid`: the blob marker
        // matched first and its reference held a '/'.
        let d = format!("sha256:{}", "0a".repeat(32));
        assert_eq!(
            Route::classify(&Method::GET, "/v2/a/blobs/manifests/latest"),
            Route::ManifestByTag {
                repo: "a/blobs".into(),
                tag: "latest".into()
            }
        );
        assert_eq!(
            Route::classify(&Method::HEAD, &format!("/v2/a/blobs/manifests/{d}")),
            Route::ManifestByDigest {
                repo: "a/blobs".into(),
                digest: Digest::parse(&d).unwrap()
            }
        );
        assert!(matches!(
            Route::classify(&Method::GET, "/v2/a/blobs/manifests/sha256:"),
            Route::Invalid(_)
        ));
        assert_eq!(
            Route::classify(&Method::GET, "/v2/a/blobs/uploads/1234"),
            Route::Other
        );
    }
}
