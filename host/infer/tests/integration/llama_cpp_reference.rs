//! llama.cpp as the reference nobody here wrote: on the demo model's GGUF,
//! our chat template, tokenizer and CPU forward pass must reproduce what
//! llama.cpp (PyPI `llama-cpp-python` 0.3.36, driven by
//! `bench/reference.py`) computes for the same chat-templated prompts.
//!
//! It needs llama.cpp's venv, which takes about 15 minutes to compile, so
//! it is ignored by default; run it with
//!
//! ```text
//! python3 bench/reference.py --setup
//! cargo nextest run -p breakwater-infer --run-ignored only --test integration llama_cpp_reference
//! ```
//!
//! Run explicitly without the venv, it fails and says how to build it.
//!
//! It needs an x86-64 CPU with AVX-512 (F and DQ), as this project's build
//! machines have: llama.cpp, compiled for the CPU it runs on, sums in the
//! order of its widest vectors, and our backend copies the AVX-512 order.
//! Elsewhere it fails at once and says so.
//!
//! What it asserts, per conversation:
//! - the prompt text our template renders equals the one llama-cpp-python
//!   renders from the GGUF's own `tokenizer.chat_template`;
//! - our token ids for it equal llama.cpp's;
//! - our greedy continuation equals llama.cpp's for 32 tokens (end of turn
//!   does not stop either side);
//! - the first step's logits agree within [`LOGIT_TOLERANCE`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use breakwater_infer::chat_template::Message;
use breakwater_infer::cpu::CpuBackend;
use breakwater_infer::demo_model;
use breakwater_infer::generate::greedy;
use breakwater_infer::loader;
use breakwater_infer::model::Model;
use serde_json::{Value, json};

/// Tokens compared per conversation.
const GREEDY_TOKENS: usize = 32;

/// The largest difference allowed between our first-step logits and
/// llama.cpp's, in logit units (this model's logits span about 40), and the
/// bound on the mean difference over the vocabulary.
///
/// Measured: 0 on every prompt. Our CPU backend evaluates this model in
/// ggml's order, bit for bit (`cpu::ggml` says how), and it must:
/// both sides quantize activations to 8 bits before every matrix product,
/// so one ulp of difference upstream flips a rounding, moves that value by
/// half a quantization step, and 30 layers amplify it into logits 0.1–1
/// apart and different greedy tokens within 32 (seen before the order was
/// copied). The bounds leave room for nothing more than the last bits.
const LOGIT_TOLERANCE: f32 = 1e-4;
const MEAN_LOGIT_TOLERANCE: f32 = 1e-5;

fn workspace() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .unwrap_or(manifest)
        .to_path_buf()
}

/// The venv's Python, or a panic that says how to build it.
fn venv_python() -> PathBuf {
    let venv = std::env::var_os("LLAMA_CPP_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".cache").join("venv-llama-cpp"));
    let python = venv.join("bin").join("python");
    let marker = venv.join("breakwater-llama-cpp-cmake-args");
    assert!(
        python.is_file() && marker.is_file(),
        "llama.cpp's venv is missing or unfinished at {}: build it with \
         `python3 bench/reference.py --setup` (about 15 minutes), then run \
         this test again",
        venv.display()
    );
    python
}

fn conversations() -> Vec<Vec<Message>> {
    let system = || Message::new("system", "You are a helpful assistant.");
    vec![
        vec![
            system(),
            Message::new("user", "What is the capital of France?"),
        ],
        // No system message: the template injects SmolLM's own.
        vec![Message::new("user", "What is the capital of France?")],
        vec![
            system(),
            Message::new("user", "Write a haiku about the sea."),
        ],
        vec![
            Message::new("user", "Hi!"),
            Message::new("assistant", "Hello! How can I help you today?"),
            Message::new("user", "Give me three tips for sleeping better."),
        ],
        vec![
            system(),
            Message::new("user", "Explain what a hash map is in one sentence."),
        ],
        vec![Message::new(
            "user",
            "Traduis en français : « Good morning, how are you? » — merci ✓",
        )],
        vec![
            system(),
            Message::new(
                "user",
                "Write a Python function that reverses a string.\n\ndef reverse(s):",
            ),
        ],
    ]
}

/// Runs `bench/reference.py` on `model` for `convs`; returns its results.
fn llama_cpp(model: &Path, convs: &[Vec<Message>]) -> Vec<Value> {
    let input = Value::Array(
        convs
            .iter()
            .map(|messages| json!({ "messages": messages }))
            .collect(),
    );
    let mut child = Command::new(venv_python())
        .arg(workspace().join("bench").join("reference.py"))
        .arg("--model")
        .arg(model)
        .args(["--conversations", "-", "--threads", "2"])
        .args(["--n-predict", &GREEDY_TOKENS.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start bench/reference.py");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.to_string().as_bytes())
        .expect("write the conversations");
    let out = child.wait_with_output().expect("run bench/reference.py");
    assert!(
        out.status.success(),
        "bench/reference.py failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut report: Value = serde_json::from_slice(&out.stdout).expect("reference.py's JSON");
    eprintln!(
        "llama.cpp: llama-cpp-python {}, chat template: {}",
        report["llama_cpp_python"], report["chat_template"]
    );
    match report["results"].take() {
        Value::Array(results) => results,
        other => panic!("no results in reference.py's output: {other}"),
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an array of ids")
        .iter()
        .map(|id| {
            id.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .expect("an id")
        })
        .collect()
}

#[test]
#[ignore = "needs llama.cpp's venv: python3 bench/reference.py --setup"]
fn matches_llama_cpp_on_the_demo_model() {
    #[cfg(target_arch = "x86_64")]
    assert!(
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512dq"),
        "this CPU lacks AVX-512: llama.cpp built for it sums in 8-lane orders, and our \
         backend copies the 16-lane ones; run this test on an AVX-512 x86-64 CPU"
    );
    // Fail first on a missing venv, before fetching or loading anything.
    venv_python();
    let path = demo_model::ensure(&demo_model::default_dir()).expect("fetch the demo model");
    let convs = conversations();
    let reference = llama_cpp(&path, &convs);
    assert_eq!(reference.len(), convs.len(), "one result per conversation");

    let loaded = loader::load(&path).expect("load the demo model");
    let (Model::Llama(model), tokenizer) = (&loaded.model, &loaded.tokenizer);
    let backend = CpuBackend::new(2).expect("backend");
    let mut failures = Vec::new();
    for (i, (messages, theirs)) in convs.iter().zip(&reference).enumerate() {
        let prompt = loaded.template.render(messages, true).expect("render");
        let want_prompt = theirs["prompt"].as_str().expect("prompt text");
        if prompt != want_prompt {
            failures.push(format!(
                "#{i}: prompt text differs:\n ours {prompt:?}\n llama.cpp {want_prompt:?}"
            ));
        }
        let want_ids = ids(&theirs["prompt_ids"]);
        let our_ids = tokenizer.encode(want_prompt).expect("encode");
        if our_ids != want_ids {
            failures.push(format!(
                "#{i}: prompt ids differ:\n ours {our_ids:?}\n llama.cpp {want_ids:?}"
            ));
        }

        // First-step logits: ours after feeding llama.cpp's prompt ids.
        let mut state = model.new_state(want_ids.len() + GREEDY_TOKENS + 1);
        let ours = model
            .forward_tokens(&backend, &want_ids, &mut state)
            .expect("forward")
            .to_vec();
        let want: Vec<f32> = theirs["first_step_logits"]
            .as_array()
            .expect("logits")
            .iter()
            .map(|v| v.as_f64().expect("a logit") as f32)
            .collect();
        assert_eq!(ours.len(), want.len(), "vocabulary size");
        let (mut max, mut at, mut sum) = (0.0f32, 0, 0.0f64);
        for (t, (a, b)) in ours.iter().zip(&want).enumerate() {
            let d = (a - b).abs();
            sum += f64::from(d);
            if d > max {
                (max, at) = (d, t);
            }
        }
        let mean = (sum / want.len() as f64) as f32;
        let (lo, hi) = want
            .iter()
            .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        eprintln!(
            "#{i}: {} prompt ids; first-step logits: max |Δ| {max:.4} (token {at}), mean |Δ| \
             {mean:.5}, llama.cpp's span {lo:.2}..{hi:.2}",
            want_ids.len()
        );
        if max > LOGIT_TOLERANCE || mean > MEAN_LOGIT_TOLERANCE {
            failures.push(format!(
                "#{i}: first-step logits differ: max |Δ| {max} at token {at} (ours {}, llama.cpp \
                 {}), mean |Δ| {mean}; tolerance {LOGIT_TOLERANCE} / {MEAN_LOGIT_TOLERANCE}",
                ours[at], want[at]
            ));
        }

        // Greedy: 32 tokens from llama.cpp's prompt ids, end of turn included.
        let want_tokens = ids(&theirs["greedy_ids"]);
        let mut state = model.new_state(want_ids.len() + GREEDY_TOKENS + 1);
        let our_tokens =
            greedy(model, &backend, &mut state, &want_ids, GREEDY_TOKENS, &[]).expect("generate");
        let text = |t: &[u32]| tokenizer.decode(t).unwrap_or_else(|e| format!("<{e}>"));
        eprintln!("#{i}: llama.cpp {:?}", text(&want_tokens));
        if our_tokens != want_tokens {
            let first = our_tokens
                .iter()
                .zip(&want_tokens)
                .position(|(a, b)| a != b)
                .unwrap_or(our_tokens.len().min(want_tokens.len()));
            failures.push(format!(
                "#{i}: greedy tokens differ from token {first} on:\n ours      {our_tokens:?} \
                 {:?}\n llama.cpp {want_tokens:?} {:?}",
                text(&our_tokens),
                text(&want_tokens)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches with llama.cpp:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(convs.len() >= 5, "at least 5 chat-templated prompts");
}
