//! Continuations: an answer cut after any token and resumed from its token
//! ids (as an edge does when a GPU host is lost mid-answer) comes out as
//! the uninterrupted answer, text and tokens, greedy or seeded.

use crate::support::{self, TestServer};
use breakwater_infer::gguf::Gguf;
use breakwater_infer::scheduler::EngineConfig;
use breakwater_infer::test_model::tiny_llama;
use breakwater_wire::{RESUME_FIELD, TOKEN_IDS_FIELD, TOKEN_IDS_HEADER};
use serde_json::{Value, json};

const MODEL: &str = "tiny";
const WITH_IDS: &[(&str, &str)] = &[(TOKEN_IDS_HEADER, "1")];

async fn server() -> TestServer {
    let gguf = Gguf::from_bytes(tiny_llama(11)).expect("parse");
    support::start(&gguf, MODEL, EngineConfig::default()).await
}

/// One streamed answer as the edge sees it.
#[derive(Debug, Default)]
struct Streamed {
    /// `(text, token ids)` per chunk that has either.
    chunks: Vec<(String, Vec<u32>)>,
    finish: String,
    usage: Value,
    /// Whether any chunk carried the ids field at all.
    saw_ids_field: bool,
}

impl Streamed {
    fn text(&self) -> String {
        self.chunks.iter().map(|(t, _)| t.as_str()).collect()
    }

    fn ids(&self) -> Vec<u32> {
        self.chunks
            .iter()
            .flat_map(|(_, ids)| ids.clone())
            .collect()
    }

    /// The text the client had when the edge had forwarded `tokens` ids:
    /// every chunk up to the one carrying the `tokens`-th id.
    fn text_through(&self, tokens: usize) -> String {
        let mut seen = 0;
        let mut text = String::new();
        for (t, ids) in &self.chunks {
            if seen == tokens {
                break;
            }
            seen += ids.len();
            text.push_str(t);
        }
        assert_eq!(seen, tokens, "{self:?}");
        text
    }
}

async fn stream(s: &TestServer, path: &str, body: &Value, headers: &[(&str, &str)]) -> Streamed {
    let mut body = body.clone();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let reply = s.post_with(path, &body, headers).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let events = reply.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut out = Streamed::default();
    for event in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(event).expect("JSON chunk");
        assert!(v.get("error").is_none(), "{event}");
        if !v["usage"].is_null() {
            out.usage = v["usage"].clone();
        }
        out.saw_ids_field |= v.get(TOKEN_IDS_FIELD).is_some();
        let Some(choice) = v["choices"].get(0) else {
            continue;
        };
        if let Some(f) = choice["finish_reason"].as_str() {
            out.finish = f.to_owned();
        }
        let text = choice
            .get("delta")
            .map_or(&choice["text"], |d| &d["content"])
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let ids: Vec<u32> = v[TOKEN_IDS_FIELD]
            .as_array()
            .map(|a| a.iter().map(|id| id.as_u64().expect("id") as u32).collect())
            .unwrap_or_default();
        if !text.is_empty() || !ids.is_empty() {
            out.chunks.push((text, ids));
        }
    }
    out
}

fn resumed(body: &Value, tokens: &[u32]) -> Value {
    let mut body = body.clone();
    body[RESUME_FIELD] = json!({ "tokens": tokens });
    body
}

/// Cuts `body`'s answer after each of `cuts` tokens, resumes it, and checks
/// that the client would have received exactly the uninterrupted answer.
async fn check_seams(s: &TestServer, path: &str, body: &Value, cuts: &[usize]) -> Streamed {
    let whole = stream(s, path, body, WITH_IDS).await;
    let ids = whole.ids();
    assert!(ids.len() >= 2, "{whole:?}");
    assert_eq!(
        whole.usage["completion_tokens"].as_u64(),
        Some(ids.len() as u64),
        "one id per generated token: {whole:?}"
    );
    for &cut in cuts.iter().filter(|&&c| c < ids.len()) {
        let rest = stream(s, path, &resumed(body, &ids[..cut]), WITH_IDS).await;
        assert_eq!(rest.ids(), ids[cut..], "tokens after a cut at {cut}");
        assert_eq!(
            whole.text_through(cut) + &rest.text(),
            whole.text(),
            "text across a cut at {cut}"
        );
        assert_eq!(rest.finish, whole.finish, "cut at {cut}");
        // usage counts the whole answer, not the continuation (which may
        // find part of its prompt in the prefix cache).
        for count in ["prompt_tokens", "completion_tokens", "total_tokens"] {
            assert_eq!(
                rest.usage[count], whole.usage[count],
                "{count}, cut at {cut}"
            );
        }
    }
    whole
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greedy_chat_resumes_after_any_token_as_if_never_cut() {
    let s = server().await;
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": 24, "temperature": 0, "ignore_eos": true,
    });
    let cuts: Vec<usize> = (1..24).collect();
    let whole = check_seams(&s, "/v1/chat/completions", &body, &cuts).await;
    assert_eq!(whole.ids().len(), 24);
    assert_eq!(whole.finish, "length");

    // A client that does not ask for ids sees OpenAI's format only.
    let plain = stream(&s, "/v1/chat/completions", &body, &[]).await;
    assert!(!plain.saw_ids_field, "{plain:?}");
    assert_eq!(plain.text(), whole.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_sampled_stream_continues_its_random_sequence() {
    let s = server().await;
    let body = json!({
        "model": MODEL, "prompt": "hello world", "max_tokens": 30,
        "temperature": 1.5, "top_p": 0.95, "top_k": 50, "seed": 7, "ignore_eos": true,
    });
    let whole = check_seams(&s, "/v1/completions", &body, &[1, 10, 17, 29]).await;
    // The draw matters: another seed, resumed at 10, goes elsewhere.
    let mut other = body.clone();
    other["seed"] = json!(8);
    let rest = stream(
        &s,
        "/v1/completions",
        &resumed(&other, &whole.ids()[..10]),
        WITH_IDS,
    )
    .await;
    assert_ne!(rest.ids(), whole.ids()[10..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_sequence_spanning_the_seam_still_stops_and_is_never_sent() {
    let s = server().await;
    let base = json!({
        "model": MODEL, "prompt": "hello world", "max_tokens": 30,
        "temperature": 0, "ignore_eos": true,
    });
    let full = stream(&s, "/v1/completions", &base, &[]).await.text();
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 14, "{full:?}");
    // A stop sequence several tokens long from the middle of the text: some
    // cuts fall while part of it is held back.
    let stop: String = chars[8..13].iter().collect();
    let mut body = base.clone();
    body["stop"] = json!([stop]);
    let cuts: Vec<usize> = (1..30).collect();
    let whole = check_seams(&s, "/v1/completions", &body, &cuts).await;
    assert_eq!(whole.finish, "stop");
    assert_eq!(
        whole.text(),
        full[..full.find(&stop).expect("stop in text")]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_answer_resumes_and_reports_its_own_tokens() {
    let s = server().await;
    let body = json!({
        "model": MODEL, "prompt": "hello world", "max_tokens": 20,
        "temperature": 0, "ignore_eos": true,
    });
    let whole = s.post_with("/v1/completions", &body, WITH_IDS).await.json();
    let ids: Vec<u32> = serde_json::from_value(whole[TOKEN_IDS_FIELD].clone()).expect("ids");
    assert_eq!(ids.len(), 20);
    let streamed = stream(&s, "/v1/completions", &body, WITH_IDS).await;
    assert_eq!(streamed.ids(), ids);

    let rest = s
        .post_with("/v1/completions", &resumed(&body, &ids[..7]), WITH_IDS)
        .await
        .json();
    let rest_ids: Vec<u32> = serde_json::from_value(rest[TOKEN_IDS_FIELD].clone()).expect("ids");
    assert_eq!(rest_ids, ids[7..]);
    let text = |v: &Value| v["choices"][0]["text"].as_str().expect("text").to_owned();
    assert_eq!(streamed.text_through(7) + &text(&rest), text(&whole));
    for count in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(rest["usage"][count], whole["usage"][count], "{count}");
    }
    // Without the header, no ids.
    let plain = s.post("/v1/completions", &body).await.json();
    assert!(plain.get(TOKEN_IDS_FIELD).is_none(), "{plain}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_that_cannot_be_served_is_refused_and_harms_no_one() {
    let s = server().await;
    let body = json!({"model": MODEL, "prompt": "hello", "max_tokens": 5, "temperature": 0});
    let refused = |reply: support::Reply, what: &str| {
        assert_eq!(reply.status, 400, "{what}: {}", reply.text);
        let v = reply.json();
        assert_eq!(v["error"]["param"], RESUME_FIELD, "{what}: {v}");
    };
    // An id past the vocabulary would fail the whole batch's step.
    refused(
        s.post("/v1/completions", &resumed(&body, &[3, u32::MAX]))
            .await,
        "out of vocabulary",
    );
    refused(
        s.post("/v1/completions", &resumed(&body, &[3, 4, 5, 6, 7]))
            .await,
        "nothing left to generate",
    );
    // Control tokens come from templates only: a forged turn is refused
    // (`<|im_start|>` is 1 in the test model), and so is a stop token
    // (`<|im_end|>`, 2) unless the answer generates through stop tokens.
    refused(
        s.post("/v1/completions", &resumed(&body, &[3, 2, 1])).await,
        "control tokens",
    );
    let mut through_eos = body.clone();
    through_eos["ignore_eos"] = json!(true);
    let ok = s
        .post("/v1/completions", &resumed(&through_eos, &[3, 2]))
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    refused(
        s.post("/v1/completions", &resumed(&through_eos, &[3, 2, 1]))
            .await,
        "a forged turn, even through stop tokens",
    );
    let mut unknown = body.clone();
    unknown[RESUME_FIELD] = json!({"tokens": [3], "extra": 1});
    assert_eq!(s.post("/v1/completions", &unknown).await.status, 400);
    // And the host still serves.
    let ok = s.post("/v1/completions", &body).await;
    assert_eq!(ok.status, 200, "{}", ok.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_model_resumes_seeded_accented_text_without_a_seam() {
    // Byte-level BPE spells accented letters over several tokens: some
    // cuts fall inside a character the first host was holding back.
    let path = breakwater_infer::demo_model::ensure(&breakwater_infer::demo_model::default_dir())
        .expect("fetch the demo model");
    let gguf = Gguf::open(path).expect("parse the demo model");
    let s = support::start(
        &gguf,
        breakwater_infer::demo_model::MODEL_NAME,
        EngineConfig::default(),
    )
    .await;
    let body = json!({
        "model": breakwater_infer::demo_model::MODEL_NAME,
        "messages": [{"role": "user", "content": "Écris une phrase en français: « été », « où », « très »."}],
        "max_tokens": 24, "temperature": 0.8, "seed": 3, "ignore_eos": true,
    });
    let whole = check_seams(
        &s,
        "/v1/chat/completions",
        &body,
        &[1, 2, 5, 9, 13, 16, 20, 23],
    )
    .await;
    assert_eq!(whole.ids().len(), 24);
}
