//! Throughput of the inference engine in process, for `bench/infer.sh`.
//!
//! ```text
//! infer_bench gen --shape smollm2-135m --dtype f16 --seed 7 --out DIR
//! infer_bench run --model PATH --device cuda --streams 1,8,32,64 \
//!     --prompt-tokens 128 --gen-tokens 128 [--threads N] [--repeat 3]
//! ```
//!
//! `gen` writes a random test model in the Hugging Face layout (the GPU
//! check generates the demo model's shapes on the GPU machine, where the
//! file cannot be carried). `run` loads a model (GGUF file or HF
//! directory) on the device, then for each stream count submits that many
//! greedy requests at once (random prompt ids, end-of-sequence ignored so
//! each generates exactly `--gen-tokens`) and prints one JSON line per
//! measurement, the median of `--repeat` runs:
//!
//! - `decode`: generated tokens per second over the whole run (prefill
//!   included), as `transformers`' `generate` is timed in the peer script;
//! - `prefill`: prompt tokens per second, every stream's prompt with one
//!   token generated;
//! - `decode_steady`: generated tokens per second while every stream is
//!   decoding, from the moment the last stream has its first token to the
//!   end (the prompts are prefilled in one step, so that is the batched
//!   decode rate without the prefill).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use breakwater_infer::backend::cuda::CudaRunner;
use breakwater_infer::backend::{CpuRunner, Device};
use breakwater_infer::cpu::CpuBackend;
use breakwater_infer::loader;
use breakwater_infer::sampling::SamplingParams;
use breakwater_infer::scheduler::{Engine, EngineConfig, Event, GenerationRequest};
use breakwater_infer::telemetry::Telemetry;
use breakwater_infer::test_model::hf::{self, HfDtype};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_default();
    let mut flags = HashMap::new();
    while let Some(flag) = args.next() {
        let Some(name) = flag.strip_prefix("--") else {
            return Err(format!("unexpected argument {flag:?}").into());
        };
        let value = args
            .next()
            .ok_or_else(|| format!("--{name} needs a value"))?;
        flags.insert(name.to_owned(), value);
    }
    let get = |name: &str, default: &str| -> String {
        flags
            .get(name)
            .cloned()
            .unwrap_or_else(|| default.to_owned())
    };
    match command.as_str() {
        "gen" => {
            let out = PathBuf::from(get("out", ""));
            if out.as_os_str().is_empty() {
                return Err("gen needs --out DIR".into());
            }
            let dtype: HfDtype = get("dtype", "f16").parse()?;
            let started = Instant::now();
            let shape = hf::generate(
                &out,
                &get("shape", "smollm2-135m"),
                get("seed", "7").parse()?,
                dtype,
            )?;
            eprintln!(
                "wrote {} parameters ({dtype}) to {} in {:.1}s",
                shape.parameters(),
                out.display(),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        "run" => run(&get("model", ""), &get),
        _ => Err("usage: infer_bench gen|run --flag value …".into()),
    }
}

fn run(model: &str, get: &dyn Fn(&str, &str) -> String) -> Result<(), BoxError> {
    let device: Device = get("device", "auto").parse()?;
    let streams: Vec<usize> = get("streams", "1,8,32,64")
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let prompt_tokens: usize = get("prompt-tokens", "128").parse()?;
    let gen_tokens: usize = get("gen-tokens", "128").parse()?;
    let repeat: usize = get("repeat", "3").parse()?;
    let threads: usize = get("threads", &num_cpus().to_string()).parse()?;
    let max_batch = streams.iter().copied().max().unwrap_or(1);

    let loaded = loader::load(model)?;
    let vocab = loaded.model.shape().vocab_size;
    let tokenizer = Arc::new(loaded.tokenizer);
    let model = Arc::new(loaded.model);
    let config = |kv_budget_bytes| EngineConfig {
        max_batch,
        queue_capacity: max_batch * 2,
        kv_budget_bytes,
        // Whole prompts in a step: this measures throughput, not the
        // latency of decodes sharing a step with a long prefill.
        step_tokens: max_batch * prompt_tokens.max(1),
        stream_buffer: gen_tokens + 2,
        ..EngineConfig::default()
    };
    // Room for every stream's whole sequence, and no more.
    let kv_tokens = max_batch * (prompt_tokens + gen_tokens + 16);
    let (engine, backend) = match device {
        Device::Cpu => {
            let runner = CpuRunner::new(Arc::clone(&model), CpuBackend::new(threads)?);
            let budget = kv_tokens * breakwater_infer::backend::Runner::kv_bytes_per_token(&runner);
            let engine =
                Engine::start(runner, tokenizer, vec![], config(budget), Telemetry::new())?;
            (engine, "cpu")
        }
        Device::Cuda(n) => {
            let runner = CudaRunner::new(&model, n)?;
            eprintln!("device: {}", runner.device_name());
            let budget = kv_tokens * breakwater_infer::backend::Runner::kv_bytes_per_token(&runner);
            let engine =
                Engine::start(runner, tokenizer, vec![], config(budget), Telemetry::new())?;
            (engine, "cuda")
        }
        Device::Auto => return Err("name the device: --device cpu or --device cuda[:N]".into()),
    };

    // Warm-up: allocations and kernel first launches out of the timings.
    measure(&engine, max_batch, prompt_tokens, 4, vocab, 0)?;
    let median = |mut rates: Vec<f64>| {
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
    };
    for &n in &streams {
        let mut lines = Vec::new();
        for generate in [1, gen_tokens] {
            let runs: Vec<Rates> = (0..repeat.max(1))
                .map(|r| measure(&engine, n, prompt_tokens, generate, vocab, r as u64 + 1))
                .collect::<Result<_, _>>()?;
            if generate == 1 {
                lines.push((
                    "prefill",
                    1,
                    median(runs.iter().map(|r| r.prompt).collect()),
                ));
            } else {
                let whole = median(runs.iter().map(|r| r.generated).collect());
                let steady = median(runs.iter().map(|r| r.steady).collect());
                lines.push(("decode", generate, whole));
                lines.push(("decode_steady", generate, steady));
            }
        }
        for (kind, generate, rate) in lines {
            println!(
                "{{\"engine\":\"breakwater\",\"backend\":\"{backend}\",\"kind\":\"{kind}\",\"streams\":{n},\"prompt_tokens\":{prompt_tokens},\"gen_tokens\":{generate},\"tokens_per_second\":{rate:.1}}}"
            );
        }
    }
    engine.shutdown();
    Ok(())
}

/// Rates of one measurement, in tokens per second.
struct Rates {
    /// Prompt tokens over the whole run.
    prompt: f64,
    /// Generated tokens over the whole run.
    generated: f64,
    /// Generated tokens after every stream had its first, over the time
    /// after that.
    steady: f64,
}

/// Submits `streams` requests at once and waits for all of them.
fn measure(
    engine: &Engine,
    streams: usize,
    prompt_tokens: usize,
    generate: usize,
    vocab: usize,
    seed: u64,
) -> Result<Rates, BoxError> {
    let started = Instant::now();
    let mut receivers = Vec::with_capacity(streams);
    for s in 0..streams {
        let prompt = (0..prompt_tokens)
            .map(|i| {
                let mix =
                    (seed * 1_000_003 + s as u64 * 7919 + i as u64 * 104_729) % (vocab as u64 - 3);
                3 + mix as u32
            })
            .collect();
        receivers.push(engine.submit(GenerationRequest {
            prompt,
            max_tokens: generate,
            sampling: SamplingParams::greedy(),
            stop: vec![],
            deadline: None,
            ignore_eos: true,
            ..GenerationRequest::default()
        })?);
    }
    let waiters: Vec<_> = receivers
        .into_iter()
        .map(|mut rx| {
            std::thread::spawn(move || -> Result<(usize, Instant), String> {
                let mut first = None;
                while let Some(event) = rx.blocking_recv() {
                    match event {
                        Event::Text { .. } => {
                            first.get_or_insert_with(Instant::now);
                        }
                        Event::Done(finish) => {
                            let first = first.unwrap_or_else(Instant::now);
                            return Ok((finish.completion_tokens, first));
                        }
                        Event::Failed(f) => return Err(f.to_string()),
                    }
                }
                Err("the stream ended without finishing".into())
            })
        })
        .collect();
    let (mut generated, mut all_started) = (0, started);
    for w in waiters {
        let (tokens, first) = w.join().map_err(|_| "a waiter panicked")??;
        generated += tokens;
        all_started = all_started.max(first);
    }
    let seconds = started.elapsed().as_secs_f64();
    let steady_seconds = all_started.elapsed().as_secs_f64();
    Ok(Rates {
        prompt: (streams * prompt_tokens) as f64 / seconds,
        generated: generated as f64 / seconds,
        // Each stream's first token came before the window.
        steady: generated.saturating_sub(streams) as f64 / steady_seconds,
    })
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}
