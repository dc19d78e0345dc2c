//! `breakwater`: the one binary. Subcommands run an edge node, check a
//! configuration, or start the all-in-one local POP.

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
    /// The all-in-one local POP: the demo site on http://127.0.0.1:8080.
    Up {
        /// Use this configuration instead of the embedded demo one.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file; errors name file:line:column and a fix.
    Check { file: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    breakwater_edge::init_logging(match cli.log_format {
        LogFormatArg::Text => LogFormat::Text,
        LogFormatArg::Json => LogFormat::Json,
    });
    let result = match cli.command {
        Command::Config {
            command: ConfigCommand::Check { file },
        } => return check_config(&file),
        Command::Edge { config } => load(&config).and_then(run_edge),
        Command::Up {
            config: Some(config),
        } => load(&config).and_then(pin_local_plugins).and_then(run_edge),
        Command::Up { config: None } => edge_config::parse(
            edge_config::LOCAL_EXAMPLE,
            Path::new("edge-config/examples/local.toml"),
            edge_config::local_example_dir(),
        )
        .context("the embedded demo configuration (`cargo xtask up` builds its plugins)")
        .and_then(pin_local_plugins)
        .and_then(run_edge),
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
    for plugin in config.plugins.iter_mut().filter(|p| p.sha256.is_empty()) {
        let bytes = std::fs::read(&plugin.path)
            .with_context(|| format!("reading plugin {}", plugin.path.display()))?;
        plugin.sha256 = breakwater_sandbox::sha256_hex(&bytes);
    }
    Ok(config)
}

fn load(path: &Path) -> anyhow::Result<edge_config::EdgeConfig> {
    Ok(edge_config::load(path)?)
}

fn run_edge(config: edge_config::EdgeConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let node = breakwater_edge::start(config).await?;
        for addr in node.listener_addrs() {
            tracing::info!("serving on http://{addr}");
        }
        shutdown_signal().await?;
        tracing::info!("shutting down: draining in-flight requests");
        node.shutdown().await;
        tracing::info!("stopped");
        Ok(())
    })
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        result = tokio::signal::ctrl_c() => result.context("waiting for Ctrl-C")?,
    }
    Ok(())
}
