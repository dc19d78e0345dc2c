//! `breakwater edge` with a plugin referenced by object-store URL, the S3
//! endpoint and credentials taken from the standard AWS environment
//! variables, against a real S3-compatible server (SeaweedFS on loopback).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use breakwater_e2e::{ChildGuard, PATIENCE, breakwater, free_port, workspace_root};
use breakwater_store::Sha256Digest;
use breakwater_store::testing::S3Server;

/// A node serving a one-page site at `addr` through the plugin at
/// `s3://<test bucket>/plugins/template.wasm` pinned to `sha256`.
fn write_config(dir: &Path, addr: SocketAddr, sha256: &str) -> String {
    std::fs::create_dir_all(dir.join("site")).expect("site dir");
    std::fs::write(dir.join("site/index.html"), "<html>hi</html>").expect("page");
    let text = format!(
        r#"
[[listener]]
address = "{addr}"

[[site]]
name = "www"
root = "site"
plugins = ["stamp"]

[[plugin]]
name = "stamp"
url = "s3://{bucket}/plugins/template.wasm"
sha256 = "{sha256}"
config = {{ header = "x-stamp", value = "from-s3" }}
cpu_deadline = "500ms"

[plugin_store]
cache_dir = "cache"
"#,
        bucket = S3Server::BUCKET
    );
    let path = dir.join("edge.toml");
    std::fs::write(&path, text).expect("write the config");
    path.to_str().expect("UTF-8 path").to_owned()
}

/// `breakwater edge --config FILE` reaching `server` through the AWS
/// environment variables only.
fn edge(server: &S3Server, config: &str) -> ChildGuard {
    let mut command = breakwater(&["edge", "--config", config]);
    S3Server::pass_credentials(&mut command);
    command.env("AWS_ENDPOINT_URL", server.endpoint());
    ChildGuard::spawn(command)
}

async fn published_template(server: &S3Server) -> String {
    let path = workspace_root().join("plugins/target/wasm32-wasip2/release/template.wasm");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; `cargo xtask test` builds the plugins first",
            path.display()
        )
    });
    let sha256 = Sha256Digest::of(&bytes).to_string();
    server
        .store(S3Server::BUCKET)
        .put("plugins/template.wasm", bytes)
        .await
        .unwrap_or_else(|e| panic!("upload: {e}\n{}", server.log_tail()));
    sha256
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_fetches_a_pinned_plugin_with_credentials_from_the_environment() {
    let server = S3Server::start().await;
    let sha256 = published_template(&server).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let config = write_config(dir.path(), addr, &sha256);

    let mut node = edge(&server, &config);
    tokio::task::block_in_place(|| node.wait_until_accepts(addr));
    let response = reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .expect("client")
        .get(format!("http://{addr}/"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET /: {e}\n{}", node.stderr()));
    assert_eq!(response.status(), 200, "{}", node.stderr());
    assert_eq!(
        response
            .headers()
            .get("x-stamp")
            .and_then(|v| v.to_str().ok()),
        Some("from-s3"),
        "{}",
        node.stderr()
    );
    assert!(
        dir.path().join(format!("cache/{sha256}.wasm")).is_file(),
        "the artifact is cached beside the config"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_refuses_to_start_on_a_pin_mismatch() {
    let server = S3Server::start().await;
    let published = published_template(&server).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let wrong = Sha256Digest::of(b"another build").to_string();
    let config = write_config(dir.path(), addr, &wrong);

    let mut node = edge(&server, &config);
    let status = tokio::task::block_in_place(|| node.wait_timeout(Duration::from_secs(30)))
        .unwrap_or_else(|| panic!("the node kept running:\n{}", node.stderr()));
    assert!(!status.success(), "{status}: {}", node.stderr());
    let output = node.stderr();
    for part in ["stamp", published.as_str(), wrong.as_str(), "refusing"] {
        assert!(output.contains(part), "`{part}` missing from:\n{output}");
    }
    assert!(
        std::fs::read_dir(dir.path().join("cache")).map_or(true, |mut d| d.next().is_none()),
        "nothing is cached"
    );
}
