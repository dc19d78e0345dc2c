//! L3 against a real `redis-server`: each "node" is its own [`Tiers`] with
//! its own link, as separate edge processes would be. Nothing here waits
//! on a wall-clock window: conditions are polled, within [`PATIENCE`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use breakwater_cluster::testing::{FaultProxy, RedisServer};
use breakwater_cluster::{Redis, RedisSettings};
use bytes::Bytes;
use edge_config::{CacheConfig, SharedCacheMode};
use http::{HeaderMap, HeaderValue, StatusCode};

use crate::cache::entry::Entry;
use crate::cache::policy::{now_ms, vary_key};
use crate::cache::store::{Selector, Tier, Tiers, storage_key};
use crate::cluster::SharedCacheSettings;

/// Upper bound for anything a test waits on; generous for a loaded machine.
const PATIENCE: Duration = Duration::from_secs(20);
/// A budget no busy machine misses, for tests about what is shared rather
/// than how fast.
const ROOMY_BUDGET: Duration = Duration::from_millis(250);
const KEY_PREFIX: &str = "test:";

struct Node {
    tiers: Tiers,
    redis: Redis,
}

struct NodeSettings {
    mode: SharedCacheMode,
    cache: CacheConfig,
    max_object_bytes: u64,
    budget: Duration,
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            mode: SharedCacheMode::All,
            cache: CacheConfig::default(),
            max_object_bytes: 1024 * 1024,
            budget: ROOMY_BUDGET,
        }
    }
}

/// A node whose link is up.
async fn node(server: &RedisServer, settings: NodeSettings) -> Node {
    node_at(server.url(), settings).await
}

/// A node reaching Redis at `url`, once its link is up.
async fn node_at(url: String, settings: NodeSettings) -> Node {
    let redis = Redis::start(RedisSettings {
        url,
        key_prefix: KEY_PREFIX.to_owned(),
        budget: settings.budget,
        background_timeout: Duration::from_secs(2),
        health_interval: Duration::from_millis(50),
        ..RedisSettings::default()
    })
    .expect("the Redis link");
    eventually("the link comes up", async || redis.is_up().then_some(())).await;
    let tiers = Tiers::open(
        &settings.cache,
        Some(SharedCacheSettings {
            redis: redis.clone(),
            mode: settings.mode,
            max_object_bytes: settings.max_object_bytes,
            ttl_max: Duration::from_secs(3600),
        }),
    )
    .expect("the tiers");
    Node { tiers, redis }
}

async fn fresh_node(server: &RedisServer) -> Node {
    node(server, NodeSettings::default()).await
}

/// Polls `probe` every 20 ms until it gives something; fails the test
/// with `what` after [`PATIENCE`].
async fn eventually<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "{what}: not within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn entry(url: &str, body: &str, tags: &[&str]) -> Entry {
    let now = now_ms();
    Entry {
        status: StatusCode::OK,
        headers: HeaderMap::new(),
        chunks: vec![Bytes::from(body.to_owned())],
        request_time_ms: now,
        response_time_ms: now,
        initial_age_ms: 0,
        freshness_ms: 60_000,
        swr_ms: 0,
        sie_ms: 0,
        url: url.to_owned(),
        tags: tags.iter().map(|tag| (*tag).to_owned()).collect(),
        ttl_by_plugin: false,
        tokens: (0, 0),
    }
}

/// Stores a `Vary`-less answer whose key is its URL.
async fn store(node: &Node, url: &str, body: &str, tags: &[&str]) {
    node.tiers
        .insert(url, Vec::new(), "", entry(url, body, tags))
        .await;
}

async fn lookup(node: &Node, key: &str) -> Option<(String, Tier)> {
    lookup_with(node, key, &HeaderMap::new()).await
}

async fn lookup_with(node: &Node, key: &str, headers: &HeaderMap) -> Option<(String, Tier)> {
    let (entry, tier) = node.tiers.lookup(key, headers).await?;
    let body = entry.chunks.concat();
    Some((String::from_utf8_lossy(&body).into_owned(), tier))
}

/// A plain connection, to look at (and damage) what the tier wrote.
async fn inspector(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("a Redis client")
        .get_multiplexed_async_connection()
        .await
        .expect("a connection to Redis")
}

fn raw_key(storage_key: &str) -> Vec<u8> {
    [KEY_PREFIX.as_bytes(), b"cache:e:", storage_key.as_bytes()].concat()
}

async fn exists(connection: &mut redis::aio::MultiplexedConnection, storage_key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(raw_key(storage_key))
        .query_async::<i64>(connection)
        .await
        .expect("EXISTS")
        == 1
}

/// Waits until the response stored under `url` (no `Vary`) is in Redis.
async fn written(connection: &mut redis::aio::MultiplexedConnection, url: &str) {
    let response = storage_key(url, "");
    eventually(&format!("{url} reaches Redis"), async || {
        exists(connection, &response).await.then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_answer_stored_on_one_node_is_a_shared_hit_on_another_then_a_memory_hit() {
    let server = RedisServer::start();
    let a = fresh_node(&server).await;
    let b = fresh_node(&server).await;

    store(&a, "shop.test/plain", "plain body", &[]).await;
    let names = vec!["accept-language".to_owned()];
    let mut english = HeaderMap::new();
    english.insert("accept-language", HeaderValue::from_static("en"));
    let mut german = HeaderMap::new();
    german.insert("accept-language", HeaderValue::from_static("de"));
    for (headers, body) in [(&english, "hello"), (&german, "hallo")] {
        a.tiers
            .insert(
                "shop.test/vary",
                names.clone(),
                &vary_key(&names, headers),
                entry("shop.test/vary", body, &[]),
            )
            .await;
    }

    let plain = eventually("node B finds the plain answer", async || {
        lookup(&b, "shop.test/plain").await
    })
    .await;
    assert_eq!(plain, ("plain body".to_owned(), Tier::Shared));
    assert_eq!(
        lookup(&b, "shop.test/plain").await,
        Some(("plain body".to_owned(), Tier::Memory)),
        "an L3 hit is copied into memory"
    );

    for (headers, body) in [(&german, "hallo"), (&english, "hello")] {
        let found = eventually("node B finds each variant", async || {
            lookup_with(&b, "shop.test/vary", headers).await
        })
        .await;
        assert_eq!(found, (body.to_owned(), Tier::Shared));
    }
}

#[tokio::test]
async fn a_corrupt_shared_value_is_a_miss_and_is_deleted() {
    let server = RedisServer::start();
    let mut redis = inspector(&server).await;
    let a = fresh_node(&server).await;
    store(&a, "shop.test/rot", "rotting", &[]).await;
    written(&mut redis, "shop.test/rot").await;

    let key = raw_key(&storage_key("shop.test/rot", ""));
    let mut value: Vec<u8> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .expect("GET");
    let at = value
        .windows(7)
        .position(|window| window == b"rotting")
        .expect("the body is in the value");
    value[at] ^= 0x01;
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(value)
        .arg("KEEPTTL")
        .query_async(&mut redis)
        .await
        .expect("SET");

    let b = fresh_node(&server).await;
    assert_eq!(lookup(&b, "shop.test/rot").await, None, "never served");
    eventually("the corrupt value is deleted", async || {
        (!exists(&mut redis, &storage_key("shop.test/rot", "")).await).then_some(())
    })
    .await;
}

#[tokio::test]
async fn bodies_over_the_shared_cap_stay_on_their_node() {
    let server = RedisServer::start();
    let mut redis = inspector(&server).await;
    let a = node(
        &server,
        NodeSettings {
            max_object_bytes: 64,
            ..NodeSettings::default()
        },
    )
    .await;
    store(&a, "shop.test/big", &"x".repeat(65), &[]).await;
    store(&a, "shop.test/small", &"x".repeat(64), &[]).await;
    written(&mut redis, "shop.test/small").await;
    // Too big is decided before the queue: nothing of it will come.
    assert!(!exists(&mut redis, &storage_key("shop.test/big", "")).await);
    assert!(!exists(&mut redis, "shop.test/big").await);
    assert_eq!(
        lookup(&a, "shop.test/big").await.map(|(_, tier)| tier),
        Some(Tier::Memory),
        "its own node keeps it"
    );
}

#[tokio::test]
async fn purges_by_key_tag_and_prefix_reach_the_shared_tier() {
    let server = RedisServer::start();
    let mut redis = inspector(&server).await;
    let a = fresh_node(&server).await;
    let urls = [
        ("shop.test/p/one", &["red"][..]),
        ("shop.test/p/two", &["blue"][..]),
        ("shop.test/q/three", &["red"][..]),
        ("other.test/p/four", &[][..]),
        ("shop.test/q/six", &[][..]),
        ("other.test/r/seven", &[][..]),
    ];
    for (url, tags) in urls {
        store(&a, url, url, tags).await;
    }
    let names = vec!["accept".to_owned()];
    let mut variants = Vec::new();
    for accept in ["text/html", "application/json"] {
        let mut headers = HeaderMap::new();
        headers.insert("accept", HeaderValue::from_static(accept));
        let vary = vary_key(&names, &headers);
        a.tiers
            .insert(
                "shop.test/k/five",
                names.clone(),
                &vary,
                entry("shop.test/k/five", accept, &[]),
            )
            .await;
        variants.push(storage_key("shop.test/k/five", &vary));
    }
    for (url, _) in urls {
        written(&mut redis, url).await;
    }
    for variant in &variants {
        eventually("both variants reach Redis", async || {
            exists(&mut redis, variant).await.then_some(())
        })
        .await;
    }

    let purged = a.tiers.purge(Selector::Key("shop.test/k/five")).await;
    assert_eq!(purged.shared, Some(Ok(2)), "both variants");
    for variant in &variants {
        assert!(!exists(&mut redis, variant).await);
    }
    assert!(
        !exists(&mut redis, "shop.test/k/five").await,
        "and its Vary record"
    );

    let purged = a.tiers.purge(Selector::Tag("red")).await;
    assert_eq!(purged.shared, Some(Ok(2)));
    let c = fresh_node(&server).await;
    assert_eq!(lookup(&c, "shop.test/p/one").await, None);
    assert_eq!(lookup(&c, "shop.test/q/three").await, None);

    // A path prefix matches on any host; a host prefix on its host.
    assert_eq!(
        a.tiers.purge(Selector::UrlPrefix("/p/")).await.shared,
        Some(Ok(0))
    );
    assert!(
        a.tiers
            .purge(Selector::UrlPrefix("other.test/r"))
            .await
            .shared
            .is_some_and(|result| result.is_ok())
    );
    let d = fresh_node(&server).await;
    for gone in ["shop.test/p/two", "other.test/p/four", "other.test/r/seven"] {
        assert_eq!(lookup(&d, gone).await, None, "{gone} was purged");
    }
    assert_eq!(
        lookup(&d, "shop.test/q/six").await,
        Some(("shop.test/q/six".to_owned(), Tier::Shared)),
        "what no purge named stays"
    );
    assert!(
        !exists(&mut redis, &storage_key("shop.test/p/two", "")).await,
        "a lookup deletes what a prefix purge retired"
    );

    // A purge retires what was written before it, not what comes after.
    // Redis's clock has a millisecond grain: an entry written in the
    // purge's own millisecond counts as purged, so let one pass.
    tokio::time::sleep(Duration::from_millis(5)).await;
    store(&a, "shop.test/p/new", "new", &[]).await;
    written(&mut redis, "shop.test/p/new").await;
    let e = fresh_node(&server).await;
    assert_eq!(
        lookup(&e, "shop.test/p/new").await,
        Some(("new".to_owned(), Tier::Shared))
    );
}

#[tokio::test]
async fn a_dead_redis_costs_lookups_nothing_and_a_restarted_one_is_used_again() {
    let mut server = RedisServer::start();
    // The default budget (5 ms): a dead Redis must not cost even that.
    let request_budget = || NodeSettings {
        budget: RedisSettings::default().budget,
        ..NodeSettings::default()
    };
    let a = node(&server, request_budget()).await;
    let b = node(&server, request_budget()).await;
    store(&a, "shop.test/before", "before", &[]).await;
    eventually("node B finds the answer", async || {
        lookup(&b, "shop.test/before").await
    })
    .await;

    server.kill();
    let mut slowest = Duration::ZERO;
    for i in 0..50 {
        let started = Instant::now();
        assert_eq!(lookup(&b, &format!("shop.test/dead/{i}")).await, None);
        slowest = slowest.max(started.elapsed());
    }
    assert!(
        slowest < Duration::from_millis(250),
        "a lookup waited {slowest:?} on a dead Redis"
    );
    assert!(!b.redis.is_up(), "the link knows Redis is gone");
    assert_eq!(
        lookup(&b, "shop.test/before").await.map(|(_, tier)| tier),
        Some(Tier::Memory),
        "what a node holds itself is still served"
    );
    store(&a, "shop.test/while-down", "lost", &[]).await;
    let purged = a.tiers.purge(Selector::Key("shop.test/before")).await;
    assert!(
        matches!(purged.shared, Some(Err(_))),
        "a purge says it missed the shared tier"
    );

    server.restart();
    let restarted = Instant::now();
    eventually("both links come up again", async || {
        (a.redis.is_up() && b.redis.is_up()).then_some(())
    })
    .await;
    eprintln!("links up {:?} after the restart", restarted.elapsed());
    store(&a, "shop.test/after", "after", &[]).await;
    let found = eventually(
        "node B finds an answer stored after the restart",
        async || lookup(&b, "shop.test/after").await,
    )
    .await;
    assert_eq!(found, ("after".to_owned(), Tier::Shared));
    eprintln!(
        "shared hits again {:?} after the restart",
        restarted.elapsed()
    );
}

/// Lookups through `node` for paths no one stored: each returns the
/// longest one took.
async fn slowest_miss(node: &Node, base: &str) -> Duration {
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let started = Instant::now();
        assert_eq!(lookup(node, &format!("{base}/{i}")).await, None);
        slowest = slowest.max(started.elapsed());
    }
    slowest
}

#[tokio::test]
async fn a_slow_or_cut_off_redis_costs_a_lookup_at_most_its_budget_and_recovers() {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(server.address()).await;
    let request_budget = || NodeSettings {
        budget: RedisSettings::default().budget,
        ..NodeSettings::default()
    };
    let a = node(&server, request_budget()).await;
    let b = node_at(proxy.url(), request_budget()).await;
    // Far beyond the budget and the bound below, so that a lookup that
    // waited for Redis cannot pass for one slowed by a busy machine.
    let slow = Duration::from_secs(1);
    let bound = Duration::from_millis(500);

    proxy.set_delay(slow);
    let slowest = slowest_miss(&b, "shop.test/slow").await;
    assert!(
        slowest < bound,
        "a lookup waited {slowest:?} on a slow Redis"
    );
    assert!(
        !b.redis.is_up(),
        "a call past its budget takes the link down"
    );

    proxy.set_delay(Duration::ZERO);
    store(&a, "shop.test/fast-again", "fast", &[]).await;
    let found = eventually("node B reads the shared tier again", async || {
        lookup(&b, "shop.test/fast-again").await
    })
    .await;
    assert_eq!(found, ("fast".to_owned(), Tier::Shared));

    proxy.drop_connections(true);
    let slowest = slowest_miss(&b, "shop.test/cut").await;
    assert!(slowest < bound, "a lookup waited {slowest:?} on a cut link");
    eventually("the link knows it is cut", async || {
        (!b.redis.is_up()).then_some(())
    })
    .await;

    proxy.drop_connections(false);
    store(&a, "shop.test/reconnected", "back", &[]).await;
    let found = eventually("node B reads the shared tier again", async || {
        lookup(&b, "shop.test/reconnected").await
    })
    .await;
    assert_eq!(found, ("back".to_owned(), Tier::Shared));
}

fn evicted_mode(cache: CacheConfig) -> NodeSettings {
    NodeSettings {
        mode: SharedCacheMode::Evicted,
        cache,
        ..NodeSettings::default()
    }
}

#[tokio::test]
async fn evicted_mode_shares_an_entry_that_outlives_the_memory_ceiling() {
    let server = RedisServer::start();
    let mut redis = inspector(&server).await;
    let a = node(
        &server,
        evicted_mode(CacheConfig {
            memory_ttl_max: Duration::from_millis(300),
            ..CacheConfig::default()
        }),
    )
    .await;
    store(&a, "shop.test/long", "long", &[]).await;
    eventually(
        "an entry past the memory ceiling reaches Redis",
        async || {
            a.tiers.settle_memory().await;
            exists(&mut redis, &storage_key("shop.test/long", ""))
                .await
                .then_some(())
        },
    )
    .await;
    let b = fresh_node(&server).await;
    assert_eq!(
        lookup(&b, "shop.test/long").await,
        Some(("long".to_owned(), Tier::Shared))
    );
}

#[tokio::test]
async fn evicted_mode_shares_entries_pushed_out_for_room_and_only_those() {
    let server = RedisServer::start();
    let mut redis = inspector(&server).await;
    let a = node(
        &server,
        evicted_mode(CacheConfig {
            memory_bytes: 16 * 1024,
            ..CacheConfig::default()
        }),
    )
    .await;
    let urls: Vec<String> = (0..40).map(|i| format!("shop.test/e/{i}")).collect();
    let body = "x".repeat(1024);
    for url in &urls {
        store(&a, url, &body, &[]).await;
    }
    a.tiers.settle_memory().await;
    let (kept, let_go): (Vec<&String>, Vec<&String>) = urls
        .iter()
        .partition(|url| a.tiers.in_memory(&storage_key(url, "")));
    assert!(!let_go.is_empty(), "16 KiB cannot hold 40 KiB");
    for url in let_go {
        written(&mut redis, url).await;
    }
    for url in kept {
        assert!(
            !exists(&mut redis, &storage_key(url, "")).await,
            "{url} is still in memory but was shared"
        );
    }
}

#[tokio::test]
async fn a_full_write_queue_drops_writes_instead_of_waiting() {
    let (queue, mut receiver) = super::WriteQueue::unattended(16);
    let small = Arc::new(entry("shop.test/q", "fits", &[]));
    for _ in 0..super::WRITE_QUEUE + 10 {
        queue.offer("shop.test/q\0", Vec::new(), small.clone(), u64::MAX);
    }
    let mut queued = 0;
    while receiver.try_recv().is_ok() {
        queued += 1;
    }
    assert_eq!(queued, super::WRITE_QUEUE);
    let big = Arc::new(entry("shop.test/big", &"x".repeat(17), &[]));
    queue.offer("shop.test/big\0", Vec::new(), big, u64::MAX);
    assert!(receiver.try_recv().is_err(), "too big to share");
}
