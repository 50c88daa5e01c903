//! `Range: bytes=…` for cached and in-flight objects (one range; anything else is served whole,
//! which RFC 9110 allows).

use http::header::{self, HeaderMap};

/// A single byte range as the client asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `bytes=a-` or `bytes=a-b` (inclusive end).
    From(u64, Option<u64>),
    /// `bytes=-n`: the last `n` bytes.
    Suffix(u64),
}

/// What to send for a request given the object's total size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slice {
    /// The whole object, `200`.
    Whole,
    /// `start..end` (end exclusive), `206`.
    Part(u64, u64),
    /// Nothing of it can be satisfied, `416`.
    Unsatisfiable,
}

impl ByteRange {
    /// The client's single range, if it sent one this module understands.
    pub fn from_headers(headers: &HeaderMap) -> Option<ByteRange> {
        let v = headers.get(header::RANGE)?.to_str().ok()?.trim();
        let spec = v.strip_prefix("bytes=")?;
        if spec.contains(',') {
            return None;
        }
        let (a, b) = spec.split_once('-')?;
        let (a, b) = (a.trim(), b.trim());
        if a.is_empty() {
            return b.parse().ok().map(ByteRange::Suffix);
        }
        let start = a.parse().ok()?;
        let end = if b.is_empty() {
            None
        } else {
            Some(b.parse().ok()?)
        };
        if end.is_some_and(|e| e < start) {
            return None;
        }
        Some(ByteRange::From(start, end))
    }

    /// Resolves the range against `total` (unknown while a download without a length runs).
    pub fn slice(self, total: Option<u64>) -> Slice {
        match (self, total) {
            (ByteRange::From(start, end), Some(t)) if start < t => {
                let end = end.and_then(|e| e.checked_add(1)).map_or(t, |e| e.min(t));
                Slice::Part(start, end)
            }
            (ByteRange::From(..), Some(_)) => Slice::Unsatisfiable,
            (ByteRange::From(start, Some(end)), None) => match end.checked_add(1) {
                Some(e) => Slice::Part(start, e),
                None => Slice::Whole,
            },
            (ByteRange::Suffix(n), Some(t)) if n > 0 && t > 0 => {
                Slice::Part(t.saturating_sub(n), t)
            }
            (ByteRange::Suffix(_), Some(_)) => Slice::Unsatisfiable,
            // Without a known size, an open range is served whole.
            _ => Slice::Whole,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(v: &str) -> Option<ByteRange> {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, v.parse().unwrap());
        ByteRange::from_headers(&h)
    }

    #[test]
    fn parses_and_slices() {
        assert_eq!(
            range("bytes=0-9").unwrap().slice(Some(100)),
            Slice::Part(0, 10)
        );
        assert_eq!(
            range("bytes=90-").unwrap().slice(Some(100)),
            Slice::Part(90, 100)
        );
        assert_eq!(
            range("bytes=-10").unwrap().slice(Some(100)),
            Slice::Part(90, 100)
        );
        assert_eq!(
            range("bytes=50-500").unwrap().slice(Some(100)),
            Slice::Part(50, 100)
        );
        assert_eq!(
            range("bytes=100-").unwrap().slice(Some(100)),
            Slice::Unsatisfiable
        );
        assert_eq!(range("bytes=5-").unwrap().slice(None), Slice::Whole);
        assert_eq!(range("bytes=0-1,4-5"), None);
        let huge = format!("bytes=5-{}", u64::MAX);
        assert_eq!(range(&huge).unwrap().slice(Some(100)), Slice::Part(5, 100));
        assert_eq!(range(&huge).unwrap().slice(None), Slice::Whole);
        assert_eq!(
            range("bytes=-5").unwrap().slice(Some(0)),
            Slice::Unsatisfiable
        );
        assert_eq!(range("bytes=9-1"), None);
        assert_eq!(range("items=0-1"), None);
    }
}
