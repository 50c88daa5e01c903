//! A token server for distribution's token authentication
//! (<https://distribution.github.io/distribution/spec/auth/token/>), for registries started with
//! [`Registry::start_with_auth`] and [`TokenServer::auth_yaml`].
//!
//! It serves `GET /token?service=…&scope=…` (HTTP Basic auth, or anonymous) and the OAuth2 form
//! `POST /token` (`grant_type=password` or `refresh_token`) on 127.0.0.1:PORT, one request per
//! connection, **both TLS and plain HTTP on the same port** (the first byte tells them apart). Its
//! TLS certificate is for `auth.test`, `127.0.0.1` and `localhost`, signed by its own test CA
//! ([`TokenServer::ca_cert_path`]).
//!
//! Policy: the right user and password get every action they ask for; anonymous clients get
//! `pull` on repositories under `public/` and nothing else; a wrong user or password is a 401.
//!
//! Tokens are JWTs signed with ES256 by a self-signed certificate (carried in the `x5c` header),
//! which is also the registry's `rootcertbundle`. Claims: `iss` [`TOKEN_ISSUER`], `sub` (the user,
//! or `""`), `aud` (the `service` asked for), `exp`/`nbf`/`iat`, `jti`, `access`.
//!
//! Realm: [`TokenServer::realm`] is `https://127.0.0.1:PORT/token`, which needs no name
//! resolution. A Go client (skopeo) fetches the token with the TLS configuration of the registry
//! it talks to (its `--cert-dir`), so it must trust the token server's CA too: see
//! [`TokenServer::trust_in`]. Go clients never send 127.0.0.1 through `HTTPS_PROXY`, so skopeo via
//! regproxy fetches tokens straight from the token server. [`TokenServer::http_realm`] avoids
//! the trust question altogether.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use super::*;

/// The host name of the token server (through regproxy, with [`TokenServer::configure_proxy`]).
pub const TOKEN_HOST: &str = "auth.test";
/// The `iss` of every token, and the registry's `issuer`.
pub const TOKEN_ISSUER: &str = "regproxy-test-issuer";
/// The registry's `service` (the `aud` of tokens it accepts).
pub const TOKEN_SERVICE: &str = "registry-test";
/// The refresh token that `POST /token` hands out with `access_type=offline` and accepts with
/// `grant_type=refresh_token` (followed by `:USER`).
pub const REFRESH_TOKEN_PREFIX: &str = "regproxy-test-refresh";

/// A distribution token server on 127.0.0.1:PORT (TLS and plain HTTP). Stops accepting on drop.
pub struct TokenServer {
    port: u16,
    dir: PathBuf,
    user: String,
    password: String,
    ttl_secs: Arc<AtomicU64>,
    /// Every request head (request line and headers) the server has read, in order.
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

struct Shared {
    user: String,
    password: String,
    ttl_secs: Arc<AtomicU64>,
    requests: Arc<Mutex<Vec<String>>>,
    key: EncodingKey,
    /// The signing certificate, base64 DER, as the `x5c` header carries it.
    x5c: String,
    tls: Arc<rustls::ServerConfig>,
    jti: AtomicU64,
}

impl TokenServer {
    /// Starts a token server whose files (TLS certs under `tls/`, the token signing certificate
    /// `signing.crt` and key) live in `dir` (created if missing; not a registry's dir). Tokens
    /// last 300 s.
    pub fn start(dir: &Path, user: &str, password: &str) -> TokenServer {
        Self::start_with_ttl(dir, user, password, Duration::from_secs(300))
    }

    /// Like [`TokenServer::start`], with tokens that last `ttl` (`expires_in` and `exp`). Note
    /// that skopeo treats any `expires_in` under 60 s as 60 s, and distribution accepts a token
    /// up to 60 s past its `exp`.
    pub fn start_with_ttl(dir: &Path, user: &str, password: &str, ttl: Duration) -> TokenServer {
        fs::create_dir_all(dir).unwrap();
        let tls_dir = dir.join("tls");
        make_test_certs(
            &tls_dir,
            "regproxy test token server CA",
            &[TOKEN_HOST, "127.0.0.1", "localhost"],
        );
        let mut tls = server_tls_config(&tls_dir);
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let (key, cert) = make_signing_cert(dir, "signing", "regproxy test token signer");
        let ttl_secs = Arc::new(AtomicU64::new(ttl.as_secs()));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::new(Shared {
            user: user.to_string(),
            password: password.to_string(),
            ttl_secs: ttl_secs.clone(),
            requests: requests.clone(),
            key: EncodingKey::from_ec_der(&key.serialize_der()),
            x5c: STANDARD.encode(cert.der()),
            tls: Arc::new(tls),
            jti: AtomicU64::new(0),
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        thread::Builder::new()
            .name(format!("token-server-{port}"))
            .spawn(move || {
                for tcp in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(tcp) = tcp else { continue };
                    let shared = shared.clone();
                    thread::spawn(move || serve_connection(tcp, &shared));
                }
            })
            .unwrap();
        TokenServer {
            port,
            dir: dir.to_path_buf(),
            user: user.to_string(),
            password: password.to_string(),
            ttl_secs,
            requests,
            stop,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }
    /// `auth.test:PORT`: the name the token server has through regproxy.
    pub fn host(&self) -> String {
        format!("{TOKEN_HOST}:{}", self.port)
    }
    /// `127.0.0.1:PORT`
    pub fn direct_host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// `https://127.0.0.1:PORT/token`: the realm [`TokenServer::auth_yaml`] uses.
    pub fn realm(&self) -> String {
        format!("https://127.0.0.1:{}/token", self.port)
    }
    /// `http://127.0.0.1:PORT/token`: a plain-HTTP realm (no TLS trust needed by anyone).
    pub fn http_realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }
    /// `https://auth.test:PORT/token`: a realm only clients of regproxy (configured with
    /// [`TokenServer::configure_proxy`]) can reach; direct pushes cannot.
    pub fn named_realm(&self) -> String {
        format!("https://{}/token", self.host())
    }

    /// The registry's `auth:` section for token auth with realm [`TokenServer::realm`].
    pub fn auth_yaml(&self) -> String {
        self.auth_yaml_with_realm(&self.realm())
    }

    /// The registry's `auth:` section for token auth with `realm` (distribution 2.8's keys:
    /// realm, service, issuer, rootcertbundle).
    pub fn auth_yaml_with_realm(&self, realm: &str) -> String {
        format!(
            "auth:\n  token:\n    realm: {realm}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
            self.root_cert_bundle_path().display()
        )
    }

    /// `(user, password)` as a [`Registry::start_with_auth`] `creds` argument.
    pub fn creds(&self) -> Option<(String, String)> {
        Some((self.user.clone(), self.password.clone()))
    }
    /// `user:password`, the form skopeo's `--creds` options take.
    pub fn creds_arg(&self) -> String {
        format!("{}:{}", self.user, self.password)
    }

    /// The CA (PEM) of the token server's TLS certificate: what the proxy (upstream) and direct
    /// clients must trust.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join("tls/ca.crt")
    }
    /// The token signing certificate (PEM, self-signed): the registry's `rootcertbundle`.
    pub fn root_cert_bundle_path(&self) -> PathBuf {
        self.dir.join("signing.crt")
    }

    /// Copies the token server's CA into `cert_dir` as `token-server-ca.crt`, so that a skopeo
    /// `--cert-dir` (e.g. [`Registry::cert_dir`]) trusts the realm too (containers/image loads
    /// every `*.crt` in the directory as a CA, and fetches tokens with the registry's TLS
    /// configuration).
    pub fn trust_in(&self, cert_dir: &Path) {
        fs::create_dir_all(cert_dir).unwrap();
        fs::copy(self.ca_cert_path(), cert_dir.join("token-server-ca.crt")).unwrap_or_else(|e| {
            panic!("copying the token server CA to {}: {e}", cert_dir.display())
        });
    }

    /// Makes a proxy config reach the token server as `auth.test:PORT`: intercept `auth.test`,
    /// resolve it to 127.0.0.1:PORT, trust the token server's CA upstream, allow CONNECT to PORT.
    pub fn configure_proxy(&self, config: &mut Config) {
        reach_test_host(config, TOKEN_HOST, self.port, self.ca_cert_path());
    }

    /// Changes the lifetime of tokens issued from now on.
    pub fn set_ttl(&self, ttl: Duration) {
        self.ttl_secs.store(ttl.as_secs(), Ordering::SeqCst);
    }

    /// How many requests for `/token` (any method, any outcome) the server has read.
    pub fn token_requests(&self) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|h| request_path(h).is_some_and(|p| p == "/token"))
            .count()
    }
    /// Every request head the server has read so far, in order.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
    /// The shared list of request heads (appended to as requests arrive).
    pub fn requests_handle(&self) -> Arc<Mutex<Vec<String>>> {
        self.requests.clone()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_secs(1),
        );
    }
}

/// The claims of a JWT (its middle part, decoded), without checking anything.
pub fn jwt_claims(token: &str) -> serde_json::Value {
    jwt_part(token, 1)
}

/// The header of a JWT (its first part, decoded), without checking anything.
pub fn jwt_header(token: &str) -> serde_json::Value {
    jwt_part(token, 0)
}

fn jwt_part(token: &str, i: usize) -> serde_json::Value {
    let part = token
        .split('.')
        .nth(i)
        .unwrap_or_else(|| panic!("not a JWT: {token:?}"));
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .unwrap_or_else(|e| panic!("JWT part is not base64url: {part:?}: {e}"));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("JWT part is not JSON: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Serving
// ---------------------------------------------------------------------------------------------

/// One request per connection: TLS when the first byte is a TLS handshake record, else HTTP.
fn serve_connection(tcp: TcpStream, shared: &Shared) {
    tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    tcp.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut first = [0u8; 1];
    match tcp.peek(&mut first) {
        Ok(1) => {}
        _ => return,
    }
    if first[0] == 0x16 {
        let conn = rustls::ServerConnection::new(shared.tls.clone()).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        serve_request(&mut tls, shared);
        close_tls(tls);
    } else {
        let mut tcp = tcp;
        serve_request(&mut tcp, shared);
        let _ = tcp.flush();
    }
}

fn serve_request(s: &mut (impl Read + Write), shared: &Shared) {
    let Some(head) = read_request_head(s) else {
        return;
    };
    shared.requests.lock().unwrap().push(head.clone());
    let body = match header_value(&head, "content-length").and_then(|l| l.parse::<usize>().ok()) {
        Some(n) if n <= 1 << 20 => {
            let mut body = vec![0u8; n];
            if s.read_exact(&mut body).is_err() {
                return;
            }
            String::from_utf8_lossy(&body).into_owned()
        }
        Some(_) => return respond(s, 413, &[], "{}"),
        None => String::new(),
    };
    let (status, extra, json) = answer(&head, &body, shared);
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
    respond(s, status, &extra, &json.to_string());
}

fn respond(s: &mut impl Write, status: u16, extra: &[(&str, &str)], body: &str) {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Other",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in extra {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(body);
    let _ = s.write_all(out.as_bytes());
}

type Answer = (u16, Vec<(&'static str, String)>, serde_json::Value);

fn error(status: u16, code: &str, message: &str) -> Answer {
    let mut extra = Vec::new();
    if status == 401 {
        extra.push((
            "WWW-Authenticate",
            "Basic realm=\"regproxy test token server\"".to_string(),
        ));
    }
    (
        status,
        extra,
        serde_json::json!({
            "error": code,
            "error_description": message,
            "errors": [{"code": code.to_uppercase(), "message": message}],
        }),
    )
}

fn answer(head: &str, body: &str, shared: &Shared) -> Answer {
    let line = head.lines().next().unwrap_or_default();
    let method = line.split(' ').next().unwrap_or_default();
    let target = line.split(' ').nth(1).unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path != "/token" {
        return error(404, "not_found", "only /token is served here");
    }
    // Who is asking, for what service and scopes.
    let (user, service, scopes, offline) = match method {
        "GET" => {
            let params = parse_form(query);
            let user = match basic_user(head, shared) {
                Ok(u) => u,
                Err(()) => return error(401, "unauthorized", "wrong user name or password"),
            };
            let scopes: Vec<String> = params
                .iter()
                .filter(|(k, _)| k == "scope")
                .flat_map(|(_, v)| v.split(' ').map(str::to_string).collect::<Vec<_>>())
                .filter(|s| !s.is_empty())
                .collect();
            (user, param(&params, "service"), scopes, false)
        }
        "POST" => {
            let params = parse_form(body);
            let user = match param(&params, "grant_type").as_str() {
                "password" => {
                    let (u, p) = (param(&params, "username"), param(&params, "password"));
                    if u != shared.user || p != shared.password {
                        return error(401, "invalid_grant", "wrong user name or password");
                    }
                    Some(u)
                }
                "refresh_token" => {
                    let expected = format!("{REFRESH_TOKEN_PREFIX}:{}", shared.user);
                    if param(&params, "refresh_token") != expected {
                        return error(401, "invalid_grant", "unknown refresh token");
                    }
                    Some(shared.user.clone())
                }
                other => {
                    return error(
                        400,
                        "unsupported_grant_type",
                        &format!("grant_type {other:?} is not supported"),
                    )
                }
            };
            let scopes: Vec<String> = param(&params, "scope")
                .split(' ')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            let offline = param(&params, "access_type") == "offline";
            (user, param(&params, "service"), scopes, offline)
        }
        _ => return error(405, "method_not_allowed", "GET or POST /token"),
    };
    let access: Vec<serde_json::Value> = scopes
        .iter()
        .filter_map(|scope| grant(scope, user.is_some()))
        .collect();
    let ttl = shared.ttl_secs.load(Ordering::SeqCst);
    let now = time::OffsetDateTime::now_utc();
    let iat = now.unix_timestamp();
    let jti = format!(
        "regproxy-test-{}-{}",
        shared.jti.fetch_add(1, Ordering::SeqCst),
        now.unix_timestamp_nanos()
    );
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER,
        "sub": user.clone().unwrap_or_default(),
        "aud": service,
        "exp": iat + ttl as i64,
        "nbf": iat - 1,
        "iat": iat,
        "jti": jti,
        "access": access,
    });
    let token = sign_jwt(&claims, shared);
    let issued_at = now
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let mut json = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": ttl,
        "issued_at": issued_at,
    });
    if offline {
        if let Some(u) = &user {
            json["refresh_token"] = format!("{REFRESH_TOKEN_PREFIX}:{u}").into();
        }
    }
    (200, Vec::new(), json)
}

/// `Ok(Some(user))` for the right Basic credentials, `Ok(None)` without Basic credentials,
/// `Err` for wrong ones.
fn basic_user(head: &str, shared: &Shared) -> Result<Option<String>, ()> {
    let Some(value) = header_value(head, "authorization") else {
        return Ok(None);
    };
    let Some((scheme, creds)) = value.split_once(' ') else {
        return Err(());
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Ok(None);
    }
    let decoded = STANDARD.decode(creds.trim()).map_err(|_| ())?;
    let decoded = String::from_utf8(decoded).map_err(|_| ())?;
    match decoded.split_once(':') {
        Some((u, p)) if u == shared.user && p == shared.password => Ok(Some(u.to_string())),
        _ => Err(()),
    }
}

/// The access entry granted for one `type:name:actions` scope, if any.
fn grant(scope: &str, authenticated: bool) -> Option<serde_json::Value> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    let asked: Vec<&str> = actions.split(',').filter(|a| !a.is_empty()).collect();
    let granted: Vec<&str> = if authenticated {
        asked
    } else if kind == "repository" && name.starts_with("public/") {
        asked
            .into_iter()
            .filter(|a| *a == "pull" || *a == "*")
            .map(|_| "pull")
            .take(1)
            .collect()
    } else {
        Vec::new()
    };
    (!granted.is_empty())
        .then(|| serde_json::json!({"type": kind, "name": name, "actions": granted}))
}

fn request_path(head: &str) -> Option<&str> {
    let target = head.lines().next()?.split(' ').nth(1)?;
    Some(target.split('?').next().unwrap_or(target))
}

fn param(params: &[(String, String)], name: &str) -> String {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

/// `a=b&c=d` (query string or form body), percent- and `+`-decoded.
fn parse_form(s: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(s.as_bytes()).into_owned().collect()
}

// ---------------------------------------------------------------------------------------------
// JWT
// ---------------------------------------------------------------------------------------------

/// An ES256 JWT with the signing certificate in `x5c` (no `kid`, no `jwk`): distribution 2.8
/// verifies the `x5c` chain against its `rootcertbundle` (the certificate itself), then the
/// signature (the fixed-size `r||s` of JWS) with the certificate's key.
fn sign_jwt(claims: &serde_json::Value, shared: &Shared) -> String {
    let header = Header {
        x5c: Some(vec![shared.x5c.clone()]),
        ..Header::new(Algorithm::ES256)
    };
    jsonwebtoken::encode(&header, claims, &shared.key).expect("signing a token")
}
