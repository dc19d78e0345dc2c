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
HOT_FILE_MAX_BYTES=$((1024 * 1024))
SIZES=(1k 100k)

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd -- "$script_dir/.." && pwd)
stamp=$(date -u +%Y%m%dT%H%M%SZ)
OUT_DIR=${OUT_DIR:-$repo/bench/out/static-$stamp}

log() { printf '[static.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
trap 'log "error: command failed at line $LINENO"' ERR

# --- cleanup ----------------------------------------------------------------
work=""
pids=()
wrk_pid=""
cleanup() {
    local pid i
    if [[ -n $wrk_pid ]]; then
        kill -TERM "$wrk_pid" 2>/dev/null || true
        wait "$wrk_pid" 2>/dev/null || true
    fi
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        for ((i = 0; i < 50; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n $work && -d $work ]]; then
        rm -rf -- "$work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- prerequisites ----------------------------------------------------------
as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

install_packages() {
    local missing=()
    command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
    command -v wrk >/dev/null || missing+=(wrk)
    command -v taskset >/dev/null || missing+=(util-linux)
    command -v curl >/dev/null || missing+=(curl)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "installing ${missing[*]}"
    # Keep the package's maintainer scripts from starting the system nginx
    # service: a policy-rc.d that says no, unless one is already in place.
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [[ ! -e $policy ]]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
        added_policy=1
    fi
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    if [[ $added_policy -eq 1 ]]; then
        as_root rm -f "$policy"
    fi
}

install_packages
export PATH="$PATH:/usr/sbin:/sbin"
nginx_bin=$(command -v nginx)

ncpu=$(nproc)
if ((ncpu < 2)); then
    die "needs at least 2 CPUs (server and client on separate cores); nproc=$ncpu"
fi

# --- build ------------------------------------------------------------------
target_dir=${CARGO_TARGET_DIR:-$repo/target}
bw_bin=$target_dir/release/breakwater
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    log "building breakwater (release; may take several minutes)"
    (cd "$repo" && timeout "$BUILD_TIMEOUT" nice -n 10 cargo build --release --quiet -p breakwater-cli) ||
        die "release build failed"
fi
[[ -x $bw_bin ]] || die "no release binary at $bw_bin"

# --- ports ------------------------------------------------------------------
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
next_free_port() {
    local p=$1
    while port_in_use "$p" || [[ " ${taken:-} " == *" $p "* ]]; do
        p=$((p + 1))
        ((p < 65000)) || die "no free port found"
    done
    echo "$p"
}
taken=""
BW_PORT=${BW_PORT:-$(next_free_port 18080)}
taken="$BW_PORT"
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
    access_log off;
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

TOKIO_WORKER_THREADS=1 RUST_LOG=warn \
    nice -n "$PRIORITY" taskset -c "$SERVER_CPU" "$bw_bin" edge --config "$work/breakwater/edge.toml" \
    >"$work/breakwater/stdout.log" 2>"$work/breakwater/stderr.log" &
pids+=("$!")
nice -n "$PRIORITY" taskset -c "$SERVER_CPU" "$nginx_bin" -p "$ngx" -e "$ngx/error.log" -c "$ngx/nginx.conf" \
    -g 'daemon off;' >"$ngx/stdout.log" 2>&1 &
pids+=("$!")

wait_ready() { # name port pid log
    local i
    for ((i = 0; i < 300; i++)); do
        port_in_use "$2" && return 0
        kill -0 "$3" 2>/dev/null || { cat "$4" >&2; die "$1 exited during startup"; }
        sleep 0.1
    done
    cat "$4" >&2
    die "$1 did not listen on 127.0.0.1:$2 within 30s"
}
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
# How busy the machine is before we start (other builds skew the numbers).
cpu_busy_pct() { # over one second, all CPUs
    local a b
    a=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8 }' /proc/stat)
    sleep 1
    b=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8 }' /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN {
        split(a, x, " "); split(b, y, " ")
        printf "%.0f\n", (y[2] > x[2]) ? 100 * (y[1] - x[1]) / (y[2] - x[2]) : 0
    }'
}
busy_before=$(cpu_busy_pct)
if ((busy_before > 10)); then
    log "warning: CPUs already ${busy_before}% busy before the run; results will be noisy"
fi
secs() { # 10s | 1m | 500ms -> whole seconds for timeouts
    local v=$1
    case $v in
    *ms) echo 1 ;;
    *m) echo $((${v%m} * 60)) ;;
    *h) echo $((${v%h} * 3600)) ;;
    *s) echo "${v%s}" ;;
    *) echo "$v" ;;
    esac
}
wrk_limit=$(($(secs "$DURATION") + 30))

run_wrk() { # url duration outfile
    # In the background so that a signal to this script is handled at once.
    timeout "$wrk_limit" nice -n "$PRIORITY" taskset -c "$CLIENT_CPU" wrk -t"$THREADS" -c"$CONNECTIONS" -d"$2" \
        --latency "$1" >"$3" 2>&1 &
    wrk_pid=$!
    wait "$wrk_pid" || { cat "$3" >&2; die "wrk failed against $1"; }
    wrk_pid=""
    if grep -q 'Non-2xx or 3xx responses' "$3"; then
        cat "$3" >&2
        die "non-2xx responses from $1"
    fi
    if grep -q 'Socket errors' "$3"; then
        log "warning: $(grep 'Socket errors' "$3" | sed 's/^ *//') ($1)"
    fi
}
rps_of() { awk '/^Requests\/sec:/ { print $2 }' "$1"; }
p99_ms_of() {
    awk '$1 == "99%" {
        v = $2; n = v + 0
        if (v ~ /us$/) n /= 1000
        else if (v ~ /ms$/) n *= 1
        else if (v ~ /m$/) n *= 60000
        else if (v ~ /s$/) n *= 1000
        printf "%.2f\n", n
    }' "$1"
}
median() { # values on stdin
    sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) exit 1
        if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2
    }'
}

declare -A rps p99
servers=(breakwater nginx)
declare -A port_of=([breakwater]=$BW_PORT [nginx]=$NGINX_PORT)
total_s=$(((${#SIZES[@]} * 2) * ($(secs "$WARMUP") + RUNS * $(secs "$DURATION"))))
log "measuring: ${#SIZES[@]} sizes x 2 servers x $RUNS runs of $DURATION (wrk -t$THREADS -c$CONNECTIONS), ~${total_s}s"
for size in "${SIZES[@]}"; do
    for server in "${servers[@]}"; do
        run_wrk "http://127.0.0.1:${port_of[$server]}/$size.bin" "$WARMUP" "$OUT_DIR/$server-$size-warmup.txt"
    done
    # Alternate servers run by run so that drift hits both alike.
    for ((r = 1; r <= RUNS; r++)); do
        for server in "${servers[@]}"; do
            f=$OUT_DIR/$server-$size-run$r.txt
            run_wrk "http://127.0.0.1:${port_of[$server]}/$size.bin" "$DURATION" "$f"
            log "$server $size run $r: $(rps_of "$f") req/s, p99 $(p99_ms_of "$f") ms"
        done
    done
    for server in "${servers[@]}"; do
        rps[$server-$size]=$(for ((r = 1; r <= RUNS; r++)); do rps_of "$OUT_DIR/$server-$size-run$r.txt"; done | median)
        p99[$server-$size]=$(for ((r = 1; r <= RUNS; r++)); do p99_ms_of "$OUT_DIR/$server-$size-run$r.txt"; done | median)
    done
done

# --- report -----------------------------------------------------------------
commit=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null) || commit="none (no commits yet)"
if [[ -n $(git -C "$repo" status --porcelain 2>/dev/null || true) ]]; then
    commit="$commit, dirty tree"
fi
cpu_model=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
nginx_version=$({ "$nginx_bin" -v 2>&1 || true; } | sed 's/^nginx version: //')
wrk_version=$({ wrk -v 2>&1 || true; } | awk 'NR == 1 { print $1, $2 }')

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "machine: nproc=$ncpu, $cpu_model; server on cpu $SERVER_CPU, wrk on cpu $CLIENT_CPU; CPU busy before: ${busy_before}%; nice $PRIORITY"
    echo "commit: $commit"
    echo "client: $wrk_version -t$THREADS -c$CONNECTIONS -d$DURATION --latency, warm-up $WARMUP, median of $RUNS runs"
    echo "breakwater: release build, 1 tokio worker, both files from the in-memory hot cache (hot_file_max_bytes = $HOT_FILE_MAX_BYTES)"
    echo "nginx: $nginx_version, worker_processes 1, sendfile on, open_file_cache, access_log off"
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
