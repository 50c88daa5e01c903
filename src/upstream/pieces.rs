//! One large object over several upstream connections at once. A long path allows one TCP flow
//! only so much (a window per round trip); a few flows, each asked for a range, carry more.
//!
//! The upstream's 200 answer is read for the first piece only; the rest is asked for in ranged
//! pieces, each on a connection of its own, a few at a time, and the bytes still come out as one
//! body, in order, for the fill to hash. Pieces are held in memory until their turn: at most
//! `--blob-connections` of `PIECE` bytes per object, each drawn from the process's budget before
//! it is asked for, and given back once its bytes have been passed on.
//!
//! Every piece's answer is checked: a 206 for exactly the range asked, of the same total length,
//! not encoded, and exactly that many bytes (its body read to the end, even past the range), none
//! more than [`PIECE_STALL`] after the one before. On any failure the pieces stop, and the rest
//! comes from one ranged `GET` of all of it, checked as a piece is, or else from one whole `GET`
//! again, its first bytes (those already passed on) skipped. Wrong bytes in a well-formed piece
//! are the digest's to catch: the fill fails, and no client sees a clean end.

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

/// Objects at least this large are fetched in pieces, when the upstream offers ranges.
const THRESHOLD: u64 = 16 << 20;
/// Bytes per piece: each costs a round trip before its first byte, and each waiting for its turn
/// is held in memory; at 4 MiB the long fat path of bench/ gained 8% and peak RSS 16 MiB.
const PIECE: u64 = 2 << 20;
/// The longest a ranged request may keep the download waiting, for its head or its next bytes,
/// before it is given up (less if `--upstream-timeout` is less): the fill gives up after 60 s
/// without a byte, and the request that takes over must have its bytes flowing before then.
const PIECE_STALL: Duration = Duration::from_secs(20);
/// Frames queued between the pieces and the body's reader.
const QUEUE: usize = 8;

/// What holds the client that asks for the pieces (the proxy's shared state).
pub type Via = Arc<dyn AsRef<Client> + Send + Sync>;

/// Why a piece (or the first answer, up to its piece's end) could not be used.
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
}

impl Ranged {
    /// Keeps the head of `req`, before it is sent.
    pub fn of(req: &Request<Body>) -> Ranged {
        let mut again = Request::new(());
        *again.method_mut() = req.method().clone();
        *again.uri_mut() = req.uri().clone();
        *again.version_mut() = req.version();
        *again.headers_mut() = req.headers().clone();
        *again.extensions_mut() = req.extensions().clone();
        Ranged {
            head: again.into_parts().0,
        }
    }

    /// The body of `resp`, the upstream's answer to the request: fetched in pieces when it is a
    /// `GET` answered 200 with a length of at least [`THRESHOLD`] and `Accept-Ranges: bytes`,
    /// else as it comes.
    pub fn body(self, via: Via, resp: Response<Incoming>) -> Body {
        let parallel = (*via).as_ref().blob_connections() as u64;
        let Some(total) = self.worth_it(&resp).filter(|_| parallel > 1) else {
            return body::incoming(resp.into_body());
        };
        let (feed, out) = body::channel(QUEUE, Some(total));
        let first = body::incoming(resp.into_body());
        tokio::spawn(drive(self, via, first, (total, parallel), feed).in_current_span());
        out
    }

    /// The object's length, if it is worth fetching in pieces.
    fn worth_it(&self, resp: &Response<Incoming>) -> Option<u64> {
        let headers = resp.headers();
        let ranges = headers.get(header::ACCEPT_RANGES) == Some(&HeaderValue::from_static("bytes"));
        let total: u64 = headers
            .get(header::CONTENT_LENGTH)?
            .to_str()
            .ok()?
            .parse()
            .ok()?;
        let plain = !headers.contains_key(header::CONTENT_ENCODING);
        let whole = self.head.method == Method::GET && resp.status() == StatusCode::OK;
        (ranges && plain && whole && total >= THRESHOLD).then_some(total)
    }

    /// The request again, for `bytes` (`None`: the whole object).
    fn request(&self, bytes: Option<(u64, u64)>) -> Request<Body> {
        let mut req = Request::from_parts(self.head.clone(), body::empty());
        if let Some((start, end)) = bytes {
            let range = format!("bytes={start}-{}", end - 1);
            if let Ok(v) = HeaderValue::try_from(range) {
                req.headers_mut().insert(header::RANGE, v);
            }
        }
        req
    }
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
    loop {
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
            frame = source.next(end - sent) => match frame {
                Some(Ok(data)) => {
                    let n = data.len() as u64;
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
                    // The next piece was asked for when there was room, in order: it is in front.
                    let Some(piece) = ahead.pop_front() else {
                        let e = PieceError::Length { got: sent, want: total };
                        return Err(Stop::Broken(sent, e));
                    };
                    end = piece.end;
                    source = Source::Piece(piece);
                }
            },
        }
    }
}

/// Where the bytes in front come from: the first answer (read up to its piece's end, then
/// dropped with its connection), or a piece fetched ahead.
enum Source {
    First(Body),
    Piece(Piece),
}

impl Source {
    /// The next bytes, at most `left`; `None` once the source is spent, or the first answer
    /// has given its piece (`left` is 0).
    async fn next(&mut self, left: u64) -> Option<Result<Bytes, PieceError>> {
        match self {
            Source::First(_) if left == 0 => None,
            Source::First(body) => loop {
                match body.frame().await? {
                    Ok(frame) => {
                        let Ok(mut data) = frame.into_data() else {
                            continue;
                        };
                        if data.len() as u64 > left {
                            data.truncate(left as usize);
                        }
                        return Some(Ok(data));
                    }
                    Err(e) => return Some(Err(PieceError::Body(e))),
                }
            },
            // Read to its end even when all its bytes are in: `fetch` may yet find that the
            // answer goes on past the range, and then the piece is not what was asked for.
            Source::Piece(piece) => piece.rx.recv().await,
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
    loop {
        let Ok(frame) = tokio::time::timeout(stall, body.frame()).await else {
            return Err(PieceError::Stalled(stall));
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| PieceError::Body(e.into()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
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
            Ok(resp) => return pass_on(resp, (0, total - from), feed).await,
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
    pass_on(resp, (from, total), feed).await
}

/// Passes `resp`'s body on to `feed`, but for its first `skip` bytes (those went out already);
/// it must have exactly `length` bytes. `Ok(false)` if the reader left.
async fn pass_on(
    resp: Response<Incoming>,
    (skip, length): (u64, u64),
    feed: &Feed,
) -> Result<bool, PieceError> {
    let mut body = resp.into_body();
    let mut at = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| PieceError::Body(e.into()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
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
