//! CONNECT: check the port, then either intercept (TLS with a leaf) or tunnel blindly.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::uri::Authority;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use super::{intercept, tunnel};
use crate::body::{empty, text, AccessLog, Body};
use crate::credentials::ProxyUser;
use crate::exchange::Target;
use crate::upstream::resolve::connect;
use crate::Shared;

pub(super) async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared>,
) -> Response<Body> {
    let target = match parse_target(&req) {
        Ok(t) => t,
        Err(reason) => return text(StatusCode::BAD_REQUEST, reason),
    };
    if !shared.config.allow_port.contains(&target.port()) {
        tracing::warn!(client = %peer, host = %target.host(), port = target.port(), "CONNECT to port {} refused: not an allowed port; allow it with --allow-port {}", target.port(), target.port());
        return text(
            StatusCode::FORBIDDEN,
            format!(
                "CONNECT to port {} is not allowed (allowed: {:?}); allow it with --allow-port {}",
                target.port(),
                shared.config.allow_port,
                target.port()
            ),
        );
    }
    let user = req.extensions().get::<ProxyUser>().cloned();
    let upgrade = hyper::upgrade::on(req);
    if shared.config.intercepts(target.host()) {
        let session = intercept::serve(upgrade, target, user, peer, shared.clone());
        shared.tasks.spawn(session);
        return Response::new(empty());
    }
    let start = Instant::now();
    let timeout = shared.config.connect_timeout;
    match connect(&shared.resolver, target.host(), target.port(), timeout).await {
        Ok(upstream) => {
            let log = AccessLog {
                client: peer,
                host: target.authority().to_owned(),
                method: "CONNECT".into(),
                path: String::new(),
                outcome: crate::body::Outcome::Tunnel,
                status: 200,
                start,
                metrics: shared.metrics.clone(),
            };
            shared.tasks.spawn(tunnel::run(upgrade, upstream, log));
            Response::new(empty())
        }
        Err(e) if e.kind() == ErrorKind::PermissionDenied => {
            tracing::warn!(client = %peer, host = %target.host(), error = %e, "CONNECT refused");
            text(StatusCode::FORBIDDEN, format!("refused: {e}"))
        }
        Err(e) => {
            tracing::warn!(client = %peer, host = %target.host(), error = %e, "tunnel upstream unreachable");
            text(
                StatusCode::BAD_GATEWAY,
                format!("cannot reach {}: {e}", target.authority()),
            )
        }
    }
}

/// Why a CONNECT request names no target; the message is the 400's body.
#[derive(Debug, thiserror::Error)]
enum TargetError {
    /// The request-target is not an authority.
    #[error("CONNECT needs host:port, got {0:?}")]
    NoAuthority(String),
    /// The authority has no port.
    #[error("CONNECT target {0} has no port; send host:port")]
    NoPort(Authority),
    /// The authority's host is empty.
    #[error("CONNECT target has an empty host")]
    EmptyHost,
}

fn parse_target(req: &Request<Incoming>) -> Result<Target, TargetError> {
    let authority = req
        .uri()
        .authority()
        .ok_or_else(|| TargetError::NoAuthority(req.uri().to_string()))?;
    target_of(authority)
}

/// The target a CONNECT authority names (apart from the request, so that it can be tested).
fn target_of(authority: &Authority) -> Result<Target, TargetError> {
    let port = authority
        .port_u16()
        .ok_or_else(|| TargetError::NoPort(authority.clone()))?;
    let host = authority.host().trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() {
        return Err(TargetError::EmptyHost);
    }
    Ok(Target::new(host, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Uri;
    use proptest::prelude::*;

    /// A CONNECT request-target as hyper hands it over: parsed as a URI.
    fn target(text: &str) -> Option<Result<Target, TargetError>> {
        let uri: Uri = text.parse().ok()?;
        uri.authority().map(target_of)
    }

    fn host() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-zA-Z0-9]([a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?(\\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?){0,3}\\.?",
            any::<std::net::Ipv4Addr>().prop_map(|ip| ip.to_string()),
            any::<std::net::Ipv6Addr>().prop_map(|ip| format!("[{ip}]")),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Never panics; what it accepts has a non-empty, lower-case host without a trailing dot.
        #[test]
        fn any_target_parses_or_fails_cleanly(
            text in prop_oneof![
                any::<String>(),
                "[a-zA-Z0-9.:\\[\\]@%-]{0,30}",
                "[a-z.]{0,8}:[0-9]{0,7}",
            ],
        ) {
            if let Some(Ok(t)) = target(&text) {
                prop_assert!(!t.host().is_empty() && !t.host().ends_with('.'));
                prop_assert_eq!(t.host(), t.host().to_ascii_lowercase());
            }
        }

        #[test]
        fn host_and_port_come_back(host in host(), port in any::<u16>()) {
            let t = target(&format!("{host}:{port}")).unwrap().unwrap();
            prop_assert_eq!(t.host(), host.trim_end_matches('.').to_ascii_lowercase());
            prop_assert_eq!(t.port(), port);
            // `authority()` names the same target again.
            let text = if port == 443 { format!("{}:443", t.authority()) } else { t.authority().to_owned() };
            let again = target(&text).unwrap().unwrap();
            prop_assert_eq!((again.host(), again.port()), (t.host(), port));
            if port == 443 {
                prop_assert_eq!(t.authority(), t.host());
            }
        }

        #[test]
        fn a_target_without_a_port_is_refused(host in host()) {
            let empty_port = format!("{host}:");
            prop_assert!(!matches!(target(&host), Some(Ok(_))), "{}", host);
            prop_assert!(!matches!(target(&empty_port), Some(Ok(_))), "{}", empty_port);
        }

        #[test]
        fn a_port_past_u16_is_refused(host in host(), port in 65536u32..10_000_000) {
            let text = format!("{host}:{port}");
            prop_assert!(!matches!(target(&text), Some(Ok(_))), "{}", text);
        }
    }
}
