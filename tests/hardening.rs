//! The proxy is not a springboard and not a sink: local destinations are refused after
//! resolution, leaves are issued only for the CONNECT host, and every listener is bounded.
//! All traffic stays on 127.0.0.0/8.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use support::*;

/// A loopback server that is never supposed to be reached: [`Untouched::assert`] checks that no
/// connection arrived (the kernel completes a connection even when nobody accepts it).
struct Untouched {
    listener: TcpListener,
    port: u16,
}

impl Untouched {
    fn new() -> Untouched {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        Untouched { listener, port }
    }

    fn assert(&self) {
        match self.listener.accept() {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => panic!("the refused destination was reached: {other:?}"),
        }
    }
}

/// A loopback server answering each request head with `hello` (at most `n` connections).
fn hello_server(n: usize) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in listener.incoming().take(n) {
            let Ok(mut s) = s else { continue };
            let _ = s.set_read_timeout(Some(IO_TIMEOUT));
            let _ = read_head_bytes(&mut s);
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
            );
        }
    });
    port
}

fn read_head_bytes(s: &mut impl Read) -> Vec<u8> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && s.read_exact(&mut b).is_ok() {
        head.push(b[0]);
    }
    head
}

/// Sends a request through a tunnel and reads the whole answer.
fn through(mut s: TcpStream) -> String {
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    read_all(s)
}

fn read_all(mut s: impl Read) -> String {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn leaves_issued(proxy: &Proxy) -> u64 {
    let (status, text) = raw(
        proxy.admin_addr(),
        b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix("regproxy_leaves_issued_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no leaves metric in {text}"))
}

fn cidr(s: &str) -> regproxy::config::Cidr {
    regproxy::config::Cidr::parse(s).unwrap()
}

#[test]
fn connect_to_local_destinations_is_refused_in_every_spelling() {
    let server = Untouched::new();
    let port = server.port;
    let proxy = Proxy::start(|c| {
        c.allow_port.push(port);
        let own = c.listen.port();
        c.allow_port.push(own);
    });
    let own = proxy.addr().port();
    for target in [
        format!("0.0.0.0:{port}"),
        format!("[::ffff:127.0.0.1]:{port}"),
        format!("127.0.0.2:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        format!("[::]:{port}"),
        format!("localhost:{port}"),
        format!("0.0.0.0:{own}"),
        format!("[::ffff:127.0.0.1]:{own}"),
    ] {
        let req =
            format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");
        let (status, text) = raw(proxy.addr(), req.as_bytes());
        assert_eq!(status, 403, "CONNECT {target}: {text}");
        assert!(text.contains("refused"), "CONNECT {target}: {text}");
    }
    server.assert();
    assert!(proxy.is_running());
}

#[test]
fn forwarding_to_cloud_metadata_or_loopback_is_refused_before_connecting() {
    let server = Untouched::new();
    let port = server.port;
    let proxy = Proxy::start(|c| c.allow_port.push(port));
    let start = Instant::now();
    let (status, text) = raw(
        proxy.addr(),
        b"GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("link-local"), "{text}");
    // A connection attempt there would hang until the connect timeout (10 s).
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );

    for host in [
        format!("127.0.0.1:{port}"),
        format!("[::ffff:127.0.0.1]:{port}"),
    ] {
        let req =
            format!("GET http://{host}/x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let (status, text) = raw(proxy.addr(), req.as_bytes());
        assert_eq!(status, 403, "{host}: {text}");
        assert!(text.contains("loopback"), "{host}: {text}");
    }
    server.assert();
}

#[test]
fn resolve_overrides_and_allow_destination_reach_loopback() {
    let (resolved, allowed, forwarded) = (hello_server(1), hello_server(1), hello_server(1));
    let proxy = Proxy::start(|c| {
        for (name, port) in [("echo.test", resolved), ("fwd.test", forwarded)] {
            c.resolve.push((
                format!("{name}:{port}"),
                SocketAddr::from(([127, 0, 0, 1], port)),
            ));
        }
        c.allow_port.extend([resolved, allowed, forwarded]);
    });
    // Named with --resolve: the operator's permission.
    let (status, s) = connect(proxy.addr(), &format!("echo.test:{resolved}"));
    assert_eq!(status, 200);
    assert!(through(s).ends_with("hello"));
    let req = format!(
        "GET http://fwd.test:{forwarded}/ HTTP/1.1\r\nHost: fwd.test:{forwarded}\r\nConnection: close\r\n\r\n"
    );
    let (status, text) = raw(proxy.addr(), req.as_bytes());
    assert_eq!(status, 200, "{text}");
    // Not named: refused, until --allow-destination says otherwise.
    let (status, _) = connect(proxy.addr(), &format!("127.0.0.1:{allowed}"));
    assert_eq!(status, 403);
    let open = Proxy::start(|c| {
        c.allow_destination.push(cidr("127.0.0.0/8"));
        c.allow_port.push(allowed);
    });
    let (status, s) = connect(open.addr(), &format!("127.0.0.1:{allowed}"));
    assert_eq!(status, 200);
    assert!(through(s).ends_with("hello"));
}

/// Deny wins over allow and over a --resolve override: it is the more specific statement.
#[test]
fn deny_destination_wins_over_allow_and_resolve() {
    let server = Untouched::new();
    let port = server.port;
    let proxy = Proxy::start(|c| {
        c.resolve.push((
            format!("denied.test:{port}"),
            SocketAddr::from(([127, 0, 0, 1], port)),
        ));
        c.allow_destination.push(cidr("127.0.0.0/8"));
        c.deny_destination.push(cidr("127.0.0.1/32"));
        c.allow_port.push(port);
    });
    for target in [format!("denied.test:{port}"), format!("127.0.0.1:{port}")] {
        let req =
            format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");
        let (status, text) = raw(proxy.addr(), req.as_bytes());
        assert_eq!(status, 403, "{target}: {text}");
        assert!(text.contains("deny_destination 127.0.0.1/32"), "{text}");
    }
    server.assert();
}

/// A redirect the proxy follows upstream-side may not lead to a refused destination either.
#[test]
fn upstream_redirect_to_loopback_gets_502_naming_the_refusal() {
    let dir = TestDir::new();
    let digest = sha256_digest(b"blob-data");
    let target = Untouched::new();
    let location = format!("https://127.0.0.1:{}/blob", target.port);
    let (origin_port, _) = tiny_https(&dir.join("origin"), &["origin.test"], move |_, w| {
        let _ = write!(w, "HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    });
    let proxy = Proxy::start(|c| {
        c.intercept.push("origin.test".into());
        c.allow_port.extend([origin_port, target.port]);
        c.resolve.push((
            format!("origin.test:{origin_port}"),
            SocketAddr::from(([127, 0, 0, 1], origin_port)),
        ));
        c.upstream_ca.push(dir.join("origin/ca.crt"));
    });
    let host = format!("origin.test:{origin_port}");
    let tls = tls_via(proxy.addr(), &host, "origin.test", &proxy.ca_cert_path());
    let (status, body) = https_get(tls, &host, &format!("/v2/test/img/blobs/{digest}"));
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains("refused") && body.contains("loopback"),
        "{body}"
    );
    target.assert();
}

/// TLS with `sni` inside a CONNECT to `target`; whether the handshake completed.
fn handshake(proxy: &Proxy, target: &str, sni: &str) -> bool {
    let (status, tcp) = connect(proxy.addr(), target);
    assert_eq!(status, 200, "CONNECT {target}");
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    let conn = rustls::ClientConnection::new(tls_config(&proxy.ca_cert_path()), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        if tls.conn.complete_io(&mut tls.sock).is_err() {
            return false;
        }
    }
    true
}

#[test]
fn a_leaf_is_issued_only_for_the_connect_host() {
    let proxy = Proxy::start(|c| {
        c.intercept.push("registry.test".into());
        c.intercept.push("*.registry.test".into());
    });
    assert_eq!(leaves_issued(&proxy), 0);
    for sni in [
        "www.google.com",
        "other.registry.test",
        "registry.test.evil",
    ] {
        assert!(
            !handshake(&proxy, "registry.test:443", sni),
            "a leaf for {sni} on a tunnel to registry.test"
        );
    }
    assert!(!handshake(
        &proxy,
        "h1.registry.test:443",
        "h2.registry.test"
    ));
    assert_eq!(leaves_issued(&proxy), 0, "no certificate issued");

    // Matching names are served, case and a trailing dot aside; one leaf per host.
    assert!(handshake(&proxy, "registry.test:443", "registry.test"));
    assert!(handshake(&proxy, "Registry.Test.:443", "registry.test"));
    for n in 0..20 {
        let host = format!("h{n}.registry.test");
        assert!(handshake(&proxy, &format!("{host}:443"), &host), "{host}");
    }
    assert_eq!(leaves_issued(&proxy), 21);
    assert!(proxy.is_running());
}

/// With the cap reached, the next client waits (it is not accepted) until a connection ends.
#[test]
fn proxy_connections_past_the_cap_wait_for_a_free_slot() {
    let proxy = Proxy::start(|c| c.max_connections = 3);
    let ask = |s: &mut TcpStream| {
        s.write_all(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let (status, head) = read_head(s);
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(str::to_owned)
            })
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).unwrap();
        status
    };
    // Keep-alive connections that were answered hold their slots.
    let mut held: Vec<TcpStream> = (0..3).map(|_| dial(proxy.addr())).collect();
    for s in &mut held {
        assert_eq!(ask(s), 400);
    }
    let mut late = dial(proxy.addr());
    late.write_all(b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    late.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut b = [0u8; 1];
    match late.read(&mut b) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("served past the cap: {other:?}"),
    }
    drop(held.pop());
    late.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (status, _) = read_response(late);
    assert_eq!(status, 400);
}

/// The admin listener (cap 64, header timeout 10 s): a flood of silent connections is let go and
/// `/healthz` gets its turn; an idle keep-alive connection is closed.
#[test]
fn admin_listener_is_bounded_and_healthz_is_not_starved() {
    let proxy = Proxy::start(|_| {});
    let admin = proxy.admin_addr();
    let hogs: Vec<TcpStream> = (0..70).map(|_| dial(admin)).collect();
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    let mut s = dial(admin);
    s.set_read_timeout(Some(Duration::from_secs(25))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n")
        .unwrap();
    let (status, _) = read_head(&mut s);
    assert_eq!(status, 200);
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
    // Every silent connection was closed (header timeout), not held forever.
    for mut hog in hogs {
        hog.set_read_timeout(Some(Duration::from_secs(25))).unwrap();
        let mut b = [0u8; 16];
        match hog.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("a silent connection stayed open: {other:?}"),
        }
    }
    // The keep-alive connection that asked once is closed after its idle/header time.
    let idle_from = Instant::now();
    let mut rest = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
    let _ = s.read_to_end(&mut rest);
    let idle = idle_from.elapsed();
    assert!(
        idle < Duration::from_secs(35),
        "idle connection open for {idle:?}"
    );
}

/// The new keys from flags and environment, as `config check` shows them.
#[test]
fn config_check_shows_destinations_and_the_cap() {
    let dir = TestDir::new();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_regproxy"))
        .args(["config", "check", "--allow-destination", "127.0.0.0/8"])
        .args(["--max-connections", "9"])
        .env_remove("REGPROXY_CONFIG")
        .env("REGPROXY_DENY_DESTINATION", "10.0.0.0/8,192.168.0.0/16")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "allow_destination = [\"127.0.0.0/8\"]",
        "deny_destination = [\"10.0.0.0/8\", \"192.168.0.0/16\"]",
        "max_connections = 9",
    ] {
        assert!(printed.contains(line), "{line} in {printed}");
    }
}
