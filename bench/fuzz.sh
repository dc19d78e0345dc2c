#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a set time and prints, per
# target, the executions and the crashes (inputs libFuzzer saved under
# fuzz/artifacts/<target>/: panics, timeouts, out-of-memory, sanitizer
# reports).
#
# The toolchain is set up here, not by CI: nightly through rustup when it
# can be installed, else the stable toolchain with RUSTC_BOOTSTRAP=1 (and
# without AddressSanitizer if stable lacks its runtime). cargo-fuzz is
# installed from crates.io when missing. Seeds come from fuzz/seeds.py;
# the corpus grows in fuzz/corpus/<target>/ from run to run (not
# committed). After a crash libFuzzer stops; the target is started again
# for the rest of its time, so one run can find several.
#
# Usage: bench/fuzz.sh [target…]   (default: all, see `cargo fuzz list`)
# Environment (defaults in brackets):
#   FUZZ_SECONDS [600]   per target
#   FUZZ_JOBS [2]        targets fuzzed at once (each is one process)
#   FUZZ_SANITIZER [address]  address | none
#   FUZZ_TIMEOUT [10]    seconds one input may run before it is a crash
#   FUZZ_RSS_MB [2048]   memory one run may take; also the malloc limit
#   FUZZ_TARGET_DIR [fuzz/target]  where the instrumented build goes
#   PRIORITY [19]        nice level of the build and the fuzzers
set -euo pipefail

FUZZ_SECONDS=${FUZZ_SECONDS:-600}
FUZZ_JOBS=${FUZZ_JOBS:-2}
FUZZ_SANITIZER=${FUZZ_SANITIZER:-address}
FUZZ_TIMEOUT=${FUZZ_TIMEOUT:-10}
FUZZ_RSS_MB=${FUZZ_RSS_MB:-2048}
PRIORITY=${PRIORITY:-19}
LOG_TAG=fuzz
source "$(dirname "$0")/lib.sh"

repo=$(cd "$(dirname "$0")/.." && pwd)
fuzz_dir=$repo/fuzz
target_dir=${FUZZ_TARGET_DIR:-$fuzz_dir/target}
triple=$(rustc -vV | awk '/^host:/ { print $2 }')

# --- toolchain ----------------------------------------------------------------
toolchain=()
if rustup run nightly rustc -V >/dev/null 2>&1 ||
    timeout 120 rustup toolchain install nightly --profile minimal >&2; then
    toolchain=(+nightly)
    log "toolchain: $(rustup run nightly rustc -V)"
else
    # cargo-fuzz passes -Z flags; RUSTC_BOOTSTRAP lets stable take them.
    export RUSTC_BOOTSTRAP=1
    log "toolchain: nightly could not be installed; $(rustc -V) with RUSTC_BOOTSTRAP=1"
    asan_runtime=$(rustc --print sysroot)/lib/rustlib/$triple/lib
    if [[ $FUZZ_SANITIZER == address ]] &&
        ! compgen -G "$asan_runtime/librustc-*_rt.asan.a" >/dev/null; then
        log "no AddressSanitizer runtime in $asan_runtime: building with --sanitizer none"
        FUZZ_SANITIZER=none
    fi
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz"
    cargo install cargo-fuzz --locked >&2
fi

# --- build --------------------------------------------------------------------
cd "$fuzz_dir"
mapfile -t all_targets < <(cargo "${toolchain[@]}" fuzz list)
if (($#)); then targets=("$@"); else targets=("${all_targets[@]}"); fi
for t in "${targets[@]}"; do
    [[ " ${all_targets[*]} " == *" $t "* ]] || die "no fuzz target $t (have: ${all_targets[*]})"
done
log "building ${#targets[@]} targets (sanitizer: $FUZZ_SANITIZER) into $target_dir"
nice -n "$PRIORITY" cargo "${toolchain[@]}" fuzz build --codegen-units 16 \
    --sanitizer "$FUZZ_SANITIZER" --target-dir "$target_dir" >&2
bin_dir=$target_dir/$triple/release
python3 "$fuzz_dir/seeds.py" "$fuzz_dir/corpus"

# --- fuzz -----------------------------------------------------------------------
work=$(mktemp -d)
# Fuzzes $1 for FUZZ_SECONDS, restarting after each crash, and writes
# "<executions> <crashes> <seconds>" to $work/$1.result.
fuzz_one() {
    local target=$1 artifacts=$fuzz_dir/artifacts/$1 corpus=$fuzz_dir/corpus/$1
    local log_file=$work/$target.log dict=$fuzz_dir/dicts/$1.dict
    local started=$SECONDS remaining execs=0 crashes=0 before after
    local args=(-timeout="$FUZZ_TIMEOUT" -rss_limit_mb="$FUZZ_RSS_MB"
        -print_final_stats=1 -artifact_prefix="$artifacts/")
    [[ -f $dict ]] && args+=(-dict="$dict")
    mkdir -p "$artifacts" "$corpus"
    while remaining=$((FUZZ_SECONDS - (SECONDS - started))); ((remaining > 0)); do
        before=$(find "$artifacts" -type f | wc -l)
        nice -n "$PRIORITY" "$bin_dir/$target" "${args[@]}" \
            -max_total_time="$remaining" "$corpus" >"$log_file" 2>&1 || true
        after=$(find "$artifacts" -type f | wc -l)
        execs=$((execs + $(awk '/stat::number_of_executed_units/ { n = $NF } END { print n + 0 }' "$log_file")))
        cat "$log_file" >>"$work/$target.all.log"
        if ((after > before)); then
            crashes=$((crashes + after - before))
            log "$target: crash after $((SECONDS - started)) s: $(grep -m1 -E '^(==[0-9]+==ERROR|thread .* panicked|ALARM|SUMMARY)' "$log_file" || echo 'see log')"
        elif ! grep -q 'Done [0-9]* runs\|stat::number_of_executed_units' "$log_file"; then
            log "$target: the fuzzer stopped without stats; last lines:"
            tail -5 "$log_file" >&2
            break
        fi
    done
    echo "$execs $crashes $((SECONDS - started))" >"$work/$target.result"
}

log "fuzzing ${#targets[@]} targets, $FUZZ_SECONDS s each, $FUZZ_JOBS at a time"
running=0
for t in "${targets[@]}"; do
    if ((running >= FUZZ_JOBS)); then
        wait -n
        running=$((running - 1))
    fi
    fuzz_one "$t" &
    running=$((running + 1))
done
wait

printf '\n| target | minutes | executions | crashes | artifacts |\n| --- | --- | --- | --- | --- |\n'
for t in "${targets[@]}"; do
    read -r execs crashes secs <"$work/$t.result"
    printf '| %s | %.1f | %s | %s | %s |\n' "$t" "$(echo "$secs / 60" | bc -l)" \
        "$execs" "$crashes" "$( ((crashes > 0)) && echo "fuzz/artifacts/$t/" || echo -)"
done
