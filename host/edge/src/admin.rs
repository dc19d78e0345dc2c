//! The admin listener: liveness, readiness and Prometheus metrics, open to
//! anyone who can reach it; and the mutating endpoints (plugin reload, TLS
//! certificate reload, cache purge), which require `Authorization: Bearer <[admin] token>`.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use breakwater_listen::ServeOptions;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::error_response;
use crate::node::EdgeNode;
use crate::plugins::reload::ReloadError;
use crate::tls::Certificates;

pub(crate) async fn serve(
    listener: TcpListener,
    builder: auto::Builder<TokioExecutor>,
    options: ServeOptions,
    node: Arc<EdgeNode>,
    certificates: Certificates,
    stop: CancellationToken,
) {
    // Every route here changes the node or shows what tenants did: each one
    // requires the token.
    let mutating = Router::new()
        .route("/admin/plugins/reload", post(reload_plugins))
        .route("/admin/tls/reload", post(reload_tls))
        .route("/admin/purge", post(purge))
        .route("/admin/usage", get(usage))
        .route_layer(middleware::from_fn_with_state(node.clone(), require_token));
    let router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(mutating)
        .layer(Extension(certificates))
        .with_state(node);
    breakwater_listen::serve(
        listener,
        builder,
        options,
        move |_peer| TowerToHyperService::new(router.clone()),
        stop,
    )
    .await;
}

/// Ready while accepting traffic; 503 once draining so load balancers move on.
async fn readyz(State(node): State<Arc<EdgeNode>>) -> impl IntoResponse {
    if node.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    }
}

async fn metrics() -> impl IntoResponse {
    metrics::counter!("breakwater_log_lines_dropped_total")
        .absolute(crate::observe::log_lines_dropped());
    let body = crate::observe::prometheus()
        .map(|h| h.render())
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

/// `GET /admin/usage?key=K` (or `?key_sha256=D`): the key's token totals
/// on routes with `count_tokens`, its tier as last seen; 404 for a key the
/// ledger does not hold.
async fn usage(State(node): State<Arc<EdgeNode>>, uri: http::Uri) -> Response {
    let Some(ledger) = node.usage() else {
        return error_response(
            StatusCode::NOT_FOUND,
            "no_usage",
            "no route on this node has `count_tokens = true`",
        );
    };
    // An API key, or its digest as the ledger keeps it (the first 32 hex
    // digits of its SHA-256), so an operator need not send the key itself.
    let mut named = uri.query().unwrap_or("").split('&').filter_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        let value = percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .ok()?
            .into_owned();
        match name {
            "key" => Some(crate::usage::digest_of(&value)),
            "key_sha256" => Some(value.to_ascii_lowercase()),
            _ => None,
        }
    });
    let digest = match (named.next(), named.next()) {
        (Some(digest), None) => digest,
        _ => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_usage_query",
                "name one key: `?key=<API key>` or `?key_sha256=<its digest>`",
            );
        }
    };
    match ledger.totals(&digest) {
        Some((tier, totals)) => axum::Json(serde_json::json!({
            "key_sha256": digest,
            "tier": tier,
            "prompt_tokens": totals.prompt_tokens,
            "completion_tokens": totals.completion_tokens,
            "cached_tokens": totals.cached_tokens,
        }))
        .into_response(),
        None => error_response(
            StatusCode::NOT_FOUND,
            "unknown_key",
            "this node has counted no tokens for that key (or has forgotten it)",
        ),
    }
}

/// Lets a request through only with the configured bearer token. With no
/// token configured the mutating endpoints are closed (403), never open.
async fn require_token(
    State(node): State<Arc<EdgeNode>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = node.admin_token() else {
        return error_response(
            StatusCode::FORBIDDEN,
            "admin_token_not_configured",
            "this endpoint needs an admin token: set `token_env = \"VAR\"` (the variable \
             holding the token) or `token = \"…\"` under [admin] and restart the node",
        );
    };
    match bearer_token(request.headers()) {
        Some(presented) if tokens_match(presented, expected) => next.run(request).await,
        _ => {
            let mut response = error_response(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send the admin token as `Authorization: Bearer <token>`",
            );
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}

/// The token of `Authorization: Bearer <token>`, if that is what the
/// request carries.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares digests of both tokens in constant time: the time taken says
/// nothing about how much of a guess was right, nor about the length.
fn tokens_match(presented: &str, expected: &str) -> bool {
    let presented = breakwater_sandbox::sha256_hex(presented.as_bytes());
    let expected = breakwater_sandbox::sha256_hex(expected.as_bytes());
    let difference = presented
        .bytes()
        .zip(expected.bytes())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    std::hint::black_box(difference) == 0
}

/// `POST /admin/plugins/reload`: 200 with the new generation and plugins,
/// or the reason the current plugins stay (422 for a bad configuration or
/// plugin, naming it).
async fn reload_plugins(State(node): State<Arc<EdgeNode>>) -> Response {
    match node.reload_plugins().await {
        Ok(report) => (StatusCode::OK, axum::Json(report)).into_response(),
        Err(error) => {
            let status = match &error {
                ReloadError::Config(_) | ReloadError::Plugin { .. } => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
                ReloadError::NoSource => StatusCode::CONFLICT,
                ReloadError::Sandbox(_) | ReloadError::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            let mut body = serde_json::json!({
                "error": {
                    "status": status.as_u16(),
                    "code": error.code(),
                    "message": error.to_string(),
                }
            });
            if let Some(plugin) = error.plugin() {
                body["error"]["plugin"] = plugin.into();
            }
            let mut response = Response::new(Body::from(body.to_string()));
            *response.status_mut() = status;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
    }
}

/// `POST /admin/tls/reload`: 200 `{"certificates": [{listener, cert,
/// sha256}…]}` once every TLS listener serves its files' new pair, or 422
/// naming the listener and the reason while every listener keeps its pair.
async fn reload_tls(Extension(certificates): Extension<Certificates>) -> Response {
    match certificates.reload().await {
        Ok(reloaded) => (
            StatusCode::OK,
            axum::Json(serde_json::json!({ "certificates": reloaded })),
        )
            .into_response(),
        Err(error) => {
            let body = serde_json::json!({
                "error": {
                    "status": 422,
                    "code": "tls_reload_failed",
                    "message": error.to_string(),
                    "listener": error.listener,
                }
            });
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                [(header::CONTENT_TYPE, "application/json")],
                body.to_string(),
            )
                .into_response()
        }
    }
}

/// `POST /admin/purge`: see [`crate::cache::purge_endpoint`].
async fn purge(State(node): State<Arc<EdgeNode>>, body: axum::body::Bytes) -> Response {
    crate::cache::purge_endpoint(node.cache(), &body).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(authorization: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(authorization).expect("valid header"),
        );
        headers
    }

    #[test]
    fn only_a_bearer_token_is_taken() {
        assert_eq!(bearer_token(&headers("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&headers("bearer  abc ")), Some("abc"));
        assert_eq!(bearer_token(&headers("Basic abc")), None);
        assert_eq!(bearer_token(&headers("Bearer")), None);
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }

    #[test]
    fn tokens_match_exactly() {
        assert!(tokens_match("secret", "secret"));
        assert!(!tokens_match("secre", "secret"));
        assert!(!tokens_match("secret!", "secret"));
        assert!(!tokens_match("", "secret"));
    }
}
