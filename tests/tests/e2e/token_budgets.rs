//! LLM token budgets enforced at the edge, against a real GPU host process
//! (CPU backend, a random tiny model) behind a `breakwater edge` whose
//! `/v1/` route runs the bundled rate-limit plugin with token budgets.
//!
//! - A key with 1,000 tokens a minute is served until its budget is spent
//!   and then refused with 429 and `Retry-After`; each answer's
//!   `X-Breakwater-Tokens-Used` is the GPU host's own `usage`, and what the
//!   key used stays within its budget plus what refilled meanwhile. Refill
//!   only adds tokens, so the bounds hold however slow the machine is.
//! - A stream asking for more than its budget holds is capped there and
//!   ends with an error event, its usage chunk saying exactly the cap.
//! - An answer from the cache costs nothing: its reservation comes back.

use std::time::Instant;

use breakwater_e2e::{
    EdgeProcess, GpuHostProcess, PATIENCE, gen_test_model, identity_and_rest, llm_edge, send_json,
};

/// The edge: `k-minute` has 1,000 tokens a minute, `k-s1` and `k-s2` 150;
/// request rates are not what is tested.
/// The rate-limit plugin's configuration: `k-minute` has 1,000 tokens a
/// minute, `k-s1` and `k-s2` 150; request rates are not what is tested.
const BUDGETS: &str = r#"{ tiers = { minute = { rate_per_second = 100, burst = 100, tokens = { per_minute = 1000 } }, short = { rate_per_second = 100, burst = 100, tokens = { per_minute = 150 } } }, keys = { k-minute = "minute", k-s1 = "short", k-s2 = "short" } }"#;

/// An edge with the token budgets in front of `host`, caching
/// deterministic completions too when `cached`.
fn budgeted_edge(host: &GpuHostProcess, cached: bool) -> EdgeProcess {
    let mut plugins = vec![("rate-limit", "rate_limit", BUDGETS)];
    if cached {
        plugins.push(("cache-policy", "cache_policy", "{ default_ttl = 3600 }"));
    }
    llm_edge(
        &format!("http://{}", host.addr),
        "",
        if cached { "cache = true" } else { "" },
        &plugins,
        "first_byte_timeout = \"60s\"",
    )
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<u64> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    }
}

async fn post(client: &reqwest::Client, url: &str, key: &str, body: &str) -> Answer {
    let response = send_json(client.post(url).bearer_auth(key), body).await;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.text().await.expect("the answer");
    Answer {
        status,
        headers,
        body,
    }
}

async fn gpu_host() -> (tempfile::TempDir, GpuHostProcess) {
    let model = tempfile::tempdir().expect("tempdir");
    gen_test_model(model.path(), "tiny", 11);
    let path = model.path().to_str().expect("UTF-8 path").to_owned();
    let host =
        GpuHostProcess::start(&["--model", &path, "--model-name", "m"], |_| {}, PATIENCE).await;
    (model, host)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_with_1000_tokens_a_minute_is_refused_once_its_budget_is_spent() {
    let (_model, host) = gpu_host().await;
    let edge = budgeted_edge(&host, false);
    let client = reqwest::Client::new();
    let url = edge.url("/v1/completions");
    let body =
        r#"{"model":"m","prompt":"how many","max_tokens":200,"temperature":0,"ignore_eos":true}"#;
    // The plugin's estimate: 4 body bytes a token, and one completion token.
    let need = body.len().div_ceil(4) as u64 + 1;

    let started = Instant::now();
    let mut used = 0;
    let mut refusal = None;
    for _ in 0..60 {
        let answer = post(&client, &url, "k-minute", body).await;
        if answer.status == 429 {
            refusal = Some(answer);
            break;
        }
        assert_eq!(answer.status, 200, "{}", answer.body);
        let parsed: serde_json::Value = serde_json::from_str(&answer.body).expect("JSON");
        let prompt = parsed["usage"]["prompt_tokens"].as_u64().expect("usage");
        let completion = parsed["usage"]["completion_tokens"]
            .as_u64()
            .expect("usage");
        assert_eq!(
            answer.header("x-breakwater-tokens-used"),
            Some(prompt + completion),
            "the header is the GPU host's usage"
        );
        let reserved = answer
            .header("x-breakwater-tokens-reserved")
            .expect("reserved");
        assert!(prompt + completion <= reserved, "{reserved} reserved");
        match answer.header("x-breakwater-tokens-cap") {
            // The budget held less than asked: the GPU host generated
            // exactly what it allowed.
            Some(cap) => assert_eq!(completion, cap),
            None => assert_eq!(completion, 200),
        }
        assert!(answer.header("x-breakwater-tokens-remaining").is_some());
        used += prompt + completion;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let refusal = refusal.expect("the budget ran out");
    assert!(
        refusal.body.contains(r#""error":"token_budget_exhausted""#),
        "{}",
        refusal.body
    );
    assert!(refusal.header("retry-after").is_some_and(|s| s >= 1));
    let ratelimit = refusal
        .headers
        .get("ratelimit")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(ratelimit.contains(r#""minute-tokens""#), "{ratelimit}");
    // Refused only once too little was left, and never given more than the
    // budget and its refill (1000 a minute) since the first request.
    assert!(used + need > 1000, "refused early: {used} used");
    let refilled = (1000.0 / 60.0 * elapsed).ceil() as u64;
    assert!(
        used <= 1000 + refilled,
        "{used} used in {elapsed:.1} s: over the budget"
    );
}

/// The `data:` payloads of an event stream, parsed ( `[DONE]` as a string).
fn events(stream: &str) -> Vec<serde_json::Value> {
    stream
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(|data| serde_json::from_str(data).unwrap_or_else(|_| data.into()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_over_its_budget_is_cut_at_the_cap_with_an_error_event() {
    let (_model, host) = gpu_host().await;
    let edge = budgeted_edge(&host, false);
    let client = reqwest::Client::new();
    let url = edge.url("/v1/completions");
    for (key, include_usage) in [("k-s1", true), ("k-s2", false)] {
        let body = format!(
            r#"{{"model":"m","prompt":"tell me","max_tokens":200,"temperature":0,"ignore_eos":true,"stream":true,"stream_options":{{"include_usage":{include_usage}}}}}"#
        );
        let answer = post(&client, &url, key, &body).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        // 150 tokens a minute, less the prompt estimate.
        let cap = answer.header("x-breakwater-tokens-cap").expect("capped");
        assert_eq!(cap, 150 - body.len().div_ceil(4) as u64);
        let events = events(&answer.body);
        let content = events
            .iter()
            .filter(|e| {
                e["choices"][0]["text"]
                    .as_str()
                    .is_some_and(|t| !t.is_empty())
            })
            .count();
        assert!(content > 0 && content as u64 <= cap);
        let usage: Vec<&serde_json::Value> = events
            .iter()
            .filter(|e| e.get("usage").is_some_and(|u| !u.is_null()))
            .collect();
        if include_usage {
            assert_eq!(usage.len(), 1, "{}", answer.body);
            assert_eq!(usage[0]["usage"]["completion_tokens"].as_u64(), Some(cap));
        } else {
            assert!(
                usage.is_empty(),
                "the usage the edge asked for is not passed on: {}",
                answer.body
            );
        }
        let n = events.len();
        assert!(n >= 2, "{}", answer.body);
        assert_eq!(
            events[n - 2]["error"]["code"].as_str(),
            Some("token_budget_exhausted"),
            "{}",
            answer.body
        );
        assert_eq!(events[n - 1], serde_json::Value::from("[DONE]"));
        let finish = events
            .iter()
            .filter_map(|e| e["choices"][0]["finish_reason"].as_str())
            .collect::<Vec<_>>();
        assert_eq!(finish, ["length"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_from_the_cache_costs_no_tokens() {
    let (_model, host) = gpu_host().await;
    let edge = budgeted_edge(&host, true);
    let client = reqwest::Client::new();
    let url = edge.url("/v1/completions");
    let body =
        r#"{"model":"m","prompt":"again","max_tokens":100,"temperature":0,"ignore_eos":true}"#;
    let first = post(&client, &url, "k-minute", body).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.headers["x-cache"], "MISS");
    let charged = first.header("x-breakwater-tokens-used").expect("used");
    let left = first.header("x-breakwater-tokens-remaining").expect("left");
    assert!(
        charged > 100,
        "100 completion tokens and the prompt: {charged}"
    );

    let second = post(&client, &url, "k-minute", body).await;
    assert_eq!(second.status, 200, "{}", second.body);
    assert_eq!(second.headers["x-cache"], "HIT");
    assert_eq!(
        identity_and_rest(second.body.as_bytes()).1,
        identity_and_rest(first.body.as_bytes()).1
    );
    assert_eq!(second.header("x-breakwater-tokens-used"), Some(0));
    // Everything reserved came back: no less is left than before (refill
    // only adds).
    let after = second
        .header("x-breakwater-tokens-remaining")
        .expect("left");
    assert!(
        after >= left,
        "{after} left after a free answer, {left} before"
    );
}
