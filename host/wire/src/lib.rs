//! The contract between an edge node and the GPU hosts behind it, as far as
//! HTTP headers carry it. Both sides name these constants, so neither can
//! drift from the other.

/// Sent upstream by the edge: the request's deadline as a Unix time in
/// milliseconds. The GPU host refuses work it could not finish by then and
/// cancels a generation that runs past it.
pub const DEADLINE_HEADER: &str = "x-request-deadline";

/// Sent by the GPU host on every answer of its model and on its readiness
/// check: the stored version it serves (absent for a model loaded from a
/// plain file). The edge learns from it which versions a pool serves, and a
/// cached answer made by a version no endpoint serves any more is never
/// fresh.
pub const MODEL_VERSION_HEADER: &str = "x-model-version";

/// A request's id, from the client (when sane) or made by the edge; sent
/// upstream and echoed on the answer, so that an edge's log line and a GPU
/// host's name the same request.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Sent upstream by the edge on every attempt after the first (`2`, `3`,
/// …): the GPU host can tell a retry from a first try.
pub const ATTEMPT_HEADER: &str = "x-breakwater-attempt";

/// Sent upstream by the edge (value `1`) when it may need to resume the
/// answer on another GPU host: every streamed chunk then carries the ids
/// of the tokens it accounts for in [`TOKEN_IDS_FIELD`] (a chunk with
/// empty text when a token completes no text yet), and a whole answer
/// carries all of them. The edge strips both before a client sees them.
pub const TOKEN_IDS_HEADER: &str = "x-breakwater-token-ids";

/// The JSON field of a chunk or answer that holds token ids (see
/// [`TOKEN_IDS_HEADER`]).
pub const TOKEN_IDS_FIELD: &str = "breakwater_token_ids";

/// The JSON field of a completion request, beside OpenAI's own, that makes
/// it a continuation: `{"tokens": [ids]}`, the tokens already generated
/// for this answer by a GPU host that was lost. The host feeds them after
/// the prompt, replays their text and their draws from a seeded sampler
/// (exactly one draw per token), and goes on; `max_tokens` still counts
/// the whole answer, and so does `usage`. Control tokens are refused (only
/// a template writes those), so a client sending it itself gets no more
/// than an assistant prefill.
pub const RESUME_FIELD: &str = "breakwater_resume";

/// The JSON field of a GPU host's last event on a stream it hands over
/// (`{"breakwater_handoff": {"reason": "drain"}}`): the host is draining
/// (shutting down, or its model version was swapped out) and ends the
/// answer there rather than make the drain wait for it. Only streams that
/// asked for [`TOKEN_IDS_HEADER`] are handed over; the edge continues them
/// on another host and counts nothing against this one.
pub const HANDOFF_FIELD: &str = "breakwater_handoff";

pub mod trace;
