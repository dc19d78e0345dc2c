#!/usr/bin/env bash
# The launch crowd: how much of a crowd asking the same few things the edge
# answers without a GPU. One GPU host (CPU backend, the demo model) behind a
# breakwater edge whose /v1/ route runs cache-policy with request bodies
# shown to it; bench/launch_crowd.py sends REQUESTS greedy chat completions,
# drawn Zipf-like (exponent ZIPF_S) from QUESTIONS distinct questions, from
# CONCURRENCY clients at once; the edge's coalesce_wait is COALESCE_WAIT. Two runs, each on a fresh edge and GPU host:
# without the cache (the same route, `cache = false`), then with it (memory
# tier 1 h, disk tier 4 h, as the demo). Prints per run: X-Cache outcomes,
# hits per tier (and waiters that followed a leader's generation live),
# generations the GPU host made, p50/p99 latency, wall time,
# completion tokens served from the cache; and the ratios of the cached run
# to the uncached one. Raw output goes to OUT_DIR.
#
# Usage: bench/launch-crowd.sh
# Environment (defaults in brackets):
#   REQUESTS [2000]  QUESTIONS [300]  CONCURRENCY [50]  ZIPF_S [1.1]
#   MAX_TOKENS [16]  COALESCE_WAIT [60s]  ONLY [both; `cached` or
#   `uncached` runs one]  GPU_CPU [1] (the GPU host, one thread)  EDGE_CPU [0]
#   (the edge and the client)  OUT_DIR [bench/out/launch-crowd-<timestamp>]
#   SKIP_BUILD=1  MODEL [.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf,
#   fetched when missing]  CARGO_TARGET_DIR (respected)
set -euo pipefail

REQUESTS=${REQUESTS:-2000}
QUESTIONS=${QUESTIONS:-300}
CONCURRENCY=${CONCURRENCY:-50}
ZIPF_S=${ZIPF_S:-1.1}
MAX_TOKENS=${MAX_TOKENS:-16}
# A whole (not streamed) answer's head comes when its generation is done:
# waiters must outwait a generation queued behind the crowd, or they make
# their own.
COALESCE_WAIT=${COALESCE_WAIT:-60s}
ONLY=${ONLY:-}
GPU_CPU=${GPU_CPU:-1}
EDGE_CPU=${EDGE_CPU:-0}

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd -- "$script_dir/.." && pwd)
stamp=$(date -u +%Y%m%dT%H%M%SZ)
OUT_DIR=${OUT_DIR:-$repo/bench/out/launch-crowd-$stamp}
MODEL=${MODEL:-$repo/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf}

LOG_TAG=launch-crowd.sh
# shellcheck source=bench/lib.sh
source "$script_dir/lib.sh"

install_packages
command -v python3 >/dev/null || die "needs python3 (standard library only) for the crowd"
require_two_cpus
build_breakwater
plugin=$repo/plugins/target/wasm32-wasip2/release/cache_policy.wasm
if [[ ! -f $plugin ]]; then
    log "building the plugins"
    (cd "$repo/plugins" && cargo build --release --quiet --target wasm32-wasip2 --target-dir target) ||
        die "plugin build failed"
fi
if [[ ! -f $MODEL ]]; then
    log "fetching the demo model"
    cargo run --quiet --release -p breakwater-infer --example fetch_demo_model --manifest-path "$repo/Cargo.toml"
fi
[[ -f $MODEL ]] || die "no model at $MODEL"
plugin_sha=$(sha256sum "$plugin" | cut -d' ' -f1)

mkdir -p "$OUT_DIR"
work=$(mktemp -d)
busy_before=$(cpu_busy_pct)
model_name=smollm2-135m-instruct

metric_sum() { # metrics-url name [label-filter]
    curl -fsS "$1" | awk -v name="$2" -v filter="${3:-}" '
        $1 ~ ("^" name "({|$)") && index($1, filter) { total += $NF }
        END { printf "%d\n", total }'
}

# One run on a fresh GPU host and edge: $1 is the run's name, $2 true or
# false for the route's cache.
run() {
    local name=$1 cache=$2 gpu_port edge_port admin_port gpu_pid edge_pid before after
    gpu_port=$(next_free_port 18400)
    edge_port=$(next_free_port $((gpu_port + 1)))
    admin_port=$(next_free_port $((edge_port + 1)))
    taskset -c "$GPU_CPU" "$bw_bin" gpu-host --model "$MODEL" --listen "127.0.0.1:$gpu_port" \
        --device cpu --threads 1 >"$OUT_DIR/$name-gpu-host.log" 2>&1 &
    gpu_pid=$!
    pids+=("$gpu_pid")
    local i
    for ((i = 0; i < 600; i++)); do
        curl -fsS "http://127.0.0.1:$gpu_port/health/ready" >/dev/null 2>&1 && break
        kill -0 "$gpu_pid" 2>/dev/null || { cat "$OUT_DIR/$name-gpu-host.log" >&2; die "the GPU host exited"; }
        sleep 0.1
    done
    cat >"$work/$name.toml" <<EOF
[[listener]]
address = "127.0.0.1:$edge_port"

[admin]
address = "127.0.0.1:$admin_port"

[limits]
plugin_queue_timeout = "30s"

[cache]
coalesce_wait = "$COALESCE_WAIT"
memory_ttl_max = "1h"
disk_path = "$work/$name-cache"
disk_ttl_max = "4h"

[[route]]
prefix = "/v1/"
pool = "gpu"
cache = $cache
plugins = ["cache-policy"]
plugin_body_bytes = true

[[pool]]
name = "gpu"
endpoints = ["http://127.0.0.1:$gpu_port"]
first_byte_timeout = "600s"
total_timeout = "600s"

[[plugin]]
name = "cache-policy"
path = "$plugin"
sha256 = "$plugin_sha"
isolation = "reused"
config = { routes = [{ path_prefix = "/v1/", ttl = 3600 }] }
EOF
    taskset -c "$EDGE_CPU" "$bw_bin" edge --config "$work/$name.toml" >"$OUT_DIR/$name-edge.log" 2>&1 &
    edge_pid=$!
    pids+=("$edge_pid")
    wait_ready edge "$edge_port" "$edge_pid" "$OUT_DIR/$name-edge.log"
    before=$(metric_sum "http://127.0.0.1:$gpu_port/metrics" breakwater_infer_sequences_finished_total)
    log "$name: $REQUESTS requests from $CONCURRENCY clients"
    taskset -c "$EDGE_CPU" python3 "$script_dir/launch_crowd.py" --port "$edge_port" --model "$model_name" \
        --requests "$REQUESTS" --questions "$QUESTIONS" --concurrency "$CONCURRENCY" \
        --zipf-s "$ZIPF_S" --max-tokens "$MAX_TOKENS" >"$OUT_DIR/$name.json" ||
        die "$name: requests failed: $(cat "$OUT_DIR/$name.json")"
    after=$(metric_sum "http://127.0.0.1:$gpu_port/metrics" breakwater_infer_sequences_finished_total)
    echo "$((after - before))" >"$OUT_DIR/$name-generations.txt"
    curl -fsS "http://127.0.0.1:$admin_port/metrics" >"$OUT_DIR/$name-edge-metrics.txt"
    kill -TERM "$edge_pid" "$gpu_pid" 2>/dev/null || true
    wait "$edge_pid" "$gpu_pid" 2>/dev/null || true
}

[[ $ONLY == cached ]] || run uncached false
[[ $ONLY == uncached ]] || run cached true

field() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get(sys.argv[2]))' "$1" "$2"; }
tier_hits() { # run tier
    awk -v tier="$2" '$1 ~ /^breakwater_cache_requests_total\{/ && index($1, "tier=\"" tier "\"") && index($1, "result=\"hit\"") { total += $NF } END { printf "%d\n", total }' "$OUT_DIR/$1-edge-metrics.txt"
}
ratio() { python3 -c 'import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); print(f"{a / b:.3f}x" if b else "n/a")' "$1" "$2"; }

any_run=$OUT_DIR/cached.json
[[ -f $any_run ]] || any_run=$OUT_DIR/uncached.json
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "machine: nproc=$(nproc), $(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo); GPU host on CPU $GPU_CPU (CPU backend, 1 thread), edge and client on CPU $EDGE_CPU; CPU busy before: ${busy_before}%"
    echo "commit: $(commit_line)"
    echo "crowd: $REQUESTS greedy chat completions (max_tokens $MAX_TOKENS), Zipf s=$ZIPF_S over $QUESTIONS questions ($(field "$any_run" distinct_questions_asked) asked), $CONCURRENCY clients; model $(basename "$MODEL")"
    for name in uncached cached; do
        [[ -f $OUT_DIR/$name.json ]] || continue
        echo "$name: x-cache $(field "$OUT_DIR/$name.json" x_cache); hits memory $(tier_hits "$name" memory), disk $(tier_hits "$name" disk), waiters fed a leader's generation live $(tier_hits "$name" none); GPU generations $(cat "$OUT_DIR/$name-generations.txt"); p50 $(field "$OUT_DIR/$name.json" p50_ms) ms, p99 $(field "$OUT_DIR/$name.json" p99_ms) ms; wall $(field "$OUT_DIR/$name.json" wall_s) s; completion tokens from cache $(field "$OUT_DIR/$name.json" completion_tokens_from_cache) of $(field "$OUT_DIR/$name.json" completion_tokens_served)"
    done
    if [[ -z $ONLY ]]; then
        echo "cached/uncached: GPU generations $(ratio "$(cat "$OUT_DIR/cached-generations.txt")" "$(cat "$OUT_DIR/uncached-generations.txt")"), p50 $(ratio "$(field "$OUT_DIR/cached.json" p50_ms)" "$(field "$OUT_DIR/uncached.json" p50_ms)"), p99 $(ratio "$(field "$OUT_DIR/cached.json" p99_ms)" "$(field "$OUT_DIR/uncached.json" p99_ms)"), wall $(ratio "$(field "$OUT_DIR/cached.json" wall_s)" "$(field "$OUT_DIR/uncached.json" wall_s)")"
    fi
} | tee "$OUT_DIR/summary.txt"
