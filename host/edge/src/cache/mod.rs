//! The response cache in front of upstream pools, on routes with
//! `cache = true`: an RFC 9111 shared cache with a memory and a disk tier
//! (and a tier shared by the cluster, in Redis), coalesced misses,
//! stale-while-revalidate, stale-if-error, streamed (SSE) answers recorded
//! for replay, and purges.
//!
//! Plugins steer it per request (key, TTL, bypass); the node only
//! implements the mechanism.

pub(crate) mod entry;
mod flight;
mod identity;
pub(crate) mod policy;
mod shared;
mod store;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use edge_config::CacheConfig;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;

use crate::cluster::SharedCacheSettings;
use crate::error::error_response;
use crate::limits::BodyLimitTrip;
use crate::proxy::{ClientConnection, UpstreamUnreachable};
use crate::static_files::range::{self, ByteRange, RangeOutcome};
use crate::static_files::{conditional, header_str, insert};
use crate::upstream::{RequestDeadline, ResumePolicy, UpstreamPool};
use crate::usage;
use entry::Entry;
use flight::{Flights, LeaderGuard, Recording, Role, SharedHead, Tee, Waited};
use policy::{Directives, StoreContext, now_ms};
pub use store::CacheError;
use store::{Purged, Selector, Tier, Tiers};

const X_CACHE: &str = "x-cache";
/// On every answer from a stored entry: `memory`, `disk` or `shared`.
const X_CACHE_TIER: &str = "x-cache-tier";
const SURROGATE_KEY: &str = "surrogate-key";

/// What a route adds to the upstream's own directives.
#[derive(Debug, Clone, Default)]
pub(crate) struct RoutePolicy {
    /// The route's metrics label (its pool's name): a node's completions
    /// route and its site traffic are told apart in the cache metrics.
    pub name: Arc<str>,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
}

/// A plugin's say over one request (`cache-key`, `cache-ttl-ms`,
/// `cache-bypass` in the request decision).
#[derive(Debug, Clone, Default)]
pub(crate) struct Overrides {
    pub key: Option<String>,
    pub ttl: Option<Duration>,
    pub bypass: bool,
}

/// Where misses go.
pub(crate) struct Origin {
    pub pool: Arc<UpstreamPool>,
    pub client: ClientConnection,
}

impl Origin {
    async fn fetch(&self, request: Request<Body>, trip: &BodyLimitTrip) -> Response<Body> {
        self.pool.forward(request, &self.client, trip).await
    }

    /// Whether `entry` was made by a model version no endpoint of the pool
    /// serves any more (a channel moved, the GPU hosts swapped): then it is
    /// never fresh, whatever its TTL, and is served only as a stale
    /// fallback when no upstream answers.
    fn retired(&self, entry: &Entry) -> bool {
        let retired = entry
            .headers
            .get(breakwater_wire::MODEL_VERSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|version| self.pool.serves_model_version(version) == Some(false));
        if retired {
            metrics::counter!("breakwater_cache_retired_model_entries_total").increment(1);
        }
        retired
    }
}

/// What a purge selects.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PurgeRequest {
    /// A cache key: the plugin's, or `host/path?query` by default.
    pub key: Option<String>,
    /// A URL prefix: starting with `/`, a path prefix on any host;
    /// otherwise `host/path…`.
    pub prefix: Option<String>,
    /// A `Surrogate-Key` tag.
    pub tag: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Hit,
    Miss,
    Stale,
    Bypass,
}

/// The admin purge: a JSON object with one or more of `key`, `prefix`,
/// `tag`; answers `{"purged":{"memory":N,"disk":M}}` (responses removed),
/// with `"shared":K` when the cluster shares a cache tier. There a prefix
/// purge retires its entries by generation and is not counted in `K`.
/// When Redis cannot be reached, the node's own tiers are purged all the
/// same but the answer is a 503 with `"shared":null`: the shared tier
/// still holds what was asked, and the purge (which may be repeated) must
/// be sent again.
pub(crate) async fn purge_endpoint(cache: Option<&ResponseCache>, body: &[u8]) -> Response<Body> {
    let Some(cache) = cache else {
        return error_response(
            StatusCode::NOT_FOUND,
            "no_cache",
            "no route on this node has `cache = true`",
        );
    };
    let request = match serde_json::from_slice::<PurgeRequest>(body) {
        Ok(r) if r.key.is_some() || r.prefix.is_some() || r.tag.is_some() => r,
        Ok(_) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_purge",
                "name what to purge: {\"key\": …}, {\"prefix\": …} or {\"tag\": …}",
            );
        }
        Err(error) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_purge",
                &format!("the purge request is not valid JSON of key/prefix/tag: {error}"),
            );
        }
    };
    let purged = cache.purge(&request).await;
    let mut counts = serde_json::json!({ "memory": purged.memory, "disk": purged.disk });
    let mut answer = serde_json::json!({});
    let mut status = StatusCode::OK;
    match purged.shared {
        None => {}
        Some(Ok(shared)) => counts["shared"] = shared.into(),
        Some(Err(unavailable)) => {
            counts["shared"] = serde_json::Value::Null;
            status = StatusCode::SERVICE_UNAVAILABLE;
            answer["error"] = serde_json::json!({
                "status": status.as_u16(),
                "code": "shared_cache_unavailable",
                "message": format!(
                    "this node's tiers are purged, the shared tier is not ({unavailable}): send the purge again"
                ),
            });
        }
    }
    answer["purged"] = counts;
    let mut response = Response::new(Body::from(answer.to_string()));
    *response.status_mut() = status;
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Hit => "HIT",
            Outcome::Miss => "MISS",
            Outcome::Stale => "STALE",
            Outcome::Bypass => "BYPASS",
        }
    }
}

/// One cacheable request, owned so a background refresh can carry it.
#[derive(Clone)]
struct Ask {
    primary: String,
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    cc: Directives,
    route: RoutePolicy,
    plugin_keyed: bool,
    ttl: Option<Duration>,
    /// Host and path with query: the default key and the purge URL.
    url: String,
    /// A background refresh counts no request.
    background: bool,
    /// The route's deadline, for the client's own fetch (a refresh behind
    /// a stale answer outlives it and takes the pool's).
    deadline: Option<RequestDeadline>,
    resume: Option<ResumePolicy>,
}

pub(crate) struct ResponseCache {
    tiers: Tiers,
    flights: Arc<Flights>,
    coalesce_wait: Duration,
    max_object_bytes: usize,
}

impl ResponseCache {
    /// Opens the tiers; `shared` adds L3 (needs the Tokio runtime).
    pub(crate) fn open(
        config: &CacheConfig,
        shared: Option<SharedCacheSettings>,
    ) -> Result<Self, CacheError> {
        Ok(Self {
            tiers: Tiers::open(config, shared)?,
            flights: Arc::default(),
            coalesce_wait: config.coalesce_wait,
            max_object_bytes: usize::try_from(config.max_object_bytes).unwrap_or(usize::MAX),
        })
    }

    /// Answers `request` from the cache or through `origin`.
    pub(crate) async fn serve(
        self: &Arc<Self>,
        route: RoutePolicy,
        overrides: Overrides,
        request: Request<Body>,
        origin: Arc<Origin>,
        trip: BodyLimitTrip,
    ) -> Response<Body> {
        use tracing::Instrument;
        let span = tracing::info_span!(
            target: breakwater_wire::trace::TARGET,
            "cache",
            breakwater.cache.result = tracing::field::Empty,
            breakwater.cache.tier = tracing::field::Empty,
        );
        let response = self
            .answer(route, overrides, request, origin, trip)
            .instrument(span.clone())
            .await;
        if !span.is_disabled() {
            let header = |name| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none")
            };
            span.record("breakwater.cache.result", header(X_CACHE));
            span.record("breakwater.cache.tier", header(X_CACHE_TIER));
        }
        // A miss streams from the origin through the cache: the span ends
        // with the body, like its upstream attempt inside it.
        crate::observe::held_to_the_end(response, span)
    }

    async fn answer(
        self: &Arc<Self>,
        route: RoutePolicy,
        overrides: Overrides,
        request: Request<Body>,
        origin: Arc<Origin>,
        trip: BodyLimitTrip,
    ) -> Response<Body> {
        let (parts, body) = request.into_parts();
        let url = default_key(&parts);
        let method = parts.method.clone();
        // A body on GET or HEAD asks something the key does not say: the
        // origin gets the request as sent, and its answer is not stored.
        let bodied_read = (method == Method::GET || method == Method::HEAD)
            && !http_body::Body::is_end_stream(&body);
        let ranged = parts.headers.contains_key(header::RANGE);
        let bypass = overrides.bypass
            || bodied_read
            || (ranged && method != Method::GET)
            || parts.headers.contains_key(header::UPGRADE);
        let cacheable = method == Method::GET
            || method == Method::HEAD
            || (overrides.key.is_some() && method == Method::POST);
        if bypass || !cacheable {
            let response = origin
                .fetch(Request::from_parts(parts.clone_head(), body), &trip)
                .await;
            if !method.is_safe() && overrides.key.is_none() {
                let status = response.status();
                if status.is_success() || status.is_redirection() {
                    self.invalidate(&parts, &url, response.headers()).await;
                }
            }
            count(&route.name, None, Outcome::Bypass);
            return marked(response, Outcome::Bypass);
        }
        let ask = Ask {
            primary: overrides.key.clone().unwrap_or_else(|| url.clone()),
            method,
            uri: parts.uri.clone(),
            version: parts.version,
            cc: Directives::request(&parts.headers),
            headers: parts.headers,
            route,
            plugin_keyed: overrides.key.is_some(),
            ttl: overrides.ttl,
            url,
            background: false,
            deadline: parts.extensions.get::<RequestDeadline>().copied(),
            resume: parts.extensions.get::<ResumePolicy>().copied(),
        };
        let stored = {
            use tracing::Instrument;
            let span = tracing::info_span!(
                target: breakwater_wire::trace::TARGET,
                "cache.lookup",
                breakwater.cache.tier = tracing::field::Empty,
                breakwater.cache.found = tracing::field::Empty,
            );
            let stored = self
                .tiers
                .lookup(&ask.primary, &ask.headers)
                .instrument(span.clone())
                .await;
            if !span.is_disabled() {
                span.record("breakwater.cache.found", stored.is_some());
                span.record(
                    "breakwater.cache.tier",
                    stored.as_ref().map_or("none", |(_, tier)| tier.label()),
                );
            }
            stored
        };
        if ranged {
            return serve_range(ask, stored, body, &origin, &trip).await;
        }
        match stored {
            Some((entry, tier)) => {
                self.serve_stored(ask, entry, tier, body, origin, trip)
                    .await
            }
            None if ask.cc.only_if_cached => not_cached(&ask),
            None => self.fetch(ask, body, origin, trip, None).await,
        }
    }

    async fn serve_stored(
        self: &Arc<Self>,
        ask: Ask,
        entry: Arc<Entry>,
        tier: Tier,
        body: Body,
        origin: Arc<Origin>,
        trip: BodyLimitTrip,
    ) -> Response<Body> {
        if origin.retired(&entry) {
            if ask.cc.only_if_cached {
                return not_cached(&ask);
            }
            return self
                .fetch(ask, body, origin, trip, Some((entry, tier)))
                .await;
        }
        let age = entry.current_age_ms(now_ms());
        if fresh_hit(&ask, &entry, age) {
            return answer(&ask, &entry, Outcome::Hit, Some(tier));
        }
        let stored_cc = Directives::response(&entry.headers);
        let fresh = age < entry.freshness_ms;
        let must_validate = stored_no_cache(&entry) || ask.cc.no_cache;
        let client_ok = client_accepts(&ask, &entry, age);
        let may_be_stale = !must_validate && !fresh && !stored_cc.forbids_stale();
        let staleness = age.saturating_sub(entry.freshness_ms);
        if may_be_stale
            && let Some(max_stale) = ask.cc.max_stale
            && max_stale.is_none_or(|s| staleness <= s * 1000)
        {
            return answer(&ask, &entry, Outcome::Stale, Some(tier));
        }
        if ask.cc.only_if_cached {
            return not_cached(&ask);
        }
        if may_be_stale && client_ok && staleness <= entry.swr_ms && ask.method != Method::POST {
            self.refresh_behind(&ask, &origin, (entry.clone(), tier));
            return answer(&ask, &entry, Outcome::Stale, Some(tier));
        }
        self.fetch(ask, body, origin, trip, Some((entry, tier)))
            .await
    }

    /// A miss, or a stored answer that needs validating: one upstream
    /// request per key at a time; HEAD goes alone and stores nothing.
    async fn fetch(
        self: &Arc<Self>,
        ask: Ask,
        body: Body,
        origin: Arc<Origin>,
        trip: BodyLimitTrip,
        stale: Option<(Arc<Entry>, Tier)>,
    ) -> Response<Body> {
        if ask.method == Method::HEAD {
            let request = upstream_request(&ask, &ask.headers, body);
            count(&ask.route.name, None, Outcome::Miss);
            return marked(origin.fetch(request, &trip).await, Outcome::Miss);
        }
        match self.flights.join(&ask.primary, self.max_object_bytes) {
            Role::Leader(guard) => {
                self.lead(ask, body, &origin, &trip, stale, Some(guard))
                    .await
            }
            Role::Follower(rec) => {
                match rec.wait_head(self.coalesce_wait).await {
                    // Only what the waiter could have had from the store:
                    // its Vary values, and fresh for its own request.
                    Waited::Ready(head)
                        if head.vary == policy::vary_key(&head.vary_names, &ask.headers)
                            && fresh_hit(
                                &ask,
                                &head.stored,
                                head.stored.current_age_ms(now_ms()),
                            ) =>
                    {
                        metrics::counter!("breakwater_cache_coalesced_waits_total", "outcome" => "shared").increment(1);
                        return follow(&ask, &head, &rec);
                    }
                    Waited::TimedOut => {
                        metrics::counter!("breakwater_cache_coalesced_waits_total", "outcome" => "timeout").increment(1);
                    }
                    _ => {
                        metrics::counter!("breakwater_cache_coalesced_waits_total", "outcome" => "pass").increment(1);
                        // The leader may have refreshed the entry (a 304)
                        // rather than shared a body.
                        if let Some((entry, tier)) =
                            self.tiers.lookup(&ask.primary, &ask.headers).await
                            && fresh_hit(&ask, &entry, entry.current_age_ms(now_ms()))
                            && !origin.retired(&entry)
                        {
                            return answer(&ask, &entry, Outcome::Hit, Some(tier));
                        }
                    }
                }
                self.lead(ask, body, &origin, &trip, stale, None).await
            }
        }
    }

    /// Goes upstream (conditionally when a stale entry has validators),
    /// then stores, refreshes, or falls back to the stale entry.
    async fn lead(
        self: &Arc<Self>,
        ask: Ask,
        body: Body,
        origin: &Origin,
        trip: &BodyLimitTrip,
        stale: Option<(Arc<Entry>, Tier)>,
        guard: Option<LeaderGuard>,
    ) -> Response<Body> {
        let mut headers = ask.headers.clone();
        // The cache asks for the whole answer and judges the client's
        // own conditionals itself against it.
        headers.remove(header::IF_NONE_MATCH);
        headers.remove(header::IF_MODIFIED_SINCE);
        if let Some((stale, _)) = &stale {
            if let Some(etag) = stale.headers.get(header::ETAG) {
                headers.insert(header::IF_NONE_MATCH, etag.clone());
            }
            if let Some(modified) = stale.headers.get(header::LAST_MODIFIED) {
                headers.insert(header::IF_MODIFIED_SINCE, modified.clone());
            }
        }
        let request_time = now_ms();
        let response = origin
            .fetch(upstream_request(&ask, &headers, body), trip)
            .await;
        let response_time = now_ms();
        let status = response.status();

        if let Some((stale, tier)) = &stale {
            if status == StatusCode::NOT_MODIFIED {
                let refreshed =
                    freshen(stale, response.headers(), request_time, response_time, &ask);
                let names = policy::vary_names(&refreshed.headers).unwrap_or_default();
                let vary = policy::vary_key(&names, &ask.headers);
                let refreshed = Arc::new(refreshed);
                self.tiers
                    .insert(&ask.primary, names, &vary, (*refreshed).clone())
                    .await;
                let mut answered = with_tier(answer(&ask, &refreshed, Outcome::Hit, None), *tier);
                // The cookie was set for this client only: not stored.
                for cookie in response.headers().get_all(header::SET_COOKIE) {
                    answered
                        .headers_mut()
                        .append(header::SET_COOKIE, cookie.clone());
                }
                return answered;
            }
            let stale_cc = Directives::response(&stale.headers);
            let staleness = stale
                .current_age_ms(now_ms())
                .saturating_sub(stale.freshness_ms);
            // Disconnected from the origin, any staleness may be served
            // (RFC 9111 §4.2.4); an origin's own error only within its
            // stale-if-error window.
            let disconnected = response.extensions().get::<UpstreamUnreachable>().is_some();
            if is_error(status)
                && !stale_cc.forbids_stale()
                && (disconnected || staleness <= stale.sie_ms)
            {
                return with_tier(answer(&ask, stale, Outcome::Stale, None), *tier);
            }
        }

        let response_cc = Directives::response(response.headers());
        let ctx = StoreContext {
            method: &ask.method,
            request_headers: &ask.headers,
            plugin_keyed: ask.plugin_keyed,
            plugin_ttl: ask.ttl,
        };
        let too_big = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .is_some_and(|len| len > self.max_object_bytes);
        let verdict = policy::storable(&ctx, status, response.headers(), &response_cc);
        if too_big || verdict.is_err() {
            tracing::debug!(key = %ask.primary, reason = verdict.err().unwrap_or("too big"), "not stored");
            drop(guard);
            count(&ask.route.name, None, Outcome::Miss);
            return client_view(&ask, marked(response, Outcome::Miss));
        }

        let (mut parts, upstream_body) = response.into_parts();
        if !parts.headers.contains_key(header::DATE)
            && let Ok(date) = HeaderValue::from_str(&httpdate::fmt_http_date(
                std::time::UNIX_EPOCH + Duration::from_millis(response_time),
            ))
        {
            parts.headers.insert(header::DATE, date);
        }
        let vary_names = policy::vary_names(&parts.headers).unwrap_or_default();
        let vary = policy::vary_key(&vary_names, &ask.headers);
        let template = Entry {
            status,
            headers: shareable(&parts.headers),
            chunks: Vec::new(),
            request_time_ms: request_time,
            response_time_ms: response_time,
            initial_age_ms: policy::corrected_initial_age_ms(
                &parts.headers,
                request_time,
                response_time,
            ),
            freshness_ms: policy::freshness_ms(
                status,
                &parts.headers,
                &response_cc,
                ask.ttl,
                response_time,
            ),
            swr_ms: window(
                response_cc.stale_while_revalidate,
                ask.route.stale_while_revalidate,
            ),
            sie_ms: window(response_cc.stale_if_error, ask.route.stale_if_error),
            url: ask.url.clone(),
            tags: parts
                .headers
                .get_all(SURROGATE_KEY)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(str::split_whitespace)
                .map(str::to_owned)
                .collect(),
            ttl_by_plugin: ask.ttl.is_some(),
            tokens: (0, 0),
        };
        let head = Arc::new(SharedHead {
            stored: template.clone(),
            vary_names,
            vary,
        });
        let (flights, rec) = match guard {
            Some(guard) => {
                let rec = guard.recording().clone();
                let (flights, _, _) = guard.hand_on();
                (Some(flights), rec)
            }
            None => (None, Arc::new(Recording::new(self.max_object_bytes))),
        };
        let completion = ask.method == Method::POST && ask.plugin_keyed;
        let sse = is_event_stream(&template.headers);
        rec.publish_head(head.clone(), completion.then_some(sse));
        let cache = self.clone();
        let key = ask.primary.clone();
        let rec_for_end = rec.clone();
        // A completion's stream that ends without `data: [DONE]` was cut
        // short by the generator (an error event, a deadline), however
        // cleanly its body ended: never stored.
        let needs_done = ask.method == Method::POST && sse;
        let on_end: flight::OnEnd = Box::new(move |complete| {
            let handle = tokio::runtime::Handle::try_current();
            let (true, Ok(handle)) = (complete, handle) else {
                // Broken off: newcomers must not join it, not even briefly.
                if let Some(flights) = flights {
                    flights.remove(&key, &rec_for_end);
                }
                return;
            };
            handle.spawn(async move {
                if complete
                    && let Some(chunks) = rec_for_end.chunks()
                    && (!needs_done || ends_with_done(&chunks))
                {
                    let tokens = if completion {
                        rec_for_end.completion_tokens(sse)
                    } else {
                        (0, 0)
                    };
                    let entry = Entry {
                        chunks: if sse {
                            split_events(chunks)
                        } else {
                            join(chunks)
                        },
                        tokens,
                        ..template
                    };
                    cache
                        .tiers
                        .insert(&key, head.vary_names.clone(), &head.vary, entry)
                        .await;
                }
                // Only now: until the entry is stored, newcomers join the
                // (complete) recording instead of missing.
                if let Some(flights) = flights {
                    flights.remove(&key, &rec_for_end);
                }
            });
        });
        let body = Body::new(Tee::new(upstream_body, rec, on_end));
        count(&ask.route.name, None, Outcome::Miss);
        client_view(
            &ask,
            marked(Response::from_parts(parts, body), Outcome::Miss),
        )
    }

    /// Serves stale now; one request refreshes the entry behind it.
    fn refresh_behind(
        self: &Arc<Self>,
        ask: &Ask,
        origin: &Arc<Origin>,
        stale: (Arc<Entry>, Tier),
    ) {
        let Some(guard) = self.flights.try_lead(&ask.primary, self.max_object_bytes) else {
            return;
        };
        let mut ask = ask.clone();
        ask.background = true;
        ask.deadline = None;
        ask.method = Method::GET;
        let cache = self.clone();
        let origin = origin.clone();
        tokio::spawn(async move {
            let trip = BodyLimitTrip::default();
            let response = cache
                .lead(ask, Body::empty(), &origin, &trip, Some(stale), Some(guard))
                .await;
            // Reading the body to its end is what stores it.
            let mut body = response.into_body();
            while let Some(Ok(_)) = body.frame().await {}
        });
    }

    /// Unsafe methods that succeed make the stored answers for the URL
    /// (and a same-host `Location`/`Content-Location`) stale: removed.
    async fn invalidate(&self, parts: &Parts, url: &str, response: &HeaderMap) {
        self.tiers.invalidate(url).await;
        let host = host_of(parts);
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let Some(target) = response
                .get(&name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<Uri>().ok())
            else {
                continue;
            };
            let same_host = target
                .authority()
                .is_none_or(|a| a.as_str().eq_ignore_ascii_case(&host));
            let path = target.path_and_query().map_or("/", |pq| pq.as_str());
            if same_host && path.starts_with('/') {
                self.tiers.invalidate(&format!("{host}{path}")).await;
            }
        }
    }

    /// Removes what `what` selects from every tier: the responses removed
    /// from each.
    pub(crate) async fn purge(&self, what: &PurgeRequest) -> Purged {
        let selectors = [
            what.key.as_deref().map(Selector::Key),
            what.prefix.as_deref().map(Selector::UrlPrefix),
            what.tag.as_deref().map(Selector::Tag),
        ];
        let mut total = Purged::default();
        for selector in selectors.into_iter().flatten() {
            total = total.and(self.tiers.purge(selector).await);
        }
        total
    }
}

fn window(from_response: Option<u64>, route_default: Duration) -> u64 {
    from_response.map_or_else(|| policy::millis(route_default), |s| s * 1000)
}

fn is_error(status: StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

pub(crate) fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"))
}

/// Whether an event stream's last event is OpenAI's `data: [DONE]`.
fn ends_with_done(chunks: &[Bytes]) -> bool {
    let mut tail = Vec::new();
    for chunk in chunks.iter().rev() {
        tail.splice(0..0, chunk.iter().copied());
        if tail.len() >= 32 {
            break;
        }
    }
    let text = String::from_utf8_lossy(&tail);
    let trimmed = text.trim_end_matches(['\r', '\n']);
    trimmed
        .rsplit(['\r', '\n'])
        .next()
        .is_some_and(|line| line.trim_end() == "data: [DONE]")
}

/// One chunk for a plain body: fewer, larger frames to replay.
fn join(chunks: Vec<Bytes>) -> Vec<Bytes> {
    if chunks.len() <= 1 {
        return chunks;
    }
    let mut all = Vec::with_capacity(chunks.iter().map(Bytes::len).sum());
    for chunk in chunks {
        all.extend_from_slice(&chunk);
    }
    vec![Bytes::from(all)]
}

/// One chunk per event (an event ends with a blank line), whatever the
/// upstream's framing was, so replays keep event boundaries.
fn split_events(chunks: Vec<Bytes>) -> Vec<Bytes> {
    let all = join(chunks).pop().unwrap_or_default();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < all.len() {
        let rest = &all[i..];
        let blank = if rest.starts_with(b"\r\n\r\n") {
            4
        } else if rest.starts_with(b"\n\n") || rest.starts_with(b"\r\r") {
            2
        } else {
            0
        };
        if blank > 0 {
            out.push(all.slice(start..i + blank));
            start = i + blank;
            i = start;
        } else {
            i += 1;
        }
    }
    if start < all.len() {
        out.push(all.slice(start..));
    }
    out
}

/// The stored entry updated by a 304 (RFC 9111 §4.3.4).
fn freshen(
    stale: &Entry,
    update: &HeaderMap,
    request_time: u64,
    response_time: u64,
    ask: &Ask,
) -> Entry {
    let mut headers = stale.headers.clone();
    for name in update.keys() {
        if policy::keeps_stored_value(name) {
            continue;
        }
        headers.remove(name);
        for value in update.get_all(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    let headers = shareable(&headers);
    let cc = Directives::response(&headers);
    Entry {
        initial_age_ms: policy::corrected_initial_age_ms(&headers, request_time, response_time),
        freshness_ms: policy::freshness_ms(stale.status, &headers, &cc, ask.ttl, response_time),
        swr_ms: window(cc.stale_while_revalidate, ask.route.stale_while_revalidate),
        sie_ms: window(cc.stale_if_error, ask.route.stale_if_error),
        request_time_ms: request_time,
        response_time_ms: response_time,
        headers,
        ttl_by_plugin: ask.ttl.is_some(),
        ..stale.clone()
    }
}

fn host_of(parts: &Parts) -> String {
    parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// `host/path?query`, the host lower-cased as sent (port included).
fn default_key(parts: &Parts) -> String {
    let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    format!("{}{path}", host_of(parts))
}

fn upstream_request(ask: &Ask, headers: &HeaderMap, body: Body) -> Request<Body> {
    let mut request = Request::new(body);
    *request.method_mut() = ask.method.clone();
    *request.uri_mut() = ask.uri.clone();
    *request.version_mut() = ask.version;
    *request.headers_mut() = headers.clone();
    if let Some(deadline) = ask.deadline {
        request.extensions_mut().insert(deadline);
    }
    if let Some(resume) = ask.resume {
        request.extensions_mut().insert(resume);
    }
    request.headers_mut().insert(
        HeaderName::from_static("surrogate-capability"),
        HeaderValue::from_static(policy::SURROGATE_CAPABILITY),
    );
    request
}

fn count(route: &str, tier: Option<Tier>, outcome: Outcome) {
    let tier = tier.map_or("none", Tier::label);
    let result = match outcome {
        Outcome::Hit => "hit",
        Outcome::Miss => "miss",
        Outcome::Stale => "stale",
        Outcome::Bypass => "bypass",
    };
    metrics::counter!("breakwater_cache_requests_total", "route" => route.to_owned(), "tier" => tier, "result" => result)
        .increment(1);
}

/// Whether the cache answered without an upstream request of its own: a
/// hit (stored, or a leader's answer followed live) or a stale answer.
pub(crate) fn answered_by_cache(headers: &HeaderMap) -> bool {
    headers.get(X_CACHE).is_some_and(|v| {
        v.as_bytes() == Outcome::Hit.label().as_bytes()
            || v.as_bytes() == Outcome::Stale.label().as_bytes()
    })
}

fn marked(mut response: Response<Body>, outcome: Outcome) -> Response<Body> {
    response
        .headers_mut()
        .insert(X_CACHE, HeaderValue::from_static(outcome.label()));
    response
}

/// Says which tier a stored answer came from.
fn with_tier(mut response: Response<Body>, tier: Tier) -> Response<Body> {
    response
        .headers_mut()
        .insert(X_CACHE_TIER, HeaderValue::from_static(tier.label()));
    response
}

/// The last touches every cached answer gets: tags stay inside, HEAD has
/// no body, and the client's own validators may turn it into a 304.
fn client_view(ask: &Ask, mut response: Response<Body>) -> Response<Body> {
    response.headers_mut().remove(SURROGATE_KEY);
    // Meant for this cache, as Fastly and Akamai treat it.
    response.headers_mut().remove(policy::SURROGATE_CONTROL);
    if response.status() == StatusCode::OK && policy::not_modified(&ask.headers, response.headers())
    {
        let mut not_modified = Response::new(Body::empty());
        *not_modified.status_mut() = StatusCode::NOT_MODIFIED;
        for name in policy::NOT_MODIFIED_HEADERS.iter().chain([
            &header::AGE,
            &HeaderName::from_static(X_CACHE),
            &HeaderName::from_static(X_CACHE_TIER),
        ]) {
            for value in response.headers().get_all(name) {
                not_modified
                    .headers_mut()
                    .append(name.clone(), value.clone());
            }
        }
        return not_modified;
    }
    if ask.method == Method::HEAD {
        let (parts, _) = response.into_parts();
        return Response::from_parts(parts, Body::empty());
    }
    response
}

/// A stored entry as an answer, with its current `Age`.
fn answer(ask: &Ask, entry: &Entry, outcome: Outcome, tier: Option<Tier>) -> Response<Body> {
    if !ask.background {
        count(&ask.route.name, tier, outcome);
        if matches!(outcome, Outcome::Hit | Outcome::Stale) {
            usage::count_saved(entry.tokens, 1);
        }
    }
    let body = match own_identity(ask) {
        Some(mut identity) => body_of(
            &entry
                .chunks
                .iter()
                .map(|chunk| identity.rewrite(chunk.clone()))
                .collect::<Vec<_>>(),
        ),
        None => body_of(&entry.chunks),
    };
    let mut response = marked(stored_response(entry, body), outcome);
    if let Some(tier) = tier {
        response = with_tier(response, tier);
    }
    client_view(ask, response)
}

/// For a shared completion (a plugin-keyed `POST`), the rewriting that
/// gives this client's copy its own id and time.
fn own_identity(ask: &Ask) -> Option<identity::Identity> {
    (ask.method == Method::POST && ask.plugin_keyed)
        .then(|| identity::Identity::new(now_ms() / 1000))
}

/// `entry`'s status and header fields over `body`, with its current `Age`.
fn stored_response(entry: &Entry, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = entry.status;
    *response.headers_mut() = entry.headers.clone();
    let age = entry.current_age_ms(now_ms()) / 1000;
    response
        .headers_mut()
        .insert(header::AGE, HeaderValue::from(age));
    response
}

fn body_of(chunks: &[Bytes]) -> Body {
    match chunks {
        [] => Body::empty(),
        [one] => Body::from(one.clone()),
        many => Body::from_stream(futures_util::stream::iter(
            many.iter()
                .cloned()
                .map(Ok::<_, std::convert::Infallible>)
                .collect::<Vec<_>>(),
        )),
    }
}

/// A `Range` request on GET is cut from a stored complete answer that is a
/// fresh hit for it, as Varnish does; otherwise the origin answers the
/// range itself and nothing is stored, since the cache keeps complete
/// answers only.
async fn serve_range(
    ask: Ask,
    stored: Option<(Arc<Entry>, Tier)>,
    body: Body,
    origin: &Origin,
    trip: &BodyLimitTrip,
) -> Response<Body> {
    if let Some((entry, tier)) = stored
        && entry.status == StatusCode::OK
        && fresh_hit(&ask, &entry, entry.current_age_ms(now_ms()))
    {
        return ranged_answer(&ask, &entry, tier);
    }
    let response = origin
        .fetch(upstream_request(&ask, &ask.headers, body), trip)
        .await;
    count(&ask.route.name, None, Outcome::Bypass);
    marked(response, Outcome::Bypass)
}

/// RFC 9110 §14 over a stored 200: one range gets 206, none that overlaps
/// gets 416, and several get the whole answer (which §14.2 allows and
/// Varnish does too); a failed `If-Range` or a client's validator that
/// matches (304 first, §13.2.2) gets the stored answer as `answer` gives it.
fn ranged_answer(ask: &Ask, entry: &Entry, tier: Tier) -> Response<Body> {
    let total: u64 = entry.chunks.iter().map(|c| c.len() as u64).sum();
    let if_range_holds = header_str(&ask.headers, &header::IF_RANGE).is_none_or(|if_range| {
        let modified = header_str(&entry.headers, &header::LAST_MODIFIED)
            .and_then(|date| httpdate::parse_http_date(date).ok());
        let etag = header_str(&entry.headers, &header::ETAG).unwrap_or_default();
        conditional::if_range_holds(if_range, etag, modified)
    });
    let ranges = match header_str(&ask.headers, &header::RANGE) {
        Some(value) if if_range_holds && !policy::not_modified(&ask.headers, &entry.headers) => {
            range::parse(value, total)
        }
        _ => RangeOutcome::Full,
    };
    let single = match ranges {
        RangeOutcome::Ranges(ranges) if ranges.len() == 1 => ranges[0],
        RangeOutcome::Unsatisfiable => {
            count(&ask.route.name, Some(tier), Outcome::Hit);
            let mut response = error_response(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                "no requested range overlaps the stored answer",
            );
            insert(
                response.headers_mut(),
                header::CONTENT_RANGE,
                &format!("bytes */{total}"),
            );
            return with_tier(marked(response, Outcome::Hit), tier);
        }
        _ => return answer(ask, entry, Outcome::Hit, Some(tier)),
    };
    count(&ask.route.name, Some(tier), Outcome::Hit);
    let mut response = stored_response(entry, body_of(&slice_chunks(&entry.chunks, single)));
    *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(single.len()));
    insert(headers, header::CONTENT_RANGE, &single.content_range(total));
    client_view(ask, with_tier(marked(response, Outcome::Hit), tier))
}

/// The bytes of `range` (clamped to the body already) across the stored
/// chunks, as views: no copy.
fn slice_chunks(chunks: &[Bytes], range: ByteRange) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut chunk_start = 0u64;
    for chunk in chunks {
        let chunk_end = chunk_start + chunk.len() as u64;
        if chunk_end > range.start && chunk_start <= range.end {
            let from = range.start.saturating_sub(chunk_start);
            let to = (range.end + 1).min(chunk_end) - chunk_start;
            // Both offsets lie within this chunk, so they fit in usize.
            out.push(chunk.slice(from as usize..to as usize));
        }
        chunk_start = chunk_end;
    }
    out
}

/// A coalesced follower's answer: the leader's head as stored, the
/// recording's body.
fn follow(ask: &Ask, head: &SharedHead, rec: &Arc<Recording>) -> Response<Body> {
    count(&ask.route.name, None, Outcome::Hit);
    let body = match own_identity(ask) {
        Some(mut identity) => Body::new(
            rec.reader()
                .map_frame(move |frame| frame.map_data(|data| identity.rewrite(data))),
        ),
        None => rec.reader(),
    };
    let response = stored_response(&head.stored, body);
    // Shared live from the leader's recording, which is in memory.
    client_view(ask, with_tier(marked(response, Outcome::Hit), Tier::Memory))
}

/// Whether `entry`, `age_ms` old, answers `ask` as it is (RFC 9111 §4):
/// fresh, `no-cache` on neither side, and within what the client accepts.
fn fresh_hit(ask: &Ask, entry: &Entry, age_ms: u64) -> bool {
    age_ms < entry.freshness_ms
        && !ask.cc.no_cache
        && !stored_no_cache(entry)
        && client_accepts(ask, entry, age_ms)
}

/// The stored answer's `no-cache`, unless a plugin's TTL overrides it.
fn stored_no_cache(entry: &Entry) -> bool {
    !entry.ttl_by_plugin && Directives::response(&entry.headers).no_cache
}

/// The client's own `max-age` and `min-fresh` (RFC 9111 §5.2.1).
fn client_accepts(ask: &Ask, entry: &Entry, age_ms: u64) -> bool {
    ask.cc.max_age.is_none_or(|s| age_ms <= s * 1000)
        && ask
            .cc
            .min_fresh
            .is_none_or(|s| entry.freshness_ms.saturating_sub(age_ms) >= s * 1000)
}

/// An answer's header fields as the cache keeps them for everyone: a
/// `Set-Cookie` (which only a `public` answer may carry into the cache)
/// belongs to the client it was sent to.
fn shareable(headers: &HeaderMap) -> HeaderMap {
    let mut kept = headers.clone();
    kept.remove(header::SET_COOKIE);
    kept
}

fn not_cached(ask: &Ask) -> Response<Body> {
    count(&ask.route.name, None, Outcome::Miss);
    marked(
        error_response(
            StatusCode::GATEWAY_TIMEOUT,
            "not_cached",
            &format!("only-if-cached, and {} is not in the cache", ask.url),
        ),
        Outcome::Miss,
    )
}

trait CloneHead {
    fn clone_head(&self) -> Parts;
}

impl CloneHead for Parts {
    /// `Parts` is not `Clone` (its extensions may not be); the head is,
    /// with the route's say over how the request goes upstream (its
    /// deadline, whether it resumes).
    fn clone_head(&self) -> Parts {
        let mut request = Request::new(());
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        if let Some(deadline) = self.extensions.get::<RequestDeadline>() {
            request.extensions_mut().insert(*deadline);
        }
        if let Some(resume) = self.extensions.get::<ResumePolicy>() {
            request.extensions_mut().insert(*resume);
        }
        request.into_parts().0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_stream_ending_in_done_is_a_whole_completion() {
        let done = |parts: &[&'static str]| {
            let chunks: Vec<Bytes> = parts
                .iter()
                .map(|p| Bytes::from_static(p.as_bytes()))
                .collect();
            ends_with_done(&chunks)
        };
        assert!(done(&["data: {\"a\":1}\n\n", "data: [DONE]\n\n"]));
        assert!(done(&["data: {}\r\n\r\ndata: [DO", "NE]\r\n\r\n"]));
        assert!(!done(&["data: {\"error\":{}}\n\n"]));
        assert!(!done(&["data: [DONE]\n\ndata: {}\n\n"]));
        assert!(!done(&[]));
    }

    #[test]
    fn a_range_is_sliced_across_chunk_boundaries() {
        let chunks = [
            Bytes::from_static(b"012"),
            Bytes::from_static(b""),
            Bytes::from_static(b"3456"),
            Bytes::from_static(b"789"),
        ];
        let cut = |start, end| {
            slice_chunks(&chunks, ByteRange { start, end })
                .iter()
                .flat_map(|b| b.iter().copied())
                .collect::<Vec<u8>>()
        };
        assert_eq!(cut(0, 9), b"0123456789");
        assert_eq!(cut(2, 3), b"23");
        assert_eq!(cut(3, 6), b"3456");
        assert_eq!(cut(4, 4), b"4");
        assert_eq!(cut(6, 9), b"6789");
        assert_eq!(cut(9, 9), b"9");
    }
}
