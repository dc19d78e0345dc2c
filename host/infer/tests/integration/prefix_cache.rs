//! The prefix cache over real HTTP: requests that share a long system
//! prompt prefill it once, a conversation's next turn reuses the turn
//! before, answers are those of a server without the cache, and a pool too
//! small to keep everything evicts and still answers right.

use crate::support::{self, Reply, TestServer};

use breakwater_infer::demo_model;
use breakwater_infer::gguf::Gguf;
use breakwater_infer::scheduler::EngineConfig;
use breakwater_infer::test_model::tiny_llama;
use serde_json::{Value, json};

const PROMPT_TOKENS: &str = "breakwater_infer_prompt_tokens_total";
const QUERIED: &str = "breakwater_infer_prefix_cache_queried_tokens_total";
const HITS: &str = "breakwater_infer_prefix_cache_hit_tokens_total";
const EVICTIONS: &str = "breakwater_infer_prefix_cache_evictions_total";
const CACHED_BLOCKS: &str = "breakwater_infer_prefix_cache_blocks";

/// Tokens per KV block (the engine's default).
const BLOCK: u64 = 16;

fn demo() -> Gguf {
    let path = demo_model::ensure(&demo_model::default_dir()).expect("fetch the demo model");
    Gguf::open(path).expect("parse the demo model")
}

/// An app's system prompt of over a thousand tokens, different sentence
/// by sentence so that no tokenizer folds it into a few repeats.
fn system_prompt() -> String {
    let subjects = ["orders", "refunds", "shipping", "accounts", "invoices"];
    let manners = ["politely", "briefly", "in plain words", "with one example"];
    (0..43)
        .map(|i| {
            format!(
                "Rule {i}: when a customer asks about {}, answer {} and cite policy section {}.",
                subjects[i % subjects.len()],
                manners[i % manners.len()],
                100 + i * 7
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn chat(messages: Value) -> Value {
    json!({
        "model": demo_model::MODEL_NAME,
        "messages": messages,
        "max_tokens": 24,
        "temperature": 0,
    })
}

struct Answer {
    content: String,
    prompt_tokens: u64,
    cached_tokens: u64,
}

fn answer(r: &Reply) -> Answer {
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    let usage = &v["usage"];
    Answer {
        content: v["choices"][0]["message"]["content"]
            .as_str()
            .expect("content")
            .to_owned(),
        prompt_tokens: usage["prompt_tokens"].as_u64().expect("prompt_tokens"),
        cached_tokens: usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .expect("cached_tokens"),
    }
}

/// Asks `s` and returns the answer and the prompt tokens it computed.
async fn ask(s: &TestServer, body: &Value) -> (Answer, u64) {
    let before = s.metric(PROMPT_TOKENS).await;
    let a = answer(&s.post("/v1/chat/completions", body).await);
    let computed = s.metric(PROMPT_TOKENS).await - before;
    (a, computed as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_system_prompt_is_prefilled_once_and_answers_as_without_the_cache() {
    let gguf = demo();
    let cached = support::start(&gguf, demo_model::MODEL_NAME, EngineConfig::default()).await;
    let cold = support::start(
        &gguf,
        demo_model::MODEL_NAME,
        EngineConfig {
            prefix_cache: false,
            ..EngineConfig::default()
        },
    )
    .await;
    let system = json!({"role": "system", "content": system_prompt()});
    let first = chat(json!([system, {"role": "user", "content": "Where is my order?"}]));
    let second = chat(json!([system, {"role": "user", "content": "Can I get a refund?"}]));

    // The first request computes its whole prompt.
    let (a, computed) = ask(&cached, &first).await;
    assert!(a.prompt_tokens > 1000, "{} prompt tokens", a.prompt_tokens);
    assert_eq!((a.cached_tokens, computed), (0, a.prompt_tokens));

    // The second computes only what follows the system prompt's blocks.
    let (b, computed) = ask(&cached, &second).await;
    let system_tokens = a.prompt_tokens - 12; // the first user turn's tail
    assert!(
        b.cached_tokens >= system_tokens / BLOCK * BLOCK - BLOCK,
        "{} of {} prompt tokens from the cache",
        b.cached_tokens,
        b.prompt_tokens
    );
    assert_eq!(b.cached_tokens % BLOCK, 0);
    assert_eq!(computed, b.prompt_tokens - b.cached_tokens);
    assert!(computed < 64, "computed {computed} tokens");
    assert_eq!(cached.metric(HITS).await as u64, b.cached_tokens);
    assert_eq!(
        cached.metric(QUERIED).await as u64,
        a.prompt_tokens + b.prompt_tokens
    );
    assert!(cached.metric(CACHED_BLOCKS).await as u64 >= a.prompt_tokens / BLOCK);

    // Its answer is the one a server without the cache gives.
    let (b_cold, computed) = ask(&cold, &second).await;
    assert_eq!((b_cold.cached_tokens, computed), (0, b.prompt_tokens));
    assert_eq!(b.content, b_cold.content);

    // A conversation's second turn reuses every full block of the first
    // turn's prompt (the answer's own blocks are not shared: see kv.rs).
    let turn_two = chat(json!([
        system,
        {"role": "user", "content": "Where is my order?"},
        {"role": "assistant", "content": a.content},
        {"role": "user", "content": "And when will it ship?"},
    ]));
    let (c, computed) = ask(&cached, &turn_two).await;
    assert!(
        c.cached_tokens >= a.prompt_tokens / BLOCK * BLOCK,
        "turn two took {} tokens from the cache; turn one's prompt had {}",
        c.cached_tokens,
        a.prompt_tokens
    );
    assert_eq!(computed, c.prompt_tokens - c.cached_tokens);
    let (c_cold, _) = ask(&cold, &turn_two).await;
    assert_eq!(c.content, c_cold.content);

    // Nothing is held once every request is done; the cache stays.
    let stats = cached.stats();
    assert_eq!(stats.kv_blocks_used, 0);
    assert_eq!(
        stats.kv_blocks_free,
        cached
            .app
            .model()
            .expect("model")
            .engine()
            .kv_blocks_total()
    );
    assert!(stats.kv_blocks_cached > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_too_small_for_every_prefix_evicts_and_answers_stay_right() {
    let gguf = Gguf::from_bytes(tiny_llama(11)).expect("parse");
    // The tiny model keeps 256 bytes per token (2 layers, 32 kv dims, keys
    // and values in f16): 4 KiB per block of 16.
    let engine = |prefix_cache| EngineConfig {
        // Eight blocks: a sequence takes five, so beside it the pool keeps
        // one other prefix's three idle blocks at most.
        kv_budget_bytes: 8 * 4096,
        block_tokens: BLOCK as usize,
        max_batch: 1,
        prefix_cache,
        ..EngineConfig::default()
    };
    let cached = support::start(&gguf, "tiny", engine(true)).await;
    let cold = support::start(&gguf, "tiny", engine(false)).await;
    let topics = ["apples", "rivers", "engines"];
    // Hits (a prefix again), misses beside an idle prefix, and misses
    // that must evict one.
    for (n, topic) in [0, 0, 1, 0, 2, 1, 0].into_iter().enumerate() {
        let body = json!({
            "model": "tiny",
            "prompt": format!("{}: {}", topics[topic], "a long shared start of a prompt ".repeat(2)),
            "max_tokens": 16,
            "temperature": 0,
        });
        let a = cached.post("/v1/completions", &body).await;
        let b = cold.post("/v1/completions", &body).await;
        assert_eq!((a.status, b.status), (200, 200), "{} {}", a.text, b.text);
        let (a, b) = (a.json(), b.json());
        assert_eq!(
            a["choices"][0]["text"], b["choices"][0]["text"],
            "request {n}"
        );
    }
    assert!(cached.metric(HITS).await > 0.0);
    assert!(cached.metric(EVICTIONS).await > 0.0);
    assert_eq!(cold.metric(HITS).await, 0.0);
    assert_eq!(cached.stats().kv_blocks_used, 0);
}
