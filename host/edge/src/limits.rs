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

    /// Counts the error against `route` (a pool's or route's name) and
    /// answers it: 413, 408 or 400, with the JSON error body.
    pub(crate) fn response(self, route: &str) -> Response<ResponseBody> {
        metrics::counter!(
            "breakwater_edge_client_body_errors_total",
            "pool" => route.to_owned(),
            "kind" => self.label()
        )
        .increment(1);
        tracing::debug!(pool = %route, error = %self, "request body broken by the client");
        let (status, code, message) = match self {
            ClientBodyError::TooLarge(max) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the request body exceeds {max} bytes"),
            ),
            ClientBodyError::TimedOut(t) => (
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!("the request body was not received within {t:?}"),
            ),
            ClientBodyError::Malformed => (
                StatusCode::BAD_REQUEST,
                "bad_request_body",
                "the request body's framing is malformed".to_owned(),
            ),
            ClientBodyError::Aborted => (
                StatusCode::BAD_REQUEST,
                "incomplete_request_body",
                "the request body ended before it was complete".to_owned(),
            ),
        };
        crate::error::error_response(status, code, &message)
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

/// A request body on its way to the target: still the client's stream, or
/// already behind the node's size and time limits (because a phase read
/// some of it).
pub(crate) enum ClientBody {
    Streaming(Incoming),
    Limited(ResponseBody, BodyLimitTrip),
}

impl ClientBody {
    /// A body the node holds whole: nothing of it can break any more.
    pub(crate) fn whole(bytes: Bytes) -> Self {
        ClientBody::Limited(ResponseBody::from(bytes), BodyLimitTrip::default())
    }

    /// The body with the node's limits applied, and where a broken one is
    /// recorded.
    pub(crate) fn limited(
        self,
        max_bytes: u64,
        timeout: Duration,
    ) -> (ResponseBody, BodyLimitTrip) {
        match self {
            ClientBody::Streaming(body) => {
                let (limited, trip) = LimitedBody::new(body, max_bytes, timeout);
                (ResponseBody::new(limited), trip)
            }
            ClientBody::Limited(body, trip) => (body, trip),
        }
    }
}

/// What the request phase is shown of a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BufferedBody {
    /// The route buffers no body for its plugins.
    NotBuffered,
    /// The whole body (empty when the request has none).
    Whole(Bytes),
    /// The body is larger than the route buffers (`limit` bytes).
    TooLarge { limit: u64 },
}

/// The node-wide budget of body bytes held for plugins
/// (`[limits] plugin_body_budget`).
#[derive(Clone)]
pub(crate) struct BodyBudget(Arc<tokio::sync::Semaphore>);

/// A share of the [`BodyBudget`], given back when dropped.
pub(crate) type BudgetShare = Option<tokio::sync::OwnedSemaphorePermit>;

impl BodyBudget {
    pub(crate) fn new(bytes: u64) -> Self {
        let permits = usize::try_from(bytes)
            .unwrap_or(usize::MAX)
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        Self(Arc::new(tokio::sync::Semaphore::new(permits)))
    }

    /// `bytes` more for `held`, or false (counted) when the budget has no
    /// room for them.
    fn take(&self, held: &mut BudgetShare, bytes: u64) -> bool {
        let taken = u32::try_from(bytes)
            .ok()
            .and_then(|bytes| Arc::clone(&self.0).try_acquire_many_owned(bytes).ok());
        match (taken, held.as_mut()) {
            (Some(permit), Some(held)) => held.merge(permit),
            (Some(permit), None) => *held = Some(permit),
            (None, _) => {
                metrics::counter!("breakwater_plugin_body_over_budget_total").increment(1);
                return false;
            }
        }
        true
    }
}

/// Reads up to `buffer_limit` bytes of `body` for the plugins, within the
/// node's `max_bytes` and `timeout`, and within what `budget` has left. A
/// body that fits is returned whole and forwarded from memory, with the
/// share of the budget it holds (drop it once the plugins are done); a
/// larger one (declared, or found while reading), or one the budget has no
/// room for, streams on with what was read put back in front. A body the
/// client breaks while it is read is its error, answered by the caller.
pub(crate) async fn buffer_for_plugins(
    body: Incoming,
    declared_length: Option<u64>,
    buffer_limit: u64,
    budget: &BodyBudget,
    max_bytes: u64,
    timeout: Duration,
) -> Result<(BufferedBody, ClientBody, BudgetShare), ClientBodyError> {
    use futures_util::StreamExt;
    use http_body_util::BodyExt;

    if body.is_end_stream() {
        return Ok((
            BufferedBody::Whole(Bytes::new()),
            ClientBody::Streaming(body),
            None,
        ));
    }
    let too_large = BufferedBody::TooLarge {
        limit: buffer_limit,
    };
    let mut held = None;
    // A declared length is reserved whole, before a byte is read.
    if declared_length
        .is_some_and(|length| length > buffer_limit || !budget.take(&mut held, length))
    {
        return Ok((too_large, ClientBody::Streaming(body), None));
    }
    let reserved = declared_length.is_some();
    let (mut limited, trip) = LimitedBody::new(body, max_bytes, timeout);
    let mut chunks = Vec::new();
    let mut read = 0u64;
    loop {
        match limited.frame().await {
            None => break,
            Some(Err(_)) => return Err(trip.get().unwrap_or(ClientBodyError::Aborted)),
            // Trailers of a buffered body are not forwarded: nothing in
            // front of an inference API uses them.
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                read += data.len() as u64;
                let room = reserved || budget.take(&mut held, data.len() as u64);
                chunks.push(data);
                if read > buffer_limit || !room {
                    let read_so_far = futures_util::stream::iter(
                        chunks.into_iter().map(|chunk| Ok(Frame::data(chunk))),
                    );
                    let rest = http_body_util::BodyStream::new(limited);
                    let body = http_body_util::StreamBody::new(read_so_far.chain(rest));
                    return Ok((
                        too_large,
                        ClientBody::Limited(ResponseBody::new(body), trip),
                        None,
                    ));
                }
            }
        }
    }
    let whole = match chunks.len() {
        1 => chunks.pop().unwrap_or_default(),
        _ => {
            let mut all = bytes::BytesMut::with_capacity(usize::try_from(read).unwrap_or(0));
            for chunk in chunks {
                all.extend_from_slice(&chunk);
            }
            all.freeze()
        }
    };
    Ok((
        BufferedBody::Whole(whole.clone()),
        ClientBody::whole(whole),
        held,
    ))
}
