//! Mid-stream failover against real GPU hosts: `breakwater gpu-host`
//! processes (CPU backend, a random model of SmolLM2-135M's shape from
//! `breakwater model gen-test`) behind a `breakwater edge` node whose route
//! has `resume = true`. Host `a` is the pool's only endpoint and `b` its
//! failover, so every answer starts on `a`; the test breaks `a` once the
//! client has read ten tokens (SIGKILL, or SIGSTOP for a stall) and the
//! client must get the uninterrupted run's answer, token for token.
//!
//! A cut only tests a resume when the host was still generating: the
//! answers are long enough (and a host slow enough: one thread) that it
//! is, and each test checks the edge's resume counter to be sure.

use std::process::{Command, Stdio};
use std::time::Duration;

use breakwater_e2e::{
    EdgeProcess, GpuHostProcess, PATIENCE, StreamedAnswer, gen_test_model, metric, metric_sum,
    read_event_stream, wait_for, workspace_root,
};
use serde_json::{Value, json};

const MODEL: &str = "test";

/// Tokens in a test answer: a cut after ten leaves seconds of generation.
const ANSWER_TOKENS: u32 = 160;

/// Tokens the client reads before the host is broken.
const CUT_AFTER: usize = 10;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client")
}

struct Lab {
    _dir: tempfile::TempDir,
    a: GpuHostProcess,
    b: GpuHostProcess,
    edge: EdgeProcess,
}

/// Two hosts on one random model; the edge's pool `gpu` is `a`, failing
/// over to `spare` (`b`).
async fn lab() -> Lab {
    lab_with(&[]).await
}

/// [`lab`] with `extra` options for the hosts.
async fn lab_with(extra: &[&str]) -> Lab {
    let dir = tempfile::tempdir().expect("tempdir");
    tokio::task::block_in_place(|| gen_test_model(dir.path(), "smollm2-135m", 11));
    let model = dir.path().to_str().expect("UTF-8 path").to_owned();
    let mut args = vec!["--model", &model, "--model-name", MODEL];
    args.extend_from_slice(extra);
    let a = GpuHostProcess::start(&args, |_| {}, PATIENCE * 3).await;
    let b = GpuHostProcess::start(&args, |_| {}, PATIENCE * 3).await;
    let config = format!(
        r#"
[node]
name = "resume"
region = "eu"

[[listener]]
address = "{{listen}}"

[admin]
address = "{{admin}}"

[[route]]
prefix = "/"
pool = "gpu"
resume = true
stall_timeout = "2s"

[[pool]]
name = "gpu"
region = "eu"
endpoints = ["http://{}"]
failover = ["spare"]
connect_timeout = "500ms"
first_byte_timeout = "30s"

[[pool]]
name = "spare"
region = "eu"
endpoints = ["http://{}"]
connect_timeout = "500ms"
first_byte_timeout = "30s"
"#,
        a.addr, b.addr
    );
    let edge = tokio::task::block_in_place(|| EdgeProcess::start(&config));
    Lab {
        _dir: dir,
        a,
        b,
        edge,
    }
}

fn chat(extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "the edge routes around trouble"}],
        "max_tokens": ANSWER_TOKENS,
        "ignore_eos": true,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let (Value::Object(body), Value::Object(extra)) = (&mut body, extra) {
        body.extend(extra);
    }
    body
}

/// One whole stream: one identity, one role chunk, no ids, usage over
/// the whole answer, `[DONE]` last.
trait Whole {
    fn assert_whole(&self, what: &str);
}

impl Whole for StreamedAnswer {
    fn assert_whole(&self, what: &str) {
        assert!(self.broken.is_none(), "{what}: {:?}", self.broken);
        assert_eq!(
            self.events.last().map(String::as_str),
            Some("[DONE]"),
            "{what}: {:?}",
            self.events
        );
        let chunks: Vec<Value> = self.chunks().collect();
        let ids: Vec<&Value> = chunks.iter().map(|c| &c["id"]).collect();
        assert!(ids.iter().all(|id| *id == ids[0]), "{what}: ids {ids:?}");
        let created: Vec<&Value> = chunks.iter().map(|c| &c["created"]).collect();
        assert!(created.iter().all(|c| *c == created[0]), "{what}");
        let roles = chunks
            .iter()
            .filter(|c| c["choices"][0]["delta"].get("role").is_some())
            .count();
        assert_eq!(roles, 1, "{what}: one role chunk");
        assert!(
            !self
                .events
                .iter()
                .any(|e| e.contains(breakwater_wire::TOKEN_IDS_FIELD)),
            "{what}: token ids reached the client"
        );
        let usage = chunks
            .iter()
            .find_map(|c| c.get("usage").filter(|u| !u.is_null()).cloned())
            .unwrap_or_else(|| panic!("{what}: no usage chunk"));
        assert_eq!(
            usage["completion_tokens"],
            json!(ANSWER_TOKENS),
            "{what}: {usage}"
        );
    }
}

/// Streams `body` from the edge; once `CUT_AFTER` chunks with text came,
/// runs `cut` (once).
async fn stream(edge: &EdgeProcess, body: &Value, mut cut: impl FnMut()) -> StreamedAnswer {
    stream_until(edge, body, usize::MAX, |n| {
        if n == CUT_AFTER {
            cut();
        }
    })
    .await
}

/// Like [`stream`], calling `at(n)` at each chunk with text, and leaving
/// after `leave_after` of them.
async fn stream_until(
    edge: &EdgeProcess,
    body: &Value,
    leave_after: usize,
    mut at: impl FnMut(usize),
) -> StreamedAnswer {
    let response = client()
        .post(edge.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    read_event_stream(response, |n| {
        at(n);
        n < leave_after
    })
    .await
}

async fn resumes(edge: &EdgeProcess, reason: &str) -> f64 {
    metric(
        &edge.metrics().await,
        "breakwater_upstream_stream_resumes_total",
        &[("pool", "gpu"), ("reason", reason)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greedy_stream_whose_host_is_killed_completes_identically() {
    let mut lab = lab().await;
    let body = chat(json!({}));
    let whole = stream(&lab.edge, &body, || {}).await;
    whole.assert_whole("uninterrupted");
    assert_eq!(resumes(&lab.edge, "reset").await, 0.0);

    let a = &mut lab.a;
    let cut = stream(&lab.edge, &body, || a.kill()).await;
    cut.assert_whole("resumed");
    assert_eq!(cut.text, whole.text, "the resumed answer differs");
    let metrics = lab.edge.metrics().await;
    let resumed = metric_sum(
        &metrics,
        "breakwater_upstream_stream_resumes_total",
        &[("pool", "gpu")],
    );
    assert_eq!(resumed, 1.0, "one resume (reset or eof):\n{metrics}");
    assert_eq!(
        metric_sum(
            &metrics,
            "breakwater_upstream_stream_resume_failures_total",
            &[]
        ),
        0.0
    );
    assert!(
        metric(
            &metrics,
            "breakwater_upstream_stream_resume_seconds_count",
            &[("pool", "gpu")]
        ) >= 1.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greedy_stream_whose_host_stalls_completes_identically() {
    let lab = lab().await;
    let body = chat(json!({}));
    let whole = stream(&lab.edge, &body, || {}).await;
    let cut = stream(&lab.edge, &body, || lab.a.freeze()).await;
    lab.a.thaw();
    cut.assert_whole("resumed after a stall");
    assert_eq!(cut.text, whole.text, "the resumed answer differs");
    assert_eq!(resumes(&lab.edge, "stall").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_host_hands_its_stream_over_and_exits_without_waiting() {
    let mut lab = lab_with(&["--drain-seconds", "600"]).await;
    let body = chat(json!({}));
    let whole = stream(&lab.edge, &body, || {}).await;
    let a = &lab.a;
    let cut = stream(&lab.edge, &body, || a.terminate()).await;
    cut.assert_whole("handed over");
    assert_eq!(cut.text, whole.text, "the handed-over answer differs");
    let metrics = lab.edge.metrics().await;
    assert_eq!(
        resumes(&lab.edge, "drain").await,
        1.0,
        "one hand-over:\n{metrics}"
    );
    // A drain counts nothing against the host.
    assert_eq!(
        metric_sum(
            &metrics,
            "breakwater_upstream_attempt_failures_total",
            &[("pool", "gpu")]
        ),
        0.0,
        "{metrics}"
    );
    // With its one stream handed over, the host has nothing to wait for:
    // it exits long before its 600 s drain.
    let exited = tokio::task::block_in_place(|| lab.a.wait_exit(PATIENCE * 3));
    assert!(exited, "host a still drains");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_a_resumed_stream_cancels_it_on_the_new_host() {
    let mut lab = lab().await;
    let body = chat(json!({}));
    let a = &mut lab.a;
    let left = stream_until(&lab.edge, &body, CUT_AFTER + 5, |n| {
        if n == CUT_AFTER {
            a.kill();
        }
    })
    .await;
    assert_eq!(left.text_at.len(), CUT_AFTER + 5, "{left:?}");
    // The continuation on b ends with the client: cancelled, not run out.
    let b_metrics = lab.b.url("/metrics");
    wait_for("b to cancel the continuation", PATIENCE * 3, async || {
        let text = breakwater_e2e::get_text(&b_metrics).await;
        metric(
            &text,
            "breakwater_infer_sequences_finished_total",
            &[("reason", "cancelled")],
        ) == 1.0
            && metric(&text, "breakwater_infer_running_sequences", &[]) == 0.0
    })
    .await;
    let text = breakwater_e2e::get_text(&b_metrics).await;
    assert_eq!(
        metric(
            &text,
            "breakwater_infer_sequences_finished_total",
            &[("reason", "length")]
        ),
        0.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_sampled_stream_continues_its_random_sequence() {
    let mut lab = lab().await;
    let body = chat(json!({"temperature": 1.0, "top_p": 0.95, "seed": 5}));
    let whole = stream(&lab.edge, &body, || {}).await;
    let a = &mut lab.a;
    let cut = stream(&lab.edge, &body, || a.kill()).await;
    cut.assert_whole("resumed seeded");
    assert_eq!(
        cut.text, whole.text,
        "the seeded continuation drew otherwise"
    );
    let resumed = metric_sum(
        &lab.edge.metrics().await,
        "breakwater_upstream_stream_resumes_total",
        &[("pool", "gpu")],
    );
    assert_eq!(resumed, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_answer_whose_host_dies_mid_generation_comes_whole() {
    let mut lab = lab().await;
    let body = chat(json!({"stream": false, "stream_options": null}));
    let url = lab.edge.url("/v1/chat/completions");
    let ask = || {
        client()
            .post(&url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    let whole = ask().await.expect("send").bytes().await.expect("body");
    let whole: Value = serde_json::from_slice(&whole).expect("JSON");
    let text = whole["choices"][0]["message"]["content"].clone();
    assert!(text.as_str().is_some_and(|t| !t.is_empty()), "{whole}");

    let pending = tokio::spawn(ask());
    // Killed once it has generated ten tokens of this answer.
    let a_metrics = lab.a.url("/metrics");
    let enough = f64::from(ANSWER_TOKENS) + CUT_AFTER as f64;
    wait_for(
        "host a to generate ten tokens of the answer",
        PATIENCE * 3,
        async || {
            let text = breakwater_e2e::get_text(&a_metrics).await;
            metric(&text, "breakwater_infer_generated_tokens_total", &[]) >= enough
        },
    )
    .await;
    lab.a.kill();
    let answer = pending.await.expect("join").expect("send");
    assert_eq!(answer.status(), 200);
    let answer = answer.bytes().await.expect("body");
    let answer: Value = serde_json::from_slice(&answer).expect("JSON");
    assert_eq!(answer["choices"][0]["message"]["content"], text, "{answer}");
    assert_eq!(answer["usage"], whole["usage"]);
    assert!(answer.get(breakwater_wire::TOKEN_IDS_FIELD).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_host_gone_the_openai_client_raises_upstream_lost() {
    let root = workspace_root();
    let python = root.join(".cache/venv-openai/bin/python");
    assert!(
        python.is_file(),
        "no {}: `cargo xtask test` creates it",
        python.display()
    );
    let mut lab = lab().await;
    let script = root.join("tests/openai_upstream_lost.py");
    let mut child = Command::new(&python)
        .arg(&script)
        .args(["--base-url", &lab.edge.url("/v1"), "--model", MODEL])
        .args(["--max-tokens", &ANSWER_TOKENS.to_string()])
        .args(["--pause-after", &CUT_AFTER.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python");
    let stdout = child.stdout.take().expect("stdout");
    let paused = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stdout).lines();
        let first = lines.next();
        (first, lines)
    });
    let (first, lines) = tokio::time::timeout(Duration::from_secs(120), paused)
        .await
        .expect("the script pauses within two minutes")
        .expect("join");
    assert_eq!(
        first.and_then(Result::ok).as_deref(),
        Some("paused"),
        "{}",
        read_all(child.stderr.take())
    );
    lab.a.kill();
    lab.b.kill();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"go\n").expect("resume the script");
    }
    let rest: Vec<String> =
        tokio::task::spawn_blocking(move || lines.map_while(Result::ok).collect::<Vec<String>>())
            .await
            .expect("join");
    let status = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("wait");
    assert!(
        status.status.success(),
        "{}: {rest:?}\n{}",
        status.status,
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(
        rest.iter().any(|line| line.starts_with("raised: ")),
        "{rest:?}"
    );
    let metrics = lab.edge.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "breakwater_upstream_stream_resume_failures_total",
            &[("pool", "gpu"), ("reason", "no_endpoint")]
        ),
        1.0,
        "{metrics}"
    );
}

fn read_all(stream: Option<impl std::io::Read>) -> String {
    let mut text = String::new();
    if let Some(mut stream) = stream {
        let _ = stream.read_to_string(&mut text);
    }
    text
}
