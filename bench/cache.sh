#!/usr/bin/env bash
# Cache-hit throughput: breakwater's response cache vs nginx `proxy_cache`
# and Varnish, side by side, on the same origin, files and client.
#
# The origin (a separate nginx) serves a 1 KiB and a 64 KiB object with
# `Cache-Control: public, max-age=3600`. Each cache is warmed with one GET
# per object and then measured on hits only. Each cache gets one core
# (taskset -c SERVER_CPU; breakwater: one tokio worker; nginx: one worker;
# Varnish: one thread pool); wrk and the origin share the other
# (CLIENT_CPU). Prints medians over RUNS runs and breakwater's ratio to the
# better of the two peers per size; raw wrk output goes to OUT_DIR.
#
# Usage: bench/cache.sh
# Environment (defaults in brackets):
#   DURATION [10s]  CONNECTIONS [64]  THREADS [1]  WARMUP [3s]  RUNS [3]
#   SERVER_CPU [0]  CLIENT_CPU [1]  OUT_DIR [bench/out/cache-<timestamp>]
#   BUILD_TIMEOUT [2400] (seconds)  CARGO_TARGET_DIR (respected)
#   SKIP_BUILD=1 (use an existing release binary)  PRIORITY [0]
set -euo pipefail

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
WARMUP=${WARMUP:-3s}
RUNS=${RUNS:-3}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
PRIORITY=${PRIORITY:-0}
SIZES=(1k 64k)
SERVERS=(breakwater nginx varnish)

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd -- "$script_dir/.." && pwd)
stamp=$(date -u +%Y%m%dT%H%M%SZ)
OUT_DIR=${OUT_DIR:-$repo/bench/out/cache-$stamp}

LOG_TAG=cache.sh
# shellcheck source=bench/lib.sh
source "$script_dir/lib.sh"

install_packages varnish
export PATH="$PATH:/usr/sbin:/sbin"
nginx_bin=$(command -v nginx)
varnishd_bin=$(command -v varnishd)
require_two_cpus
build_breakwater

# --- files, ports, configs --------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/bw-cache-bench.XXXXXX")
chmod 755 "$work"
docroot=$work/www
mkdir -p "$docroot" "$work/origin/tmp" "$work/nginx/tmp" "$work/nginx/cache" "$work/breakwater" "$work/varnish"
head -c 1024 /dev/urandom >"$docroot/1k.bin"
head -c $((64 * 1024)) /dev/urandom >"$docroot/64k.bin"
chmod 644 "$docroot"/*.bin
chmod 755 "$docroot"

ORIGIN_PORT=$(next_free_port 18280)
taken="$taken $ORIGIN_PORT"
declare -A port_of
for server in "${SERVERS[@]}"; do
    port_of[$server]=$(next_free_port 18281)
    taken="$taken ${port_of[$server]}"
done

nginx_common() { # dir
    cat <<NGINX
worker_processes 1;
pid $1/nginx.pid;
error_log $1/error.log warn;
events {
    worker_connections 4096;
    multi_accept on;
}
NGINX
}
nginx_temp_paths() { # dir
    cat <<NGINX
    client_body_temp_path $1/tmp/body;
    proxy_temp_path $1/tmp/proxy;
    fastcgi_temp_path $1/tmp/fastcgi;
    uwsgi_temp_path $1/tmp/uwsgi;
    scgi_temp_path $1/tmp/scgi;
NGINX
}

origin=$work/origin
{
    nginx_common "$origin"
    echo "http {"
    nginx_temp_paths "$origin"
    cat <<NGINX
    access_log off;
    sendfile on;
    types { application/octet-stream bin; }
    server {
        listen 127.0.0.1:$ORIGIN_PORT;
        root $docroot;
        location / { add_header Cache-Control "public, max-age=3600"; }
    }
}
NGINX
} >"$origin/nginx.conf"

ngx=$work/nginx
{
    nginx_common "$ngx"
    echo "http {"
    nginx_temp_paths "$ngx"
    cat <<NGINX
    access_log off;
    keepalive_timeout 65s;
    keepalive_requests 1000000;
    proxy_cache_path $ngx/cache levels=1:2 keys_zone=bench:16m max_size=1g inactive=60m;
    upstream origin {
        server 127.0.0.1:$ORIGIN_PORT;
        keepalive 16;
    }
    server {
        listen 127.0.0.1:${port_of[nginx]};
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache bench;
            proxy_cache_revalidate on;
            add_header X-Cache \$upstream_cache_status;
        }
    }
}
NGINX
} >"$ngx/nginx.conf"

cat >"$work/varnish/default.vcl" <<VCL
vcl 4.1;
backend origin {
    .host = "127.0.0.1";
    .port = "$ORIGIN_PORT";
}
VCL

cat >"$work/breakwater/edge.toml" <<TOML
# Written by bench/cache.sh: everything through the cache to the origin.
[node]
name = "bench-cache"

[[listener]]
address = "127.0.0.1:${port_of[breakwater]}"

[limits]
shutdown_grace = "1s"

[cache]
memory_bytes = 268435456

[[route]]
prefix = "/"
pool = "origin"
cache = true

[[pool]]
name = "origin"
endpoints = ["http://127.0.0.1:$ORIGIN_PORT"]
TOML

# --- start ------------------------------------------------------------------
for dir in "$origin" "$ngx"; do
    "$nginx_bin" -t -q -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" 2>"$dir/test.log" ||
        { cat "$dir/test.log" >&2; die "nginx config test failed ($dir)"; }
done
nice -n "$PRIORITY" taskset -c "$CLIENT_CPU" "$nginx_bin" -p "$origin" -e "$origin/error.log" \
    -c "$origin/nginx.conf" -g 'daemon off;' >"$origin/stdout.log" 2>&1 &
pids+=("$!")
wait_ready origin "$ORIGIN_PORT" "${pids[-1]}" "$origin/error.log"

TOKIO_WORKER_THREADS=1 RUST_LOG=warn \
    nice -n "$PRIORITY" taskset -c "$SERVER_CPU" "$bw_bin" edge --config "$work/breakwater/edge.toml" \
    >"$work/breakwater/stdout.log" 2>"$work/breakwater/stderr.log" &
pids+=("$!")
wait_ready breakwater "${port_of[breakwater]}" "${pids[-1]}" "$work/breakwater/stderr.log"

nice -n "$PRIORITY" taskset -c "$SERVER_CPU" "$nginx_bin" -p "$ngx" -e "$ngx/error.log" \
    -c "$ngx/nginx.conf" -g 'daemon off;' >"$ngx/stdout.log" 2>&1 &
pids+=("$!")
wait_ready nginx "${port_of[nginx]}" "${pids[-1]}" "$ngx/error.log"

# -F: foreground, so the pid is varnishd's own; -j none: no privilege
# separation jail (the bench runs as whoever runs it); one thread pool to
# match one worker elsewhere.
nice -n "$PRIORITY" taskset -c "$SERVER_CPU" "$varnishd_bin" -F -j none -n "$work/varnish/state" \
    -a "127.0.0.1:${port_of[varnish]}" -f "$work/varnish/default.vcl" -s malloc,256m \
    -p thread_pools=1 >"$work/varnish/stdout.log" 2>&1 &
pids+=("$!")
wait_ready varnish "${port_of[varnish]}" "${pids[-1]}" "$work/varnish/stdout.log"

# Every cache must return the exact bytes, and a second GET must be a hit
# (the origin's access count is not visible, so each cache's own header says).
hit_header() { # server size
    curl -fsS --max-time 5 -o /dev/null -D - "http://127.0.0.1:${port_of[$1]}/$2.bin" | tr -d '\r' |
        awk -F': *' 'tolower($1) == "x-cache" { print $2 } tolower($1) == "age" { print "age=" $2 }'
}
for size in "${SIZES[@]}"; do
    for server in "${SERVERS[@]}"; do
        curl -fsS --max-time 5 -o "$work/check.bin" "http://127.0.0.1:${port_of[$server]}/$size.bin" ||
            die "GET /$size.bin from $server failed"
        cmp -s "$work/check.bin" "$docroot/$size.bin" || die "$server returned different bytes for /$size.bin"
        log "$server /$size.bin second GET: $(hit_header "$server" "$size" | paste -sd' ')"
    done
done

# --- measure ----------------------------------------------------------------
mkdir -p "$OUT_DIR"
busy_before=$(cpu_busy_pct)
if ((busy_before > 10)); then
    log "warning: CPUs already ${busy_before}% busy before the run; results will be noisy"
fi
declare -A rps p99
url_for() { echo "http://127.0.0.1:${port_of[$1]}/$2.bin"; }
measure_grid

# --- report -----------------------------------------------------------------
{
    report_head "caches on cpu $SERVER_CPU, wrk and the origin on cpu $CLIENT_CPU"
    echo "breakwater: release build, 1 tokio worker, memory tier; nginx: $({ "$nginx_bin" -v 2>&1 || true; } | sed 's/^nginx version: //'), 1 worker, proxy_cache; varnish: $("$varnishd_bin" -V 2>&1 | grep -o 'varnish-[0-9.]*' | head -n 1), 1 thread pool, malloc storage"
    echo
    echo "| object | breakwater req/s | nginx req/s | varnish req/s | breakwater/best peer | breakwater p99 ms | nginx p99 ms | varnish p99 ms |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    for size in "${SIZES[@]}"; do
        awk -v s="$size" -v b="${rps[breakwater-$size]}" -v n="${rps[nginx-$size]}" -v v="${rps[varnish-$size]}" \
            -v bp="${p99[breakwater-$size]}" -v np="${p99[nginx-$size]}" -v vp="${p99[varnish-$size]}" \
            'BEGIN { best = (n > v) ? n : v
                     printf "| %s | %.0f | %.0f | %.0f | %.2f | %.2f | %.2f | %.2f |\n", s, b, n, v, b / best, bp, np, vp }'
    done
} | tee "$OUT_DIR/summary.txt"
log "raw wrk output in $OUT_DIR"
