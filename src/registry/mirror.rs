//! Mirror mode: registry requests sent straight to regproxy, not through CONNECT. containerd's
//! `hosts.toml` mirrors name the upstream in `?ns=`; docker's `registry-mirrors` send nothing and
//! mean Docker Hub. Both reach the same router and cache as intercepted requests.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;

use crate::body::{text, Body};
use crate::dockerhub;
use crate::exchange::Target;
use crate::fleet::{self, Signed};
use crate::Shared;

/// Serves a `/v2/…` request sent to regproxy as a registry mirror.
pub async fn handle(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    shared: &Arc<Shared>,
) -> Response<Body> {
    if let Some(refusal) = refusal(&mut req, peer, shared) {
        return refusal;
    }
    let (target, uri) = match upstream_of(req.uri(), &shared.config) {
        Ok(t) => t,
        Err((status, reason)) => {
            tracing::warn!(client = %peer, reason = %reason, "mirror request refused");
            return text(status, reason);
        }
    };
    *req.uri_mut() = uri;
    super::handle(req, &target, peer, shared).await
}

/// Lets the client in through the gate, or a fleet member by its signature (the answer when
/// neither may come in); the fleet's headers never go further.
fn refusal(
    req: &mut Request<Incoming>,
    peer: SocketAddr,
    shared: &Shared,
) -> Option<Response<Body>> {
    let pq = req.uri().path_and_query().map_or("", |pq| pq.as_str());
    let signed = match &shared.fleet {
        Some(fleet) => fleet.verify(req.method(), pq, req.headers()),
        None if req.headers().contains_key(fleet::PEER_HEADER) => Signed::Forged,
        None => Signed::No,
    };
    let admitted = match signed {
        Signed::Forged => {
            tracing::warn!(client = %peer, "refused a fleet request whose signature does not verify");
            let reason =
                "fleet request refused: the signature does not verify (peer_secret_file, clocks)";
            return Some(text(StatusCode::FORBIDDEN, reason));
        }
        Signed::ByMember => shared.gate.admit_member(peer.ip(), req),
        Signed::No => shared.gate.admit(peer.ip(), req),
    };
    req.headers_mut().remove(fleet::PEER_HEADER);
    req.headers_mut().remove(fleet::USER_HEADER);
    let refused = admitted.err()?;
    tracing::warn!(client = %peer, refusal = ?refused, "mirror client refused");
    Some(refused.response(true))
}

/// The upstream a mirror request is for, and its path for that upstream (`ns` removed, Docker
/// Hub's `library/` added to single-name repositories).
fn upstream_of(uri: &Uri, config: &crate::Config) -> Result<(Target, Uri), (StatusCode, String)> {
    let query = uri.query().unwrap_or("");
    let ns = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("ns="))
        .map(|v| v.replace("%3A", ":").replace("%3a", ":"));
    let ns = ns.unwrap_or_else(|| config.mirror_default.clone());
    let host = dockerhub::api_host(&ns.to_ascii_lowercase()).to_owned();
    let (name, port) = match host.rsplit_once(':') {
        Some((h, p)) => {
            let port = p
                .parse()
                .map_err(|_| (StatusCode::BAD_REQUEST, format!("ns={ns}: bad port")))?;
            (h.to_owned(), port)
        }
        None => (host.clone(), 443),
    };
    if !config.intercepts(&name) {
        return Err((
            StatusCode::FORBIDDEN,
            format!(
                "mirror upstream {ns:?} is not on the intercept list (add it with --intercept)"
            ),
        ));
    }
    if !config.allow_port.contains(&port) {
        return Err((
            StatusCode::FORBIDDEN,
            format!("mirror upstream port {port} is not allowed (add it with --allow-port)"),
        ));
    }
    let mut path = uri.path().to_owned();
    if name == dockerhub::API_HOST {
        path = with_library(&path);
    }
    let rest: Vec<&str> = query
        .split('&')
        .filter(|kv| !kv.is_empty() && !kv.starts_with("ns="))
        .collect();
    let pq = if rest.is_empty() {
        path
    } else {
        format!("{path}?{}", rest.join("&"))
    };
    let uri = pq
        .parse()
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("bad path {pq:?}: {e}")))?;
    Ok((Target::new(name, port), uri))
}

/// `/v2/alpine/manifests/3` → `/v2/library/alpine/manifests/3`: Docker Hub's official images
/// live under `library/`, and clients of a mirror may leave it out.
fn with_library(path: &str) -> String {
    let Some(rest) = path.strip_prefix("/v2/") else {
        return path.to_owned();
    };
    for marker in ["/manifests/", "/blobs/", "/tags/"] {
        if let Some(at) = rest.find(marker) {
            let repo = &rest[..at];
            if !repo.is_empty() {
                return format!("/v2/{}{}", dockerhub::qualified(repo), &rest[at..]);
            }
            break;
        }
    }
    path.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> crate::Config {
        let mut c = crate::Config::default();
        c.intercept.push("registry.test".into());
        c.allow_port.push(5000);
        c
    }

    #[test]
    fn ns_picks_the_upstream_and_is_removed() {
        let uri: Uri = "/v2/test/img/manifests/v1?ns=registry.test:5000"
            .parse()
            .unwrap();
        let (t, u) = upstream_of(&uri, &cfg()).unwrap();
        assert_eq!((t.host(), t.port()), ("registry.test", 5000));
        assert_eq!(u.to_string(), "/v2/test/img/manifests/v1");
    }

    #[test]
    fn docker_hub_is_the_default_with_library_prefix() {
        let uri: Uri = "/v2/alpine/manifests/3".parse().unwrap();
        let (t, u) = upstream_of(&uri, &cfg()).unwrap();
        assert_eq!(t.host(), "registry-1.docker.io");
        assert_eq!(u.to_string(), "/v2/library/alpine/manifests/3");
        let uri: Uri = "/v2/grafana/grafana/blobs/sha256:x?ns=docker.io"
            .parse()
            .unwrap();
        assert_eq!(
            upstream_of(&uri, &cfg()).unwrap().1.to_string(),
            "/v2/grafana/grafana/blobs/sha256:x"
        );
        assert_eq!(with_library("/v2/"), "/v2/");
    }

    #[test]
    fn unknown_upstreams_and_ports_are_refused() {
        let uri: Uri = "/v2/x/manifests/1?ns=evil.example".parse().unwrap();
        assert_eq!(
            upstream_of(&uri, &cfg()).unwrap_err().0,
            StatusCode::FORBIDDEN
        );
        let uri: Uri = "/v2/x/manifests/1?ns=registry.test:6000".parse().unwrap();
        assert_eq!(
            upstream_of(&uri, &cfg()).unwrap_err().0,
            StatusCode::FORBIDDEN
        );
    }
}
