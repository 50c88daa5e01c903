//! Credentials: injected (Basic and token auth), passed through, never leaked across clients,
//! never logged; who may use the proxy; rate limits.

mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use regproxy::credentials::RegistryConfig;
use support::*;

const USER: &str = "alice";
const PASSWORD: &str = "pw-Zq81-never-logged";

/// A token-auth registry (distribution trusting the test token server) with a private image.
struct TokenSetup {
    dir: TestDir,
    tokens: TokenServer,
    registry: Registry,
    digest: String,
}

fn token_setup(seed: u64) -> TokenSetup {
    let dir = TestDir::new();
    let tokens = TokenServer::start(&dir.join("tokens"), USER, PASSWORD);
    let registry =
        Registry::start_with_auth(dir.join("registry"), tokens.creds(), tokens.auth_yaml());
    tokens.trust_in(&registry.cert_dir());
    let digest = mkimage(dir.join("src"), 2, "64KiB", None, seed);
    push(dir.join("src"), &registry, "test/private:v1", false);
    TokenSetup {
        dir,
        tokens,
        registry,
        digest,
    }
}

fn inject(config: &mut regproxy::Config, host: String) {
    inject_as(config, host, PASSWORD);
}

/// Injects `USER` with `password` for `scope` (`HOST` or `HOST/PREFIX`).
fn inject_as(config: &mut regproxy::Config, scope: String, password: &str) {
    config.registries.insert(
        scope,
        RegistryConfig {
            username: Some(USER.into()),
            password: Some(regproxy::secret::Secret::new(password)),
            ..Default::default()
        },
    );
}

/// An htpasswd registry holding one small image under each of `repos`, and the image's
/// manifest bytes.
fn private_registry(dir: &TestDir, seed: u64, repos: &[&str]) -> (Registry, Vec<u8>) {
    let registry = Registry::start_with_htpasswd(dir.join("registry"), USER, PASSWORD);
    let digest = mkimage(dir.join("src"), 1, "64KiB", None, seed);
    for repo in repos {
        push(dir.join("src"), &registry, repo, false);
    }
    let manifest = dir
        .join("src/blobs/sha256")
        .join(&digest["sha256:".len()..]);
    (registry, std::fs::read(manifest).unwrap())
}

/// The token server's realm is `https://127.0.0.1:PORT`, which regproxy refuses to reach
/// unless allowed (loopback is not a destination by default).
fn allow_loopback_realm(config: &mut regproxy::Config) {
    config
        .allow_destination
        .push(regproxy::config::Cidr::parse("127.0.0.1").unwrap());
}

fn copy(
    proxy: &Proxy,
    image: &str,
    dst: &std::path::Path,
    creds: Option<&str>,
) -> std::process::Output {
    let extra: Vec<&str> = creds.map(|c| vec!["--src-creds", c]).unwrap_or_default();
    try_skopeo_copy_via(proxy, image, &oci_ref(dst), false, &extra)
}

/// A client without credentials pulls a private image from a token-auth registry: regproxy
/// exchanges its own credentials for tokens, and reuses them within expires_in.
#[test]
fn injected_credentials_with_token_auth_and_token_reuse() {
    let s = token_setup(91);
    let proxy = Proxy::for_registry_with(&s.registry, |c| {
        c.upstream_ca.push(s.tokens.ca_cert_path());
        inject(c, s.registry.host());
        allow_loopback_realm(c);
    });
    let image = s.registry.image("test/private:v1");
    let before = s.tokens.token_requests();
    let out = copy(&proxy, &image, &s.dir.join("a"), None);
    assert_success(&out, "anonymous client through injected credentials");
    assert_eq!(oci_index_digest(s.dir.join("a")), s.digest);
    let after_first = s.tokens.token_requests();
    assert!(after_first > before, "regproxy fetched tokens");
    let out = copy(&proxy, &image, &s.dir.join("b"), None);
    assert_success(&out, "second pull");
    assert_eq!(
        s.tokens.token_requests(),
        after_first,
        "tokens reused within expires_in"
    );
    for request in s.tokens.requests()[before..].iter() {
        assert!(
            request
                .to_ascii_lowercase()
                .contains("authorization: basic"),
            "{request}"
        );
    }
}

/// Basic auth (htpasswd) registry: injected credentials let a client without any pull; without
/// injection a client with its own credentials pulls through unchanged (pass-through).
#[test]
fn basic_auth_injection_and_pass_through() {
    let dir = TestDir::new();
    let registry = Registry::start_with_htpasswd(dir.join("registry"), USER, PASSWORD);
    let digest = mkimage(dir.join("src"), 1, "64KiB", None, 92);
    push(dir.join("src"), &registry, "test/basic:v1", false);
    let image = registry.image("test/basic:v1");

    let injected = Proxy::for_registry_with(&registry, |c| inject(c, registry.host()));
    assert_success(
        &copy(&injected, &image, &dir.join("a"), None),
        "injected Basic",
    );
    assert_eq!(oci_index_digest(dir.join("a")), digest);

    let plain = Proxy::for_registry(&registry);
    let out = copy(&plain, &image, &dir.join("b"), None);
    assert!(
        !out.status.success(),
        "no credentials, none injected: refused"
    );
    let own = format!("{USER}:{PASSWORD}");
    assert_success(
        &copy(&plain, &image, &dir.join("c"), Some(&own)),
        "pass-through",
    );
    assert_eq!(oci_index_digest(dir.join("c")), digest);
}

/// Client A (authorized) pulls a private image. Client B without credentials, or with wrong
/// ones, gets nothing from the cache; B with valid credentials gets it from the cache, with no
/// blob fetched again.
#[test]
fn cached_private_content_only_reaches_authorized_clients() {
    let s = token_setup(93);
    let proxy =
        Proxy::for_registry_with(&s.registry, |c| c.upstream_ca.push(s.tokens.ca_cert_path()));
    s.tokens.trust_in(proxy.cert_dir());
    let image = s.registry.image("test/private:v1");
    let own = format!("{USER}:{PASSWORD}");
    assert_success(
        &copy(&proxy, &image, &s.dir.join("a"), Some(&own)),
        "client A",
    );
    let layers = oci_layers(s.dir.join("src"), &s.digest);

    let out = copy(&proxy, &image, &s.dir.join("b1"), None);
    assert!(!out.status.success(), "B without credentials must fail");
    let out = copy(
        &proxy,
        &image,
        &s.dir.join("b2"),
        Some(&format!("{USER}:wrong")),
    );
    assert!(!out.status.success(), "B with wrong credentials must fail");
    let blob = std::fs::read(
        s.dir
            .join("src/blobs/sha256")
            .join(&layers[0]["sha256:".len()..]),
    )
    .unwrap();
    let anonymous = |path: &str| {
        let host = s.registry.host();
        let tls = tls_via(proxy.addr(), &host, "registry.test", &proxy.ca_cert_path());
        let resp = request(
            tls,
            &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        );
        assert!(
            !resp.body.windows(32).any(|w| w == &blob[..32]),
            "{path}: cached bytes reached an unauthorized client"
        );
        resp
    };
    // Straight at the cache: a blob request without credentials gets the upstream's 401.
    let resp = anonymous(&format!("/v2/test/private/blobs/{}", layers[0]));
    assert_eq!(resp.status, 401, "{}", resp.head);
    assert!(resp.header("www-authenticate").is_some(), "{}", resp.head);
    // Under another repository's name (a public one, or one that does not exist), a digest
    // cached from the private repository is not served: the exact URL is asked upstream.
    for path in [
        format!("/v2/public/other/blobs/{}", layers[0]),
        format!("/v2/test/private-not/manifests/{}", s.digest),
    ] {
        let resp = anonymous(&path);
        assert!(
            matches!(resp.status, 401 | 403 | 404),
            "{path}: {}",
            resp.head
        );
    }
    assert_success(
        &copy(&proxy, &image, &s.dir.join("b3"), Some(&own)),
        "B with valid credentials",
    );
    assert_eq!(oci_index_digest(s.dir.join("b3")), s.digest);
    for layer in &layers {
        assert_eq!(s.registry.blob_gets(layer), 1, "{layer} was fetched again");
    }
}

/// A listener beyond loopback that names no clients refuses to start; an allow-list refuses
/// others (403); proxy credentials are required when configured (407, 401 in mirror mode).
#[test]
fn who_may_use_the_proxy() {
    let dir = TestDir::new();
    let out = Command::new(env!("CARGO_BIN_EXE_regproxy"))
        .args(["--listen", "0.0.0.0:0", "--ca-dir"])
        .arg(dir.join("ca"))
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("allow_cidr") && said.contains("listen"),
        "{said}"
    );

    let outside =
        Proxy::start(|c| c.allow_cidr = vec![regproxy::config::Cidr::parse("10.0.0.0/8").unwrap()]);
    let (status, text) = raw(
        outside.addr(),
        b"CONNECT x.test:443 HTTP/1.1\r\nHost: x.test:443\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 403, "{text}");

    let users = dir.join("users");
    std::fs::write(&users, "ci:runner-pass\n").unwrap();
    let gated = Proxy::start(|c| {
        c.proxy_credentials_file = Some(users.clone());
        c.intercept.push("leaf.test".into());
        c.allow_port.push(4443);
    });
    let (status, text) = raw(
        gated.addr(),
        b"CONNECT leaf.test:4443 HTTP/1.1\r\nHost: leaf.test:4443\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 407, "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("proxy-authenticate: basic"),
        "{text}"
    );
    let (status, _) = raw(
        gated.addr(),
        b"GET /v2/x/manifests/1?ns=ghcr.io HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 401);
    // ci:runner-pass
    let mut s = dial(gated.addr());
    use std::io::Write;
    write!(s, "CONNECT leaf.test:4443 HTTP/1.1\r\nHost: leaf.test:4443\r\nProxy-Authorization: Basic Y2k6cnVubmVyLXBhc3M=\r\n\r\n").unwrap();
    assert_eq!(read_head(&mut s).0, 200);
}

/// The secrets (registry password, bearer tokens, proxy credentials) appear in no log line,
/// no metrics output and no `config check` output of the real binary.
#[test]
fn secrets_are_never_logged() {
    let s = token_setup(94);
    let dir = &s.dir;
    std::fs::write(dir.join("users"), "ci:proxy-secret-77\n").unwrap();
    let (listen, admin) = (free_port(), free_port());
    let config = dir.join("regproxy.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{listen}\"\nadmin_listen = \"127.0.0.1:{admin}\"\nca_dir = {:?}\ncache_dir = {:?}\n\
             intercept = [\"registry.test\"]\nresolve = [\"{}=127.0.0.1:{}\"]\nupstream_ca = [{:?}, {:?}]\n\
             allow_port = [{}]\nallow_destination = [\"127.0.0.1\"]\nproxy_credentials_file = {:?}\n\n[registries.\"{}\"]\nusername = \"{USER}\"\npassword_env = \"TEST_REGISTRY_PASSWORD\"\n",
            dir.join("ca").display().to_string(),
            dir.join("cache").display().to_string(),
            s.registry.host(),
            s.registry.port(),
            s.registry.ca_cert_path().display().to_string(),
            s.tokens.ca_cert_path().display().to_string(),
            s.registry.port(),
            dir.join("users").display().to_string(),
            s.registry.host(),
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("regproxy.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_regproxy"))
        .arg("--config")
        .arg(&config)
        .env("TEST_REGISTRY_PASSWORD", PASSWORD)
        .env("REGPROXY_LOG", "trace")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], listen));
    wait_for(
        START_TIMEOUT,
        || std::fs::metadata(dir.join("ca/ca.crt")).ok(),
        || "CA".into(),
    );
    wait_for(
        START_TIMEOUT,
        || std::net::TcpStream::connect(addr).ok(),
        || "listener".into(),
    );
    let certs = dir.join("client-certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(dir.join("ca/ca.crt"), certs.join("ca.crt")).unwrap();
    let mut cmd = skopeo_command(None);
    let url = format!("http://ci:proxy-secret-77@127.0.0.1:{listen}");
    cmd.env("HTTPS_PROXY", &url)
        .env("https_proxy", &url)
        .args(["copy", "--src-cert-dir"])
        .arg(&certs);
    cmd.arg(s.registry.image("test/private:v1"))
        .arg(oci_ref(dir.join("dst")));
    let out = run_with_timeout(&mut cmd, CMD_TIMEOUT);
    let (_, metrics) = raw(
        SocketAddr::from(([127, 0, 0, 1], admin)),
        b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    let check = Command::new(env!("CARGO_BIN_EXE_regproxy"))
        .arg("--config")
        .arg(&config)
        .env("TEST_REGISTRY_PASSWORD", PASSWORD)
        .args(["config", "check"])
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_success(
        &out,
        "skopeo through proxy credentials and injected registry credentials",
    );
    let logs = std::fs::read_to_string(dir.join("regproxy.log")).unwrap();
    assert!(logs.lines().count() > 10, "trace logs were written: {logs}");
    let printed = String::from_utf8_lossy(&check.stdout).into_owned();
    for (name, text) in [
        ("logs", &logs),
        ("metrics", &metrics),
        ("config check", &printed),
    ] {
        for secret in [PASSWORD, "proxy-secret-77", "cHJveHktc2VjcmV0LTc3", "eyJ"] {
            assert!(!text.contains(secret), "{name} contain {secret:?}");
        }
    }
    assert!(
        printed.contains("password_env = \"TEST_REGISTRY_PASSWORD\""),
        "{printed}"
    );
}

/// `regproxy ratelimit` reads the rate-limit headers a registry (a fixture here) sends on a
/// manifest HEAD and exits 0, 1, 2 against the thresholds, 3 when it cannot tell.
#[test]
fn ratelimit_command_exit_codes() {
    let dir = TestDir::new();
    let remaining = Arc::new(AtomicU64::new(80));
    let left = remaining.clone();
    let (port, seen) = tiny_https(&dir.join("rl"), &["rl.test"], move |head, w| {
        let n = left.load(Ordering::SeqCst);
        let headers = if n == u64::MAX {
            String::new()
        } else {
            format!("ratelimit-limit: 100;w=21600\r\nratelimit-remaining: {n};w=21600\r\ndocker-ratelimit-source: 192.0.2.1\r\n")
        };
        assert!(
            head.starts_with("HEAD /v2/test/rl/manifests/latest "),
            "{head}"
        );
        let _ = write!(
            w,
            "HTTP/1.1 200 OK\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
    });
    let config = dir.join("c.toml");
    std::fs::write(
        &config,
        format!(
            "ca_dir = {:?}\ncache_dir = {:?}\nresolve = [\"rl.test:{port}=127.0.0.1:{port}\"]\nupstream_ca = [{:?}]\n",
            dir.join("ca").display().to_string(),
            dir.join("cache").display().to_string(),
            dir.join("rl/ca.crt").display().to_string()
        ),
    )
    .unwrap();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_regproxy"))
            .arg("--config")
            .arg(&config)
            .args([
                "ratelimit",
                &format!("rl.test:{port}"),
                "--image",
                "test/rl:latest",
                "--warn",
                "50",
                "--critical",
                "10",
            ])
            .output()
            .unwrap()
    };
    for (n, code, word) in [
        (80, 0, "OK"),
        (50, 1, "WARNING"),
        (3, 2, "CRITICAL"),
        (u64::MAX, 3, "UNKNOWN"),
    ] {
        remaining.store(n, Ordering::SeqCst);
        let out = run();
        let said = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(code), "{said}");
        assert!(said.starts_with(word), "{said}");
    }
    assert!(
        seen.lock().unwrap().iter().all(|h| h.starts_with("HEAD ")),
        "only HEADs"
    );
}

/// A registry with injected credentials whose challenge is malformed gets a 502 naming the
/// problem; one whose token endpoint answers garbage has its cached tag served stale.
#[test]
fn malformed_challenge_and_garbage_token_endpoint() {
    let dir = TestDir::new();
    let (token_port, _) = tiny_https(&dir.join("tok"), &["tok.test", "127.0.0.1"], |_, w| {
        let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 9\r\nConnection: close\r\n\r\n<html>oops");
    });
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#.to_vec();
    let digest = sha256_digest(&manifest);
    // 0: open; 1: a malformed challenge; 2: a challenge whose token endpoint talks nonsense.
    let mode = Arc::new(AtomicU64::new(0));
    let (m, d, body) = (mode.clone(), digest.clone(), manifest.clone());
    let (port, _) = tiny_https(&dir.join("reg"), &["auth-reg.test"], move |head, w| {
        let challenge = match m.load(Ordering::SeqCst) {
            1 => Some("Bearer realm=\"https://127.0.0.1/token".to_string()),
            2 => Some(format!(
                "Bearer realm=\"https://127.0.0.1:{token_port}/token\",service=\"x\""
            )),
            _ => None,
        };
        if let Some(c) = challenge {
            let _ = write!(w, "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: {c}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            return;
        }
        let _ = write!(w, "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nDocker-Content-Digest: {d}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
        if head.starts_with("GET ") {
            let _ = w.write_all(&body);
        }
    });
    let host = format!("auth-reg.test:{port}");
    let proxy = Proxy::start(|c| {
        c.intercept.push("auth-reg.test".into());
        c.allow_port.push(port);
        c.resolve
            .push((host.clone(), SocketAddr::from(([127, 0, 0, 1], port))));
        c.upstream_ca.push(dir.join("reg/ca.crt"));
        c.upstream_ca.push(dir.join("tok/ca.crt"));
        c.tag_ttl = std::time::Duration::ZERO;
        inject(c, host.clone());
        allow_loopback_realm(c);
    });
    let get = |path: &str| {
        let tls = tls_via(proxy.addr(), &host, "auth-reg.test", &proxy.ca_cert_path());
        request(
            tls,
            &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
    };
    assert_eq!(get("/v2/x/manifests/v1").status, 200);
    mode.store(1, Ordering::SeqCst);
    let resp = get("/v2/x/manifests/other");
    assert_eq!(resp.status, 502, "{}", resp.head);
    assert!(
        String::from_utf8_lossy(&resp.body).contains("unterminated quote"),
        "{:?}",
        String::from_utf8_lossy(&resp.body)
    );
    mode.store(2, Ordering::SeqCst);
    let resp = get("/v2/x/manifests/v1");
    assert_eq!(resp.status, 200, "{}", resp.head);
    assert!(
        resp.header("warning").is_some(),
        "served stale: {}",
        resp.head
    );
    let resp = get("/v2/x/manifests/uncached");
    assert_eq!(resp.status, 502, "{}", resp.head);
    assert!(
        String::from_utf8_lossy(&resp.body).contains("not JSON"),
        "{:?}",
        String::from_utf8_lossy(&resp.body)
    );
}

/// `GET` of a manifest through the proxy as proxy user `user`, with the client's own
/// `Authorization` when given.
fn get_as(
    proxy: &Proxy,
    user: Option<&str>,
    registry: &Registry,
    path: &str,
    own: Option<&str>,
) -> RawResponse {
    use base64::Engine as _;
    let host = registry.host();
    let tls = tls_via_as(
        proxy.addr(),
        user,
        &host,
        REGISTRY_HOST,
        &proxy.ca_cert_path(),
    );
    let auth = own.map_or(String::new(), |c| {
        let b64 = base64::engine::general_purpose::STANDARD.encode(c);
        format!("Authorization: Basic {b64}\r\n")
    });
    request(
        tls,
        &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/vnd.oci.image.manifest.v1+json\r\n{auth}Connection: close\r\n\r\n"),
    )
}

/// Credentials configured for a repository prefix win over the host's; a proxy user limited to
/// some injected credentials gets only those, and otherwise pulls with its own (and gets no
/// cached bytes without them).
#[test]
fn scoped_credentials_and_proxy_users() {
    let dir = TestDir::new();
    let (registry, manifest) = private_registry(&dir, 95, &["org-a/app:v1", "org-b/app:v1"]);
    let host = registry.host();
    let users = dir.join("users");
    std::fs::write(
        &users,
        format!("all:all-pass\nci:ci-pass inject={host}/org-a\ndev:dev-pass inject=\n"),
    )
    .unwrap();
    let proxy = Proxy::for_registry_with(&registry, |c| {
        inject(c, format!("{host}/org-a"));
        inject_as(c, host.clone(), "not-the-password");
        c.proxy_credentials_file = Some(users.clone());
    });
    let a = "/v2/org-a/app/manifests/v1";
    let b = "/v2/org-b/app/manifests/v1";
    let status = |user, path, own| get_as(&proxy, Some(user), &registry, path, own).status;
    // The longest prefix picks the credentials: org-a's are right, the host's are wrong.
    assert_eq!(status("all:all-pass", a, None), 200);
    assert_eq!(status("all:all-pass", b, None), 401);
    // ci may use org-a's only: org-b goes without injection, so with ci's own (none).
    assert_eq!(status("ci:ci-pass", a, None), 200);
    assert_eq!(status("ci:ci-pass", b, None), 401);
    // dev may use none: org-a (cached by now) is refused without its own credentials…
    let refused = get_as(&proxy, Some("dev:dev-pass"), &registry, a, None);
    assert_eq!(refused.status, 401, "{}", refused.head);
    assert!(
        !refused.body.windows(32).any(|w| w == &manifest[..32]),
        "cached bytes reached a proxy user without credentials"
    );
    // …and served with them, passed through unchanged.
    let own = format!("{USER}:{PASSWORD}");
    assert_eq!(status("dev:dev-pass", a, Some(own.as_str())), 200);
    assert_eq!(status("dev:dev-pass", b, Some(own.as_str())), 200);
}

/// A password file rotated while the proxy runs is read again once the upstream refuses the
/// old password: the next pull works without a restart.
#[test]
fn rotated_credentials_are_read_again() {
    let dir = TestDir::new();
    let (registry, _) = private_registry(&dir, 96, &["test/rotated:v1"]);
    let secret = dir.join("password");
    std::fs::write(&secret, "expired-token\n").unwrap();
    let proxy = Proxy::for_registry_with(&registry, |c| {
        c.registries.insert(
            registry.host(),
            RegistryConfig {
                username: Some(USER.into()),
                password_file: Some(secret.clone()),
                ..Default::default()
            },
        );
    });
    let path = "/v2/test/rotated/manifests/v1";
    assert_eq!(get_as(&proxy, None, &registry, path, None).status, 401);
    std::fs::write(&secret, format!("{PASSWORD}\n")).unwrap();
    // Credentials are read again at most every few seconds after a refusal.
    std::thread::sleep(std::time::Duration::from_secs(6));
    let resp = get_as(&proxy, None, &registry, path, None);
    assert_eq!(resp.status, 200, "{}", resp.head);
}

/// Injected credentials are for pulls only: a client that starts an upload or deletes through
/// the proxy goes with its own credentials (none here), never the operator's.
#[test]
fn injected_credentials_never_push_or_delete() {
    let dir = TestDir::new();
    let (registry, _) = private_registry(&dir, 97, &["test/pushed:v1"]);
    let proxy = Proxy::for_registry_with(&registry, |c| inject(c, registry.host()));
    let host = registry.host();
    for line in [
        "POST /v2/test/pushed/blobs/uploads/",
        "DELETE /v2/test/pushed/manifests/v1",
    ] {
        let tls = tls_via(proxy.addr(), &host, REGISTRY_HOST, &proxy.ca_cert_path());
        let resp = request(
            tls,
            &format!(
                "{line} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
        );
        assert_eq!(resp.status, 401, "{line}: {}", resp.head);
    }
    // Pulls still get them.
    let resp = get_as(
        &proxy,
        None,
        &registry,
        "/v2/test/pushed/manifests/v1",
        None,
    );
    assert_eq!(resp.status, 200, "{}", resp.head);
}

/// Bytes that one proxy user's own credentials fetched are not served to another user on the
/// strength of injected credentials: the injected ones (wrong here) must be accepted upstream for
/// that repository first.
#[test]
fn injected_credentials_are_checked_not_assumed() {
    let dir = TestDir::new();
    let (registry, manifest) = private_registry(&dir, 98, &["team/private:v1"]);
    let digest = sha256_digest(&manifest);
    let host = registry.host();
    let users = dir.join("users");
    std::fs::write(
        &users,
        format!("dev:dev-pass inject=\nci:ci-pass inject={host}\n"),
    )
    .unwrap();
    let proxy = Proxy::for_registry_with(&registry, |c| {
        inject_as(c, host.clone(), "a-bot-without-access");
        c.proxy_credentials_file = Some(users.clone());
    });
    let path = format!("/v2/team/private/manifests/{digest}");
    let own = format!("{USER}:{PASSWORD}");
    let filled = get_as(
        &proxy,
        Some("dev:dev-pass"),
        &registry,
        &path,
        Some(own.as_str()),
    );
    assert_eq!(filled.status, 200, "{}", filled.head);
    let other = get_as(&proxy, Some("ci:ci-pass"), &registry, &path, None);
    assert_eq!(other.status, 401, "{}", other.head);
    assert!(
        !other.body.windows(32).any(|w| w == &manifest[..32]),
        "bytes fetched with dev's credentials reached ci through injected ones"
    );
}

/// The operator's credentials go only to the registry API (`/v2/…`): another API on the same
/// host (Harbor's, Artifactory's) sees the client's own, here none.
#[test]
fn injected_credentials_stay_on_the_registry_api() {
    let dir = TestDir::new();
    let (port, seen) = tiny_https(&dir.join("up"), &["api.test"], |_, w| {
        let _ = write!(
            w,
            "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"x\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    });
    let host = format!("api.test:{port}");
    let ca = dir.join("up/ca.crt");
    let proxy = Proxy::start(|c| {
        reach_test_host(c, "api.test", port, ca);
        inject(c, host.clone());
    });
    for path in ["/api/v2.0/users", "/v2/team/app/manifests/v1"] {
        let tls = tls_via(proxy.addr(), &host, "api.test", &proxy.ca_cert_path());
        let resp = request(
            tls,
            &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(resp.status, 401, "{path}: {}", resp.head);
    }
    let heads = seen.lock().unwrap().clone();
    let with_auth = |p: &str| {
        heads
            .iter()
            .any(|h| h.contains(p) && h.to_ascii_lowercase().contains("authorization: basic"))
    };
    assert!(!with_auth("/api/v2.0/users"), "{heads:?}");
    assert!(with_auth("/v2/team/app/manifests/v1"), "{heads:?}");
}
