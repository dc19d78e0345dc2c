//! Static sites served from the node's own disk, the way a CDN edge serves
//! them: validators and `304`s, byte ranges, precompressed `.br`/`.gz`
//! siblings, per-path `Cache-Control`, and small files answered from memory.
//!
//! A request path goes through three gates before any byte is read:
//! lexical checks on the decoded path ([`resolve`]), the file system's own
//! answer (missing, directory, not a regular file), and a canonical-path
//! check that refuses anything — typically a symlink — resolving outside
//! the canonical site root.
//!
//! Choices the configuration leaves open:
//! - `cache_control` globs are matched against the decoded path of the file
//!   actually served, relative to the root (`docs/` matches as
//!   `docs/index.html`), with `literal_separator`: `*` and `?` stop at `/`,
//!   `**` crosses it. So `*.css` only matches top-level files, `**/*.css`
//!   matches at any depth, and `assets/**` matches `assets/a/b.css`.
//! - A directory asked for without its trailing slash is redirected with a
//!   relative `Location` (`docs` → `docs/`), which resolves against the full
//!   request URL, whatever prefix the site is mounted at. The query string
//!   is not carried over: this module never sees it.
//! - The empty path (`/` under the prefix, or the bare prefix) serves the
//!   index directly.

pub(crate) mod conditional;
mod encoding;
pub(crate) mod range;
mod resolve;

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{self, SeekFrom};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Body;
use bytes::Bytes;
use edge_config::SiteConfig;
use globset::{GlobBuilder, GlobMatcher};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use tokio::fs::File;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::error::error_response;
use encoding::Encoding;
use range::{ByteRange, RangeOutcome};
use resolve::{PathError, SitePath};

/// Chunk size for files streamed from disk: large enough that the blocking
/// pool hop per read is amortised, small enough to keep per-connection
/// memory flat.
const STREAM_CHUNK: usize = 64 * 1024;

/// One configured site, ready to answer requests.
pub struct StaticSite {
    name: String,
    /// Canonical (symlinks resolved), so that `starts_with` on canonical
    /// file paths is a real containment test.
    root: Arc<Path>,
    index: Arc<str>,
    cache_control: Vec<(GlobMatcher, HeaderValue)>,
    hot_file_max_bytes: u64,
    /// `None` when the configuration gives it no memory.
    hot: Option<moka::sync::Cache<HotKey, HotEntry>>,
}

/// A configuration the node cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum StaticSiteError {
    #[error("site `{site}`: root {} cannot be opened: {source}", path.display())]
    Root {
        site: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("site `{site}`: root {} is not a directory", path.display())]
    RootNotDirectory { site: String, path: PathBuf },
    #[error("site `{site}`: index `{index}` must be a plain file name, not a path or a dotfile")]
    Index { site: String, index: String },
    #[error("site `{site}`: cache-control pattern `{pattern}` is not a glob: {source}")]
    Pattern {
        site: String,
        pattern: String,
        #[source]
        source: globset::Error,
    },
    #[error("site `{site}`: cache-control value for `{pattern}` is not a valid header value")]
    CacheControlValue { site: String, pattern: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct HotKey {
    path: PathBuf,
    encoding: Encoding,
}

/// A small file's bytes with the metadata they were read under; a request
/// only uses them while the file on disk still has that length and mtime.
#[derive(Clone)]
struct HotEntry {
    len: u64,
    modified: Option<SystemTime>,
    bytes: Bytes,
}

/// What a request path names on disk.
enum Located {
    File(Box<Opened>),
    /// A directory asked for without the trailing slash.
    Directory,
    NotFound,
}

/// The variant chosen for a request, opened.
struct Opened {
    /// Decoded path inside the site of the original (identity) file, index
    /// included: what `Cache-Control` globs and the MIME guess look at.
    relative: String,
    /// A `.br` or `.gz` sibling exists, so responses vary by coding.
    has_siblings: bool,
    encoding: Encoding,
    /// Canonical path of the opened variant: the hot-cache key.
    path: PathBuf,
    file: std::fs::File,
    /// Taken from the open handle, so headers and bytes describe the same
    /// file even if the path is replaced mid-request.
    meta: std::fs::Metadata,
}

/// What the body of a 200/206 is made of, in order.
enum Piece {
    Bytes(Bytes),
    /// A span of the opened file.
    File {
        start: u64,
        len: u64,
    },
}

impl Piece {
    fn len(&self) -> u64 {
        match self {
            Piece::Bytes(b) => b.len() as u64,
            Piece::File { len, .. } => *len,
        }
    }
}

impl StaticSite {
    /// Built once at node start from the validated config.
    pub fn new(config: &SiteConfig) -> Result<Self, StaticSiteError> {
        let site = || config.name.clone();
        let root = std::fs::canonicalize(&config.root).map_err(|source| StaticSiteError::Root {
            site: site(),
            path: config.root.clone(),
            source,
        })?;
        if !root.is_dir() {
            return Err(StaticSiteError::RootNotDirectory {
                site: site(),
                path: config.root.clone(),
            });
        }
        if !is_plain_name(&config.index) {
            return Err(StaticSiteError::Index {
                site: site(),
                index: config.index.clone(),
            });
        }
        let cache_control = config
            .cache_control
            .iter()
            .map(|rule| {
                let glob = GlobBuilder::new(&rule.pattern)
                    .literal_separator(true)
                    .build()
                    .map_err(|source| StaticSiteError::Pattern {
                        site: site(),
                        pattern: rule.pattern.clone(),
                        source,
                    })?;
                let value = HeaderValue::from_str(&rule.value).map_err(|_| {
                    StaticSiteError::CacheControlValue {
                        site: site(),
                        pattern: rule.pattern.clone(),
                    }
                })?;
                Ok((glob.compile_matcher(), value))
            })
            .collect::<Result<Vec<_>, StaticSiteError>>()?;
        let hot = (config.hot_cache_bytes > 0 && config.hot_file_max_bytes > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(config.hot_cache_bytes)
                .weigher(|key: &HotKey, entry: &HotEntry| {
                    let weight = entry.bytes.len() + key.path.as_os_str().len();
                    u32::try_from(weight).unwrap_or(u32::MAX)
                })
                .build()
        });
        Ok(Self {
            name: config.name.clone(),
            root: root.into(),
            index: config.index.as_str().into(),
            cache_control,
            hot_file_max_bytes: config.hot_file_max_bytes,
            hot,
        })
    }

    /// Answers one request. `path_in_site` is the raw (percent-encoded)
    /// request path with the site prefix and the leading `/` removed, and no
    /// query string.
    pub async fn serve(
        &self,
        method: &Method,
        headers: &HeaderMap,
        path_in_site: &str,
    ) -> Response<Body> {
        let head = match *method {
            Method::GET => false,
            Method::HEAD => true,
            _ => return method_not_allowed(),
        };
        let site_path = match resolve::decode(path_in_site) {
            Ok(p) => p,
            Err(PathError::Bad(reason)) => {
                tracing::debug!(site = %self.name, path = path_in_site, reason, "static path refused");
                return error_response(StatusCode::BAD_REQUEST, "bad_path", reason);
            }
            Err(PathError::Hidden) => return not_found(),
        };
        let accept = header_str(headers, &header::ACCEPT_ENCODING);
        // The lookup runs inline on the worker, as nginx does in its event
        // loop: a site root is local disk, whose metadata calls on cached
        // dentries take microseconds, while a blocking-pool hop per request
        // cost more than half of the small-file throughput (bench/static.sh).
        match locate(&self.root, &self.index, &site_path, accept) {
            Located::File(opened) => self.respond(opened, head, headers).await,
            Located::Directory => redirect_to_directory(path_in_site),
            Located::NotFound => not_found(),
        }
    }

    async fn respond(
        &self,
        opened: Box<Opened>,
        head: bool,
        headers: &HeaderMap,
    ) -> Response<Body> {
        let Opened {
            relative,
            has_siblings,
            encoding,
            path,
            file,
            meta,
        } = *opened;
        let mut file = File::from_std(file);
        let len = meta.len();
        let modified = meta.modified().ok();
        let etag = conditional::etag(len, modified, encoding);

        let mut validators = HeaderMap::new();
        insert(&mut validators, header::ETAG, &etag);
        if let Some(m) = modified {
            insert(
                &mut validators,
                header::LAST_MODIFIED,
                &httpdate::fmt_http_date(m),
            );
        }
        if let Some(value) = self.cache_control_for(&relative) {
            validators.insert(header::CACHE_CONTROL, value.clone());
        }
        if has_siblings {
            // Caches must key on Accept-Encoding even for the identity
            // response, or they would hand it to a br client (or vice versa).
            validators.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
        }

        if is_not_modified(headers, &etag, modified) {
            let mut response = Response::new(Body::empty());
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            *response.headers_mut() = validators;
            return response;
        }

        let content_type = content_type(&relative);
        let mut response_headers = validators;
        response_headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        response_headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        if let Some(coding) = encoding.header_value() {
            response_headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static(coding));
        }

        // RFC 9110 §14.2: range handling is defined for GET only; HEAD
        // describes the full representation.
        let ranges = if head {
            RangeOutcome::Full
        } else {
            match header_str(headers, &header::RANGE) {
                Some(range)
                    if header_str(headers, &header::IF_RANGE)
                        .is_none_or(|ir| conditional::if_range_holds(ir, &etag, modified)) =>
                {
                    range::parse(range, len)
                }
                _ => RangeOutcome::Full,
            }
        };

        let (status, pieces) = match ranges {
            RangeOutcome::Full => {
                response_headers.insert(header::CONTENT_TYPE, content_type);
                (StatusCode::OK, vec![Piece::File { start: 0, len }])
            }
            RangeOutcome::Unsatisfiable => {
                let mut response = error_response(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "range_not_satisfiable",
                    "no requested range overlaps the file",
                );
                insert(
                    response.headers_mut(),
                    header::CONTENT_RANGE,
                    &format!("bytes */{len}"),
                );
                response
                    .headers_mut()
                    .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
                return response;
            }
            RangeOutcome::Ranges(ranges) => match ranges.as_slice() {
                [single] => {
                    response_headers.insert(header::CONTENT_TYPE, content_type);
                    insert(
                        &mut response_headers,
                        header::CONTENT_RANGE,
                        &single.content_range(len),
                    );
                    let piece = Piece::File {
                        start: single.start,
                        len: single.len(),
                    };
                    (StatusCode::PARTIAL_CONTENT, vec![piece])
                }
                _ => {
                    let boundary = uuid::Uuid::new_v4().simple().to_string();
                    insert(
                        &mut response_headers,
                        header::CONTENT_TYPE,
                        &format!("multipart/byteranges; boundary={boundary}"),
                    );
                    let pieces = multipart_pieces(&ranges, len, &content_type, &boundary);
                    (StatusCode::PARTIAL_CONTENT, pieces)
                }
            },
        };

        let body_len: u64 = pieces.iter().map(Piece::len).sum();
        response_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body_len));
        let body = if head {
            Body::empty()
        } else if len <= self.hot_file_max_bytes {
            match self
                .hot_bytes(&mut file, &path, encoding, len, modified)
                .await
            {
                Ok(bytes) => Body::from(assemble(&pieces, &bytes)),
                Err(e) => return read_failed(&self.name, &path, &e),
            }
        } else {
            stream_pieces(file, pieces)
        };
        let mut response = Response::new(body);
        *response.status_mut() = status;
        *response.headers_mut() = response_headers;
        response
    }

    fn cache_control_for(&self, relative: &str) -> Option<&HeaderValue> {
        self.cache_control
            .iter()
            .find(|(glob, _)| glob.is_match(relative))
            .map(|(_, value)| value)
    }

    /// The whole content of a small file, from memory when the cached copy
    /// was read under the same length and mtime as the file has now.
    async fn hot_bytes(
        &self,
        file: &mut File,
        path: &Path,
        encoding: Encoding,
        len: u64,
        modified: Option<SystemTime>,
    ) -> io::Result<Bytes> {
        let key = HotKey {
            path: path.to_path_buf(),
            encoding,
        };
        if let Some(hot) = &self.hot
            && let Some(entry) = hot.get(&key)
            && entry.len == len
            && entry.modified == modified
            // Without an mtime a same-size edit would go unnoticed.
            && modified.is_some()
        {
            return Ok(entry.bytes);
        }
        let capacity = usize::try_from(len).unwrap_or(0);
        let mut buf = Vec::with_capacity(capacity);
        file.take(len).read_to_end(&mut buf).await?;
        if buf.len() as u64 != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while it was read",
            ));
        }
        let bytes = Bytes::from(buf);
        if let Some(hot) = &self.hot
            && modified.is_some()
        {
            hot.insert(
                key,
                HotEntry {
                    len,
                    modified,
                    bytes: bytes.clone(),
                },
            );
        }
        Ok(bytes)
    }
}

/// The file-system half of a request: canonicalize, stat, look for
/// siblings, negotiate the coding, open.
fn locate(root: &Path, index: &str, site_path: &SitePath, accept: Option<&str>) -> Located {
    let mut relative = site_path.segments.clone();
    if site_path.trailing_slash {
        relative.push(index.to_owned());
    }
    let requested: PathBuf = root.join(relative.iter().collect::<PathBuf>());
    let Some(canonical) = canonical_inside(root, &requested) else {
        return Located::NotFound;
    };
    let Ok(meta) = std::fs::metadata(&canonical) else {
        return Located::NotFound;
    };
    if meta.is_dir() && !site_path.trailing_slash {
        return Located::Directory;
    }
    // Directories named by the index, FIFOs (an open would block),
    // sockets and devices are not content.
    if !meta.is_file() {
        return Located::NotFound;
    }

    let mut variants = vec![(Encoding::Identity, canonical)];
    for encoding in [Encoding::Brotli, Encoding::Gzip] {
        let Some(suffix) = encoding.sibling_suffix() else {
            continue;
        };
        let mut sibling = OsString::from(requested.as_os_str());
        sibling.push(suffix);
        let sibling = Path::new(&sibling);
        // One stat answers the common "no sibling" case before the costlier
        // canonicalization walks every path component.
        if std::fs::metadata(sibling).is_ok_and(|m| m.is_file())
            && let Some(path) = canonical_inside(root, sibling)
        {
            variants.push((encoding, path));
        }
    }
    let has_siblings = variants.len() > 1;
    let available: Vec<Encoding> = variants.iter().map(|(e, _)| *e).collect();
    let chosen = encoding::negotiate(accept, &available);
    let Some((encoding, path)) = variants.into_iter().find(|(e, _)| *e == chosen) else {
        return Located::NotFound;
    };
    let Ok(file) = std::fs::File::open(&path) else {
        return Located::NotFound;
    };
    let Ok(meta) = file.metadata() else {
        return Located::NotFound;
    };
    // The path may have been swapped for a directory or FIFO since the stat.
    if !meta.is_file() {
        return Located::NotFound;
    }
    Located::File(Box::new(Opened {
        relative: relative.join("/"),
        has_siblings,
        encoding,
        path,
        file,
        meta,
    }))
}

/// The canonical form of `path` if it exists and stays under the (canonical)
/// root without passing through a hidden name.
///
/// Escapes are answered 404, not 403: a symlink pointing out of the root is
/// the site's mistake, and a client should learn nothing about what exists
/// outside it, not even that something is there.
///
/// Between this check and the `open` a writer of the site directory could
/// swap in a symlink; whoever can write the root can publish any content
/// anyway, so that race is outside the threat model.
fn canonical_inside(root: &Path, path: &Path) -> Option<PathBuf> {
    let canonical = std::fs::canonicalize(path).ok()?;
    let inside = canonical.strip_prefix(root).ok()?;
    // A symlink may legitimately point elsewhere inside the root, but not
    // into `.git/` or at `.env`.
    let hidden = inside.components().any(|c| match c {
        Component::Normal(name) => name.as_encoded_bytes().starts_with(b"."),
        _ => true,
    });
    (!hidden).then_some(canonical)
}

/// If-None-Match wins over If-Modified-Since when both are present
/// (RFC 9110 §13.2.2); a value that is not text matches nothing.
fn is_not_modified(headers: &HeaderMap, etag: &str, modified: Option<SystemTime>) -> bool {
    if let Some(value) = headers.get(header::IF_NONE_MATCH) {
        return value
            .to_str()
            .is_ok_and(|v| conditional::none_match_hits(v, etag));
    }
    header_str(headers, &header::IF_MODIFIED_SINCE)
        .is_some_and(|ims| conditional::not_modified_since(ims, modified))
}

/// The parts of a `multipart/byteranges` body (RFC 9110 §14.6).
fn multipart_pieces(
    ranges: &[ByteRange],
    total: u64,
    content_type: &HeaderValue,
    boundary: &str,
) -> Vec<Piece> {
    let content_type = String::from_utf8_lossy(content_type.as_bytes());
    let mut pieces = Vec::with_capacity(ranges.len() * 2 + 1);
    for (i, r) in ranges.iter().enumerate() {
        let lead = if i == 0 { "" } else { "\r\n" };
        let part_head = format!(
            "{lead}--{boundary}\r\ncontent-type: {content_type}\r\ncontent-range: {}\r\n\r\n",
            r.content_range(total)
        );
        pieces.push(Piece::Bytes(Bytes::from(part_head)));
        pieces.push(Piece::File {
            start: r.start,
            len: r.len(),
        });
    }
    pieces.push(Piece::Bytes(Bytes::from(format!("\r\n--{boundary}--\r\n"))));
    pieces
}

/// Lays the pieces out over an in-memory copy of the file.
fn assemble(pieces: &[Piece], content: &Bytes) -> Bytes {
    if let [Piece::File { start, len }] = pieces {
        // The common case: no copy, just a view.
        return slice(content, *start, *len);
    }
    let mut out = Vec::with_capacity(pieces.iter().map(Piece::len).sum::<u64>() as usize);
    for piece in pieces {
        match piece {
            Piece::Bytes(b) => out.extend_from_slice(b),
            Piece::File { start, len } => out.extend_from_slice(&slice(content, *start, *len)),
        }
    }
    Bytes::from(out)
}

/// Ranges were clamped to the length the bytes were read under, so this
/// never truncates in practice; clamping again keeps a bug from panicking.
fn slice(content: &Bytes, start: u64, len: u64) -> Bytes {
    let size = content.len();
    let start = usize::try_from(start).unwrap_or(size).min(size);
    let end = start
        .saturating_add(usize::try_from(len).unwrap_or(size))
        .min(size);
    content.slice(start..end)
}

/// Streams the pieces, reading file spans in chunks: memory per response
/// is one chunk whatever the file size, and a range costs one seek.
fn stream_pieces(file: File, pieces: Vec<Piece>) -> Body {
    struct State {
        file: File,
        pieces: VecDeque<Piece>,
        /// Bytes still to read from the current file span.
        remaining: u64,
    }
    let state = State {
        file,
        pieces: pieces.into(),
        remaining: 0,
    };
    let stream = futures_util::stream::try_unfold(state, |mut st| async move {
        loop {
            if st.remaining > 0 {
                let want =
                    usize::try_from(st.remaining.min(STREAM_CHUNK as u64)).unwrap_or(STREAM_CHUNK);
                let mut buf = vec![0; want];
                let n = st.file.read(&mut buf).await?;
                if n == 0 {
                    // Content-Length is already promised; failing the body
                    // makes the server cut the connection instead of
                    // handing the client a short file as complete.
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "file shrank while it was streamed",
                    ));
                }
                buf.truncate(n);
                st.remaining -= n as u64;
                return Ok(Some((Bytes::from(buf), st)));
            }
            match st.pieces.pop_front() {
                None => return Ok(None),
                Some(Piece::Bytes(bytes)) => return Ok(Some((bytes, st))),
                Some(Piece::File { start, len }) => {
                    st.file.seek(SeekFrom::Start(start)).await?;
                    st.remaining = len;
                }
            }
        }
    });
    Body::from_stream(stream)
}

/// `mime_guess` by extension; textual types get `charset=utf-8` so that
/// browsers do not guess (and mis-guess) an encoding.
fn content_type(relative: &str) -> HeaderValue {
    let mime = mime_guess::from_path(relative).first_or_octet_stream();
    let textual = mime.type_() == mime_guess::mime::TEXT
        || matches!(
            mime.essence_str(),
            "application/javascript"
                | "application/json"
                | "application/xml"
                | "application/manifest+json"
                | "image/svg+xml"
        );
    let value = if textual {
        format!("{}; charset=utf-8", mime.essence_str())
    } else {
        mime.essence_str().to_owned()
    };
    HeaderValue::from_str(&value)
        .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"))
}

fn is_plain_name(name: &str) -> bool {
    !name.starts_with('.')
        && !name.contains(['/', '\\', '\0'])
        && matches!(
            Path::new(name).components().collect::<Vec<_>>().as_slice(),
            [Component::Normal(_)]
        )
}

pub(crate) fn header_str<'a>(headers: &'a HeaderMap, name: &header::HeaderName) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// For values built from our own numbers and dates, which are always valid
/// header text; a failure would drop the header rather than the response.
pub(crate) fn insert(headers: &mut HeaderMap, name: header::HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

fn not_found() -> Response<Body> {
    error_response(StatusCode::NOT_FOUND, "not_found", "no such file")
}

fn method_not_allowed() -> Response<Body> {
    let mut response = error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "static files answer GET and HEAD only",
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    response
}

/// `docs` → `Location: docs/`, resolved by the client against the URL it
/// asked for. A last segment containing `:` would read as a URI scheme, so
/// it gets a `./` in front.
fn redirect_to_directory(path_in_site: &str) -> Response<Body> {
    let last = path_in_site.rsplit('/').next().unwrap_or_default();
    let location = if last.contains(':') {
        format!("./{last}/")
    } else {
        format!("{last}/")
    };
    let Ok(location) = HeaderValue::from_str(&location) else {
        return not_found();
    };
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::MOVED_PERMANENTLY;
    response.headers_mut().insert(header::LOCATION, location);
    response
}

fn read_failed(site: &str, path: &Path, error: &io::Error) -> Response<Body> {
    tracing::warn!(site, path = %path.display(), %error, "static file read failed");
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "file_unavailable",
        "the file could not be read; retry",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(root: &Path, hot_file_max_bytes: u64) -> StaticSite {
        let config = SiteConfig {
            name: "t".into(),
            prefix: "/".into(),
            root: root.to_path_buf(),
            index: "index.html".into(),
            cache_control: Vec::new(),
            hot_file_max_bytes,
            hot_cache_bytes: 1 << 20,
            plugins: Vec::new(),
        };
        StaticSite::new(&config).unwrap_or_else(|e| panic!("{e}"))
    }

    fn hot_keys(site: &StaticSite) -> Vec<PathBuf> {
        let hot = site.hot.as_ref().expect("hot cache configured");
        hot.run_pending_tasks();
        hot.iter().map(|(k, _)| k.path.clone()).collect()
    }

    #[tokio::test]
    async fn small_files_are_kept_in_memory_and_large_ones_are_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("small.txt"), b"small").expect("write");
        std::fs::write(dir.path().join("large.bin"), vec![7u8; 2048]).expect("write");
        let site = site(dir.path(), 1024);
        let none = HeaderMap::new();
        for path in ["small.txt", "large.bin"] {
            let r = site.serve(&Method::GET, &none, path).await;
            assert_eq!(r.status(), StatusCode::OK);
        }
        // HEAD and 304 answer from metadata alone and cache nothing new.
        let r = site.serve(&Method::HEAD, &none, "small.txt").await;
        assert_eq!(r.status(), StatusCode::OK);
        let keys = hot_keys(&site);
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert!(keys[0].ends_with("small.txt"));

        // Large files stream; the hot cache never holds them.
        let r = site
            .serve(&Method::GET, &none, "large.bin")
            .await
            .into_body();
        let bytes = axum::body::to_bytes(r, usize::MAX).await.expect("body");
        assert_eq!(bytes.len(), 2048);
        assert_eq!(hot_keys(&site).len(), 1);
    }

    #[tokio::test]
    async fn bad_config_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = SiteConfig {
            name: "t".into(),
            prefix: "/".into(),
            root: dir.path().join("missing"),
            index: "index.html".into(),
            cache_control: Vec::new(),
            hot_file_max_bytes: 1,
            hot_cache_bytes: 1,
            plugins: Vec::new(),
        };
        assert!(matches!(
            StaticSite::new(&config),
            Err(StaticSiteError::Root { .. })
        ));
        config.root = dir.path().to_path_buf();
        config.index = "../index.html".into();
        assert!(matches!(
            StaticSite::new(&config),
            Err(StaticSiteError::Index { .. })
        ));
        config.index = "index.html".into();
        config.cache_control = vec![edge_config::CacheControlRule {
            pattern: "a/{b".into(),
            value: "max-age=1".into(),
        }];
        assert!(matches!(
            StaticSite::new(&config),
            Err(StaticSiteError::Pattern { .. })
        ));
        config.cache_control[0].pattern = "*.css".into();
        config.cache_control[0].value = "bad\nvalue".into();
        assert!(matches!(
            StaticSite::new(&config),
            Err(StaticSiteError::CacheControlValue { .. })
        ));
    }

    #[test]
    fn text_types_carry_a_charset() {
        assert_eq!(content_type("a/style.css"), "text/css; charset=utf-8");
        assert_eq!(content_type("index.html"), "text/html; charset=utf-8");
        assert_eq!(content_type("logo.png"), "image/png");
        assert_eq!(content_type("blob"), "application/octet-stream");
    }

    #[test]
    fn index_must_be_a_plain_name() {
        assert!(is_plain_name("index.html"));
        for bad in ["", ".", "..", ".index", "a/b", "/index.html", "a\\b"] {
            assert!(!is_plain_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn multipart_layout() {
        let ranges = [
            ByteRange { start: 0, end: 1 },
            ByteRange { start: 5, end: 6 },
        ];
        let ct = HeaderValue::from_static("text/plain");
        let pieces = multipart_pieces(&ranges, 10, &ct, "B");
        let body = assemble(&pieces, &Bytes::from_static(b"0123456789"));
        assert_eq!(
            &body[..],
            b"--B\r\ncontent-type: text/plain\r\ncontent-range: bytes 0-1/10\r\n\r\n01\
              \r\n--B\r\ncontent-type: text/plain\r\ncontent-range: bytes 5-6/10\r\n\r\n56\
              \r\n--B--\r\n"
        );
    }
}
