//! Raw HTTP and TLS through the proxy, and tiny scripted HTTPS upstreams.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use super::*;

pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

pub fn dial(proxy: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(proxy).expect("connect to proxy");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// Reads an HTTP response head byte by byte (so nothing after it is consumed); returns status and head.
pub fn read_head(s: &mut impl Read) -> (u16, String) {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => panic!(
                "connection ended inside the response head: {:?}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = status_code(&head).expect("status code");
    (status, head)
}

/// Reads a request head (through the blank line, at most 64 KiB) byte by byte, so that nothing
/// after it is consumed; `None` if the stream ends, fails or goes on too long first.
pub(super) fn read_request_head(s: &mut impl Read) -> Option<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 64 << 10 || s.read_exact(&mut b).is_err() {
            return None;
        }
        head.push(b[0]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// The value of header `name` (case-insensitive) in a request or response head, if present.
pub(super) fn header_value(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// Ends a served TLS connection cleanly: flushes, sends close_notify.
pub(super) fn close_tls(mut tls: rustls::StreamOwned<rustls::ServerConnection, TcpStream>) {
    let _ = tls.flush();
    tls.conn.send_close_notify();
    let _ = tls.conn.complete_io(&mut tls.sock);
}

/// Sends raw bytes, reads the whole answer (the request must ask for Connection: close).
pub fn raw(proxy: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = dial(proxy);
    s.write_all(request).unwrap();
    read_response(s)
}

/// The status code of a response (`HTTP/1.1 200 OK…`).
fn status_code(response: &str) -> Option<u16> {
    response.split(' ').nth(1)?.parse().ok()
}

/// Reads a whole response to the end of the stream: its status and its text.
pub fn read_response(mut s: impl Read) -> (u16, String) {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = status_code(&text).unwrap_or_else(|| panic!("no status in {text:?}"));
    (status, text)
}

pub fn connect(proxy: SocketAddr, target: &str) -> (u16, TcpStream) {
    let mut s = dial(proxy);
    write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").unwrap();
    let (status, _) = read_head(&mut s);
    (status, s)
}

pub fn tls_config(ca_pem: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_pem).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// CONNECTs to `target`, does TLS trusting `ca_pem` with SNI `name`, returns the TLS stream.
pub fn tls_via(
    proxy: SocketAddr,
    target: &str,
    name: &str,
    ca_pem: &Path,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    tls_via_as(proxy, None, target, name, ca_pem)
}

/// [`tls_via`] as a proxy user (`user:password`, sent as `Proxy-Authorization: Basic`).
pub fn tls_via_as(
    proxy: SocketAddr,
    user: Option<&str>,
    target: &str,
    name: &str,
    ca_pem: &Path,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    use base64::Engine as _;
    let mut tcp = dial(proxy);
    let auth = user.map_or(String::new(), |u| {
        let b64 = base64::engine::general_purpose::STANDARD.encode(u);
        format!("Proxy-Authorization: Basic {b64}\r\n")
    });
    write!(
        tcp,
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n"
    )
    .unwrap();
    let (status, _) = read_head(&mut tcp);
    assert_eq!(status, 200, "CONNECT {target}");
    let server_name = ServerName::try_from(name.to_owned()).unwrap();
    let conn = rustls::ClientConnection::new(tls_config(ca_pem), server_name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .unwrap_or_else(|e| panic!("TLS to {name} via CONNECT {target}: {e}"));
    }
    tls
}

/// GET `path` over `tls`, returning status and body.
pub fn https_get(mut tls: impl Read + Write, host: &str, path: &str) -> (u16, String) {
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    read_response(tls)
}

/// A one-request-per-connection HTTPS server on 127.0.0.1 for `names`, with a certificate from
/// its own test CA (written to `dir`, `ca.crt` is what the proxy must trust). Each connection is
/// served on its own thread: `answer` gets the request head and writes the whole raw response
/// (slowly, wrongly or cut short, as a test needs). Returns the port and the heads seen so far.
pub fn tiny_https(
    dir: &Path,
    names: &[&str],
    answer: impl Fn(&str, &mut dyn Write) + Send + Sync + 'static,
) -> (u16, Arc<Mutex<Vec<String>>>) {
    serve_tiny(dir, names, answer, None)
}

/// How [`tiny_https_dropping_reuse`]'s first connection ends when a second request comes on it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Dropped {
    /// Unanswered, with a clean TLS close (the request is recorded).
    Closed,
    /// Reset: closed with the request unread, so the kernel answers with a TCP RST (recorded as
    /// `reset`).
    Reset,
}

/// Like [`tiny_https`], but its first connection stays open after the first answer (which must
/// be framed and not say `Connection: close`), and when a second request comes on it, the
/// connection is dropped unanswered as `how` says: a kept-alive connection the server drops just
/// as a client reuses it.
pub fn tiny_https_dropping_reuse(
    dir: &Path,
    names: &[&str],
    how: Dropped,
    answer: impl Fn(&str, &mut dyn Write) + Send + Sync + 'static,
) -> (u16, Arc<Mutex<Vec<String>>>) {
    serve_tiny(dir, names, answer, Some(how))
}

fn serve_tiny(
    dir: &Path,
    names: &[&str],
    answer: impl Fn(&str, &mut dyn Write) + Send + Sync + 'static,
    drop_reuse: Option<Dropped>,
) -> (u16, Arc<Mutex<Vec<String>>>) {
    make_test_certs(dir, "tiny test CA", names);
    let config = Arc::new(server_tls_config(dir));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (record, answer) = (seen.clone(), Arc::new(answer));
    thread::spawn(move || {
        for (n, tcp) in listener.incoming().flatten().enumerate() {
            let (config, record, answer) = (config.clone(), record.clone(), answer.clone());
            thread::spawn(move || {
                tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let Some(head) = read_request_head(&mut tls) else {
                    return;
                };
                record.lock().unwrap().push(head.clone());
                answer(&head, &mut tls);
                match drop_reuse.filter(|_| n == 0) {
                    None => {}
                    Some(Dropped::Closed) => {
                        let _ = tls.flush();
                        if let Some(again) = read_request_head(&mut tls) {
                            record.lock().unwrap().push(again);
                        }
                    }
                    Some(Dropped::Reset) => {
                        let _ = tls.flush();
                        if tls.sock.peek(&mut [0u8; 1]).is_ok_and(|n| n > 0) {
                            record.lock().unwrap().push("reset".into());
                        }
                        return; // dropped with the request unread: a reset
                    }
                }
                close_tls(tls);
            });
        }
    });
    (port, seen)
}

/// A response read off a stream: status, head text, body bytes, and whether the body was
/// complete (as long as its `Content-Length`, and no error cut it).
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
    pub complete: bool,
}

impl RawResponse {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<String> {
        header_value(&self.head, name)
    }
}

/// Sends `request` (which should say `Connection: close`) over `s` and reads the response to the
/// end of the stream.
pub fn request(mut s: impl Read + Write, request: &str) -> RawResponse {
    s.write_all(request.as_bytes()).unwrap();
    let (status, head) = read_head(&mut s);
    let mut body = Vec::new();
    let clean = s.read_to_end(&mut body).is_ok();
    let resp = RawResponse {
        status,
        head,
        body,
        complete: false,
    };
    let complete = clean
        && resp
            .header("content-length")
            .map_or(true, |l| l.parse::<usize>().ok() == Some(resp.body.len()));
    RawResponse { complete, ..resp }
}

/// Makes a proxy config intercept `name` and reach it at 127.0.0.1:`port`, trusting `ca` for
/// upstream TLS (a test server such as [`tiny_https`]).
pub fn reach_test_host(config: &mut Config, name: &str, port: u16, ca: PathBuf) {
    config.intercept.push(name.into());
    config.allow_port.push(port);
    config.resolve.push((
        format!("{name}:{port}"),
        SocketAddr::from(([127, 0, 0, 1], port)),
    ));
    config.upstream_ca.push(ca);
}

/// A TCP relay on 127.0.0.1 to `to` whose downstream direction (from `to` back to the client)
/// can be held: after [`Relay::hold_after`], each connection passes at most that many more bytes
/// downstream until [`Relay::release`]. Upstream bytes always flow. TLS passes through
/// untouched, so a download through it stays in flight, part way, for as long as a test needs.
pub struct Relay {
    port: u16,
    gate: Arc<Gate>,
}

/// The hold, numbered so that each connection counts its allowance from when it began.
type Gate = (Mutex<(u64, Option<u64>)>, std::sync::Condvar);

impl Relay {
    pub fn start(to: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let gate = Arc::new((Mutex::new((0, None)), std::sync::Condvar::new()));
        let g = gate.clone();
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(to) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                thread::spawn(move || pipe(c2, s2, None));
                let g = g.clone();
                thread::spawn(move || pipe(server, client, Some(g)));
            }
        });
        Relay { port, gate }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// From now on, each connection stops passing bytes downstream after `bytes` more of them.
    pub fn hold_after(&self, bytes: u64) {
        let mut gate = self.gate.0.lock().unwrap();
        *gate = (gate.0 + 1, Some(bytes));
        self.gate.1.notify_all();
    }

    /// Lets every connection flow again.
    pub fn release(&self) {
        self.gate.0.lock().unwrap().1 = None;
        self.gate.1.notify_all();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.release();
    }
}

/// Copies `from` to `to` until either ends; with a gate, no further than the gate allows.
fn pipe(mut from: TcpStream, mut to: TcpStream, gate: Option<Arc<Gate>>) {
    let mut buf = vec![0u8; 64 << 10];
    let (mut sent, mut hold, mut base) = (0u64, 0u64, 0u64);
    loop {
        let mut room = buf.len();
        if let Some(gate) = &gate {
            let (state, wake) = &**gate;
            let mut held = state.lock().unwrap();
            if held.0 != hold {
                (hold, base) = (held.0, sent);
            }
            while held.1.is_some_and(|max| sent >= base + max) {
                held = wake.wait(held).unwrap();
            }
            if let Some(max) = held.1 {
                room = room.min((base + max - sent) as usize);
            }
        }
        match from.read(&mut buf[..room]) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                sent += n as u64;
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}
