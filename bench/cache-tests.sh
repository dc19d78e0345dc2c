#!/usr/bin/env bash
# HTTP caching conformance: the public cache test suite (npm
# `http-cache-tests`, https://cache-tests.fyi) against breakwater's cache,
# against Debian's nginx with `proxy_cache`, and against breakwater with the
# cache off (a plain pass-through, the floor), all in one run on the same
# origin.
#
# The suite's own origin (`server/server.mjs`) runs on loopback; each proxy
# forwards everything to it, `PUT /config/…` and `GET /state/…` included.
# The suite's client prints JSON results, which bench/cache-tests/score.mjs
# counts with the suite's own `determineTestResult` (it honours dependencies
# between tests). Prints passed/total per kind (required, optimal, check)
# for each proxy.
#
# Usage: bench/cache-tests.sh
# Environment (defaults in brackets):
#   TARGETS ["breakwater nginx passthrough"]  SUITE_VERSION [0.4.5]
#   OUT_DIR [bench/out/cache-tests-<timestamp>]  SKIP_BUILD=1 (use an
#   existing debug binary)  CARGO_TARGET_DIR (respected)
set -euo pipefail

TARGETS=${TARGETS:-breakwater nginx passthrough}
SUITE_VERSION=${SUITE_VERSION:-0.4.5}

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd -- "$script_dir/.." && pwd)
stamp=$(date -u +%Y%m%dT%H%M%SZ)
OUT_DIR=${OUT_DIR:-$repo/bench/out/cache-tests-$stamp}

LOG_TAG=cache-tests.sh
# shellcheck source=bench/lib.sh
source "$script_dir/lib.sh"

install_packages
export PATH="$PATH:/usr/sbin:/sbin"
nginx_bin=$(command -v nginx)
command -v node >/dev/null || die "needs Node.js 20 (Debian: apt-get install nodejs npm)"

# --- the suite --------------------------------------------------------------
suite_root=$repo/.cache/http-cache-tests-$SUITE_VERSION
suite=$suite_root/node_modules/http-cache-tests
if [[ ! -f $suite/cli.mjs ]]; then
    log "installing http-cache-tests@$SUITE_VERSION from the npm registry"
    mkdir -p "$suite_root"
    npm install --prefix "$suite_root" --no-audit --no-fund --omit=dev \
        "http-cache-tests@$SUITE_VERSION" >/dev/null || die "npm install failed"
fi

# --- breakwater -------------------------------------------------------------
# Correctness, not speed: a debug build is enough and shares the test target.
target_dir=${CARGO_TARGET_DIR:-$repo/target}
bw_bin=$target_dir/debug/breakwater
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    log "building breakwater"
    (cd "$repo" && cargo build --quiet -p breakwater-cli) || die "build failed"
fi
[[ -x $bw_bin ]] || die "no binary at $bw_bin"

# --- origin and proxies -----------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/bw-cache-tests.XXXXXX")
chmod 755 "$work"
mkdir -p "$OUT_DIR"

ORIGIN_PORT=$(next_free_port 18400)
taken="$taken $ORIGIN_PORT"

(cd "$suite" && exec env npm_config_port="$ORIGIN_PORT" npm_config_protocol=http \
    npm_config_pidfile="$work/origin.pid" node server/server.mjs) >"$work/origin.log" 2>&1 &
pids+=("$!")
wait_ready origin "$ORIGIN_PORT" "${pids[-1]}" "$work/origin.log"

start_breakwater() { # name port cache(true|false)
    local dir=$work/$1
    mkdir -p "$dir"
    cat >"$dir/edge.toml" <<TOML
# Written by bench/cache-tests.sh: everything to the suite's origin.
[node]
name = "cache-tests-$1"

[[listener]]
address = "127.0.0.1:$2"

[limits]
shutdown_grace = "1s"
# The suite checks that an unknown unsafe method (M-SEARCH) invalidates.
allowed_methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "M-SEARCH"]

[cache]
memory_bytes = 67108864

[[route]]
prefix = "/"
pool = "origin"
cache = $3

# The suite's origin answers 5xx and breaks connections on purpose: this
# measures the cache, so the one endpoint is never ejected for it and no
# request is retried (a retry shows in the suite as a second request).
# How the pool copes with such an origin is bench/failover.sh's subject.
[[pool]]
name = "origin"
endpoints = ["http://127.0.0.1:$ORIGIN_PORT"]
outlier = { consecutive_failures = 1000000 }
retry = { attempts = 1 }
TOML
    RUST_LOG=warn "$bw_bin" edge --config "$dir/edge.toml" >"$dir/stdout.log" 2>"$dir/stderr.log" &
    pids+=("$!")
    wait_ready "$1" "$2" "${pids[-1]}" "$dir/stderr.log"
}

start_nginx() { # port
    local ngx=$work/nginx
    mkdir -p "$ngx/tmp" "$ngx/cache"
    # The suite's own docker/nginx/nginx.conf, on our ports and paths.
    cat >"$ngx/nginx.conf" <<NGINX
worker_processes 1;
pid $ngx/nginx.pid;
error_log $ngx/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    proxy_cache_path $ngx/cache levels=1:2 keys_zone=my-cache:8m max_size=1000m inactive=600m;
    proxy_temp_path $ngx/tmp/proxy;
    client_body_temp_path $ngx/tmp/body;
    fastcgi_temp_path $ngx/tmp/fastcgi;
    uwsgi_temp_path $ngx/tmp/uwsgi;
    scgi_temp_path $ngx/tmp/scgi;
    server {
        listen 127.0.0.1:$1;
        location / {
            proxy_pass http://127.0.0.1:$ORIGIN_PORT;
            proxy_cache my-cache;
            proxy_cache_revalidate on;
        }
    }
}
NGINX
    "$nginx_bin" -p "$ngx" -e "$ngx/error.log" -c "$ngx/nginx.conf" -g 'daemon off;' >"$ngx/stdout.log" 2>&1 &
    pids+=("$!")
    wait_ready nginx "$1" "${pids[-1]}" "$ngx/error.log"
}

declare -A score
for target in $TARGETS; do
    port=$(next_free_port 18410)
    taken="$taken $port"
    case $target in
    breakwater) start_breakwater breakwater "$port" true ;;
    passthrough) start_breakwater passthrough "$port" false ;;
    nginx) start_nginx "$port" ;;
    *) die "unknown target '$target' (breakwater, nginx, passthrough)" ;;
    esac
    log "running the suite against $target on port $port"
    # npm_package_config_id: the client runs one test when it is set, all
    # of them when it is empty.
    (cd "$suite" && timeout 600 env npm_config_base="http://127.0.0.1:$port" npm_package_config_id= \
        node --no-warnings cli.mjs) >"$OUT_DIR/$target.json" 2>"$OUT_DIR/$target.stderr" ||
        die "the suite failed against $target (see $OUT_DIR/$target.stderr)"
    score[$target]=$(node "$script_dir/cache-tests/score.mjs" "$suite" "$OUT_DIR/$target.json") ||
        die "scoring $target failed"
done

# --- report -----------------------------------------------------------------
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "commit: $(commit_line)"
    echo "suite: http-cache-tests $SUITE_VERSION (npm), node $(node --version)"
    echo "nginx: $({ "$nginx_bin" -v 2>&1 || true; } | sed 's/^nginx version: //'), proxy_cache as in the suite's docker/nginx/nginx.conf"
    echo
    echo "| proxy | required passed | optimal passed | checks yes |"
    echo "|---|---:|---:|---:|"
    for target in $TARGETS; do
        node -e '
            const s = JSON.parse(process.argv[2]);
            const f = k => `${s[k][0]} / ${s[k][1]}`;
            console.log(`| ${process.argv[1]} | ${f("required")} | ${f("optimal")} | ${f("check")} |`);
        ' "$target" "${score[$target]}"
    done
} | tee "$OUT_DIR/summary.txt"
log "raw results in $OUT_DIR"
