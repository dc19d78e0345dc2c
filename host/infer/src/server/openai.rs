//! OpenAI's wire format: request bodies as clients send them, responses and
//! stream chunks as clients (the official SDKs included) parse them.

use breakwater_wire::TOKEN_IDS_FIELD;
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::ApiError;
use crate::chat_template::Message;
use crate::sampling::SamplingParams;
use crate::scheduler::Finish;

/// OpenAI allows up to four stop sequences.
const MAX_STOP_SEQUENCES: usize = 4;
/// OpenAI's default `max_tokens` for legacy completions.
pub const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// `"stop": "\n"`
    One(String),
    /// `"stop": ["\n", "User:"]`
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a final chunk with `usage`.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// What both endpoints share. Fields clients send that this server does not
/// implement (penalties, logit bias, …) are ignored, as llama.cpp's server
/// does, so that stock clients work.
#[derive(Debug, Deserialize)]
pub struct Common {
    /// The model asked for.
    pub model: Option<String>,
    /// Stream the answer as server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Stream options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Tokens to generate at most.
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// The newer name for `max_tokens` (chat).
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    /// Sampling temperature, 0 to 2.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus mass, (0, 1].
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Top-k (an extension llama.cpp and vLLM accept too).
    #[serde(default)]
    pub top_k: Option<i64>,
    /// Seed for reproducible sampling.
    #[serde(default)]
    pub seed: Option<i64>,
    /// Stop sequences.
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Choices to generate; only 1 is served.
    #[serde(default)]
    pub n: Option<u64>,
    /// Generate through end-of-sequence tokens (an extension vLLM and
    /// llama.cpp's server accept, for benchmarks).
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// A continuation of an answer begun on another host
    /// ([`breakwater_wire::RESUME_FIELD`]; the literal is checked against
    /// it in a test).
    #[serde(default, rename = "breakwater_resume")]
    pub resume: Option<Resume>,
}

/// `breakwater_resume`: what the lost host had generated.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resume {
    /// Token ids, in order.
    pub tokens: Vec<u32>,
}

/// Validated generation parameters.
#[derive(Debug)]
pub struct Params {
    /// The model asked for.
    pub model: String,
    /// Whether to stream.
    pub stream: bool,
    /// Whether a streamed answer ends with a usage chunk.
    pub include_usage: bool,
    /// `max_tokens`, if given.
    pub max_tokens: Option<usize>,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// Ignore end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Tokens generated for this answer before (a continuation).
    pub resume: Vec<u32>,
    /// Report token ids in chunks and answers
    /// ([`breakwater_wire::TOKEN_IDS_HEADER`]).
    pub token_ids: bool,
}

impl Common {
    /// Checks every parameter's type and range.
    pub fn validate(self) -> Result<Params, ApiError> {
        let model = match self.model {
            Some(m) if !m.is_empty() => m,
            _ => {
                return Err(ApiError::invalid(
                    "you must provide a model parameter",
                    "model",
                ));
            }
        };
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid("only n = 1 is supported", "n"));
        }
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            Some(0) => {
                return Err(ApiError::invalid(
                    "max_tokens must be at least 1",
                    "max_tokens",
                ));
            }
            Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            None => None,
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                "temperature must be between 0 and 2",
                "temperature",
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                "top_p must be greater than 0 and at most 1",
                "top_p",
            ));
        }
        let top_k = match self.top_k {
            None => 0,
            Some(k) if k >= 0 => usize::try_from(k).unwrap_or(usize::MAX),
            Some(_) => return Err(ApiError::invalid("top_k must not be negative", "top_k")),
        };
        let stop = match self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        if stop.len() > MAX_STOP_SEQUENCES {
            return Err(ApiError::invalid(
                format!("at most {MAX_STOP_SEQUENCES} stop sequences are allowed"),
                "stop",
            ));
        }
        let stream = self.stream.unwrap_or(false);
        Ok(Params {
            model,
            stream,
            include_usage: stream
                && self
                    .stream_options
                    .and_then(|o| o.include_usage)
                    .unwrap_or(false),
            max_tokens,
            sampling: SamplingParams {
                temperature,
                top_p,
                top_k,
                // Negative seeds are valid in OpenAI's API; their bits seed
                // as well as any.
                seed: self.seed.map(|s| s as u64),
            },
            stop,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            resume: self.resume.map(|r| r.tokens).unwrap_or_default(),
            token_ids: false,
        })
    }
}

/// `messages[].content`: a string, or a list of parts of which the text
/// parts are used.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// `[{"type": "text", "text": "…"}, …]`
    Parts(Vec<Part>),
}

/// One content part.
#[derive(Debug, Deserialize)]
pub struct Part {
    /// `text`, `image_url`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a text part.
    #[serde(default)]
    pub text: Option<String>,
}

/// One chat message.
#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    /// `system`, `developer`, `user` or `assistant`.
    pub role: String,
    /// What it says.
    #[serde(default)]
    pub content: Option<Content>,
}

/// `POST /v1/chat/completions`
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Everything else.
    #[serde(flatten)]
    pub common: Common,
}

impl ChatRequest {
    /// The messages as the chat template takes them.
    pub fn messages(&self) -> Result<Vec<Message>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid(
                "messages must contain at least one message",
                "messages",
            ));
        }
        self.messages
            .iter()
            .map(|m| {
                let role = match m.role.as_str() {
                    // OpenAI's newer name for the system role.
                    "system" | "developer" => "system",
                    "user" => "user",
                    "assistant" => "assistant",
                    other => {
                        return Err(ApiError::invalid(
                            format!(
                                "unsupported role {other:?}: use system, developer, user or assistant"
                            ),
                            "messages",
                        ));
                    }
                };
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut text = String::new();
                        for p in parts {
                            match (p.kind.as_str(), &p.text) {
                                ("text", Some(t)) => text.push_str(t),
                                _ => {
                                    return Err(ApiError::invalid(
                                        format!("content parts of type {:?} are not supported", p.kind),
                                        "messages",
                                    ));
                                }
                            }
                        }
                        text
                    }
                };
                Ok(Message::new(role, content))
            })
            .collect()
    }
}

/// `prompt`: a string, or a list holding one.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// `"prompt": "…"`
    One(String),
    /// `"prompt": ["…"]`
    Many(Vec<String>),
}

/// `POST /v1/completions`
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// The text to continue.
    pub prompt: Prompt,
    /// Everything else.
    #[serde(flatten)]
    pub common: Common,
}

impl CompletionRequest {
    /// The one prompt.
    pub fn prompt(&self) -> Result<&str, ApiError> {
        match &self.prompt {
            Prompt::One(p) => Ok(p),
            Prompt::Many(v) if v.len() == 1 => Ok(&v[0]),
            Prompt::Many(_) => Err(ApiError::invalid(
                "exactly one prompt is supported",
                "prompt",
            )),
        }
    }
}

/// Which endpoint a response is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/chat/completions`
    Chat,
    /// `/v1/completions`
    Completion,
}

impl Kind {
    /// `gen_ai.operation.name` in OpenTelemetry's GenAI conventions.
    pub fn operation(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Completion => "text_completion",
        }
    }
}

/// What every response of one request repeats.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// `chatcmpl-…` or `cmpl-…`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The model name.
    pub model: String,
    /// The endpoint.
    pub kind: Kind,
}

fn usage(f: &Finish) -> Value {
    json!({
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": f.cached_tokens},
    })
}

impl Envelope {
    /// The whole answer, for a non-streamed request; `tokens`, when given,
    /// are the ids of the tokens `text` was decoded from.
    pub fn response(&self, text: String, finish: &Finish, tokens: Option<&[u32]>) -> Value {
        let reason = finish.reason.as_str();
        let (object, choice) = match self.kind {
            Kind::Chat => (
                "chat.completion",
                json!({
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": null,
                    "finish_reason": reason,
                }),
            ),
            Kind::Completion => (
                "text_completion",
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": reason}),
            ),
        };
        let mut answer = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [choice],
            "usage": usage(finish),
        });
        if let Some(tokens) = tokens {
            answer[TOKEN_IDS_FIELD] = json!(tokens);
        }
        answer
    }

    /// A stream chunk: the assistant role first (`role`), text deltas, or
    /// the finish reason with an empty delta; `tokens`, when given, are the
    /// ids the delta accounts for.
    pub fn chunk(
        &self,
        role: bool,
        text: Option<&str>,
        finish: Option<&str>,
        tokens: Option<&[u32]>,
    ) -> Value {
        let (object, choice) = match self.kind {
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), "assistant".into());
                    delta.insert("content".into(), "".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                (
                    "chat.completion.chunk",
                    json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}),
                )
            }
            Kind::Completion => (
                "text_completion",
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish}),
            ),
        };
        let mut chunk = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [choice],
        });
        if let Some(tokens) = tokens {
            chunk[TOKEN_IDS_FIELD] = json!(tokens);
        }
        chunk
    }

    /// The closing chunk of `stream_options.include_usage`: no choices.
    pub fn usage_chunk(&self, finish: &Finish) -> Value {
        json!({
            "id": self.id,
            "object": match self.kind {
                Kind::Chat => "chat.completion.chunk",
                Kind::Completion => "text_completion",
            },
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [],
            "usage": usage(finish),
        })
    }
}
