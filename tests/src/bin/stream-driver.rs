//! The streaming scenario of `bench/failover.sh`: STREAMS greedy chat
//! streams (each its own prompt) through an edge, once undisturbed and once
//! while some GPU hosts are killed mid-answer, and a comparison.
//!
//! ```text
//! stream-driver --url http://127.0.0.1:8080/v1/chat/completions --model test \
//!     --streams 20 --max-tokens 40 --cut-after 10 --kill-pids 123,456,789
//! ```
//! The kill comes once every stream of the second pass has had `cut-after`
//! chunks with text, so every killed host is mid-answer. Prints one line:
//!
//! ```text
//! streams=20 complete=20 identical=20 lost=0 broken=0 kill_ms=<since the second pass began> pass_ms=<undisturbed> <disturbed>
//! ```
//! and exits non-zero unless every stream completed with the undisturbed
//! pass's text.

use std::time::{Duration, Instant};

use breakwater_e2e::{Flags, StreamedAnswer, read_event_stream};

struct Args {
    url: String,
    model: String,
    streams: usize,
    max_tokens: u32,
    cut_after: usize,
    kill: Vec<i32>,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        url: String::new(),
        model: "test".to_owned(),
        streams: 20,
        max_tokens: 40,
        cut_after: 10,
        kill: Vec::new(),
    };
    let mut flags = Flags::from_env();
    while let Some(flag) = flags.next_flag() {
        match flag.as_str() {
            "--url" => args.url = flags.value(&flag)?,
            "--model" => args.model = flags.value(&flag)?,
            "--streams" => args.streams = flags.parsed(&flag)?,
            "--max-tokens" => args.max_tokens = flags.parsed(&flag)?,
            "--cut-after" => args.cut_after = flags.parsed(&flag)?,
            "--kill-pids" => {
                args.kill = flags
                    .value(&flag)?
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(|p| p.parse().map_err(|e| format!("--kill-pids: {e}")))
                    .collect::<Result<_, _>>()?;
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.url.is_empty() {
        return Err("--url is required".to_owned());
    }
    if args.cut_after as u64 >= u64::from(args.max_tokens) {
        return Err("--cut-after must be below --max-tokens".to_owned());
    }
    Ok(args)
}

fn request(args: &Args, i: usize) -> String {
    serde_json::json!({
        "model": args.model,
        "messages": [{"role": "user", "content": format!("question number {i}: what happens next?")}],
        "max_tokens": args.max_tokens,
        "ignore_eos": true,
        "temperature": 0,
        "stream": true,
    })
    .to_string()
}

/// Every stream at once; `at_cut` runs once all have had `cut_after`
/// chunks with text.
async fn pass(
    args: &Args,
    http: &reqwest::Client,
    at_cut: Option<Box<dyn FnOnce() + Send>>,
) -> Vec<StreamedAnswer> {
    let cut = std::sync::Arc::new(std::sync::Mutex::new((0usize, at_cut)));
    let streams = (0..args.streams).map(|i| {
        let (http, cut, body, url) = (http.clone(), cut.clone(), request(args, i), &args.url);
        let cut_after = args.cut_after;
        async move {
            let response = match http
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
            {
                Ok(response) if response.status() == 200 => response,
                Ok(response) => {
                    return StreamedAnswer {
                        broken: Some(format!("status {}", response.status())),
                        ..StreamedAnswer::default()
                    };
                }
                Err(e) => {
                    return StreamedAnswer {
                        broken: Some(e.to_string()),
                        ..StreamedAnswer::default()
                    };
                }
            };
            read_event_stream(response, |n| {
                if n == cut_after {
                    let mut cut = cut
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    cut.0 += 1;
                    if cut.0 == args.streams
                        && let Some(at_cut) = cut.1.take()
                    {
                        at_cut();
                    }
                }
                true
            })
            .await
        }
    });
    futures_util::future::join_all(streams).await
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = match parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("stream-driver: {e}");
            std::process::exit(2);
        }
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .expect("an HTTP client");
    let started = Instant::now();
    let undisturbed = pass(&args, &http, None).await;
    let undisturbed_ms = started.elapsed().as_millis();
    if let Some(bad) = undisturbed.iter().find(|s| !whole(s)) {
        eprintln!(
            "stream-driver: the undisturbed pass failed: {:?} {:?}",
            bad.broken,
            bad.events.last()
        );
        std::process::exit(1);
    }
    let started = Instant::now();
    let killed_at = std::sync::Arc::new(std::sync::OnceLock::new());
    let kill = {
        let (pids, killed_at) = (args.kill.clone(), killed_at.clone());
        Box::new(move || {
            for pid in pids {
                // SAFETY: kill(2) on a pid the bench script started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let _ = killed_at.set(started.elapsed().as_millis());
        })
    };
    let disturbed = pass(&args, &http, Some(kill)).await;
    let disturbed_ms = started.elapsed().as_millis();
    let complete = disturbed.iter().filter(|s| whole(s)).count();
    let identical = disturbed
        .iter()
        .zip(&undisturbed)
        .filter(|(d, u)| whole(d) && d.text == u.text)
        .count();
    let lost = disturbed
        .iter()
        .filter(|s| s.events.iter().any(|e| e.contains("upstream_lost")))
        .count();
    let broken = disturbed.iter().filter(|s| s.broken.is_some()).count();
    println!(
        "streams={} complete={complete} identical={identical} lost={lost} broken={broken} kill_ms={} pass_ms={undisturbed_ms} {disturbed_ms}",
        args.streams,
        killed_at.get().map_or("-".to_owned(), u128::to_string),
    );
    if identical != args.streams {
        std::process::exit(1);
    }
}

/// Ended with `[DONE]`, unbroken.
fn whole(stream: &StreamedAnswer) -> bool {
    stream.broken.is_none() && stream.events.last().is_some_and(|e| e == "[DONE]")
}
