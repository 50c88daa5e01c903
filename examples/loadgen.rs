//! Small-request load generator for `bench/small.py`: N keep-alive connections, each sending one
//! request after another for a fixed time (or up to a fixed count), every status checked.
//!
//! Closed loop by default: each connection sends its next request as soon as the last is answered,
//! which measures the most a server answers. With `--rate R` the load is open: R requests/s in all,
//! on a fixed schedule per connection. A request whose connection was still waiting for an answer
//! when it fell due counts from when it was due, so that a server falling behind is charged for the
//! wait it caused, as wrk2 does; any other counts from when it went out, since the client's own
//! timer slack is not the server's.
//!
//! Through regproxy: `--addr PROXY --connect registry.test:PORT` (CONNECT, then TLS inside).
//! Straight to a TLS server (nginx): `--addr HOST:PORT` alone. Prints one JSON line:
//! `{"count", "errors", "rps", "p50_us", "p99_us", ...}`; only answers with the expected status count.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Barrier;
use tokio_rustls::TlsConnector;

/// Longest CONNECT reply head read before giving up.
const MAX_CONNECT_HEAD: usize = 8192;
/// No single request may take longer than this; one that does counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Flags.
#[derive(Parser, Debug)]
struct Args {
    /// TCP address to connect to: the proxy, or the TLS server itself.
    #[arg(long)]
    addr: String,
    /// Send `CONNECT AUTHORITY` first (through a proxy).
    #[arg(long)]
    connect: Option<String>,
    /// Host header (`NAME[:PORT]`); NAME is the TLS server name.
    #[arg(long)]
    host: String,
    /// PEM file of the CA the server's certificate must chain to.
    #[arg(long)]
    ca: PathBuf,
    /// Connections, each with one request in flight at a time.
    #[arg(long, default_value_t = 1)]
    conns: usize,
    /// Seconds of load after every connection is set up.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Stop after this many requests in all, whichever comes first.
    #[arg(long, default_value_t = 10_000_000)]
    max_requests: u64,
    /// Request method.
    #[arg(long, default_value = "GET")]
    method: String,
    /// Request path (the same for every request).
    #[arg(long)]
    path: String,
    /// Extra header `Name: value` (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// The status that counts as an answer; anything else is an error.
    #[arg(long, default_value_t = 200)]
    expect: u16,
    /// Speak h2 (ALPN) instead of HTTP/1.1.
    #[arg(long)]
    h2: bool,
    /// Open loop: this many requests per second in all, spread evenly over the connections.
    #[arg(long)]
    rate: Option<f64>,
}

/// What one connection measured.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: u64,
    statuses: BTreeMap<u16, u64>,
    failure: Option<String>,
    reconnects: u64,
}

/// One request sender of either protocol.
enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Sender {
    /// Waits until a request may be sent: an error means the server closed the connection
    /// between requests (as nginx does after `keepalive_requests`), nothing was lost.
    async fn ready(&mut self) -> hyper::Result<()> {
        match self {
            Sender::H1(s) => s.ready().await,
            Sender::H2(s) => s.ready().await,
        }
    }

    async fn send(
        &mut self,
        req: Request<Empty<Bytes>>,
    ) -> hyper::Result<hyper::Response<hyper::body::Incoming>> {
        match self {
            Sender::H1(s) => s.send_request(req).await,
            Sender::H2(s) => s.send_request(req).await,
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Arc::new(Args::parse());
    if let Some(r) = args.rate {
        if !(r.is_finite() && r >= 1.0) {
            bail!("--rate must be at least 1 request/s, not {r}");
        }
    }
    let tls = Arc::new(tls_config(&args)?);
    let start = Arc::new(Barrier::new(args.conns + 1));
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(args.conns);
    for index in 0..args.conns {
        let (args, tls, start, sent) = (args.clone(), tls.clone(), start.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            connection(&args, tls, &start, &sent, index).await
        }));
    }
    start.wait().await;
    let began = Instant::now();
    let mut all = Tally::default();
    let mut failed_conns = 0u64;
    for t in tasks {
        let one = t.await.context("a connection task panicked")?;
        all.latencies_us.extend(one.latencies_us);
        all.errors += one.errors;
        all.reconnects += one.reconnects;
        for (k, v) in one.statuses {
            *all.statuses.entry(k).or_default() += v;
        }
        if let Some(f) = one.failure {
            failed_conns += 1;
            eprintln!("loadgen: connection failed: {f}");
        }
    }
    let elapsed = began.elapsed().as_secs_f64();
    report(&args, all, failed_conns, elapsed);
    Ok(())
}

/// Prints the JSON line.
fn report(args: &Args, mut all: Tally, failed_conns: u64, elapsed: f64) {
    all.latencies_us.sort_unstable();
    let count = all.latencies_us.len() as u64;
    let statuses: serde_json::Map<String, serde_json::Value> = all
        .statuses
        .iter()
        .map(|(k, v)| (k.to_string(), (*v).into()))
        .collect();
    let out = serde_json::json!({
        "count": count,
        "errors": all.errors,
        "failed_conns": failed_conns,
        "reconnects": all.reconnects,
        "conns": args.conns,
        "seconds": elapsed,
        "rps": count as f64 / elapsed,
        "rate": args.rate,
        "p50_us": percentile(&all.latencies_us, 0.50),
        "p99_us": percentile(&all.latencies_us, 0.99),
        "max_us": all.latencies_us.last().copied().unwrap_or(0),
        "statuses": statuses,
    });
    println!("{out}");
}

/// The `q` quantile (nearest rank) of sorted values, 0 when empty.
fn percentile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Client TLS trusting only `--ca`, with ALPN for the chosen protocol.
fn tls_config(args: &Args) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&args.ca).context("reading --ca")? {
        roots.add(cert.context("parsing --ca")?)?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![if args.h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    Ok(cfg)
}

/// One connection: set up, wait for all others, then requests until time or count runs out.
async fn connection(
    args: &Args,
    tls: Arc<rustls::ClientConfig>,
    start: &Barrier,
    sent: &AtomicU64,
    index: usize,
) -> Tally {
    let mut tally = Tally::default();
    let sender = setup(args, tls.clone()).await;
    start.wait().await;
    let mut sender = match sender {
        Ok(s) => s,
        Err(e) => {
            tally.failure = Some(format!("{e:#}"));
            return tally;
        }
    };
    let began = Instant::now();
    let deadline = began + Duration::from_secs_f64(args.seconds);
    let mut pace = args.rate.map(|r| Pace::new(began, r, args.conns, index));
    while Instant::now() < deadline && sent.fetch_add(1, Ordering::Relaxed) < args.max_requests {
        if let Some(p) = &pace {
            tokio::time::sleep_until(p.due.into()).await;
        }
        if sender.ready().await.is_err() {
            // Closed by the server between requests: a new connection, as any client would.
            tally.reconnects += 1;
            sender = match setup(args, tls.clone()).await {
                Ok(s) => s,
                Err(e) => {
                    tally.failure = Some(format!("reconnecting: {e:#}"));
                    break;
                }
            };
        }
        match one_request(args, &mut sender).await {
            Ok((status, t0)) => {
                let done = Instant::now();
                let from = pace.as_mut().map_or(t0, |p| p.next(t0, done));
                *tally.statuses.entry(status).or_default() += 1;
                if status == args.expect {
                    let us = done.saturating_duration_since(from).as_micros();
                    tally
                        .latencies_us
                        .push(u32::try_from(us).unwrap_or(u32::MAX));
                } else {
                    tally.errors += 1;
                }
            }
            Err(e) => {
                tally.errors += 1;
                tally.failure = Some(format!("{e:#}"));
                break;
            }
        }
    }
    tally
}

/// Sends one request and reads its whole body: its status, and when it went out.
async fn one_request(args: &Args, sender: &mut Sender) -> Result<(u16, Instant)> {
    let method = Method::from_bytes(args.method.as_bytes())?;
    let mut req = Request::builder().method(method);
    req = if args.h2 {
        req.uri(format!("https://{}{}", args.host, args.path))
    } else {
        req.uri(args.path.as_str())
            .header(hyper::header::HOST, args.host.as_str())
    };
    for h in &args.headers {
        let (name, value) = h.split_once(':').context("--header needs NAME: value")?;
        req = req.header(name.trim(), value.trim());
    }
    let req = req.body(Empty::<Bytes>::new())?;
    let t0 = Instant::now();
    let exchange = async {
        let resp = sender.send(req).await?;
        let status = resp.status().as_u16();
        resp.into_body().collect().await?;
        Ok::<_, hyper::Error>(status)
    };
    let status = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .context("request timed out")??;
    Ok((status, t0))
}

/// One connection's schedule under `--rate`.
struct Pace {
    /// When the next request is due.
    due: Instant,
    /// Time between this connection's requests.
    every: Duration,
    /// When the last answer on this connection came.
    free: Instant,
}

impl Pace {
    /// Connection `index` of `conns` sharing `rate` requests/s, staggered so they do not send at once.
    fn new(began: Instant, rate: f64, conns: usize, index: usize) -> Self {
        let every = Duration::from_secs_f64(conns as f64 / rate);
        let due = began + every.mul_f64(index as f64 / conns as f64);
        Pace {
            due,
            every,
            free: began,
        }
    }

    /// Called when the request due at `self.due`, sent at `sent`, is answered at `done`: where its
    /// latency counts from, and the next request's due time. If the last answer came after this
    /// request was due, the server held it back since then; otherwise it counts from when it went
    /// out, since the timer waking late is the client's slack, not the server's.
    fn next(&mut self, sent: Instant, done: Instant) -> Instant {
        let from = if self.free > self.due { self.due } else { sent };
        self.free = done;
        self.due += self.every;
        from
    }
}

/// TCP, the CONNECT if asked for, TLS, and the HTTP handshake.
async fn setup(args: &Args, tls: Arc<rustls::ClientConfig>) -> Result<Sender> {
    let mut tcp = TcpStream::connect(&args.addr)
        .await
        .with_context(|| format!("connecting to {}", args.addr))?;
    tcp.set_nodelay(true)?;
    if let Some(authority) = &args.connect {
        connect(&mut tcp, authority).await?;
    }
    let sni = args
        .host
        .rsplit_once(':')
        .map_or(args.host.as_str(), |(name, _)| name);
    let name = ServerName::try_from(sni.to_owned())?;
    let stream = TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .context("TLS handshake")?;
    http(stream, args.h2).await
}

/// Sends `CONNECT authority` and reads the reply's head, which must be a 200.
async fn connect<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S, authority: &str) -> Result<()> {
    io.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await?;
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    // Byte by byte: nothing past the head may be consumed, it belongs to TLS.
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_CONNECT_HEAD || io.read(&mut byte).await? == 0 {
            bail!("the proxy closed or sent no end of the CONNECT reply head");
        }
        head.push(byte[0]);
    }
    let line = String::from_utf8_lossy(head.split(|b| *b == b'\n').next().unwrap_or_default())
        .into_owned();
    if line.split_whitespace().nth(1) != Some("200") {
        bail!("CONNECT {authority}: {}", line.trim());
    }
    Ok(())
}

/// The HTTP handshake on an established TLS stream; its connection task runs on its own.
async fn http<S>(stream: S, h2: bool) -> Result<Sender>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(stream);
    if h2 {
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        Ok(Sender::H2(sender))
    } else {
        let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        Ok(Sender::H1(sender))
    }
}
