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
mod prepared;
pub(crate) mod range;
mod resolve;

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{self, SeekFrom};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use bytes::Bytes;
use edge_config::SiteConfig;
use globset::{GlobBuilder, GlobMatcher};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use tokio::fs::File;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::error::error_response;
use encoding::Encoding;
use prepared::{Content, Describe, Prepared, VariantHead, prepare};
use range::{ByteRange, RangeOutcome};
use resolve::{PathError, SitePath};

/// How long a prepared file's set of precompressed siblings is trusted
/// before the file system is asked again, as nginx's `open_file_cache_valid`
/// does for its open-file cache. The file itself is checked on every
/// request, so an edit, a replacement or a deletion is seen at once; only a
/// `.br`/`.gz` sibling added beside an already-served file waits this long.
const SIBLING_RECHECK: Duration = Duration::from_secs(1);

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
    /// Files found and described, by the raw request path that named them;
    /// `None` when the configuration gives the hot cache no memory.
    prepared: Option<moka::sync::Cache<String, Arc<Prepared>>>,
    /// How long a prepared file's set of siblings is trusted.
    sibling_recheck: Duration,
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

/// What a request path names on disk.
enum Lookup {
    File(FoundFile),
    /// A directory asked for without the trailing slash.
    Directory,
    NotFound,
}

/// A regular file inside the root, with the precompressed siblings that
/// exist beside it, all checked against the root.
struct FoundFile {
    /// Decoded path inside the site of the original (identity) file, index
    /// included: what `Cache-Control` globs and the MIME guess look at.
    relative: String,
    /// Identity first. Each with its canonical path (what is opened) and
    /// the path as requested (what later requests `stat`).
    variants: Vec<(Encoding, PathBuf, PathBuf)>,
}

/// What the body of a 200/206 is made of, in order.
enum Piece {
    Bytes(Bytes),
    /// A span of the file.
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
        let prepared = (config.hot_cache_bytes > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(config.hot_cache_bytes)
                .weigher(|path: &String, prepared: &Arc<Prepared>| {
                    u32::try_from(path.len() + prepared.weight()).unwrap_or(u32::MAX)
                })
                .build()
        });
        Ok(Self {
            name: config.name.clone(),
            root: root.into(),
            index: config.index.as_str().into(),
            cache_control,
            hot_file_max_bytes: config.hot_file_max_bytes,
            prepared,
            sibling_recheck: SIBLING_RECHECK,
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
        let accept = header_str(headers, &header::ACCEPT_ENCODING);
        // The crowd's path: a file already found and described, still the
        // same file on disk. Only paths that passed every gate below are
        // ever prepared, under the exact raw path that passed.
        if let Some(prepared) = self.prepared_for(path_in_site) {
            let variant = prepared.choose(accept);
            if let Some(content) = variant.current_content(!head, self.hot_file_max_bytes) {
                return respond(&variant.head, content, head, headers);
            }
        }

        let site_path = match resolve::decode(path_in_site) {
            Ok(p) => p,
            Err(PathError::Bad(reason)) => {
                tracing::debug!(site = %self.name, path = path_in_site, reason, "static path refused");
                return error_response(StatusCode::BAD_REQUEST, "bad_path", reason);
            }
            Err(PathError::Hidden) => return not_found(),
        };
        // The lookup runs inline on the worker, as nginx does in its event
        // loop: a site root is local disk, whose metadata calls on cached
        // dentries take microseconds. Reading content goes to the blocking
        // pool, once per file version.
        let plain_spelling = site_path.is_plain_spelling(path_in_site);
        let found = match find(&self.root, &self.index, &site_path) {
            Lookup::File(found) => found,
            Lookup::Directory => return redirect_to_directory(path_in_site),
            Lookup::NotFound => return not_found(),
        };
        let describe = Describe {
            cache_control: self.cache_control_for(&found.relative).cloned(),
            content_type: content_type(&found.relative),
            has_siblings: found.variants.len() > 1,
            hot_file_max_bytes: self.hot_file_max_bytes,
            read_content: !head,
        };
        let prepared = match tokio::task::spawn_blocking(move || prepare(found, &describe)).await {
            Ok(Ok(Some(prepared))) => Arc::new(prepared),
            Ok(Ok(None)) => return not_found(),
            Ok(Err((path, e))) => return read_failed(&self.name, &path, &e),
            Err(e) => {
                let e = io::Error::other(e.to_string());
                return read_failed(&self.name, Path::new(path_in_site), &e);
            }
        };
        let variant = prepared.choose(accept);
        let content = match &variant.bytes {
            Some(bytes) => Some(Content::Memory(bytes.clone())),
            None => variant.current_content(false, u64::MAX),
        };
        let response = match content {
            Some(content) => respond(&variant.head, content, head, headers),
            // Replaced between the description and this open.
            None => not_found(),
        };
        if let Some(cache) = &self.prepared
            && prepared.cacheable()
            && plain_spelling
        {
            cache.insert(path_in_site.to_owned(), prepared);
        }
        response
    }

    /// The prepared description of `path_in_site`, while its set of
    /// siblings is recent enough to trust.
    fn prepared_for(&self, path_in_site: &str) -> Option<Arc<Prepared>> {
        let prepared = self.prepared.as_ref()?.get(path_in_site)?;
        (prepared.checked_at.elapsed() < self.sibling_recheck).then_some(prepared)
    }

    fn cache_control_for(&self, relative: &str) -> Option<&HeaderValue> {
        self.cache_control
            .iter()
            .find(|(glob, _)| glob.is_match(relative))
            .map(|(_, value)| value)
    }
}

/// Answers from a described file version and its content: `304`, `200`,
/// `206` (one range or multipart) or `416`.
fn respond(
    variant: &VariantHead,
    content: Content,
    head: bool,
    request: &HeaderMap,
) -> Response<Body> {
    if is_not_modified(request, &variant.etag, variant.modified) {
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        *response.headers_mut() = variant.validators.clone();
        return response;
    }
    let len = variant.len;
    // RFC 9110 §14.2: range handling is defined for GET only; HEAD
    // describes the full representation.
    let ranges = if head {
        RangeOutcome::Full
    } else {
        match header_str(request, &header::RANGE) {
            Some(range)
                if header_str(request, &header::IF_RANGE).is_none_or(|ir| {
                    conditional::if_range_holds(ir, &variant.etag, variant.modified)
                }) =>
            {
                range::parse(range, len)
            }
            _ => RangeOutcome::Full,
        }
    };

    let (headers, pieces) = match ranges {
        RangeOutcome::Full => {
            let mut response = Response::new(if head {
                Body::empty()
            } else {
                content.whole(len)
            });
            *response.headers_mut() = variant.full.clone();
            return response;
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
        RangeOutcome::Ranges(ranges) => {
            let mut headers = variant.partial_base();
            let pieces = match ranges.as_slice() {
                [single] => {
                    headers.insert(header::CONTENT_TYPE, variant.content_type.clone());
                    insert(
                        &mut headers,
                        header::CONTENT_RANGE,
                        &single.content_range(len),
                    );
                    vec![Piece::File {
                        start: single.start,
                        len: single.len(),
                    }]
                }
                _ => {
                    let boundary = uuid::Uuid::new_v4().simple().to_string();
                    insert(
                        &mut headers,
                        header::CONTENT_TYPE,
                        &format!("multipart/byteranges; boundary={boundary}"),
                    );
                    multipart_pieces(&ranges, len, &variant.content_type, &boundary)
                }
            };
            (headers, pieces)
        }
    };
    let mut headers = headers;
    let body_len: u64 = pieces.iter().map(Piece::len).sum();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body_len));
    let body = match content {
        Content::Memory(bytes) => Body::from(assemble(&pieces, &bytes)),
        Content::File(file) => stream_pieces(File::from_std(file), pieces),
    };
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    *response.headers_mut() = headers;
    response
}

/// The file-system half of a miss: canonicalize, stat, look for siblings.
fn find(root: &Path, index: &str, site_path: &SitePath) -> Lookup {
    let mut relative = site_path.segments.clone();
    if site_path.trailing_slash {
        relative.push(index.to_owned());
    }
    let requested: PathBuf = root.join(relative.iter().collect::<PathBuf>());
    let Some(canonical) = canonical_inside(root, &requested) else {
        return Lookup::NotFound;
    };
    let Ok(meta) = std::fs::metadata(&canonical) else {
        return Lookup::NotFound;
    };
    if meta.is_dir() && !site_path.trailing_slash {
        return Lookup::Directory;
    }
    // Directories named by the index, FIFOs (an open would block),
    // sockets and devices are not content.
    if !meta.is_file() {
        return Lookup::NotFound;
    }

    let mut variants = vec![(Encoding::Identity, canonical, requested.clone())];
    for encoding in [Encoding::Brotli, Encoding::Gzip] {
        let Some(suffix) = encoding.sibling_suffix() else {
            continue;
        };
        let mut sibling = OsString::from(requested.as_os_str());
        sibling.push(suffix);
        let sibling = PathBuf::from(sibling);
        // One stat answers the common "no sibling" case before the costlier
        // canonicalization walks every path component.
        if std::fs::metadata(&sibling).is_ok_and(|m| m.is_file())
            && let Some(path) = canonical_inside(root, &sibling)
        {
            variants.push((encoding, path, sibling));
        }
    }
    Lookup::File(FoundFile {
        relative: relative.join("/"),
        variants,
    })
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

    /// Each prepared path with, per variant, whether its bytes are held.
    fn prepared_entries(site: &StaticSite) -> Vec<(String, Vec<bool>)> {
        let cache = site.prepared.as_ref().expect("hot cache configured");
        cache.run_pending_tasks();
        let mut entries: Vec<_> = cache
            .iter()
            .map(|(path, p)| (path.as_str().to_owned(), prepared::inspect::bytes_held(&p)))
            .collect();
        entries.sort();
        entries
    }

    async fn body_of(response: Response<Body>) -> Bytes {
        axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body")
    }

    #[tokio::test]
    async fn small_files_are_kept_in_memory_and_large_ones_are_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("small.txt"), b"small").expect("write");
        std::fs::write(dir.path().join("large.bin"), vec![7u8; 2048]).expect("write");
        std::fs::write(dir.path().join("headed.txt"), b"headed").expect("write");
        let site = site(dir.path(), 1024);
        let none = HeaderMap::new();
        for path in ["small.txt", "large.bin"] {
            let r = site.serve(&Method::GET, &none, path).await;
            assert_eq!(r.status(), StatusCode::OK);
        }
        // A HEAD describes the file without reading it.
        let r = site.serve(&Method::HEAD, &none, "headed.txt").await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            prepared_entries(&site),
            [
                ("headed.txt".to_owned(), vec![false]),
                ("large.bin".to_owned(), vec![false]),
                ("small.txt".to_owned(), vec![true]),
            ]
        );

        // Large files stream from disk every time; a small one a HEAD
        // described is read by the first GET.
        let r = site.serve(&Method::GET, &none, "large.bin").await;
        assert_eq!(body_of(r).await.len(), 2048);
        let r = site.serve(&Method::GET, &none, "headed.txt").await;
        assert_eq!(&body_of(r).await[..], b"headed");
        assert_eq!(
            prepared_entries(&site),
            [
                ("headed.txt".to_owned(), vec![true]),
                ("large.bin".to_owned(), vec![false]),
                ("small.txt".to_owned(), vec![true]),
            ]
        );
    }

    #[tokio::test]
    async fn only_the_plain_spelling_of_a_path_is_kept_prepared() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("docs")).expect("mkdir");
        std::fs::write(dir.path().join("docs/app.js"), b"app").expect("write");
        std::fs::write(dir.path().join("index.html"), b"home").expect("write");
        let site = site(dir.path(), 1024);
        let none = HeaderMap::new();
        // Other spellings of the same files are served, not kept.
        for spelling in [
            "docs/%61pp.js",
            "docs//app.js",
            "%64ocs/app.js",
            "docs/app.js",
            "",
        ] {
            let r = site.serve(&Method::GET, &none, spelling).await;
            assert_eq!(r.status(), StatusCode::OK, "{spelling:?}");
        }
        assert_eq!(
            prepared_entries(&site),
            [
                (String::new(), vec![true]),
                ("docs/app.js".to_owned(), vec![true]),
            ]
        );
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_retargeted_symlink_is_checked_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("www");
        std::fs::create_dir(&root).expect("mkdir");
        std::fs::write(root.join("public.txt"), b"public").expect("write");
        std::fs::write(dir.path().join("secret.txt"), b"secret").expect("write");
        let link = root.join("link.txt");
        std::os::unix::fs::symlink(root.join("public.txt"), &link).expect("symlink");
        let site = site(&root, 1024);
        let none = HeaderMap::new();
        let r = site.serve(&Method::GET, &none, "link.txt").await;
        assert_eq!(&body_of(r).await[..], b"public");

        // Pointed out of the root while its description is in memory: the
        // per-request stat sees another file, and the full path refuses it.
        std::fs::remove_file(&link).expect("unlink");
        std::os::unix::fs::symlink(dir.path().join("secret.txt"), &link).expect("symlink");
        let r = site.serve(&Method::GET, &none, "link.txt").await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn a_sibling_added_later_is_found_once_the_recheck_is_due() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("app.js"), b"plain").expect("write");
        let mut site = site(dir.path(), 1024);
        // The interval is the test's to move, not the clock's.
        site.sibling_recheck = Duration::MAX;
        let mut br = HeaderMap::new();
        br.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("br"));
        let r = site.serve(&Method::GET, &br, "app.js").await;
        assert_eq!(r.headers().get(header::CONTENT_ENCODING), None);

        std::fs::write(dir.path().join("app.js.br"), b"compressed").expect("write");
        // Trusted for the recheck interval: still the description without it.
        let r = site.serve(&Method::GET, &br, "app.js").await;
        assert_eq!(r.headers().get(header::CONTENT_ENCODING), None);
        // Once the interval has passed, the siblings are looked up again.
        site.sibling_recheck = Duration::ZERO;
        let r = site.serve(&Method::GET, &br, "app.js").await;
        assert_eq!(r.headers()[header::CONTENT_ENCODING], "br");
        assert_eq!(r.headers()[header::VARY], "accept-encoding");
        assert_eq!(&body_of(r).await[..], b"compressed");
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
