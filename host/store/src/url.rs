//! Store and object URLs: `s3://bucket/prefix` and `file:///dir`.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

/// Why a URL does not name a store or an object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{url}` is not a store URL: {reason}")]
pub struct UrlError {
    /// The URL as given.
    pub url: String,
    /// What is wrong with it, and how URLs are written.
    pub reason: String,
}

/// Where a store lives.
///
/// ```
/// use breakwater_store::StoreUrl;
/// let url: StoreUrl = "s3://models/eu/".parse().unwrap();
/// assert_eq!(url, StoreUrl::S3 { bucket: "models".into(), prefix: "eu".into() });
/// assert_eq!(url.to_string(), "s3://models/eu");
/// assert!("http://example.com/x".parse::<StoreUrl>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StoreUrl {
    /// `s3://bucket[/prefix]` on an S3-compatible service; endpoint, region
    /// and credentials come from [`crate::StoreOptions`].
    S3 {
        /// The bucket.
        bucket: String,
        /// Keys of this store are under this prefix (no leading or trailing
        /// `/`; empty for the whole bucket).
        prefix: String,
    },
    /// `file:///dir`: a directory on the local disk.
    File {
        /// The absolute directory.
        root: PathBuf,
    },
}

/// One object: the store it lives in and its key there.
///
/// ```
/// use breakwater_store::ObjectUrl;
/// let url: ObjectUrl = "s3://plugins/waf/1.2.0.wasm".parse().unwrap();
/// assert_eq!(url.key, "waf/1.2.0.wasm");
/// assert_eq!(url.to_string(), "s3://plugins/waf/1.2.0.wasm");
/// let file: ObjectUrl = "file:///srv/plugins/waf.wasm".parse().unwrap();
/// assert_eq!(file.key, "waf.wasm");
/// assert!("s3://plugins/".parse::<ObjectUrl>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectUrl {
    /// The bucket (with an empty prefix) or the file's directory.
    pub store: StoreUrl,
    /// The object's key in `store`.
    pub key: String,
}

const HOW: &str = "write `s3://BUCKET/KEY` or `file:///ABSOLUTE/PATH`";

fn error(url: &str, reason: impl Into<String>) -> UrlError {
    UrlError {
        url: url.to_owned(),
        reason: reason.into(),
    }
}

/// Checks a `/`-separated key (or prefix): no empty, `.` or `..` segments,
/// no control characters, which object_store refuses or S3 treats oddly.
pub(crate) fn check_key(url: &str, key: &str) -> Result<(), UrlError> {
    for segment in key.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Err(error(
                url,
                format!("the key `{key}` has an empty, `.` or `..` segment"),
            ));
        }
        if segment.chars().any(char::is_control) {
            return Err(error(url, "the key holds control characters"));
        }
    }
    Ok(())
}

fn check_bucket(url: &str, bucket: &str) -> Result<(), UrlError> {
    // S3's own rule, so that a typo is caught here rather than as a
    // confusing signature or DNS error at fetch time.
    let valid_chars = bucket
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    if !(3..=63).contains(&bucket.len()) || !valid_chars {
        return Err(error(
            url,
            format!(
                "bucket `{bucket}` is not a bucket name (3 to 63 of a-z, 0-9, `.` and `-`); {HOW}"
            ),
        ));
    }
    Ok(())
}

/// `file://` URLs name local absolute paths only: `file:///srv/x`.
fn file_path(url: &str, rest: &str) -> Result<PathBuf, UrlError> {
    if !rest.starts_with('/') {
        return Err(error(
            url,
            format!("a file URL names a local absolute path, three slashes: `file:///…`; {HOW}"),
        ));
    }
    let path = PathBuf::from(rest);
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(error(url, "the path has `.` or `..` components"));
    }
    Ok(path)
}

impl FromStr for StoreUrl {
    type Err = UrlError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            check_bucket(url, bucket)?;
            let prefix = prefix.trim_matches('/');
            if !prefix.is_empty() {
                check_key(url, prefix)?;
            }
            return Ok(StoreUrl::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.to_owned(),
            });
        }
        if let Some(rest) = url.strip_prefix("file://") {
            return Ok(StoreUrl::File {
                root: file_path(url, rest)?,
            });
        }
        Err(error(url, format!("unknown scheme; {HOW}")))
    }
}

impl FromStr for ObjectUrl {
    type Err = UrlError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let Some((bucket, key)) = rest.split_once('/').filter(|(_, key)| !key.is_empty())
            else {
                return Err(error(url, format!("it names no object; {HOW}")));
            };
            check_bucket(url, bucket)?;
            check_key(url, key)?;
            return Ok(ObjectUrl {
                store: StoreUrl::S3 {
                    bucket: bucket.to_owned(),
                    prefix: String::new(),
                },
                key: key.to_owned(),
            });
        }
        if let Some(rest) = url.strip_prefix("file://") {
            let path = file_path(url, rest)?;
            let (Some(dir), Some(name)) =
                (path.parent(), path.file_name().and_then(|n| n.to_str()))
            else {
                return Err(error(url, format!("it names no file; {HOW}")));
            };
            return Ok(ObjectUrl {
                store: StoreUrl::File {
                    root: dir.to_path_buf(),
                },
                key: name.to_owned(),
            });
        }
        Err(error(url, format!("unknown scheme; {HOW}")))
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StoreUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            StoreUrl::File { root } => write!(f, "file://{}", root.display()),
        }
    }
}

impl fmt::Display for ObjectUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.store {
            StoreUrl::File { root } if root == Path::new("/") => write!(f, "file:///{}", self.key),
            store => write!(f, "{store}/{}", self.key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_store_urls() {
        assert_eq!(
            "s3://bucket".parse(),
            Ok(StoreUrl::S3 {
                bucket: "bucket".into(),
                prefix: String::new()
            })
        );
        assert_eq!(
            "file:///var/lib/store/".parse(),
            Ok(StoreUrl::File {
                root: "/var/lib/store/".into()
            })
        );
        for bad in [
            "s3://",
            "s3://B/x",
            "s3://bucket/a//b",
            "s3://bucket/../x",
            "file://relative/x",
            "file:///a/../b",
            "gs://bucket",
            "",
        ] {
            assert!(bad.parse::<StoreUrl>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn parses_object_urls() {
        let url: ObjectUrl = "file:///x.wasm".parse().expect("valid");
        assert_eq!(url.store, StoreUrl::File { root: "/".into() });
        assert_eq!(url.to_string(), "file:///x.wasm");
        for bad in [
            "s3://bucket",
            "s3://bucket/",
            "s3://bucket/dir/",
            "file:///",
        ] {
            assert!(bad.parse::<ObjectUrl>().is_err(), "{bad} parsed");
        }
    }
}
