//! SIGHUP reloads the plugins of a running `breakwater edge` (and `up`)
//! from the edited configuration file; a reload that fails keeps the
//! plugins that were serving.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use breakwater_e2e::{ChildGuard, PATIENCE, breakwater, free_port, plugin_artifact};

/// A site at `/` run through the `template` plugin stamping
/// `x-generation: value`, pinned to `sha256`.
fn config(addr: SocketAddr, value: &str, sha256: &str) -> String {
    let (plugin, _) = plugin_artifact("template");
    format!(
        r#"
[[listener]]
address = "{addr}"

[[site]]
name = "www"
root = "site"
plugins = ["stamp"]

[[plugin]]
name = "stamp"
path = "{}"
sha256 = "{sha256}"
cpu_deadline = "500ms"
config = {{ header = "x-generation", value = "{value}" }}
"#,
        plugin.display()
    )
}

fn template_sha256() -> String {
    plugin_artifact("template").1
}

/// Replaces the file whole, as an editor saving it would.
fn write(path: &Path, text: &str) {
    let partial = path.with_extension("toml.new");
    std::fs::write(&partial, text).expect("write the config");
    std::fs::rename(&partial, path).expect("move the config into place");
}

async fn stamp(client: &reqwest::Client, addr: SocketAddr, node: &ChildGuard) -> String {
    let response = client
        .get(format!("http://{addr}/"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET /: {e}\n{}", node.stderr()));
    assert_eq!(response.status(), 200, "{}", node.stderr());
    response
        .headers()
        .get("x-generation")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("<none>")
        .to_owned()
}

/// Polls until the node stamps `want`, every answer meanwhile a 200.
async fn wait_for_stamp(client: &reqwest::Client, addr: SocketAddr, node: &ChildGuard, want: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if stamp(client, addr, node).await == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the node never stamped {want} after SIGHUP:\n{}",
            node.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the node's log has `count` lines containing `needle`.
fn wait_for_log(node: &ChildGuard, needle: &str, count: usize) {
    let deadline = Instant::now() + PATIENCE;
    while node.stderr().matches(needle).count() < count {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} (×{count}) in the log:\n{}",
            node.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `breakwater <command> --config FILE` with pins from `pin` and
/// checks A → (edit, SIGHUP) → B → (bad pin, SIGHUP) → still B → SIGTERM.
async fn sighup_reloads(command: &str, pin: &str) {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("site")).expect("site dir");
    std::fs::write(dir.path().join("site/index.html"), "<html>hi</html>").expect("page");
    let file = dir.path().join("edge.toml");
    write(&file, &config(addr, "A", pin));

    let mut args = vec![command, "--config", file.to_str().expect("UTF-8 path")];
    if command == "up" {
        // This configuration has no `/v1/` route; the GPU host would only
        // take port 9000 from `up`'s own test running beside this one.
        args.push("--no-gpu-host");
    }
    let mut node = ChildGuard::spawn(breakwater(&args));
    tokio::task::block_in_place(|| node.wait_until_accepts(addr));
    let client = reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .expect("client");
    assert_eq!(stamp(&client, addr, &node).await, "A");

    write(&file, &config(addr, "B", pin));
    node.sighup();
    wait_for_stamp(&client, addr, &node, "B").await;
    tokio::task::block_in_place(|| wait_for_log(&node, "plugins reloaded", 1));

    write(&file, &config(addr, "C", &"0".repeat(64)));
    node.sighup();
    tokio::task::block_in_place(|| wait_for_log(&node, "plugin reload failed", 1));
    let log = node.stderr();
    assert!(log.contains("sha256"), "the log names the mismatch:\n{log}");
    assert_eq!(
        stamp(&client, addr, &node).await,
        "B",
        "a failed reload keeps the plugins that were serving"
    );

    node.sigterm();
    let status = tokio::task::block_in_place(|| node.wait_timeout(Duration::from_secs(15)))
        .unwrap_or_else(|| panic!("still running after SIGTERM:\n{}", node.stderr()));
    assert!(status.success(), "exited with {status}:\n{}", node.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_plugins_of_an_edge_node() {
    sighup_reloads("edge", &template_sha256()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_up_and_pins_local_plugins_again() {
    // `up` pins an empty sha256 to the artifact on disk, on every reload.
    sighup_reloads("up", "").await;
}
