//! Upstream resilience against real processes on loopback: a `breakwater
//! edge` node in front of stand-in GPU hosts that are killed, hung, made to
//! fail or answer busy. Killed endpoints stop getting traffic within a
//! second without client errors, hung ones are ejected within the health
//! interval, a second region takes over when the first is down and hands
//! back after it recovers, retries stay within their budget and never
//! repeat non-idempotent or already-streaming requests, deadlines travel
//! upstream and a client that leaves cancels the upstream request.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use breakwater_e2e::{EdgeProcess, PATIENCE, StandIn, metric, metric_sum};
use futures_util::StreamExt;
use tokio::sync::Mutex;

const STAND_IN: &str = env!("CARGO_BIN_EXE_stand-in-upstream");

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .expect("client")
}

fn endpoints(stand_ins: &[&StandIn]) -> String {
    stand_ins
        .iter()
        .map(|s| format!("\"http://{}\"", s.addr))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A node in region `eu` routing `/` to pool `eu` with `pool_extra` lines.
fn edge_config(eu: &[&StandIn], pool_extra: &str, more: &str) -> String {
    format!(
        r#"
[node]
name = "resilience"
region = "eu"

[[listener]]
address = "{{listen}}"

[admin]
address = "{{admin}}"

[[route]]
prefix = "/"
pool = "eu"

[[pool]]
name = "eu"
region = "eu"
endpoints = [{}]
connect_timeout = "500ms"
first_byte_timeout = "5s"
{pool_extra}

{more}
"#,
        endpoints(eu)
    )
}

/// One answer seen by a load loop.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    status: u16,
    served_by: String,
}

/// `clients` loops of `GET /work` until `stop`, recording every answer.
fn drive(
    edge: &EdgeProcess,
    clients: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (Arc<Mutex<Vec<Seen>>>, Vec<tokio::task::JoinHandle<()>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let tasks = (0..clients)
        .map(|_| {
            let url = edge.url("/work");
            let seen = seen.clone();
            let stop = stop.clone();
            let http = client();
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let (status, served_by) = match http.get(&url).send().await {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            let by = response
                                .headers()
                                .get("x-served-by")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned();
                            let _ = response.bytes().await;
                            (status, by)
                        }
                        Err(_) => (0, String::new()),
                    };
                    seen.lock().await.push(Seen {
                        at: Instant::now(),
                        status,
                        served_by,
                    });
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();
    (seen, tasks)
}

async fn stop_driving(
    stop: &std::sync::atomic::AtomicBool,
    tasks: Vec<tokio::task::JoinHandle<()>>,
) {
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for task in tasks {
        let _ = tokio::time::timeout(PATIENCE, task).await;
    }
}

async fn wait_for(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_endpoint_stops_getting_traffic_within_a_second_without_client_errors() {
    let a = StandIn::start(STAND_IN, "a");
    let b = StandIn::start(STAND_IN, "b");
    let mut c = StandIn::start(STAND_IN, "c");
    let edge = tokio::task::block_in_place(|| {
        EdgeProcess::start(&edge_config(
            &[&a, &b, &c],
            "health = { path = \"/health/ready\", interval = \"1s\", timeout = \"500ms\" }",
            "",
        ))
    });
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (seen, tasks) = drive(&edge, 4, stop.clone());
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let killed_at = Instant::now();
    tokio::task::block_in_place(|| c.kill());
    let c_label = c.addr.to_string();
    let detected = wait_for(
        "the edge marks c unhealthy",
        Duration::from_secs(1),
        async || {
            metric(
                &edge.metrics().await,
                "breakwater_upstream_endpoint_healthy",
                &[("endpoint", &c_label)],
            ) == 0.0
        },
    )
    .await;
    let attempts_after_a_second = {
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(killed_at.elapsed())).await;
        metric_sum(
            &edge.metrics().await,
            "breakwater_upstream_attempt_failures_total",
            &[("endpoint", &c_label)],
        )
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop_driving(&stop, tasks).await;
    let attempts_at_the_end = metric_sum(
        &edge.metrics().await,
        "breakwater_upstream_attempt_failures_total",
        &[("endpoint", &c_label)],
    );

    let seen = seen.lock().await;
    let errors: Vec<&Seen> = seen.iter().filter(|s| s.status != 200).collect();
    assert!(
        errors.is_empty(),
        "client-visible errors after the kill: {errors:?}\n{}",
        edge.child.stderr()
    );
    let before = seen
        .iter()
        .filter(|s| s.at < killed_at && s.served_by == "c")
        .count();
    assert!(before > 0, "c served nothing before the kill");
    let after = seen.iter().filter(|s| s.at > killed_at).count();
    assert!(after > 20, "only {after} requests after the kill");
    assert_eq!(
        attempts_after_a_second, attempts_at_the_end,
        "the edge still sent requests to c more than 1 s after it died (detected after {detected:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_endpoint_is_ejected_within_the_health_interval() {
    let a = StandIn::start(STAND_IN, "a");
    let b = StandIn::start(STAND_IN, "b");
    let edge = tokio::task::block_in_place(|| {
        EdgeProcess::start(
            &edge_config(
                &[&a, &b],
                "health = { path = \"/health/ready\", interval = \"500ms\", timeout = \"250ms\", unhealthy_threshold = 1 }",
                "",
            )
            .replace("first_byte_timeout = \"5s\"", "first_byte_timeout = \"1s\""),
        )
    });
    let http = client();
    for _ in 0..10 {
        assert_eq!(
            http.get(edge.url("/work"))
                .send()
                .await
                .expect("GET")
                .status(),
            200
        );
    }
    b.hang();
    let b_label = b.addr.to_string();
    // One interval for the next check to start, its timeout, and slack
    // for a loaded machine.
    let limit = Duration::from_millis(500 + 250 + 500);
    let took = wait_for("the hung endpoint is ejected", limit, async || {
        metric(
            &edge.metrics().await,
            "breakwater_upstream_endpoint_healthy",
            &[("endpoint", &b_label)],
        ) == 0.0
    })
    .await;
    // From now on every request goes to a, at once.
    for _ in 0..20 {
        let started = Instant::now();
        let response = http.get(edge.url("/work")).send().await.expect("GET");
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-served-by"], "a");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "ejected after {took:?}"
        );
    }
    b.resume();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_region_takes_over_when_every_local_endpoint_is_down_and_hands_back() {
    let mut eu1 = StandIn::start(STAND_IN, "eu-1");
    let mut eu2 = StandIn::start(STAND_IN, "eu-2");
    let us = StandIn::start(STAND_IN, "us-1");
    let health = "health = { path = \"/health/ready\", interval = \"300ms\", timeout = \"200ms\", healthy_threshold = 1, unhealthy_threshold = 1 }";
    let edge = tokio::task::block_in_place(|| {
        EdgeProcess::start(&edge_config(
            &[&eu1, &eu2],
            &format!("failover = [\"us\"]\nfailback_after = \"1s\"\n{health}"),
            &format!(
                "[[pool]]\nname = \"us\"\nregion = \"us\"\nendpoints = [{}]\n{health}\n",
                endpoints(&[&us])
            ),
        ))
    });
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (seen, tasks) = drive(&edge, 3, stop.clone());
    tokio::time::sleep(Duration::from_millis(1000)).await;

    let down_at = Instant::now();
    tokio::task::block_in_place(|| {
        eu1.kill();
        eu2.kill();
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let back_at = Instant::now();
    tokio::task::block_in_place(|| {
        eu1.restart();
        eu2.restart();
    });
    // Health interval + failback hold, then a window to judge. A loaded
    // machine can take seconds more to restart the stand-ins, so this waits
    // (within a bound) for the hand-back instead of a fixed time; the
    // assertions below still require it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let handed_back = {
            let seen = seen.lock().await;
            let recent: Vec<&Seen> = seen.iter().rev().take(6).collect();
            recent.len() == 6 && recent.iter().all(|s| s.served_by.starts_with("eu"))
        };
        if handed_back || Instant::now() > deadline {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop_driving(&stop, tasks).await;
    let metrics = edge.metrics().await;

    let seen = seen.lock().await;
    let errors: Vec<&Seen> = seen.iter().filter(|s| s.status != 200).collect();
    assert!(errors.is_empty(), "client-visible errors: {errors:?}");
    let served_by = |from: Instant, to: Instant| {
        let mut eu = 0;
        let mut us = 0;
        for s in seen.iter().filter(|s| s.at >= from && s.at < to) {
            if s.served_by.starts_with("eu") {
                eu += 1;
            } else if s.served_by.starts_with("us") {
                us += 1;
            }
        }
        (eu, us)
    };
    let (eu_before, us_before) = served_by(down_at - Duration::from_millis(800), down_at);
    assert!(
        eu_before > 0 && us_before == 0,
        "before: eu {eu_before}, us {us_before}"
    );
    let (eu_down, us_down) = served_by(down_at + Duration::from_millis(200), back_at);
    assert!(
        eu_down == 0 && us_down > 0,
        "while eu is down: eu {eu_down}, us {us_down}"
    );
    let end = Instant::now();
    let (eu_after, us_after) = served_by(end - Duration::from_millis(700), end);
    assert!(
        eu_after > 0 && us_after == 0,
        "after recovery: eu {eu_after}, us {us_after}"
    );
    assert!(
        metric(
            &metrics,
            "breakwater_upstream_failover_events_total",
            &[("pool", "eu"), ("event", "spill")]
        ) >= 1.0,
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            "breakwater_upstream_failover_events_total",
            &[("pool", "eu"), ("event", "return")]
        ) >= 1.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_never_exceed_the_budget() {
    let stand_ins: Vec<StandIn> = (0..3)
        .map(|i| StandIn::start(STAND_IN, &format!("s{i}")))
        .collect();
    for s in &stand_ins {
        s.control("status=502&delay_ms=200").await;
    }
    let refs: Vec<&StandIn> = stand_ins.iter().collect();
    let edge = tokio::task::block_in_place(|| {
        EdgeProcess::start(&edge_config(
            &refs,
            "retry = { attempts = 3, budget_ratio = 0.2, min_concurrency = 2, backoff_base = \"1ms\", backoff_max = \"5ms\" }\n\
             outlier = { consecutive_failures = 0 }",
            "",
        ))
    });
    const CONCURRENT: usize = 30;
    const ROUNDS: usize = 3;
    for _ in 0..ROUNDS {
        let requests = (0..CONCURRENT).map(|_| client().get(edge.url("/work")).send());
        for response in futures_util::future::join_all(requests).await {
            assert_eq!(response.expect("an answer").status(), 502);
        }
    }
    let mut requests = 0;
    let mut retries = 0;
    for s in &stand_ins {
        requests += s.stat("requests").await;
        retries += s.stat("retries").await;
    }
    let originals = (CONCURRENT * ROUNDS) as u64;
    assert_eq!(requests, originals + retries);
    // 20% of the requests in flight, or 2 at once: per round at most 6
    // retries while the 30 fail together, plus slack for stragglers.
    let bound = (originals as f64 * 0.2).ceil() as u64 + 2 * ROUNDS as u64;
    assert!(retries > 0, "no retries at all");
    assert!(
        retries <= bound,
        "{retries} retries for {originals} requests (bound {bound})"
    );
    let metrics = edge.metrics().await;
    assert!(
        metric(
            &metrics,
            "breakwater_upstream_retry_budget_exhausted_total",
            &[("pool", "eu")]
        ) > 0.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_idempotent_and_streaming_requests_are_never_retried() {
    let mut a = StandIn::start(STAND_IN, "a");
    let mut b = StandIn::start(STAND_IN, "b");
    let edge = tokio::task::block_in_place(|| {
        EdgeProcess::start(&edge_config(
            &[&a, &b],
            "outlier = { consecutive_failures = 0 }\nretry = { attempts = 3 }",
            "",
        ))
    });
    a.control("status=502").await;
    b.control("status=502").await;
    let http = client();
    for _ in 0..10 {
        let response = http
            .post(edge.url("/v1/chat/completions"))
            .body("{\"model\":\"m\"}")
            .send()
            .await
            .expect("POST");
        assert_eq!(response.status(), 502);
    }
    // The same with GET is retried: the two differ only by the method.
    let response = http.get(edge.url("/v1/models")).send().await.expect("GET");
    assert_eq!(response.status(), 502);
    let seen = a.stat("requests").await + b.stat("requests").await;
    let retries = a.stat("retries").await + b.stat("retries").await;
    assert_eq!(
        (seen, retries),
        (12, 1),
        "10 POSTs once each, the GET twice"
    );

    // A stream that started is never retried, even for GET.
    a.control("status=0").await;
    b.control("status=0").await;
    let before_a = a.stat("requests").await;
    let before_b = b.stat("requests").await;
    let response = http
        .get(edge.url("/stream?n=40&delay_ms=50"))
        .send()
        .await
        .expect("GET /stream");
    assert_eq!(response.status(), 200);
    let serving = response.headers()["x-served-by"]
        .to_str()
        .expect("name")
        .to_owned();
    let mut body = response.bytes_stream();
    let first = body.next().await.expect("an event").expect("event bytes");
    assert!(String::from_utf8_lossy(&first).contains(&serving));
    tokio::task::block_in_place(|| {
        if serving == "a" {
            a.kill();
        } else {
            b.kill();
        }
    });
    let mut broke = false;
    while let Some(chunk) = tokio::time::timeout(PATIENCE, body.next())
        .await
        .expect("stream ends")
    {
        if chunk.is_err() {
            broke = true;
            break;
        }
    }
    assert!(broke, "the stream should break when its endpoint dies");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other = if serving == "a" { &b } else { &a };
    let other_before = if serving == "a" { before_b } else { before_a };
    assert_eq!(
        other.stat("requests").await,
        other_before,
        "a started stream was sent again to the other endpoint"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_endpoint_is_skipped_for_its_retry_after_not_ejected() {
    let a = StandIn::start(STAND_IN, "a");
    let b = StandIn::start(STAND_IN, "b");
    let edge = tokio::task::block_in_place(|| EdgeProcess::start(&edge_config(&[&a, &b], "", "")));
    a.control("status=503&retry_after=3").await;
    let http = client();
    for _ in 0..20 {
        let response = http.get(edge.url("/work")).send().await.expect("GET");
        assert_eq!(
            response.status(),
            200,
            "a busy endpoint's request goes elsewhere"
        );
        assert_eq!(response.headers()["x-served-by"], "b");
    }
    assert!(a.stat("requests").await <= 1, "a got traffic while busy");
    let metrics = edge.metrics().await;
    let a_label = a.addr.to_string();
    assert_eq!(
        metric(
            &metrics,
            "breakwater_upstream_endpoint_healthy",
            &[("endpoint", &a_label)]
        ),
        1.0,
        "busy is not dead"
    );
    assert!(
        metric(
            &metrics,
            "breakwater_upstream_busy_total",
            &[("endpoint", &a_label)]
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_travels_upstream_and_a_client_that_leaves_cancels_the_request() {
    let a = StandIn::start(STAND_IN, "a");
    let edge = tokio::task::block_in_place(|| {
        EdgeProcess::start(&format!(
            "{}\n",
            edge_config(&[&a], "", "")
                .replace("pool = \"eu\"\n", "pool = \"eu\"\ndeadline = \"2s\"\n")
        ))
    });
    let http = client();
    let sent = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    assert_eq!(
        http.get(edge.url("/work"))
            .send()
            .await
            .expect("GET")
            .status(),
        200
    );
    let deadline = a.stat("last_deadline").await;
    assert!(
        deadline > sent + 1500 && deadline <= sent + 2100,
        "X-Request-Deadline {deadline} for a request sent at {sent} with a 2 s deadline"
    );

    // Past the deadline the edge answers 504 and lets the upstream go.
    a.control("delay_ms=5000").await;
    let started = Instant::now();
    let response = http.get(edge.url("/work")).send().await.expect("GET");
    assert_eq!(response.status(), 504);
    assert!(
        started.elapsed() < Duration::from_millis(3500),
        "{:?}",
        started.elapsed()
    );

    // A client that gives up cancels the upstream request.
    let before = a.stat("cancelled").await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .expect("client");
    assert!(impatient.get(edge.url("/work")).send().await.is_err());
    wait_for(
        "the upstream sees the cancellation",
        Duration::from_secs(1),
        async || a.stat("cancelled").await > before,
    )
    .await;
    assert_eq!(a.stat("in_flight").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_with_503_and_retry_after_while_admitted_requests_keep_their_latency() {
    let a = StandIn::start(STAND_IN, "a");
    a.control("delay_ms=300").await;
    let edge = tokio::task::block_in_place(|| {
        EdgeProcess::start(&edge_config(
            &[&a],
            "concurrency = { initial = 4, min = 4, max = 4, queue = 2, queue_timeout = \"50ms\" }",
            "",
        ))
    });
    let requests = (0..20).map(|_| async {
        let started = Instant::now();
        let response = client().get(edge.url("/work")).send().await.expect("GET");
        let elapsed = started.elapsed();
        let status = response.status().as_u16();
        let retry_after = response.headers().contains_key("retry-after");
        let body = response.text().await.expect("body");
        (status, retry_after, elapsed, body)
    });
    let answers = futures_util::future::join_all(requests).await;
    let admitted: Vec<_> = answers.iter().filter(|a| a.0 == 200).collect();
    let shed: Vec<_> = answers.iter().filter(|a| a.0 == 503).collect();
    assert_eq!(admitted.len(), 4, "{answers:?}");
    assert_eq!(shed.len(), 16, "{answers:?}");
    for (_, retry_after, elapsed, body) in &shed {
        assert!(*retry_after && body.contains("overloaded"), "{body}");
        assert!(
            *elapsed < Duration::from_millis(250),
            "shed after {elapsed:?}"
        );
    }
    for (_, _, elapsed, _) in &admitted {
        assert!(
            *elapsed < Duration::from_millis(800),
            "admitted after {elapsed:?}"
        );
    }
    assert_eq!(
        a.stat("requests").await,
        4,
        "the upstream saw only the admitted ones"
    );
    let metrics = edge.metrics().await;
    assert!(
        metric_sum(
            &metrics,
            "breakwater_upstream_shed_total",
            &[("pool", "eu")]
        ) >= 16.0
    );
}

/// One answer seen by a tiered load loop.
#[derive(Debug)]
struct TierSeen {
    status: u16,
    latency: Duration,
    retry_after: bool,
    body: String,
}

/// `clients` loops of `GET /work` with `X-Breakwater-Tier: tier` (none
/// when empty) until `stop`; a shed request's loop pauses briefly so that
/// the free tier's retries do not take the machine's CPUs.
fn drive_tier(
    edge: &EdgeProcess,
    tier: &'static str,
    clients: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (Arc<Mutex<Vec<TierSeen>>>, Vec<tokio::task::JoinHandle<()>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let tasks = (0..clients)
        .map(|_| {
            let url = edge.url("/work");
            let seen = seen.clone();
            let stop = stop.clone();
            let http = client();
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let mut request = http.get(&url);
                    if !tier.is_empty() {
                        request = request.header("x-breakwater-tier", tier);
                    }
                    let started = Instant::now();
                    let answer = match request.send().await {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            let retry_after = response.headers().contains_key("retry-after");
                            let body = response.text().await.unwrap_or_default();
                            TierSeen {
                                status,
                                latency: started.elapsed(),
                                retry_after,
                                body,
                            }
                        }
                        Err(e) => TierSeen {
                            status: 0,
                            latency: started.elapsed(),
                            retry_after: false,
                            body: e.to_string(),
                        },
                    };
                    let pause = if answer.status == 200 { 0 } else { 20 };
                    seen.lock().await.push(answer);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
            })
        })
        .collect();
    (seen, tasks)
}

fn median(mut latencies: Vec<Duration>) -> Duration {
    latencies.sort();
    latencies
        .get(latencies.len() / 2)
        .copied()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_overload_the_paid_tier_is_admitted_first_while_the_free_tier_is_shed() {
    let a = StandIn::start(STAND_IN, "a");
    a.control("delay_ms=200").await;
    // 4 slots, a quarter kept for `paid`; 4 queue places, `paid` first.
    let edge = tokio::task::block_in_place(|| {
        EdgeProcess::start(&edge_config(
            &[&a],
            "concurrency = { initial = 4, min = 4, max = 4, queue = 4, queue_timeout = \"2s\", \
             priority = { header = \"x-breakwater-tier\", tiers = [\"paid\", \"free\"], reserved = 0.25 } }",
            "",
        ))
    });
    let http = client();
    let mut alone = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let response = http
            .get(edge.url("/work"))
            .header("x-breakwater-tier", "paid")
            .send()
            .await
            .expect("GET");
        assert_eq!(response.status(), 200);
        alone.push(started.elapsed());
    }
    let normal = median(alone);

    // Free traffic (absent or unknown tier means `free`) far over the
    // limit, and two paid clients.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (free, mut tasks) = drive_tier(&edge, "free", 10, stop.clone());
    let (anonymous, more) = drive_tier(&edge, "", 2, stop.clone());
    tasks.extend(more);
    // The free queue fills before the paid clients start.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (paid, more) = drive_tier(&edge, "PAID", 2, stop.clone());
    tasks.extend(more);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_driving(&stop, tasks).await;

    let paid = paid.lock().await;
    assert!(paid.len() >= 5, "only {} paid requests", paid.len());
    let failed: Vec<&TierSeen> = paid.iter().filter(|s| s.status != 200).collect();
    assert!(failed.is_empty(), "paid requests failed: {failed:?}");
    let paid_median = median(paid.iter().map(|s| s.latency).collect());
    let paid_max = paid.iter().map(|s| s.latency).max().unwrap_or_default();
    // At worst a paid request waits for one slot to come free (one upstream
    // delay) before its own turn; slack for a loaded machine.
    assert!(
        paid_median < normal * 2 + Duration::from_millis(300)
            && paid_max < normal * 3 + Duration::from_millis(1000),
        "paid latency under overload: median {paid_median:?}, max {paid_max:?}; alone {normal:?}"
    );

    let mut free = free.lock().await;
    free.extend(anonymous.lock().await.drain(..));
    let shed: Vec<&TierSeen> = free.iter().filter(|s| s.status == 503).collect();
    let served = free.iter().filter(|s| s.status == 200).count();
    let other: Vec<&TierSeen> = free
        .iter()
        .filter(|s| s.status != 200 && s.status != 503)
        .collect();
    assert!(
        other.is_empty(),
        "free answers neither 200 nor 503: {other:?}"
    );
    assert!(shed.len() >= 10, "only {} free requests shed", shed.len());
    assert!(served > 0, "the free tier was starved entirely");
    for s in &shed {
        assert!(
            s.retry_after && s.body.contains("overloaded") && s.body.contains("free"),
            "{s:?}"
        );
    }

    let metrics = edge.metrics().await;
    assert!(
        metric_sum(
            &metrics,
            "breakwater_upstream_shed_total",
            &[("pool", "eu"), ("tier", "free")]
        ) >= shed.len() as f64,
        "{metrics}"
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "breakwater_upstream_shed_total",
            &[("pool", "eu"), ("tier", "paid")]
        ),
        0.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_answering_500_ten_times_in_a_row_still_gets_the_next_request() {
    let a = StandIn::start(STAND_IN, "a");
    // The default pool settings: outlier detection counts 5xx answers.
    let edge = tokio::task::block_in_place(|| EdgeProcess::start(&edge_config(&[&a], "", "")));
    a.control("status=500").await;
    let http = client();
    for i in 0..10 {
        let response = http.get(edge.url("/work")).send().await.expect("GET");
        assert_eq!(response.status(), 500, "request {i}");
        assert_eq!(
            response.text().await.expect("body"),
            "a failing",
            "request {i}: the origin's own answer, not the edge's"
        );
    }
    a.control("status=0").await;
    let response = http.get(edge.url("/work")).send().await.expect("GET");
    assert_eq!(response.status(), 200, "{}", edge.child.stderr());
    assert_eq!(response.text().await.expect("body"), "a");
    assert_eq!(
        metric_sum(
            &edge.metrics().await,
            "breakwater_upstream_ejections_total",
            &[("reason", "5xx")]
        ),
        0.0,
        "the last healthy endpoint was ejected for its answers"
    );
}

/// Ejects the only endpoint `a` of `edge` (see [`ejected_quickly`]) by
/// three first-byte timeouts, lets it answer again, and returns the status
/// of the next request.
async fn after_the_only_endpoint_is_ejected(a: &StandIn, edge: &EdgeProcess) -> u16 {
    a.control("delay_ms=3000").await;
    let http = client();
    for i in 0..3 {
        let response = http.get(edge.url("/work")).send().await.expect("GET");
        assert_eq!(response.status(), 504, "request {i}");
    }
    assert_eq!(
        metric(
            &edge.metrics().await,
            "breakwater_upstream_ejections_total",
            &[("reason", "timeout")]
        ),
        1.0
    );
    a.control("delay_ms=0").await;
    http.get(edge.url("/work"))
        .send()
        .await
        .expect("GET")
        .status()
        .as_u16()
}

/// A node in front of `a` alone, with a 300 ms first-byte timeout and 1 s
/// ejections; `pool_extra` is added to the pool.
fn ejected_quickly(a: &StandIn, pool_extra: &str) -> EdgeProcess {
    tokio::task::block_in_place(|| {
        EdgeProcess::start(
            &edge_config(
                &[a],
                &format!("outlier = {{ base_ejection = \"1s\" }}\n{pool_extra}"),
                "",
            )
            .replace(
                "first_byte_timeout = \"5s\"",
                "first_byte_timeout = \"300ms\"",
            ),
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_below_its_panic_threshold_sends_to_ejected_endpoints_rather_than_none() {
    let a = StandIn::start(STAND_IN, "a");
    let edge = ejected_quickly(&a, "");
    assert_eq!(
        after_the_only_endpoint_is_ejected(&a, &edge).await,
        200,
        "{}",
        edge.child.stderr()
    );
    assert_eq!(
        metric(
            &edge.metrics().await,
            "breakwater_upstream_panic",
            &[("pool", "eu")]
        ),
        1.0
    );
    assert!(
        edge.child.stderr().contains("panic routing:"),
        "{}",
        edge.child.stderr()
    );
    // The ejection ends: so does the panic, with a log line once.
    wait_for("the panic ends", PATIENCE, async || {
        metric(
            &edge.metrics().await,
            "breakwater_upstream_panic",
            &[("pool", "eu")],
        ) == 0.0
    })
    .await;
    let log = edge.child.stderr();
    assert_eq!(log.matches("panic routing:").count(), 1, "{log}");
    assert_eq!(log.matches("panic routing ended").count(), 1, "{log}");

    // With panic routing off, the ejected endpoint gets nothing.
    let b = StandIn::start(STAND_IN, "b");
    let edge = ejected_quickly(&b, "panic_threshold = 0");
    assert_eq!(after_the_only_endpoint_is_ejected(&b, &edge).await, 503);
}
