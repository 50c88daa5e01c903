//! The fleet: which member owns a digest (rendezvous hashing over the member list), asking the
//! owner for an object so that it crosses the internet once for everyone, and the signature by
//! which members know each other's requests.
//!
//! A member asks the owner the way a containerd mirror client would (`GET /v2/…?ns=HOST` on the
//! proxy listener), with the client's own `Authorization`, so that the owner applies the same
//! access rules as for its own clients; the answer is verified like any fill. The signature, an
//! HMAC of the request line and a timestamp under the shared secret, keeps the secret off the
//! wire. A signed request is never passed on to another member, so no request loops.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use parking_lot::RwLock;
use sha2::Sha256;

use crate::body::{self, Body};
use crate::cache::Digest;
use crate::config::Config;
use crate::credentials::ProxyUser;
use crate::secret::Secret;

/// The header carrying a member's signature: `TIMESTAMP.HEX`.
pub const PEER_HEADER: &str = "x-regproxy-peer";
/// The header naming the proxy user a member's client came as.
pub const USER_HEADER: &str = "x-regproxy-user";
/// How far a signature's timestamp may be from this member's clock.
const SKEW: u64 = 60;
/// Time an owner may take to accept a connection before the member goes upstream itself.
const OWNER_CONNECT: Duration = Duration::from_secs(2);
/// How often a DNS-named fleet is looked up again.
const REFRESH: Duration = Duration::from_secs(30);

/// What could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The secret file could not be read, or is empty.
    #[error("peer_secret_file {path}: {reason}")]
    Secret {
        path: std::path::PathBuf,
        reason: String,
    },
}

/// Why a member could not serve an object.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The request could not be built (a URL that is not one).
    #[error("request to {owner}: {reason}")]
    Request { owner: String, reason: String },
    /// The owner did not answer in time or at all.
    #[error("owner {owner} unreachable")]
    Unreachable {
        owner: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The members and the means to reach them.
pub struct Fleet {
    me: String,
    members: RwLock<Vec<String>>,
    key: Secret,
    client: HttpClient<HttpConnector, Body>,
}

/// What a request's signature says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signed {
    /// It carries none: an ordinary client.
    No,
    /// A member sent it.
    ByMember,
    /// It carries a signature that does not verify (or an expired one).
    Forged,
}

/// Marks a request that a fleet member sent: it is answered here, never passed on.
#[derive(Debug, Clone, Copy)]
pub struct FromMember;

impl Fleet {
    /// The fleet `config` describes, if any ([`Config::check_fleet`] has vouched for it).
    pub fn from_config(config: &Config) -> Result<Option<Arc<Fleet>>, FleetError> {
        let (Some(me), Some(path)) = (&config.advertise, &config.peer_secret_file) else {
            return Ok(None);
        };
        let fail = |reason: String| FleetError::Secret {
            path: path.clone(),
            reason,
        };
        let secret = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        let secret = secret.trim();
        if secret.len() < 16 {
            return Err(fail("the secret must be at least 16 characters".into()));
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(OWNER_CONNECT));
        connector.set_nodelay(true);
        let client = HttpClient::builder(TokioExecutor::new()).build(connector);
        Ok(Some(Arc::new(Fleet {
            me: me.clone(),
            members: RwLock::new(config.peers.clone()),
            key: Secret::new(secret.to_owned()),
            client,
        })))
    }

    /// The member that owns `digest`, unless it is this one (or there is no other).
    pub fn owner(&self, digest: &Digest) -> Option<String> {
        let members = self.members.read();
        let owner = members.iter().max_by_key(|m| score(m, digest))?;
        (*owner != self.me).then(|| owner.clone())
    }

    /// Asks `owner` for the object at `path` on the upstream `host`, with the client's headers
    /// (its credentials) and proxy user, as the client would.
    pub async fn fetch(
        &self,
        owner: &str,
        host: &str,
        (path, headers, user): (&str, &HeaderMap, Option<&ProxyUser>),
    ) -> Result<Response<Incoming>, PeerError> {
        let pq = format!("{path}?ns={host}");
        let fail = |reason: String| PeerError::Request {
            owner: owner.to_owned(),
            reason,
        };
        let mut req = Request::get(format!("{owner}{pq}"))
            .body(body::empty())
            .map_err(|e| fail(e.to_string()))?;
        let h = req.headers_mut();
        for name in [header::AUTHORIZATION, header::ACCEPT] {
            for v in headers.get_all(&name) {
                h.append(&name, v.clone());
            }
        }
        if let Some(user) = user {
            let name = HeaderValue::from_str(&user.name).map_err(|e| fail(e.to_string()))?;
            h.insert(USER_HEADER, name);
        }
        let signature = self.sign(&Method::GET, &pq, now());
        h.insert(
            PEER_HEADER,
            HeaderValue::from_str(&signature).map_err(|e| fail(e.to_string()))?,
        );
        self.client
            .request(req)
            .await
            .map_err(|e| PeerError::Unreachable {
                owner: owner.to_owned(),
                source: Box::new(e),
            })
    }

    /// Whether a member signed this request (method, path and query as received).
    pub fn verify(&self, method: &Method, pq: &str, headers: &HeaderMap) -> Signed {
        let Some(value) = headers.get(PEER_HEADER) else {
            return Signed::No;
        };
        let parsed = value.to_str().ok().and_then(|v| v.split_once('.'));
        let Some((ts, sig)) = parsed else {
            return Signed::Forged;
        };
        let (Ok(ts), Ok(sig)) = (ts.parse::<u64>(), hex::decode(sig)) else {
            return Signed::Forged;
        };
        if now().abs_diff(ts) > SKEW {
            return Signed::Forged;
        }
        match self.mac(method, pq, ts).verify_slice(&sig) {
            Ok(()) => Signed::ByMember,
            Err(_) => Signed::Forged,
        }
    }

    fn sign(&self, method: &Method, pq: &str, ts: u64) -> String {
        let tag = self.mac(method, pq, ts).finalize().into_bytes();
        format!("{ts}.{}", hex::encode(tag))
    }

    fn mac(&self, method: &Method, pq: &str, ts: u64) -> Hmac<Sha256> {
        // Any key length is accepted by HMAC.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.key.expose().as_bytes())
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(format!("{ts}\n{method}\n{pq}").as_bytes());
        mac
    }

    /// Keeps the member list equal to the addresses `host` resolves to, every [`REFRESH`].
    pub async fn keep_resolved(
        self: Arc<Self>,
        host: String,
        port: u16,
        stop: tokio_util::sync::CancellationToken,
    ) {
        loop {
            match tokio::net::lookup_host((host.as_str(), port)).await {
                Ok(addrs) => {
                    let mut members: Vec<String> = addrs.map(|a| format!("http://{a}")).collect();
                    members.sort();
                    members.dedup();
                    if !members.is_empty() {
                        let mut known = self.members.write();
                        if *known != members {
                            tracing::info!(members = members.len(), "fleet members changed");
                            *known = members;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(%host, error = %e, "cannot look up the fleet; keeping the members known")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(REFRESH) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// A member's rendezvous score for a digest: the highest owns it.
fn score(member: &str, digest: &Digest) -> [u8; 32] {
    use sha2::Digest as _;
    let mut h = Sha256::new();
    h.update(member.as_bytes());
    h.update(b"\n");
    h.update(digest.to_string().as_bytes());
    h.finalize().into()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(me: &str, members: &[&str]) -> Fleet {
        Fleet {
            me: me.into(),
            members: RwLock::new(members.iter().map(|m| m.to_string()).collect()),
            key: Secret::new("0123456789abcdef-secret"),
            client: HttpClient::builder(TokioExecutor::new()).build(HttpConnector::new()),
        }
    }

    /// Every member picks the same owner, and owners spread over the members.
    #[test]
    fn members_agree_on_owners_and_share_the_work() {
        let urls = ["http://a:1", "http://b:1", "http://c:1"];
        let fleets: Vec<Fleet> = urls.iter().map(|m| fleet(m, &urls)).collect();
        let mut owned = [0usize; 3];
        for n in 0..300u32 {
            let d = Digest::sha256_of(&n.to_be_bytes());
            let owners: Vec<String> = fleets
                .iter()
                .map(|f| f.owner(&d).unwrap_or_else(|| f.me.clone()))
                .collect();
            assert!(owners.iter().all(|o| *o == owners[0]), "{owners:?}");
            owned[urls.iter().position(|u| *u == owners[0]).unwrap()] += 1;
        }
        assert!(owned.iter().all(|n| *n > 50), "{owned:?}");
    }

    /// A DNS-named fleet is the addresses the name resolves to.
    #[tokio::test]
    async fn a_dns_named_fleet_follows_the_name() {
        let f = Arc::new(fleet("http://127.0.0.1:3128", &[]));
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(
            f.clone()
                .keep_resolved("localhost".into(), 3128, stop.clone()),
        );
        for _ in 0..100 {
            if !f.members.read().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        task.await.unwrap();
        let members = f.members.read().clone();
        assert!(
            members.contains(&"http://127.0.0.1:3128".to_string()),
            "{members:?}"
        );
    }

    #[test]
    fn only_the_secret_signs() {
        let f = fleet("http://a:1", &["http://a:1"]);
        let pq = "/v2/a/blobs/sha256:00?ns=registry.test:5000";
        let mut h = HeaderMap::new();
        assert_eq!(f.verify(&Method::GET, pq, &h), Signed::No);
        let sig = f.sign(&Method::GET, pq, now());
        h.insert(PEER_HEADER, sig.parse().unwrap());
        assert_eq!(f.verify(&Method::GET, pq, &h), Signed::ByMember);
        assert_eq!(f.verify(&Method::GET, "/v2/other", &h), Signed::Forged);
        let mut other = fleet("http://a:1", &[]);
        other.key = Secret::new("another-secret-of-16+");
        assert_eq!(other.verify(&Method::GET, pq, &h), Signed::Forged);
        let old = f.sign(&Method::GET, pq, now() - 10 * SKEW);
        h.insert(PEER_HEADER, old.parse().unwrap());
        assert_eq!(f.verify(&Method::GET, pq, &h), Signed::Forged);
    }
}
