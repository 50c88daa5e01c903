//! `regproxy ratelimit`: asks a registry (Docker Hub by default) how many pulls are left, with a
//! manifest `HEAD`, which Docker Hub does not count against the limit; exit status for checks.

use http::header;
use http::Request;

use crate::body;
use crate::metrics::{parse_ratelimit, RateLimit};
use crate::upstream::{Client, How, UpstreamError};

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
pub fn status(report: &Report, warn: Option<u64>, critical: Option<u64>) -> u8 {
    let Some(rl) = report.limit else { return 3 };
    if critical.is_some_and(|c| rl.remaining <= c) {
        2
    } else if warn.is_some_and(|w| rl.remaining <= w) {
        1
    } else {
        0
    }
}

/// Why the registry's limit could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The image does not make a valid request URL.
    #[error(transparent)]
    Request(#[from] http::Error),
    /// The registry could not be asked.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// It answered an error without rate-limit headers.
    #[error("{host} answered {status}")]
    Status {
        /// The registry host.
        host: String,
        /// What it answered.
        status: http::StatusCode,
    },
}

/// Sends the `HEAD` for `repo:tag` on `host` (with injected credentials, else an anonymous
/// token when challenged) and reads the rate-limit headers.
pub async fn check(client: &Client, host: &str, image: &str) -> Result<Report, CheckError> {
    let (repo, tag) = image.rsplit_once(':').unwrap_or((image, "latest"));
    let uri = format!("https://{host}/v2/{repo}/manifests/{tag}");
    let req = Request::head(&uri)
        .header(
            header::ACCEPT,
            "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json",
        )
        .body(body::empty())?;
    let how = How {
        follow: false,
        anonymous: true,
    };
    let resp = client.send(req, how).await?;
    let source = resp
        .headers()
        .get("docker-ratelimit-source")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let limit = parse_ratelimit(resp.headers());
    if limit.is_none() && !resp.status().is_success() {
        return Err(CheckError::Status {
            host: host.to_owned(),
            status: resp.status(),
        });
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
