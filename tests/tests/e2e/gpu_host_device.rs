//! `breakwater gpu-host --device`: `auto` serves from a GPU when one is
//! usable and otherwise says once, in the log, that it serves from the CPU;
//! `cuda` where CUDA is absent fails at start with the reason.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use breakwater_e2e::{ChildGuard, PATIENCE, breakwater, free_port};
use breakwater_infer::backend::cuda;
use breakwater_infer::test_model;

const FALLBACK_LINE: &str = "no usable GPU; serving from the CPU backend";

fn tiny_model() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("tiny.gguf");
    std::fs::write(&path, test_model::tiny_llama(3)).expect("write the model");
    let path = path.to_string_lossy().into_owned();
    (dir, path)
}

async fn wait_ready(host: &mut ChildGuard, addr: SocketAddr) {
    host.wait_until_accepts(addr);
    let client = reqwest::Client::new();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let ready = client
            .get(format!("http://{addr}/health/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ready {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "gpu-host not ready within {PATIENCE:?}:\n{}",
            host.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn auto_device_says_once_which_backend_serves() {
    let (_dir, model) = tiny_model();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("address");
    let listen = addr.to_string();
    let mut host = ChildGuard::spawn(breakwater(&[
        "gpu-host",
        "--model",
        &model,
        "--listen",
        &listen,
        "--device",
        "auto",
        "--threads",
        "1",
        "--log-format",
        "json",
    ]));
    wait_ready(&mut host, addr).await;
    let log = host.stderr();
    let fallbacks = log.matches(FALLBACK_LINE).count();
    match cuda::probe() {
        Err(why) => {
            assert_eq!(
                fallbacks, 1,
                "expected the fallback said once ({why}):\n{log}"
            );
            assert!(log.contains(r#""backend":"cpu""#), "{log}");
        }
        Ok(_) => {
            assert_eq!(fallbacks, 0, "a GPU is here, yet:\n{log}");
            assert!(log.contains("serving from the CUDA backend"), "{log}");
        }
    }
    host.sigterm();
    assert!(
        host.wait_timeout(PATIENCE).is_some(),
        "gpu-host did not stop"
    );
}

#[test]
fn cuda_device_without_cuda_fails_with_the_reason() {
    if let Ok(n) = cuda::probe() {
        eprintln!("SKIPPED: {n} CUDA device(s) here, so --device cuda starts");
        return;
    }
    let (_dir, model) = tiny_model();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut host = ChildGuard::spawn(breakwater(&[
        "gpu-host", "--model", &model, "--listen", &listen, "--device", "cuda",
    ]));
    let status = host.wait_timeout(PATIENCE).expect("gpu-host exits");
    assert!(!status.success(), "--device cuda succeeded without CUDA");
    let log = host.stderr();
    assert!(
        log.contains("libcuda") || log.contains("no CUDA device"),
        "the reason is missing:\n{log}"
    );
}
