//! The whole path on a tiny random model: file, tokenizer, template and the
//! forward pass, in milliseconds.

use breakwater_infer::chat_template::{ChatTemplate, Message};
use breakwater_infer::cpu::CpuBackend;
use breakwater_infer::generate::argmax;
use breakwater_infer::generate::greedy;
use breakwater_infer::gguf::Gguf;
use breakwater_infer::model::ModelError;
use breakwater_infer::model::Step;
use breakwater_infer::model::llama::{Batch, Llama};
use breakwater_infer::test_model::tiny_llama;
use breakwater_infer::tokenizer::Tokenizer;

fn load(seed: u64) -> (Gguf, Llama) {
    let gguf = Gguf::from_bytes(tiny_llama(seed)).expect("parse");
    let model = Llama::from_gguf(&gguf).expect("load");
    (gguf, model)
}

#[test]
fn chat_prompt_to_tokens_is_deterministic_and_thread_count_independent() {
    let (gguf, model) = load(1);
    let tokenizer = Tokenizer::from_gguf(&gguf).expect("tokenizer");
    let prompt = ChatTemplate::from_gguf(&gguf)
        .expect("template")
        .render(&[Message::new("user", "hello world")], true)
        .expect("render");
    let ids = tokenizer.encode(&prompt).expect("encode");
    assert_eq!(ids[0], 1, "<|im_start|> is one token");

    let run = |threads| {
        let backend = CpuBackend::new(threads).expect("backend");
        let mut state = model.new_state(64);
        greedy(&model, &backend, &mut state, &ids, 16, &[]).expect("generate")
    };
    let one = run(1);
    assert_eq!(one.len(), 16);
    assert_eq!(one, run(2));
    assert_eq!(one, run(2));
    assert_ne!(
        one,
        {
            let (_, other) = load(2);
            let backend = CpuBackend::new(1).expect("backend");
            let mut state = other.new_state(64);
            greedy(&other, &backend, &mut state, &ids, 16, &[]).expect("generate")
        },
        "another seed, another model"
    );
}

#[test]
fn sequences_do_not_share_state() {
    let (_, model) = load(3);
    let backend = CpuBackend::new(2).expect("backend");
    let (a, b) = ([5u32, 70, 71, 72], [100u32, 9, 9]);
    let alone = |tokens: &[u32]| {
        let mut state = model.new_state(8);
        let mut logits = Vec::new();
        for &t in tokens {
            logits = model
                .forward(&backend, t, &mut state)
                .expect("forward")
                .to_vec();
        }
        logits
    };
    let (mut sa, mut sb) = (model.new_state(8), model.new_state(8));
    let mut la = Vec::new();
    let mut lb = Vec::new();
    for (i, &t) in a.iter().enumerate() {
        la = model
            .forward(&backend, t, &mut sa)
            .expect("forward")
            .to_vec();
        if let Some(&t) = b.get(i) {
            lb = model
                .forward(&backend, t, &mut sb)
                .expect("forward")
                .to_vec();
        }
    }
    assert_eq!(la, alone(&a));
    assert_eq!(lb, alone(&b));
}

#[test]
fn a_prompt_fed_at_once_gives_the_logits_of_feeding_it_token_by_token() {
    let (_, model) = load(6);
    let backend = CpuBackend::new(2).expect("backend");
    // Long enough to cross into parallel attention (from position 128).
    let prompt: Vec<u32> = (0..150).map(|i| (i * 37 % 250) as u32 + 3).collect();
    let mut one_by_one = model.new_state(160);
    let mut expected = Vec::new();
    for &t in &prompt {
        expected = model
            .forward(&backend, t, &mut one_by_one)
            .expect("forward")
            .to_vec();
    }
    let mut at_once = model.new_state(160);
    let got = model
        .forward_tokens(&backend, &prompt, &mut at_once)
        .expect("forward");
    assert_eq!(got, expected.as_slice());
    // In chunks too, and the caches agree: the next token sees the same past.
    let mut chunked = model.new_state(160);
    for chunk in prompt.chunks(61) {
        model
            .forward_tokens(&backend, chunk, &mut chunked)
            .expect("chunk");
    }
    let a = model
        .forward(&backend, 9, &mut one_by_one)
        .expect("next")
        .to_vec();
    let b = model
        .forward(&backend, 9, &mut at_once)
        .expect("next")
        .to_vec();
    let c = model
        .forward(&backend, 9, &mut chunked)
        .expect("next")
        .to_vec();
    assert_eq!(a, b);
    assert_eq!(a, c);
}

#[test]
fn a_batch_of_sequences_gives_each_the_logits_it_gets_alone() {
    let (_, model) = load(8);
    let backend = CpuBackend::new(2).expect("backend");
    let prompts: [Vec<u32>; 3] = [(3..23).collect(), vec![50, 60, 70], vec![99]];
    const DECODE: usize = 5;

    // Each alone: the prompt, then greedy tokens one at a time.
    let alone: Vec<Vec<Vec<f32>>> = prompts
        .iter()
        .map(|prompt| {
            let mut state = model.new_state(64);
            let mut logits = vec![
                model
                    .forward_tokens(&backend, prompt, &mut state)
                    .expect("prompt")
                    .to_vec(),
            ];
            for _ in 0..DECODE {
                let next = argmax(logits.last().expect("logits"));
                logits.push(
                    model
                        .forward(&backend, next, &mut state)
                        .expect("decode")
                        .to_vec(),
                );
            }
            logits
        })
        .collect();

    // All together: one step prefills all three, then each step decodes all.
    let mut states: Vec<_> = prompts.iter().map(|_| model.new_state(64)).collect();
    let mut batch = Batch::default();
    let mut feed: Vec<Vec<u32>> = prompts.to_vec();
    for round in 0..=DECODE {
        let mut steps: Vec<Step<'_>> = feed
            .iter()
            .zip(states.iter_mut())
            .map(|(tokens, state)| Step { tokens, state })
            .collect();
        model
            .forward_batch(&backend, &mut batch, &mut steps)
            .expect("step");
        for (seq, ((state, expected), feed)) in states.iter().zip(&alone).zip(&mut feed).enumerate()
        {
            assert_eq!(
                state.logits(),
                expected[round].as_slice(),
                "sequence {seq}, round {round}"
            );
            *feed = vec![argmax(state.logits())];
        }
    }

    // A step with one invalid sequence feeds none of them.
    let (mut ok, mut full) = (model.new_state(8), model.new_state(2));
    let err = model.forward_batch(
        &backend,
        &mut batch,
        &mut [
            Step {
                tokens: &[5],
                state: &mut ok,
            },
            Step {
                tokens: &[5, 6, 7],
                state: &mut full,
            },
        ],
    );
    assert!(matches!(err, Err(ModelError::ContextFull { capacity: 2 })));
    assert_eq!((ok.len(), full.len()), (0, 0));
}

#[test]
fn bad_tokens_and_full_contexts_are_errors() {
    let (_, model) = load(4);
    let backend = CpuBackend::new(1).expect("backend");
    let mut state = model.new_state(2);
    let vocab = model.config().vocab_size as u32;
    assert!(matches!(
        model.forward(&backend, vocab, &mut state),
        Err(ModelError::TokenOutOfRange { .. })
    ));
    model.forward(&backend, 3, &mut state).expect("first");
    model.forward(&backend, 4, &mut state).expect("second");
    assert!(matches!(
        model.forward(&backend, 5, &mut state),
        Err(ModelError::ContextFull { capacity: 2 })
    ));
    let mut state = model.new_state(3);
    assert!(matches!(
        model.forward_tokens(&backend, &[1, 2, 3, 4], &mut state),
        Err(ModelError::ContextFull { capacity: 3 })
    ));
    assert_eq!(state.len(), 0, "a refused chunk leaves the state untouched");
    // Greedy stops at the capacity instead of failing.
    let mut state = model.new_state(4);
    let out = greedy(&model, &backend, &mut state, &[3, 4], 100, &[]).expect("generate");
    assert_eq!(out.len(), 3);
}

#[test]
fn every_truncation_of_a_model_file_is_an_error() {
    let bytes = tiny_llama(5);
    // Every 97th length keeps the test quick while still landing in every
    // section of the file.
    for len in (0..bytes.len()).step_by(97) {
        let result = Gguf::from_bytes(bytes[..len].to_vec()).map(|g| Llama::from_gguf(&g));
        assert!(
            !matches!(result, Ok(Ok(_))),
            "a model truncated to {len} bytes loaded"
        );
    }
}
