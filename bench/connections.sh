#!/usr/bin/env bash
# Connection capacity: breakwater vs nginx, each holding an idle crowd of
# IDLE keep-alive connections while wrk measures active requests.
#
# For each server in turn (one core each, taskset -c SERVER_CPU, one worker):
# a warm-up and RUNS wrk runs of a 1 KiB static file with no crowd; then
# bench/idle_crowd.py opens IDLE connections from 127.0.0.2 onwards (SOURCES
# addresses, so that no source runs out of ephemeral ports), makes one
# request on each and leaves them idle; the server's RSS before and after
# gives the memory per idle connection; RUNS wrk runs again with the crowd
# held; then the crowd checks how many of its connections the server kept.
# Prints medians of req/s and p99 with and without the crowd, bytes per idle
# connection and the breakwater/nginx ratios; raw output goes to OUT_DIR.
#
# Usage: bench/connections.sh
# Environment (defaults in brackets):
#   IDLE [50000]  SOURCES [8]  DURATION [10s]  CONNECTIONS [64]  THREADS [1]
#   WARMUP [3s]  RUNS [3]  SERVER_CPU [0]  CLIENT_CPU [1]  PRIORITY [0]
#   OUT_DIR [bench/out/connections-<timestamp>]  SKIP_BUILD=1
#   BW_PORT/NGINX_PORT [first free from 18280]  CARGO_TARGET_DIR (respected)
#
# Every connection is a file descriptor on both ends: the script raises the
# open-file limit to IDLE plus headroom. Where the hard limit is lower and
# cannot be raised (no CAP_SYS_RESOURCE, e.g. in a container), the crowd is
# capped at what one server process can hold, and the report says so.
set -euo pipefail

IDLE=${IDLE:-50000}
SOURCES=${SOURCES:-8}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
WARMUP=${WARMUP:-3s}
RUNS=${RUNS:-3}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
PRIORITY=${PRIORITY:-0}

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd -- "$script_dir/.." && pwd)
stamp=$(date -u +%Y%m%dT%H%M%SZ)
OUT_DIR=${OUT_DIR:-$repo/bench/out/connections-$stamp}

LOG_TAG=connections.sh
# shellcheck source=bench/lib.sh
source "$script_dir/lib.sh"

install_packages
export PATH="$PATH:/usr/sbin:/sbin"
nginx_bin=$(command -v nginx)
command -v python3 >/dev/null || die "needs python3 (standard library only) for the idle crowd"
require_two_cpus
build_breakwater

# --- file descriptors ---------------------------------------------------------
# Headroom: the active clients, the listeners, logs, epoll and friends.
headroom=1024
wanted=$((IDLE + headroom))
ulimit -Hn "$wanted" 2>/dev/null || true
hard=$(ulimit -Hn)
[[ $hard == unlimited ]] && hard=$wanted
ulimit -n "$((hard < wanted ? hard : wanted))"
nofile=$(ulimit -n)
idle_note="requested $IDLE"
if ((nofile < wanted)); then
    IDLE=$((nofile - headroom))
    ((IDLE > 0)) || die "open-file limit $nofile leaves no room for a crowd"
    idle_note="capped at $IDLE by the open-file hard limit ($hard; raising it needs CAP_SYS_RESOURCE)"
    log "warning: crowd $idle_note"
fi
# Each crowd process holds at most this many, within the same limit.
per_process=$((nofile - 256))
crowd_processes=$(((IDLE + per_process - 1) / per_process))

# --- ports ------------------------------------------------------------------
BW_PORT=${BW_PORT:-$(next_free_port 18280)}
taken="$taken $BW_PORT"
NGINX_PORT=${NGINX_PORT:-$(next_free_port $((BW_PORT + 1)))}

# --- docroot and configs ----------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/bw-connections-bench.XXXXXX")
chmod 755 "$work"
docroot=$work/www
mkdir -p "$docroot" "$work/nginx/tmp" "$work/breakwater" "$work/crowd"
head -c 1024 /dev/urandom >"$docroot/1k.bin"
chmod 644 "$docroot/1k.bin"
chmod 755 "$docroot"

# Idle timeouts far beyond the bench, so that what closes a crowd connection
# is a server's limit, not its keep-alive timer.
cat >"$work/breakwater/edge.toml" <<EOF
# Written by bench/connections.sh.
[node]
name = "bench-connections"

[[listener]]
address = "127.0.0.1:$BW_PORT"

[limits]
shutdown_grace = "1s"
idle_timeout = "1h"
max_connections = $((IDLE + headroom))
max_connections_per_ip = $((IDLE + headroom))

[[site]]
name = "bench"
prefix = "/"
root = "$docroot"
EOF

ngx=$work/nginx
cat >"$ngx/nginx.conf" <<EOF
# Written by bench/connections.sh.
worker_processes 1;
worker_rlimit_nofile $nofile;
pid $ngx/nginx.pid;
error_log $ngx/error.log warn;
events {
    worker_connections $((IDLE + headroom));
    multi_accept on;
}
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 3600s;
    keepalive_requests 1000000;
    open_file_cache max=1000 inactive=60s;
    server_tokens off;
    types { application/octet-stream bin; }
    default_type application/octet-stream;
    client_body_temp_path $ngx/tmp/body;
    proxy_temp_path $ngx/tmp/proxy;
    fastcgi_temp_path $ngx/tmp/fastcgi;
    uwsgi_temp_path $ngx/tmp/uwsgi;
    scgi_temp_path $ngx/tmp/scgi;
    server {
        listen 127.0.0.1:$NGINX_PORT backlog=4096;
        root $docroot;
        location / { }
    }
}
EOF

# --- start servers ----------------------------------------------------------
"$nginx_bin" -t -q -p "$ngx" -e "$ngx/error.log" -c "$ngx/nginx.conf" 2>"$ngx/test.log" ||
    { cat "$ngx/test.log" >&2; die "nginx config test failed"; }
TOKIO_WORKER_THREADS=1 RUST_LOG=warn \
    nice -n "$PRIORITY" taskset -c "$SERVER_CPU" "$bw_bin" edge --config "$work/breakwater/edge.toml" \
    >"$work/breakwater/stdout.log" 2>"$work/breakwater/stderr.log" &
pids+=("$!")
nice -n "$PRIORITY" taskset -c "$SERVER_CPU" "$nginx_bin" -p "$ngx" -e "$ngx/error.log" -c "$ngx/nginx.conf" \
    -g 'daemon off;' >"$ngx/stdout.log" 2>&1 &
pids+=("$!")
wait_ready breakwater "$BW_PORT" "${pids[0]}" "$work/breakwater/stderr.log"
wait_ready nginx "$NGINX_PORT" "${pids[1]}" "$ngx/error.log"
on_die() { tail -n 20 "$work/breakwater/stderr.log" "$ngx/error.log" "$work"/crowd/*.log 2>/dev/null; }

declare -A port_of=([breakwater]=$BW_PORT [nginx]=$NGINX_PORT)
declare -A pid_of=([breakwater]=${pids[0]} [nginx]=${pids[1]})
for server in breakwater nginx; do
    curl -fsS --max-time 5 -o "$work/check.bin" "http://127.0.0.1:${port_of[$server]}/1k.bin" ||
        die "GET /1k.bin from $server failed"
    cmp -s "$work/check.bin" "$docroot/1k.bin" || die "$server returned different bytes"
done

# Resident memory of a server, in KiB: the process and its children (nginx's
# worker holds the connections; its master is counted too).
rss_kib() {
    local total=0 pid rss
    for pid in "$1" $(pgrep -P "$1" || true); do
        rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)
        total=$((total + rss))
    done
    echo "$total"
}

# Opens the crowd against port $1 and waits until every process has every
# connection answered. Sets crowd_pids.
crowd_pids=()
open_crowd() {
    local port=$1 i share left=$IDLE f deadline
    rm -f "$work"/crowd/*
    crowd_pids=()
    for ((i = 0; i < crowd_processes; i++)); do
        share=$(((left + crowd_processes - i - 1) / (crowd_processes - i)))
        left=$((left - share))
        nice -n "$PRIORITY" taskset -c "$CLIENT_CPU" python3 "$script_dir/idle_crowd.py" \
            --port "$port" --count "$share" --sources "$SOURCES" \
            --ready-file "$work/crowd/ready$i" --stop-file "$work/crowd/stop" \
            >"$work/crowd/crowd$i.log" 2>&1 &
        crowd_pids+=("$!")
        pids+=("$!")
    done
    deadline=$((SECONDS + 600))
    for ((i = 0; i < crowd_processes; i++)); do
        f=$work/crowd/ready$i
        until [[ -s $f ]]; do
            kill -0 "${crowd_pids[$i]}" 2>/dev/null || die "crowd process $i exited: $(cat "$work/crowd/crowd$i.log")"
            ((SECONDS < deadline)) || die "the crowd did not open within 600 s"
            sleep 0.5
        done
    done
}

# Tells the crowd to stop and sums, in crowd_held, how many connections the
# server kept. (Not in a subshell: it waits for this shell's children.)
close_crowd() {
    local i line
    crowd_held=0
    touch "$work/crowd/stop"
    for ((i = 0; i < crowd_processes; i++)); do
        wait "${crowd_pids[$i]}" || die "crowd process $i failed: $(cat "$work/crowd/crowd$i.log")"
        line=$(cat "$work/crowd/ready$i")
        [[ $line == held* ]] || die "crowd process $i wrote '$line'"
        crowd_held=$((crowd_held + $(awk '{ print $2 }' <<<"$line")))
    done
}

# --- measure ----------------------------------------------------------------
mkdir -p "$OUT_DIR"
busy_before=$(cpu_busy_pct)
if ((busy_before > 10)); then
    log "warning: CPUs already ${busy_before}% busy before the run; results will be noisy"
fi
declare -A rps_quiet p99_quiet rps_crowd p99_crowd rss_before rss_crowd per_conn held
url_of() { echo "http://127.0.0.1:${port_of[$1]}/1k.bin"; }
measure_runs() { # server label -> medians in rps_<label>, p99_<label>
    local server=$1 label=$2 r f
    for ((r = 1; r <= RUNS; r++)); do
        f=$OUT_DIR/$server-$label-run$r.txt
        run_wrk "$(url_of "$server")" "$DURATION" "$f"
        log "$server $label run $r: $(rps_of "$f") req/s, p99 $(p99_ms_of "$f") ms"
    done
    declare -n rps_out=rps_$label p99_out=p99_$label
    rps_out[$server]=$(for ((r = 1; r <= RUNS; r++)); do rps_of "$OUT_DIR/$server-$label-run$r.txt"; done | median)
    p99_out[$server]=$(for ((r = 1; r <= RUNS; r++)); do p99_ms_of "$OUT_DIR/$server-$label-run$r.txt"; done | median)
}
log "measuring: 2 servers x 2 x $RUNS runs of $DURATION (wrk -t$THREADS -c$CONNECTIONS), crowd of $IDLE in $crowd_processes process(es)"
for server in breakwater nginx; do
    run_wrk "$(url_of "$server")" "$WARMUP" "$OUT_DIR/$server-warmup.txt"
    measure_runs "$server" quiet
    rss_before[$server]=$(rss_kib "${pid_of[$server]}")
    open_crowd "${port_of[$server]}"
    sleep 1
    rss_crowd[$server]=$(rss_kib "${pid_of[$server]}")
    per_conn[$server]=$(((${rss_crowd[$server]} - ${rss_before[$server]}) * 1024 / IDLE))
    log "$server holds a crowd of $IDLE: RSS ${rss_before[$server]} -> ${rss_crowd[$server]} KiB, ${per_conn[$server]} B per idle connection"
    measure_runs "$server" crowd
    close_crowd
    held[$server]=$crowd_held
    log "$server kept ${held[$server]} of $IDLE idle connections"
done

# The servers' own words on any connection they dropped.
cp "$ngx/error.log" "$OUT_DIR/nginx-error.log" 2>/dev/null || true
cp "$work/breakwater/stderr.log" "$OUT_DIR/breakwater-stderr.log" 2>/dev/null || true

# --- report -----------------------------------------------------------------
nginx_version=$({ "$nginx_bin" -v 2>&1 || true; } | sed 's/^nginx version: //')
{
    report_head "servers on cpu $SERVER_CPU, wrk and the crowd on cpu $CLIENT_CPU"
    echo "crowd: $IDLE idle keep-alive connections ($idle_note), one 1 KiB GET each, from $SOURCES source addresses, $crowd_processes process(es); open-file limit $nofile"
    echo "breakwater: release build, 1 tokio worker, hot cache; nginx: $nginx_version, worker_processes 1, sendfile, no access log"
    echo "memory: resident set of the server's processes (user space; the kernel's socket buffers are not in it)"
    echo
    echo "| server | idle kept | RSS before MiB | RSS with crowd MiB | bytes per idle conn | req/s quiet | req/s with crowd | p99 ms quiet | p99 ms with crowd |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    for server in breakwater nginx; do
        awk -v s="$server" -v h="${held[$server]}" -v n="$IDLE" -v a="${rss_before[$server]}" -v b="${rss_crowd[$server]}" \
            -v c="${per_conn[$server]}" -v rq="${rps_quiet[$server]}" -v rc="${rps_crowd[$server]}" \
            -v pq="${p99_quiet[$server]}" -v pc="${p99_crowd[$server]}" \
            'BEGIN { printf "| %s | %d of %d | %.1f | %.1f | %d | %.0f | %.0f | %.2f | %.2f |\n", s, h, n, a / 1024, b / 1024, c, rq, rc, pq, pc }'
    done
    echo
    awk -v b="${per_conn[breakwater]}" -v n="${per_conn[nginx]}" -v rb="${rps_crowd[breakwater]}" -v rn="${rps_crowd[nginx]}" \
        -v pb="${p99_crowd[breakwater]}" -v qb="${p99_quiet[breakwater]}" \
        'BEGIN {
            printf "ratio req/s with crowd: breakwater/nginx = %.2f\n", rb / rn
            printf "ratio bytes per idle connection: breakwater/nginx = %.2f\n", (n > 0) ? b / n : 0
            printf "breakwater p99 with crowd / quiet = %.2f\n", (qb > 0) ? pb / qb : 0
        }'
} | tee "$OUT_DIR/summary.txt"
log "raw wrk output in $OUT_DIR"
