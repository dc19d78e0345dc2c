#!/usr/bin/env bash
# Edge throughput with the four bundled plugins in the chain vs no plugins,
# on the same node, the same upstream and the same client.
#
# One breakwater node has two routes to one pool: `/plain/` runs no plugin,
# `/chain/` runs waf → rate-limit → router → cache-policy (limits set high
# enough that nothing is refused, so every request runs every plugin and
# reaches the upstream). The upstream is a single-worker nginx answering a
# small fixed body. breakwater gets one core (taskset -c SERVER_CPU, one
# tokio worker; the blocking pool that runs plugin calls is on the same
# core); wrk and the upstream share the other (CLIENT_CPU). Prints medians
# over RUNS runs and the chain/plain ratio; raw wrk output goes to OUT_DIR.
#
# Usage: bench/plugins.sh
# Environment (defaults in brackets):
#   DURATION [10s]  CONNECTIONS [64]  THREADS [1]  WARMUP [3s]  RUNS [3]
#   SERVER_CPU [0]  CLIENT_CPU [1]   BW_PORT/UPSTREAM_PORT [first free from 18180]
#   OUT_DIR [bench/out/plugins-<timestamp>]  BUILD_TIMEOUT [2400] (seconds)
#   CARGO_TARGET_DIR (respected)  SKIP_BUILD=1 (use the existing release
#   binary and plugin artifacts)  PRIORITY [0]: nice value for everything
#   ISOLATION [per-request]: the plugins' `isolation`, per-request or reused
set -euo pipefail

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
WARMUP=${WARMUP:-3s}
RUNS=${RUNS:-3}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
PRIORITY=${PRIORITY:-0}
ISOLATION=${ISOLATION:-per-request}
VARIANTS=(plain chain)

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd -- "$script_dir/.." && pwd)
stamp=$(date -u +%Y%m%dT%H%M%SZ)
OUT_DIR=${OUT_DIR:-$repo/bench/out/plugins-$stamp}

LOG_TAG=plugins.sh
# shellcheck source=bench/lib.sh
source "$script_dir/lib.sh"

install_packages
export PATH="$PATH:/usr/sbin:/sbin"
nginx_bin=$(command -v nginx)
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
declare -A artifact=([waf]=waf [rate-limit]=rate_limit [router]=router [cache-policy]=cache_policy)
declare -A digest
for plugin in "${!artifact[@]}"; do
    file=$wasm_dir/${artifact[$plugin]}.wasm
    [[ -f $file ]] || die "no plugin artifact at $file (run without SKIP_BUILD=1)"
    digest[$plugin]=$(sha256sum "$file" | awk '{ print $1 }')
done

# --- ports and configs ------------------------------------------------------
BW_PORT=${BW_PORT:-$(next_free_port 18180)}
taken="$taken $BW_PORT"
UPSTREAM_PORT=${UPSTREAM_PORT:-$(next_free_port $((BW_PORT + 1)))}
for p in "$BW_PORT" "$UPSTREAM_PORT"; do
    ! port_in_use "$p" || die "port $p on 127.0.0.1 is already in use"
done

work=$(mktemp -d "${TMPDIR:-/tmp}/bw-plugins-bench.XXXXXX")
on_die() {
    log "last lines of breakwater's log:"
    tail -n 20 "$work/breakwater/stderr.log"
}
chmod 755 "$work"
mkdir -p "$work/nginx/tmp" "$work/breakwater"

cat >"$work/breakwater/edge.toml" <<TOML
# Written by bench/plugins.sh: the same pool behind a route without plugins
# and a route with the four bundled ones.
[node]
name = "bench-plugins"

[[listener]]
address = "127.0.0.1:$BW_PORT"

[limits]
shutdown_grace = "1s"
# One core: one plugin phase at a time (the default is one per CPU).
plugin_concurrency = 1

[[route]]
prefix = "/plain/"
pool = "upstream"

[[route]]
prefix = "/chain/"
pool = "upstream"
plugins = ["waf", "rate-limit", "router", "cache-policy"]

[[pool]]
name = "upstream"
endpoints = ["http://127.0.0.1:$UPSTREAM_PORT"]
connect_timeout = "1s"
first_byte_timeout = "5s"

[[plugin]]
name = "waf"
path = "$wasm_dir/waf.wasm"
sha256 = "${digest[waf]}"
isolation = "$ISOLATION"

# A limit no benchmark reaches: every request still takes from its bucket.
[[plugin]]
name = "rate-limit"
path = "$wasm_dir/rate_limit.wasm"
sha256 = "${digest[rate-limit]}"
isolation = "$ISOLATION"
grants = ["counters"]
config = { anonymous = { rate_per_second = 1000000000, burst = 1000000000 } }

# A few rules that do not match, then the default, as a real route table would.
[[plugin]]
name = "router"
path = "$wasm_dir/router.wasm"
sha256 = "${digest[router]}"
isolation = "$ISOLATION"
config = { default_pool = "upstream", rules = [
    { host = "*.internal.example.com", pool = "upstream" },
    { path_prefix = "/chain/v2/", rewrite_prefix = "/chain/", pool = "upstream" },
    { headers = [{ name = "x-beta", present = true }], pool = "upstream" },
] }

[[plugin]]
name = "cache-policy"
path = "$wasm_dir/cache_policy.wasm"
sha256 = "${digest[cache-policy]}"
isolation = "$ISOLATION"
config = { routes = [{ path_prefix = "/chain/", ttl = 60 }] }
TOML

ngx=$work/nginx
cat >"$ngx/nginx.conf" <<NGINX
# Written by bench/plugins.sh: the upstream, a fixed small answer.
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
        location / { return 200 "ok\n"; }
    }
}
NGINX

# --- start servers ----------------------------------------------------------
"$nginx_bin" -t -q -p "$ngx" -e "$ngx/error.log" -c "$ngx/nginx.conf" 2>"$ngx/test.log" ||
    { cat "$ngx/test.log" >&2; die "nginx config test failed"; }
"$bw_bin" config check "$work/breakwater/edge.toml" >/dev/null || die "the generated edge config is invalid"

TOKIO_WORKER_THREADS=1 RUST_LOG=warn,access=off \
    nice -n "$PRIORITY" taskset -c "$SERVER_CPU" "$bw_bin" edge --config "$work/breakwater/edge.toml" \
    >"$work/breakwater/stdout.log" 2>"$work/breakwater/stderr.log" &
pids+=("$!")
nice -n "$PRIORITY" taskset -c "$CLIENT_CPU" "$nginx_bin" -p "$ngx" -e "$ngx/error.log" -c "$ngx/nginx.conf" \
    -g 'daemon off;' >"$ngx/stdout.log" 2>&1 &
pids+=("$!")
wait_ready breakwater "$BW_PORT" "${pids[0]}" "$work/breakwater/stderr.log"
wait_ready nginx "$UPSTREAM_PORT" "${pids[1]}" "$ngx/error.log"

# Both routes must reach the upstream before anything is measured, and the
# chain must really run: the waf answers a scanner 403 on /chain/ only.
for variant in "${VARIANTS[@]}"; do
    body=$(curl -fsS --max-time 5 "http://127.0.0.1:$BW_PORT/$variant/item") ||
        die "GET /$variant/item failed"
    [[ $body == ok ]] || die "GET /$variant/item answered '$body', not the upstream's 'ok'"
done
status=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -A sqlmap/1.7 "http://127.0.0.1:$BW_PORT/chain/item")
[[ $status == 403 ]] || die "the waf did not answer 403 on /chain/ (got $status): the chain is not running"

# --- measure ----------------------------------------------------------------
mkdir -p "$OUT_DIR"
busy_before=$(cpu_busy_pct)
if ((busy_before > 10)); then
    log "warning: CPUs already ${busy_before}% busy before the run; results will be noisy"
fi

declare -A rps p99
SERVERS=("${VARIANTS[@]}")
SIZES=(item)
url_for() { echo "http://127.0.0.1:$BW_PORT/$1/$2"; }
measure_grid

# --- report -----------------------------------------------------------------
{
    report_head "breakwater on cpu $SERVER_CPU, wrk and the nginx upstream on cpu $CLIENT_CPU"
    echo "breakwater: release build, 1 tokio worker; /plain/ no plugins, /chain/ waf → rate-limit → router → cache-policy, isolation = $ISOLATION"
    echo
    echo "| route | req/s | p99 ms |"
    echo "|---|---:|---:|"
    for variant in "${VARIANTS[@]}"; do
        awk -v v="$variant" -v r="${rps[$variant-item]}" -v p="${p99[$variant-item]}" \
            'BEGIN { printf "| %s | %.0f | %.2f |\n", v, r, p }'
    done
    echo
    awk -v c="${rps[chain-item]}" -v p="${rps[plain-item]}" \
        'BEGIN { printf "ratio: chain/plain = %.2f (target 0.80)\n", c / p }'
} | tee "$OUT_DIR/summary.txt"
log "raw wrk output in $OUT_DIR"
