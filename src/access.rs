//! Who may read what: the facts the upstreams gave about clients and repositories (who was
//! served, what is public), and the decision, for each request the cache could answer, whether
//! this client may have those bytes (see [`allowed`]). The facts about where bytes came from are
//! the cache's ([`crate::cache::Origin`]); the rules are here.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap};
use http::{request, Method, Request, Response, StatusCode};

use crate::body::{text, Body};
use crate::cache::{Digest, Origin};
use crate::credentials::ProxyUser;
use crate::exchange::{fetch_request, head_answer, upstream_is_down, Target};
use crate::upstream::{How, UpstreamError};
use crate::Shared;

/// How long a client's authorization for a repository, or a repository's public status, is
/// remembered.
const ALLOWED_FOR: Duration = Duration::from_secs(300);

/// What the upstreams said recently about clients and repositories.
#[derive(Debug, Default)]
pub struct Access {
    allowed: Mutex<HashMap<(String, String, String), Instant>>,
    public: Mutex<HashMap<(String, String), (bool, Instant)>>,
}

impl Access {
    fn was_allowed(&self, key: &(String, String, String)) -> bool {
        let allowed = self.allowed.lock();
        allowed
            .get(key)
            .is_some_and(|at| at.elapsed() < ALLOWED_FOR)
    }

    fn allow(&self, key: (String, String, String)) {
        // Clients choose their keys (any Authorization): expired entries go once the map has
        // grown, and a map that is still too large starts over (a re-check, never a wrong answer).
        const PRUNE_AT: usize = 4_096;
        const MAX: usize = 65_536;
        let mut allowed = self.allowed.lock();
        if allowed.len() >= PRUNE_AT {
            allowed.retain(|_, at| at.elapsed() < ALLOWED_FOR);
            if allowed.len() >= MAX {
                allowed.clear();
            }
        }
        allowed.insert(key, Instant::now());
    }

    /// What was last found about the repository, if recently (a repository can go private).
    fn is_public(&self, host: &str, repo: &str) -> Option<bool> {
        let public = self.public.lock();
        let (value, at) = public.get(&(host.to_owned(), repo.to_owned()))?;
        (at.elapsed() < ALLOWED_FOR).then_some(*value)
    }

    fn set_public(&self, host: &str, repo: &str, value: bool) {
        let mut public = self.public.lock();
        public.retain(|_, (_, at)| at.elapsed() < ALLOWED_FOR);
        public.insert((host.to_owned(), repo.to_owned()), (value, Instant::now()));
    }
}

/// Who a client is to the upstream: a hash of its `Authorization`, and its proxy user, whose
/// injected credentials may differ from another's: the same headers from two proxy users are
/// two clients.
fn client_key(headers: &HeaderMap, user: Option<&ProxyUser>) -> String {
    use sha2::Digest as _;
    let auth = match headers.get(header::AUTHORIZATION) {
        None => String::new(),
        Some(v) => hex::encode(&sha2::Sha256::digest(v.as_bytes())[..16]),
    };
    match user {
        Some(u) => format!("{auth}|{}", u.name),
        None => auth,
    }
}

/// Records that the upstream served `repo` to this client (called when a fetch succeeded with
/// the client's own headers): an anonymous success makes the repository public.
pub async fn served(shared: &Shared, parts: &request::Parts, target: &Target, repo: &str) {
    let user = parts.extensions.get::<ProxyUser>();
    served_to(shared, &parts.headers, user, target, repo).await
}

/// [`served`], from the headers the upstream request carried and the client's proxy user.
pub async fn served_to(
    shared: &Shared,
    headers: &HeaderMap,
    user: Option<&ProxyUser>,
    target: &Target,
    repo: &str,
) {
    let host = target.authority();
    // A success with credentials injected (for any user) says nothing of anonymous clients.
    let injected = shared.client.credentials().injected(host, repo, None);
    let anonymous = !headers.contains_key(header::AUTHORIZATION) && injected.is_none();
    if anonymous && shared.access.is_public(host, repo) != Some(true) {
        shared.access.set_public(host, repo, true);
        shared.cache.set_public(host, repo, true).await;
    }
    shared
        .access
        .allow((client_key(headers, user), host.to_owned(), repo.to_owned()));
}

/// What may be done with cached (or downloading) bytes for one client.
pub enum Verdict {
    /// Serve them.
    Serve,
    /// Answer this instead: the upstream's refusal, or why it could not be asked.
    Refuse(Response<Body>),
    /// The origin asked never served these bytes, which are not public: it must serve its own
    /// (verified as they stream), or nothing.
    Miss,
}

/// What is known of where an object's bytes came from, as it concerns the origin a client asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Provenance {
    /// That origin served these very bytes (or the answer holds nothing but its own claims).
    pub bound: bool,
    /// When not bound: some origin serves them to anonymous clients, so they are no secret.
    pub public: bool,
}

impl Provenance {
    /// For an answer made only of the asked origin's own claims, such as a tag's record.
    pub const OWN: Provenance = Provenance {
        bound: true,
        public: false,
    };

    /// The provenance of `digest` (cached, or downloading from `in_flight`) for `asked`.
    pub async fn of(
        shared: &Shared,
        digest: &Digest,
        in_flight: Option<&Origin>,
        asked: &Origin,
    ) -> Provenance {
        if in_flight == Some(asked) || shared.cache.store.known_source(digest, asked) {
            return Provenance::OWN;
        }
        // Boxed: reading the source list from disk is a large future that the common case,
        // answered above, need not carry.
        Box::pin(Provenance::from_sources(shared, digest, in_flight, asked)).await
    }

    /// [`Provenance::of`] when the asked origin is not a source known in memory.
    async fn from_sources(
        shared: &Shared,
        digest: &Digest,
        in_flight: Option<&Origin>,
        asked: &Origin,
    ) -> Provenance {
        let mut sources = shared.cache.store.sources(digest).await;
        sources.extend(in_flight.cloned());
        if sources.contains(asked) {
            return Provenance::OWN;
        }
        let mut public = false;
        for source in &sources {
            public = match shared.access.is_public(&source.host, &source.repo) {
                Some(known) => known,
                None => shared.cache.is_public(&source.host, &source.repo).await,
            };
            if public {
                break;
            }
        }
        Provenance {
            bound: false,
            public,
        }
    }
}

/// Decides whether a client may have cached bytes of `repo` on the target, given where the bytes
/// came from (`prov`).
///
/// Bytes that this origin never served are a [`Verdict::Miss`] unless they are public: another
/// upstream's headers never unlock private bytes. Bytes it served go to clients it authorizes:
/// shortcuts (injected credentials, a public repository, this client allowed recently), else one
/// `HEAD` of the exact URL with the client's own credentials, whose redirects are followed and
/// whose final answer must be a 2xx (a redirect is not an authorization). A refusal is the
/// upstream's own answer (its 401 challenge included), with none of the cached bytes.
///
/// `upstream_down` skips the `HEAD` when the caller already knows it cannot be answered.
pub async fn allowed(
    shared: &Shared,
    parts: &request::Parts,
    target: &Target,
    repo: &str,
    prov: Provenance,
    upstream_down: bool,
) -> Verdict {
    if !prov.bound && !prov.public {
        tracing::debug!(
            repo,
            "cached bytes this origin never served, not public: a miss"
        );
        return Verdict::Miss;
    }
    let host = target.authority();
    let user = parts.extensions.get::<ProxyUser>();
    let public_repo = shared.access.is_public(host, repo) == Some(true);
    // The key is built only when the repository is not known public.
    let allowed_recently = || {
        let key = (
            client_key(&parts.headers, user),
            host.to_owned(),
            repo.to_owned(),
        );
        shared.access.was_allowed(&key)
    };
    if (prov.bound && public_repo) || allowed_recently() {
        tracing::debug!(
            repo,
            public_repo,
            "cached bytes may be served: a public repository, or this client was allowed recently"
        );
        return Verdict::Serve;
    }
    // Boxed: the check's future is several KiB, and every cached answer's future would carry
    // (and copy) that much if it were inline.
    Box::pin(ask_upstream(
        shared,
        parts,
        target,
        repo,
        prov,
        upstream_down,
    ))
    .await
}

/// The upstream's word on whether this client may read `repo`: a `HEAD` with its credentials.
async fn ask_upstream(
    shared: &Shared,
    parts: &request::Parts,
    target: &Target,
    repo: &str,
    prov: Provenance,
    upstream_down: bool,
) -> Verdict {
    let host = target.authority();
    // Injected credentials are no shortcut: bytes bound here may have come with another
    // client's own credentials, which the injected ones (or this user's share of them) may
    // not match. The HEAD below goes with whatever this client's requests go with.
    let user = parts.extensions.get::<ProxyUser>();
    let injected = shared.client.credentials().injected(host, repo, user);
    tracing::debug!(
        repo,
        "asking the upstream with a HEAD whether this client may read the cached bytes"
    );
    let answer = if upstream_down {
        Err(UpstreamError::Down)
    } else {
        match fetch_request(target, parts, Method::HEAD) {
            Ok(head) => shared.client.send(head, How::following()).await,
            Err(reason) => return Verdict::Refuse(text(StatusCode::BAD_REQUEST, reason)),
        }
    };
    match answer {
        Ok(resp) if resp.status().is_success() => {
            served(shared, parts, target, repo).await;
            Verdict::Serve
        }
        Ok(resp) if resp.status().is_redirection() => Verdict::Refuse(text(
            StatusCode::BAD_GATEWAY,
            format!(
                "{host} answered {} to the authorization check for {repo}, and a redirect is \
                 not an authorization",
                resp.status()
            ),
        )),
        Ok(resp) if !upstream_is_down(resp.status()) => {
            let anonymous =
                !parts.headers.contains_key(header::AUTHORIZATION) && injected.is_none();
            if anonymous && matches!(resp.status().as_u16(), 401 | 403) {
                // Refused to an anonymous client: not (or no longer) public. (A 404 says only
                // that this repository lacks the object.)
                shared.access.set_public(host, repo, false);
                shared.cache.set_public(host, repo, false).await;
            }
            tracing::info!(repo, status = %resp.status(), "cached content refused: the upstream does not authorize this client");
            Verdict::Refuse(head_answer(resp, &parts.method, host))
        }
        outcome => {
            // The upstream cannot say: only what is known public may be served.
            if prov.bound && shared.cache.is_public(host, repo).await {
                return Verdict::Serve;
            }
            let cause =
                outcome.map_or_else(|e| e.to_string(), |r| format!("status {}", r.status()));
            Verdict::Refuse(text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot confirm with {host} that you may read {repo}: {cause}"),
            ))
        }
    }
}

/// Finds out whether anonymous clients may pull `repo` (registries like Docker Hub want an
/// anonymous token even then), so that its cached content can be served while the upstream is
/// down. Done once per repository every few minutes, after a client with credentials was served.
pub async fn probe_public(shared: &Shared, target: &Target, path: &str, repo: &str) {
    let host = target.authority();
    let injected = shared
        .client
        .credentials()
        .injected(host, repo, None)
        .is_some();
    if injected || shared.access.is_public(host, repo).is_some() {
        return;
    }
    let Ok(req) = Request::head(format!("https://{host}{path}")).body(crate::body::empty()) else {
        return;
    };
    // Redirects are followed, and an anonymous token is fetched when the registry wants one:
    // only a final 2xx says anonymous clients may pull.
    let how = How {
        follow: true,
        anonymous: true,
    };
    let public = shared
        .client
        .send(req, how)
        .await
        .is_ok_and(|r| r.status().is_success());
    shared.access.set_public(host, repo, public);
    if public {
        shared.cache.set_public(host, repo, true).await;
    }
}
