//! The proxy's front door with raw sockets: CONNECT, interception, tunnels, forwarding, and a
//! clear answer for each kind of bad input.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};

use rustls::pki_types::ServerName;
use support::*;

fn peer_leaf(tls: &rustls::StreamOwned<rustls::ClientConnection, TcpStream>) -> Vec<u8> {
    tls.conn.peer_certificates().expect("peer certificates")[0].to_vec()
}

#[test]
fn leaf_san_is_the_sni_and_chains_to_the_ca_whose_key_is_0600() {
    let proxy = Proxy::start(|c| {
        c.intercept.push("leaf.test".into());
        c.allow_port.push(4443);
    });
    // The handshake itself verifies the chain to the proxy's CA and the name.
    let tls = tls_via(
        proxy.addr(),
        "leaf.test:4443",
        "leaf.test",
        &proxy.ca_cert_path(),
    );
    let der = peer_leaf(&tls);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let san = cert
        .subject_alternative_name()
        .unwrap()
        .expect("SAN extension");
    let names: Vec<String> = san
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(names, vec!["DNSName(leaf.test)".to_string()]);
    let validity = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert!(
        validity <= 3 * 24 * 3600,
        "leaf validity should be short, is {validity}s"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(proxy.ca_dir().join("ca.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn client_hello_without_sni_is_closed() {
    let proxy = Proxy::start(|c| {
        c.intercept.push("leaf.test".into());
        c.allow_port.push(4443);
    });
    let (status, tcp) = connect(proxy.addr(), "leaf.test:4443");
    assert_eq!(status, 200);
    // rustls sends no SNI for an IP address.
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(tls_config(&proxy.ca_cert_path()), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut result = Ok(0);
    while tls.conn.is_handshaking() {
        result = tls.conn.complete_io(&mut tls.sock).map(|(r, w)| r + w);
        if result.is_err() {
            break;
        }
    }
    assert!(result.is_err(), "handshake without SNI must fail");
    // The proxy is still healthy afterwards.
    let tls = tls_via(
        proxy.addr(),
        "leaf.test:4443",
        "leaf.test",
        &proxy.ca_cert_path(),
    );
    assert!(!peer_leaf(&tls).is_empty());
}

#[test]
fn non_intercepted_host_is_tunnelled_with_the_upstreams_own_certificate() {
    let registry = Registry::start_temp();
    let proxy = Proxy::start(|c| {
        c.resolve.push((
            registry.host(),
            SocketAddr::from(([127, 0, 0, 1], registry.port())),
        ));
        c.allow_port.push(registry.port());
    });
    let tls = tls_via(
        proxy.addr(),
        &registry.host(),
        "registry.test",
        &registry.ca_cert_path(),
    );
    let der = peer_leaf(&tls);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert!(
        !cert
            .issuer()
            .to_string()
            .contains(regproxy::ca::CA_COMMON_NAME),
        "issuer {}",
        cert.issuer()
    );
    let (status, _) = https_get(tls, &registry.host(), "/v2/");
    assert_eq!(status, 200);
}

#[test]
fn tunnel_passes_half_close() {
    // A server that answers only after the client has closed its sending side.
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let (mut s, _) = server.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        s.write_all(format!("got {} bytes", got.len()).as_bytes())
            .unwrap();
    });
    let proxy = Proxy::start(|c| {
        c.resolve.push((
            format!("echo.test:{port}"),
            SocketAddr::from(([127, 0, 0, 1], port)),
        ));
        c.allow_port.push(port);
    });
    let (status, mut s) = connect(proxy.addr(), &format!("echo.test:{port}"));
    assert_eq!(status, 200);
    s.write_all(&[7u8; 100_000]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "got 100000 bytes");
    handle.join().unwrap();
}

#[test]
fn upstream_with_untrusted_certificate_gets_502_naming_the_reason() {
    let registry = Registry::start_temp();
    let proxy = Proxy::start(|c| {
        registry.configure_proxy(c);
        c.upstream_ca.clear();
        c.intercept.push("wrong.test".into());
        c.resolve.push((
            format!("wrong.test:{}", registry.port()),
            SocketAddr::from(([127, 0, 0, 1], registry.port())),
        ));
    });
    let tls = tls_via(
        proxy.addr(),
        &registry.host(),
        "registry.test",
        &proxy.ca_cert_path(),
    );
    let (status, body) = https_get(tls, &registry.host(), "/v2/");
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("unknown issuer"), "{body}");

    let proxy = Proxy::for_registry_with(&registry, |c| {
        c.intercept.push("wrong.test".into());
        c.resolve.push((
            format!("wrong.test:{}", registry.port()),
            SocketAddr::from(([127, 0, 0, 1], registry.port())),
        ));
    });
    let target = format!("wrong.test:{}", registry.port());
    let tls = tls_via(proxy.addr(), &target, "wrong.test", &proxy.ca_cert_path());
    let (status, body) = https_get(tls, &target, "/v2/");
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("not valid for name"), "{body}");
}

#[test]
fn unreachable_upstream_gets_502_naming_the_cause() {
    let dead = free_port();
    let proxy = Proxy::start(|c| {
        c.intercept.push("down.test".into());
        c.resolve.push((
            format!("down.test:{dead}"),
            SocketAddr::from(([127, 0, 0, 1], dead)),
        ));
        c.resolve.push((
            format!("gone.test:{dead}"),
            SocketAddr::from(([127, 0, 0, 1], dead)),
        ));
        c.allow_port.push(dead);
    });
    let target = format!("down.test:{dead}");
    let tls = tls_via(proxy.addr(), &target, "down.test", &proxy.ca_cert_path());
    let (status, body) = https_get(tls, &target, "/v2/test/img/tags/list");
    assert_eq!(status, 502, "{body}");
    assert!(body.to_lowercase().contains("refused"), "{body}");
    // Not intercepted: the CONNECT itself fails.
    let (status, _) = connect(proxy.addr(), &format!("gone.test:{dead}"));
    assert_eq!(status, 502);
}

#[test]
fn bad_requests_get_clear_4xx_answers() {
    let proxy = Proxy::start(|_| {});
    let addr = proxy.addr();

    let (status, text) = raw(
        addr,
        b"GET /index.html HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("CONNECT"), "the 400 explains itself: {text}");

    let big = "a".repeat(100 * 1024);
    let (status, text) = raw(
        addr,
        format!("GET http://x.test/ HTTP/1.1\r\nHost: x.test\r\nX-Big: {big}\r\n\r\n").as_bytes(),
    );
    assert_eq!(status, 431, "{}", &text[..text.len().min(200)]);

    let (status, text) = raw(
        addr,
        b"CONNECT mail.test:25 HTTP/1.1\r\nHost: mail.test:25\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("port 25"), "{text}");

    let (status, text) = raw(
        addr,
        b"CONNECT nohost HTTP/1.1\r\nHost: nohost\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 400, "{text}");

    let (status, _) = raw(addr, b"\x16\x03\x01garbage\r\n\r\n");
    assert_eq!(status, 400);

    assert!(proxy.is_running());
}

#[test]
fn connect_to_the_proxys_own_address_is_refused() {
    // The listen address is set before `customize` runs, so the own port can be allowed.
    let proxy = Proxy::start(|c| {
        let own = c.listen.port();
        c.allow_port.push(own);
    });
    let (status, _) = connect(proxy.addr(), &proxy.addr().to_string());
    assert_eq!(status, 403);
    assert!(proxy.is_running());
}

#[test]
fn absolute_form_http_is_forwarded() {
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let (mut s, _) = server.accept().unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).unwrap();
            head.push(b[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let body = if head.starts_with("GET /hello ")
            && !head.to_lowercase().contains("proxy-connection")
        {
            "hello"
        } else {
            "unexpected"
        };
        write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
    });
    let proxy = Proxy::start(|c| {
        c.allow_port.push(port);
        // Loopback is refused by default (see tests/hardening.rs); this server lives there.
        c.allow_destination
            .push(regproxy::config::Cidr::parse("127.0.0.1").unwrap());
    });
    let req = format!(
        "GET http://127.0.0.1:{port}/hello HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nProxy-Connection: keep-alive\r\nConnection: close\r\n\r\n"
    );
    let (status, text) = raw(proxy.addr(), req.as_bytes());
    assert_eq!(status, 200, "{text}");
    assert!(text.ends_with("hello"), "{text}");
    handle.join().unwrap();
}

#[test]
fn blob_redirects_are_followed_upstream_side_without_the_token() {
    let dir = TestDir::new();
    let digest = sha256_digest(b"blob-data");
    let (cdn_port, cdn_seen) = tiny_https(&dir.join("cdn"), &["cdn.test"], |_, w| {
        let _ = w.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nblob-data",
        );
    });
    let location = format!("https://cdn.test:{cdn_port}/signed/blob?sig=opaque");
    let (origin_port, origin_seen) = tiny_https(
        &dir.join("origin"),
        &["origin.test"],
        move |_, w| {
            let _ = write!(w, "HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        },
    );
    let proxy = Proxy::start(|c| {
        c.intercept.push("origin.test".into());
        // Redirect targets must be on allowed ports too.
        c.allow_port.extend([origin_port, cdn_port]);
        for (name, port) in [("origin.test", origin_port), ("cdn.test", cdn_port)] {
            c.resolve.push((
                format!("{name}:{port}"),
                SocketAddr::from(([127, 0, 0, 1], port)),
            ));
        }
        c.upstream_ca.push(dir.join("cdn/ca.crt"));
        c.upstream_ca.push(dir.join("origin/ca.crt"));
    });
    let target = format!("origin.test:{origin_port}");
    let mut tls = tls_via(proxy.addr(), &target, "origin.test", &proxy.ca_cert_path());
    write!(
        tls,
        "GET /v2/test/img/blobs/{digest} HTTP/1.1\r\nHost: {target}\r\nAuthorization: Bearer registry-token\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("blob-data"), "{text}");

    let origin = origin_seen.lock().unwrap().clone();
    let cdn = cdn_seen.lock().unwrap().clone();
    // One GET with the client's token; regproxy may also ask, anonymously, whether the
    // repository is public (a HEAD), and never sends the token anywhere else.
    let gets: Vec<&String> = origin.iter().filter(|h| h.starts_with("GET ")).collect();
    assert_eq!(gets.len(), 1, "{origin:?}");
    assert!(gets[0].contains("registry-token"), "{origin:?}");
    assert!(
        origin
            .iter()
            .filter(|h| !h.starts_with("GET "))
            .all(|h| !h.contains("registry-token") && h.starts_with("HEAD ")),
        "{origin:?}"
    );
    assert_eq!(cdn.len(), 1, "{cdn:?}");
    assert!(
        cdn[0].starts_with("GET /signed/blob?sig=opaque "),
        "{cdn:?}"
    );
    assert!(
        !cdn[0].to_ascii_lowercase().contains("authorization"),
        "the registry token leaked to the CDN: {cdn:?}"
    );
}
