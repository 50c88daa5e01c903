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

    use proptest::prelude::*;

    /// What RFC 9110 says a single range means for a known `total`, computed in wider integers.
    fn model(r: ByteRange, total: u64) -> Slice {
        let t = u128::from(total);
        match r {
            ByteRange::From(first, last) => {
                let first = u128::from(first);
                if first >= t {
                    return Slice::Unsatisfiable;
                }
                let end = last.map_or(t, |l| (u128::from(l) + 1).min(t));
                Slice::Part(first as u64, end as u64)
            }
            ByteRange::Suffix(n) if n == 0 || total == 0 => Slice::Unsatisfiable,
            ByteRange::Suffix(n) => Slice::Part(t.saturating_sub(u128::from(n)) as u64, total),
        }
    }

    /// Numbers around the edges that matter: small, near a total, near and past `u64::MAX`.
    fn number() -> impl Strategy<Value = String> {
        prop_oneof![
            (0u64..300).prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            (0u64..3).prop_map(|d| (u64::MAX - d).to_string()),
            "[0-9]{20,30}",
            Just(String::new()),
        ]
    }

    fn total() -> impl Strategy<Value = u64> {
        prop_oneof![0u64..300, any::<u64>(), Just(u64::MAX)]
    }

    /// Values a client can put in a `Range` header (a `HeaderValue` takes visible bytes and tabs).
    fn header_value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(prop_oneof![Just(b'\t'), 0x20u8..0x7f, 0x80u8..=0xff], 0..40),
            (
                prop::sample::select(vec!["bytes=", "bytes =", "Bytes=", "items=", "bytes=-", ""]),
                number(),
                prop::sample::select(vec!["-", " - ", "--", ",", "-,", ""]),
                number(),
                prop::sample::select(vec!["", ",0-1", " ", ",", "-"]),
            )
                .prop_map(
                    |(unit, a, dash, b, tail)| format!("{unit}{a}{dash}{b}{tail}").into_bytes()
                ),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Never panics; with a known total a part is inside the object and not empty, and it is
        /// exactly the RFC's answer.
        #[test]
        fn any_header_slices_inside_the_object(value in header_value(), total in total()) {
            let mut h = HeaderMap::new();
            let Ok(value) = http::HeaderValue::from_bytes(&value) else {
                return Ok(());
            };
            h.insert(header::RANGE, value);
            let Some(r) = ByteRange::from_headers(&h) else {
                return Ok(());
            };
            if let ByteRange::From(start, Some(end)) = r {
                prop_assert!(start <= end);
            }
            let slice = r.slice(Some(total));
            if let Slice::Part(s, e) = slice {
                prop_assert!(s < e && e <= total, "{:?} of {} gave {:?}", r, total, slice);
            }
            prop_assert_eq!(slice, model(r, total));
            match r.slice(None) {
                Slice::Part(s, e) => prop_assert!(s < e),
                Slice::Whole => {}
                Slice::Unsatisfiable => prop_assert!(false, "{:?} unsatisfiable without a size", r),
            }
        }

        /// The same for ranges that parse, with numbers and totals that meet often.
        #[test]
        fn parsed_ranges_slice_inside_the_object(
            a in prop_oneof![0u64..300, any::<u64>()],
            b in prop_oneof![0u64..300, any::<u64>()],
            form in 0..3,
            total in total(),
        ) {
            let (first, last) = (a.min(b), a.max(b));
            let spec = match form {
                0 => format!("bytes={first}-{last}"),
                1 => format!("bytes={first}-"),
                _ => format!("bytes=-{a}"),
            };
            let r = range(&spec).unwrap();
            let slice = r.slice(Some(total));
            if let Slice::Part(s, e) = slice {
                prop_assert!(s < e && e <= total, "{} of {} gave {:?}", spec, total, slice);
            }
            prop_assert_eq!(slice, model(r, total), "{} of {}", spec, total);
        }

        #[test]
        fn generated_ranges_parse_to_what_they_say(a in any::<u64>(), b in any::<u64>(), total in total()) {
            let (first, last) = (a.min(b), a.max(b));
            prop_assert_eq!(range(&format!("bytes={first}-{last}")), Some(ByteRange::From(first, Some(last))));
            prop_assert_eq!(range(&format!("bytes={first}-")), Some(ByteRange::From(first, None)));
            prop_assert_eq!(range(&format!("bytes=-{a}")), Some(ByteRange::Suffix(a)));
            if first < last {
                prop_assert_eq!(range(&format!("bytes={last}-{first}")), None);
            }
            // Suffix: the last n bytes, all of them when n is larger than the object.
            let suffix = ByteRange::Suffix(a).slice(Some(total));
            if a > 0 && total > 0 {
                prop_assert_eq!(suffix, Slice::Part(total - a.min(total), total));
            } else {
                prop_assert_eq!(suffix, Slice::Unsatisfiable);
            }
        }

        /// Numbers past `u64::MAX` are not parsed (the object is then served whole, as RFC 9110
        /// allows): never wrapped into a small number.
        #[test]
        fn huge_numbers_are_refused(big in "[1-9][0-9]{20,40}", small in 0u64..1000) {
            prop_assert_eq!(range(&format!("bytes={big}-")), None);
            prop_assert_eq!(range(&format!("bytes={small}-{big}")), None);
            prop_assert_eq!(range(&format!("bytes=-{big}")), None);
        }
    }
}
