//! Aggregate decode throughput through the whole serving path (HTTP, SSE,
//! scheduler, batched forward) on the demo model: N concurrent streaming
//! chat requests of a fixed length (`ignore_eos`), for N in 1, 4, 16.
//!
//! `cargo run -p breakwater-infer --example serve_throughput -- [threads] [tokens]`

use std::sync::Arc;
use std::time::Instant;

use breakwater_infer::demo_model;
use breakwater_infer::gguf::Gguf;
use breakwater_infer::scheduler::EngineConfig;
use breakwater_infer::server::{self, AppState, BackendOptions, Served, ServerConfig};
use breakwater_infer::telemetry::Telemetry;
use futures_util::future::join_all;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let threads: usize = args.next().map_or(Ok(2), |a| a.parse())?;
    let tokens: usize = args.next().map_or(Ok(64), |a| a.parse())?;

    let gguf = Gguf::open(demo_model::ensure(&demo_model::default_dir())?)?;
    let telemetry = Telemetry::new();
    let app = AppState::new(ServerConfig::new(demo_model::MODEL_NAME), telemetry.clone());
    let engine = EngineConfig {
        max_batch: 16,
        ..EngineConfig::default()
    };
    if app
        .set_model(Served::from_gguf(
            &gguf,
            BackendOptions::cpu(threads),
            engine,
            telemetry,
        )?)
        .is_err()
    {
        return Err("model already set".into());
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1/chat/completions", listener.local_addr()?);
    tokio::spawn(server::serve(
        listener,
        Arc::clone(&app),
        std::future::pending(),
    ));
    let client = reqwest::Client::new();

    let request = |i: usize| {
        let body = serde_json::json!({
            "model": demo_model::MODEL_NAME,
            "messages": [{"role": "user", "content": format!("Write a long story about lighthouse {i}.")}],
            "max_tokens": tokens, "ignore_eos": true, "temperature": 0, "stream": true,
        });
        let (client, url) = (client.clone(), url.clone());
        async move {
            let start = Instant::now();
            let mut response = client.post(url).body(body.to_string()).send().await?;
            let mut first = None;
            while let Some(chunk) = response.chunk().await? {
                // The first chunk after the role chunk carries the first token.
                let role = chunk.windows(6).any(|w| w == b"\"role\"");
                if first.is_none() && !role {
                    first = Some(start.elapsed());
                }
            }
            Ok::<_, reqwest::Error>(first)
        }
    };
    // One warm-up request so that the first measurement is not the first
    // request.
    request(0).await?;
    for streams in [1, 4, 16] {
        let start = Instant::now();
        let results = join_all((0..streams).map(request)).await;
        let seconds = start.elapsed().as_secs_f64();
        let mut ttft = Vec::new();
        for r in results {
            ttft.extend(r?);
        }
        ttft.sort();
        let median = ttft.get(ttft.len() / 2).map_or(0.0, |d| d.as_secs_f64());
        println!(
            "threads {threads}: {streams:>2} streams x {tokens} tokens: {:.1} tok/s in all, \
             median time to first token {:.0} ms",
            (streams * tokens) as f64 / seconds,
            median * 1000.0
        );
    }
    app.shutdown();
    Ok(())
}
