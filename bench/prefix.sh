#!/usr/bin/env bash
# Prefix caching and prefix-aware routing under a multi-tenant chat crowd.
#
# Three `breakwater gpu-host` processes (CPU backend, the demo model, one
# thread each) behind one release-built edge node. The driver
# (tests/src/bin/chat-driver.rs) runs TENANTS apps, each with its own
# system prompt of about SYSTEM_TOKENS tokens: CONVERSATIONS conversations
# of TURNS turns start at Poisson arrival times (RATE per second, the same
# arrivals in every configuration), each turn carrying the answers before
# it. Three configurations, each on fresh processes:
#   least-loaded         balance = "least-loaded", hosts --no-prefix-cache
#   least-loaded+cache   balance = "least-loaded", prefix cache on
#   prefix+cache         balance = "prefix" (bounded-load rendezvous on the
#                        prompt's first 4 KiB, load_factor LOAD_FACTOR,
#                        load_slack LOAD_SLACK), prefix cache on
# Per configuration it prints the time to first token (p50/p90) and total
# latency, the prompt tokens the hosts computed, the prefix cache's hit
# rate (hit over queried tokens, from the hosts' /metrics), completion
# tokens per second, the requests each host served (max over average:
# the load spread), and under prefix balancing the requests that spilled
# from their key's first host (the edge's
# breakwater_upstream_prefix_routed_total). The ratio lines compare p90
# TTFT with the first configuration's.
#
# Usage: bench/prefix.sh
# Environment (defaults in brackets):
#   TENANTS [20]  CONVERSATIONS [60]  TURNS [3]  RATE [0.3]
#   (three conversations per tenant, so a tenant's system prompt recurs
#   beyond its first request; at 20 conversations and 0.1/s a third of the
#   requests are a tenant's first, necessarily cold, and since the CPU
#   backend's batch kernels the hosts are not loaded: every configuration's
#   p90 is one cold prefill)
#   SYSTEM_TOKENS [1000]  MAX_TOKENS [16]  THINK_MS [500]  SEED [1]
#   KV_BUDGET_MB [2048] (per host: the gpu-host default of 512 holds
#   about 23,000 of the demo model's tokens, most of which a one-thread CPU
#   host's admitted sequences, up to 16 of ~1,000 tokens, take, evicting
#   idle prefixes; a GPU's pool is many times its running batch)
#   HOSTS [3]  LOAD_FACTOR [1.25]  LOAD_SLACK [0]
#   CONFIGS ["least-loaded least-loaded+cache prefix+cache"]
#   OUT_DIR [bench/out/prefix-<timestamp>]
#   BUILD_TIMEOUT [2400] (seconds)  CARGO_TARGET_DIR (respected)
#   SKIP_BUILD=1 (use existing release binaries)
#   BIN_DIR (take breakwater and chat-driver from there, e.g. target/debug;
#   builds nothing)
set -euo pipefail

TENANTS=${TENANTS:-20}
CONVERSATIONS=${CONVERSATIONS:-60}
TURNS=${TURNS:-3}
RATE=${RATE:-0.3}
SYSTEM_TOKENS=${SYSTEM_TOKENS:-1000}
MAX_TOKENS=${MAX_TOKENS:-16}
THINK_MS=${THINK_MS:-500}
SEED=${SEED:-1}
KV_BUDGET_MB=${KV_BUDGET_MB:-2048}
HOSTS=${HOSTS:-3}
LOAD_FACTOR=${LOAD_FACTOR:-1.25}
LOAD_SLACK=${LOAD_SLACK:-0}
CONFIGS=${CONFIGS:-least-loaded least-loaded+cache prefix+cache}

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd -- "$script_dir/.." && pwd)
stamp=$(date -u +%Y%m%dT%H%M%SZ)
OUT_DIR=${OUT_DIR:-$repo/bench/out/prefix-$stamp}

LOG_TAG=prefix.sh
# shellcheck source=bench/lib.sh
source "$script_dir/lib.sh"

command -v curl >/dev/null || die "needs curl"
if [[ -n ${BIN_DIR:-} ]]; then
    SKIP_BUILD=1
    bw_bin=$BIN_DIR/breakwater
else
    build_breakwater
fi
target_dir=${CARGO_TARGET_DIR:-$repo/target}
bin_dir=${BIN_DIR:-$target_dir/release}
driver_bin=$bin_dir/chat-driver
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    log "building the chat driver (release)"
    (cd "$repo" && timeout "${BUILD_TIMEOUT:-2400}" nice -n 10 cargo build --release --quiet -p breakwater-e2e \
        --bin chat-driver) || die "release build of the chat driver failed"
fi
[[ -x $driver_bin ]] || die "no chat-driver in $bin_dir"
model="$repo/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ ! -f $model ]]; then
    log "fetching the demo model"
    (cd "$repo" && cargo run --quiet --release -p breakwater-infer --example fetch_demo_model)
fi
[[ -f $model ]] || die "no demo model at $model"

work=$(mktemp -d "${TMPDIR:-/tmp}/bw-prefix-bench.XXXXXX")
mkdir -p "$OUT_DIR"

hosts=()
host_ports=()
edge_pid=""
start_host() { # index no-cache-flag
    local port i log=$work/host-$1.log
    port=$(next_free_port 19500)
    # shellcheck disable=SC2086 # the flag is empty or one word
    "$bw_bin" gpu-host --model "$model" --model-name test --listen "127.0.0.1:$port" \
        --device cpu --threads 1 --kv-budget-mb "$KV_BUDGET_MB" $2 >"$log" 2>&1 &
    hosts+=("$!")
    host_ports+=("$port")
    pids+=("$!")
    for ((i = 0; i < 1200; i++)); do
        curl -fsS "http://127.0.0.1:$port/health/ready" >/dev/null 2>&1 && return 0
        kill -0 "${hosts[-1]}" 2>/dev/null || { cat "$log" >&2; die "gpu-host $1 exited"; }
        sleep 0.1
    done
    die "gpu-host $1 not ready within 120s"
}
stop_all() {
    local pid
    for pid in "${hosts[@]}" $edge_pid; do
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    hosts=()
    host_ports=()
    edge_pid=""
}

# Sum of a metric's series (every label set) in a /metrics text on stdin.
metric_sum() { awk -v m="$1" '$1 == m || index($1, m "{") == 1 { n += $2 } END { print n + 0 }'; }

run_config() { # name
    local name=$1 balance flag="" port admin config i endpoints="" out line
    case $name in
    least-loaded) balance=least-loaded flag=--no-prefix-cache ;;
    least-loaded+cache) balance=least-loaded ;;
    prefix+cache) balance=prefix ;;
    *) die "unknown configuration $name" ;;
    esac
    for ((i = 0; i < HOSTS; i++)); do
        start_host "$i" "$flag"
        endpoints="$endpoints${endpoints:+, }\"http://127.0.0.1:${host_ports[$i]}\""
    done
    port=$(next_free_port 18580)
    admin=$(next_free_port 18590)
    config=$work/$name.toml
    cat >"$config" <<TOML
[node]
name = "prefix-bench"
region = "eu"

[[listener]]
address = "127.0.0.1:$port"

[admin]
address = "127.0.0.1:$admin"

[[route]]
prefix = "/"
pool = "gpu"
# A cold prefill of a long system prompt on a one-thread CPU host holds a
# batch's other streams back for seconds.
stall_timeout = "120s"

[[pool]]
name = "gpu"
region = "eu"
endpoints = [$endpoints]
balance = "$balance"
load_factor = $LOAD_FACTOR
load_slack = $LOAD_SLACK
connect_timeout = "500ms"
first_byte_timeout = "600s"
health = { path = "/health/ready", interval = "1s", timeout = "1s" }
TOML
    "$bw_bin" edge --config "$config" >"$work/edge-$name.log" 2>&1 &
    edge_pid=$!
    pids+=("$edge_pid")
    wait_ready breakwater "$port" "$edge_pid" "$work/edge-$name.log"
    wait_ready "breakwater admin" "$admin" "$edge_pid" "$work/edge-$name.log"

    out=$OUT_DIR/$name
    log "$name: $CONVERSATIONS conversations of $TURNS turns over $TENANTS tenants, $RATE/s"
    "$driver_bin" --url "http://127.0.0.1:$port/v1/chat/completions" --model test \
        --tenants "$TENANTS" --conversations "$CONVERSATIONS" --turns "$TURNS" --rate "$RATE" \
        --system-tokens "$SYSTEM_TOKENS" --max-tokens "$MAX_TOKENS" --think-ms "$THINK_MS" \
        --seed "$SEED" --out "$out-requests.txt" >"$out-driver.txt" 2>&1 ||
        log "$name: the driver reports failures: $(tail -n 3 "$out-driver.txt")"
    curl -fsS "http://127.0.0.1:$admin/metrics" >"$out-edge-metrics.txt" || die "cannot read the edge's metrics"
    local spilled
    spilled=$(awk '$1 ~ /^breakwater_upstream_prefix_routed_total\{/ && $1 ~ /outcome="spilled"/ { n += $2 } END { print n + 0 }' \
        "$out-edge-metrics.txt")
    local computed=0 hits=0 queried=0 served=() m
    for ((i = 0; i < HOSTS; i++)); do
        curl -fsS "http://127.0.0.1:${host_ports[$i]}/metrics" >"$out-host$i-metrics.txt" ||
            die "cannot read host $i's metrics"
        m=$out-host$i-metrics.txt
        computed=$((computed + $(metric_sum breakwater_infer_prompt_tokens_total <"$m")))
        hits=$((hits + $(metric_sum breakwater_infer_prefix_cache_hit_tokens_total <"$m")))
        queried=$((queried + $(metric_sum breakwater_infer_prefix_cache_queried_tokens_total <"$m")))
        served+=("$(awk '$1 ~ /^breakwater_infer_sequences_finished_total\{/ && $1 !~ /cancelled|error|deadline/ { n += $2 } END { print n + 0 }' "$m")")
    done
    stop_all
    line=$(tail -n 1 "$out-driver.txt")
    field() { tr ' ' '\n' <<<"$line" | sed -n "s/^$1=//p"; }
    awk -v name="$name" -v ok="$(field ok)" -v requests="$(field requests)" \
        -v p50="$(field ttft_p50_ms)" -v p90="$(field ttft_p90_ms)" \
        -v t50="$(field total_p50_ms)" -v t90="$(field total_p90_ms)" \
        -v wall="$(field wall_ms)" -v gen="$(field completion_tokens)" \
        -v computed="$computed" -v hits="$hits" -v queried="$queried" -v served="${served[*]}" \
        -v spilled="$spilled" 'BEGIN {
            n = split(served, s, " "); sum = 0; max = 0
            for (i = 1; i <= n; i++) { sum += s[i]; if (s[i] > max) max = s[i] }
            spread = (sum > 0) ? max / (sum / n) : 0
            printf "%-19s %4s/%-4s %8.0f %8.0f %8.0f %8.0f %9d %5.1f%% %7.2f  %-12s %5.2f %7d\n",
                name, ok, requests, p50, p90, t50, t90, computed,
                (queried > 0) ? 100 * hits / queried : 0, (wall > 0) ? gen / (wall / 1000) : 0,
                served, spread, spilled
        }' | tee -a "$work/rows" "$OUT_DIR/summary.txt"
}

busy=$(cpu_busy_pct)
{
    echo "# bench/prefix.sh $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "machine: $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo); nproc=$(nproc); CPU busy before: $busy%"
    echo "workload: $TENANTS tenants, system prompts of ~$SYSTEM_TOKENS tokens, $CONVERSATIONS conversations x $TURNS turns, Poisson $RATE/s, $MAX_TOKENS tokens per answer, think ${THINK_MS} ms; $HOSTS CPU hosts x 1 thread, demo model, KV $KV_BUDGET_MB MiB each; prefix load_factor $LOAD_FACTOR, load_slack $LOAD_SLACK"
} | tee "$OUT_DIR/summary.txt"
: >"$work/rows"
header=$(printf "%-19s %9s %8s %8s %8s %8s %9s %6s %7s  %-12s %5s %7s" \
    config ok ttft_p50 ttft_p90 tot_p50 tot_p90 prefilled hit% gen_t/s per_host spread spilled)
echo "$header (ms)" | tee -a "$OUT_DIR/summary.txt"
for name in $CONFIGS; do
    run_config "$name"
done
awk 'NR == 1 { base = $4; first = $1 } NR > 1 && $4 > 0 { printf "p90 TTFT, %s over %s: %.2fx\n", first, $1, base / $4 }' \
    "$work/rows" | tee -a "$OUT_DIR/summary.txt"
log "raw results in $OUT_DIR"
