//! One large object over several upstream connections at once. A long path allows one TCP flow
//! only so much (a window per round trip); a few flows, each asked for a range, carry more.
//!
//! The first request for a blob already asks for its first piece only: a whole `GET` that is cut
//! after its first piece has had the rest of the socket's buffers sent for nothing (on loopback,
//! more than the piece). A 206 that answers it tells the object's length, and is passed on as the
//! 200 of the whole object; the rest is asked for in ranged pieces, each on a connection of its
//! own, a few at a time, and the bytes still come out as one body, in order, for the fill to
//! hash. Pieces are held in memory until their turn: at most `--blob-connections` of `PIECE`
//! bytes per object, each drawn from the process's budget before it is asked for, and given back
//! once its bytes have been passed on.
//!
//! Every piece's answer is checked, the first one's too: a 206 for exactly the range asked, of
//! the same total length, not encoded, and exactly that many bytes (its body read to the end, even
//! past the range), none more than [`PIECE_STALL`] after the one before. On any failure the pieces
//! stop, and the rest comes from one ranged `GET` of all of it, checked as a piece is, or else
//! from one whole `GET` again, its first bytes (those already passed on) skipped. Wrong bytes in a
//! well-formed piece are the digest's to catch: the fill fails, and no client sees a clean end.
//! An upstream that ignores the first range (a 200) is read whole, as it answered. A blob no
//! larger than a piece is that first answer alone: its head is checked as a piece's, and its body
//! is the fill's to check (length, digest, stall) as a whole `GET`'s would be; a short or stalled
//! one fails the download rather than falling back.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{request, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::{Client, How, UpstreamError};
use crate::body::{self, Body, BoxError, Feed};

/// Bytes per piece, the first one's too: each costs a round trip before its first byte, and each
/// waiting for its turn is held in memory; at 4 MiB the long fat path of bench/ gained 8% and
/// peak RSS 16 MiB. An object no larger comes in one request.
const PIECE: u64 = 2 << 20;
/// The longest a ranged request may keep the download waiting, for its head or its next bytes,
/// before it is given up (less if `--upstream-timeout` is less): the fill gives up after 60 s
/// without a byte, and the request that takes over must have its bytes flowing before then.
const PIECE_STALL: Duration = Duration::from_secs(20);
/// Frames queued between the pieces and the body's reader.
const QUEUE: usize = 8;

/// What holds the client that asks for the pieces (the proxy's shared state).
pub type Via = Arc<dyn AsRef<Client> + Send + Sync>;

/// Why a piece (the first one too) could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PieceError {
    /// The request failed.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// Not a 206.
    #[error("answered {0} to a range")]
    Status(StatusCode),
    /// A 206 for another range, or another total.
    #[error("answered Content-Range {got:?} to a range of bytes {want}")]
    Range { got: String, want: String },
    /// A content encoding, although identity was asked for.
    #[error("answered a range with an encoded body")]
    Encoded,
    /// The body broke off.
    #[error("its body broke off")]
    Body(#[source] BoxError),
    /// Nothing came for this long.
    #[error("sent nothing for {0:?}")]
    Stalled(Duration),
    /// Fewer or more bytes than the range has.
    #[error("sent {got} bytes of a {want}-byte range")]
    Length { got: u64, want: u64 },
}

/// The head of a whole-object `GET`, kept so that the object's parts can be asked for alike.
pub struct Ranged {
    head: request::Parts,
    /// The object's length, once a 206 has answered the first request with its first piece.
    total: Option<u64>,
}

impl Ranged {
    /// Keeps the head of `req`, before it is sent.
    pub fn of(req: &Request<Body>) -> Ranged {
        Ranged {
            head: super::head_of(req).into_parts().0,
            total: None,
        }
    }

    /// Sends `req`, the request whose head this keeps: for a blob that may come in pieces, asks
    /// for its first piece only, and answers a 206 that is exactly that piece as the 200 of the
    /// whole object (its body the piece; [`Ranged::body`] makes it whole). Any other answer to the
    /// range is the upstream's: a 200 (ranges ignored) as it is, a 206 for anything else or a 416
    /// (an empty object) by asking again for all of it.
    pub async fn send(
        &mut self,
        client: &Client,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let blob = self.head.method == Method::GET && self.head.uri.path().contains("/blobs/");
        if !blob || client.blob_connections() < 2 || self.head.headers.contains_key(header::RANGE) {
            return client.send(req, How::following()).await;
        }
        if let Some(range) = range_value(0, PIECE) {
            req.headers_mut().insert(header::RANGE, range);
        }
        let resp = client.send(req, How::following()).await?;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => match first_piece(&resp) {
                Ok(total) => {
                    self.total = Some(total);
                    Ok(as_whole(resp, total))
                }
                Err(e) => {
                    drop(resp); // not to keep its connection busy with a piece nobody reads
                    client
                        .metrics()
                        .piece_fallbacks
                        .fetch_add(1, Ordering::Relaxed);
                    let error = crate::upstream::error_chain(&e);
                    tracing::warn!(%error, "the first piece was answered wrongly; asking for all of it");
                    client.send(self.request(None), How::following()).await
                }
            },
            StatusCode::RANGE_NOT_SATISFIABLE => {
                drop(resp);
                client.send(self.request(None), How::following()).await
            }
            _ => Ok(resp),
        }
    }

    /// The body of the answer [`Ranged::send`] gave: the object's first piece followed by the
    /// others, fetched ahead, when it was answered in pieces; else the body as it comes.
    pub fn body(self, via: Via, first: Incoming) -> Body {
        let parallel = (*via).as_ref().blob_connections() as u64;
        let Some(total) = self.total.filter(|t| *t > PIECE && parallel > 1) else {
            return body::incoming(first);
        };
        let (feed, out) = body::channel(QUEUE, Some(total));
        let first = body::incoming(first);
        tokio::spawn(drive(self, via, first, (total, parallel), feed).in_current_span());
        out
    }

    /// The request again, for `bytes` (`None`: the whole object).
    fn request(&self, bytes: Option<(u64, u64)>) -> Request<Body> {
        let mut req = Request::from_parts(self.head.clone(), body::empty());
        if let Some(range) = bytes.and_then(|(start, end)| range_value(start, end)) {
            req.headers_mut().insert(header::RANGE, range);
        }
        req
    }
}

/// `Range: bytes=START-LAST` for the bytes `start..end`.
fn range_value(start: u64, end: u64) -> Option<HeaderValue> {
    HeaderValue::try_from(format!("bytes={start}-{}", end - 1)).ok()
}

/// The object's length, if `resp` (a 206) is exactly its first piece, as the first request
/// asked: bytes 0 to the piece's end or the object's, whichever comes first.
fn first_piece(resp: &Response<Incoming>) -> Result<u64, PieceError> {
    let range = resp
        .headers()
        .get(header::CONTENT_RANGE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let total = range
        .trim()
        .rsplit_once('/')
        .and_then(|(_, t)| t.parse::<u64>().ok())
        .filter(|t| *t > 0);
    let Some(total) = total else {
        let want = format!("0-{}/*", PIECE - 1);
        return Err(PieceError::Range { got: range, want });
    };
    check(resp, (0, PIECE.min(total)), total)?;
    Ok(total)
}

/// `resp`, the 206 of an object's first piece, as the 200 of all its `total` bytes.
fn as_whole(mut resp: Response<Incoming>, total: u64) -> Response<Incoming> {
    *resp.status_mut() = StatusCode::OK;
    let headers = resp.headers_mut();
    headers.remove(header::CONTENT_RANGE);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(total));
    resp
}

/// A piece asked for: its bytes as they come, and its share of the process's budget, held until
/// they have all been passed on.
struct Piece {
    end: u64,
    rx: mpsc::UnboundedReceiver<Result<Bytes, PieceError>>,
    _held: OwnedSemaphorePermit,
}

/// Feeds the object to `feed` in order: the first piece from `first`, the others from ranged
/// requests; the rest in one request (see [`rest`]) if any of that fails.
async fn drive(ranged: Ranged, via: Via, first: Body, (total, parallel): (u64, u64), feed: Feed) {
    let ranged = Arc::new(ranged);
    let mut tasks = JoinSet::new();
    let plan = (total, parallel);
    let sent = match pieces(&ranged, &via, first, plan, &feed, &mut tasks).await {
        Ok(()) => {
            feed.finish();
            return;
        }
        Err(Stop::ClientGone) => return,
        Err(Stop::Broken(sent, e)) => {
            tracing::warn!(error = %crate::upstream::error_chain(&e), at = sent, "a piece failed; the rest comes in one request");
            sent
        }
    };
    // The pieces in flight end here; their budget goes back with them.
    tasks.abort_all();
    let client = (*via).as_ref();
    client
        .metrics()
        .piece_fallbacks
        .fetch_add(1, Ordering::Relaxed);
    match rest(&ranged, client, sent, total, &feed).await {
        Ok(true) => feed.finish(),
        Ok(false) => {}
        Err(e) => {
            let reason = crate::upstream::error_chain(&e);
            let _ = feed.send(Err(reason.into())).await;
        }
    }
}

/// Why [`pieces`] stopped before the end.
enum Stop {
    /// Nobody reads the body any more.
    ClientGone,
    /// This many bytes went out, then something failed.
    Broken(u64, PieceError),
}

/// Passes the first piece on from `first` while asking for the next ones, `parallel` connections
/// at once in all, then each piece in turn.
async fn pieces(
    ranged: &Arc<Ranged>,
    via: &Via,
    first: Body,
    (total, parallel): (u64, u64),
    feed: &Feed,
    tasks: &mut JoinSet<()>,
) -> Result<(), Stop> {
    let mut ahead: VecDeque<Piece> = VecDeque::new();
    let mut next = PIECE.min(total);
    let mut sent = 0u64;
    let mut source = Source::First(first);
    let mut end = next;
    let wait = stall((**via).as_ref());
    loop {
        if matches!(source, Source::Waiting) {
            // The budget held the next piece back; now asked for, it is in front.
            if let Some(piece) = ahead.pop_front() {
                end = piece.end;
                source = Source::Piece(piece);
            }
        }
        let room = (ahead.len() as u64) < parallel - 1 && next < total;
        tokio::select! {
            biased;
            _ = feed.closed() => return Err(Stop::ClientGone),
            held = crate::body::reserve_process(PIECE as usize), if room => {
                let Some(held) = held else {
                    // No budget to be had (it cannot happen): no more pieces; the rest comes whole.
                    next = total;
                    continue;
                };
                let stop = (next + PIECE).min(total);
                ahead.push_back(ask(tasks, ranged.clone(), via.clone(), (next, stop), total, held));
                next = stop;
            }
            frame = source.next(wait) => match frame {
                Some(Ok(data)) => {
                    let n = data.len() as u64;
                    if sent + n > end {
                        let e = PieceError::Length { got: sent + n, want: end };
                        return Err(Stop::Broken(sent, e));
                    }
                    if feed.send(Ok(data)).await.is_err() {
                        return Err(Stop::ClientGone);
                    }
                    sent += n;
                }
                Some(Err(e)) => return Err(Stop::Broken(sent, e)),
                None if sent < end => {
                    let e = PieceError::Length { got: sent, want: end };
                    return Err(Stop::Broken(sent, e));
                }
                None if sent == total => return Ok(()),
                None => {
                    // The next piece was asked for when there was room, in order: it is in front,
                    // or waits for the budget (never past the end: then the upstream was short).
                    source = match ahead.pop_front() {
                        Some(piece) => {
                            end = piece.end;
                            Source::Piece(piece)
                        }
                        None if next < total => Source::Waiting,
                        None => {
                            let e = PieceError::Length { got: sent, want: total };
                            return Err(Stop::Broken(sent, e));
                        }
                    };
                }
            },
        }
    }
}

/// Where the bytes in front come from: the first answer, or a piece fetched ahead; or nothing
/// yet, while the next piece waits for the budget.
enum Source {
    First(Body),
    Piece(Piece),
    Waiting,
}

impl Source {
    /// The next bytes; `None` once the source is spent. Both are read to their end, even when all
    /// their bytes are in: the answer may yet go on past the range, and then it is not what was
    /// asked for (`fetch` finds that of a piece, the caller of the first answer).
    async fn next(&mut self, stall: Duration) -> Option<Result<Bytes, PieceError>> {
        match self {
            Source::First(body) => next_data(body, stall).await,
            Source::Piece(piece) => piece.rx.recv().await,
            Source::Waiting => std::future::pending().await,
        }
    }
}

/// Starts fetching `bytes` (start, end exclusive) of the object into a new [`Piece`].
fn ask(
    tasks: &mut JoinSet<()>,
    ranged: Arc<Ranged>,
    via: Via,
    bytes: (u64, u64),
    total: u64,
    held: OwnedSemaphorePermit,
) -> Piece {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = async move {
        if let Err(e) = fetch(&ranged, (*via).as_ref(), bytes, total, &tx).await {
            let _ = tx.send(Err(e));
        }
    };
    tasks.spawn(task.in_current_span());
    Piece {
        end: bytes.1,
        rx,
        _held: held,
    }
}

/// Asks for one piece and sends its bytes to `tx`, exactly `end - start` of them, or fails.
async fn fetch(
    ranged: &Ranged,
    client: &Client,
    (start, end): (u64, u64),
    total: u64,
    tx: &mpsc::UnboundedSender<Result<Bytes, PieceError>>,
) -> Result<(), PieceError> {
    let resp = ask_range(ranged, client, (start, end), total).await?;
    client.metrics().pieces.fetch_add(1, Ordering::Relaxed);
    let want = end - start;
    let mut got = 0u64;
    let mut body = resp.into_body();
    let stall = stall(client);
    while let Some(data) = next_data(&mut body, stall).await {
        let data = data?;
        got += data.len() as u64;
        if got > want {
            return Err(PieceError::Length { got, want });
        }
        if tx.send(Ok(data)).is_err() {
            return Ok(()); // nobody waits for this piece any more
        }
    }
    if got != want {
        return Err(PieceError::Length { got, want });
    }
    Ok(())
}

/// The next data of `body` (trailers skipped), `None` at its end; an error if it broke off or
/// sent nothing for `stall`.
async fn next_data<B>(body: &mut B, stall: Duration) -> Option<Result<Bytes, PieceError>>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    loop {
        let Ok(frame) = tokio::time::timeout(stall, body.frame()).await else {
            return Some(Err(PieceError::Stalled(stall)));
        };
        match frame? {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    return Some(Ok(data));
                }
            }
            Err(e) => return Some(Err(PieceError::Body(e.into()))),
        }
    }
}

/// How long a ranged request may keep the download waiting, for its head or between its bytes.
fn stall(client: &Client) -> Duration {
    client.timeout().min(PIECE_STALL)
}

/// Asks for bytes `start..end` of the object of `total` bytes: the answer's head, checked.
async fn ask_range(
    ranged: &Ranged,
    client: &Client,
    (start, end): (u64, u64),
    total: u64,
) -> Result<Response<Incoming>, PieceError> {
    let wait = stall(client);
    let req = ranged.request(Some((start, end)));
    let Ok(resp) = tokio::time::timeout(wait, client.send(req, How::following())).await else {
        return Err(PieceError::Stalled(wait));
    };
    let resp = resp?;
    check(&resp, (start, end), total)?;
    Ok(resp)
}

/// Whether `resp` answers the range `start..end` of an object of `total` bytes, as asked.
fn check(
    resp: &Response<Incoming>,
    (start, end): (u64, u64),
    total: u64,
) -> Result<(), PieceError> {
    if resp.status() != StatusCode::PARTIAL_CONTENT {
        return Err(PieceError::Status(resp.status()));
    }
    let headers = resp.headers();
    if headers.contains_key(header::CONTENT_ENCODING) {
        return Err(PieceError::Encoded);
    }
    let want = format!("bytes {start}-{}/{total}", end - 1);
    let got = headers
        .get(header::CONTENT_RANGE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    if got.trim() != want {
        return Err(PieceError::Range {
            got,
            want: want["bytes ".len()..].to_owned(),
        });
    }
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    match length {
        Some(n) if n != end - start => Err(PieceError::Length {
            got: n,
            want: end - start,
        }),
        _ => Ok(()),
    }
}

/// The object from byte `from` on: one ranged `GET` of the rest if the upstream answers it as a
/// piece must be answered, else one whole `GET`, its first `from` bytes skipped; `Ok(false)` if
/// the reader left.
async fn rest(
    ranged: &Ranged,
    client: &Client,
    from: u64,
    total: u64,
    feed: &Feed,
) -> Result<bool, PieceError> {
    if from > 0 {
        // Skipping what went out means fetching it again while the fill receives nothing: on a
        // slow path, long enough for the fill to give up on a large object.
        match ask_range(ranged, client, (from, total), total).await {
            Ok(resp) => return pass_on(resp, (0, total - from), feed, stall(client)).await,
            Err(e) => {
                let error = crate::upstream::error_chain(&e);
                tracing::warn!(%error, at = from, "the rest as a range failed; asking for all of it");
            }
        }
    }
    let resp = client.send(ranged.request(None), How::following()).await?;
    let length = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if resp.status() != StatusCode::OK || resp.headers().contains_key(header::CONTENT_ENCODING) {
        return Err(PieceError::Status(resp.status()));
    }
    if length.is_some_and(|n| n != total) {
        return Err(PieceError::Length {
            got: length.unwrap_or(0),
            want: total,
        });
    }
    pass_on(resp, (from, total), feed, stall(client)).await
}

/// Passes `resp`'s body on to `feed`, but for its first `skip` bytes (those went out already);
/// it must have exactly `length` bytes, none more than `wait` after the one before. `Ok(false)`
/// if the reader left.
async fn pass_on(
    resp: Response<Incoming>,
    (skip, length): (u64, u64),
    feed: &Feed,
    wait: Duration,
) -> Result<bool, PieceError> {
    let mut body = resp.into_body();
    let mut at = 0u64;
    loop {
        let data = tokio::select! {
            _ = feed.closed() => return Ok(false),
            data = next_data(&mut body, wait) => data,
        };
        let Some(data) = data else { break };
        let data = data?;
        let len = data.len() as u64;
        let skipped = skip.saturating_sub(at).min(len) as usize;
        at += len;
        if at > length {
            return Err(PieceError::Length {
                got: at,
                want: length,
            });
        }
        if skipped < data.len() && feed.send(Ok(data.slice(skipped..))).await.is_err() {
            return Ok(false);
        }
    }
    if at != length {
        return Err(PieceError::Length {
            got: at,
            want: length,
        });
    }
    Ok(true)
}
