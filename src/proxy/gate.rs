//! Who may use the proxy: a CIDR allow-list and/or `Proxy-Authorization: Basic` credentials.
//! On loopback with neither, anyone on the machine may (the default).

use std::net::IpAddr;
use std::path::Path;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

use crate::body::{text, Body};
use crate::config::{Cidr, Config};
use crate::credentials::ProxyUser;
use crate::secret::{basic, Secret};

/// The allow-list and the accepted proxy credentials.
#[derive(Debug, Default)]
pub struct Gate {
    allow: Vec<Cidr>,
    // The full `Basic …` header values accepted, precomputed, and whose they are.
    accepted: Vec<(Secret, ProxyUser)>,
}

/// Why a client was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its address is not on the allow-list.
    NotAllowed,
    /// It sent no, or wrong, proxy credentials.
    NeedsCredentials,
}

impl Gate {
    /// Builds the gate from the config, reading the proxy credentials file.
    pub fn new(config: &Config) -> std::io::Result<Gate> {
        let accepted = match &config.proxy_credentials_file {
            Some(path) => read_users(path)?,
            None => Vec::new(),
        };
        Ok(Gate {
            allow: config.allow_cidr.clone(),
            accepted,
        })
    }

    /// Checks a client's address and the request's `Proxy-Authorization`; the proxy user it
    /// authenticated as, if the proxy has users.
    pub fn check(&self, peer: IpAddr, headers: &HeaderMap) -> Result<Option<ProxyUser>, Refusal> {
        if !self.allow.is_empty() && !self.allow.iter().any(|c| c.contains(peer)) {
            return Err(Refusal::NotAllowed);
        }
        if self.accepted.is_empty() {
            return Ok(None);
        }
        let sent = headers
            .get(header::PROXY_AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        // Compare digests, so that the time taken says nothing about how much of a secret matched.
        let sent = sha(sent);
        match self.accepted.iter().find(|(a, _)| sha(a.expose()) == sent) {
            Some((_, user)) => Ok(Some(user.clone())),
            None => Err(Refusal::NeedsCredentials),
        }
    }
}

impl Gate {
    /// [`Gate::check`] for a request, which then carries the proxy user it came as (that user's
    /// credentials decide which injected ones its requests may use).
    pub fn admit<B>(&self, peer: IpAddr, req: &mut http::Request<B>) -> Result<(), Refusal> {
        if let Some(user) = self.check(peer, req.headers())? {
            req.extensions_mut().insert(user);
        }
        Ok(())
    }
}

impl Gate {
    /// Admits a request a fleet member signed: its address must still be on the allow-list,
    /// and it comes as the proxy user the member names (whose credentials the member checked).
    pub fn admit_member<B>(&self, peer: IpAddr, req: &mut http::Request<B>) -> Result<(), Refusal> {
        if !self.allow.is_empty() && !self.allow.iter().any(|c| c.contains(peer)) {
            return Err(Refusal::NotAllowed);
        }
        let named = req.headers().get(crate::fleet::USER_HEADER);
        if let Some(name) = named.and_then(|v| v.to_str().ok()) {
            let known = self.accepted.iter().find(|(_, u)| u.name == name);
            let (_, user) = known.ok_or(Refusal::NeedsCredentials)?;
            let user = user.clone();
            req.extensions_mut().insert(user);
        }
        req.extensions_mut().insert(crate::fleet::FromMember);
        Ok(())
    }
}

impl Refusal {
    /// The answer: 403 for an address outside the allow-list; 407 (proxy) or 401 (mirror, where
    /// there is no proxy hop) asking for credentials.
    pub fn response(self, mirror: bool) -> Response<Body> {
        match self {
            Refusal::NotAllowed => text(
                StatusCode::FORBIDDEN,
                "your address is not allowed to use this proxy (allow_cidr)",
            ),
            Refusal::NeedsCredentials => {
                let status = if mirror {
                    StatusCode::UNAUTHORIZED
                } else {
                    StatusCode::PROXY_AUTHENTICATION_REQUIRED
                };
                let mut resp = text(
                    status,
                    "this proxy needs credentials: send Proxy-Authorization: Basic",
                );
                let challenge = HeaderValue::from_static("Basic realm=\"regproxy\"");
                resp.headers_mut()
                    .insert(header::PROXY_AUTHENTICATE, challenge);
                resp
            }
        }
    }
}

fn sha(s: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(s.as_bytes()).into()
}

/// Reads `user:password` lines, each optionally followed by ` inject=SCOPE[,SCOPE…]` naming
/// the `[registries."…"]` entries whose credentials that user may have injected (blank lines and
/// `#` comments skipped).
fn read_users(path: &Path) -> std::io::Result<Vec<(Secret, ProxyUser)>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("proxy_credentials_file {}: {e}", path.display()),
        )
    })?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (line, inject) = match line.rsplit_once(char::is_whitespace) {
            Some((creds, opt)) if opt.starts_with("inject=") => {
                let scopes = opt["inject=".len()..].split(',');
                let scopes = scopes.filter(|s| !s.is_empty()).map(str::to_owned);
                (creds.trim_end(), Some(scopes.collect()))
            }
            _ => (line, None),
        };
        let (user, password) = line.split_once(':').ok_or_else(|| {
            std::io::Error::other(format!(
                "proxy_credentials_file {} line {}: expected user:password",
                path.display(),
                n + 1
            ))
        })?;
        let who = ProxyUser {
            name: user.to_owned(),
            inject,
        };
        out.push((basic(user, &Secret::new(password)), who));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_and_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("users");
        std::fs::write(&file, "# ci runners\nci:s3cret\n").unwrap();
        let config = Config {
            allow_cidr: vec![Cidr::parse("10.0.0.0/8").unwrap()],
            proxy_credentials_file: Some(file),
            ..Config::default()
        };
        let gate = Gate::new(&config).unwrap();
        let mut h = HeaderMap::new();
        let inside: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(
            gate.check("192.0.2.1".parse().unwrap(), &h),
            Err(Refusal::NotAllowed)
        );
        assert_eq!(gate.check(inside, &h), Err(Refusal::NeedsCredentials));
        h.insert(
            header::PROXY_AUTHORIZATION,
            "Basic Y2k6czNjcmV0".parse().unwrap(),
        );
        assert_eq!(
            gate.check(inside, &h).map(|u| u.map(|u| u.name)),
            Ok(Some("ci".to_string()))
        );
        h.insert(
            header::PROXY_AUTHORIZATION,
            "Basic Y2k6d3Jvbmc=".parse().unwrap(),
        );
        assert_eq!(gate.check(inside, &h), Err(Refusal::NeedsCredentials));
    }
}
