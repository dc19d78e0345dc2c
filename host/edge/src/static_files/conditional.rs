//! Validators and conditional requests (RFC 9110 §8.8, §13).

use std::time::{SystemTime, UNIX_EPOCH};

use super::encoding::Encoding;

/// A strong ETag for one variant of one file version: `"<len>-<mtime ns>"`
/// in hex, plus the coding. Size and mtime change whenever an editor or a
/// deploy rewrites the file, and need no read of the content.
pub(crate) fn etag(len: u64, modified: Option<SystemTime>, encoding: Encoding) -> String {
    let nanos = modified
        .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("\"{len:x}-{nanos:x}{}\"", encoding.etag_suffix())
}

/// Entity tags in an `If-None-Match` / `If-Match` list.
enum TagList<'a> {
    Any,
    Tags(Vec<EntityTag<'a>>),
}

struct EntityTag<'a> {
    weak: bool,
    /// The opaque tag, quotes included.
    opaque: &'a str,
}

/// Parses `*` or `1#entity-tag`. Tags may legally contain commas, so this
/// walks quotes instead of splitting. Anything unreadable ends the list: a
/// garbled tag can never match, and stopping keeps us from misreading the
/// rest.
fn parse_tags(value: &str) -> TagList<'_> {
    if value.trim() == "*" {
        return TagList::Any;
    }
    let mut tags = Vec::new();
    let mut rest = value;
    loop {
        rest = rest.trim_start_matches([' ', '\t', ',']);
        if rest.is_empty() {
            break;
        }
        let (weak, after) = match rest.strip_prefix("W/") {
            Some(after) => (true, after),
            None => (false, rest),
        };
        if !after.starts_with('"') {
            break;
        }
        let Some(close) = after[1..].find('"') else {
            break;
        };
        let (opaque, tail) = after.split_at(close + 2);
        tags.push(EntityTag { weak, opaque });
        rest = tail;
    }
    TagList::Tags(tags)
}

/// `If-None-Match` uses the weak comparison: `W/"x"` matches `"x"`.
pub(crate) fn none_match_hits(if_none_match: &str, current: &str) -> bool {
    match parse_tags(if_none_match) {
        TagList::Any => true,
        TagList::Tags(tags) => tags.iter().any(|t| t.opaque == current),
    }
}

/// `If-Modified-Since`: true when the file has not changed since the given
/// date. HTTP dates have whole seconds, so the mtime is truncated to match.
/// An unparsable date is ignored, as RFC 9110 §13.1.3 requires.
pub(crate) fn not_modified_since(if_modified_since: &str, modified: Option<SystemTime>) -> bool {
    let (Ok(since), Some(modified)) = (httpdate::parse_http_date(if_modified_since), modified)
    else {
        return false;
    };
    truncate_to_seconds(modified) <= since
}

/// `If-Range`: should the range be honoured? An entity-tag must match with
/// the strong comparison (weak tags never do); a date must equal the
/// `Last-Modified` we would send.
pub(crate) fn if_range_holds(
    if_range: &str,
    current_etag: &str,
    modified: Option<SystemTime>,
) -> bool {
    let value = if_range.trim();
    if value.starts_with('"') || value.starts_with("W/") {
        return match parse_tags(value) {
            TagList::Tags(tags) => {
                tags.len() == 1 && !tags[0].weak && tags[0].opaque == current_etag
            }
            TagList::Any => false,
        };
    }
    match (httpdate::parse_http_date(value), modified) {
        (Ok(date), Some(modified)) => truncate_to_seconds(modified) == date,
        _ => false,
    }
}

pub(crate) fn truncate_to_seconds(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => UNIX_EPOCH + std::time::Duration::from_secs(d.as_secs()),
        Err(_) => t,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn etags_are_strong_and_per_variant() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123);
        let plain = etag(1024, Some(t), Encoding::Identity);
        assert!(plain.starts_with('"') && plain.ends_with('"'));
        assert_ne!(plain, etag(1024, Some(t), Encoding::Brotli));
        assert_ne!(plain, etag(1024, Some(t), Encoding::Gzip));
        assert_ne!(
            plain,
            etag(1024, Some(t + Duration::from_nanos(1)), Encoding::Identity)
        );
        assert_ne!(plain, etag(1025, Some(t), Encoding::Identity));
    }

    #[test]
    fn if_none_match_lists() {
        let cur = "\"a-1\"";
        assert!(none_match_hits("\"a-1\"", cur));
        assert!(none_match_hits("W/\"a-1\"", cur));
        assert!(none_match_hits("\"x\", \"a-1\"", cur));
        assert!(none_match_hits("\"x,y\",W/\"a-1\"", cur));
        assert!(none_match_hits(" * ", cur));
        assert!(!none_match_hits("\"a-2\"", cur));
        assert!(!none_match_hits("a-1", cur));
        assert!(!none_match_hits("\"a-1", cur));
        assert!(!none_match_hits("", cur));
    }

    #[test]
    fn if_range_is_strong() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 999);
        let cur = "\"a-1\"";
        assert!(if_range_holds("\"a-1\"", cur, Some(t)));
        assert!(!if_range_holds("W/\"a-1\"", cur, Some(t)));
        assert!(!if_range_holds("\"a-2\"", cur, Some(t)));
        let date = httpdate::fmt_http_date(t);
        assert!(if_range_holds(&date, cur, Some(t)));
        let earlier = httpdate::fmt_http_date(t - Duration::from_secs(5));
        assert!(!if_range_holds(&earlier, cur, Some(t)));
        assert!(!if_range_holds("yesterday", cur, Some(t)));
    }

    #[test]
    fn if_modified_since_truncates() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 500_000_000);
        assert!(not_modified_since(&httpdate::fmt_http_date(t), Some(t)));
        let earlier = httpdate::fmt_http_date(t - Duration::from_secs(1));
        assert!(!not_modified_since(&earlier, Some(t)));
        assert!(!not_modified_since("garbage", Some(t)));
        assert!(!not_modified_since(&httpdate::fmt_http_date(t), None));
    }
}
