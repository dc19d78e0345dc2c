//! `Range: bytes=…` (RFC 9110 §14).

/// An inclusive byte range already clamped to the representation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ByteRange {
    pub start: u64,
    /// Inclusive, as in `Content-Range`.
    pub end: u64,
}

impl ByteRange {
    pub fn len(self) -> u64 {
        self.end - self.start + 1
    }

    pub fn content_range(self, total: u64) -> String {
        format!("bytes {}-{}/{total}", self.start, self.end)
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RangeOutcome {
    /// No usable `Range`: serve the whole representation with 200.
    Full,
    /// Well-formed but nothing in it overlaps the representation: 416.
    Unsatisfiable,
    /// Sorted, non-overlapping, non-empty.
    Ranges(Vec<ByteRange>),
}

/// More range-specs than this and the header is ignored (full 200), which
/// RFC 9110 §14.2 allows; thousands of tiny parts are an amplification trick,
/// not a download manager.
const MAX_RANGES: usize = 64;

/// Parses `Range` against a representation of `len` bytes. A header that is
/// malformed or names another unit is ignored, never an error (RFC 9110
/// §14.2). Overlapping or adjacent ranges are coalesced, which the RFC also
/// allows and which bounds the response to the file size plus part headers.
pub(crate) fn parse(header: &str, len: u64) -> RangeOutcome {
    let Some((unit, specs)) = header.split_once('=') else {
        return RangeOutcome::Full;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return RangeOutcome::Full;
    }
    let mut ranges = Vec::new();
    let mut count = 0;
    for spec in specs.split(',') {
        let spec = spec.trim();
        // Empty list elements are allowed by the `#rule` syntax.
        if spec.is_empty() {
            continue;
        }
        count += 1;
        if count > MAX_RANGES {
            return RangeOutcome::Full;
        }
        let Some(spec) = parse_spec(spec) else {
            return RangeOutcome::Full;
        };
        if let Some(range) = spec.clamp(len) {
            ranges.push(range);
        }
    }
    if count == 0 {
        return RangeOutcome::Full;
    }
    if ranges.is_empty() {
        return RangeOutcome::Unsatisfiable;
    }
    RangeOutcome::Ranges(coalesce(ranges))
}

enum Spec {
    /// `first-` or `first-last`.
    From { first: u64, last: Option<u64> },
    /// `-suffix`: the final `suffix` bytes.
    Suffix(u64),
}

impl Spec {
    fn clamp(&self, len: u64) -> Option<ByteRange> {
        match *self {
            Spec::From { first, last } => {
                if first >= len {
                    return None;
                }
                let end = last.map_or(len - 1, |l| l.min(len - 1));
                Some(ByteRange { start: first, end })
            }
            Spec::Suffix(0) => None,
            Spec::Suffix(n) => {
                if len == 0 {
                    return None;
                }
                Some(ByteRange {
                    start: len.saturating_sub(n),
                    end: len - 1,
                })
            }
        }
    }
}

fn parse_spec(spec: &str) -> Option<Spec> {
    let (first, last) = spec.split_once('-')?;
    if first.is_empty() {
        return Some(Spec::Suffix(digits(last)?));
    }
    let first = digits(first)?;
    let last = if last.is_empty() {
        None
    } else {
        Some(digits(last)?)
    };
    // `last < first` makes the whole header invalid, not just this spec.
    if last.is_some_and(|l| l < first) {
        return None;
    }
    Some(Spec::From { first, last })
}

/// `1*DIGIT`; `u64::from_str` alone would accept a leading `+`.
fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn coalesce(mut ranges: Vec<ByteRange>) -> Vec<ByteRange> {
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<ByteRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(prev) if r.start <= prev.end.saturating_add(1) => {
                prev.end = prev.end.max(r.end);
            }
            _ => merged.push(r),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, end: u64) -> ByteRange {
        ByteRange { start, end }
    }

    #[test]
    fn single_ranges() {
        assert_eq!(parse("bytes=0-9", 100), RangeOutcome::Ranges(vec![r(0, 9)]));
        assert_eq!(
            parse("bytes=90-", 100),
            RangeOutcome::Ranges(vec![r(90, 99)])
        );
        assert_eq!(
            parse("bytes=-10", 100),
            RangeOutcome::Ranges(vec![r(90, 99)])
        );
        assert_eq!(
            parse("bytes=-500", 100),
            RangeOutcome::Ranges(vec![r(0, 99)])
        );
        assert_eq!(
            parse("bytes=50-500", 100),
            RangeOutcome::Ranges(vec![r(50, 99)])
        );
        assert_eq!(
            parse("Bytes = 1-1", 100),
            RangeOutcome::Ranges(vec![r(1, 1)])
        );
    }

    #[test]
    fn multiple_ranges_coalesce() {
        assert_eq!(
            parse("bytes=0-1, 10-19", 100),
            RangeOutcome::Ranges(vec![r(0, 1), r(10, 19)])
        );
        assert_eq!(
            parse("bytes=10-19,0-4,5-9,,-5", 100),
            RangeOutcome::Ranges(vec![r(0, 19), r(95, 99)])
        );
        assert_eq!(
            parse("bytes=0-50,40-60,200-300", 100),
            RangeOutcome::Ranges(vec![r(0, 60)])
        );
    }

    #[test]
    fn unsatisfiable() {
        assert_eq!(parse("bytes=100-", 100), RangeOutcome::Unsatisfiable);
        assert_eq!(
            parse("bytes=100-200,300-", 100),
            RangeOutcome::Unsatisfiable
        );
        assert_eq!(parse("bytes=-0", 100), RangeOutcome::Unsatisfiable);
        assert_eq!(parse("bytes=0-", 0), RangeOutcome::Unsatisfiable);
        assert_eq!(parse("bytes=-5", 0), RangeOutcome::Unsatisfiable);
    }

    #[test]
    fn malformed_is_ignored() {
        for h in [
            "bytes",
            "bytes=",
            "bytes=abc",
            "bytes=5-1",
            "bytes=-",
            "bytes=1-2-3",
            "bytes=+1-2",
            "bytes=0-1,x",
            "items=0-1",
            "bytes=99999999999999999999999-",
        ] {
            assert_eq!(parse(h, 100), RangeOutcome::Full, "{h:?}");
        }
        let many = format!("bytes={}", vec!["0-0"; MAX_RANGES + 1].join(","));
        assert_eq!(parse(&many, 100), RangeOutcome::Full);
    }
}
