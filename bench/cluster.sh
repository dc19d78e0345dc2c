#!/usr/bin/env bash
# What `[cluster]` costs a node, and how closely three nodes hold a limit
# between them, against a real redis-server.
#
# Throughput: three nodes, each alone on SERVER_CPU while measured, run the
# same route (the bundled rate-limit plugin, the response cache, an nginx
# upstream answering a small body with `Cache-Control: max-age=1`):
#   local      no [cluster]: every bucket in the node's memory
#   shared     [cluster] with shared counters: buckets in Redis, leased
#   shared-l3  shared counters and the shared cache tier (every stored
#              answer also written to Redis)
# wrk rotates KEYS API keys (a Lua script), each limited to KEY_RATE
# requests a second, well above what one key is offered: nothing is
# refused, and every key needs its own lease, a Redis call for every
# KEY_RATE × 50 ms requests of a key. Prints medians of RUNS runs and the
# ratio to `local` (the goal: shared ≥ 0.90).
#
# Accuracy: three nodes sharing Redis, each flooded by its own wrk for
# DURATION with one key limited to 100 requests a second (burst 20); the
# upstream's access log counts what the three admitted between them.
#
# Faults: wrk against the `shared` node for DURATION while Redis is up
# throughout, then again while Redis is killed a third of the way in and
# started again (empty) at two thirds: p99 and the slowest request of each
# (the budget is the default 5 ms, the fallback `local`).
#
# Redis, nginx and wrk share CLIENT_CPU.
#
# Usage: bench/cluster.sh
# Environment (defaults in brackets):
#   DURATION [10s]  CONNECTIONS [64]  THREADS [1]  WARMUP [3s]  RUNS [3]
#   KEYS [200]  KEY_RATE [1000]  SERVER_CPU [0]  CLIENT_CPU [1]
#   OUT_DIR [bench/out/cluster-<timestamp>]  SKIP_BUILD=1 (use the existing
#   release binary and plugin artifacts)  CARGO_TARGET_DIR (respected)
#   PRIORITY [0]: nice value for everything  ISOLATION [reused]: the
#   plugin's isolation (the demo's), per-request or reused
set -euo pipefail

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
WARMUP=${WARMUP:-3s}
RUNS=${RUNS:-3}
KEYS=${KEYS:-200}
KEY_RATE=${KEY_RATE:-1000}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
PRIORITY=${PRIORITY:-0}
ISOLATION=${ISOLATION:-reused}
VARIANTS=(local shared shared-l3)

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd -- "$script_dir/.." && pwd)
stamp=$(date -u +%Y%m%dT%H%M%SZ)
OUT_DIR=${OUT_DIR:-$repo/bench/out/cluster-$stamp}

LOG_TAG=cluster.sh
# shellcheck source=bench/lib.sh
source "$script_dir/lib.sh"

install_packages redis-server
export PATH="$PATH:/usr/sbin:/sbin"
nginx_bin=$(command -v nginx)
redis_bin=$(command -v redis-server || echo /usr/bin/redis-server)
require_two_cpus

# --- build ------------------------------------------------------------------
build_breakwater
wasm_dir=$repo/plugins/target/wasm32-wasip2/release
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    log "building the plugins (wasm32-wasip2, release)"
    rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
    (cd "$repo/plugins" && nice -n 10 cargo build --release --quiet --target wasm32-wasip2 --target-dir target) ||
        die "plugin build failed"
fi
rate_limit=$wasm_dir/rate_limit.wasm
[[ -f $rate_limit ]] || die "no plugin artifact at $rate_limit (run without SKIP_BUILD=1)"
rate_limit_sha=$(sha256sum "$rate_limit" | awk '{ print $1 }')

# --- ports --------------------------------------------------------------------
REDIS_PORT=$(next_free_port 18500)
UPSTREAM_PORT=$(next_free_port 18501)
declare -A port
for variant in "${VARIANTS[@]}" node-a node-b node-c; do
    port[$variant]=$(next_free_port 18502)
done

work=$(mktemp -d "${TMPDIR:-/tmp}/bw-cluster-bench.XXXXXX")
chmod 755 "$work"
mkdir -p "$work/nginx/tmp" "$work/redis" "$OUT_DIR"
on_die() {
    local f
    for f in "$work"/*/stderr.log; do
        [[ -f $f ]] || continue
        log "last lines of $f:"
        tail -n 20 "$f"
    done
}

# --- redis and the upstream ---------------------------------------------------
start_redis() {
    nice -n "$PRIORITY" taskset -c "$CLIENT_CPU" "$redis_bin" --port "$REDIS_PORT" --bind 127.0.0.1 \
        --save "" --appendonly no --dir "$work/redis" >>"$work/redis/stdout.log" 2>&1 &
    redis_pid=$!
    pids+=("$redis_pid")
    wait_ready redis "$REDIS_PORT" "$redis_pid" "$work/redis/stdout.log"
}
start_redis

ngx=$work/nginx
cat >"$ngx/nginx.conf" <<NGINX
# Written by bench/cluster.sh: the upstream, a small answer cacheable for 1 s;
# /limited/ is logged, one line a request the edges let through.
worker_processes 1;
pid $ngx/nginx.pid;
error_log $ngx/error.log warn;
events {
    worker_connections 4096;
    multi_accept on;
}
http {
    access_log off;
    keepalive_timeout 65s;
    keepalive_requests 1000000;
    server_tokens off;
    client_body_temp_path $ngx/tmp/body;
    proxy_temp_path $ngx/tmp/proxy;
    fastcgi_temp_path $ngx/tmp/fastcgi;
    uwsgi_temp_path $ngx/tmp/uwsgi;
    scgi_temp_path $ngx/tmp/scgi;
    server {
        listen 127.0.0.1:$UPSTREAM_PORT;
        default_type text/plain;
        location / {
            add_header Cache-Control "max-age=1";
            return 200 "ok\n";
        }
        location /limited/ {
            access_log $ngx/admitted.log;
            return 200 "ok\n";
        }
    }
}
NGINX
"$nginx_bin" -t -q -p "$ngx" -e "$ngx/error.log" -c "$ngx/nginx.conf" 2>"$ngx/test.log" ||
    { cat "$ngx/test.log" >&2; die "nginx config test failed"; }
nice -n "$PRIORITY" taskset -c "$CLIENT_CPU" "$nginx_bin" -p "$ngx" -e "$ngx/error.log" -c "$ngx/nginx.conf" \
    -g 'daemon off;' >"$ngx/stdout.log" 2>&1 &
pids+=("$!")
wait_ready nginx "$UPSTREAM_PORT" "${pids[-1]}" "$ngx/error.log"

# --- the nodes ----------------------------------------------------------------
keys_table=$(for ((i = 1; i <= KEYS; i++)); do printf 'k%d = "t", ' "$i"; done)
write_node() { # name cluster-section
    local dir=$work/$1
    mkdir -p "$dir"
    cat >"$dir/edge.toml" <<TOML
# Written by bench/cluster.sh.
[node]
name = "bench-cluster-$1"

[[listener]]
address = "127.0.0.1:${port[$1]}"

[limits]
shutdown_grace = "1s"
plugin_concurrency = 1

$2

[[route]]
prefix = "/cached/"
pool = "upstream"
plugins = ["rate-limit"]
cache = true

[[route]]
prefix = "/limited/"
pool = "upstream"
plugins = ["rate-limit"]

[[pool]]
name = "upstream"
endpoints = ["http://127.0.0.1:$UPSTREAM_PORT"]
connect_timeout = "1s"
first_byte_timeout = "5s"

[[plugin]]
name = "rate-limit"
path = "$rate_limit"
sha256 = "$rate_limit_sha"
grants = ["counters"]
isolation = "$ISOLATION"
config = { tiers = { t = { rate_per_second = $KEY_RATE, burst = $KEY_RATE }, crowd = { rate_per_second = 100, burst = 20 } }, keys = { $keys_table k-crowd = "crowd" } }
TOML
    "$bw_bin" config check "$dir/edge.toml" >/dev/null || die "the generated config of $1 is invalid"
}
start_node() { # name
    local dir=$work/$1
    TOKIO_WORKER_THREADS=1 RUST_LOG=warn,access=off \
        nice -n "$PRIORITY" taskset -c "$SERVER_CPU" "$bw_bin" edge --config "$dir/edge.toml" \
        >"$dir/stdout.log" 2>"$dir/stderr.log" &
    pids+=("$!")
    wait_ready "$1" "${port[$1]}" "${pids[-1]}" "$dir/stderr.log"
}
cluster="[cluster]
redis_url = \"redis://127.0.0.1:$REDIS_PORT\""
write_node local ""
write_node shared "$cluster
cache = \"off\""
write_node shared-l3 "$cluster
cache = \"all\""
for name in node-a node-b node-c; do
    write_node "$name" "$cluster
cache = \"off\""
done
for name in "${VARIANTS[@]}" node-a node-b node-c; do
    start_node "$name"
done
sleep 1 # the links' first ping
# The nodes' start-up (compiling the plugin) must be over before the
# machine is said to be quiet.
sleep 4

cat >"$work/keys.lua" <<LUA
-- Written by bench/cluster.sh: each request carries the next of $KEYS keys.
local i = 0
request = function()
    i = i % $KEYS + 1
    return wrk.format("GET", nil, { ["Authorization"] = "Bearer k" .. i })
end
LUA
for variant in "${VARIANTS[@]}"; do
    status=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H 'Authorization: Bearer k1' \
        "http://127.0.0.1:${port[$variant]}/cached/item")
    [[ $status == 200 ]] || die "GET /cached/item on $variant answered $status"
done

# --- throughput ---------------------------------------------------------------
busy_before=$(cpu_busy_pct)
if ((busy_before > 10)); then
    log "warning: CPUs already ${busy_before}% busy before the run; results will be noisy"
fi
declare -A rps p99
SERVERS=("${VARIANTS[@]}")
SIZES=(item)
url_for() { echo "http://127.0.0.1:${port[$1]}/cached/$2"; }
wrk_extra=(-s "$work/keys.lua")
measure_grid
wrk_extra=()

# --- accuracy -----------------------------------------------------------------
log "accuracy: three nodes flooded for $DURATION with one key limited to 100/s"
: >"$ngx/admitted.log"
flood_pids=()
for name in node-a node-b node-c; do
    timeout $(($(secs "$DURATION") + 30)) taskset -c "$CLIENT_CPU" wrk -t1 -c4 -d"$DURATION" \
        -H 'Authorization: Bearer k-crowd' "http://127.0.0.1:${port[$name]}/limited/x" \
        >"$OUT_DIR/flood-$name.txt" 2>&1 &
    flood_pids+=("$!")
done
for pid in "${flood_pids[@]}"; do wait "$pid"; done
admitted=$(wc -l <"$ngx/admitted.log")
offered=$(cat "$OUT_DIR"/flood-node-*.txt | awk '/requests in/ { n += $1 } END { print n }')

# --- faults -------------------------------------------------------------------
max_ms_of() {
    awk '$1 == "Latency" && NF >= 4 {
        v = $4; n = v + 0
        if (v ~ /us$/) n /= 1000
        else if (v ~ /ms$/) n *= 1
        else if (v ~ /m$/) n *= 60000
        else if (v ~ /s$/) n *= 1000
        printf "%.2f\n", n; exit
    }' "$1"
}
seconds=$(secs "$DURATION")
wrk_extra=(-s "$work/keys.lua")
log "faults: the shared node with Redis up, then with Redis killed and restarted mid-run"
run_wrk "$(url_for shared item)" "$DURATION" "$OUT_DIR/fault-steady.txt"
run_wrk "$(url_for shared item)" "$DURATION" "$OUT_DIR/fault-killed.txt" &
fault_wrk=$!
sleep $((seconds / 3))
kill -KILL "$redis_pid"
wait "$redis_pid" 2>/dev/null || true
sleep $((seconds / 3))
start_redis
wait "$fault_wrk"
wrk_extra=()

# --- report -------------------------------------------------------------------
{
    report_head "the nodes on cpu $SERVER_CPU (one measured at a time), wrk, nginx and redis-server on cpu $CLIENT_CPU"
    echo "redis-server: $("$redis_bin" --version | awk '{ print $3 }'); wrk rotates $KEYS keys of $KEY_RATE req/s each; rate-limit isolation $ISOLATION"
    echo
    echo "| node | req/s | p99 ms | ratio to local |"
    echo "|---|---:|---:|---:|"
    for variant in "${VARIANTS[@]}"; do
        awk -v v="$variant" -v r="${rps[$variant-item]}" -v p="${p99[$variant-item]}" -v l="${rps[local-item]}" \
            'BEGIN { printf "| %s | %.0f | %.2f | %.2f |\n", v, r, p, r / l }'
    done
    echo
    awk -v a="$admitted" -v o="$offered" -v s="$seconds" 'BEGIN {
        printf "accuracy: 3 nodes offered %.0f req/s for a limit of 100/s (burst 20, included) admitted %.1f req/s over %d s (%+.1f%%)\n",
            o / s, a / s, s, 100 * (a / s - 100) / 100
    }'
    echo
    echo "| shared node, $DURATION | req/s | p99 ms | max ms |"
    echo "|---|---:|---:|---:|"
    for run in steady killed; do
        f=$OUT_DIR/fault-$run.txt
        echo "| Redis $run | $(rps_of "$f") | $(p99_ms_of "$f") | $(max_ms_of "$f") |"
    done
} | tee "$OUT_DIR/summary.txt"
log "raw wrk output in $OUT_DIR"
