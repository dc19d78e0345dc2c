#!/usr/bin/env python3
"""llama.cpp as the reference for Breakwater's inference, on the same GGUF.

    python3 bench/reference.py --setup
    python3 bench/reference.py --model M.gguf [--prompt TEXT ...]
        [--system TEXT] [--conversations FILE|-] [--n-predict 32]
        [--threads 2] [--no-logits]
    python3 bench/reference.py bench --model M.gguf [--threads 2]
        [--prompt-tokens 128] [--gen-tokens 128] [--repeat 3]

The peer is PyPI `llama-cpp-python==0.3.36`, which compiles llama.cpp from
its sdist (about 15 minutes on 2 cores; needs Debian's `cmake` and a C++
compiler, installed with apt-get when missing), in a virtual environment of
its own: `.cache/venv-llama-cpp` at the repository root (LLAMA_CPP_VENV
overrides), with `gguf`, `numpy` and `jinja2`. The build is lean: CPU only,
no BLAS, no GPU, `-march=native` (llama.cpp's default). Any run builds the
venv when it is missing, then re-runs itself inside it; `--setup` only
builds it.

Reference mode prints one JSON object: for each conversation (each
`--prompt` is one user message, after `--system` when given; or a JSON list
of `{"messages": [{"role", "content"}, ...]}` from `--conversations`), the
chat-templated prompt text, llama.cpp's token ids for it, its greedy
continuation of exactly `--n-predict` tokens (end-of-generation tokens do
not stop it; `first_eog` says where the first one came) as ids and text, and
the logits of the first step (the last prompt position), in full unless
`--no-logits`.

The chat template: the GGUF's own `tokenizer.chat_template`, rendered by
llama-cpp-python's chat handling (`llama_chat_format.Jinja2ChatFormatter`,
Jinja2 with the Hugging Face conventions, `add_generation_prompt=True`), as
its `create_chat_completion` does for a model whose GGUF carries a template.
(llama.cpp's C `llama_chat_apply_template` matches templates to built-in
formats instead; for ChatML it does not inject SmolLM2's default system
prompt, which the Jinja template does.)

Greedy is the argmax of llama.cpp's logits, ties to the lowest id, the way
llama.cpp's greedy sampler picks.

Bench mode prints JSON lines in `examples/infer_bench.rs`'s format for one
stream: `prefill` (prompt tokens/s, a fresh context each time) and `decode`
(generated tokens per second of a whole greedy generation of
`--gen-tokens`, prefill included, end of sequence ignored), medians of
`--repeat` runs, on `--threads` threads for both prompt and generation.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("LLAMA_CPP_VENV", REPO / ".cache" / "venv-llama-cpp"))
REQUIREMENTS = ["llama-cpp-python==0.3.36", "gguf", "numpy", "jinja2"]
# llama.cpp's build: CPU only, no BLAS and no GPU backends, no tools; the
# instruction sets of this CPU (read from /proc/cpuinfo) except AMX. Not
# GGML_NATIVE: `-march=native` turns on AMX where the CPU lists it, and on
# the Sapphire Rapids VMs here `ldtilecfg` raises a general protection
# fault (the hypervisor does not grant the tile state), so the first
# Q4_1 matmul crashes with SIGSEGV.
BASE_CMAKE_ARGS = [
    "-DGGML_BLAS=OFF",
    "-DGGML_CUDA=OFF",
    "-DGGML_VULKAN=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_OPENMP=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DGGML_NATIVE=OFF",
    "-DGGML_AMX_TILE=OFF",
    "-DGGML_AMX_INT8=OFF",
    "-DGGML_AMX_BF16=OFF",
]
# ggml's option per CPU flag (all must be present for the option).
ISA_OPTIONS = [
    ("GGML_SSE42", ["sse4_2"]),
    ("GGML_AVX", ["avx"]),
    ("GGML_AVX2", ["avx2"]),
    ("GGML_FMA", ["fma"]),
    ("GGML_F16C", ["f16c"]),
    ("GGML_BMI2", ["bmi2"]),
    ("GGML_AVX_VNNI", ["avx_vnni"]),
    ("GGML_AVX512", ["avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"]),
    ("GGML_AVX512_VBMI", ["avx512vbmi"]),
    ("GGML_AVX512_VNNI", ["avx512_vnni"]),
    ("GGML_AVX512_BF16", ["avx512_bf16"]),
]


def cmake_args():
    flags = set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = [f"-D{opt}={'ON' if all(x in flags for x in need) else 'OFF'}" for opt, need in ISA_OPTIONS]
    return " ".join(BASE_CMAKE_ARGS + isa)


def log(message):
    print(f"[reference] {message}", file=sys.stderr, flush=True)


def venv_python():
    return VENV / "bin" / "python"


def in_venv():
    return Path(sys.prefix).resolve() == VENV.resolve()


def build_marker():
    """Records the CMAKE_ARGS llama.cpp was built with."""
    return VENV / "breakwater-llama-cpp-cmake-args"


def venv_ready():
    python = venv_python()
    if not python.exists():
        return False
    marker = build_marker()
    if not marker.exists() or marker.read_text().strip() != cmake_args():
        return False
    check = "import llama_cpp, gguf, numpy, jinja2; assert llama_cpp.__version__ == '0.3.36'"
    return subprocess.run([str(python), "-c", check], capture_output=True).returncode == 0


def install_debian_packages():
    """cmake and a C++ compiler from Debian when missing (as bench/lib.sh does)."""
    missing = []
    if shutil.which("cmake") is None:
        missing.append("cmake")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        missing.append("g++")
    if not missing:
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    if sudo and shutil.which("sudo") is None:
        sys.exit(f"[reference] error: need root (or sudo) to install {' '.join(missing)}")
    log(f"installing {' '.join(missing)} with apt-get")
    subprocess.run(sudo + ["apt-get", "update", "-qq"], check=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


def setup():
    """Creates the venv with llama-cpp-python compiled from source; idempotent."""
    if venv_ready():
        log(f"venv ready: {VENV}")
        return
    install_debian_packages()
    args = cmake_args()
    log(f"building {VENV}: compiling llama.cpp takes about 15 minutes on 2 cores")
    log(f"CMAKE_ARGS={args}")
    if not venv_python().exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(venv_python()), "-m", "pip"]
    subprocess.run(pip + ["install", "-q", "--upgrade", "pip"], check=True)
    env = dict(os.environ, CMAKE_ARGS=args, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    build_marker().unlink(missing_ok=True)
    # --force-reinstall: a llama.cpp built with other flags is rebuilt.
    subprocess.run(
        pip + ["install", "--no-cache-dir", "--force-reinstall", "--no-deps", REQUIREMENTS[0]],
        check=True,
        env=env,
    )
    subprocess.run(pip + ["install", "--no-cache-dir", *REQUIREMENTS], check=True, env=env)
    build_marker().write_text(args + "\n")
    if not venv_ready():
        sys.exit("[reference] error: the venv was built but does not import llama_cpp 0.3.36")
    log(f"venv ready: {VENV}")


def load(model, threads, n_ctx):
    from llama_cpp import Llama

    return Llama(
        model_path=str(model),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=False,
        verbose=False,
    )


def last_logits(llm):
    """The logits of the last position evaluated, as float32 numpy."""
    import llama_cpp
    import numpy as np

    pointer = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).copy()


def greedy(llm, prompt_ids, n_predict):
    """Evaluates the prompt, then takes the argmax `n_predict` times.

    Returns (first-step logits, generated ids)."""
    import numpy as np

    llm.reset()
    llm.eval(prompt_ids)
    first = last_logits(llm)
    logits, out = first, []
    while len(out) < n_predict:
        token = int(np.argmax(logits))  # the first index on ties
        out.append(token)
        if len(out) == n_predict:
            break
        llm.eval([token])
        logits = last_logits(llm)
    return first, out


def token_text(llm, token):
    return llm.detokenize([token], special=True).decode("utf-8", errors="replace")


def formatter(model, llm):
    """llama-cpp-python's Jinja2 chat formatter over the GGUF's template."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        sys.exit(f"[reference] error: {model} has no tokenizer.chat_template")
    return Jinja2ChatFormatter(
        template=template,
        eos_token=token_text(llm, llm.token_eos()),
        bos_token=token_text(llm, llm.token_bos()),
        add_generation_prompt=True,
    )


def conversations(args):
    if args.conversations:
        source = sys.stdin if args.conversations == "-" else open(args.conversations, encoding="utf-8")
        with source:
            convs = json.load(source)
        if not isinstance(convs, list) or not all(isinstance(c, dict) and "messages" in c for c in convs):
            sys.exit('[reference] error: --conversations wants [{"messages": [...]}, ...]')
        return convs
    prompts = args.prompt or ["What is the capital of France?"]
    system = [{"role": "system", "content": args.system}] if args.system else []
    return [{"messages": system + [{"role": "user", "content": p}]} for p in prompts]


def reference(args):
    import llama_cpp
    import numpy as np

    llm = load(args.model, args.threads, args.n_ctx)
    chat = formatter(args.model, llm)
    eog = [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(llm._model.vocab, t)]
    results = []
    for conv in conversations(args):
        prompt = chat(messages=conv["messages"]).prompt
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        first, out = greedy(llm, ids, args.n_predict)
        first_eog = next((i for i, t in enumerate(out) if t in eog), None)
        until_eog = out if first_eog is None else out[:first_eog]
        entry = {
            "messages": conv["messages"],
            "prompt": prompt,
            "prompt_ids": ids,
            "greedy_ids": out,
            "greedy_text": llm.detokenize(until_eog).decode("utf-8", errors="replace"),
            "first_eog": first_eog,
            "first_step_top5": [int(i) for i in np.argsort(-first, kind="stable")[:5]],
        }
        if not args.no_logits:
            # float32 printed exactly: 9 significant digits round-trip.
            entry["first_step_logits"] = [float(f"{v:.9g}") for v in first.tolist()]
        results.append(entry)
    json.dump(
        {
            "engine": "llama.cpp",
            "llama_cpp_python": llama_cpp.__version__,
            "model": str(args.model),
            "threads": args.threads,
            "chat_template": "GGUF tokenizer.chat_template via llama_cpp.llama_chat_format.Jinja2ChatFormatter",
            "n_predict": args.n_predict,
            "eog_ids": eog,
            "results": results,
        },
        sys.stdout,
        ensure_ascii=False,
    )
    print()


def bench(args):
    import numpy as np

    n_ctx = args.prompt_tokens + args.gen_tokens + 8
    llm = load(args.model, args.threads, n_ctx)
    vocab = llm.n_vocab()

    def prompt(seed):
        # The same kind of ids as infer_bench: deterministic, special ids avoided.
        return [3 + (seed * 1_000_003 + i * 104_729) % (vocab - 3) for i in range(args.prompt_tokens)]

    def prefill(seed):
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt(seed))
        return args.prompt_tokens / (time.perf_counter() - started)

    def decode(seed):
        started = time.perf_counter()
        _, out = greedy(llm, prompt(seed), args.gen_tokens)
        return len(out) / (time.perf_counter() - started)

    prefill(0)  # warm-up
    for kind, measure in (("prefill", prefill), ("decode", decode)):
        rates = sorted(measure(r + 1) for r in range(max(1, args.repeat)))
        gen = 1 if kind == "prefill" else args.gen_tokens
        print(
            json.dumps(
                {
                    "engine": "llama.cpp",
                    "backend": "cpu",
                    "kind": kind,
                    "streams": 1,
                    "prompt_tokens": args.prompt_tokens,
                    "gen_tokens": gen,
                    "threads": args.threads,
                    "tokens_per_second": round(float(np.median(rates)), 1),
                }
            ),
            flush=True,
        )


def main():
    argv = sys.argv[1:]
    mode = "reference"
    if argv and argv[0] == "bench":
        mode, argv = "bench", argv[1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setup", action="store_true", help="only build the venv")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    if mode == "reference":
        parser.add_argument("--prompt", action="append", help="a user message (repeatable)")
        parser.add_argument("--system", help="a system message before each --prompt")
        parser.add_argument("--conversations", help='JSON file (or -): [{"messages": [...]}, ...]')
        parser.add_argument("--n-predict", type=int, default=32)
        parser.add_argument("--n-ctx", type=int, default=1024)
        parser.add_argument("--no-logits", action="store_true")
    else:
        parser.add_argument("--prompt-tokens", type=int, default=128)
        parser.add_argument("--gen-tokens", type=int, default=128)
        parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    if args.setup:
        setup()
        return
    if not in_venv():
        setup()
        os.execv(str(venv_python()), [str(venv_python()), str(Path(__file__).resolve()), *sys.argv[1:]])
    if args.model is None:
        parser.error("--model is required")
    if not args.model.is_file():
        sys.exit(f"[reference] error: no model file at {args.model}")
    reference(args) if mode == "reference" else bench(args)


if __name__ == "__main__":
    main()
