//! `regproxy ratelimit`: asks a registry (Docker Hub by default) how many pulls are left, with a
//! manifest `HEAD`, which Docker Hub does not count against the limit; exit status for checks.

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Request, StatusCode};

use crate::body;
use crate::metrics::{parse_ratelimit, RateLimit};
use crate::upstream::auth::{fetch_token, parse_challenge};
use crate::Shared;

/// Docker's documented image for checking the limit.
pub const DOCKER_HUB_PROBE: &str = "ratelimitpreview/test:latest";

/// What the registry said.
#[derive(Debug, Clone)]
pub struct Report {
    /// The limit state, when the registry sent the headers.
    pub limit: Option<RateLimit>,
    /// `docker-ratelimit-source` (the IP or account the limit applies to).
    pub source: Option<String>,
}

/// Nagios-style exit status: 0 fine, 1 at or below `warn`, 2 at or below `critical`, 3 unknown.
pub fn status(report: &Report, warn: Option<u64>, critical: Option<u64>) -> i32 {
    let Some(rl) = report.limit else { return 3 };
    if critical.is_some_and(|c| rl.remaining <= c) {
        2
    } else if warn.is_some_and(|w| rl.remaining <= w) {
        1
    } else {
        0
    }
}

/// Sends the `HEAD` for `repo:tag` on `host` (with injected credentials, else an anonymous
/// token when challenged) and reads the rate-limit headers.
pub async fn check(shared: &Arc<Shared>, host: &str, image: &str) -> Result<Report, String> {
    let (repo, tag) = image.rsplit_once(':').unwrap_or((image, "latest"));
    let uri = format!("https://{host}/v2/{repo}/manifests/{tag}");
    let request = |auth: Option<&str>| -> Result<Request<body::Body>, String> {
        let mut req = Request::head(&uri)
            .header(
                header::ACCEPT,
                "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json",
            )
            .body(body::empty())
            .map_err(|e| e.to_string())?;
        if let Some(a) = auth {
            let v = HeaderValue::from_str(a).map_err(|_| "token is not header text".to_string())?;
            req.headers_mut().insert(header::AUTHORIZATION, v);
        }
        Ok(req)
    };
    let mut resp = crate::registry::auth::send(shared, request(None)?, false)
        .await
        .map_err(|e| e.to_string())?;
    if resp.status() == StatusCode::UNAUTHORIZED && !shared.logins.current().any_for_host(host) {
        let challenge = resp
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .ok_or("401 without WWW-Authenticate")?;
        let challenge = parse_challenge(challenge)?;
        let scope = format!("repository:{repo}:pull");
        let token = fetch_token(&shared.upstream, &challenge, &scope, None)
            .await
            .map_err(|e| e.to_string())?;
        let bearer = format!("Bearer {}", token.value.expose());
        resp = shared
            .upstream
            .send(request(Some(&bearer))?)
            .await
            .map_err(|e| e.to_string())?;
    }
    let source = resp
        .headers()
        .get("docker-ratelimit-source")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let limit = parse_ratelimit(resp.headers());
    if limit.is_none() && !resp.status().is_success() {
        return Err(format!("{host} answered {}", resp.status()));
    }
    Ok(Report { limit, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_against_thresholds() {
        let at = |remaining| Report {
            limit: Some(RateLimit {
                limit: 100,
                remaining,
                window: Some(21600),
            }),
            source: None,
        };
        assert_eq!(status(&at(80), Some(50), Some(10)), 0);
        assert_eq!(status(&at(50), Some(50), Some(10)), 1);
        assert_eq!(status(&at(3), Some(50), Some(10)), 2);
        assert_eq!(
            status(
                &Report {
                    limit: None,
                    source: None
                },
                Some(50),
                Some(10)
            ),
            3
        );
    }
}
