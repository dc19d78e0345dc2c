//! What reaches the origin is what the node judged: headers named in
//! `Connection` are gone before the cache key and `Vary` are computed, the
//! host is one unambiguous value (RFC 9112 §3.2), forwarding headers from a
//! client are believed only from a trusted proxy, and an upstream cannot
//! switch the client's connection to another protocol.
//!
//! The witness is a real origin over loopback that answers with what it
//! received, cacheable for a minute.

use crate::common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::common::{
    admin_url, assert_json_error, client, json, listener, raw_connect_and_send, read_raw_response,
    start_node,
};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// An origin that answers every request with its host and headers as JSON,
/// `Cache-Control: public, max-age=60`; `?vary=NAME` adds `Vary: NAME`.
struct EchoOrigin {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl EchoOrigin {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("origin address");
        let requests = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let requests = requests.clone();
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let requests = requests.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            requests.fetch_add(1, Ordering::SeqCst);
                            echo(request)
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
        });
        Self {
            addr,
            requests,
            task,
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for EchoOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut headers = serde_json::Map::new();
    for name in request.headers().keys() {
        let values: Vec<Value> = request
            .headers()
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned().into())
            .collect();
        headers.insert(name.as_str().to_owned(), values.into());
    }
    let body = serde_json::json!({ "path": request.uri().path(), "headers": headers });
    let mut response = Response::builder()
        .header("content-type", "application/json")
        .header("cache-control", "public, max-age=60");
    if let Some(vary) = request.uri().query().and_then(|q| q.strip_prefix("vary=")) {
        response = response.header("vary", vary);
    }
    Ok(response
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid response"))
}

/// The values of header `name` the origin received, in order.
fn seen(echo: &Value, name: &str) -> Vec<String> {
    echo["headers"][name]
        .as_array()
        .map(|values| {
            values
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A node proxying `/` to `origin`, through the response cache when
/// `cache`; `node` is extra TOML for the `[node]` table.
fn config(origin: SocketAddr, node: &str, cache: bool) -> String {
    format!(
        r#"
[node]
{node}

[[listener]]
address = "127.0.0.1:0"

[admin]
address = "127.0.0.1:0"

[[route]]
prefix = "/"
pool = "origin"
cache = {cache}

[[pool]]
name = "origin"
endpoints = ["http://{origin}"]
"#
    )
}

/// Sends a raw HTTP/1.x request head (CRLF line ends added) and reads the
/// answer.
async fn raw(node: &breakwater_edge::RunningNode, head: &[&str]) -> common::RawResponse {
    let mut request = head.join("\r\n");
    request.push_str("\r\n\r\n");
    let mut stream = raw_connect_and_send(listener(node), request.as_bytes()).await;
    read_raw_response(&mut stream)
        .await
        .expect("a response from the node")
}

#[tokio::test]
async fn a_header_named_in_connection_is_not_in_the_cache_key_or_vary() {
    let origin = EchoOrigin::start().await;
    let node = start_node(&config(origin.addr, "", true)).await;

    // The attacker's language is stripped as hop-by-hop: the origin answers
    // its default. That answer must not be stored under `X-Lang: fr`.
    let attacker = raw(
        &node,
        &[
            "GET /page?vary=x-lang HTTP/1.1",
            "Host: shop.example",
            "X-Lang: fr",
            "Connection: close, x-lang",
        ],
    )
    .await;
    assert_eq!(attacker.status, 200, "{attacker:?}");
    let seen_by_origin = json(&attacker.body);
    assert!(
        seen(&seen_by_origin, "x-lang").is_empty(),
        "a header named in Connection reached the origin: {seen_by_origin}"
    );

    let victim = raw(
        &node,
        &[
            "GET /page?vary=x-lang HTTP/1.1",
            "Host: shop.example",
            "X-Lang: fr",
            "Connection: close",
        ],
    )
    .await;
    assert_eq!(victim.status, 200, "{victim:?}");
    let answer = json(&victim.body);
    assert_eq!(
        seen(&answer, "x-lang"),
        ["fr"],
        "the victim got the answer made without its language ({:?}): {answer}",
        victim.header("x-cache")
    );
}

#[tokio::test]
async fn a_connection_header_naming_host_or_content_length_is_a_json_400() {
    let origin = EchoOrigin::start().await;
    let node = start_node(&config(origin.addr, "", true)).await;

    for (connection, extra) in [
        ("close, host", "X-Kept: 1"),
        ("Host", "X-Kept: 1"),
        ("close, content-length", "Content-Length: 0"),
    ] {
        let response = raw(
            &node,
            &[
                "GET /page HTTP/1.1",
                "Host: victim.example",
                &format!("Connection: {connection}"),
                extra,
            ],
        )
        .await;
        assert_eq!(
            response.status, 400,
            "Connection: {connection}: {response:?}"
        );
        assert_json_error(&response.body, 400, "bad_connection_header");
    }
    assert_eq!(origin.requests(), 0, "a refused request reached the origin");

    // The victim's host was never keyed with the origin's default answer.
    let victim = raw(
        &node,
        &[
            "GET /page HTTP/1.1",
            "Host: victim.example",
            "Connection: close",
        ],
    )
    .await;
    assert_eq!(victim.status, 200, "{victim:?}");
    assert_eq!(seen(&json(&victim.body), "host"), ["victim.example"]);
    assert_eq!(victim.header("x-cache"), Some("MISS"));

    let metrics = client()
        .get(admin_url(&node, "/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(
        metrics.lines().any(|line| line.starts_with(
            "breakwater_edge_requests_refused_total{reason=\"bad_connection_header\"} 3"
        )),
        "the refusals are not counted:\n{metrics}"
    );
}

#[tokio::test]
async fn two_hosts_or_none_on_http_1_1_is_a_json_400() {
    let origin = EchoOrigin::start().await;
    let node = start_node(&config(origin.addr, "", false)).await;

    let two = raw(
        &node,
        &[
            "GET /page HTTP/1.1",
            "Host: a.example",
            "Host: b.example",
            "Connection: close",
        ],
    )
    .await;
    assert_eq!(two.status, 400, "{two:?}");
    assert_json_error(&two.body, 400, "bad_host");

    let none = raw(&node, &["GET /page HTTP/1.1", "Connection: close"]).await;
    assert_eq!(none.status, 400, "{none:?}");
    assert_json_error(&none.body, 400, "bad_host");

    let malformed = raw(
        &node,
        &[
            "GET /page HTTP/1.1",
            "Host: a.example, b.example",
            "Connection: close",
        ],
    )
    .await;
    assert_eq!(malformed.status, 400, "{malformed:?}");
    assert_json_error(&malformed.body, 400, "bad_host");
    assert_eq!(origin.requests(), 0, "a refused request reached the origin");

    // HTTP/1.0 has no Host requirement.
    let old = raw(&node, &["GET /page HTTP/1.0"]).await;
    assert_eq!(old.status, 200, "{old:?}");
}

#[tokio::test]
async fn an_absolute_form_target_wins_over_host_for_origin_and_cache_key() {
    let origin = EchoOrigin::start().await;
    let node = start_node(&config(origin.addr, "", true)).await;

    let absolute = raw(
        &node,
        &[
            "GET http://victim.example/page HTTP/1.1",
            "Host: attacker.example",
            "Connection: close",
        ],
    )
    .await;
    assert_eq!(absolute.status, 200, "{absolute:?}");
    let answer = json(&absolute.body);
    assert_eq!(seen(&answer, "host"), ["victim.example"], "{answer}");
    assert_eq!(answer["path"], "/page", "{answer}");

    // Stored under the host the origin saw, not the one in `Host`.
    let same = raw(
        &node,
        &[
            "GET /page HTTP/1.1",
            "Host: victim.example",
            "Connection: close",
        ],
    )
    .await;
    assert_eq!(same.header("x-cache"), Some("HIT"), "{same:?}");
    let other = raw(
        &node,
        &[
            "GET /page HTTP/1.1",
            "Host: attacker.example",
            "Connection: close",
        ],
    )
    .await;
    assert_eq!(other.header("x-cache"), Some("MISS"), "{other:?}");
    assert_eq!(seen(&json(&other.body), "host"), ["attacker.example"]);
}

#[tokio::test]
async fn h2_authority_wins_over_a_host_header() {
    let origin = EchoOrigin::start().await;
    let node = start_node(&config(origin.addr, "", false)).await;

    let stream = tokio::net::TcpStream::connect(listener(&node))
        .await
        .expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(connection);
    let request = Request::get("http://victim.example/page")
        .header("host", "attacker.example")
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("h2 response");
    assert_eq!(response.status(), 200);
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .expect("body")
        .to_bytes();
    let answer = json(&body);
    assert_eq!(seen(&answer, "host"), ["victim.example"], "{answer}");
}

const CLAIMS: [(&str, &str); 7] = [
    ("x-forwarded-host", "admin.internal"),
    ("x-original-url", "/admin"),
    ("x-rewrite-url", "/admin"),
    ("x-real-ip", "10.0.0.1"),
    ("x-forwarded-for", "10.0.0.1"),
    ("forwarded", "for=10.0.0.1;host=admin.internal"),
    ("x-forwarded-proto", "https"),
];

async fn send_claims(node: &breakwater_edge::RunningNode) -> Value {
    let mut request = client().get(common::url(node, "/page"));
    for (name, value) in CLAIMS {
        request = request.header(name, value);
    }
    let response = request.send().await.expect("request");
    assert_eq!(response.status(), 200);
    json(&response.bytes().await.expect("body"))
}

#[tokio::test]
async fn forwarding_headers_from_an_untrusted_peer_are_replaced_by_the_edges() {
    let origin = EchoOrigin::start().await;
    let node = start_node(&config(origin.addr, "", false)).await;
    assert_claims_replaced(&send_claims(&node).await);
}

fn assert_claims_replaced(answer: &Value) {
    for name in [
        "x-forwarded-host",
        "x-original-url",
        "x-rewrite-url",
        "x-real-ip",
    ] {
        assert!(
            seen(answer, name).is_empty(),
            "`{name}` reached the origin: {answer}"
        );
    }
    assert_eq!(seen(answer, "x-forwarded-for"), ["127.0.0.1"], "{answer}");
    assert_eq!(seen(answer, "x-forwarded-proto"), ["http"], "{answer}");
    let forwarded = seen(answer, "forwarded");
    assert_eq!(forwarded.len(), 1, "{answer}");
    assert!(
        forwarded[0].starts_with("for=127.0.0.1;proto=http"),
        "{answer}"
    );
}

#[tokio::test]
async fn a_trusted_proxy_keeps_its_forwarding_headers_and_the_edge_appends_to_them() {
    let origin = EchoOrigin::start().await;
    let node = start_node(&config(
        origin.addr,
        r#"trusted_proxies = ["127.0.0.1"]"#,
        false,
    ))
    .await;

    let answer = send_claims(&node).await;
    for (name, value) in &CLAIMS[..4] {
        assert_eq!(seen(&answer, name), [*value], "{answer}");
    }
    assert_eq!(
        seen(&answer, "x-forwarded-for"),
        ["10.0.0.1, 127.0.0.1"],
        "{answer}"
    );
    assert_eq!(seen(&answer, "x-forwarded-proto"), ["https"], "{answer}");
    let forwarded = seen(&answer, "forwarded");
    assert_eq!(forwarded.len(), 2, "{answer}");
    assert_eq!(forwarded[0], "for=10.0.0.1;host=admin.internal");
    assert!(
        forwarded[1].starts_with("for=127.0.0.1;proto=http"),
        "{answer}"
    );

    // Networks the peer is not in change nothing.
    let node = start_node(&config(
        origin.addr,
        r#"trusted_proxies = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]"#,
        false,
    ))
    .await;
    assert_claims_replaced(&send_claims(&node).await);
}

/// An upstream that answers every request head with `101 Switching
/// Protocols`, whatever was asked.
async fn start_switching_origin() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("origin address");
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut chunk = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 101 Switching Protocols\r\n\
                          Connection: upgrade\r\nUpgrade: raw\r\n\r\nswitched bytes",
                    )
                    .await;
                // Held open, as a switched connection would be.
                let _ = stream.read(&mut chunk).await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn an_unrequested_101_from_the_upstream_is_a_json_502() {
    let (origin, task) = start_switching_origin().await;
    let node = start_node(&config(origin, "", false)).await;

    let response = raw(
        &node,
        &[
            "GET /page HTTP/1.1",
            "Host: shop.example",
            "Connection: close",
        ],
    )
    .await;
    assert_eq!(response.status, 502, "{response:?}");
    assert_json_error(&response.body, 502, "unexpected_upgrade");
    task.abort();
}
