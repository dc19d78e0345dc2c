//! The API listener's connection bounds, with no model loaded: they hold
//! from the moment the server listens.

use std::time::Duration;

use breakwater_infer::server::{self, AppState, ConnectionLimits, ServerConfig};
use breakwater_infer::telemetry::Telemetry;
use tokio::io::AsyncReadExt;

/// Whether the peer closes `stream` within `limit`.
async fn closed_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    tokio::time::timeout(limit, async {
        let mut chunk = [0u8; 1024];
        while let Ok(n) = stream.read(&mut chunk).await {
            if n == 0 {
                return;
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn a_silent_connection_is_closed_and_others_are_served() {
    let app = AppState::new(ServerConfig::new("none"), Telemetry::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let limits = ConnectionLimits {
        header_read_timeout: Duration::from_millis(500),
        ..ConnectionLimits::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server::serve_with(listener, app, limits, async {
        let _ = stopped.await;
    }));

    let mut silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let live = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("client")
        .get(format!("http://{addr}/health/live"))
        .send()
        .await
        .expect("liveness");
    assert_eq!(live.status(), 200);
    assert!(
        closed_within(&mut silent, Duration::from_secs(4)).await,
        "a connection that sent nothing is still open after 4 s (header_read_timeout 500 ms)"
    );
    let _ = stop.send(());
}
