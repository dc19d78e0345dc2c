//! The disk tier across a crash: entries written before `SIGKILL` are hits
//! after a restart, and a kill in the middle of a burst of writes loses at
//! most the entries being written, never serving a damaged one.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use breakwater_e2e::{ChildGuard, PATIENCE, breakwater, free_port, start_counting_upstream_of};

fn write_config(dir: &Path, port: u16, upstream: SocketAddr) -> std::path::PathBuf {
    let path = dir.join("edge.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[node]
name = "cache-kill"

[[listener]]
address = "127.0.0.1:{port}"

[cache]
memory_bytes = 67108864
disk_path = "l2"

[[route]]
prefix = "/"
pool = "origin"
cache = true

[[pool]]
name = "origin"
endpoints = ["http://{upstream}"]
"#
        ),
    )
    .expect("write the config");
    path
}

fn start(config: &Path, addr: SocketAddr) -> ChildGuard {
    let mut node = ChildGuard::spawn(breakwater(&[
        "edge",
        "--config",
        config.to_str().expect("utf-8 path"),
    ]));
    tokio::task::block_in_place(|| node.wait_until_accepts(addr));
    node
}

/// `X-Cache` and the body of `GET path`.
async fn get(client: &reqwest::Client, addr: SocketAddr, path: &str) -> (String, String) {
    let response = client
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(response.status(), 200, "GET {path}");
    let cache = response
        .headers()
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (cache, response.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_survive_sigkill_and_a_kill_mid_write_serves_nothing_damaged() {
    // Only the settled paths are counted: a burst request the edge
    // forwarded just before the kill may still reach the origin after it.
    let (upstream, settled_requests) =
        start_counting_upstream_of("public, max-age=3600", "/settled/").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let config = write_config(dir.path(), port, upstream);
    let client = reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .expect("client");

    let mut node = start(&config, addr);
    for i in 0..20 {
        let path = format!("/settled/{i}");
        let (cache, body) = get(&client, addr, &path).await;
        assert_eq!((cache.as_str(), body.as_str()), ("MISS", path.as_str()));
    }
    // The disk tier flushes every 500 ms: these writes are done.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // A burst of writes, killed while it runs.
    let burst: Vec<_> = (0..200)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let _ = client.get(format!("http://{addr}/burst/{i}")).send().await;
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(30)).await;
    node.sigkill();
    for request in burst {
        let _ = request.await;
    }

    let node = start(&config, addr);
    for i in 0..20 {
        let path = format!("/settled/{i}");
        let (cache, body) = get(&client, addr, &path).await;
        assert_eq!(
            (cache.as_str(), body.as_str()),
            ("HIT", path.as_str()),
            "{}",
            node.stderr()
        );
    }
    assert_eq!(
        settled_requests.load(Ordering::SeqCst),
        20,
        "the settled entries came from the disk tier"
    );
    // Whatever the kill cut short is a miss now; nothing is served damaged.
    let mut hits = 0;
    for i in 0..200 {
        let path = format!("/burst/{i}");
        let (cache, body) = get(&client, addr, &path).await;
        assert_eq!(body, path, "a damaged entry was served ({cache})");
        hits += usize::from(cache == "HIT");
    }
    eprintln!("{hits} of 200 burst entries survived the kill");
}
