//! Operating regproxy: the admin endpoint's exact metrics, the bounded cache, the `cache`
//! commands beside a running proxy, and CA trust installation.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use support::*;

/// Waits until `series` reads `want` (access lines are written as bodies end, just after the
/// client has its bytes), then asserts it.
fn expect(proxy: &Proxy, series: &str, want: u64) {
    let mut last = String::new();
    for _ in 0..50 {
        last = metrics(proxy);
        if sample(&last, series) == want {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{series}: want {want}, have {}\n{last}",
        sample(&last, series)
    );
}

fn regproxy(args: &[&str], config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_regproxy"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("running regproxy")
}

/// A config file naming the proxy's cache and admin address, for the `cache` commands.
fn config_for(proxy: &Proxy, dir: &TestDir) -> std::path::PathBuf {
    let path = dir.join("regproxy.toml");
    std::fs::write(
        &path,
        format!(
            "cache_dir = {:?}\nca_dir = {:?}\nadmin_listen = \"{}\"\n",
            proxy.cache_dir().display().to_string(),
            proxy.ca_dir().display().to_string(),
            proxy.admin_addr()
        ),
    )
    .unwrap();
    path
}

/// Misses, then hits, then a join: the counters say exactly that.
#[test]
fn metrics_are_exact_after_misses_hits_and_a_join() {
    let dir = TestDir::new();
    let src = dir.join("src");
    mkimage(&src, 2, "64KiB", None, 11);
    let registry = Registry::start(dir.join("registry"));
    push(&src, &registry, "test/metrics:latest", false);
    let proxy = Proxy::for_registry(&registry);
    let host = registry.host();
    // manifest + config + 2 layers
    let objects = oci_blobs(&src);
    assert_eq!(objects.len(), 4);
    let total: u64 = objects.values().sum();

    skopeo_copy_via(
        &proxy,
        &registry.image("test/metrics:latest"),
        &oci_ref(dir.join("a")),
        false,
    );
    let miss = format!("regproxy_requests_total{{registry=\"{host}\",outcome=\"MISS\"}}");
    let hit = format!("regproxy_requests_total{{registry=\"{host}\",outcome=\"HIT\"}}");
    expect(&proxy, &miss, 4);
    expect(&proxy, &hit, 0);
    expect(&proxy, "regproxy_bytes_from_upstream_total", total);
    expect(&proxy, "regproxy_cache_entries", 4);
    expect(&proxy, "regproxy_cache_bytes", total);

    skopeo_copy_via(
        &proxy,
        &registry.image("test/metrics:latest"),
        &oci_ref(dir.join("b")),
        false,
    );
    expect(&proxy, &hit, 4);
    expect(&proxy, &miss, 4);
    expect(&proxy, "regproxy_bytes_from_cache_total", total);
    expect(&proxy, "regproxy_bytes_from_upstream_total", total);
    let ok = format!("regproxy_upstream_requests_total{{registry=\"{host}\",status=\"200\"}}");
    let part = format!("regproxy_upstream_requests_total{{registry=\"{host}\",status=\"206\"}}");
    // /v2/ twice and the manifest once; the three blobs once each, asked as their first piece.
    expect(&proxy, &ok, 3);
    expect(&proxy, &part, 3);
    assert!(sample(&metrics(&proxy), "regproxy_leaves_issued_total") >= 1);
    expect(&proxy, "regproxy_singleflight_joins_total", 0);
    expect(&proxy, "regproxy_open_tunnels", 0);

    // A join: two clients ask at once for a blob that drips out slowly.
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 199) as u8).collect();
    let blob = sha256_digest(&data);
    let (port, seen) = tiny_https(&dir.join("slow"), &["slow.test"], move |_, w| {
        let _ = write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            data.len()
        );
        for chunk in data.chunks(50_000) {
            let _ = w.write_all(chunk);
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let slow = Proxy::start(|c| {
        c.intercept.push("slow.test".into());
        c.allow_port.push(port);
        c.resolve.push((
            format!("slow.test:{port}"),
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        ));
        c.upstream_ca.push(dir.join("slow/ca.crt"));
    });
    let target = format!("slow.test:{port}");
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                let tls = tls_via(slow.addr(), &target, "slow.test", &slow.ca_cert_path());
                let resp = request(tls, &format!("GET /v2/x/blobs/{blob} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"));
                assert!(resp.complete);
            });
        }
    });
    assert_eq!(seen.lock().unwrap().len(), 1);
    expect(&slow, "regproxy_singleflight_joins_total", 1);
    expect(
        &slow,
        &format!("regproxy_requests_total{{registry=\"{target}\",outcome=\"JOINED\"}}"),
        1,
    );
    expect(
        &slow,
        &format!("regproxy_requests_total{{registry=\"{target}\",outcome=\"MISS\"}}"),
        1,
    );
}

/// /healthz, /readyz and /ca.crt on the admin listener.
#[test]
fn admin_endpoint_serves_health_readiness_and_the_ca() {
    let proxy = Proxy::start(|_| {});
    for path in ["/healthz", "/readyz"] {
        let (status, text) = raw(
            proxy.admin_addr(),
            format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert_eq!(status, 200, "{path}: {text}");
    }
    let (status, text) = raw(
        proxy.admin_addr(),
        b"GET /ca.crt HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200);
    let pem = std::fs::read_to_string(proxy.ca_cert_path()).unwrap();
    assert!(text.ends_with(&pem), "{text}");
    let (status, _) = raw(
        proxy.admin_addr(),
        b"GET /nope HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 404);
}

/// With a size bound, the cache stays under it (least recently used first), and evicted
/// objects are simply fetched again.
#[test]
fn bounded_cache_evicts_least_recently_used() {
    let dir = TestDir::new();
    let registry = Registry::start(dir.join("registry"));
    let old = mkimage(dir.join("old"), 2, "256KiB", None, 21);
    let new = mkimage(dir.join("new"), 2, "256KiB", None, 22);
    push(dir.join("old"), &registry, "test/old:latest", false);
    push(dir.join("new"), &registry, "test/new:latest", false);
    let proxy = Proxy::for_registry_with(&registry, |c| c.max_cache_size = Some(700 * 1024));
    skopeo_copy_via(
        &proxy,
        &registry.image("test/old:latest"),
        &oci_ref(dir.join("o1")),
        false,
    );
    std::thread::sleep(Duration::from_millis(1100)); // distinct access times
    skopeo_copy_via(
        &proxy,
        &registry.image("test/new:latest"),
        &oci_ref(dir.join("n1")),
        false,
    );
    wait_for(
        Duration::from_secs(10),
        || (sample(&metrics(&proxy), "regproxy_evictions_total") > 0).then_some(()),
        || metrics(&proxy),
    );
    let m = metrics(&proxy);
    assert!(sample(&m, "regproxy_cache_bytes") <= 700 * 1024, "{m}");
    let on_disk: u64 = walk_sizes(&proxy.cache_dir().join("content-v2"));
    assert_eq!(on_disk, sample(&m, "regproxy_cache_bytes"));
    // The older image's layers went first; the newer one's are still there.
    for layer in oci_layers(dir.join("new"), &new) {
        assert!(
            content_path(&proxy, &layer).exists(),
            "newest layer {layer} was evicted"
        );
    }
    assert!(oci_layers(dir.join("old"), &old)
        .iter()
        .any(|l| !content_path(&proxy, l).exists()));
    // And a pull of the evicted image still works.
    skopeo_copy_via(
        &proxy,
        &registry.image("test/old:latest"),
        &oci_ref(dir.join("o2")),
        false,
    );
    assert_same_image(dir.join("old"), dir.join("o2"));
}

fn content_path(proxy: &Proxy, digest: &str) -> std::path::PathBuf {
    let hex = &digest["sha256:".len()..];
    proxy
        .cache_dir()
        .join("content-v2/sha256")
        .join(&hex[0..2])
        .join(&hex[2..4])
        .join(&hex[4..])
}

fn walk_sizes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            if e.path().is_dir() {
                walk_sizes(&e.path())
            } else {
                e.metadata().unwrap().len()
            }
        })
        .sum()
}

/// `cache ls`, `stats`, `verify`, `rm` and `gc` against the cache of a running proxy.
#[test]
fn cache_commands_work_beside_a_running_proxy() {
    let dir = TestDir::new();
    let src = dir.join("src");
    let digest = mkimage(&src, 2, "32KiB", None, 31);
    let registry = Registry::start(dir.join("registry"));
    push(&src, &registry, "test/cmd:v1", false);
    let proxy = Proxy::for_registry(&registry);
    skopeo_copy_via(
        &proxy,
        &registry.image("test/cmd:v1"),
        &oci_ref(dir.join("a")),
        false,
    );
    skopeo_copy_via(
        &proxy,
        &registry.image("test/cmd:v1"),
        &oci_ref(dir.join("b")),
        false,
    );
    let config = config_for(&proxy, &dir);
    let image = format!("{}/test/cmd:v1", registry.host());

    let out = regproxy(&["cache", "ls"], &config);
    assert!(out.status.success());
    let ls = String::from_utf8_lossy(&out.stdout).into_owned();
    for blob in oci_blobs(&src).keys() {
        let line = ls
            .lines()
            .find(|l| l.starts_with(blob.as_str()))
            .unwrap_or_else(|| panic!("{blob} not in\n{ls}"));
        assert!(line.contains(&image), "{line}");
    }
    assert!(
        ls.contains("application/vnd.oci.image.manifest.v1+json"),
        "{ls}"
    );

    let out = regproxy(&["cache", "stats"], &config);
    let stats = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stats.contains("entries: 4"), "{stats}");
    assert!(stats.contains("hit ratio since start: 50.0%"), "{stats}");

    let out = regproxy(&["cache", "verify"], &config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let layer = &oci_layers(&src, &digest)[0];
    let path = content_path(&proxy, layer);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let out = regproxy(&["cache", "verify"], &config);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("corrupt, removed: {layer}")));
    assert!(!path.exists());
    // The proxy fetches the removed layer again; the pull is whole.
    skopeo_copy_via(
        &proxy,
        &registry.image("test/cmd:v1"),
        &oci_ref(dir.join("c")),
        false,
    );
    assert_same_image(&src, dir.join("c"));

    let out = regproxy(&["cache", "rm", &image], &config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("4 object(s) removed"));
    assert_eq!(walk_sizes(&proxy.cache_dir().join("content-v2")), 0);
    let out = regproxy(&["cache", "gc"], &config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An object that is not cached, or a digest that is not one, is said to be so.
    let absent = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    let out = regproxy(&["cache", "rm", absent], &config);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains(&format!("{absent} is not cached")), "{said}");
    let out = regproxy(&["cache", "rm", "sha256:abc"], &config);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("64 lower-case hex characters"), "{said}");
}

/// `ca install` puts the CA into a (sandboxed) Debian trust store's bundle; `uninstall` takes
/// it out again.
#[test]
fn ca_install_and_uninstall_in_a_debian_trust_store() {
    require_tool("update-ca-certificates");
    let dir = TestDir::new();
    let root = dir.join("root");
    for d in [
        "usr/local/share/ca-certificates",
        "etc/ssl/certs",
        "etc/ca-certificates/update.d",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("etc/ca-certificates.conf"), "").unwrap();
    // Another local CA, as a real system has: update-ca-certificates keeps an old bundle
    // rather than write an empty one.
    make_test_certs(&dir.join("other"), "some other CA", &["other.test"]);
    std::fs::copy(
        dir.join("other/ca.crt"),
        root.join("usr/local/share/ca-certificates/other.crt"),
    )
    .unwrap();
    let config = dir.join("c.toml");
    std::fs::write(
        &config,
        format!("ca_dir = {:?}\n", dir.join("ca").display().to_string()),
    )
    .unwrap();
    assert!(regproxy(&["ca", "init"], &config).status.success());
    let root_arg = root.display().to_string();
    let out = regproxy(&["ca", "install", "--root", &root_arg], &config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("copied") && said.contains("update-ca-certificates"),
        "{said}"
    );
    let pem = std::fs::read_to_string(dir.join("ca/ca.crt")).unwrap();
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let bundle = || {
        std::fs::read_to_string(root.join("etc/ssl/certs/ca-certificates.crt"))
            .unwrap_or_default()
            .lines()
            .collect::<String>()
    };
    assert!(bundle().contains(&body), "CA not in the bundle");
    let out = regproxy(&["ca", "uninstall", "--root", &root_arg], &config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!bundle().contains(&body), "CA still in the bundle");
}

/// `cache prefetch --all-platforms` warms the cache so completely that a pull of every platform
/// works with the registry stopped; each object was fetched from the registry once.
#[test]
fn prefetch_warms_the_cache_for_an_offline_pull() {
    let dir = TestDir::new();
    let src = dir.join("src");
    let index = mkimage(&src, 2, "64KiB", Some("linux/amd64,linux/arm64"), 41);
    let mut registry = Registry::start(dir.join("registry"));
    push(&src, &registry, "test/pre:v1", true);
    let state = dir.join("state");
    let config = dir.join("prefetch.toml");
    std::fs::write(
        &config,
        format!(
            "cache_dir = {:?}\nca_dir = {:?}\nresolve = [\"{}=127.0.0.1:{}\"]\nupstream_ca = [{:?}]\n",
            state.join("cache").display().to_string(),
            state.join("ca").display().to_string(),
            registry.host(),
            registry.port(),
            registry.ca_cert_path().display().to_string(),
        ),
    )
    .unwrap();
    let image = format!("{}/test/pre:v1", registry.host());
    // Prefetch fills an empty directory, and creates none.
    let out = regproxy(&["cache", "prefetch", "--all-platforms", &image], &config);
    assert!(!out.status.success());
    std::fs::create_dir_all(state.join("cache")).unwrap();
    let out = regproxy(&["cache", "prefetch", "--all-platforms", &image], &config);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    // index + 2 × (manifest + config + 2 layers)
    assert!(
        said.contains(&format!("{image}: 9 object(s) cached")),
        "{said}"
    );
    // Off a terminal, progress is one plain line per object.
    assert!(said.lines().any(|l| l == "v1 MISS"), "{said}");
    let layer = &oci_layers(&src, &manifest_of(&src, &index, "arm64"))[0];
    assert!(
        said.lines().any(|l| *l == format!("{layer} MISS")),
        "{said}"
    );
    for blob in oci_blobs(&src).keys() {
        let gets = registry
            .access_log()
            .iter()
            .filter(|e| e.method == "GET" && e.uri.ends_with(blob.as_str()) && e.status == 200)
            .count();
        assert!(gets <= 1, "{blob} fetched {gets} times");
    }
    // A second prefetch is all hits.
    let out = regproxy(&["cache", "prefetch", "--all-platforms", &image], &config);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!said.contains(" MISS"), "{said}");

    registry.stop();
    let proxy = Proxy::start_in(&state, |c| registry.configure_proxy(c));
    let dst = dir.join("dst");
    skopeo_copy_via(&proxy, &registry.image("test/pre:v1"), &oci_ref(&dst), true);
    assert_same_image(&src, &dst);
}

/// The digest of `arch`'s manifest in the OCI index `index` of the layout at `dir`.
fn manifest_of(dir: &Path, index: &str, arch: &str) -> String {
    let path = dir.join("blobs/sha256").join(&index["sha256:".len()..]);
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    v["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["platform"]["architecture"] == arch)
        .and_then(|m| m["digest"].as_str())
        .unwrap()
        .to_string()
}
