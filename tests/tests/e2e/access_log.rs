//! The access log of a running `breakwater edge`: one JSON line per request,
//! written by the log thread while the node serves, all of it on stdout by
//! the time the process has exited; `RUST_LOG=…,access=off` turns it off.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use breakwater_e2e::{ChildGuard, PATIENCE, breakwater, free_port, get_text};

const REQUESTS: usize = 40;

/// A node serving one static file, with `RUST_LOG` set to `filter`.
fn start(filter: &str) -> (ChildGuard, SocketAddr, SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("www");
    std::fs::create_dir(&root).expect("mkdir");
    std::fs::write(root.join("hello.txt"), "hello\n").expect("write the file");
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let config = dir.path().join("edge.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[listener]]
address = "{addr}"

[admin]
address = "{admin}"

[[site]]
name = "www"
root = "{}"
"#,
            root.display()
        ),
    )
    .expect("write the config");
    let mut command = breakwater(&[
        "--log-format",
        "json",
        "edge",
        "--config",
        config.to_str().expect("UTF-8 path"),
    ]);
    command.env("RUST_LOG", filter);
    let mut node = ChildGuard::spawn(command);
    node.wait_until_accepts(addr);
    node.wait_until_accepts(admin);
    (node, addr, admin, dir)
}

/// The request ids of the node's output lines whose target is `access`.
fn access_ids(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["target"] == "access")
        .map(|line| {
            assert_eq!(line["method"], "GET", "{line}");
            assert_eq!(line["path"], "/hello.txt", "{line}");
            assert_eq!(line["route"], "www", "{line}");
            assert_eq!(line["status"], 200, "{line}");
            line["request_id"].as_str().unwrap_or_default().to_owned()
        })
        .collect()
}

/// Sends the requests; returns the request ids the node answered with.
async fn requests(addr: SocketAddr) -> Vec<String> {
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for _ in 0..REQUESTS {
        let response = client
            .get(format!("http://{addr}/hello.txt"))
            .timeout(PATIENCE)
            .send()
            .await
            .expect("GET /hello.txt");
        assert_eq!(response.status(), 200);
        let id = response.headers()["x-request-id"]
            .to_str()
            .expect("ASCII id")
            .to_owned();
        ids.push(id);
    }
    ids
}

fn stop(node: &mut ChildGuard) {
    node.sigterm();
    let status = node
        .wait_timeout(PATIENCE)
        .unwrap_or_else(|| panic!("no exit after SIGTERM:\n{}", node.stderr()));
    assert!(status.success(), "{status}:\n{}", node.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_gets_one_line_while_serving_and_none_is_lost_at_exit() {
    let (mut node, addr, admin, _dir) = start("info");
    let ids = requests(addr).await;

    // Written while the node runs, not only when it stops.
    let deadline = Instant::now() + PATIENCE;
    while access_ids(&node.stderr()).len() < REQUESTS {
        assert!(
            Instant::now() < deadline,
            "{} of {REQUESTS} access lines within {PATIENCE:?}:\n{}",
            access_ids(&node.stderr()).len(),
            node.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = get_text(&format!("http://{admin}/metrics")).await;
    assert!(
        metrics
            .lines()
            .any(|line| line == "breakwater_log_lines_dropped_total 0"),
        "{metrics}"
    );

    stop(&mut node);
    assert_eq!(
        access_ids(&node.stderr()),
        ids,
        "one line per request, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_can_be_turned_off() {
    let (mut node, addr, _admin, _dir) = start("info,access=off");
    requests(addr).await;
    // After exit everything logged has been written.
    stop(&mut node);
    let output = node.stderr();
    assert!(access_ids(&output).is_empty(), "{output}");
    assert!(
        output.contains("listening"),
        "other logs still go out:\n{output}"
    );
}
