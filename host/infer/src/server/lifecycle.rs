//! A GPU host's life: listen before the model loads, load (a file, or a
//! version from the model stores through a [`Swapper`]), serve, drain.
//!
//! The listener opens first so liveness and metrics answer at once while a
//! model that takes minutes to pull and warm is loading; `/health/ready`
//! turns 200 when it is served. [`RunningGpuHost::shutdown`] stops taking
//! connections, gives in-flight requests the drain period, then ends the
//! engine. The CLI maps its flags onto [`GpuHostOptions`] and its signals
//! onto these calls; tests start a GPU host in-process the same way.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::swap::{self, SwapError, Swapper};
use super::{AppState, BackendOptions, LoadError, Served, ServerConfig};
use crate::loader::{self, LoaderError};
use crate::scheduler::EngineConfig;
use crate::telemetry::Telemetry;

/// Where the served model comes from.
pub enum ModelChoice {
    /// A GGUF file or a Hugging Face model directory.
    File(PathBuf),
    /// A version from the model stores, followed through its channel when
    /// the reference names one (hot swap every `poll_interval`, and on
    /// `POST /admin/models/reload`).
    Stored {
        /// Pulls, loads and swaps versions.
        swapper: Arc<Swapper>,
        /// How often to check the channel; `None`: only right after the
        /// start and on request.
        poll_interval: Option<Duration>,
    },
}

/// What a GPU host serves, where, and how.
pub struct GpuHostOptions {
    /// Address of the API (port 0 picks one; see [`RunningGpuHost::local_addr`]).
    pub listen: SocketAddr,
    /// Names, limits and defaults of the API.
    pub server: ServerConfig,
    /// The model.
    pub model: ModelChoice,
    /// Device and threads of a [`ModelChoice::File`] (a swapper carries
    /// its own, for every version it loads).
    pub backend: BackendOptions,
    /// Batching, queue and KV budget of a [`ModelChoice::File`].
    pub engine: EngineConfig,
    /// Time in-flight requests get to finish on shutdown.
    pub drain: Duration,
}

/// Why a GPU host could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum GpuHostError {
    /// The API's address could not be bound.
    #[error("listening on {address}: {source}")]
    Bind {
        /// The address asked for.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The model file or directory did not open.
    #[error("opening {}: {source}", path.display())]
    Open {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: LoaderError,
    },
    /// The model opened but could not be made ready.
    #[error("loading {}: {source}", path.display())]
    Load {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: LoadError,
    },
    /// The stored version could not be pulled or loaded.
    #[error(transparent)]
    Swap(#[from] SwapError),
    /// A task of the GPU host panicked or was cancelled.
    #[error("the {task} task failed: {detail}")]
    Task {
        /// Which task.
        task: &'static str,
        /// The panic.
        detail: String,
    },
    /// The API's listener stopped on an error.
    #[error("serving the API: {0}")]
    Serve(#[source] std::io::Error),
    /// The listener stopped while the model was loading.
    #[error("the API stopped before the model was ready")]
    StoppedWhileLoading,
}

/// What was loaded, for the start-up log line.
#[derive(Debug, Clone)]
pub struct Ready {
    /// `cpu` or `cuda`.
    pub backend: &'static str,
    /// KV cache blocks in all.
    pub kv_blocks: usize,
    /// The longest sequence one request may reach.
    pub max_sequence_tokens: usize,
}

/// A started GPU host. Dropping it does not stop it: call
/// [`RunningGpuHost::shutdown`].
pub struct RunningGpuHost {
    address: SocketAddr,
    app: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
    /// Ends with the channel follower, if any.
    loading: Option<JoinHandle<Result<Option<JoinHandle<()>>, GpuHostError>>>,
    follower: Option<JoinHandle<()>>,
    drain: Duration,
}

impl RunningGpuHost {
    /// Binds the API's address, starts serving, and starts loading the
    /// model in the background. Only a failure to bind is returned here;
    /// [`Self::loaded`] reports how loading went.
    pub async fn start(options: GpuHostOptions) -> Result<Self, GpuHostError> {
        let GpuHostOptions {
            listen,
            server,
            model,
            backend,
            engine,
            drain,
        } = options;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|source| GpuHostError::Bind {
                address: listen,
                source,
            })?;
        let address = listener.local_addr().map_err(|source| GpuHostError::Bind {
            address: listen,
            source,
        })?;
        let name = server.model_name.clone();
        let app = AppState::new(server, Telemetry::new());
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = tokio::spawn(super::serve(listener, Arc::clone(&app), async {
            let _ = stopped.await;
        }));
        tracing::info!(%address, model = %name, "gpu-host listening on http://{address}; loading the model");

        let loading = tokio::spawn({
            let app = Arc::clone(&app);
            async move {
                match model {
                    ModelChoice::File(path) => load_file(&app, path, backend, engine).await,
                    ModelChoice::Stored {
                        swapper,
                        poll_interval,
                    } => {
                        swap::record_store_metrics(&app);
                        // A fresh AppState has no swapper: this cannot fail.
                        let _ = app.set_swapper(Arc::clone(&swapper));
                        swapper.start(&app).await?;
                        Ok(swapper.follow(Arc::clone(&app), poll_interval))
                    }
                }
            }
        });
        Ok(Self {
            address,
            app,
            stop: Some(stop),
            server: Some(serving),
            loading: Some(loading),
            follower: None,
            drain,
        })
    }

    /// The bound address of the API.
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// The served state (model, telemetry, metrics).
    pub fn app(&self) -> &Arc<AppState> {
        &self.app
    }

    /// Waits until the model is loaded and served, or loading failed, or
    /// the listener stopped first. Returns at once after the first call.
    pub async fn loaded(&mut self) -> Result<Ready, GpuHostError> {
        if let Some(loading) = self.loading.as_mut() {
            let outcome = match self.server.as_mut() {
                Some(server) => tokio::select! {
                    outcome = loading => outcome,
                    ended = server => {
                        self.server = None;
                        flatten_serve(ended)?;
                        return Err(GpuHostError::StoppedWhileLoading);
                    }
                },
                None => loading.await,
            };
            self.loading = None;
            self.follower = outcome.map_err(|e| task_failed("model loading", &e))??;
        }
        let served = self.app.model().ok_or(GpuHostError::StoppedWhileLoading)?;
        Ok(Ready {
            backend: served.backend(),
            kv_blocks: served.engine().kv_blocks_total(),
            max_sequence_tokens: served.engine().max_sequence_tokens(),
        })
    }

    /// Resolves when the listener stops on its own (an error); a running
    /// host never returns from this otherwise.
    pub async fn closed(&mut self) -> Result<(), GpuHostError> {
        match self.server.as_mut() {
            Some(server) => {
                let ended = server.await;
                self.server = None;
                flatten_serve(ended)
            }
            None => std::future::pending().await,
        }
    }

    /// Stops taking connections and gives in-flight requests the drain
    /// period; then ends what still runs (their streams close with an
    /// error event) and the engine.
    pub async fn shutdown(mut self) {
        tracing::info!("shutting down: draining in-flight requests");
        // No swap starts while draining, and no load finishes into a
        // stopping host.
        if let Some(follower) = self.follower.take() {
            follower.abort();
        }
        if let Some(loading) = self.loading.take() {
            if loading.is_finished() {
                if let Ok(Ok(Some(follower))) = loading.await {
                    follower.abort();
                }
            } else {
                loading.abort();
            }
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Streams an edge can continue elsewhere go there now, rather than
        // hold the drain.
        if let Some(served) = self.app.model() {
            served.hand_off_streams();
        }
        let mut drained = true;
        if let Some(server) = self.server.as_mut() {
            drained = tokio::time::timeout(self.drain, &mut *server).await.is_ok();
            if !drained {
                tracing::warn!("drain period over; ending the requests still running");
            }
        }
        self.app.shutdown();
        if let Some(server) = self.server.take()
            && !drained
        {
            // The requests were just ended; the listener follows promptly.
            let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
        }
        tracing::info!("stopped");
    }
}

fn flatten_serve(
    ended: Result<std::io::Result<()>, tokio::task::JoinError>,
) -> Result<(), GpuHostError> {
    ended
        .map_err(|e| task_failed("API", &e))?
        .map_err(GpuHostError::Serve)
}

fn task_failed(task: &'static str, error: &tokio::task::JoinError) -> GpuHostError {
    GpuHostError::Task {
        task,
        detail: error.to_string(),
    }
}

/// Loads the model at `path` and makes it the served one.
async fn load_file(
    app: &AppState,
    path: PathBuf,
    backend: BackendOptions,
    engine: EngineConfig,
) -> Result<Option<JoinHandle<()>>, GpuHostError> {
    let telemetry = app.telemetry().clone();
    let served = tokio::task::spawn_blocking(move || -> Result<Served, GpuHostError> {
        let loaded = loader::load(&path).map_err(|source| GpuHostError::Open {
            path: path.clone(),
            source,
        })?;
        Served::from_loaded(loaded, backend, engine, telemetry)
            .map_err(|source| GpuHostError::Load { path, source })
    })
    .await
    .map_err(|e| task_failed("model loading", &e))??;
    // A fresh AppState has no model yet; only this task sets it.
    let _ = app.set_model(served);
    Ok(None)
}
