//! SIGTERM drains: an in-flight request completes and the process exits 0.

use std::net::SocketAddr;
use std::time::Duration;

use breakwater_e2e::{ChildGuard, PATIENCE, breakwater, free_port, start_slow_upstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_in_flight_request_finish_then_exits_0() {
    let upstream = start_slow_upstream(Duration::from_secs(1)).await;
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
    tokio::time::sleep(Duration::from_millis(200)).await;
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
