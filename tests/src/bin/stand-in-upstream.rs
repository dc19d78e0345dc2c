//! A stand-in GPU host for resilience tests and `bench/failover.sh`: a real
//! process on loopback that can be told to fail, answer busy, slow down or
//! fail its health check, and that counts what it saw. Hang it with
//! SIGSTOP, kill it with SIGKILL.
//!
//! ```text
//! stand-in-upstream --listen 127.0.0.1:9000 --name eu-1
//! ```
//!
//! - any path: `200` with body `NAME` and `X-Served-By: NAME`, after the
//!   current delay, or the current failure status;
//! - `/stream?n=N&delay_ms=D`: N server-sent events, D ms apart (N ≤ 10000);
//! - `/health/ready`: `200`, or `503` while told to fail health checks;
//! - `POST /_control?status=S&retry_after=R&delay_ms=D&health=ok|fail&capacity=C&queue=Q`:
//!   sets the failure status (0 or 200 clears it), its `Retry-After`, the
//!   delay (≤ 600000 ms), the health verdict, and a GPU host's bounded
//!   capacity: at most C requests served at once (0: unbounded), up to Q
//!   more waiting in turn, and beyond them `503` with `Retry-After: 1`
//!   at once; absent keys keep their value;
//! - `GET /_control/stats`: JSON counts: `requests` (not counting control
//!   and health paths), `retries` (requests with `X-Breakwater-Attempt`),
//!   `max_concurrent_retries`, `in_flight`, `cancelled` (the client went
//!   away before the answer ended), `last_deadline` (the last
//!   `X-Request-Deadline` seen, Unix ms, 0 when none), `health_checks`,
//!   `overloaded` (turned away for capacity).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};

#[derive(Default)]
struct State {
    name: String,
    status: AtomicU16,
    retry_after: AtomicU64,
    delay_ms: AtomicU64,
    health_fail: AtomicBool,
    requests: AtomicU64,
    retries: AtomicU64,
    retries_in_flight: AtomicU64,
    max_concurrent_retries: AtomicU64,
    in_flight: AtomicU64,
    cancelled: AtomicU64,
    last_deadline: AtomicU64,
    health_checks: AtomicU64,
    /// Slots for requests served at once; none: unbounded.
    capacity: Mutex<Option<Arc<tokio::sync::Semaphore>>>,
    /// Requests that may wait for a slot.
    queue: AtomicU64,
    waiting: AtomicU64,
    overloaded: AtomicU64,
}

type Body = BoxBody<Bytes, Infallible>;

fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into()).boxed()
}

/// Counts a request in flight; counts it cancelled if dropped unfinished.
struct Flight {
    state: Arc<State>,
    retry: bool,
    done: bool,
}

impl Flight {
    fn new(state: &Arc<State>, retry: bool) -> Self {
        state.in_flight.fetch_add(1, Ordering::SeqCst);
        if retry {
            let now = state.retries_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            state
                .max_concurrent_retries
                .fetch_max(now, Ordering::SeqCst);
        }
        Self {
            state: state.clone(),
            retry,
            done: false,
        }
    }
}

impl Flight {
    fn finish(&mut self) {
        self.done = true;
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.retry {
            self.state.retries_in_flight.fetch_sub(1, Ordering::SeqCst);
        }
        if !self.done {
            self.state.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn query(request: &Request<Incoming>, key: &str) -> Option<u64> {
    request.uri().query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

fn query_str<'a>(request: &'a Request<Incoming>, key: &str) -> Option<&'a str> {
    request.uri().query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then_some(v)
    })
}

async fn handle(state: Arc<State>, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_owned();
    if path == "/_control/stats" {
        let s = &state;
        let json = serde_json::json!({
            "name": s.name,
            "requests": s.requests.load(Ordering::SeqCst),
            "retries": s.retries.load(Ordering::SeqCst),
            "max_concurrent_retries": s.max_concurrent_retries.load(Ordering::SeqCst),
            "in_flight": s.in_flight.load(Ordering::SeqCst),
            "cancelled": s.cancelled.load(Ordering::SeqCst),
            "last_deadline": s.last_deadline.load(Ordering::SeqCst),
            "health_checks": s.health_checks.load(Ordering::SeqCst),
            "overloaded": s.overloaded.load(Ordering::SeqCst),
        });
        return Response::new(full(json.to_string()));
    }
    if path == "/_control" {
        if let Some(status) = query(&request, "status") {
            state
                .status
                .store(u16::try_from(status).unwrap_or(0), Ordering::SeqCst);
        }
        if let Some(after) = query(&request, "retry_after") {
            state.retry_after.store(after, Ordering::SeqCst);
        }
        if let Some(delay) = query(&request, "delay_ms") {
            state.delay_ms.store(delay.min(600_000), Ordering::SeqCst);
        }
        if let Some(health) = query_str(&request, "health") {
            state.health_fail.store(health == "fail", Ordering::SeqCst);
        }
        if let Some(queue) = query(&request, "queue") {
            state.queue.store(queue, Ordering::SeqCst);
        }
        if let Some(capacity) = query(&request, "capacity") {
            let slots = usize::try_from(capacity.min(100_000)).unwrap_or(0);
            let semaphore = (slots > 0).then(|| Arc::new(tokio::sync::Semaphore::new(slots)));
            if let Ok(mut current) = state.capacity.lock() {
                *current = semaphore;
            }
        }
        return Response::new(full("ok"));
    }
    if path == "/health/ready" {
        state.health_checks.fetch_add(1, Ordering::SeqCst);
        let status = if state.health_fail.load(Ordering::SeqCst) {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        let mut response = Response::new(full("ready"));
        *response.status_mut() = status;
        return response;
    }

    state.requests.fetch_add(1, Ordering::SeqCst);
    let retry = request
        .headers()
        .contains_key(breakwater_wire::ATTEMPT_HEADER);
    if retry {
        state.retries.fetch_add(1, Ordering::SeqCst);
    }
    if let Some(deadline) = request
        .headers()
        .get(breakwater_wire::DEADLINE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
    {
        state.last_deadline.store(deadline, Ordering::SeqCst);
    }
    let mut flight = Flight::new(&state, retry);
    // Read the whole body first, as a real server would.
    let (parts, body) = request.into_parts();
    let _ = body.collect().await;
    let request = Request::from_parts(parts, ());
    // A bounded capacity: a slot now, a wait in a bounded queue, or 503.
    let semaphore = state.capacity.lock().ok().and_then(|c| c.clone());
    let _slot = match semaphore {
        None => None,
        Some(semaphore) => match semaphore.clone().try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) => {
                let waiting = state.waiting.fetch_add(1, Ordering::SeqCst);
                let slot = if waiting < state.queue.load(Ordering::SeqCst) {
                    semaphore.acquire_owned().await.ok()
                } else {
                    None
                };
                state.waiting.fetch_sub(1, Ordering::SeqCst);
                if slot.is_none() {
                    flight.finish();
                    state.overloaded.fetch_add(1, Ordering::SeqCst);
                    let mut response = Response::new(full(format!("{} at capacity", state.name)));
                    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                    response
                        .headers_mut()
                        .insert("retry-after", hyper::header::HeaderValue::from_static("1"));
                    return response;
                }
                slot
            }
        },
    };
    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let status = state.status.load(Ordering::SeqCst);
    if status != 0 && status != 200 {
        flight.finish();
        let mut response = Response::new(full(format!("{} failing", state.name)));
        *response.status_mut() =
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let after = state.retry_after.load(Ordering::SeqCst);
        if after > 0 {
            response
                .headers_mut()
                .insert("retry-after", after.to_string().parse().expect("digits"));
        }
        return response;
    }
    let served_by: hyper::header::HeaderValue = state
        .name
        .parse()
        .unwrap_or(hyper::header::HeaderValue::from_static("stand-in"));
    if path == "/stream" {
        let n = query_str_num(&request, "n").unwrap_or(5).min(10_000);
        let gap = Duration::from_millis(query_str_num(&request, "delay_ms").unwrap_or(100));
        let name = state.name.clone();
        let stream = futures_util::stream::unfold((0, flight), move |(i, mut flight)| {
            let name = name.clone();
            async move {
                if i >= n {
                    flight.finish();
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(gap).await;
                }
                let event = format!("id: {i}\ndata: {name} {i}\n\n");
                Some((
                    Ok::<_, Infallible>(Frame::data(Bytes::from(event))),
                    (i + 1, flight),
                ))
            }
        });
        let mut response = Response::new(StreamBody::new(stream).boxed());
        response.headers_mut().insert(
            "content-type",
            hyper::header::HeaderValue::from_static("text/event-stream"),
        );
        response.headers_mut().insert("x-served-by", served_by);
        return response;
    }
    flight.finish();
    let mut response = Response::new(full(state.name.clone()));
    response.headers_mut().insert("x-served-by", served_by);
    response
}

fn query_str_num(request: &Request<()>, key: &str) -> Option<u64> {
    request.uri().query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut listen: Option<SocketAddr> = None;
    let mut name = "stand-in".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().and_then(|a| a.parse().ok()),
            "--name" => name = args.next().unwrap_or(name),
            other => {
                eprintln!("unknown argument {other}; usage: --listen ADDR [--name NAME]");
                std::process::exit(2);
            }
        }
    }
    let Some(listen) = listen else {
        eprintln!("usage: stand-in-upstream --listen ADDR [--name NAME]");
        std::process::exit(2);
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("cannot listen on {listen}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("stand-in {name} listening on {listen}");
    let state = Arc::new(State {
        name,
        ..State::default()
    });
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(state, request).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
