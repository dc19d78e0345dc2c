//! Listeners: h2 and HTTP/1.1 over TLS by ALPN, h2c with prior knowledge,
//! the admin endpoints, and a graceful drain.

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::{
    PATIENCE, admin_url, client, json, listener, metric, proxy_config, start_node, start_upstream,
    url,
};

/// A self-signed certificate for `localhost` in a temporary directory, and
/// a node config with a TLS listener using it that proxies to `upstream`.
struct TlsSetup {
    _dir: tempfile::TempDir,
    cert_pem: String,
    config: String,
}

fn tls_setup(upstream: SocketAddr) -> TlsSetup {
    let dir = tempfile::tempdir().expect("tempdir");
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .expect("self-signed certificate");
    let cert_pem = certified.cert.pem();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, &cert_pem).expect("write cert");
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).expect("write key");
    let config = format!(
        r#"
[[listener]]
address = "127.0.0.1:0"
tls = {{ cert = "{}", key = "{}" }}

[limits]
header_read_timeout = "500ms"

[[route]]
prefix = "/"
pool = "upstream"

[[pool]]
name = "upstream"
endpoints = ["http://{upstream}"]
"#,
        cert_path.display(),
        key_path.display()
    );
    TlsSetup {
        _dir: dir,
        cert_pem,
        config,
    }
}

fn tls_client(cert_pem: &str, addr: SocketAddr, http1_only: bool) -> reqwest::Client {
    let root = reqwest::Certificate::from_pem(cert_pem.as_bytes()).expect("PEM certificate");
    let builder = reqwest::Client::builder()
        .add_root_certificate(root)
        .resolve("localhost", addr)
        .timeout(PATIENCE);
    let builder = if http1_only {
        builder.http1_only()
    } else {
        builder
    };
    builder.build().expect("TLS client")
}

#[tokio::test]
async fn tls_listener_negotiates_h2_by_alpn() {
    let upstream = start_upstream().await;
    let setup = tls_setup(upstream.addr);
    let node = start_node(&setup.config).await;
    let addr = listener(&node);

    let response = tls_client(&setup.cert_pem, addr, false)
        .get(format!("https://localhost:{}/echo", addr.port()))
        .send()
        .await
        .expect("h2 request over TLS");
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    let echo = json(&response.bytes().await.expect("body"));
    assert_eq!(echo["headers"]["x-forwarded-proto"], "https", "{echo}");
    assert_eq!(echo["headers"]["via"], "2 breakwater", "{echo}");
    let forwarded = echo["headers"]["forwarded"].as_str().expect("Forwarded");
    assert!(forwarded.contains("proto=https"), "Forwarded: {forwarded}");
}

#[tokio::test]
async fn tls_listener_still_speaks_http1() {
    let upstream = start_upstream().await;
    let setup = tls_setup(upstream.addr);
    let node = start_node(&setup.config).await;
    let addr = listener(&node);

    let response = tls_client(&setup.cert_pem, addr, true)
        .get(format!("https://localhost:{}/echo", addr.port()))
        .send()
        .await
        .expect("HTTP/1.1 request over TLS");
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
    let echo = json(&response.bytes().await.expect("body"));
    assert_eq!(echo["headers"]["via"], "1.1 breakwater", "{echo}");
}

#[tokio::test]
async fn tls_connection_silent_after_the_handshake_is_closed() {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName};

    let upstream = start_upstream().await;
    let setup = tls_setup(upstream.addr);
    let node = start_node(&setup.config).await;

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(setup.cert_pem.as_bytes()).expect("PEM certificate"))
        .expect("root certificate");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(listener(&node))
        .await
        .expect("connect");
    let server_name = ServerName::try_from("localhost").expect("server name");
    let mut tls = tokio::time::timeout(PATIENCE, connector.connect(server_name, tcp))
        .await
        .expect("handshake in time")
        .expect("handshake");

    // Handshake done, then not one byte of HTTP: header_read_timeout is 500 ms.
    assert!(
        common::closed_within(&mut tls, Duration::from_secs(4)).await,
        "a TLS connection that sent no request is still open after 4 s"
    );
}

#[tokio::test]
async fn plain_listener_speaks_h2c_with_prior_knowledge() {
    let upstream = start_upstream().await;
    let node = start_node(&proxy_config(upstream.addr, "", "")).await;

    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(PATIENCE)
        .build()
        .expect("client");
    let response = h2c
        .get(url(&node, "/echo"))
        .send()
        .await
        .expect("h2c request");
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert!(response.headers().contains_key("x-request-id"));
    let echo = json(&response.bytes().await.expect("body"));
    assert_eq!(echo["headers"]["via"], "2 breakwater", "{echo}");
    // The upstream hears HTTP/1.1 with a Host header.
    assert_eq!(echo["version"], "HTTP/1.1", "{echo}");
    assert!(echo["headers"]["host"].is_string(), "{echo}");
}

#[tokio::test]
async fn admin_answers_health_readiness_and_metrics() {
    let upstream = start_upstream().await;
    let node = start_node(&proxy_config(upstream.addr, "", "")).await;
    let http = client();

    let healthz = http
        .get(admin_url(&node, "/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(healthz.status(), 200);
    let readyz = http
        .get(admin_url(&node, "/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(readyz.status(), 200);

    for _ in 0..3 {
        let response = http.get(url(&node, "/echo")).send().await.expect("echo");
        assert_eq!(response.status(), 200);
    }
    let metrics = http
        .get(admin_url(&node, "/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.expect("metrics text");
    assert!(
        text.contains("breakwater_edge_requests_total"),
        "no breakwater_edge_requests_total in /metrics:\n{text}"
    );
    assert!(
        text.lines().any(|line| {
            line.starts_with("breakwater_edge_requests_total")
                && line.contains("route=\"upstream\"")
                && line.contains("status=\"200\"")
        }),
        "no requests_total sample for route=upstream status=200:\n{text}"
    );
}

/// Polls until a fresh TCP connection to `addr` is refused.
async fn refused_within(addr: SocketAddr, limit: Duration) -> bool {
    tokio::time::timeout(limit, async {
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests_and_refuses_new_connections() {
    let upstream = start_upstream().await;
    let node = start_node(&proxy_config(upstream.addr, "shutdown_grace = \"10s\"", "")).await;
    let addr = listener(&node);
    let admin = node.admin_addr().expect("admin listener");
    let http = client();

    let in_flight = tokio::spawn({
        let request = http.get(url(&node, "/sleep?ms=1500")).send();
        async move {
            let response = request.await.expect("the in-flight request completes");
            let status = response.status();
            let body = response.text().await.expect("body");
            (status, body)
        }
    });
    upstream.wait_for_requests(1).await;

    let shutdown = tokio::spawn(node.shutdown());

    // While draining: not ready, and no new connections.
    let readyz = format!("http://{admin}/readyz");
    let saw_draining = tokio::time::timeout(PATIENCE, async {
        loop {
            match http.get(&readyz).send().await {
                Ok(response) if response.status() == 503 => return true,
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                // The admin listener closed: the drain is over already.
                Err(_) => return false,
            }
        }
    })
    .await
    .expect("/readyz kept answering 200 during the drain");
    assert!(
        saw_draining,
        "/readyz never answered 503 while the drain ran"
    );
    assert!(
        refused_within(addr, Duration::from_secs(5)).await,
        "the data-plane listener still accepts connections while draining"
    );

    let (status, body) = tokio::time::timeout(PATIENCE, in_flight)
        .await
        .expect("the in-flight request finishes within the grace")
        .expect("request task");
    assert_eq!(status, 200);
    assert_eq!(body, "slept");

    tokio::time::timeout(PATIENCE, shutdown)
        .await
        .expect("shutdown returns once the drain is done")
        .expect("shutdown task");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener accepts connections after shutdown"
    );
    assert!(
        tokio::net::TcpStream::connect(admin).await.is_err(),
        "the admin listener accepts connections after shutdown"
    );
}

/// An h2 (prior knowledge) client connection to `addr`; the task resolves
/// when the connection is closed.
async fn h2_connection(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (send, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2 handshake");
    (send, tokio::spawn(connection))
}

async fn h2_get(
    send: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    addr: SocketAddr,
    path: &str,
) -> (u16, bytes::Bytes) {
    use http_body_util::BodyExt;
    let request = hyper::Request::get(format!("http://{addr}{path}"))
        .body(http_body_util::Empty::new())
        .expect("request");
    let response = tokio::time::timeout(PATIENCE, send.send_request(request))
        .await
        .expect("an answer in time")
        .expect("h2 request");
    let status = response.status().as_u16();
    let body = tokio::time::timeout(PATIENCE, response.into_body().collect())
        .await
        .expect("the body in time")
        .expect("body")
        .to_bytes();
    (status, body)
}

#[tokio::test]
async fn idle_h2_connection_is_closed_after_the_idle_timeout_but_not_while_streaming() {
    let upstream = start_upstream().await;
    let node = start_node(&proxy_config(upstream.addr, "idle_timeout = \"500ms\"", "")).await;
    let addr = listener(&node);
    let (mut send, connection) = h2_connection(addr).await;

    // A stream whose events come further apart than the idle timeout: the
    // connection has a request in flight, so it is not idle.
    let (status, body) = h2_get(&mut send, addr, "/sse?n=3&delay_ms=800").await;
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8_lossy(&body).matches("data:").count(), 3);
    assert!(
        !connection.is_finished(),
        "closed while a stream was running"
    );

    // Then nothing: closed within a generous bound of the 500 ms.
    let closed = tokio::time::timeout(Duration::from_secs(10), connection).await;
    assert!(
        closed.is_ok(),
        "an idle h2 connection is still open 10 s after its last request (idle_timeout 500 ms)"
    );
    let idle_closes = metric(
        &node,
        "breakwater_listener_connections_closed_total",
        &[&format!("listener=\"{addr}\""), "reason=\"idle\""],
    )
    .await;
    assert_eq!(idle_closes, Some(1.0));
}

#[tokio::test]
async fn idle_http1_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let upstream = start_upstream().await;
    let limits = "idle_timeout = \"500ms\"\nheader_read_timeout = \"60s\"";
    let node = start_node(&proxy_config(upstream.addr, limits, "")).await;

    let mut stream = common::raw_connect_and_send(
        listener(&node),
        b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await;
    let response = common::read_raw_response(&mut stream)
        .await
        .expect("a response");
    assert_eq!(response.status, 200);
    assert!(
        common::closed_within(&mut stream, Duration::from_secs(10)).await,
        "an idle keep-alive connection is still open 10 s after its last request (idle_timeout 500 ms)"
    );
}

#[tokio::test]
async fn a_keep_alive_connection_idle_past_the_header_read_timeout_is_still_served() {
    let upstream = start_upstream().await;
    let limits = "header_read_timeout = \"200ms\"\nidle_timeout = \"60s\"";
    let node = start_node(&proxy_config(upstream.addr, limits, "")).await;
    let request = b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n";

    let mut stream = common::raw_connect_and_send(listener(&node), request).await;
    let first = common::read_raw_response(&mut stream).await;
    assert_eq!(first.map(|r| r.status), Some(200));
    // Idle for several header-read timeouts, far inside the idle timeout:
    // the idle timeout is what bounds a quiet keep-alive connection.
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::io::AsyncWriteExt::write_all(&mut stream, request)
        .await
        .expect("the connection takes a second request");
    let second = common::read_raw_response(&mut stream).await;
    assert_eq!(
        second.map(|r| r.status),
        Some(200),
        "a keep-alive connection was cut at the header read timeout, not the idle timeout"
    );
}

#[tokio::test]
async fn a_later_request_head_sent_slowly_is_cut_at_the_header_read_timeout() {
    let upstream = start_upstream().await;
    let limits = "header_read_timeout = \"500ms\"\nidle_timeout = \"60s\"";
    let node = start_node(&proxy_config(upstream.addr, limits, "")).await;
    let addr = listener(&node);

    let mut stream =
        common::raw_connect_and_send(addr, b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    let first = common::read_raw_response(&mut stream).await;
    assert_eq!(first.map(|r| r.status), Some(200));
    // The next head starts, then stalls: the idle timeout (60 s) no
    // longer applies, the header read timeout (500 ms) does.
    tokio::io::AsyncWriteExt::write_all(&mut stream, b"GET /echo HTTP/1.1\r\nX-Slow: ")
        .await
        .expect("write half a head");
    assert!(
        common::closed_within(&mut stream, Duration::from_secs(10)).await,
        "a half-sent later head is still open 10 s on (header_read_timeout 500 ms)"
    );
    let slow_heads = metric(
        &node,
        "breakwater_listener_connections_closed_total",
        &[&format!("listener=\"{addr}\""), "reason=\"slow_head\""],
    )
    .await;
    assert_eq!(slow_heads, Some(1.0));
}

/// A connection to `addr` from the loopback address `from`, with one
/// request sent on it.
async fn connect_from(from: &str, addr: SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{from}:0").parse().expect("address"))
        .expect("bind the client address");
    let mut stream = socket.connect(addr).await.expect("connect");
    // A refused connection may be closed already: then the read says so.
    let _ = stream
        .write_all(b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    stream
}

/// Whether a request from `from` on a new connection is answered (200)
/// rather than the connection closed.
async fn served_from(from: &str, addr: SocketAddr) -> (tokio::net::TcpStream, bool) {
    let mut stream = connect_from(from, addr).await;
    let response = common::read_raw_response(&mut stream).await;
    let served = response.is_some_and(|r| r.status == 200);
    (stream, served)
}

/// Long enough that no connection of these tests closes on its own.
const PATIENT_LIMITS: &str = "header_read_timeout = \"60s\"\nidle_timeout = \"60s\"";

#[tokio::test]
async fn per_ip_cap_refuses_the_next_connection_and_serves_again_when_one_closes() {
    let upstream = start_upstream().await;
    let limits = format!("{PATIENT_LIMITS}\nmax_connections_per_ip = 2");
    let node = start_node(&proxy_config(upstream.addr, &limits, "")).await;
    let addr = listener(&node);
    let label = format!("listener=\"{addr}\"");

    let (first, served) = served_from("127.0.0.1", addr).await;
    assert!(served, "the first connection was not served");
    let (_second, served) = served_from("127.0.0.1", addr).await;
    assert!(served, "the second connection was not served");
    assert_eq!(
        metric(&node, "breakwater_listener_connections_open", &[&label]).await,
        Some(2.0)
    );

    let (_third, served) = served_from("127.0.0.1", addr).await;
    assert!(!served, "a third connection from one address was served");
    assert_eq!(
        metric(
            &node,
            "breakwater_listener_connections_refused_total",
            &[&label, "reason=\"max_connections_per_ip\""],
        )
        .await,
        Some(1.0)
    );
    // Another address is not held to the first one's cap.
    let (_other, served) = served_from("127.0.0.2", addr).await;
    assert!(served, "a connection from another address was refused");

    drop(first);
    let served_again = tokio::time::timeout(PATIENCE, async {
        loop {
            // The node frees the place once it has seen the close.
            if served_from("127.0.0.1", addr).await.1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        served_again.is_ok(),
        "no place for the address after one of its connections closed"
    );
}

#[tokio::test]
async fn listener_cap_refuses_connections_beyond_max_connections() {
    let upstream = start_upstream().await;
    let limits = format!("{PATIENT_LIMITS}\nmax_connections = 1");
    let node = start_node(&proxy_config(upstream.addr, &limits, "")).await;
    let addr = listener(&node);

    let (_first, served) = served_from("127.0.0.1", addr).await;
    assert!(served, "the first connection was not served");
    let (_second, served) = served_from("127.0.0.2", addr).await;
    assert!(
        !served,
        "a second connection was served beyond max_connections = 1"
    );
    assert_eq!(
        metric(
            &node,
            "breakwater_listener_connections_refused_total",
            &[
                &format!("listener=\"{addr}\""),
                "reason=\"max_connections\""
            ],
        )
        .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn admin_listener_closes_a_silent_connection() {
    let upstream = start_upstream().await;
    let node = start_node(&proxy_config(
        upstream.addr,
        "header_read_timeout = \"500ms\"",
        "",
    ))
    .await;
    let admin = node.admin_addr().expect("admin listener");

    let mut silent = tokio::net::TcpStream::connect(admin)
        .await
        .expect("connect to the admin listener");
    assert!(
        common::closed_within(&mut silent, Duration::from_secs(4)).await,
        "a silent admin connection is still open after 4 s (header_read_timeout 500 ms)"
    );
    // It still serves.
    let healthz = client()
        .get(admin_url(&node, "/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(healthz.status(), 200);
}

/// Writes a new self-signed certificate for `localhost` and its key to
/// `cert` and `key`; returns the certificate's PEM.
fn write_new_pair(cert: &std::path::Path, key: &std::path::Path) -> String {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .expect("self-signed certificate");
    let pem = certified.cert.pem();
    std::fs::write(cert, &pem).expect("write cert");
    std::fs::write(key, certified.signing_key.serialize_pem()).expect("write key");
    pem
}

/// Whether a TLS client that trusts `cert_pem` alone completes a handshake
/// with `addr`: whether the node presents that certificate.
async fn presents(addr: SocketAddr, cert_pem: &str) -> bool {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("PEM certificate"))
        .expect("root certificate");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let server_name = ServerName::try_from("localhost").expect("server name");
    tokio::time::timeout(PATIENCE, connector.connect(server_name, tcp))
        .await
        .expect("a handshake outcome in time")
        .is_ok()
}

async fn reload_tls(node: &breakwater_edge::RunningNode) -> (u16, serde_json::Value) {
    let response = client()
        .post(admin_url(node, "/admin/tls/reload"))
        .bearer_auth("secret")
        .send()
        .await
        .expect("TLS reload");
    let status = response.status().as_u16();
    (status, json(&response.bytes().await.expect("body")))
}

#[tokio::test]
async fn tls_certificates_reload_and_a_bad_pair_keeps_the_current_one() {
    let upstream = start_upstream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let first = write_new_pair(&cert, &key);
    let config = format!(
        r#"
[[listener]]
address = "127.0.0.1:0"
tls = {{ cert = "{}", key = "{}" }}

[admin]
address = "127.0.0.1:0"
token = "secret"

[[route]]
prefix = "/"
pool = "upstream"

[[pool]]
name = "upstream"
endpoints = ["http://{}"]
"#,
        cert.display(),
        key.display(),
        upstream.addr
    );
    let node = start_node(&config).await;
    let addr = listener(&node);
    assert!(presents(addr, &first).await, "the first certificate");

    // New files: served once reloaded, not before.
    let second = write_new_pair(&cert, &key);
    assert!(presents(addr, &first).await, "changed before any reload");
    let (status, body) = reload_tls(&node).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["certificates"][0]["cert"],
        cert.display().to_string(),
        "{body}"
    );
    assert!(
        presents(addr, &second).await,
        "the second certificate after the reload"
    );
    assert!(
        !presents(addr, &first).await,
        "the first certificate after the reload"
    );

    // A certificate whose key is not the one in the key file: refused, and
    // the second pair keeps serving.
    let third = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .expect("self-signed certificate");
    std::fs::write(&cert, third.cert.pem()).expect("write cert");
    let (status, body) = reload_tls(&node).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "tls_reload_failed", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("does not belong"), "{body}");
    assert!(
        presents(addr, &second).await,
        "the second certificate after a refused reload"
    );

    // An unreadable key, through the SIGHUP path: refused the same way.
    std::fs::write(&cert, &second).expect("write cert");
    std::fs::write(&key, "not a key").expect("write key");
    let refused = node
        .reload_tls()
        .await
        .expect_err("a key file without a key");
    assert!(refused.to_string().contains("private key"), "{refused}");
    assert!(
        presents(addr, &second).await,
        "the second certificate after a refused reload"
    );
}
