//! A client never harms other clients through the upstream's health: a
//! `breakwater edge` node in front of one stand-in GPU host, sent request
//! bodies that break on the client's side (bad chunked framing, uploads cut
//! off, bodies over `max_body_bytes` or slower than `body_read_timeout`,
//! clients that leave) over raw TCP. Each gets its own answer (400, 408,
//! 413, or none when the client is gone), and none counts against the
//! endpoint: no ejection, no failed attempt, no upstream error.

use std::net::SocketAddr;
use std::time::Duration;

use breakwater_e2e::{EdgeProcess, PATIENCE, StandIn, metric, metric_sum, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const STAND_IN: &str = env!("CARGO_BIN_EXE_stand-in-upstream");

/// Bodies over 4 KiB are refused, bodies have 300 ms to arrive, and only
/// bodies up to 1 KiB are kept for a retry (larger ones stream upstream as
/// they arrive, so that their breaking happens mid-attempt).
fn edge_config(upstream: &StandIn) -> String {
    format!(
        r#"
[node]
name = "client-faults"
region = "eu"

[[listener]]
address = "{{listen}}"

[admin]
address = "{{admin}}"

[limits]
max_body_bytes = 4096
body_read_timeout = "300ms"

[[route]]
prefix = "/"
pool = "eu"

[[pool]]
name = "eu"
region = "eu"
endpoints = ["http://{}"]
first_byte_timeout = "5s"
retry = {{ buffer_bytes = 1024 }}
"#,
        upstream.addr
    )
}

/// What the client does after writing its bytes.
#[derive(Clone, Copy, Debug)]
enum Then {
    /// Waits for the answer.
    Read,
    /// Shuts its sending side, then waits for an answer (or the close).
    HalfClose,
    /// Closes the connection without reading.
    Leave,
    /// Reads the answer's head, then closes the connection.
    LeaveAfterHead,
}

/// An answer read off a raw connection: the status, and the body when it
/// came whole.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: String,
}

/// Sends `bytes` on a fresh connection to `addr`, then does `then`;
/// returns the answer, if one came, within [`PATIENCE`].
async fn raw(addr: SocketAddr, bytes: &[u8], then: Then) -> Option<Answer> {
    let mut stream = TcpStream::connect(addr).await.expect("connect to the edge");
    stream.write_all(bytes).await.expect("write the request");
    match then {
        Then::Leave => return None,
        Then::HalfClose => stream.shutdown().await.expect("shut the sending side"),
        Then::Read | Then::LeaveAfterHead => {}
    }
    let read = read_answer(&mut stream, matches!(then, Then::LeaveAfterHead));
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("the edge answers or closes within PATIENCE")
}

/// Reads one HTTP/1.1 answer: its head, then (unless `head_only`) as much
/// of the body as its `Content-Length` says. None when the connection
/// ends (or resets) before a head.
async fn read_answer(stream: &mut TcpStream, head_only: bool) -> Option<Answer> {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&bytes[..head_end]).to_string();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let length = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())
                .flatten()
        })
        .unwrap_or(0);
    while !head_only && bytes.len() < head_end + length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
        }
    }
    let body = String::from_utf8_lossy(&bytes[head_end..]).to_string();
    Some(Answer { status, body })
}

const CHUNKED_HEAD: &str =
    "POST /v1/completions HTTP/1.1\r\nHost: edge\r\nTransfer-Encoding: chunked\r\n\r\n";

/// Every way a client breaks its own exchange, with what it may get back.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// A chunk size line that is not hex: 400.
    MalformedChunked,
    /// A chunked upload whose sender stops sending: 400 or nothing.
    AbortedChunked,
    /// A `Content-Length` upload cut off by closing the connection.
    AbortedLength,
    /// A chunked body over `max_body_bytes`: 413, or a reset while the
    /// rest of the body is still unread.
    TooLarge,
    /// A body that stops arriving: 408 after `body_read_timeout`.
    Slow,
    /// A client that leaves while its answer streams.
    Gone,
}

impl Fault {
    const ALL: [Fault; 6] = [
        Fault::MalformedChunked,
        Fault::AbortedChunked,
        Fault::TooLarge,
        Fault::AbortedLength,
        Fault::Slow,
        Fault::Gone,
    ];

    fn request(self) -> (Vec<u8>, Then) {
        match self {
            Fault::MalformedChunked => (
                format!("{CHUNKED_HEAD}5\r\nhello\r\nzz\r\nnot a chunk\r\n").into_bytes(),
                Then::Read,
            ),
            Fault::AbortedChunked => (
                format!("{CHUNKED_HEAD}5\r\nhello\r\n").into_bytes(),
                Then::HalfClose,
            ),
            Fault::AbortedLength => (
                format!(
                    "POST /v1/completions HTTP/1.1\r\nHost: edge\r\nContent-Length: 3000\r\n\r\n{}",
                    "x".repeat(100)
                )
                .into_bytes(),
                Then::Leave,
            ),
            Fault::TooLarge => (
                format!("{CHUNKED_HEAD}1400\r\n{}\r\n0\r\n\r\n", "x".repeat(0x1400)).into_bytes(),
                Then::Read,
            ),
            Fault::Slow => (
                format!("{CHUNKED_HEAD}5\r\nhello\r\n").into_bytes(),
                Then::Read,
            ),
            Fault::Gone => (
                b"GET /stream?n=200&delay_ms=20 HTTP/1.1\r\nHost: edge\r\n\r\n".to_vec(),
                Then::LeaveAfterHead,
            ),
        }
    }

    /// Whether `answer` is one this fault may get.
    fn accepts(self, answer: Option<&Answer>) -> bool {
        let status = answer.map(|a| a.status);
        match self {
            Fault::MalformedChunked => status == Some(400),
            Fault::AbortedChunked => matches!(status, None | Some(400)),
            Fault::AbortedLength => status.is_none(),
            Fault::TooLarge => matches!(status, None | Some(413)),
            Fault::Slow => status == Some(408),
            Fault::Gone => status == Some(200),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_broken_client_bodies_never_count_against_the_only_endpoint() {
    let upstream = StandIn::start(STAND_IN, "a");
    let edge = tokio::task::block_in_place(|| EdgeProcess::start(&edge_config(&upstream)));
    let http = reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .expect("client");
    let warm = http.get(edge.url("/work")).send().await.expect("GET");
    assert_eq!(warm.status(), 200);

    let (mut malformed, mut slow) = (0u32, 0u32);
    for i in 0..100 {
        let fault = Fault::ALL[i % Fault::ALL.len()];
        let (bytes, then) = fault.request();
        let answer = raw(edge.addr, &bytes, then).await;
        assert!(
            fault.accepts(answer.as_ref()),
            "request {i}, {fault:?}: got {answer:?}\n{}",
            edge.child.stderr()
        );
        match fault {
            Fault::MalformedChunked => malformed += 1,
            Fault::Slow => slow += 1,
            _ => {}
        }
    }
    // Every one of them is finished at the edge, those whose client left
    // included, before the endpoint's record is read.
    wait_for(
        "the edge finishes the broken requests",
        PATIENCE,
        async || {
            metric(
                &edge.metrics().await,
                "breakwater_edge_requests_in_flight",
                &[],
            ) == 0.0
        },
    )
    .await;

    let response = http.get(edge.url("/work")).send().await.expect("GET");
    assert_eq!(response.status(), 200, "{}", edge.child.stderr());
    assert_eq!(response.text().await.expect("body"), "a");
    let metrics = edge.metrics().await;
    for name in [
        "breakwater_upstream_ejections_total",
        "breakwater_upstream_attempt_failures_total",
        "breakwater_edge_upstream_errors_total",
    ] {
        assert_eq!(metric_sum(&metrics, name, &[]), 0.0, "{name}\n{metrics}");
    }
    // Told apart, and counted as the client's.
    assert_eq!(
        metric(
            &metrics,
            "breakwater_edge_client_body_errors_total",
            &[("pool", "eu"), ("kind", "malformed")]
        ),
        f64::from(malformed),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "breakwater_edge_client_body_errors_total",
            &[("pool", "eu"), ("kind", "timeout")]
        ),
        f64::from(slow),
        "{metrics}"
    );
    for status in ["502", "503", "504"] {
        assert_eq!(
            metric_sum(
                &metrics,
                "breakwater_edge_requests_total",
                &[("status", status)]
            ),
            0.0,
            "{status}\n{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_body_is_answered_400_with_a_json_error_not_502() {
    let upstream = StandIn::start(STAND_IN, "a");
    let edge = tokio::task::block_in_place(|| EdgeProcess::start(&edge_config(&upstream)));
    let (bytes, then) = Fault::MalformedChunked.request();
    let answer = raw(edge.addr, &bytes, then)
        .await
        .expect("an answer to a malformed body");
    assert_eq!(answer.status, 400, "{answer:?}");
    let error: serde_json::Value = serde_json::from_str(&answer.body)
        .unwrap_or_else(|e| panic!("a JSON error body: {e}: {answer:?}"));
    assert_eq!(error["error"]["status"], 400, "{error}");
    assert_eq!(error["error"]["code"], "bad_request_body", "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_within_its_limit_is_not_the_endpoints_timeout() {
    let upstream = StandIn::start(STAND_IN, "a");
    // The body may take 10 s; the endpoint has 2 s to answer once it has
    // the whole request. One failure would eject it.
    let config = edge_config(&upstream)
        .replace(
            "body_read_timeout = \"300ms\"",
            "body_read_timeout = \"10s\"",
        )
        .replace("first_byte_timeout = \"5s\"", "first_byte_timeout = \"2s\"")
        .replace(
            "retry = {",
            "outlier = { consecutive_failures = 1 }\nretry = {",
        );
    let edge = tokio::task::block_in_place(|| EdgeProcess::start(&config));
    let mut stream = TcpStream::connect(edge.addr).await.expect("connect");
    stream
        .write_all(CHUNKED_HEAD.as_bytes())
        .await
        .expect("write the head");
    // Nine chunks a quarter second apart: the body takes longer than the
    // first-byte timeout, however fast the machine.
    for _ in 0..9 {
        stream
            .write_all(b"1\r\nx\r\n")
            .await
            .expect("write a chunk");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stream.write_all(b"0\r\n\r\n").await.expect("end the body");
    let answer = tokio::time::timeout(PATIENCE, read_answer(&mut stream, false))
        .await
        .expect("an answer within PATIENCE")
        .expect("an answer");
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (200, "a"),
        "{}",
        edge.child.stderr()
    );
    let metrics = edge.metrics().await;
    for name in [
        "breakwater_upstream_ejections_total",
        "breakwater_upstream_attempt_failures_total",
    ] {
        assert_eq!(metric_sum(&metrics, name, &[]), 0.0, "{name}\n{metrics}");
    }
}
