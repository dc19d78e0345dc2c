//! `manifest.json`: what a version is made of.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::Sha256Digest;
use crate::model::{ModelError, Timestamp, check_name};
use crate::url::check_key;

/// The manifest's name inside a version.
pub const MANIFEST_FILE: &str = "manifest.json";

/// A version's manifest. Its presence makes the version exist; it is
/// written after every file it lists, and never changed afterwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The layout's schema; this code writes and reads 1.
    pub schema: u32,
    /// The model's name.
    pub name: String,
    /// The version.
    pub version: String,
    /// How the runtime loads it: `gguf`, `safetensors`, or `files`.
    pub format: String,
    /// When the push finished writing the files.
    pub created_at: Timestamp,
    /// The version this one was derived from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Every file, sorted by path.
    pub files: Vec<FileEntry>,
}

/// One file of a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// `/`-separated path inside the version directory.
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its sha256.
    #[serde(with = "digest_hex")]
    pub sha256: Sha256Digest,
}

mod digest_hex {
    use crate::Sha256Digest;

    pub fn serialize<S: serde::Serializer>(d: &Sha256Digest, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(d)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Sha256Digest, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Manifest {
    /// The schema this code writes.
    pub const SCHEMA: u32 = 1;

    /// Total bytes of the files.
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// `name@version`.
    pub fn reference(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    /// Whether `other` describes the same files (created-at aside).
    pub fn same_files(&self, other: &Manifest) -> bool {
        self.name == other.name
            && self.version == other.version
            && self.format == other.format
            && self.files == other.files
    }

    /// The manifest as stored: pretty JSON with a trailing newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }

    /// Parses and checks a stored manifest (`url` for messages). When
    /// `expect` is given, the manifest must be for that `(name, version)`.
    pub fn parse(
        bytes: &[u8],
        url: &str,
        expect: Option<(&str, &str)>,
    ) -> Result<Manifest, ModelError> {
        let malformed = |reason: String| ModelError::Malformed {
            what: "manifest",
            url: url.to_owned(),
            reason,
        };
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
        if manifest.schema != Self::SCHEMA {
            return Err(malformed(format!(
                "schema {} (this breakwater reads {})",
                manifest.schema,
                Self::SCHEMA
            )));
        }
        check_name("model name", &manifest.name).map_err(|e| malformed(e.to_string()))?;
        check_name("version", &manifest.version).map_err(|e| malformed(e.to_string()))?;
        if let Some(parent) = &manifest.parent {
            check_name("version", parent).map_err(|e| malformed(e.to_string()))?;
        }
        if let Some((name, version)) = expect
            && (manifest.name != name || manifest.version != version)
        {
            return Err(malformed(format!(
                "it describes {} where {name}@{version} was expected",
                manifest.reference()
            )));
        }
        let mut seen = HashSet::new();
        let mut total = 0u64;
        for file in &manifest.files {
            check_file_path(&file.path).map_err(malformed)?;
            if !seen.insert(file.path.as_str()) {
                return Err(malformed(format!("{} is listed twice", file.path)));
            }
            // So that `total_size` and progress sums cannot overflow.
            total = total.checked_add(file.size).ok_or_else(|| {
                malformed(format!(
                    "file sizes add up to more than {} bytes at {}",
                    u64::MAX,
                    file.path
                ))
            })?;
        }
        Ok(manifest)
    }
}

/// A file path in a version: a valid key, not the manifest itself, and no
/// segment that a local file system would treat specially.
pub(crate) fn check_file_path(path: &str) -> Result<(), String> {
    check_key("", path).map_err(|e| e.reason)?;
    if path == MANIFEST_FILE {
        return Err(format!("a file may not be named {MANIFEST_FILE}"));
    }
    if path.split('/').any(|s| s.starts_with(".partial")) || path.contains('\\') {
        return Err(format!("{path}: reserved name or backslash"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            schema: 1,
            name: "m".into(),
            version: "1.0".into(),
            format: "gguf".into(),
            created_at: Timestamp(1_795_772_880),
            parent: None,
            files: vec![FileEntry {
                path: "model.gguf".into(),
                size: 3,
                sha256: Sha256Digest::of(b"abc"),
            }],
        }
    }

    #[test]
    fn round_trips_and_checks() {
        let m = sample();
        let bytes = m.to_bytes();
        let text = String::from_utf8(bytes.clone()).expect("utf-8");
        assert!(
            text.contains("\"created_at\": \"2026-11-27T09:48:00Z\""),
            "{text}"
        );
        assert!(!text.contains("parent"), "{text}");
        let back = Manifest::parse(&bytes, "u", Some(("m", "1.0"))).expect("parse");
        assert_eq!(back, m);
        assert!(Manifest::parse(&bytes, "u", Some(("m", "2.0"))).is_err());

        let mut twice = sample();
        twice.files.push(twice.files[0].clone());
        assert!(Manifest::parse(&twice.to_bytes(), "u", None).is_err());
        let mut escape = sample();
        escape.files[0].path = "../x".into();
        assert!(Manifest::parse(&escape.to_bytes(), "u", None).is_err());
        assert!(Manifest::parse(b"{}", "u", None).is_err());
    }

    #[test]
    fn sizes_that_add_up_past_u64_are_refused() {
        let mut huge = sample();
        huge.files[0].size = u64::MAX;
        let mut second = huge.files[0].clone();
        second.path = "b.gguf".into();
        huge.files.push(second);
        let err = Manifest::parse(&huge.to_bytes(), "u", None).unwrap_err();
        assert!(err.to_string().contains("add up to more than"), "{err}");
    }
}
