#!/usr/bin/env bash
# Failover: what a client sees when upstream endpoints die under a
# constant request rate.
#
# Stand-in GPU hosts (tests/src/bin/stand-in-upstream.rs, each answering
# after DELAY_MS) sit behind one release-built edge node in region `eu`
# with active health checks. An open-loop driver
# (tests/src/bin/rate-driver.rs) sends GETs at RATE per second for
# RUN_SECONDS; at KILL_AT seconds the script SIGKILLs some endpoints.
# Two scenarios:
#   3-across-2-regions: pool `eu` (2 endpoints, failover to pool `us`, 1
#                       endpoint); one `eu` endpoint is killed (1 of 3).
#   30%-of-10:          one pool of 10 endpoints; 3 are killed.
# For each it prints: time to reroute (kill until the edge reports every
# killed endpoint unhealthy on its /metrics), client-visible errors, and the
# share of offered requests answered 200 before the kill, during the
# DURING_S seconds after it, and after that. Raw per-request lines go to
# OUT_DIR.
#
# Usage: bench/failover.sh
# Environment (defaults in brackets):
#   RATE [200]  RUN_SECONDS [20]  KILL_AT [8]  DURING_S [2]  DELAY_MS [5]
#   TIMEOUT_MS [2000] (client timeout)  OUT_DIR [bench/out/failover-<timestamp>]
#   BUILD_TIMEOUT [2400] (seconds)  CARGO_TARGET_DIR (respected)
#   SKIP_BUILD=1 (use existing release binaries)
#   BIN_DIR (take breakwater, stand-in-upstream and rate-driver from there,
#   e.g. target/debug; builds nothing)
set -euo pipefail

RATE=${RATE:-200}
RUN_SECONDS=${RUN_SECONDS:-20}
KILL_AT=${KILL_AT:-8}
DURING_S=${DURING_S:-2}
DELAY_MS=${DELAY_MS:-5}
TIMEOUT_MS=${TIMEOUT_MS:-2000}
PRIORITY=${PRIORITY:-0}

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd -- "$script_dir/.." && pwd)
stamp=$(date -u +%Y%m%dT%H%M%SZ)
OUT_DIR=${OUT_DIR:-$repo/bench/out/failover-$stamp}

LOG_TAG=failover.sh
# shellcheck source=bench/lib.sh
source "$script_dir/lib.sh"

command -v curl >/dev/null || die "needs curl"
((KILL_AT + DURING_S < RUN_SECONDS)) || die "KILL_AT + DURING_S must be below RUN_SECONDS"
if [[ -n ${BIN_DIR:-} ]]; then
    # Binaries built elsewhere (say, target/debug for a quick try): no build.
    SKIP_BUILD=1
    bw_bin=$BIN_DIR/breakwater
else
    build_breakwater
fi
target_dir=${CARGO_TARGET_DIR:-$repo/target}
bin_dir=${BIN_DIR:-$target_dir/release}
stand_in_bin=$bin_dir/stand-in-upstream
driver_bin=$bin_dir/rate-driver
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    log "building the stand-in upstream and the rate driver (release)"
    (cd "$repo" && timeout "${BUILD_TIMEOUT:-2400}" nice -n 10 cargo build --release --quiet -p breakwater-e2e \
        --bin stand-in-upstream --bin rate-driver) || die "release build of the bench tools failed"
fi
[[ -x $stand_in_bin && -x $driver_bin ]] || die "no stand-in-upstream / rate-driver in $bin_dir"

work=$(mktemp -d "${TMPDIR:-/tmp}/bw-failover-bench.XXXXXX")
mkdir -p "$OUT_DIR"
now_ms() { date +%s%3N; }

declare -A stand_in_pid stand_in_port
start_stand_in() { # name
    local port
    port=$(next_free_port 19300)
    "$stand_in_bin" --listen "127.0.0.1:$port" --name "$1" >"$work/$1.log" 2>&1 &
    stand_in_pid[$1]=$!
    stand_in_port[$1]=$port
    pids+=("$!")
    wait_ready "stand-in $1" "$port" "$!" "$work/$1.log"
    curl -fsS -X POST "http://127.0.0.1:$port/_control?delay_ms=$DELAY_MS" >/dev/null ||
        die "cannot configure stand-in $1"
}
endpoints_of() { # names…
    local name out=""
    for name in "$@"; do
        out="$out${out:+, }\"http://127.0.0.1:${stand_in_port[$name]}\""
    done
    echo "$out"
}

health='health = { path = "/health/ready", interval = "1s", timeout = "500ms" }'
edge_pid=""
start_edge() { # config-file port admin-port
    "$bw_bin" edge --config "$1" >"$work/edge.log" 2>&1 &
    edge_pid=$!
    pids+=("$edge_pid")
    wait_ready breakwater "$2" "$edge_pid" "$work/edge.log"
    wait_ready "breakwater admin" "$3" "$edge_pid" "$work/edge.log"
}
stop_all() {
    local pid
    for pid in "${stand_in_pid[@]}" $edge_pid; do
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    stand_in_pid=()
    edge_pid=""
}

# healthy gauge of an endpoint (host:port) on the admin listener; 1 if absent
healthy_of() { # admin-port endpoint
    curl -fsS "http://127.0.0.1:$1/metrics" 2>/dev/null |
        awk -v ep="$2" '$1 ~ /^breakwater_upstream_endpoint_healthy\{/ && index($1, "endpoint=\"" ep "\"") { v = $2 } END { print (v == "" ? 1 : v) }'
}

rows=()
scenario() { # name config-writer victims…
    local name=$1 writer=$2
    shift 2
    local victims=("$@") port admin config out start kill_at rerouted victim all_down t
    port=$(next_free_port 18480)
    admin=$(next_free_port 18490)
    config=$work/$name.toml
    "$writer" "$port" "$admin" >"$config"
    start_edge "$config" "$port" "$admin"
    out=$OUT_DIR/$name.txt
    log "$name: $RATE req/s for ${RUN_SECONDS}s, killing ${victims[*]} at ${KILL_AT}s"
    start=$(now_ms)
    "$driver_bin" --url "http://127.0.0.1:$port/work" --rate "$RATE" --seconds "$RUN_SECONDS" \
        --timeout-ms "$TIMEOUT_MS" --out "$out" &
    local driver=$!
    sleep "$KILL_AT"
    for victim in "${victims[@]}"; do
        kill -KILL "${stand_in_pid[$victim]}"
        wait "${stand_in_pid[$victim]}" 2>/dev/null || true
    done
    kill_at=$(($(now_ms) - start))
    rerouted=""
    for ((t = 0; t < 200; t++)); do
        all_down=1
        for victim in "${victims[@]}"; do
            [[ $(healthy_of "$admin" "127.0.0.1:${stand_in_port[$victim]}") == 0 ]] || all_down=0
        done
        if ((all_down)); then
            rerouted=$(($(now_ms) - start - kill_at))
            break
        fi
        sleep 0.02
    done
    wait "$driver" || die "the rate driver failed"
    stop_all
    cp "$work/edge.log" "$OUT_DIR/$name-edge.log"
    rows+=("$(awk -v name="$name" -v kill="$kill_at" -v during="$((DURING_S * 1000))" -v reroute="${rerouted:-not within 4s}" '
        {
            phase = ($1 < kill) ? "before" : ($1 < kill + during) ? "during" : "after"
            offered[phase]++
            if ($2 == 200) ok[phase]++
            else { errors++; kinds[$2]++; if ($1 >= kill && $1 > last) last = $1 }
        }
        END {
            e = ""
            for (k in kinds) e = e (e == "" ? "" : ", ") (k == 0 ? "no answer" : k) ": " kinds[k]
            if (errors == 0) e = "0"; else e = errors " (" e ")"
            printf "| %s | %s ms | %s | %.2f%% | %.2f%% | %.2f%% |\n", name, reroute, e,
                100 * ok["before"] / offered["before"], 100 * ok["during"] / offered["during"],
                100 * ok["after"] / offered["after"]
        }' "$out")")
    log "${rows[-1]}"
}

config_head() { # port admin
    cat <<TOML
[node]
name = "failover-bench"
region = "eu"

[[listener]]
address = "127.0.0.1:$1"

[admin]
address = "127.0.0.1:$2"

[[route]]
prefix = "/"
pool = "eu"
TOML
}

three_across_two_regions() { # port admin
    config_head "$1" "$2"
    cat <<TOML

[[pool]]
name = "eu"
region = "eu"
endpoints = [$(endpoints_of eu-1 eu-2)]
failover = ["us"]
connect_timeout = "500ms"
first_byte_timeout = "$((TIMEOUT_MS / 2))ms"
$health

[[pool]]
name = "us"
region = "us"
endpoints = [$(endpoints_of us-1)]
$health
TOML
}

ten_in_one_pool() { # port admin
    config_head "$1" "$2"
    cat <<TOML

[[pool]]
name = "eu"
region = "eu"
endpoints = [$(endpoints_of p-0 p-1 p-2 p-3 p-4 p-5 p-6 p-7 p-8 p-9)]
connect_timeout = "500ms"
first_byte_timeout = "$((TIMEOUT_MS / 2))ms"
$health
TOML
}

ncpu=$(nproc)
busy_before=$(cpu_busy_pct)
((busy_before < 30)) || log "warning: the CPUs are ${busy_before}% busy before the run"

for name in eu-1 eu-2 us-1; do start_stand_in "$name"; done
scenario 3-across-2-regions three_across_two_regions eu-1

for i in 0 1 2 3 4 5 6 7 8 9; do start_stand_in "p-$i"; done
scenario 30%-of-10 ten_in_one_pool p-0 p-4 p-7

echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "machine: nproc=$ncpu, $(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo); CPU busy before: ${busy_before}%"
echo "commit: $(commit_line)"
echo "load: open loop, $RATE req/s for ${RUN_SECONDS}s, kill at ${KILL_AT}s, upstream answers after ${DELAY_MS} ms, client timeout ${TIMEOUT_MS} ms"
echo
echo "| scenario | time to reroute | errors | served before | during (${DURING_S}s) | after |"
echo "| --- | --- | --- | --- | --- | --- |"
printf '%s\n' "${rows[@]}"
