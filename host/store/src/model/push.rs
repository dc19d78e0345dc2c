//! `push`: a local directory up as `name@version`, manifest last.
//!
//! Resumable by object: every file is hashed locally first, and a file
//! whose object is already in the store with the same size and sha256 is
//! skipped. The sha256 is recorded in the object's metadata
//! (`x-amz-meta-sha256`) when it is written, so that check is a HEAD
//! request, not a re-read; stores without metadata (`file://`) are re-read.
//! Each object becomes visible only when its upload completes (a multipart
//! upload is invisible until completed), so a killed push leaves whole
//! objects and no manifest: no version. The file being uploaded is hashed
//! again as it streams, and its upload is abandoned if the bytes changed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use object_store::{PutMultipartOptions, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::model::manifest::check_file_path;
use crate::model::{
    FileEntry, MANIFEST_FILE, Manifest, ModelError, ModelStore, Timestamp, check_name, keys,
};
use crate::{Sha256Digest, StoreError};

/// What a long transfer reports as it goes.
#[derive(Debug, Clone)]
pub enum ProgressEvent {
    /// The work ahead.
    Start {
        /// Bytes to move (or read) in all.
        total_bytes: u64,
        /// Files in all.
        files: usize,
    },
    /// A file starts.
    File {
        /// Its path in the version.
        path: String,
        /// Its size.
        size: u64,
    },
    /// A file was already in place: its bytes count as done.
    Skipped {
        /// Its path in the version.
        path: String,
        /// Its size.
        size: u64,
    },
    /// Bytes moved.
    Bytes(u64),
    /// A file is done.
    FileDone {
        /// Its path in the version.
        path: String,
    },
}

/// Receives [`ProgressEvent`]s (the CLI draws a progress bar); `()` ignores
/// them.
pub trait Progress: Send + Sync {
    /// One event.
    fn event(&self, event: ProgressEvent);
}

impl Progress for () {
    fn event(&self, _: ProgressEvent) {}
}

/// How to push.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// The model's name.
    pub name: String,
    /// The version to create.
    pub version: String,
    /// `gguf`, `safetensors`, `files`; `None`: guessed from the files.
    pub format: Option<String>,
    /// The version this one derives from.
    pub parent: Option<String>,
    /// A channel to point at the version once it exists.
    pub channel: Option<String>,
    /// Multipart part size; files up to this size go in one request.
    pub part_size: usize,
    /// Parts in flight at once.
    pub concurrency: usize,
    /// Deadline for the whole push.
    pub deadline: Duration,
}

impl PushOptions {
    /// `name@version` with 16 MiB parts, 4 in flight, a 6-hour deadline.
    pub fn new(name: &str, version: &str) -> Self {
        Self {
            name: name.to_owned(),
            version: version.to_owned(),
            format: None,
            parent: None,
            channel: None,
            part_size: 16 << 20,
            concurrency: 4,
            deadline: Duration::from_secs(6 * 3600),
        }
    }
}

/// What a push did.
#[derive(Debug, Clone)]
pub struct PushReport {
    /// The manifest now in the store.
    pub manifest: Manifest,
    /// Files uploaded by this run.
    pub uploaded: Vec<String>,
    /// Files already in the store (a resumed push).
    pub skipped: Vec<String>,
    /// Bytes uploaded by this run.
    pub bytes_uploaded: u64,
    /// The version existed already with the same files: nothing was done.
    pub already_existed: bool,
}

struct LocalFile {
    path: String,
    abs: PathBuf,
    size: u64,
    sha256: Sha256Digest,
}

impl ModelStore {
    /// Pushes the files of `dir` (recursively; symlinks followed) as
    /// `options.name@options.version`. See the module docs.
    pub async fn push(
        &self,
        dir: &Path,
        options: &PushOptions,
        progress: &dyn Progress,
    ) -> Result<PushReport, ModelError> {
        let what = format!(
            "pushing {}@{} to {}",
            options.name,
            options.version,
            self.label()
        );
        super::registry::with_deadline(
            what,
            options.deadline,
            self.push_inner(dir, options, progress),
        )
        .await
    }

    async fn push_inner(
        &self,
        dir: &Path,
        options: &PushOptions,
        progress: &dyn Progress,
    ) -> Result<PushReport, ModelError> {
        let (name, version) = (options.name.as_str(), options.version.as_str());
        check_name("model name", name)?;
        check_name("version", version)?;
        if let Some(parent) = &options.parent {
            check_name("version", parent)?;
        }
        if let Some(channel) = &options.channel {
            check_name("channel", channel)?;
        }
        let files = local_files(dir).await?;
        let format = options
            .format
            .clone()
            .unwrap_or_else(|| guess_format(&files));
        let entries: Vec<FileEntry> = files
            .iter()
            .map(|f| FileEntry {
                path: f.path.clone(),
                size: f.size,
                sha256: f.sha256,
            })
            .collect();

        // An existing version is never changed.
        match self.manifest(name, version).await {
            Ok(existing) => {
                let same = existing.format == format && existing.files == entries;
                if !same {
                    return Err(ModelError::VersionExists {
                        reference: format!("{name}@{version}"),
                        store: self.label().to_owned(),
                    });
                }
                if let Some(channel) = &options.channel {
                    self.promote(name, version, channel).await?;
                }
                return Ok(PushReport {
                    manifest: existing,
                    uploaded: Vec::new(),
                    skipped: entries.iter().map(|e| e.path.clone()).collect(),
                    bytes_uploaded: 0,
                    already_existed: true,
                });
            }
            Err(ModelError::VersionNotFound { .. }) => {}
            Err(e) => return Err(e),
        }

        progress.event(ProgressEvent::Start {
            total_bytes: files.iter().map(|f| f.size).sum(),
            files: files.len(),
        });
        let mut report_uploaded = Vec::new();
        let mut skipped = Vec::new();
        let mut bytes_uploaded = 0;
        for file in &files {
            let key = keys::file(name, version, &file.path);
            if self.holds(&key, file.size, &file.sha256).await? {
                progress.event(ProgressEvent::Skipped {
                    path: file.path.clone(),
                    size: file.size,
                });
                tracing::info!(file = %file.path, "already in the store; skipped");
                skipped.push(file.path.clone());
                continue;
            }
            progress.event(ProgressEvent::File {
                path: file.path.clone(),
                size: file.size,
            });
            self.upload_file(&key, file, options, progress).await?;
            progress.event(ProgressEvent::FileDone {
                path: file.path.clone(),
            });
            bytes_uploaded += file.size;
            report_uploaded.push(file.path.clone());
        }

        let manifest = Manifest {
            schema: Manifest::SCHEMA,
            name: name.to_owned(),
            version: version.to_owned(),
            format,
            created_at: Timestamp::now(),
            parent: options.parent.clone(),
            files: entries,
        };
        // Last: from here on the version exists.
        self.put_small(
            &keys::manifest(name, version),
            manifest.to_bytes(),
            object_store::Attributes::new(),
        )
        .await?;
        tracing::info!(store = %self.label(), "pushed {}", manifest.reference());
        if let Some(channel) = &options.channel {
            self.promote(name, version, channel).await?;
        }
        Ok(PushReport {
            manifest,
            uploaded: report_uploaded,
            skipped,
            bytes_uploaded,
            already_existed: false,
        })
    }

    async fn upload_file(
        &self,
        key: &str,
        file: &LocalFile,
        options: &PushOptions,
        progress: &dyn Progress,
    ) -> Result<(), ModelError> {
        let changed = || ModelError::BadSource {
            path: file.abs.clone(),
            reason: "the file changed while it was being pushed; push again".to_owned(),
        };
        let mut local = tokio::fs::File::open(&file.abs)
            .await
            .map_err(|e| ModelError::io("opening", &file.abs, e))?;
        let part_size = options.part_size.max(5 << 20);
        let attributes = self.sha256_attributes(&file.sha256);
        if file.size <= part_size as u64 {
            let mut bytes = Vec::with_capacity(usize::try_from(file.size).unwrap_or(0));
            local
                .read_to_end(&mut bytes)
                .await
                .map_err(|e| ModelError::io("reading", &file.abs, e))?;
            if bytes.len() as u64 != file.size || Sha256Digest::of(&bytes) != file.sha256 {
                return Err(changed());
            }
            self.put_small(key, bytes, attributes).await?;
            progress.event(ProgressEvent::Bytes(file.size));
            return Ok(());
        }

        let url = self.store().object_url(key);
        let location = self.store().location(key)?;
        let upload = self
            .store()
            .inner()
            .put_multipart_opts(
                &location,
                PutMultipartOptions {
                    attributes,
                    ..PutMultipartOptions::default()
                },
            )
            .await
            .map_err(|e| StoreError::request("starting the upload of", url.clone(), e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, part_size);
        let result: Result<(), ModelError> = async {
            let mut hasher = Sha256::new();
            let mut sent = 0u64;
            loop {
                let mut buf = vec![0u8; part_size];
                let mut filled = 0;
                while filled < buf.len() {
                    let n = local
                        .read(&mut buf[filled..])
                        .await
                        .map_err(|e| ModelError::io("reading", &file.abs, e))?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                if filled == 0 {
                    break;
                }
                buf.truncate(filled);
                hasher.update(&buf);
                sent += filled as u64;
                writer
                    .wait_for_capacity(options.concurrency.max(1))
                    .await
                    .map_err(|e| StoreError::request("uploading", url.clone(), e))?;
                writer.put(buf.into());
                progress.event(ProgressEvent::Bytes(filled as u64));
            }
            if sent != file.size || Sha256Digest::from_hasher(hasher) != file.sha256 {
                return Err(changed());
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                writer
                    .finish()
                    .await
                    .map_err(|e| StoreError::request("completing the upload of", url, e))?;
                Ok(())
            }
            Err(e) => {
                // Best effort: a store that is gone cannot be told.
                let _ = tokio::time::timeout(Duration::from_secs(10), writer.abort()).await;
                Err(e)
            }
        }
    }
}

/// The regular files under `dir`, sorted by path, each hashed.
async fn local_files(dir: &Path) -> Result<Vec<LocalFile>, ModelError> {
    let root = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut found = Vec::new();
        walk(&root, &root, &mut found)?;
        if found.is_empty() {
            return Err(ModelError::BadSource {
                path: root,
                reason: "no files to push".to_owned(),
            });
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found
            .into_iter()
            .map(|(path, abs, size)| {
                let sha256 =
                    Sha256Digest::of_file(&abs).map_err(|e| ModelError::io("hashing", &abs, e))?;
                Ok(LocalFile {
                    path,
                    abs,
                    size,
                    sha256,
                })
            })
            .collect()
    })
    .await
    .map_err(|e| ModelError::io("listing", dir, std::io::Error::other(e)))?
}

fn walk(
    root: &Path,
    dir: &Path,
    found: &mut Vec<(String, PathBuf, u64)>,
) -> Result<(), ModelError> {
    let entries = std::fs::read_dir(dir).map_err(|e| ModelError::io("listing", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| ModelError::io("listing", dir, e))?;
        let abs = entry.path();
        // Follows symlinks: a model directory of links into a download
        // cache pushes the files themselves.
        let meta = std::fs::metadata(&abs).map_err(|e| ModelError::io("reading", &abs, e))?;
        if meta.is_dir() {
            walk(root, &abs, found)?;
            continue;
        }
        if !meta.is_file() {
            continue;
        }
        let rel = abs
            .strip_prefix(root)
            .ok()
            .and_then(|p| p.to_str())
            .map(|p| p.replace(std::path::MAIN_SEPARATOR, "/"))
            .ok_or_else(|| ModelError::BadSource {
                path: abs.clone(),
                reason: "the file name is not UTF-8".to_owned(),
            })?;
        if rel == MANIFEST_FILE {
            return Err(ModelError::BadSource {
                path: abs,
                reason: format!("the directory has a {MANIFEST_FILE}; the store writes its own"),
            });
        }
        check_file_path(&rel).map_err(|reason| ModelError::BadSource {
            path: abs.clone(),
            reason,
        })?;
        found.push((rel, abs, meta.len()));
    }
    Ok(())
}

fn guess_format(files: &[LocalFile]) -> String {
    let has = |ext: &str| files.iter().any(|f| f.path.ends_with(ext));
    if has(".gguf") {
        "gguf".to_owned()
    } else if has(".safetensors") {
        "safetensors".to_owned()
    } else {
        "files".to_owned()
    }
}
