//! The GPU host serving from model stores, as processes: `breakwater
//! gpu-host --model-ref m:CHANNEL` against a real S3-compatible server
//! (SeaweedFS on loopback), with tiny test models (`breakwater model
//! gen-test`; different seeds give different greedy answers).
//!
//! - Hot swap under a request loop, by `POST /admin/models/reload` and by
//!   polling the channel: no request fails, each client's answers switch
//!   from v1's greedy output to v2's and never go back, `/v1/models` and
//!   the metrics name v2.
//! - A version with a flipped byte in the bucket is refused (answer, log
//!   line, metrics) and the serving version keeps serving.
//! - With the first store stopped, the host starts from the second, and
//!   follows the channel there.
//! - An edge caching the host's deterministic answers stops serving the
//!   old version's entries once the host swapped.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use breakwater_e2e::{
    ChildGuard, EdgeProcess, GpuHostProcess, PATIENCE, breakwater, completion_caching_edge, metric,
    metric_sum, post_json, wait_for,
};
use breakwater_store::testing::S3Server;

const MODEL: &str = "m";
/// The request every client sends: greedy, a fixed length, so that each
/// version has exactly one answer.
const REQUEST: &str =
    r#"{"model":"m","prompt":"hello world","max_tokens":24,"temperature":0,"ignore_eos":true}"#;
const STREAMED: &str = r#"{"model":"m","prompt":"hello world","max_tokens":24,"temperature":0,"ignore_eos":true,"stream":true}"#;

fn store_url(server: &S3Server, prefix: &str) -> String {
    server.store_url(prefix)
}

fn with_credentials(mut command: Command) -> Command {
    S3Server::pass_credentials(&mut command);
    command
        .env_remove("BREAKWATER_ADMIN_TOKEN")
        .env("RUST_LOG", "info");
    command
}

/// Runs `breakwater ARGS` to completion (within a minute); panics with its
/// output when it fails.
fn cli(args: &[&str]) -> String {
    let mut child = ChildGuard::spawn(with_credentials(breakwater(args)));
    let status = child.wait_timeout(Duration::from_secs(60));
    let output = child.stderr();
    match status {
        Some(status) if status.success() => output,
        Some(status) => panic!("breakwater {args:?} failed ({status}):\n{output}"),
        None => panic!("breakwater {args:?} did not finish within 60 s:\n{output}"),
    }
}

/// Writes a tiny test model from `seed` and pushes it as `m@version`.
fn push(store: &str, version: &str, seed: u64, channel: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_str().expect("utf-8 path");
    cli(&["model", "gen-test", path, "--seed", &seed.to_string()]);
    let mut args = vec![
        "model",
        "push",
        path,
        "--name",
        MODEL,
        "--version",
        version,
        "--store",
        store,
    ];
    if let Some(channel) = channel {
        args.extend(["--channel", channel]);
    }
    cli(&args);
    dir
}

fn promote(store: &str, version: &str, channel: &str) {
    let reference = format!("{MODEL}@{version}");
    cli(&[
        "model",
        "promote",
        &reference,
        "--channel",
        channel,
        "--store",
        store,
    ]);
}

/// A `breakwater gpu-host` on a free port.
struct Host {
    process: GpuHostProcess,
    client: reqwest::Client,
}

impl Host {
    /// Starts `gpu-host --model-ref REFERENCE --store S… --model-cache
    /// CACHE EXTRA…` and waits until it is ready.
    async fn start(
        reference: &str,
        stores: &[&str],
        cache: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Host {
        let cache = cache.to_str().expect("utf-8 path");
        let mut args = vec![
            "--model-ref",
            reference,
            "--model-cache",
            cache,
            // A store that is down is left quickly.
            "--connect-timeout",
            "1s",
            "--retry-timeout",
            "1s",
            "--drain-seconds",
            "10",
        ];
        for store in stores {
            args.extend(["--store", store]);
        }
        args.extend_from_slice(extra);
        let configure = |command: &mut Command| {
            S3Server::pass_credentials(command);
            command
                .env_remove("BREAKWATER_ADMIN_TOKEN")
                .env("RUST_LOG", "info");
            for (k, v) in env {
                command.env(k, v);
            }
        };
        Host {
            process: GpuHostProcess::start(&args, configure, Duration::from_secs(60)).await,
            client: reqwest::Client::builder()
                .timeout(PATIENCE)
                .build()
                .expect("client"),
        }
    }

    fn stderr(&self) -> String {
        self.process.stderr()
    }

    fn url(&self, path: &str) -> String {
        self.process.url(path)
    }

    /// The version `/v1/models` names.
    async fn version(&self) -> String {
        let text = self
            .client
            .get(self.url("/v1/models"))
            .send()
            .await
            .expect("GET /v1/models")
            .text()
            .await
            .expect("models");
        let models: serde_json::Value = serde_json::from_str(&text).expect("models JSON");
        models["data"][0]["version"]
            .as_str()
            .unwrap_or_else(|| panic!("no version in {models}"))
            .to_owned()
    }

    async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics")
    }

    /// `POST /admin/models/reload`: the status and the answer.
    async fn reload(&self, token: Option<&str>) -> (u16, serde_json::Value) {
        let mut request = self.client.post(self.url("/admin/models/reload"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("POST /admin/models/reload");
        let status = response.status().as_u16();
        let text = response.text().await.expect("reload answer");
        let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        (status, body)
    }

    /// One greedy answer: its text and the version that produced it.
    async fn ask(&self, stream: bool) -> Answer {
        let response = self
            .client
            .post(self.url("/v1/completions"))
            .header("content-type", "application/json")
            .body(if stream { STREAMED } else { REQUEST })
            .send()
            .await
            .map_err(|e| format!("send: {e}"))?;
        let status = response.status();
        let version = response
            .headers()
            .get("x-model-version")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = response.text().await.map_err(|e| format!("body: {e}"))?;
        if !status.is_success() {
            return Err(format!("HTTP {status}: {body}"));
        }
        let text = if stream {
            let mut text = String::new();
            for line in body.lines() {
                let Some(data) = line.strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    continue;
                }
                let chunk: serde_json::Value =
                    serde_json::from_str(data).map_err(|e| format!("chunk {data}: {e}"))?;
                if chunk.get("error").is_some() {
                    return Err(format!("stream error: {data}"));
                }
                text.push_str(chunk["choices"][0]["text"].as_str().unwrap_or(""));
            }
            if !body.contains("data: [DONE]") {
                return Err(format!("stream cut short: {body}"));
            }
            text
        } else {
            let answer: serde_json::Value =
                serde_json::from_str(&body).map_err(|e| format!("answer {body}: {e}"))?;
            answer["choices"][0]["text"]
                .as_str()
                .ok_or_else(|| format!("no text in {body}"))?
                .to_owned()
        };
        Ok((text, version))
    }
}

/// An answer's text and the version that gave it, or why there was none.
type Answer = Result<(String, String), String>;

/// One client's answers so far, in order.
type Answers = Arc<std::sync::Mutex<Vec<Answer>>>;

/// Clients asking in a loop, each recording its answers in order.
struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<(Answers, tokio::task::JoinHandle<()>)>,
    host: Arc<Host>,
}

impl Load {
    /// Two clients asking for whole answers and one streaming.
    fn start(host: &Arc<Host>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = [false, false, true]
            .into_iter()
            .map(|stream| {
                let host = Arc::clone(host);
                let stop = Arc::clone(&stop);
                let answers = Arc::new(std::sync::Mutex::new(Vec::new()));
                let task = tokio::spawn({
                    let answers = Arc::clone(&answers);
                    async move {
                        while !stop.load(Ordering::SeqCst) {
                            let answer = host.ask(stream).await;
                            answers.lock().expect("answers").push(answer);
                        }
                    }
                });
                (answers, task)
            })
            .collect();
        Load {
            stop,
            clients,
            host: Arc::clone(host),
        }
    }

    /// Waits until every client has had `n` more answers from `version`.
    async fn wait_for_answers(&self, version: &str, n: usize) {
        // The clients' own records are behind their tasks; ask alongside.
        let deadline = Instant::now() + PATIENCE;
        let mut seen = 0;
        while seen < n {
            if let Ok((_, v)) = self.host.ask(false).await
                && v == version
            {
                seen += 1;
            }
            assert!(
                Instant::now() < deadline,
                "fewer than {n} answers from {version} within {PATIENCE:?}"
            );
        }
    }

    /// Stops the clients and checks what they got: no failure, only `old`
    /// then only `new` for each client, and both seen overall.
    async fn finish(self, old: &(String, String), new: &(String, String)) {
        // Every client gets an answer after the switch, however long a
        // busy machine takes to give one.
        let deadline = Instant::now() + PATIENCE;
        while !self.clients.iter().all(|(answers, _)| {
            answers
                .lock()
                .expect("answers")
                .iter()
                .any(|a| a.as_ref() == Ok(new))
        }) {
            assert!(
                Instant::now() < deadline,
                "a client had no answer from {} within {PATIENCE:?}",
                new.1
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stop.store(true, Ordering::SeqCst);
        let mut total = [0usize; 2];
        for (i, (answers, client)) in self.clients.into_iter().enumerate() {
            tokio::time::timeout(PATIENCE, client)
                .await
                .expect("the client stops")
                .expect("the client task");
            let answers = std::mem::take(&mut *answers.lock().expect("answers"));
            let mut switched = false;
            for (n, answer) in answers.iter().enumerate() {
                let answer = match answer {
                    Ok(answer) => answer,
                    Err(e) => panic!("client {i}: request {n} failed: {e}"),
                };
                if answer == old {
                    assert!(
                        !switched,
                        "client {i}: request {n} went back to the old version"
                    );
                    total[0] += 1;
                } else if answer == new {
                    switched = true;
                    total[1] += 1;
                } else {
                    panic!("client {i}: request {n}: unexpected answer {answer:?}");
                }
            }
            assert!(switched, "client {i} never saw the new version");
        }
        assert!(total[0] > 0, "no answers from the old version in the loop");
        eprintln!(
            "answers: {} from {}, {} from {}",
            total[0], old.1, total[1], new.1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_swap_under_load_loses_no_request_and_a_corrupt_version_is_refused() {
    let server = S3Server::start().await;
    let store = store_url(&server, "hotswap");
    let _v1 = push(&store, "1", 11, Some("stable"));
    let _v2 = push(&store, "2", 22, None);
    promote(&store, "1", "canary");
    let cache = tempfile::tempdir().expect("tempdir");

    // --- by reload ------------------------------------------------------
    let host = Arc::new(Host::start("m:stable", &[&store], cache.path(), &[], &[]).await);
    assert_eq!(host.version().await, "1");
    let old = host.ask(false).await.expect("an answer from v1");
    assert_eq!(old.1, "1");
    let (status, body) = host.reload(None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"], "unchanged", "{body}");

    let load = Load::start(&host);
    load.wait_for_answers("1", 3).await;
    promote(&store, "2", "stable");
    let (status, body) = host.reload(None).await;
    assert_eq!(status, 200, "{body}\n{}", host.stderr());
    assert_eq!(body["result"], "swapped", "{body}");
    assert_eq!(body["from"], "1", "{body}");
    assert_eq!(body["to"], "2", "{body}");
    let new = host.ask(false).await.expect("an answer from v2");
    assert_eq!(new.1, "2");
    assert_ne!(old.0, new.0, "v1 and v2 must answer differently");
    load.wait_for_answers("2", 3).await;
    load.finish(&old, &new).await;
    assert_eq!(host.version().await, "2");
    let text = host.metrics().await;
    assert_eq!(
        metric(
            &text,
            "breakwater_model_swaps_total",
            &[("outcome", "swapped")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "breakwater_model_serving_info",
            &[("version", "2"), ("reference", "m:stable")]
        ),
        1.0,
        "{text}"
    );
    let (_, body) = host.reload(None).await;
    assert_eq!(body["result"], "unchanged", "{body}");

    // --- a corrupt version ----------------------------------------------
    let _v3 = push(&store, "3", 33, None);
    let key = "hotswap/models/m/3/model.safetensors";
    let raw = server.store(S3Server::BUCKET);
    let mut bytes = raw.get(key, 16 << 20).await.expect("get").to_vec();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    raw.put(key, bytes).await.expect("put");
    promote(&store, "3", "stable");
    let (status, body) = host.reload(None).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["result"], "refused", "{body}");
    assert_eq!(body["version"], "3", "{body}");
    assert_eq!(body["serving"], "2", "{body}");
    assert_eq!(body["stage"], "pull", "{body}");
    let reason = body["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("corrupt") && reason.contains("model.safetensors"),
        "{body}"
    );
    assert_eq!(host.version().await, "2");
    assert_eq!(host.ask(true).await.expect("v2 keeps serving"), new);
    assert!(!cache.path().join("models/m/3").exists());
    let text = host.metrics().await;
    assert_eq!(
        metric(
            &text,
            "breakwater_model_pull_refused_total",
            &[("reason", "sha256")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "breakwater_model_swaps_total",
            &[("outcome", "pull_failed")]
        ),
        1.0,
        "{text}"
    );
    // The log is written off the request path: the line comes soon after
    // the answer, not necessarily before it.
    wait_for("the refusal in the host's log", PATIENCE, async || {
        host.stderr().contains("refusing model version m@3")
    })
    .await;
    drop(host);

    // --- by polling, with a token guarding reload --------------------------
    let polled = Arc::new(
        Host::start(
            "m:canary",
            &[&store],
            cache.path(),
            &["--poll-interval", "1"],
            &[("BREAKWATER_ADMIN_TOKEN", "s3cret")],
        )
        .await,
    );
    assert_eq!(polled.version().await, "1");
    let (status, body) = polled.reload(None).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = polled.reload(Some("s3cret")).await;
    assert_eq!(
        (status, &body["result"]),
        (200, &"unchanged".into()),
        "{body}"
    );
    let load = Load::start(&polled);
    load.wait_for_answers("1", 3).await;
    promote(&store, "2", "canary");
    let deadline = Instant::now() + PATIENCE;
    while polled.version().await != "2" {
        assert!(
            Instant::now() < deadline,
            "the poll did not swap within {PATIENCE:?}:\n{}",
            polled.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    load.wait_for_answers("2", 3).await;
    load.finish(&old, &new).await;
    let text = polled.metrics().await;
    assert_eq!(
        metric(
            &text,
            "breakwater_model_swaps_total",
            &[("outcome", "swapped")]
        ),
        1.0,
        "{text}"
    );
    // v2 came from the cache the first host filled: nothing downloaded.
    assert!(
        metric(&text, "breakwater_model_pull_bytes_total", &[]) == 0.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_host_falls_back_to_the_second_store_when_the_first_is_stopped() {
    let (mut eu, us) = tokio::join!(S3Server::start(), S3Server::start());
    let (first, second) = (store_url(&eu, "eu"), store_url(&us, "us"));
    let _v1 = push(&first, "1", 11, Some("stable"));
    let _v1_us = push(&second, "1", 11, Some("stable"));
    eu.stop();

    let cache = tempfile::tempdir().expect("tempdir");
    let host = Host::start("m:stable", &[&first, &second], cache.path(), &[], &[]).await;
    assert_eq!(host.version().await, "1");
    let text = host.metrics().await;
    assert!(
        metric(&text, "breakwater_model_store_fallbacks_total", &[]) >= 1.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "breakwater_model_pulls_total",
            &[("source", "store")]
        ),
        1.0,
        "{text}"
    );

    // The channel is followed in the second store too. (The check the
    // host makes right after its start may be the one that finds v2: it
    // waits for the first store first.)
    let _v2 = push(&second, "2", 22, None);
    promote(&second, "2", "stable");
    let (status, body) = host.reload(None).await;
    assert_eq!(status, 200, "{body}\n{}", host.stderr());
    match body["result"].as_str() {
        Some("swapped") => assert_eq!(body["to"], "2", "{body}"),
        Some("unchanged") => assert_eq!(body["version"], "2", "{body}"),
        _ => panic!("{body}"),
    }
    assert_eq!(host.version().await, "2");
    let text = host.metrics().await;
    assert_eq!(
        metric(
            &text,
            "breakwater_model_swaps_total",
            &[("outcome", "swapped")]
        ),
        1.0,
        "{text}"
    );
    host.ask(false).await.expect("v2 answers");
}

/// An edge caching `host`'s deterministic completions, with the pool's
/// readiness checked twice a second.
fn caching_edge(host: &Host) -> EdgeProcess {
    completion_caching_edge(
        &host.url(""),
        "",
        "[pool.health]\npath = \"/health/ready\"\ninterval = \"500ms\"\ntimeout = \"400ms\"",
    )
}

/// [`REQUEST`] through `edge`: its `X-Cache`, `X-Model-Version` and text.
async fn ask_edge(edge: &EdgeProcess) -> (String, String, String) {
    let answered = post_json(
        &reqwest::Client::new(),
        &edge.url("/v1/completions"),
        REQUEST,
    )
    .await;
    assert_eq!(answered.status, 200);
    let answer: serde_json::Value = serde_json::from_slice(&answered.body).expect("a JSON answer");
    let text = answer["choices"][0]["text"].as_str().unwrap_or_default();
    (answered.x_cache, answered.model_version, text.to_owned())
}

/// How many times the edge saw an endpoint name a model version it did
/// not name before.
async fn versions_seen(edge: &EdgeProcess) -> f64 {
    metric_sum(
        &edge.metrics().await,
        "breakwater_upstream_model_version_changes_total",
        &[],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_retires_the_edges_cached_answers_of_the_old_version() {
    let server = S3Server::start().await;
    let store = store_url(&server, "retire");
    let _v1 = push(&store, "1", 11, Some("stable"));
    let _v2 = push(&store, "2", 22, None);
    let cache = tempfile::tempdir().expect("tempdir");
    let host = Host::start("m:stable", &[&store], cache.path(), &[], &[]).await;
    let edge = caching_edge(&host);

    let (outcome, version, v1_text) = ask_edge(&edge).await;
    assert_eq!((outcome.as_str(), version.as_str()), ("MISS", "1"));
    let hit = ask_edge(&edge).await;
    assert_eq!(hit, ("HIT".to_owned(), "1".to_owned(), v1_text.clone()));

    promote(&store, "2", "stable");
    let (status, body) = host.reload(None).await;
    assert_eq!(status, 200, "{body}\n{}", host.stderr());
    assert_eq!(body["to"], "2", "{body}");
    // The edge hears of the swap from its next readiness check; from then
    // on v1's entry is never fresh, its hour of TTL notwithstanding.
    wait_for("the edge to see version 2", PATIENCE, async || {
        versions_seen(&edge).await >= 2.0
    })
    .await;
    let (outcome, version, v2_text) = ask_edge(&edge).await;
    assert_eq!((outcome.as_str(), version.as_str()), ("MISS", "2"));
    assert_ne!(v2_text, v1_text, "v1 and v2 answer differently");
    let hit = ask_edge(&edge).await;
    assert_eq!(hit, ("HIT".to_owned(), "2".to_owned(), v2_text));
    let text = edge.metrics().await;
    assert_eq!(
        metric(&text, "breakwater_cache_retired_model_entries_total", &[]),
        1.0,
        "{text}"
    );
}
