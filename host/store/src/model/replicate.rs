//! `replicate`: the versions a destination store lacks, copied from a
//! source store (each with its own endpoint and credentials).
//!
//! Per version: a destination that already has the manifest has the
//! version (manifests come last) and is left alone, so a second run copies
//! nothing. Otherwise every file the destination does not already hold
//! (same size and sha256, as push checks it) is streamed from the source,
//! hashed on the way and refused if it does not match the manifest, then
//! read back from the destination and hashed again; the manifest, the
//! source's own bytes, is written last. An interrupted run leaves whole
//! objects and no manifest at the destination, and the next run copies
//! only what is missing. Channel pointers follow once the version they
//! point at is at the destination.

use std::time::Duration;

use futures_util::StreamExt;
use object_store::{ObjectStoreExt, PutMultipartOptions, WriteMultipart};
use sha2::{Digest, Sha256};

use crate::model::registry::with_deadline;
use crate::model::{
    FileEntry, Manifest, ModelError, ModelStore, Progress, ProgressEvent, Timestamp, check_name,
    keys,
};
use crate::{Sha256Digest, StoreError};

/// How to replicate.
#[derive(Debug, Clone)]
pub struct ReplicateOptions {
    /// Only this model (else every model in the source).
    pub name: Option<String>,
    /// Multipart part size at the destination.
    pub part_size: usize,
    /// Parts in flight at once.
    pub concurrency: usize,
    /// Deadline for copying one version.
    pub deadline: Duration,
}

impl Default for ReplicateOptions {
    fn default() -> Self {
        Self {
            name: None,
            part_size: 16 << 20,
            concurrency: 4,
            deadline: Duration::from_secs(6 * 3600),
        }
    }
}

/// What happened to one version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionStatus {
    /// The destination had it already.
    Present,
    /// Copied by this run.
    Copied {
        /// Files copied.
        files_copied: usize,
        /// Files the destination held already (an interrupted earlier run).
        files_skipped: usize,
        /// Bytes copied.
        bytes: u64,
    },
    /// Not copied: why.
    Failed(String),
}

/// One version's replication.
#[derive(Debug, Clone)]
pub struct VersionReplication {
    /// The model.
    pub name: String,
    /// The version.
    pub version: String,
    /// When it was pushed to the source.
    pub created_at: Timestamp,
    /// What happened.
    pub status: VersionStatus,
    /// How far the destination is (or was, until this run) behind for this
    /// version: zero if it had it already, else the time since the version
    /// was created at the source.
    pub lag: Duration,
}

/// The result of one replication pass.
#[derive(Debug, Clone, Default)]
pub struct ReplicationReport {
    /// Every version of the source, in order.
    pub versions: Vec<VersionReplication>,
    /// Channel pointers written at the destination: (name, channel, version).
    pub channels_updated: Vec<(String, String, String)>,
}

impl ReplicationReport {
    /// Versions copied by this run.
    pub fn copied(&self) -> usize {
        self.versions
            .iter()
            .filter(|v| matches!(v.status, VersionStatus::Copied { .. }))
            .count()
    }

    /// Versions that failed.
    pub fn failed(&self) -> usize {
        self.versions
            .iter()
            .filter(|v| matches!(v.status, VersionStatus::Failed(_)))
            .count()
    }

    /// Whether the destination now has every version of the source.
    pub fn is_complete(&self) -> bool {
        self.failed() == 0
    }
}

/// Copies the versions `to` lacks from `from`. An error is returned only
/// when the source cannot be listed; per-version failures (the destination
/// going away, a corrupt source object) are in the report, and the pass
/// stops at the first one that says the destination is unreachable.
pub async fn replicate(
    from: &ModelStore,
    to: &ModelStore,
    options: &ReplicateOptions,
    progress: &dyn Progress,
) -> Result<ReplicationReport, ModelError> {
    let names = match &options.name {
        Some(name) => {
            check_name("model name", name)?;
            vec![name.clone()]
        }
        None => from.names().await?,
    };
    let mut report = ReplicationReport::default();
    let mut unreachable: Option<String> = None;
    for name in &names {
        for version in from.versions(name).await? {
            let (manifest_bytes, manifest) = from.manifest_bytes(name, &version).await?;
            let status = match &unreachable {
                Some(reason) => VersionStatus::Failed(format!("not attempted: {reason}")),
                None => {
                    let what = format!("replicating {name}@{version} to {}", to.label());
                    let copied = with_deadline(
                        what,
                        options.deadline,
                        copy_version(from, to, &manifest_bytes, &manifest, options, progress),
                    )
                    .await;
                    match copied {
                        Ok(status) => status,
                        Err(e) => {
                            tracing::warn!(from = %from.label(), to = %to.label(), "{name}@{version}: {e}");
                            if e.is_unreachable() {
                                unreachable = Some(format!("the destination failed: {e}"));
                            }
                            VersionStatus::Failed(e.to_string())
                        }
                    }
                }
            };
            let lag = match status {
                VersionStatus::Present => Duration::ZERO,
                _ => manifest.created_at.age(),
            };
            let gauge_lag = match status {
                VersionStatus::Failed(_) => lag.as_secs_f64(),
                _ => 0.0,
            };
            metrics::gauge!(
                "breakwater_model_replication_lag_seconds",
                "name" => name.clone(),
                "version" => version.clone()
            )
            .set(gauge_lag);
            if let VersionStatus::Copied { bytes, .. } = status {
                metrics::counter!("breakwater_model_replicated_bytes_total").increment(bytes);
                metrics::counter!("breakwater_model_replicated_versions_total").increment(1);
            }
            report.versions.push(VersionReplication {
                name: name.clone(),
                version,
                created_at: manifest.created_at,
                status,
                lag,
            });
        }
        if unreachable.is_none() {
            match copy_channels(from, to, name, &report).await {
                Ok(updated) => report.channels_updated.extend(updated),
                Err(e) => tracing::warn!("{name}: channels not replicated: {e}"),
            }
        }
    }
    metrics::gauge!("breakwater_model_replication_missing_versions").set(report.failed() as f64);
    Ok(report)
}

async fn copy_channels(
    from: &ModelStore,
    to: &ModelStore,
    name: &str,
    report: &ReplicationReport,
) -> Result<Vec<(String, String, String)>, ModelError> {
    let mut updated = Vec::new();
    for (channel, pointer) in from.channels(name).await? {
        let at_destination = report.versions.iter().any(|v| {
            v.name == name
                && v.version == pointer.version
                && !matches!(v.status, VersionStatus::Failed(_))
        });
        if !at_destination {
            continue;
        }
        let current = match to.channel(name, &channel).await {
            Ok(p) => Some(p.version),
            Err(ModelError::ChannelNotFound { .. } | ModelError::Malformed { .. }) => None,
            Err(e) => return Err(e),
        };
        if current.as_deref() != Some(pointer.version.as_str()) {
            to.write_channel(name, &channel, &pointer).await?;
            updated.push((name.to_owned(), channel, pointer.version));
        }
    }
    Ok(updated)
}

async fn copy_version(
    from: &ModelStore,
    to: &ModelStore,
    manifest_bytes: &[u8],
    manifest: &Manifest,
    options: &ReplicateOptions,
    progress: &dyn Progress,
) -> Result<VersionStatus, ModelError> {
    let (name, version) = (manifest.name.as_str(), manifest.version.as_str());
    match to.manifest(name, version).await {
        Ok(existing) if existing.same_files(manifest) => return Ok(VersionStatus::Present),
        Ok(_) => {
            return Err(ModelError::VersionExists {
                reference: manifest.reference(),
                store: to.label().to_owned(),
            });
        }
        Err(ModelError::VersionNotFound { .. }) => {}
        Err(e) => return Err(e),
    }
    progress.event(ProgressEvent::Start {
        total_bytes: manifest.total_size(),
        files: manifest.files.len(),
    });
    let (mut files_copied, mut files_skipped, mut bytes) = (0, 0, 0);
    for file in &manifest.files {
        let key = keys::file(name, version, &file.path);
        if to.holds(&key, file.size, &file.sha256).await? {
            progress.event(ProgressEvent::Skipped {
                path: file.path.clone(),
                size: file.size,
            });
            files_skipped += 1;
            continue;
        }
        progress.event(ProgressEvent::File {
            path: file.path.clone(),
            size: file.size,
        });
        copy_file(
            from,
            to,
            &key,
            file,
            &manifest.reference(),
            options,
            progress,
        )
        .await?;
        // Verified at the destination: read back and hashed.
        let (size, actual) = to.hash_object(&key, &()).await?;
        if size != file.size || actual != file.sha256 {
            let url = to.store().object_url(&key);
            // Gone, so that the next run copies it again.
            let _ = to.store().inner().delete(&to.store().location(&key)?).await;
            return Err(ModelError::Corrupt {
                reference: manifest.reference(),
                url,
                detail: format!(
                    "read back {size} bytes hashing to {actual}; the manifest says {} bytes, {}",
                    file.size, file.sha256
                ),
            });
        }
        progress.event(ProgressEvent::FileDone {
            path: file.path.clone(),
        });
        files_copied += 1;
        bytes += file.size;
    }
    // Last: from here on the version exists at the destination.
    to.put_small(
        &keys::manifest(name, version),
        manifest_bytes.to_vec(),
        object_store::Attributes::new(),
    )
    .await?;
    tracing::info!(from = %from.label(), to = %to.label(), bytes, "replicated {}", manifest.reference());
    Ok(VersionStatus::Copied {
        files_copied,
        files_skipped,
        bytes,
    })
}

/// Streams one object from `from` to `to`, hashing it on the way; the
/// upload is abandoned (never completed) if the bytes are not the
/// manifest's.
async fn copy_file(
    from: &ModelStore,
    to: &ModelStore,
    key: &str,
    file: &FileEntry,
    reference: &str,
    options: &ReplicateOptions,
    progress: &dyn Progress,
) -> Result<(), ModelError> {
    let source_url = from.store().object_url(key);
    let dest_url = to.store().object_url(key);
    let corrupt = |size: u64, actual: Sha256Digest| ModelError::Corrupt {
        reference: reference.to_owned(),
        url: source_url.clone(),
        detail: format!(
            "{size} bytes hashing to {actual}; the manifest says {} bytes, {}",
            file.size, file.sha256
        ),
    };
    let result = from
        .store()
        .inner()
        .get(&from.store().location(key)?)
        .await
        .map_err(|e| StoreError::request("reading", source_url.clone(), e))?;
    let mut stream = result.into_stream();
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let part_size = options.part_size.max(5 << 20);
    let attributes = to.sha256_attributes(&file.sha256);

    if file.size <= part_size as u64 {
        let mut bytes = Vec::with_capacity(usize::try_from(file.size).unwrap_or(0));
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| StoreError::request("reading", source_url.clone(), e))?;
            size += chunk.len() as u64;
            if size > file.size {
                break;
            }
            hasher.update(&chunk);
            bytes.extend_from_slice(&chunk);
        }
        let actual = Sha256Digest::from_hasher(hasher);
        if size != file.size || actual != file.sha256 {
            return Err(corrupt(size, actual));
        }
        to.put_small(key, bytes, attributes).await?;
        progress.event(ProgressEvent::Bytes(size));
        return Ok(());
    }

    let upload = to
        .store()
        .inner()
        .put_multipart_opts(
            &to.store().location(key)?,
            PutMultipartOptions {
                attributes,
                ..PutMultipartOptions::default()
            },
        )
        .await
        .map_err(|e| StoreError::request("starting the upload of", dest_url.clone(), e))?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, part_size);
    let streamed: Result<(), ModelError> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| StoreError::request("reading", source_url.clone(), e))?;
            size += chunk.len() as u64;
            if size > file.size {
                break;
            }
            hasher.update(&chunk);
            writer
                .wait_for_capacity(options.concurrency.max(1))
                .await
                .map_err(|e| StoreError::request("uploading", dest_url.clone(), e))?;
            progress.event(ProgressEvent::Bytes(chunk.len() as u64));
            writer.put(chunk);
        }
        let actual = Sha256Digest::from_hasher(hasher);
        if size != file.size || actual != file.sha256 {
            return Err(corrupt(size, actual));
        }
        Ok(())
    }
    .await;
    match streamed {
        Ok(()) => {
            writer
                .finish()
                .await
                .map_err(|e| StoreError::request("completing the upload of", dest_url, e))?;
            Ok(())
        }
        Err(e) => {
            let _ = tokio::time::timeout(Duration::from_secs(10), writer.abort()).await;
            Err(e)
        }
    }
}
