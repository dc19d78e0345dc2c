//! The shared cache tier (L3) across three `breakwater edge` processes and
//! one real Redis:
//!
//! - an answer cached through node A is a shared hit on node B, and the
//!   origin saw one request; a purge on node A removes it for node C;
//! - Redis killed mid-run: requests are answered without waiting on it,
//!   the metrics say so, and shared hits return by themselves once Redis
//!   is back (empty).
//!
//! Nodes are observed through `only-if-cached` where a miss must not
//! change what they hold: it answers 504 without going upstream or storing.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use breakwater_cluster::testing::RedisServer;
use breakwater_e2e::{
    EdgeProcess, PATIENCE, metric, p99, start_counting_upstream, wait_for_redis_link,
};

const HOST: &str = "shop.test";

/// An edge caching everything from `upstream`, its shared tier in the
/// Redis at `redis_url`; `cluster` holds extra lines of `[cluster]`.
fn edge(upstream: SocketAddr, redis_url: &str, cluster: &str) -> EdgeProcess {
    EdgeProcess::start(&format!(
        r#"
[[listener]]
address = "{{listen}}"

[admin]
address = "{{admin}}"
token = "secret"

[cluster]
redis_url = "{redis_url}"
key_prefix = "e2e:"
shared_counters = false
{cluster}

[[route]]
prefix = "/"
pool = "origin"
cache = true

[[pool]]
name = "origin"
endpoints = ["http://{upstream}"]
"#
    ))
}

/// Three nodes whose links are up.
async fn three_nodes(upstream: SocketAddr, redis: &RedisServer) -> [EdgeProcess; 3] {
    let nodes = [(); 3].map(|()| edge(upstream, &redis.url(), ""));
    for node in &nodes {
        wait_for_redis_link(node, true).await;
    }
    nodes
}

struct Got {
    status: u16,
    x_cache: String,
    tier: String,
    body: String,
}

async fn get(
    client: &reqwest::Client,
    node: &EdgeProcess,
    path: &str,
    only_if_cached: bool,
) -> Got {
    let mut request = client.get(node.url(path)).header("host", HOST);
    if only_if_cached {
        request = request.header("cache-control", "only-if-cached");
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    Got {
        status: response.status().as_u16(),
        x_cache: header("x-cache"),
        tier: header("x-cache-tier"),
        body: response.text().await.expect("body"),
    }
}

fn shared_writes(metrics: &str) -> f64 {
    metric(
        metrics,
        "breakwater_cache_shared_writes_total",
        &[("result", "ok")],
    )
}

/// Caches `{base}-N` through `node` until one is written to Redis, and
/// returns it: a write the link could not make (a Redis just restarted,
/// a call slower than its timeout on a busy machine) is dropped, not
/// retried, so another answer is tried instead.
async fn shared_through(client: &reqwest::Client, node: &EdgeProcess, base: &str) -> String {
    let started = Instant::now();
    for attempt in 0.. {
        let path = format!("{base}-{attempt}");
        let written_before = shared_writes(&node.metrics().await);
        assert_eq!(get(client, node, &path, false).await.x_cache, "MISS");
        let tried = Instant::now();
        while tried.elapsed() < Duration::from_secs(2) {
            if shared_writes(&node.metrics().await) > written_before {
                return path;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(started.elapsed() < PATIENCE, "nothing reached Redis");
    }
    unreachable!("the loop returns or fails")
}

/// Waits until `node` answers `path` from its cache (a lookup can miss
/// its budget on a busy machine; `only-if-cached` makes a miss harmless).
async fn until_cached(
    client: &reqwest::Client,
    node: &EdgeProcess,
    path: &str,
    limit: Duration,
) -> Got {
    let started = Instant::now();
    loop {
        let got = get(client, node, path, true).await;
        if got.status == 200 {
            return got;
        }
        assert!(
            started.elapsed() < limit,
            "{path} never came from the cache within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cached_through_one_node_is_a_shared_hit_on_another_and_a_purge_reaches_a_third()
{
    let redis = RedisServer::start();
    let (upstream, origin_requests) = start_counting_upstream("public, max-age=3600").await;
    let [a, b, c] = three_nodes(upstream, &redis).await;
    let client = client();

    let page = shared_through(&client, &a, "/page").await;
    let hit = until_cached(&client, &b, &page, PATIENCE).await;
    assert_eq!(
        (hit.x_cache.as_str(), hit.tier.as_str(), hit.body.as_str()),
        ("HIT", "shared", page.as_str()),
        "{}",
        b.child.stderr()
    );
    assert_eq!(
        origin_requests.load(Ordering::SeqCst),
        1,
        "one request reached the origin"
    );

    // C shows it reads the shared tier, on another answer, before the
    // purge: reading this one would copy it into C's memory.
    let other = shared_through(&client, &a, "/other").await;
    assert_eq!(
        until_cached(&client, &c, &other, PATIENCE).await.tier,
        "shared"
    );
    let before = origin_requests.load(Ordering::SeqCst);

    let purged = client
        .post(format!("http://{}/admin/purge", a.admin))
        .bearer_auth("secret")
        .body(serde_json::json!({ "key": format!("{HOST}{page}") }).to_string())
        .send()
        .await
        .expect("purge");
    assert_eq!(purged.status(), 200);
    let purged: serde_json::Value =
        serde_json::from_slice(&purged.bytes().await.expect("body")).expect("JSON");
    assert_eq!(purged["purged"]["shared"], 1, "{purged}");

    let after = get(&client, &c, &page, false).await;
    assert_eq!(
        (after.x_cache.as_str(), after.body.as_str()),
        ("MISS", page.as_str())
    );
    assert_eq!(
        origin_requests.load(Ordering::SeqCst),
        before + 1,
        "C went to the origin"
    );
}

/// How long each of `count` misses on `node` takes (each looks in the
/// shared tier, then goes upstream).
async fn miss_latencies(
    client: &reqwest::Client,
    node: &EdgeProcess,
    base: &str,
    count: usize,
) -> Vec<Duration> {
    let mut took = Vec::with_capacity(count);
    for i in 0..count {
        let started = Instant::now();
        let got = get(client, node, &format!("{base}/{i}"), false).await;
        took.push(started.elapsed());
        assert_eq!((got.status, got.x_cache.as_str()), (200, "MISS"));
    }
    took.sort();
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_redis_costs_requests_nothing_and_shared_hits_return_after_a_restart() {
    let mut redis = RedisServer::start();
    let (upstream, origin_requests) = start_counting_upstream("public, max-age=3600").await;
    let [a, b, _c] = three_nodes(upstream, &redis).await;
    let client = client();
    let warm = shared_through(&client, &a, "/warm").await;
    assert_eq!(
        until_cached(&client, &b, &warm, PATIENCE).await.tier,
        "shared"
    );

    let healthy = miss_latencies(&client, &b, "/healthy", 100).await;
    redis.kill();
    let dead = miss_latencies(&client, &b, "/dead", 100).await;
    let added = p99(&dead).saturating_sub(p99(&healthy));
    eprintln!(
        "p99 of a miss: {:?} with Redis, {:?} without (added {added:?})",
        p99(&healthy),
        p99(&dead)
    );
    // A request that waited on the dead Redis would pay a connection
    // attempt or the 250 ms background timeout; the budget is 5 ms.
    assert!(
        added < Duration::from_millis(250),
        "a dead Redis added {added:?} to the p99 of a miss"
    );
    assert!(origin_requests.load(Ordering::SeqCst) >= 201);
    let metrics = b.metrics().await;
    assert_eq!(metric(&metrics, "breakwater_cluster_redis_up", &[]), 0.0);
    assert!(
        metric(
            &metrics,
            "breakwater_cluster_fallback_total",
            &[("feature", "cache")]
        ) > 0.0,
        "skipped lookups are counted:\n{metrics}"
    );
    assert_eq!(
        get(&client, &b, &warm, false).await.tier,
        "memory",
        "what a node holds itself is still served"
    );

    redis.restart();
    let restarted = Instant::now();
    for node in [&a, &b] {
        wait_for_redis_link(node, true).await;
    }
    let links_up = restarted.elapsed();
    let back = shared_through(&client, &a, "/back").await;
    let hit = until_cached(&client, &b, &back, Duration::from_secs(10)).await;
    assert_eq!(hit.tier, "shared");
    eprintln!(
        "after the restart: links up in {links_up:?}, a shared hit in {:?}",
        restarted.elapsed()
    );
}
