//! Shared buckets against a real redis-server: each `LeasedBuckets` is one
//! node (its own link), several share one Redis.
//!
//! Rates here are slow enough (a token per 100 s) that refill never
//! changes a count while a test runs, however busy the machine is; the
//! admitted-rate accuracy over time is tested at the edge.

use std::sync::Arc;
use std::time::{Duration, Instant};

use breakwater_cluster::leases::{Bucket, LeaseSettings, LeasedBuckets};
use breakwater_cluster::testing::{FaultProxy, RedisServer};
use breakwater_cluster::{Redis, RedisSettings, Unavailable};

/// Upper bound on anything a test waits for.
const PATIENCE: Duration = Duration::from_secs(20);

/// A token every 100 s: nothing refills during a test.
const SLOW: f64 = 0.01;

fn settings(url: &str, budget: Duration) -> RedisSettings {
    RedisSettings {
        url: url.to_owned(),
        key_prefix: "test:".to_owned(),
        budget,
        background_timeout: Duration::from_secs(2),
        health_interval: Duration::from_millis(50),
        ..RedisSettings::default()
    }
}

fn lease_settings(window: Duration) -> LeaseSettings {
    LeaseSettings {
        window,
        idle_return: Duration::from_millis(200),
        max_keys: 1000,
    }
}

/// A node on `url`, once its link is up.
async fn node(url: &str, window: Duration) -> Arc<LeasedBuckets> {
    node_with(url, lease_settings(window)).await
}

async fn node_with(url: &str, leases: LeaseSettings) -> Arc<LeasedBuckets> {
    // Generous: a loaded machine must not turn a lease into a fallback.
    let redis = Redis::start(settings(url, Duration::from_secs(2))).expect("a valid URL");
    wait_until("the link is up", || redis.is_up()).await;
    LeasedBuckets::new(redis, leases)
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !condition() {
        assert!(
            started.elapsed() < PATIENCE,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

fn bucket(key: &str, burst: u32) -> Bucket<'_> {
    Bucket {
        key,
        rate_per_second: SLOW,
        burst,
    }
}

/// Leases block for up to the budget: called from a blocking thread, as
/// the plugin host does.
async fn take(node: &Arc<LeasedBuckets>, key: &'static str, burst: u32, cost: u32) -> bool {
    let node = Arc::clone(node);
    tokio::task::spawn_blocking(move || node.take(bucket(key, burst), cost))
        .await
        .expect("the blocking task")
        .expect("Redis answers")
        .allowed
}

async fn take_until_refused(node: &Arc<LeasedBuckets>, key: &'static str, burst: u32) -> u32 {
    let mut taken = 0;
    while take(node, key, burst, 1).await {
        taken += 1;
        assert!(taken <= burst, "took more than the burst");
    }
    taken
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_share_one_bucket() {
    let server = RedisServer::start();
    let nodes = [
        node(&server.url(), Duration::from_millis(50)).await,
        node(&server.url(), Duration::from_millis(50)).await,
        node(&server.url(), Duration::from_millis(50)).await,
    ];
    // The three take in turn from a bucket of 30.
    let mut taken = [0u32; 3];
    'spent: loop {
        for (i, node) in nodes.iter().enumerate() {
            if !take(node, "shared", 30, 1).await {
                break 'spent;
            }
            taken[i] += 1;
        }
    }
    let total: u32 = taken.iter().sum();
    // One node's refusal ends the loop while the others may still hold a
    // token of their lease (a lease here is one token: 0.01/s × 50 ms).
    assert!((28..=30).contains(&total), "took {taken:?}");
    for node in &nodes {
        take_until_refused(node, "shared", 30).await;
    }
    // Every node is refused now, with a wait.
    let refused = {
        let node = Arc::clone(&nodes[1]);
        tokio::task::spawn_blocking(move || node.take(bucket("shared", 30), 1))
            .await
            .expect("the blocking task")
            .expect("Redis answers")
    };
    assert!(!refused.allowed);
    assert!(refused.retry_after_ms > 1000, "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_lease_goes_back_to_the_cluster() {
    let server = RedisServer::start();
    // A 1000 s window makes a lease of 10 tokens at 0.01/s. A's lease
    // goes back after 2 s idle: long enough that it is still A's when B
    // asks, on a busy machine too.
    let a = node_with(
        &server.url(),
        LeaseSettings {
            idle_return: Duration::from_secs(2),
            ..lease_settings(Duration::from_secs(1000))
        },
    )
    .await;
    let b = node(&server.url(), Duration::from_secs(1000)).await;
    assert!(take(&a, "k", 100, 1).await);
    // A holds 9 of its lease, so 90 are left in Redis: 95 do not fit.
    assert!(!take(&b, "k", 100, 95).await);
    // Once A's lease is idle it goes back, and they do.
    let started = Instant::now();
    loop {
        // A refusal cached by B lasts until the bucket would fit 95 at
        // 0.01/s: ask through a fresh node instead.
        let c = node(&server.url(), Duration::from_secs(1000)).await;
        if take(&c, "k", 100, 95).await {
            break;
        }
        assert!(started.elapsed() < PATIENCE, "A's lease never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_spent_beyond_a_lease_are_paid_to_the_cluster() {
    let server = RedisServer::start();
    let a = node(&server.url(), Duration::from_millis(50)).await;
    let b = node(&server.url(), Duration::from_millis(50)).await;
    // A reservation of 10 settled at 30 used: 20 more are owed.
    let reserved = {
        let a = Arc::clone(&a);
        tokio::task::spawn_blocking(move || a.reserve(&[bucket("t", 100)], 5, 5, 1))
            .await
            .expect("the blocking task")
            .expect("Redis answers")
    };
    assert!(reserved.allowed);
    assert_eq!(reserved.extra, 5);
    a.adjust(bucket("t", 100), 20);
    // A's next lease pays the debt first.
    assert!(take(&a, "t", 100, 1).await);
    // A spent 10 + 20 + 1 and may hold one token of a lease fetched
    // ahead: B finds 69 or 68 of the 100.
    let left = take_until_refused(&b, "t", 100).await;
    assert!((68..=69).contains(&left), "B took {left}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_is_all_or_nothing_across_buckets() {
    let server = RedisServer::start();
    let a = node(&server.url(), Duration::from_millis(50)).await;
    let reserve = |prompt, max| {
        let a = Arc::clone(&a);
        async move {
            tokio::task::spawn_blocking(move || {
                a.reserve(
                    &[bucket("minute", 1000), bucket("day", 150)],
                    prompt,
                    max,
                    1,
                )
            })
            .await
            .expect("the blocking task")
            .expect("Redis answers")
        }
    };
    // The day bucket holds 150: 100 prompt and 50 of the 600 asked.
    let first = reserve(100, 600).await;
    assert!(first.allowed);
    assert_eq!(first.extra, 50);
    // Nothing left in the day bucket: refused, and the minute bucket's
    // lease is not spent by the refusal.
    let refused = reserve(10, 10).await;
    assert!(!refused.allowed);
    let probe = node(&server.url(), Duration::from_millis(50)).await;
    let minute_left = {
        let probe = Arc::clone(&probe);
        tokio::task::spawn_blocking(move || probe.reserve(&[bucket("minute", 1000)], 1, 1000, 1))
            .await
            .expect("the blocking task")
            .expect("Redis answers")
    };
    // 1000 - 150 taken by the first reservation, less what `a` holds.
    assert!(minute_left.allowed);
    assert!(minute_left.extra <= 849, "{minute_left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_a_take_fails_at_once_and_recovers_by_itself() {
    let mut server = RedisServer::start();
    let a = node(&server.url(), Duration::from_millis(50)).await;
    assert!(take(&a, "k", 10, 1).await);
    server.kill();
    let redis = a.redis().clone();
    wait_until("the link is marked down", || !redis.is_up()).await;
    let started = Instant::now();
    let answer = {
        let a = Arc::clone(&a);
        tokio::task::spawn_blocking(move || a.take(bucket("other", 10), 1))
            .await
            .expect("the blocking task")
    };
    assert_eq!(answer, Err(Unavailable::Down));
    // Nothing was sent: far below any deadline (generous for a busy box).
    assert!(started.elapsed() < Duration::from_millis(250));
    server.restart();
    let recovered = wait_until("the link is up again", || redis.is_up()).await;
    eprintln!("the link came back {recovered:?} after the restart");
    // An empty Redis: the bucket starts full again.
    assert!(take(&a, "k", 10, 10).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_costs_a_request_at_most_the_budget() {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(server.address()).await;
    let budget = Duration::from_millis(20);
    let redis = Redis::start(settings(&proxy.url(), budget)).expect("a valid URL");
    wait_until("the link is up", || redis.is_up()).await;
    let a = LeasedBuckets::new(redis.clone(), lease_settings(Duration::from_millis(50)));
    proxy.set_delay(Duration::from_millis(400));
    let started = Instant::now();
    let answer = {
        let a = Arc::clone(&a);
        tokio::task::spawn_blocking(move || a.take(bucket("k", 10), 1))
            .await
            .expect("the blocking task")
    };
    let waited = started.elapsed();
    assert_eq!(answer, Err(Unavailable::Timeout));
    assert!(waited < Duration::from_millis(300), "waited {waited:?}");
    // The link is down now: the next request does not wait at all.
    assert!(!redis.is_up());
    let answer = {
        let a = Arc::clone(&a);
        tokio::task::spawn_blocking(move || a.take(bucket("k2", 10), 1))
            .await
            .expect("the blocking task")
    };
    assert_eq!(answer, Err(Unavailable::Down));
    // Once the proxy is fast again (and has passed on what it held back)
    // the link comes back by itself, and the node takes from the shared
    // bucket again.
    proxy.set_delay(Duration::ZERO);
    let started = Instant::now();
    loop {
        let a = Arc::clone(&a);
        let answer = tokio::task::spawn_blocking(move || a.take(bucket("k3", 10), 1))
            .await
            .expect("the blocking task");
        if answer.is_ok_and(|taken| taken.allowed) {
            break;
        }
        assert!(started.elapsed() < PATIENCE, "never recovered: {answer:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A token budget of 10,000 tokens a second shared by three nodes, each
/// reserving as fast as it can (20 prompt + up to 80 completion tokens)
/// and settling at what a generation "used" (the prompt and half the
/// cap): over 10 s the tokens used across the nodes are the budget ± 5 %.
/// Refill only adds to Redis's bucket, which keeps up to a burst for a
/// node that asks late, so a slow machine does not lower the count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_spend_a_token_budget_once_between_them() {
    const RATE: f64 = 10_000.0;
    let server = RedisServer::start();
    let budget = Bucket {
        key: "budget",
        rate_per_second: RATE,
        burst: 10_000,
    };
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(node(&server.url(), Duration::from_millis(50)).await);
    }
    // One second to spend the burst, then ten measured.
    let warm_until = Instant::now() + Duration::from_secs(1);
    let measure_until = warm_until + Duration::from_secs(10);
    let spenders: Vec<_> = nodes
        .iter()
        .map(|node| {
            let node = Arc::clone(node);
            tokio::task::spawn_blocking(move || {
                let mut used_in_window = 0u64;
                loop {
                    let now = Instant::now();
                    if now >= measure_until {
                        return used_in_window;
                    }
                    let reserved = node.reserve(&[budget], 20, 80, 1).expect("Redis answers");
                    if !reserved.allowed {
                        std::thread::sleep(Duration::from_micros(200));
                        continue;
                    }
                    let taken = 20 + reserved.extra;
                    let used = 20 + reserved.extra / 2;
                    node.adjust(budget, used as i64 - taken as i64);
                    if now >= warm_until {
                        used_in_window += used;
                    }
                }
            })
        })
        .collect();
    let mut used = 0;
    for spender in spenders {
        used += spender.await.expect("the spender");
    }
    let per_second = used as f64 / 10.0;
    eprintln!("three nodes used {per_second:.0} tokens/s of a {RATE} tokens/s budget");
    assert!(
        (RATE * 0.95..=RATE * 1.05).contains(&per_second),
        "used {per_second:.0} tokens/s of {RATE}"
    );
}

/// A node that reaches Redis through Sentinel follows the primary through
/// a failover: the link goes down with the primary and comes back on the
/// promoted replica, and the shared buckets work there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_follows_the_primary_through_a_sentinel_failover() {
    use breakwater_cluster::SentinelSettings;
    use breakwater_cluster::testing::SentinelServer;

    let mut primary = RedisServer::start();
    let replica = RedisServer::replica_of(&primary);
    // The sentinel learns of the replica from the primary; a failover
    // needs it known, so the replica must be attached first.
    let mut to_primary = redis::Client::open(primary.url())
        .expect("a URL")
        .get_multiplexed_async_connection()
        .await
        .expect("the primary");
    let started = Instant::now();
    loop {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut to_primary)
            .await
            .expect("INFO");
        if info.contains("connected_slaves:1") && info.contains("state=online") {
            break;
        }
        assert!(started.elapsed() < PATIENCE, "the replica never attached");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sentinel = SentinelServer::start("bw", &primary);
    let mut to_sentinel = redis::Client::open(sentinel.url())
        .expect("a URL")
        .get_multiplexed_async_connection()
        .await
        .expect("the sentinel");
    let started = Instant::now();
    loop {
        let replicas: Vec<redis::Value> = redis::cmd("SENTINEL")
            .arg("REPLICAS")
            .arg("bw")
            .query_async(&mut to_sentinel)
            .await
            .expect("SENTINEL REPLICAS");
        if !replicas.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the sentinel never saw the replica"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let redis = Redis::start(RedisSettings {
        sentinel: Some(SentinelSettings {
            sentinels: vec![sentinel.url()],
            master: "bw".to_owned(),
        }),
        ..settings("", Duration::from_secs(2))
    })
    .expect("valid sentinels");
    wait_until("the link is up through the sentinel", || redis.is_up()).await;
    let node = LeasedBuckets::new(redis.clone(), lease_settings(Duration::from_millis(50)));
    assert!(take(&node, "k", 10, 1).await);

    primary.kill();
    wait_until("the link sees the primary gone", || !redis.is_up()).await;
    let failover = wait_until("the link is up on the promoted replica", || redis.is_up()).await;
    eprintln!("the link came back {failover:?} after it saw the primary go");
    // The promoted replica holds the bucket as replicated: the node may
    // spend the rest of its burst there.
    assert!(take(&node, "k2", 10, 5).await);
    drop(replica);
}

/// `rediss://` with the CA that signed the server's certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reaches_redis_over_tls_with_its_ca() {
    use breakwater_cluster::testing::TlsFiles;

    let dir = tempfile::tempdir().expect("a temporary directory");
    let ca_key = rcgen::KeyPair::generate().expect("a CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("the CA");
    let server_key = rcgen::KeyPair::generate().expect("a server key");
    let server_params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("server params");
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);
    let server = server_params
        .signed_by(&server_key, &issuer)
        .expect("the server's certificate");
    let files = TlsFiles {
        cert: dir.path().join("server.pem"),
        key: dir.path().join("server.key"),
        ca: dir.path().join("ca.pem"),
    };
    std::fs::write(&files.cert, server.pem()).expect("write");
    std::fs::write(&files.key, server_key.serialize_pem()).expect("write");
    std::fs::write(&files.ca, ca.pem()).expect("write");

    let server = RedisServer::start_tls(&files);
    assert!(server.url().starts_with("rediss://"));
    let redis = Redis::start(RedisSettings {
        tls_ca_pem: Some(ca.pem().into_bytes()),
        ..settings(&server.url(), Duration::from_secs(2))
    })
    .expect("a valid URL");
    wait_until("the link is up over TLS", || redis.is_up()).await;
    let node = LeasedBuckets::new(redis, lease_settings(Duration::from_millis(50)));
    assert!(take(&node, "k", 10, 1).await);
}
