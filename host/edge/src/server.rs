//! Listeners: accepting connections, TLS with ALPN, HTTP/1.1 and HTTP/2 on
//! one socket, connection-level limits, and graceful shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use edge_config::{EdgeConfig, TlsConfig};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::admin;
use crate::node::EdgeNode;
use crate::proxy::ClientConnection;
use crate::reload::{ConfigSource, ReloadError, ReloadReport};
use crate::static_files::StaticSiteError;

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
}

/// A started node. Dropping it does not stop it; call [`RunningNode::shutdown`].
pub struct RunningNode {
    listener_addrs: Vec<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    node: Arc<EdgeNode>,
    stop: CancellationToken,
    tasks: JoinSet<()>,
    stop_admin: CancellationToken,
    admin_task: Option<tokio::task::JoinHandle<()>>,
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
    crate::plugin_source::resolve(&mut config)
        .await
        .map_err(|(_, error)| error)?;
    let node = Arc::new(EdgeNode::new(&config, source)?);
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let mut listener_addrs = Vec::new();
    let grace = config.limits.shutdown_grace;

    for listener_config in &config.listeners {
        let tls = listener_config.tls.as_ref().map(tls_acceptor).transpose()?;
        let listener = bind(&listener_config.address).await?;
        let local = listener.local_addr().map_err(|source| EdgeError::Bind {
            address: listener_config.address.clone(),
            source,
        })?;
        listener_addrs.push(local);
        let builder = connection_builder(&config);
        tracing::info!(address = %local, tls = tls.is_some(), "listening");
        tasks.spawn(accept_loop(
            listener,
            tls,
            builder,
            node.clone(),
            stop.clone(),
            grace,
            config.limits.header_read_timeout,
        ));
    }

    let stop_admin = CancellationToken::new();
    let mut admin_addr = None;
    let mut admin_task = None;
    if let Some(admin_config) = &config.admin {
        let listener = bind(&admin_config.address).await?;
        admin_addr = listener.local_addr().ok();
        tracing::info!(address = ?admin_addr, "admin listening");
        admin_task = Some(tokio::spawn(admin::serve(
            listener,
            node.clone(),
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

fn connection_builder(config: &EdgeConfig) -> auto::Builder<TokioExecutor> {
    let limits = &config.limits;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // A client that has not sent its whole head by then is a slowloris:
        // hyper closes the connection.
        .header_read_timeout(limits.header_read_timeout)
        // hyper's own ceiling sits just above ours so that our check answers
        // with a JSON 431 in all but absurd cases; hyper's minimum is 8 KiB.
        .max_buf_size((limits.max_header_bytes + 1024).max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes * 2).unwrap_or(u32::MAX))
        .keep_alive_interval(Duration::from_secs(30));
    builder
}

fn tls_acceptor(config: &TlsConfig) -> Result<TlsAcceptor, EdgeError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let fail = |message: String| EdgeError::Tls {
        cert: config.cert.clone(),
        key: config.key.clone(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(&config.cert)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| fail(format!("reading certificates: {e}")))?;
    let key = PrivateKeyDer::from_pem_file(&config.key)
        .map_err(|e| fail(format!("reading the private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| fail(e.to_string()))?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(server)))
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    builder: auto::Builder<TokioExecutor>,
    node: Arc<EdgeNode>,
    stop: CancellationToken,
    grace: Duration,
    // Both the TLS handshake and the first request get as long as a request
    // head would.
    header_read_timeout: Duration,
) {
    let graceful = GracefulShutdown::new();
    let builder = Arc::new(builder);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let client = Arc::new(ClientConnection {
            peer,
            tls: tls.is_some(),
        });
        // Cancelled by the first request, which ends the connection's
        // "must speak within header_read_timeout" period.
        let first_request = CancellationToken::new();
        let service = {
            let node = node.clone();
            let first_request = first_request.clone();
            hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                first_request.cancel();
                let node = node.clone();
                let client = client.clone();
                async move { Ok::<_, Infallible>(node.handle(request, client).await) }
            })
        };
        let connection = Connection {
            builder: builder.clone(),
            watcher: graceful.watcher(),
            first_request,
            first_request_timeout: header_read_timeout,
            peer,
        };
        match &tls {
            None => {
                tokio::spawn(connection.serve(TokioIo::new(stream), service));
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Some(stream) = tls_handshake(acceptor, stream, header_read_timeout).await
                    {
                        connection.serve(TokioIo::new(stream), service).await;
                    }
                });
            }
        }
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!(?grace, "shutdown grace elapsed with requests still in flight");
        }
    }
}

/// One accepted connection, after TLS if any.
struct Connection {
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: hyper_util::server::graceful::Watcher,
    first_request: CancellationToken,
    first_request_timeout: Duration,
    peer: SocketAddr,
}

impl Connection {
    /// Serves HTTP/1.1 or h2 on `io`. A client that sends no complete
    /// request within the timeout is dropped: hyper's own header timeout only
    /// starts once it has told HTTP/1.1 from h2, and a silent socket never
    /// lets it, so without this an idle client would hold a descriptor forever.
    async fn serve<I, S>(self, io: I, service: S)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
        S: hyper::service::Service<
                hyper::Request<Incoming>,
                Response = hyper::Response<axum::body::Body>,
                Error = Infallible,
            > + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let connection = self
            .builder
            .serve_connection_with_upgrades(io, service)
            .into_owned();
        let connection = self.watcher.watch(connection);
        tokio::pin!(connection);
        let outcome = tokio::select! {
            outcome = &mut connection => outcome,
            () = self.first_request.cancelled() => connection.await,
            () = tokio::time::sleep(self.first_request_timeout) => {
                metrics::counter!("breakwater_edge_idle_connections_closed_total").increment(1);
                tracing::debug!(peer = %self.peer, "no request within the header timeout; closing");
                return;
            }
        };
        if let Err(e) = outcome {
            tracing::debug!(peer = %self.peer, error = %e, "connection ended with an error");
        }
    }
}

async fn tls_handshake(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    deadline: Duration,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            metrics::counter!("breakwater_edge_tls_handshake_failures_total").increment(1);
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            metrics::counter!("breakwater_edge_tls_handshake_failures_total").increment(1);
            None
        }
    }
}
