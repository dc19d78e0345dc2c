//! The model store against real S3-compatible servers (SeaweedFS on
//! loopback; two instances stand for two regions): push, pull, verify,
//! corruption, interruption, replication and store fallback.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use breakwater_store::model::{
    FileCheck, ModelError, ModelRef, ModelStore, Progress, ProgressEvent, PullOptions, PushOptions,
    ReplicateOptions, StoreSpec, VersionStatus, pull, replicate, resolve,
};
use breakwater_store::testing::S3Server;
use breakwater_store::{Sha256Digest, StoreOptions, StoreUrl};

/// Fails fast when a server is gone, so fallbacks are quick.
fn quick(options: StoreOptions) -> StoreOptions {
    StoreOptions {
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(20),
        retry_timeout: Duration::from_secs(1),
        ..options
    }
}

fn model_store(server: &S3Server, bucket: &str) -> ModelStore {
    let url: StoreUrl = format!("s3://{bucket}/region").parse().expect("url");
    ModelStore::open(&StoreSpec {
        url,
        options: quick(server.options()),
    })
    .expect("open")
}

/// Deterministic, distinct bytes.
fn bytes(seed: u8, len: usize) -> Vec<u8> {
    let mut x = u32::from(seed).wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// A model directory: a large weights file (several parts), a small
/// config, and a file in a subdirectory.
fn model_dir(seed: u8, weights: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("model.gguf"), bytes(seed, weights)).expect("write");
    std::fs::write(
        dir.path().join("config.json"),
        format!("{{\"seed\":{seed}}}"),
    )
    .expect("write");
    std::fs::create_dir(dir.path().join("tokenizer")).expect("mkdir");
    std::fs::write(
        dir.path().join("tokenizer/vocab.txt"),
        bytes(seed ^ 0x55, 3000),
    )
    .expect("write");
    dir
}

fn push_options(name: &str, version: &str) -> PushOptions {
    PushOptions {
        part_size: 5 << 20,
        ..PushOptions::new(name, version)
    }
}

fn pull_options(cache: &Path) -> PullOptions {
    PullOptions {
        range_size: 1 << 20,
        deadline: Duration::from_secs(60),
        ..PullOptions::new(cache)
    }
}

fn same_tree(a: &Path, b: &Path) {
    for rel in ["model.gguf", "config.json", "tokenizer/vocab.txt"] {
        let left = std::fs::read(a.join(rel)).expect("read");
        let right = std::fs::read(b.join(rel)).expect("read");
        assert!(left == right, "{rel} differs");
    }
}

/// Everything under `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            out.push(
                path.strip_prefix(root)
                    .expect("prefix")
                    .display()
                    .to_string(),
            );
            if path.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[derive(Default)]
struct Counter {
    bytes: AtomicU64,
    files_done: AtomicU64,
    skipped: AtomicU64,
}

impl Progress for Counter {
    fn event(&self, event: ProgressEvent) {
        match event {
            ProgressEvent::Bytes(n) => {
                self.bytes.fetch_add(n, Ordering::SeqCst);
            }
            ProgressEvent::FileDone { .. } => {
                self.files_done.fetch_add(1, Ordering::SeqCst);
            }
            ProgressEvent::Skipped { .. } => {
                self.skipped.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn push_pull_round_trip_and_warm_cache_offline() {
    let mut server = S3Server::start().await;
    let store = model_store(&server, S3Server::BUCKET);
    let source = model_dir(1, 12 << 20);
    let progress = Counter::default();
    let mut options = push_options("smol", "1.0.0");
    options.channel = Some("stable".into());
    let report = store
        .push(source.path(), &options, &progress)
        .await
        .expect("push");
    assert_eq!(report.uploaded.len(), 3);
    assert_eq!(report.manifest.format, "gguf");
    assert_eq!(
        progress.bytes.load(Ordering::SeqCst),
        report.manifest.total_size()
    );
    let weights = report
        .manifest
        .files
        .iter()
        .find(|f| f.path == "model.gguf")
        .expect("listed");
    assert_eq!(weights.size, 12 << 20);
    assert_eq!(weights.sha256, Sha256Digest::of(&bytes(1, 12 << 20)));

    // ls / show / channels.
    assert_eq!(store.names().await.expect("names"), vec!["smol"]);
    assert_eq!(
        store.versions("smol").await.expect("versions"),
        vec!["1.0.0"]
    );
    let shown = store.manifest("smol", "1.0.0").await.expect("show");
    assert_eq!(shown, report.manifest);
    assert_eq!(
        store
            .channel("smol", "stable")
            .await
            .expect("channel")
            .version,
        "1.0.0"
    );
    assert!(
        store
            .verify("smol", "1.0.0", &())
            .await
            .expect("verify")
            .is_ok()
    );

    // Pushing the same files again is a no-op; other files under the same
    // version are refused.
    let again = store
        .push(source.path(), &options, &())
        .await
        .expect("again");
    assert!(again.already_existed);
    let other = model_dir(2, 1000);
    let refused = store.push(other.path(), &options, &()).await;
    assert!(
        matches!(refused, Err(ModelError::VersionExists { .. })),
        "{refused:?}"
    );

    // Pull by channel into an empty cache.
    let cache = tempfile::tempdir().expect("tempdir");
    let stores = [store.clone()];
    let pulled = pull(
        &stores,
        &"smol:stable".parse().expect("ref"),
        &pull_options(cache.path()),
    )
    .await
    .expect("pull");
    assert_eq!(pulled.dir, cache.path().join("models/smol/1.0.0"));
    assert_eq!(pulled.bytes_fetched, report.manifest.total_size());
    same_tree(source.path(), &pulled.dir);
    assert!(pulled.dir.join("manifest.json").is_file());
    assert!(tree(&cache.path().join(".partial")).is_empty());

    // With the server gone, a warm cache loads without the network: by
    // version, and by channel (its last resolution).
    server.stop();
    for reference in ["smol@1.0.0", "smol:stable"] {
        let warm = tokio::time::timeout(
            Duration::from_secs(10),
            pull(
                &stores,
                &reference.parse().expect("ref"),
                &pull_options(cache.path()),
            ),
        )
        .await
        .expect("within the deadline")
        .unwrap_or_else(|e| panic!("{reference}: {e}"));
        assert_eq!(warm.dir, pulled.dir);
        // Nothing fetched, and an answer at all with the server gone: the
        // cache served it (a wall-clock bound would measure the machine).
        assert_eq!(warm.bytes_fetched, 0);
    }
    let prefer = PullOptions {
        prefer_cache: true,
        verify_cache: true,
        ..pull_options(cache.path())
    };
    let warm = pull(&stores, &"smol:stable".parse().expect("ref"), &prefer)
        .await
        .expect("from the cache");
    assert_eq!(warm.source, "local cache");
}

#[tokio::test]
async fn a_flipped_byte_is_detected_and_the_version_refused() {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("a metrics recorder");
    let server = S3Server::start().await;
    let store = model_store(&server, S3Server::BUCKET);
    let v1 = model_dir(3, 3 << 20);
    let v2 = model_dir(4, 3 << 20);
    store
        .push(v1.path(), &push_options("m", "1"), &())
        .await
        .expect("push 1");
    store
        .push(v2.path(), &push_options("m", "2"), &())
        .await
        .expect("push 2");
    let cache = tempfile::tempdir().expect("tempdir");
    let stores = [store.clone()];
    let serving = pull(
        &stores,
        &"m@1".parse().expect("ref"),
        &pull_options(cache.path()),
    )
    .await
    .expect("pull 1");

    // One byte of v2's weights flipped in the store, same size.
    let key = "region/models/m/2/model.gguf";
    let raw = server.store(S3Server::BUCKET);
    let mut corrupt = raw.get(key, 64 << 20).await.expect("get").to_vec();
    corrupt[1_500_000] ^= 0x01;
    raw.put(key, corrupt).await.expect("put");

    let report = store.verify("m", "2", &()).await.expect("verify");
    assert!(!report.is_ok());
    let (path, check) = report
        .files
        .iter()
        .find(|(_, c)| *c != FileCheck::Ok)
        .expect("one bad file");
    assert_eq!(path, "model.gguf");
    assert!(matches!(check, FileCheck::Mismatch(_)), "{check:?}");

    let refused = pull(
        &stores,
        &"m@2".parse().expect("ref"),
        &pull_options(cache.path()),
    )
    .await;
    let message = match refused {
        Err(e @ ModelError::NoStore { .. }) => e.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert!(message.contains("corrupt"), "{message}");
    assert!(message.contains("model.gguf"), "{message}");
    let text = metrics.render();
    assert!(
        text.contains("breakwater_model_pull_refused_total{reason=\"sha256\"} 1"),
        "{text}"
    );
    // Nothing of v2 anywhere in the cache; v1 still there and served.
    assert!(!cache.path().join("models/m/2").exists());
    assert!(
        tree(&cache.path().join(".partial")).is_empty(),
        "{:?}",
        tree(cache.path())
    );
    let still = pull(
        &stores,
        &"m@1".parse().expect("ref"),
        &pull_options(cache.path()),
    )
    .await
    .expect("v1 keeps serving");
    assert_eq!(still.dir, serving.dir);
    assert_eq!(still.bytes_fetched, 0);
    same_tree(v1.path(), &still.dir);

    // Through a channel: moved to the corrupt v2, the pull is refused, and
    // the cache's resolution of the channel stays v1, so a start that
    // prefers the cache (a restart) serves v1.
    store.promote("m", "1", "stable").await.expect("stable → 1");
    let stable: ModelRef = "m:stable".parse().expect("ref");
    pull(&stores, &stable, &pull_options(cache.path()))
        .await
        .expect("pull stable (v1)");
    store.promote("m", "2", "stable").await.expect("stable → 2");
    pull(&stores, &stable, &pull_options(cache.path()))
        .await
        .expect_err("stable now names the corrupt v2");
    let restart = PullOptions {
        prefer_cache: true,
        ..pull_options(cache.path())
    };
    let restarted = pull(&stores, &stable, &restart)
        .await
        .expect("a restart serves the last verified version");
    assert_eq!(restarted.dir, serving.dir);
}

#[tokio::test]
async fn an_interrupted_push_leaves_no_version_and_resumes() {
    let server = S3Server::start().await;
    let store = model_store(&server, S3Server::BUCKET);
    let source = model_dir(5, 11 << 20);

    // Cut the push off (the future dropped, as a crash would leave it)
    // once its first file is in the store.
    let progress = Arc::new(Counter::default());
    let watched = progress.clone();
    let options = push_options("big", "7");
    let push = store.push(source.path(), &options, progress.as_ref());
    let cut = async move {
        while watched.files_done.load(Ordering::SeqCst) < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::select! {
        result = push => panic!("the push finished before it was cut: {result:?}"),
        () = cut => {}
    }
    assert!(store.versions("big").await.expect("versions").is_empty());
    let missing = store.manifest("big", "7").await;
    assert!(
        matches!(missing, Err(ModelError::VersionNotFound { .. })),
        "{missing:?}"
    );
    let cache = tempfile::tempdir().expect("tempdir");
    let none = pull(
        std::slice::from_ref(&store),
        &"big@7".parse().expect("ref"),
        &pull_options(cache.path()),
    )
    .await;
    assert!(none.is_err());

    // The second run skips what is there and finishes.
    let again = Counter::default();
    let report = store
        .push(source.path(), &options, &again)
        .await
        .expect("resume");
    assert!(!report.skipped.is_empty(), "{report:?}");
    assert_eq!(report.skipped.len() + report.uploaded.len(), 3);
    assert!(report.bytes_uploaded < report.manifest.total_size());
    assert!(store.verify("big", "7", &()).await.expect("verify").is_ok());
}

/// Progress that blocks the copy (its worker thread) once `after` bytes
/// went through, until told to go on (or 30 s passed).
struct Gate {
    after: u64,
    bytes: AtomicU64,
    reached: std::sync::atomic::AtomicBool,
    resume: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Progress for Gate {
    fn event(&self, event: ProgressEvent) {
        if let ProgressEvent::Bytes(n) = event
            && self.bytes.fetch_add(n, Ordering::SeqCst) + n >= self.after
            && !self.reached.swap(true, Ordering::SeqCst)
            && let Ok(resume) = self.resume.lock()
        {
            let _ = resume.recv_timeout(Duration::from_secs(30));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_is_complete_verified_idempotent_and_survives_the_destination_going_away() {
    let (eu, mut us) = tokio::join!(S3Server::start(), S3Server::start());
    let from = model_store(&eu, S3Server::BUCKET);
    let to = model_store(&us, S3Server::BUCKET);
    let a = model_dir(6, 2 << 20);
    let b = model_dir(7, 24 << 20);
    let mut first = push_options("m", "1");
    first.channel = Some("stable".into());
    from.push(a.path(), &first, &()).await.expect("push 1");

    let options = ReplicateOptions {
        part_size: 5 << 20,
        concurrency: 2,
        deadline: Duration::from_secs(60),
        ..ReplicateOptions::default()
    };
    let report = replicate(&from, &to, &options, &())
        .await
        .expect("replicate");
    assert_eq!(report.copied(), 1, "{report:?}");
    assert!(report.is_complete());
    assert_eq!(
        report.channels_updated,
        vec![("m".into(), "stable".into(), "1".into())]
    );
    assert!(to.verify("m", "1", &()).await.expect("verify").is_ok());
    assert_eq!(
        to.channel("m", "stable").await.expect("channel").version,
        "1"
    );

    // A second, larger version; the destination goes away mid-copy.
    let mut second = push_options("m", "2");
    second.parent = Some("1".into());
    from.push(b.path(), &second, &()).await.expect("push 2");
    // The copy pauses once 6 MiB are through, until the destination is
    // stopped: so it really goes away mid-copy, however fast the copy.
    let (resume, paused) = std::sync::mpsc::channel::<()>();
    let gate = Arc::new(Gate {
        after: 6 << 20,
        bytes: AtomicU64::new(0),
        reached: std::sync::atomic::AtomicBool::new(false),
        resume: std::sync::Mutex::new(paused),
    });
    let run = {
        let (from, to, options, gate) = (from.clone(), to.clone(), options.clone(), gate.clone());
        tokio::spawn(async move { replicate(&from, &to, &options, gate.as_ref()).await })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !gate.reached.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "replication made no progress");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    us.stop();
    let _ = resume.send(());
    let cut = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("fails within its deadlines")
        .expect("joins")
        .expect("the source is fine");
    assert!(!cut.is_complete(), "{cut:?}");
    let v2 = cut
        .versions
        .iter()
        .find(|v| v.version == "2")
        .expect("v2 reported");
    assert!(matches!(v2.status, VersionStatus::Failed(_)), "{v2:?}");

    // Back again: v2 is not there (no manifest), and the next run finishes
    // it, verified.
    us.restart().await;
    let to = model_store(&us, S3Server::BUCKET);
    assert_eq!(to.versions("m").await.expect("versions"), vec!["1"]);
    let resumed = replicate(&from, &to, &options, &())
        .await
        .expect("replicate");
    assert!(resumed.is_complete(), "{resumed:?}");
    assert_eq!(resumed.copied(), 1, "{resumed:?}");
    assert!(to.verify("m", "2", &()).await.expect("verify").is_ok());
    assert_eq!(
        to.manifest("m", "2").await.expect("manifest"),
        from.manifest("m", "2").await.expect("manifest")
    );

    // Idempotent: nothing left to copy.
    let third = replicate(&from, &to, &options, &())
        .await
        .expect("replicate");
    assert_eq!(third.copied(), 0, "{third:?}");
    assert!(
        third
            .versions
            .iter()
            .all(|v| v.status == VersionStatus::Present && v.lag.is_zero())
    );
    assert!(third.channels_updated.is_empty());
}

#[tokio::test]
async fn pull_falls_back_to_the_next_store_when_the_first_is_stopped() {
    let (mut near, far) = tokio::join!(S3Server::start(), S3Server::start());
    let first = model_store(&near, S3Server::BUCKET);
    let second = model_store(&far, S3Server::BUCKET);
    let source = model_dir(8, 2 << 20);
    for store in [&first, &second] {
        let mut options = push_options("m", "1");
        options.channel = Some("stable".into());
        store
            .push(source.path(), &options, &())
            .await
            .expect("push");
    }
    near.stop();
    let both = [first.clone(), second.clone()];
    let resolved = resolve(&both, &"m:stable".parse().expect("ref"))
        .await
        .expect("the second store answers");
    assert_eq!(resolved, "1");
    let cache = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let pulled = pull(
        &[first.clone(), second.clone()],
        &"m:stable".parse::<ModelRef>().expect("ref"),
        &pull_options(cache.path()),
    )
    .await
    .expect("from the second store");
    assert_eq!(pulled.source, second.label());
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    same_tree(source.path(), &pulled.dir);

    // A version only the second store has is found there too.
    let only = model_dir(9, 1000);
    second
        .push(only.path(), &push_options("m", "2"), &())
        .await
        .expect("push");
    let pulled = pull(
        &[first, second],
        &"m@2".parse().expect("ref"),
        &pull_options(cache.path()),
    )
    .await
    .expect("from the second store");
    same_tree(only.path(), &pulled.dir);
}

#[tokio::test]
async fn file_stores_push_pull_and_resume_without_metadata() {
    let root = tempfile::tempdir().expect("tempdir");
    let spec = StoreSpec::parse_with(
        &format!("file://{}", root.path().display()),
        StoreOptions::default(),
    )
    .expect("spec");
    let store = ModelStore::open(&spec).expect("open");
    let source = model_dir(10, 6 << 20);
    store
        .push(source.path(), &push_options("local", "1"), &())
        .await
        .expect("push");
    // Layout on disk, as documented.
    let version: PathBuf = root.path().join("models/local/1");
    assert!(version.join("manifest.json").is_file());
    assert!(version.join("tokenizer/vocab.txt").is_file());
    // Remove the manifest: the files are re-read (no metadata here) and
    // skipped.
    std::fs::remove_file(version.join("manifest.json")).expect("rm");
    let report = store
        .push(source.path(), &push_options("local", "1"), &())
        .await
        .expect("again");
    assert_eq!(report.skipped.len(), 3, "{report:?}");
    let cache = tempfile::tempdir().expect("tempdir");
    let pulled = pull(
        &[store],
        &"local@1".parse().expect("ref"),
        &pull_options(cache.path()),
    )
    .await
    .expect("pull");
    same_tree(source.path(), &pulled.dir);
}
