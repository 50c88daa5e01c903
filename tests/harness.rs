//! Checks the test support itself, without the proxy: when these pass and the proxy's tests
//! fail, the fault is in the proxy.

mod support;

use support::*;

/// A registry with Basic auth: pushes and inspects directly, logs each request with its status
/// and user, and keeps its data and port across a restart.
#[test]
fn registry_with_auth_logs_requests_and_restarts() {
    let dir = TestDir::new();
    let src = dir.join("src");
    let digest = mkimage(&src, 1, "64KiB", None, 7);
    let mut registry = Registry::start_with_htpasswd(dir.join("registry"), "alice", "s3cret");
    push(&src, &registry, "test/auth:latest", false);
    assert_eq!(
        sha256_digest(&inspect_raw_direct(&registry, "test/auth:latest")),
        digest
    );

    let log = registry.access_log();
    assert!(log.iter().any(|e| e.status == 401), "no 401 in {log:#?}");
    assert!(
        log.iter().any(|e| e.method == "PUT"
            && e.uri == "/v2/test/auth/manifests/latest"
            && e.status == 201
            && e.user_agent.starts_with("skopeo/")),
        "no manifest PUT in {log:#?}"
    );

    let port = registry.port();
    registry.stop();
    assert!(!registry.is_running());
    registry.start_again();
    assert_eq!(registry.port(), port);
    assert_eq!(
        sha256_digest(&inspect_raw_direct(&registry, "test/auth:latest")),
        digest
    );
    let layer = &oci_layers(&src, &digest)[0];
    assert_eq!(registry.blob_gets(layer), 0, "a push does not GET blobs");
}

/// mkimage is deterministic per seed and writes a valid layout.
#[test]
fn mkimage_is_deterministic() {
    let dir = TestDir::new();
    let a = mkimage(
        dir.join("a"),
        2,
        "32KiB",
        Some("linux/amd64,linux/arm64"),
        5,
    );
    let b = mkimage(
        dir.join("b"),
        2,
        "32KiB",
        Some("linux/amd64,linux/arm64"),
        5,
    );
    assert_eq!(a, b);
    assert_same_image(dir.join("a"), dir.join("b"));
    // index + 2 × (manifest + config + 2 layers)
    assert_eq!(oci_blobs(dir.join("a")).len(), 9);
}
