//! The Breakwater edge node.
//!
//! A node listens on one or more sockets (HTTP/1.1 and h2c in the clear, h2
//! or HTTP/1.1 over TLS), serves static sites from its own disk, and proxies
//! everything else to upstream pools by path prefix. An admin listener
//! answers `/healthz`, `/readyz` and `/metrics`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), breakwater_edge::EdgeError> {
//! let config = edge_config::load("edge.toml".as_ref()).expect("valid config");
//! let node = breakwater_edge::start(config).await?;
//! println!("serving on {:?}", node.listener_addrs());
//! node.shutdown().await;
//! # Ok(())
//! # }
//! ```

mod admin;
pub mod error;
mod limits;
mod node;
mod observe;
mod plugins;
mod proxy;
mod server;
pub mod static_files;

pub use error::error_response;
pub use observe::{LogFormat, init_logging};
pub use server::{EdgeError, RunningNode, start};
