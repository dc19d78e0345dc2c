//! Errors: why a node could not start ([`EdgeError`]), and the answers to
//! requests it refuses: every refusal is an HTTP status with a JSON body that
//! says what happened and carries the request id.

use std::path::PathBuf;

use axum::body::Body;
use http::{HeaderValue, Response, StatusCode, header};

use crate::static_files::StaticSiteError;

/// A JSON error response: `{"error":{"status":…,"code":"…","message":"…"}}`.
///
/// `code` is a stable machine-readable name (`payload_too_large`,
/// `upstream_timeout`, …); `message` is for people.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let mut response = Response::new(Body::from(error_body(status, code, message)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The JSON body of [`error_response`].
pub(crate) fn error_body(status: StatusCode, code: &str, message: &str) -> String {
    serde_json::json!({
        "error": { "status": status.as_u16(), "code": code, "message": message }
    })
    .to_string()
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS files {cert} / {key}: {message}")]
    Tls {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    #[error("static site: {0}")]
    Site(#[from] StaticSiteError),
    #[error("plugin sandbox: {0}")]
    Sandbox(#[from] breakwater_sandbox::SandboxError),
    #[error("plugin: {0}")]
    Plugin(#[from] breakwater_sandbox::LoadError),
    #[error("response cache: {0}")]
    Cache(#[from] crate::cache::CacheError),
    #[error("cluster: {0}")]
    Cluster(#[from] breakwater_cluster::ClusterError),
}
