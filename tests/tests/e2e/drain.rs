//! SIGTERM drains: an in-flight request completes and the process exits 0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use breakwater_e2e::{ChildGuard, PATIENCE, breakwater, free_port, start_raw_upstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_in_flight_request_finish_then_exits_0() {
    // Counts the requests that reached it, then answers a second later.
    let arrived = Arc::new(AtomicUsize::new(0));
    let upstream = start_raw_upstream({
        let arrived = Arc::clone(&arrived);
        move |_| {
            arrived.fetch_add(1, Ordering::SeqCst);
            (
                Duration::from_secs(1),
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\
                  Content-Length: 5\r\nConnection: close\r\n\r\nslept"
                    .to_vec(),
            )
        }
    })
    .await;
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("edge.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[listener]]
address = "{addr}"

[limits]
shutdown_grace = "10s"

[[route]]
prefix = "/"
pool = "slow"

[[pool]]
name = "slow"
endpoints = ["http://{upstream}"]
first_byte_timeout = "10s"
"#
        ),
    )
    .expect("write the config");

    let mut node = ChildGuard::spawn(breakwater(&[
        "edge",
        "--config",
        config.to_str().expect("UTF-8 path"),
    ]));
    tokio::task::block_in_place(|| node.wait_until_accepts(addr));

    let client = reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .expect("client");
    let request = tokio::spawn(client.get(format!("http://{addr}/slow")).send());
    // SIGTERM once the request is in flight (it reached the upstream), not
    // after a fixed time that a busy machine may not honour.
    tokio::time::timeout(PATIENCE, async {
        while arrived.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the request never reached the upstream\n{}", node.stderr()));
    node.sigterm();

    let response = request
        .await
        .expect("request task")
        .unwrap_or_else(|e| panic!("the in-flight request failed: {e}\n{}", node.stderr()));
    assert_eq!(response.status(), 200, "{}", node.stderr());
    assert_eq!(response.text().await.expect("body"), "slept");

    let status = tokio::task::block_in_place(|| node.wait_timeout(Duration::from_secs(10)))
        .unwrap_or_else(|| {
            panic!(
                "breakwater still runs 10 s after SIGTERM:\n{}",
                node.stderr()
            )
        });
    assert!(
        status.success(),
        "breakwater exited with {status}:\n{}",
        node.stderr()
    );
}
