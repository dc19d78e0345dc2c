//! The response cache against a scripted upstream on loopback: RFC 9111
//! semantics, coalescing, stale serving, SSE record/replay, purge, the disk
//! tier across restarts and corrupt disk entries.

use crate::common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{PATIENCE, admin_url, client, start_node_in, url};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the scripted upstream answers on one path.
#[derive(Clone, Default)]
struct Script {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
    delay: Duration,
    /// Answer 304 when the request's `If-None-Match` or
    /// `If-Modified-Since` is present.
    honour_validators: bool,
    /// Stream `n` SSE events, `gap` apart; `cut` drops the connection
    /// after that many.
    sse: Option<(usize, Duration, Option<usize>)>,
    /// Hold the answer until the test cancels this token.
    gate: Option<CancellationToken>,
    /// Append the request's value of this header to the body: whose
    /// answer a client got.
    echo_header: Option<&'static str>,
    /// Append the request body to the body.
    echo_body: bool,
    /// Read the request, then close the connection without an answer.
    disconnect: bool,
}

fn script(status: u16, headers: &[(&str, &str)], body: &str) -> Script {
    Script {
        status,
        headers: headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect(),
        body: body.to_owned(),
        ..Script::default()
    }
}

/// One request the upstream saw.
#[derive(Clone, Debug)]
struct Seen {
    headers: HashMap<String, String>,
    body: String,
}

#[derive(Clone, Default)]
struct Shared {
    scripts: Arc<Mutex<HashMap<String, Script>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    count: Arc<AtomicUsize>,
}

struct Upstream {
    addr: SocketAddr,
    shared: Shared,
    stop: CancellationToken,
}

impl Upstream {
    async fn start() -> Self {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await.expect("bind")).await
    }

    async fn start_on(listener: TcpListener) -> Self {
        let addr = listener.local_addr().expect("addr");
        let shared = Shared::default();
        let stop = CancellationToken::new();
        tokio::spawn({
            let shared = shared.clone();
            let stop = stop.clone();
            async move {
                loop {
                    let stream = tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok((stream, _)) => stream,
                            Err(_) => continue,
                        },
                        () = stop.cancelled() => return,
                    };
                    let shared = shared.clone();
                    let stop = stop.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            answer(request, shared.clone())
                        });
                        let connection = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service);
                        tokio::select! {
                            _ = connection => {}
                            () = stop.cancelled() => {}
                        }
                    });
                }
            }
        });
        Self { addr, shared, stop }
    }

    fn set(&self, path: &str, script: Script) {
        self.shared
            .scripts
            .lock()
            .unwrap()
            .insert(path.to_owned(), script);
    }

    fn count(&self) -> usize {
        self.shared.count.load(Ordering::SeqCst)
    }

    fn last(&self) -> Seen {
        self.shared
            .seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a request")
    }

    /// Stops listening and drops every connection: connection refused.
    fn stop(&self) {
        self.stop.cancel();
    }
}

type UpBody = BoxBody<Bytes, std::io::Error>;

async fn answer(
    request: Request<Incoming>,
    shared: Shared,
) -> Result<Response<UpBody>, std::io::Error> {
    shared.count.fetch_add(1, Ordering::SeqCst);
    let path = request.uri().path().to_owned();
    let headers: HashMap<String, String> = request
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    shared.seen.lock().unwrap().push(Seen {
        headers: headers.clone(),
        body: body.clone(),
    });
    let script = shared
        .scripts
        .lock()
        .unwrap()
        .get(&path)
        .cloned()
        .unwrap_or_else(|| script(404, &[], "no script"));
    tokio::time::sleep(script.delay).await;
    if let Some(gate) = &script.gate {
        gate.cancelled().await;
    }
    if script.disconnect {
        // hyper closes the connection when the service fails.
        return Err(std::io::Error::other("disconnect"));
    }
    let mut text = script.body.clone();
    if let Some(name) = script.echo_header {
        text.push_str(headers.get(name).map_or("", String::as_str));
    }
    if script.echo_body {
        text.push_str(&body);
    }
    let validated = script.honour_validators
        && (headers.contains_key("if-none-match") || headers.contains_key("if-modified-since"));
    let status = if validated { 304 } else { script.status };
    let mut builder = Response::builder().status(status);
    for (name, value) in &script.headers {
        builder = builder.header(name, value);
    }
    let body = match (validated, script.sse) {
        (true, _) => Full::new(Bytes::new())
            .map_err(|n: Infallible| match n {})
            .boxed(),
        (false, Some((n, gap, cut))) => {
            builder = builder.header("content-type", "text/event-stream");
            let events = futures_util::stream::unfold(0, move |i| async move {
                if i > 0 {
                    tokio::time::sleep(gap).await;
                }
                if cut == Some(i) {
                    return Some((Err(std::io::Error::other("cut")), n + 1));
                }
                if i >= n {
                    return None;
                }
                let event = format!("id: {i}\ndata: event {i}\n\n");
                Some((Ok(Frame::data(Bytes::from(event))), i + 1))
            });
            BodyExt::boxed(StreamBody::new(events))
        }
        (false, None) => Full::new(Bytes::from(text))
            .map_err(|n: Infallible| match n {})
            .boxed(),
    };
    Ok(builder.body(body).expect("response"))
}

/// A node with the cache on `/` (route extras in `route`, `[cache]` keys
/// in `cache`) and an admin listener with token `secret`.
async fn node_for(
    upstream: SocketAddr,
    route: &str,
    cache: &str,
    dir: &Path,
) -> breakwater_edge::RunningNode {
    node_with_pool(upstream, route, cache, "", dir).await
}

/// [`node_for`] with extra `[[pool]]` keys in `pool`.
async fn node_with_pool(
    upstream: SocketAddr,
    route: &str,
    cache: &str,
    pool: &str,
    dir: &Path,
) -> breakwater_edge::RunningNode {
    let toml = format!(
        r#"
[[listener]]
address = "127.0.0.1:0"

[admin]
address = "127.0.0.1:0"
token = "secret"

[cache]
coalesce_wait = "5s"
{cache}

[[route]]
prefix = "/"
pool = "upstream"
cache = true
{route}

[[pool]]
name = "upstream"
endpoints = ["http://{upstream}"]
first_byte_timeout = "5s"
{pool}
"#
    );
    start_node_in(&toml, dir).await
}

struct Got {
    status: u16,
    x_cache: String,
    age: Option<u64>,
    headers: reqwest::header::HeaderMap,
    body: String,
}

async fn get_with(
    node: &breakwater_edge::RunningNode,
    path: &str,
    headers: &[(&str, &str)],
) -> Got {
    let mut request = client().get(url(node, path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("request");
    got(response).await
}

async fn got(response: reqwest::Response) -> Got {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let x_cache = header("x-cache").unwrap_or_default();
    let age = header("age").and_then(|a| a.parse().ok());
    let body = response.text().await.expect("body");
    Got {
        status,
        x_cache,
        age,
        headers,
        body,
    }
}

async fn get(node: &breakwater_edge::RunningNode, path: &str) -> Got {
    get_with(node, path, &[]).await
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

#[tokio::test]
async fn fresh_answers_are_hits_with_age_and_head_is_served_from_get() {
    let up = Upstream::start().await;
    up.set(
        "/a",
        script(200, &[("cache-control", "max-age=60")], "alpha"),
    );
    let dir = tmp();
    let node = node_for(up.addr, "", "", dir.path()).await;

    let first = get(&node, "/a").await;
    assert_eq!(
        (first.status, first.x_cache.as_str(), first.body.as_str()),
        (200, "MISS", "alpha")
    );
    let second = get(&node, "/a").await;
    assert_eq!(
        (second.x_cache.as_str(), second.body.as_str()),
        ("HIT", "alpha")
    );
    assert!(second.age.is_some(), "a hit carries Age");
    let head = client().head(url(&node, "/a")).send().await.expect("head");
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["x-cache"], "HIT");
    assert_eq!(head.headers()["content-length"], "5");
    assert_eq!(up.count(), 1, "one upstream request for GET, GET, HEAD");
    node.shutdown().await;
}

#[tokio::test]
async fn unstorable_answers_go_upstream_every_time() {
    let up = Upstream::start().await;
    up.set(
        "/nostore",
        script(200, &[("cache-control", "no-store, max-age=60")], "x"),
    );
    up.set(
        "/private",
        script(200, &[("cache-control", "private, max-age=60")], "x"),
    );
    up.set("/created", script(201, &[], "x"));
    up.set(
        "/auth",
        script(200, &[("cache-control", "max-age=60")], "x"),
    );
    up.set(
        "/auth-public",
        script(200, &[("cache-control", "public, max-age=60")], "x"),
    );
    let dir = tmp();
    let node = node_for(up.addr, "", "", dir.path()).await;

    for path in ["/nostore", "/private", "/created"] {
        get(&node, path).await;
        let again = get(&node, path).await;
        assert_eq!(again.x_cache, "MISS", "{path}");
    }
    assert_eq!(up.count(), 6);
    let auth = [("authorization", "Bearer t")];
    get_with(&node, "/auth", &auth).await;
    assert_eq!(get_with(&node, "/auth", &auth).await.x_cache, "MISS");
    get_with(&node, "/auth-public", &auth).await;
    assert_eq!(get_with(&node, "/auth-public", &auth).await.x_cache, "HIT");
    // A request-side no-store is not stored either.
    up.set(
        "/req-nostore",
        script(200, &[("cache-control", "max-age=60")], "x"),
    );
    get_with(&node, "/req-nostore", &[("cache-control", "no-store")]).await;
    assert_eq!(get(&node, "/req-nostore").await.x_cache, "MISS");
    node.shutdown().await;
}

#[tokio::test]
async fn expires_heuristics_and_vary() {
    let up = Upstream::start().await;
    let later = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(60));
    up.set("/expires", script(200, &[("expires", &later)], "e"));
    up.set("/expired", script(200, &[("expires", "0")], "e"));
    let old = httpdate::fmt_http_date(std::time::SystemTime::now() - Duration::from_secs(86400));
    up.set("/heuristic", script(200, &[("last-modified", &old)], "h"));
    up.set(
        "/heuristic-201",
        script(201, &[("last-modified", &old)], "h"),
    );
    up.set(
        "/vary",
        script(
            200,
            &[("cache-control", "max-age=60"), ("vary", "Accept-Language")],
            "v",
        ),
    );
    let dir = tmp();
    let node = node_for(up.addr, "", "", dir.path()).await;

    for (path, second) in [
        ("/expires", "HIT"),
        ("/expired", "MISS"),
        ("/heuristic", "HIT"),
        ("/heuristic-201", "MISS"),
    ] {
        get(&node, path).await;
        assert_eq!(get(&node, path).await.x_cache, second, "{path}");
    }
    let en = [("accept-language", "en")];
    let de = [("accept-language", "de")];
    assert_eq!(get_with(&node, "/vary", &en).await.x_cache, "MISS");
    assert_eq!(get_with(&node, "/vary", &en).await.x_cache, "HIT");
    assert_eq!(get_with(&node, "/vary", &de).await.x_cache, "MISS");
    assert_eq!(get_with(&node, "/vary", &de).await.x_cache, "HIT");
    assert_eq!(get_with(&node, "/vary", &en).await.x_cache, "HIT");
    node.shutdown().await;
}

#[tokio::test]
async fn no_cache_revalidates_and_a_304_refreshes_the_entry() {
    let up = Upstream::start().await;
    let mut s = script(
        200,
        &[("cache-control", "no-cache"), ("etag", "\"v1\"")],
        "body-v1",
    );
    s.honour_validators = true;
    up.set("/etag", s);
    let modified = "Mon, 01 Jan 2024 00:00:00 GMT";
    let mut s = script(
        200,
        &[
            ("cache-control", "max-age=0, must-revalidate"),
            ("last-modified", modified),
        ],
        "body-lm",
    );
    s.honour_validators = true;
    up.set("/lm", s);
    let dir = tmp();
    let node = node_for(up.addr, "", "", dir.path()).await;

    assert_eq!(get(&node, "/etag").await.x_cache, "MISS");
    let again = get(&node, "/etag").await;
    assert_eq!((again.status, again.body.as_str()), (200, "body-v1"));
    assert_eq!(again.x_cache, "HIT", "revalidated by a 304");
    assert_eq!(
        up.last().headers.get("if-none-match").map(String::as_str),
        Some("\"v1\"")
    );
    assert_eq!(up.count(), 2);

    get(&node, "/lm").await;
    let again = get(&node, "/lm").await;
    assert_eq!(
        (again.body.as_str(), again.x_cache.as_str()),
        ("body-lm", "HIT")
    );
    assert_eq!(
        up.last()
            .headers
            .get("if-modified-since")
            .map(String::as_str),
        Some(modified)
    );

    // The client's own validator against the stored entry: 304 from cache.
    let mut s = script(
        200,
        &[("cache-control", "max-age=60"), ("etag", "\"v2\"")],
        "x",
    );
    s.honour_validators = true;
    up.set("/cond", s);
    get(&node, "/cond").await;
    let cond = get_with(&node, "/cond", &[("if-none-match", "\"v2\"")]).await;
    assert_eq!((cond.status, cond.x_cache.as_str()), (304, "HIT"));
    node.shutdown().await;
}

#[tokio::test]
async fn request_directives() {
    let up = Upstream::start().await;
    up.set("/r", script(200, &[("cache-control", "max-age=60")], "r"));
    let dir = tmp();
    let node = node_for(up.addr, "", "", dir.path()).await;

    let only = get_with(&node, "/r", &[("cache-control", "only-if-cached")]).await;
    assert_eq!(only.status, 504);
    assert_eq!(up.count(), 0);
    get(&node, "/r").await;
    assert_eq!(
        get_with(&node, "/r", &[("cache-control", "only-if-cached")])
            .await
            .x_cache,
        "HIT"
    );
    assert_eq!(
        get_with(&node, "/r", &[("cache-control", "no-cache")])
            .await
            .x_cache,
        "MISS"
    );
    assert_eq!(
        get_with(&node, "/r", &[("pragma", "no-cache")])
            .await
            .x_cache,
        "MISS"
    );
    assert_eq!(up.count(), 3);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        get_with(&node, "/r", &[("cache-control", "max-age=0")])
            .await
            .x_cache,
        "MISS"
    );
    assert_eq!(
        get_with(&node, "/r", &[("cache-control", "min-fresh=120")])
            .await
            .x_cache,
        "MISS"
    );
    assert_eq!(up.count(), 5);
    node.shutdown().await;
}

#[tokio::test]
async fn unsafe_methods_invalidate_the_url_and_its_location() {
    let up = Upstream::start().await;
    up.set(
        "/doc",
        script(200, &[("cache-control", "max-age=60")], "doc"),
    );
    up.set(
        "/other",
        script(200, &[("cache-control", "max-age=60")], "other"),
    );
    up.set("/doc-post", script(201, &[("location", "/other")], "made"));
    let dir = tmp();
    let node = node_for(up.addr, "", "", dir.path()).await;

    get(&node, "/doc").await;
    get(&node, "/other").await;
    let posted = client()
        .post(url(&node, "/doc"))
        .body("x")
        .send()
        .await
        .expect("post");
    assert_eq!(posted.headers()["x-cache"], "BYPASS");
    assert_eq!(
        get(&node, "/doc").await.x_cache,
        "MISS",
        "POST /doc invalidated it"
    );
    assert_eq!(get(&node, "/other").await.x_cache, "HIT");
    client()
        .post(url(&node, "/doc-post"))
        .send()
        .await
        .expect("post");
    assert_eq!(
        get(&node, "/other").await.x_cache,
        "MISS",
        "Location invalidated"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_thousand_concurrent_misses_make_one_upstream_request() {
    let up = Upstream::start().await;
    let mut s = script(200, &[("cache-control", "max-age=60")], "coalesced");
    s.delay = Duration::from_millis(500);
    up.set("/hot", s);
    let dir = tmp();
    let node = node_for(up.addr, "", "", dir.path()).await;

    // h2c multiplexes the burst over a few connections.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(PATIENCE)
        .build()
        .expect("client");
    let target = url(&node, "/hot");
    let requests = (0..1000).map(|_| {
        let h2 = h2.clone();
        let target = target.clone();
        tokio::spawn(async move { got(h2.get(target).send().await.expect("request")).await })
    });
    let answers = futures_util::future::join_all(requests).await;
    for answer in answers {
        let answer = answer.expect("task");
        assert_eq!((answer.status, answer.body.as_str()), (200, "coalesced"));
    }
    assert_eq!(up.count(), 1, "exactly one upstream request");
    node.shutdown().await;
}

#[tokio::test]
async fn stale_while_revalidate_serves_stale_and_refreshes_once() {
    let up = Upstream::start().await;
    up.set(
        "/swr",
        script(
            200,
            &[("cache-control", "max-age=1, stale-while-revalidate=30")],
            "old",
        ),
    );
    let dir = tmp();
    let node = node_for(up.addr, "", "", dir.path()).await;

    get(&node, "/swr").await;
    up.set(
        "/swr",
        script(
            200,
            &[("cache-control", "max-age=60, stale-while-revalidate=30")],
            "new",
        ),
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let stale = get(&node, "/swr").await;
    assert_eq!(
        (stale.x_cache.as_str(), stale.body.as_str()),
        ("STALE", "old")
    );
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let now = get(&node, "/swr").await;
        if now.body == "new" {
            assert_eq!(now.x_cache, "HIT");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never refreshed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(up.count(), 2, "one background refresh");
    node.shutdown().await;
}

#[tokio::test]
async fn stale_if_error_when_the_upstream_fails_or_is_stopped() {
    let up = Upstream::start().await;
    up.set(
        "/sie",
        script(200, &[("cache-control", "max-age=1")], "saved"),
    );
    up.set(
        "/strict",
        script(
            200,
            &[("cache-control", "max-age=1, must-revalidate")],
            "strict",
        ),
    );
    let dir = tmp();
    let node = node_for(up.addr, "stale_if_error = \"1m\"", "", dir.path()).await;

    get(&node, "/sie").await;
    get(&node, "/strict").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    up.set("/sie", script(503, &[], "down"));
    let stale = get(&node, "/sie").await;
    assert_eq!(
        (stale.status, stale.x_cache.as_str(), stale.body.as_str()),
        (200, "STALE", "saved")
    );

    up.stop();
    let stale = get(&node, "/sie").await;
    assert_eq!(
        (stale.status, stale.x_cache.as_str(), stale.body.as_str()),
        (200, "STALE", "saved")
    );
    // must-revalidate forbids it.
    assert_eq!(get(&node, "/strict").await.status, 502);
    node.shutdown().await;
}

fn events(n: usize) -> String {
    (0..n)
        .map(|i| format!("id: {i}\ndata: event {i}\n\n"))
        .collect()
}

#[tokio::test]
async fn sse_is_recorded_replayed_and_shared_live_but_never_stored_incomplete() {
    let up = Upstream::start().await;
    let mut s = script(200, &[("cache-control", "max-age=60")], "");
    s.sse = Some((5, Duration::from_millis(80), None));
    up.set("/stream", s);
    let dir = tmp();
    let node = node_for(up.addr, "", "", dir.path()).await;

    // A second client joins while the first stream runs: fed live.
    let first = tokio::spawn(client().get(url(&node, "/stream")).send());
    tokio::time::sleep(Duration::from_millis(120)).await;
    let joined = get(&node, "/stream").await;
    let first = got(first.await.expect("task").expect("request")).await;
    assert_eq!(first.body, events(5));
    assert_eq!(first.x_cache, "MISS");
    assert_eq!(
        (joined.x_cache.as_str(), joined.body.clone()),
        ("HIT", events(5))
    );
    assert_eq!(up.count(), 1);

    // A later hit is replayed one event per frame.
    let response = client()
        .get(url(&node, "/stream"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.headers()["x-cache"], "HIT");
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut frames = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        frames.push(chunk.expect("chunk"));
    }
    let text: String = frames.iter().map(|f| String::from_utf8_lossy(f)).collect();
    assert_eq!(text, events(5));
    assert!(
        frames.iter().all(|f| f.ends_with(b"\n\n")),
        "frames split inside an event: {frames:?}"
    );

    // An upstream that dies mid-stream: nothing stored.
    let mut s = script(200, &[("cache-control", "max-age=60")], "");
    s.sse = Some((5, Duration::from_millis(20), Some(2)));
    up.set("/cut", s);
    let cut = client()
        .get(url(&node, "/cut"))
        .send()
        .await
        .expect("request");
    assert!(cut.bytes().await.is_err(), "the client sees the break");
    up.set(
        "/cut",
        script(200, &[("cache-control", "max-age=60")], "whole"),
    );
    let again = get(&node, "/cut").await;
    assert_eq!(
        (again.x_cache.as_str(), again.body.as_str()),
        ("MISS", "whole"),
        "an incomplete stream is never stored"
    );
    node.shutdown().await;
}

async fn purge(
    node: &breakwater_edge::RunningNode,
    token: Option<&str>,
    body: &str,
) -> (u16, serde_json::Value) {
    let mut request = client()
        .post(admin_url(node, "/admin/purge"))
        .body(body.to_owned());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("purge");
    let status = response.status().as_u16();
    (status, common::json(&response.bytes().await.expect("body")))
}

#[tokio::test]
async fn purge_by_key_prefix_and_tag_on_both_tiers() {
    let up = Upstream::start().await;
    for path in ["/p/one", "/p/two", "/q/three"] {
        up.set(
            path,
            script(
                200,
                &[
                    ("cache-control", "max-age=60"),
                    ("surrogate-key", "red blue"),
                ],
                path,
            ),
        );
    }
    up.set(
        "/q/four",
        script(
            200,
            &[("cache-control", "max-age=60"), ("surrogate-key", "green")],
            "4",
        ),
    );
    let dir = tmp();
    let node = node_for(up.addr, "", "disk_path = \"l2\"", dir.path()).await;
    let fill = async || {
        for path in ["/p/one", "/p/two", "/q/three", "/q/four"] {
            get(&node, path).await;
        }
    };
    fill().await;
    assert_eq!(
        get(&node, "/q/four").await.headers.get("surrogate-key"),
        None,
        "tags stay inside"
    );

    assert_eq!(purge(&node, None, r#"{"prefix":"/p/"}"#).await.0, 401);
    assert_eq!(
        purge(&node, Some("wrong"), r#"{"prefix":"/p/"}"#).await.0,
        401
    );
    assert_eq!(
        purge(&node, Some("secret"), r#"{"nothing":1}"#).await.0,
        400
    );

    let (status, body) = purge(&node, Some("secret"), r#"{"prefix":"/p/"}"#).await;
    assert_eq!(status, 200);
    assert_eq!(body["purged"]["memory"], 2, "{body}");
    assert_eq!(body["purged"]["disk"], 2, "{body}");
    assert_eq!(get(&node, "/p/one").await.x_cache, "MISS");
    assert_eq!(get(&node, "/q/three").await.x_cache, "HIT");

    let (_, body) = purge(&node, Some("secret"), r#"{"tag":"blue"}"#).await;
    assert_eq!(body["purged"]["memory"], 2, "{body}");
    assert_eq!(get(&node, "/q/three").await.x_cache, "MISS");
    assert_eq!(get(&node, "/q/four").await.x_cache, "HIT");

    let key = format!("{}/q/four", common::listener(&node));
    let (_, body) = purge(
        &node,
        Some("secret"),
        &serde_json::json!({ "key": key }).to_string(),
    )
    .await;
    assert_eq!(body["purged"]["memory"], 1, "{body}");
    assert_eq!(body["purged"]["disk"], 1, "{body}");
    assert_eq!(get(&node, "/q/four").await.x_cache, "MISS");

    let metrics = client()
        .get(admin_url(&node, "/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for name in [
        "breakwater_cache_requests_total{",
        "breakwater_cache_bytes{",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    node.shutdown().await;
}

#[tokio::test]
async fn the_disk_tier_survives_a_restart_and_drops_corrupt_entries() {
    let up = Upstream::start().await;
    up.set(
        "/keep",
        script(200, &[("cache-control", "max-age=600")], "kept"),
    );
    up.set(
        "/rot",
        script(200, &[("cache-control", "max-age=600")], "rotting"),
    );
    let dir = tmp();
    let node = node_for(up.addr, "", "disk_path = \"l2\"", dir.path()).await;
    // The default key holds the Host; the restarted node listens on
    // another port.
    let host = [("host", "cache.test")];
    get_with(&node, "/keep", &host).await;
    get_with(&node, "/rot", &host).await;
    // The store happens once the body is complete, just behind the answer.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while metric(&node, "breakwater_cache_disk_writes_total{result=\"ok\"}").await < 2.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "both answers never reached the disk tier"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.shutdown().await;

    // Flip a byte inside the stored body of /rot.
    {
        let db = sled::open(dir.path().join("l2")).expect("open the disk tier");
        let entries = db.open_tree("entries").expect("entries tree");
        let (key, value) = entries
            .iter()
            .filter_map(Result::ok)
            .find(|(k, _)| k.ends_with(b"/rot\0"))
            .expect("the /rot entry is on disk");
        let mut value = value.to_vec();
        let at = value
            .windows(7)
            .position(|w| w == b"rotting")
            .expect("body bytes");
        value[at] ^= 0x01;
        entries.insert(key, value).expect("write back");
        db.flush().expect("flush");
    }

    let node = node_for(up.addr, "", "disk_path = \"l2\"", dir.path()).await;
    let kept = get_with(&node, "/keep", &host).await;
    assert_eq!((kept.x_cache.as_str(), kept.body.as_str()), ("HIT", "kept"));
    assert_eq!(
        kept.headers
            .get("x-cache-tier")
            .and_then(|v| v.to_str().ok()),
        Some("disk")
    );
    let rot = get_with(&node, "/rot", &host).await;
    assert_eq!(
        (rot.x_cache.as_str(), rot.body.as_str()),
        ("MISS", "rotting")
    );
    assert_eq!(up.count(), 3, "only the corrupt entry went upstream again");
    let metrics = client()
        .get(admin_url(&node, "/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("breakwater_cache_corrupt_entries_total{tier=\"disk\"}"),
        "corrupt entries are counted"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn the_cache_policy_plugin_sets_key_ttl_and_bypass() {
    let up = Upstream::start().await;
    // No freshness of its own: only the plugin's TTL makes it a hit.
    up.set("/plain", script(200, &[], "plain"));
    let dir = tmp();
    let node = cache_policy_node(
        up.addr,
        "",
        r#"{ default_ttl = 60, bypass_cookies = ["session"] }"#,
        dir.path(),
    )
    .await;

    assert_eq!(get(&node, "/plain?utm_source=x").await.x_cache, "MISS");
    // The plugin's key drops utm_* parameters: the same entry.
    let hit = get(&node, "/plain").await;
    assert_eq!((hit.x_cache.as_str(), hit.body.as_str()), ("HIT", "plain"));
    let bypassed = get_with(&node, "/plain", &[("cookie", "session=1")]).await;
    assert_eq!(bypassed.x_cache, "BYPASS");
    assert_eq!(up.count(), 2);

    // The plugin's host has no port.
    let key = format!("GET|{}|/plain", common::listener(&node).ip());
    let (status, body) = purge(
        &node,
        Some("secret"),
        &serde_json::json!({ "key": key }).to_string(),
    )
    .await;
    assert_eq!(
        (status, &body["purged"]["memory"]),
        (200, &1.into()),
        "{body}"
    );
    assert_eq!(get(&node, "/plain").await.x_cache, "MISS");
    node.shutdown().await;
}

/// A node whose cached `/` route runs cache-policy with `config`, `route`
/// holding the route's extra keys; its admin token is `secret`.
async fn cache_policy_node(
    upstream: SocketAddr,
    route: &str,
    config: &str,
    dir: &Path,
) -> breakwater_edge::RunningNode {
    let (path, sha256) = common::component("cache_policy");
    let toml = format!(
        r#"
[[listener]]
address = "127.0.0.1:0"

[admin]
address = "127.0.0.1:0"
token = "secret"

[[route]]
prefix = "/"
pool = "upstream"
cache = true
plugins = ["cache-policy"]
{route}

[[pool]]
name = "upstream"
endpoints = ["http://{upstream}"]

[[plugin]]
name = "cache-policy"
path = "{}"
sha256 = "{sha256}"
config = {config}
"#,
        path.display()
    );
    start_node_in(&toml, dir).await
}

/// A node whose `/` route shows bodies up to 256 bytes to cache-policy.
async fn completion_node(upstream: SocketAddr, dir: &Path) -> breakwater_edge::RunningNode {
    cache_policy_node(
        upstream,
        "plugin_body_bytes = 256",
        "{ default_ttl = 60 }",
        dir,
    )
    .await
}

async fn post(node: &breakwater_edge::RunningNode, body: reqwest::Body) -> Got {
    let response = client()
        .post(url(node, "/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("POST");
    got(response).await
}

/// Sends `body` twice, with its length declared and then in chunks of
/// `piece` bytes, and checks that each time it streamed past the plugins
/// (a bypass) and reached the upstream whole.
async fn streams_past_the_plugins(
    node: &breakwater_edge::RunningNode,
    up: &Upstream,
    body: &str,
    piece: usize,
) {
    let declared = post(node, body.to_owned().into()).await;
    assert_eq!(
        (declared.status, declared.x_cache.as_str()),
        (200, "BYPASS")
    );
    assert_eq!(up.last().body, body);
    let pieces: Vec<Result<String, std::io::Error>> = body
        .as_bytes()
        .chunks(piece)
        .map(|piece| Ok(String::from_utf8_lossy(piece).into_owned()))
        .collect();
    let chunked = post(
        node,
        reqwest::Body::wrap_stream(futures_util::stream::iter(pieces)),
    )
    .await;
    assert_eq!((chunked.status, chunked.x_cache.as_str()), (200, "BYPASS"));
    assert_eq!(up.last().body, body);
}

#[tokio::test]
async fn completions_are_cached_by_the_body_the_route_shows_its_plugins() {
    let up = Upstream::start().await;
    // An inference server's `no-cache`: the plugin's TTL overrides it.
    up.set(
        "/v1/chat/completions",
        Script {
            echo_body: true,
            ..script(
                200,
                &[
                    ("content-type", "application/json"),
                    ("cache-control", "no-cache"),
                ],
                "answer to ",
            )
        },
    );
    let dir = tmp();
    let node = completion_node(up.addr, dir.path()).await;

    let greedy = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}"#;
    let first = post(&node, greedy.into()).await;
    assert_eq!((first.status, first.x_cache.as_str()), (200, "MISS"));
    assert_eq!(up.last().body, greedy, "the body is forwarded unchanged");
    let respaced = r#"{ "temperature": 0.0, "messages": [ {"content": "hi", "role": "user"} ], "model": "m" }"#;
    let hit = post(&node, respaced.into()).await;
    assert_eq!(hit.x_cache, "HIT");
    assert_eq!(hit.body, first.body, "a hit is the stored answer");
    assert_eq!(up.count(), 1);
    let text = common::metrics_text(&node).await;
    assert!(
        text.contains(
            r#"breakwater_cache_requests_total{route="upstream",tier="memory",result="hit"} 1"#
        ),
        "hits are counted per route and tier:\n{text}"
    );

    let sampled = greedy.replace(r#""temperature":0"#, r#""temperature":0.5"#);
    assert_eq!(post(&node, sampled.into()).await.x_cache, "BYPASS");
    assert_eq!(up.count(), 2);

    // Larger than the route shows: the plugin is told, bypasses, and the
    // upstream still gets every byte, whether the length was declared or
    // the body came in chunks the node read part of.
    let long = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}],"temperature":0}}"#,
        "x".repeat(400)
    );
    streams_past_the_plugins(&node, &up, &long, 100).await;
    assert_eq!(up.count(), 4);
    node.shutdown().await;
}

#[tokio::test]
async fn bodies_beyond_the_nodes_budget_stream_past_the_plugins() {
    let up = Upstream::start().await;
    up.set(
        "/v1/chat/completions",
        Script {
            echo_body: true,
            ..script(200, &[("content-type", "application/json")], "answer to ")
        },
    );
    let dir = tmp();
    // Room for one 100-byte body at a time, node-wide.
    let node = cache_policy_node(
        up.addr,
        "plugin_body_bytes = 256\n\n[limits]\nplugin_body_budget = 100",
        "{ default_ttl = 60 }",
        dir.path(),
    )
    .await;
    let small = r#"{"model":"m","prompt":"a","temperature":0}"#;
    assert_eq!(post(&node, small.into()).await.x_cache, "MISS");
    let large = format!(
        r#"{{"model":"m","prompt":"{}","temperature":0}}"#,
        "b".repeat(120)
    );
    streams_past_the_plugins(&node, &up, &large, 40).await;
    assert_eq!(
        metric(&node, "breakwater_plugin_body_over_budget_total").await,
        2.0
    );
    // What a request held is given back: the small body is shown again.
    assert_eq!(post(&node, small.into()).await.x_cache, "HIT");
    node.shutdown().await;
}

/// `GET /admin/usage` with `query`, with or without the admin token.
async fn usage(
    node: &breakwater_edge::RunningNode,
    token: Option<&str>,
    query: &str,
) -> (u16, serde_json::Value) {
    let mut request = client().get(admin_url(node, &format!("/admin/usage?{query}")));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("usage");
    let status = response.status().as_u16();
    (status, common::json(&response.bytes().await.expect("body")))
}

#[tokio::test]
async fn tokens_are_counted_per_key_and_tier_and_cached_ones_apart() {
    let up = Upstream::start().await;
    up.set(
        "/v1/chat/completions",
        script(
            200,
            &[("content-type", "application/json")],
            r#"{"id":"chatcmpl-1","choices":[{"message":{"content":"Paris."}}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}"#,
        ),
    );
    let dir = tmp();
    let node = cache_policy_node(
        up.addr,
        "plugin_body_bytes = 256\ncount_tokens = true\n\n[usage]\ntier_header = \"x-tier\"",
        "{ default_ttl = 60 }",
        dir.path(),
    )
    .await;
    let ask = || async {
        let response = client()
            .post(url(&node, "/v1/chat/completions"))
            .header("content-type", "application/json")
            .header("authorization", "Bearer k-1")
            .header("x-tier", "gold")
            .body(r#"{"model":"m","prompt":"capital of France","temperature":0}"#)
            .send()
            .await
            .expect("POST");
        got(response).await
    };
    assert_eq!(ask().await.x_cache, "MISS");
    assert_eq!(ask().await.x_cache, "HIT");

    let (status, totals) = usage(&node, Some("secret"), "key=k-1").await;
    assert_eq!(status, 200, "{totals}");
    assert_eq!(totals["tier"], "gold");
    assert_eq!(
        (
            &totals["prompt_tokens"],
            &totals["completion_tokens"],
            &totals["cached_tokens"]
        ),
        (&12.into(), &3.into(), &15.into()),
        "{totals}"
    );
    // By digest, without sending the key itself.
    let digest = totals["key_sha256"].as_str().expect("a digest").to_owned();
    assert!(!digest.contains("k-1"));
    let (status, again) = usage(&node, Some("secret"), &format!("key_sha256={digest}")).await;
    assert_eq!((status, &again), (200, &totals));
    assert_eq!(usage(&node, Some("secret"), "key=k-2").await.0, 404);
    assert_eq!(usage(&node, Some("secret"), "").await.0, 400);
    assert_eq!(usage(&node, None, "key=k-1").await.0, 401);

    // A waiter that follows a leader's whole (not streamed) answer was
    // spared its 3 completion tokens too.
    let gate = CancellationToken::new();
    up.set(
        "/v1/chat/completions",
        Script {
            gate: Some(gate.clone()),
            ..script(
                200,
                &[("content-type", "application/json")],
                r#"{"id":"chatcmpl-2","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3}}"#,
            )
        },
    );
    let saved = || async {
        let text = common::metrics_text(&node).await;
        text.lines()
            .find_map(|line| {
                line.strip_prefix(r#"breakwater_cache_tokens_saved_total{kind="completion"} "#)
            })
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let before = saved().await;
    let other = || {
        client()
            .post(url(&node, "/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(r#"{"model":"m","prompt":"capital of Spain","temperature":0}"#)
            .send()
    };
    let leading = tokio::spawn(other());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while up.count() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the leader never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let waiting = tokio::spawn(other());
    while metric(&node, "breakwater_cache_coalesced_waiting").await < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the waiter never joined"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gate.cancel();
    let leader = got(leading.await.expect("task").expect("leader")).await;
    let waiter = got(waiting.await.expect("task").expect("waiter")).await;
    assert_eq!(
        (leader.x_cache.as_str(), waiter.x_cache.as_str()),
        ("MISS", "HIT")
    );
    assert_eq!(saved().await - before, 3.0);
    let (_, anonymous) = usage(&node, Some("secret"), "key_sha256=anonymous").await;
    assert_eq!(
        (
            &anonymous["prompt_tokens"],
            &anonymous["completion_tokens"],
            &anonymous["cached_tokens"]
        ),
        (&5.into(), &3.into(), &8.into()),
        "the leader's tokens, and the waiter's as cached: {anonymous}"
    );

    let text = common::metrics_text(&node).await;
    for (kind, tokens) in [("prompt", 12), ("completion", 3), ("cached", 15)] {
        let line = format!(r#"breakwater_tokens_total{{tier="gold",kind="{kind}"}} {tokens}"#);
        assert!(text.contains(&line), "{line} in:\n{text}");
    }
    node.shutdown().await;
}

#[tokio::test]
async fn a_body_broken_while_shown_to_plugins_is_the_clients_error() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start().await;
    let dir = tmp();
    let node = completion_node(up.addr, dir.path()).await;
    let mut stream = tokio::net::TcpStream::connect(common::listener(&node))
        .await
        .expect("connect");
    stream
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        )
        .await
        .expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("bad_request_body"), "{answer}");
    assert_eq!(up.count(), 0, "nothing reached the upstream");
    assert!(common::metrics_text(&node).await.contains(
        r#"breakwater_edge_client_body_errors_total{pool="upstream",kind="malformed"} 1"#
    ));
    node.shutdown().await;
}

/// An unlabelled metric's value on the node's `/metrics`; 0 when absent.
async fn metric(node: &breakwater_edge::RunningNode, name: &str) -> f64 {
    let text = common::metrics_text(node).await;
    text.lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .find_map(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

fn get_request(
    node: &breakwater_edge::RunningNode,
    path: &str,
    headers: &[(&str, &str)],
) -> tokio::task::JoinHandle<Got> {
    let mut request = client().get(url(node, path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    tokio::spawn(async move { got(request.send().await.expect("request")).await })
}

/// Two requests for `path` that overlap for certain: the leader reaches
/// the upstream, which holds its answer on `gate` until the waiter has
/// joined the leader's flight; then both get their answers.
async fn overlap(
    node: &breakwater_edge::RunningNode,
    up: &Upstream,
    path: &str,
    gate: &CancellationToken,
    leader: &[(&str, &str)],
    waiter: &[(&str, &str)],
) -> (Got, Got) {
    let before = up.count();
    let leading = get_request(node, path, leader);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while up.count() == before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path}: the leader never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let waiting = get_request(node, path, waiter);
    while metric(node, "breakwater_cache_coalesced_waiting").await < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path}: the waiter never joined"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gate.cancel();
    let leader = leading.await.expect("leader task");
    let waiter = waiting.await.expect("waiter task");
    (leader, waiter)
}

#[tokio::test]
async fn a_coalesced_waiter_gets_the_leaders_answer_only_when_it_is_a_fresh_hit_for_it() {
    struct Case {
        path: &'static str,
        response: &'static [(&'static str, &'static str)],
        leader: &'static [(&'static str, &'static str)],
        waiter: &'static [(&'static str, &'static str)],
        shared: bool,
    }
    const ALICE: &[(&str, &str)] = &[("cookie", "user=alice")];
    const BOB: &[(&str, &str)] = &[("cookie", "user=bob")];
    let cases = [
        Case {
            path: "/fresh",
            response: &[("cache-control", "max-age=60")],
            leader: ALICE,
            waiter: BOB,
            shared: true,
        },
        Case {
            path: "/no-cache",
            response: &[("cache-control", "no-cache")],
            leader: ALICE,
            waiter: BOB,
            shared: false,
        },
        Case {
            path: "/max-age-0",
            response: &[("cache-control", "max-age=0")],
            leader: ALICE,
            waiter: BOB,
            shared: false,
        },
        Case {
            path: "/must-revalidate",
            response: &[("cache-control", "max-age=0, must-revalidate")],
            leader: ALICE,
            waiter: BOB,
            shared: false,
        },
        // Personalised by the cookie, with no freshness at all: stored
        // (a 200 may be), but never fresh.
        Case {
            path: "/no-freshness",
            response: &[],
            leader: ALICE,
            waiter: BOB,
            shared: false,
        },
        Case {
            path: "/authorization",
            response: &[("cache-control", "max-age=60")],
            leader: &[("cookie", "user=alice"), ("authorization", "Bearer alice")],
            waiter: BOB,
            shared: false,
        },
        // `s-maxage` makes an answer to `Authorization` storable, but at
        // 0 it is never fresh.
        Case {
            path: "/authorization-s-maxage-0",
            response: &[("cache-control", "s-maxage=0")],
            leader: &[("cookie", "user=alice"), ("authorization", "Bearer alice")],
            waiter: BOB,
            shared: false,
        },
        Case {
            path: "/vary",
            response: &[("cache-control", "max-age=60"), ("vary", "accept-language")],
            leader: &[("cookie", "user=alice"), ("accept-language", "en")],
            waiter: &[("cookie", "user=bob"), ("accept-language", "de")],
            shared: false,
        },
        // The waiter's own directives: it wants the origin's answer.
        Case {
            path: "/waiter-no-cache",
            response: &[("cache-control", "max-age=60")],
            leader: ALICE,
            waiter: &[("cookie", "user=bob"), ("cache-control", "no-cache")],
            shared: false,
        },
        Case {
            path: "/waiter-min-fresh",
            response: &[("cache-control", "max-age=60")],
            leader: ALICE,
            waiter: &[("cookie", "user=bob"), ("cache-control", "min-fresh=120")],
            shared: false,
        },
    ];
    let up = Upstream::start().await;
    let dir = tmp();
    let node = node_for(up.addr, "", "", dir.path()).await;
    // Every case runs; the wrong ones are listed together at the end.
    let mut wrong = Vec::new();
    for case in cases {
        let gate = CancellationToken::new();
        let mut s = script(200, case.response, "page for ");
        s.gate = Some(gate.clone());
        s.echo_header = Some("cookie");
        up.set(case.path, s);
        let before = up.count();
        let (leader, waiter) =
            overlap(&node, &up, case.path, &gate, case.leader, case.waiter).await;
        let upstream_requests = up.count() - before;
        let seen = (
            (leader.status, leader.x_cache, leader.body),
            (waiter.status, waiter.x_cache, waiter.body),
            upstream_requests,
        );
        let leaders = (200, "MISS".to_owned(), "page for user=alice".to_owned());
        let expected = if case.shared {
            (
                leaders.clone(),
                (200, "HIT".to_owned(), leaders.2.clone()),
                1,
            )
        } else {
            // The waiter went upstream itself and got its own answer.
            (
                leaders,
                (200, "MISS".to_owned(), "page for user=bob".to_owned()),
                2,
            )
        };
        if seen != expected {
            wrong.push(format!(
                "{}: got {seen:?}, expected {expected:?}",
                case.path
            ));
        }
    }
    assert!(wrong.is_empty(), "wrong answers:\n{}", wrong.join("\n"));
    node.shutdown().await;
}

#[tokio::test]
async fn public_answers_are_stored_without_set_cookie() {
    let up = Upstream::start().await;
    up.set(
        "/public",
        script(
            200,
            &[
                ("cache-control", "public, max-age=60"),
                ("set-cookie", "id=first"),
            ],
            "shared",
        ),
    );
    let dir = tmp();
    let node = node_for(up.addr, "", "", dir.path()).await;

    let first = get(&node, "/public").await;
    assert_eq!(first.x_cache, "MISS");
    assert_eq!(
        first.headers.get("set-cookie").map(|v| v.to_str().unwrap()),
        Some("id=first"),
        "the client the origin answered keeps its cookie"
    );
    let hit = get(&node, "/public").await;
    assert_eq!((hit.x_cache.as_str(), hit.body.as_str()), ("HIT", "shared"));
    assert_eq!(
        hit.headers.get("set-cookie"),
        None,
        "never another client's cookie"
    );

    // A waiter that shares the leader's answer does not get its cookie.
    let gate = CancellationToken::new();
    let mut s = script(
        200,
        &[
            ("cache-control", "public, max-age=60"),
            ("set-cookie", "id=leader"),
        ],
        "shared",
    );
    s.gate = Some(gate.clone());
    up.set("/public-coalesced", s);
    let (leader, waiter) = overlap(&node, &up, "/public-coalesced", &gate, &[], &[]).await;
    assert_eq!(
        leader
            .headers
            .get("set-cookie")
            .map(|v| v.to_str().unwrap()),
        Some("id=leader")
    );
    assert_eq!(waiter.x_cache, "HIT");
    assert_eq!(waiter.headers.get("set-cookie"), None);

    // A 304 that sets a cookie refreshes the entry but adds no cookie to it.
    let mut s = script(
        200,
        &[("cache-control", "public, max-age=0"), ("etag", "\"e\"")],
        "validated",
    );
    s.honour_validators = true;
    up.set("/public-304", s);
    get(&node, "/public-304").await;
    let mut s = script(
        200,
        &[
            ("cache-control", "public, max-age=60"),
            ("etag", "\"e\""),
            ("set-cookie", "id=revalidator"),
        ],
        "unused",
    );
    s.honour_validators = true;
    up.set("/public-304", s);
    let revalidated = get(&node, "/public-304").await;
    assert_eq!(
        (revalidated.x_cache.as_str(), revalidated.body.as_str()),
        ("HIT", "validated")
    );
    assert_eq!(
        revalidated
            .headers
            .get("set-cookie")
            .map(|v| v.to_str().unwrap()),
        Some("id=revalidator"),
        "the client whose request was validated gets the cookie"
    );
    let hit = get(&node, "/public-304").await;
    assert_eq!(
        (hit.x_cache.as_str(), hit.body.as_str()),
        ("HIT", "validated")
    );
    assert_eq!(hit.headers.get("set-cookie"), None);
    node.shutdown().await;
}

#[tokio::test]
async fn a_get_with_a_body_bypasses_the_cache_and_is_never_stored() {
    let up = Upstream::start().await;
    let mut s = script(200, &[("cache-control", "max-age=60")], "results for ");
    s.echo_body = true;
    up.set("/search", s);
    let dir = tmp();
    let node = node_for(up.addr, "", "", dir.path()).await;

    let with_body = client()
        .get(url(&node, "/search"))
        .body("q=poison")
        .send()
        .await
        .expect("request");
    let with_body = got(with_body).await;
    assert_eq!(
        (with_body.x_cache.as_str(), with_body.body.as_str()),
        ("BYPASS", "results for q=poison")
    );
    assert_eq!(up.last().body, "q=poison", "the origin saw the body");
    let plain = get(&node, "/search").await;
    assert_eq!(
        (plain.x_cache.as_str(), plain.body.as_str()),
        ("MISS", "results for "),
        "nothing was stored under the bodiless key"
    );
    assert_eq!(get(&node, "/search").await.x_cache, "HIT");
    node.shutdown().await;
}

#[tokio::test]
async fn stale_is_never_served_when_the_origin_breaks_the_connection_and_a_directive_forbids_it() {
    let cases = [
        ("/plain", "max-age=1", true),
        ("/must-revalidate", "max-age=1, must-revalidate", false),
        ("/proxy-revalidate", "max-age=1, proxy-revalidate", false),
        ("/no-cache", "max-age=1, no-cache", false),
        ("/s-maxage", "s-maxage=1", false),
    ];
    let up = Upstream::start().await;
    let dir = tmp();
    // Broken connections in a row must not eject the only endpoint here.
    let pool = "outlier = { consecutive_failures = 1000 }";
    let node = node_with_pool(up.addr, "", "", pool, dir.path()).await;
    for (path, cc, _) in cases {
        up.set(path, script(200, &[("cache-control", cc)], "stored"));
        assert_eq!(get(&node, path).await.x_cache, "MISS", "{path}");
    }
    // Staleness only grows: sleeping longer than needed cannot change the
    // outcome.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for (path, cc, stale_allowed) in cases {
        let mut s = script(200, &[("cache-control", cc)], "never sent");
        s.disconnect = true;
        up.set(path, s);
        let before = up.count();
        let answer = get(&node, path).await;
        assert!(up.count() > before, "{path}: the origin was asked");
        if stale_allowed {
            assert_eq!(
                (answer.status, answer.x_cache.as_str(), answer.body.as_str()),
                (200, "STALE", "stored"),
                "{path}: disconnected, stale may be served"
            );
        } else {
            assert_eq!(
                (answer.status, answer.x_cache.as_str()),
                (502, "MISS"),
                "{path}: `{cc}` forbids serving it stale"
            );
        }
    }
    node.shutdown().await;
}

#[tokio::test]
async fn ranges_are_cut_from_a_stored_complete_answer() {
    let up = Upstream::start().await;
    up.set(
        "/r",
        script(
            200,
            &[
                ("cache-control", "max-age=3600"),
                ("etag", "\"v1\""),
                ("content-type", "text/plain"),
            ],
            "0123456789",
        ),
    );
    let dir = tmp();
    let node = node_for(up.addr, "", "", dir.path()).await;

    // Nothing stored: the origin answers the range itself, nothing is kept.
    let passed = get_with(&node, "/r", &[("range", "bytes=0-1")]).await;
    assert_eq!(passed.x_cache, "BYPASS");
    assert_eq!(
        up.last().headers.get("range").map(String::as_str),
        Some("bytes=0-1")
    );
    assert_eq!(
        get(&node, "/r").await.x_cache,
        "MISS",
        "a range stores nothing"
    );
    let stored = up.count();

    /// Request headers, then the status, body and `Content-Range` expected.
    type Case<'a> = (&'a [(&'a str, &'a str)], u16, &'a str, Option<&'a str>);
    let cases: [Case; 7] = [
        (&[("range", "bytes=0-1")], 206, "01", Some("bytes 0-1/10")),
        (&[("range", "bytes=5-")], 206, "56789", Some("bytes 5-9/10")),
        (&[("range", "bytes=-3")], 206, "789", Some("bytes 7-9/10")),
        (&[("range", "bytes=8-20")], 206, "89", Some("bytes 8-9/10")),
        // Several ranges: the whole answer, which RFC 9110 §14.2 allows.
        (&[("range", "bytes=0-1,5-6")], 200, "0123456789", None),
        // A stale If-Range: the whole answer.
        (
            &[("range", "bytes=0-1"), ("if-range", "\"v0\"")],
            200,
            "0123456789",
            None,
        ),
        (
            &[("range", "bytes=0-1"), ("if-range", "\"v1\"")],
            206,
            "01",
            Some("bytes 0-1/10"),
        ),
    ];
    for (headers, status, body, content_range) in cases {
        let got = get_with(&node, "/r", headers).await;
        assert_eq!(
            (got.status, got.x_cache.as_str(), got.body.as_str()),
            (status, "HIT", body),
            "{headers:?}"
        );
        assert_eq!(
            got.headers
                .get("content-range")
                .and_then(|v| v.to_str().ok()),
            content_range,
            "{headers:?}"
        );
        assert_eq!(
            got.headers["content-length"],
            body.len().to_string().as_str(),
            "{headers:?}"
        );
    }

    let beyond = get_with(&node, "/r", &[("range", "bytes=20-")]).await;
    assert_eq!((beyond.status, beyond.x_cache.as_str()), (416, "HIT"));
    assert_eq!(beyond.headers["content-range"], "bytes */10");
    assert!(
        beyond.body.contains("range_not_satisfiable"),
        "{}",
        beyond.body
    );

    // A validator that matches wins over the range (RFC 9110 §13.2.2).
    let validated = get_with(
        &node,
        "/r",
        &[("range", "bytes=0-1"), ("if-none-match", "\"v1\"")],
    )
    .await;
    assert_eq!(validated.status, 304);

    assert_eq!(up.count(), stored, "every range above came from the cache");
    node.shutdown().await;
}
