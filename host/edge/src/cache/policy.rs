//! RFC 9111 rules for a shared cache: which responses may be stored, how
//! long they stay fresh, how old they are, and what the request's own
//! directives allow.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};

/// Directives of one `Cache-Control` field (request or response), all
/// values of the field together.
#[derive(Debug, Default, Clone)]
pub(crate) struct Directives {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub only_if_cached: bool,
    pub must_understand: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub min_fresh: Option<u64>,
    /// `Some(None)`: `max-stale` without a value, any staleness.
    pub max_stale: Option<Option<u64>>,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
}

/// Beyond this, delta-seconds are clamped (RFC 9111 §1.2.2 suggests 2^31).
const MAX_DELTA: u64 = 1 << 31;

/// The name this cache answers to in `Surrogate-Capability` and in
/// targeted `Surrogate-Control` directives (`max-age=60;breakwater`).
pub(crate) const SURROGATE_TARGET: &str = "breakwater";

/// What every upstream request from the cache announces (W3C Edge
/// Architecture 1.0), so origins may address this cache in particular.
pub(crate) const SURROGATE_CAPABILITY: &str = "breakwater=\"Surrogate/1.0\"";

pub(crate) const SURROGATE_CONTROL: HeaderName = HeaderName::from_static("surrogate-control");

impl Directives {
    /// A stored or upstream response's directives. `Surrogate-Control`
    /// speaks to caches like this one and, as at Fastly or Akamai, takes
    /// the place of `Cache-Control` when it says anything to us: its
    /// directives without a target, or targeted at [`SURROGATE_TARGET`].
    pub(crate) fn response(headers: &HeaderMap) -> Self {
        let mut ours = Vec::new();
        for value in headers.get_all(SURROGATE_CONTROL) {
            let Ok(text) = value.to_str() else { continue };
            for item in split_list(text) {
                match item.split_once(';') {
                    None => ours.push(item),
                    Some((directive, target))
                        if target.trim().eq_ignore_ascii_case(SURROGATE_TARGET) =>
                    {
                        ours.push(directive);
                    }
                    Some(_) => {}
                }
            }
        }
        if ours.is_empty() {
            Self::parse(headers)
        } else {
            Self::from_items(ours)
        }
    }

    pub(crate) fn parse(headers: &HeaderMap) -> Self {
        Self::from_items(
            headers
                .get_all(header::CACHE_CONTROL)
                .iter()
                .filter_map(|value| value.to_str().ok())
                .flat_map(split_list),
        )
    }

    fn from_items<'a>(items: impl IntoIterator<Item = &'a str>) -> Self {
        let mut d = Self::default();
        for item in items {
            let (name, arg) = match item.split_once('=') {
                Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                None => (item.trim(), None),
            };
            let seconds = || {
                // A malformed value errs towards stale (RFC 9111 §4.2.1).
                arg.map(|a| a.parse::<u64>().map_or(0, |s| s.min(MAX_DELTA)))
            };
            // Duplicates: the most restrictive (smallest) value wins.
            let min = |slot: &mut Option<u64>, value: Option<u64>| {
                if let Some(v) = value {
                    *slot = Some(slot.map_or(v, |old| old.min(v)));
                }
            };
            match name.to_ascii_lowercase().as_str() {
                "no-store" => d.no_store = true,
                // The qualified forms (`no-cache="field"`) are treated
                // as unqualified: stricter, never wrong.
                "no-cache" => d.no_cache = true,
                "private" => d.private = true,
                "public" => d.public = true,
                "must-revalidate" => d.must_revalidate = true,
                "proxy-revalidate" => d.proxy_revalidate = true,
                "only-if-cached" => d.only_if_cached = true,
                "must-understand" => d.must_understand = true,
                "max-age" => min(&mut d.max_age, seconds().or(Some(0))),
                "s-maxage" => min(&mut d.s_maxage, seconds().or(Some(0))),
                "min-fresh" => min(&mut d.min_fresh, seconds()),
                "max-stale" => d.max_stale = Some(seconds()),
                "stale-while-revalidate" => min(&mut d.stale_while_revalidate, seconds()),
                "stale-if-error" => min(&mut d.stale_if_error, seconds()),
                _ => {}
            }
        }
        d
    }

    /// Request directives; `Pragma: no-cache` counts when there is no
    /// `Cache-Control` (RFC 9111 §5.4).
    pub(crate) fn request(headers: &HeaderMap) -> Self {
        let mut d = Self::parse(headers);
        if !headers.contains_key(header::CACHE_CONTROL)
            && headers
                .get_all(header::PRAGMA)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| split_list(v).any(|i| i.trim().eq_ignore_ascii_case("no-cache")))
        {
            d.no_cache = true;
        }
        d
    }

    /// Stale serving of any kind is forbidden: `must-revalidate`,
    /// `proxy-revalidate`, and `s-maxage` (which implies it for shared
    /// caches, RFC 9111 §5.2.2.10).
    pub(crate) fn forbids_stale(&self) -> bool {
        self.must_revalidate || self.proxy_revalidate || self.s_maxage.is_some() || self.no_cache
    }
}

/// Splits a comma-separated list, leaving commas inside quotes alone.
fn split_list(text: &str) -> std::vec::IntoIter<&str> {
    let mut items = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    for (i, c) in text.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                items.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&text[start..]);
    items.retain(|s| !s.trim().is_empty());
    items.into_iter()
}

/// Statuses a cache may store and give a heuristic lifetime without
/// explicit freshness (RFC 9110 §15.1).
pub(crate) fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 206 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Statuses whose caching semantics this cache implements.
fn understood(status: StatusCode) -> bool {
    heuristically_cacheable(status) || matches!(status.as_u16(), 302 | 303 | 307)
}

/// What the cache was told about a request besides its headers.
pub(crate) struct StoreContext<'a> {
    pub method: &'a Method,
    pub request_headers: &'a HeaderMap,
    /// A plugin chose the key: it vouches for sharing (even with
    /// `Authorization`) and for the method.
    pub plugin_keyed: bool,
    pub plugin_ttl: Option<Duration>,
}

/// Why a response is not stored, for logs.
pub(crate) fn storable(
    ctx: &StoreContext<'_>,
    status: StatusCode,
    headers: &HeaderMap,
    response_cc: &Directives,
) -> Result<(), &'static str> {
    let request_cc = Directives::request(ctx.request_headers);
    if *ctx.method != Method::GET && !ctx.plugin_keyed {
        return Err("method");
    }
    if status.is_informational() || status == StatusCode::PARTIAL_CONTENT || status == 304 {
        return Err("status");
    }
    // `must-understand` (RFC 9111 §5.2.2.3): store only statuses whose
    // caching rules this cache implements, and then regardless of
    // `no-store`, which an origin sends alongside for older caches.
    if response_cc.must_understand && !understood(status) {
        return Err("must-understand with a status this cache does not implement");
    }
    if (response_cc.no_store && !response_cc.must_understand) || request_cc.no_store {
        return Err("no-store");
    }
    if response_cc.private {
        return Err("private");
    }
    // Like nginx and Varnish: a response that sets a cookie is someone's.
    if headers.contains_key(header::SET_COOKIE) && !response_cc.public {
        return Err("set-cookie");
    }
    if vary_names(headers).is_none() {
        return Err("vary *");
    }
    if ctx.request_headers.contains_key(header::AUTHORIZATION)
        && !ctx.plugin_keyed
        && !(response_cc.must_revalidate || response_cc.public || response_cc.s_maxage.is_some())
    {
        return Err("authorization");
    }
    let explicit = response_cc.max_age.is_some()
        || response_cc.s_maxage.is_some()
        || headers.contains_key(header::EXPIRES);
    let by_plugin = ctx.plugin_ttl.is_some() && heuristically_cacheable(status);
    if !(explicit || response_cc.public || by_plugin || heuristically_cacheable(status)) {
        return Err("status without explicit freshness");
    }
    Ok(())
}

/// The `Vary` field names, lower-cased, in order; `None` for `Vary: *`.
pub(crate) fn vary_names(headers: &HeaderMap) -> Option<Vec<String>> {
    let mut names: Vec<String> = Vec::new();
    for value in headers.get_all(header::VARY) {
        let text = value.to_str().unwrap_or("*");
        for name in text.split(',') {
            let name = name.trim().to_ascii_lowercase();
            if name == "*" {
                return None;
            }
            if !name.is_empty() && !names.contains(&name) {
                names.push(name);
            }
        }
    }
    Some(names)
}

/// Secondary key part: the request's values of the `Vary` fields.
pub(crate) fn vary_key(names: &[String], request_headers: &HeaderMap) -> String {
    let mut key = String::new();
    for name in names {
        key.push_str(name);
        let values: Vec<String> = request_headers
            .get_all(name.as_str())
            .iter()
            .map(|v| {
                // Whitespace around list members does not change meaning.
                String::from_utf8_lossy(v.as_bytes())
                    .split(',')
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect();
        if values.is_empty() {
            key.push('\u{1}');
        } else {
            key.push('=');
            key.push_str(&values.join(","));
        }
        key.push('\n');
    }
    key
}

/// `duration` in whole milliseconds, saturating.
pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(crate) fn http_date_ms(value: Option<&HeaderValue>) -> Option<u64> {
    let text = value?.to_str().ok()?;
    let time = httpdate::parse_http_date(text.trim()).ok()?;
    let since = time.duration_since(UNIX_EPOCH).ok()?;
    u64::try_from(since.as_millis()).ok()
}

/// The freshness lifetime in ms (RFC 9111 §4.2.1, shared cache). A
/// plugin's TTL takes the place of the upstream's.
pub(crate) fn freshness_ms(
    status: StatusCode,
    headers: &HeaderMap,
    cc: &Directives,
    plugin_ttl: Option<Duration>,
    response_time_ms: u64,
) -> u64 {
    if let Some(ttl) = plugin_ttl {
        return millis(ttl);
    }
    if let Some(s) = cc.s_maxage.or(cc.max_age) {
        return s * 1000;
    }
    let date = http_date_ms(headers.get(header::DATE)).unwrap_or(response_time_ms);
    if headers.contains_key(header::EXPIRES) {
        // An invalid Expires (such as "0") means already expired.
        return http_date_ms(headers.get(header::EXPIRES))
            .map_or(0, |expires| expires.saturating_sub(date));
    }
    if (heuristically_cacheable(status) || cc.public)
        && let Some(modified) = http_date_ms(headers.get(header::LAST_MODIFIED))
    {
        // 10% of the time since the last change, as RFC 9111 §4.2.2
        // suggests, capped at a day.
        return (date.saturating_sub(modified) / 10).min(24 * 3600 * 1000);
    }
    0
}

/// The age the response had when it arrived (RFC 9111 §4.2.3).
pub(crate) fn corrected_initial_age_ms(
    headers: &HeaderMap,
    request_time_ms: u64,
    response_time_ms: u64,
) -> u64 {
    let date = http_date_ms(headers.get(header::DATE)).unwrap_or(response_time_ms);
    let apparent = response_time_ms.saturating_sub(date);
    let age_value = age_header_seconds(headers).min(MAX_DELTA) * 1000;
    let delay = response_time_ms.saturating_sub(request_time_ms);
    apparent.max(age_value + delay)
}

/// The `Age` an upstream sent, in seconds. `Age` is a single number
/// (RFC 9111 §5.1): anything else (`abc`, `-1`, `1.5`, `60;x=y`, or
/// several values in one field or in several) makes the response as old as
/// can be, since a cache that cannot tell the age must not call it fresh.
fn age_header_seconds(headers: &HeaderMap) -> u64 {
    let mut values = headers.get_all(header::AGE).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return if headers.contains_key(header::AGE) {
            MAX_DELTA
        } else {
            0
        };
    };
    match value.to_str().map(str::trim) {
        Ok(text) if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => {
            text.parse::<u64>().unwrap_or(MAX_DELTA)
        }
        _ => MAX_DELTA,
    }
}

/// Whether the client's own validators match the stored response, so a
/// 304 answers it (RFC 9110 §13.2.2: If-None-Match first).
pub(crate) fn not_modified(request: &HeaderMap, stored: &HeaderMap) -> bool {
    let inm: Vec<&str> = request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if !inm.is_empty() {
        let Some(etag) = stored.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let weak = |t: &str| t.trim().trim_start_matches("W/").to_owned();
        let etag = weak(etag);
        return inm
            .iter()
            .flat_map(|v| v.split(','))
            .any(|t| t.trim() == "*" || weak(t) == etag);
    }
    match (
        http_date_ms(request.get(header::IF_MODIFIED_SINCE)),
        http_date_ms(stored.get(header::LAST_MODIFIED)),
    ) {
        (Some(since), Some(modified)) => modified <= since,
        _ => false,
    }
}

/// Headers a 304 carries from the stored response (RFC 9110 §15.4.5).
pub(crate) const NOT_MODIFIED_HEADERS: [HeaderName; 7] = [
    header::CACHE_CONTROL,
    header::CONTENT_LOCATION,
    header::DATE,
    header::ETAG,
    header::EXPIRES,
    header::VARY,
    header::LAST_MODIFIED,
];

/// Header fields a 304 must not overwrite in the stored response.
pub(crate) fn keeps_stored_value(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "content-length"
            | "content-encoding"
            | "content-range"
            | "transfer-encoding"
            // The validator and digest name the stored body, which a 304
            // does not replace.
            | "etag"
            | "content-md5"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn directives_parse_with_quotes_duplicates_and_junk() {
        let d = Directives::parse(&headers(&[
            ("cache-control", "max-age=60, no-cache=\"a, b\""),
            (
                "cache-control",
                "MAX-AGE=30, s-maxage=abc, stale-if-error=5",
            ),
        ]));
        assert_eq!(d.max_age, Some(30));
        assert_eq!(d.s_maxage, Some(0));
        assert!(d.no_cache);
        assert_eq!(d.stale_if_error, Some(5));
        let r = Directives::request(&headers(&[("pragma", "no-cache")]));
        assert!(r.no_cache);
        let r = Directives::request(&headers(&[("cache-control", "max-stale")]));
        assert_eq!(r.max_stale, Some(None));
    }

    #[test]
    fn freshness_prefers_s_maxage_then_max_age_then_expires_then_heuristic() {
        let now = now_ms();
        let date = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_millis(now));
        let h = headers(&[("cache-control", "max-age=10, s-maxage=20")]);
        let cc = Directives::parse(&h);
        assert_eq!(freshness_ms(StatusCode::OK, &h, &cc, None, now), 20_000);
        let expires = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_millis(now + 30_000));
        let h = headers(&[("date", &date), ("expires", &expires)]);
        let f = freshness_ms(StatusCode::OK, &h, &Directives::parse(&h), None, now);
        assert!((29_000..=30_000).contains(&f), "{f}");
        let h = headers(&[("expires", "0")]);
        assert_eq!(
            freshness_ms(StatusCode::OK, &h, &Directives::parse(&h), None, now),
            0
        );
        let modified = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_millis(now - 100_000));
        let h = headers(&[("date", &date), ("last-modified", &modified)]);
        let cc = Directives::parse(&h);
        assert_eq!(freshness_ms(StatusCode::OK, &h, &cc, None, now), 10_000);
        // No heuristic for a status that is not heuristically cacheable.
        assert_eq!(freshness_ms(StatusCode::CREATED, &h, &cc, None, now), 0);
        let plugin = Some(Duration::from_secs(7));
        assert_eq!(freshness_ms(StatusCode::OK, &h, &cc, plugin, now), 7000);
    }

    #[test]
    fn storability_rules() {
        let get = Method::GET;
        let plain = HeaderMap::new();
        let ctx = StoreContext {
            method: &get,
            request_headers: &plain,
            plugin_keyed: false,
            plugin_ttl: None,
        };
        let check = |ctx: &StoreContext<'_>, status: u16, h: &HeaderMap| {
            storable(
                ctx,
                StatusCode::from_u16(status).unwrap(),
                h,
                &Directives::parse(h),
            )
        };
        assert!(check(&ctx, 200, &plain).is_ok());
        assert!(check(&ctx, 201, &plain).is_err());
        assert!(check(&ctx, 201, &headers(&[("cache-control", "max-age=5")])).is_ok());
        assert!(check(&ctx, 200, &headers(&[("cache-control", "no-store")])).is_err());
        assert!(check(&ctx, 200, &headers(&[("cache-control", "private")])).is_err());
        assert!(check(&ctx, 200, &headers(&[("vary", "*")])).is_err());
        let auth = headers(&[("authorization", "Bearer x")]);
        let with_auth = StoreContext {
            request_headers: &auth,
            ..ctx
        };
        assert!(check(&with_auth, 200, &plain).is_err());
        assert!(
            check(
                &with_auth,
                200,
                &headers(&[("cache-control", "s-maxage=5")])
            )
            .is_ok()
        );
        let post = Method::POST;
        let posted = StoreContext {
            method: &post,
            request_headers: &plain,
            plugin_keyed: false,
            plugin_ttl: None,
        };
        assert!(check(&posted, 200, &plain).is_err());
    }

    #[test]
    fn conditionals_and_vary_keys() {
        let stored = headers(&[
            ("etag", "\"v1\""),
            ("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT"),
        ]);
        assert!(not_modified(
            &headers(&[("if-none-match", "\"x\", W/\"v1\"")]),
            &stored
        ));
        assert!(!not_modified(
            &headers(&[("if-none-match", "\"x\"")]),
            &stored
        ));
        assert!(not_modified(
            &headers(&[("if-modified-since", "Tue, 02 Jan 2024 00:00:00 GMT")]),
            &stored
        ));
        let names = vary_names(&headers(&[("vary", "Accept-Encoding, accept-language")])).unwrap();
        let a = vary_key(&names, &headers(&[("accept-encoding", "gzip,  br")]));
        let b = vary_key(&names, &headers(&[("accept-encoding", "gzip, br")]));
        let c = vary_key(&names, &headers(&[("accept-encoding", "br")]));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn surrogate_control_for_this_cache_replaces_cache_control() {
        let d = Directives::response(&headers(&[
            ("cache-control", "no-store"),
            ("surrogate-control", "max-age=600;breakwater"),
        ]));
        assert!(!d.no_store);
        assert_eq!(d.max_age, Some(600));
        let d = Directives::response(&headers(&[
            ("cache-control", "max-age=600"),
            ("surrogate-control", "no-store"),
        ]));
        assert!(d.no_store);
        // Addressed to another cache: Cache-Control rules.
        let d = Directives::response(&headers(&[
            ("cache-control", "max-age=5"),
            ("surrogate-control", "max-age=600;other-cdn"),
        ]));
        assert_eq!(d.max_age, Some(5));
    }

    #[test]
    fn an_age_that_is_not_one_number_is_too_old() {
        let age = |values: &[&str]| {
            let pairs: Vec<(&str, &str)> = values.iter().map(|v| ("age", *v)).collect();
            age_header_seconds(&headers(&pairs))
        };
        assert_eq!(age(&[]), 0);
        assert_eq!(age(&["42"]), 42);
        assert_eq!(age(&[" 7 "]), 7);
        for bad in [
            &["abc"][..],
            &["-1"],
            &["1.5"],
            &["60;x=y"],
            &["0, 0"],
            &["0", "0"],
        ] {
            assert_eq!(age(bad), MAX_DELTA, "{bad:?}");
        }
    }

    #[test]
    fn must_understand_stores_only_understood_statuses_despite_no_store() {
        let method = Method::GET;
        let request_headers = HeaderMap::new();
        let ctx = StoreContext {
            method: &method,
            request_headers: &request_headers,
            plugin_keyed: false,
            plugin_ttl: None,
        };
        let h = headers(&[("cache-control", "max-age=60, must-understand, no-store")]);
        let cc = Directives::response(&h);
        assert!(storable(&ctx, StatusCode::OK, &h, &cc).is_ok());
        let unknown = StatusCode::from_u16(599).unwrap();
        assert!(storable(&ctx, unknown, &h, &cc).is_err());
    }
}
