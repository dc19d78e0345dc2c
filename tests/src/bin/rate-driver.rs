//! An open-loop load driver for `bench/failover.sh`: sends `GET URL` at a
//! constant rate whatever the answers do (so a stall shows up as lost
//! requests, not as a slower client), and writes one line per request:
//!
//! ```text
//! <start ms since the driver started> <status, 0 = no answer> <X-Served-By or -> <latency ms> <Retry-After or ->
//! ```
//!
//! ```text
//! rate-driver --url http://127.0.0.1:8080/work --rate 200 --seconds 30 --timeout-ms 2000 --out results.txt
//! ```
//! Requests in flight are capped at `rate × timeout` (the most an honest
//! run can have); a request over the cap is recorded as status 0 at once.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use breakwater_e2e::Flags;

struct Args {
    url: String,
    rate: u64,
    seconds: u64,
    timeout: Duration,
    out: String,
}

fn parse() -> Result<Args, String> {
    let mut url = None;
    let mut rate = 200;
    let mut seconds = 30;
    let mut timeout_ms = 2000;
    let mut out = None;
    let mut flags = Flags::from_env();
    while let Some(flag) = flags.next_flag() {
        match flag.as_str() {
            "--url" => url = Some(flags.value(&flag)?),
            "--rate" => rate = flags.parsed(&flag)?,
            "--seconds" => seconds = flags.parsed(&flag)?,
            "--timeout-ms" => timeout_ms = flags.parsed(&flag)?,
            "--out" => out = Some(flags.value(&flag)?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if !(1..=100_000).contains(&rate) {
        return Err("--rate must be 1..=100000".to_owned());
    }
    Ok(Args {
        url: url.ok_or("--url is required")?,
        rate,
        seconds,
        timeout: Duration::from_millis(timeout_ms),
        out: out.ok_or("--out is required")?,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = match parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!(
                "rate-driver: {e}\nusage: rate-driver --url URL --out FILE [--rate N] [--seconds S] [--timeout-ms T]"
            );
            std::process::exit(2);
        }
    };
    let client = match reqwest::Client::builder()
        .timeout(args.timeout)
        .pool_max_idle_per_host(1024)
        .build()
    {
        Ok(client) => client,
        Err(e) => {
            eprintln!("rate-driver: {e}");
            std::process::exit(1);
        }
    };
    let cap = usize::try_from(args.rate * args.timeout.as_millis().max(1) as u64 / 1000)
        .unwrap_or(usize::MAX)
        .max(16);
    let in_flight = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let total = args.rate * args.seconds;
    let gap = Duration::from_secs_f64(1.0 / args.rate as f64);
    let mut tasks = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    let mut lines = Vec::new();
    for i in 0..total {
        let due = started + gap.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let at = started.elapsed().as_millis();
        if in_flight.load(Ordering::SeqCst) >= cap {
            lines.push(format!("{at} 0 - 0 -"));
            continue;
        }
        in_flight.fetch_add(1, Ordering::SeqCst);
        let client = client.clone();
        let url = args.url.clone();
        let in_flight = in_flight.clone();
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let header = |response: &reqwest::Response, name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .filter(|v| !v.is_empty() && !v.contains(char::is_whitespace))
                    .unwrap_or("-")
                    .to_owned()
            };
            let (status, by, retry_after) = match client.get(&url).send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let by = header(&response, "x-served-by");
                    let retry_after = header(&response, "retry-after");
                    match response.bytes().await {
                        Ok(_) => (status, by, retry_after),
                        Err(_) => (0, by, retry_after),
                    }
                }
                Err(_) => (0, "-".to_owned(), "-".to_owned()),
            };
            in_flight.fetch_sub(1, Ordering::SeqCst);
            format!(
                "{at} {status} {by} {} {retry_after}",
                sent.elapsed().as_millis()
            )
        }));
    }
    for task in tasks {
        if let Ok(line) = task.await {
            lines.push(line);
        }
    }
    let written = std::fs::File::create(&args.out).and_then(|mut file| {
        for line in &lines {
            writeln!(file, "{line}")?;
        }
        Ok(())
    });
    if let Err(e) = written {
        eprintln!("rate-driver: writing {}: {e}", args.out);
        std::process::exit(1);
    }
}
