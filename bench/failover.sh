#!/usr/bin/env bash
# Failover: what a client sees when upstream endpoints die under a
# constant request rate.
#
# Stand-in GPU hosts (tests/src/bin/stand-in-upstream.rs, each answering
# after DELAY_MS) sit behind one release-built edge node in region `eu`
# with active health checks. An open-loop driver
# (tests/src/bin/rate-driver.rs) sends GETs at RATE per second for
# RUN_SECONDS; at KILL_AT seconds the script SIGKILLs some endpoints.
# Four scenarios:
#   3-across-2-regions: pool `eu` (2 endpoints, failover to pool `us`, 1
#                       endpoint); one `eu` endpoint is killed (1 of 3).
#   30%-of-10:          one pool of 10 endpoints; 3 are killed.
#   over-capacity:      one pool of 3 endpoints that, like GPU hosts, serve
#                       OC_SLOTS requests at once in OC_DELAY_MS each and
#                       queue a few more (beyond: 503 + Retry-After); the
#                       three together serve 1.2 x RATE, the two left after
#                       one is killed 0.8 x RATE. The pool has an adaptive
#                       concurrency limit: the excess must be answered 503
#                       with Retry-After at once, never a timeout or a 502.
#   streams-30%-of-10:  mid-stream failover with real GPU hosts: 10
#                       `breakwater gpu-host` processes (CPU, one thread,
#                       a random model of SmolLM2-135M's shape) behind a
#                       `resume = true` route; STREAMS greedy chat streams
#                       (tests/src/bin/stream-driver.rs) run once
#                       undisturbed, then again with 3 hosts SIGKILLed once
#                       every stream has had CUT_AFTER tokens. It prints
#                       how many completed with the undisturbed text, and
#                       the resume latency the edge logged for each
#                       resumed stream (break to first new token, p50/p99).
# For the first three it prints: time to reroute (kill until the edge reports every
# killed endpoint unhealthy on its /metrics), client-visible errors by
# status, errors that were not an honest 503/429 with Retry-After (no
# answer within the client timeout, 502, 504, …), the share of offered
# requests answered 200 before the kill, during the DURING_S seconds after
# it, and after that, and the latency (p50/p99) of the 200s before and
# after the kill.
# Each scenario runs RUNS times; a median row follows. Raw per-request
# lines, the edge's log and its final /metrics go to OUT_DIR.
#
# Usage: bench/failover.sh
# Environment (defaults in brackets):
#   RATE [200]  RUN_SECONDS [20]  KILL_AT [8]  DURING_S [2]  DELAY_MS [5]
#   RUNS [1]  SCENARIOS ["3-across-2-regions 30%-of-10 over-capacity streams-30%-of-10"]
#   STREAMS [20]  STREAM_TOKENS [40]  CUT_AFTER [10] (streams-30%-of-10)
#   OC_DELAY_MS [50] (over-capacity: time per request)
#   OC_SLOTS [RATE x OC_DELAY_MS x 0.4 / 1000, at least 1] (per endpoint)
#   TIMEOUT_MS [2000] (client timeout)  OUT_DIR [bench/out/failover-<timestamp>]
#   PRIORITY [0] (nice level of the processes measured, e.g. -10 on a busy machine)
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
RUNS=${RUNS:-1}
SCENARIOS=${SCENARIOS:-3-across-2-regions 30%-of-10 over-capacity streams-30%-of-10}
STREAMS=${STREAMS:-20}
STREAM_TOKENS=${STREAM_TOKENS:-40}
CUT_AFTER=${CUT_AFTER:-10}
OC_DELAY_MS=${OC_DELAY_MS:-50}
# 3 endpoints serve 3 x OC_SLOTS x 1000 / OC_DELAY_MS = 1.2 x RATE.
OC_SLOTS=${OC_SLOTS:-$(((RATE * OC_DELAY_MS * 4 / 10000) > 0 ? RATE * OC_DELAY_MS * 4 / 10000 : 1))}

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd -- "$script_dir/.." && pwd)
stamp=$(date -u +%Y%m%dT%H%M%SZ)
OUT_DIR=${OUT_DIR:-$repo/bench/out/failover-$stamp}

LOG_TAG=failover.sh
# shellcheck source=bench/lib.sh
source "$script_dir/lib.sh"

command -v curl >/dev/null || die "needs curl"
((KILL_AT + DURING_S < RUN_SECONDS)) || die "KILL_AT + DURING_S must be below RUN_SECONDS"
((RUNS >= 1)) || die "RUNS must be at least 1"
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
stream_driver_bin=$bin_dir/stream-driver
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    log "building the stand-in upstream and the drivers (release)"
    (cd "$repo" && timeout "${BUILD_TIMEOUT:-2400}" nice -n 10 cargo build --release --quiet -p breakwater-e2e \
        --bin stand-in-upstream --bin rate-driver --bin stream-driver) || die "release build of the bench tools failed"
fi
[[ -x $stand_in_bin && -x $driver_bin && -x $stream_driver_bin ]] ||
    die "no stand-in-upstream / rate-driver / stream-driver in $bin_dir"

work=$(mktemp -d "${TMPDIR:-/tmp}/bw-failover-bench.XXXXXX")
mkdir -p "$OUT_DIR"
now_ms() { date +%s%3N; }

declare -A stand_in_pid stand_in_port
start_stand_in() { # name control-query
    local port
    port=$(next_free_port 19300)
    nice -n "$PRIORITY" "$stand_in_bin" --listen "127.0.0.1:$port" --name "$1" >"$work/$1.log" 2>&1 &
    stand_in_pid[$1]=$!
    stand_in_port[$1]=$port
    pids+=("$!")
    wait_ready "stand-in $1" "$port" "$!" "$work/$1.log"
    curl -fsS -X POST "http://127.0.0.1:$port/_control?$2" >/dev/null ||
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
    nice -n "$PRIORITY" "$bw_bin" edge --config "$1" >"$work/edge.log" 2>&1 &
    edge_pid=$!
    pids+=("$edge_pid")
    wait_ready breakwater "$2" "$edge_pid" "$work/edge.log"
    wait_ready "breakwater admin" "$3" "$edge_pid" "$work/edge.log"
}
declare -A gpu_host_pid gpu_host_port
start_gpu_host() { # name model-dir
    local port i
    port=$(next_free_port 19400)
    nice -n "$PRIORITY" "$bw_bin" gpu-host --model "$2" --model-name test --listen "127.0.0.1:$port" \
        --device cpu --threads 1 --kv-budget-mb 64 >"$work/$1.log" 2>&1 &
    gpu_host_pid[$1]=$!
    gpu_host_port[$1]=$port
    pids+=("$!")
    for ((i = 0; i < 600; i++)); do
        curl -fsS "http://127.0.0.1:$port/health/ready" >/dev/null 2>&1 && return 0
        kill -0 "${gpu_host_pid[$1]}" 2>/dev/null || { cat "$work/$1.log" >&2; die "gpu-host $1 exited"; }
        sleep 0.1
    done
    die "gpu-host $1 not ready within 60s"
}
stop_all() {
    local pid
    for pid in "${stand_in_pid[@]}" "${gpu_host_pid[@]}" $edge_pid; do
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    stand_in_pid=()
    stand_in_port=()
    gpu_host_pid=()
    gpu_host_port=()
    edge_pid=""
}

# healthy gauge of an endpoint (host:port) on the admin listener; 1 if absent
healthy_of() { # admin-port endpoint
    curl -fsS "http://127.0.0.1:$1/metrics" 2>/dev/null |
        awk -v ep="$2" '$1 ~ /^breakwater_upstream_endpoint_healthy\{/ && index($1, "endpoint=\"" ep "\"") { v = $2 } END { print (v == "" ? 1 : v) }'
}

# p50 and p99 of the latencies (ms) on stdin, "-" when there are none
percentiles() {
    sort -n | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "- -"; exit }
        i50 = int(NR * 0.50 + 0.999); i99 = int(NR * 0.99 + 0.999)
        print v[i50 < 1 ? 1 : i50], v[i99 < 1 ? 1 : i99] }'
}

# One line per run in $work/runs: name run reroute errors dishonest before
# during after p50 p99 (of 200s before the kill) p50 p99 (after) error-detail…
: >"$work/runs"
run_once() { # name run config-writer control-query "members" "victims"
    local name=$1 run=$2 writer=$3 query=$4 members victims
    read -r -a members <<<"$5"
    read -r -a victims <<<"$6"
    local member port admin config out start kill_at rerouted victim all_down t
    for member in "${members[@]}"; do start_stand_in "$member" "$query"; done
    port=$(next_free_port 18480)
    admin=$(next_free_port 18490)
    config=$work/$name.toml
    "$writer" "$port" "$admin" >"$config"
    start_edge "$config" "$port" "$admin"
    out=$OUT_DIR/$name-run$run.txt
    log "$name (run $run/$RUNS): $RATE req/s for ${RUN_SECONDS}s, killing ${victims[*]} at ${KILL_AT}s"
    start=$(now_ms)
    nice -n "$PRIORITY" "$driver_bin" --url "http://127.0.0.1:$port/work" --rate "$RATE" \
        --seconds "$RUN_SECONDS" --timeout-ms "$TIMEOUT_MS" --out "$out" &
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
    curl -fsS "http://127.0.0.1:$admin/metrics" >"$OUT_DIR/$name-run$run-metrics.txt" 2>/dev/null || true
    stop_all
    cp "$work/edge.log" "$OUT_DIR/$name-run$run-edge.log"
    local during=$((DURING_S * 1000)) latency
    latency=$(awk -v kill="$kill_at" '$1 < kill && $2 == 200 { print $4 }' "$out" | percentiles)
    latency="$latency $(awk -v kill="$kill_at" '$1 >= kill && $2 == 200 { print $4 }' "$out" | percentiles)"
    awk -v name="$name" -v run="$run" -v kill="$kill_at" -v during="$during" \
        -v reroute="${rerouted:--}" -v latency="$latency" '
        {
            phase = ($1 < kill) ? "before" : ($1 < kill + during) ? "during" : "after"
            offered[phase]++
            if ($2 == 200) { ok[phase]++; next }
            errors++; kinds[$2]++
            # Honest: 503 or 429 with a Retry-After; anything else is not.
            if (!(($2 == 503 || $2 == 429) && $5 != "-" && $5 != "")) dishonest++
        }
        END {
            e = ""
            for (k in kinds) e = e (e == "" ? "" : ", ") (k == 0 ? "no answer" : k) ": " kinds[k]
            printf "%s %s %s %d %d %.2f %.2f %.2f %s %s\n", name, run, reroute, errors, dishonest,
                100 * ok["before"] / offered["before"], 100 * ok["during"] / offered["during"],
                100 * ok["after"] / offered["after"], latency, (e == "" ? "-" : e)
        }' "$out" | tee -a "$work/runs" >&2
}

# streams-30%-of-10: one line per run in $work/stream-runs: run streams
# complete identical lost resumes failures p50 p99 (resume latency, ms)
: >"$work/stream-runs"
run_streams_once() { # run
    local run=$1 i port admin config model=$work/stream-model out line resumes failures
    local hosts=() endpoints="" victims
    [[ -d $model ]] || "$bw_bin" model gen-test "$model" --shape smollm2-135m --seed 17 >/dev/null ||
        die "cannot write the test model"
    for ((i = 0; i < 10; i++)); do
        start_gpu_host "g-$i" "$model"
        hosts+=("g-$i")
        endpoints="$endpoints${endpoints:+, }\"http://127.0.0.1:${gpu_host_port[g-$i]}\""
    done
    victims="${gpu_host_pid[g-0]},${gpu_host_pid[g-4]},${gpu_host_pid[g-7]}"
    port=$(next_free_port 18480)
    admin=$(next_free_port 18490)
    config=$work/streams.toml
    cat >"$config" <<TOML
[node]
name = "failover-bench"
region = "eu"

[[listener]]
address = "127.0.0.1:$port"

[admin]
address = "127.0.0.1:$admin"

[[route]]
prefix = "/"
pool = "gpu"
resume = true
# Ten CPU hosts on this machine's cores: a batch's prefill holds its
# decodes back for seconds, which the default (2s) would call stalls.
stall_timeout = "20s"

[[pool]]
name = "gpu"
region = "eu"
endpoints = [$endpoints]
connect_timeout = "500ms"
first_byte_timeout = "60s"
$health
TOML
    start_edge "$config" "$port" "$admin"
    out=$OUT_DIR/streams-30%-of-10-run$run.txt
    log "streams-30%-of-10 (run $run/$RUNS): $STREAMS streams of $STREAM_TOKENS tokens, killing g-0 g-4 g-7 after $CUT_AFTER"
    nice -n "$PRIORITY" "$stream_driver_bin" --url "http://127.0.0.1:$port/v1/chat/completions" \
        --streams "$STREAMS" --max-tokens "$STREAM_TOKENS" --cut-after "$CUT_AFTER" --kill-pids "$victims" \
        >"$out" 2>&1 || log "the stream driver reports a failure: $(cat "$out")"
    curl -fsS "http://127.0.0.1:$admin/metrics" >"$OUT_DIR/streams-30%-of-10-run$run-metrics.txt" 2>/dev/null || true
    stop_all
    cp "$work/edge.log" "$OUT_DIR/streams-30%-of-10-run$run-edge.log"
    line=$(tail -n 1 "$out")
    resumes=$(awk '/^breakwater_upstream_stream_resumes_total/ { n += $2 } END { print n + 0 }' \
        "$OUT_DIR/streams-30%-of-10-run$run-metrics.txt")
    failures=$(awk '/^breakwater_upstream_stream_resume_failures_total/ { n += $2 } END { print n + 0 }' \
        "$OUT_DIR/streams-30%-of-10-run$run-metrics.txt")
    field() { tr ' ' '\n' <<<"$line" | sed -n "s/^$1=//p"; }
    echo "$run $(field streams) $(field complete) $(field identical) $(field lost) $resumes $failures" \
        "$(grep -o 'waited_ms=[0-9.]*' "$work/edge.log" | cut -d= -f2 | awk '{ printf "%.0f\n", $1 }' | percentiles)" |
        tee -a "$work/stream-runs" >&2
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

# Each endpoint holds OC_SLOTS answering and up to 4 x OC_SLOTS waiting, so
# an edge that keeps at most 6 x OC_SLOTS in flight across the two left
# never overflows a queue: the edge's own limit (latency target: two
# answers' time) decides what is shed.
over_capacity() { # port admin
    config_head "$1" "$2"
    cat <<TOML

[[pool]]
name = "eu"
region = "eu"
endpoints = [$(endpoints_of o-1 o-2 o-3)]
connect_timeout = "500ms"
first_byte_timeout = "$((TIMEOUT_MS / 2))ms"
$health
concurrency = { initial = $((3 * OC_SLOTS)), min = $OC_SLOTS, max = $((6 * OC_SLOTS)), latency_target = "$((2 * OC_DELAY_MS))ms", queue = $((2 * OC_SLOTS)), queue_timeout = "$((OC_DELAY_MS))ms" }
TOML
}

ncpu=$(nproc)
busy_before=$(cpu_busy_pct)
((busy_before < 30)) || log "warning: the CPUs are ${busy_before}% busy before the run"

for ((run = 1; run <= RUNS; run++)); do
    for scenario in $SCENARIOS; do
        case $scenario in
        3-across-2-regions)
            run_once "$scenario" "$run" three_across_two_regions "delay_ms=$DELAY_MS" "eu-1 eu-2 us-1" "eu-1"
            ;;
        30%-of-10)
            run_once "$scenario" "$run" ten_in_one_pool "delay_ms=$DELAY_MS" \
                "p-0 p-1 p-2 p-3 p-4 p-5 p-6 p-7 p-8 p-9" "p-0 p-4 p-7"
            ;;
        over-capacity)
            run_once "$scenario" "$run" over_capacity \
                "delay_ms=$OC_DELAY_MS&capacity=$OC_SLOTS&queue=$((4 * OC_SLOTS))" "o-1 o-2 o-3" "o-1"
            ;;
        streams-30%-of-10) run_streams_once "$run" ;;
        *) die "unknown scenario $scenario" ;;
        esac
    done
done

# The median of column $2 for scenario $1 ("-" values skipped).
median_of() {
    awk -v name="$1" -v col="$2" '$1 == name && $col != "-" { print $col }' "$work/runs" |
        sort -n | awk '{ v[NR] = $1 } END { print (NR == 0 ? "-" : v[int((NR + 1) / 2)]) }'
}

cp "$work/runs" "$OUT_DIR/runs.txt"
oc_capacity=$((3 * OC_SLOTS * 1000 / OC_DELAY_MS))
echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "machine: nproc=$ncpu, $(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo); CPU busy before: ${busy_before}%; nice $PRIORITY"
echo "commit: $(commit_line)"
echo "binaries: $bin_dir"
echo "load: open loop, $RATE req/s for ${RUN_SECONDS}s, kill at ${KILL_AT}s, client timeout ${TIMEOUT_MS} ms; upstream answers after ${DELAY_MS} ms"
echo "over-capacity: $OC_SLOTS slots x ${OC_DELAY_MS} ms per endpoint: $oc_capacity req/s with 3 endpoints, $((oc_capacity * 2 / 3)) req/s with 2 (offered $RATE)"
echo "runs: $RUNS per scenario"
echo
echo "| scenario | run | time to reroute | errors | not 503/429 + Retry-After | served before | during (${DURING_S}s) | after | 200s p50 / p99 before | after the kill |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
while read -r name run reroute errors dishonest before during after b50 b99 a50 a99 detail; do
    [[ $detail == "-" ]] && detail="" || detail=" ($detail)"
    echo "| $name | $run | $reroute ms | $errors$detail | $dishonest | $before% | $during% | $after% | $b50 / $b99 ms | $a50 / $a99 ms |"
done <"$work/runs"
if [[ -s $work/stream-runs ]]; then
    echo
    echo "streams-30%-of-10: $STREAMS greedy chat streams of $STREAM_TOKENS tokens over 10 GPU hosts (CPU, random SmolLM2-135M-shaped model), 3 SIGKILLed after $CUT_AFTER tokens"
    echo
    echo "| run | streams | complete | identical to undisturbed | upstream_lost | resumes | resume failures | resume latency p50 / p99 |"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
    while read -r run streams complete identical lost resumes failures p50 p99; do
        echo "| $run | $streams | $complete | $identical | $lost | $resumes | $failures | $p50 / $p99 ms |"
    done <"$work/stream-runs"
    cp "$work/stream-runs" "$OUT_DIR/stream-runs.txt"
fi
if ((RUNS > 1)); then
    for scenario in $SCENARIOS; do
        [[ $scenario == streams-30%-of-10 ]] && continue
        m() { median_of "$scenario" "$1"; }
        echo "| $scenario | median | $(m 3) ms | $(m 4) | $(m 5) | $(m 6)% | $(m 7)% | $(m 8)% | $(m 9) / $(m 10) ms | $(m 11) / $(m 12) ms |"
    done
fi
