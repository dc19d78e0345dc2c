//! Request limits the node enforces itself, before any phase runs: the
//! method allow-list (405), header size (431), body size (413) and body
//! read time (408).

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body as ResponseBody;
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Method, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

/// The methods the node serves (`[limits] allowed_methods`).
pub(crate) struct MethodAllowList {
    methods: Vec<Method>,
    /// The `Allow` header of a 405: the list, comma-separated.
    allow: HeaderValue,
}

impl MethodAllowList {
    pub(crate) fn new(names: &[String]) -> Self {
        let methods: Vec<Method> = names
            .iter()
            .filter_map(|name| Method::from_bytes(name.as_bytes()).ok())
            // Never tunnelled, whatever a configuration built in code says.
            .filter(|method| method != Method::CONNECT)
            .collect();
        let listed: Vec<&str> = methods.iter().map(Method::as_str).collect();
        let allow = HeaderValue::from_str(&listed.join(", "))
            .unwrap_or_else(|_| HeaderValue::from_static(""));
        Self { methods, allow }
    }

    /// The 405 for a `method` outside the list, with `Allow`.
    pub(crate) fn refusal(&self, method: &Method) -> Option<Response<ResponseBody>> {
        if self.methods.contains(method) {
            return None;
        }
        let mut response = crate::error::error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            &format!("this node does not serve {method} requests"),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, self.allow.clone());
        Some(response)
    }
}

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

/// How the client broke its own request body. Any of these is the
/// client's doing, never the upstream's: it is answered 400/408/413 (or not
/// at all, when the client is gone) and never counts against an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ClientBodyError {
    #[error("request body exceeds {0} bytes")]
    TooLarge(u64),
    #[error("request body not received within {0:?}")]
    TimedOut(Duration),
    /// Bad framing, e.g. a malformed chunk size line.
    #[error("request body is malformed")]
    Malformed,
    /// The client stopped sending before the body ended (connection
    /// closed, stream reset).
    #[error("request body ended before it was complete")]
    Aborted,
}

impl ClientBodyError {
    /// The metrics label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            ClientBodyError::TooLarge(_) => "too_large",
            ClientBodyError::TimedOut(_) => "timeout",
            ClientBodyError::Malformed => "malformed",
            ClientBodyError::Aborted => "aborted",
        }
    }

    /// Malformed when hyper's decoder refused the framing; aborted
    /// otherwise (end of input, an h2 stream the client reset).
    fn of_read_error(error: &hyper::Error) -> Self {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(cause) = source {
            if let Some(io) = cause.downcast_ref::<std::io::Error>() {
                return match io.kind() {
                    std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData => {
                        ClientBodyError::Malformed
                    }
                    _ => ClientBodyError::Aborted,
                };
            }
            source = cause.source();
        }
        if error.is_parse() {
            ClientBodyError::Malformed
        } else {
            ClientBodyError::Aborted
        }
    }
}

/// A request body that fails once it passes `max_bytes` or takes longer than
/// `timeout` to arrive. Every failure, the client's own read errors
/// included, is also recorded in [`BodyLimitTrip`] so that whoever was
/// consuming the body (the proxy) can tell it from an upstream's failure
/// and answer 400 / 408 / 413 instead of a generic upstream error.
pub(crate) struct LimitedBody {
    inner: Incoming,
    received: u64,
    max_bytes: u64,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
    trip: BodyLimitTrip,
}

/// Shared record of how the client broke its request body, if it did.
#[derive(Clone, Default)]
pub(crate) struct BodyLimitTrip(Arc<OnceLock<ClientBodyError>>);

impl BodyLimitTrip {
    pub(crate) fn get(&self) -> Option<ClientBodyError> {
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

    fn fail(&self, error: ClientBodyError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
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
            return self.fail(ClientBodyError::TimedOut(timeout));
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.received += data.len() as u64;
                    if self.received > self.max_bytes {
                        let max = self.max_bytes;
                        return self.fail(ClientBodyError::TooLarge(max));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let _ = self.trip.0.set(ClientBodyError::of_read_error(&e));
                Poll::Ready(Some(Err(Box::new(e))))
            }
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
