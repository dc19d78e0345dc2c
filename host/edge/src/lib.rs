//! The Breakwater edge node.
//!
//! A node listens on one or more sockets (HTTP/1.1 and h2c in the clear, h2
//! or HTTP/1.1 over TLS), serves static sites from its own disk, and proxies
//! everything else to upstream pools by path prefix. An admin listener
//! answers `/healthz`, `/readyz`, `/metrics` and, with a bearer token,
//! `POST /admin/plugins/reload`. A node started with a [`ConfigSource`]
//! reloads its plugins from it without dropping a request:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config = edge_config::load("edge.toml".as_ref())?;
//! let source = breakwater_edge::ConfigSource::file("edge.toml");
//! let node = breakwater_edge::start_with_source(config, source).await?;
//! println!("serving on {:?}", node.listener_addrs());
//! // …edge.toml's plugins change…
//! let report = node.reload().await?;
//! println!("plugin generation {}", report.generation);
//! node.shutdown().await;
//! # Ok(())
//! # }
//! ```

mod admin;
mod cache;
mod cluster;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
mod limits;
mod node;
mod observe;
mod plugins;
mod proxy;
mod server;
mod sse;
pub mod static_files;
mod tls;
mod token_budget;
mod traces;
mod upstream;
mod usage;

pub use error::{EdgeError, error_response};
pub use observe::{LogFormat, LogGuard, init_logging};
pub use plugins::reload::{ConfigSource, PluginInfo, ReloadError, ReloadReport};
pub use server::{RunningNode, start, start_with_source};
pub use tls::{ReloadedCertificate, TlsFilesError, TlsReloadError};
pub use traces::{TraceExporter, TraceSetupError};
