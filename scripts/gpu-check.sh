#!/usr/bin/env bash
# The CUDA backend's checks on a machine with an NVIDIA GPU, from binaries
# built on a machine with cargo (the GPU machines have no crates registry).
#
#   scripts/gpu-check.sh build   # here: builds the test and bench binaries
#                                # into .cache/gpu-check (stripped, ~40 MB)
#   scripts/gpu-check.sh run     # there, in a checkout carrying .cache/gpu-check
#
# `run` needs python3 with torch and transformers (the peer of the bench)
# and the CUDA libraries of PyTorch's wheels (cuBLAS, NVRTC), which it puts
# on LD_LIBRARY_PATH. It runs, in order (each even when one before failed,
# so that one run tells all):
#
#   1. the kernel unit tests: every kernel against the CPU arithmetic on
#      random inputs (the lib's backend::cuda tests);
#   2. the parity tests: greedy tokens identical to the CPU backend and
#      logits within tolerance, on generated models, one with the demo
#      model's exact shapes (tests/integration/cuda_parity.rs);
#   3. bench/infer.sh --device cuda: decode tok/s at 1, 8, 32, 64 streams
#      and prefill tok/s, next to transformers on the same safetensors.
#
# A test that finds no GPU prints SKIPPED; here that is a failure, since
# the point of the run is that the GPU checks ran. Whole run: ~3 minutes on
# an H100 (under 8 by design). Results go to stdout and $OUT (default
# target/gpu-check) for bench/RESULTS.md.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin="$repo/.cache/gpu-check"
log() { printf '[gpu-check] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

build() {
    cd "$repo"
    mkdir -p "$bin"
    local json
    json=$(mktemp)
    cargo build -p breakwater-infer --example infer_bench
    cargo test -p breakwater-infer --lib --test integration --no-run --message-format=json >"$json"
    python3 - "$json" "$bin" <<'PY'
import json, shutil, sys
names = {"breakwater_infer": "infer-lib-tests", "integration": "cuda-parity"}
for line in open(sys.argv[1]):
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["profile"]["test"]:
        name = names.get(msg["target"]["name"])
        if name:
            shutil.copy(msg["executable"], f"{sys.argv[2]}/{name}")
PY
    rm -f "$json"
    cp "${CARGO_TARGET_DIR:-target}/debug/examples/infer_bench" "$bin/infer_bench"
    strip "$bin"/infer-lib-tests "$bin"/cuda-parity "$bin"/infer_bench
    ls -la "$bin"
}

run() {
    local out=${OUT:-$repo/target/gpu-check}
    mkdir -p "$out"
    for b in infer-lib-tests cuda-parity infer_bench; do
        [[ -x $bin/$b ]] || die "missing $bin/$b: run '$0 build' on a machine with cargo and carry .cache/gpu-check"
    done
    # PyTorch's wheels keep cuBLAS and NVRTC under site-packages/nvidia/*/lib.
    local libs
    libs=$(python3 -c 'import glob, os, nvidia; print(":".join(sorted({d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "*", "lib"))})))') \
        || die "python3 cannot import the nvidia wheels (PyTorch's CUDA libraries)"
    export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt" || true

    # Every step runs even when one before failed, so one run tells all.
    local failed=()
    log "1/3 kernel unit tests"
    "$bin/infer-lib-tests" backend::cuda --test-threads=1 --nocapture >"$out/kernels.txt" 2>&1 || failed+=(kernels)
    cat "$out/kernels.txt"
    if grep -q SKIPPED "$out/kernels.txt"; then failed+=("kernels (skipped: no usable GPU)"); fi

    log "2/3 parity with the CPU backend"
    "$bin/cuda-parity" cuda_parity:: --test-threads=1 --nocapture >"$out/parity.txt" 2>&1 || failed+=(parity)
    cat "$out/parity.txt"
    if grep -q SKIPPED "$out/parity.txt"; then failed+=("parity (skipped: no usable GPU)"); fi

    log "3/3 throughput against transformers"
    INFER_BENCH="$bin/infer_bench" "$repo/bench/infer.sh" --device cuda "$@" >"$out/bench.txt" 2>&1 || failed+=(bench)
    cat "$out/bench.txt"

    if [[ ${#failed[@]} -gt 0 ]]; then
        die "failed: ${failed[*]}"
    fi
    log "all GPU checks passed"
}

case ${1:-} in
    build) build ;;
    run) shift; run "$@" ;;
    *) die "usage: $0 build|run [bench/infer.sh options]" ;;
esac
