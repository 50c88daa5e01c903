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
    /// A digest reference that can never be valid, or a repository name with an empty, `.` or
    /// `..` component.
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
        // The reference is the last component and the marker the one before it, so one search
        // for the last '/' finds both (`blobs` may also be a component of a repository whose
        // manifest is asked for: `/v2/a/blobs/b/manifests/latest`).
        let Some((before, reference)) = rest.rsplit_once('/') else {
            return Route::Other;
        };
        for (marker, is_blob) in [("/blobs", true), ("/manifests", false)] {
            let Some(repo) = before.strip_suffix(marker) else {
                continue;
            };
            if repo.is_empty() || reference.is_empty() {
                continue;
            }
            if !crate::upstream::client::plain_repository(repo) {
                return Route::Invalid(format!(
                    "repository name {repo:?} has an empty, '.' or '..' component"
                ));
            }
            let (repo, reference) = (repo.to_owned(), reference.to_owned());
            return match (reference.contains(':'), is_blob) {
                (true, _) => match Digest::parse(&reference) {
                    Err(reason) => Route::Invalid(reason.to_string()),
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
        assert!(matches!(
            Route::classify(&Method::GET, "/v2/org-a/../org-b/manifests/latest"),
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

    use proptest::prelude::*;

    /// A repository name as the distribution spec allows it, including components that look like
    /// the API's own path words.
    fn repo() -> impl Strategy<Value = String> {
        let component = prop_oneof![
            4 => "[a-z0-9]{1,6}([._-][a-z0-9]{1,4}){0,2}",
            1 => prop::sample::select(vec!["blobs", "manifests", "v2", "uploads", "tags", "sha256"])
                .prop_map(str::to_owned),
        ];
        prop::collection::vec(component, 1..5).prop_map(|c| c.join("/"))
    }

    fn digest() -> impl Strategy<Value = Digest> {
        prop_oneof![
            "[0-9a-f]{64}".prop_map(|h| format!("sha256:{h}")),
            "[0-9a-f]{128}".prop_map(|h| format!("sha512:{h}")),
        ]
        .prop_map(|s| Digest::parse(&s).unwrap())
    }

    fn tag() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_][A-Za-z0-9._-]{0,20}"
    }

    fn get_or_head() -> impl Strategy<Value = Method> {
        prop_oneof![Just(Method::GET), Just(Method::HEAD)]
    }

    /// Paths made of the pieces the classifier looks for, in any order, plus noise.
    fn path_like() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just(String::new()),
            prop::sample::select(vec![
                "v2",
                "blobs",
                "manifests",
                "uploads",
                "..",
                ".",
                "sha256:abc",
                "md5:00",
                ":",
            ])
            .prop_map(str::to_owned),
            "[0-9a-f]{64}".prop_map(|h| format!("sha256:{h}")),
            "[a-zA-Z0-9._:%-]{0,8}",
            any::<String>(),
        ];
        (
            prop::sample::select(vec!["/v2/", "/v2", "/", "", "v2/"]),
            prop::collection::vec(piece, 0..7),
            any::<bool>(),
        )
            .prop_map(|(start, pieces, slash)| {
                format!(
                    "{start}{}{}",
                    pieces.join("/"),
                    if slash { "/" } else { "" }
                )
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Total on any input, and what it finds is exactly what the path says: the repository is
        /// the text between `/v2/` and the marker, verbatim (never normalized), and never empty.
        #[test]
        fn classify_is_total_and_routes_rebuild_the_path(
            method in "[A-Z]{1,8}",
            path in prop_oneof![path_like(), any::<String>()],
        ) {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let route = Route::classify(&method, &path);
            let cacheable = method == Method::GET || method == Method::HEAD;
            match &route {
                Route::Other => {}
                Route::Ping => prop_assert!(cacheable && (path == "/v2/" || path == "/v2")),
                Route::Invalid(_) => prop_assert!(cacheable),
                Route::Blob { repo, digest } => {
                    prop_assert!(cacheable && !repo.is_empty());
                    prop_assert_eq!(format!("/v2/{repo}/blobs/{digest}"), path.clone());
                }
                Route::ManifestByDigest { repo, digest } => {
                    prop_assert!(cacheable && !repo.is_empty());
                    prop_assert_eq!(format!("/v2/{repo}/manifests/{digest}"), path.clone());
                }
                Route::ManifestByTag { repo, tag } => {
                    prop_assert!(cacheable && !repo.is_empty() && !tag.is_empty());
                    prop_assert!(!tag.contains('/') && !tag.contains(':'), "{:?}", tag);
                    prop_assert_eq!(format!("/v2/{repo}/manifests/{tag}"), path.clone());
                }
            }
        }

        #[test]
        fn valid_requests_classify_to_their_repo_and_reference(
            method in get_or_head(),
            repo in repo(),
            digest in digest(),
            tag in tag(),
        ) {
            prop_assert_eq!(
                Route::classify(&method, &format!("/v2/{repo}/blobs/{digest}")),
                Route::Blob { repo: repo.clone(), digest: digest.clone() }
            );
            prop_assert_eq!(
                Route::classify(&method, &format!("/v2/{repo}/manifests/{digest}")),
                Route::ManifestByDigest { repo: repo.clone(), digest }
            );
            prop_assert_eq!(
                Route::classify(&method, &format!("/v2/{repo}/manifests/{tag}")),
                Route::ManifestByTag { repo, tag }
            );
        }

        #[test]
        fn other_methods_are_never_cached(
            method in prop::sample::select(vec![
                Method::POST, Method::PUT, Method::PATCH, Method::DELETE, Method::OPTIONS,
            ]),
            repo in repo(),
            digest in digest(),
        ) {
            for path in [
                "/v2/".to_owned(),
                format!("/v2/{repo}/blobs/{digest}"),
                format!("/v2/{repo}/manifests/{digest}"),
                format!("/v2/{repo}/manifests/latest"),
            ] {
                prop_assert_eq!(Route::classify(&method, &path), Route::Other);
            }
        }

        /// A reference with a `:` is a digest: one that does not parse is refused, never taken as
        /// a tag.
        #[test]
        fn malformed_digests_are_invalid(
            method in get_or_head(),
            repo in repo(),
            marker in prop::sample::select(vec!["blobs", "manifests"]),
            alg in "sha256|sha512|md5|SHA256|",
            hex in "[0-9a-fA-Z]{0,70}",
        ) {
            let reference = format!("{alg}:{hex}");
            prop_assume!(Digest::parse(&reference).is_err());
            let route = Route::classify(&method, &format!("/v2/{repo}/{marker}/{reference}"));
            prop_assert!(matches!(route, Route::Invalid(_)), "{:?}", route);
        }

        /// Blob paths without a digest (upload sessions) or with an empty part are not cached.
        #[test]
        fn incomplete_blob_paths_are_other(
            method in get_or_head(),
            repo in repo(),
            rest in prop::sample::select(vec!["", "uploads/", "uploads/abc", "x/y"]),
        ) {
            prop_assert_eq!(Route::classify(&method, &format!("/v2/{repo}/blobs/{rest}")), Route::Other);
            prop_assert_eq!(Route::classify(&method, &format!("/v2//blobs/{rest}")), Route::Other);
        }
    }
}
