//! The cache end to end: repeat pulls, pulls with the upstream gone, tag revalidation with HEAD,
//! ranges, single flight, and downloads that go wrong never entering the cache.

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use support::*;

/// Pulling the same image twice through one proxy fetches each layer from the registry once: the
/// second pull is served from the cache.
#[test]
fn repeat_pull_fetches_each_layer_once_upstream() {
    let dir = TestDir::new();
    let src = dir.join("src");
    let digest = mkimage(&src, 3, "256KiB", None, 3);
    let registry = Registry::start(dir.join("registry"));
    push(&src, &registry, "test/again:latest", false);

    let proxy = Proxy::for_registry(&registry);
    for round in ["first", "second"] {
        let dst = dir.join(round);
        skopeo_copy_via(
            &proxy,
            &registry.image("test/again:latest"),
            &oci_ref(&dst),
            false,
        );
        assert_same_image(&src, &dst);
    }
    for layer in oci_layers(&src, &digest) {
        assert_eq!(
            registry.blob_gets(&layer),
            1,
            "upstream GETs of {layer}: {:#?}",
            registry.access_log()
        );
    }
}

/// With the registry stopped, a second pull (multi-arch, every platform) still works: blobs and
/// manifests by digest from the cache, the stale tag with a Warning, the `/v2/` ping locally.
#[test]
fn pull_works_with_the_upstream_stopped() {
    let dir = TestDir::new();
    let src = dir.join("src");
    let index = mkimage(&src, 2, "128KiB", Some("linux/amd64,linux/arm64"), 4);
    let mut registry = Registry::start(dir.join("registry"));
    push(&src, &registry, "test/offline:v1", true);
    // A zero freshness time makes every tag request a revalidation, which then fails.
    let proxy = Proxy::for_registry_with(&registry, |c| c.tag_ttl = Duration::ZERO);
    let image = registry.image("test/offline:v1");
    skopeo_copy_via(&proxy, &image, &oci_ref(dir.join("warm")), true);

    registry.stop();
    let dst = dir.join("offline");
    skopeo_copy_via(&proxy, &image, &oci_ref(&dst), true);
    assert_eq!(oci_index_digest(&dst), index);
    assert_same_image(&src, &dst);

    let tls = tls_via(
        proxy.addr(),
        &registry.host(),
        "registry.test",
        &proxy.ca_cert_path(),
    );
    let resp = request(
        tls,
        &format!(
            "GET /v2/test/offline/manifests/v1 HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            registry.host()
        ),
    );
    assert_eq!(resp.status, 200, "{}", resp.head);
    assert!(
        resp.header("warning").is_some_and(|w| w.contains("110")),
        "{}",
        resp.head
    );
    assert_eq!(resp.header("docker-content-digest"), Some(index));
}

/// A client HEAD on a tag is answered with upstream HEADs only, never a GET, and a stale tag
/// whose digest did not change is revalidated by a HEAD.
#[test]
fn tag_head_never_becomes_an_upstream_get() {
    let dir = TestDir::new();
    let src = dir.join("src");
    let digest = mkimage(&src, 1, "16KiB", None, 5);
    let registry = Registry::start(dir.join("registry"));
    push(&src, &registry, "test/head:latest", false);
    let proxy = Proxy::for_registry_with(&registry, |c| c.tag_ttl = Duration::ZERO);
    let host = registry.host();
    let accept = "application/vnd.oci.image.manifest.v1+json";
    let before = registry.access_log().len();
    for method in ["HEAD", "HEAD", "GET", "GET"] {
        let tls = tls_via(proxy.addr(), &host, "registry.test", &proxy.ca_cert_path());
        let resp = request(
            tls,
            &format!("{method} /v2/test/head/manifests/latest HTTP/1.1\r\nHost: {host}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(resp.status, 200, "{method}: {}", resp.head);
        assert_eq!(
            resp.header("docker-content-digest").as_deref(),
            Some(digest.as_str())
        );
    }
    let log = registry.access_log();
    let tag_requests: Vec<&str> = log[before..]
        .iter()
        .filter(|e| e.uri == "/v2/test/head/manifests/latest")
        .map(|e| e.method.as_str())
        .collect();
    // HEAD, HEAD, then the first GET fetches the manifest, the second revalidates with a HEAD.
    assert_eq!(tag_requests, ["HEAD", "HEAD", "GET", "HEAD"], "{log:#?}");
}

/// Ranges on a cached blob: 206 with the right bytes and Content-Range; beyond the end, 416.
#[test]
fn range_requests_on_a_cached_blob() {
    let dir = TestDir::new();
    let src = dir.join("src");
    let digest = mkimage(&src, 1, "64KiB", None, 6);
    let registry = Registry::start(dir.join("registry"));
    push(&src, &registry, "test/range:latest", false);
    let proxy = Proxy::for_registry(&registry);
    skopeo_copy_via(
        &proxy,
        &registry.image("test/range:latest"),
        &oci_ref(dir.join("dst")),
        false,
    );
    let layer = &oci_layers(&src, &digest)[0];
    let bytes = std::fs::read(src.join("blobs/sha256").join(&layer["sha256:".len()..])).unwrap();
    let host = registry.host();
    let get = |range: &str| {
        let tls = tls_via(proxy.addr(), &host, "registry.test", &proxy.ca_cert_path());
        request(tls, &format!("GET /v2/test/range/blobs/{layer} HTTP/1.1\r\nHost: {host}\r\nRange: {range}\r\nConnection: close\r\n\r\n"))
    };
    let resp = get("bytes=100-199");
    assert_eq!(resp.status, 206, "{}", resp.head);
    assert_eq!(resp.body, &bytes[100..200]);
    assert_eq!(
        resp.header("content-range"),
        Some(format!("bytes 100-199/{}", bytes.len()))
    );
    let resp = get("bytes=-10");
    assert_eq!(resp.body, &bytes[bytes.len() - 10..]);
    let resp = get(&format!("bytes={}-", bytes.len()));
    assert_eq!(resp.status, 416, "{}", resp.head);
    assert_eq!(
        registry.blob_gets(layer),
        1,
        "ranges were served from the cache"
    );
}

/// A blob upstream that drips `data` out slowly, counting requests; `corrupt` flips one byte.
fn slow_blob_upstream(
    dir: &Path,
    data: Arc<Vec<u8>>,
    corrupt: bool,
    cut: bool,
) -> (u16, Arc<Mutex<Vec<String>>>) {
    tiny_https(dir, &["blobs.test"], move |_, w| {
        let _ = write!(w, "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", data.len());
        let mut body = data.to_vec();
        if corrupt {
            body[data.len() / 2] ^= 0xff;
        }
        if cut {
            body.truncate(data.len() / 2);
        }
        for chunk in body.chunks(64 * 1024) {
            if w.write_all(chunk).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    })
}

fn blob_proxy(port: u16, dir: &Path) -> Proxy {
    Proxy::start(blob_config(port, dir))
}

/// [`blob_proxy`] keeping its CA and cache in `state`, so that a restart finds them.
fn blob_proxy_in(state: &Path, port: u16, dir: &Path) -> Proxy {
    Proxy::start_in(state, blob_config(port, dir))
}

fn blob_config(port: u16, dir: &Path) -> impl FnOnce(&mut Config) {
    let ca = dir.join("ca.crt");
    move |c| reach_test_host(c, "blobs.test", port, ca)
}

/// An upstream for `blobs.test` that sends its response head only after 600 ms, then `data`.
fn late_blob_upstream(dir: &Path, data: Arc<Vec<u8>>) -> (u16, Arc<Mutex<Vec<String>>>) {
    tiny_https(dir, &["blobs.test"], move |_, w| {
        thread::sleep(Duration::from_millis(600));
        let _ = write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            data.len()
        );
        let _ = w.write_all(&data);
    })
}

/// Asks the proxy for a blob and hangs up 150 ms later, before a late upstream has answered.
fn ask_and_leave(proxy: &Proxy, port: u16, digest: &str) {
    let target = format!("blobs.test:{port}");
    let mut client = tls_via(proxy.addr(), &target, "blobs.test", &proxy.ca_cert_path());
    write!(
        client,
        "GET /v2/x/blobs/{digest} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    client.flush().unwrap();
    thread::sleep(Duration::from_millis(150));
}

fn get_blob(proxy: &Proxy, port: u16, digest: &str) -> RawResponse {
    let target = format!("blobs.test:{port}");
    let tls = tls_via(proxy.addr(), &target, "blobs.test", &proxy.ca_cert_path());
    request(
        tls,
        &format!(
            "GET /v2/x/blobs/{digest} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
        ),
    )
}

/// Four clients asking at once for a blob that is still downloading share one upstream request,
/// and each gets every byte; afterwards it is a hit.
#[test]
fn concurrent_requests_share_one_download() {
    let dir = TestDir::new();
    let data: Arc<Vec<u8>> = Arc::new((0..1_500_000u32).map(|i| (i * 7 % 251) as u8).collect());
    let digest = sha256_digest(&data);
    let (port, seen) = slow_blob_upstream(&dir.join("up"), data.clone(), false, false);
    let proxy = blob_proxy(port, &dir.join("up"));
    let responses: Vec<RawResponse> = thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| get_blob(&proxy, port, &digest)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for resp in &responses {
        assert_eq!(resp.status, 200, "{}", resp.head);
        assert!(
            resp.complete && resp.body == *data,
            "got {} bytes",
            resp.body.len()
        );
    }
    let heads = seen.lock().unwrap().clone();
    assert_eq!(heads.len(), 1, "upstream requests: {heads:?}");
    let again = get_blob(&proxy, port, &digest);
    assert!(again.complete && again.body == *data);
    assert_eq!(seen.lock().unwrap().len(), 1);
}

/// Bytes that do not hash to the digest, or a body cut short, reach the client as a broken
/// response (never a clean end) and leave nothing in the cache: the next request goes upstream.
#[test]
fn corrupt_or_truncated_downloads_are_aborted_and_not_cached() {
    for (corrupt, cut) in [(true, false), (false, true)] {
        let dir = TestDir::new();
        let data: Arc<Vec<u8>> = Arc::new((0..300_000u32).map(|i| (i % 253) as u8).collect());
        let digest = sha256_digest(&data);
        let (port, seen) = slow_blob_upstream(&dir.join("up"), data.clone(), corrupt, cut);
        let proxy = blob_proxy(port, &dir.join("up"));
        for attempt in 1..=2 {
            let resp = get_blob(&proxy, port, &digest);
            assert_eq!(resp.status, 200, "{}", resp.head);
            assert!(
                !resp.complete,
                "corrupt={corrupt} cut={cut}: the client saw a clean end"
            );
            assert_eq!(
                seen.lock().unwrap().len(),
                attempt,
                "attempt {attempt} went upstream"
            );
        }
        let objects = walk(&proxy.cache_dir().join("content-v2"));
        assert!(objects.is_empty(), "cached: {objects:?}");
    }
}

/// A digest the proxy cannot verify gets a 400 naming the problem.
#[test]
fn malformed_digests_get_400() {
    let dir = TestDir::new();
    let (port, seen) = slow_blob_upstream(&dir.join("up"), Arc::new(vec![1]), false, false);
    let proxy = blob_proxy(port, &dir.join("up"));
    for bad in [
        "md5:abcd",
        "sha256:abc",
        &format!("sha256:{}", "A".repeat(64)),
    ] {
        let resp = get_blob(&proxy, port, bad);
        assert_eq!(resp.status, 400, "{bad}: {}", resp.head);
        assert!(
            String::from_utf8_lossy(&resp.body).contains("digest"),
            "{bad}"
        );
    }
    assert!(seen.lock().unwrap().is_empty());
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .flat_map(|e| {
            if e.path().is_dir() {
                walk(&e.path())
            } else {
                vec![e.path()]
            }
        })
        .collect()
}

/// A range asked for while the blob is not cached is served from the one download, which then
/// completes into the cache: the whole blob afterwards is a hit.
#[test]
fn range_on_a_miss_is_served_from_the_download() {
    let dir = TestDir::new();
    let data: Arc<Vec<u8>> = Arc::new((0..700_000u32).map(|i| (i % 241) as u8).collect());
    let digest = sha256_digest(&data);
    let (port, seen) = slow_blob_upstream(&dir.join("up"), data.clone(), false, false);
    let proxy = blob_proxy(port, &dir.join("up"));
    let target = format!("blobs.test:{port}");
    let tls = tls_via(proxy.addr(), &target, "blobs.test", &proxy.ca_cert_path());
    let resp = request(
        tls,
        &format!("GET /v2/x/blobs/{digest} HTTP/1.1\r\nHost: {target}\r\nRange: bytes=300000-300099\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(resp.status, 206, "{}", resp.head);
    assert_eq!(resp.body, &data[300_000..300_100]);
    let whole = get_blob(&proxy, port, &digest);
    assert!(whole.complete && whole.body == *data);
    let heads = seen.lock().unwrap().clone();
    assert_eq!(heads.len(), 1, "{heads:?}");
}

/// regproxy killed with SIGKILL in the middle of a download leaves nothing that a restarted
/// regproxy serves: the blob is fetched again, whole and verified.
#[test]
fn kill_9_mid_download_leaves_nothing_served() {
    let dir = TestDir::new();
    let data: Arc<Vec<u8>> = Arc::new((0..2_000_000u32).map(|i| (i % 239) as u8).collect());
    let digest = sha256_digest(&data);
    let (port, seen) = slow_blob_upstream(&dir.join("up"), data.clone(), false, false);
    let state = dir.join("state");
    let start = || {
        let listen = free_port();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_regproxy"))
            .args(["--listen", &format!("127.0.0.1:{listen}")])
            .args(["--admin-listen", &format!("127.0.0.1:{}", free_port())])
            .arg("--ca-dir")
            .arg(state.join("ca"))
            .arg("--cache-dir")
            .arg(state.join("cache"))
            .args([
                "--intercept",
                "blobs.test",
                "--allow-port",
                &port.to_string(),
            ])
            .args(["--resolve", &format!("blobs.test:{port}=127.0.0.1:{port}")])
            .arg("--upstream-ca")
            .arg(dir.join("up/ca.crt"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], listen));
        wait_for(
            START_TIMEOUT,
            || std::net::TcpStream::connect(addr).ok(),
            || format!("regproxy on {addr}"),
        );
        (child, addr)
    };
    let (mut child, addr) = start();
    let target = format!("blobs.test:{port}");
    let mut tls = tls_via(addr, &target, "blobs.test", &state.join("ca/ca.crt"));
    write!(
        tls,
        "GET /v2/x/blobs/{digest} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut first = [0u8; 4096];
    std::io::Read::read_exact(&mut tls, &mut first).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let partials: Vec<_> = walk(&state.join("cache/tmp"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "part"))
        .collect();
    assert_eq!(
        partials.len(),
        1,
        "the download was in progress: {partials:?}"
    );

    let (mut child, addr) = start();
    let tls = tls_via(addr, &target, "blobs.test", &state.join("ca/ca.crt"));
    let resp = request(
        tls,
        &format!(
            "GET /v2/x/blobs/{digest} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
        ),
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        resp.complete && resp.body == *data,
        "got {} bytes",
        resp.body.len()
    );
    assert_eq!(
        seen.lock().unwrap().len(),
        2,
        "fetched again after the crash"
    );
    assert!(
        !partials[0].exists(),
        "the dead run's partial file was removed"
    );
}

/// The client that started a download leaves before the upstream even answered: the download
/// goes on, the clients that joined get every byte, and the upstream is asked once.
#[test]
fn leader_leaving_early_cancels_nothing() {
    let dir = TestDir::new();
    let data: Arc<Vec<u8>> = Arc::new((0..400_000u32).map(|i| (i % 233) as u8).collect());
    let digest = sha256_digest(&data);
    let (port, seen) = late_blob_upstream(&dir.join("up"), data.clone());
    let proxy = blob_proxy(port, &dir.join("up"));
    ask_and_leave(&proxy, port, &digest);
    let followers: Vec<RawResponse> = thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|_| s.spawn(|| get_blob(&proxy, port, &digest)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for resp in followers {
        assert!(resp.complete && resp.body == *data, "{}", resp.head);
    }
    let heads = seen.lock().unwrap().clone();
    assert_eq!(heads.len(), 1, "{heads:?}");
}

/// Shutdown lets a download whose client has left finish and be committed: after a restart the
/// blob is served from the cache without asking the upstream again.
#[test]
fn shutdown_commits_a_download_whose_client_left() {
    let dir = TestDir::new();
    let data: Arc<Vec<u8>> = Arc::new((0..400_000u32).map(|i| (i % 241) as u8).collect());
    let digest = sha256_digest(&data);
    let (port, seen) = late_blob_upstream(&dir.join("up"), data.clone());
    let state = dir.join("state");
    let mut proxy = blob_proxy_in(&state, port, &dir.join("up"));
    ask_and_leave(&proxy, port, &digest);
    proxy.stop();

    let proxy = blob_proxy_in(&state, port, &dir.join("up"));
    let resp = get_blob(&proxy, port, &digest);
    assert!(resp.complete && resp.body == *data, "{}", resp.head);
    // (A HEAD may check that the repository lets anonymous clients have it; no second GET.)
    let heads = seen.lock().unwrap().clone();
    let gets = heads.iter().filter(|h| h.starts_with("GET ")).count();
    assert_eq!(gets, 1, "downloaded again: {heads:?}");
}

/// A tag whose upstream answers 503, 429, or nothing in time is served stale with a Warning.
#[test]
fn tag_is_served_stale_on_5xx_429_and_timeouts() {
    let dir = TestDir::new();
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#.to_vec();
    let digest = sha256_digest(&manifest);
    // 0: healthy, 1: 503, 2: 429, 3: answers too late.
    let mode = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (m, d, body) = (mode.clone(), digest.clone(), manifest.clone());
    let (port, _) = tiny_https(&dir.join("up"), &["tags.test"], move |head, w| {
        match m.load(std::sync::atomic::Ordering::SeqCst) {
            1 => {
                let _ = w.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                return;
            }
            2 => {
                let _ = w.write_all(b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                return;
            }
            3 => thread::sleep(Duration::from_secs(3)),
            _ => {}
        }
        let _ = write!(w, "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nDocker-Content-Digest: {d}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
        if head.starts_with("GET ") {
            let _ = w.write_all(&body);
        }
    });
    let ca = dir.join("up/ca.crt");
    let proxy = Proxy::start(move |c| {
        c.intercept.push("tags.test".into());
        c.allow_port.push(port);
        c.resolve.push((
            format!("tags.test:{port}"),
            SocketAddr::from(([127, 0, 0, 1], port)),
        ));
        c.upstream_ca.push(ca);
        c.tag_ttl = Duration::ZERO;
        c.upstream_timeout = Duration::from_secs(1);
    });
    let target = format!("tags.test:{port}");
    let get = || {
        let tls = tls_via(proxy.addr(), &target, "tags.test", &proxy.ca_cert_path());
        request(
            tls,
            &format!(
                "GET /v2/x/manifests/v1 HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
            ),
        )
    };
    let first = get();
    assert_eq!(first.status, 200, "{}", first.head);
    assert!(first.header("warning").is_none());
    for m in [1, 2, 3] {
        mode.store(m, std::sync::atomic::Ordering::SeqCst);
        let resp = get();
        assert_eq!(resp.status, 200, "mode {m}: {}", resp.head);
        assert_eq!(resp.body, manifest, "mode {m}");
        assert!(
            resp.header("warning").is_some_and(|w| w.starts_with("110")),
            "mode {m}: {}",
            resp.head
        );
        assert_eq!(resp.header("docker-content-digest"), Some(digest.clone()));
    }
}

/// Eight skopeo pulls of one image started at once: every blob crosses from the registry once.
#[test]
fn eight_concurrent_cold_pulls_fetch_each_blob_once() {
    let dir = TestDir::new();
    let src = dir.join("src");
    let manifest = mkimage(&src, 3, "2MiB", None, 51);
    let registry = Registry::start(dir.join("registry"));
    push(&src, &registry, "test/fan:latest", false);
    let proxy = Proxy::for_registry(&registry);
    let image = registry.image("test/fan:latest");
    thread::scope(|s| {
        for i in 0..8 {
            let (proxy, image, dst) = (&proxy, &image, dir.join(format!("dst{i}")));
            s.spawn(move || skopeo_copy_via(proxy, image, &oci_ref(dst), false));
        }
    });
    for i in 0..8 {
        assert_same_image(&src, dir.join(format!("dst{i}")));
    }
    // Config and layers are fetched by digest, each byte exactly once (the manifest by its tag):
    // a layer larger than a piece in ranged GETs, none of them twice.
    for (blob, size) in oci_blobs(&src).into_iter().filter(|b| b.0 != manifest) {
        let carried = registry.blob_bytes(&blob);
        assert_eq!(carried, size, "{blob}: {carried} upstream bytes of {size}");
    }
}

/// A tag moved upstream: within the freshness time the old digest is served, after it the new.
#[test]
fn moved_tag_is_seen_after_its_freshness_time() {
    let dir = TestDir::new();
    let old = mkimage(dir.join("old"), 1, "16KiB", None, 61);
    let new = mkimage(dir.join("new"), 1, "16KiB", None, 62);
    let registry = Registry::start(dir.join("registry"));
    push(dir.join("old"), &registry, "test/moving:latest", false);
    let proxy = Proxy::for_registry_with(&registry, |c| c.tag_ttl = Duration::from_secs(2));
    let image = registry.image("test/moving:latest");
    assert_eq!(sha256_digest(&inspect_raw_via(&proxy, &image)), old);
    push(dir.join("new"), &registry, "test/moving:latest", false);
    assert_eq!(
        sha256_digest(&inspect_raw_via(&proxy, &image)),
        old,
        "fresh: the cached digest"
    );
    thread::sleep(Duration::from_millis(2100));
    assert_eq!(
        sha256_digest(&inspect_raw_via(&proxy, &image)),
        new,
        "stale: revalidated"
    );
}

/// A fixture standing in for the registry serves wrong bytes, then the right ones: the first
/// pull fails and caches nothing, the next one works and is cached.
#[test]
fn after_a_corrupt_download_a_correct_upstream_works() {
    let dir = TestDir::new();
    let data: Arc<Vec<u8>> = Arc::new((0..200_000u32).map(|i| (i % 227) as u8).collect());
    let digest = sha256_digest(&data);
    let corrupt = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (flag, body) = (corrupt.clone(), data.clone());
    let (port, seen) = tiny_https(&dir.join("up"), &["blobs.test"], move |_, w| {
        let mut bytes = body.to_vec();
        if flag.load(std::sync::atomic::Ordering::SeqCst) {
            bytes[1000] ^= 0x55;
        }
        let _ = write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            bytes.len()
        );
        let _ = w.write_all(&bytes);
    });
    let proxy = blob_proxy(port, &dir.join("up"));
    assert!(!get_blob(&proxy, port, &digest).complete);
    corrupt.store(false, std::sync::atomic::Ordering::SeqCst);
    let good = get_blob(&proxy, port, &digest);
    assert!(good.complete && good.body == *data);
    let again = get_blob(&proxy, port, &digest);
    assert!(again.complete && again.body == *data);
    assert_eq!(
        seen.lock().unwrap().len(),
        2,
        "the corrupt try and the good one; then a hit"
    );
}
