//! The shared cache tier (L3) through real nodes sharing one real Redis:
//! `X-Cache-Tier`, and purges through the admin endpoint, including one
//! that cannot reach Redis.
//!
//! The nodes run in this one process, so the Redis metrics (one registry)
//! cannot say which node's link is up; the tests learn it from what the
//! nodes do instead.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use breakwater_cluster::testing::RedisServer;
use breakwater_edge::RunningNode;
use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::common::{PATIENCE, admin_url, client, json, start_node_in, url};

const KEY_PREFIX: &str = "it:";
const HOST: &str = "shop.test";

/// An origin whose answers may be cached for ten minutes and carry their
/// path as the body; it counts what it is asked.
struct Origin {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
}

impl Origin {
    async fn start() -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = requests.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        counted.fetch_add(1, Ordering::SeqCst);
                        let path = hyper::Request::uri(&request).path().to_owned();
                        async move {
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .header("cache-control", "max-age=600")
                                    .header("surrogate-key", "everything")
                                    .body(Full::new(Bytes::from(path)))
                                    .expect("response"),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Origin { addr, requests }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

async fn node(origin: &Origin, redis: &RedisServer, dir: &Path) -> RunningNode {
    let toml = format!(
        r#"
[[listener]]
address = "127.0.0.1:0"

[admin]
address = "127.0.0.1:0"
token = "secret"

[cluster]
redis_url = "{redis}"
key_prefix = "{KEY_PREFIX}"
shared_counters = false
# Roomy, so that a busy machine never turns a hit into a miss here.
budget = "250ms"
health_interval = "50ms"

[[route]]
prefix = "/"
pool = "origin"
cache = true

[[pool]]
name = "origin"
endpoints = ["http://{origin}"]
"#,
        redis = redis.url(),
        origin = origin.addr,
    );
    start_node_in(&toml, dir).await
}

struct Got {
    status: u16,
    x_cache: String,
    tier: String,
}

async fn get(node: &RunningNode, path: &str, only_if_cached: bool) -> Got {
    let mut request = client().get(url(node, path)).header("host", HOST);
    if only_if_cached {
        request = request.header("cache-control", "only-if-cached");
    }
    let response = request.send().await.expect("request");
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
    }
}

async fn inspector(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("a Redis client")
        .get_multiplexed_async_connection()
        .await
        .expect("a connection to Redis")
}

/// Whether the answer to `path` (no `Vary`) is in Redis.
async fn in_redis(connection: &mut redis::aio::MultiplexedConnection, path: &str) -> bool {
    let key = format!("{KEY_PREFIX}cache:e:{HOST}{path}\0");
    redis::cmd("EXISTS")
        .arg(key)
        .query_async::<i64>(connection)
        .await
        .expect("EXISTS")
        == 1
}

/// Caches `{base}-N` through `node` until one reaches Redis, and returns
/// it: a node's link comes up a moment after it starts, and a write made
/// before that is dropped, as it would be for a Redis that is down.
async fn shared_through(
    node: &RunningNode,
    redis: &mut redis::aio::MultiplexedConnection,
    base: &str,
) -> String {
    let started = Instant::now();
    for attempt in 0.. {
        let path = format!("{base}-{attempt}");
        assert_eq!(get(node, &path, false).await.x_cache, "MISS");
        let tried = Instant::now();
        while tried.elapsed() < Duration::from_secs(2) {
            if in_redis(redis, &path).await {
                return path;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(started.elapsed() < PATIENCE, "nothing reached Redis");
    }
    unreachable!("the loop returns or fails")
}

/// Waits until `node` answers `path` from the cache without going
/// upstream (`only-if-cached` stores nothing on a miss).
async fn until_cached(node: &RunningNode, path: &str) -> Got {
    let started = Instant::now();
    loop {
        let got = get(node, path, true).await;
        if got.status == 200 {
            return got;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "{path} never reached the node"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn purge(node: &RunningNode, body: serde_json::Value) -> (u16, serde_json::Value) {
    let response = client()
        .post(admin_url(node, "/admin/purge"))
        .bearer_auth("secret")
        .body(body.to_string())
        .send()
        .await
        .expect("purge");
    let status = response.status().as_u16();
    (status, json(&response.bytes().await.expect("body")))
}

#[tokio::test]
async fn nodes_share_answers_and_purges_and_say_which_tier_answered() {
    let mut server = RedisServer::start();
    let mut redis = inspector(&server).await;
    let origin = Origin::start().await;
    let dirs = [(); 3].map(|()| tempfile::tempdir().expect("temp dir"));
    let a = node(&origin, &server, dirs[0].path()).await;
    let b = node(&origin, &server, dirs[1].path()).await;
    let c = node(&origin, &server, dirs[2].path()).await;

    let page = shared_through(&a, &mut redis, "/page").await;
    let hit = get(&a, &page, false).await;
    assert_eq!((hit.x_cache.as_str(), hit.tier.as_str()), ("HIT", "memory"));
    let shared = until_cached(&b, &page).await;
    assert_eq!(
        (shared.x_cache.as_str(), shared.tier.as_str()),
        ("HIT", "shared")
    );
    let again = get(&b, &page, false).await;
    assert_eq!(
        (again.x_cache.as_str(), again.tier.as_str()),
        ("HIT", "memory")
    );

    // C proves its link is up on another answer before the purge.
    let other = shared_through(&a, &mut redis, "/other").await;
    assert_eq!(until_cached(&c, &other).await.tier, "shared");
    let before = origin.requests();
    let (status, body) = purge(&a, serde_json::json!({ "key": format!("{HOST}{page}") })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["purged"]["memory"], 1, "{body}");
    assert_eq!(body["purged"]["shared"], 1, "{body}");
    let missed = get(&c, &page, false).await;
    assert_eq!(
        (missed.x_cache.as_str(), missed.tier.as_str()),
        ("MISS", "")
    );
    assert_eq!(origin.requests(), before + 1, "C went to the origin");

    // Without Redis a purge still empties the node's own tiers, and says
    // that the shared tier missed it.
    server.kill();
    let (status, body) = purge(&a, serde_json::json!({ "tag": "everything" })).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["purged"]["shared"], serde_json::Value::Null, "{body}");
    assert_eq!(body["error"]["code"], "shared_cache_unavailable", "{body}");
    assert_eq!(get(&a, &other, false).await.x_cache, "MISS");
    for node in [a, b, c] {
        node.shutdown().await;
    }
}
