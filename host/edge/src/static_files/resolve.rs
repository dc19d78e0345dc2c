//! From a raw request path to file-system segments that cannot leave the
//! site root.
//!
//! The checks here are lexical and run before the file system is touched;
//! the symlink check (canonical path under the canonical root) happens in
//! `mod.rs` once the file has been found.

use std::path::{Component, Path};

use percent_encoding::percent_decode_str;

/// A request path that passed every lexical check.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct SitePath {
    /// Decoded, non-empty segments; never `.`, `..`, hidden, or containing
    /// a separator.
    pub segments: Vec<String>,
    /// The raw path ended in `/` (or was empty): a directory was asked for.
    pub trailing_slash: bool,
}

impl SitePath {
    /// Whether `raw` is this path's one plain spelling: no percent escapes,
    /// dot segments or doubled slashes. Only that spelling is kept
    /// prepared, so that a client cannot fill the hot cache (and evict
    /// everyone else's files) with spellings of one file.
    pub fn is_plain_spelling(&self, raw: &str) -> bool {
        let body = if self.trailing_slash {
            match raw.strip_suffix('/') {
                Some(body) => body,
                None => return raw.is_empty() && self.segments.is_empty(),
            }
        } else {
            raw
        };
        if self.segments.is_empty() {
            return body.is_empty();
        }
        body.split('/').eq(self.segments.iter().map(String::as_str))
    }
}

/// Why a request path was refused before touching the disk.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PathError {
    /// Malformed or hostile: answered 400 `bad_path`.
    Bad(&'static str),
    /// A segment starting with `.`: answered 404 so that dotfiles such as
    /// `.git/` or `.env` are indistinguishable from absent files.
    Hidden,
}

/// Decodes `raw` (percent-encoded, site prefix and leading `/` removed)
/// exactly once and checks it.
pub(crate) fn decode(raw: &str) -> Result<SitePath, PathError> {
    check_escapes(raw)?;
    let bytes: Vec<u8> = percent_decode_str(raw).collect();
    let decoded =
        String::from_utf8(bytes).map_err(|_| PathError::Bad("path is not valid UTF-8"))?;

    if decoded.contains('\0') {
        return Err(PathError::Bad("path contains NUL"));
    }
    if decoded.contains('\\') {
        // Windows separators have no business in a URL path, and some
        // file-system layers would honour them.
        return Err(PathError::Bad("path contains a backslash"));
    }
    if decoded.starts_with('/') {
        // `%2f`-smuggled absolute path: `Path::join` would discard the root.
        return Err(PathError::Bad("path is absolute after decoding"));
    }
    if contains_encoded_separator_or_dot(&decoded) {
        // Decoding once still left an escape for `.`, `/` or `\`: the client
        // encoded twice, hoping a later layer decodes again.
        return Err(PathError::Bad("path is encoded more than once"));
    }

    let mut segments = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            // Repeated slashes collapse, as in most servers; the leading one
            // was refused above.
            "" => continue,
            "." | ".." => return Err(PathError::Bad("path contains a dot segment")),
            s if s.starts_with('.') => return Err(PathError::Hidden),
            s => segments.push(s.to_owned()),
        }
    }
    // Belt and braces: whatever the string checks missed, the joined path
    // must consist of plain names only.
    let joined = segments.join("/");
    if !Path::new(&joined)
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(PathError::Bad("path does not name a file under the site"));
    }

    Ok(SitePath {
        segments,
        trailing_slash: raw.is_empty() || raw.ends_with('/'),
    })
}

/// Refuses escapes that are malformed (`%zz`, a lone `%`) and encoded
/// separators (`%2f`, `%5c`): an encoded `/` would turn one segment into two
/// after the router matched on the raw path, and has no legitimate use in a
/// file name.
fn check_escapes(raw: &str) -> Result<(), PathError> {
    let bytes = raw.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let (Some(&hi), Some(&lo)) = (bytes.get(i + 1), bytes.get(i + 2)) else {
                return Err(PathError::Bad("truncated percent escape"));
            };
            if !hi.is_ascii_hexdigit() || !lo.is_ascii_hexdigit() {
                return Err(PathError::Bad("malformed percent escape"));
            }
            let escaped = [hi.to_ascii_lowercase(), lo.to_ascii_lowercase()];
            if &escaped == b"2f" || &escaped == b"5c" {
                return Err(PathError::Bad("path contains an encoded separator"));
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    Ok(())
}

fn contains_encoded_separator_or_dot(decoded: &str) -> bool {
    let lower = decoded.to_ascii_lowercase();
    ["%2e", "%2f", "%5c"].iter().any(|e| lower.contains(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> SitePath {
        decode(raw).unwrap_or_else(|e| panic!("{raw:?} refused: {e:?}"))
    }

    #[test]
    fn plain_paths_decode() {
        let p = ok("assets/hello%20world.css");
        assert_eq!(p.segments, ["assets", "hello world.css"]);
        assert!(!p.trailing_slash);
        assert!(ok("").trailing_slash);
        assert!(ok("docs/").trailing_slash);
        assert_eq!(ok("a//b").segments, ["a", "b"]);
        // A single encoded dot inside a name is just a dot.
        assert_eq!(ok("file%2etxt").segments, ["file.txt"]);
        assert_eq!(ok("100%25.txt").segments, ["100%.txt"]);
        assert_eq!(ok("caf%C3%A9.txt").segments, ["café.txt"]);
    }

    #[test]
    fn hostile_paths_are_refused() {
        for raw in [
            "..",
            "../x",
            "%2e%2e/x",
            "%2E%2E/x",
            ".%2e/x",
            "%2e%2e%2fx",
            "..%2fx",
            "..%5cx",
            "%252e%252e/x",
            "%252f",
            "%255c",
            "..\\x",
            "a\\b",
            "%c0%ae%c0%ae/x",
            "assets/../../x",
            "./x",
            "%00",
            "a%00.txt",
            "%2fetc/passwd",
            "/etc/passwd",
            "%",
            "%4",
            "%zz",
        ] {
            assert!(
                matches!(decode(raw), Err(PathError::Bad(_))),
                "{raw:?} gave {:?}",
                decode(raw)
            );
        }
    }

    #[test]
    fn hidden_segments_are_not_found() {
        for raw in [".env", ".git/config", "a/.hidden/b", "%2egit/config"] {
            assert_eq!(decode(raw), Err(PathError::Hidden), "{raw:?}");
        }
    }
}
