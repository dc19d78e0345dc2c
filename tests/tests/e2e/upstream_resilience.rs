//! Upstream resilience against real processes on loopback: a `breakwater
//! edge` node in front of stand-in GPU hosts that are killed, hung, made to
//! fail or answer busy. Killed endpoints stop getting traffic once marked
//! down, without client errors, hung ones are ejected by the health check
//! and get no more requests, a second region takes over when the first is down and hands
//! back after it recovers, retries stay within their budget and never
//! repeat non-idempotent or already-streaming requests, deadlines travel
//! upstream and a client that leaves cancels the upstream request.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use breakwater_e2e::{
    EdgeProcess, PATIENCE, StandIn, metric, metric_sum, wait_for, wait_until_marked_down,
};
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
    /// When the request was sent.
    sent: Instant,
    /// When its answer had been read.
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
                    let sent = Instant::now();
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
                        sent,
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

/// Load loops in the killed-endpoint tests: also the most requests that
/// can be in flight on the killed endpoint when the edge marks it down.
const DRIVERS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_endpoint_stops_getting_traffic_once_marked_down_without_client_errors() {
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
    let (seen, tasks) = drive(&edge, DRIVERS, stop.clone());
    wait_for("c serves", PATIENCE, async || {
        seen.lock().await.iter().any(|s| s.served_by == "c")
    })
    .await;

    tokio::task::block_in_place(|| c.kill());
    let killed_at = Instant::now();
    let c_label = c.addr.to_string();
    // How fast the edge notices is bench/failover.sh's to measure; this
    // test holds what must be true however busy the machine is.
    let (attempts_when_marked_down, detected) = wait_until_marked_down(&edge, &c_label).await;
    let marked_at = Instant::now();
    wait_for(
        "20 requests after c was marked down",
        PATIENCE,
        async || {
            seen.lock()
                .await
                .iter()
                .filter(|s| s.at > marked_at)
                .count()
                >= 20
        },
    )
    .await;
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
    assert!(
        seen.iter()
            .all(|s| s.sent < killed_at || s.served_by != "c"),
        "a dead endpoint answered"
    );
    // Only requests already sent to c when it was marked down may fail
    // there afterwards, one attempt each; none is sent to it anew.
    assert!(
        attempts_at_the_end - attempts_when_marked_down <= DRIVERS as f64,
        "the edge sent {} requests to c after marking it down (marked down {detected:?} after the kill)",
        attempts_at_the_end - attempts_when_marked_down
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_endpoint_is_ejected_by_the_health_check_and_gets_no_more_requests() {
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
    let (timeouts_when_ejected, _) = wait_until_marked_down(&edge, &b_label).await;
    // From now on every request goes to a: none waits on b for its
    // first-byte timeout (which would count a failure against b).
    for _ in 0..20 {
        let response = http.get(edge.url("/work")).send().await.expect("GET");
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-served-by"], "a");
    }
    assert_eq!(
        metric_sum(
            &edge.metrics().await,
            "breakwater_upstream_attempt_failures_total",
            &[("endpoint", &b_label)],
        ),
        timeouts_when_ejected,
        "a request was sent to the ejected endpoint"
    );
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
            // Three attempts: a request in flight on eu-1 when it dies is
            // retried on eu-2, which may die under that retry too (both
            // are killed within a millisecond); its third goes to us. With
            // the default two, that request is a 502, as in Envoy with one
            // retry.
            &format!(
                "failover = [\"us\"]\nfailback_after = \"1s\"\nretry = {{ attempts = 3 }}\n{health}"
            ),
            &format!(
                "[[pool]]\nname = \"us\"\nregion = \"us\"\nendpoints = [{}]\n{health}\n",
                endpoints(&[&us])
            ),
        ))
    });
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (seen, tasks) = drive(&edge, 3, stop.clone());
    wait_for("eu serves", PATIENCE, async || {
        seen.lock().await.len() >= 10
    })
    .await;

    let killing_at = Instant::now();
    tokio::task::block_in_place(|| {
        eu1.kill();
        eu2.kill();
    });
    let dead_at = Instant::now();
    wait_for("us serves while eu is down", PATIENCE, async || {
        seen.lock()
            .await
            .iter()
            .filter(|s| s.sent > dead_at && s.served_by.starts_with("us"))
            .count()
            >= 10
    })
    .await;
    let back_at = Instant::now();
    tokio::task::block_in_place(|| {
        eu1.restart();
        eu2.restart();
    });
    // Health interval and failback hold, however long a loaded machine
    // takes: six answers in a row from eu.
    wait_for("eu takes its traffic back", PATIENCE, async || {
        let seen = seen.lock().await;
        let recent: Vec<&Seen> = seen.iter().rev().take(6).collect();
        recent.len() == 6 && recent.iter().all(|s| s.served_by.starts_with("eu"))
    })
    .await;
    let handed_back_at = Instant::now();
    wait_for("20 requests after the hand-back", PATIENCE, async || {
        seen.lock()
            .await
            .iter()
            .filter(|s| s.sent > handed_back_at)
            .count()
            >= 20
    })
    .await;
    stop_driving(&stop, tasks).await;
    let metrics = edge.metrics().await;

    let seen = seen.lock().await;
    let errors: Vec<&Seen> = seen.iter().filter(|s| s.status != 200).collect();
    assert!(errors.is_empty(), "client-visible errors: {errors:?}");
    let served_by = |picked: &dyn Fn(&Seen) -> bool| {
        let mut eu = 0;
        let mut us = 0;
        for s in seen.iter().filter(|s| picked(s)) {
            if s.served_by.starts_with("eu") {
                eu += 1;
            } else if s.served_by.starts_with("us") {
                us += 1;
            }
        }
        (eu, us)
    };
    // Answered before the kill began: a request in flight during it may
    // have been retried in us.
    let (eu_before, us_before) = served_by(&|s| s.at < killing_at);
    assert!(
        eu_before > 0 && us_before == 0,
        "before: eu {eu_before}, us {us_before}"
    );
    let (eu_down, us_down) = served_by(&|s| s.sent > dead_at && s.sent < back_at);
    assert!(
        eu_down == 0 && us_down > 0,
        "while eu is down: eu {eu_down}, us {us_down}"
    );
    let (eu_after, us_after) = served_by(&|s| s.sent > handed_back_at);
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
    let unix_ms = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64
    };
    let sent = unix_ms();
    assert_eq!(
        http.get(edge.url("/work"))
            .send()
            .await
            .expect("GET")
            .status(),
        200
    );
    let answered = unix_ms();
    // 2 s from when the edge took the request, which lies between the
    // client's send and its answer (ms rounding on either side).
    let deadline = a.stat("last_deadline").await;
    assert!(
        deadline + 1 >= sent + 2000 && deadline <= answered + 2000 + 1,
        "X-Request-Deadline {deadline} for a request sent at {sent}, answered at {answered}, with a 2 s deadline"
    );

    // Past the deadline the edge answers 504 and lets the upstream go (an
    // upstream that answered after its 5 s would have given 200).
    a.control("delay_ms=5000").await;
    let response = http.get(edge.url("/work")).send().await.expect("GET");
    assert_eq!(response.status(), 504);

    // A client that gives up cancels the upstream request.
    let before = a.stat("cancelled").await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .expect("client");
    assert!(impatient.get(edge.url("/work")).send().await.is_err());
    wait_for("the upstream sees the cancellation", PATIENCE, async || {
        a.stat("cancelled").await > before
    })
    .await;
    wait_for("the upstream has nothing in flight", PATIENCE, async || {
        a.stat("in_flight").await == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_with_503_and_retry_after_before_any_slot_frees() {
    let a = StandIn::start(STAND_IN, "a");
    let edge = tokio::task::block_in_place(|| {
        EdgeProcess::start(&edge_config(
            &[&a],
            "concurrency = { initial = 4, min = 4, max = 4, queue = 2, queue_timeout = \"50ms\" }",
            "",
        ))
    });
    // The upstream takes requests but answers none until the client has
    // every 503: no slot frees on its own, whatever the machine's load, so
    // the shedding cannot have waited for one.
    a.hang();
    let shed_seen = std::sync::atomic::AtomicUsize::new(0);
    let requests = (0..20).map(|_| async {
        let response = client().get(edge.url("/work")).send().await.expect("GET");
        let status = response.status().as_u16();
        let retry_after = response.headers().contains_key("retry-after");
        let body = response.text().await.expect("body");
        if status == 503 {
            shed_seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        (status, retry_after, body)
    });
    let resume = async {
        wait_for(
            "16 answered 503 while the upstream holds 4",
            PATIENCE,
            async || shed_seen.load(std::sync::atomic::Ordering::SeqCst) >= 16,
        )
        .await;
        a.resume();
    };
    let (answers, ()) = tokio::join!(futures_util::future::join_all(requests), resume);
    let admitted: Vec<_> = answers.iter().filter(|a| a.0 == 200).collect();
    let shed: Vec<_> = answers.iter().filter(|a| a.0 == 503).collect();
    assert_eq!(admitted.len(), 4, "{answers:?}");
    assert_eq!(shed.len(), 16, "{answers:?}");
    for (_, retry_after, body) in &shed {
        assert!(*retry_after && body.contains("overloaded"), "{body}");
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
                    let answer = match request.send().await {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            let retry_after = response.headers().contains_key("retry-after");
                            let body = response.text().await.unwrap_or_default();
                            TierSeen {
                                status,
                                retry_after,
                                body,
                            }
                        }
                        Err(e) => TierSeen {
                            status: 0,
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
    // Free traffic (absent or unknown tier means `free`) far over the
    // limit, and two paid clients. How long a paid request waits is
    // timing, for bench/ (failover.sh's over-capacity scenario measures
    // admitted latency, not yet per tier); this test holds who is admitted.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (free, mut tasks) = drive_tier(&edge, "free", 10, stop.clone());
    let (anonymous, more) = drive_tier(&edge, "", 2, stop.clone());
    tasks.extend(more);
    let shed_free = async || {
        metric_sum(
            &edge.metrics().await,
            "breakwater_upstream_shed_total",
            &[("pool", "eu"), ("tier", "free")],
        )
    };
    // The free queue is full before the paid clients start.
    wait_for("free requests are shed", PATIENCE, async || {
        shed_free().await >= 1.0
    })
    .await;
    let (paid, more) = drive_tier(&edge, "PAID", 2, stop.clone());
    tasks.extend(more);
    wait_for("20 paid answers while free is shed", PATIENCE, async || {
        paid.lock().await.len() >= 20
            && shed_free().await >= 10.0
            && free.lock().await.iter().any(|s| s.status == 200)
    })
    .await;
    stop_driving(&stop, tasks).await;

    let paid = paid.lock().await;
    let failed: Vec<&TierSeen> = paid.iter().filter(|s| s.status != 200).collect();
    assert!(failed.is_empty(), "paid requests failed: {failed:?}");

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

/// A node in front of `a` alone, with a 300 ms first-byte timeout and
/// ejections of `ejection` (a duration as the config writes it);
/// `pool_extra` is added to the pool.
fn ejected_quickly(a: &StandIn, ejection: &str, pool_extra: &str) -> EdgeProcess {
    tokio::task::block_in_place(|| {
        EdgeProcess::start(
            &edge_config(
                &[a],
                &format!("outlier = {{ base_ejection = \"{ejection}\" }}\n{pool_extra}"),
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
    // Long enough that the next request comes while `a` is still ejected,
    // however busy the machine; short enough to wait for its end below.
    let edge = ejected_quickly(&a, "5s", "");
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
    let edge = ejected_quickly(&b, "60s", "panic_threshold = 0");
    assert_eq!(after_the_only_endpoint_is_ejected(&b, &edge).await, 503);
}
