//! Mid-stream failover: a streamed completion whose GPU host breaks off
//! (the connection resets, the stream ends before `[DONE]`, or no event
//! comes for the route's `stall_timeout` once tokens flow) goes on from
//! another endpoint, and the client sees one unbroken stream.
//!
//! A draining host (shutting down, or swapped to another model version)
//! hands its streams over the same way: a last event
//! ([`breakwater_wire::HANDOFF_FIELD`]) and the end of the stream, which
//! counts nothing against it.
//!
//! The edge asks the first host for the ids of the tokens each chunk
//! carries ([`breakwater_wire::TOKEN_IDS_HEADER`]) and keeps them as the
//! chunks pass; a continuation is the original request with those ids in
//! [`breakwater_wire::RESUME_FIELD`], sent under the retry rules (an
//! endpoint not tried yet, healthy and not busy, within the retry budget
//! and the deadline). Its chunks are the original's: the role chunk the
//! client already had is dropped, and `id`, `created` and `model` are the
//! first host's. Ids never reach the client. The host counts the resumed
//! tokens in `max_tokens` and `usage`, so the answer's usage is whole.
//!
//! When no endpoint can continue, the stream ends with an error event
//! (`upstream_lost`) and without `[DONE]`: a client never takes a cut
//! answer for a whole one. A client that leaves drops the stream and with
//! it the connection to whichever host generates, which cancels there.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use breakwater_wire::{HANDOFF_FIELD, RESUME_FIELD, TOKEN_IDS_FIELD};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use serde_json::{Map, Value};
use tracing::Instrument;

use super::budget::RetrySlot;
use super::endpoint::{Endpoint, Failure, Outstanding};
use super::limit::Permit;
use super::pool::PoolCore;
use super::{Outcome, UpstreamPool, attempt_span, record_outcome};
use crate::limits::BodyLimitTrip;
use crate::proxy::prepare_response;
use crate::sse;

/// A route's `resume = true`, carried on each of its requests.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ResumePolicy {
    /// No event for this long once tokens flow: the upstream stalled.
    pub(crate) stall_timeout: Duration,
}

/// The most token ids one stream keeps (4 bytes each); a longer answer
/// can no longer be resumed, and says so if it breaks.
const MAX_KEPT_TOKENS: usize = 32_768;

/// The largest event held while its end has not come: a host's chunk is a
/// few hundred bytes, so more is a broken stream.
const MAX_EVENT_BYTES: usize = 1 << 20;

/// How a request on a `resume` route may be resumed.
pub(super) enum Resumable {
    /// A streamed completion: spliced, from its JSON body.
    Stream(Map<String, Value>),
    /// A whole completion: retried from the start before its head came
    /// (a host sends a whole answer's head only once it is generated, so
    /// a host lost mid-generation has sent nothing).
    Whole,
}

impl Resumable {
    /// What `body` (the request's JSON) allows: a completion request with
    /// one choice that is not itself a continuation. None for anything
    /// else, which goes as any request does.
    pub(super) fn of(method: &Method, body: Value) -> Option<Self> {
        if method != Method::POST {
            return None;
        }
        let Value::Object(request) = body else {
            return None;
        };
        let one_choice = request.get("n").is_none_or(|n| n.is_null() || n == 1);
        if !one_choice || request.contains_key(RESUME_FIELD) {
            return None;
        }
        let streamed = request.get("stream").and_then(Value::as_bool) == Some(true);
        Some(if streamed {
            Resumable::Stream(request)
        } else {
            Resumable::Whole
        })
    }
}

/// Why a stream broke off, as the resume metrics name it.
#[derive(Debug, Clone, Copy)]
enum Break {
    Reset,
    Eof,
    Stall,
    /// The host drains and handed the answer over.
    Drain,
}

impl Break {
    fn label(self) -> &'static str {
        match self {
            Break::Reset => "reset",
            Break::Eof => "eof",
            Break::Stall => "stall",
            Break::Drain => "drain",
        }
    }

    /// What the break says about the endpoint. A stall says nothing sure:
    /// another client's long prompt prefilling in the same batch holds the
    /// decodes back too, and must not cost the host its health (a hung
    /// host fails its health checks); a drain is a goodbye.
    fn failure(self) -> Option<Failure> {
        match self {
            Break::Reset | Break::Eof => Some(Failure::Reset),
            Break::Stall | Break::Drain => None,
        }
    }
}

/// Everything a stream needs to be continued elsewhere.
pub(super) struct Splice {
    pool: Arc<UpstreamPool>,
    /// The request's head as sent upstream, and its JSON body.
    head: http::request::Parts,
    request: Map<String, Value>,
    key: Option<u64>,
    tried: Vec<Arc<Endpoint>>,
    deadline: Instant,
    stall_timeout: Duration,
    /// How long a continuation may take to its first token: it replays the
    /// answer so far, as a first request prefills.
    first_event_timeout: Duration,
    /// The stream being read, and its endpoint's outstanding count.
    current: Option<Current>,
    /// The bytes of an event not yet complete.
    pending: Vec<u8>,
    ready: VecDeque<Bytes>,
    /// The ids of every token the client has been sent.
    tokens: Vec<u32>,
    /// A chunk with text came without ids, or too many: not resumable.
    tokens_lost: bool,
    /// The first host's `id`, `created` and `model`.
    identity: Vec<(&'static str, Value)>,
    /// `[DONE]` went by, or the host's own error event: the stream ends
    /// with its upstream's.
    ended: bool,
    /// The current host handed the answer over (it drains).
    handed_off: bool,
    /// A chunk gave the finish reason: all the text went out.
    finished: bool,
    /// The client asked for the usage chunk and has not had it yet.
    usage_pending: bool,
    /// When the last break was seen, until the continuation's first token.
    resuming_since: Option<Instant>,
    /// The continuation's role chunk is still to be dropped.
    skip_role: bool,
    _permit: Option<Permit>,
}

struct Current {
    body: Body,
    endpoint: Arc<Endpoint>,
    core: Arc<PoolCore>,
    _outstanding: Outstanding,
    /// A continuation before its first token: its role chunk comes at
    /// once, but its first token only after the replay.
    fresh: bool,
}

/// Where a streamed answer's splice starts: its first answer and what the
/// pool knew when it chose the endpoint.
pub(super) struct FirstAnswer {
    pub(super) response: Response<hyper::body::Incoming>,
    pub(super) outstanding: Outstanding,
    pub(super) endpoint: Arc<Endpoint>,
    pub(super) core: Arc<PoolCore>,
}

/// Whether `response` is an event stream a splice can follow.
pub(super) fn is_spliceable(response: &Response<hyper::body::Incoming>) -> bool {
    response.status().is_success() && crate::cache::is_event_stream(response.headers())
}

impl Splice {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        pool: Arc<UpstreamPool>,
        parts: &http::request::Parts,
        request: Map<String, Value>,
        key: Option<u64>,
        tried: Vec<Arc<Endpoint>>,
        deadline: Instant,
        policy: ResumePolicy,
        permit: Option<Permit>,
    ) -> Self {
        let mut head = Request::new(()).into_parts().0;
        head.method = parts.method.clone();
        head.uri = parts.uri.clone();
        head.version = parts.version;
        head.headers = parts.headers.clone();
        let first_event_timeout = pool.primary().config.first_byte_timeout;
        let usage_pending = request
            .get("stream_options")
            .and_then(|options| options.get("include_usage"))
            .and_then(Value::as_bool)
            == Some(true);
        Self {
            pool,
            head,
            request,
            key,
            tried,
            deadline,
            stall_timeout: policy.stall_timeout,
            first_event_timeout,
            current: None,
            pending: Vec::new(),
            ready: VecDeque::new(),
            tokens: Vec::new(),
            tokens_lost: false,
            identity: Vec::new(),
            ended: false,
            handed_off: false,
            finished: false,
            usage_pending,
            resuming_since: None,
            skip_role: false,
            _permit: permit,
        }
    }

    /// The client's answer: `first`'s head, and a body that follows it and
    /// whatever continues it.
    pub(super) fn answer(mut self, first: FirstAnswer) -> Response<Body> {
        let (mut parts, body) = prepare_response(first.response).into_parts();
        // The body is rewritten: its length is no longer the upstream's.
        parts.headers.remove(header::CONTENT_LENGTH);
        self.current = Some(Current {
            body,
            endpoint: first.endpoint,
            core: first.core,
            _outstanding: first.outstanding,
            fresh: false,
        });
        let events = futures_util::stream::unfold(self, |mut splice| async move {
            let next = splice.next().await?;
            Some((Ok::<_, std::convert::Infallible>(next), splice))
        });
        Response::from_parts(parts, Body::from_stream(events))
    }

    /// The client's next bytes; None at the end.
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(bytes) = self.ready.pop_front() {
                return Some(bytes);
            }
            let current = self.current.as_mut()?;
            let patience = if current.fresh {
                Some(self.first_event_timeout)
            } else if !self.tokens.is_empty() {
                Some(self.stall_timeout)
            } else {
                None
            };
            let until = patience.map_or(self.deadline, |p| (Instant::now() + p).min(self.deadline));
            let read = tokio::time::timeout_at(until.into(), current.body.frame()).await;
            match read {
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.pending.extend_from_slice(&data);
                        let before = self.tokens.len();
                        self.take_events();
                        if self.tokens.len() > before
                            && let Some(current) = &mut self.current
                        {
                            current.fresh = false;
                        }
                        if self.pending.len() > MAX_EVENT_BYTES {
                            self.break_off(Break::Reset).await;
                        }
                    }
                }
                // After `[DONE]`, or the host's own error, the stream ends
                // with its upstream, however that goes.
                Ok(None) | Ok(Some(Err(_))) | Err(_) if self.ended => self.current = None,
                Ok(None) if self.handed_off => self.break_off(Break::Drain).await,
                Ok(None) => self.break_off(Break::Eof).await,
                Ok(Some(Err(_))) if self.handed_off => self.break_off(Break::Drain).await,
                Ok(Some(Err(_))) => self.break_off(Break::Reset).await,
                Err(_) if Instant::now() >= self.deadline => {
                    self.current = None;
                    self.ready.push_back(sse::error_event(
                        "deadline_exceeded",
                        "the request's deadline passed before the answer was whole",
                    ));
                }
                Err(_) => self.break_off(Break::Stall).await,
            }
        }
    }

    /// Passes on each complete event of `pending`.
    fn take_events(&mut self) {
        while let Some(end) = sse::find_event_end(&self.pending) {
            let event: Vec<u8> = self.pending.drain(..end).collect();
            if let Some(out) = self.pass(event) {
                self.ready.push_back(out);
            }
        }
    }

    /// What of `event` the client gets: ids kept and removed, the first
    /// host's identity on a continuation's chunks, its role chunk dropped.
    fn pass(&mut self, event: Vec<u8>) -> Option<Bytes> {
        let Some(data) = sse::event_data(&event) else {
            // A comment (keep-alive): as it came.
            return Some(Bytes::from(event));
        };
        if data == b"[DONE]" {
            self.ended = true;
            return Some(Bytes::from(event));
        }
        let Ok(Value::Object(mut chunk)) = serde_json::from_slice::<Value>(data) else {
            return Some(Bytes::from(event));
        };
        if chunk.contains_key(HANDOFF_FIELD) {
            // The host drains: the answer goes on elsewhere once its
            // stream ends, which it does next.
            self.handed_off = true;
            return None;
        }
        if chunk.contains_key("error") {
            // The host ended the answer itself (its deadline, a failure):
            // not a break to resume from.
            self.ended = true;
            return Some(Bytes::from(event));
        }
        let ids = chunk.remove(TOKEN_IDS_FIELD);
        if self.skip_role {
            self.skip_role = false;
            if is_role_chunk(&chunk) {
                return None;
            }
        }
        if chunk.get("usage").is_some_and(|usage| !usage.is_null()) {
            self.usage_pending = false;
        }
        if first_choice(&chunk)["finish_reason"].is_string() {
            self.finished = true;
        }
        if self.identity.is_empty() {
            for field in ["id", "created", "model"] {
                if let Some(value) = chunk.get(field) {
                    self.identity.push((field, value.clone()));
                }
            }
        } else {
            for (field, value) in &self.identity {
                chunk.insert((*field).to_owned(), value.clone());
            }
        }
        match ids.as_ref().and_then(Value::as_array) {
            Some(ids) => {
                let before = self.tokens.len();
                for id in ids {
                    match id.as_u64().and_then(|id| u32::try_from(id).ok()) {
                        Some(id) if self.tokens.len() < MAX_KEPT_TOKENS => self.tokens.push(id),
                        _ => self.tokens_lost = true,
                    }
                }
                if self.tokens.len() > before
                    && let Some(since) = self.resuming_since.take()
                {
                    let waited = since.elapsed();
                    metrics::histogram!(
                        "breakwater_upstream_stream_resume_seconds",
                        "pool" => self.pool.name.clone()
                    )
                    .record(waited.as_secs_f64());
                    tracing::info!(pool = %self.pool.name, waited_ms = waited.as_secs_f64() * 1000.0, tokens = before, "an answer's stream resumed");
                }
            }
            None => self.tokens_lost |= carries_text(&chunk),
        }
        Some(sse::data_event(&Value::Object(chunk)))
    }

    /// The stream broke off: it goes on from another endpoint, or ends
    /// with the error event.
    async fn break_off(&mut self, why: Break) {
        let Some(lost) = self.current.take() else {
            return;
        };
        // Half an event never reached the client, nor did its ids.
        self.pending.clear();
        self.handed_off = false;
        if let Some(failure) = why.failure() {
            lost.core.record_failure(&lost.endpoint, failure);
        }
        drop(lost);
        if self.finished && !self.usage_pending {
            // Lost after the last of the answer went out: it is whole.
            self.ready
                .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
            return;
        }
        if self.finished {
            return self.give_up(
                "finished",
                "the answer is whole but its usage chunk was lost",
            );
        }
        let pool_name = self.pool.name.clone();
        metrics::counter!(
            "breakwater_upstream_stream_resumes_total",
            "pool" => pool_name.clone(),
            "reason" => why.label()
        )
        .increment(1);
        tracing::info!(pool = %pool_name, reason = why.label(), tokens = self.tokens.len(), "an answer's stream broke off; resuming it on another endpoint");
        if self.tokens_lost {
            return self.give_up("tokens_unknown", "the tokens sent so far are not known");
        }
        self.resuming_since = Some(Instant::now());
        let body = self.continuation_body();
        loop {
            if Instant::now() >= self.deadline {
                return self.give_up("deadline", "the request's deadline passed");
            }
            let Some((index, endpoint)) = self.pool.choose(self.key, &self.tried) else {
                return self.give_up("no_endpoint", "no other endpoint is available");
            };
            // Held until the continuation's head came, as a retry's is.
            let until = (Instant::now() + self.stall_timeout).min(self.deadline);
            let Some(_slot) = retry_slot(&self.pool, until).await else {
                metrics::counter!("breakwater_upstream_retry_budget_exhausted_total", "pool" => pool_name.clone()).increment(1);
                return self.give_up("retry_budget", "the pool's retry budget is spent");
            };
            let core = self.pool.chain[index].clone();
            self.tried.push(endpoint.clone());
            let attempt = self.tried.len();
            let span = attempt_span(&core, &endpoint, attempt);
            let outcome = self
                .pool
                .attempt(
                    &core,
                    &endpoint,
                    &self.head,
                    Body::from(body.clone()),
                    attempt,
                    self.deadline,
                    &BodyLimitTrip::default(),
                    true,
                )
                .instrument(span.clone())
                .await;
            record_outcome(&span, &outcome);
            match outcome {
                Outcome::Answer(response, outstanding) if is_spliceable(&response) => {
                    let (_, body) = prepare_response(response).into_parts();
                    self.current = Some(Current {
                        body,
                        endpoint,
                        core,
                        _outstanding: outstanding,
                        fresh: true,
                    });
                    self.skip_role = true;
                    return;
                }
                Outcome::Answer(response, _) => {
                    // The host refused the continuation (a 4xx): another
                    // would too.
                    let status = response.status();
                    let detail = match response.into_body().collect().await {
                        Ok(body) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
                        Err(_) => String::new(),
                    };
                    tracing::warn!(pool = %pool_name, %status, detail = %detail, "a continuation was refused");
                    return self.give_up("refused", "the continuation was refused");
                }
                Outcome::DeadlinePassed => {
                    return self.give_up("deadline", "the request's deadline passed");
                }
                Outcome::Busy(_) | Outcome::Failed(..) | Outcome::ClientBroke(_) => {
                    metrics::counter!(
                        "breakwater_edge_upstream_errors_total",
                        "pool" => core.name.clone(),
                        "kind" => "resume"
                    )
                    .increment(1);
                }
            }
        }
    }

    /// The original request with the tokens sent so far as a continuation.
    fn continuation_body(&mut self) -> Bytes {
        let mut request = self.request.clone();
        request.insert(
            RESUME_FIELD.to_owned(),
            serde_json::json!({ "tokens": self.tokens }),
        );
        let body = Bytes::from(Value::Object(request).to_string());
        self.head
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        self.head.headers.remove(header::TRANSFER_ENCODING);
        body
    }

    /// Nothing can continue the answer: the client gets the error event
    /// after what it has, and no `[DONE]`.
    fn give_up(&mut self, reason: &'static str, why: &str) {
        metrics::counter!(
            "breakwater_upstream_stream_resume_failures_total",
            "pool" => self.pool.name.clone(),
            "reason" => reason
        )
        .increment(1);
        tracing::warn!(pool = %self.pool.name, reason, tokens = self.tokens.len(), "an answer's stream broke off and could not be resumed");
        self.resuming_since = None;
        self.ready.push_back(sse::error_event(
            "upstream_lost",
            &format!(
                "the upstream generating this answer was lost after {} tokens and it could not be continued: {why}",
                self.tokens.len()
            ),
        ));
    }
}

/// A chat stream's first chunk: the assistant's role, no text.
fn is_role_chunk(chunk: &Map<String, Value>) -> bool {
    let delta = &first_choice(chunk)["delta"];
    delta.get("role").is_some() && delta["content"].as_str().is_none_or(str::is_empty)
}

/// Whether a chunk carries text of the answer.
fn carries_text(chunk: &Map<String, Value>) -> bool {
    let choice = first_choice(chunk);
    choice["delta"]["content"]
        .as_str()
        .or_else(|| choice["text"].as_str())
        .is_some_and(|text| !text.is_empty())
}

/// The chunk's first choice; null when it has none (indexing a `Map`
/// panics on a missing key, a `Value` does not).
fn first_choice(chunk: &Map<String, Value>) -> &Value {
    chunk
        .get("choices")
        .map_or(&Value::Null, |choices| &choices[0])
}

/// A slot in `pool`'s retry budget. The streams a lost host was generating
/// break off together: rather than refuse those beyond the budget at once,
/// each waits a little (until `until`) for the others' continuations to
/// get their heads and free their slots.
async fn retry_slot(pool: &UpstreamPool, until: Instant) -> Option<RetrySlot> {
    loop {
        if let Some(slot) = pool.budget.try_retry() {
            return Some(slot);
        }
        let wait = Duration::from_millis(5 + (pool.rng.unit() * 20.0) as u64);
        if Instant::now() + wait >= until {
            return None;
        }
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(method: Method, body: &str) -> Option<Resumable> {
        Resumable::of(&method, serde_json::from_str(body).ok()?)
    }

    #[test]
    fn only_single_choice_json_completions_resume() {
        assert!(matches!(
            of(Method::POST, r#"{"stream":true,"n":1}"#),
            Some(Resumable::Stream(_))
        ));
        assert!(matches!(
            of(Method::POST, r#"{"prompt":"x"}"#),
            Some(Resumable::Whole)
        ));
        // Several choices interleave in one stream: no single answer to
        // continue. A continuation the client sent is not continued again.
        assert!(of(Method::POST, r#"{"stream":true,"n":2}"#).is_none());
        let resumed = format!(r#"{{"stream":true,"{RESUME_FIELD}":{{"tokens":[1]}}}}"#);
        assert!(of(Method::POST, &resumed).is_none());
        assert!(of(Method::POST, "not json").is_none());
        assert!(of(Method::POST, "[1]").is_none());
        assert!(of(Method::GET, r#"{"stream":true}"#).is_none());
    }

    /// A splice on a pool of one (unreachable) endpoint, as it stands
    /// once its first answer's head came.
    fn new_splice(request: Value) -> Splice {
        let config = edge_config::parse(
            "[[listener]]\naddress = \"127.0.0.1:8080\"\n\
             [[pool]]\nname = \"a\"\nendpoints = [\"http://127.0.0.1:1\"]\n",
            std::path::Path::new("t.toml"),
            std::path::Path::new("."),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let pools = super::super::build_pools(&config);
        let parts = Request::new(()).into_parts().0;
        Splice::new(
            pools["a"].clone(),
            &parts,
            request.as_object().cloned().unwrap_or_default(),
            None,
            Vec::new(),
            Instant::now() + Duration::from_secs(60),
            ResumePolicy {
                stall_timeout: Duration::from_secs(2),
            },
            None,
        )
    }

    /// What the client gets of `chunk` (JSON), as text.
    fn passed(splice: &mut Splice, chunk: Value) -> Option<String> {
        let event = format!("data: {chunk}\n\n").into_bytes();
        splice
            .pass(event)
            .map(|bytes| String::from_utf8(bytes.to_vec()).expect("UTF-8"))
    }

    #[tokio::test]
    async fn a_continuations_chunks_go_out_as_the_first_hosts() {
        let mut splice = new_splice(serde_json::json!({"stream": true}));
        let chunk = |id: &str, created: u64, delta: Value, ids: Option<Vec<u32>>| {
            let mut chunk = serde_json::json!({
                "id": id, "created": created, "model": "m",
                "choices": [{"index": 0, "delta": delta, "finish_reason": null}],
            });
            if let Some(ids) = ids {
                chunk[TOKEN_IDS_FIELD] = serde_json::json!(ids);
            }
            chunk
        };
        let role = serde_json::json!({"role": "assistant", "content": ""});
        let first = chunk("a", 1, role.clone(), None);
        assert_eq!(
            passed(&mut splice, first.clone()),
            Some(format!("data: {first}\n\n"))
        );
        let text = passed(
            &mut splice,
            chunk(
                "a",
                1,
                serde_json::json!({"content": "He"}),
                Some(vec![5, 6]),
            ),
        )
        .expect("passed");
        assert!(!text.contains(TOKEN_IDS_FIELD), "{text}");
        assert_eq!(splice.tokens, [5, 6]);

        // A continuation from host `b`: its role chunk is dropped, its
        // chunks carry the first host's identity.
        splice.skip_role = true;
        assert_eq!(passed(&mut splice, chunk("b", 2, role, None)), None);
        let next = passed(
            &mut splice,
            chunk("b", 2, serde_json::json!({"content": "llo"}), Some(vec![7])),
        )
        .expect("passed");
        assert_eq!(
            next,
            format!(
                "data: {}\n\n",
                chunk("a", 1, serde_json::json!({"content": "llo"}), None)
            )
        );
        assert_eq!(splice.tokens, [5, 6, 7]);
        assert!(!splice.tokens_lost);

        // Text without ids cannot be continued from.
        passed(
            &mut splice,
            chunk("b", 2, serde_json::json!({"content": "!"}), None),
        );
        assert!(splice.tokens_lost);
        // A handoff is never passed on.
        assert_eq!(
            passed(
                &mut splice,
                serde_json::json!({HANDOFF_FIELD: {"reason": "drain"}})
            ),
            None
        );
        assert!(splice.handed_off);
    }

    /// `splice` reading `body` from its pool's endpoint.
    fn reading(mut splice: Splice, body: Body) -> Splice {
        let core = splice.pool.chain[0].clone();
        let endpoint = core.endpoints[0].clone();
        splice.current = Some(Current {
            body,
            _outstanding: endpoint.start(),
            endpoint,
            core,
            fresh: false,
        });
        splice
    }

    async fn rest(mut splice: Splice) -> String {
        let mut out = String::new();
        while let Some(bytes) = splice.next().await {
            out.push_str(std::str::from_utf8(&bytes).expect("UTF-8"));
        }
        out
    }

    #[tokio::test]
    async fn a_host_lost_after_the_finish_leaves_nothing_to_resume() {
        let finish = "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"length\",\"index\":0}],\"id\":\"a\"}\n\n";
        // Cut before `[DONE]`: the answer is whole, so `[DONE]` ends it.
        let splice = reading(
            new_splice(serde_json::json!({"stream": true})),
            Body::from(finish),
        );
        let out = rest(splice).await;
        assert!(out.ends_with("data: [DONE]\n\n"), "{out}");
        // The client asked for usage and lost it: said, never `[DONE]`.
        let usage_lost = reading(
            new_splice(
                serde_json::json!({"stream": true, "stream_options": {"include_usage": true}}),
            ),
            Body::from(finish),
        );
        let out = rest(usage_lost).await;
        assert!(
            out.contains("upstream_lost") && !out.contains("[DONE]"),
            "{out}"
        );
    }

    #[tokio::test]
    async fn a_stream_cut_with_no_endpoint_left_ends_in_upstream_lost() {
        let text = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"},\"finish_reason\":null,\"index\":0}],\"breakwater_token_ids\":[4]}\n\n";
        let splice = reading(
            new_splice(serde_json::json!({"stream": true})),
            Body::from(text),
        );
        let out = rest(splice).await;
        let events: Vec<&str> = out.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 2, "{out}");
        assert!(events[1].contains("\"code\":\"upstream_lost\""), "{out}");
        assert!(
            !out.contains("[DONE]") && !out.contains(TOKEN_IDS_FIELD),
            "{out}"
        );
    }

    #[test]
    fn a_chat_role_chunk_is_told_from_text() {
        let chunk = |v: Value| v.as_object().cloned().expect("an object");
        let role = chunk(serde_json::json!({
            "choices": [{"delta": {"role": "assistant", "content": ""}}]
        }));
        assert!(is_role_chunk(&role) && !carries_text(&role));
        let text = chunk(serde_json::json!({"choices": [{"delta": {"content": "hi"}}]}));
        assert!(!is_role_chunk(&text) && carries_text(&text));
        let completion = chunk(serde_json::json!({"choices": [{"text": "x"}]}));
        assert!(carries_text(&completion));
        // No choices (a usage chunk) is neither, and does not panic.
        let usage = chunk(serde_json::json!({"choices": [], "usage": {}}));
        assert!(!is_role_chunk(&usage) && !carries_text(&usage));
        assert!(!carries_text(&Map::new()));
    }
}
