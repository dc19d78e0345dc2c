//! Serving HTTP/1.1 and h2 on a TCP listener, with every connection
//! bounded: how many a listener holds and how many one client IP holds
//! (beyond either, a new connection is closed at accept, before any work),
//! how long a connection may take to send its first request, how long it
//! may stay open with no request in flight, and how long a drain lasts.
//!
//! The edge node's data-plane and admin listeners and the GPU host's API
//! listener all serve through [`serve`], so a silent or idle socket costs
//! each of them the same bounded time.
//!
//! Metrics, labelled `listener` with [`ServeOptions::name`]:
//! `breakwater_listener_connections_open` (gauge),
//! `breakwater_listener_connections_refused_total{reason}` (`max_connections`,
//! `max_connections_per_ip`), `breakwater_listener_connections_closed_total{reason}`
//! (`no_request`: nothing within the header-read timeout; `idle`: no request
//! in flight for the idle timeout; `slow_head`: a later HTTP/1.1 request head
//! unfinished a header-read timeout after its first byte), `breakwater_listener_tls_handshake_failures_total`,
//! `breakwater_listener_unparsable_requests_total{status}` (heads hyper
//! answered itself).

mod activity;
mod limiter;
mod parse_error;

use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::activity::{Activity, IdleReason, QuietBounds, ReadWatch, TrackedService};
use crate::limiter::{ConnectionLimiter, ConnectionPermit};

pub use crate::parse_error::ParseErrorBody;
use crate::parse_error::ParseErrorRewrite;

type BoxError = Box<dyn StdError + Send + Sync>;

/// The bounds every connection of a listener lives within.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Time a new connection has to complete its TLS handshake and send its
    /// first request; also the time an HTTP/1.1 client has to finish each
    /// later request head, from its first byte (the slowloris guard).
    pub header_read_timeout: Duration,
    /// Time a connection may stay open with no request in flight and, on
    /// HTTP/1.1, no byte of the next request yet (keep-alive and h2 alike);
    /// then it is closed (h2: GOAWAY first).
    pub idle_timeout: Duration,
    /// Connections the listener holds at once.
    pub max_connections: usize,
    /// Connections one client IP address holds at once on the listener.
    pub max_connections_per_ip: usize,
}

impl Default for ConnectionLimits {
    /// The edge's `[limits]` defaults (edge-config documents them; a test in
    /// the edge checks that the two agree).
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            max_connections_per_ip: 256,
        }
    }
}

/// How one listener serves.
#[derive(Clone)]
pub struct ServeOptions {
    /// The `listener` label of this listener's metrics and logs.
    pub name: String,
    pub limits: ConnectionLimits,
    /// TLS (h2 or HTTP/1.1 by ALPN, as the acceptor's configuration says);
    /// none serves plain HTTP/1.1 and h2c with prior knowledge.
    pub tls: Option<TlsAcceptor>,
    /// After the stop signal: how long open connections may finish the
    /// requests they have in flight before they are closed.
    pub grace: Duration,
    /// The body of the answer to an HTTP/1.1 request head hyper cannot
    /// parse, in place of hyper's empty one (on a connection's first
    /// request; see [`ParseErrorBody`]). None keeps hyper's.
    pub parse_error_body: Option<ParseErrorBody>,
}

/// A connection builder with hyper's timers set; callers add protocol
/// settings of their own. [`serve`] bounds request heads itself (see the
/// `activity` module), so hyper's HTTP/1.1 header-read timer is off: it
/// would also cut keep-alive connections idle for longer than it.
pub fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None);
    builder.http2().timer(TokioTimer::new());
    builder
}

/// Accepts connections on `listener` and serves each with the service
/// `make_service` builds for its peer, within `options.limits`, until
/// `stop` is cancelled; then stops accepting, lets open connections finish
/// for up to `options.grace` (h2 gets GOAWAY, an idle HTTP/1.1 connection
/// is closed) and closes what is left.
pub async fn serve<M, S, B>(
    listener: TcpListener,
    builder: auto::Builder<TokioExecutor>,
    options: ServeOptions,
    make_service: M,
    stop: CancellationToken,
) where
    M: Fn(SocketAddr) -> S,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    B: http_body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let limiter = ConnectionLimiter::new(
        &options.name,
        options.limits.max_connections,
        options.limits.max_connections_per_ip,
    );
    let builder = Arc::new(builder);
    let tracker = TaskTracker::new();
    // Cancelled when the grace is over: connections still open are dropped.
    let hard_stop = CancellationToken::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(listener = %options.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        // Over a limit: closed before anything is spent on it.
        let Some(permit) = limiter.admit(peer.ip()) else {
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            builder: builder.clone(),
            limits: options.limits.clone(),
            name: options.name.clone(),
            peer,
            stop: stop.clone(),
            hard_stop: hard_stop.clone(),
            parse_error_body: options.parse_error_body.clone(),
            _permit: permit,
        };
        let service = make_service(peer);
        let tls = options.tls.clone();
        tracker.spawn(async move {
            match tls {
                None => connection.serve(stream, service).await,
                // Boxed: a task is as large as its largest state, and a TLS
                // session held inline would more than double every plain
                // connection's (6.5 KiB against 2.9 KiB), idle ones included.
                Some(acceptor) => {
                    Box::pin(async move {
                        if let Some(stream) = connection.handshake(acceptor, stream).await {
                            connection.serve(stream, service).await;
                        }
                    })
                    .await;
                }
            }
        });
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(options.grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(listener = %options.name, grace = ?options.grace,
            "shutdown grace elapsed with requests still in flight; closing their connections");
        hard_stop.cancel();
        tracker.wait().await;
    }
}

/// One accepted connection.
struct Connection {
    builder: Arc<auto::Builder<TokioExecutor>>,
    limits: ConnectionLimits,
    name: String,
    peer: SocketAddr,
    stop: CancellationToken,
    hard_stop: CancellationToken,
    parse_error_body: Option<ParseErrorBody>,
    /// Counts the connection against the listener's limits until dropped.
    _permit: ConnectionPermit,
}

impl Connection {
    async fn handshake(
        &self,
        acceptor: TlsAcceptor,
        stream: TcpStream,
    ) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
        let outcome = tokio::select! {
            outcome = tokio::time::timeout(self.limits.header_read_timeout, acceptor.accept(stream)) => outcome,
            () = self.hard_stop.cancelled() => return None,
        };
        let error = match outcome {
            Ok(Ok(stream)) => return Some(stream),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "not completed within the header read timeout".to_owned(),
        };
        metrics::counter!("breakwater_listener_tls_handshake_failures_total", "listener" => self.name.clone())
            .increment(1);
        tracing::debug!(listener = %self.name, peer = %self.peer, %error, "TLS handshake failed");
        None
    }

    /// Serves HTTP/1.1 or h2 on `io` until the client closes, the
    /// connection idles past its bound, or the listener stops.
    async fn serve<I, S, B>(self, io: I, service: S)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: Service<Request<Incoming>, Response = Response<B>> + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError> + Send + 'static,
        B: http_body::Body + Unpin + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let activity = Activity::default();
        let io = ParseErrorRewrite::new(
            TokioIo::new(ReadWatch::new(io, activity.clone())),
            activity.clone(),
            self.parse_error_body.clone(),
            &self.name,
        );
        let service = TrackedService::new(service, activity.clone());
        let connection = self.builder.serve_connection_with_upgrades(io, service);
        tokio::pin!(connection);
        // hyper has no idle timeout for h2, and its HTTP/1.1 header timer
        // cannot tell an idle keep-alive connection from a slow head: this
        // bounds all three.
        let idle = activity.idle(QuietBounds {
            first_request: self.limits.header_read_timeout,
            idle: self.limits.idle_timeout,
            head: self.limits.header_read_timeout,
        });
        tokio::pin!(idle);
        let closing = tokio::select! {
            outcome = &mut connection => {
                self.log_end(outcome);
                return;
            }
            reason = &mut idle => {
                metrics::counter!(
                    "breakwater_listener_connections_closed_total",
                    "listener" => self.name.clone(),
                    "reason" => reason.label()
                )
                .increment(1);
                tracing::debug!(listener = %self.name, peer = %self.peer, reason = reason.label(), "closing the connection");
                if reason != IdleReason::Idle {
                    // A head is missing or half sent: nothing to finish.
                    return;
                }
                // Nothing is in flight: the GOAWAY (h2) or the close (HTTP/1.1)
                // goes out at once; a peer that will not read it gets the
                // header timeout, not forever.
                self.limits.header_read_timeout
            }
            () = self.stop.cancelled() => Duration::MAX,
            () = self.hard_stop.cancelled() => return,
        };
        connection.as_mut().graceful_shutdown();
        tokio::select! {
            outcome = &mut connection => self.log_end(outcome),
            () = tokio::time::sleep(closing) => {}
            () = self.hard_stop.cancelled() => {}
        }
    }

    fn log_end(&self, outcome: Result<(), BoxError>) {
        if let Err(e) = outcome {
            tracing::debug!(listener = %self.name, peer = %self.peer, error = %e, "connection ended with an error");
        }
    }
}
