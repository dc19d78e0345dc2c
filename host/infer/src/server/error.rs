//! Errors in OpenAI's JSON shape:
//! `{"error": {"message", "type", "param", "code"}}`.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::telemetry::Rejection;

/// An error response.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// For people.
    pub message: String,
    /// OpenAI's `type`.
    pub kind: &'static str,
    /// The offending parameter, if one.
    pub param: Option<&'static str>,
    /// A machine-readable code.
    pub code: Option<&'static str>,
    /// Seconds for `Retry-After`.
    pub retry_after: Option<Duration>,
    /// How the rejection is counted in metrics.
    pub rejection: Option<Rejection>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
            rejection: None,
        }
    }

    /// 400 for a parameter.
    pub fn invalid(message: impl Into<String>, param: &'static str) -> Self {
        Self {
            param: Some(param),
            ..Self::bad_request(message)
        }
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            rejection: Some(Rejection::BadRequest),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    /// 404 for a model this server does not serve.
    pub fn unknown_model(model: &str) -> Self {
        Self {
            param: Some("model"),
            code: Some("model_not_found"),
            rejection: Some(Rejection::UnknownModel),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("the model `{model}` does not exist"),
            )
        }
    }

    /// 404 for a path.
    pub fn no_route(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("unknown path {path}"),
        )
    }

    /// 405.
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method not allowed on this path",
        )
    }

    /// 413 for a prompt longer than the context.
    pub fn context_length(message: impl Into<String>) -> Self {
        Self {
            param: Some("messages"),
            code: Some("context_length_exceeded"),
            rejection: Some(Rejection::PromptTooLong),
            ..Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                message,
            )
        }
    }

    /// 413 for a prompt with more bytes than the context could hold,
    /// refused before it is tokenized.
    pub fn prompt_too_large(bytes: usize, limit: usize, context_tokens: usize) -> Self {
        Self {
            rejection: Some(Rejection::PromptTooLarge),
            ..Self::context_length(format!(
                "the prompt is {bytes} bytes; this model's context of {context_tokens} tokens \
                 holds at most {limit} bytes of prompt"
            ))
        }
    }

    /// 413 for a body over the size limit.
    pub fn body_too_large(limit: usize) -> Self {
        Self {
            code: Some("request_too_large"),
            rejection: Some(Rejection::BadRequest),
            ..Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("the request body exceeds {limit} bytes"),
            )
        }
    }

    /// 503 with Retry-After: the queue is full.
    pub fn overloaded(retry_after: Duration) -> Self {
        Self {
            code: Some("server_overloaded"),
            retry_after: Some(retry_after),
            rejection: Some(Rejection::QueueFull),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the server is at capacity; retry later",
            )
        }
    }

    /// 503: the model is loading or the engine stopping.
    pub fn not_ready(message: impl Into<String>) -> Self {
        Self {
            code: Some("model_not_ready"),
            retry_after: Some(Duration::from_secs(1)),
            rejection: Some(Rejection::NotReady),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
        }
    }

    /// 504: the request's deadline passed.
    pub fn deadline() -> Self {
        Self {
            code: Some("deadline_exceeded"),
            rejection: Some(Rejection::Deadline),
            ..Self::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout_error",
                "the request's deadline passed before it was served",
            )
        }
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(after) = self.retry_after {
            let seconds = after.as_secs().max(1);
            if let Ok(v) = HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}
