//! Name resolution with operator overrides, refusing the proxy's own listen address.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};

/// Resolves `host:port` through the override table first, then the system resolver.
#[derive(Debug, Clone)]
pub struct Resolver {
    overrides: HashMap<String, SocketAddr>,
    own: SocketAddr,
}

impl Resolver {
    /// A resolver with the given overrides that refuses to hand out `own` (the proxy's listener).
    pub fn new(overrides: &[(String, SocketAddr)], own: SocketAddr) -> Resolver {
        Resolver {
            overrides: overrides.iter().cloned().collect(),
            own,
        }
    }

    /// All addresses for `host:port`, or an error naming why there are none.
    pub async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let addrs: Vec<SocketAddr> = if let Some(a) = self.overrides.get(&format!("{host}:{port}"))
        {
            vec![*a]
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            vec![SocketAddr::new(ip, port)]
        } else {
            tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("DNS lookup of {host} failed: {e}")))?
                .collect()
        };
        if addrs.iter().any(|a| self.is_own(a)) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{host}:{port} is this proxy's own listen address"),
            ));
        }
        if addrs.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{host} has no addresses"),
            ));
        }
        Ok(addrs)
    }

    fn is_own(&self, a: &SocketAddr) -> bool {
        if a.port() != self.own.port() {
            return false;
        }
        let own = self.own.ip();
        a.ip() == own || (own.is_unspecified() && (a.ip().is_loopback() || a.ip().is_unspecified()))
    }
}

/// Connects to the first reachable address of `host:port` within `timeout`.
pub async fn connect(
    resolver: &Resolver,
    host: &str,
    port: u16,
    timeout: std::time::Duration,
) -> io::Result<tokio::net::TcpStream> {
    let attempt = async {
        let mut last = None;
        for addr in resolver.resolve(host, port).await? {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Err(e) => {
                    last = Some(io::Error::new(
                        e.kind(),
                        format!("connect to {host}:{port} ({addr}): {e}"),
                    ))
                }
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no address")))
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {host}:{port} timed out after {timeout:?}"),
            ))
        })
}
