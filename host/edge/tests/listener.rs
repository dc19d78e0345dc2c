//! Listeners: h2 and HTTP/1.1 over TLS by ALPN, h2c with prior knowledge,
//! the admin endpoints, and a graceful drain.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{
    PATIENCE, admin_url, client, json, listener, proxy_config, start_node, start_upstream, url,
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
