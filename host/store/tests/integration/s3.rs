//! The store against a real S3-compatible server (SeaweedFS on loopback):
//! round trips, size caps, prefixes, credentials, and pinned fetches into
//! the local cache.

use breakwater_store::testing::S3Server;
use breakwater_store::{
    ObjectUrl, Sha256Digest, Store, StoreError, StoreOptions, StoreUrl, fetch_verified,
};

const LIMIT: u64 = 1 << 20;

fn entries(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn object_url(bucket: &str, key: &str) -> ObjectUrl {
    format!("s3://{bucket}/{key}")
        .parse()
        .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn round_trip_with_size_cap_and_prefix() {
    let server = S3Server::start().await;
    let store = server.store(S3Server::BUCKET);
    let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    store.put("dir/blob.bin", body.clone()).await.expect("put");
    let back = store.get("dir/blob.bin", LIMIT).await.expect("get");
    assert_eq!(back.as_ref(), body.as_slice());

    let capped = store.get("dir/blob.bin", 99_999).await;
    assert!(
        matches!(capped, Err(StoreError::TooLarge { limit: 99_999, .. })),
        "{capped:?}"
    );
    let missing = store.get("dir/none.bin", LIMIT).await;
    assert!(
        matches!(missing, Err(StoreError::NotFound { .. })),
        "{missing:?}"
    );

    // A store with a prefix writes under it.
    let prefixed: StoreUrl = format!("s3://{}/eu/models", S3Server::BUCKET)
        .parse()
        .expect("url");
    let prefixed = Store::open(&prefixed, &server.options()).expect("open");
    prefixed
        .put("a.txt", &b"under a prefix"[..])
        .await
        .expect("put");
    let seen = store.get("eu/models/a.txt", LIMIT).await.expect("get");
    assert_eq!(seen.as_ref(), b"under a prefix");

    // Buckets made through the S3 API work like the first one.
    server.create_bucket("second-bucket").await;
    let second = server.store("second-bucket");
    second.put("x", &b"x"[..]).await.expect("put");
    assert_eq!(second.get("x", 1).await.expect("get").as_ref(), b"x");
}

#[tokio::test]
async fn wrong_credentials_are_refused_with_a_clear_error() {
    let server = S3Server::start().await;
    server
        .store(S3Server::BUCKET)
        .put("k", &b"v"[..])
        .await
        .expect("put");
    let options = StoreOptions {
        secret_access_key: Some("not-the-secret".to_owned()),
        ..server.options()
    };
    let url: StoreUrl = format!("s3://{}", S3Server::BUCKET).parse().expect("url");
    let store = Store::open(&url, &options).expect("open");
    let error = store.get("k", LIMIT).await.expect_err("a bad signature");
    let message = error.to_string();
    assert!(matches!(error, StoreError::Request { .. }), "{message}");
    assert!(
        message.contains(&format!("s3://{}/k", S3Server::BUCKET)),
        "{message}"
    );
}

#[tokio::test]
async fn fetch_verified_caches_refuses_mismatches_and_works_offline() {
    let mut server = S3Server::start().await;
    let store = server.store(S3Server::BUCKET);
    let artifact = b"\0asm pretend component bytes".to_vec();
    let pin = Sha256Digest::of(&artifact);
    store
        .put("plugins/waf.wasm", artifact.clone())
        .await
        .expect("put");
    let url = object_url(S3Server::BUCKET, "plugins/waf.wasm");
    let cache = tempfile::tempdir().expect("tempdir");
    let options = server.options();

    // A wrong pin: refused, nothing left in the cache (no partial file).
    let wrong = Sha256Digest::of(b"something else");
    let refused = fetch_verified(&url, &wrong, cache.path(), LIMIT, &options).await;
    match &refused {
        Err(StoreError::Mismatch {
            expected, actual, ..
        }) => {
            assert_eq!((*expected, *actual), (wrong, pin));
            let message = refused.as_ref().map(|_| ()).unwrap_err().to_string();
            assert!(message.contains("refusing"), "{message}");
            assert!(message.contains(&pin.to_string()), "{message}");
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
    assert_eq!(entries(cache.path()), Vec::<String>::new());

    // Over the size limit: refused before anything is written.
    let small = fetch_verified(&url, &pin, cache.path(), 10, &options).await;
    assert!(
        matches!(small, Err(StoreError::TooLarge { .. })),
        "{small:?}"
    );
    assert_eq!(entries(cache.path()), Vec::<String>::new());

    // The right pin: fetched into `<cache>/<sha256>.wasm`.
    let path = fetch_verified(&url, &pin, cache.path(), LIMIT, &options)
        .await
        .expect("fetch");
    assert_eq!(path, cache.path().join(format!("{pin}.wasm")));
    assert_eq!(std::fs::read(&path).expect("read"), artifact);
    assert_eq!(entries(cache.path()), vec![format!("{pin}.wasm")]);

    // With the server gone, the cache answers without the network.
    server.stop();
    let offline = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        fetch_verified(&url, &pin, cache.path(), LIMIT, &options),
    )
    .await
    .expect("a cache hit does not wait on the network")
    .expect("served from the cache");
    assert_eq!(offline, path);

    // And an object that is not cached fails, within its deadlines.
    let other = Sha256Digest::of(b"never fetched");
    let started = std::time::Instant::now();
    let unreachable = fetch_verified(&url, &other, cache.path(), LIMIT, &options).await;
    assert!(
        matches!(unreachable, Err(StoreError::Request { .. })),
        "{unreachable:?}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(entries(cache.path()), vec![format!("{pin}.wasm")]);
}
