//! The CUDA backend against the CPU backend on the same weights: greedy
//! tokens identical, logits within a stated tolerance.
//!
//! These need an NVIDIA GPU; elsewhere each test prints `SKIPPED` and why,
//! and passes without having checked anything (`scripts/gpu-check.sh` runs
//! them where a GPU is). One check runs everywhere: `--device auto` falls
//! back to the CPU where CUDA is absent.

use std::sync::Arc;

use breakwater_infer::backend::cuda::{self, CudaRunner};
use breakwater_infer::backend::{CpuRunner, Runner, Sequence};
use breakwater_infer::cpu::CpuBackend;
use breakwater_infer::gguf::Gguf;
use breakwater_infer::hf::HfDir;
use breakwater_infer::model::llama::Llama;
use breakwater_infer::model::{Model, Step};
use breakwater_infer::scheduler::kv::BlockPool;
use breakwater_infer::test_model::{self, hf::HfDtype};

/// Greedy tokens generated after each prompt.
const GENERATED: usize = 32;

/// Logits may differ by this much, relative to the largest logit's
/// magnitude: the GPU feeds cuBLAS f16 activations where the CPU keeps them
/// in f32 (or 8 bits for quantized weights), and the two round queries and
/// attention weights differently (both keep the KV cache in f16).
const LOGIT_TOLERANCE: f32 = 2e-2;

fn gpu(test: &str) -> bool {
    match cuda::probe() {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIPPED {test}: no usable GPU ({e})");
            false
        }
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Tokens per KV block in these tests.
const BLOCK_TOKENS: usize = 16;

/// A runner with its KV pool reserved, and the ledger of that pool.
struct Pooled<R> {
    runner: R,
    blocks: BlockPool,
}

impl<R: Runner> Pooled<R> {
    fn new(mut runner: R, blocks: usize) -> Self {
        runner.reserve_kv(BLOCK_TOKENS, blocks).expect("KV pool");
        let token_bytes = runner.kv_bytes_per_token();
        let blocks = BlockPool::new(
            token_bytes,
            BLOCK_TOKENS,
            blocks * BlockPool::block_bytes(token_bytes, BLOCK_TOKENS),
            false,
        );
        Self { runner, blocks }
    }

    /// A fresh sequence of up to `tokens` tokens and its block table.
    fn sequence(&mut self, tokens: usize) -> (R::Sequence, Vec<u32>) {
        let blocks = self.blocks.allocate(&[], 0, tokens).expect("free blocks");
        let seq = self
            .runner
            .new_sequence(blocks.table.clone(), 0)
            .expect("a sequence");
        (seq, blocks.table)
    }
}

/// Feeds `prompt` in one step (a prefill), then decodes greedily; returns
/// the logits after the prompt and the tokens.
fn greedy<R: Runner>(pooled: &mut Pooled<R>, prompt: &[u32], n: usize) -> (Vec<f32>, Vec<u32>) {
    let (mut seq, table) = pooled.sequence(prompt.len() + n);
    let runner = &mut pooled.runner;
    runner
        .forward(&mut [Step {
            tokens: prompt,
            state: &mut seq,
        }])
        .expect("prefill");
    let first = seq.logits().to_vec();
    let mut tokens = vec![argmax(&first)];
    if let Some(on_device) = seq.greedy_token() {
        assert_eq!(
            on_device, tokens[0],
            "the device's argmax differs from the logits'"
        );
    }
    while tokens.len() < n {
        let last = [*tokens.last().unwrap_or(&0)];
        runner
            .forward(&mut [Step {
                tokens: &last,
                state: &mut seq,
            }])
            .expect("decode");
        tokens.push(argmax(seq.logits()));
    }
    pooled.blocks.release(&table);
    (first, tokens)
}

/// Decodes every prompt at once in one batch (the way the scheduler runs
/// them), greedily; returns each prompt's tokens.
fn greedy_batched<R: Runner>(
    pooled: &mut Pooled<R>,
    prompts: &[Vec<u32>],
    n: usize,
) -> Vec<Vec<u32>> {
    let (mut seqs, tables): (Vec<R::Sequence>, Vec<Vec<u32>>) =
        prompts.iter().map(|p| pooled.sequence(p.len() + n)).unzip();
    let runner = &mut pooled.runner;
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut steps: Vec<Step<'_, R::Sequence>> = prompts
        .iter()
        .zip(seqs.iter_mut())
        .map(|(p, s)| Step {
            tokens: p.as_slice(),
            state: s,
        })
        .collect();
    runner.forward(&mut steps).expect("prefill");
    drop(steps);
    for (o, s) in out.iter_mut().zip(&seqs) {
        o.push(argmax(s.logits()));
    }
    while out[0].len() < n {
        let last: Vec<[u32; 1]> = out.iter().map(|o| [*o.last().unwrap_or(&0)]).collect();
        let mut steps: Vec<Step<'_, R::Sequence>> = last
            .iter()
            .zip(seqs.iter_mut())
            .map(|(t, s)| Step {
                tokens: t.as_slice(),
                state: s,
            })
            .collect();
        // As the scheduler steps greedy sequences: no logits asked for, so
        // a GPU answers with its own argmax.
        let no_logits = vec![false; steps.len()];
        runner.forward_for(&mut steps, &no_logits).expect("decode");
        drop(steps);
        for (o, s) in out.iter_mut().zip(&seqs) {
            o.push(s.greedy_token().unwrap_or_else(|| argmax(s.logits())));
        }
    }
    for table in &tables {
        pooled.blocks.release(table);
    }
    out
}

fn relative_error(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// Prompts of various lengths over the vocabulary, deterministic.
fn prompts(vocab: usize) -> Vec<Vec<u32>> {
    [5usize, 1, 17, 40, 9]
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            (0..len)
                .map(|j| ((i * 7919 + j * 104_729 + 3) % vocab) as u32)
                .collect()
        })
        .collect()
}

/// Runs both backends on `model` and asserts parity; `exact` asks for the
/// same greedy tokens too.
fn check_parity(model: Llama, exact: bool) {
    let model = Arc::new(Model::Llama(model));
    let kv = prompts(model.shape().vocab_size).len() * (64 + GENERATED).div_ceil(BLOCK_TOKENS);
    let mut gpu = Pooled::new(
        CudaRunner::new(&model, 0).expect("the CUDA runner starts"),
        kv,
    );
    let mut cpu = Pooled::new(
        CpuRunner::new(
            Arc::clone(&model),
            CpuBackend::new(std::thread::available_parallelism().map_or(2, |n| n.get().min(16)))
                .expect("CPU threads"),
        ),
        kv,
    );
    let prompts = prompts(model.shape().vocab_size);
    let mut cpu_tokens = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let (cpu_logits, cpu_out) = greedy(&mut cpu, prompt, GENERATED);
        let (gpu_logits, gpu_out) = greedy(&mut gpu, prompt, GENERATED);
        let err = relative_error(&gpu_logits, &cpu_logits);
        eprintln!("prompt {i}: first-step logits relative error {err:.2e}");
        assert!(
            err < LOGIT_TOLERANCE,
            "prompt {i}: logits differ by {err} (tolerance {LOGIT_TOLERANCE})"
        );
        if exact {
            assert_eq!(gpu_out, cpu_out, "prompt {i}: greedy tokens differ");
        }
        cpu_tokens.push(cpu_out);
    }
    // All prompts in one batch decode as each did alone.
    let batched = greedy_batched(&mut gpu, &prompts, GENERATED);
    if exact {
        assert_eq!(batched, cpu_tokens, "batched greedy tokens differ");
    }
}

fn hf_model(shape: &str, seed: u64) -> Llama {
    let dir = tempfile::tempdir().expect("a temporary directory");
    test_model::hf::generate(dir.path(), shape, seed, HfDtype::F16).expect("the test model");
    let hf = HfDir::open(dir.path()).expect("open the model");
    Llama::from_hf(&hf).expect("load the model")
}

#[test]
fn tiny_f16_model_decodes_identically_on_the_gpu() {
    if !gpu("tiny_f16_model_decodes_identically_on_the_gpu") {
        return;
    }
    check_parity(hf_model("tiny", 11), true);
}

/// The demo model's exact shapes (SmolLM2-135M: 30 layers, 576 wide, 9
/// query and 3 kv heads, 49152 tokens), random weights generated here.
#[test]
fn smollm2_shaped_f16_model_decodes_identically_on_the_gpu() {
    if !gpu("smollm2_shaped_f16_model_decodes_identically_on_the_gpu") {
        return;
    }
    check_parity(hf_model("smollm2-135m", 12), true);
}

/// Quantized weights (Q4_1, Q8_0) dequantize to f16 on the GPU, while the
/// CPU multiplies them with 8-bit activations: logits agree within the
/// tolerance; tokens may differ where two logits are closer than that.
#[test]
fn quantized_gguf_model_agrees_on_the_gpu() {
    if !gpu("quantized_gguf_model_agrees_on_the_gpu") {
        return;
    }
    let gguf = Gguf::from_bytes(test_model::tiny_llama(13)).expect("GGUF");
    check_parity(Llama::from_gguf(&gguf).expect("model"), false);
}

/// Where CUDA is absent `auto` must fall back to the CPU; where it is
/// present, it must pick the GPU.
#[test]
fn auto_device_picks_the_gpu_only_when_one_is_usable() {
    use breakwater_infer::scheduler::EngineConfig;
    use breakwater_infer::server::{BackendOptions, Served};
    use breakwater_infer::telemetry::Telemetry;

    let gguf = Gguf::from_bytes(test_model::tiny_llama(14)).expect("GGUF");
    let options = BackendOptions {
        device: breakwater_infer::backend::Device::Auto,
        ..BackendOptions::cpu(1)
    };
    let served = Served::from_gguf(&gguf, options, EngineConfig::default(), Telemetry::new())
        .expect("auto always serves");
    let expected = if cuda::probe().is_ok() { "cuda" } else { "cpu" };
    assert_eq!(served.backend(), expected);
    served.engine().shutdown();
}

/// Greedy tokens of `prompt` through `served`'s engine, and the prompt
/// tokens it took from the prefix cache.
fn engine_greedy(
    served: &breakwater_infer::server::Served,
    prompt: &[u32],
    max_tokens: usize,
) -> (Vec<u32>, usize) {
    use breakwater_infer::sampling::SamplingParams;
    use breakwater_infer::scheduler::{Event, GenerationRequest};

    let mut rx = served
        .engine()
        .submit(GenerationRequest {
            prompt: prompt.to_vec(),
            max_tokens,
            sampling: SamplingParams::greedy(),
            ignore_eos: true,
            token_ids: true,
            ..GenerationRequest::default()
        })
        .expect("queued");
    let mut tokens = Vec::new();
    loop {
        match rx.blocking_recv().expect("an event") {
            Event::Text { tokens: ids, .. } => tokens.extend(ids),
            Event::Done(finish) => return (tokens, finish.cached_tokens),
            Event::Failed(failure) => panic!("generation failed: {failure}"),
        }
    }
}

/// The prefix cache on the GPU: sequences that share a long prefix take
/// its blocks, and generate exactly what an engine without the cache
/// generates.
#[test]
fn prefix_cache_changes_no_greedy_token_on_the_gpu() {
    use breakwater_infer::scheduler::EngineConfig;
    use breakwater_infer::server::{BackendOptions, Served};
    use breakwater_infer::telemetry::Telemetry;

    if !gpu("prefix_cache_changes_no_greedy_token_on_the_gpu") {
        return;
    }
    let gguf = Gguf::from_bytes(test_model::tiny_llama(15)).expect("GGUF");
    let serve = |prefix_cache| {
        let options = BackendOptions {
            device: breakwater_infer::backend::Device::Cuda(0),
            ..BackendOptions::cpu(1)
        };
        let engine = EngineConfig {
            prefix_cache,
            kv_budget_bytes: 64 << 20,
            ..EngineConfig::default()
        };
        Served::from_gguf(&gguf, options, engine, Telemetry::new()).expect("the GPU serves")
    };
    let (cached, cold) = (serve(true), serve(false));
    assert_eq!(cached.backend(), "cuda");
    let vocab = 263;
    let shared: Vec<u32> = (0..150)
        .map(|j| ((j * 104_729 + 7) % vocab) as u32)
        .collect();
    for (i, tail) in [[11u32, 12, 13], [21, 22, 23], [11, 12, 14]]
        .iter()
        .enumerate()
    {
        let prompt: Vec<u32> = shared.iter().chain(tail).copied().collect();
        let (warm, hit) = engine_greedy(&cached, &prompt, 24);
        let (want, none) = engine_greedy(&cold, &prompt, 24);
        assert_eq!(none, 0);
        if i > 0 {
            assert_eq!(
                hit, 144,
                "prompt {i}: every full block of the shared prefix"
            );
        }
        assert_eq!(
            warm, want,
            "prompt {i}: greedy tokens with and without the cache"
        );
    }
    cached.engine().shutdown();
    cold.engine().shutdown();
}
