//! `breakwater model …`: model versions in S3-compatible or local stores:
//! push, ls, show, promote, verify, pull, replicate; and gen-test, random
//! test models.

mod progress;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use breakwater_store::StoreOptions;
use breakwater_store::model::{
    FileCheck, ModelRef, ModelStore, PullOptions, PushOptions, ReplicateOptions, ReplicationReport,
    Selector, StoreSpec, VersionStatus, pull, replicate,
};
use clap::{Args, Subcommand};

use progress::Bar;

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Write a random llama model in the Hugging Face layout (config.json,
    /// tokenizer.json, model.safetensors), deterministic from the seed: for
    /// tests and benchmarks (`smollm2-135m` has the demo model's shapes).
    GenTest {
        /// The directory to write (created if needed).
        out: PathBuf,
        /// `tiny` (a few hundred KB) or `smollm2-135m`.
        #[arg(long, default_value = "tiny")]
        shape: String,
        /// `f32`, `f16` or `bf16`.
        #[arg(long, default_value = "f16")]
        dtype: breakwater_infer::test_model::hf::HfDtype,
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// Upload a directory as NAME@VERSION: multipart, resumable (files
    /// already in the store are skipped), sha256 of every file in the
    /// manifest, which is written last.
    Push {
        /// The directory holding the model's files.
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
        /// Point this channel (e.g. `stable`) at the version once pushed.
        #[arg(long)]
        channel: Option<String>,
        /// `gguf`, `safetensors` or `files` (default: from the files).
        #[arg(long)]
        format: Option<String>,
        /// The version this one derives from.
        #[arg(long)]
        parent: Option<String>,
        /// Multipart part size in MiB.
        #[arg(long, default_value_t = 16)]
        part_mib: usize,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List models, their versions and channels.
    Ls {
        /// Only this model.
        name: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Print the manifest of NAME@VERSION (or NAME:CHANNEL's version).
    Show {
        reference: ModelRef,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Point NAME:CHANNEL at NAME@VERSION.
    Promote {
        reference: ModelRef,
        #[arg(long)]
        channel: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Re-read and re-hash every object of NAME@VERSION in the store; exit 1
    /// when any is missing or corrupt.
    Verify {
        reference: ModelRef,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Download NAME@VERSION or NAME:CHANNEL into a local cache from the
    /// first store that serves it (`--store` repeated, in priority order),
    /// verified; print the version's directory.
    Pull {
        reference: ModelRef,
        /// The local cache directory.
        #[arg(long)]
        cache: PathBuf,
        /// Resolve a channel from the cache's last resolution when there is
        /// one, without asking a store.
        #[arg(long)]
        prefer_cache: bool,
        /// Re-hash a cached version before using it.
        #[arg(long)]
        verify_cache: bool,
        /// Ranged GETs in flight.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Bytes per ranged GET, in MiB.
        #[arg(long, default_value_t = 8)]
        range_mib: u64,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Copy the versions (and channel pointers) the destination lacks,
    /// verified at the destination, manifest last; idempotent and
    /// resumable. Reports lag per version.
    Replicate {
        /// The source store URL.
        #[arg(long)]
        from: String,
        /// The destination store URL.
        #[arg(long)]
        to: String,
        /// Only this model.
        #[arg(long)]
        name: Option<String>,
        /// Keep running: a pass every `--interval`.
        #[arg(long)]
        watch: bool,
        /// Time between passes with `--watch` (`30s`, `5m`).
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        interval: Duration,
        #[command(flatten)]
        from_access: FromAccess,
        #[command(flatten)]
        to_access: ToAccess,
        #[command(flatten)]
        timeouts: Timeouts,
    },
}

/// Where the store is and how to reach it.
#[derive(Args)]
pub struct StoreArgs {
    /// Store URL: `s3://bucket/prefix[?endpoint=URL&region=R]` or
    /// `file:///dir`. `pull` takes several, in priority order.
    #[arg(long = "store", env = "BREAKWATER_MODEL_STORE", required = true)]
    urls: Vec<String>,
    #[command(flatten)]
    access: StoreAccess,
}

/// How to reach the stores (shared by `model …` and `gpu-host`).
#[derive(Args, Clone)]
pub struct StoreAccess {
    /// S3 endpoint (default: `AWS_ENDPOINT_URL`, else AWS).
    #[arg(long)]
    endpoint: Option<String>,
    /// Region (default: `AWS_REGION`).
    #[arg(long)]
    region: Option<String>,
    /// Access key id (default: `AWS_ACCESS_KEY_ID`).
    #[arg(long)]
    access_key_id: Option<String>,
    /// Secret access key (default: `AWS_SECRET_ACCESS_KEY`; prefer the
    /// variable: flags show in process listings).
    #[arg(long)]
    secret_access_key: Option<String>,
    /// Allow plain http:// endpoints that are not loopback.
    #[arg(long)]
    allow_http: bool,
    #[command(flatten)]
    timeouts: Timeouts,
}

#[derive(Args, Clone)]
pub struct Timeouts {
    /// Deadline for a connection (`5s`, `500ms`).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Deadline for one request.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    request_timeout: Duration,
    /// Transient failures are retried within this window.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    retry_timeout: Duration,
}

/// The source's access for `replicate` (each falls back to `AWS_*`).
#[derive(Args)]
pub struct FromAccess {
    #[arg(long)]
    from_endpoint: Option<String>,
    #[arg(long)]
    from_region: Option<String>,
    #[arg(long, env = "BREAKWATER_FROM_AWS_ACCESS_KEY_ID")]
    from_access_key_id: Option<String>,
    #[arg(
        long,
        env = "BREAKWATER_FROM_AWS_SECRET_ACCESS_KEY",
        hide_env_values = true
    )]
    from_secret_access_key: Option<String>,
}

/// The destination's access for `replicate` (each falls back to `AWS_*`).
#[derive(Args)]
pub struct ToAccess {
    #[arg(long)]
    to_endpoint: Option<String>,
    #[arg(long)]
    to_region: Option<String>,
    #[arg(long, env = "BREAKWATER_TO_AWS_ACCESS_KEY_ID")]
    to_access_key_id: Option<String>,
    #[arg(
        long,
        env = "BREAKWATER_TO_AWS_SECRET_ACCESS_KEY",
        hide_env_values = true
    )]
    to_secret_access_key: Option<String>,
}

/// `500ms`, `10s`, `2m`, `1h`, or plain seconds.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("`{text}` is not a duration like 500ms, 10s, 2m or 1h");
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, ""), |i| text.split_at(i));
    let n: u64 = number.parse().map_err(|_| bad())?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(bad()),
    }
}

impl Timeouts {
    fn apply(&self, options: StoreOptions) -> StoreOptions {
        StoreOptions {
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
            retry_timeout: self.retry_timeout,
            ..options
        }
    }
}

impl StoreAccess {
    fn options(&self) -> StoreOptions {
        self.timeouts.apply(StoreOptions {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            access_key_id: self.access_key_id.clone(),
            secret_access_key: self.secret_access_key.clone(),
            allow_http: self.allow_http,
            ..StoreOptions::default()
        })
    }

    /// Opens every store of `urls`, in their order.
    pub(crate) fn open_all(&self, urls: &[String]) -> anyhow::Result<Vec<ModelStore>> {
        urls.iter()
            .map(|url| {
                let spec = StoreSpec::parse_with(url, self.options())?;
                Ok(ModelStore::open(&spec)?)
            })
            .collect()
    }
}

impl StoreArgs {
    fn open_all(&self) -> anyhow::Result<Vec<ModelStore>> {
        self.access.open_all(&self.urls)
    }

    /// The one store of a command that takes one.
    fn open_one(&self) -> anyhow::Result<ModelStore> {
        let mut stores = self.open_all()?;
        anyhow::ensure!(
            stores.len() == 1,
            "this command takes one --store (got {})",
            stores.len()
        );
        Ok(stores.remove(0))
    }
}

fn open_access(
    url: &str,
    endpoint: &Option<String>,
    region: &Option<String>,
    key: &Option<String>,
    secret: &Option<String>,
    timeouts: &Timeouts,
) -> anyhow::Result<ModelStore> {
    let options = timeouts.apply(StoreOptions {
        endpoint: endpoint.clone(),
        region: region.clone(),
        access_key_id: key.clone(),
        secret_access_key: secret.clone(),
        ..StoreOptions::default()
    });
    let spec = StoreSpec::parse_with(url, options)?;
    Ok(ModelStore::open(&spec)?)
}

/// Runs a `model` subcommand; exit 1 on failure (the message on stderr).
pub fn run(command: ModelCommand) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: ModelCommand) -> anyhow::Result<ExitCode> {
    match command {
        ModelCommand::GenTest {
            out,
            shape,
            dtype,
            seed,
        } => {
            let written = tokio::task::spawn_blocking(move || {
                breakwater_infer::test_model::hf::generate(&out, &shape, seed, dtype)
                    .with_context(|| format!("writing {}", out.display()))
                    .map(|s| (s, out))
            })
            .await
            .context("the generating task")??;
            let (shape, out) = written;
            println!(
                "wrote a random {dtype} model of {} parameters to {}",
                shape.parameters(),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        ModelCommand::Push {
            dir,
            name,
            version,
            channel,
            format,
            parent,
            part_mib,
            store,
        } => {
            let store = store.open_one()?;
            let options = PushOptions {
                channel,
                format,
                parent,
                part_size: part_mib.max(5) << 20,
                ..PushOptions::new(&name, &version)
            };
            let bar = Bar::new("uploaded");
            let report = store.push(&dir, &options, &bar).await;
            bar.finish();
            let report = report.with_context(|| format!("pushing {}", dir.display()))?;
            let reference = report.manifest.reference();
            if report.already_existed {
                println!(
                    "{reference} already in {} with the same files",
                    store.label()
                );
            } else {
                println!(
                    "pushed {reference} to {}: {} file(s) uploaded ({}), {} already there",
                    store.label(),
                    report.uploaded.len(),
                    human_bytes(report.bytes_uploaded),
                    report.skipped.len()
                );
            }
            if let Some(channel) = &options.channel {
                println!("{name}:{channel} -> {version}");
            }
            Ok(ExitCode::SUCCESS)
        }
        ModelCommand::Ls { name, store } => {
            let store = store.open_one()?;
            let names = match name {
                Some(name) => vec![name],
                None => store.names().await?,
            };
            if names.is_empty() {
                println!("no models in {}", store.label());
            }
            for name in names {
                println!("{name}");
                for version in store.versions(&name).await? {
                    let manifest = store.manifest(&name, &version).await?;
                    println!(
                        "  @{version}\t{}\t{} file(s), {}\tcreated {}{}",
                        manifest.format,
                        manifest.files.len(),
                        human_bytes(manifest.total_size()),
                        manifest.created_at,
                        manifest
                            .parent
                            .map(|p| format!("\tparent {p}"))
                            .unwrap_or_default()
                    );
                }
                for (channel, pointer) in store.channels(&name).await? {
                    println!(
                        "  :{channel}\t-> {}\t(since {})",
                        pointer.version, pointer.updated_at
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ModelCommand::Show { reference, store } => {
            let store = store.open_one()?;
            let version = store.resolve(&reference).await?;
            let manifest = store.manifest(&reference.name, &version).await?;
            print!("{}", String::from_utf8_lossy(&manifest.to_bytes()));
            Ok(ExitCode::SUCCESS)
        }
        ModelCommand::Promote {
            reference,
            channel,
            store,
        } => {
            let store = store.open_one()?;
            let Selector::Version(version) = &reference.selector else {
                anyhow::bail!("promote takes NAME@VERSION, not a channel: {reference}");
            };
            let previous = store.promote(&reference.name, version, &channel).await?;
            println!(
                "{}:{channel} -> {version}{}",
                reference.name,
                previous
                    .map(|p| format!(" (was {p})"))
                    .unwrap_or_else(|| " (new channel)".to_owned())
            );
            Ok(ExitCode::SUCCESS)
        }
        ModelCommand::Verify { reference, store } => {
            let store = store.open_one()?;
            let version = store.resolve(&reference).await?;
            let bar = Bar::new("verified");
            let report = store.verify(&reference.name, &version, &bar).await;
            bar.finish();
            let report = report?;
            let mut bad = 0;
            for (path, check) in &report.files {
                let entry = report.manifest.files.iter().find(|f| &f.path == path);
                let line = match (check, entry) {
                    (FileCheck::Ok, _) => "ok".to_owned(),
                    (FileCheck::Missing, _) => "MISSING".to_owned(),
                    (FileCheck::WrongSize(n), Some(e)) => {
                        format!("WRONG SIZE: {n} bytes, the manifest says {}", e.size)
                    }
                    (FileCheck::Mismatch(actual), Some(e)) => {
                        format!("CORRUPT: sha256 {actual}, the manifest says {}", e.sha256)
                    }
                    (check, None) => format!("{check:?}"),
                };
                if *check != FileCheck::Ok {
                    bad += 1;
                }
                println!("{path}\t{line}");
            }
            let reference = report.manifest.reference();
            if bad == 0 {
                println!("{reference}: all {} file(s) verified", report.files.len());
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!(
                    "error: {reference}: {bad} of {} file(s) failed verification",
                    report.files.len()
                );
                Ok(ExitCode::FAILURE)
            }
        }
        ModelCommand::Pull {
            reference,
            cache,
            prefer_cache,
            verify_cache,
            concurrency,
            range_mib,
            store,
        } => {
            let stores = store.open_all()?;
            let options = PullOptions {
                prefer_cache,
                verify_cache,
                concurrency,
                range_size: range_mib.max(1) << 20,
                ..PullOptions::new(&cache)
            };
            let pulled = pull(&stores, &reference, &options).await?;
            eprintln!(
                "{} from {} ({})",
                pulled.manifest.reference(),
                pulled.source,
                human_bytes(pulled.bytes_fetched)
            );
            println!("{}", pulled.dir.display());
            Ok(ExitCode::SUCCESS)
        }
        ModelCommand::Replicate {
            from,
            to,
            name,
            watch,
            interval,
            from_access,
            to_access,
            timeouts,
        } => {
            let source = open_access(
                &from,
                &from_access.from_endpoint,
                &from_access.from_region,
                &from_access.from_access_key_id,
                &from_access.from_secret_access_key,
                &timeouts,
            )?;
            let destination = open_access(
                &to,
                &to_access.to_endpoint,
                &to_access.to_region,
                &to_access.to_access_key_id,
                &to_access.to_secret_access_key,
                &timeouts,
            )?;
            let options = ReplicateOptions {
                name,
                ..ReplicateOptions::default()
            };
            replicate_command(&source, &destination, &options, watch, interval).await
        }
    }
}

async fn replicate_command(
    source: &ModelStore,
    destination: &ModelStore,
    options: &ReplicateOptions,
    watch: bool,
    interval: Duration,
) -> anyhow::Result<ExitCode> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the Ctrl-C handler")?;
    loop {
        let bar = Bar::new("copied");
        let pass = tokio::select! {
            pass = replicate(source, destination, options, &bar) => pass,
            _ = term.recv() => { bar.finish(); return Ok(ExitCode::SUCCESS) }
            _ = interrupt.recv() => { bar.finish(); return Ok(ExitCode::SUCCESS) }
        };
        bar.finish();
        let complete = match pass {
            Ok(report) => {
                print_replication(source, destination, &report);
                report.is_complete()
            }
            // The source could not be listed: in watch mode, try again.
            Err(e) if watch => {
                eprintln!("error: replication pass failed: {e}");
                false
            }
            Err(e) => return Err(e.into()),
        };
        if !watch {
            return Ok(if complete {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = term.recv() => return Ok(ExitCode::SUCCESS),
            _ = interrupt.recv() => return Ok(ExitCode::SUCCESS),
        }
    }
}

fn print_replication(source: &ModelStore, destination: &ModelStore, report: &ReplicationReport) {
    println!("{} -> {}", source.label(), destination.label());
    let mut present = 0;
    for v in &report.versions {
        let status = match &v.status {
            VersionStatus::Present => {
                present += 1;
                "in sync".to_owned()
            }
            VersionStatus::Copied {
                files_copied,
                files_skipped,
                bytes,
            } => format!(
                "copied {files_copied} file(s), {} ({files_skipped} already there)",
                human_bytes(*bytes)
            ),
            VersionStatus::Failed(reason) => format!("FAILED: {reason}"),
        };
        println!(
            "  {}@{}\tlag {}\t{status}",
            v.name,
            v.version,
            human_duration(v.lag)
        );
    }
    for (name, channel, version) in &report.channels_updated {
        println!("  {name}:{channel} -> {version}");
    }
    println!(
        "{} copied, {present} in sync, {} failed",
        report.copied(),
        report.failed()
    );
}

fn human_bytes(n: u64) -> String {
    const MIB: f64 = (1 << 20) as f64;
    if n < 1 << 20 {
        format!("{n} B")
    } else {
        format!("{:.1} MiB", n as f64 / MIB)
    }
}

fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, s / 60 % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("1d").is_err());
        assert_eq!(human_duration(Duration::from_secs(3725)), "1h2m");
    }
}
