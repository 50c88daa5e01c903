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

/// Waits until the proxy has run out of descriptors: accept has failed with EMFILE more often
/// than `before`, and the process holds about its limit.
fn wait_exhausted(proxy: &ProxyProcess, nofile: usize, before: usize) {
    wait_for(
        Duration::from_secs(20),
        || {
            let failed = log_count(proxy, "Too many open files") > before;
            // A few descriptors may be between a close and the next accept.
            (failed && proxy.open_fds() + 8 >= nofile).then_some(())
        },
        || {
            format!(
                "the proxy did not run out of descriptors ({} open):\n{}",
                proxy.open_fds(),
                proxy.log()
            )
        },
    );
}

/// CPU time the proxy spends over `window` of wall time.
fn cpu_over(proxy: &ProxyProcess, window: Duration) -> Duration {
    let before = proxy.cpu_time();
    thread::sleep(window);
    proxy.cpu_time() - before
}

/// With `RLIMIT_NOFILE` = 256 and 400 idle connections, accept fails with EMFILE; the proxy
/// backs off instead of spinning (CPU time and log lines stay low), and a normal client gets its
/// blob promptly once the idle connections have timed out (silent ones; the rest of the flood
/// still connected) or gone away (half heads).
#[test]
fn descriptor_exhaustion_neither_spins_nor_locks_out() {
    require_tool("curl");
    // Far below the 400 connections, and low enough that the flood is cheap.
    const NOFILE: u64 = 256;
    const FLOOD: usize = 400;
    // Long enough that exhaustion lasts through the CPU window below (it starts within a second
    // or two of the flood), short enough to keep the test well under a minute.
    const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
    // The proxy's accept backoff tops out at 1 s; the rest is room for a loaded machine.
    const SLACK: Duration = Duration::from_secs(10);
    // Over 5 s of wall time a proxy that waits uses 0-10 ms here. An accept loop retrying
    // without a pause used 730 ms (each retry goes through tokio's timer and writes a log line,
    // so it does not take a whole core) and logged about 4000 failures: both bounds catch it.
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

    let base_fds = proxy.open_fds();
    // Silent connections: the idle timeout closes them. Every accept happens after
    // `flood_at`, so none has timed out while `flood_at.elapsed() < IDLE_TIMEOUT`.
    let flood_at = Instant::now();
    let silent = hold(proxy.addr(), FLOOD, Idle::Silent);
    // About 250 accepted (all the descriptors there are) and the rest queued in the
    // listener's backlog (128 on this build), which is then full.
    assert!(silent.len() > NOFILE as usize + 50, "{} held", silent.len());
    eprintln!("silent flood: {} connections held", silent.len());
    wait_exhausted(&proxy, NOFILE as usize, 0);
    let lines_before = log_count(&proxy, "accept failed");
    let cpu = cpu_over(&proxy, CPU_WINDOW);
    let lines = log_count(&proxy, "accept failed") - lines_before;
    eprintln!("silent flood: {cpu:?} CPU and {lines} accept failures logged over {CPU_WINDOW:?}");
    assert!(cpu < CPU_MAX, "{cpu:?} of CPU over {CPU_WINDOW:?}");
    // The backoff tops out at one retry a second.
    assert!(
        lines <= 10,
        "{lines} accept failures logged over {CPU_WINDOW:?}"
    );
    assert!(
        flood_at.elapsed() < IDLE_TIMEOUT,
        "the CPU window ran past the idle timeout: it measured a proxy that was recovering"
    );

    // The idle timeout closes the connections that hold descriptors; the rest of the flood,
    // queued in the backlog, is accepted in their place and holds fewer than there are. Only
    // then is a normal client sure to be served: one that is accepted while the flood still
    // holds every descriptor gets a 502, as its upstream connection cannot be opened (see
    // `a_connected_client_is_served_while_idle_ones_hold_every_descriptor`).
    let queued = silent.len().saturating_sub(NOFILE as usize - base_fds);
    wait_for(
        IDLE_TIMEOUT + SLACK,
        || (proxy.open_fds() <= base_fds + queued + 8).then_some(()),
        || format!("{} descriptors still open", proxy.open_fds()),
    );
    let freed_after = flood_at.elapsed();
    let (status, got, took) = curl_layer(&proxy, &registry, &layer, &dir.join("layer1"), SLACK);
    eprintln!(
        "silent flood: descriptors freed {freed_after:?} after the flood; a normal client then \
         served in {took:?}"
    );
    assert_eq!(
        status,
        "200",
        "curl after the idle timeout:\n{}",
        proxy.log()
    );
    assert_eq!(got, layer);
    assert!(took < SLACK, "{took:?}");
    drop(silent);

    // Half request heads: hyper waits for the rest of the head, so these go away when their
    // clients do (the idle flag does not apply to them; see the test below).
    let before = log_count(&proxy, "Too many open files");
    let partial = hold(proxy.addr(), FLOOD, Idle::PartialHead);
    assert!(
        partial.len() > NOFILE as usize + 50,
        "{} held",
        partial.len()
    );
    wait_exhausted(&proxy, NOFILE as usize, before);
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
    assert!(took < SLACK, "{took:?}");
    assert_eq!(oci_index_digest(&out), digest);
    assert!(
        proxy.open_fds() < NOFILE as usize / 2,
        "{}",
        proxy.open_fds()
    );
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
/// which client connections close") should close them too, since no byte has moved for that
/// long, and free their slots.
///
/// It does not: on idle the proxy asks hyper for a graceful shutdown, which closes a connection
/// at once only if it has read nothing; one holding half a head waits for the fixed 30 s header
/// timeout (`HEADER_TIMEOUT` in src/proxy/mod.rs) whatever `--idle-timeout` says.
#[test]
#[ignore = "src bug: half a request head outlives --idle-timeout (30 s header timeout)"]
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

/// A client that connected before the flood asks for a blob (a miss) while idle connections
/// hold every descriptor the process may open: it should be served, which takes a descriptor for
/// the upstream connection and one for the cache file.
///
/// It is not: the accept loop takes every descriptor there is, and the client gets `502
/// upstream registry.test:PORT: connect … Too many open files (os error 24)`.
#[test]
#[ignore = "src bug: idle clients take every descriptor; a live client gets 502 (EMFILE)"]
fn a_connected_client_is_served_while_idle_ones_hold_every_descriptor() {
    const NOFILE: u64 = 256;
    const FLOOD: usize = 400;
    let dir = TestDir::new();
    let (registry, _, layer) = registry_with_image(&dir, 144);
    let proxy = ProxyProcess::start_with(
        &dir.join("proxy"),
        &registry,
        // Long enough that the flood holds every descriptor while the client asks.
        &options(Some(NOFILE), &["--idle-timeout", "20s"]),
    );
    let client = dial(proxy.addr());
    // Accepted (and given its descriptor) before the flood takes the rest.
    thread::sleep(Duration::from_millis(300));
    let flood = hold(proxy.addr(), FLOOD, Idle::Silent);
    wait_exhausted(&proxy, NOFILE as usize, 0);
    let start = Instant::now();
    let resp = request(
        client,
        &format!(
            "GET /v2/test/exhaust/blobs/{layer}?ns={} HTTP/1.1\r\n\
             Host: mirror\r\nConnection: close\r\n\r\n",
            registry.host()
        ),
    );
    eprintln!(
        "connected client: {} after {:?}",
        resp.status,
        start.elapsed()
    );
    assert_eq!(
        resp.status,
        200,
        "{}\n{}",
        resp.head,
        String::from_utf8_lossy(&resp.body)
    );
    assert_eq!(sha256_digest(&resp.body), layer);
    drop(flood);
}
