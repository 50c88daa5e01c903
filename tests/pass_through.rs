//! A client's own registry credentials pass through regproxy unchanged when regproxy injects
//! none: what lets Kubernetes `imagePullSecrets` work through it. containerd in mirror mode
//! (hosts.toml, `?ns=`), against a registry with HTTP Basic auth.

mod support;

use std::time::Instant;

use base64::Engine as _;
use support::*;

const USER: &str = "puller";
const PASSWORD: &str = "s3cret-pull";

/// `Authorization: Basic` for `user:password`.
fn basic(user: &str, password: &str) -> String {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {token}")
}

/// A mirror-mode `GET` of `path` for `ns`, straight to regproxy, with `auth` as the client's
/// `Authorization` if given.
fn mirror_get(proxy: &Proxy, path: &str, ns: &str, auth: Option<&str>) -> RawResponse {
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    request(
        dial(proxy.addr()),
        &format!("GET {path}?ns={ns} HTTP/1.1\r\nHost: mirror\r\n{auth}Connection: close\r\n\r\n"),
    )
}

/// With no credentials configured in regproxy, `ctr --user` pulls a private image through the
/// mirror (the registry only answers 2xx to the client's own Basic credentials); without them,
/// or with a wrong password, pulls fail and no cached byte comes back; with them again, a fresh
/// containerd pulls from the cache and the registry sends each blob once in all.
#[test]
fn client_credentials_pass_through_in_mirror_mode() {
    require_tool("ctr");
    let started = Instant::now();
    let dir = TestDir::new();
    let src = dir.join("src");
    let digest = mkimage(&src, 2, "128KiB", None, 131);
    let registry = Registry::start_with_htpasswd(dir.join("registry"), USER, PASSWORD);
    push(&src, &registry, "test/private:latest", false);
    // Nothing injected: no [registries] entry and no docker config.
    let proxy = Proxy::for_registry(&registry);
    let hosts = write_mirror_hosts(&dir.join("hosts"), &proxy, &registry);
    let image = format!("{}/test/private:latest", registry.host());
    let right = format!("{USER}:{PASSWORD}");
    let mut blobs: Vec<String> = oci_layers(&src, &digest);
    let config = {
        let hex = digest.strip_prefix("sha256:").unwrap();
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(src.join("blobs/sha256").join(hex)).unwrap())
                .unwrap();
        manifest["config"]["digest"].as_str().unwrap().to_string()
    };
    blobs.push(config);

    // The first pull, with the client's credentials: a miss that the registry fills.
    let first = Containerd::start(&dir.join("containerd1"));
    assert_success(
        &ctr_pull(&first, &hosts, &image, &["--user", &right]),
        "ctr pull --user through the mirror",
    );
    assert_eq!(first.image_digest(&image).as_deref(), Some(digest.as_str()));
    let log = registry.access_log();
    for blob in &blobs {
        assert_eq!(registry.blob_gets(blob), 1, "{blob}\n{log:#?}");
    }
    // htpasswd answers 2xx only to valid Basic credentials, and regproxy has none of its own:
    // these are the client's, passed through.
    assert!(
        log.iter().any(|e| e.method == "GET"
            && e.uri.contains("/manifests/")
            && (200..300).contains(&e.status)),
        "{log:#?}"
    );
    assert!(
        log.iter().any(|e| e.status == 401),
        "the registry challenged the first, anonymous request: {log:#?}"
    );

    // Without credentials, or with a wrong password, the pull fails.
    let second = Containerd::start(&dir.join("containerd2"));
    let out = ctr_pull(&second, &hosts, &image, &[]);
    assert!(
        !out.status.success(),
        "an anonymous pull of a private image succeeded:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let wrong = format!("{USER}:not-{PASSWORD}");
    let out = ctr_pull(&second, &hosts, &image, &["--user", &wrong]);
    assert!(
        !out.status.success(),
        "a pull with a wrong password succeeded:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(second.image_digest(&image), None);

    // ctr stops at the manifest; ask for the cached blobs and manifest by digest directly, as a
    // client that skipped the tag would.
    let ns = registry.host();
    let mut objects: Vec<String> = blobs
        .iter()
        .map(|b| format!("/v2/test/private/blobs/{b}"))
        .collect();
    objects.push(format!("/v2/test/private/manifests/{digest}"));
    let bad = basic(USER, "wrong");
    for path in &objects {
        for auth in [None, Some(bad.as_str())] {
            let resp = mirror_get(&proxy, path, &ns, auth);
            assert_eq!(
                resp.status,
                401,
                "{path} with {}: {}",
                if auth.is_some() {
                    "a wrong password"
                } else {
                    "no credentials"
                },
                resp.head
            );
            assert!(
                resp.header("www-authenticate").is_some(),
                "the registry's own challenge comes back: {}",
                resp.head
            );
            assert!(
                resp.body.len() < 1024,
                "{} bytes came back for {path}",
                resp.body.len()
            );
        }
    }
    // The right credentials are served the same object (a control for the refusals above).
    let good = basic(USER, PASSWORD);
    let resp = mirror_get(&proxy, &objects[0], &ns, Some(&good));
    assert_eq!(resp.status, 200, "{}", resp.head);
    assert_eq!(sha256_digest(&resp.body), blobs[0]);

    // Right credentials again, on a containerd that has nothing: served from the cache.
    assert_success(
        &ctr_pull(&second, &hosts, &image, &["--user", &right]),
        "a second ctr pull --user through the mirror",
    );
    assert_eq!(
        second.image_digest(&image).as_deref(),
        Some(digest.as_str())
    );
    for blob in &blobs {
        assert_eq!(
            registry.blob_gets(blob),
            1,
            "{blob} was fetched upstream again"
        );
    }
    eprintln!("pass_through: {:?}", started.elapsed());
}
