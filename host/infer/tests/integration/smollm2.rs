//! The demo model end to end: tokenizer, chat template and greedy decoding
//! must reproduce llama.cpp's answer on the same GGUF.

use breakwater_infer::chat_template::{ChatTemplate, Message};
use breakwater_infer::cpu::CpuBackend;
use breakwater_infer::demo_model;
use breakwater_infer::generate::greedy;
use breakwater_infer::gguf::Gguf;
use breakwater_infer::model::llama::Llama;
use breakwater_infer::tokenizer::Tokenizer;

fn open() -> Gguf {
    let path = demo_model::ensure(&demo_model::default_dir()).expect("fetch the demo model");
    Gguf::open(path).expect("parse the demo model")
}

#[test]
fn reads_the_demo_models_hyperparameters() {
    let gguf = open();
    let model = Llama::from_gguf(&gguf).expect("load");
    let c = model.config();
    assert_eq!(
        (
            c.dim,
            c.hidden_dim,
            c.n_layers,
            c.n_heads,
            c.n_kv_heads,
            c.vocab_size
        ),
        (576, 1536, 30, 9, 3, 49152)
    );
    assert_eq!(
        (c.rope_theta, c.rope_dim, c.context_length),
        (100_000.0, 64, 8192)
    );
}

#[test]
fn tokenizer_keeps_control_tokens_whole_and_round_trips() {
    let gguf = open();
    let tokenizer = Tokenizer::from_gguf(&gguf).expect("tokenizer");
    let template = ChatTemplate::from_gguf(&gguf).expect("template");
    // Without a system message the template injects its own.
    let prompt = template
        .render(&[Message::new("user", "Hi!")], true)
        .expect("render");
    let ids = tokenizer.encode(&prompt).expect("encode");
    let (im_start, im_end, newline) = (1, 2, 198);
    let controls: Vec<(usize, u32)> = ids
        .iter()
        .copied()
        .enumerate()
        .filter(|&(_, id)| tokenizer.is_special(id))
        .collect();
    let n = ids.len();
    assert_eq!(
        controls,
        [
            (0, im_start),
            (n - 13, im_end),
            (n - 11, im_start),
            (n - 6, im_end),
            (n - 4, im_start)
        ]
    );
    assert_eq!(
        &ids[n - 6..],
        &[im_end, newline, im_start, 520, 9531, newline]
    );
    assert_eq!(tokenizer.token(520).as_deref(), Some("ass"));

    let text = "Paris, 2024: naïve café — ünïcödé ✓  spaces\ttabs\n";
    let ids = tokenizer.encode(text).expect("encode");
    assert_eq!(tokenizer.decode(&ids).expect("decode"), text);
}

#[test]
fn greedy_answer_matches_llama_cpp() {
    let gguf = open();
    let model = Llama::from_gguf(&gguf).expect("load");
    let tokenizer = Tokenizer::from_gguf(&gguf).expect("tokenizer");
    let template = ChatTemplate::from_gguf(&gguf).expect("template");
    let prompt = template
        .render(
            &[
                Message::new("system", "You are a helpful assistant."),
                Message::new("user", "What is the capital of France?"),
            ],
            true,
        )
        .expect("render");
    let ids = tokenizer.encode(&prompt).expect("encode");
    let backend = CpuBackend::new(2).expect("backend");
    let mut state = model.new_state(256);
    let out = greedy(&model, &backend, &mut state, &ids, 32, &[tokenizer.eos()]).expect("generate");
    assert_eq!(
        tokenizer.decode(&out).expect("decode"),
        "The capital of France is Paris."
    );
}
