//! A real Redis for test suites, and a proxy that makes it slow or drops
//! its connections.
//!
//! [`RedisServer`] runs the Debian package's `redis-server` on a free
//! loopback port with no persistence, never a system service; `cargo xtask
//! test` installs the package. A test started without it fails and says
//! how to install it, rather than skipping.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a server gets to answer its first PING.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// `redis-server` from the PATH (or Debian's place for it).
pub fn redis_server_path() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("redis-server"))
            .find(|candidate| candidate.is_file())
    });
    on_path.unwrap_or_else(|| PathBuf::from("/usr/bin/redis-server"))
}

/// A `redis-server` on loopback, killed when dropped.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Arguments after the harness's own (a replica's `--replicaof`, TLS).
    extra: Vec<String>,
    /// Served over TLS only: readiness is an accepted connection.
    tls: bool,
    /// A configuration file, first on the command line (a sentinel's);
    /// none runs a data server without persistence.
    config_file: Option<PathBuf>,
}

/// PEM files of a TLS server: its certificate, key, and the CA that signed
/// it (which a client must trust).
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING.
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// A replica of `primary`, once it answers.
    pub fn replica_of(primary: &RedisServer) -> RedisServer {
        Self::start_with(&[
            "--replicaof".to_owned(),
            "127.0.0.1".to_owned(),
            primary.port.to_string(),
        ])
    }

    /// A server that speaks only TLS (`rediss://`), with `files`; it does
    /// not ask clients for certificates.
    pub fn start_tls(files: &TlsFiles) -> RedisServer {
        let path = |p: &PathBuf| p.to_string_lossy().into_owned();
        Self::start_inner(
            &[
                "--tls-cert-file".to_owned(),
                path(&files.cert),
                "--tls-key-file".to_owned(),
                path(&files.key),
                "--tls-ca-cert-file".to_owned(),
                path(&files.ca),
                "--tls-auth-clients".to_owned(),
                "no".to_owned(),
            ],
            true,
        )
    }

    /// Starts a server with `extra` arguments.
    pub fn start_with(extra: &[String]) -> RedisServer {
        Self::start_inner(extra, false)
    }

    fn start_inner(extra: &[String], tls: bool) -> RedisServer {
        let binary = redis_server_path();
        assert!(
            binary.is_file(),
            "redis-server is not installed: `cargo xtask test` installs it \
             (Debian package redis-server), or run `apt-get install redis-server`"
        );
        for _ in 0..3 {
            let mut server = RedisServer {
                port: free_port(),
                child: None,
                dir: tempfile::tempdir().expect("a temporary directory for redis-server"),
                extra: extra.to_vec(),
                tls,
                config_file: None,
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server did not start on a free port in three tries");
    }

    /// Starts the process on this server's port; whether it answered.
    fn spawn(&mut self) -> bool {
        let port = self.port.to_string();
        let ports: [&str; 4] = if self.tls {
            ["--port", "0", "--tls-port", &port]
        } else {
            ["--port", &port, "--tls-port", "0"]
        };
        let mut command = Command::new(redis_server_path());
        match &self.config_file {
            Some(config) => command.arg(config),
            None => command.args(["--save", "", "--appendonly", "no", "--protected-mode", "no"]),
        };
        let child = command
            .args(ports)
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--logfile", "redis.log"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server");
        self.child = Some(child);
        self.wait_answering()
    }

    /// Whether the started process answered before it exited.
    fn wait_answering(&mut self) -> bool {
        let started = Instant::now();
        while started.elapsed() < START_DEADLINE {
            if self.answers_ping() {
                return true;
            }
            if let Some(child) = &mut self.child
                && let Ok(Some(_)) = child.try_wait()
            {
                // Exited: most likely the port was taken in the meantime.
                self.child = None;
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not answer within {START_DEADLINE:?}");
    }

    fn answers_ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_secs(1),
        ) else {
            return false;
        };
        if self.tls {
            // Listening is as far as plain TCP can tell.
            return true;
        }
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut reply = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn address(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The server's directory (its log is `redis.log` there).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Kills the server (SIGKILL: no goodbye to its clients).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "redis-server did not start again on port {}",
            self.port
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Sentinel on loopback watching `primary` as `master`, which it
/// declares down after 200 ms without an answer and fails over alone
/// (quorum 1). Killed when dropped.
pub struct SentinelServer {
    server: RedisServer,
}

impl SentinelServer {
    pub fn start(master: &str, primary: &RedisServer) -> SentinelServer {
        let dir = tempfile::tempdir().expect("a temporary directory for the sentinel");
        // Sentinel rewrites its configuration file: it must be writable.
        let config = dir.path().join("sentinel.conf");
        std::fs::write(
            &config,
            format!(
                "sentinel monitor {master} 127.0.0.1 {port} 1\n\
                 sentinel down-after-milliseconds {master} 200\n\
                 sentinel failover-timeout {master} 2000\n",
                port = primary.port
            ),
        )
        .expect("writing the sentinel's configuration");
        let mut server = RedisServer {
            port: 0,
            child: None,
            dir,
            extra: vec!["--sentinel".to_owned()],
            tls: false,
            config_file: Some(config),
        };
        for _ in 0..3 {
            server.port = free_port();
            if server.spawn() {
                return SentinelServer { server };
            }
        }
        panic!("redis-server --sentinel did not start on a free port in three tries");
    }

    pub fn url(&self) -> String {
        self.server.url()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free loopback port")
}

/// A TCP proxy in front of a server that can delay what clients send and
/// cut every connection, as a congested or flapping network does. Runs on
/// the current Tokio runtime until dropped.
pub struct FaultProxy {
    address: SocketAddr,
    state: Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct ProxyState {
    delay_ms: AtomicU64,
    /// Bumped to cut every open connection.
    generation: AtomicU64,
    refusing: AtomicBool,
}

impl FaultProxy {
    pub async fn start(target: SocketAddr) -> FaultProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the fault proxy");
        let address = listener.local_addr().expect("the proxy's address");
        let state = Arc::new(ProxyState::default());
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if shared.refusing.load(Ordering::Relaxed) {
                    drop(client);
                    continue;
                }
                tokio::spawn(relay(client, target, Arc::clone(&shared)));
            }
        });
        FaultProxy {
            address,
            state,
            task,
        }
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.address)
    }

    /// Holds everything clients send for `delay` before passing it on.
    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.state.delay_ms.store(ms, Ordering::Relaxed);
    }

    /// Cuts every open connection; with `refuse`, new ones too until
    /// called again with `false`.
    pub fn drop_connections(&self, refuse: bool) {
        self.state.refusing.store(refuse, Ordering::Relaxed);
        self.state.generation.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(mut client: tokio::net::TcpStream, target: SocketAddr, state: Arc<ProxyState>) {
    let Ok(mut server) = tokio::net::TcpStream::connect(target).await else {
        return;
    };
    let generation = state.generation.load(Ordering::Relaxed);
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = server.split();
    let mut upstream = [0u8; 16 * 1024];
    let mut downstream = [0u8; 16 * 1024];
    let mut check = tokio::time::interval(Duration::from_millis(10));
    loop {
        tokio::select! {
            read = client_read.read(&mut upstream) => {
                let Ok(n @ 1..) = read else { return };
                let delay = state.delay_ms.load(Ordering::Relaxed);
                if delay > 0 {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
                if server_write.write_all(&upstream[..n]).await.is_err() {
                    return;
                }
            }
            read = server_read.read(&mut downstream) => {
                let Ok(n @ 1..) = read else { return };
                if client_write.write_all(&downstream[..n]).await.is_err() {
                    return;
                }
            }
            _ = check.tick() => {
                if state.generation.load(Ordering::Relaxed) != generation {
                    return;
                }
            }
        }
    }
}
