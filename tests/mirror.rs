//! Mirror mode: registry requests sent straight to regproxy (containerd's hosts.toml with
//! `?ns=`, docker's registry-mirrors), sharing one cache with the intercepting mode.

mod support;

use std::net::SocketAddr;

use support::*;

/// `ctr` with a hosts.toml mirror pointing at regproxy (plain HTTP; nobody trusts regproxy's
/// CA) pulls; a blob first fetched through the intercepting mode is a hit; and with the registry
/// stopped a fresh containerd still pulls the image.
#[test]
fn ctr_pulls_through_a_hosts_toml_mirror() {
    require_tool("ctr");
    let dir = TestDir::new();
    let src = dir.join("src");
    let digest = mkimage(&src, 2, "128KiB", None, 81);
    let mut registry = Registry::start(dir.join("registry"));
    push(&src, &registry, "test/mirror:latest", false);
    let proxy = Proxy::for_registry(&registry);

    // The config blob through the intercepting mode first.
    let raw = inspect_raw_via(&proxy, &registry.image("test/mirror:latest"));
    assert_eq!(sha256_digest(&raw), digest);

    let hosts = write_mirror_hosts(&dir.join("hosts"), &proxy, &registry);

    let image = format!("{}/test/mirror:latest", registry.host());
    let containerd = Containerd::start(&dir.join("containerd1"));
    assert_success(
        &ctr_pull(&containerd, &hosts, &image, &[]),
        "ctr pull via the mirror",
    );
    let layers = oci_layers(&src, &digest);
    for layer in &layers {
        assert_eq!(registry.blob_gets(layer), 1, "{layer}");
    }
    let (_, metrics) = raw_get(proxy.admin_addr(), "/metrics");
    assert!(
        metrics.contains("outcome=\"HIT\""),
        "the manifest fetched by intercept was a hit: {metrics}"
    );

    registry.stop();
    let fresh = Containerd::start(&dir.join("containerd2"));
    assert_success(
        &ctr_pull(&fresh, &hosts, &image, &[]),
        "ctr pull with the registry stopped",
    );
}

fn raw_get(addr: SocketAddr, path: &str) -> (u16, String) {
    raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: mirror\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

/// An upstream that is not on the intercept list, or on a port not allowed, gets a 403 that
/// says how to allow it; nothing is sent anywhere.
#[test]
fn unknown_ns_is_refused_with_a_reason() {
    let proxy = Proxy::start(|_| {});
    let (status, text) = raw_get(proxy.addr(), "/v2/x/manifests/1?ns=evil.test");
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("--intercept"), "{text}");
    let (status, text) = raw_get(proxy.addr(), "/v2/x/manifests/1?ns=ghcr.io:8443");
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("--allow-port"), "{text}");
}

/// A separate TLS mirror listener with the operator's certificate serves the same cache; a
/// single-name repository on Docker Hub gets `library/` (the registry stands in for Docker Hub).
#[test]
fn tls_mirror_listener_and_docker_hub_library_prefix() {
    let dir = TestDir::new();
    let src = dir.join("src");
    let digest = mkimage(&src, 1, "32KiB", None, 82);
    let registry = Registry::start(dir.join("registry"));
    push(&src, &registry, "library/hubimg:v1", false);
    make_test_certs(&dir.join("mirror-tls"), "mirror test CA", &["mirror.test"]);
    let mirror_port = free_port();
    let proxy = Proxy::start(|c| {
        c.resolve.push((
            "registry-1.docker.io:443".into(),
            SocketAddr::from(([127, 0, 0, 1], registry.port())),
        ));
        c.upstream_ca.push(registry.ca_cert_path());
        c.mirror_listen = Some(SocketAddr::from(([127, 0, 0, 1], mirror_port)));
        c.mirror_tls = Some((
            dir.join("mirror-tls/server.crt"),
            dir.join("mirror-tls/server.key"),
        ));
    });
    let addr = SocketAddr::from(([127, 0, 0, 1], mirror_port));
    wait_for(
        START_TIMEOUT,
        || std::net::TcpStream::connect(addr).ok(),
        || "mirror listener".into(),
    );
    let tcp = dial(addr);
    let name = rustls::pki_types::ServerName::try_from("mirror.test").unwrap();
    let conn =
        rustls::ClientConnection::new(tls_config(&dir.join("mirror-tls/ca.crt")), name).unwrap();
    let tls = rustls::StreamOwned::new(conn, tcp);
    let resp = request(
        tls,
        "GET /v2/hubimg/manifests/v1 HTTP/1.1\r\nHost: mirror.test\r\nAccept: application/vnd.oci.image.manifest.v1+json\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(resp.status, 200, "{}", resp.head);
    assert_eq!(resp.header("docker-content-digest"), Some(digest.clone()));
    assert_eq!(sha256_digest(&resp.body), digest);
    assert!(
        registry
            .access_log()
            .iter()
            .any(|e| e.uri == "/v2/library/hubimg/manifests/v1"),
        "the upstream was asked for library/hubimg"
    );
    // The plain proxy listener answers mirror requests too, from the same cache.
    let (status, text) = raw(
        proxy.addr(),
        b"GET /v2/library/hubimg/manifests/v1 HTTP/1.1\r\nHost: m\r\nAccept: application/vnd.oci.image.manifest.v1+json\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200, "{text}");
    assert!(text.contains(&digest));
}

/// dockerd with `registry-mirrors` pointed at regproxy pulls a Docker Hub image (the test
/// registry stands in for registry-1.docker.io through a resolve override and a test CA).
#[test]
fn dockerd_registry_mirror() {
    require_tool("dockerd");
    require_tool("docker");
    let dir = TestDir::new();
    let src = dir.join("src");
    let digest = mkimage(&src, 2, "64KiB", None, 83);
    let registry = Registry::start(dir.join("registry"));
    push(&src, &registry, "library/mirrored:latest", false);
    let proxy = Proxy::start(|c| {
        c.resolve.push((
            "registry-1.docker.io:443".into(),
            SocketAddr::from(([127, 0, 0, 1], registry.port())),
        ));
        c.upstream_ca.push(registry.ca_cert_path());
    });
    let mirror = vec![
        "--registry-mirror".to_string(),
        format!("http://{}", proxy.addr()),
    ];
    let dockerd = Dockerd::start(dir.path(), None, &mirror);
    let docker = |args: &[&str]| dockerd.docker(args);
    assert_success(
        &docker(&["pull", "mirrored:latest"]),
        "docker pull via registry-mirrors",
    );
    let out = docker(&[
        "image",
        "inspect",
        "--format",
        "{{index .RepoDigests 0}}",
        "mirrored:latest",
    ]);
    assert_success(&out, "docker image inspect");
    assert!(String::from_utf8_lossy(&out.stdout)
        .trim()
        .ends_with(&digest));
    for layer in oci_layers(&src, &digest) {
        assert_eq!(
            registry.blob_gets(&layer),
            1,
            "{layer} came through regproxy"
        );
    }
}
