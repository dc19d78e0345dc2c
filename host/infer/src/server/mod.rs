//! The OpenAI-compatible HTTP API over the engine (axum).
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions` (streamed as
//! server-sent events or whole), `GET /v1/models`, `GET /health/live`,
//! `GET /health/ready` (200 once the model is loaded and warm), `GET
//! /metrics` (Prometheus). Every error is OpenAI's JSON error shape.
//!
//! The server starts before the model is loaded, so that liveness and
//! metrics answer during a long load and readiness says when to route to it.
//!
//! The model can be replaced while serving ([`swap`]): each request takes
//! the current model (an `Arc`) once and keeps it until its answer is
//! finished, so a swap never mixes two versions in one answer and the old
//! version lives until its last request is done.

pub mod error;
pub mod lifecycle;
pub mod openai;
pub mod swap;
mod traces;

use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::mpsc;

use self::error::ApiError;
use self::openai::{ChatRequest, CompletionRequest, Envelope, Kind, Params};
use crate::backend::cuda::{CudaError, CudaRunner};
use crate::backend::{CpuRunner, Device};
use crate::chat_template::{ChatPrompt, ChatTemplate};
use crate::cpu::{CpuBackend, CpuBackendError};
use crate::gguf::Gguf;
use crate::loader::{LoadedModel, LoaderError};
use crate::model::Model;
use crate::scheduler::{
    Engine, EngineConfig, EngineError, Event, Failure, Finish, GenerationRequest, SubmitError,
};
use crate::telemetry::Telemetry;
use crate::tokenizer::Tokenizer;

pub use breakwater_listen::ConnectionLimits;

pub use breakwater_wire::{
    DEADLINE_HEADER, HANDOFF_FIELD, MODEL_VERSION_HEADER, REQUEST_ID_HEADER, RESUME_FIELD,
    TOKEN_IDS_HEADER,
};

/// Token texts that end a turn in common chat formats. llama.cpp stops on
/// these too (its "end of generation" set), whatever the metadata's EOS:
/// a chat model that ends its turn with `<|im_end|>` and then writes
/// `<|endoftext|>` must stop at the first.
const END_OF_TURN: [&str; 6] = [
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|end_of_text|>",
];

/// Bytes of prompt per token of context that a prompt may have, checked
/// before tokenizing: a prompt longer than the context times this cannot
/// fit, and is refused without the CPU a tokenizer would spend on it.
/// Text runs at about 4 bytes a token (English, code) and rarely beyond 8
/// (long whitespace runs); 16 leaves room for any prompt that fits.
pub const MAX_PROMPT_BYTES_PER_TOKEN: usize = 16;

/// The HTTP side's limits and defaults.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The name clients ask for in `model`.
    pub model_name: String,
    /// Request bodies larger than this get 413.
    pub max_body_bytes: usize,
    /// `max_tokens` for chat requests that give none (capped by the context).
    pub default_max_tokens: usize,
    /// The deadline of requests that carry none.
    pub default_timeout: Duration,
}

impl ServerConfig {
    /// Defaults for serving `model_name`.
    pub fn new(model_name: impl Into<String>) -> Self {
        Self {
            model_name: model_name.into(),
            max_body_bytes: 2 << 20,
            default_max_tokens: 1024,
            default_timeout: Duration::from_secs(600),
        }
    }
}

/// Why a model could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The model's files: weights, hyperparameters, tokenizer, template.
    #[error(transparent)]
    Files(#[from] LoaderError),
    /// The CPU thread pool.
    #[error(transparent)]
    Backend(#[from] CpuBackendError),
    /// The GPU asked for could not serve the model.
    #[error(transparent)]
    Cuda(#[from] CudaError),
    /// The engine's warm-up or start.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Where a model runs.
#[derive(Debug, Clone, Copy)]
pub struct BackendOptions {
    /// `cpu`, `cuda:N`, or `auto`.
    pub device: Device,
    /// CPU threads for the forward pass (CPU backend).
    pub threads: usize,
    /// Share of the GPU memory free after loading the weights that the KV
    /// cache takes when [`EngineConfig::kv_budget_bytes`] is 0.
    pub gpu_memory_fraction: f64,
}

impl BackendOptions {
    /// The CPU backend on `threads` threads.
    pub fn cpu(threads: usize) -> Self {
        Self {
            device: Device::Cpu,
            threads,
            gpu_memory_fraction: DEFAULT_GPU_MEMORY_FRACTION,
        }
    }
}

/// The KV cache's share of free GPU memory by default (vLLM's default
/// `gpu_memory_utilization` is 0.9 of the whole device, weights included).
pub const DEFAULT_GPU_MEMORY_FRACTION: f64 = 0.85;

/// The KV budget on the CPU when the configuration says 0 (automatic).
const CPU_DEFAULT_KV_BUDGET: usize = 512 << 20;

/// A loaded, warm model and its engine.
#[derive(Debug)]
pub struct Served {
    engine: Engine,
    tokenizer: Arc<Tokenizer>,
    template: ChatTemplate,
    backend: &'static str,
    version: Option<ModelVersion>,
    /// Set once this model drains: streams that can be continued elsewhere
    /// end with a handoff rather than run out the drain.
    handoff: tokio::sync::watch::Sender<bool>,
}

/// Which version of a stored model a [`Served`] is (models pulled from a
/// model store; a model file given by path has none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelVersion {
    /// The model's name in the store.
    pub name: String,
    /// The version serving.
    pub version: String,
    /// What the host follows: `name@version` or `name:channel`.
    pub reference: String,
}

/// Starts `model`'s engine on the device `options` asks for. `auto` tries
/// CUDA device 0 and, when it cannot start, says why once and uses the CPU.
fn start_engine(
    model: Arc<Model>,
    tokenizer: &Arc<Tokenizer>,
    stop_tokens: Vec<u32>,
    options: BackendOptions,
    mut config: EngineConfig,
    telemetry: Telemetry,
) -> Result<(Engine, &'static str), LoadError> {
    let cuda = match options.device {
        Device::Cpu => None,
        Device::Cuda(ordinal) => Some(CudaRunner::new(&model, ordinal)?),
        Device::Auto => match CudaRunner::new(&model, 0) {
            Ok(runner) => Some(runner),
            Err(e) => {
                tracing::info!(reason = %e, "no usable GPU; serving from the CPU backend");
                None
            }
        },
    };
    let tokenizer = Arc::clone(tokenizer);
    match cuda {
        Some(runner) => {
            if config.kv_budget_bytes == 0 {
                config.kv_budget_bytes = runner.suggested_kv_budget(options.gpu_memory_fraction)?;
            }
            tracing::info!(
                device = runner.device_name(),
                "serving from the CUDA backend"
            );
            let engine = Engine::start(runner, tokenizer, stop_tokens, config, telemetry)?;
            Ok((engine, "cuda"))
        }
        None => {
            if config.kv_budget_bytes == 0 {
                config.kv_budget_bytes = CPU_DEFAULT_KV_BUDGET;
            }
            let runner = CpuRunner::new(model, CpuBackend::new(options.threads)?);
            let engine = Engine::start(runner, tokenizer, stop_tokens, config, telemetry)?;
            Ok((engine, "cpu"))
        }
    }
}

impl Served {
    /// Loads a GGUF model, runs one warm-up forward pass and starts its
    /// engine on the device `backend` names.
    pub fn from_gguf(
        gguf: &Gguf,
        backend: BackendOptions,
        config: EngineConfig,
        telemetry: Telemetry,
    ) -> Result<Self, LoadError> {
        Self::from_loaded(LoadedModel::from_gguf(gguf)?, backend, config, telemetry)
    }

    /// Serves a model loaded from either format (see [`crate::loader`]):
    /// runs one warm-up forward pass and starts its engine on the device
    /// `backend` names.
    pub fn from_loaded(
        loaded: LoadedModel,
        backend: BackendOptions,
        config: EngineConfig,
        telemetry: Telemetry,
    ) -> Result<Self, LoadError> {
        let LoadedModel {
            model,
            tokenizer,
            template,
            end_tokens: mut stop_tokens,
            ..
        } = loaded;
        let model = Arc::new(model);
        let tokenizer = Arc::new(tokenizer);
        let special = tokenizer.special_tokens();
        stop_tokens.extend(END_OF_TURN.iter().filter_map(|t| special.get(*t).copied()));
        stop_tokens.sort_unstable();
        stop_tokens.dedup();
        let (engine, backend) =
            start_engine(model, &tokenizer, stop_tokens, backend, config, telemetry)?;
        Ok(Self {
            engine,
            tokenizer,
            template,
            backend,
            version: None,
            handoff: tokio::sync::watch::channel(false).0,
        })
    }

    /// The model drains: every stream of an edge that can continue it
    /// elsewhere (those with token ids) ends now with a handoff event
    /// ([`breakwater_wire::HANDOFF_FIELD`]), which cancels its sequence.
    pub fn hand_off_streams(&self) {
        self.handoff.send_replace(true);
    }

    /// Labels the model with the stored version it was loaded from.
    #[must_use]
    pub fn with_version(mut self, version: ModelVersion) -> Self {
        self.version = Some(version);
        self
    }

    /// The stored version, if the model came from a store.
    pub fn version(&self) -> Option<&ModelVersion> {
        self.version.as_ref()
    }

    /// The backend serving the model: `"cpu"` or `"cuda"`.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// The engine, for introspection.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

/// What the handlers share.
#[derive(Debug)]
pub struct AppState {
    config: ServerConfig,
    telemetry: Telemetry,
    /// The model serving now. A read takes a clone of the `Arc` and lets
    /// go of the lock at once; a swap holds the write lock only to replace
    /// the pointer.
    model: RwLock<Option<Arc<Served>>>,
    created: u64,
    /// Follows a stored model's channel, for `/admin/models/reload`.
    swapper: OnceLock<Arc<swap::Swapper>>,
    /// Counts swaps, for `/metrics`.
    swaps: swap::SwapMetrics,
    /// The process-wide recorder's metrics (the model store's pull
    /// counters), appended to `/metrics` when the binary installed one.
    process_metrics: OnceLock<PrometheusHandle>,
}

impl AppState {
    /// A server with no model yet: live, not ready.
    pub fn new(config: ServerConfig, telemetry: Telemetry) -> Arc<Self> {
        Arc::new(Self {
            config,
            telemetry,
            model: RwLock::new(None),
            created: unix_seconds(),
            swapper: OnceLock::new(),
            swaps: swap::SwapMetrics::default(),
            process_metrics: OnceLock::new(),
        })
    }

    /// Makes `served` the model; from then on the server is ready. A model
    /// already set stays, and `served` is handed back (to replace one, see
    /// [`AppState::replace_model`]).
    pub fn set_model(&self, served: Served) -> Result<(), Box<Served>> {
        let mut model = self.model.write().unwrap_or_else(PoisonError::into_inner);
        if model.is_some() {
            return Err(Box::new(served));
        }
        *model = Some(Arc::new(served));
        Ok(())
    }

    /// Makes `served` the model at once and hands back the one it replaces.
    /// Requests already running keep the old one (they hold its `Arc`);
    /// new ones get `served`.
    pub fn replace_model(&self, served: Arc<Served>) -> Option<Arc<Served>> {
        let mut model = self.model.write().unwrap_or_else(PoisonError::into_inner);
        model.replace(served)
    }

    /// The model serving now, once set.
    pub fn model(&self) -> Option<Arc<Served>> {
        self.model
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The metrics.
    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// Lets `/admin/models/reload` and the channel watcher swap versions.
    /// A swapper already set stays, and `swapper` is handed back.
    pub fn set_swapper(&self, swapper: Arc<swap::Swapper>) -> Result<(), Arc<swap::Swapper>> {
        self.swapper.set(swapper)
    }

    /// Appends the metrics of the process-wide recorder (which the model
    /// store's pull counters go to) to `/metrics`.
    pub fn set_process_metrics(&self, handle: PrometheusHandle) {
        let _ = self.process_metrics.set(handle);
    }

    /// Everything `/metrics` answers, in Prometheus' text format.
    pub fn render_metrics(&self) -> String {
        let mut text = self.telemetry.render();
        let current = self.model();
        self.swaps.render(
            self.swapper.get().is_some(),
            current.as_ref().and_then(|m| m.version()),
            &mut text,
        );
        if let Some(handle) = self.process_metrics.get() {
            handle.run_upkeep();
            text.push_str(&handle.render());
        }
        text
    }

    /// Stops the engine: running and queued requests end with an error.
    pub fn shutdown(&self) {
        if let Some(served) = self.model() {
            served.engine.shutdown();
        }
    }

    fn served(&self) -> Result<Arc<Served>, ApiError> {
        self.model()
            .ok_or_else(|| ApiError::not_ready("the model is still loading"))
    }
}

/// The API's routes.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/admin/models/reload", post(swap::reload))
        .fallback(|uri: Uri| async move { ApiError::no_route(uri.path()) })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn(traces::continue_request))
        .with_state(state)
}

/// Serves the API on `listener` within the default [`ConnectionLimits`]
/// (the edge's) until `shutdown` resolves, then stops taking connections
/// and waits for open ones to finish. Handlers see the peer's address
/// (`/admin/models/reload` takes loopback callers only when no token is
/// configured).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, state, ConnectionLimits::default(), shutdown).await
}

/// [`serve`] within `limits`: connections that send no request within the
/// header read timeout, or stay idle past the idle timeout, are closed, and
/// connections beyond the caps are refused at accept.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state);
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown.await;
            stop.cancel();
        }
    });
    let options = breakwater_listen::ServeOptions {
        name: "gpu-host".to_owned(),
        limits: limits.clone(),
        tls: None,
        // The caller bounds the drain (it also ends the engine's sequences).
        grace: Duration::MAX,
        parse_error_body: None,
    };
    let make_service = move |peer: std::net::SocketAddr| {
        let app = app.clone();
        hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            tower::ServiceExt::oneshot(app.clone(), request)
        })
    };
    breakwater_listen::serve(
        listener,
        breakwater_listen::http_builder(),
        options,
        make_service,
        stop,
    )
    .await;
    Ok(())
}

async fn live() -> impl IntoResponse {
    axum::Json(json!({"status": "live"}))
}

async fn ready(State(app): State<Arc<AppState>>) -> Response {
    match app.model() {
        Some(model) => {
            let mut response = axum::Json(json!({"status": "ready"})).into_response();
            // The edge's health checks learn from it which version answers.
            if let Some(version) = model
                .version()
                .and_then(|v| HeaderValue::from_str(&v.version).ok())
            {
                response.headers_mut().insert(MODEL_VERSION_HEADER, version);
            }
            response
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "loading"})),
        )
            .into_response(),
    }
}

async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.render_metrics(),
    )
        .into_response()
}

async fn models(State(app): State<Arc<AppState>>) -> Response {
    let mut model = json!({
        "id": app.config.model_name,
        "object": "model",
        "created": app.created,
        "owned_by": "breakwater",
    });
    // Extra fields: OpenAI's clients ignore them, operators see which
    // stored version serves (it changes with a hot swap).
    if let Some(version) = app.model().as_ref().and_then(|m| m.version().cloned()) {
        model["version"] = json!(version.version);
        model["reference"] = json!(version.reference);
    }
    axum::Json(json!({"object": "list", "data": [model]})).into_response()
}

async fn chat(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let request: ChatRequest = parse(&app, body)?;
        let messages = request.messages()?;
        let mut params = request.common.validate()?;
        params.token_ids = wants_token_ids(&headers);
        let deadline = deadline(&headers, app.config.default_timeout)?;
        check_model(&app, &params)?;
        // One model for the whole request: the template, the tokenizer and
        // the engine must be the same version, whatever a swap does meanwhile.
        let served = app.served()?;
        check_prompt_bytes(&served, messages.iter().map(|m| m.content.len()).sum())?;
        let prompt = served
            .template
            .render_prompt(&messages, true, &served.tokenizer)
            // The template's own checks (role order, …) reject the messages.
            .map_err(|e| ApiError::invalid(e.to_string(), "messages"))?;
        let default_max = app.config.default_max_tokens;
        generate(
            &app,
            served,
            Kind::Chat,
            Prompt::Chat(prompt),
            params,
            default_max,
            deadline,
        )
        .await
    }
    .await;
    respond(&app, result)
}

async fn completions(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let request: CompletionRequest = parse(&app, body)?;
        // The client writes the whole prompt here, control tokens included.
        let prompt = Prompt::Raw(request.prompt()?.to_owned());
        let mut params = request.common.validate()?;
        params.token_ids = wants_token_ids(&headers);
        let deadline = deadline(&headers, app.config.default_timeout)?;
        check_model(&app, &params)?;
        let default_max = openai::COMPLETIONS_DEFAULT_MAX_TOKENS;
        let served = app.served()?;
        generate(
            &app,
            served,
            Kind::Completion,
            prompt,
            params,
            default_max,
            deadline,
        )
        .await
    }
    .await;
    respond(&app, result)
}

fn respond(app: &AppState, result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(|e| {
        if let Some(r) = e.rejection {
            app.telemetry.rejected(r);
        }
        e.into_response()
    })
}

fn parse<T: DeserializeOwned>(
    app: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::body_too_large(app.config.max_body_bytes)
        } else {
            ApiError::bad_request(format!("could not read the request body: {e}"))
        }
    })?;
    serde_json::from_slice(&body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            ApiError::bad_request(format!("invalid request body: {e}"))
        }
        _ => ApiError::bad_request(format!("could not parse the JSON body of the request: {e}")),
    })
}

fn check_model(app: &AppState, params: &Params) -> Result<(), ApiError> {
    if params.model == app.config.model_name {
        Ok(())
    } else {
        Err(ApiError::unknown_model(&params.model))
    }
}

/// The request's deadline: its `X-Request-Deadline` (Unix ms) if earlier
/// than the server's default timeout from now.
fn deadline(headers: &HeaderMap, default_timeout: Duration) -> Result<Instant, ApiError> {
    let now = Instant::now();
    let default = now + default_timeout;
    let Some(value) = headers.get(DEADLINE_HEADER) else {
        return Ok(default);
    };
    let ms: u64 = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "{DEADLINE_HEADER} must be a Unix time in milliseconds"
            ))
        })?;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let left = u128::from(ms).saturating_sub(now_ms);
    if left == 0 {
        return Err(ApiError::deadline());
    }
    let left = Duration::from_millis(u64::try_from(left).unwrap_or(u64::MAX));
    Ok(now + left.min(default_timeout))
}

/// Whether the caller (an edge that may resume the answer elsewhere) asks
/// for token ids.
fn wants_token_ids(headers: &HeaderMap) -> bool {
    headers
        .get(TOKEN_IDS_HEADER)
        .is_some_and(|v| v.as_bytes() == b"1")
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Refuses a prompt of `bytes` that could not fit `served`'s context even
/// at [`MAX_PROMPT_BYTES_PER_TOKEN`], before anything costly is done with it.
fn check_prompt_bytes(served: &Served, bytes: usize) -> Result<(), ApiError> {
    let context_tokens = served.engine.max_sequence_tokens();
    let limit = context_tokens.saturating_mul(MAX_PROMPT_BYTES_PER_TOKEN);
    if bytes > limit {
        return Err(ApiError::prompt_too_large(bytes, limit, context_tokens));
    }
    Ok(())
}

/// A prompt to tokenize.
enum Prompt {
    /// A completion's prompt, written whole by the client.
    Raw(String),
    /// A chat template's output: control tokens from the template only.
    Chat(ChatPrompt),
}

impl Prompt {
    fn len(&self) -> usize {
        match self {
            Prompt::Raw(text) => text.len(),
            Prompt::Chat(prompt) => prompt.len(),
        }
    }

    fn encode(&self, tokenizer: &Tokenizer) -> Result<Vec<u32>, crate::tokenizer::TokenizerError> {
        match self {
            Prompt::Raw(text) => tokenizer.encode(text),
            Prompt::Chat(prompt) => prompt.encode(tokenizer),
        }
    }
}

/// Tokenizes `prompt`, queues it on `served`'s engine and answers,
/// streamed or whole. The answer holds `served` until it is finished, so
/// a swapped-out model's engine runs until its last answer is done.
async fn generate(
    app: &Arc<AppState>,
    served: Arc<Served>,
    kind: Kind,
    prompt: Prompt,
    params: Params,
    default_max_tokens: usize,
    deadline: Instant,
) -> Result<Response, ApiError> {
    let bytes = prompt.len();
    check_prompt_bytes(&served, bytes)?;
    // A prompt can be many kilobytes: tokenize it off the async workers.
    let tokenizer = Arc::clone(&served.tokenizer);
    let ids = tokio::task::spawn_blocking(move || prompt.encode(&tokenizer))
        .await
        .map_err(|e| ApiError::internal(format!("tokenizing the prompt: {e}")))?
        .map_err(|e| ApiError::internal(format!("tokenizing the prompt: {e}")))?;
    app.telemetry.tokenized(bytes);
    if ids.is_empty() {
        return Err(ApiError::invalid("the prompt is empty", "prompt"));
    }
    let limit = served.engine.max_sequence_tokens();
    let resumed = params.resume.len();
    // The whole answer's max_tokens: what a continuation may add is what
    // its first host had left.
    let wanted = params.max_tokens.unwrap_or(default_max_tokens);
    if resumed >= wanted {
        return Err(ApiError::invalid(
            format!(
                "{RESUME_FIELD} holds {resumed} tokens: max_tokens ({wanted}) leaves none to generate"
            ),
            RESUME_FIELD,
        ));
    }
    let mut ids = ids;
    ids.extend_from_slice(&params.resume);
    if ids.len() >= limit {
        return Err(ApiError::context_length(format!(
            "this model's maximum context length is {limit} tokens, and the prompt has {} \
             (at least one token must be left to generate)",
            ids.len()
        )));
    }
    // A max_tokens beyond the context is cut to what fits, as llama.cpp's
    // server does; finish_reason "length" tells the client.
    let max_tokens = (wanted - resumed).min(limit - ids.len());
    let request = GenerationRequest {
        prompt: ids,
        max_tokens,
        sampling: params.sampling,
        stop: params.stop,
        deadline: Some(deadline),
        ignore_eos: params.ignore_eos,
        resumed,
        token_ids: params.token_ids,
    };
    let rx = served.engine.submit(request).map_err(|e| match e {
        SubmitError::QueueFull { retry_after } => ApiError::overloaded(retry_after),
        SubmitError::TooLong { .. } => ApiError::context_length(e.to_string()),
        SubmitError::EmptyPrompt => ApiError::invalid(e.to_string(), "prompt"),
        SubmitError::NoTokens => ApiError::invalid(e.to_string(), "max_tokens"),
        SubmitError::DeadlineExceeded => ApiError::deadline(),
        SubmitError::ShuttingDown => ApiError::not_ready(e.to_string()),
        SubmitError::NotGenerated { .. } => {
            ApiError::invalid(format!("{RESUME_FIELD}: {e}"), RESUME_FIELD)
        }
    })?;
    let envelope = Envelope {
        id: format!(
            "{}-{}",
            match kind {
                Kind::Chat => "chatcmpl",
                Kind::Completion => "cmpl",
            },
            uuid::Uuid::new_v4().simple()
        ),
        created: unix_seconds(),
        model: app.config.model_name.clone(),
        kind,
    };
    let deadline = tokio::time::Instant::from_std(deadline);
    let version = served
        .version()
        .and_then(|v| HeaderValue::from_str(&v.version).ok());
    let token_ids = params.token_ids.then(Vec::new);
    let mut response = if params.stream {
        stream(
            envelope,
            rx,
            params.include_usage,
            token_ids.is_some(),
            deadline,
            served,
        )
    } else {
        collect(envelope, rx, token_ids, deadline, served).await?
    };
    if let Some(version) = version {
        response.headers_mut().insert(MODEL_VERSION_HEADER, version);
    }
    Ok(response)
}

fn failure_error(f: Failure) -> ApiError {
    match f {
        Failure::DeadlineExceeded => ApiError::deadline(),
        Failure::ShuttingDown => ApiError::not_ready(f.to_string()),
        Failure::Model(_) => ApiError::internal(f.to_string()),
    }
}

/// Waits for the whole answer. Dropping this future (the client went away)
/// drops the receiver, which cancels the sequence. `_served` keeps the
/// model's engine alive until then. `token_ids`, when asked for, gathers
/// the ids of the tokens this host generated (those of `text`).
async fn collect(
    envelope: Envelope,
    mut rx: mpsc::Receiver<Event>,
    mut token_ids: Option<Vec<u32>>,
    deadline: tokio::time::Instant,
    _served: Arc<Served>,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => return Err(ApiError::deadline()),
            Ok(None) => return Err(ApiError::internal("the engine stopped")),
            Ok(Some(Event::Text { text: t, tokens })) => {
                text.push_str(&t);
                if let Some(ids) = &mut token_ids {
                    ids.extend_from_slice(&tokens);
                }
            }
            Ok(Some(Event::Done(finish))) => {
                if let Some(span) = traces::request_span() {
                    traces::record_generation(
                        &span,
                        &envelope.model,
                        envelope.kind.operation(),
                        &finish,
                    );
                }
                let answer = envelope.response(text, &finish, token_ids.as_deref());
                return Ok(axum::Json(answer).into_response());
            }
            Ok(Some(Event::Failed(f))) => return Err(failure_error(f)),
        }
    }
}

/// Where a stream is.
enum Phase {
    Role,
    Body,
    Usage(Finish),
    DoneMarker,
    End,
}

struct Streaming {
    envelope: Envelope,
    rx: mpsc::Receiver<Event>,
    include_usage: bool,
    /// Chunks carry their token ids.
    token_ids: bool,
    deadline: tokio::time::Instant,
    phase: Phase,
    /// The request's trace span, when tracing is on: the stream's end
    /// records the generation there.
    trace: Option<tracing::Span>,
    /// Turns true when the model drains ([`Served::hand_off_streams`]).
    handoff: tokio::sync::watch::Receiver<bool>,
    /// Keeps the model (its engine) alive while the stream runs, even
    /// after a swap replaced it.
    _served: Arc<Served>,
}

/// Resolves once the model drains; never when it cannot any more.
async fn handed_off(handoff: &mut tokio::sync::watch::Receiver<bool>) {
    if handoff.wait_for(|drains| *drains).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn data(value: &serde_json::Value) -> SseEvent {
    SseEvent::default().data(value.to_string())
}

/// Server-sent events: `data: {chunk}` per delta, then `data: [DONE]`. When
/// the client disconnects, axum drops the stream and with it the receiver,
/// which cancels the sequence at the engine's next step.
fn stream(
    envelope: Envelope,
    rx: mpsc::Receiver<Event>,
    include_usage: bool,
    token_ids: bool,
    deadline: tokio::time::Instant,
    served: Arc<Served>,
) -> Response {
    let phase = match envelope.kind {
        Kind::Chat => Phase::Role,
        Kind::Completion => Phase::Body,
    };
    let state = Streaming {
        envelope,
        rx,
        include_usage,
        token_ids,
        deadline,
        phase,
        trace: traces::request_span(),
        handoff: served.handoff.subscribe(),
        _served: served,
    };
    let events = futures_util::stream::unfold(state, |mut s| async move {
        let event = match std::mem::replace(&mut s.phase, Phase::End) {
            Phase::End => return None,
            Phase::Role => {
                s.phase = Phase::Body;
                data(&s.envelope.chunk(true, None, None, None))
            }
            Phase::Usage(finish) => {
                s.phase = Phase::DoneMarker;
                data(&s.envelope.usage_chunk(&finish))
            }
            Phase::DoneMarker => SseEvent::default().data("[DONE]"),
            Phase::Body => match tokio::select! {
                biased;
                // Only a stream with ids can be continued elsewhere.
                () = handed_off(&mut s.handoff), if s.token_ids => None,
                next = tokio::time::timeout_at(s.deadline, s.rx.recv()) => Some(next),
            } {
                None => data(&json!({ HANDOFF_FIELD: { "reason": "drain" } })),
                Some(Ok(Some(Event::Text { text, tokens }))) => {
                    s.phase = Phase::Body;
                    let tokens = s.token_ids.then_some(tokens.as_slice());
                    data(&s.envelope.chunk(false, Some(&text), None, tokens))
                }
                Some(Ok(Some(Event::Done(finish)))) => {
                    if let Some(span) = &s.trace {
                        traces::record_generation(
                            span,
                            &s.envelope.model,
                            s.envelope.kind.operation(),
                            &finish,
                        );
                    }
                    s.phase = if s.include_usage {
                        Phase::Usage(finish)
                    } else {
                        Phase::DoneMarker
                    };
                    data(
                        &s.envelope
                            .chunk(false, None, Some(finish.reason.as_str()), None),
                    )
                }
                Some(Ok(Some(Event::Failed(f)))) => data(&failure_error(f).body()),
                Some(Ok(None)) => data(&ApiError::internal("the engine stopped").body()),
                Some(Err(_)) => data(&ApiError::deadline().body()),
            },
        };
        Some((Ok::<_, Infallible>(event), s))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
