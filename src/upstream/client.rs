//! The upstream client as the rest of regproxy uses it, in layers: the operator's credentials
//! (for pulls, when the proxy user may use them) with the registry's token exchange; an
//! anonymous token when asked for; redirects followed on the proxy's side; and under them the
//! pooled connections with their timeouts and metrics ([`Upstream`]). It needs no CA and no cache,
//! so that `regproxy ratelimit` can use it alone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;

use super::auth::{fetch_token, parse_challenge};
use super::{head_of, Upstream, UpstreamError};
use crate::body::{self, Body};
use crate::credentials::{Credentials, Login, ProxyUser};
use crate::secret::{basic, Secret};

/// Redirect hops followed upstream-side before giving up.
const MAX_REDIRECTS: usize = 5;

/// Marks a response that came from where a redirect led, away from the registry.
#[derive(Debug, Clone, Copy)]
struct LeftOrigin;

/// How one request is sent.
#[derive(Debug, Clone, Copy, Default)]
pub struct How {
    /// Follow redirects (to a CDN or an object store) on the proxy's side.
    pub follow: bool,
    /// Answer a bearer challenge with an anonymous pull token when no credentials are injected
    /// and the request carries none (for the proxy's own requests, never a client's).
    pub anonymous: bool,
}

/// The layered client; one per process.
pub struct Client {
    http: Upstream,
    credentials: Arc<Credentials>,
    // Bearer tokens (or Basic values) got with injected credentials, by (configured scope,
    // token scope), until shortly before they expire.
    tokens: Mutex<HashMap<(String, String), (Secret, Instant)>>,
    // Ports a redirect may lead to besides 443: those CONNECT may reach.
    allow_port: Vec<u16>,
    /// Token requests made with injected credentials (for tests and metrics).
    pub token_fetches: AtomicU64,
}

impl How {
    /// Redirects followed, no anonymous token: what a client's pull of an object needs.
    pub fn following() -> How {
        How {
            follow: true,
            anonymous: false,
        }
    }
}

impl Client {
    /// A client over the pooled `http` connections, injecting `credentials`.
    pub fn new(http: Upstream, credentials: Arc<Credentials>, allow_port: Vec<u16>) -> Client {
        Client {
            http,
            credentials,
            tokens: Mutex::default(),
            allow_port,
            token_fetches: AtomicU64::new(0),
        }
    }

    /// Where requests and their outcomes are counted.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.http.metrics
    }

    /// Connections at once for one large blob's ranged pieces; 1 for none.
    pub fn blob_connections(&self) -> usize {
        self.http.blob_connections
    }

    /// How long an upstream may take to start answering (`--upstream-timeout`).
    pub fn timeout(&self) -> std::time::Duration {
        self.http.timeout
    }

    /// The credentials in force and their sources.
    pub fn credentials(&self) -> &Arc<Credentials> {
        &self.credentials
    }

    /// Sends a request upstream with the operator's credentials for its registry and repository,
    /// if any apply (pulls only, and only those the proxy user may use): the client's
    /// `Authorization` is replaced, and a 401 challenge (Bearer or Basic) is answered and the
    /// request repeated (when it has no body to replay). Credentials the upstream still refuses
    /// are read again from their sources (a rotated secret, an expired helper token) and tried
    /// once more. Without credentials the request goes as is, the client's own `Authorization`
    /// included, or with an anonymous token when `how.anonymous` asks for one.
    pub async fn send(
        &self,
        mut req: Request<Body>,
        how: How,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let repo = repo_of(req.uri().path()).to_owned();
        let user = req.extensions().get::<ProxyUser>().cloned();
        let injected = || self.credentials.injected(&authority, &repo, user.as_ref());
        // Pulls of the registry API only: a push or a delete, or anything outside /v2/ on the
        // same host (Harbor's, Quay's or Artifactory's own API), goes with the client's own
        // credentials, never the operator's.
        let path = req.uri().path();
        let registry_api = path == "/v2/" || (!repo.is_empty() && plain_repository(&repo));
        let pull = registry_api && matches!(*req.method(), Method::GET | Method::HEAD);
        let Some((configured, login)) = injected().filter(|_| pull) else {
            return self.anonymously(req, &repo, how).await;
        };
        let scope = scope_of(&repo);
        let key = (configured, scope.clone());
        req.headers_mut().remove(header::AUTHORIZATION);
        let cached = self.token(&key);
        tracing::debug!(credentials = %key.0, scope = %key.1, cached_token = cached.is_some(), "pulling with the configured credentials");
        if let Some(value) = cached {
            req.headers_mut().insert(header::AUTHORIZATION, value);
        }
        let replay = http_body::Body::is_end_stream(req.body()).then(|| head_of(&req));
        let resp = self.go(req, how.follow).await?;
        let (StatusCode::UNAUTHORIZED, Some(mut again)) = (resp.status(), replay) else {
            return Ok(resp);
        };
        if resp.extensions().get::<LeftOrigin>().is_some() {
            // A challenge from where a redirect led: the registry's credentials are not for it.
            return Ok(resp);
        }
        let mut last = head_of(&again);
        let value = self.answer(&login, &key, resp.headers()).await?;
        again.headers_mut().insert(header::AUTHORIZATION, value);
        let resp = self.go(again, how.follow).await?;
        if resp.status() != StatusCode::UNAUTHORIZED
            || !self.credentials.reload_after_refusal().await
        {
            return Ok(resp);
        }
        let Some((configured, login)) = injected() else {
            return Ok(resp);
        };
        tracing::info!(scope = %configured, "credentials refused upstream were read again; trying once more");
        let key = (configured, scope);
        let value = self.answer(&login, &key, resp.headers()).await?;
        last.headers_mut().insert(header::AUTHORIZATION, value);
        self.go(last, how.follow).await
    }

    /// A request without injected credentials: as it is, or once more with an anonymous pull
    /// token if `how.anonymous` and the registry asked for a bearer token.
    async fn anonymously(
        &self,
        req: Request<Body>,
        repo: &str,
        how: How,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let retry = (how.anonymous
            && !req.headers().contains_key(header::AUTHORIZATION)
            && http_body::Body::is_end_stream(req.body()))
        .then(|| head_of(&req));
        let resp = self.go(req, how.follow).await?;
        let (StatusCode::UNAUTHORIZED, Some(mut again)) = (resp.status(), retry) else {
            return Ok(resp);
        };
        tracing::debug!(
            repo,
            "the upstream wants a token: fetching an anonymous one"
        );
        let token = self.anonymous_token(resp.headers(), repo).await?;
        again.headers_mut().insert(header::AUTHORIZATION, token);
        self.go(again, how.follow).await
    }

    /// An anonymous pull token for `repo`, from the bearer challenge in `headers`.
    pub async fn anonymous_token(
        &self,
        headers: &HeaderMap,
        repo: &str,
    ) -> Result<HeaderValue, UpstreamError> {
        let challenge = challenge_in(headers)?;
        if challenge.scheme != "bearer" {
            return Err(UpstreamError::Auth(format!(
                "the registry wants {} credentials, and none are configured",
                challenge.scheme
            )));
        }
        let token = fetch_token(&self.http, &challenge, &scope_of(repo), None).await?;
        sensitive(&Secret::new(format!("Bearer {}", token.value.expose())))
    }

    async fn go(
        &self,
        req: Request<Body>,
        follow: bool,
    ) -> Result<Response<Incoming>, UpstreamError> {
        if follow {
            self.follow_redirects(req).await
        } else {
            self.http.send(req).await
        }
    }

    /// Sends a body-less request and follows redirects (CDN, object store) on the proxy's side.
    ///
    /// The signed URL is fetched directly. `Authorization` is dropped once a redirect leaves the
    /// original scheme and authority, because the registry's token means nothing (and must not
    /// leak) elsewhere; a redirect from https to plain http, or to a port not allowed, is refused.
    pub async fn follow_redirects(
        &self,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let (parts, body) = req.into_parts();
        let origin = parts.uri.clone();
        let mut current = origin.clone();
        let mut headers = parts.headers.clone();
        let mut resp = self
            .http
            .send(Request::from_parts(parts.clone(), body))
            .await?;
        for _ in 0..MAX_REDIRECTS {
            let Some(next) = redirect_target(&resp, &current) else {
                break;
            };
            self.check_redirect(&current, &next)?;
            if next.scheme() != origin.scheme() || next.authority() != origin.authority() {
                headers.remove(header::AUTHORIZATION);
            }
            tracing::debug!(to = %next.host().unwrap_or(""), "following redirect upstream-side");
            let mut req = Request::new(body::empty());
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = next.clone();
            *req.headers_mut() = headers.clone();
            *req.extensions_mut() = parts.extensions.clone();
            resp = self.http.send(req).await?;
            current = next;
        }
        if current.scheme() != origin.scheme() || current.authority() != origin.authority() {
            resp.extensions_mut().insert(LeftOrigin);
        }
        Ok(resp)
    }

    /// Refuses downgrades to plain http and ports that CONNECT could not reach either.
    fn check_redirect(&self, from: &Uri, to: &Uri) -> Result<(), UpstreamError> {
        let refuse = |why: String| Err(UpstreamError::Redirect(why));
        if from.scheme_str() == Some("https") && to.scheme_str() != Some("https") {
            return refuse(format!(
                "refused redirect from https to {}",
                to.scheme_str().unwrap_or("?")
            ));
        }
        let port = to.port_u16().unwrap_or(443);
        if port != 443 && !self.allow_port.contains(&port) {
            return refuse(format!(
                "refused redirect to port {port} (not an allowed port)"
            ));
        }
        Ok(())
    }

    /// Answers a 401's challenge with `login`: a bearer token (fetched with Basic credentials and
    /// cached until shortly before it expires) or Basic credentials themselves.
    async fn answer(
        &self,
        login: &Login,
        key: &(String, String),
        headers: &HeaderMap,
    ) -> Result<HeaderValue, UpstreamError> {
        let challenge = challenge_in(headers)?;
        let realm = challenge.params.get("realm").map_or("-", String::as_str);
        tracing::debug!(scheme = %challenge.scheme, realm, credentials = %key.0, "answering the upstream's challenge with the configured credentials");
        let credentials = basic(&login.username, &login.password);
        let (value, valid) = match challenge.scheme.as_str() {
            "basic" => (credentials, Duration::from_secs(3600)),
            "bearer" => {
                // The registry names the scope, but the operator's credentials only ask to pull.
                let scope = challenge
                    .params
                    .get("scope")
                    .filter(|s| pull_only(s))
                    .cloned()
                    .unwrap_or(key.1.clone());
                self.token_fetches.fetch_add(1, Ordering::Relaxed);
                let basic = Some(credentials.expose());
                let token = fetch_token(&self.http, &challenge, &scope, basic).await?;
                tracing::debug!(
                    scope,
                    expires_in = token.expires_in,
                    "token exchange done; token cached"
                );
                // Renew a little early, so a token never expires on its way to the upstream.
                let life = Duration::from_secs(token.expires_in);
                let margin = (life / 10)
                    .max(Duration::from_secs(5))
                    .min(Duration::from_secs(30));
                let value = Secret::new(format!("Bearer {}", token.value.expose()));
                (value, life.saturating_sub(margin))
            }
            other => {
                return Err(UpstreamError::Auth(format!(
                    "unsupported WWW-Authenticate scheme {other:?}"
                )))
            }
        };
        let header = sensitive(&value)?;
        let mut tokens = self.tokens.lock();
        let now = Instant::now();
        tokens.retain(|_, (_, until)| *until > now);
        tokens.insert(key.clone(), (value, now + valid));
        Ok(header)
    }

    fn token(&self, key: &(String, String)) -> Option<HeaderValue> {
        let tokens = self.tokens.lock();
        let (value, until) = tokens.get(key)?;
        (Instant::now() < *until)
            .then(|| sensitive(value).ok())
            .flatten()
    }
}

/// The parsed `WWW-Authenticate` challenge of a 401.
fn challenge_in(headers: &HeaderMap) -> Result<super::auth::Challenge, UpstreamError> {
    let raw = headers
        .get(header::WWW_AUTHENTICATE)
        .ok_or_else(|| UpstreamError::Auth("401 without a WWW-Authenticate challenge".into()))?
        .to_str()
        .map_err(|_| UpstreamError::Auth("WWW-Authenticate is not text".into()))?;
    Ok(parse_challenge(raw)?)
}

/// A header value that is never logged.
fn sensitive(value: &Secret) -> Result<HeaderValue, UpstreamError> {
    let mut v = HeaderValue::from_str(value.expose())
        .map_err(|_| UpstreamError::Auth("credentials are not header text".into()))?;
    v.set_sensitive(true);
    Ok(v)
}

/// The repository of a `/v2/REPO/…` path; empty for `/v2/` and other paths.
pub fn repo_of(path: &str) -> &str {
    let rest = path.strip_prefix("/v2/").unwrap_or("");
    ["/manifests/", "/blobs/", "/tags/", "/referrers/"]
        .iter()
        .find_map(|m| rest.find(m).map(|at| &rest[..at]))
        .unwrap_or("")
}

/// Whether `repo` names a repository as the distribution spec spells one: no empty, `.` or `..`
/// component, which an upstream could resolve to another repository than the one the name's
/// prefix (and so its credentials) say.
pub fn plain_repository(repo: &str) -> bool {
    repo.split('/')
        .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Whether every resource of a token `scope` asks for `pull` and nothing more.
fn pull_only(scope: &str) -> bool {
    scope.split(' ').all(|resource| {
        resource
            .rsplit_once(':')
            .is_some_and(|(_, actions)| actions == "pull")
    })
}

/// `repository:REPO:pull` for a repository; empty for none.
fn scope_of(repo: &str) -> String {
    if repo.is_empty() {
        return String::new();
    }
    format!("repository:{repo}:pull")
}

/// Where a redirect answer points, resolved against the URL that was requested.
fn redirect_target(resp: &Response<Incoming>, base: &Uri) -> Option<Uri> {
    if !matches!(resp.status().as_u16(), 301 | 302 | 303 | 307 | 308) {
        return None;
    }
    let location = resp.headers().get(header::LOCATION)?.to_str().ok()?;
    let uri: Uri = location.parse().ok()?;
    if uri.scheme().is_some() {
        return Some(uri);
    }
    let scheme = base.scheme_str().unwrap_or("https");
    format!("{scheme}://{}{}", base.authority()?, uri.path_and_query()?)
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pull_scopes_are_asked_with_injected_credentials() {
        assert!(pull_only("repository:a/b:pull"));
        assert!(pull_only("repository:a/b:pull repository:c:pull"));
        assert!(!pull_only("repository:a/b:pull,push"));
        assert!(!pull_only("repository:a/b:*"));
        assert!(!pull_only("repository:a/b:pull registry:catalog:*"));
        assert_eq!(repo_of("/v2/a/b/manifests/v1"), "a/b");
        assert_eq!(repo_of("/v2/"), "");
        assert!(plain_repository("org-a/app"));
        for odd in ["org-a/../org-b", "org-a//x", "./a", "a/.", ""] {
            assert!(!plain_repository(odd), "{odd}");
        }
    }
}
