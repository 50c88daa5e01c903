//! Clients that try to wear the proxy down: h2 connections full of streams that never read.
//! Alone in its test binary, so that the process's memory is the proxy's.

mod support;

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use support::*;

/// Connections of the hostile client, and streams on each (the proxy allows 100).
const CONNECTIONS: usize = 8;
const STREAMS: usize = 256;
/// What the stalled clients may cost the proxy at most: 8 MiB of queued bytes per connection,
/// plus h2's and TLS's own state. Before the caps, the same load took 1.76 GB.
const RSS_BOUND_MIB: u64 = 160;

fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024
}

/// An HTTP/2 frame: 9-byte header, then the payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

/// HPACK for `GET https://authority/path`: static-table names, literal values, no Huffman.
fn get_headers(authority: &str, path: &str) -> Vec<u8> {
    let mut h = vec![0x82, 0x87]; // :method GET, :scheme https
    for (index, value) in [(0x04u8, path), (0x01, authority)] {
        assert!(value.len() < 127);
        h.extend([index, value.len() as u8]);
        h.extend(value.as_bytes());
    }
    h
}

/// One h2 connection through the proxy that opens `STREAMS` GETs of `path`, grants the proxy
/// the largest windows h2 allows, and never reads a byte of the answers.
fn stalled_client(proxy: &Proxy, host: &str, path: &str) -> impl std::io::Write {
    let mut tls = tls_via(proxy.addr(), host, REGISTRY_HOST, &proxy.ca_cert_path());
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let huge: u32 = (1 << 31) - 1;
    let mut settings = vec![0, 4]; // SETTINGS_INITIAL_WINDOW_SIZE
    settings.extend(huge.to_be_bytes());
    out.extend(frame(4, 0, 0, &settings));
    out.extend(frame(4, 1, 0, &[])); // ACK the proxy's settings, unread
    out.extend(frame(8, 0, 0, &(huge - 65_535).to_be_bytes())); // connection window
    let headers = get_headers(host, path);
    for n in 0..STREAMS as u32 {
        out.extend(frame(1, 0x5, 2 * n + 1, &headers)); // END_STREAM | END_HEADERS
    }
    std::io::Write::write_all(&mut tls, &out).unwrap();
    std::io::Write::flush(&mut tls).unwrap();
    tls
}

/// Eight connections × 256 streams of a 16 MiB cached blob that are never read keep the proxy's
/// memory within a stated bound, and a normal client still pulls meanwhile.
#[test]
fn streams_that_never_read_cannot_grow_the_proxy() {
    require_tool("curl");
    let dir = TestDir::new();
    let registry = Registry::start(dir.join("registry"));
    let manifest = mkimage(dir.join("src"), 1, "16MiB", None, 141);
    push(dir.join("src"), &registry, "test/abuse:v1", false);
    let layer = oci_layers(dir.join("src"), &manifest).remove(0);
    let proxy = Proxy::for_registry(&registry);
    let url = format!("https://{}/v2/test/abuse/blobs/{layer}", registry.host());
    let warm = Command::new("curl")
        .args([
            "-sS",
            "--fail",
            "-o",
            "/dev/null",
            "--proxy",
            &proxy.url(),
            "--cacert",
        ])
        .arg(proxy.ca_cert_path())
        .arg(&url)
        .output()
        .unwrap();
    assert_success(&warm, "warming the cache");
    let before = rss_mib();
    let path = format!("/v2/test/abuse/blobs/{layer}");
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|_| stalled_client(&proxy, &registry.host(), &path))
        .collect();
    let mut peak = before;
    let deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < deadline {
        peak = peak.max(rss_mib());
        thread::sleep(Duration::from_millis(200));
    }
    // Meanwhile a normal client gets the whole image.
    let out = skopeo_copy_via(
        &proxy,
        &registry.image("test/abuse:v1"),
        &oci_ref(dir.join("normal")),
        false,
    );
    assert_success(&out, "a normal pull during the abuse");
    peak = peak.max(rss_mib());
    drop(clients);
    let grown = peak.saturating_sub(before);
    eprintln!("RSS before {before} MiB, peak {peak} MiB, grown {grown} MiB");
    assert!(
        grown <= RSS_BOUND_MIB,
        "stalled h2 clients grew the proxy by {grown} MiB (bound {RSS_BOUND_MIB} MiB)"
    );
}
