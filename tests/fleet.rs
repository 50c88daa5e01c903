//! The shared tier and the fleet: regproxy nodes that share one Garage bucket (a real,
//! distributed S3-compatible store, on loopback) and fetch each blob from the upstream once.

mod support;

use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use support::*;

const SECRET: &str = "fleet-secret-for-the-tests-0123456789";

/// `n` listeners and the peer URLs they make.
fn members(n: usize) -> (Vec<TcpListener>, Vec<String>) {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let urls = listeners
        .iter()
        .map(|l| format!("http://{}", l.local_addr().unwrap()))
        .collect();
    (listeners, urls)
}

/// A node of the fleet: the registry, the shared store, and (if `peers`) the members.
fn node(
    listener: TcpListener,
    registry: &Registry,
    garage: &Garage,
    fleet: Option<(&[String], &Path)>,
) -> Proxy {
    let me = format!("http://{}", listener.local_addr().unwrap());
    Proxy::start_on(listener, |c| {
        registry.configure_proxy(c);
        garage.configure(c, "fleet");
        if let Some((peers, secret)) = fleet {
            c.peers = peers.to_vec();
            c.advertise = Some(me);
            c.peer_secret_file = Some(secret.to_owned());
        }
    })
}

/// A node with an empty disk and no fleet, sharing only the store.
fn lone_node(registry: &Registry, garage: &Garage) -> Proxy {
    node(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        registry,
        garage,
        None,
    )
}

/// Waits until no node has writes for the store queued or running.
fn uploads_settle(nodes: &[&Proxy]) {
    wait_for(
        Duration::from_secs(60),
        || {
            let busy = nodes
                .iter()
                .any(|n| sample(&metrics(n), "regproxy_shared_store_pending") > 0);
            (!busy).then_some(())
        },
        || "uploads to the shared store".into(),
    );
}

/// The image's blobs (config and layers) and manifest digests, from its OCI layout.
fn objects_of(src: &Path) -> Vec<String> {
    oci_blobs(src).keys().map(|d| d.to_string()).collect()
}

/// Done when, part 1: eight cold pulls at once over three nodes make exactly one upstream GET
/// per blob; part 2: a fourth node with an empty disk pulls the image with the origin stopped.
#[test]
fn a_fleet_fetches_each_blob_once_and_an_empty_node_pulls_from_the_store() {
    let dir = TestDir::new();
    let garage = Garage::start(&dir.join("garage"), 1);
    let src = dir.join("src");
    let digest = mkimage(&src, 4, "1MiB", None, 151);
    let mut registry = Registry::start(dir.join("registry"));
    push(&src, &registry, "fleet/app:v1", false);
    std::fs::write(dir.join("secret"), SECRET).unwrap();

    let (listeners, urls) = members(3);
    let nodes: Vec<Proxy> = listeners
        .into_iter()
        .map(|l| node(l, &registry, &garage, Some((&urls, &dir.join("secret")))))
        .collect();
    let image = registry.image("fleet/app:v1");
    std::thread::scope(|s| {
        let pulls: Vec<_> = (0..8)
            .map(|i| {
                let (node, image, digest) = (&nodes[i % 3], &image, &digest);
                let dst = dir.join(format!("dst{i}"));
                s.spawn(move || {
                    skopeo_copy_via(node, image, &oci_ref(&dst), false);
                    assert_eq!(oci_index_digest(&dst), *digest);
                })
            })
            .collect();
        for p in pulls {
            p.join().unwrap();
        }
    });
    let layers = oci_layers(&src, &digest);
    assert_eq!(layers.len(), 4);
    for layer in &layers {
        assert_eq!(
            registry.blob_gets(layer),
            1,
            "upstream GETs of {layer} across the fleet: {:#?}",
            registry.access_log()
        );
    }
    let fetched: u64 = nodes
        .iter()
        .map(|n| sample(&metrics(n), "regproxy_peer_fetches_total"))
        .sum();
    assert!(fetched > 0, "no node asked an owner");

    let refs: Vec<&Proxy> = nodes.iter().collect();
    uploads_settle(&refs);
    registry.stop();
    let fourth = lone_node(&registry, &garage);
    let dst = dir.join("fourth");
    skopeo_copy_via(&fourth, &image, &oci_ref(&dst), false);
    assert_eq!(oci_index_digest(&dst), digest);
    assert_same_image(&src, &dst);
    let reads = sample(&metrics(&fourth), "regproxy_shared_store_reads_total");
    assert!(
        reads as usize >= objects_of(&src).len() - 1,
        "{reads} objects read from the store"
    );
}

/// A store that is down costs the shared tier, not the pull: uncached images still come from
/// the upstream, the breaker shows it, and the node stays ready.
#[test]
fn pulls_go_on_when_the_store_is_down() {
    let dir = TestDir::new();
    let garage = Garage::start(&dir.join("garage"), 1);
    let src = dir.join("src");
    let digest = mkimage(&src, 3, "256KiB", None, 152);
    let registry = Registry::start(dir.join("registry"));
    push(&src, &registry, "down/app:v1", false);
    let proxy = lone_node(&registry, &garage);
    garage.stop();

    let dst = dir.join("dst");
    skopeo_copy_via(
        &proxy,
        &registry.image("down/app:v1"),
        &oci_ref(&dst),
        false,
    );
    assert_eq!(oci_index_digest(&dst), digest);
    let text = metrics(&proxy);
    assert_eq!(sample(&text, "regproxy_shared_store_up"), 0, "{text}");
    assert!(sample(&text, "regproxy_shared_store_errors_total") > 0);
    let (status, body) = raw(
        proxy.admin_addr(),
        b"GET /readyz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("shared store down"), "{body}");
}

/// The rules of trust hold across the fleet: a private image that an authorized client pulled
/// through one node is refused to an anonymous client of another, which has it only from the
/// store; the same node serves it to a client with credentials.
#[test]
fn private_content_stays_private_across_nodes() {
    let dir = TestDir::new();
    let garage = Garage::start(&dir.join("garage"), 1);
    let registry = Registry::start_with_htpasswd(dir.join("registry"), "alice", "s3cret");
    let src = dir.join("src");
    let digest = mkimage(&src, 2, "128KiB", None, 153);
    push(&src, &registry, "private/app:v1", false);
    let image = registry.image("private/app:v1");
    let creds = ["--src-creds", "alice:s3cret"];

    let a = lone_node(&registry, &garage);
    let out = try_skopeo_copy_via(&a, &image, &oci_ref(dir.join("a")), false, &creds);
    assert_success(&out, "authorized pull through node A");
    uploads_settle(&[&a]);

    let b = lone_node(&registry, &garage);
    let out = try_skopeo_copy_via(&b, &image, &oci_ref(dir.join("b")), false, &[]);
    assert!(
        !out.status.success(),
        "anonymous client got a private image from the store"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("401") || stderr.to_lowercase().contains("unauthorized"),
        "{stderr}"
    );
    let out = try_skopeo_copy_via(&b, &image, &oci_ref(dir.join("b2")), false, &creds);
    assert_success(&out, "authorized pull through node B");
    assert_eq!(oci_index_digest(dir.join("b2")), digest);
}

/// With one of three Garage nodes killed (replication factor 3), an empty node still pulls from
/// the store with the origin stopped.
#[test]
fn pulls_go_on_when_a_storage_node_dies() {
    let dir = TestDir::new();
    let garage = Garage::start(&dir.join("garage"), 3);
    let src = dir.join("src");
    let digest = mkimage(&src, 2, "512KiB", None, 154);
    let mut registry = Registry::start(dir.join("registry"));
    push(&src, &registry, "replicated/app:v1", false);
    let first = lone_node(&registry, &garage);
    skopeo_copy_via(
        &first,
        &registry.image("replicated/app:v1"),
        &oci_ref(dir.join("a")),
        false,
    );
    uploads_settle(&[&first]);

    garage.kill_node(3);
    registry.stop();
    let second = lone_node(&registry, &garage);
    let dst = dir.join("b");
    skopeo_copy_via(
        &second,
        &registry.image("replicated/app:v1"),
        &oci_ref(&dst),
        false,
    );
    assert_eq!(oci_index_digest(&dst), digest);
    assert_same_image(&src, &dst);
}

/// Corrupt bytes in the store never reach a client with a clean end: the pull that met them
/// fails or gets the real image, the store's copy is removed, and the next pull puts the real
/// bytes back.
#[test]
fn a_corrupt_object_in_the_store_is_replaced() {
    let dir = TestDir::new();
    let garage = Garage::start(&dir.join("garage"), 1);
    let src = dir.join("src");
    let digest = mkimage(&src, 1, "1MiB", None, 155);
    let registry = Registry::start(dir.join("registry"));
    push(&src, &registry, "corrupt/app:v1", false);
    let image = registry.image("corrupt/app:v1");
    let first = lone_node(&registry, &garage);
    skopeo_copy_via(&first, &image, &oci_ref(dir.join("a")), false);
    uploads_settle(&[&first]);

    let layer = oci_layers(&src, &digest).remove(0);
    let key = format!("fleet/blobs/sha256/{}", &layer["sha256:".len()..]);
    let good = garage.curl(&key, &[]);
    let mut bad = good.clone();
    bad[good.len() / 2] ^= 0xff;
    std::fs::write(dir.join("bad"), &bad).unwrap();
    let bad_file = dir.join("bad").display().to_string();
    garage.curl(
        &key,
        &["-X", "PUT", "--data-binary", &format!("@{bad_file}")],
    );

    let second = lone_node(&registry, &garage);
    let out = try_skopeo_copy_via(&second, &image, &oci_ref(dir.join("b")), false, &[]);
    if out.status.success() {
        assert_eq!(oci_index_digest(dir.join("b")), digest);
        assert_same_image(&src, dir.join("b"));
    }
    uploads_settle(&[&second]);
    let third = lone_node(&registry, &garage);
    skopeo_copy_via(&third, &image, &oci_ref(dir.join("c")), false);
    assert_same_image(&src, dir.join("c"));
    uploads_settle(&[&third]);
    assert_eq!(
        sha256_digest(&garage.curl(&key, &[])),
        layer,
        "the store still holds the corrupt copy"
    );
}

/// A request that claims to come from a member but is not signed with the fleet's secret is
/// refused: the peer endpoint is never an open door.
#[test]
fn unsigned_fleet_requests_are_refused() {
    let dir = TestDir::new();
    let garage = Garage::start(&dir.join("garage"), 1);
    let registry = Registry::start(dir.join("registry"));
    std::fs::write(dir.join("secret"), SECRET).unwrap();
    let (mut listeners, urls) = members(1);
    let proxy = node(
        listeners.remove(0),
        &registry,
        &garage,
        Some((&urls, &dir.join("secret"))),
    );
    let digest = format!("sha256:{}", "0".repeat(64));
    for signature in ["1700000000.00", "garbage", &format!("{}.abcd", now_secs())] {
        let request = format!(
            "GET /v2/a/b/blobs/{digest}?ns={} HTTP/1.1\r\nHost: x\r\nx-regproxy-peer: {signature}\r\nConnection: close\r\n\r\n",
            registry.host()
        );
        let (status, body) = raw(proxy.addr(), request.as_bytes());
        assert_eq!(status, 403, "{signature}: {body}");
        assert!(body.contains("signature"), "{body}");
    }
}

/// `shared-store lifecycle --xml` prints rules the store accepts as they are.
#[test]
fn lifecycle_rules_apply_to_the_store() {
    let dir = TestDir::new();
    let garage = Garage::start(&dir.join("garage"), 1);
    let out = run_with_timeout(
        std::process::Command::new(env!("CARGO_BIN_EXE_regproxy"))
            .args(["shared-store", "lifecycle", "--xml", "--expire-days", "14"])
            .args(["--shared-store", "s3://regproxy/fleet"]),
        Duration::from_secs(30),
    );
    assert_success(&out, "regproxy shared-store lifecycle");
    std::fs::write(dir.join("rules.xml"), &out.stdout).unwrap();
    let rules = format!("@{}", dir.join("rules.xml").display());
    garage.curl("?lifecycle=", &["-X", "PUT", "--data-binary", &rules]);
    let applied = String::from_utf8(garage.curl("?lifecycle=", &[])).unwrap();
    assert!(applied.contains("<Days>14</Days>"), "{applied}");
    assert!(
        applied.contains("AbortIncompleteMultipartUpload"),
        "{applied}"
    );
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A member whose owner is down goes to the upstream itself: the pull works, each blob once.
#[test]
fn an_owner_that_is_down_costs_nothing_but_time() {
    let dir = TestDir::new();
    let src = dir.join("src");
    let digest = mkimage(&src, 8, "16KiB", None, 156);
    let registry = Registry::start(dir.join("registry"));
    push(&src, &registry, "ownerless/app:v1", false);
    std::fs::write(dir.join("secret"), SECRET).unwrap();
    // The second member's port is closed: whatever it owns (about half of the nine blobs; none
    // with odds of 1 in 512), its owner is down.
    let (mut listeners, urls) = members(2);
    drop(listeners.pop());
    let listener = listeners.remove(0);
    let me = urls[0].clone();
    let proxy = Proxy::start_on(listener, |c| {
        registry.configure_proxy(c);
        c.peers = urls.clone();
        c.advertise = Some(me);
        c.peer_secret_file = Some(dir.join("secret"));
    });
    let dst = dir.join("dst");
    skopeo_copy_via(
        &proxy,
        &registry.image("ownerless/app:v1"),
        &oci_ref(&dst),
        false,
    );
    assert_eq!(oci_index_digest(&dst), digest);
    for layer in oci_layers(&src, &digest) {
        assert_eq!(registry.blob_gets(&layer), 1, "{layer}");
    }
    assert_eq!(sample(&metrics(&proxy), "regproxy_peer_fetches_total"), 0);
}
