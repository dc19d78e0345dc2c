# Shared by the bench/*.sh scripts: source it after setting LOG_TAG.
# Cleanup of background servers, package installs, free ports, wrk runs and
# medians, so that every script measures the same way.

log() { printf '[%s] %s\n' "${LOG_TAG:-bench}" "$*" >&2; }
# A script may define on_die (say, to show its servers' logs) before dying.
die() {
    log "error: $*"
    if declare -F on_die >/dev/null; then on_die >&2 || true; fi
    exit 1
}
trap 'log "error: command failed at line $LINENO"' ERR

# --- cleanup ----------------------------------------------------------------
# Scripts append server pids to `pids` and set `work` to their temp dir.
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

# Installs nginx, wrk, taskset and curl from Debian when missing, and any
# further Debian packages named as arguments.
install_packages() {
    local missing=() package
    for package in "$@"; do
        dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
    done
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

require_two_cpus() {
    ncpu=$(nproc)
    if ((ncpu < 2)); then
        die "needs at least 2 CPUs (server and client on separate cores); nproc=$ncpu"
    fi
}

# Sets bw_bin to the release binary, building it unless SKIP_BUILD=1.
build_breakwater() {
    local target_dir=${CARGO_TARGET_DIR:-$repo/target}
    bw_bin=$target_dir/release/breakwater
    if [[ ${SKIP_BUILD:-0} != 1 ]]; then
        log "building breakwater (release; may take several minutes)"
        (cd "$repo" && timeout "${BUILD_TIMEOUT:-2400}" nice -n 10 cargo build --release --quiet -p breakwater-cli) ||
            die "release build failed"
    fi
    [[ -x $bw_bin ]] || die "no release binary at $bw_bin"
}

# --- ports ------------------------------------------------------------------
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
taken=""
# The first free port from $1 that no earlier call returned.
next_free_port() {
    local p=$1
    while port_in_use "$p" || [[ " $taken " == *" $p "* ]]; do
        p=$((p + 1))
        ((p < 65000)) || die "no free port found"
    done
    taken="$taken $p"
    echo "$p"
}

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

# --- measuring --------------------------------------------------------------
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

# wrk pinned to CLIENT_CPU with THREADS/CONNECTIONS; fails on any non-2xx/3xx.
# Extra wrk arguments (`-s script.lua`), set by scripts that need them.
wrk_extra=()
run_wrk() { # url duration outfile
    local limit=$(($(secs "$2") + 30))
    # In the background so that a signal to this script is handled at once.
    timeout "$limit" nice -n "$PRIORITY" taskset -c "$CLIENT_CPU" wrk -t"$THREADS" -c"$CONNECTIONS" -d"$2" \
        --latency "${wrk_extra[@]}" "$1" >"$3" 2>&1 &
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

# Measures every (server, size) pair: a warm-up, then RUNS runs that
# alternate servers run by run so that drift hits all alike. The caller
# defines `url_for SERVER SIZE` and the arrays SERVERS and SIZES, and
# declares `declare -A rps p99`; this fills rps[SERVER-SIZE] and
# p99[SERVER-SIZE] with medians. Raw wrk output goes to OUT_DIR.
measure_grid() {
    local size server r f total_s
    total_s=$((${#SIZES[@]} * ${#SERVERS[@]} * ($(secs "$WARMUP") + RUNS * $(secs "$DURATION"))))
    log "measuring: ${#SIZES[@]} size(s) x ${#SERVERS[@]} server(s) x $RUNS runs of $DURATION (wrk -t$THREADS -c$CONNECTIONS), ~${total_s}s"
    for size in "${SIZES[@]}"; do
        for server in "${SERVERS[@]}"; do
            run_wrk "$(url_for "$server" "$size")" "$WARMUP" "$OUT_DIR/$server-$size-warmup.txt"
        done
        for ((r = 1; r <= RUNS; r++)); do
            for server in "${SERVERS[@]}"; do
                f=$OUT_DIR/$server-$size-run$r.txt
                run_wrk "$(url_for "$server" "$size")" "$DURATION" "$f"
                log "$server $size run $r: $(rps_of "$f") req/s, p99 $(p99_ms_of "$f") ms"
            done
        done
        for server in "${SERVERS[@]}"; do
            rps[$server-$size]=$(for ((r = 1; r <= RUNS; r++)); do rps_of "$OUT_DIR/$server-$size-run$r.txt"; done | median)
            p99[$server-$size]=$(for ((r = 1; r <= RUNS; r++)); do p99_ms_of "$OUT_DIR/$server-$size-run$r.txt"; done | median)
        done
    done
}

# The first lines of every report: date, machine (with `$1`, where each
# process ran), commit and client. Needs ncpu and busy_before.
report_head() {
    local cpu_model wrk_version
    cpu_model=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
    wrk_version=$({ wrk -v 2>&1 || true; } | awk 'NR == 1 { print $1, $2 }')
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "machine: nproc=$ncpu, $cpu_model; $1; CPU busy before: ${busy_before}%; nice $PRIORITY"
    echo "commit: $(commit_line)"
    echo "client: $wrk_version -t$THREADS -c$CONNECTIONS -d$DURATION --latency, warm-up $WARMUP, median of $RUNS runs"
}

# The commit line of a report: short hash, and whether the tree was dirty.
commit_line() {
    local commit
    commit=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null) || commit="none (no commits yet)"
    if [[ -n $(git -C "$repo" status --porcelain 2>/dev/null || true) ]]; then
        commit="$commit, dirty tree"
    fi
    echo "$commit"
}
