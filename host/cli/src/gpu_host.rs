//! `breakwater gpu-host`: serves one model behind the OpenAI-compatible API,
//! on a CUDA GPU when one is usable (`--device auto`, the default) and on
//! the CPU otherwise.
//!
//! The listener opens before the model loads, so liveness and metrics
//! answer at once and `/health/ready` turns 200 when the model is loaded and
//! warm. SIGTERM (or Ctrl-C) stops taking connections, gives in-flight
//! requests `--drain-seconds` to finish, then stops the engine.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use breakwater_infer::backend::Device;
use breakwater_infer::demo_model;
use breakwater_infer::loader;
use breakwater_infer::scheduler::EngineConfig;
use breakwater_infer::server::{self, AppState, BackendOptions, Served, ServerConfig};
use breakwater_infer::telemetry::Telemetry;
use tokio::signal::unix::{SignalKind, signal};

/// `breakwater gpu-host` options.
#[derive(clap::Args, Debug)]
pub struct GpuHostArgs {
    /// The model: a GGUF file, or a Hugging Face model directory
    /// (`config.json`, `tokenizer.json`, `*.safetensors`).
    #[arg(long)]
    model: PathBuf,
    /// The name clients ask for in `model` (default: the demo model's name
    /// for the demo file, else the file or directory name without `.gguf`,
    /// lower-cased).
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
    /// Share of free GPU memory the KV cache takes when `--kv-budget-mb` is
    /// not given.
    #[arg(long, default_value_t = server::DEFAULT_GPU_MEMORY_FRACTION)]
    gpu_memory_fraction: f64,
    /// Seconds in-flight requests get to finish after SIGTERM.
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
    let name = args
        .model_name
        .clone()
        .unwrap_or_else(|| default_name(&args));
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let engine = EngineConfig {
        max_batch: args.max_batch.max(1),
        queue_capacity: args.queue,
        // 0 lets the backend size it.
        kv_budget_bytes: args.kv_budget_mb.map_or(0, |mb| mb.saturating_mul(1 << 20)),
        ..EngineConfig::default()
    };

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let telemetry = Telemetry::new();
    let app = AppState::new(ServerConfig::new(&name), telemetry.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(server::serve(listener, Arc::clone(&app), async {
        let _ = stopped.await;
    }));
    tracing::info!(%addr, model = %name, "gpu-host listening on http://{addr}; loading the model");

    let path = args.model.clone();
    let (device, gpu_memory_fraction) = (args.device, args.gpu_memory_fraction);
    let load = tokio::task::spawn_blocking(move || -> anyhow::Result<Served> {
        let loaded = loader::load(&path).with_context(|| format!("opening {}", path.display()))?;
        let backend = BackendOptions {
            device,
            threads,
            gpu_memory_fraction,
        };
        Served::from_loaded(loaded, backend, engine, telemetry)
            .with_context(|| format!("loading {}", path.display()))
    });
    tokio::select! {
        loaded = load => {
            let served = loaded.context("the model loading task")??;
            let backend = served.backend();
            let blocks = served.engine().kv_blocks_total();
            let context = served.engine().max_sequence_tokens();
            if app.set_model(served).is_err() {
                anyhow::bail!("a model was already set");
            }
            tracing::info!(backend, threads, kv_blocks = blocks, max_sequence_tokens = context, "ready");
        }
        _ = term.recv() => return Ok(()),
        _ = interrupt.recv() => return Ok(()),
        result = &mut server => {
            result.context("the server task")?.context("serving")?;
            return Ok(());
        }
    }

    tokio::select! {
        _ = term.recv() => {}
        _ = interrupt.recv() => {}
        result = &mut server => {
            result.context("the server task")?.context("serving")?;
            return Ok(());
        }
    }
    tracing::info!("shutting down: draining in-flight requests");
    let _ = stop.send(());
    let drain = Duration::from_secs(args.drain_seconds);
    let drained = tokio::time::timeout(drain, &mut server).await.is_ok();
    if !drained {
        tracing::warn!("drain period over; ending the requests still running");
    }
    // Ends whatever still runs; their streams close with an error event.
    app.shutdown();
    if !drained {
        let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    }
    tracing::info!("stopped");
    Ok(())
}

fn default_name(args: &GpuHostArgs) -> String {
    let file = args
        .model
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or("");
    if file == demo_model::FILE_NAME {
        return demo_model::MODEL_NAME.to_owned();
    }
    file.strip_suffix(".gguf").unwrap_or(file).to_lowercase()
}
