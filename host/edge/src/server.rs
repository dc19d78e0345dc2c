//! Listeners: the node's data-plane and admin sockets, served through
//! `breakwater-listen` (connection limits, header-read and idle timeouts,
//! graceful drain) with TLS by ALPN from [`crate::tls`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use breakwater_listen::{ConnectionLimits, ServeOptions};
use edge_config::{EdgeConfig, LimitsConfig};
use hyper::body::Incoming;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admin;
use crate::error::EdgeError;
use crate::node::EdgeNode;
use crate::plugins::reload::{ConfigSource, ReloadError, ReloadReport};
use crate::proxy::ClientConnection;
use crate::tls::{Certificates, ReloadedCertificate, TlsReloadError};

/// A started node. Dropping it does not stop it; call [`RunningNode::shutdown`].
pub struct RunningNode {
    listener_addrs: Vec<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    node: Arc<EdgeNode>,
    stop: CancellationToken,
    tasks: JoinSet<()>,
    stop_admin: CancellationToken,
    admin_task: Option<tokio::task::JoinHandle<()>>,
    certificates: Certificates,
}

impl RunningNode {
    /// Bound data-plane addresses, in configuration order (port 0 resolved).
    pub fn listener_addrs(&self) -> &[SocketAddr] {
        &self.listener_addrs
    }

    /// Bound admin address, if an admin listener is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Re-reads the configuration from the node's [`ConfigSource`] and
    /// swaps in its plugins and chains. On any failure the current plugins
    /// keep serving; changes outside the plugins wait for a restart and are
    /// named in [`ReloadReport::not_applied`].
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        self.node.reload_plugins().await
    }

    /// Reads every TLS listener's certificate and key files again and, only
    /// if every pair loads and matches, serves new connections with them.
    /// On failure the current certificates stay and the error says why.
    pub async fn reload_tls(&self) -> Result<Vec<ReloadedCertificate>, TlsReloadError> {
        self.certificates.reload().await
    }

    /// Stops accepting, lets in-flight requests finish up to the configured
    /// `shutdown_grace`, then closes what is left.
    pub async fn shutdown(mut self) {
        self.node.start_draining();
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        // The admin listener outlives the drain so `/readyz` can say "draining".
        self.stop_admin.cancel();
        if let Some(admin) = self.admin_task.take() {
            let _ = admin.await;
        }
    }
}

/// Binds every listener of `config` and starts serving. The node cannot
/// reload its plugins: see [`start_with_source`].
pub async fn start(config: EdgeConfig) -> Result<RunningNode, EdgeError> {
    start_node(config, None).await
}

/// [`start`], for a `config` read from `source`: a plugin reload
/// ([`RunningNode::reload`], the admin API) reads it from there again.
pub async fn start_with_source(
    config: EdgeConfig,
    source: ConfigSource,
) -> Result<RunningNode, EdgeError> {
    start_node(config, Some(source)).await
}

async fn start_node(
    config: EdgeConfig,
    source: Option<ConfigSource>,
) -> Result<RunningNode, EdgeError> {
    crate::observe::prometheus();
    // Plugins given by URL are fetched (or found in the cache) before the
    // node builds its plugins, which it does synchronously.
    let mut config = config;
    crate::plugins::source::resolve(&mut config)
        .await
        .map_err(|(_, error)| error)?;
    let node = Arc::new(EdgeNode::new(&config, source)?);
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let mut listener_addrs = Vec::new();
    let grace = config.limits.shutdown_grace;

    let limits = connection_limits(&config.limits);
    let certificates = Certificates::default();
    for listener_config in &config.listeners {
        let tls = listener_config
            .tls
            .as_ref()
            .map(|files| certificates.add(&listener_config.address, files))
            .transpose()
            .map_err(|e| EdgeError::Tls {
                cert: e.cert,
                key: e.key,
                message: e.message,
            })?;
        let listener = bind(&listener_config.address).await?;
        let local = listener.local_addr().map_err(|source| EdgeError::Bind {
            address: listener_config.address.clone(),
            source,
        })?;
        listener_addrs.push(local);
        tracing::info!(address = %local, tls = tls.is_some(), "listening");
        let is_tls = tls.is_some();
        let options = ServeOptions {
            name: local.to_string(),
            limits: limits.clone(),
            tls,
            grace,
            parse_error_body: Some(Arc::new(parse_error_body)),
        };
        let make_service = {
            let node = node.clone();
            move |peer| data_plane_service(node.clone(), peer, is_tls)
        };
        tasks.spawn(breakwater_listen::serve(
            listener,
            connection_builder(&config.limits),
            options,
            make_service,
            stop.clone(),
        ));
    }

    let stop_admin = CancellationToken::new();
    let mut admin_addr = None;
    let mut admin_task = None;
    if let Some(admin_config) = &config.admin {
        let listener = bind(&admin_config.address).await?;
        admin_addr = listener.local_addr().ok();
        tracing::info!(address = ?admin_addr, "admin listening");
        let options = ServeOptions {
            name: "admin".to_owned(),
            limits: limits.clone(),
            tls: None,
            grace,
            parse_error_body: Some(Arc::new(parse_error_body)),
        };
        admin_task = Some(tokio::spawn(admin::serve(
            listener,
            connection_builder(&config.limits),
            options,
            node.clone(),
            certificates.clone(),
            stop_admin.clone(),
        )));
    }

    Ok(RunningNode {
        listener_addrs,
        admin_addr,
        node,
        stop,
        tasks,
        stop_admin,
        admin_task,
        certificates,
    })
}

async fn bind(address: &str) -> Result<TcpListener, EdgeError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| EdgeError::Bind {
            address: address.to_owned(),
            source,
        })
}

/// The bounds of every connection of the node's listeners, from `[limits]`.
fn connection_limits(limits: &LimitsConfig) -> ConnectionLimits {
    ConnectionLimits {
        header_read_timeout: limits.header_read_timeout,
        idle_timeout: limits.idle_timeout,
        max_connections: limits.max_connections,
        max_connections_per_ip: limits.max_connections_per_ip,
    }
}

fn connection_builder(limits: &LimitsConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = breakwater_listen::http_builder();
    // hyper's own ceiling sits just above ours so that our check answers
    // with a JSON 431 in all but absurd cases; hyper's minimum is 8 KiB.
    builder
        .http1()
        .max_buf_size((limits.max_header_bytes + 1024).max(8192));
    builder
        .http2()
        .max_header_list_size(u32::try_from(limits.max_header_bytes * 2).unwrap_or(u32::MAX))
        .keep_alive_interval(Duration::from_secs(30));
    builder
}

/// The JSON error body of the answer to a request head hyper could not
/// parse (see `breakwater_listen::ParseErrorBody`).
fn parse_error_body(status: http::StatusCode) -> String {
    let (code, message) = match status {
        http::StatusCode::URI_TOO_LONG => ("uri_too_long", "the request target is too long"),
        http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => (
            "headers_too_large",
            "the request line and headers are larger than the node reads",
        ),
        _ => (
            "bad_request",
            "the request line or a header is not valid HTTP/1.1",
        ),
    };
    crate::error::error_body(status, code, message)
}

/// The service of one data-plane connection from `peer`.
fn data_plane_service(
    node: Arc<EdgeNode>,
    peer: SocketAddr,
    tls: bool,
) -> impl hyper::service::Service<
    hyper::Request<Incoming>,
    Response = hyper::Response<axum::body::Body>,
    Error = Infallible,
    Future = impl Send,
> + Send
+ Sync
+ 'static {
    let client = Arc::new(ClientConnection { peer, tls });
    hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let node = node.clone();
        let client = client.clone();
        async move { Ok::<_, Infallible>(node.handle(request, client).await) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GPU host serves within `ConnectionLimits::default()`: the same
    /// bounds as an edge with the default `[limits]`.
    #[test]
    fn listener_defaults_are_the_edge_defaults() {
        assert_eq!(
            connection_limits(&LimitsConfig::default()),
            ConnectionLimits::default()
        );
    }
}
