//! Registry authorization on the proxy's side: injecting the operator's credentials (answering
//! the upstream's 401 challenges, caching tokens per scope), and making sure cached content of a
//! private repository reaches only clients the upstream authorizes for it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderValue};
use http::{request, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::{fetch_request, head_answer, send_following_redirects, upstream_is_down};
use crate::body::{text, Body};
use crate::cache::{Digest, Origin};
use crate::credentials::{Login, ProxyUser};
use crate::exchange::Target;
use crate::secret::{basic, Secret};
use crate::upstream::auth::{fetch_token, parse_challenge};
use crate::upstream::UpstreamError;
use crate::Shared;

/// How long a client's authorization for a repository is remembered.
const ALLOWED_FOR: Duration = Duration::from_secs(300);

/// Tokens obtained with injected credentials, and what the upstream said about clients.
#[derive(Debug, Default)]
pub struct AuthState {
    tokens: Mutex<HashMap<(String, String), (Secret, Instant)>>,
    allowed: Mutex<HashMap<(String, String, String), Instant>>,
    public: Mutex<HashMap<(String, String), (bool, Instant)>>,
    /// Token requests made with injected credentials (for tests and metrics).
    pub token_fetches: AtomicU64,
}

/// Sends a request upstream with the operator's credentials for its registry and repository,
/// if any apply (and the proxy user may use them): the client's `Authorization` is replaced, and
/// a 401 challenge (Bearer or Basic) is answered and the request repeated (when it has no body
/// to replay). Credentials the upstream still refuses are read again from their sources (a
/// rotated secret, an expired helper token) and tried once more. Without credentials the
/// request goes as is, the client's own `Authorization` included.
pub async fn send(
    shared: &Shared,
    mut req: Request<Body>,
    follow: bool,
) -> Result<Response<Incoming>, UpstreamError> {
    let authority = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let repo = repo_of(req.uri().path()).to_owned();
    let user = req.extensions().get::<ProxyUser>().cloned();
    let injected = |shared: &Shared| shared.logins.injected(&authority, &repo, user.as_ref());
    // Pulls only: a push or a delete goes with the client's own credentials, never the operator's.
    let pull = matches!(*req.method(), Method::GET | Method::HEAD);
    let Some((configured, login)) = injected(shared).filter(|_| pull) else {
        return go(shared, req, follow).await;
    };
    let scope = scope_of(&repo);
    let key = (configured, scope.clone());
    req.headers_mut().remove(header::AUTHORIZATION);
    if let Some(value) = shared.auth.token(&key) {
        req.headers_mut().insert(header::AUTHORIZATION, value);
    }
    let replay = http_body::Body::is_end_stream(req.body()).then(|| head_of(&req));
    let resp = go(shared, req, follow).await?;
    let (StatusCode::UNAUTHORIZED, Some(mut again)) = (resp.status(), replay) else {
        return Ok(resp);
    };
    let last = head_of(&again);
    let value = answer_challenge(shared, &login, &key, resp.headers()).await?;
    again.headers_mut().insert(header::AUTHORIZATION, value);
    let resp = go(shared, again, follow).await?;
    if resp.status() != StatusCode::UNAUTHORIZED || !shared.logins.reload_after_refusal().await {
        return Ok(resp);
    }
    let Some((configured, login)) = injected(shared) else {
        return Ok(resp);
    };
    tracing::info!(scope = %configured, "credentials refused upstream were read again; trying once more");
    let key = (configured, scope);
    let mut last = last;
    let value = answer_challenge(shared, &login, &key, resp.headers()).await?;
    last.headers_mut().insert(header::AUTHORIZATION, value);
    go(shared, last, follow).await
}

async fn go(
    shared: &Shared,
    req: Request<Body>,
    follow: bool,
) -> Result<Response<Incoming>, UpstreamError> {
    if follow {
        send_following_redirects(shared, req).await
    } else {
        shared.upstream.send(req).await
    }
}

/// A body-less copy of a request's head, to replay it with credentials.
fn head_of(req: &Request<Body>) -> Request<Body> {
    let mut again = Request::new(crate::body::empty());
    *again.method_mut() = req.method().clone();
    *again.uri_mut() = req.uri().clone();
    *again.headers_mut() = req.headers().clone();
    *again.extensions_mut() = req.extensions().clone();
    again
}

/// The repository of a `/v2/REPO/…` path; empty for `/v2/` and other paths.
pub fn repo_of(path: &str) -> &str {
    let rest = path.strip_prefix("/v2/").unwrap_or("");
    ["/manifests/", "/blobs/", "/tags/", "/referrers/"]
        .iter()
        .find_map(|m| rest.find(m).map(|at| &rest[..at]))
        .unwrap_or("")
}

/// Whether every resource of a token `scope` asks for `pull` and nothing more.
fn pull_only(scope: &str) -> bool {
    scope.split(' ').all(|resource| {
        resource
            .rsplit_once(':')
            .is_some_and(|(_, actions)| actions == "pull")
    })
}

/// `repository:REPO:pull` for a repository (only reads are sent with injected credentials);
/// empty for none.
fn scope_of(repo: &str) -> String {
    if repo.is_empty() {
        return String::new();
    }
    format!("repository:{repo}:pull")
}

/// Answers a 401's challenge with `login`: a bearer token (fetched with Basic credentials and
/// cached until shortly before it expires) or Basic credentials themselves.
async fn answer_challenge(
    shared: &Shared,
    login: &Login,
    key: &(String, String),
    headers: &HeaderMap,
) -> Result<HeaderValue, UpstreamError> {
    let raw = headers
        .get(header::WWW_AUTHENTICATE)
        .ok_or_else(|| UpstreamError::Auth("401 without a WWW-Authenticate challenge".into()))?
        .to_str()
        .map_err(|_| UpstreamError::Auth("WWW-Authenticate is not text".into()))?;
    let challenge = parse_challenge(raw).map_err(UpstreamError::Auth)?;
    let credentials = basic(&login.username, &login.password);
    let (value, valid) = match challenge.scheme.as_str() {
        "basic" => (credentials, Duration::from_secs(3600)),
        "bearer" => {
            // The registry names the scope, but the operator's credentials only ever ask to pull.
            let scope = challenge
                .params
                .get("scope")
                .filter(|s| pull_only(s))
                .cloned()
                .unwrap_or(key.1.clone());
            shared.auth.token_fetches.fetch_add(1, Ordering::Relaxed);
            let token = fetch_token(
                &shared.upstream,
                &challenge,
                &scope,
                Some(credentials.expose()),
            )
            .await?;
            // Renew a little early, so a token never expires on its way to the upstream.
            let life = Duration::from_secs(token.expires_in);
            let margin = (life / 10)
                .max(Duration::from_secs(5))
                .min(Duration::from_secs(30));
            (
                Secret::new(format!("Bearer {}", token.value.expose())),
                life.saturating_sub(margin),
            )
        }
        other => {
            return Err(UpstreamError::Auth(format!(
                "unsupported WWW-Authenticate scheme {other:?}"
            )))
        }
    };
    let header = sensitive(&value)?;
    shared.auth.store(key.clone(), value, valid);
    Ok(header)
}

fn sensitive(value: &Secret) -> Result<HeaderValue, UpstreamError> {
    let mut v = HeaderValue::from_str(value.expose())
        .map_err(|_| UpstreamError::Auth("credentials are not header text".into()))?;
    v.set_sensitive(true);
    Ok(v)
}

impl AuthState {
    fn token(&self, key: &(String, String)) -> Option<HeaderValue> {
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let (value, until) = tokens.get(key)?;
        (Instant::now() < *until)
            .then(|| sensitive(value).ok())
            .flatten()
    }

    fn store(&self, key: (String, String), value: Secret, valid: Duration) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        tokens.retain(|_, (_, until)| *until > now);
        tokens.insert(key, (value, now + valid));
    }

    fn was_allowed(&self, key: &(String, String, String)) -> bool {
        let allowed = self.allowed.lock().unwrap_or_else(|p| p.into_inner());
        allowed
            .get(key)
            .is_some_and(|at| at.elapsed() < ALLOWED_FOR)
    }

    fn allow(&self, key: (String, String, String)) {
        let mut allowed = self.allowed.lock().unwrap_or_else(|p| p.into_inner());
        allowed.retain(|_, at| at.elapsed() < ALLOWED_FOR);
        allowed.insert(key, Instant::now());
    }

    /// What was last found about the repository, if recently (a repository can go private).
    fn is_public(&self, host: &str, repo: &str) -> Option<bool> {
        let public = self.public.lock().unwrap_or_else(|p| p.into_inner());
        let (value, at) = public.get(&(host.to_owned(), repo.to_owned()))?;
        (at.elapsed() < ALLOWED_FOR).then_some(*value)
    }

    fn set_public(&self, host: &str, repo: &str, value: bool) {
        let mut public = self.public.lock().unwrap_or_else(|p| p.into_inner());
        public.retain(|_, (_, at)| at.elapsed() < ALLOWED_FOR);
        public.insert((host.to_owned(), repo.to_owned()), (value, Instant::now()));
    }
}

/// Who a client is to the upstream: a hash of its `Authorization` (empty: anonymous).
fn client_key(headers: &HeaderMap) -> String {
    use sha2::Digest as _;
    match headers.get(header::AUTHORIZATION) {
        None => String::new(),
        Some(v) => hex::encode(&sha2::Sha256::digest(v.as_bytes())[..16]),
    }
}

/// Records that the upstream served `repo` to this client (called when a fetch succeeded with
/// the client's own headers): an anonymous success makes the repository public.
pub async fn served(shared: &Shared, parts: &request::Parts, target: &Target, repo: &str) {
    served_to(shared, &parts.headers, target, repo).await
}

/// [`served`], from the headers the upstream request carried.
pub async fn served_to(shared: &Shared, headers: &HeaderMap, target: &Target, repo: &str) {
    let host = target.authority();
    // Whatever credentials the request went with, a repository they may read is not public.
    if shared.logins.injected(&host, repo, None).is_some() {
        return;
    }
    let who = client_key(headers);
    if who.is_empty() && shared.auth.is_public(&host, repo) != Some(true) {
        shared.auth.set_public(&host, repo, true);
        shared.cache.store.set_public(&host, repo).await;
    }
    shared.auth.allow((who, host, repo.to_owned()));
}

/// What may be done with cached (or downloading) bytes for one client.
pub enum Access {
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
        let mut sources = shared.cache.store.sources(digest).await;
        sources.extend(in_flight.cloned());
        if sources.contains(asked) {
            return Provenance::OWN;
        }
        let mut public = false;
        for source in &sources {
            public = match shared.auth.is_public(&source.host, &source.repo) {
                Some(known) => known,
                None => {
                    let store = &shared.cache.store;
                    store.is_public(&source.host, &source.repo).await
                }
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
/// Bytes that this origin never served are a [`Access::Miss`] unless they are public: another
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
) -> Access {
    if !prov.bound && !prov.public {
        return Access::Miss;
    }
    let host = target.authority();
    let user = parts.extensions.get::<ProxyUser>();
    let injected = shared.logins.injected(&host, repo, user).is_some();
    let key = (client_key(&parts.headers), host.clone(), repo.to_owned());
    let public_repo = shared.auth.is_public(&host, repo) == Some(true);
    if (prov.bound && (injected || public_repo)) || shared.auth.was_allowed(&key) {
        return Access::Serve;
    }
    let answer = if upstream_down {
        Err(UpstreamError::Connect("the upstream is down".into()))
    } else {
        match fetch_request(target, parts, Method::HEAD) {
            Ok(head) => send(shared, head, true).await,
            Err(reason) => return Access::Refuse(text(StatusCode::BAD_REQUEST, reason)),
        }
    };
    match answer {
        Ok(resp) if resp.status().is_success() => {
            served(shared, parts, target, repo).await;
            Access::Serve
        }
        Ok(resp) if resp.status().is_redirection() => Access::Refuse(text(
            StatusCode::BAD_GATEWAY,
            format!(
                "{host} answered {} to the authorization check for {repo}, and a redirect is \
                 not an authorization",
                resp.status()
            ),
        )),
        Ok(resp) if !upstream_is_down(resp.status()) => {
            if key.0.is_empty() {
                // Refused to an anonymous client: not (or no longer) public.
                shared.auth.set_public(&host, repo, false);
                shared.cache.store.clear_public(&host, repo).await;
            }
            tracing::info!(repo, status = %resp.status(), "cached content refused: the upstream does not authorize this client");
            Access::Refuse(head_answer(resp, &parts.method, &host))
        }
        outcome => {
            // The upstream cannot say: only what is known public (or injected) may be served.
            if prov.bound && (injected || shared.cache.store.is_public(&host, repo).await) {
                return Access::Serve;
            }
            let cause =
                outcome.map_or_else(|e| e.to_string(), |r| format!("status {}", r.status()));
            Access::Refuse(text(
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
    let injected = shared.logins.injected(&host, repo, None).is_some();
    if injected || shared.auth.is_public(&host, repo).is_some() {
        return;
    }
    let head = |auth: Option<String>| {
        let mut req = Request::head(format!("https://{host}{path}"))
            .body(crate::body::empty())
            .ok()?;
        if let Some(a) = auth {
            req.headers_mut()
                .insert(header::AUTHORIZATION, HeaderValue::from_str(&a).ok()?);
        }
        Some(req)
    };
    let Some(req) = head(None) else { return };
    let mut public = false;
    // Redirects are followed: only a final 2xx says anonymous clients may pull.
    if let Ok(resp) = send_following_redirects(shared, req).await {
        public = resp.status().is_success();
        let challenge = resp
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_challenge(v).ok())
            .filter(|c| c.scheme == "bearer");
        if let (false, Some(challenge)) = (public, challenge) {
            let scope = format!("repository:{repo}:pull");
            if let Ok(token) = fetch_token(&shared.upstream, &challenge, &scope, None).await {
                let bearer = format!("Bearer {}", token.value.expose());
                if let Some(req) = head(Some(bearer)) {
                    public = send_following_redirects(shared, req)
                        .await
                        .is_ok_and(|r| r.status().is_success());
                }
            }
        }
    }
    shared.auth.set_public(&host, repo, public);
    if public {
        shared.cache.store.set_public(&host, repo).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_pull_scopes_are_asked_with_injected_credentials() {
        assert!(super::pull_only("repository:a/b:pull"));
        assert!(super::pull_only("repository:a/b:pull repository:c:pull"));
        assert!(!super::pull_only("repository:a/b:pull,push"));
        assert!(!super::pull_only("repository:a/b:*"));
        assert!(!super::pull_only("repository:a/b:pull registry:catalog:*"));
        assert_eq!(super::repo_of("/v2/a/b/manifests/v1"), "a/b");
        assert_eq!(super::repo_of("/v2/"), "");
    }
}
