//! What every listener (proxy, mirror, admin) shares: a connection cap, an accept loop that backs
//! off on errors such as EMFILE, and an idle timeout on the connections it hands out.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections held at once; past it, new ones wait in the kernel's backlog.
    pub max_connections: usize,
    /// Time a client has to send a complete request head.
    pub header_timeout: Duration,
    /// Time a connection may go without a byte either way before it is asked to close.
    pub idle_timeout: Duration,
}

/// The pause after a failed accept: doubling from 10 ms up to 1 s, reset by a success.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    /// Records a failure and returns how long to wait before the next accept.
    pub fn failed(&mut self) -> Duration {
        let pause = Self::FIRST.saturating_mul(1 << self.failures.min(10));
        self.failures = self.failures.saturating_add(1);
        pause.min(Self::MAX)
    }

    /// Records a success: the next failure waits the shortest time again.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }
}

/// When a connection last moved a byte, shared between its I/O and its idle watchdog.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    // Requests being answered: a connection waiting on the upstream for them is not idle.
    busy: AtomicU64,
}

/// Marks a request in progress on a connection until dropped (see [`Activity::busy`]).
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            busy: AtomicU64::new(0),
        })
    }

    /// A request is being answered until the guard is dropped (when its response head is
    /// ready): the connection does not count as idle meanwhile, however long the upstream takes.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// The instant of the last byte read or written (or of the accept).
    pub fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// An accepted connection: it holds its slot under the cap until it is dropped, wherever it
/// goes (a CONNECT tunnel or an intercepted TLS session keeps it), and records its activity.
#[derive(Debug)]
pub struct Tracked<S> {
    io: S,
    activity: Arc<Activity>,
    _slot: Option<OwnedSemaphorePermit>,
}

impl<S> Tracked<S> {
    /// Wraps `io` without a slot (for connections not counted under any cap).
    pub fn new(io: S) -> Tracked<S> {
        Tracked {
            io,
            activity: Activity::new(),
            _slot: None,
        }
    }

    /// The activity record, for [`drive`].
    pub fn activity(&self) -> Arc<Activity> {
        self.activity.clone()
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &S {
        &self.io
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Accepts connections until `shutdown` resolves, at most `max_connections` alive at once, and
/// spawns `handle` for each on `tasks`.
///
/// At the cap it stops accepting rather than accepting and closing: waiting clients queue in
/// the kernel's backlog, first come first served, so a burst is delayed instead of refused and a
/// health check behind a flood of idle connections gets in as soon as one of them times out;
/// accepting only to close would spend a descriptor and a syscall per attempt on a client that
/// retries at once, and let it win every freed slot.
pub async fn accept_loop<S, A, AF, H, HF>(
    mut accept: A,
    max_connections: usize,
    tasks: &TaskTracker,
    shutdown: impl Future<Output = ()>,
    mut handle: H,
) where
    A: FnMut() -> AF,
    AF: Future<Output = io::Result<(S, SocketAddr)>>,
    H: FnMut(Tracked<S>, SocketAddr) -> HF,
    HF: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    let mut backoff = Backoff::default();
    let mut full_warned = false;
    tokio::pin!(shutdown);
    loop {
        if slots.available_permits() == 0 && !full_warned {
            tracing::warn!(
                max_connections,
                "connection cap reached; new connections wait"
            );
        }
        full_warned = slots.available_permits() == 0;
        let slot = tokio::select! {
            _ = &mut shutdown => return,
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            a = accept() => a,
        };
        match accepted {
            Ok((io, peer)) => {
                backoff.succeeded();
                let mut conn = Tracked::new(io);
                conn._slot = Some(slot);
                tasks.spawn(handle(conn, peer));
            }
            Err(e) => {
                // Out of file descriptors and the like: the pending connection stays queued and
                // accept fails again at once, so wait instead of spinning.
                let pause = backoff.failed();
                tracing::warn!(error = %e, pause = ?pause, "accept failed");
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

/// Why a connection is to end before it ends by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// No byte moved for the idle time: drop it at once. Nothing is lost, and a client that sent
    /// half a request head, or stopped reading a response, holds nothing longer.
    Idle,
    /// Shutdown started: close it gracefully, after the request in progress.
    Shutdown,
}

/// Resolves when a connection should end: shutdown has started, or no byte has moved for `idle`.
pub async fn idle_or_shutdown(
    activity: &Activity,
    idle: Duration,
    shutdown: &CancellationToken,
) -> Ending {
    loop {
        let deadline = activity.last() + idle;
        tokio::select! {
            _ = shutdown.cancelled() => return Ending::Shutdown,
            _ = tokio::time::sleep_until(deadline) => {
                let busy = activity.busy.load(Ordering::Relaxed) > 0;
                if !busy && activity.last() + idle <= Instant::now() {
                    return Ending::Idle;
                }
            }
        }
    }
}

/// Connections wait this deep in the kernel's queue while the listener is at its cap (tokio's
/// own bind leaves 128, past which the kernel drops connection attempts).
const BACKLOG: u32 = 1024;
/// Descriptors kept back from client connections: upstream connections, cache files, logs.
const RESERVED_DESCRIPTORS: u64 = 64;

/// Binds a listening socket with a deep backlog (see [`BACKLOG`]).
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Raises the soft descriptor limit to the hard one and returns how many client connections fit
/// in it (each may need a second descriptor upstream, or for a tunnel), so that the connection
/// cap is met before the process runs out of descriptors; `None` if the limit is unknown.
pub fn connections_that_fit() -> Option<usize> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if setrlimit(Resource::Nofile, limit).is_err() {
            limit = getrlimit(Resource::Nofile);
        }
    }
    let n = limit.current?;
    Some(
        usize::try_from(n.saturating_sub(RESERVED_DESCRIPTORS) / 2)
            .unwrap_or(usize::MAX)
            .max(1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn backoff_doubles_to_a_ceiling_and_resets() {
        let mut b = Backoff::default();
        let pauses: Vec<u64> = (0..10).map(|_| b.failed().as_millis() as u64).collect();
        assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        for _ in 0..100 {
            assert_eq!(b.failed(), Duration::from_secs(1));
        }
        b.succeeded();
        assert_eq!(b.failed(), Duration::from_millis(10));
    }

    /// An accept that always fails (EMFILE) is retried a handful of times a second, not in a
    /// tight loop.
    #[tokio::test]
    async fn failing_accept_does_not_spin() {
        let calls = AtomicUsize::new(0);
        let accept = || {
            calls.fetch_add(1, Ordering::Relaxed);
            async {
                Err::<((), SocketAddr), _>(io::Error::from_raw_os_error(24)) // EMFILE
            }
        };
        let tasks = TaskTracker::new();
        let stop = tokio::time::sleep(Duration::from_millis(700));
        accept_loop(accept, 4, &tasks, stop, |_, _| async {}).await;
        // 10 + 20 + 40 + 80 + 160 + 320 ms: about seven attempts in 700 ms.
        let n = calls.load(Ordering::Relaxed);
        assert!((3..=10).contains(&n), "{n} accept calls in 700 ms");
    }

    /// At the cap, nothing more is accepted until a connection ends.
    #[tokio::test]
    async fn the_cap_holds_until_a_connection_ends() {
        let accepted = Arc::new(AtomicUsize::new(0));
        let release = CancellationToken::new();
        let tasks = TaskTracker::new();
        let counter = accepted.clone();
        let accept = move || {
            // Five clients are waiting; after them, nobody.
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                if n >= 5 {
                    std::future::pending::<()>().await;
                }
                Ok(((), SocketAddr::from(([127, 0, 0, 1], 1))))
            }
        };
        let r = release.clone();
        let stop = CancellationToken::new();
        let looping = {
            let (stop, tasks) = (stop.clone(), tasks.clone());
            tokio::spawn(async move {
                accept_loop(accept, 3, &tasks, stop.cancelled_owned(), move |conn, _| {
                    let r = r.clone();
                    async move {
                        r.cancelled().await;
                        drop(conn);
                    }
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            3,
            "accepted up to the cap only"
        );
        release.cancel();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            6,
            "slots freed: the rest accepted"
        );
        stop.cancel();
        looping.await.unwrap();
    }

    #[tokio::test]
    async fn idle_means_no_byte_for_the_idle_time() {
        let activity = Activity::new();
        let shutdown = CancellationToken::new();
        let idle = Duration::from_millis(300);
        let start = Instant::now();
        let watch = idle_or_shutdown(&activity, idle, &shutdown);
        tokio::pin!(watch);
        // Bytes every 100 ms keep it open.
        for _ in 0..5 {
            tokio::select! {
                _ = &mut watch => panic!("closed while active"),
                _ = tokio::time::sleep(Duration::from_millis(100)) => activity.touch(),
            }
        }
        assert_eq!(watch.await, Ending::Idle);
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(800) && took < Duration::from_secs(3),
            "{took:?}"
        );
        shutdown.cancel();
        let fresh = Activity::new();
        let ending = idle_or_shutdown(&fresh, Duration::from_secs(3600), &shutdown).await;
        assert_eq!(ending, Ending::Shutdown);
    }
}
