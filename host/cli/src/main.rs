//! `breakwater`: the one binary. Subcommands run an edge node, check a
//! configuration, or start the all-in-one local POP.

mod gpu_host;
mod model;
mod plugin;
mod up;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use breakwater_edge::LogFormat;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "breakwater",
    version,
    about = "An edge platform that keeps AI services standing"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormatArg::Text)]
    log_format: LogFormatArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run an edge node from a configuration file.
    Edge {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Serve a model behind the OpenAI-compatible API (CPU backend).
    GpuHost(gpu_host::GpuHostArgs),
    /// Build and test plugins: `plugin build`, `plugin test`.
    Plugin {
        #[command(subcommand)]
        command: plugin::PluginCommand,
    },
    /// Model versions in object storage: `model push`, `ls`, `show`,
    /// `promote`, `verify`, `pull`, `replicate`.
    Model {
        #[command(subcommand)]
        command: model::ModelCommand,
    },
    /// The all-in-one local POP: the demo site on http://127.0.0.1:8080,
    /// and a GPU host serving the demo model for `/v1/*`.
    Up {
        /// Use this configuration instead of the embedded demo one.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Where the GPU host listens (the demo's `inference` pool).
        #[arg(long, default_value = "127.0.0.1:9000")]
        gpu_host_listen: SocketAddr,
        /// The model the GPU host serves (default: the demo model, fetched
        /// on first use).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Start no GPU host: `/v1/*` goes to whatever listens there.
        #[arg(long)]
        no_gpu_host: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file; errors name file:line:column and a fix.
    Check { file: PathBuf },
}

/// Service names of the spans, when the configuration gives none.
const EDGE_SERVICE: &str = "breakwater-edge";
const GPU_HOST_SERVICE: &str = "breakwater-gpu-host";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_json = matches!(cli.log_format, LogFormatArg::Json);
    // An edge's configuration is read before logging starts: its
    // `[tracing]` section sets up the trace exporter. Reading it logs
    // nothing; its errors are printed below.
    let edge = match &cli.command {
        Command::Edge { config } => Some(load(config)),
        Command::Up { config, .. } => Some(up_config(config.as_deref())),
        _ => None,
    };
    let no_config = edge_config::TracingConfig::default();
    let traces = match (&cli.command, &edge) {
        (_, Some(Ok(config))) => Some((&config.tracing, EDGE_SERVICE)),
        (Command::GpuHost(_), _) => Some((&no_config, GPU_HOST_SERVICE)),
        _ => None,
    };
    // Held to the end of main: dropping it writes out what is still queued.
    let _log_guard = breakwater_edge::init_logging(
        match cli.log_format {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        },
        traces,
    );
    let result = match (cli.command, edge) {
        (
            Command::Config {
                command: ConfigCommand::Check { file },
            },
            _,
        ) => return check_config(&file),
        (Command::Plugin { command }, _) => return plugin::run(command),
        (Command::Model { command }, _) => return model::run(command),
        (Command::GpuHost(args), _) => gpu_host::run(args),
        (Command::Edge { config }, Some(initial)) => initial.and_then(|initial| {
            run_edge(initial, breakwater_edge::ConfigSource::file(config), None)
        }),
        // A reload (SIGHUP) reads the configuration the way `up` first did,
        // pinning rebuilt local plugins again.
        (
            Command::Up {
                config,
                gpu_host_listen,
                model,
                no_gpu_host,
            },
            Some(initial),
        ) => initial.and_then(|initial| {
            let source = breakwater_edge::ConfigSource::new(move || up_config(config.as_deref()));
            let gpu_host = (!no_gpu_host).then_some(up::GpuHostPlan {
                listen: gpu_host_listen,
                model,
                log_json,
            });
            run_edge(initial, source, gpu_host)
        }),
        (Command::Edge { .. } | Command::Up { .. }, None) => {
            Err(anyhow::anyhow!("the edge's configuration was not read"))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: &Path) -> ExitCode {
    match edge_config::load(file) {
        Ok(config) => {
            println!(
                "{}: ok ({} listener(s), {} site(s), {} route(s), {} pool(s))",
                file.display(),
                config.listeners.len(),
                config.sites.len(),
                config.routes.len(),
                config.pools.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

/// The local POP runs the plugins this checkout just built, so it pins each
/// plugin left without a digest to the artifact on disk. Only `up` does
/// this: `breakwater edge` requires every pin, and refuses a mismatch.
fn pin_local_plugins(
    mut config: edge_config::EdgeConfig,
) -> anyhow::Result<edge_config::EdgeConfig> {
    // Only local files: a `url` plugin must carry its pin (edge-config
    // refuses an empty one).
    for plugin in config.plugins.iter_mut().filter(|p| p.sha256.is_empty()) {
        let Some(path) = &plugin.path else { continue };
        let bytes =
            std::fs::read(path).with_context(|| format!("reading plugin {}", path.display()))?;
        plugin.sha256 = breakwater_sandbox::sha256_hex(&bytes);
    }
    Ok(config)
}

/// `up`'s configuration: `file`, or the embedded demo, with local pins.
fn up_config(file: Option<&Path>) -> anyhow::Result<edge_config::EdgeConfig> {
    match file {
        Some(file) => load(file),
        None => edge_config::parse(
            edge_config::LOCAL_EXAMPLE,
            Path::new("edge-config/examples/local.toml"),
            edge_config::local_example_dir(),
        )
        .context("the embedded demo configuration (`cargo xtask up` builds its plugins)"),
    }
    .and_then(pin_local_plugins)
}

fn load(path: &Path) -> anyhow::Result<edge_config::EdgeConfig> {
    Ok(edge_config::load(path)?)
}

fn run_edge(
    config: edge_config::EdgeConfig,
    source: breakwater_edge::ConfigSource,
    gpu_host: Option<up::GpuHostPlan>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        // Installed before the node starts: SIGHUP's default action would
        // kill a process that is asked to reload while it starts.
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut interrupt =
            signal(SignalKind::interrupt()).context("installing the Ctrl-C handler")?;
        let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        // The GPU host first, so the edge's first `/v1/*` request finds it.
        let gpu_host = match gpu_host {
            Some(plan) => {
                let host = up::GpuHostChild::start(plan).await?;
                tracing::info!("gpu-host ready on http://{}", host.listen());
                Some(host)
            }
            None => None,
        };
        let node = breakwater_edge::start_with_source(config, source).await?;
        for addr in node.listener_addrs() {
            tracing::info!("serving on http://{addr}");
        }
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = interrupt.recv() => break,
                _ = hangup.recv() => {
                    tracing::info!("SIGHUP: reloading TLS certificates and plugins");
                    // The node logs each outcome and keeps what it had on failure.
                    let _ = node.reload_tls().await;
                    let _ = node.reload().await;
                }
            }
        }
        tracing::info!("shutting down: draining in-flight requests");
        node.shutdown().await;
        // After the edge: its in-flight `/v1/*` streams drained first.
        tokio::task::block_in_place(|| drop(gpu_host));
        tracing::info!("stopped");
        Ok(())
    })
}
