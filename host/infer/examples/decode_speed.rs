//! Speed on the demo model: single-stream prompt and decode tokens/s, then
//! aggregate decode tokens/s with 4 and 16 sequences batched per step.
//!
//! `cargo run --release -p breakwater-infer --example decode_speed -- [threads] [tokens]`

use std::time::Instant;

use breakwater_infer::chat_template::{ChatTemplate, Message};
use breakwater_infer::cpu::CpuBackend;
use breakwater_infer::demo_model;
use breakwater_infer::generate::argmax;
use breakwater_infer::gguf::Gguf;
use breakwater_infer::model::Step;
use breakwater_infer::model::llama::{Batch, Llama};
use breakwater_infer::tokenizer::Tokenizer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let threads: usize = args.next().map_or(Ok(2), |a| a.parse())?;
    let tokens: usize = args.next().map_or(Ok(128), |a| a.parse())?;

    let gguf = Gguf::open(demo_model::ensure(&demo_model::default_dir())?)?;
    let model = Llama::from_gguf(&gguf)?;
    let tokenizer = Tokenizer::from_gguf(&gguf)?;
    let prompt = ChatTemplate::from_gguf(&gguf)?.render(
        &[Message::new(
            "user",
            "Write a long story about a lighthouse keeper.",
        )],
        true,
    )?;
    let ids = tokenizer.encode(&prompt)?;
    let backend = CpuBackend::new(threads)?;

    let mut state = model.new_state(ids.len() + tokens + 1);
    let start = Instant::now();
    let mut next = argmax(model.forward_tokens(&backend, &ids, &mut state)?);
    let prompt_s = start.elapsed().as_secs_f64();
    // Decode ignores EOS so that every run measures the same number of steps.
    let start = Instant::now();
    for _ in 0..tokens {
        next = argmax(model.forward(&backend, next, &mut state)?);
    }
    let decode_s = start.elapsed().as_secs_f64();
    println!(
        "threads {threads}: prompt {} tokens at {:.1} tok/s, decode {tokens} tokens at {:.1} tok/s",
        ids.len(),
        ids.len() as f64 / prompt_s,
        tokens as f64 / decode_s
    );

    for streams in [4, 16] {
        let mut states: Vec<_> = (0..streams)
            .map(|_| model.new_state(ids.len() + tokens + 1))
            .collect();
        let mut batch = Batch::default();
        let mut feed: Vec<Vec<u32>> = vec![ids.clone(); streams];
        let mut step = |feed: &mut Vec<Vec<u32>>| -> Result<(), Box<dyn std::error::Error>> {
            let mut steps: Vec<Step<'_>> = feed
                .iter()
                .zip(states.iter_mut())
                .map(|(tokens, state)| Step { tokens, state })
                .collect();
            model.forward_batch(&backend, &mut batch, &mut steps)?;
            for (f, s) in feed.iter_mut().zip(&states) {
                *f = vec![argmax(s.logits())];
            }
            Ok(())
        };
        step(&mut feed)?;
        let start = Instant::now();
        for _ in 0..tokens {
            step(&mut feed)?;
        }
        let s = start.elapsed().as_secs_f64();
        println!(
            "threads {threads}: {streams} streams decode at {:.1} tok/s in all",
            (streams * tokens) as f64 / s
        );
    }
    Ok(())
}
