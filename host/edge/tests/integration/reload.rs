//! Plugin hot reload and the plugin phase bound, through a real node, real
//! compiled plugins and real loopback HTTP: a reload under load loses no
//! request and switches behaviour at a clean point, a failed reload keeps
//! the old plugins, the admin endpoint wants its token, and a full plugin
//! queue sheds with 503.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use std::net::SocketAddr;

use crate::common::{
    PATIENCE, Upstream, admin_url, assert_json_error, client, component, json, url,
};
use breakwater_edge::{ConfigSource, RunningNode};

const TOKEN: &str = "test-admin-token";

/// A node running the `template` plugin, which stamps
/// `x-generation: <value>` on requests and responses, in front of a static
/// site at `/` and the echo upstream at `/api/`. Its configuration lives in
/// a file, which a reload reads again.
struct Fixture {
    dir: tempfile::TempDir,
    upstream: Upstream,
    node: RunningNode,
}

impl Fixture {
    async fn start(value: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("site")).expect("site dir");
        std::fs::write(dir.path().join("site/index.html"), "<html>hi</html>").expect("page");
        let upstream = common::start_upstream().await;
        let text = config(upstream.addr, &stamp_plugin(value, None), "");
        write_config(dir.path(), &text);
        let path = config_path(dir.path());
        let config = edge_config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let node = breakwater_edge::start_with_source(config, ConfigSource::file(path))
            .await
            .unwrap_or_else(|e| panic!("the node did not start: {e}"));
        Self {
            dir,
            upstream,
            node,
        }
    }

    fn rewrite(&self, plugins: &str, limits: &str) {
        write_config(
            self.dir.path(),
            &config(self.upstream.addr, plugins, limits),
        );
    }

    async fn reload(&self) -> (u16, serde_json::Value) {
        let response = client()
            .post(admin_url(&self.node, "/admin/plugins/reload"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("reload request");
        let status = response.status().as_u16();
        (status, json(&response.bytes().await.expect("body")))
    }

    /// The stamp on a fresh `GET /`, which must succeed.
    async fn stamp(&self) -> String {
        let response = client()
            .get(url(&self.node, "/"))
            .send()
            .await
            .expect("GET /");
        assert_eq!(response.status(), 200);
        stamp_of(&response)
    }
}

fn config_path(dir: &Path) -> PathBuf {
    dir.join("edge.toml")
}

/// Written aside and renamed into place, as an operator's tools would: a
/// reader never sees half a file.
fn write_config(dir: &Path, text: &str) {
    let partial = dir.join("edge.toml.new");
    std::fs::write(&partial, text).expect("write the config");
    std::fs::rename(&partial, config_path(dir)).expect("move the config into place");
}

fn config(upstream: SocketAddr, plugins: &str, limits: &str) -> String {
    format!(
        r#"
[[listener]]
address = "127.0.0.1:0"

[admin]
address = "127.0.0.1:0"
token = "{TOKEN}"

[limits]
{limits}

[[site]]
name = "www"
root = "site"
plugins = ["stamp"]

[[route]]
prefix = "/api/"
pool = "upstream"
plugins = ["stamp"]

[[pool]]
name = "upstream"
endpoints = ["http://{upstream}"]

{plugins}
"#
    )
}

/// The `stamp` plugin: `template` stamping `x-generation: value`; `sha256`
/// overrides the real pin.
fn stamp_plugin(value: &str, sha256: Option<&str>) -> String {
    let (path, real) = component("template");
    format!(
        r#"
[[plugin]]
name = "stamp"
path = "{}"
sha256 = "{}"
# Epochs count wall time: room for a loaded test machine.
cpu_deadline = "500ms"
config = {{ header = "x-generation", value = "{value}" }}
"#,
        path.display(),
        sha256.unwrap_or(&real)
    )
}

fn stamp_of(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("x-generation")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("<none>")
        .to_owned()
}

/// One request of the load loop.
struct Observed {
    sent: Instant,
    /// Stamped by the response phase.
    stamp: String,
    /// Stamped by the request phase, echoed by the upstream.
    request_stamp: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_load_loses_nothing_and_switches_cleanly() {
    const TOTAL: usize = 10_000;
    const CLIENTS: usize = 24;
    let fixture = Arc::new(Fixture::start("A").await);
    let issued = Arc::new(AtomicUsize::new(0));
    let client = client();

    let mut workers = Vec::new();
    for _ in 0..CLIENTS {
        let (issued, client) = (issued.clone(), client.clone());
        let target = url(&fixture.node, "/api/echo");
        workers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while issued.fetch_add(1, Ordering::SeqCst) < TOTAL {
                let sent = Instant::now();
                let response = client.get(&target).send().await;
                let response = response.unwrap_or_else(|e| panic!("a request failed: {e}"));
                assert_eq!(response.status(), 200, "every request is answered");
                let stamp = stamp_of(&response);
                let echo = json(&response.bytes().await.expect("the whole body"));
                let request_stamp = echo["headers"]["x-generation"]
                    .as_str()
                    .unwrap_or("<none>")
                    .to_owned();
                seen.push(Observed {
                    sent,
                    stamp,
                    request_stamp,
                });
            }
            seen
        }));
    }

    // Reload once the loop is well under way, and again while it runs.
    tokio::time::timeout(PATIENCE, async {
        while issued.load(Ordering::SeqCst) < TOTAL / 4 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the load loop makes progress");
    fixture.rewrite(&stamp_plugin("B", None), "");
    let (status, report) = fixture.reload().await;
    let reloaded = Instant::now();
    let in_flight_at_reload = issued.load(Ordering::SeqCst);
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["generation"], 2, "{report}");
    let (_, sha256) = component("template");
    assert_eq!(
        report["plugins"],
        serde_json::json!([{ "name": "stamp", "sha256": sha256 }]),
        "{report}"
    );
    assert_eq!(report["not_applied"], serde_json::json!([]), "{report}");

    let mut observed = Vec::new();
    for worker in workers {
        observed.extend(worker.await.expect("a load worker panicked"));
    }
    assert_eq!(observed.len(), TOTAL, "every request was answered");
    assert!(
        in_flight_at_reload < TOTAL,
        "the reload landed before the loop ended"
    );
    let (mut a, mut b) = (0, 0);
    for request in &observed {
        assert_eq!(
            request.request_stamp, request.stamp,
            "both phases of a request run the same generation"
        );
        match request.stamp.as_str() {
            "A" => {
                a += 1;
                assert!(
                    request.sent < reloaded,
                    "a request sent after the reload returned ran the old chain"
                );
            }
            "B" => b += 1,
            other => panic!("a response from neither chain: x-generation {other:?}"),
        }
    }
    assert!(a > 0 && b > 0, "A {a}, B {b}");
    eprintln!("{a} answers from A, {b} from B");
    assert_eq!(fixture.stamp().await, "B");
}

#[tokio::test]
async fn a_failed_reload_keeps_the_old_plugins_and_says_which_one_failed() {
    let fixture = Fixture::start("A").await;
    assert_eq!(fixture.stamp().await, "A");

    // A pin the artifact does not match.
    fixture.rewrite(&stamp_plugin("B", Some(&"0".repeat(64))), "");
    let (status, body) = fixture.reload().await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "plugin_load_failed", "{body}");
    assert_eq!(body["error"]["plugin"], "stamp", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("sha256"), "{body}");
    assert_eq!(fixture.stamp().await, "A", "the old chain keeps serving");

    // A configuration the plugin's own init refuses.
    let (path, sha256) = component("template");
    let refused = format!(
        "[[plugin]]\nname = \"stamp\"\npath = \"{}\"\nsha256 = \"{sha256}\"\nconfig = {{ header = \"\" }}\n",
        path.display()
    );
    fixture.rewrite(&refused, "");
    let (status, body) = fixture.reload().await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["plugin"], "stamp", "{body}");

    // A plugin file that is not there.
    let (path, sha256) = component("template");
    let gone = fixture.dir.path().join("gone.wasm");
    let missing = stamp_plugin("B", Some(&sha256))
        .replace(&path.display().to_string(), &gone.display().to_string());
    fixture.rewrite(&missing, "");
    let (status, body) = fixture.reload().await;
    assert_eq!(status, 422, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("gone.wasm"), "{body}");
    assert_eq!(fixture.stamp().await, "A", "the old chain keeps serving");

    // A configuration file that does not validate.
    write_config(fixture.dir.path(), "[[listener]]\nadress = \"x\"\n");
    let (status, body) = fixture.reload().await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "config_invalid", "{body}");
    assert_eq!(fixture.stamp().await, "A", "the old chain keeps serving");

    // Fixed: the next reload is generation 2, failures counted none.
    fixture.rewrite(&stamp_plugin("B", None), "");
    let (status, body) = fixture.reload().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["generation"], 2, "{body}");
    assert_eq!(fixture.stamp().await, "B");

    let metrics = client()
        .get(admin_url(&fixture.node, "/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    for series in [
        "breakwater_plugin_reloads_total{result=\"failed\"}",
        "breakwater_plugin_reloads_total{result=\"ok\"}",
        "breakwater_plugin_generation",
    ] {
        assert!(metrics.contains(series), "no {series} in:\n{metrics}");
    }
}

#[tokio::test]
async fn changes_outside_the_plugins_are_named_and_left_for_a_restart() {
    let fixture = Fixture::start("A").await;
    fixture.rewrite(&stamp_plugin("B", None), "max_body_bytes = 1024");
    let (status, body) = fixture.reload().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["not_applied"], serde_json::json!(["limits"]), "{body}");
    assert_eq!(fixture.stamp().await, "B", "the plugins were applied");
}

#[tokio::test]
async fn the_reload_endpoint_requires_the_admin_token() {
    let fixture = Fixture::start("A").await;
    let endpoint = admin_url(&fixture.node, "/admin/plugins/reload");
    for (case, authorization) in [
        ("no token", None),
        ("a wrong token", Some("Bearer not-the-token".to_owned())),
        (
            "a token one byte short",
            Some(format!("Bearer {}", &TOKEN[1..])),
        ),
        ("another scheme", Some(format!("Basic {TOKEN}"))),
    ] {
        let mut request = client().post(&endpoint);
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        let response = request.send().await.expect("reload request");
        assert_eq!(response.status(), 401, "{case}");
        assert_eq!(
            response
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer"),
            "{case}"
        );
        assert_json_error(&response.bytes().await.expect("body"), 401, "unauthorized");
    }
    let (status, body) = fixture.reload().await;
    assert_eq!(status, 200, "the right token: {body}");

    // No token configured: the endpoint is closed and says how to open it.
    let upstream = common::closed_port().await;
    let node = common::start_node(&common::proxy_config(upstream, "", "")).await;
    let response = client()
        .post(admin_url(&node, "/admin/plugins/reload"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("reload request");
    assert_eq!(response.status(), 403);
    let body = response.bytes().await.expect("body");
    assert_json_error(&body, 403, "admin_token_not_configured");
    assert!(
        String::from_utf8_lossy(&body).contains("token_env"),
        "the refusal says how to configure a token"
    );
}

#[tokio::test]
async fn a_full_plugin_queue_sheds_with_503_and_retry_after() {
    let (path, sha256) = component("fixture_misbehave");
    let upstream = common::start_upstream().await;
    let config = format!(
        r#"
[[listener]]
address = "127.0.0.1:0"

[admin]
address = "127.0.0.1:0"

[limits]
plugin_concurrency = 1
plugin_queue_timeout = "50ms"

[[route]]
prefix = "/"
pool = "upstream"
plugins = ["spin"]

[[pool]]
name = "upstream"
endpoints = ["http://{}"]

[[plugin]]
name = "spin"
path = "{}"
sha256 = "{sha256}"
on_failure = "open"
# Holds the only plugin slot this long, then fails open.
cpu_deadline = "1s"
config = {{ mode = "spin" }}
"#,
        upstream.addr,
        path.display()
    );
    let node = common::start_node(&config).await;

    // Two requests at once: whichever takes the only slot spins in it for
    // a second of CPU, then fails open with 200; the other waits 50 ms in
    // the queue and is shed. Which is which is the machine's business, so
    // nothing here depends on how quickly either was scheduled.
    let (a, b) = tokio::join!(
        client().get(url(&node, "/echo")).send(),
        client().get(url(&node, "/echo")).send(),
    );
    let (a, b) = (a.expect("a request"), b.expect("a request"));
    let (shed, holder) = if a.status() == 503 { (a, b) } else { (b, a) };
    assert_eq!(shed.status(), 503);
    assert_eq!(
        holder.status(),
        200,
        "the slot's holder fails open and proceeds"
    );
    assert_eq!(
        shed.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    assert_json_error(&shed.bytes().await.expect("body"), 503, "plugins_busy");

    let metrics = client()
        .get(admin_url(&node, "/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    assert!(
        metrics.contains("breakwater_plugin_shed_total"),
        "no shed counter in:\n{metrics}"
    );
}

#[tokio::test]
async fn a_node_started_without_a_source_refuses_to_reload() {
    let upstream = common::closed_port().await;
    let node = common::start_node(&common::proxy_config(upstream, "", "")).await;
    let error = node.reload().await.expect_err("nothing to reload from");
    assert!(
        matches!(error, breakwater_edge::ReloadError::NoSource),
        "{error}"
    );
}
