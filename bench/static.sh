#!/usr/bin/env bash
# Static file serving: breakwater vs nginx, side by side, same files, same
# machine, same client.
#
# Both servers get one core (taskset -c SERVER_CPU) and one worker (nginx:
# worker_processes 1; breakwater: TOKIO_WORKER_THREADS=1); wrk gets another
# core (taskset -c CLIENT_CPU). Everything listens on 127.0.0.1 only and is
# stopped on exit. Prints medians over RUNS runs and the breakwater/nginx
# ratio per file size; raw wrk output goes to OUT_DIR.
#
# Usage: bench/static.sh
# Environment (defaults in brackets):
#   DURATION [10s]  CONNECTIONS [64]  THREADS [1]  WARMUP [3s]  RUNS [3]
#   SERVER_CPU [0]  CLIENT_CPU [1]   BW_PORT/NGINX_PORT [first free from 18080]
#   OUT_DIR [bench/out/static-<timestamp>]  BUILD_TIMEOUT [2400] (seconds)
#   CARGO_TARGET_DIR (respected)  SKIP_BUILD=1 (use an existing release binary)
#   ACCESS_LOG [off]: "on" gives both servers an access log to a file
#   (breakwater: the `access` target at info; nginx: access_log, buffered)
#   PRIORITY [0]: nice value for both servers and wrk; a negative one (root)
#   keeps a compile elsewhere on the machine from skewing the numbers as much
set -euo pipefail

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
WARMUP=${WARMUP:-3s}
RUNS=${RUNS:-3}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-2400}
PRIORITY=${PRIORITY:-0}
ACCESS_LOG=${ACCESS_LOG:-off}
HOT_FILE_MAX_BYTES=$((1024 * 1024))
SIZES=(1k 100k)

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd -- "$script_dir/.." && pwd)
stamp=$(date -u +%Y%m%dT%H%M%SZ)
OUT_DIR=${OUT_DIR:-$repo/bench/out/static-$stamp}

LOG_TAG=static.sh
# shellcheck source=bench/lib.sh
source "$script_dir/lib.sh"

install_packages
export PATH="$PATH:/usr/sbin:/sbin"
nginx_bin=$(command -v nginx)

require_two_cpus

# --- build ------------------------------------------------------------------
build_breakwater

# --- ports ------------------------------------------------------------------
BW_PORT=${BW_PORT:-$(next_free_port 18080)}
taken="$taken $BW_PORT"
NGINX_PORT=${NGINX_PORT:-$(next_free_port $((BW_PORT + 1)))}
for p in "$BW_PORT" "$NGINX_PORT"; do
    ! port_in_use "$p" || die "port $p on 127.0.0.1 is already in use"
done

# --- docroot and configs ----------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/bw-static-bench.XXXXXX")
chmod 755 "$work" # nginx workers may run as nobody
docroot=$work/www
mkdir -p "$docroot" "$work/nginx/tmp" "$work/breakwater"
head -c 1024 /dev/urandom >"$docroot/1k.bin"
head -c $((100 * 1024)) /dev/urandom >"$docroot/100k.bin"
chmod 644 "$docroot"/*.bin
chmod 755 "$docroot"

cat >"$work/breakwater/edge.toml" <<EOF
# Written by bench/static.sh: one listener, one site, no admin listener.
[node]
name = "bench-static"

[[listener]]
address = "127.0.0.1:$BW_PORT"

[limits]
shutdown_grace = "1s"

[[site]]
name = "bench"
prefix = "/"
root = "$docroot"
# Both files are served from the in-memory hot cache.
hot_file_max_bytes = $HOT_FILE_MAX_BYTES
EOF

ngx=$work/nginx
case $ACCESS_LOG in
off)
    nginx_access_log="access_log off;"
    bw_log=warn
    ;;
on)
    # nginx's usual production form: buffered, flushed at least every second.
    nginx_access_log="access_log $ngx/access.log combined buffer=64k flush=1s;"
    bw_log=warn,access=info
    ;;
*) die "ACCESS_LOG must be on or off, not $ACCESS_LOG" ;;
esac
cat >"$ngx/nginx.conf" <<EOF
# Written by bench/static.sh: a tuned single-worker static server.
worker_processes 1;
pid $ngx/nginx.pid;
error_log $ngx/error.log warn;
events {
    worker_connections 4096;
    multi_accept on;
}
http {
    $nginx_access_log
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65s;
    keepalive_requests 1000000;
    open_file_cache max=1000 inactive=60s;
    open_file_cache_valid 60s;
    open_file_cache_min_uses 1;
    open_file_cache_errors on;
    server_tokens off;
    types { application/octet-stream bin; }
    default_type application/octet-stream;
    client_body_temp_path $ngx/tmp/body;
    proxy_temp_path $ngx/tmp/proxy;
    fastcgi_temp_path $ngx/tmp/fastcgi;
    uwsgi_temp_path $ngx/tmp/uwsgi;
    scgi_temp_path $ngx/tmp/scgi;
    server {
        listen 127.0.0.1:$NGINX_PORT;
        root $docroot;
        location / { }
    }
}
EOF

# --- start servers ----------------------------------------------------------
"$nginx_bin" -t -q -p "$ngx" -e "$ngx/error.log" -c "$ngx/nginx.conf" 2>"$ngx/test.log" ||
    { cat "$ngx/test.log" >&2; die "nginx config test failed"; }

TOKIO_WORKER_THREADS=1 RUST_LOG=$bw_log \
    nice -n "$PRIORITY" taskset -c "$SERVER_CPU" "$bw_bin" edge --config "$work/breakwater/edge.toml" \
    >"$work/breakwater/stdout.log" 2>"$work/breakwater/stderr.log" &
pids+=("$!")
nice -n "$PRIORITY" taskset -c "$SERVER_CPU" "$nginx_bin" -p "$ngx" -e "$ngx/error.log" -c "$ngx/nginx.conf" \
    -g 'daemon off;' >"$ngx/stdout.log" 2>&1 &
pids+=("$!")

wait_ready breakwater "$BW_PORT" "${pids[0]}" "$work/breakwater/stderr.log"
wait_ready nginx "$NGINX_PORT" "${pids[1]}" "$ngx/error.log"

# Both must return the exact bytes before anything is measured.
for size in "${SIZES[@]}"; do
    for port in "$BW_PORT" "$NGINX_PORT"; do
        curl -fsS --max-time 5 -o "$work/check.bin" "http://127.0.0.1:$port/$size.bin" ||
            die "GET /$size.bin on port $port failed"
        cmp -s "$work/check.bin" "$docroot/$size.bin" ||
            die "port $port returned different bytes for /$size.bin"
    done
done

# --- measure ----------------------------------------------------------------
mkdir -p "$OUT_DIR"
busy_before=$(cpu_busy_pct)
if ((busy_before > 10)); then
    log "warning: CPUs already ${busy_before}% busy before the run; results will be noisy"
fi
declare -A rps p99
SERVERS=(breakwater nginx)
declare -A port_of=([breakwater]=$BW_PORT [nginx]=$NGINX_PORT)
url_for() { echo "http://127.0.0.1:${port_of[$1]}/$2.bin"; }
measure_grid

# --- report -----------------------------------------------------------------
nginx_version=$({ "$nginx_bin" -v 2>&1 || true; } | sed 's/^nginx version: //')

{
    report_head "server on cpu $SERVER_CPU, wrk on cpu $CLIENT_CPU"
    echo "breakwater: release build, 1 tokio worker, both files from the in-memory hot cache (hot_file_max_bytes = $HOT_FILE_MAX_BYTES), access log $ACCESS_LOG (RUST_LOG=$bw_log)"
    echo "nginx: $nginx_version, worker_processes 1, sendfile on, open_file_cache, access log $ACCESS_LOG"
    echo
    echo "| file | breakwater req/s | nginx req/s | breakwater/nginx | breakwater p99 ms | nginx p99 ms |"
    echo "|---|---:|---:|---:|---:|---:|"
    for size in "${SIZES[@]}"; do
        b=${rps[breakwater-$size]} n=${rps[nginx-$size]}
        awk -v s="$size" -v b="$b" -v n="$n" -v bp="${p99[breakwater-$size]}" -v np="${p99[nginx-$size]}" \
            'BEGIN { printf "| %s | %.0f | %.0f | %.2f | %.2f | %.2f |\n", s, b, n, b / n, bp, np }'
    done
    echo
    for size in "${SIZES[@]}"; do
        awk -v s="$size" -v b="${rps[breakwater-$size]}" -v n="${rps[nginx-$size]}" \
            'BEGIN { printf "ratio %s: breakwater/nginx = %.2f\n", s, b / n }'
    done
} | tee "$OUT_DIR/summary.txt"
log "raw wrk output in $OUT_DIR"
