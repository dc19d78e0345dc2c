//! hyper answers an HTTP/1.1 request head it cannot parse by itself,
//! before any service sees a request: 400 (bad request line or header),
//! 414 (request target too long) or 431 (head over its buffer), each with
//! an empty body, then closes. It offers no hook to shape that answer.
//!
//! On a connection whose service was never called, the first bytes hyper
//! writes can only be that answer (a `100 Continue` or a response needs a
//! request handed to the service first; h2 starts with a SETTINGS frame).
//! There this wrapper writes the caller's body in its place. A head that
//! fails later on a keep-alive connection keeps hyper's empty body:
//! telling hyper's answer from a proxied response there would take
//! parsing the response stream.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::StatusCode;

use crate::activity::Activity;

/// The body (JSON) of the answer to a request head hyper could not parse,
/// by status (400, 414 or 431).
pub type ParseErrorBody = Arc<dyn Fn(StatusCode) -> String + Send + Sync>;

pub(crate) struct ParseErrorRewrite<I> {
    inner: I,
    activity: Activity,
    body: Option<ParseErrorBody>,
    listener: String,
    state: State,
}

enum State {
    /// Nothing written yet.
    Watching,
    /// Writing our answer instead of hyper's; `written` bytes are out.
    Replacing {
        answer: Vec<u8>,
        written: usize,
    },
    Passing,
}

impl<I> ParseErrorRewrite<I> {
    pub(crate) fn new(
        inner: I,
        activity: Activity,
        body: Option<ParseErrorBody>,
        listener: &str,
    ) -> Self {
        Self {
            inner,
            activity,
            body,
            listener: listener.to_owned(),
            state: State::Watching,
        }
    }

    /// Decides, on the first bytes written, whether they are hyper's own
    /// answer to an unparsable head.
    fn watch(&mut self, first: &[u8]) {
        if !matches!(self.state, State::Watching) || first.is_empty() {
            return;
        }
        self.state = State::Passing;
        if self.activity.begun() {
            return;
        }
        let Some(status) = hyper_error_status(first) else {
            return;
        };
        metrics::counter!(
            "breakwater_listener_unparsable_requests_total",
            "listener" => self.listener.clone(),
            "status" => status.as_str().to_owned()
        )
        .increment(1);
        if let Some(body) = &self.body {
            self.state = State::Replacing {
                answer: answer(status, &body(status)),
                written: 0,
            };
        }
    }
}

/// The status of hyper's automatic answer, if `bytes` start one.
fn hyper_error_status(bytes: &[u8]) -> Option<StatusCode> {
    let code = bytes.strip_prefix(b"HTTP/1.1 ")?.get(..3)?;
    match code {
        b"400" => Some(StatusCode::BAD_REQUEST),
        b"414" => Some(StatusCode::URI_TOO_LONG),
        b"431" => Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        _ => None,
    }
}

fn answer(status: StatusCode, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncache-control: no-store\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes()
}

impl<I: hyper::rt::Write + Unpin> ParseErrorRewrite<I> {
    /// Writes the rest of our answer; hyper's `claimed` bytes count as
    /// written, and are never sent.
    fn poll_replace(&mut self, cx: &mut Context<'_>, claimed: usize) -> Poll<io::Result<usize>> {
        let State::Replacing { answer, written } = &mut self.state else {
            return Poll::Ready(Ok(claimed));
        };
        while *written < answer.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &answer[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(claimed))
    }
}

impl<I: hyper::rt::Read + Unpin> hyper::rt::Read for ParseErrorRewrite<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<I: hyper::rt::Write + Unpin> hyper::rt::Write for ParseErrorRewrite<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.watch(buf);
        match this.state {
            State::Replacing { .. } => this.poll_replace(cx, buf.len()),
            _ => Pin::new(&mut this.inner).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(first) = bufs.iter().find(|buf| !buf.is_empty()) {
            this.watch(first);
        }
        match this.state {
            State::Replacing { .. } => {
                this.poll_replace(cx, bufs.iter().map(|buf| buf.len()).sum())
            }
            _ => Pin::new(&mut this.inner).poll_write_vectored(cx, bufs),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hyper_error_heads_are_recognised() {
        assert_eq!(
            hyper_error_status(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"),
            Some(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            hyper_error_status(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
        assert_eq!(hyper_error_status(b"HTTP/1.1 200 OK\r\n"), None);
        assert_eq!(hyper_error_status(b"\x00\x00\x12\x04"), None);
    }

    #[test]
    fn the_answer_is_framed_by_its_length() {
        let answer = String::from_utf8(answer(StatusCode::BAD_REQUEST, "{}")).expect("text");
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{answer}"
        );
        assert!(
            answer.ends_with("content-length: 2\r\nconnection: close\r\n\r\n{}"),
            "{answer}"
        );
    }
}
