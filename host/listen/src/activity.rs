//! Whether a connection has requests in flight, and for how long it has not.
//!
//! A request is in flight from the moment hyper hands it to the service
//! until its response body is finished or dropped, so a long stream keeps
//! its connection busy and a finished exchange starts the idle clock.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::Service;
use hyper::{Request, Response};
use tokio::sync::watch;

/// Requests in flight on one connection, and whether it ever had one.
#[derive(Clone)]
pub(crate) struct Activity(Arc<Counts>);

struct Counts {
    in_flight: watch::Sender<usize>,
    begun: AtomicBool,
}

impl Default for Activity {
    fn default() -> Self {
        Self(Arc::new(Counts {
            in_flight: watch::Sender::new(0),
            begun: AtomicBool::new(false),
        }))
    }
}

/// Why a connection was found idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IdleReason {
    /// It never sent a request within the header read timeout.
    NoRequest,
    /// It had no request in flight for the idle timeout.
    Idle,
}

impl IdleReason {
    pub(crate) fn label(self) -> &'static str {
        match self {
            IdleReason::NoRequest => "no_request",
            IdleReason::Idle => "idle",
        }
    }
}

/// Holds one request in flight.
struct InFlight(Activity);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.0.in_flight.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Activity {
    fn begin(&self) -> InFlight {
        self.0.begun.store(true, Ordering::Release);
        self.0.in_flight.send_modify(|n| *n += 1);
        InFlight(self.clone())
    }

    /// Whether the service was ever handed a request on this connection.
    pub(crate) fn begun(&self) -> bool {
        self.0.begun.load(Ordering::Acquire)
    }

    /// Resolves once the connection has had nothing in flight for
    /// `first_request` before its first request, or for `idle` after one.
    pub(crate) async fn idle(&self, first_request: Duration, idle: Duration) -> IdleReason {
        let mut changes = self.0.in_flight.subscribe();
        let (mut bound, mut reason) = (first_request, IdleReason::NoRequest);
        loop {
            let in_flight = *changes.borrow_and_update();
            let changed = if in_flight == 0 {
                tokio::select! {
                    () = tokio::time::sleep(bound) => return reason,
                    changed = changes.changed() => changed,
                }
            } else {
                changes.changed().await
            };
            if changed.is_err() {
                // Cannot happen while `self` holds the sender; never idle then.
                std::future::pending::<()>().await;
            }
            // Any change means a request began on this connection.
            (bound, reason) = (idle, IdleReason::Idle);
        }
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
        let in_flight = self.activity.begin();
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

    #[tokio::test(start_paused = true)]
    async fn idle_bounds_follow_the_requests() {
        let activity = Activity::default();
        let started = tokio::time::Instant::now();
        let reason = activity
            .idle(Duration::from_secs(1), Duration::from_secs(5))
            .await;
        assert_eq!(reason, IdleReason::NoRequest);
        assert_eq!(started.elapsed(), Duration::from_secs(1));

        let watcher = tokio::spawn({
            let activity = activity.clone();
            async move {
                activity
                    .idle(Duration::from_secs(1), Duration::from_secs(5))
                    .await
            }
        });
        tokio::task::yield_now().await;
        let request = activity.begin();
        // Busy for far longer than either bound: never idle meanwhile.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!watcher.is_finished());
        let finished = tokio::time::Instant::now();
        drop(request);
        let reason = watcher.await.expect("idle task");
        assert_eq!(reason, IdleReason::Idle);
        assert_eq!(finished.elapsed(), Duration::from_secs(5));
    }
}
