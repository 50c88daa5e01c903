//! CONNECT: check the port, then either intercept (TLS with a leaf) or tunnel blindly.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use super::{intercept, tunnel};
use crate::body::{empty, text, AccessLog, Body};
use crate::upstream::resolve::connect;
use crate::Shared;

/// The host and port a client asked to CONNECT to.
#[derive(Debug, Clone)]
pub struct Target {
    /// Host name or IP literal, lower-case.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl Target {
    /// `host` alone for 443, `host:port` otherwise: the authority of upstream URLs.
    pub fn authority(&self) -> String {
        if self.port == 443 {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

pub(super) async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared>,
) -> Response<Body> {
    let target = match parse_target(&req) {
        Ok(t) => t,
        Err(reason) => return text(StatusCode::BAD_REQUEST, reason),
    };
    if !shared.config.allow_port.contains(&target.port) {
        tracing::warn!(client = %peer, host = %target.host, port = target.port, "CONNECT to a port not allowed");
        return text(
            StatusCode::FORBIDDEN,
            format!(
                "CONNECT to port {} is not allowed (allowed: {:?}; add one with --allow-port)",
                target.port, shared.config.allow_port
            ),
        );
    }
    let upgrade = hyper::upgrade::on(req);
    if shared.config.intercepts(&target.host) {
        shared
            .tasks
            .spawn(intercept::serve(upgrade, target, peer, shared.clone()));
        return Response::new(empty());
    }
    let start = Instant::now();
    let timeout = shared.config.connect_timeout;
    match connect(&shared.resolver, &target.host, target.port, timeout).await {
        Ok(upstream) => {
            let log = AccessLog {
                client: peer.to_string(),
                host: target.authority(),
                method: "CONNECT".into(),
                path: String::new(),
                outcome: "TUNNEL",
                status: 200,
                start,
                metrics: shared.metrics.clone(),
            };
            shared.tasks.spawn(tunnel::run(upgrade, upstream, log));
            Response::new(empty())
        }
        Err(e) if e.kind() == ErrorKind::PermissionDenied => {
            tracing::warn!(client = %peer, host = %target.host, error = %e, "CONNECT refused");
            text(StatusCode::FORBIDDEN, format!("refused: {e}"))
        }
        Err(e) => {
            tracing::warn!(client = %peer, host = %target.host, error = %e, "tunnel upstream unreachable");
            text(
                StatusCode::BAD_GATEWAY,
                format!("cannot reach {}: {e}", target.authority()),
            )
        }
    }
}

fn parse_target(req: &Request<Incoming>) -> Result<Target, String> {
    let authority = req
        .uri()
        .authority()
        .ok_or_else(|| format!("CONNECT needs host:port, got {:?}", req.uri().to_string()))?;
    let port = authority
        .port_u16()
        .ok_or_else(|| format!("CONNECT target {authority} has no port; send host:port"))?;
    let host = authority.host().trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() {
        return Err("CONNECT target has an empty host".into());
    }
    Ok(Target { host, port })
}
