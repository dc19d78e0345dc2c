//! Request limits the node enforces itself, before any phase runs: header
//! size (431), body size (413) and body read time (408).

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

/// Bytes of the request head as a client sent it: request line plus
/// `name: value\r\n` per header. Used for the 431 check, which must not depend
/// on whether the client spoke HTTP/1.1 or h2.
pub(crate) fn request_head_bytes(parts: &Parts) -> usize {
    let line = parts.method.as_str().len()
        + parts.uri.path_and_query().map_or(1, |pq| pq.as_str().len())
        + 12;
    parts.headers.iter().fold(line, |total, (name, value)| {
        total + name.as_str().len() + value.len() + 4
    })
}

/// Why a request body was cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BodyLimitError {
    #[error("request body exceeds {0} bytes")]
    TooLarge(u64),
    #[error("request body not received within {0:?}")]
    TimedOut(Duration),
}

/// A request body that fails once it passes `max_bytes` or takes longer than
/// `timeout` to arrive. The failure is also recorded in [`BodyLimitTrip`] so
/// that whoever was consuming the body (the proxy) can answer 413 / 408
/// instead of a generic upstream error.
pub(crate) struct LimitedBody {
    inner: Incoming,
    received: u64,
    max_bytes: u64,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
    trip: BodyLimitTrip,
}

/// Shared record of a tripped body limit.
#[derive(Clone, Default)]
pub(crate) struct BodyLimitTrip(Arc<OnceLock<BodyLimitError>>);

impl BodyLimitTrip {
    pub(crate) fn get(&self) -> Option<BodyLimitError> {
        self.0.get().copied()
    }
}

impl LimitedBody {
    pub(crate) fn new(inner: Incoming, max_bytes: u64, timeout: Duration) -> (Self, BodyLimitTrip) {
        let trip = BodyLimitTrip::default();
        let body = Self {
            inner,
            received: 0,
            max_bytes,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            trip: trip.clone(),
        };
        (body, trip)
    }

    fn fail(&self, error: BodyLimitError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let _ = self.trip.0.set(error);
        Poll::Ready(Some(Err(Box::new(error))))
    }
}

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if self.inner.is_end_stream() {
            return Poll::Ready(None);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            let timeout = self.timeout;
            return self.fail(BodyLimitError::TimedOut(timeout));
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.received += data.len() as u64;
                    if self.received > self.max_bytes {
                        let max = self.max_bytes;
                        return self.fail(BodyLimitError::TooLarge(max));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
