//! LLM tokens, counted: what an answer's `usage` says it cost, what the
//! cache saved (each hit, and each waiter that followed a generation live,
//! `breakwater_cache_tokens_saved_total`), and what each API key and tier
//! used on routes with `count_tokens` (`breakwater_tokens_total`, and the
//! per-key ledger behind `GET /admin/usage`).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, Response, header};
use http_body::Frame;
use serde_json::Value;

/// (prompt, completion) tokens of an OpenAI-style answer: its `usage`, or
/// for a stream, the last event that carries one (`stream_options.
/// include_usage`). A stream without usage counts its content events as
/// completion tokens (one token per event, as OpenAI streams them) and no
/// prompt tokens. Not a completion: (0, 0).
pub(crate) fn completion_tokens(chunks: &[Bytes], event_stream: bool) -> (u64, u64) {
    if !event_stream {
        let body: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        return serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|answer| usage_of(&answer))
            .unwrap_or((0, 0));
    }
    let mut content_events = 0;
    let mut usage = None;
    for chunk in chunks {
        for line in chunk.split(|&b| b == b'\n') {
            let Some(data) = line.strip_prefix(b"data:") else {
                continue;
            };
            let Ok(event) = serde_json::from_slice::<Value>(data.trim_ascii()) else {
                continue;
            };
            if let Some(counted) = usage_of(&event) {
                usage = Some(counted);
            }
            let choice = &event["choices"][0];
            let text = choice["delta"]["content"]
                .as_str()
                .or_else(|| choice["text"].as_str());
            if text.is_some_and(|t| !t.is_empty()) {
                content_events += 1;
            }
        }
    }
    usage.unwrap_or((0, content_events))
}

fn usage_of(answer: &Value) -> Option<(u64, u64)> {
    let usage = answer.get("usage")?;
    Some((
        usage["prompt_tokens"].as_u64()?,
        usage["completion_tokens"].as_u64()?,
    ))
}

/// Counts what serving `tokens` without a generation saved, `times` over.
pub(crate) fn count_saved((prompt, completion): (u64, u64), times: u64) {
    if prompt > 0 {
        metrics::counter!("breakwater_cache_tokens_saved_total", "kind" => "prompt")
            .increment(prompt * times);
    }
    if completion > 0 {
        metrics::counter!("breakwater_cache_tokens_saved_total", "kind" => "completion")
            .increment(completion * times);
    }
}

/// The most of an answer the meter keeps to read its usage from: an
/// answer longer than this is passed on uncounted (and counted so).
const METERED_BYTES: usize = 1 << 20;

/// One key's totals.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub(crate) struct Totals {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Tokens of answers served from the cache (prompt and completion).
    pub cached_tokens: u64,
}

/// Per-key totals, bounded: the least recently used keys are forgotten
/// beyond `max_keys`.
pub(crate) struct UsageLedger {
    keys: moka::sync::Cache<String, Arc<Mutex<(String, Totals)>>>,
    tier_header: Option<http::HeaderName>,
    /// The tiers seen so far, each a label value of `breakwater_tokens_total`.
    tiers: Mutex<std::collections::HashSet<String>>,
}

/// Distinct tiers labelled before the rest count as `other`: a request
/// header a client might set itself must not mint metric series without
/// bound.
const MAX_TIERS: usize = 64;

impl UsageLedger {
    pub(crate) fn new(config: &edge_config::UsageConfig) -> Self {
        Self {
            keys: moka::sync::Cache::builder()
                .max_capacity(config.max_keys)
                // Idle keys go first when the bound is reached; a day
                // without traffic forgets a key anyway.
                .time_to_idle(Duration::from_secs(24 * 3600))
                .build(),
            tier_header: config
                .tier_header
                .as_deref()
                .and_then(|name| http::HeaderName::from_bytes(name.as_bytes()).ok()),
            tiers: Mutex::default(),
        }
    }

    /// `named` as a tier label: one of the first [`MAX_TIERS`] names seen
    /// (at most 64 bytes each), else `other`.
    fn tier(&self, named: Option<&str>) -> String {
        let Some(named) = named.filter(|n| !n.is_empty() && n.len() <= 64) else {
            return if named.is_some() { "other" } else { "all" }.to_owned();
        };
        let mut tiers = self.tiers.lock().unwrap_or_else(|p| p.into_inner());
        if tiers.contains(named) {
            return named.to_owned();
        }
        if tiers.len() < MAX_TIERS {
            tiers.insert(named.to_owned());
            return named.to_owned();
        }
        "other".to_owned()
    }

    /// What a request is counted under: its API key's digest and its tier.
    pub(crate) fn meter(self: &Arc<Self>, request: &HeaderMap) -> Meter {
        let tier = self.tier(
            self.tier_header
                .as_ref()
                .and_then(|name| request.get(name))
                .map(|v| v.to_str().unwrap_or("")),
        );
        Meter {
            ledger: Arc::clone(self),
            key: key_digest(request),
            tier,
        }
    }

    /// The totals and tier of the key whose digest is `digest`.
    pub(crate) fn totals(&self, digest: &str) -> Option<(String, Totals)> {
        let entry = self.keys.get(digest)?;
        let held = entry.lock().unwrap_or_else(|p| p.into_inner());
        Some(held.clone())
    }

    fn add(&self, key: &str, tier: &str, add: impl FnOnce(&mut Totals)) {
        let entry = self.keys.get_with(key.to_owned(), || {
            Arc::new(Mutex::new((tier.to_owned(), Totals::default())))
        });
        let mut held = entry.lock().unwrap_or_else(|p| p.into_inner());
        held.0 = tier.to_owned();
        add(&mut held.1);
    }
}

/// The API key a request names (`Authorization: Bearer`, else
/// `X-Api-Key`) as the ledger keeps it: the first 32 hex digits of its
/// SHA-256, never the key itself; `anonymous` without one.
pub(crate) fn key_digest(request: &HeaderMap) -> String {
    let bearer = crate::admin::bearer_token(request);
    let key = bearer.or_else(|| request.get("x-api-key").and_then(|v| v.to_str().ok()));
    match key {
        Some(key) if !key.is_empty() => digest_of(key),
        _ => "anonymous".to_owned(),
    }
}

/// The ledger's name for the API key `key`.
pub(crate) fn digest_of(key: &str) -> String {
    let mut digest = breakwater_sandbox::sha256_hex(key.as_bytes());
    digest.truncate(32);
    digest
}

/// One request's place in the ledger.
pub(crate) struct Meter {
    ledger: Arc<UsageLedger>,
    key: String,
    tier: String,
}

impl Meter {
    /// `response` with a body that, once whole, adds its tokens to the
    /// key's totals and to `breakwater_tokens_total`: as cached tokens
    /// when the cache answered it, else as prompt and completion tokens.
    /// Only successful answers count; a client that leaves early is
    /// counted nothing.
    pub(crate) fn wrap(self, response: Response<Body>) -> Response<Body> {
        if !response.status().is_success() {
            return response;
        }
        let headers = response.headers();
        let cached = crate::cache::answered_by_cache(headers);
        let event_stream = crate::cache::is_event_stream(headers);
        let length = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        response.map(|inner| {
            Body::new(Metered {
                inner,
                kept: Vec::new(),
                seen: 0,
                length,
                meter: Some((self, cached, event_stream)),
            })
        })
    }

    fn record(self, cached: bool, (prompt, completion): (u64, u64)) {
        let tier = self.tier.clone();
        let count = |kind: &'static str, tokens: u64| {
            if tokens > 0 {
                metrics::counter!("breakwater_tokens_total", "tier" => tier.clone(), "kind" => kind)
                    .increment(tokens);
            }
        };
        if cached {
            count("cached", prompt + completion);
        } else {
            count("prompt", prompt);
            count("completion", completion);
        }
        self.ledger.add(&self.key, &self.tier, |totals| {
            if cached {
                totals.cached_tokens += prompt + completion;
            } else {
                totals.prompt_tokens += prompt;
                totals.completion_tokens += completion;
            }
        });
    }
}

/// An answer's body on its way out, kept (up to [`METERED_BYTES`]) to read
/// its usage from when it ends.
struct Metered {
    inner: Body,
    kept: Vec<Bytes>,
    /// Bytes gone by so far, and how many the answer declared.
    seen: u64,
    length: Option<u64>,
    /// The meter, whether the cache answered, whether it is a stream;
    /// taken when counted (or given up).
    meter: Option<(Meter, bool, bool)>,
}

impl Metered {
    /// The whole answer went by: its tokens are counted, once.
    fn finish(&mut self) {
        if let Some((meter, cached, event_stream)) = self.meter.take() {
            let tokens = completion_tokens(&std::mem::take(&mut self.kept), event_stream);
            meter.record(cached, tokens);
        }
    }
}

impl http_body::Body for Metered {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && self.meter.is_some()
                {
                    self.seen += data.len() as u64;
                    if self.seen > METERED_BYTES as u64 {
                        self.meter = None;
                        self.kept = Vec::new();
                        metrics::counter!("breakwater_tokens_unmetered_total").increment(1);
                    } else {
                        let data = data.clone();
                        self.kept.push(data);
                    }
                }
                // A body of known length is not polled past its last
                // byte: its end is seen here.
                if self.inner.is_end_stream() || self.length == Some(self.seen) {
                    self.finish();
                }
            }
            Poll::Ready(None) => self.finish(),
            Poll::Ready(Some(Err(_))) => self.meter = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_are_bounded_label_values() {
        let ledger = UsageLedger::new(&edge_config::UsageConfig {
            tier_header: Some("x-tier".to_owned()),
            max_keys: 10,
        });
        assert_eq!(ledger.tier(None), "all");
        assert_eq!(ledger.tier(Some("")), "other");
        assert_eq!(ledger.tier(Some(&"x".repeat(65))), "other");
        for i in 0..MAX_TIERS {
            assert_eq!(ledger.tier(Some(&format!("t{i}"))), format!("t{i}"));
        }
        assert_eq!(ledger.tier(Some("one-too-many")), "other");
        assert_eq!(ledger.tier(Some("t0")), "t0", "known tiers keep their name");
    }

    #[test]
    fn a_key_is_kept_as_its_digest_from_bearer_or_x_api_key() {
        let with = |name: &'static str, value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(name, http::HeaderValue::from_static(value));
            key_digest(&headers)
        };
        let digest = with("authorization", "Bearer k-1");
        assert_eq!(digest, digest_of("k-1"));
        assert_eq!(digest.len(), 32);
        assert_eq!(with("x-api-key", "k-1"), digest);
        assert_eq!(with("authorization", "Basic a2V5"), "anonymous");
        assert_eq!(key_digest(&HeaderMap::new()), "anonymous");
    }

    #[test]
    fn usage_comes_from_the_answer_or_its_last_usage_event() {
        let whole = Bytes::from_static(
            br#"{"id":"x","choices":[{"message":{"content":"Paris."}}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}"#,
        );
        assert_eq!(completion_tokens(&[whole], false), (12, 3));
        let with_usage = [
            Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"Pa\"}}]}\n\n"),
            Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"ris\"}}]}\n\n"),
            Bytes::from_static(
                b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n",
            ),
        ];
        assert_eq!(completion_tokens(&with_usage, true), (9, 2));
        // Without usage: one token per content event; the role and the
        // final events carry none.
        let without = [
            Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n"),
            Bytes::from_static(b"data: {\"choices\":[{\"text\":\"a\"}]}\n\n"),
            Bytes::from_static(b"data: {\"choices\":[{\"text\":\"b\"}]}\n\n"),
            Bytes::from_static(b"data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n"),
        ];
        assert_eq!(completion_tokens(&without, true), (0, 2));
        assert_eq!(
            completion_tokens(&[Bytes::from_static(b"<html>")], false),
            (0, 0)
        );
    }
}
