//! Prepared files: what a request for a static file needs, worked out once
//! per file version and reused by every request after it.
//!
//! A miss walks the path (canonicalize, stat, siblings), opens each variant,
//! renders its response headers and, for a small file, reads its bytes. A
//! hit then costs a lookup, one `stat` of the path as requested, and a
//! clone of the header block and of the `Bytes`: the `stat` (device, inode,
//! length, mtime) is what keeps an edited, replaced, deleted or re-linked
//! file from ever being answered from the old description.

use std::io::{self, Read};
use std::path::PathBuf;
use std::time::{Instant, SystemTime};

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header};

use super::encoding::{self, Encoding};
use super::{FoundFile, Piece, conditional, insert, stream_pieces};

/// Roughly what one prepared file costs beside its bytes (header blocks,
/// paths, the entry itself), for the hot cache's memory budget.
const ENTRY_OVERHEAD_BYTES: usize = 1024;

/// Which version of a file a description belongs to. Device and inode tell
/// a replaced file (a deploy's rename, a retargeted symlink) from the one
/// described; length and mtime tell an edit in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileVersion {
    len: u64,
    modified: Option<SystemTime>,
    #[cfg(unix)]
    device: u64,
    #[cfg(unix)]
    inode: u64,
}

impl FileVersion {
    fn of(meta: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        use std::os::unix::fs::MetadataExt;
        Self {
            len: meta.len(),
            modified: meta.modified().ok(),
            #[cfg(unix)]
            device: meta.dev(),
            #[cfg(unix)]
            inode: meta.ino(),
        }
    }
}

/// A file and its precompressed siblings, described.
pub(super) struct Prepared {
    /// Identity first.
    variants: Vec<Variant>,
    /// The siblings' codings, for negotiation.
    siblings: Vec<Encoding>,
    /// When the set of siblings was looked up.
    pub(super) checked_at: Instant,
}

/// One coding of a file.
pub(super) struct Variant {
    /// As requested, not canonical: `stat` follows symlinks, so a link
    /// retargeted since the description shows up as a different file.
    requested: PathBuf,
    version: FileVersion,
    pub(super) head: VariantHead,
    /// The whole content, for a file up to `hot_file_max_bytes` that a GET
    /// has asked for.
    pub(super) bytes: Option<Bytes>,
}

/// The response headers of one file version, rendered once.
pub(super) struct VariantHead {
    pub(super) len: u64,
    pub(super) modified: Option<SystemTime>,
    pub(super) etag: String,
    pub(super) content_type: HeaderValue,
    encoding: Encoding,
    /// What a `304` carries: ETag, Last-Modified, Cache-Control, Vary.
    pub(super) validators: HeaderMap,
    /// What a full `200` carries.
    pub(super) full: HeaderMap,
}

/// The body source of one response.
pub(super) enum Content {
    Memory(Bytes),
    /// Opened and checked against the description.
    File(std::fs::File),
}

/// What a description needs beside the file itself.
pub(super) struct Describe {
    pub(super) cache_control: Option<HeaderValue>,
    pub(super) content_type: HeaderValue,
    pub(super) has_siblings: bool,
    pub(super) hot_file_max_bytes: u64,
    /// Read small files' bytes (a GET); a HEAD describes without reading.
    pub(super) read_content: bool,
}

impl Prepared {
    /// The variant to answer with: negotiation only when there is a choice.
    pub(super) fn choose(&self, accept_encoding: Option<&str>) -> &Variant {
        let chosen = if self.siblings.is_empty() {
            Encoding::Identity
        } else {
            encoding::negotiate(accept_encoding, &self.siblings)
        };
        self.variants
            .iter()
            .find(|v| v.head.encoding == chosen)
            .unwrap_or(&self.variants[0])
    }

    /// Memory this description holds, for the hot cache's weigher.
    pub(super) fn weight(&self) -> usize {
        self.variants
            .iter()
            .map(|v| {
                ENTRY_OVERHEAD_BYTES
                    + v.requested.as_os_str().len()
                    + v.bytes.as_ref().map_or(0, Bytes::len)
            })
            .sum()
    }

    /// Without an mtime a same-size edit would go unnoticed, so such a file
    /// is described afresh on every request.
    pub(super) fn cacheable(&self) -> bool {
        self.variants.iter().all(|v| v.version.modified.is_some())
    }
}

impl Variant {
    /// The content to answer with, if the file on disk is still the version
    /// described; `None` sends the request down the full path. `want_body`
    /// is false for a HEAD.
    pub(super) fn current_content(
        &self,
        want_body: bool,
        hot_file_max_bytes: u64,
    ) -> Option<Content> {
        match &self.bytes {
            Some(bytes) => {
                let meta = std::fs::metadata(&self.requested).ok()?;
                (FileVersion::of(&meta) == self.version).then(|| Content::Memory(bytes.clone()))
            }
            // Small, but described by a HEAD: a GET reads it once, on the
            // full path, so that later GETs are answered from memory.
            None if want_body && self.version.len <= hot_file_max_bytes => None,
            None => {
                let file = std::fs::File::open(&self.requested).ok()?;
                let meta = file.metadata().ok()?;
                (FileVersion::of(&meta) == self.version).then_some(Content::File(file))
            }
        }
    }
}

impl VariantHead {
    fn new(describe: &Describe, encoding: Encoding, version: &FileVersion) -> Self {
        let etag = conditional::etag(version.len, version.modified, encoding);
        let mut validators = HeaderMap::new();
        insert(&mut validators, header::ETAG, &etag);
        if let Some(m) = version.modified {
            insert(
                &mut validators,
                header::LAST_MODIFIED,
                &httpdate::fmt_http_date(m),
            );
        }
        if let Some(value) = &describe.cache_control {
            validators.insert(header::CACHE_CONTROL, value.clone());
        }
        if describe.has_siblings {
            // Caches must key on Accept-Encoding even for the identity
            // response, or they would hand it to a br client (or vice versa).
            validators.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
        }
        let mut head = Self {
            len: version.len,
            modified: version.modified,
            etag,
            content_type: describe.content_type.clone(),
            encoding,
            validators,
            full: HeaderMap::new(),
        };
        let mut full = head.partial_base();
        full.insert(header::CONTENT_TYPE, head.content_type.clone());
        full.insert(header::CONTENT_LENGTH, HeaderValue::from(version.len));
        head.full = full;
        head
    }

    /// The headers every `200`/`206` carries, before type, range and length.
    pub(super) fn partial_base(&self) -> HeaderMap {
        let mut headers = self.validators.clone();
        headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        if let Some(coding) = self.encoding.header_value() {
            headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static(coding));
        }
        headers
    }
}

impl Content {
    /// The whole file as a body.
    pub(super) fn whole(self, len: u64) -> Body {
        match self {
            Content::Memory(bytes) => Body::from(bytes),
            Content::File(file) => stream_pieces(
                tokio::fs::File::from_std(file),
                vec![Piece::File { start: 0, len }],
            ),
        }
    }
}

/// Opens and describes every variant of a found file; blocking (it reads
/// small files whole), so it runs on the blocking pool. `Ok(None)` when a
/// variant vanished or stopped being a regular file since it was found;
/// `Err` when one could not be read.
pub(super) fn prepare(
    found: FoundFile,
    describe: &Describe,
) -> Result<Option<Prepared>, (PathBuf, io::Error)> {
    let checked_at = Instant::now();
    let mut variants = Vec::with_capacity(found.variants.len());
    for (encoding, canonical, requested) in found.variants {
        let Ok(mut file) = std::fs::File::open(&canonical) else {
            return Ok(None);
        };
        let Ok(meta) = file.metadata() else {
            return Ok(None);
        };
        // The path may have been swapped for a directory or FIFO since the
        // stat that found it.
        if !meta.is_file() {
            return Ok(None);
        }
        let version = FileVersion::of(&meta);
        let bytes = if describe.read_content && version.len <= describe.hot_file_max_bytes {
            Some(read_whole(&mut file, version.len).map_err(|e| (canonical.clone(), e))?)
        } else {
            None
        };
        variants.push(Variant {
            requested,
            version,
            head: VariantHead::new(describe, encoding, &version),
            bytes,
        });
    }
    let siblings = variants
        .iter()
        .map(|v| v.head.encoding)
        .filter(|e| *e != Encoding::Identity)
        .collect();
    Ok(Some(Prepared {
        variants,
        siblings,
        checked_at,
    }))
}

/// The first `len` bytes, the length the headers promise. A file that
/// grew meanwhile has a new mtime, so the next request describes it again.
fn read_whole(file: &mut std::fs::File, len: u64) -> io::Result<Bytes> {
    let capacity = usize::try_from(len).unwrap_or(0);
    let mut buf = Vec::with_capacity(capacity);
    file.take(len).read_to_end(&mut buf)?;
    if buf.len() as u64 != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "file shrank while it was read",
        ));
    }
    Ok(Bytes::from(buf))
}

#[cfg(test)]
pub(super) mod inspect {
    //! What the unit tests of the site look at.
    use super::Prepared;

    /// Whether each variant's bytes are held in memory.
    pub(in crate::static_files) fn bytes_held(prepared: &Prepared) -> Vec<bool> {
        prepared
            .variants
            .iter()
            .map(|v| v.bytes.is_some())
            .collect()
    }
}
