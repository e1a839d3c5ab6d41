//! The `Range` request header (RFC 9110 §14), as far as a package server
//! needs it: one byte range; and the `Content-Range` answer header, as far
//! as a package client needs it.
//!
//! Clients of packages ask for one range at a time (a header, a table, a
//! chunk), so several ranges in one request (a multipart answer) are not
//! supported: such a request, like one with another unit or bad syntax, gets
//! the whole file, which RFC 9110 allows ("a server MAY ignore the Range
//! header field").
//!
//! Both parse what a peer sent, so they are fuzzed (`fuzz/`, target
//! `http_range`): they are public for that, and for tests.

/// What to send for a request, given its `Range` header and the file length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// The whole file (200).
    Full,
    /// Bytes `first..=last` (206); `last < len`.
    Partial {
        /// First byte sent.
        first: u64,
        /// Last byte sent.
        last: u64,
    },
    /// No byte of the file is in the range (416).
    Unsatisfiable,
}

/// Decides what a request with `Range: header` gets from a file of `len`
/// bytes.
pub fn parse(header: Option<&str>, len: u64) -> RangeRequest {
    let Some(header) = header else {
        return RangeRequest::Full;
    };
    let header = header.trim();
    // The unit is case-insensitive.
    let Some(spec) = header
        .get(..6)
        .filter(|unit| unit.eq_ignore_ascii_case("bytes="))
        .map(|_| header[6..].trim())
    else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return RangeRequest::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    match (number(first), number(last)) {
        // "-n": the last n bytes.
        (None, Some(n)) if first.is_empty() => {
            if n == 0 || len == 0 {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Partial {
                    first: len - n.min(len),
                    last: len - 1,
                }
            }
        }
        // "a-": from a to the end.
        (Some(a), None) if last.is_empty() => {
            if a >= len {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Partial {
                    first: a,
                    last: len - 1,
                }
            }
        }
        // "a-b": a last byte before the first is invalid, so ignored.
        (Some(a), Some(b)) if a <= b => {
            if a >= len {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Partial {
                    first: a,
                    last: b.min(len - 1),
                }
            }
        }
        _ => RangeRequest::Full,
    }
}

/// Parses `Content-Range: bytes FIRST-LAST/TOTAL` (a 206's): the three
/// numbers, or `None` unless `FIRST <= LAST < TOTAL`.
pub fn parse_content_range(value: &str) -> Option<(u64, u64, u64)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let (first, last, total) = (
        first.trim().parse().ok()?,
        last.trim().parse().ok()?,
        total.trim().parse().ok()?,
    );
    (first <= last && last < total).then_some((first, last, total))
}

/// Parses `Content-Range: bytes */LEN` (a 416's): the file's length.
pub fn parse_unsatisfied(value: &str) -> Option<u64> {
    value.trim().strip_prefix("bytes */")?.trim().parse().ok()
}

/// A decimal number of one or more digits; numbers past `u64::MAX` saturate
/// (they are still past the end of any file).
fn number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.bytes().fold(0u64, |n, d| {
        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    }))
}

#[cfg(test)]
mod tests {
    use super::RangeRequest::{Full, Partial, Unsatisfiable};
    use super::*;

    #[test]
    fn single_ranges() {
        let p = |first, last| Partial { first, last };
        assert_eq!(parse(None, 100), Full);
        assert_eq!(parse(Some("bytes=0-9"), 100), p(0, 9));
        assert_eq!(parse(Some("bytes=90-200"), 100), p(90, 99));
        assert_eq!(parse(Some("bytes=90-"), 100), p(90, 99));
        assert_eq!(parse(Some("bytes=-10"), 100), p(90, 99));
        assert_eq!(parse(Some("bytes=-1000"), 100), p(0, 99));
        assert_eq!(parse(Some("Bytes= 5-5 "), 100), p(5, 5));
        assert_eq!(
            parse(Some("bytes=1-99999999999999999999999999"), 100),
            p(1, 99)
        );
        assert_eq!(parse(Some("bytes=-99999999999999999999999"), 100), p(0, 99));
    }

    #[test]
    fn unsatisfiable_ranges() {
        assert_eq!(parse(Some("bytes=100-"), 100), Unsatisfiable);
        assert_eq!(parse(Some("bytes=100-200"), 100), Unsatisfiable);
        assert_eq!(parse(Some("bytes=-0"), 100), Unsatisfiable);
        assert_eq!(parse(Some("bytes=0-"), 0), Unsatisfiable);
        assert_eq!(parse(Some("bytes=-5"), 0), Unsatisfiable);
        assert_eq!(
            parse(Some("bytes=99999999999999999999999-"), 100),
            Unsatisfiable
        );
    }

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range("bytes 0-9/100"), Some((0, 9, 100)));
        assert_eq!(parse_content_range("bytes 9-0/100"), None);
        assert_eq!(parse_content_range("bytes 0-100/100"), None);
        assert_eq!(parse_content_range("bytes */100"), None);
        assert_eq!(parse_content_range("0-9/100"), None);
        assert_eq!(parse_unsatisfied("bytes */100"), Some(100));
        assert_eq!(parse_unsatisfied(" bytes */ 7 "), Some(7));
        assert_eq!(parse_unsatisfied("bytes 0-1/100"), None);
    }

    #[test]
    fn ignored_ranges() {
        for h in [
            "bytes=5-4",
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes=",
            "bytes=-",
            "bytes=a-b",
            "bytes=1",
            "bytes=+1-2",
            "bytes=1--2",
            "byte=0-1",
            "",
        ] {
            assert_eq!(parse(Some(h), 100), Full, "{h:?}");
        }
    }
}
