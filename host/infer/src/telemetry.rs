//! The runtime's Prometheus metrics.
//!
//! Each [`Telemetry`] owns its own recorder instead of installing a global
//! one: several servers (tests run many in one process) then keep separate
//! numbers, and the binary that embeds this crate stays free to install its
//! own global recorder for other components.

use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

const PREFIX: &str = "breakwater_infer_";
const METADATA: Metadata<'static> = Metadata::new("breakwater_infer", Level::INFO, None);

/// Why a request was turned away before it reached the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The waiting queue was full.
    QueueFull,
    /// The prompt does not fit the context or the KV budget.
    PromptTooLong,
    /// The prompt has more bytes than the context could hold, refused
    /// before tokenizing it.
    PromptTooLarge,
    /// Malformed JSON or parameters.
    BadRequest,
    /// No such model here.
    UnknownModel,
    /// The request's deadline passed before it was served.
    Deadline,
    /// The model is still loading, or the engine is stopping.
    NotReady,
}

impl Rejection {
    const ALL: [Rejection; 7] = [
        Rejection::QueueFull,
        Rejection::PromptTooLong,
        Rejection::PromptTooLarge,
        Rejection::BadRequest,
        Rejection::UnknownModel,
        Rejection::Deadline,
        Rejection::NotReady,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::QueueFull => "queue_full",
            Rejection::PromptTooLong => "prompt_too_long",
            Rejection::PromptTooLarge => "prompt_too_large",
            Rejection::BadRequest => "bad_request",
            Rejection::UnknownModel => "unknown_model",
            Rejection::Deadline => "deadline",
            Rejection::NotReady => "not_ready",
        }
    }
}

/// How a sequence left the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// EOS or a stop sequence.
    Stop,
    /// `max_tokens`.
    Length,
    /// The client went away.
    Cancelled,
    /// Its deadline passed while waiting or running.
    Deadline,
    /// The engine failed or stopped.
    Error,
}

impl Outcome {
    const ALL: [Outcome; 5] = [
        Outcome::Stop,
        Outcome::Length,
        Outcome::Cancelled,
        Outcome::Deadline,
        Outcome::Error,
    ];

    fn label(self) -> &'static str {
        match self {
            Outcome::Stop => "stop",
            Outcome::Length => "length",
            Outcome::Cancelled => "cancelled",
            Outcome::Deadline => "deadline",
            Outcome::Error => "error",
        }
    }
}

/// Handles to every metric, cheap to clone.
#[derive(Clone)]
pub struct Telemetry(Arc<Inner>);

struct Inner {
    handle: PrometheusHandle,
    queue_depth: Gauge,
    running: Gauge,
    kv_blocks_used: Gauge,
    kv_blocks_free: Gauge,
    batch_size: Histogram,
    step_tokens: Histogram,
    ttft: Histogram,
    queue_wait: Histogram,
    inter_token: Histogram,
    generated_tokens: Counter,
    prompt_tokens: Counter,
    prefix_queried_tokens: Counter,
    prefix_hit_tokens: Counter,
    prefix_cached_blocks: Gauge,
    prefix_evictions: Counter,
    tokenized_bytes: Counter,
    device_memory_used: Gauge,
    device_memory_free: Gauge,
    device_step: Histogram,
    rejections: Vec<(Rejection, Counter)>,
    finished: Vec<(Outcome, Counter)>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Telemetry")
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    /// A fresh set of metrics.
    pub fn new() -> Self {
        let latency = [
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        let sizes = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(name("batch_size")), &sizes))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(name("step_tokens")), &sizes));
        // Only empty bucket lists fail, and these are constants.
        let recorder: PrometheusRecorder = builder.unwrap_or_default().build_recorder();
        let r = &recorder;
        let gauge = |n: &str, unit, help: &'static str| {
            r.describe_gauge(KeyName::from(name(n)), Some(unit), help.into());
            r.register_gauge(&Key::from_name(name(n)), &METADATA)
        };
        let histogram = |n: &str, unit, help: &'static str| {
            r.describe_histogram(KeyName::from(name(n)), Some(unit), help.into());
            r.register_histogram(&Key::from_name(name(n)), &METADATA)
        };
        let counter = |n: &str, help: &'static str| {
            r.describe_counter(KeyName::from(name(n)), Some(Unit::Count), help.into());
        };
        let labelled = |n: &str, reason: &'static str| {
            let key = Key::from_parts(name(n), vec![Label::new("reason", reason)]);
            r.register_counter(&key, &METADATA)
        };
        counter(
            "rejections_total",
            "Requests turned away before reaching the model, by reason.",
        );
        counter(
            "sequences_finished_total",
            "Sequences that left the engine, by reason.",
        );
        counter("generated_tokens_total", "Tokens generated.");
        counter(
            "prompt_tokens_total",
            "Prompt tokens prefilled (computed; those taken from the prefix cache are not).",
        );
        counter(
            "prefix_cache_queried_tokens_total",
            "Prompt tokens of admitted sequences, looked up in the prefix cache.",
        );
        counter(
            "prefix_cache_hit_tokens_total",
            "Prompt tokens whose keys and values came from the prefix cache; over queried tokens, the hit rate.",
        );
        counter(
            "prefix_cache_evictions_total",
            "Idle cached KV blocks dropped from the prefix cache to make room.",
        );
        counter(
            "tokenized_bytes_total",
            "Prompt bytes the tokenizer read (the CPU spent before the engine).",
        );
        let inner = Inner {
            queue_depth: gauge(
                "queue_depth",
                Unit::Count,
                "Sequences waiting for admission.",
            ),
            running: gauge(
                "running_sequences",
                Unit::Count,
                "Sequences in the running batch.",
            ),
            kv_blocks_used: gauge("kv_blocks_used", Unit::Count, "KV cache blocks reserved."),
            kv_blocks_free: gauge("kv_blocks_free", Unit::Count, "KV cache blocks free."),
            batch_size: histogram("batch_size", Unit::Count, "Sequences fed per engine step."),
            step_tokens: histogram(
                "step_tokens",
                Unit::Count,
                "Tokens fed per engine step (decodes plus prefill chunks).",
            ),
            ttft: histogram(
                "time_to_first_token_seconds",
                Unit::Seconds,
                "From submission to the first generated token.",
            ),
            queue_wait: histogram(
                "queue_wait_seconds",
                Unit::Seconds,
                "From submission to admission into the running batch: the leading sign of too few GPU hosts.",
            ),
            inter_token: histogram(
                "inter_token_latency_seconds",
                Unit::Seconds,
                "Between consecutive tokens of a sequence.",
            ),
            device_memory_used: gauge(
                "device_memory_used_bytes",
                Unit::Bytes,
                "GPU memory in use, every process included (GPU backends only).",
            ),
            device_memory_free: gauge(
                "device_memory_free_bytes",
                Unit::Bytes,
                "GPU memory free (GPU backends only).",
            ),
            device_step: histogram(
                "device_step_seconds",
                Unit::Seconds,
                "Time an engine step's kernels took on the GPU, timed by device events.",
            ),
            generated_tokens: r
                .register_counter(&Key::from_name(name("generated_tokens_total")), &METADATA),
            prompt_tokens: r
                .register_counter(&Key::from_name(name("prompt_tokens_total")), &METADATA),
            prefix_queried_tokens: r.register_counter(
                &Key::from_name(name("prefix_cache_queried_tokens_total")),
                &METADATA,
            ),
            prefix_hit_tokens: r.register_counter(
                &Key::from_name(name("prefix_cache_hit_tokens_total")),
                &METADATA,
            ),
            prefix_evictions: r.register_counter(
                &Key::from_name(name("prefix_cache_evictions_total")),
                &METADATA,
            ),
            prefix_cached_blocks: gauge(
                "prefix_cache_blocks",
                Unit::Count,
                "KV blocks in the prefix cache, in use or idle.",
            ),
            tokenized_bytes: r
                .register_counter(&Key::from_name(name("tokenized_bytes_total")), &METADATA),
            rejections: Rejection::ALL
                .iter()
                .map(|&x| (x, labelled("rejections_total", x.label())))
                .collect(),
            finished: Outcome::ALL
                .iter()
                .map(|&x| (x, labelled("sequences_finished_total", x.label())))
                .collect(),
            handle: recorder.handle(),
        };
        Self(Arc::new(inner))
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        self.0.handle.run_upkeep();
        self.0.handle.render()
    }

    pub(crate) fn queue(&self, waiting: usize, running: usize) {
        self.0.queue_depth.set(waiting as f64);
        self.0.running.set(running as f64);
    }

    pub(crate) fn kv(&self, used: usize, free: usize) {
        self.0.kv_blocks_used.set(used as f64);
        self.0.kv_blocks_free.set(free as f64);
    }

    pub(crate) fn prefix_lookup(&self, prompt_tokens: usize, hit_tokens: usize) {
        self.0.prefix_queried_tokens.increment(prompt_tokens as u64);
        self.0.prefix_hit_tokens.increment(hit_tokens as u64);
    }

    pub(crate) fn prefix_cache(&self, blocks: usize, new_evictions: u64) {
        self.0.prefix_cached_blocks.set(blocks as f64);
        self.0.prefix_evictions.increment(new_evictions);
    }

    pub(crate) fn step(&self, sequences: usize, tokens: usize) {
        self.0.batch_size.record(sequences as f64);
        self.0.step_tokens.record(tokens as f64);
    }

    pub(crate) fn device(&self, stats: &crate::backend::DeviceStats) {
        self.0
            .device_memory_used
            .set(stats.memory_used_bytes as f64);
        self.0
            .device_memory_free
            .set(stats.memory_free_bytes as f64);
        self.0.device_step.record(stats.last_step_seconds);
    }

    pub(crate) fn admitted(&self, waited: f64) {
        self.0.queue_wait.record(waited);
    }

    pub(crate) fn first_token(&self, seconds: f64) {
        self.0.ttft.record(seconds);
    }

    pub(crate) fn next_token(&self, seconds: f64) {
        self.0.inter_token.record(seconds);
    }

    pub(crate) fn generated(&self, tokens: u64) {
        self.0.generated_tokens.increment(tokens);
    }

    pub(crate) fn prefilled(&self, tokens: u64) {
        self.0.prompt_tokens.increment(tokens);
    }

    pub(crate) fn tokenized(&self, bytes: usize) {
        self.0
            .tokenized_bytes
            .increment(u64::try_from(bytes).unwrap_or(u64::MAX));
    }

    /// Counts a request turned away.
    pub fn rejected(&self, why: Rejection) {
        if let Some((_, c)) = self.0.rejections.iter().find(|(r, _)| *r == why) {
            c.increment(1);
        }
    }

    pub(crate) fn finished(&self, how: Outcome) {
        if let Some((_, c)) = self.0.finished.iter().find(|(o, _)| *o == how) {
            c.increment(1);
        }
    }
}

fn name(n: &str) -> String {
    format!("{PREFIX}{n}")
}
