//! The multi-tenant chat workload of `bench/prefix.sh`: TENANTS apps, each
//! with its own long system prompt, hold multi-turn conversations through
//! an edge. Conversations start at Poisson arrival times (open loop: a slow
//! server does not slow the offered load); within a conversation each turn
//! waits for the previous answer and carries it, as a chat client does.
//!
//! ```text
//! chat-driver --url http://127.0.0.1:8080/v1/chat/completions --model test \
//!     --tenants 20 --conversations 40 --turns 3 --rate 0.5 \
//!     --system-tokens 1000 --max-tokens 16 --out requests.txt
//! ```
//! Every request is streamed with `stream_options.include_usage`; the time
//! to first token is until the first chunk with text. Writes one line per
//! request to `--out`
//! (`conversation turn tenant status ttft_ms total_ms prompt_tokens cached_tokens completion_tokens`)
//! and prints one summary line:
//!
//! ```text
//! requests=120 ok=120 ttft_p50_ms=… ttft_p90_ms=… total_p50_ms=… total_p90_ms=… wall_ms=… completion_tokens=… prompt_tokens=… cached_tokens=…
//! ```
//! It exits non-zero when any request failed.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use breakwater_e2e::{Flags, read_event_stream};
use serde_json::{Value, json};

struct Args {
    url: String,
    model: String,
    tenants: usize,
    conversations: usize,
    turns: usize,
    rate: f64,
    system_tokens: usize,
    max_tokens: u32,
    think: Duration,
    seed: u64,
    out: Option<String>,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        url: String::new(),
        model: "test".to_owned(),
        tenants: 20,
        conversations: 40,
        turns: 3,
        rate: 0.5,
        system_tokens: 1000,
        max_tokens: 16,
        think: Duration::from_millis(500),
        seed: 1,
        out: None,
    };
    let mut flags = Flags::from_env();
    while let Some(flag) = flags.next_flag() {
        match flag.as_str() {
            "--url" => args.url = flags.value(&flag)?,
            "--model" => args.model = flags.value(&flag)?,
            "--tenants" => args.tenants = flags.parsed(&flag)?,
            "--conversations" => args.conversations = flags.parsed(&flag)?,
            "--turns" => args.turns = flags.parsed(&flag)?,
            "--rate" => args.rate = flags.parsed(&flag)?,
            "--system-tokens" => args.system_tokens = flags.parsed(&flag)?,
            "--max-tokens" => args.max_tokens = flags.parsed(&flag)?,
            "--think-ms" => args.think = Duration::from_millis(flags.parsed(&flag)?),
            "--seed" => args.seed = flags.parsed(&flag)?,
            "--out" => args.out = Some(flags.value(&flag)?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.url.is_empty() {
        return Err("--url is required".to_owned());
    }
    if args.tenants == 0 || args.turns == 0 || !args.rate.is_finite() || args.rate <= 0.0 {
        return Err("--tenants, --turns and --rate must be positive".to_owned());
    }
    Ok(args)
}

/// A deterministic stream of uniform numbers in [0, 1) (splitmix64), so
/// that every configuration of a bench run offers the same arrivals.
struct Uniform(u64);

impl Uniform {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) as f64 / (u64::MAX as f64 + 1.0)
    }
}

/// Tenant `t`'s system prompt: its name first (tenants differ from the
/// first token), then numbered rules, about `tokens` tokens in all (a rule
/// is some 21 tokens in SmolLM2's tokenizer: asking for 1000 gives 1000 to
/// 1005).
fn system_prompt(t: usize, tokens: usize) -> String {
    let products = [
        "routers",
        "laptops",
        "bicycles",
        "coffee machines",
        "cameras",
    ];
    let manners = ["politely", "briefly", "in plain words", "with one example"];
    let mut text = format!(
        "You are the support assistant of tenant {t}, a shop selling {}.",
        products[t % products.len()]
    );
    for i in 0..tokens / 21 {
        let _ = write!(
            text,
            " Rule {i}: when asked about {}, answer {} and cite section {}.",
            products[(t + i) % products.len()],
            manners[(t * 3 + i) % manners.len()],
            100 + (t * 31 + i * 7) % 900
        );
    }
    text
}

fn question(conversation: usize, turn: usize) -> String {
    let topics = [
        "my order",
        "a refund",
        "the warranty",
        "delivery",
        "an invoice",
    ];
    format!(
        "Question {turn} of chat {conversation}: what about {}?",
        topics[(conversation + turn) % topics.len()]
    )
}

struct Outcome {
    conversation: usize,
    turn: usize,
    tenant: usize,
    status: String,
    ttft_ms: Option<f64>,
    total_ms: f64,
    prompt_tokens: u64,
    cached_tokens: u64,
    completion_tokens: u64,
}

async fn converse(
    args: &Args,
    http: &reqwest::Client,
    conversation: usize,
    tenant: usize,
) -> Vec<Outcome> {
    let mut messages = vec![json!({
        "role": "system",
        "content": system_prompt(tenant, args.system_tokens),
    })];
    let mut out = Vec::new();
    for turn in 0..args.turns {
        if turn > 0 {
            tokio::time::sleep(args.think).await;
        }
        messages.push(json!({"role": "user", "content": question(conversation, turn)}));
        let body = json!({
            "model": args.model,
            "messages": messages,
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        let sent = Instant::now();
        let mut outcome = Outcome {
            conversation,
            turn,
            tenant,
            status: String::new(),
            ttft_ms: None,
            total_ms: 0.0,
            prompt_tokens: 0,
            cached_tokens: 0,
            completion_tokens: 0,
        };
        let response = http
            .post(&args.url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await;
        let answer = match response {
            Ok(r) if r.status() == 200 => Some(read_event_stream(r, |_| true).await),
            Ok(r) => {
                outcome.status = r.status().as_u16().to_string();
                None
            }
            Err(e) => {
                outcome.status = if e.is_timeout() { "timeout" } else { "error" }.to_owned();
                None
            }
        };
        outcome.total_ms = sent.elapsed().as_secs_f64() * 1e3;
        let Some(answer) = answer else {
            out.push(outcome);
            break;
        };
        let done = answer.events.last().is_some_and(|e| e == "[DONE]");
        outcome.status = match (&answer.broken, done) {
            (None, true) => "200".to_owned(),
            _ => "broken".to_owned(),
        };
        outcome.ttft_ms = answer
            .text_at
            .first()
            .map(|at| at.duration_since(sent).as_secs_f64() * 1e3);
        if let Some(usage) = answer.chunks().find_map(|c| c.get("usage").cloned()) {
            let count = |v: &Value| v.as_u64().unwrap_or(0);
            outcome.prompt_tokens = count(&usage["prompt_tokens"]);
            outcome.completion_tokens = count(&usage["completion_tokens"]);
            outcome.cached_tokens = count(&usage["prompt_tokens_details"]["cached_tokens"]);
        }
        let ok = outcome.status == "200";
        out.push(outcome);
        if !ok {
            break;
        }
        messages.push(json!({"role": "assistant", "content": answer.text}));
    }
    out
}

/// The `q`-quantile of sorted `values` (nearest rank), or NaN.
fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = match parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("chat-driver: {e}");
            std::process::exit(2);
        }
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(900))
        .build()
        .expect("an HTTP client");
    let mut uniform = Uniform(args.seed);
    // Poisson arrivals: exponential gaps of mean 1 / rate.
    let mut at = Duration::ZERO;
    let starts: Vec<(Duration, usize)> = (0..args.conversations)
        .map(|c| {
            let start = at;
            at += Duration::from_secs_f64(-(1.0 - uniform.next()).ln() / args.rate);
            (start, c % args.tenants)
        })
        .collect();
    let began = Instant::now();
    let conversations = starts.into_iter().enumerate().map(|(c, (start, tenant))| {
        let (args, http) = (&args, &http);
        async move {
            tokio::time::sleep_until((began + start).into()).await;
            converse(args, http, c, tenant).await
        }
    });
    let outcomes: Vec<Outcome> = futures_util::future::join_all(conversations)
        .await
        .into_iter()
        .flatten()
        .collect();
    let wall_ms = began.elapsed().as_secs_f64() * 1e3;

    if let Some(path) = &args.out {
        let mut lines = String::new();
        for o in &outcomes {
            let _ = writeln!(
                lines,
                "{} {} {} {} {} {:.1} {} {} {}",
                o.conversation,
                o.turn,
                o.tenant,
                o.status,
                o.ttft_ms.map_or("-".to_owned(), |t| format!("{t:.1}")),
                o.total_ms,
                o.prompt_tokens,
                o.cached_tokens,
                o.completion_tokens
            );
        }
        if let Err(e) = std::fs::write(path, lines) {
            eprintln!("chat-driver: writing {path}: {e}");
        }
    }
    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.status == "200").collect();
    let mut ttft: Vec<f64> = ok.iter().filter_map(|o| o.ttft_ms).collect();
    let mut total: Vec<f64> = ok.iter().map(|o| o.total_ms).collect();
    ttft.sort_by(f64::total_cmp);
    total.sort_by(f64::total_cmp);
    let sum = |f: fn(&Outcome) -> u64| ok.iter().map(|o| f(o)).sum::<u64>();
    println!(
        "requests={} ok={} ttft_p50_ms={:.0} ttft_p90_ms={:.0} total_p50_ms={:.0} total_p90_ms={:.0} wall_ms={wall_ms:.0} completion_tokens={} prompt_tokens={} cached_tokens={}",
        outcomes.len(),
        ok.len(),
        quantile(&ttft, 0.5),
        quantile(&ttft, 0.9),
        quantile(&total, 0.5),
        quantile(&total, 0.9),
        sum(|o| o.completion_tokens),
        sum(|o| o.prompt_tokens),
        sum(|o| o.cached_tokens),
    );
    if ok.len() != args.conversations * args.turns {
        std::process::exit(1);
    }
}
