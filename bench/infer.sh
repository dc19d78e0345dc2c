#!/usr/bin/env bash
# Inference throughput of the GPU host runtime against its peer on the same
# model and the same device, in process on both sides:
#
#   bench/infer.sh --device cuda [--model DIR] [--streams 1,8,32,64]
#                  [--prompt-tokens 128] [--gen-tokens 128] [--repeat 3]
#
# --device cuda: Breakwater's CUDA backend (examples/infer_bench.rs) next to
# PyTorch `transformers` (eager attention, fp16, bench/transformers_bench.py)
# on one Hugging Face model directory: by default a random model with the
# demo model's exact shapes (SmolLM2-135M), generated here. Prints decode
# (generated tokens/s of a whole greedy generation, prefill included) and
# prefill (prompt tokens/s) at each stream count, and the ratio.
#
# INFER_BENCH names a prebuilt infer_bench binary (scripts/gpu-check.sh
# carries one to machines without cargo); otherwise it is built here.
#
#   bench/infer.sh --device cpu [--model M.gguf] [--threads 2]
#                  [--streams 1,4,16] [--prompt-tokens 128]
#                  [--gen-tokens 128] [--repeat 3]
#
# --device cpu: Breakwater's CPU backend (the same infer_bench, --threads)
# next to llama.cpp (PyPI llama-cpp-python 0.3.36 through bench/reference.py,
# whose venv it builds the first time: about 15 minutes) on the same GGUF,
# by default the demo model (SmolLM2-135M-Instruct Q4_1, fetched when
# missing), both on the same --threads. Prints single-stream decode tokens/s
# (whole greedy generation, prefill included, and decode alone: the prefill
# time at the measured prompt rate taken out, the same way on both sides),
# prompt tokens/s, our aggregate tokens/s at each --streams count, over the
# whole run and over decode alone (llama.cpp: one stream), and the ratios:
# ours to llama.cpp's, and our aggregate to our single stream (target: 6x
# at 16 streams). llama.cpp runs
# twice, with OpenMP's spinning wait and with OMP_WAIT_POLICY=PASSIVE, and
# the better run (by single-stream decode) is its figure.
set -euo pipefail
LOG_TAG=infer
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$repo/bench/lib.sh"

# --device cpu: ours against llama.cpp on one GGUF, the same threads.
cpu_bench() {
    streams=${streams:-1,4,16}
    [[ ,$streams, == *,1,* ]] || die "--streams must include 1 (the single-stream baseline)"
    local bench=${INFER_BENCH:-}
    if [[ -z $bench ]]; then
        log "building infer_bench (release)"
        cargo build --quiet --release -p breakwater-infer --example infer_bench --manifest-path "$repo/Cargo.toml"
        bench="${CARGO_TARGET_DIR:-$repo/target}/release/examples/infer_bench"
    fi
    [[ -x $bench ]] || die "no infer_bench binary at $bench"
    if [[ -z $model ]]; then
        model="$repo/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
        if [[ ! -f $model ]]; then
            log "fetching the demo model"
            cargo run --quiet --release -p breakwater-infer --example fetch_demo_model --manifest-path "$repo/Cargo.toml"
        fi
    fi
    [[ -f $model ]] || die "no GGUF at $model"
    python3 "$repo/bench/reference.py" --setup

    work=$(mktemp -d)
    local common=(--prompt-tokens "$prompt_tokens" --gen-tokens "$gen_tokens" --repeat "$repeat")
    local busy
    busy=$(cpu_busy_pct)
    log "breakwater (cpu, $threads threads)"
    "$bench" run --model "$model" --device cpu --threads "$threads" --streams "$streams" "${common[@]}" | tee "$work/ours.jsonl"
    # llama.cpp's OpenMP threads spin while they wait: on a quiet machine
    # that is its fastest setting, on a busy one a descheduled thread stalls
    # the other (decode fell from 21 to 4 tok/s here). Both are measured and
    # the better one is its figure.
    log "llama.cpp (llama-cpp-python 0.3.36, $threads threads, OpenMP default wait policy)"
    python3 "$repo/bench/reference.py" bench --model "$model" --threads "$threads" "${common[@]}" | tee "$work/peer-active.jsonl"
    log "llama.cpp (llama-cpp-python 0.3.36, $threads threads, OMP_WAIT_POLICY=PASSIVE)"
    OMP_WAIT_POLICY=PASSIVE python3 "$repo/bench/reference.py" bench --model "$model" --threads "$threads" "${common[@]}" | tee "$work/peer-passive.jsonl"

    echo
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "machine: $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo); nproc=$(nproc); CPU busy before: $busy%"
    echo "commit: $(commit_line)"
    echo "model: $model (prompt $prompt_tokens tokens, $gen_tokens generated, greedy, median of $repeat), $threads threads each"
    python3 - "$work/ours.jsonl" "$work/peer-active.jsonl" "$work/peer-passive.jsonl" "$prompt_tokens" "$gen_tokens" <<'PY'
import json, sys
def load(path):
    return {(r["kind"], r["streams"]): r["tokens_per_second"] for r in map(json.loads, open(path))}
ours, active, passive = load(sys.argv[1]), load(sys.argv[2]), load(sys.argv[3])
prompt, gen = int(sys.argv[4]), int(sys.argv[5])
# llama.cpp's better wait policy, chosen once for all its figures.
peer, policy = (active, "default (spinning)") if active[("decode", 1)] >= passive[("decode", 1)] else (passive, "OMP_WAIT_POLICY=PASSIVE")
print(f"llama.cpp decode tok/s: {active[('decode', 1)]:.1f} with OpenMP's default wait policy, {passive[('decode', 1)]:.1f} with OMP_WAIT_POLICY=PASSIVE; the figures below use {policy}")
print()
def decode_only(rates):
    # The whole generation's time less the prompt's, at the measured prompt rate.
    spent = gen / rates[("decode", 1)] - prompt / rates[("prefill", 1)]
    return gen / spent if spent > 0 else float("nan")
rows = [
    ("single-stream decode, prefill included", ours[("decode", 1)], peer[("decode", 1)]),
    ("single-stream decode alone", decode_only(ours), decode_only(peer)),
    ("prompt (prefill)", ours[("prefill", 1)], peer[("prefill", 1)]),
]
print(f"| measure | breakwater tok/s | llama.cpp tok/s | ratio |")
print(f"|---|---:|---:|---:|")
for name, a, b in rows:
    print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f} |")
single, single_steady = ours[("decode", 1)], ours[("decode_steady", 1)]
print()
print("Aggregate over all streams: the whole run (every prompt prefilled, then decoded), and decode alone (from the moment every stream has its first token).")
print()
print(f"| streams | whole run tok/s | x single stream | decode alone tok/s | x single stream | x llama.cpp single stream |")
print(f"|---:|---:|---:|---:|---:|---:|")
for (kind, n) in sorted(k for k in ours if k[0] == "decode"):
    a, s = ours[(kind, n)], ours[("decode_steady", n)]
    print(f"| {n} | {a:.1f} | {a / single:.2f} | {s:.1f} | {s / single_steady:.2f} | {s / decode_only(peer):.2f} |")
PY
}

device=cuda model="" streams="" threads=2 prompt_tokens=128 gen_tokens=128 repeat=3
while [[ $# -gt 0 ]]; do
    case $1 in
        --device) device=$2; shift 2 ;;
        --model) model=$2; shift 2 ;;
        --streams) streams=$2; shift 2 ;;
        --threads) threads=$2; shift 2 ;;
        --prompt-tokens) prompt_tokens=$2; shift 2 ;;
        --gen-tokens) gen_tokens=$2; shift 2 ;;
        --repeat) repeat=$2; shift 2 ;;
        *) die "unknown argument $1 (see the header of $0)" ;;
    esac
done
[[ $device == cuda* || $device == cpu ]] || die "--device $device: cuda or cpu"
if [[ $device == cpu ]]; then
    cpu_bench
    exit 0
fi
streams=${streams:-1,8,32,64}

bench=${INFER_BENCH:-}
if [[ -z $bench ]]; then
    log "building infer_bench (release)"
    cargo build --quiet --release -p breakwater-infer --example infer_bench --manifest-path "$repo/Cargo.toml"
    bench="${CARGO_TARGET_DIR:-$repo/target}/release/examples/infer_bench"
fi
[[ -x $bench ]] || die "no infer_bench binary at $bench"
python3 -c 'import torch, transformers' 2>/dev/null || die "the peer needs python3 with torch and transformers"

work=$(mktemp -d)
if [[ -z $model ]]; then
    model="$work/smollm2-135m-shaped"
    log "generating a random model with SmolLM2-135M's shapes (f16)"
    "$bench" gen --shape smollm2-135m --dtype f16 --seed 7 --out "$model"
fi

common=(--streams "$streams" --prompt-tokens "$prompt_tokens" --gen-tokens "$gen_tokens" --repeat "$repeat")
log "breakwater ($device)"
"$bench" run --model "$model" --device "$device" "${common[@]}" | tee "$work/ours.jsonl"
log "transformers (eager, fp16)"
python3 "$repo/bench/transformers_bench.py" --model "$model" "${common[@]}" | tee "$work/peer.jsonl"

gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1 || echo unknown)
echo
echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "machine: $gpu; nproc=$(nproc)"
echo "commit: $(commit_line)"
echo "model: $model (prompt $prompt_tokens tokens, $gen_tokens generated, greedy, median of $repeat)"
python3 - "$work/ours.jsonl" "$work/peer.jsonl" <<'PY'
import json, sys
def load(path):
    return {(r["kind"], r["streams"]): r["tokens_per_second"] for r in map(json.loads, open(path))}
ours, peer = load(sys.argv[1]), load(sys.argv[2])
print(f"{'measure':<9} {'streams':>7} {'breakwater tok/s':>17} {'transformers tok/s':>19} {'ratio':>7}")
for kind in ("decode", "prefill"):
    for (k, n) in sorted(key for key in ours if key[0] == kind):
        a, b = ours[(k, n)], peer.get((k, n))
        ratio = f"{a / b:.2f}" if b else "n/a"
        print(f"{kind:<9} {n:>7} {a:>17.1f} {b if b is not None else float('nan'):>19.1f} {ratio:>7}")
PY
