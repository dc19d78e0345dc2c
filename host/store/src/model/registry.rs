//! One store's model versions: listing, manifests, channels, verification,
//! and the object-level helpers push, pull and replication share.

use std::time::Duration;

use futures_util::StreamExt;
use object_store::{Attribute, Attributes, GetOptions, ObjectStoreExt, PutOptions};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::{
    Manifest, ModelError, ModelRef, Progress, ProgressEvent, Selector, StoreSpec, Timestamp,
    check_name, keys,
};
use crate::{Sha256Digest, Store, StoreError, StoreUrl};

/// Manifests and channel pointers are small; anything larger is refused.
pub(crate) const SMALL_OBJECT_LIMIT: u64 = 16 << 20;
/// The user metadata key (`x-amz-meta-sha256` on S3) under which push and
/// replication record an object's sha256, so that a resumed run can skip a
/// finished object without reading it back.
pub(crate) const SHA256_METADATA: &str = "sha256";

/// A channel pointer: `models/<name>/channels/<channel>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelPointer {
    /// The version it points at.
    pub version: String,
    /// When it was last moved.
    pub updated_at: Timestamp,
}

/// What `verify` found for one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileCheck {
    /// Present, right size, right sha256.
    Ok,
    /// No object.
    Missing,
    /// The object has this many bytes.
    WrongSize(u64),
    /// The object's bytes hash to this.
    Mismatch(Sha256Digest),
}

/// The result of re-hashing a version's objects.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    /// The version's manifest.
    pub manifest: Manifest,
    /// Per file, in manifest order.
    pub files: Vec<(String, FileCheck)>,
}

impl VerifyReport {
    /// Whether every file checked out.
    pub fn is_ok(&self) -> bool {
        self.files.iter().all(|(_, c)| *c == FileCheck::Ok)
    }
}

/// An object as a HEAD request sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RemoteObject {
    pub size: u64,
    /// The sha256 recorded in its metadata, if any.
    pub recorded: Option<Sha256Digest>,
}

/// The model versions in one store.
#[derive(Debug, Clone)]
pub struct ModelStore {
    store: Store,
    label: String,
}

impl ModelStore {
    /// Opens the store `spec` names (no request is made yet).
    /// A `file://` store's directory is created if missing.
    pub fn open(spec: &StoreSpec) -> Result<ModelStore, ModelError> {
        if let StoreUrl::File { root } = &spec.url {
            std::fs::create_dir_all(root)
                .map_err(|e| ModelError::io("creating the store directory", root, e))?;
        }
        Ok(ModelStore {
            store: Store::open(&spec.url, &spec.options)?,
            label: spec.to_string(),
        })
    }

    /// The model versions in an already opened store.
    pub fn new(store: Store) -> ModelStore {
        let label = store.url().to_string();
        ModelStore { store, label }
    }

    /// The underlying store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// How messages name this store (URL, and endpoint for S3).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Whether objects can carry user metadata here (S3 can; object_store's
    /// local file system cannot, so there a finished object is re-read).
    pub(crate) fn has_metadata(&self) -> bool {
        matches!(self.store.url(), StoreUrl::S3 { .. })
    }

    pub(crate) fn sha256_attributes(&self, digest: &Sha256Digest) -> Attributes {
        let mut attributes = Attributes::new();
        if self.has_metadata() {
            attributes.insert(
                Attribute::Metadata(SHA256_METADATA.into()),
                digest.to_string().into(),
            );
        }
        attributes
    }

    /// HEAD `key`: its size and recorded sha256, `None` when absent.
    pub(crate) async fn head(&self, key: &str) -> Result<Option<RemoteObject>, ModelError> {
        let location = self.store.location(key)?;
        let options = GetOptions {
            head: true,
            ..GetOptions::default()
        };
        match self.store.inner().get_opts(&location, options).await {
            Ok(result) => {
                let recorded = result
                    .attributes
                    .get(&Attribute::Metadata(SHA256_METADATA.into()))
                    .and_then(|v| v.parse().ok());
                Ok(Some(RemoteObject {
                    size: result.meta.size,
                    recorded,
                }))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(StoreError::request("reading", self.store.object_url(key), e).into()),
        }
    }

    /// Reads `key` whole and hashes it: its size and sha256.
    pub(crate) async fn hash_object(
        &self,
        key: &str,
        progress: &dyn Progress,
    ) -> Result<(u64, Sha256Digest), ModelError> {
        let location = self.store.location(key)?;
        let url = self.store.object_url(key);
        let result = self
            .store
            .inner()
            .get(&location)
            .await
            .map_err(|e| StoreError::request("reading", url.clone(), e))?;
        let mut stream = result.into_stream();
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| StoreError::request("reading", url.clone(), e))?;
            size += chunk.len() as u64;
            hasher.update(&chunk);
            progress.event(ProgressEvent::Bytes(chunk.len() as u64));
        }
        Ok((size, Sha256Digest::from_hasher(hasher)))
    }

    /// Whether `key` holds exactly `size` bytes hashing to `sha256`: by
    /// the recorded metadata when there is one, else by reading it back.
    pub(crate) async fn holds(
        &self,
        key: &str,
        size: u64,
        sha256: &Sha256Digest,
    ) -> Result<bool, ModelError> {
        let Some(remote) = self.head(key).await? else {
            return Ok(false);
        };
        if remote.size != size {
            return Ok(false);
        }
        if let Some(recorded) = remote.recorded {
            return Ok(recorded == *sha256);
        }
        let (read, actual) = self.hash_object(key, &()).await?;
        Ok(read == size && actual == *sha256)
    }

    pub(crate) async fn put_small(
        &self,
        key: &str,
        bytes: Vec<u8>,
        attributes: Attributes,
    ) -> Result<(), ModelError> {
        let location = self.store.location(key)?;
        let options = PutOptions {
            attributes,
            ..PutOptions::default()
        };
        self.store
            .inner()
            .put_opts(&location, bytes.into(), options)
            .await
            .map_err(|e| StoreError::request("writing", self.store.object_url(key), e))?;
        Ok(())
    }

    /// The names under `prefix` one level down (`models/` → model names).
    async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, ModelError> {
        let list = self.list_one_level(prefix).await?;
        Ok(sorted_names(
            list.iter()
                .flat_map(|l| &l.common_prefixes)
                .filter_map(|p| p.filename()),
        ))
    }

    /// The objects directly under `prefix` (channel pointers).
    async fn list_files(&self, prefix: &str) -> Result<Vec<String>, ModelError> {
        let list = self.list_one_level(prefix).await?;
        Ok(sorted_names(
            list.iter()
                .flat_map(|l| &l.objects)
                .filter_map(|o| o.location.filename()),
        ))
    }

    /// One level of listing under `prefix`; `None` when nothing is there.
    async fn list_one_level(
        &self,
        prefix: &str,
    ) -> Result<Option<object_store::ListResult>, ModelError> {
        let location = self.store.location(prefix)?;
        match self
            .store
            .inner()
            .list_with_delimiter(Some(&location))
            .await
        {
            Ok(list) => Ok(Some(list)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(StoreError::request("listing", self.store.object_url(prefix), e).into()),
        }
    }

    /// Every model name with at least one directory in the store.
    pub async fn names(&self) -> Result<Vec<String>, ModelError> {
        let names = self.list_dirs(keys::ROOT).await?;
        Ok(names
            .into_iter()
            .filter(|n| check_name("model name", n).is_ok())
            .collect())
    }

    /// The versions of `name` that exist (have a manifest), sorted.
    pub async fn versions(&self, name: &str) -> Result<Vec<String>, ModelError> {
        check_name("model name", name)?;
        let mut versions = Vec::new();
        for dir in self.list_dirs(&keys::model(name)).await? {
            if check_name("version", &dir).is_err() {
                continue;
            }
            if self.head(&keys::manifest(name, &dir)).await?.is_some() {
                versions.push(dir);
            }
        }
        Ok(versions)
    }

    /// The manifest of `name@version`; [`ModelError::VersionNotFound`]
    /// when there is none.
    pub async fn manifest(&self, name: &str, version: &str) -> Result<Manifest, ModelError> {
        check_name("model name", name)?;
        check_name("version", version)?;
        let key = keys::manifest(name, version);
        let url = self.store.object_url(&key);
        match self.store.get(&key, SMALL_OBJECT_LIMIT).await {
            Ok(bytes) => Manifest::parse(&bytes, &url, Some((name, version))),
            Err(StoreError::NotFound { .. }) => Err(ModelError::VersionNotFound {
                reference: format!("{name}@{version}"),
                store: self.label.clone(),
                url,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// The manifest as stored, bytes and parsed.
    pub(crate) async fn manifest_bytes(
        &self,
        name: &str,
        version: &str,
    ) -> Result<(Vec<u8>, Manifest), ModelError> {
        let key = keys::manifest(name, version);
        let url = self.store.object_url(&key);
        match self.store.get(&key, SMALL_OBJECT_LIMIT).await {
            Ok(bytes) => {
                let manifest = Manifest::parse(&bytes, &url, Some((name, version)))?;
                Ok((bytes.to_vec(), manifest))
            }
            Err(StoreError::NotFound { .. }) => Err(ModelError::VersionNotFound {
                reference: format!("{name}@{version}"),
                store: self.label.clone(),
                url,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// The channel pointer `name:channel`.
    pub async fn channel(&self, name: &str, channel: &str) -> Result<ChannelPointer, ModelError> {
        check_name("model name", name)?;
        check_name("channel", channel)?;
        let key = keys::channel(name, channel);
        let url = self.store.object_url(&key);
        let bytes = match self.store.get(&key, SMALL_OBJECT_LIMIT).await {
            Ok(bytes) => bytes,
            Err(StoreError::NotFound { .. }) => {
                return Err(ModelError::ChannelNotFound {
                    reference: format!("{name}:{channel}"),
                    store: self.label.clone(),
                    url,
                });
            }
            Err(e) => return Err(e.into()),
        };
        let pointer: ChannelPointer =
            serde_json::from_slice(&bytes).map_err(|e| ModelError::Malformed {
                what: "channel pointer",
                url: url.clone(),
                reason: e.to_string(),
            })?;
        check_name("version", &pointer.version).map_err(|e| ModelError::Malformed {
            what: "channel pointer",
            url,
            reason: e.to_string(),
        })?;
        Ok(pointer)
    }

    /// Every channel of `name` and where it points.
    pub async fn channels(&self, name: &str) -> Result<Vec<(String, ChannelPointer)>, ModelError> {
        check_name("model name", name)?;
        let mut channels = Vec::new();
        for channel in self.list_files(&keys::channels(name)).await? {
            if check_name("channel", &channel).is_err() {
                continue;
            }
            match self.channel(name, &channel).await {
                Ok(pointer) => channels.push((channel, pointer)),
                // Removed between the listing and the read.
                Err(ModelError::ChannelNotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(channels)
    }

    /// The version `reference` names here: itself, or its channel's.
    pub async fn resolve(&self, reference: &ModelRef) -> Result<String, ModelError> {
        match &reference.selector {
            Selector::Version(v) => Ok(v.clone()),
            Selector::Channel(c) => Ok(self.channel(&reference.name, c).await?.version),
        }
    }

    /// Points `name:channel` at `version`, which must exist. Returns the
    /// version it pointed at before, if any.
    pub async fn promote(
        &self,
        name: &str,
        version: &str,
        channel: &str,
    ) -> Result<Option<String>, ModelError> {
        check_name("channel", channel)?;
        self.manifest(name, version).await?;
        let previous = match self.channel(name, channel).await {
            Ok(pointer) => Some(pointer.version),
            Err(ModelError::ChannelNotFound { .. } | ModelError::Malformed { .. }) => None,
            Err(e) => return Err(e),
        };
        self.write_channel(
            name,
            channel,
            &ChannelPointer {
                version: version.to_owned(),
                updated_at: Timestamp::now(),
            },
        )
        .await?;
        tracing::info!(store = %self.label, "{name}:{channel} -> {version} (was {previous:?})");
        Ok(previous)
    }

    pub(crate) async fn write_channel(
        &self,
        name: &str,
        channel: &str,
        pointer: &ChannelPointer,
    ) -> Result<(), ModelError> {
        let mut bytes = serde_json::to_vec(pointer).unwrap_or_default();
        bytes.push(b'\n');
        self.put_small(&keys::channel(name, channel), bytes, Attributes::new())
            .await
    }

    /// Re-reads and re-hashes every object of `name@version` in this store.
    pub async fn verify(
        &self,
        name: &str,
        version: &str,
        progress: &dyn Progress,
    ) -> Result<VerifyReport, ModelError> {
        let manifest = self.manifest(name, version).await?;
        progress.event(ProgressEvent::Start {
            total_bytes: manifest.total_size(),
            files: manifest.files.len(),
        });
        let mut files = Vec::with_capacity(manifest.files.len());
        for file in &manifest.files {
            progress.event(ProgressEvent::File {
                path: file.path.clone(),
                size: file.size,
            });
            let key = keys::file(name, version, &file.path);
            let check = match self.head(&key).await? {
                None => FileCheck::Missing,
                Some(remote) if remote.size != file.size => FileCheck::WrongSize(remote.size),
                Some(_) => {
                    let (size, actual) = self.hash_object(&key, progress).await?;
                    if size != file.size {
                        FileCheck::WrongSize(size)
                    } else if actual != file.sha256 {
                        FileCheck::Mismatch(actual)
                    } else {
                        FileCheck::Ok
                    }
                }
            };
            if check != FileCheck::Ok {
                metrics::counter!("breakwater_model_verify_failures_total").increment(1);
                tracing::warn!(store = %self.label, file = %file.path, ?check, "{}: verification failed", manifest.reference());
            }
            progress.event(ProgressEvent::FileDone {
                path: file.path.clone(),
            });
            files.push((file.path.clone(), check));
        }
        Ok(VerifyReport { manifest, files })
    }
}

/// Runs `future` under `deadline`, naming `what` if it runs out.
pub(crate) async fn with_deadline<T>(
    what: impl Into<String>,
    deadline: Duration,
    future: impl Future<Output = Result<T, ModelError>>,
) -> Result<T, ModelError> {
    match tokio::time::timeout(deadline, future).await {
        Ok(result) => result,
        Err(_) => Err(ModelError::Deadline {
            what: what.into(),
            seconds: deadline.as_secs(),
        }),
    }
}

fn sorted_names<'a>(names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut names: Vec<String> = names.map(str::to_owned).collect();
    names.sort();
    names
}
