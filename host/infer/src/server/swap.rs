//! Serving a model from a model store, and swapping its versions while
//! serving (`breakwater gpu-host --model-ref NAME:CHANNEL`).
//!
//! A [`Swapper`] knows the reference the host follows (`name@version` or
//! `name:channel`), the stores to pull it from, and how to load a version.
//! A check (on a timer, or `POST /admin/models/reload`) resolves the
//! reference; when it names another version than the one serving, that
//! version is pulled (verified, see [`breakwater_store::model::pull`]) and
//! loaded and warmed on a new engine beside the serving one. Only a model
//! that is ready replaces the current one, in one pointer swap
//! ([`AppState::replace_model`]): requests that started before keep the
//! old model's `Arc` and finish on its engine; new ones go to the new
//! engine. The old engine is stopped once its last request is done, or when
//! the drain time is over. A version that fails to pull or to load leaves
//! the serving one in place.
//!
//! Checks run one at a time, and a new version is loaded only once the
//! previous swap's old engine is gone: at most two models are in memory.
//! Every wait has a deadline: the pull's per store, the load's, the
//! drain's.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use breakwater_store::model::{
    ModelError, ModelRef, ModelStore, PullOptions, PulledModel, Selector, pull, resolve,
};
use serde::Serialize;
use serde_json::json;
use tokio::task::JoinHandle;

use super::{AppState, BackendOptions, LoadError, ModelVersion, Served};
use crate::scheduler::EngineConfig;

/// How often a drain looks whether the old model's last request is done.
const DRAIN_POLL: Duration = Duration::from_millis(20);
/// A channel check on a timer does not pull a version that was refused
/// again before this much time: a corrupt version would otherwise be
/// downloaded on every tick. `POST /admin/models/reload` always tries.
const REFUSED_BACKOFF: Duration = Duration::from_secs(300);
/// Beyond the drain time, what stopping the old engine may take (one step).
const STOP_SLACK: Duration = Duration::from_secs(10);

/// Where the model comes from.
#[derive(Debug, Clone)]
pub struct ModelSource {
    /// What to serve: `name@version`, or `name:channel` to follow.
    pub reference: ModelRef,
    /// The stores, in priority order (local region first).
    pub stores: Vec<ModelStore>,
    /// The cache directory and the pull's limits. `prefer_cache` is set
    /// per use: a start prefers the cache's last resolution of a channel
    /// (no network before ready), a check never does.
    pub pull: PullOptions,
}

/// Who may call `POST /admin/models/reload`.
#[derive(Clone, Default)]
pub enum ReloadAuth {
    /// Callers on the loopback interface only (no token configured).
    #[default]
    LoopbackOnly,
    /// Any caller with `Authorization: Bearer <token>`.
    Token(String),
}

impl std::fmt::Debug for ReloadAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadAuth::LoopbackOnly => f.write_str("LoopbackOnly"),
            ReloadAuth::Token(_) => f.write_str("Token(…)"),
        }
    }
}

/// How versions are loaded and old ones retired.
#[derive(Debug, Clone)]
pub struct SwapOptions {
    /// Where a version runs.
    pub backend: BackendOptions,
    /// Its engine's limits.
    pub engine: EngineConfig,
    /// How long requests running on a replaced version get to finish
    /// before its engine is stopped (and they end with an error).
    pub drain: Duration,
    /// How long loading and warming a version may take.
    pub load_deadline: Duration,
    /// Who may trigger a check over HTTP.
    pub auth: ReloadAuth,
}

/// Why a version could not be served.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    /// No store served it whole (unreachable, missing, or corrupt).
    #[error(transparent)]
    Pull(#[from] ModelError),
    /// Its files did not load, or its engine did not start.
    #[error("loading {reference}: {source}")]
    Load {
        /// `name@version`.
        reference: String,
        /// Why.
        #[source]
        source: LoadError,
    },
    /// A GGUF version must hold exactly one `.gguf` file.
    #[error("{reference} holds {count} .gguf files; a GGUF version must hold one")]
    Layout {
        /// `name@version`.
        reference: String,
        /// How many it holds.
        count: usize,
    },
    /// Loading took longer than [`SwapOptions::load_deadline`].
    #[error("loading {reference} did not finish within {seconds} s")]
    LoadDeadline {
        /// `name@version`.
        reference: String,
        /// The deadline.
        seconds: u64,
    },
    /// The loading task panicked.
    #[error("loading {reference}: the loading task failed: {detail}")]
    Task {
        /// `name@version`.
        reference: String,
        /// The panic.
        detail: String,
    },
}

/// What started a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The channel watcher's timer (or the check right after start).
    Poll,
    /// `POST /admin/models/reload`.
    Reload,
}

/// What a check did; the body of `POST /admin/models/reload`'s answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum SwapOutcome {
    /// The reference names the version serving.
    Unchanged {
        /// The version serving.
        version: String,
    },
    /// Another version was pulled, loaded and now serves.
    Swapped {
        /// The version it replaced.
        from: Option<String>,
        /// The version serving now.
        to: String,
        /// Pull and load time.
        seconds: f64,
    },
    /// The version the reference names could not be pulled or loaded; the
    /// serving one stays.
    Refused {
        /// The version refused.
        version: String,
        /// The version still serving.
        serving: Option<String>,
        /// `pull` or `load`.
        stage: &'static str,
        /// Why.
        reason: String,
    },
    /// No store could say which version the reference names; the serving
    /// one stays.
    Unavailable {
        /// The version still serving.
        serving: Option<String>,
        /// Every store's reason.
        reason: String,
    },
}

impl SwapOutcome {
    fn status(&self) -> StatusCode {
        match self {
            SwapOutcome::Unchanged { .. } | SwapOutcome::Swapped { .. } => StatusCode::OK,
            SwapOutcome::Refused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            SwapOutcome::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Follows a stored model's reference and swaps the serving version.
#[derive(Debug)]
pub struct Swapper {
    source: ModelSource,
    options: SwapOptions,
    state: tokio::sync::Mutex<SwapState>,
}

#[derive(Debug, Default)]
struct SwapState {
    /// The last version refused, why, and when.
    refused: Option<(String, String, Instant)>,
    /// The previous swap's old engine, draining.
    draining: Option<JoinHandle<()>>,
}

impl Swapper {
    /// A swapper for `source`, loading versions as `options` says.
    pub fn new(source: ModelSource, options: SwapOptions) -> Arc<Self> {
        Arc::new(Self {
            source,
            options,
            state: tokio::sync::Mutex::new(SwapState::default()),
        })
    }

    /// The reference followed.
    pub fn reference(&self) -> &ModelRef {
        &self.source.reference
    }

    /// Pulls (a version in the cache, and a channel's last resolution
    /// there, need no network), loads and serves the first version. On
    /// failure nothing serves and the error says why.
    pub async fn start(&self, app: &AppState) -> Result<ModelVersion, SwapError> {
        let mut state = self.state.lock().await;
        let options = PullOptions {
            prefer_cache: true,
            ..self.source.pull.clone()
        };
        let pulled = pull(&self.source.stores, &self.source.reference, &options).await?;
        let served = self.load(app, &pulled).await?;
        let version = self.version_of(&pulled);
        if let Some(old) = app.replace_model(Arc::new(served)) {
            state.draining = Some(tokio::spawn(drain(old, self.options.drain)));
        }
        tracing::info!(
            reference = %self.source.reference,
            version = %version.version,
            source = %pulled.source,
            dir = %pulled.dir.display(),
            "serving {}@{}", version.name, version.version
        );
        Ok(version)
    }

    /// Checks the reference once and swaps to the version it names if that
    /// is not the one serving (see the module docs).
    pub async fn check(&self, app: &AppState, trigger: Trigger) -> SwapOutcome {
        let mut state = self.state.lock().await;
        let outcome = self.check_locked(app, trigger, &mut state).await;
        match &outcome {
            SwapOutcome::Unchanged { version } => {
                tracing::debug!(reference = %self.source.reference, version, "model unchanged");
            }
            SwapOutcome::Swapped { from, to, seconds } => {
                app.swaps.count("swapped");
                tracing::info!(
                    reference = %self.source.reference,
                    from = from.as_deref().unwrap_or("-"),
                    to,
                    seconds,
                    "model swapped: {} now serves {to}",
                    self.source.reference.name
                );
            }
            SwapOutcome::Refused { .. } | SwapOutcome::Unavailable { .. } => {}
        }
        outcome
    }

    async fn check_locked(
        &self,
        app: &AppState,
        trigger: Trigger,
        state: &mut SwapState,
    ) -> SwapOutcome {
        let reference = &self.source.reference;
        let serving = app
            .model()
            .and_then(|m| m.version().map(|v| v.version.clone()));
        let deadline = self.source.pull.deadline;
        let resolved =
            tokio::time::timeout(deadline, resolve(&self.source.stores, reference)).await;
        let version = match resolved {
            Ok(Ok(version)) => version,
            Ok(Err(e)) => return self.unavailable(app, serving, e.to_string()),
            Err(_) => {
                let reason = format!(
                    "resolving {reference} did not finish within {} s",
                    deadline.as_secs()
                );
                return self.unavailable(app, serving, reason);
            }
        };
        if serving.as_ref() == Some(&version) {
            return SwapOutcome::Unchanged { version };
        }
        if trigger == Trigger::Poll
            && let Some((refused, reason, when)) = &state.refused
            && *refused == version
            && when.elapsed() < REFUSED_BACKOFF
        {
            // Said and counted when it was refused.
            return SwapOutcome::Refused {
                version,
                serving,
                stage: "earlier",
                reason: reason.clone(),
            };
        }

        // At most two models in memory: the previous swap's old engine
        // goes first (its drain is bounded).
        if let Some(draining) = state.draining.take() {
            let limit = self.options.drain + STOP_SLACK;
            if tokio::time::timeout(limit, draining).await.is_err() {
                tracing::warn!("the previous version did not stop within {limit:?}");
            }
        }

        let started = Instant::now();
        // The reference itself, not `name@version`: a channel's resolution
        // is recorded in the cache, for the next start.
        let options = PullOptions {
            prefer_cache: false,
            ..self.source.pull.clone()
        };
        let pulled = match pull(&self.source.stores, reference, &options).await {
            Ok(pulled) => pulled,
            Err(e) => return self.refuse(app, state, version, serving, "pull", &e),
        };
        let version = pulled.manifest.version.clone();
        if serving.as_ref() == Some(&version) {
            // The channel moved back while we looked.
            return SwapOutcome::Unchanged { version };
        }
        let served = match self.load(app, &pulled).await {
            Ok(served) => served,
            Err(e) => return self.refuse(app, state, version, serving, "load", &e),
        };
        let old = app.replace_model(Arc::new(served));
        state.refused = None;
        if let Some(old) = old {
            state.draining = Some(tokio::spawn(drain(old, self.options.drain)));
        }
        SwapOutcome::Swapped {
            from: serving,
            to: version,
            seconds: started.elapsed().as_secs_f64(),
        }
    }

    fn unavailable(&self, app: &AppState, serving: Option<String>, reason: String) -> SwapOutcome {
        app.swaps.count("unavailable");
        tracing::warn!(
            reference = %self.source.reference,
            serving = serving.as_deref().unwrap_or("-"),
            "model check: no store answered; keeping the serving version: {reason}"
        );
        SwapOutcome::Unavailable { serving, reason }
    }

    fn refuse(
        &self,
        app: &AppState,
        state: &mut SwapState,
        version: String,
        serving: Option<String>,
        stage: &'static str,
        error: &dyn std::fmt::Display,
    ) -> SwapOutcome {
        let reason = error.to_string();
        app.swaps.count(match stage {
            "pull" => "pull_failed",
            _ => "load_failed",
        });
        tracing::error!(
            reference = %self.source.reference,
            version,
            serving = serving.as_deref().unwrap_or("-"),
            stage,
            "refusing model version {}@{version}; the serving version stays: {reason}",
            self.source.reference.name
        );
        state.refused = Some((version.clone(), reason.clone(), Instant::now()));
        SwapOutcome::Refused {
            version,
            serving,
            stage,
            reason,
        }
    }

    fn version_of(&self, pulled: &PulledModel) -> ModelVersion {
        ModelVersion {
            name: pulled.manifest.name.clone(),
            version: pulled.manifest.version.clone(),
            reference: self.source.reference.to_string(),
        }
    }

    /// Loads and warms `pulled` on a new engine, off the async workers.
    async fn load(&self, app: &AppState, pulled: &PulledModel) -> Result<Served, SwapError> {
        let reference = pulled.manifest.reference();
        let path = model_path(pulled)?;
        let version = self.version_of(pulled);
        let backend = self.options.backend;
        let engine = self.options.engine.clone();
        let telemetry = app.telemetry().clone();
        let task = tokio::task::spawn_blocking(move || -> Result<Served, LoadError> {
            let loaded = crate::loader::load(&path)?;
            Ok(Served::from_loaded(loaded, backend, engine, telemetry)?.with_version(version))
        });
        let limit = self.options.load_deadline;
        match tokio::time::timeout(limit, task).await {
            // The blocking load cannot be interrupted: it finishes on its
            // thread and is dropped there.
            Err(_) => Err(SwapError::LoadDeadline {
                reference,
                seconds: limit.as_secs(),
            }),
            Ok(Err(e)) => Err(SwapError::Task {
                reference,
                detail: e.to_string(),
            }),
            Ok(Ok(Err(source))) => Err(SwapError::Load { reference, source }),
            Ok(Ok(Ok(served))) => Ok(served),
        }
    }

    /// Follows the reference: one check right away (a start may have used
    /// the cache's last resolution of a channel), then one every
    /// `interval` when given. A fixed version never moves: nothing to do.
    pub fn follow(
        self: &Arc<Self>,
        app: Arc<AppState>,
        interval: Option<Duration>,
    ) -> Option<JoinHandle<()>> {
        if matches!(self.source.reference.selector, Selector::Version(_)) {
            return None;
        }
        let swapper = Arc::clone(self);
        Some(tokio::spawn(async move {
            swapper.check(&app, Trigger::Poll).await;
            let Some(interval) = interval.filter(|i| !i.is_zero()) else {
                return;
            };
            let mut ticks =
                tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            // A check that took longer than the interval is not followed by
            // a burst of them.
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                swapper.check(&app, Trigger::Poll).await;
            }
        }))
    }
}

/// The path to load: the one `.gguf` file of a GGUF version, else the
/// version's directory (a Hugging Face layout).
fn model_path(pulled: &PulledModel) -> Result<PathBuf, SwapError> {
    if pulled.manifest.format != "gguf" {
        return Ok(pulled.dir.clone());
    }
    let ggufs: Vec<_> = pulled
        .manifest
        .files
        .iter()
        .filter(|f| f.path.ends_with(".gguf"))
        .collect();
    match ggufs.as_slice() {
        [one] => Ok(pulled.file(&one.path)),
        _ => Err(SwapError::Layout {
            reference: pulled.manifest.reference(),
            count: ggufs.len(),
        }),
    }
}

/// Waits (up to `limit`) for the requests still holding `old` to finish,
/// then stops its engine, ending whatever still runs on it.
async fn drain(old: Arc<Served>, limit: Duration) {
    // Streams an edge can continue move to the new version's hosts now.
    old.hand_off_streams();
    let started = tokio::time::Instant::now();
    while Arc::strong_count(&old) > 1 && started.elapsed() < limit {
        tokio::time::sleep(DRAIN_POLL).await;
    }
    let left = Arc::strong_count(&old) - 1;
    let version = old
        .version()
        .map_or_else(|| "-".to_owned(), |v| v.version.clone());
    if left > 0 {
        tracing::warn!(
            version,
            left,
            "drain time ({limit:?}) over: ending the requests still on the old version"
        );
    } else {
        tracing::info!(version, "old version drained; stopping its engine");
    }
    // Stopping joins the engine thread (up to one step): not on an async
    // worker. The requests still holding it see their stream end with an
    // error, and drop the last references.
    let _ = tokio::task::spawn_blocking(move || {
        old.engine.shutdown();
        drop(old);
    })
    .await;
}

/// Installs a process-wide Prometheus recorder, which the model store's
/// counters go to (`breakwater_model_pull_refused_total{reason}`,
/// `breakwater_model_pulls_total{source}`, …), and appends its metrics to
/// `app`'s `/metrics`. For a binary that serves one [`AppState`]; `false`
/// when a recorder was installed already (then those counters go there).
pub fn record_store_metrics(app: &AppState) -> bool {
    match metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder() {
        Ok(handle) => {
            // Shown at 0 before the first refusal, so that alerts and
            // dashboards find the series.
            for reason in ["sha256", "size"] {
                metrics::counter!("breakwater_model_pull_refused_total", "reason" => reason)
                    .increment(0);
            }
            app.set_process_metrics(handle);
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "no process-wide metrics recorder; the model store's counters are not on /metrics");
            false
        }
    }
}

/// `breakwater_model_swaps_total{outcome}` and
/// `breakwater_model_serving_info`, rendered with the server's metrics.
#[derive(Debug, Default)]
pub struct SwapMetrics {
    swapped: AtomicU64,
    pull_failed: AtomicU64,
    load_failed: AtomicU64,
    unavailable: AtomicU64,
}

impl SwapMetrics {
    fn counter(&self, outcome: &str) -> Option<&AtomicU64> {
        match outcome {
            "swapped" => Some(&self.swapped),
            "pull_failed" => Some(&self.pull_failed),
            "load_failed" => Some(&self.load_failed),
            "unavailable" => Some(&self.unavailable),
            _ => None,
        }
    }

    fn count(&self, outcome: &str) {
        if let Some(c) = self.counter(outcome) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Appends the metrics in Prometheus' text format: the counters only
    /// when a swapper is configured, the info when a stored version serves.
    pub(super) fn render(&self, swapping: bool, serving: Option<&ModelVersion>, out: &mut String) {
        use std::fmt::Write;
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        if swapping {
            out.push_str(
                "# HELP breakwater_model_swaps_total Model version checks that tried to swap, by \
                 outcome (swapped, pull_failed, load_failed, unavailable).\n\
                 # TYPE breakwater_model_swaps_total counter\n",
            );
            for outcome in ["swapped", "pull_failed", "load_failed", "unavailable"] {
                let n = self
                    .counter(outcome)
                    .map_or(0, |c| c.load(Ordering::Relaxed));
                let _ = writeln!(
                    out,
                    "breakwater_model_swaps_total{{outcome=\"{outcome}\"}} {n}"
                );
            }
        }
        if let Some(v) = serving {
            out.push_str(
                "# HELP breakwater_model_serving_info The stored model version serving (always 1).\n\
                 # TYPE breakwater_model_serving_info gauge\n",
            );
            let _ = writeln!(
                out,
                "breakwater_model_serving_info{{model=\"{}\",version=\"{}\",reference=\"{}\"}} 1",
                escape(&v.name),
                escape(&v.version),
                escape(&v.reference)
            );
        }
    }
}

/// A Prometheus label value.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn error_body(status: StatusCode, code: &'static str, message: String) -> Response {
    (
        status,
        axum::Json(json!({"error": {
            "message": message,
            "type": "admin_error",
            "param": null,
            "code": code,
        }})),
    )
        .into_response()
}

/// Why a caller may not reload: the status, a code and a message.
type Refusal = (StatusCode, &'static str, &'static str);

impl ReloadAuth {
    /// `Ok` when the caller may reload, else why not.
    fn admit(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> Result<(), Refusal> {
        match self {
            ReloadAuth::LoopbackOnly if peer.is_some_and(|p| p.ip().is_loopback()) => Ok(()),
            ReloadAuth::LoopbackOnly => Err((
                StatusCode::FORBIDDEN,
                "forbidden",
                "model reload is open to loopback callers only; start the host with \
                 --admin-token to allow others",
            )),
            ReloadAuth::Token(token) => {
                let given = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .unwrap_or("");
                if constant_time_eq(given.as_bytes(), token.as_bytes()) {
                    Ok(())
                } else {
                    Err((
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "model reload needs `Authorization: Bearer <admin token>`",
                    ))
                }
            }
        }
    }
}

/// Compares without stopping at the first difference, so that the time
/// taken says nothing about how much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `POST /admin/models/reload`: checks the reference now and answers what
/// happened (a [`SwapOutcome`]). The check runs as its own task, so a
/// caller that goes away does not cut a swap off halfway.
pub(super) async fn reload(State(app): State<Arc<AppState>>, request: Request) -> Response {
    let Some(swapper) = app.swapper.get().cloned() else {
        return error_body(
            StatusCode::CONFLICT,
            "no_model_store",
            "this host serves a model file; start it with --model-ref and --store to reload \
             versions"
                .to_owned(),
        );
    };
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    if let Err((status, code, message)) = swapper.options.auth.admit(peer, request.headers()) {
        return error_body(status, code, message.to_owned());
    }
    // Each step of a check has its own deadline; this bounds the wait for
    // the answer should they all run long.
    let limit = swapper.source.pull.deadline * 2
        + swapper.options.load_deadline
        + swapper.options.drain
        + STOP_SLACK;
    let task = {
        let app = Arc::clone(&app);
        let swapper = Arc::clone(&swapper);
        tokio::spawn(async move { swapper.check(&app, Trigger::Reload).await })
    };
    match tokio::time::timeout(limit, task).await {
        Ok(Ok(outcome)) => (outcome.status(), axum::Json(outcome)).into_response(),
        Ok(Err(e)) => error_body(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            format!("the model check failed: {e}"),
        ),
        Err(_) => error_body(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!(
                "the model check did not finish within {} s; it goes on",
                limit.as_secs()
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn loopback_only_unless_a_token_is_set() {
        let headers = HeaderMap::new();
        let local: SocketAddr = ([127, 0, 0, 1], 1).into();
        let remote: SocketAddr = ([10, 0, 0, 1], 1).into();
        let open = ReloadAuth::LoopbackOnly;
        assert!(open.admit(Some(local), &headers).is_ok());
        assert!(open.admit(Some(remote), &headers).is_err());
        assert!(open.admit(None, &headers).is_err());
        let token = ReloadAuth::Token("t0k".into());
        assert!(token.admit(Some(local), &headers).is_err());
        let mut with = HeaderMap::new();
        with.insert(header::AUTHORIZATION, "Bearer t0k".parse().expect("header"));
        assert!(token.admit(Some(remote), &with).is_ok());
    }

    #[test]
    fn metrics_render() {
        let metrics = SwapMetrics::default();
        metrics.count("swapped");
        metrics.count("pull_failed");
        let mut text = String::from("x 1");
        let v = ModelVersion {
            name: "m".into(),
            version: "2".into(),
            reference: "m:stable".into(),
        };
        metrics.render(true, Some(&v), &mut text);
        assert!(text.contains("\nbreakwater_model_swaps_total{outcome=\"swapped\"} 1\n"));
        assert!(text.contains("breakwater_model_swaps_total{outcome=\"load_failed\"} 0\n"));
        assert!(text.contains(
            "breakwater_model_serving_info{model=\"m\",version=\"2\",reference=\"m:stable\"} 1\n"
        ));
        let mut none = String::new();
        metrics.render(false, None, &mut none);
        assert!(none.is_empty());
    }

    #[test]
    fn outcomes_serialize_with_their_result() {
        let swapped = SwapOutcome::Swapped {
            from: Some("1".into()),
            to: "2".into(),
            seconds: 0.5,
        };
        let value = serde_json::to_value(&swapped).expect("json");
        assert_eq!(value["result"], "swapped");
        assert_eq!(value["to"], "2");
        assert_eq!(swapped.status(), StatusCode::OK);
        let refused = SwapOutcome::Refused {
            version: "3".into(),
            serving: Some("2".into()),
            stage: "pull",
            reason: "corrupt".into(),
        };
        assert_eq!(
            serde_json::to_value(&refused).expect("json")["result"],
            "refused"
        );
        assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    }
}
