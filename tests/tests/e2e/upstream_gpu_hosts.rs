//! Upstream resilience against real GPU hosts: `breakwater gpu-host`
//! processes (CPU backend, random test models from `breakwater model
//! gen-test`) behind a `breakwater edge` node. A killed host costs no
//! retryable request and gets none once marked down; a client
//! that disconnects from a streaming completion frees the host's slot and
//! KV blocks; a host whose queue is full (503 + `Retry-After`) is marked
//! busy, not dead.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use breakwater_e2e::{
    EdgeProcess, GpuHostProcess, PATIENCE, gen_test_model, metric, metric_sum, wait_for,
    wait_until_marked_down,
};
use futures_util::StreamExt;
use tokio::sync::Mutex;

/// The name every host serves its model under.
const MODEL: &str = "test";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .expect("client")
}

/// Writes a random model of `shape` (`tiny` or `smollm2-135m`) into `dir`.
fn gen_model(dir: &Path, shape: &str) {
    gen_test_model(dir, shape, 7);
}

/// Starts a `breakwater gpu-host` on `model` (CPU backend, one thread)
/// with `extra` options and waits (bounded) until it is ready.
async fn start_host(model: &Path, extra: &[&str]) -> GpuHostProcess {
    let model = model.to_str().expect("UTF-8 path");
    let mut args = vec!["--model", model, "--model-name", MODEL];
    args.extend_from_slice(extra);
    GpuHostProcess::start(&args, |_| {}, PATIENCE).await
}

/// `host` as an endpoint in a pool's TOML list.
fn endpoint(host: &GpuHostProcess) -> String {
    format!("\"http://{}\"", host.addr)
}

/// An edge node routing everything to pool `gpu` over `hosts`.
fn start_edge(hosts: &[&GpuHostProcess], pool_extra: &str) -> EdgeProcess {
    let endpoints: Vec<String> = hosts.iter().map(|h| endpoint(h)).collect();
    let config = format!(
        r#"
[node]
name = "gpu-hosts"
region = "eu"

[[listener]]
address = "{{listen}}"

[admin]
address = "{{admin}}"

[[route]]
prefix = "/"
pool = "gpu"

[[pool]]
name = "gpu"
region = "eu"
endpoints = [{}]
connect_timeout = "500ms"
first_byte_timeout = "30s"
{pool_extra}
"#,
        endpoints.join(", ")
    );
    tokio::task::block_in_place(|| EdgeProcess::start(&config))
}

fn completion(max_tokens: u32, stream: bool) -> String {
    serde_json::json!({
        "model": MODEL,
        "prompt": "the edge routes around trouble",
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "temperature": 0,
        "stream": stream,
    })
    .to_string()
}

/// Load loops in the killed-host test: also the most requests that can be
/// in flight on the killed host when the edge marks it down.
const DRIVERS: usize = 4;

/// One answer seen by a load loop.
struct Seen {
    at: Instant,
    status: u16,
    what: &'static str,
    detail: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gpu_host_costs_no_retryable_request_and_gets_none_once_marked_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    tokio::task::block_in_place(|| gen_model(dir.path(), "tiny"));
    let a = start_host(dir.path(), &[]).await;
    let b = start_host(dir.path(), &[]).await;
    let mut c = start_host(dir.path(), &[]).await;
    let edge = start_edge(
        &[&a, &b, &c],
        "health = { path = \"/health/ready\", interval = \"1s\", timeout = \"500ms\" }",
    );

    // Retryable requests only: model listings (GET) and whole completions
    // carrying an Idempotency-Key (a POST without one that was sent may
    // have been served, so it is never sent twice).
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
    let keys = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..DRIVERS)
        .map(|i| {
            let (stop, seen, keys) = (stop.clone(), seen.clone(), keys.clone());
            let (models, completions) = (edge.url("/v1/models"), edge.url("/v1/completions"));
            let http = client();
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let (what, request) = if i % 2 == 0 {
                        ("models", http.get(&models))
                    } else {
                        let key = keys.fetch_add(1, Ordering::SeqCst);
                        let request = http
                            .post(&completions)
                            .header("content-type", "application/json")
                            .header("idempotency-key", format!("k-{key}"))
                            .body(completion(8, false));
                        ("completion", request)
                    };
                    let (status, detail) = match request.send().await {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            match response.text().await {
                                Ok(text) => (status, text),
                                Err(e) => (0, e.to_string()),
                            }
                        }
                        Err(e) => (0, e.to_string()),
                    };
                    seen.lock().await.push(Seen {
                        at: Instant::now(),
                        status,
                        what,
                        detail,
                    });
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();

    let c_label = c.addr.to_string();
    wait_for("c serves completions", PATIENCE, async || {
        metric(
            &c.metrics().await,
            "breakwater_infer_prompt_tokens_total",
            &[],
        ) > 0.0
    })
    .await;
    c.kill();
    let killed_at = Instant::now();
    // How fast the edge notices is bench/failover.sh's to measure; this
    // test holds what must be true however busy the machine is.
    let (attempts_when_marked_down, detected) = wait_until_marked_down(&edge, &c_label).await;
    let marked_at = Instant::now();
    wait_for(
        "5 answers of each kind after the host was marked down",
        PATIENCE,
        async || {
            let seen = seen.lock().await;
            ["models", "completion"].iter().all(|what| {
                seen.iter()
                    .filter(|s| s.at > marked_at && s.what == *what)
                    .count()
                    >= 5
            })
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        let _ = tokio::time::timeout(PATIENCE, task).await;
    }
    let attempts_at_the_end = metric_sum(
        &edge.metrics().await,
        "breakwater_upstream_attempt_failures_total",
        &[("endpoint", &c_label)],
    );

    let seen = seen.lock().await;
    let errors: Vec<String> = seen
        .iter()
        .filter(|s| s.status != 200)
        .map(|s| {
            format!(
                "{} {} {:?} after the kill: {}",
                s.what,
                s.status,
                s.at.saturating_duration_since(killed_at),
                s.detail
            )
        })
        .collect();
    assert!(
        errors.is_empty(),
        "client-visible errors: {errors:#?}\n{}",
        edge.child.stderr()
    );
    // Only requests already sent to the host when it was marked down may
    // fail there afterwards, one attempt each; none is sent to it anew.
    assert!(
        attempts_at_the_end - attempts_when_marked_down <= DRIVERS as f64,
        "the edge sent {} requests to the killed host after marking it down \
         (marked down {detected:?} after the kill)",
        attempts_at_the_end - attempts_when_marked_down
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_a_streaming_completion_frees_the_gpu_hosts_slot() {
    // The demo model's shapes: a 200-token answer takes seconds on one CPU
    // thread; the finish reason and the token count below tell a slot freed
    // by the disconnect from one freed by the answer ending.
    let dir = tempfile::tempdir().expect("tempdir");
    tokio::task::block_in_place(|| gen_model(dir.path(), "smollm2-135m"));
    let host = start_host(dir.path(), &["--max-batch", "2"]).await;
    let edge = start_edge(&[&host], "");

    let response = client()
        .post(edge.url("/v1/completions"))
        .header("content-type", "application/json")
        .body(completion(200, true))
        .send()
        .await
        .expect("POST a streaming completion");
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let first = tokio::time::timeout(PATIENCE, body.next())
        .await
        .expect("a first event in time")
        .expect("an event")
        .expect("event bytes");
    assert!(
        String::from_utf8_lossy(&first).contains("data:"),
        "{first:?}"
    );
    let running = metric(
        &host.metrics().await,
        "breakwater_infer_running_sequences",
        &[],
    );
    assert_eq!(running, 1.0, "the host runs the sequence");
    let left_at = Instant::now();
    drop(body);

    let took = wait_for(
        "the host cancels the sequence and frees its KV blocks",
        PATIENCE,
        async || {
            let m = host.metrics().await;
            metric(&m, "breakwater_infer_running_sequences", &[]) == 0.0
                && metric(&m, "breakwater_infer_kv_blocks_used", &[]) == 0.0
                && metric(&m, "breakwater_infer_queue_depth", &[]) == 0.0
        },
    )
    .await;
    let m = host.metrics().await;
    assert_eq!(
        metric(
            &m,
            "breakwater_infer_sequences_finished_total",
            &[("reason", "cancelled")]
        ),
        1.0,
        "freed after {took:?} but not as cancelled:\n{m}"
    );
    let generated = metric(&m, "breakwater_infer_generated_tokens_total", &[]);
    assert!(
        generated < 200.0,
        "{generated} tokens generated: the answer ran to its end ({:?} after leaving)",
        left_at.elapsed()
    );
    // The edge let go of it too (its gauges refresh twice a second).
    wait_for(
        "the edge counts no request outstanding",
        PATIENCE,
        async || {
            metric_sum(
                &edge.metrics().await,
                "breakwater_upstream_outstanding_requests",
                &[],
            ) == 0.0
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_host_with_a_full_queue_is_marked_busy_not_dead() {
    let dir = tempfile::tempdir().expect("tempdir");
    tokio::task::block_in_place(|| gen_model(dir.path(), "smollm2-135m"));
    // One sequence at a time, one waiting: the third is turned away.
    let host = start_host(dir.path(), &["--max-batch", "1", "--queue", "1"]).await;
    // One failure would eject it: a busy answer must not count as one.
    let edge = start_edge(&[&host], "outlier = { consecutive_failures = 1 }");
    let http = client();
    // One answer first, so that the host's Retry-After is measured from
    // its drain rate rather than its default for an unknown rate.
    let warm = http
        .post(edge.url("/v1/completions"))
        .header("content-type", "application/json")
        .body(completion(2, false))
        .send()
        .await
        .expect("POST");
    assert_eq!(warm.status(), 200);

    let requests = (0..4).map(|_| async {
        let response = client()
            .post(edge.url("/v1/completions"))
            .header("content-type", "application/json")
            .body(completion(40, false))
            .send()
            .await
            .expect("POST");
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let body = response.text().await.unwrap_or_default();
        (status, retry_after, body)
    });
    let answers = futures_util::future::join_all(requests).await;
    let served = answers.iter().filter(|a| a.0 == 200).count();
    let busy: Vec<_> = answers.iter().filter(|a| a.0 == 503).collect();
    assert!(
        served >= 1 && !busy.is_empty() && served + busy.len() == answers.len(),
        "{answers:?}"
    );
    for (_, retry_after, body) in &busy {
        assert!(retry_after.is_some_and(|s| s >= 1), "{body}");
    }
    let host_label = host.addr.to_string();
    let metrics = edge.metrics().await;
    assert!(
        metric(
            &metrics,
            "breakwater_upstream_busy_total",
            &[("endpoint", &host_label)]
        ) >= 1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "breakwater_upstream_endpoint_healthy",
            &[("endpoint", &host_label)]
        ),
        1.0,
        "busy is not dead"
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "breakwater_upstream_ejections_total",
            &[("endpoint", &host_label)]
        ),
        0.0,
        "a busy answer ejected the host"
    );
    // Once its Retry-After has passed, the host serves again.
    wait_for("the host serves again", PATIENCE, async || {
        http.post(edge.url("/v1/completions"))
            .header("content-type", "application/json")
            .body(completion(2, false))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
}
