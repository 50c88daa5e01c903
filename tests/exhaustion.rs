//! Descriptor exhaustion and idle clients do not stop a normal client: the `regproxy` binary as a
//! child, with a low `RLIMIT_NOFILE` or a low `--max-connections`, flooded with connections that
//! send nothing or half a request head.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use support::*;

/// A registry holding a one-layer image; the image's digest and its layer's.
fn registry_with_image(dir: &TestDir, seed: u64) -> (Registry, String, String) {
    let src = dir.join("src");
    let digest = mkimage(&src, 1, "256KiB", None, seed);
    let registry = Registry::start(dir.join("registry"));
    push(&src, &registry, "test/exhaust:latest", false);
    let layer = oci_layers(&src, &digest).remove(0);
    (registry, digest, layer)
}

fn options(nofile: Option<u64>, args: &[&str]) -> ProxyOptions {
    ProxyOptions {
        nofile,
        args: args.iter().map(|s| s.to_string()).collect(),
        ..ProxyOptions::default()
    }
}

/// What idle clients send: nothing, or the start of a request head that never ends.
#[derive(Clone, Copy, Debug)]
enum Idle {
    Silent,
    PartialHead,
}

/// Opens up to `n` connections to `addr` and keeps them; the kernel completes a handshake for
/// connections the proxy has not accepted yet (they wait in its backlog), so most succeed
/// whether or not the proxy has a descriptor for them.
fn hold(addr: SocketAddr, n: usize, idle: Idle) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        // A full backlog drops the SYN and the kernel retries it 1 s later, then 2 s after that:
        // one retry rides out a backlog that the proxy is still draining; a connection that does
        // not get through in 2.5 s means the backlog stays full, and ends the flood.
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(2500)) else {
            break;
        };
        if let Idle::PartialHead = idle {
            s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: registry.te")
                .unwrap();
        }
        held.push(s);
    }
    held
}

/// How many lines of the proxy's log say `needle`.
fn log_count(proxy: &ProxyProcess, needle: &str) -> usize {
    proxy.log().lines().filter(|l| l.contains(needle)).count()
}

/// `GET` of the layer through the proxy with curl (CONNECT, TLS trusting the proxy's CA), at most
/// `limit`; returns the HTTP status curl saw, the body's digest, and the time it took.
fn curl_layer(
    proxy: &ProxyProcess,
    registry: &Registry,
    layer: &str,
    out: &Path,
    limit: Duration,
) -> (String, String, Duration) {
    let mut cmd = Command::new("curl");
    proxy_env(&mut cmd, None);
    cmd.args(["-sS", "-o"])
        .arg(out)
        .args(["-w", "%{http_code}", "-m", &limit.as_secs().to_string()])
        .args(["--proxy", &proxy.url(), "--cacert"])
        .arg(proxy.ca_cert_path())
        .arg(format!(
            "https://{}/v2/test/exhaust/blobs/{layer}",
            registry.host()
        ));
    let start = Instant::now();
    let res = run_with_timeout(&mut cmd, limit + Duration::from_secs(10));
    let took = start.elapsed();
    let status = String::from_utf8_lossy(&res.stdout).trim().to_string();
    let body = std::fs::read(out).unwrap_or_default();
    (status, sha256_digest(&body), took)
}

/// Waits until the proxy holds as many connections as its descriptor limit lets it take (it stops
/// accepting there, keeping descriptors back for upstream connections and cache files), then
/// checks that it kept them.
fn wait_capped(proxy: &ProxyProcess, nofile: usize) {
    let (mut last, mut steady) = (0, 0);
    wait_for(
        Duration::from_secs(20),
        || {
            let now = proxy.open_fds();
            if now == last {
                steady += 1;
            } else {
                (last, steady) = (now, 0);
            }
            // Unchanged for a second, with the flood's connections in.
            (steady >= 20 && now > 64).then_some(())
        },
        || {
            format!(
                "the proxy's descriptors did not settle ({} open)",
                proxy.open_fds()
            )
        },
    );
    let open = proxy.open_fds();
    assert!(
        open + 32 <= nofile,
        "{open} descriptors open of {nofile}: none kept back for upstream connections"
    );
    assert!(
        proxy
            .log()
            .contains("the descriptor limit allows fewer connections"),
        "the proxy did not say it lowered its connection cap:\n{}",
        proxy.log()
    );
}

/// CPU time the proxy spends over `window` of wall time.
fn cpu_over(proxy: &ProxyProcess, window: Duration) -> Duration {
    let before = proxy.cpu_time();
    thread::sleep(window);
    proxy.cpu_time() - before
}

/// With `RLIMIT_NOFILE` = 256 and 400 idle connections, the proxy takes only as many as leave it
/// descriptors for its own work (the rest wait in the backlog), does not spin, serves a client it
/// had accepted before the flood at once, and a new client once the flood goes away; half
/// request heads are closed by the idle timeout.
#[test]
fn descriptor_exhaustion_neither_spins_nor_locks_out() {
    require_tool("curl");
    // Far below the 400 connections, and low enough that the flood is cheap.
    const NOFILE: u64 = 256;
    const FLOOD: usize = 400;
    // Long enough that the flood lasts through the CPU window below.
    const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
    // Room for a loaded machine.
    const SLACK: Duration = Duration::from_secs(10);
    // Over 5 s of wall time a proxy that waits uses 0-10 ms here. An accept loop retrying
    // without a pause used 730 ms: the bound catches it.
    const CPU_WINDOW: Duration = Duration::from_secs(5);
    const CPU_MAX: Duration = Duration::from_millis(250);

    let started = Instant::now();
    let dir = TestDir::new();
    let (registry, digest, layer) = registry_with_image(&dir, 141);
    let proxy = ProxyProcess::start_with(
        &dir.join("proxy"),
        &registry,
        &options(
            Some(NOFILE),
            &["--idle-timeout", &format!("{}s", IDLE_TIMEOUT.as_secs())],
        ),
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", proxy.pid())).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.split_whitespace().nth(3) == Some("256")),
        "{limits}"
    );
    // Accepted before the flood: it asks for a blob (a miss, which needs an upstream connection
    // and a cache file) while the flood holds every connection the proxy takes.
    let early = dial(proxy.addr());
    thread::sleep(Duration::from_millis(300));

    let flood_at = Instant::now();
    let silent = hold(proxy.addr(), FLOOD, Idle::Silent);
    assert!(silent.len() > NOFILE as usize, "{} held", silent.len());
    wait_capped(&proxy, NOFILE as usize);
    let cpu = cpu_over(&proxy, CPU_WINDOW);
    eprintln!(
        "silent flood of {}: {cpu:?} CPU over {CPU_WINDOW:?}",
        silent.len()
    );
    assert!(cpu < CPU_MAX, "{cpu:?} of CPU over {CPU_WINDOW:?}");
    let resp = request(
        early,
        &format!(
            "GET /v2/test/exhaust/blobs/{layer}?ns={} HTTP/1.1\r\n\
             Host: mirror\r\nConnection: close\r\n\r\n",
            registry.host()
        ),
    );
    assert_eq!(resp.status, 200, "{}", resp.head);
    assert_eq!(sha256_digest(&resp.body), layer);
    assert!(
        flood_at.elapsed() < IDLE_TIMEOUT,
        "the checks ran past the idle timeout: they measured a proxy that was recovering"
    );
    drop(silent);
    let (status, got, took) = curl_layer(&proxy, &registry, &layer, &dir.join("layer1"), SLACK);
    eprintln!("silent flood dropped: a normal client served in {took:?}");
    assert_eq!(status, "200", "curl after the flood:\n{}", proxy.log());
    assert_eq!(got, layer);

    // Half request heads: the idle timeout closes them too.
    let partial = hold(proxy.addr(), FLOOD, Idle::PartialHead);
    assert!(partial.len() > NOFILE as usize, "{} held", partial.len());
    wait_capped(&proxy, NOFILE as usize);
    let cpu = cpu_over(&proxy, CPU_WINDOW);
    eprintln!("partial-head flood: {cpu:?} CPU over {CPU_WINDOW:?}");
    assert!(cpu < CPU_MAX, "{cpu:?} of CPU over {CPU_WINDOW:?}");
    drop(partial);
    let out = dir.join("pulled");
    let start = Instant::now();
    let res = run_with_timeout(
        &mut proxy.skopeo_copy(&registry.image("test/exhaust:latest"), &oci_ref(&out)),
        CMD_TIMEOUT,
    );
    let took = start.elapsed();
    eprintln!("partial-head flood dropped: skopeo pulled in {took:?}");
    assert_success(&res, "skopeo copy after the flood went away");
    assert_eq!(oci_index_digest(&out), digest);
    eprintln!("descriptor exhaustion: {:?} in all", started.elapsed());
}

/// Whether the proxy has closed `s` (EOF or reset) within `within`.
fn closed_by_peer(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            // A response (a 408, say) before the close counts as the proxy ending it.
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// With `--max-connections 8` and 8 silent connections held, the listener stops accepting: a
/// normal client waits in the backlog (it is not served while the cap is held) and is served
/// once the idle timeout closes the silent ones.
#[test]
fn connection_cap_queues_a_client_until_idle_ones_time_out() {
    require_tool("curl");
    // Small: the cap, not descriptors, is what runs out.
    const CAP: usize = 8;
    // Long enough to tell "waited for a slot" from "served at once", short for the test.
    const IDLE_TIMEOUT: Duration = Duration::from_secs(3);
    const SLACK: Duration = Duration::from_secs(7);

    let dir = TestDir::new();
    let (registry, _, layer) = registry_with_image(&dir, 142);
    let proxy = ProxyProcess::start_with(
        &dir.join("proxy"),
        &registry,
        &options(
            None,
            &[
                "--max-connections",
                &CAP.to_string(),
                "--idle-timeout",
                &format!("{}s", IDLE_TIMEOUT.as_secs()),
            ],
        ),
    );
    let mut silent = hold(proxy.addr(), CAP, Idle::Silent);
    assert_eq!(silent.len(), CAP);
    wait_for(
        Duration::from_secs(10),
        || (log_count(&proxy, "connection cap reached") > 0).then_some(()),
        || format!("the cap was not reached:\n{}", proxy.log()),
    );
    let capped_at = Instant::now();
    let (status, got, took) = curl_layer(
        &proxy,
        &registry,
        &layer,
        &dir.join("layer"),
        IDLE_TIMEOUT + SLACK,
    );
    eprintln!("cap: normal client served after {took:?}");
    assert_eq!(status, "200", "{}", proxy.log());
    assert_eq!(got, layer);
    // Served only after a slot freed: the silent ones were accepted just before `capped_at`.
    assert!(
        took >= IDLE_TIMEOUT - Duration::from_secs(1),
        "served after {took:?}, while {CAP} connections held every slot"
    );
    assert!(took < IDLE_TIMEOUT + SLACK, "{took:?}");
    for s in &mut silent {
        assert!(
            closed_by_peer(s, Duration::from_secs(2)),
            "a silent connection is still open {:?} after the cap was reached",
            capped_at.elapsed()
        );
    }
}

/// The same with connections that sent half a request head: `--idle-timeout` ("idle time after
/// which client connections close") closes them too, since no byte has moved for that long, and
/// frees their slots.
///
/// (It once did not: a graceful shutdown on idle left them to the 30 s header timeout.)
#[test]
fn idle_timeout_closes_connections_with_half_a_request_head() {
    const CAP: usize = 8;
    const IDLE_TIMEOUT: Duration = Duration::from_secs(3);
    // Well short of the 30 s header timeout, which does close them.
    const SLACK: Duration = Duration::from_secs(7);

    let dir = TestDir::new();
    let (registry, _, _) = registry_with_image(&dir, 143);
    let proxy = ProxyProcess::start_with(
        &dir.join("proxy"),
        &registry,
        &options(None, &["--max-connections", "8", "--idle-timeout", "3s"]),
    );
    let mut partial = hold(proxy.addr(), CAP, Idle::PartialHead);
    assert_eq!(partial.len(), CAP);
    let start = Instant::now();
    for s in &mut partial {
        let left = (IDLE_TIMEOUT + SLACK).saturating_sub(start.elapsed());
        assert!(
            closed_by_peer(s, left.max(Duration::from_millis(1))),
            "a connection with half a request head is still open {:?} after it went idle \
             (--idle-timeout 3s)",
            start.elapsed()
        );
    }
}
