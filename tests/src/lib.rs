//! Harness for end-to-end tests against the real `breakwater` binary: build
//! it once per test process, run it as a child that is killed on drop, find
//! free ports, wait for a socket to accept, and a slow upstream.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Upper bound for anything a test waits on; generous for a loaded machine.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A cargo command run from inside a test, without the variables cargo
/// sets for the test process itself (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`,
/// …): build scripts such as ring's watch some of them, so passing them on
/// would make the nested build rerun them and rebuild the binary, about a
/// minute on CI's machine, once per test process.
pub fn nested_cargo() -> Command {
    let cargo = std::env::var_os("CARGO")
        .or_else(|| option_env!("CARGO").map(Into::into))
        .unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        let set_by_cargo = name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_EXE_")
            || matches!(
                name,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
                    | "OUT_DIR"
            );
        if set_by_cargo {
            command.env_remove(name);
        }
    }
    command
}

/// The `breakwater` binary, built (or found up to date) once per test process.
pub fn breakwater_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = workspace_root();
        let output = nested_cargo()
            .args(["build", "-p", "breakwater-cli", "--bin", "breakwater"])
            .current_dir(&root)
            .stdin(Stdio::null())
            .output()
            .expect("run cargo build");
        assert!(
            output.status.success(),
            "cargo build of the breakwater binary failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let target = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) => root.join(dir),
            None => root.join("target"),
        };
        let bin = target.join("debug").join("breakwater");
        assert!(bin.is_file(), "no binary at {}", bin.display());
        bin
    })
}

/// A bundled plugin's artifact as `cargo xtask test` builds it (`name` as
/// the file is called, e.g. `cache_policy`) and its sha256 pin.
pub fn plugin_artifact(name: &str) -> (PathBuf, String) {
    use sha2::{Digest, Sha256};
    let path = workspace_root().join(format!("plugins/target/wasm32-wasip2/release/{name}.wasm"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; `cargo xtask test` builds the plugins first",
            path.display()
        )
    });
    let sha256 = format!("{:x}", Sha256::digest(&bytes));
    (path, sha256)
}

/// Writes a random model of `shape` (`tiny` or `smollm2-135m`) from `seed`
/// into `dir` (`breakwater model gen-test`).
pub fn gen_test_model(dir: &Path, shape: &str, seed: u64) {
    let dir = dir.to_str().expect("UTF-8 path");
    let seed = seed.to_string();
    let output = breakwater(&["model", "gen-test", dir, "--shape", shape, "--seed", &seed])
        .output()
        .expect("run breakwater model gen-test");
    assert!(
        output.status.success(),
        "gen-test failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// An edge in front of the GPU host at `upstream` (`http://host:port`)
/// whose `/v1/` route caches deterministic completions for an hour
/// (cache-policy, bodies shown to it). `top` holds extra top-level
/// sections (`[limits]`, `[cache]`), `pool` extra lines of the pool.
pub fn completion_caching_edge(upstream: &str, top: &str, pool: &str) -> EdgeProcess {
    llm_edge(
        upstream,
        top,
        "cache = true",
        &[("cache-policy", "cache_policy", "{ default_ttl = 3600 }")],
        pool,
    )
}

/// An edge whose `/v1/` route sends to the GPU host at `upstream` through
/// a chain of bundled plugins, bodies shown to them: each `(name,
/// component, config)` granted `counters` and configured with the inline
/// table `config`. `route` holds extra lines of the route.
pub fn llm_edge(
    upstream: &str,
    top: &str,
    route: &str,
    plugins: &[(&str, &str, &str)],
    pool: &str,
) -> EdgeProcess {
    let names: Vec<String> = plugins
        .iter()
        .map(|(name, _, _)| format!("\"{name}\""))
        .collect();
    let names = names.join(", ");
    let sections: String = plugins
        .iter()
        .map(|(name, component, config)| {
            let (path, sha256) = plugin_artifact(component);
            format!(
                "[[plugin]]\nname = \"{name}\"\npath = \"{}\"\nsha256 = \"{sha256}\"\n\
                 grants = [\"counters\"]\nconfig = {config}\n\n",
                path.display()
            )
        })
        .collect();
    EdgeProcess::start(&format!(
        r#"
[[listener]]
address = "{{listen}}"

[admin]
address = "{{admin}}"

{top}

[[route]]
prefix = "/v1/"
pool = "gpu"
plugins = [{names}]
plugin_body_bytes = true
{route}

{sections}
[[pool]]
name = "gpu"
endpoints = ["{upstream}"]
{pool}
"#
    ))
}

/// A `breakwater` command with `args`, run from the workspace root.
pub fn breakwater(args: &[&str]) -> Command {
    let mut command = Command::new(breakwater_bin());
    command
        .args(args)
        .current_dir(workspace_root())
        .stdin(Stdio::null());
    command
}

/// A child process killed (and reaped) when dropped, so that a failing test
/// never leaves a node running. Its stderr goes to a file that
/// [`ChildGuard::stderr`] reads back for failure messages.
pub struct ChildGuard {
    child: Child,
    stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl ChildGuard {
    /// Spawns `command` with stdout and stderr captured to a file.
    pub fn spawn(mut command: Command) -> Self {
        let dir = tempfile::tempdir().expect("tempdir for the child's output");
        let stderr_path = dir.path().join("output.log");
        let log = std::fs::File::create(&stderr_path).expect("create the child's log");
        let log2 = log.try_clone().expect("clone the log handle");
        let child = command
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .expect("spawn breakwater");
        Self {
            child,
            stderr_path,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the child wrote to stdout and stderr so far.
    pub fn stderr(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(&self.stderr_path) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    /// The exit status, if the child has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("query the child's status")
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Sends SIGHUP: reload the plugins.
    pub fn sighup(&self) {
        self.signal(libc::SIGHUP);
    }

    /// Sends SIGSTOP: the process hangs (its sockets still accept).
    pub fn sigstop(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Sends SIGCONT after [`ChildGuard::sigstop`].
    pub fn sigcont(&self) {
        self.signal(libc::SIGCONT);
    }

    /// Sends SIGKILL and reaps the child: a crash, nothing drained.
    pub fn sigkill(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) with a pid we spawned and have not reaped yet.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({signal}) failed");
    }

    /// Waits up to `limit` for the child to exit.
    pub fn wait_timeout(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `addr` accepts a TCP connection (true) or the child
    /// exits (false); panics with the child's output if neither happens
    /// within [`PATIENCE`].
    pub fn accepts_unless_exited(&mut self, addr: SocketAddr) -> bool {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if self.try_wait().is_some() {
                return false;
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "breakwater did not accept on {addr} within {PATIENCE:?}:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `addr` accepts a TCP connection; panics with the child's
    /// output if it exits first or does not get there within [`PATIENCE`].
    pub fn wait_until_accepts(&mut self, addr: SocketAddr) {
        if !self.accepts_unless_exited(addr) {
            panic!(
                "breakwater exited before accepting on {addr}:\n{}",
                self.stderr()
            );
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A loopback port that was free a moment ago (bound, then released), for
/// a child process to listen on.
///
/// Taken below the kernel's ephemeral range when there is room: a port
/// `bind(0)` hands out comes from that range, and between its release and
/// the child's bind any outgoing connection on the machine (every test's
/// HTTP clients) may be given it. Below the range only another test's
/// explicit bind can race it.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let first_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const LOWEST: u16 = 15_000;
    if first_ephemeral > LOWEST + 1_000 {
        let span = u64::from(first_ephemeral - LOWEST);
        for _ in 0..64 {
            // RandomState is seeded per instance: a cheap random draw, so
            // that parallel test processes spread over the range.
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u32(std::process::id());
            let port = LOWEST + u16::try_from(hasher.finish() % span).unwrap_or(0);
            if port_is_free(port) {
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// Whether `127.0.0.1:port` can be bound right now.
pub fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// An upstream that answers every request `200 slept` after `delay`, one
/// request per connection. Runs on the caller's tokio runtime.
pub async fn start_slow_upstream(delay: Duration) -> SocketAddr {
    start_raw_upstream(move |_| {
        (
            delay,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\
              Content-Length: 5\r\nConnection: close\r\n\r\nslept"
                .to_vec(),
        )
    })
    .await
}

/// An upstream that answers `200` with the request's path as the body and
/// `cache_control` as its `Cache-Control`, and counts the requests it got.
pub async fn start_counting_upstream(
    cache_control: &'static str,
) -> (SocketAddr, Arc<AtomicUsize>) {
    start_counting_upstream_of(cache_control, "/").await
}

/// [`start_counting_upstream`] counting only the requests whose path starts
/// with `counted`.
pub async fn start_counting_upstream_of(
    cache_control: &'static str,
    counted: &'static str,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let count = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&count);
    let addr = start_raw_upstream(move |path| {
        if path.starts_with(counted) {
            counter.fetch_add(1, Ordering::SeqCst);
        }
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nCache-Control: {cache_control}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{path}",
            path.len()
        );
        (Duration::ZERO, response.into_bytes())
    })
    .await;
    (addr, count)
}

/// A loopback HTTP/1.1 upstream, one request per connection: `respond`
/// gets the request path and gives a delay and the raw response bytes.
pub async fn start_raw_upstream<F>(respond: F) -> SocketAddr
where
    F: Fn(&str) -> (Duration, Vec<u8>) + Send + Sync + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the upstream");
    let addr = listener.local_addr().expect("upstream addr");
    let respond = Arc::new(respond);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let respond = Arc::clone(&respond);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut chunk = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head);
                let path = text.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let (delay, response) = respond(&path);
                tokio::time::sleep(delay).await;
                let _ = stream.write_all(&response).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// A stand-in GPU host process (`tests/src/bin/stand-in-upstream.rs`) on a
/// loopback port: told to fail, answer busy or slow down over its control
/// path, hung with SIGSTOP, killed with SIGKILL, restarted on its port.
pub struct StandIn {
    pub name: String,
    pub addr: SocketAddr,
    bin: PathBuf,
    child: Option<ChildGuard>,
}

impl StandIn {
    /// Starts `bin` (a test's `env!("CARGO_BIN_EXE_stand-in-upstream")`)
    /// as `name` on a free port and waits until it accepts.
    pub fn start(bin: &str, name: &str) -> Self {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let mut stand_in = Self {
            name: name.to_owned(),
            addr,
            bin: PathBuf::from(bin),
            child: None,
        };
        stand_in.restart();
        stand_in
    }

    /// Starts the process again on the same port (after a kill).
    pub fn restart(&mut self) {
        let mut command = Command::new(&self.bin);
        command
            .args(["--listen", &self.addr.to_string(), "--name", &self.name])
            .stdin(Stdio::null());
        let mut child = ChildGuard::spawn(command);
        child.wait_until_accepts(self.addr);
        self.child = Some(child);
    }

    /// SIGKILL: connections reset, the port refuses.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.sigkill();
        }
    }

    /// SIGSTOP: the port still accepts, nothing answers.
    pub fn hang(&self) {
        if let Some(child) = &self.child {
            child.sigstop();
        }
    }

    /// SIGCONT after [`StandIn::hang`].
    pub fn resume(&self) {
        if let Some(child) = &self.child {
            child.sigcont();
        }
    }

    /// `POST /_control?{query}`, e.g. `status=502` or `health=fail`.
    pub async fn control(&self, query: &str) {
        let response = reqwest::Client::new()
            .post(format!("http://{}/_control?{query}", self.addr))
            .timeout(PATIENCE)
            .send()
            .await
            .unwrap_or_else(|e| panic!("control {}: {e}", self.name));
        assert!(response.status().is_success(), "control {}", self.name);
    }

    /// The counters from `GET /_control/stats`.
    pub async fn stats(&self) -> serde_json::Value {
        let bytes = reqwest::Client::new()
            .get(format!("http://{}/_control/stats", self.addr))
            .timeout(PATIENCE)
            .send()
            .await
            .unwrap_or_else(|e| panic!("stats {}: {e}", self.name))
            .bytes()
            .await
            .unwrap_or_else(|e| panic!("stats {}: {e}", self.name));
        serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("stats {} JSON: {e}", self.name))
    }

    /// One counter from [`StandIn::stats`].
    pub async fn stat(&self, key: &str) -> u64 {
        self.stats().await[key].as_u64().unwrap_or(0)
    }
}

/// A `breakwater edge` process on a configuration with `{listen}` and
/// `{admin}` filled in with free ports.
pub struct EdgeProcess {
    pub child: ChildGuard,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl EdgeProcess {
    /// Writes `config` (with `{listen}` and `{admin}` placeholders) to a
    /// temporary file and starts an edge node on it.
    pub fn start(config: &str) -> Self {
        // A port free when chosen can be taken before the node binds it
        // (another test's process); the node then exits at start, and new
        // ports are tried.
        for _ in 0..3 {
            let dir = tempfile::tempdir().expect("tempdir");
            let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let text = config
                .replace("{listen}", &addr.to_string())
                .replace("{admin}", &admin.to_string());
            let path = dir.path().join("edge.toml");
            std::fs::write(&path, text).expect("write the config");
            let mut child = ChildGuard::spawn(breakwater(&[
                "edge",
                "--config",
                path.to_str().expect("UTF-8 path"),
            ]));
            let clashed = [addr, admin].into_iter().any(|port| {
                !child.accepts_unless_exited(port) && {
                    let stderr = child.stderr();
                    let ours = [addr, admin].iter().any(|a| {
                        stderr.contains(&format!("cannot listen on {a}: Address already in use"))
                    });
                    assert!(
                        ours,
                        "breakwater exited before accepting on {port}:\n{stderr}"
                    );
                    true
                }
            });
            if !clashed {
                return Self {
                    child,
                    addr,
                    admin,
                    _dir: dir,
                };
            }
        }
        panic!("breakwater edge found its ports taken three times in a row");
    }

    /// `http://ADDR{path}` on the data listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        get_text(&format!("http://{}/metrics", self.admin)).await
    }
}

/// An answer as the cache tests read it.
pub struct Answered {
    pub status: u16,
    /// `X-Cache`: `HIT`, `MISS`, … (empty when absent).
    pub x_cache: String,
    /// `X-Model-Version` (empty when absent).
    pub model_version: String,
    pub body: Vec<u8>,
}

/// `request` sent with the JSON text `body`, within [`PATIENCE`]; panics
/// when it cannot be sent (the error names the URL).
pub async fn send_json(request: reqwest::RequestBuilder, body: &str) -> reqwest::Response {
    request
        .header("content-type", "application/json")
        .body(body.to_owned())
        .timeout(PATIENCE)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `POST url` with the JSON text `body`; panics when it cannot be sent.
pub async fn post_json(client: &reqwest::Client, url: &str, body: &str) -> Answered {
    let response = send_json(client.post(url), body).await;
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (x_cache, model_version) = (header("x-cache"), header("x-model-version"));
    let status = response.status().as_u16();
    let body = response.bytes().await.expect("the answer").to_vec();
    Answered {
        status,
        x_cache,
        model_version,
        body,
    }
}

/// The `id` of an answer and everything but its ids and times: a whole
/// JSON answer, or each event of a stream.
pub fn identity_and_rest(answer: &[u8]) -> (String, Vec<serde_json::Value>) {
    let text = String::from_utf8_lossy(answer);
    let documents: Vec<&str> = if text.starts_with("data: ") {
        text.lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .filter(|data| *data != "[DONE]")
            .collect()
    } else {
        vec![&text]
    };
    let mut id = String::new();
    let rest = documents
        .into_iter()
        .map(|document| {
            let mut value: serde_json::Value =
                serde_json::from_str(document).unwrap_or_else(|e| panic!("{document}: {e}"));
            if let Some(object) = value.as_object_mut() {
                let named = object.remove("id");
                id = named
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                object.remove("created");
            }
            value
        })
        .collect();
    (id, rest)
}

/// Generations a GPU host has finished, whatever their outcome, from its
/// metrics at `metrics_url`.
pub async fn gpu_generations(metrics_url: &str) -> f64 {
    metric_sum(
        &get_text(metrics_url).await,
        "breakwater_infer_sequences_finished_total",
        &[],
    )
}

/// The body of `GET url` as text, within [`PATIENCE`]; panics on failure.
pub async fn get_text(url: &str) -> String {
    reqwest::Client::new()
        .get(url)
        .timeout(PATIENCE)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: body: {e}"))
}

/// A `breakwater gpu-host` process on a free loopback port, on the CPU
/// backend with one thread.
pub struct GpuHostProcess {
    child: Option<ChildGuard>,
    pub addr: SocketAddr,
}

impl GpuHostProcess {
    /// Starts `breakwater gpu-host ARGS --listen … --device cpu --threads
    /// 1`, with `configure` applied to the command (environment), and
    /// waits until `/health/ready` answers 200: within `patience`, and
    /// failing at once with the host's output if it exits first.
    pub async fn start(
        args: &[&str],
        configure: impl FnOnce(&mut Command),
        patience: Duration,
    ) -> Self {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let listen = addr.to_string();
        let mut all = vec!["gpu-host"];
        all.extend_from_slice(args);
        all.extend(["--listen", &listen, "--device", "cpu", "--threads", "1"]);
        let mut command = breakwater(&all);
        configure(&mut command);
        let mut child = ChildGuard::spawn(command);
        let http = reqwest::Client::new();
        let deadline = Instant::now() + patience;
        loop {
            if let Some(status) = child.try_wait() {
                panic!("gpu-host exited ({status}):\n{}", child.stderr());
            }
            let ready = http
                .get(format!("http://{addr}/health/ready"))
                .timeout(PATIENCE)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "gpu-host not ready within {patience:?}:\n{}",
                child.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            child: Some(child),
            addr,
        }
    }

    /// `http://ADDR{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The host's `/metrics` text.
    pub async fn metrics(&self) -> String {
        get_text(&self.url("/metrics")).await
    }

    /// Its log so far (empty once killed).
    pub fn stderr(&self) -> String {
        self.child
            .as_ref()
            .map(ChildGuard::stderr)
            .unwrap_or_default()
    }

    /// SIGTERM: the host drains.
    pub fn terminate(&self) {
        if let Some(child) = &self.child {
            child.sigterm();
        }
    }

    /// Waits up to `limit` for the host to exit (after [`Self::terminate`]).
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        self.child
            .as_mut()
            .is_none_or(|child| child.wait_timeout(limit).is_some())
    }

    /// SIGSTOP: connections stay open and nothing more comes on them.
    pub fn freeze(&self) {
        if let Some(child) = &self.child {
            child.sigstop();
        }
    }

    /// SIGCONT after [`Self::freeze`].
    pub fn thaw(&self) {
        if let Some(child) = &self.child {
            child.sigcont();
        }
    }

    /// SIGKILL: in-flight connections reset, the port refuses.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            tokio::task::block_in_place(|| child.sigkill());
        }
    }
}

/// The value of the first sample of `name` whose labels include every
/// `key="value"` in `labels`; 0 when there is none.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(text, name, labels).next().unwrap_or(0.0)
}

/// The sum of every sample of `name` whose labels include `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(text, name, labels).sum()
}

/// The values of the samples of `name` whose labels include `labels`, in
/// the order of the Prometheus text.
fn samples<'t>(
    text: &'t str,
    name: &'t str,
    labels: &'t [(&str, &str)],
) -> impl Iterator<Item = f64> + 't {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(move |line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())
            .flatten()
        })
}

/// Polls `check` every 20 ms until it holds; fails the test with `what`
/// after `limit`. Returns how long it took.
pub async fn wait_for(
    what: &str,
    limit: Duration,
    mut check: impl AsyncFnMut() -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (up to [`PATIENCE`]) until `edge` reports `endpoint` unhealthy.
/// Returns the endpoint's failed attempts as counted in that same scrape,
/// so that any later failure there is a request sent after the edge knew,
/// or one already in flight; and how long the wait took.
pub async fn wait_until_marked_down(edge: &EdgeProcess, endpoint: &str) -> (f64, Duration) {
    let mut failed_attempts = 0.0;
    let took = wait_for(
        &format!("the edge marks {endpoint} unhealthy"),
        PATIENCE,
        async || {
            let metrics = edge.metrics().await;
            failed_attempts = metric_sum(
                &metrics,
                "breakwater_upstream_attempt_failures_total",
                &[("endpoint", endpoint)],
            );
            metric(
                &metrics,
                "breakwater_upstream_endpoint_healthy",
                &[("endpoint", endpoint)],
            ) == 0.0
        },
    )
    .await;
    (failed_attempts, took)
}

/// Waits (up to [`PATIENCE`]) until `node` reports its link to the
/// cluster's Redis `up` (or down); returns how long that took.
pub async fn wait_for_redis_link(node: &EdgeProcess, up: bool) -> Duration {
    let want = if up { 1.0 } else { 0.0 };
    wait_for(
        if up {
            "the node reaches Redis"
        } else {
            "the node sees Redis gone"
        },
        PATIENCE,
        async || metric(&node.metrics().await, "breakwater_cluster_redis_up", &[]) == want,
    )
    .await
}

/// The 99th percentile of `latencies`.
pub fn p99(latencies: &[Duration]) -> Duration {
    let mut sorted = latencies.to_vec();
    sorted.sort_unstable();
    let at = (sorted.len() * 99).div_ceil(100).saturating_sub(1);
    sorted.get(at).copied().unwrap_or_default()
}

/// An OpenAI event stream as a client read it.
#[derive(Debug, Default)]
pub struct StreamedAnswer {
    /// The text of its chunks (chat deltas or completion text), joined.
    pub text: String,
    /// Every `data:` payload, in order (`[DONE]` included).
    pub events: Vec<String>,
    /// When each chunk with text arrived.
    pub text_at: Vec<Instant>,
    /// Why the body broke, if it did.
    pub broken: Option<String>,
}

impl StreamedAnswer {
    /// The payloads that are JSON.
    pub fn chunks(&self) -> impl Iterator<Item = serde_json::Value> + '_ {
        self.events
            .iter()
            .filter_map(|event| serde_json::from_str(event).ok())
    }
}

/// Reads the event stream of `response` to its end, calling `on_text(n)`
/// as the n-th chunk with text arrives; when that answers false, the
/// client leaves there (the body is dropped).
pub async fn read_event_stream(
    response: reqwest::Response,
    mut on_text: impl FnMut(usize) -> bool,
) -> StreamedAnswer {
    use futures_util::StreamExt;
    let mut seen = StreamedAnswer::default();
    let mut pending: Vec<u8> = Vec::new();
    let mut body = response.bytes_stream();
    while let Some(piece) = body.next().await {
        let piece = match piece {
            Ok(piece) => piece,
            Err(e) => {
                seen.broken = Some(e.to_string());
                break;
            }
        };
        pending.extend_from_slice(&piece);
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            let event = String::from_utf8_lossy(&event);
            let Some(data) = event.trim().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim().to_owned();
            if let Ok(chunk) = serde_json::from_str::<serde_json::Value>(&data) {
                let choice = &chunk["choices"][0];
                let text = choice["delta"]["content"]
                    .as_str()
                    .or_else(|| choice["text"].as_str());
                if let Some(text) = text.filter(|t| !t.is_empty()) {
                    seen.text.push_str(text);
                    seen.text_at.push(Instant::now());
                    if !on_text(seen.text_at.len()) {
                        seen.events.push(data);
                        return seen;
                    }
                }
            }
            seen.events.push(data);
        }
    }
    seen
}

/// The `--flag value` command line of the bench tools in `src/bin/`, read
/// flag by flag.
pub struct Flags(std::iter::Skip<std::env::Args>);

impl Flags {
    /// This process's arguments, after its name.
    pub fn from_env() -> Self {
        Self(std::env::args().skip(1))
    }

    /// The next flag, `None` at the end.
    pub fn next_flag(&mut self) -> Option<String> {
        self.0.next()
    }

    /// The value after `flag`.
    pub fn value(&mut self, flag: &str) -> Result<String, String> {
        self.0.next().ok_or(format!("{flag} needs a value"))
    }

    /// The value after `flag`, parsed.
    pub fn parsed<T>(&mut self, flag: &str) -> Result<T, String>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
    {
        self.value(flag)?
            .parse()
            .map_err(|e| format!("{flag}: {e}"))
    }
}
