//! `breakwater model …` as a process against a real S3-compatible server
//! (SeaweedFS on loopback): a push SIGKILLed halfway leaves no version and
//! resumes; a pull SIGKILLed halfway leaves nothing in the serving path;
//! replication between two servers is complete and idempotent.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use breakwater_e2e::{ChildGuard, breakwater};
use breakwater_store::testing::S3Server;

/// Large enough that the upload and download of it take a while on
/// loopback, so that a kill lands in the middle.
const BIG: usize = 128 << 20;

fn store_url(server: &S3Server) -> String {
    server.store_url("e2e")
}

fn with_credentials(mut command: Command) -> Command {
    S3Server::pass_credentials(&mut command);
    command.env("RUST_LOG", "info");
    command
}

fn model(args: &[&str]) -> Command {
    let mut all = vec!["model"];
    all.extend_from_slice(args);
    with_credentials(breakwater(&all))
}

/// Runs to completion within `limit`; returns (success, output).
fn run(command: Command, limit: Duration) -> (bool, String) {
    let mut child = ChildGuard::spawn(command);
    let status = child.wait_timeout(limit);
    let output = child.stderr();
    match status {
        Some(status) => (status.success(), output),
        None => panic!("did not finish within {limit:?}:\n{output}"),
    }
}

fn write_model(dir: &Path) {
    std::fs::write(dir.join("a-config.json"), b"{\"layers\": 2}\n").expect("write");
    // Incompressible and distinct per run.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id());
    let mut big = vec![0u8; BIG];
    for chunk in big.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(dir.join("b-weights.gguf"), big).expect("write");
}

/// Waits for `done` to hold, up to `limit`, polling every few ms.
fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(3));
    }
    false
}

#[tokio::test]
async fn killed_push_and_pull_leave_no_version_and_no_file_and_resume() {
    let server = S3Server::start().await;
    let store = store_url(&server);
    let source = tempfile::tempdir().expect("tempdir");
    write_model(source.path());
    let dir = source.path().to_str().expect("utf-8 path");
    let push_args = [
        "push",
        dir,
        "--name",
        "big",
        "--version",
        "1",
        "--channel",
        "stable",
        "--store",
        &store,
        "--part-mib",
        "8",
    ];

    // SIGKILL once the small file is in the store and the big one is on
    // its way.
    let mut push = ChildGuard::spawn(model(&push_args));
    let started = wait_for(Duration::from_secs(120), || {
        push.stderr().contains("a-config.json: uploaded")
    });
    assert!(started, "the push never got going:\n{}", push.stderr());
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        push.try_wait().is_none(),
        "the push finished before it could be killed; make BIG larger:\n{}",
        push.stderr()
    );
    push.sigkill();

    // No version: not listed, not shown, not pullable.
    let (ok, ls) = run(model(&["ls", "--store", &store]), Duration::from_secs(60));
    assert!(ok, "{ls}");
    assert!(!ls.contains("@1"), "{ls}");
    let (ok, show) = run(
        model(&["show", "big@1", "--store", &store]),
        Duration::from_secs(60),
    );
    assert!(!ok && show.contains("does not exist"), "{show}");
    let cache = tempfile::tempdir().expect("tempdir");
    let cache_dir = cache.path().to_str().expect("utf-8 path");
    let (ok, pulled) = run(
        model(&["pull", "big@1", "--cache", cache_dir, "--store", &store]),
        Duration::from_secs(60),
    );
    assert!(!ok, "{pulled}");

    // Resumed: the finished object is skipped, the version appears.
    let (ok, resumed) = run(model(&push_args), Duration::from_secs(300));
    assert!(ok, "{resumed}");
    assert!(
        resumed.contains("a-config.json: already there, skipped"),
        "{resumed}"
    );
    assert!(resumed.contains("b-weights.gguf: uploaded"), "{resumed}");
    let (ok, verified) = run(
        model(&["verify", "big@1", "--store", &store]),
        Duration::from_secs(300),
    );
    assert!(
        ok && verified.contains("all 2 file(s) verified"),
        "{verified}"
    );

    // A pull killed while it downloads: nothing in the serving path.
    let serving = cache.path().join("models/big/1");
    let partial = cache.path().join(".partial");
    let mut pull = ChildGuard::spawn(model(&[
        "pull",
        "big:stable",
        "--cache",
        cache_dir,
        "--store",
        &store,
        "--concurrency",
        "2",
    ]));
    let downloading = wait_for(Duration::from_secs(120), || {
        std::fs::read_dir(&partial).is_ok_and(|mut d| d.next().is_some())
    });
    assert!(
        downloading,
        "the pull never started downloading:\n{}",
        pull.stderr()
    );
    assert!(
        pull.try_wait().is_none(),
        "the pull finished before it could be killed:\n{}",
        pull.stderr()
    );
    pull.sigkill();
    assert!(
        !serving.exists(),
        "a killed pull left {}",
        serving.display()
    );

    // The next pull cleans up after it and lands the verified version.
    let (ok, output) = run(
        model(&[
            "pull",
            "big:stable",
            "--cache",
            cache_dir,
            "--store",
            &store,
        ]),
        Duration::from_secs(300),
    );
    assert!(ok, "{output}");
    assert!(output.contains(&serving.display().to_string()), "{output}");
    let weights = std::fs::read(serving.join("b-weights.gguf")).expect("pulled");
    let original = std::fs::read(source.path().join("b-weights.gguf")).expect("source");
    assert!(weights == original, "the pulled weights differ");
    let left: Vec<_> = std::fs::read_dir(&partial)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in .partial: {left:?}");
}

#[tokio::test]
async fn replicate_command_copies_once_and_reports_lag() {
    let (eu, us) = tokio::join!(S3Server::start(), S3Server::start());
    let (from, to) = (store_url(&eu), store_url(&us));
    let source = tempfile::tempdir().expect("tempdir");
    std::fs::write(source.path().join("weights.gguf"), vec![7u8; 3 << 20]).expect("write");
    let dir = source.path().to_str().expect("utf-8 path");
    let (ok, out) = run(
        model(&[
            "push",
            dir,
            "--name",
            "m",
            "--version",
            "1",
            "--channel",
            "stable",
            "--store",
            &from,
        ]),
        Duration::from_secs(120),
    );
    assert!(ok, "{out}");

    let replicate = ["replicate", "--from", &from, "--to", &to];
    let (ok, first) = run(model(&replicate), Duration::from_secs(120));
    assert!(ok, "{first}");
    assert!(first.contains("1 copied, 0 in sync, 0 failed"), "{first}");
    assert!(first.contains("m:stable -> 1"), "{first}");
    let (ok, second) = run(model(&replicate), Duration::from_secs(120));
    assert!(ok, "{second}");
    assert!(second.contains("0 copied, 1 in sync, 0 failed"), "{second}");
    assert!(second.contains("m@1\tlag 0s\tin sync"), "{second}");
    let (ok, verified) = run(
        model(&["verify", "m:stable", "--store", &to]),
        Duration::from_secs(120),
    );
    assert!(ok, "{verified}");

    // Per-store credentials: wrong ones for the destination are refused.
    let mut bad = model(&replicate);
    bad.env("BREAKWATER_TO_AWS_SECRET_ACCESS_KEY", "wrong");
    let (ok, refused) = run(bad, Duration::from_secs(120));
    assert!(!ok, "{refused}");
}
