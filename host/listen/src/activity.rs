//! Whether a connection has requests in flight, and for how long it has not.
//!
//! A request is in flight from the moment hyper hands it to the service
//! until its response body is finished or dropped, so a long stream keeps
//! its connection busy and a finished exchange starts the idle clock.
//!
//! Between requests an HTTP/1.1 connection is idle until the first byte of
//! the next request head arrives; from then on the head must be complete
//! within the header-read timeout (as Envoy and Go separate an idle timeout
//! from a request-headers timeout). hyper's own header-read timer cannot be
//! used for that: it starts when hyper begins waiting for a head, so it
//! would close every keep-alive connection idle for longer than the
//! header-read timeout, whatever the idle timeout says.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::Service;
use hyper::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

/// Requests in flight on one connection, and what it did in between.
#[derive(Clone)]
pub(crate) struct Activity(Arc<Shared>);

struct Shared {
    flow: watch::Sender<Flow>,
    /// The connection carries h2, whose frames (pings, window updates)
    /// flow between requests and say nothing about a request head.
    multiplexed: AtomicBool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Flow {
    in_flight: usize,
    /// Requests handed to the service so far.
    requests: u64,
    /// Bytes arrived while nothing was in flight: a request head has begun.
    head_started: bool,
}

impl Default for Activity {
    fn default() -> Self {
        Self(Arc::new(Shared {
            flow: watch::Sender::new(Flow::default()),
            multiplexed: AtomicBool::new(false),
        }))
    }
}

/// The bounds a connection's quiet moments live within.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QuietBounds {
    /// From accept to the first request handed to the service.
    pub(crate) first_request: Duration,
    /// From the end of the last request to the first byte of the next.
    pub(crate) idle: Duration,
    /// From the first byte of a later HTTP/1.1 request head to its end.
    pub(crate) head: Duration,
}

/// Why a connection was found idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IdleReason {
    /// It never sent a request within the header read timeout.
    NoRequest,
    /// It had no request in flight for the idle timeout.
    Idle,
    /// It began a later request head and did not finish it within the
    /// header read timeout.
    SlowHead,
}

impl IdleReason {
    pub(crate) fn label(self) -> &'static str {
        match self {
            IdleReason::NoRequest => "no_request",
            IdleReason::Idle => "idle",
            IdleReason::SlowHead => "slow_head",
        }
    }
}

/// Holds one request in flight.
struct InFlight(Activity);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .0
            .flow
            .send_modify(|flow| flow.in_flight = flow.in_flight.saturating_sub(1));
    }
}

impl Activity {
    fn begin(&self, version: http::Version) -> InFlight {
        if version == http::Version::HTTP_2 {
            self.0.multiplexed.store(true, Ordering::Relaxed);
        }
        self.0.flow.send_modify(|flow| {
            flow.in_flight += 1;
            flow.requests += 1;
            flow.head_started = false;
        });
        InFlight(self.clone())
    }

    /// Whether the service was ever handed a request on this connection.
    pub(crate) fn begun(&self) -> bool {
        self.0.flow.borrow().requests > 0
    }

    /// Bytes came from the client.
    fn bytes_read(&self) {
        if self.0.multiplexed.load(Ordering::Relaxed) {
            return;
        }
        self.0.flow.send_if_modified(|flow| {
            let starts_a_head = flow.requests > 0 && flow.in_flight == 0 && !flow.head_started;
            flow.head_started |= starts_a_head;
            starts_a_head
        });
    }

    /// Resolves once the connection has been quiet past its bound: no
    /// request within `first_request` of accept, nothing in flight and no
    /// new head for `idle`, or a later head unfinished after `head`.
    pub(crate) async fn idle(&self, bounds: QuietBounds) -> IdleReason {
        let mut changes = self.0.flow.subscribe();
        let mut deadline = Instant::now() + bounds.first_request;
        let mut reason = IdleReason::NoRequest;
        let mut seen = Flow::default();
        loop {
            let flow = *changes.borrow_and_update();
            let now = Instant::now();
            // A request began or ended since the last look (the watch may
            // fold several changes into one): the idle clock restarts.
            if flow.requests != seen.requests || flow.in_flight < seen.in_flight {
                (deadline, reason) = (now + bounds.idle, IdleReason::Idle);
            }
            if flow.head_started && !(seen.head_started && seen.requests == flow.requests) {
                (deadline, reason) = (now + bounds.head, IdleReason::SlowHead);
            }
            seen = flow;
            let changed = if flow.in_flight == 0 {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => return reason,
                    changed = changes.changed() => changed,
                }
            } else {
                changes.changed().await
            };
            if changed.is_err() {
                // Cannot happen while `self` holds the sender; never idle then.
                std::future::pending::<()>().await;
            }
        }
    }
}

/// The client's side of a connection, telling its activity when bytes
/// arrive. It sits under hyper, on the plain (or decrypted) stream.
pub(crate) struct ReadWatch<I> {
    inner: I,
    activity: Activity,
}

impl<I> ReadWatch<I> {
    pub(crate) fn new(inner: I, activity: Activity) -> Self {
        Self { inner, activity }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for ReadWatch<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.bytes_read();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for ReadWatch<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A service whose requests count as in flight on their connection.
pub(crate) struct TrackedService<S> {
    inner: S,
    activity: Activity,
}

impl<S> TrackedService<S> {
    pub(crate) fn new(inner: S, activity: Activity) -> Self {
        Self { inner, activity }
    }
}

type ResponseFuture<B, E> =
    Pin<Box<dyn Future<Output = Result<Response<TrackedBody<B>>, E>> + Send>>;

impl<S, B> Service<Request<Incoming>> for TrackedService<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = ResponseFuture<B, S::Error>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let in_flight = self.activity.begin(request.version());
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|inner| TrackedBody {
                inner,
                _in_flight: in_flight,
            }))
        })
    }
}

/// A response body that keeps its request in flight until it is finished
/// or dropped.
pub(crate) struct TrackedBody<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B> http_body::Body for TrackedBody<B>
where
    B: http_body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: QuietBounds = QuietBounds {
        first_request: Duration::from_secs(1),
        idle: Duration::from_secs(5),
        head: Duration::from_secs(2),
    };

    fn watch(activity: &Activity) -> tokio::task::JoinHandle<IdleReason> {
        let activity = activity.clone();
        tokio::spawn(async move { activity.idle(BOUNDS).await })
    }

    #[tokio::test(start_paused = true)]
    async fn idle_bounds_follow_the_requests() {
        let activity = Activity::default();
        let started = Instant::now();
        assert_eq!(activity.idle(BOUNDS).await, IdleReason::NoRequest);
        assert_eq!(started.elapsed(), BOUNDS.first_request);

        let watcher = watch(&activity);
        tokio::task::yield_now().await;
        let request = activity.begin(http::Version::HTTP_11);
        // Busy for far longer than any bound: never idle meanwhile.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!watcher.is_finished());
        let finished = Instant::now();
        drop(request);
        assert_eq!(watcher.await.expect("idle task"), IdleReason::Idle);
        assert_eq!(finished.elapsed(), BOUNDS.idle);
    }

    #[tokio::test(start_paused = true)]
    async fn a_keep_alive_connection_idles_for_the_idle_bound_and_a_later_head_gets_the_head_bound()
    {
        let activity = Activity::default();
        let watcher = watch(&activity);
        tokio::task::yield_now().await;
        drop(activity.begin(http::Version::HTTP_11));
        // Idle past the head bound: still open.
        tokio::time::sleep(BOUNDS.head * 2).await;
        assert!(!watcher.is_finished());
        // The first byte of the next head starts its own clock.
        activity.bytes_read();
        let head_began = Instant::now();
        assert_eq!(watcher.await.expect("idle task"), IdleReason::SlowHead);
        assert_eq!(head_began.elapsed(), BOUNDS.head);
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_before_the_first_request_do_not_extend_its_bound() {
        let activity = Activity::default();
        let started = Instant::now();
        let watcher = watch(&activity);
        tokio::time::sleep(BOUNDS.first_request / 2).await;
        activity.bytes_read();
        assert_eq!(watcher.await.expect("idle task"), IdleReason::NoRequest);
        assert_eq!(started.elapsed(), BOUNDS.first_request);
    }

    #[tokio::test(start_paused = true)]
    async fn h2_frames_between_requests_are_not_a_head() {
        let activity = Activity::default();
        let watcher = watch(&activity);
        tokio::task::yield_now().await;
        drop(activity.begin(http::Version::HTTP_2));
        let finished = Instant::now();
        // Pings and window updates arrive while nothing is in flight.
        activity.bytes_read();
        assert_eq!(watcher.await.expect("idle task"), IdleReason::Idle);
        assert_eq!(finished.elapsed(), BOUNDS.idle);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_begins_and_ends_unseen_still_restarts_the_idle_clock() {
        let activity = Activity::default();
        let watcher = watch(&activity);
        tokio::task::yield_now().await;
        drop(activity.begin(http::Version::HTTP_11));
        tokio::time::sleep(BOUNDS.idle - Duration::from_secs(1)).await;
        // Begin and end with no yield between: the watcher sees one change.
        activity.bytes_read();
        drop(activity.begin(http::Version::HTTP_11));
        let finished = Instant::now();
        assert_eq!(watcher.await.expect("idle task"), IdleReason::Idle);
        assert_eq!(finished.elapsed(), BOUNDS.idle);
    }
}
