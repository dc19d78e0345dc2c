//! Request coalescing. The first miss for a key leads: it goes upstream
//! and records the answer as it streams through. Misses that arrive
//! meanwhile follow: they wait (bounded) for the head, then read the same
//! recording, live, from its first byte. The recording is also what gets
//! stored once it is complete, so an event stream is recorded for later
//! hits and shared with clients that join while it runs.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::sync::watch;

use super::entry::Entry;

/// The response head a recording shares with its followers.
#[derive(Debug)]
pub(crate) struct SharedHead {
    /// The answer as it will be stored, body aside: followers judge its
    /// freshness for their own request as they would a stored hit's.
    pub stored: Entry,
    pub vary_names: Vec<String>,
    /// The leader's secondary key: followers with other `Vary` values
    /// cannot use this answer.
    pub vary: String,
}

enum HeadState {
    Pending,
    Ready(Arc<SharedHead>),
    /// The answer is not shareable: followers fend for themselves.
    Pass,
}

struct RecState {
    head: HeadState,
    chunks: Vec<Bytes>,
    bytes: usize,
    /// `Some(true)`: complete; `Some(false)`: broken off.
    end: Option<bool>,
    /// Set when the answer is a completion: whether it is an event stream.
    completion: Option<bool>,
    /// Followers of a completion not yet counted as spared a generation.
    uncounted_followers: u64,
}

/// One answer being recorded.
pub(crate) struct Recording {
    state: Mutex<RecState>,
    changed: watch::Sender<u64>,
    limit: usize,
    /// A completion's token counts, read once from the complete recording.
    tokens: OnceLock<(u64, u64)>,
}

/// What a follower got after waiting.
pub(crate) enum Waited {
    Ready(Arc<SharedHead>),
    Pass,
    TimedOut,
}

#[derive(Debug, thiserror::Error)]
#[error("the shared upstream answer broke off")]
pub(crate) struct BrokenOff;

impl Recording {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            state: Mutex::new(RecState {
                head: HeadState::Pending,
                chunks: Vec::new(),
                bytes: 0,
                end: None,
                completion: None,
                uncounted_followers: 0,
            }),
            changed: watch::channel(0).0,
            limit,
            tokens: OnceLock::new(),
        }
    }

    /// The (prompt, completion) tokens of the complete recorded answer, a
    /// completion (`event_stream` or whole): read from it once, for the
    /// store and every waiter that followed it. (0, 0) until complete.
    pub(crate) fn completion_tokens(&self, event_stream: bool) -> (u64, u64) {
        if let Some(tokens) = self.tokens.get() {
            return *tokens;
        }
        match self.chunks() {
            Some(chunks) => *self
                .tokens
                .get_or_init(|| crate::usage::completion_tokens(&chunks, event_stream)),
            None => (0, 0),
        }
    }

    fn state(&self) -> MutexGuard<'_, RecState> {
        // A panic while holding the lock leaves plain data behind: go on.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// `completion`: the answer is a completion (`Some(event_stream)`),
    /// whose followers are counted in `breakwater_cache_tokens_saved_total`.
    pub(crate) fn publish_head(&self, head: Arc<SharedHead>, completion: Option<bool>) {
        {
            let mut state = self.state();
            state.head = HeadState::Ready(head);
            state.completion = completion;
        }
        self.notify();
    }

    /// No shareable answer (before the head), or broken off (after it).
    pub(crate) fn pass(&self) {
        {
            let mut state = self.state();
            match state.head {
                HeadState::Pending => state.head = HeadState::Pass,
                HeadState::Ready(_) if state.end.is_none() => state.end = Some(false),
                _ => {}
            }
        }
        self.notify();
    }

    /// Appends a chunk; `false` once the recording is over its limit (it
    /// is then broken off: followers end with an error, nothing is stored).
    fn push(&self, chunk: Bytes) -> bool {
        let ok = {
            let mut state = self.state();
            if state.end.is_some() {
                return false;
            }
            state.bytes += chunk.len();
            if state.bytes > self.limit {
                state.chunks.clear();
                state.end = Some(false);
                false
            } else {
                state.chunks.push(chunk);
                true
            }
        };
        self.notify();
        ok
    }

    fn finish(&self, complete: bool) {
        let spared = {
            let mut state = self.state();
            if state.end.is_none() {
                state.end = Some(complete);
            }
            let followers = std::mem::take(&mut state.uncounted_followers);
            (state.end == Some(true))
                .then_some(
                    state
                        .completion
                        .map(|event_stream| (event_stream, followers)),
                )
                .flatten()
        };
        self.notify();
        // Every follower so far was spared a generation of its own.
        if let Some((event_stream, followers)) = spared {
            crate::usage::count_saved(self.completion_tokens(event_stream), followers);
        }
    }

    /// The recorded chunks, once complete.
    pub(crate) fn chunks(&self) -> Option<Vec<Bytes>> {
        let state = self.state();
        (state.end == Some(true)).then(|| state.chunks.clone())
    }

    /// Waits up to `limit` for the head.
    pub(crate) async fn wait_head(&self, limit: Duration) -> Waited {
        let _waiting = Waiting::enter();
        let mut rx = self.changed.subscribe();
        let waited = tokio::time::timeout(limit, async {
            loop {
                {
                    let state = self.state();
                    match &state.head {
                        HeadState::Ready(_) if state.end == Some(false) => return Waited::Pass,
                        HeadState::Ready(head) => return Waited::Ready(head.clone()),
                        HeadState::Pass => return Waited::Pass,
                        HeadState::Pending => {}
                    }
                }
                if rx.changed().await.is_err() {
                    return Waited::Pass;
                }
            }
        })
        .await;
        waited.unwrap_or(Waited::TimedOut)
    }

    /// A body that replays the recording from its first byte and then
    /// follows it live, one frame per recorded chunk.
    pub(crate) fn reader(self: &Arc<Self>) -> Body {
        // A completion's follower is counted as spared a generation when
        // the recording completes, or now if it already has.
        let spared_now = {
            let mut state = self.state();
            match (state.completion, state.end) {
                (Some(event_stream), Some(true)) => Some(event_stream),
                (Some(_), None) => {
                    state.uncounted_followers += 1;
                    None
                }
                _ => None,
            }
        };
        if let Some(event_stream) = spared_now {
            crate::usage::count_saved(self.completion_tokens(event_stream), 1);
        }
        let rx = self.changed.subscribe();
        let stream = futures_util::stream::unfold(
            (self.clone(), rx, 0usize),
            |(rec, mut rx, next)| async move {
                loop {
                    {
                        let state = rec.state();
                        if let Some(chunk) = state.chunks.get(next) {
                            let chunk = chunk.clone();
                            drop(state);
                            return Some((Ok(chunk), (rec, rx, next + 1)));
                        }
                        match state.end {
                            Some(true) => return None,
                            Some(false) => {
                                drop(state);
                                return Some((Err(BrokenOff), (rec, rx, usize::MAX)));
                            }
                            None => {}
                        }
                    }
                    if next == usize::MAX || rx.changed().await.is_err() {
                        return None;
                    }
                }
            },
        );
        Body::from_stream(stream)
    }
}

/// Counts a follower in `breakwater_cache_coalesced_waiting` while it
/// waits for a head, however the wait ends (the client may go away).
struct Waiting;

impl Waiting {
    const GAUGE: &str = "breakwater_cache_coalesced_waiting";

    fn enter() -> Self {
        metrics::gauge!(Self::GAUGE).increment(1.0);
        Self
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        metrics::gauge!(Self::GAUGE).decrement(1.0);
    }
}

/// Leaders by primary key.
#[derive(Default)]
pub(crate) struct Flights {
    map: Mutex<HashMap<String, Arc<Recording>>>,
}

pub(crate) enum Role {
    Leader(LeaderGuard),
    Follower(Arc<Recording>),
}

impl Flights {
    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<Recording>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn join(self: &Arc<Self>, key: &str, limit: usize) -> Role {
        let mut map = self.map();
        if let Some(rec) = map.get(key) {
            return Role::Follower(rec.clone());
        }
        let rec = Arc::new(Recording::new(limit));
        map.insert(key.to_owned(), rec.clone());
        Role::Leader(LeaderGuard {
            flights: self.clone(),
            key: key.to_owned(),
            rec,
            armed: true,
        })
    }

    /// Leads only when nobody does: one background refresh per key.
    pub(crate) fn try_lead(self: &Arc<Self>, key: &str, limit: usize) -> Option<LeaderGuard> {
        match self.join(key, limit) {
            Role::Leader(guard) => Some(guard),
            Role::Follower(_) => None,
        }
    }

    pub(crate) fn remove(&self, key: &str, rec: &Arc<Recording>) {
        let mut map = self.map();
        if map.get(key).is_some_and(|r| Arc::ptr_eq(r, rec)) {
            map.remove(key);
        }
    }
}

/// A leader's duty to end its flight: dropped without handing it on (the
/// leading request was cancelled, or its answer is not shareable), it
/// releases the followers.
pub(crate) struct LeaderGuard {
    flights: Arc<Flights>,
    key: String,
    rec: Arc<Recording>,
    armed: bool,
}

impl LeaderGuard {
    pub(crate) fn recording(&self) -> &Arc<Recording> {
        &self.rec
    }

    /// The flight ends later, by [`Tee`]'s callback.
    pub(crate) fn hand_on(mut self) -> (Arc<Flights>, String, Arc<Recording>) {
        self.armed = false;
        (self.flights.clone(), self.key.clone(), self.rec.clone())
    }
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        if self.armed {
            self.rec.pass();
            self.flights.remove(&self.key, &self.rec);
        }
    }
}

/// Called once when the upstream body ends: `true` when it is complete.
pub(crate) type OnEnd = Box<dyn FnOnce(bool) + Send>;

/// After the client that led went away, the rest of the answer is still
/// read for the followers and the store, for at most this long.
const DRAIN_LIMIT: Duration = Duration::from_secs(300);

/// The leader's body: passes the upstream body through and records it.
pub(crate) struct Tee {
    inner: Option<Body>,
    rec: Arc<Recording>,
    recording: bool,
    on_end: Option<OnEnd>,
    draining: bool,
}

impl Tee {
    pub(crate) fn new(inner: Body, rec: Arc<Recording>, on_end: OnEnd) -> Self {
        Self {
            inner: Some(inner),
            rec,
            recording: true,
            on_end: Some(on_end),
            draining: false,
        }
    }

    fn end(&mut self, complete: bool) {
        let complete = complete && self.recording;
        self.rec.finish(complete);
        if let Some(on_end) = self.on_end.take() {
            on_end(complete);
        }
    }
}

impl http_body::Body for Tee {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && self.recording
                    && !self.rec.push(data.clone())
                {
                    // Too big to keep: the client still gets all of it.
                    self.recording = false;
                    self.end(false);
                }
            }
            Poll::Ready(Some(Err(_))) => self.end(false),
            Poll::Ready(None) => self.end(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner
            .as_ref()
            .is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner
            .as_ref()
            .map_or_else(http_body::SizeHint::default, http_body::Body::size_hint)
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        if self.on_end.is_none() {
            return;
        }
        let handle = tokio::runtime::Handle::try_current();
        match (self.draining, self.inner.take(), handle) {
            (false, Some(inner), Ok(handle)) if self.recording => {
                let mut rest = Tee {
                    inner: Some(inner),
                    rec: self.rec.clone(),
                    recording: true,
                    on_end: self.on_end.take(),
                    draining: true,
                };
                handle.spawn(async move {
                    let drained = tokio::time::timeout(DRAIN_LIMIT, async {
                        while let Some(frame) = rest.frame().await {
                            if frame.is_err() {
                                break;
                            }
                        }
                    })
                    .await;
                    if drained.is_err() {
                        rest.end(false);
                    }
                });
            }
            _ => self.end(false),
        }
    }
}
