//! Continuous batching: one engine thread runs the model for every sequence
//! in flight, a step at a time.
//!
//! Each step the engine
//!
//! 1. drops sequences whose client went away (their receiver is closed) or
//!    whose deadline passed, returning their KV blocks;
//! 2. admits waiting sequences, first come first served, while the running
//!    batch has room and the KV pool has their blocks (see [`kv`]); a
//!    sequence whose prompt starts with full blocks already cached takes
//!    them and prefills only the rest;
//! 3. feeds one batched [`Runner::forward`] pass: one token for every decoding
//!    sequence first, then prompt chunks for prefilling sequences up to
//!    [`EngineConfig::step_tokens`] in all, so a long prompt is spread over
//!    several steps instead of stalling the decodes;
//! 4. samples each sequence whose logits are ready and streams the text out
//!    through the sequence's bounded channel.
//!
//! The engine is a plain thread, not a task: a step is tens of milliseconds
//! of CPU work that would starve an async runtime's workers. It talks to the
//! async side only through the waiting queue (a mutex and condvar, bounded)
//! and through tokio's bounded channels, whose `try_send` and `is_closed`
//! never block it. A sequence whose channel is full (a slow reader) is simply
//! skipped for that step, so one slow client never stalls the batch.

pub mod kv;
pub mod text;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use self::kv::{BlockId, BlockPool, Chain};
use self::text::{Detokenizer, StopMatcher, Stopped};
use crate::backend::{Runner, Sequence};
use crate::model::{ModelError, Step};
use crate::sampling::{Sampler, SamplingParams};
use crate::telemetry::{Outcome, Telemetry};
use crate::tokenizer::Tokenizer;

/// How long an idle engine sleeps before looking at the queue again, in
/// case a wake-up was missed; submissions wake it at once.
const IDLE_WAIT: Duration = Duration::from_millis(100);
/// How long the engine waits when every running sequence is blocked on a
/// slow reader.
const BLOCKED_WAIT: Duration = Duration::from_millis(2);
/// Completions remembered for the drain rate, and over how long.
const DRAIN_WINDOW: Duration = Duration::from_secs(60);
const DRAIN_SAMPLES: usize = 1024;
/// Retry-After bounds, and the guess when nothing finished lately.
const RETRY_AFTER_MIN: Duration = Duration::from_secs(1);
const RETRY_AFTER_MAX: Duration = Duration::from_secs(120);
const RETRY_AFTER_UNKNOWN: Duration = Duration::from_secs(5);
/// Prompt tokens a step feeds at least when a prompt is waiting.
const MIN_PREFILL_CHUNK: usize = 16;
/// Events a sequence may send in one step: a text delta and its finish.
const EVENTS_PER_STEP: usize = 2;

/// The engine's limits.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences in the running batch at most.
    pub max_batch: usize,
    /// Sequences waiting for admission at most; more are rejected.
    pub queue_capacity: usize,
    /// Memory for KV caches, in bytes.
    pub kv_budget_bytes: usize,
    /// Tokens per KV block.
    pub block_tokens: usize,
    /// Tokens fed per step at most (decodes first, then prompt chunks).
    pub step_tokens: usize,
    /// Events buffered per request before the sequence waits for its reader.
    pub stream_buffer: usize,
    /// Share the KV blocks of common prompt prefixes between sequences
    /// ([`kv`]).
    pub prefix_cache: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 16,
            queue_capacity: 64,
            kv_budget_bytes: 512 << 20,
            block_tokens: 16,
            step_tokens: 256,
            stream_buffer: 16,
            prefix_cache: true,
        }
    }
}

/// One generation to run.
#[derive(Debug, Clone, Default)]
pub struct GenerationRequest {
    /// The prompt's token ids.
    pub prompt: Vec<u32>,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// Text at which generation stops (not included in the output).
    pub stop: Vec<String>,
    /// When the request is no longer worth serving.
    pub deadline: Option<Instant>,
    /// Generate through end-of-sequence tokens, up to `max_tokens` (for
    /// benchmarks and tests that need a known length).
    pub ignore_eos: bool,
    /// A continuation: the last `resumed` tokens of `prompt` were generated
    /// for this answer elsewhere (a GPU host that died mid-answer). They
    /// are fed as prompt, but they prime the text decoder, the stop
    /// sequences and the sampler's random sequence as if this engine had
    /// generated them, and they count as completion tokens; `max_tokens`
    /// is what is left to generate.
    pub resumed: usize,
    /// Report the token ids each [`Event::Text`] covers, even when a token
    /// completes no text yet (for an edge that may need to resume).
    pub token_ids: bool,
}

/// What a request's receiver gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// More generated text, and the ids of the tokens it completes (only
    /// when the request asked for [`GenerationRequest::token_ids`]; then
    /// `text` may be empty while a character or a possible stop sequence
    /// is held back).
    Text {
        /// The text.
        text: String,
        /// The generated tokens this event accounts for, in order.
        tokens: Vec<u32>,
    },
    /// Generation ended normally; nothing follows.
    Done(Finish),
    /// Generation ended abnormally; nothing follows.
    Failed(Failure),
}

/// How a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finish {
    /// Why.
    pub reason: FinishReason,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Of those, the ones whose keys and values came from the prefix
    /// cache instead of being computed (OpenAI's `cached_tokens`).
    pub cached_tokens: usize,
    /// Tokens generated (an end-of-sequence token not counted).
    pub completion_tokens: usize,
    /// When its phases began: for traces.
    pub timings: Timings,
}

/// When a generation reached each phase: submitted, given a slot (queue
/// wait before), first token sampled (prefill before, decode after).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// Submitted to the engine.
    pub arrived: Instant,
    /// Admitted into the running batch.
    pub admitted: Instant,
    /// The first token sampled; `None` if none was.
    pub first_token: Option<Instant>,
}

/// Why a generation ended normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model's end-of-sequence token or a stop sequence.
    Stop,
    /// `max_tokens`.
    Length,
}

impl FinishReason {
    /// OpenAI's `finish_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Why a generation ended abnormally.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The request's deadline passed.
    #[error("the request's deadline passed before it finished")]
    DeadlineExceeded,
    /// The engine stopped.
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// The forward pass failed.
    #[error("model error: {0}")]
    Model(String),
}

/// Why a request was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The waiting queue is full.
    #[error("the server is at capacity; retry in {}s", retry_after.as_secs())]
    QueueFull {
        /// When trying again is likely to succeed, from the drain rate.
        retry_after: Duration,
    },
    /// Prompt plus `max_tokens` exceed what one sequence may hold.
    #[error("{tokens} tokens (prompt plus max_tokens) exceed the {limit} one sequence may hold")]
    TooLong {
        /// Prompt plus `max_tokens`.
        tokens: usize,
        /// The limit: the context length or the KV budget.
        limit: usize,
    },
    /// Nothing to feed.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// `max_tokens` is 0.
    #[error("max_tokens must be at least 1")]
    NoTokens,
    /// The deadline passed before submission.
    #[error("the request's deadline has already passed")]
    DeadlineExceeded,
    /// The engine is stopping.
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// A resumed token is not one this model could have generated for an
    /// answer: outside the vocabulary (it would fail the whole batch's
    /// step), or a control token (only a template writes those; a stop
    /// token only where `ignore_eos` generates through it).
    #[error("token {token} is not one the model generates as text")]
    NotGenerated {
        /// The first such token.
        token: u32,
    },
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The warm-up forward pass failed.
    #[error("warm-up: {0}")]
    Warmup(#[from] ModelError),
    /// The KV budget does not hold one block.
    #[error("a KV budget of {budget} bytes holds no block of {block} bytes")]
    BudgetTooSmall {
        /// The budget.
        budget: usize,
        /// One block.
        block: usize,
    },
    /// The thread could not be spawned.
    #[error("spawning the engine thread: {0}")]
    Spawn(#[from] std::io::Error),
}

/// A snapshot of the engine's occupancy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Sequences waiting for admission.
    pub waiting: usize,
    /// Sequences in the running batch.
    pub running: usize,
    /// KV blocks reserved.
    pub kv_blocks_used: usize,
    /// KV blocks free (idle cached blocks included: they are reused when
    /// nothing else is free).
    pub kv_blocks_free: usize,
    /// KV blocks in the prefix cache, held or idle.
    pub kv_blocks_cached: usize,
    /// Engine steps run.
    pub steps: u64,
}

/// The running engine; dropping it stops the thread.
#[derive(Debug)]
pub struct Engine {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    max_sequence_tokens: usize,
    kv_blocks_total: usize,
    /// For checking resumed tokens at submission.
    tokenizer: Arc<Tokenizer>,
    stop_tokens: Vec<u32>,
}

#[derive(Debug)]
struct Shared {
    config: EngineConfig,
    queue: Mutex<VecDeque<Pending>>,
    wake: Condvar,
    stop: AtomicBool,
    next_id: AtomicU64,
    stats: Mutex<EngineStats>,
    drain: Mutex<DrainRate>,
    telemetry: Telemetry,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The engine never leaves shared state half-updated across a panic
    // point, so a poisoned lock's data is still consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug)]
struct Pending {
    id: u64,
    request: GenerationRequest,
    tx: mpsc::Sender<Event>,
    arrived: Instant,
}

/// Recent completion times, for Retry-After.
#[derive(Debug, Default)]
struct DrainRate {
    done: VecDeque<Instant>,
}

impl DrainRate {
    fn record(&mut self, now: Instant) {
        if self.done.len() == DRAIN_SAMPLES {
            self.done.pop_front();
        }
        self.done.push_back(now);
    }

    /// How long until `waiting` sequences have drained at the recent rate.
    /// The whole queue, not one slot: every rejected client retries, and
    /// telling them all to come back when one slot frees would bring the
    /// crowd back at once.
    fn retry_after(&mut self, now: Instant, waiting: usize) -> Duration {
        while self
            .done
            .front()
            .is_some_and(|&t| now.duration_since(t) > DRAIN_WINDOW)
        {
            self.done.pop_front();
        }
        let Some(&oldest) = self.done.front() else {
            return RETRY_AFTER_UNKNOWN;
        };
        let span = now.duration_since(oldest).max(Duration::from_secs(1));
        let per_second = self.done.len() as f64 / span.as_secs_f64();
        let seconds = (waiting.max(1) as f64 / per_second).ceil();
        Duration::from_secs_f64(seconds).clamp(RETRY_AFTER_MIN, RETRY_AFTER_MAX)
    }
}

impl Engine {
    /// Sets aside the KV budget on `runner`, warms the model up with one
    /// forward pass and starts the engine thread. `stop_tokens` end a
    /// generation (the model's EOS and the like).
    pub fn start<R: Runner>(
        mut runner: R,
        tokenizer: Arc<Tokenizer>,
        stop_tokens: Vec<u32>,
        config: EngineConfig,
        telemetry: Telemetry,
    ) -> Result<Self, EngineError> {
        let token_bytes = runner.kv_bytes_per_token();
        let mut pool = BlockPool::new(
            token_bytes,
            config.block_tokens,
            config.kv_budget_bytes,
            config.prefix_cache,
        );
        if pool.total() == 0 {
            return Err(EngineError::BudgetTooSmall {
                budget: config.kv_budget_bytes,
                block: BlockPool::block_bytes(token_bytes, pool.block_tokens()),
            });
        }
        runner.reserve_kv(pool.block_tokens(), pool.total())?;
        // The first pass faults the weights in and sizes scratch buffers;
        // doing it before readiness keeps it out of the first client's time.
        let bos = [tokenizer.bos().unwrap_or(0)];
        let warm = pool
            .allocate(&bos, 0, 1)
            .ok_or(ModelError::ContextFull { capacity: 0 })?;
        let fed = runner
            .new_sequence(warm.table.clone(), 0)
            .and_then(|mut seq| {
                runner.forward(&mut [Step {
                    tokens: &bos,
                    state: &mut seq,
                }])
            });
        pool.release(&warm.table);
        fed?;

        let max_sequence_tokens = pool.max_tokens().min(runner.shape().context_length);
        tracing::info!(
            backend = runner.backend_name(),
            kv_blocks = pool.total(),
            block_tokens = pool.block_tokens(),
            prefix_cache = pool.prefix_cache(),
            "inference engine ready"
        );
        let kv_blocks_total = pool.total();
        let shared = Arc::new(Shared {
            config,
            queue: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            stats: Mutex::new(EngineStats {
                kv_blocks_free: kv_blocks_total,
                ..EngineStats::default()
            }),
            drain: Mutex::new(DrainRate::default()),
            telemetry,
        });
        shared.telemetry.kv(0, kv_blocks_total);
        shared.telemetry.queue(0, 0);
        let worker = Worker {
            shared: Arc::clone(&shared),
            runner,
            tokenizer: Arc::clone(&tokenizer),
            stop_tokens: stop_tokens.clone(),
            pool,
            running: Vec::new(),
            steps: 0,
            evictions_counted: 0,
        };
        let thread = std::thread::Builder::new()
            .name("infer-engine".into())
            .spawn(move || worker.run())?;
        Ok(Self {
            shared,
            thread: Mutex::new(Some(thread)),
            max_sequence_tokens,
            kv_blocks_total,
            tokenizer,
            stop_tokens,
        })
    }

    /// Queues a generation; its text arrives on the returned receiver.
    /// Dropping the receiver cancels it.
    pub fn submit(&self, request: GenerationRequest) -> Result<mpsc::Receiver<Event>, SubmitError> {
        if request.prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        if request.max_tokens == 0 {
            return Err(SubmitError::NoTokens);
        }
        if request.resumed >= request.prompt.len() {
            return Err(SubmitError::EmptyPrompt);
        }
        let resumed = &request.prompt[request.prompt.len() - request.resumed..];
        if let Some(&token) = resumed
            .iter()
            .find(|&&id| !self.generates_as_text(id, request.ignore_eos))
        {
            return Err(SubmitError::NotGenerated { token });
        }
        let tokens = request.prompt.len().saturating_add(request.max_tokens);
        if tokens > self.max_sequence_tokens {
            return Err(SubmitError::TooLong {
                tokens,
                limit: self.max_sequence_tokens,
            });
        }
        let now = Instant::now();
        if request.deadline.is_some_and(|d| d <= now) {
            return Err(SubmitError::DeadlineExceeded);
        }
        if self.shared.stop.load(Ordering::Acquire) {
            return Err(SubmitError::ShuttingDown);
        }
        let (tx, rx) = mpsc::channel(self.shared.config.stream_buffer.max(EVENTS_PER_STEP));
        let mut queue = lock(&self.shared.queue);
        if queue.len() >= self.shared.config.queue_capacity {
            let waiting = queue.len();
            drop(queue);
            let retry_after = lock(&self.shared.drain).retry_after(now, waiting);
            return Err(SubmitError::QueueFull { retry_after });
        }
        queue.push_back(Pending {
            id: self.shared.next_id.fetch_add(1, Ordering::Relaxed),
            request,
            tx,
            arrived: now,
        });
        let waiting = queue.len();
        drop(queue);
        lock(&self.shared.stats).waiting = waiting;
        self.shared.wake.notify_one();
        Ok(rx)
    }

    /// Whether `id` may stand among a continuation's resumed tokens.
    fn generates_as_text(&self, id: u32, ignore_eos: bool) -> bool {
        (id as usize) < self.tokenizer.vocab_size()
            && (!self.tokenizer.is_special(id) || ignore_eos && self.stop_tokens.contains(&id))
    }

    /// The occupancy after the last step.
    pub fn stats(&self) -> EngineStats {
        *lock(&self.shared.stats)
    }

    /// The most tokens (prompt plus generated) one sequence may hold: the
    /// model's context or the whole KV budget, whichever is smaller.
    pub fn max_sequence_tokens(&self) -> usize {
        self.max_sequence_tokens
    }

    /// KV blocks in the pool.
    pub fn kv_blocks_total(&self) -> usize {
        self.kv_blocks_total
    }

    /// The engine's limits.
    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    /// Stops the engine: every queued and running sequence fails with
    /// [`Failure::ShuttingDown`]. Returns after the current step.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_all();
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A sequence in the running batch; `S` is the runner's cache.
struct Seq<S> {
    id: u64,
    prompt: Vec<u32>,
    /// Prompt tokens fed so far (those taken from the prefix cache
    /// included).
    fed: usize,
    /// Prompt tokens taken from the prefix cache.
    cached: usize,
    /// Leading prompt positions computed the way a cold prefill computes
    /// them (in chunks of several tokens): only those are shared.
    exact: usize,
    /// The sampled token to feed next, once the prompt is in.
    next: Option<u32>,
    state: S,
    /// Its KV blocks, and how far they are in the prefix index.
    table: Vec<BlockId>,
    chain: Chain,
    max_tokens: usize,
    generated: usize,
    /// Tokens at the end of `prompt` generated elsewhere, for this answer.
    resumed: usize,
    token_ids: bool,
    sampler: Sampler,
    detok: Detokenizer,
    stop: StopMatcher,
    tx: mpsc::Sender<Event>,
    deadline: Option<Instant>,
    ignore_eos: bool,
    arrived: Instant,
    admitted: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
}

impl<S> Seq<S> {
    fn prefilling(&self) -> bool {
        self.fed < self.prompt.len()
    }

    /// Where the prompt proper ends and a continuation's resumed tokens
    /// begin.
    fn prompt_end(&self) -> usize {
        self.prompt.len() - self.resumed
    }

    /// Prompt tokens to feed in a step that has room for `room` more (at
    /// least one): the prompt in chunks, then a continuation's resumed
    /// tokens one a step. Fed alone, as the engine that generated them fed
    /// them, they go through the same arithmetic (a prompt chunk's
    /// attention sums in another order), so the continuation's logits, and
    /// its tokens, are the ones an uninterrupted run gets.
    ///
    /// For the same reason no prompt chunk is a single token unless the
    /// whole prompt is: then every prompt position is computed alike
    /// whatever the prompt was batched with, and a prefix's cached keys and
    /// values are, bit for bit, those a cold prefill computes.
    fn prefill_chunk(&self, room: usize) -> usize {
        let prompt_end = self.prompt_end();
        if self.fed >= prompt_end {
            return (self.prompt.len() - self.fed).min(1);
        }
        let left = prompt_end - self.fed;
        if left <= room {
            return left;
        }
        let take = room.max(2);
        match left - take {
            1 if take > 2 => take - 1,
            1 => take + 1,
            _ => take,
        }
    }

    fn finish(&self, reason: FinishReason) -> Event {
        Event::Done(Finish {
            reason,
            prompt_tokens: self.prompt.len() - self.resumed,
            cached_tokens: self.cached,
            completion_tokens: self.resumed + self.generated,
            timings: Timings {
                arrived: self.arrived,
                admitted: self.admitted,
                first_token: self.first_token,
            },
        })
    }
}

/// What became of a sequence in a step.
enum After {
    Continue,
    Leave(Outcome),
}

struct Worker<R: Runner> {
    shared: Arc<Shared>,
    runner: R,
    tokenizer: Arc<Tokenizer>,
    stop_tokens: Vec<u32>,
    pool: BlockPool,
    /// In admission order, which is also the order prefill is served in.
    running: Vec<Seq<R::Sequence>>,
    steps: u64,
    /// Prefix cache evictions already added to the telemetry's counter.
    evictions_counted: u64,
}

impl<R: Runner> Worker<R> {
    fn run(mut self) {
        tracing::debug!("inference engine started");
        while !self.shared.stop.load(Ordering::Acquire) {
            self.reap();
            self.admit();
            let fed = if self.running.is_empty() {
                0
            } else {
                self.step()
            };
            self.publish();
            if fed == 0 {
                let wait = if self.running.is_empty() {
                    IDLE_WAIT
                } else {
                    BLOCKED_WAIT
                };
                let queue = lock(&self.shared.queue);
                if (queue.is_empty() || !self.running.is_empty())
                    && !self.shared.stop.load(Ordering::Acquire)
                {
                    let _ = self.shared.wake.wait_timeout(queue, wait);
                }
            }
        }
        self.fail_everything(Failure::ShuttingDown);
        self.publish();
        tracing::debug!("inference engine stopped");
    }

    /// Removes cancelled and expired sequences, queued or running.
    fn reap(&mut self) {
        let now = Instant::now();
        let expired = |deadline: Option<Instant>| deadline.is_some_and(|d| now >= d);
        let telemetry = &self.shared.telemetry;
        let pool = &mut self.pool;
        self.running.retain(|s| {
            let outcome = if s.tx.is_closed() {
                Outcome::Cancelled
            } else if expired(s.deadline) {
                let _ = s.tx.try_send(Event::Failed(Failure::DeadlineExceeded));
                Outcome::Deadline
            } else {
                return true;
            };
            tracing::debug!(seq = s.id, ?outcome, "sequence removed");
            pool.release(&s.table);
            telemetry.finished(outcome);
            false
        });
        lock(&self.shared.queue).retain(|p| {
            let outcome = if p.tx.is_closed() {
                Outcome::Cancelled
            } else if expired(p.request.deadline) {
                let _ = p.tx.try_send(Event::Failed(Failure::DeadlineExceeded));
                Outcome::Deadline
            } else {
                return true;
            };
            telemetry.finished(outcome);
            false
        });
    }

    /// Moves waiting sequences into the batch while there is room and KV.
    fn admit(&mut self) {
        let mut admitted = Vec::new();
        {
            let mut queue = lock(&self.shared.queue);
            while self.running.len() + admitted.len() < self.shared.config.max_batch {
                let Some(front) = queue.front() else { break };
                let r = &front.request;
                let tokens = r.prompt.len() + r.max_tokens;
                // At least two prompt tokens are left to compute: the last
                // one's logits are needed, and a lone token would be
                // computed otherwise than a cold prefill computes it
                // (Seq::prefill_chunk).
                let reusable = (r.prompt.len() - r.resumed).saturating_sub(2);
                // First come first served: a large request at the head waits
                // for blocks rather than being overtaken forever by small ones.
                let Some(blocks) = self.pool.allocate(&r.prompt, reusable, tokens) else {
                    break;
                };
                if let Some(p) = queue.pop_front() {
                    admitted.push((p, blocks));
                }
            }
        }
        // States are allocated outside the lock: a long context's cache is
        // tens of megabytes.
        for (p, blocks) in admitted {
            let cached = blocks.cached_tokens;
            let state = match self.runner.new_sequence(blocks.table.clone(), cached) {
                Ok(state) => state,
                Err(e) => {
                    tracing::error!(error = %e, "allocating a sequence failed");
                    let _ = p.tx.try_send(Event::Failed(Failure::Model(e.to_string())));
                    self.pool.release(&blocks.table);
                    self.shared.telemetry.finished(Outcome::Error);
                    continue;
                }
            };
            let r = p.request;
            let admitted = Instant::now();
            let resumed = &r.prompt[r.prompt.len() - r.resumed..];
            let mut sampler = Sampler::new(r.sampling);
            sampler.skip(resumed.len());
            let mut detok = Detokenizer::default();
            let mut stop = StopMatcher::new(r.stop);
            // The text of the resumed tokens was sent by the engine that
            // generated them; replaying it here leaves exactly what that
            // engine held back (a split character, a possible stop
            // sequence) pending, so the seam neither repeats nor drops.
            for &id in resumed {
                let _ = stop.push(&detok.push(&self.tokenizer, id));
            }
            let telemetry = &self.shared.telemetry;
            telemetry.admitted(admitted.duration_since(p.arrived).as_secs_f64());
            telemetry.prefix_lookup(r.prompt.len(), cached);
            self.running.push(Seq {
                id: p.id,
                state,
                prompt: r.prompt,
                fed: cached,
                cached,
                exact: cached,
                next: None,
                table: blocks.table,
                chain: blocks.chain,
                max_tokens: r.max_tokens,
                generated: 0,
                resumed: r.resumed,
                token_ids: r.token_ids,
                sampler,
                detok,
                stop,
                tx: p.tx,
                deadline: r.deadline,
                ignore_eos: r.ignore_eos,
                arrived: p.arrived,
                admitted,
                first_token: None,
                last_token: None,
            });
        }
    }

    /// One forward pass over the batch; returns the tokens fed.
    fn step(&mut self) -> usize {
        let mut plan = vec![0usize; self.running.len()];
        let mut used = 0;
        // Every decode gets its token, so running streams keep their pace
        // (the batch is bounded by max_batch, not by the token budget, so
        // none is skipped step after step).
        for (take, s) in plan.iter_mut().zip(&self.running) {
            if s.next.is_some() && s.tx.capacity() >= EVENTS_PER_STEP {
                *take = 1;
                used += 1;
            }
        }
        // Then prompt chunks with what is left of the step's token budget,
        // but always some: a full batch of decodes must not starve prefill.
        let budget = self.shared.config.step_tokens.max(used + MIN_PREFILL_CHUNK);
        for (take, s) in plan.iter_mut().zip(&self.running) {
            if used < budget && s.prefilling() && s.tx.capacity() >= EVENTS_PER_STEP {
                *take = s.prefill_chunk(budget - used);
                used += *take;
            }
        }
        if used == 0 {
            return 0;
        }

        let mut steps = Vec::with_capacity(plan.iter().filter(|&&t| t > 0).count());
        // Only sequences that sample from a distribution read their logits
        // after this step; greedy ones and unfinished prompts do not.
        let mut needs_logits = Vec::with_capacity(steps.capacity());
        for (s, &take) in self.running.iter_mut().zip(&plan) {
            if take > 0 {
                let samples = !s.prefilling() || s.fed + take == s.prompt.len();
                needs_logits.push(samples && !s.sampler.params().is_greedy());
            }
            let Seq {
                prompt,
                fed,
                next,
                state,
                ..
            } = s;
            let tokens: &[u32] = match (take, next.as_ref()) {
                (0, _) => continue,
                (_, Some(token)) if *fed == prompt.len() => std::slice::from_ref(token),
                _ => &prompt[*fed..*fed + take],
            };
            steps.push(Step { tokens, state });
        }
        let sequences = steps.len();
        let result = self.runner.forward_for(&mut steps, &needs_logits);
        drop(steps);
        self.steps += 1;
        self.shared.telemetry.step(sequences, used);
        if let Some(device) = self.runner.device_stats() {
            self.shared.telemetry.device(&device);
        }
        if let Err(e) = result {
            // Nothing was fed; every sequence of the step fails alike.
            tracing::error!(error = %e, "forward pass failed");
            let failure = Failure::Model(e.to_string());
            self.fail_fed(&plan, &failure);
            return used;
        }

        let now = Instant::now();
        let (mut prefilled, mut sampled) = (0u64, 0u64);
        let mut outcomes = vec![None; self.running.len()];
        for ((s, &take), outcome) in self.running.iter_mut().zip(&plan).zip(&mut outcomes) {
            if take == 0 {
                continue;
            }
            if s.prefilling() {
                if take > 1 && s.exact == s.fed {
                    s.exact = s.fed + take;
                }
                s.fed += take;
                prefilled += take as u64;
                self.pool
                    .register(&mut s.chain, &s.table, &s.prompt, s.exact);
                if s.prefilling() {
                    continue;
                }
            }
            let token = match s.state.greedy_token() {
                Some(token) if s.sampler.params().is_greedy() => token,
                _ => s.sampler.sample(s.state.logits()),
            };
            sampled += 1;
            let telemetry = &self.shared.telemetry;
            match s.last_token {
                None => {
                    s.first_token = Some(now);
                    telemetry.first_token(now.duration_since(s.arrived).as_secs_f64());
                }
                Some(t) => telemetry.next_token(now.duration_since(t).as_secs_f64()),
            }
            s.last_token = Some(now);
            if let After::Leave(o) = accept(s, token, &self.tokenizer, &self.stop_tokens) {
                *outcome = Some(o);
            }
        }
        self.shared.telemetry.prefilled(prefilled);
        self.shared.telemetry.generated(sampled);
        if outcomes.iter().any(Option::is_some) {
            let mut i = 0;
            let (pool, telemetry) = (&mut self.pool, &self.shared.telemetry);
            let mut drain = lock(&self.shared.drain);
            self.running.retain(|s| {
                let outcome = outcomes[i];
                i += 1;
                let Some(outcome) = outcome else { return true };
                pool.release(&s.table);
                telemetry.finished(outcome);
                drain.record(now);
                false
            });
        }
        used
    }

    /// Removes the sequences `plan` fed, telling each `failure`.
    fn fail_fed(&mut self, plan: &[usize], failure: &Failure) {
        let mut i = 0;
        let (pool, telemetry) = (&mut self.pool, &self.shared.telemetry);
        self.running.retain(|s| {
            let fed = plan.get(i).is_some_and(|&t| t > 0);
            i += 1;
            if fed {
                let _ = s.tx.try_send(Event::Failed(failure.clone()));
                pool.release(&s.table);
                telemetry.finished(Outcome::Error);
            }
            !fed
        });
    }

    fn fail_everything(&mut self, failure: Failure) {
        for s in self.running.drain(..) {
            let _ = s.tx.try_send(Event::Failed(failure.clone()));
            self.pool.release(&s.table);
            self.shared.telemetry.finished(Outcome::Error);
        }
        for p in lock(&self.shared.queue).drain(..) {
            let _ = p.tx.try_send(Event::Failed(failure.clone()));
            self.shared.telemetry.finished(Outcome::Error);
        }
    }

    fn publish(&mut self) {
        let waiting = lock(&self.shared.queue).len();
        let stats = EngineStats {
            waiting,
            running: self.running.len(),
            kv_blocks_used: self.pool.used(),
            kv_blocks_free: self.pool.free(),
            kv_blocks_cached: self.pool.cached(),
            steps: self.steps,
        };
        *lock(&self.shared.stats) = stats;
        let telemetry = &self.shared.telemetry;
        telemetry.queue(waiting, stats.running);
        telemetry.kv(stats.kv_blocks_used, stats.kv_blocks_free);
        // The counter outlives this engine (a hot swap's next version
        // counts on), so it is advanced, never set.
        let evictions = self.pool.evictions();
        telemetry.prefix_cache(stats.kv_blocks_cached, evictions - self.evictions_counted);
        self.evictions_counted = evictions;
    }
}

/// Takes a sampled token into a sequence: ends it on a stop token, stop
/// sequence or `max_tokens`, and sends what text it completes.
fn accept<S>(s: &mut Seq<S>, token: u32, tokenizer: &Tokenizer, stop_tokens: &[u32]) -> After {
    if !s.ignore_eos && stop_tokens.contains(&token) {
        let mut text = match s.stop.push(&s.detok.flush(tokenizer)) {
            Stopped::Yes(text) | Stopped::No(text) => text,
        };
        text.push_str(&s.stop.flush());
        // The stop token itself is not part of the answer.
        return send(s, text, None, FinishReason::Stop);
    }
    s.generated += 1;
    let delta = s.detok.push(tokenizer, token);
    let (text, finish) = match s.stop.push(&delta) {
        Stopped::Yes(text) => (text, Some(FinishReason::Stop)),
        Stopped::No(mut text) if s.generated >= s.max_tokens => {
            match s.stop.push(&s.detok.flush(tokenizer)) {
                Stopped::Yes(rest) => {
                    text.push_str(&rest);
                    (text, Some(FinishReason::Stop))
                }
                Stopped::No(rest) => {
                    text.push_str(&rest);
                    text.push_str(&s.stop.flush());
                    (text, Some(FinishReason::Length))
                }
            }
        }
        Stopped::No(text) => {
            s.next = Some(token);
            (text, None)
        }
    };
    match finish {
        None => {
            // The step was planned only with room for both events, so a
            // failed send means the receiver is gone.
            if !deliver(s, text, Some(token)) {
                return After::Leave(Outcome::Cancelled);
            }
            After::Continue
        }
        Some(reason) => send(s, text, Some(token), reason),
    }
}

/// Sends `text` and the `token` it came with, when there is anything the
/// receiver wants; false when the receiver is gone.
fn deliver<S>(s: &Seq<S>, text: String, token: Option<u32>) -> bool {
    let tokens = match token {
        Some(token) if s.token_ids => vec![token],
        _ => Vec::new(),
    };
    if text.is_empty() && tokens.is_empty() {
        return true;
    }
    s.tx.try_send(Event::Text { text, tokens }).is_ok()
}

/// Sends a sequence's last text and its finish.
fn send<S>(s: &Seq<S>, text: String, token: Option<u32>, reason: FinishReason) -> After {
    if !deliver(s, text, token) {
        return After::Leave(Outcome::Cancelled);
    }
    let _ = s.tx.try_send(s.finish(reason));
    After::Leave(match reason {
        FinishReason::Stop => Outcome::Stop,
        FinishReason::Length => Outcome::Length,
    })
}
