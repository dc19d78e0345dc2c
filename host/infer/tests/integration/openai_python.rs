//! The official `openai` Python client (`tests/openai_client.py`) against an
//! in-process server on the demo model. It needs the venv `cargo xtask test`
//! creates (`.cache/venv-openai`) and fails with that advice without it.

use crate::support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use breakwater_infer::demo_model;
use breakwater_infer::gguf::Gguf;
use breakwater_infer::scheduler::EngineConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_client_works_stream_and_whole() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join(".cache/venv-openai/bin/python");
    // A missing venv fails rather than skips: a skipped client test would
    // pass while proving nothing.
    assert!(
        python.is_file(),
        "no {}: `cargo xtask test` creates it (python3 -m venv, then pip install the pinned openai)",
        python.display()
    );
    let path = demo_model::ensure(&demo_model::default_dir()).expect("fetch the demo model");
    let gguf = Gguf::open(path).expect("parse the demo model");
    let s = support::start(&gguf, demo_model::MODEL_NAME, EngineConfig::default()).await;
    let script = root.join("tests/openai_client.py");
    let base = format!("{}/v1", s.base);
    let run = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .args(["--base-url", &base, "--model", demo_model::MODEL_NAME])
            .args(["--expect", "The capital of France is Paris."])
            .output()
    });
    let output = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the script finishes within two minutes")
        .expect("join")
        .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    assert!(stdout.contains(": ok;"), "{stdout}");
}
