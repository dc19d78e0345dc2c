//! An in-process API server on a loopback port, and the HTTP helpers the
//! server tests share.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use breakwater_infer::gguf::Gguf;
use breakwater_infer::scheduler::EngineConfig;
use breakwater_infer::server::{self, AppState, BackendOptions, Served, ServerConfig};
use breakwater_infer::telemetry::Telemetry;
use serde_json::Value;

pub struct TestServer {
    pub base: String,
    pub app: Arc<AppState>,
    pub client: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.app.shutdown();
    }
}

/// Starts a server for `gguf` under `name` on an ephemeral port.
pub async fn start(gguf: &Gguf, name: &str, engine: EngineConfig) -> TestServer {
    start_with(gguf, ServerConfig::new(name), engine).await
}

pub async fn start_with(gguf: &Gguf, config: ServerConfig, engine: EngineConfig) -> TestServer {
    let telemetry = Telemetry::new();
    let app = AppState::new(config, telemetry.clone());
    let served =
        Served::from_gguf(gguf, BackendOptions::cpu(2), engine, telemetry).expect("load the model");
    app.set_model(served).expect("first model");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel();
    tokio::spawn(server::serve(listener, Arc::clone(&app), async {
        let _ = stopped.await;
    }));
    TestServer {
        base,
        app,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client"),
        stop: Some(stop),
    }
}

pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    /// The `data:` payloads of an event stream.
    pub fn events(&self) -> Vec<String> {
        self.text
            .split("\n\n")
            .filter(|e| !e.trim().is_empty())
            .filter_map(|e| e.strip_prefix("data: ").map(str::to_owned))
            .collect()
    }
}

impl TestServer {
    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> Reply {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("send");
        reply(response).await
    }

    /// POSTs `body` with extra request `headers`.
    pub async fn post_with(&self, path: &str, body: &Value, headers: &[(&str, &str)]) -> Reply {
        let mut request = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_string());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        reply(request.send().await.expect("send")).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        self.post_raw(path, body.to_string()).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("send");
        reply(response).await
    }

    /// The value of an unlabelled metric, or of one series of a labelled one
    /// (`name{reason="queue_full"}`).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.get("/metrics").await.text;
        text.lines()
            .find_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                (name == series).then(|| value.parse().ok())?
            })
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    }

    /// Polls `check` until it holds or `within` passes.
    pub async fn wait_until(&self, within: Duration, mut check: impl FnMut(&Self) -> bool) {
        let start = Instant::now();
        while !check(self) {
            assert!(
                start.elapsed() < within,
                "condition not met within {within:?}: {:?}",
                self.stats()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn stats(&self) -> breakwater_infer::scheduler::EngineStats {
        self.app.model().expect("model").engine().stats()
    }
}

async fn reply(response: reqwest::Response) -> Reply {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.expect("body");
    Reply {
        status,
        headers,
        text,
    }
}

/// The concatenated content of a chat or completion event stream, its
/// finish reason, and checks common to every stream.
pub fn stream_text(events: &[String]) -> (String, String) {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let mut text = String::new();
    let mut finish = None;
    let mut id = None;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap_or_else(|err| panic!("{err}: {e}"));
        assert!(v.get("error").is_none(), "{e}");
        let this_id = v["id"].as_str().expect("id").to_owned();
        assert_eq!(id.get_or_insert(this_id.clone()), &this_id, "one id");
        let Some(choice) = v["choices"].get(0) else {
            continue; // the usage chunk
        };
        let delta = choice
            .get("delta")
            .map_or(&choice["text"], |d| &d["content"]);
        if let Some(t) = delta.as_str() {
            text.push_str(t);
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            assert!(finish.is_none(), "one finish");
            finish = Some(f.to_owned());
        }
    }
    (text, finish.expect("a finish reason"))
}
