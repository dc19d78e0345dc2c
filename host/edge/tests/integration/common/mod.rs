//! Shared harness for the edge node's integration tests: a node started from
//! a TOML string on loopback, a small real upstream server that can be told
//! how to misbehave, and a raw HTTP/1.1 client for what `reqwest` will not send.
//!
//! Upstream paths (the last path segment decides, so `/api/echo` is `echo`):
//! - `echo`: answers the request's method, path, version and headers as JSON;
//! - `sse?n=N&delay_ms=D`: N server-sent events, one frame each, D ms apart;
//!   with `step=1` instead, each event after the first waits for
//!   [`Upstream::step`];
//! - `sleep?ms=M`: answers `slept` after M ms;
//! - `close`: reads the head, then drops the connection without answering;
//! - `size`: reads the whole body and answers `{"bytes": N}`.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use breakwater_edge::RunningNode;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Upper bound for anything a test waits on; generous for a loaded machine.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// A component built from `plugins/` by `cargo xtask test`: its path and sha256.
pub fn component(name: &str) -> (PathBuf, String) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../plugins/target/wasm32-wasip2/release")
        .join(format!("{name}.wasm"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; `cargo xtask test` builds the plugins first",
            path.display()
        )
    });
    (path, breakwater_sandbox::sha256_hex(&bytes))
}

/// Starts a node from configuration `toml`; relative paths resolve against
/// the current directory.
pub async fn start_node(toml: &str) -> RunningNode {
    start_node_in(toml, Path::new(".")).await
}

/// Starts a node from configuration `toml`, resolving relative paths against `base_dir`.
pub async fn start_node_in(toml: &str, base_dir: &Path) -> RunningNode {
    let config = edge_config::parse(toml, Path::new("test.toml"), base_dir)
        .unwrap_or_else(|e| panic!("the test configuration is invalid:\n{e}\n---\n{toml}"));
    breakwater_edge::start(config)
        .await
        .unwrap_or_else(|e| panic!("the node did not start: {e}"))
}

/// A node with a plain listener and an admin listener on free ports that
/// proxies every path to `upstream`. `limits` and `pool` are extra TOML
/// lines for the `[limits]` and `[[pool]]` tables.
pub fn proxy_config(upstream: SocketAddr, limits: &str, pool: &str) -> String {
    format!(
        r#"
[[listener]]
address = "127.0.0.1:0"

[admin]
address = "127.0.0.1:0"

[limits]
{limits}

[[route]]
prefix = "/"
pool = "upstream"

[[pool]]
name = "upstream"
endpoints = ["http://{upstream}"]
{pool}
"#
    )
}

/// The first data-plane address of `node`.
pub fn listener(node: &RunningNode) -> SocketAddr {
    *node
        .listener_addrs()
        .first()
        .expect("the node has a listener")
}

/// `http://<first listener><path>`.
pub fn url(node: &RunningNode, path: &str) -> String {
    format!("http://{}{path}", listener(node))
}

/// `http://<admin listener><path>`.
pub fn admin_url(node: &RunningNode, path: &str) -> String {
    let admin = node.admin_addr().expect("the node has an admin listener");
    format!("http://{admin}{path}")
}

/// The node's `/metrics` page.
pub async fn metrics_text(node: &RunningNode) -> String {
    client()
        .get(admin_url(node, "/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text")
}

/// The value of the sample of `name` whose labels include every one of
/// `labels` (`key="value"` pairs), from the node's `/metrics`.
pub async fn metric(node: &RunningNode, name: &str, labels: &[&str]) -> Option<f64> {
    let text = metrics_text(node).await;
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let matches = series.starts_with(&format!("{name}{{"))
            && labels.iter().all(|label| series.contains(label));
        matches.then(|| value.parse().ok()).flatten()
    })
}

/// A reqwest client with a bounded overall timeout.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .expect("reqwest client")
}

/// Parses `body` as JSON, with the body in the panic message if it is not.
pub fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {:?}",
            String::from_utf8_lossy(&body[..body.len().min(2000)])
        )
    })
}

/// Asserts that `body` is the node's JSON error:
/// `{"error":{"status":STATUS,"code":"CODE","message":"…"}}`.
pub fn assert_json_error(body: &[u8], status: u16, code: &str) {
    let value = json(body);
    let error = &value["error"];
    assert_eq!(error["status"], status, "error.status in {value}");
    assert_eq!(error["code"], code, "error.code in {value}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error.message must be a non-empty string in {value}"
    );
}

/// An address on which nothing listens (bound, then released).
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a free port");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    addr
}

/// A running test upstream. Dropping it stops accepting connections.
pub struct Upstream {
    pub addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    step: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Upstream {
    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Request heads received so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Lets a `sse?step=1` stream send its next event (one permit is kept
    /// if the stream is not waiting yet).
    pub fn step(&self) {
        self.step.notify_one();
    }

    /// Waits until the upstream has received `n` requests.
    pub async fn wait_for_requests(&self, n: usize) {
        tokio::time::timeout(PATIENCE, async {
            while self.requests() < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the upstream did not receive {n} request(s)"));
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type UpstreamBody = BoxBody<Bytes, std::io::Error>;

/// Starts the test upstream on a free loopback port (HTTP/1.1, as the node
/// speaks to upstreams).
pub async fn start_upstream() -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the upstream");
    let addr = listener.local_addr().expect("upstream addr");
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let step = Arc::new(Notify::new());
    let task = tokio::spawn({
        let connections = connections.clone();
        let requests = requests.clone();
        let step = step.clone();
        async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                connections.fetch_add(1, Ordering::SeqCst);
                let requests = requests.clone();
                let step = step.clone();
                tokio::spawn(async move {
                    // Fired by `/close`: dropping the connection future closes
                    // the socket without a response.
                    let close = Arc::new(Notify::new());
                    let service = hyper::service::service_fn({
                        let close = close.clone();
                        move |request| {
                            requests.fetch_add(1, Ordering::SeqCst);
                            upstream_handle(request, close.clone(), step.clone())
                        }
                    });
                    let connection = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = connection => {}
                        () = close.notified() => {}
                    }
                });
            }
        }
    });
    Upstream {
        addr,
        connections,
        requests,
        step,
        task,
    }
}

fn query_param(request: &Request<Incoming>, name: &str) -> Option<u64> {
    request.uri().query()?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == name).then(|| value.parse().ok()).flatten()
    })
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<UpstreamBody> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(
            Full::new(body.into())
                .map_err(|never: Infallible| match never {})
                .boxed(),
        )
        .expect("valid response")
}

async fn upstream_handle(
    request: Request<Incoming>,
    close: Arc<Notify>,
    step: Arc<Notify>,
) -> Result<Response<UpstreamBody>, Infallible> {
    let path = request.uri().path().to_owned();
    let last = path.rsplit('/').next().unwrap_or("");
    let response = match last {
        "echo" => {
            let mut headers = serde_json::Map::new();
            for name in request.headers().keys() {
                let values: Vec<String> = request
                    .headers()
                    .get_all(name)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect();
                headers.insert(name.as_str().to_owned(), values.join(", ").into());
            }
            let body = serde_json::json!({
                "method": request.method().as_str(),
                "path": request.uri().path(),
                "query": request.uri().query(),
                "version": format!("{:?}", request.version()),
                "headers": headers,
            });
            full(StatusCode::OK, "application/json", body.to_string())
        }
        "sse" => {
            let n = query_param(&request, "n").unwrap_or(5);
            let delay = Duration::from_millis(query_param(&request, "delay_ms").unwrap_or(100));
            let stepped = query_param(&request, "step") == Some(1);
            let events = futures_util::stream::unfold(0, move |i| {
                let step = step.clone();
                async move {
                    if i >= n {
                        return None;
                    }
                    if i > 0 && stepped {
                        step.notified().await;
                    } else if i > 0 {
                        tokio::time::sleep(delay).await;
                    }
                    let event = format!("id: {i}\ndata: event {i}\n\n");
                    Some((Ok(Frame::data(Bytes::from(event))), i + 1))
                }
            });
            Response::builder()
                .header(hyper::header::CONTENT_TYPE, "text/event-stream")
                .header(hyper::header::CACHE_CONTROL, "no-cache")
                .body(StreamBody::new(events).boxed())
                .expect("valid response")
        }
        "sleep" => {
            let ms = query_param(&request, "ms").unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            full(StatusCode::OK, "text/plain", "slept")
        }
        "close" => {
            close.notify_one();
            std::future::pending::<()>().await;
            unreachable!("the connection is dropped before this")
        }
        "size" => {
            let mut body = request.into_body();
            let mut bytes = 0u64;
            let mut complete = true;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => {
                        bytes += frame.data_ref().map_or(0, |d| d.len() as u64);
                    }
                    Err(_) => {
                        complete = false;
                        break;
                    }
                }
            }
            let status = if complete {
                StatusCode::OK
            } else {
                StatusCode::BAD_REQUEST
            };
            let body = serde_json::json!({ "bytes": bytes, "complete": complete });
            full(status, "application/json", body.to_string())
        }
        _ => full(StatusCode::NOT_FOUND, "text/plain", "unknown test path"),
    };
    Ok(response)
}

/// A response read off a raw connection.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Status line and headers, as text.
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then_some(value.trim())
        })
    }
}

/// Sends `bytes` on a fresh connection to `addr`.
pub async fn raw_connect_and_send(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect to the node");
    stream.write_all(bytes).await.expect("send the request");
    stream
}

/// Reads one response from `stream`: the head, then a `Content-Length`
/// body, or everything up to the close. Tolerates a reset after the
/// response. `None` when the connection ended before a whole head arrived.
/// Panics when nothing conclusive arrives within [`PATIENCE`].
pub async fn read_raw_response(stream: &mut TcpStream) -> Option<RawResponse> {
    let mut buf = Vec::new();
    let outcome = tokio::time::timeout(PATIENCE, async {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some(response) = parse_complete(&buf) {
                return Some(response);
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return parse_until_close(&buf),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    outcome.unwrap_or_else(|_| {
        panic!(
            "no complete response within {PATIENCE:?}; got {:?}",
            String::from_utf8_lossy(&buf)
        )
    })
}

fn split_head(buf: &[u8]) -> Option<(String, u16, &[u8])> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((head, status, &buf[end + 4..]))
}

fn parse_complete(buf: &[u8]) -> Option<RawResponse> {
    let (head, status, rest) = split_head(buf)?;
    let response = RawResponse {
        status,
        head,
        body: Vec::new(),
    };
    let length: usize = response.header("content-length")?.parse().ok()?;
    (rest.len() >= length).then(|| RawResponse {
        body: rest[..length].to_vec(),
        ..response
    })
}

fn parse_until_close(buf: &[u8]) -> Option<RawResponse> {
    parse_complete(buf).or_else(|| {
        let (head, status, rest) = split_head(buf)?;
        Some(RawResponse {
            status,
            head,
            body: rest.to_vec(),
        })
    })
}

/// Waits until the peer closes `stream` (read returns 0 or an error),
/// discarding anything it sends first. Returns `false` if it is still open
/// after `limit`.
pub async fn closed_within(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    limit: Duration,
) -> bool {
    tokio::time::timeout(limit, async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}
