//! `breakwater up`'s GPU host: the all-in-one POP runs the demo model
//! behind the OpenAI-compatible API in a child process (`breakwater
//! gpu-host`), as a real deployment would, so the edge's `/v1/*` pool has
//! something to forward to.
//!
//! Unless `--model` names a file, the demo model is served the way a
//! deployment serves models: from a model store. `up` makes sure it is in
//! the local `file://` store `.cache/model-store` (fetched and pushed once),
//! and the GPU host follows `smollm2-135m-instruct:stable` there, pulling
//! into `.cache/model-cache`: promoting another version to `stable` in that
//! store and calling `POST http://127.0.0.1:9000/admin/models/reload` swaps
//! it in.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use breakwater_infer::demo_model;

/// How long the model may take to load and warm up before `up` gives up.
const READY_DEADLINE: Duration = Duration::from_secs(120);
/// How long the GPU host gets to drain after the edge has stopped.
const STOP_DEADLINE: Duration = Duration::from_secs(10);

/// What `up` starts the GPU host with.
pub struct GpuHostPlan {
    pub listen: SocketAddr,
    /// `None`: the demo model, from the local model store (put there on
    /// first use).
    pub model: Option<PathBuf>,
    pub log_json: bool,
}

/// The GPU host child; dropping it stops the process (SIGTERM, then
/// SIGKILL after [`STOP_DEADLINE`]).
pub struct GpuHostChild {
    child: Child,
    listen: SocketAddr,
}

impl GpuHostChild {
    /// Starts `breakwater gpu-host` as `plan` says and waits until it is
    /// ready.
    pub async fn start(plan: GpuHostPlan) -> anyhow::Result<Self> {
        let GpuHostPlan {
            listen,
            model,
            log_json,
        } = plan;
        let exe = std::env::current_exe().context("locating the breakwater binary")?;
        let mut command = Command::new(exe);
        if log_json {
            command.args(["--log-format", "json"]);
        }
        command.arg("gpu-host");
        match model {
            Some(path) => {
                command.arg("--model").arg(path);
            }
            None => {
                let store_dir = demo_model::default_store_dir();
                demo_model::ensure_store(&demo_model::default_dir(), &store_dir)
                    .await
                    .context(
                        "putting the demo model into the local model store (`cargo xtask up` \
                         does this too)",
                    )?;
                command
                    .arg("--model-ref")
                    .arg(format!(
                        "{}:{}",
                        demo_model::MODEL_NAME,
                        demo_model::STORE_CHANNEL
                    ))
                    .arg("--store")
                    .arg(format!("file://{}", store_dir.display()))
                    .arg("--model-cache")
                    .arg(demo_model::default_pull_cache_dir());
            }
        }
        command
            .arg("--listen")
            .arg(listen.to_string())
            .stdin(Stdio::null());
        stop_with_parent(&mut command);
        let child = command.spawn().context("starting `breakwater gpu-host`")?;
        let mut host = Self { child, listen };
        host.wait_ready().await?;
        Ok(host)
    }

    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// Polls `/health/ready` until it answers 200, the child exits, or the
    /// deadline passes.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let url = format!("http://{}/health/ready", self.listen);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .context("building the readiness probe")?;
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().context("watching gpu-host")? {
                anyhow::bail!("`breakwater gpu-host` exited during startup ({status})");
            }
            if client
                .get(&url)
                .send()
                .await
                .is_ok_and(|response| response.status().is_success())
            {
                return Ok(());
            }
            if started.elapsed() > READY_DEADLINE {
                anyhow::bail!(
                    "`breakwater gpu-host` was not ready on {} within {READY_DEADLINE:?}",
                    self.listen
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for GpuHostChild {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child's pid, which we have not
            // reaped yet, so it cannot name another process.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let started = Instant::now();
        while started.elapsed() < STOP_DEADLINE {
            if matches!(self.child.try_wait(), Ok(Some(_)) | Err(_)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        tracing::warn!("gpu-host did not stop within {STOP_DEADLINE:?}; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asks the kernel to send the GPU host SIGTERM when `up` dies, however it
/// dies: a killed `up` must not leave a GPU host holding its port (and the
/// next `up` failing to start). Called from the thread that spawns it,
/// which lives as long as `up` (the signal follows the spawning thread).
#[cfg(target_os = "linux")]
fn stop_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and calls
    // only prctl and getppid, which are async-signal-safe.
    let parent = std::process::id();
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // `up` died before the request took effect: nobody would signal.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(std::io::Error::other("the parent `breakwater up` exited"));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn stop_with_parent(_command: &mut Command) {}
