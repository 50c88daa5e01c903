//! Trust: a hostile upstream cannot unlock another origin's private bytes (by redirects, by
//! answering every HEAD with 200, by poisoning a tag's digest); no client gets a cleanly ended
//! response of unverified bytes (a range from a download in flight included); refusals are
//! well-formed for h2 clients; one tag, one upstream request; a full disk costs capacity only.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use regproxy::Config;
use support::*;

const USER: &str = "alice";
const PASSWORD: &str = "pw-trust-81";
const EVIL: &str = "evil.test";

/// How the scripted malicious upstream answers.
#[derive(Clone, Copy, Debug)]
enum Evil {
    /// 200 to every HEAD (with the digest it is asked about); 404 to every GET.
    HeadOk,
    /// A 307 for everything, to the private registry's own URL for the same path.
    RedirectToVictim,
    /// 302 for every HEAD to a path of its own that answers 200; 404 to every GET.
    RedirectToOk,
    /// A tag `HEAD` names the cached private manifest's digest; 404 to every GET.
    NamePrivateManifest,
}

/// A private registry with an image, and a proxy that also intercepts a hostile `evil.test`.
struct Setup {
    dir: TestDir,
    registry: Registry,
    proxy: Proxy,
    evil_port: u16,
    manifest: String,
    manifest_bytes: Vec<u8>,
    layer: String,
    layer_bytes: Vec<u8>,
}

fn setup(evil: Evil) -> Setup {
    let dir = TestDir::new();
    let registry = Registry::start_with_htpasswd(dir.join("registry"), USER, PASSWORD);
    let manifest = mkimage(dir.join("src"), 1, "256KiB", None, 131);
    push(dir.join("src"), &registry, "test/private:v1", false);
    let layer = oci_layers(dir.join("src"), &manifest).remove(0);
    let blob = |d: &str| std::fs::read(dir.join("src/blobs/sha256").join(&d["sha256:".len()..]));
    let (layer_bytes, manifest_bytes) = (blob(&layer).unwrap(), blob(&manifest).unwrap());
    let victim = (registry.host(), manifest.clone(), manifest_bytes.len());
    let evil_port = evil_upstream(&dir.join("evil"), evil, victim);
    let ca = dir.join("evil/ca.crt");
    let proxy = Proxy::for_registry_with(&registry, |c| reach_test_host(c, EVIL, evil_port, ca));
    // An authorized client fills the cache from the private repository.
    let out = try_skopeo_copy_via(
        &proxy,
        &registry.image("test/private:v1"),
        &oci_ref(dir.join("a")),
        false,
        &["--src-creds", &format!("{USER}:{PASSWORD}")],
    );
    assert_success(&out, "authorized pull");
    Setup {
        dir,
        registry,
        proxy,
        evil_port,
        manifest,
        manifest_bytes,
        layer,
        layer_bytes,
    }
}

/// The scripted upstream; `victim` is the private registry and its manifest's digest and size.
fn evil_upstream(dir: &Path, evil: Evil, victim: (String, String, usize)) -> u16 {
    let (victim, manifest, len) = victim;
    tiny_https(dir, &[EVIL], move |head, w| {
        let mut line = head.lines().next().unwrap_or("").split(' ');
        let (method, path) = (line.next().unwrap_or(""), line.next().unwrap_or("/"));
        let digest = path.rsplit('/').next().unwrap_or("");
        let _ = match (evil, method) {
            (Evil::RedirectToVictim, _) => write!(
                w,
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: https://{victim}{path}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
            (Evil::NamePrivateManifest, "HEAD") => write!(
                w,
                "HTTP/1.1 200 OK\r\nDocker-Content-Digest: {manifest}\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
            ),
            (Evil::RedirectToOk, "HEAD") if !path.starts_with("/ok") => write!(
                w,
                "HTTP/1.1 302 Found\r\nLocation: /ok{path}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
            (_, "HEAD") => write!(
                w,
                "HTTP/1.1 200 OK\r\nDocker-Content-Digest: {digest}\r\nContent-Type: application/octet-stream\r\nContent-Length: 262144\r\nConnection: close\r\n\r\n"
            ),
            _ => write!(
                w,
                "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
            ),
        };
    })
    .0
}

impl Setup {
    /// An anonymous request to `host` through the proxy; asserts that none of the private bytes
    /// came back.
    fn anonymous(&self, host: &str, sni: &str, request_line: &str) -> RawResponse {
        let tls = tls_via(self.proxy.addr(), host, sni, &self.proxy.ca_cert_path());
        let resp = request(
            tls,
            &format!("{request_line} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        );
        self.assert_nothing_private(&resp, request_line);
        resp
    }

    fn assert_nothing_private(&self, resp: &RawResponse, what: &str) {
        let leaked = |secret: &[u8]| resp.body.windows(64).any(|w| w == &secret[..64]);
        assert!(
            !leaked(&self.layer_bytes) && !leaked(&self.manifest_bytes),
            "{what}: private bytes reached an anonymous client ({})",
            resp.head
        );
    }

    fn evil_host(&self) -> String {
        format!("{EVIL}:{}", self.evil_port)
    }
}

/// A layer and a manifest cached from a private repository on one registry are not served to an
/// anonymous client that asks another intercepted upstream for the same digests, however that
/// upstream answers the authorization check: 200 for everything, a redirect to the private
/// registry itself, or a redirect to a path of its own that answers 200. Nor in mirror mode.
#[test]
fn private_bytes_never_cross_origins() {
    for evil in [Evil::HeadOk, Evil::RedirectToVictim, Evil::RedirectToOk] {
        let s = setup(evil);
        let host = s.evil_host();
        for path in [
            format!("/v2/any/thing/blobs/{}", s.layer),
            format!("/v2/any/thing/manifests/{}", s.manifest),
        ] {
            // A HEAD is the upstream's own answer (its claims, none of our bytes).
            s.anonymous(&host, EVIL, &format!("HEAD {path}"));
            let resp = s.anonymous(&host, EVIL, &format!("GET {path}"));
            assert_ne!(resp.status, 200, "{evil:?} GET {path}: {}", resp.head);
            // Mirror mode names the upstream in ?ns=.
            let (status, text) = raw(
                s.proxy.addr(),
                format!(
                    "GET {path}?ns={host} HTTP/1.1\r\nHost: mirror\r\nConnection: close\r\n\r\n"
                )
                .as_bytes(),
            );
            let resp = RawResponse {
                status,
                head: String::new(),
                body: text.into_bytes(),
                complete: true,
            };
            s.assert_nothing_private(&resp, &format!("mirror {path}"));
            assert_ne!(status, 200, "{evil:?} mirror {path}");
        }
        // The private registry itself still refuses anonymous clients, and still serves
        // authorized ones from the cache.
        let resp = s.anonymous(
            &s.registry.host(),
            REGISTRY_HOST,
            &format!("GET /v2/test/private/blobs/{}", s.layer),
        );
        assert_eq!(resp.status, 401, "{}", resp.head);
        let out = try_skopeo_copy_via(
            &s.proxy,
            &s.registry.image("test/private:v1"),
            &oci_ref(s.dir.join("b")),
            false,
            &["--src-creds", &format!("{USER}:{PASSWORD}")],
        );
        assert_success(&out, "authorized pull from the cache");
        assert_eq!(s.registry.blob_gets(&s.layer), 1, "{evil:?}: refetched");
    }
}

/// Tag poisoning: an upstream that names a cached private manifest's digest in its answer to a
/// tag `HEAD` never gets those bytes served for its tag; its own `GET` answer stands.
#[test]
fn a_poisoned_tag_digest_unlocks_nothing() {
    let s = setup(Evil::HeadOk);
    let host = s.evil_host();
    let accept = "Accept: application/vnd.oci.image.manifest.v1+json";
    for method in ["HEAD", "GET", "GET"] {
        let tls = tls_via(s.proxy.addr(), &host, EVIL, &s.proxy.ca_cert_path());
        // The scripted upstream echoes the last path segment as the digest: name the manifest.
        let path = format!("/v2/x/manifests/{}", s.manifest);
        let tag_path = "/v2/x/manifests/latest";
        let resp = request(
            tls,
            &format!(
                "{method} {tag_path} HTTP/1.1\r\nHost: {host}\r\n{accept}\r\nConnection: close\r\n\r\n"
            ),
        );
        s.assert_nothing_private(&resp, &format!("{method} {tag_path}"));
        let resp = s.anonymous(&host, EVIL, &format!("GET {path}"));
        assert_ne!(resp.status, 200, "{}", resp.head);
    }
}

/// A tag upstream whose `HEAD` names the digest of a cached private manifest: its claim is
/// answered to a `HEAD`, and its own `GET` answer (404) stands for a `GET`.
#[test]
fn a_tag_head_naming_a_private_digest_is_not_served_by_get() {
    let s = setup(Evil::NamePrivateManifest);
    let host = s.evil_host();
    let ask = |method: &str| {
        let tls = tls_via(s.proxy.addr(), &host, EVIL, &s.proxy.ca_cert_path());
        request(
            tls,
            &format!("{method} /v2/x/manifests/latest HTTP/1.1\r\nHost: {host}\r\nAccept: application/vnd.oci.image.manifest.v1+json\r\nConnection: close\r\n\r\n"),
        )
    };
    let head = ask("HEAD");
    assert_eq!(head.status, 200, "the upstream's own claim: {}", head.head);
    for _ in 0..2 {
        let got = ask("GET");
        s.assert_nothing_private(&got, "GET of the poisoned tag");
        assert_eq!(got.status, 404, "{}", got.head);
    }
}

/// Blobs served by a scripted upstream for `blobs.test`, slowly and optionally corrupt.
fn blob_upstream(
    dir: &Path,
    blobs: Vec<(String, Arc<Vec<u8>>)>,
    corrupt: bool,
    pace: Duration,
) -> (u16, Arc<Mutex<Vec<String>>>) {
    tiny_https(dir, &["blobs.test"], move |head, w| {
        let path = head.split(' ').nth(1).unwrap_or("");
        let Some((_, data)) = blobs.iter().find(|(d, _)| path.ends_with(d.as_str())) else {
            let _ = write!(w, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
            return;
        };
        let _ = write!(w, "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", data.len());
        let mut body = data.to_vec();
        if corrupt {
            let at = body.len() - 10;
            body[at] ^= 0xff;
        }
        for chunk in body.chunks(256 * 1024) {
            if w.write_all(chunk).is_err() {
                return;
            }
            thread::sleep(pace);
        }
    })
}

fn blob_config(port: u16, ca: PathBuf) -> impl FnOnce(&mut Config) {
    move |c| reach_test_host(c, "blobs.test", port, ca)
}

fn get_blob(proxy: &Proxy, port: u16, digest: &str, range: Option<&str>) -> RawResponse {
    let target = format!("blobs.test:{port}");
    let tls = tls_via(proxy.addr(), &target, "blobs.test", &proxy.ca_cert_path());
    let range = range.map_or(String::new(), |r| format!("Range: bytes={r}\r\n"));
    request(
        tls,
        &format!("GET /v2/x/blobs/{digest} HTTP/1.1\r\nHost: {target}\r\n{range}Connection: close\r\n\r\n"),
    )
}

/// A `Range` served from a download in flight whose bytes turn out corrupt never ends cleanly,
/// even when the range lies wholly before the corrupt byte; the full `GET` is aborted too.
#[test]
fn a_range_of_an_unverified_download_never_ends_cleanly() {
    let dir = TestDir::new();
    let data = Arc::new(support::random_bytes(4 << 20, 7));
    let digest = sha256_digest(&data);
    let (port, _) = blob_upstream(
        &dir.join("up"),
        vec![(digest.clone(), data.clone())],
        true,
        Duration::from_millis(40),
    );
    let proxy = Proxy::start(blob_config(port, dir.join("up/ca.crt")));
    let full = {
        let (proxy_addr, ca, digest) = (proxy.addr(), proxy.ca_cert_path(), digest.clone());
        thread::spawn(move || {
            let target = format!("blobs.test:{port}");
            let tls = tls_via(proxy_addr, &target, "blobs.test", &ca);
            request(tls, &format!("GET /v2/x/blobs/{digest} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"))
        })
    };
    thread::sleep(Duration::from_millis(300));
    for range in ["0-1023", "100-", "-4096"] {
        let resp = get_blob(&proxy, port, &digest, Some(range));
        assert!(
            !resp.complete,
            "range {range} of a corrupt download ended cleanly: {}",
            resp.head
        );
    }
    let full = full.join().unwrap();
    assert!(!full.complete, "the full GET ended cleanly: {}", full.head);
}

/// A refusal built from an upstream `HEAD` reaches an h2 client as a 401 with its challenge,
/// not as a protocol error (the HEAD's Content-Length described a body that never comes).
#[test]
fn refusals_are_well_formed_for_h2_clients() {
    require_tool("curl");
    let s = setup(Evil::HeadOk);
    for path in [
        format!("/v2/test/private/blobs/{}", s.layer),
        format!("/v2/test/private/manifests/{}", s.manifest),
        "/v2/test/private/manifests/v1".to_string(),
    ] {
        let url = format!("https://{}{path}", s.registry.host());
        let out = Command::new("curl")
            .args([
                "-sS",
                "--http2",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{http_version}",
            ])
            .args(["--proxy", &s.proxy.url(), "--cacert"])
            .arg(s.proxy.ca_cert_path())
            .args([
                "-H",
                "Accept: application/vnd.oci.image.manifest.v1+json",
                &url,
            ])
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{path}: curl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout.trim(), "401 2", "{path}");
    }
}

/// Concurrent requests for one tag (same host, repository, tag and Accept list) make one
/// upstream GET, HEADs among them or not.
#[test]
fn one_tag_one_upstream_request() {
    let dir = TestDir::new();
    let registry = Registry::start(dir.join("registry"));
    mkimage(dir.join("src"), 1, "64KiB", None, 133);
    push(dir.join("src"), &registry, "test/herd:v1", false);
    let proxy = Proxy::for_registry(&registry);
    let host = registry.host();
    // A HEAD among them may lead: it leaves a record without the manifest's bytes, and the
    // GETs that waited for it must still make one upstream GET between them.
    let clients: Vec<_> = (0..64)
        .map(|n| {
            let (addr, ca, host) = (proxy.addr(), proxy.ca_cert_path(), host.clone());
            let method = if n % 4 == 0 { "HEAD" } else { "GET" };
            let client = thread::spawn(move || {
                let tls = tls_via(addr, &host, REGISTRY_HOST, &ca);
                request(tls, &format!("{method} /v2/test/herd/manifests/v1 HTTP/1.1\r\nHost: {host}\r\nAccept: application/vnd.oci.image.manifest.v1+json\r\nConnection: close\r\n\r\n"))
            });
            (method, client)
        })
        .collect();
    for (method, c) in clients {
        let resp = c.join().unwrap();
        assert_eq!(resp.status, 200, "{}", resp.head);
        assert!(method == "HEAD" || resp.complete);
    }
    let gets = registry
        .access_log()
        .iter()
        .filter(|e| e.method == "GET" && e.uri.ends_with("/manifests/v1"))
        .count();
    assert_eq!(gets, 1, "upstream GETs of the tag");
}

/// A tmpfs mounted for one test (CI runs as root), unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: PathBuf, size: &str) -> SmallDisk {
        std::fs::create_dir_all(&at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .output()
            .unwrap();
        assert_success(&out, "mount -t tmpfs (the small-disk test runs as root)");
        SmallDisk(at)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// On a 50 MiB disk already holding 30 MiB, a new 30 MiB blob evicts the old one and is cached;
/// a 60 MiB blob that can never fit is still served, verified and not cached, and counted; a
/// corrupt one that cannot fit is aborted, not served cleanly.
#[test]
fn a_full_disk_costs_capacity_not_availability() {
    let dir = TestDir::new();
    let blobs: Vec<(String, Arc<Vec<u8>>)> = [(30usize, 1u64), (30, 2), (60, 3)]
        .iter()
        .map(|&(mib, seed)| {
            let data = random_bytes(mib << 20, seed);
            (sha256_digest(&data), Arc::new(data))
        })
        .collect();
    let (port, _) = blob_upstream(&dir.join("up"), blobs.clone(), false, Duration::ZERO);
    let (bad_port, _) = blob_upstream(&dir.join("bad"), blobs.clone(), true, Duration::ZERO);
    let disk = SmallDisk::mount(dir.join("disk"), "50m");
    let ca = dir.join("up/ca.crt");
    let proxy = Proxy::start(|c| {
        blob_config(port, ca)(c);
        c.cache_dir = disk.0.join("cache");
    });
    for (n, (digest, data)) in blobs.iter().enumerate() {
        let resp = get_blob(&proxy, port, digest, None);
        assert_eq!(resp.status, 200, "blob {n}: {}", resp.head);
        assert!(resp.complete, "blob {n} was cut short");
        assert_eq!(sha256_digest(&resp.body), *digest, "blob {n} bytes");
        assert_eq!(resp.body.len(), data.len());
    }
    let cached: Vec<bool> = blobs
        .iter()
        .map(|(d, _)| cached_object(proxy.cache_dir(), d).exists())
        .collect();
    assert_eq!(
        cached,
        [false, true, false],
        "the second evicted the first; the third never fit"
    );
    assert!(sample(&metrics(&proxy), "regproxy_passthrough_total") >= 1);
    let resp = get_blob(&proxy, port, &blobs[2].0, None);
    assert!(resp.complete, "a repeat of the pass-through works");
    // A corrupt blob that cannot fit is streamed past the cache and aborted at its end.
    drop(proxy);
    let proxy = Proxy::start(|c| {
        blob_config(bad_port, dir.join("bad/ca.crt"))(c);
        c.cache_dir = disk.0.join("cache2");
    });
    let resp = get_blob(&proxy, bad_port, &blobs[2].0, None);
    assert!(
        !resp.complete,
        "a corrupt pass-through ended cleanly: {}",
        resp.head
    );
    // A disk full to the last byte still leaves the proxy ready: pulls stream past the cache.
    let _ = std::fs::write(disk.0.join("filler"), vec![0u8; 64 << 20]);
    let (status, text) = raw(
        proxy.admin_addr(),
        b"GET /readyz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200, "{text}");
}

/// An upstream that answers with a 206 the proxy did not ask for (any success but 200 to a whole
/// `GET`, or to a first piece a range other than that piece) does not get its unverifiable bytes
/// to the client as a clean answer: a 502. With one blob connection no range is asked at all;
/// with several the first piece is, and the whole blob again after the wrong answer.
#[test]
fn a_partial_answer_not_asked_for_is_a_502() {
    let dir = TestDir::new();
    let data = random_bytes(64 << 10, 9);
    let digest = sha256_digest(&data);
    for connections in [1, 4] {
        let body = data.clone();
        let up = dir.join(format!("up{connections}"));
        let (port, seen) = tiny_https(&up, &["blobs.test"], move |_, w| {
            let (n, part) = (body.len(), 1024);
            let _ = write!(w, "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-{}/{n}\r\nContent-Length: {part}\r\nConnection: close\r\n\r\n", part - 1);
            let _ = w.write_all(&body[..part]);
        });
        let config = blob_config(port, up.join("ca.crt"));
        let proxy = Proxy::start(|c: &mut Config| {
            config(c);
            c.blob_connections = connections;
        });
        let resp = get_blob(&proxy, port, &digest, None);
        assert_eq!(resp.status, 502, "{connections}: {}", resp.head);
        assert!(!resp.body.windows(32).any(|w| w == &data[..32]));
        let gets = seen.lock().unwrap().len();
        assert_eq!(gets, connections.min(2), "{connections}: upstream GETs");
    }
}
