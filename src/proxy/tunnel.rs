//! The blind tunnel: bytes copied both ways, half-close passed on, nothing inspected.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::AccessLog;

const BUF: usize = 64 * 1024;

/// Waits for the client's side of the CONNECT and copies until both directions have closed.
pub(super) async fn run(upgrade: OnUpgrade, mut upstream: TcpStream, log: AccessLog) {
    let upgraded = match upgrade.await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(host = %log.host, error = %e, "client left before the tunnel started");
            return;
        }
    };
    let _open = crate::metrics::Open::new(&log.metrics.open_tunnels);
    let mut client = TokioIo::new(upgraded);
    // copy_bidirectional shuts down each write side when its read side reaches EOF (half-close).
    let result =
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, BUF, BUF).await;
    let (up, down, complete) = match result {
        Ok((up, down)) => (up, down, true),
        Err(_) => (0, 0, false),
    };
    log.metrics.request(&log.host, log.outcome.as_str(), down);
    tracing::info!(
        target: crate::log_writer::ACCESS,
        client = %log.client,
        host = %log.host,
        method = "CONNECT",
        status = 200,
        bytes = down,
        bytes_up = up,
        complete,
        duration_ms = log.start.elapsed().as_millis() as u64,
        "TUNNEL"
    );
}
