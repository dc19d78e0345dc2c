//! `breakwater gpu-host`: serves one model behind the OpenAI-compatible API,
//! on a CUDA GPU when one is usable (`--device auto`, the default) and on
//! the CPU otherwise.
//!
//! This module maps flags onto `breakwater_infer::server::lifecycle` (listen
//! before load, serve, drain) and signals onto its calls: SIGTERM (or
//! Ctrl-C) stops taking connections, gives in-flight requests
//! `--drain-seconds` to finish, then stops the engine.
//!
//! The model is a file (`--model`) or a version in model stores
//! (`--model-ref NAME@VERSION|NAME:CHANNEL --store URL… --model-cache DIR`):
//! pulled into the cache (verified; a cached version needs no network),
//! then loaded. A channel is followed: checked right after the start, every
//! `--poll-interval`, and on `POST /admin/models/reload`; a new version is
//! loaded beside the serving one and swapped in (see
//! `breakwater_infer::server::swap`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use breakwater_infer::backend::Device;
use breakwater_infer::demo_model;
use breakwater_infer::scheduler::EngineConfig;
use breakwater_infer::server::lifecycle::{GpuHostOptions, ModelChoice, RunningGpuHost};
use breakwater_infer::server::swap::{ModelSource, ReloadAuth, SwapOptions, Swapper};
use breakwater_infer::server::{self, BackendOptions, ServerConfig};
use breakwater_store::model::{ModelRef, PullOptions};
use tokio::signal::unix::{SignalKind, signal};

use crate::model::{StoreAccess, parse_duration};

/// `breakwater gpu-host` options (no `Debug`: they hold secrets).
#[derive(clap::Args)]
pub struct GpuHostArgs {
    /// The model: a GGUF file, or a Hugging Face model directory
    /// (`config.json`, `tokenizer.json`, `*.safetensors`). Or `--model-ref`.
    #[arg(
        long,
        required_unless_present = "model_ref",
        conflicts_with = "model_ref"
    )]
    model: Option<PathBuf>,
    /// A model version from the stores: `NAME@VERSION`, or `NAME:CHANNEL`
    /// to follow the channel (hot swap). Needs `--store` and
    /// `--model-cache`.
    #[arg(long, requires_all = ["stores", "model_cache"])]
    model_ref: Option<ModelRef>,
    /// A model store URL (`s3://bucket/prefix[?endpoint=URL&region=R]` or
    /// `file:///dir`); repeat it for fallbacks, in priority order (the
    /// local region first).
    #[arg(long = "store", value_name = "URL")]
    stores: Vec<String>,
    /// The local cache model versions are pulled into (verified, landed by
    /// rename); a version there starts without the network.
    #[arg(long, value_name = "DIR")]
    model_cache: Option<PathBuf>,
    /// How often to check the channel of `--model-ref NAME:CHANNEL` for a
    /// new version (`30s`, `5m`, or seconds; default: only right after the
    /// start and on `POST /admin/models/reload`).
    #[arg(long, value_parser = parse_duration)]
    poll_interval: Option<Duration>,
    /// Deadline for pulling a version from one store (`1h`, `10m`).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pull_timeout: Duration,
    /// Deadline for loading and warming a version.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    load_timeout: Duration,
    /// Bearer token that `POST /admin/models/reload` requires; without one,
    /// only loopback callers may reload.
    #[arg(long, env = "BREAKWATER_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    #[command(flatten)]
    access: StoreAccess,
    /// The name clients ask for in `model` (default: the stored model's
    /// name; for a file, the demo model's name for the demo file, else the
    /// file or directory name without `.gguf`, lower-cased).
    #[arg(long)]
    model_name: Option<String>,
    /// Address to serve the API on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Where the model runs: `cpu`, `cuda` (`cuda:N`), or `auto` (the first
    /// GPU when one is usable, else the CPU, said once in the log).
    #[arg(long, default_value = "auto")]
    device: Device,
    /// CPU threads for the forward pass (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Requests waiting for a slot at most; more get 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Memory for KV caches, in MiB (default: 512 on the CPU; on a GPU,
    /// `--gpu-memory-fraction` of what the weights leave free).
    #[arg(long)]
    kv_budget_mb: Option<usize>,
    /// Compute every prompt in full instead of reusing the KV blocks of a
    /// prefix an earlier request computed (for comparisons; the prefix
    /// cache changes no output).
    #[arg(long)]
    no_prefix_cache: bool,
    /// Share of free GPU memory the KV cache takes when `--kv-budget-mb` is
    /// not given.
    #[arg(long, default_value_t = server::DEFAULT_GPU_MEMORY_FRACTION)]
    gpu_memory_fraction: f64,
    /// Seconds in-flight requests get to finish after SIGTERM, and on a
    /// replaced model version after a hot swap.
    #[arg(long, default_value_t = 30)]
    drain_seconds: u64,
}

/// Runs the GPU host until SIGTERM or Ctrl-C.
pub fn run(args: GpuHostArgs) -> anyhow::Result<()> {
    // The async side only parses, queues and streams; the model runs on the
    // engine thread and its own pool, which should have the cores.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: GpuHostArgs) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the Ctrl-C handler")?;
    let options = options(&args)?;
    let threads = options.backend.threads;
    let mut host = RunningGpuHost::start(options).await?;
    tokio::select! {
        ready = host.loaded() => {
            let ready = ready?;
            tracing::info!(
                backend = ready.backend,
                threads,
                kv_blocks = ready.kv_blocks,
                max_sequence_tokens = ready.max_sequence_tokens,
                "ready"
            );
        }
        _ = term.recv() => {}
        _ = interrupt.recv() => {}
    }
    if host.app().model().is_some() {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
            closed = host.closed() => return Ok(closed?),
        }
    }
    host.shutdown().await;
    Ok(())
}

/// The flags, as the GPU host's options.
fn options(args: &GpuHostArgs) -> anyhow::Result<GpuHostOptions> {
    let name = args
        .model_name
        .clone()
        .unwrap_or_else(|| default_name(args));
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let engine = EngineConfig {
        max_batch: args.max_batch.max(1),
        queue_capacity: args.queue,
        // 0 lets the backend size it.
        kv_budget_bytes: args.kv_budget_mb.map_or(0, |mb| mb.saturating_mul(1 << 20)),
        prefix_cache: !args.no_prefix_cache,
        ..EngineConfig::default()
    };
    let backend = BackendOptions {
        device: args.device,
        threads,
        gpu_memory_fraction: args.gpu_memory_fraction,
    };
    let model = match (&args.model, &args.model_ref) {
        (Some(path), _) => ModelChoice::File(path.clone()),
        (None, Some(reference)) => ModelChoice::Stored {
            swapper: swapper(args, reference.clone(), backend, engine.clone())?,
            poll_interval: args.poll_interval,
        },
        // clap requires one of them.
        (None, None) => anyhow::bail!("give --model or --model-ref"),
    };
    Ok(GpuHostOptions {
        listen: args.listen,
        server: ServerConfig::new(name),
        model,
        backend,
        engine,
        drain: Duration::from_secs(args.drain_seconds),
    })
}

/// The swapper for `--model-ref`: its stores, cache and limits.
fn swapper(
    args: &GpuHostArgs,
    reference: ModelRef,
    backend: BackendOptions,
    engine: EngineConfig,
) -> anyhow::Result<Arc<Swapper>> {
    let cache = args
        .model_cache
        .clone()
        .context("--model-ref needs --model-cache")?;
    anyhow::ensure!(!args.stores.is_empty(), "--model-ref needs --store");
    let stores = args.access.open_all(&args.stores)?;
    let source = ModelSource {
        reference,
        stores,
        pull: PullOptions {
            deadline: args.pull_timeout,
            ..PullOptions::new(cache)
        },
    };
    let auth = match args.admin_token.as_deref().filter(|t| !t.is_empty()) {
        Some(token) => ReloadAuth::Token(token.to_owned()),
        None => ReloadAuth::LoopbackOnly,
    };
    Ok(Swapper::new(
        source,
        SwapOptions {
            backend,
            engine,
            drain: Duration::from_secs(args.drain_seconds),
            load_deadline: args.load_timeout,
            auth,
        },
    ))
}

fn default_name(args: &GpuHostArgs) -> String {
    if let Some(reference) = &args.model_ref {
        return reference.name.clone();
    }
    let file = args
        .model
        .as_deref()
        .and_then(|m| m.file_name())
        .and_then(|f| f.to_str())
        .unwrap_or("");
    if file == demo_model::FILE_NAME {
        return demo_model::MODEL_NAME.to_owned();
    }
    file.strip_suffix(".gguf").unwrap_or(file).to_lowercase()
}
