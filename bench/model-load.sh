#!/usr/bin/env bash
# Model loading from S3-compatible storage: breakwater's pull (parallel
# ranged GETs, every file sha256-verified, landed by rename) vs a plain
# sequential GET of the same objects (curl with SigV4, what `aws s3 cp`
# does for one object at a time, no verification), and the warm start from
# the local cache.
#
# A SeaweedFS server (`weed server`, the one the tests use, from .cache/) runs
# on loopback with its data in a temp dir. The model (default: the demo
# model, SmolLM2-135M-Instruct Q4_1 GGUF from .cache/models/; or MODEL_MB of
# random bytes) is pushed once with `breakwater model push`. Then, RUNS
# times, alternating: a cold pull into an empty cache, and curl fetching
# every object of the version in turn; MB/s is the model's bytes over the
# wall time of the whole command (process start included for both). Then
# RUNS warm starts: `breakwater model pull NAME@VERSION` with the cache
# full, process start to exit (what a GPU host start pays before it maps
# the files). Then (the demo model only: random bytes do not load) RUNS
# GPU host warm starts: `breakwater gpu-host --model-ref NAME@VERSION
# --store … --model-cache …` with the cache full, process start until
# `/health/ready` answers 200 (polled every 5 ms): resolve from the cache,
# map the file, load, warm up with one forward pass. Target: under 200 ms.
# Prints medians and ratios.
#
# Usage: bench/model-load.sh
# Environment (defaults in brackets):
#   RUNS [5]  MODEL_MB [unset: the demo model]  CONCURRENCY [8]  RANGE_MIB [8]
#   OUT_DIR [bench/out/model-load-<timestamp>]  BUILD_TIMEOUT [2400] (seconds)
#   DEVICE [cpu] (the GPU host's --device for the warm start to ready)
#   CARGO_TARGET_DIR (respected)  SKIP_BUILD=1 (use the existing release
#   binary)  BW_BIN (use this binary, e.g. a debug build)  PRIORITY [0]
set -euo pipefail

RUNS=${RUNS:-5}
CONCURRENCY=${CONCURRENCY:-8}
RANGE_MIB=${RANGE_MIB:-8}
PRIORITY=${PRIORITY:-0}
DEVICE=${DEVICE:-cpu}

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd -- "$script_dir/.." && pwd)
stamp=$(date -u +%Y%m%dT%H%M%SZ)
OUT_DIR=${OUT_DIR:-$repo/bench/out/model-load-$stamp}

LOG_TAG=model-load.sh
# shellcheck source=bench/lib.sh
source "$script_dir/lib.sh"

command -v curl >/dev/null || install_packages curl
curl --help all 2>/dev/null | grep -q -- --aws-sigv4 || die "curl lacks --aws-sigv4 (needs curl 7.75 or later)"
if [[ -n ${BW_BIN:-} ]]; then
    bw_bin=$BW_BIN
    [[ -x $bw_bin ]] || die "BW_BIN=$bw_bin is not an executable"
else
    build_breakwater
fi

weed=$(ls "$repo"/.cache/seaweedfs-*/weed 2>/dev/null | head -n 1 || true)
if [[ -z $weed ]]; then
    log "installing the S3 test server (SeaweedFS) into .cache/"
    (cd "$repo" && timeout 1200 cargo run --quiet -p breakwater-store --features test-server --example fetch_test_server >/dev/null) ||
        die "could not install SeaweedFS"
    weed=$(ls "$repo"/.cache/seaweedfs-*/weed | head -n 1)
fi

mkdir -p "$OUT_DIR"
work=$(mktemp -d "${TMPDIR:-/tmp}/bw-model-load.XXXXXX")
on_die() { tail -n 30 "$work/weed.log" 2>/dev/null || true; }

# --- the model ----------------------------------------------------------------
src=$work/model
mkdir -p "$src"
if [[ -n ${MODEL_MB:-} ]]; then
    head -c $((MODEL_MB * 1024 * 1024)) /dev/urandom >"$src/model.gguf"
    model_desc="random bytes, ${MODEL_MB} MiB"
else
    demo=$repo/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
    [[ -f $demo ]] || die "no demo model at $demo (run \`cargo xtask up\` once, or set MODEL_MB)"
    ln -s "$demo" "$src/model.gguf"
    model_desc="the demo model, SmolLM2-135M-Instruct Q4_1 GGUF"
fi
model_bytes=$(stat -L -c %s "$src/model.gguf")

# --- the S3 server ---------------------------------------------------------------
ACCESS=bench-access
SECRET=bench-secret-key
BUCKET=models
cat >"$work/s3.json" <<JSON
{"identities":[{"name":"bench","credentials":[{"accessKey":"$ACCESS","secretKey":"$SECRET"}],"actions":["Admin","Read","List","Tagging","Write"]}]}
JSON
mkdir -p "$work/data"
declare -a p
# (next_free_port runs in a subshell here: record each port in `taken`.)
for i in 0 1 2 3 4 5 6 7; do
    p[i]=$(next_free_port 18400)
    taken="$taken ${p[i]}"
done
s3_port=${p[6]}
# -volume.minFreeSpace: the default (1 % of the disk) makes every volume
# read-only on a large, nearly full disk.
(cd "$work" && exec nice -n "$PRIORITY" "$weed" server -filer -s3 -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$work/data" \
    -master.port="${p[0]}" -master.port.grpc="${p[1]}" -volume.port="${p[2]}" -volume.port.grpc="${p[3]}" \
    -filer.port="${p[4]}" -filer.port.grpc="${p[5]}" -s3.port="$s3_port" -s3.port.grpc="${p[7]}" \
    -filer.localSocket="$work/filer.sock" -s3.localSocket="$work/s3.sock" \
    -s3.config="$work/s3.json" -s3.port.iceberg=0 -s3.port.lance=0 \
    -volume.max=32 -master.volumeSizeLimitMB=1024 -volume.minFreeSpace=256MiB \
    -master.telemetry=false >"$work/weed.log" 2>&1) &
pids+=("$!")
endpoint=http://127.0.0.1:$s3_port
s3curl() { nice -n "$PRIORITY" curl -fsS --max-time 600 --aws-sigv4 "aws:amz:us-east-1:s3" --user "$ACCESS:$SECRET" "$@"; }
for ((i = 0; i < 600; i++)); do
    s3curl -X PUT "$endpoint/$BUCKET" -o /dev/null 2>/dev/null && break
    kill -0 "${pids[-1]}" 2>/dev/null || die "the S3 server exited during startup"
    sleep 0.1
done
((i < 600)) || die "the S3 server did not answer within 60s"
log "S3 server up on $endpoint"

export AWS_ACCESS_KEY_ID=$ACCESS AWS_SECRET_ACCESS_KEY=$SECRET AWS_REGION=us-east-1 RUST_LOG=warn
store="s3://$BUCKET/bench?endpoint=$endpoint"
"$bw_bin" model push "$src" --name bench --version 1 --store "$store" >"$OUT_DIR/push.txt" 2>&1 ||
    { cat "$OUT_DIR/push.txt" >&2; die "push failed"; }
keys=$("$bw_bin" model show bench@1 --store "$store" |
    awk -F'"' '$2 == "path" { print $4 }')
[[ -n $keys ]] || die "the pushed version lists no files"

now_ms() { date +%s%3N; }
mbps() { awk -v b="$1" -v ms="$2" 'BEGIN { printf "%.1f\n", b / 1e6 / (ms / 1000) }'; }

ncpu=$(nproc)
busy_before=$(cpu_busy_pct)
cold_ours=() cold_curl=() warm=()
cache=$work/cache
for ((r = 1; r <= RUNS; r++)); do
    rm -rf "$cache" "$work/curl"
    sync
    t0=$(now_ms)
    nice -n "$PRIORITY" "$bw_bin" model pull bench@1 --cache "$cache" --store "$store" \
        --concurrency "$CONCURRENCY" --range-mib "$RANGE_MIB" >"$OUT_DIR/pull-$r.txt" 2>&1 ||
        { cat "$OUT_DIR/pull-$r.txt" >&2; die "pull failed"; }
    t1=$(now_ms)
    cold_ours+=("$(mbps "$model_bytes" $((t1 - t0)))")

    mkdir -p "$work/curl"
    t0=$(now_ms)
    for key in $keys; do
        s3curl "$endpoint/$BUCKET/bench/models/bench/1/$key" -o "$work/curl/${key//\//_}"
    done
    t1=$(now_ms)
    cold_curl+=("$(mbps "$model_bytes" $((t1 - t0)))")
    cmp -s "$work/curl/model.gguf" "$cache/models/bench/1/model.gguf" || die "curl and pull got different bytes"
    log "cold run $r: pull ${cold_ours[-1]} MB/s, curl ${cold_curl[-1]} MB/s"
done
# Warm: the cache is full from the last run.
for ((r = 1; r <= RUNS; r++)); do
    t0=$(now_ms)
    "$bw_bin" model pull bench@1 --cache "$cache" --store "$store" >"$OUT_DIR/warm-$r.txt" 2>&1 ||
        { cat "$OUT_DIR/warm-$r.txt" >&2; die "warm pull failed"; }
    t1=$(now_ms)
    grep -q "from local cache" "$OUT_DIR/warm-$r.txt" || die "the warm pull did not come from the cache"
    warm+=("$((t1 - t0))")
    log "warm run $r: ${warm[-1]} ms"
done

# Warm start of the GPU host to ready, from the same full cache, no
# network: the version is pinned and cached.
ready=()
if [[ -z ${MODEL_MB:-} ]]; then
    gh_port=$(next_free_port 18600)
    for ((r = 1; r <= RUNS; r++)); do
        t0=$(now_ms)
        RUST_LOG=info "$bw_bin" --log-format json gpu-host --model-ref bench@1 --store "$store" --model-cache "$cache" \
            --listen "127.0.0.1:$gh_port" --device "$DEVICE" >"$OUT_DIR/ready-$r.txt" 2>&1 &
        gh_pid=$!
        pids+=("$gh_pid")
        ok=0
        for ((i = 0; i < 6000; i++)); do
            if curl -fs -o /dev/null --max-time 1 "http://127.0.0.1:$gh_port/health/ready"; then
                ok=1
                break
            fi
            kill -0 "$gh_pid" 2>/dev/null || break
            sleep 0.005
        done
        t1=$(now_ms)
        ((ok)) || { cat "$OUT_DIR/ready-$r.txt" >&2; die "the GPU host did not get ready"; }
        grep -q '"source":"local cache"' "$OUT_DIR/ready-$r.txt" ||
            { cat "$OUT_DIR/ready-$r.txt" >&2; die "the GPU host did not start from the cache"; }
        kill -TERM "$gh_pid" 2>/dev/null || true
        wait "$gh_pid" 2>/dev/null || true
        ready+=("$((t1 - t0))")
        log "gpu-host warm start $r: ready after ${ready[-1]} ms"
    done
fi

ours=$(printf '%s\n' "${cold_ours[@]}" | median)
plain=$(printf '%s\n' "${cold_curl[@]}" | median)
warm_ms=$(printf '%s\n' "${warm[@]}" | median)
ratio=$(awk -v a="$ours" -v b="$plain" 'BEGIN { printf "%.2f", a / b }')
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "machine: nproc=$ncpu, $(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo); S3 server, pull and curl on the same machine (loopback); CPU busy before: ${busy_before}%; nice $PRIORITY"
    echo "commit: $(commit_line)"
    echo "binary: $bw_bin"
    echo "model: $model_desc, $model_bytes bytes; SeaweedFS $(basename "$(dirname "$weed")") (weed server)"
    echo "pull: --concurrency $CONCURRENCY --range-mib $RANGE_MIB, sha256 of every file, fsync, rename; median of $RUNS runs"
    echo
    echo "| measure | breakwater pull | curl, sequential GET | pull/curl |"
    echo "|---|---:|---:|---:|"
    echo "| cold load from S3, MB/s | $ours | $plain | $ratio |"
    echo "| warm start from the local cache, ms (process start to exit) | $warm_ms | | |"
    if ((${#ready[@]})); then
        ready_ms=$(printf '%s\n' "${ready[@]}" | median)
        echo "| gpu-host warm start to ready, ms (process start to /health/ready 200; --device $DEVICE; target < 200) | $ready_ms | | |"
    fi
} | tee "$OUT_DIR/report.md"
