//! LLM token budgets that plugins reserved (`tokens.reserve`), enforced and
//! settled by the node around the upstream exchange.
//!
//! - **Cap.** The request's JSON body is rewritten so that the upstream
//!   generates at most the granted completion tokens: `max_tokens` (and
//!   `max_completion_tokens` when the client used it) become the cap
//!   whenever the client asked for more or set none. A streamed request also
//!   asks for `stream_options.include_usage`, so the real usage comes back
//!   in the stream's last chunk; that chunk is removed again when the client
//!   did not ask for it. A rewritten request is cached under its own key
//!   (the plugin's key and the cap), since its answer may be shorter.
//! - **Cut.** When a budget granted fewer tokens than the request asked for
//!   and the answer ended at the cap (`finish_reason: "length"`), a stream
//!   gets a final error event (`token_budget_exhausted`) before `[DONE]`:
//!   the client learns that the budget ended it, never silently.
//! - **Settle.** When the answer has ended, the reservation is settled with
//!   the upstream's `usage` (a whole answer's, or the stream's usage chunk;
//!   a stream cut short by its client counts the estimated prompt and the
//!   content events seen), with the reservation's cached cost for an answer
//!   from the cache, and with nothing for an answer that is not a success.
//! - **Headers.** Every admitted answer carries `X-Breakwater-Tokens-
//!   Reserved`, and `X-Breakwater-Tokens-Cap` when the budget lowered the
//!   request's limit. A whole answer (JSON, held here up to 1 MiB) is settled
//!   before its head leaves, so it also carries `X-Breakwater-Tokens-Used`
//!   (the tokens charged: prompt + completion, or the cached cost) and
//!   `X-Breakwater-Tokens-Remaining` (the emptiest budget after the
//!   settlement). A stream's head leaves before its usage is known: its
//!   usage is in its usage chunk when the client asks for one.
//!
//! A request whose body the plugins were not shown (no `plugin_body_bytes`
//! on the route, or too large) cannot be capped: it is settled all the
//! same, and counted in `breakwater_token_budget_uncapped_total`.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use breakwater_sandbox::{TokenGrants, TokenUsage};
use bytes::Bytes;
use futures_util::StreamExt;
use http::header::{self, HeaderName, HeaderValue};
use http::{Response, request::Parts};
use http_body::Frame;
use http_body_util::BodyExt;
use serde_json::Value;

use crate::cache::{answered_by_cache, is_event_stream};
use crate::sse::{error_event, event_data, find_event_end};

const RESERVED: HeaderName = HeaderName::from_static("x-breakwater-tokens-reserved");
const CAP: HeaderName = HeaderName::from_static("x-breakwater-tokens-cap");
const USED: HeaderName = HeaderName::from_static("x-breakwater-tokens-used");
const REMAINING: HeaderName = HeaderName::from_static("x-breakwater-tokens-remaining");

/// The largest whole answer held to settle before its head leaves.
const MAX_WHOLE_ANSWER: usize = 1 << 20;

/// How long a whole answer's body may take to arrive once its head has.
const WHOLE_ANSWER_WAIT: Duration = Duration::from_secs(300);

/// A request admitted under token budgets, until its answer is settled.
pub(crate) struct Budget {
    grants: TokenGrants,
    cap: u32,
    /// Whether a budget, not the client, set the cap.
    reduced: bool,
    /// Whether the client asked for the usage chunk itself.
    client_wants_usage: bool,
}

/// What admitting a request changed: its body and its cache key.
pub(crate) struct Rewritten {
    pub body: Bytes,
    /// Appended to the plugin's cache key.
    pub key_suffix: String,
}

impl Budget {
    /// Applies `grants` to the request: the budget, and the rewritten body
    /// when the body (`whole`, as shown to the plugins) is a JSON object.
    /// `None` when no plugin reserved tokens.
    pub(crate) fn admit(
        grants: TokenGrants,
        parts: &mut Parts,
        whole: Option<&Bytes>,
    ) -> Option<(Budget, Option<Rewritten>)> {
        let cap = grants.completion_cap()?;
        let reduced = grants.is_reduced();
        let parsed = whole.and_then(|body| serde_json::from_slice::<Value>(body).ok());
        let Some(Value::Object(mut body)) = parsed else {
            metrics::counter!("breakwater_token_budget_uncapped_total").increment(1);
            let budget = Budget {
                grants,
                cap,
                reduced,
                client_wants_usage: true,
            };
            return Some((budget, None));
        };
        let asked = ["max_completion_tokens", "max_tokens"]
            .iter()
            .find_map(|field| body.get(*field).and_then(Value::as_u64));
        let capped = asked.is_none_or(|asked| asked > u64::from(cap));
        if capped {
            body.insert("max_tokens".to_owned(), cap.into());
            if body.contains_key("max_completion_tokens") {
                body.insert("max_completion_tokens".to_owned(), cap.into());
            }
        }
        let stream = body.get("stream").and_then(Value::as_bool) == Some(true);
        let client_wants_usage = body
            .get("stream_options")
            .and_then(|options| options.get("include_usage"))
            .and_then(Value::as_bool)
            == Some(true);
        let ask_usage = stream && !client_wants_usage;
        if ask_usage {
            match body.get_mut("stream_options") {
                Some(Value::Object(options)) => {
                    options.insert("include_usage".to_owned(), true.into());
                }
                _ => {
                    body.insert(
                        "stream_options".to_owned(),
                        serde_json::json!({ "include_usage": true }),
                    );
                }
            }
        }
        let budget = Budget {
            grants,
            cap,
            reduced,
            client_wants_usage,
        };
        if !capped && !ask_usage {
            return Some((budget, None));
        }
        let Ok(rewritten) = serde_json::to_vec(&body) else {
            return Some((budget, None));
        };
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(rewritten.len()));
        let key_suffix = format!(
            "|tokens:max={};usage={}",
            if capped {
                cap.to_string()
            } else {
                "-".to_owned()
            },
            ask_usage
        );
        Some((
            budget,
            Some(Rewritten {
                body: Bytes::from(rewritten),
                key_suffix,
            }),
        ))
    }

    /// The answer as the client gets it: headers added, a stream watched
    /// and settled at its end, a whole answer settled now.
    pub(crate) async fn answer(self, mut response: Response<Body>) -> Response<Body> {
        if !response.status().is_success() {
            // Dropped unsettled: nothing was generated for the client.
            return response;
        }
        let headers = response.headers_mut();
        headers.insert(RESERVED, HeaderValue::from(self.grants.reserved()));
        if self.reduced {
            headers.insert(CAP, HeaderValue::from(self.cap));
        }
        let cached = answered_by_cache(response.headers());
        if is_event_stream(response.headers()) {
            return response.map(|inner| {
                Body::new(BudgetedStream {
                    inner,
                    pending: Vec::new(),
                    ready: VecDeque::new(),
                    seen: Seen::default(),
                    budget: Some((self, cached)),
                })
            });
        }
        let (mut parts, mut body) = response.into_parts();
        let deadline = tokio::time::Instant::now() + WHOLE_ANSWER_WAIT;
        let mut kept: Vec<Bytes> = Vec::new();
        let mut size = 0;
        loop {
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Ok(None) => break,
                Ok(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    size += data.len();
                    kept.push(data);
                    if size > MAX_WHOLE_ANSWER {
                        // Too large to hold: it goes on as it came, and
                        // what it cost is unknown, so the reservation
                        // stands (settled to itself).
                        self.keep_reservation();
                        let held = futures_util::stream::iter(kept.into_iter().map(Ok));
                        let rest = body.into_data_stream();
                        let body = Body::from_stream(held.chain(rest));
                        return Response::from_parts(parts, body);
                    }
                }
                Ok(Some(Err(_))) | Err(_) => {
                    // Broken or stalled before its head left: the
                    // upstream's failure, answered as such.
                    self.keep_reservation();
                    return crate::error_response(
                        http::StatusCode::BAD_GATEWAY,
                        "upstream_answer_unreadable",
                        "the upstream's answer could not be read whole",
                    );
                }
            }
        }
        let whole = match kept.len() {
            1 => kept.pop().unwrap_or_default(),
            _ => Bytes::from(kept.concat()),
        };
        let usage = if cached {
            TokenUsage::Cached
        } else {
            let (prompt, completion) =
                crate::usage::completion_tokens(std::slice::from_ref(&whole), false);
            TokenUsage::Generated { prompt, completion }
        };
        let used = self.charged(usage);
        if let Some(remaining) = self.grants.settle(usage) {
            parts
                .headers
                .insert(REMAINING, HeaderValue::from(remaining));
        }
        parts.headers.insert(USED, HeaderValue::from(used));
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(whole.len()));
        Response::from_parts(parts, Body::from(whole))
    }

    /// Settles to what was reserved: for an answer whose cost is unknown.
    fn keep_reservation(self) {
        let reserved = self.grants.reserved();
        self.grants.settle(TokenUsage::Generated {
            prompt: reserved,
            completion: 0,
        });
    }

    /// What `usage` charges this request.
    fn charged(&self, usage: TokenUsage) -> u64 {
        match usage {
            TokenUsage::Generated { prompt, completion } => prompt + completion,
            TokenUsage::Cached => self.grants.cached_cost(),
            TokenUsage::Nothing => 0,
        }
    }
}

/// What a stream said so far.
#[derive(Default)]
struct Seen {
    usage: Option<(u64, u64)>,
    content_events: u64,
    finish_reason: Option<String>,
}

/// An event stream on its way to the client: the usage chunk the node
/// asked for removed, the budget's error event added, settled at the end.
struct BudgetedStream {
    inner: Body,
    /// The bytes of an event not yet complete.
    pending: Vec<u8>,
    ready: VecDeque<Frame<Bytes>>,
    seen: Seen,
    budget: Option<(Budget, bool)>,
}

/// The event that tells a client its budget ended the answer.
fn budget_error_event(cap: u32) -> Bytes {
    error_event(
        "token_budget_exhausted",
        &format!("the token budget ended this answer after {cap} completion tokens"),
    )
}

impl BudgetedStream {
    /// Complete events of `pending`, passed on or removed.
    fn pass_events(&mut self) {
        let mut out = Vec::new();
        while let Some(end) = find_event_end(&self.pending) {
            let event: Vec<u8> = self.pending.drain(..end).collect();
            if self.keep(&event) {
                out.extend_from_slice(&event);
            }
        }
        if !out.is_empty() {
            self.ready.push_back(Frame::data(Bytes::from(out)));
        }
    }

    /// Whether `event` goes to the client; notes what it says, and puts the
    /// budget's error event before `[DONE]` when the cap ended the answer.
    fn keep(&mut self, event: &[u8]) -> bool {
        let Some(data) = event_data(event) else {
            return true;
        };
        if data == b"[DONE]" {
            if let Some((budget, false)) = &self.budget
                && budget.reduced
                && self.seen.finish_reason.as_deref() == Some("length")
            {
                self.ready
                    .push_back(Frame::data(budget_error_event(budget.cap)));
            }
            return true;
        }
        let Ok(chunk) = serde_json::from_slice::<Value>(data) else {
            return true;
        };
        let choice = &chunk["choices"][0];
        if let Some(reason) = choice["finish_reason"].as_str() {
            self.seen.finish_reason = Some(reason.to_owned());
        }
        let text = choice["delta"]["content"]
            .as_str()
            .or_else(|| choice["text"].as_str());
        if text.is_some_and(|t| !t.is_empty()) {
            self.seen.content_events += 1;
        }
        let usage = chunk.get("usage").filter(|u| !u.is_null());
        if let Some(usage) = usage {
            self.seen.usage = usage["prompt_tokens"]
                .as_u64()
                .zip(usage["completion_tokens"].as_u64());
            let usage_only = chunk["choices"].as_array().is_none_or(Vec::is_empty);
            let client_asked = self
                .budget
                .as_ref()
                .is_none_or(|(budget, _)| budget.client_wants_usage);
            return !usage_only || client_asked;
        }
        true
    }

    /// Settles the budget, once: with the stream's usage, or for a stream
    /// that ended without one, the estimated prompt and the content events.
    fn settle(&mut self) {
        let Some((budget, cached)) = self.budget.take() else {
            return;
        };
        let usage = if cached {
            TokenUsage::Cached
        } else {
            let (prompt, completion) = self.seen.usage.unwrap_or((
                u64::from(budget.grants.prompt_estimate()),
                self.seen.content_events,
            ));
            TokenUsage::Generated { prompt, completion }
        };
        budget.grants.settle(usage);
    }
}

impl http_body::Body for BudgetedStream {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        loop {
            if let Some(frame) = self.ready.pop_front() {
                return Poll::Ready(Some(Ok(frame)));
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        self.pending.extend_from_slice(&data);
                        self.pass_events();
                    }
                    Err(frame) => {
                        self.ready.push_back(frame);
                    }
                },
                Poll::Ready(None) => {
                    if !self.pending.is_empty() {
                        let rest = std::mem::take(&mut self.pending);
                        self.ready.push_back(Frame::data(Bytes::from(rest)));
                    }
                    self.settle();
                    if let Some(frame) = self.ready.pop_front() {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    return Poll::Ready(None);
                }
                other => return other,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ready.is_empty() && self.pending.is_empty() && self.inner.is_end_stream()
    }
}

impl Drop for BudgetedStream {
    fn drop(&mut self) {
        // A client that left mid-stream: what went by is what it cost.
        self.settle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `chunks` through a [`BudgetedStream`] whose budget capped the
    /// request at 2 tokens; the client did not ask for usage.
    async fn through_capped_stream(chunks: &[&'static str]) -> String {
        let frames: Vec<Result<Bytes, std::io::Error>> = chunks
            .iter()
            .map(|chunk| Ok(Bytes::from_static(chunk.as_bytes())))
            .collect();
        let stream = BudgetedStream {
            inner: Body::from_stream(futures_util::stream::iter(frames)),
            pending: Vec::new(),
            ready: VecDeque::new(),
            seen: Seen::default(),
            budget: Some((
                Budget {
                    grants: TokenGrants::default(),
                    cap: 2,
                    reduced: true,
                    client_wants_usage: false,
                },
                false,
            )),
        };
        let bytes = Body::new(stream).collect().await.expect("body").to_bytes();
        String::from_utf8(bytes.to_vec()).expect("UTF-8")
    }

    #[tokio::test]
    async fn events_split_across_frames_are_filtered_whole() {
        let out = through_capped_stream(&[
            "data: {\"choices\":[{\"text\":\"a\",\"finish_reason\":null}]}\n\nda",
            "ta: {\"choices\":[{\"text\":\"b\",\"finish_reason\":\"length\"}]}\n",
            "\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n",
            "data: [DONE]\n\n",
        ])
        .await;
        let events: Vec<&str> = out.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 4, "{out}");
        assert!(events[1].contains(r#""finish_reason":"length""#));
        // The usage chunk the node asked for is gone; the budget's error
        // event comes before `[DONE]`.
        assert!(!out.contains("usage"), "{out}");
        assert!(events[2].contains(r#""code":"token_budget_exhausted""#));
        assert_eq!(events[3], "data: [DONE]");
    }

    #[tokio::test]
    async fn a_whole_answer_too_large_to_hold_goes_on_unchanged() {
        let budget = Budget {
            grants: TokenGrants::default(),
            cap: 2,
            reduced: false,
            client_wants_usage: false,
        };
        let big: Vec<Result<Bytes, std::io::Error>> = (0..40)
            .map(|i| Ok(Bytes::from(vec![b'a' + (i % 26) as u8; 64 * 1024])))
            .collect();
        let expected: Vec<u8> = big
            .iter()
            .flat_map(|chunk| chunk.as_ref().map(|b| b.to_vec()).unwrap_or_default())
            .collect();
        let response = Response::new(Body::from_stream(futures_util::stream::iter(big)));
        let answered = budget.answer(response).await;
        assert_eq!(answered.status(), 200);
        assert!(
            answered.headers().get(USED).is_none(),
            "not settled by usage"
        );
        let body = answered.into_body().collect().await.expect("body");
        assert_eq!(body.to_bytes(), expected);
    }

    #[tokio::test]
    async fn an_answer_the_client_ended_itself_gets_no_error_event() {
        let out = through_capped_stream(&[
            "data: {\"choices\":[{\"text\":\"a\",\"finish_reason\":\"stop\"}]}\n\n",
            "data: [DONE]\n\n",
        ])
        .await;
        assert!(!out.contains("error"), "{out}");
    }
}
