//! An upstream object streamed to a client without the cache, verified on the way: the last
//! chunk is held back until the size and digest check out, so that a corrupt object never ends
//! cleanly.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::body::{Body, BoxError};

/// An upstream object's body that is hashed as it streams, with its last chunk held back until
/// the size and digest check out: a mismatch ends the stream with an error, never cleanly.
pub struct Verified {
    inner: Body,
    digest: super::Digest,
    hasher: Option<super::digest::Hasher>,
    want: Option<u64>,
    seen: u64,
    held: Option<Bytes>,
    on_verified: Option<Box<dyn FnOnce() + Send>>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

/// Wraps `inner`, which must be the whole object `digest` (`length` bytes when announced);
/// `on_verified` runs once the bytes proved to be it.
pub fn verified(
    inner: Body,
    digest: super::Digest,
    length: Option<u64>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    on_verified: impl FnOnce() + Send + 'static,
) -> Body {
    Verified {
        hasher: Some(digest.hasher()),
        inner,
        digest,
        want: length,
        seen: 0,
        held: None,
        on_verified: Some(Box::new(on_verified)),
        metrics,
    }
    .boxed_unsync()
}

impl Verified {
    /// At the end of the upstream body: `Ok` when the bytes are the object.
    fn check(&mut self) -> Result<(), BoxError> {
        let Some(hasher) = self.hasher.take() else {
            return Ok(());
        };
        if self.want.is_some_and(|w| w != self.seen) {
            let want = self.want.unwrap_or_default();
            return Err(format!("upstream sent {} of {want} bytes", self.seen).into());
        }
        if !hasher.matches(&self.digest) {
            let reason = format!(
                "the {} bytes received do not hash to {}",
                self.seen, self.digest
            );
            tracing::warn!(digest = %self.digest, "{reason}");
            return Err(reason.into());
        }
        if let Some(f) = self.on_verified.take() {
            f();
        }
        Ok(())
    }
}

impl HttpBody for Verified {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.hasher.is_none() {
                // Verified: only the held chunk is left.
                return Poll::Ready(this.held.take().map(|d| Ok(Frame::data(d))));
            }
            let polled = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
            match polled {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    if let Some(h) = this.hasher.as_mut() {
                        h.update(&data);
                    }
                    let n = data.len() as u64;
                    this.seen += n;
                    this.metrics
                        .bytes_from_upstream
                        .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    if let Some(previous) = this.held.replace(data) {
                        return Poll::Ready(Some(Ok(Frame::data(previous))));
                    }
                }
                Some(Err(e)) => {
                    this.hasher = None;
                    this.held = None;
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    if let Err(e) = this.check() {
                        this.held = None;
                        return Poll::Ready(Some(Err(e)));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.hasher.is_none() && self.held.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.want {
            Some(w) => SizeHint::with_exact(
                w.saturating_sub(self.seen) + self.held.as_ref().map_or(0, |h| h.len() as u64),
            ),
            None => SizeHint::default(),
        }
    }
}
