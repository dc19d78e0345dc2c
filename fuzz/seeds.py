#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (see bench/fuzz.sh): small
valid inputs from which the fuzzer mutates towards the deep paths. Nothing
here is committed output; run it into an empty directory:

    python3 fuzz/seeds.py fuzz/corpus
"""

import json
import pathlib
import struct
import sys

SEPARATOR = b"\n--8<--\n"  # fuzz/src/lib.rs
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MACROS = (
    "{% macro render(m, depth) %}{% if depth > 0 %}{{ render(m, depth - 1) }}{% else %}"
    "{{ m.role|upper }}: {{ m.content|replace('<', '&lt;') }}{% endif %}{% endmacro %}"
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
    "{{ render(m, 2) }}{{ '\\n' * (ns.n % 3) }}{% endfor %}{{ messages|length }}"
)
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "Ġ w", "o r"]


def byte_alphabet():
    out, shifted = [], 0
    for b in range(256):
        if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255:
            out.append(chr(b))
        else:
            shifted += 1
            out.append(chr(255 + shifted))
    return out


# --- GGUF -------------------------------------------------------------------
def gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_value(v):
    """(type id, bytes) of a metadata value."""
    if isinstance(v, bool):
        return 7, struct.pack("<B", v)
    if isinstance(v, int):
        return 4, struct.pack("<I", v)
    if isinstance(v, float):
        return 6, struct.pack("<f", v)
    if isinstance(v, str):
        return 8, gguf_string(v)
    if isinstance(v, list):
        ty = gguf_value(v[0])[0] if v else 0
        body = b"".join(gguf_value(x)[1] for x in v)
        return 9, struct.pack("<IQ", ty, len(v)) + body
    raise TypeError(v)


def gguf(metadata, tensors):
    """A GGUF v3 image; tensors are (name, dims, ggml type id, data)."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for key, value in metadata.items():
        ty, body = gguf_value(value)
        out += gguf_string(key) + struct.pack("<I", ty) + body
    offset = 0
    for name, dims, ty, data in tensors:
        out += gguf_string(name) + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ty, offset)
        offset = (offset + len(data) + 31) // 32 * 32
    for _, _, _, data in tensors:
        out += b"\0" * (-len(out) % 32) + data
    return out


def tokenizer_metadata():
    tokens = CONTROL + byte_alphabet() + [m.replace(" ", "") for m in MERGES]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.token_type": [3] * 3 + [1] * (len(tokens) - 3),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.chat_template": CHATML,
    }, len(tokens)


def f16s(n, value=0.0625):
    return struct.pack("<e", value) * n


def tiny_gguf():
    dim, hidden, heads, kv_heads = 32, 32, 2, 1
    kv_dim = dim // heads * kv_heads
    meta = {
        "general.architecture": "llama",
        "llama.context_length": 64,
        "llama.embedding_length": dim,
        "llama.block_count": 1,
        "llama.feed_forward_length": hidden,
        "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": kv_heads,
        "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
    }
    tok, vocab = tokenizer_metadata()
    meta.update(tok)
    F32, F16 = 0, 1
    norm = lambda name: (name, [dim], F32, struct.pack("<f", 1.0) * dim)
    mat = lambda name, cols, rows: (name, [cols, rows], F16, f16s(cols * rows))
    tensors = [
        mat("token_embd.weight", dim, vocab),
        norm("blk.0.attn_norm.weight"),
        mat("blk.0.attn_q.weight", dim, dim),
        mat("blk.0.attn_k.weight", dim, kv_dim),
        mat("blk.0.attn_v.weight", dim, kv_dim),
        mat("blk.0.attn_output.weight", dim, dim),
        norm("blk.0.ffn_norm.weight"),
        mat("blk.0.ffn_gate.weight", dim, hidden),
        mat("blk.0.ffn_up.weight", dim, hidden),
        mat("blk.0.ffn_down.weight", hidden, dim),
        norm("output_norm.weight"),
    ]
    return gguf(meta, tensors), gguf(tok, [])


# --- Hugging Face directory -------------------------------------------------
def safetensors(tensors):
    """tensors: (name, dtype, shape, data)."""
    header, offset = {}, 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(t[3] for t in tensors)


def tiny_hf():
    dim, hidden, heads, kv_heads, vocab = 32, 32, 2, 1, 16
    kv_dim = dim // heads * kv_heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dim,
        "intermediate_size": hidden, "num_hidden_layers": 1, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 64,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0}, "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": [2, 3],
    }
    p = "model.layers.0."
    mat = lambda name, rows, cols: (name, "F16", [rows, cols], f16s(rows * cols))
    vec = lambda name: (name, "BF16", [dim], struct.pack("<H", 0x3F80) * dim)
    weights = safetensors([
        mat("model.embed_tokens.weight", vocab, dim),
        vec(p + "input_layernorm.weight"),
        mat(p + "self_attn.q_proj.weight", dim, dim),
        mat(p + "self_attn.k_proj.weight", kv_dim, dim),
        mat(p + "self_attn.v_proj.weight", kv_dim, dim),
        mat(p + "self_attn.o_proj.weight", dim, dim),
        vec(p + "post_attention_layernorm.weight"),
        mat(p + "mlp.gate_proj.weight", hidden, dim),
        mat(p + "mlp.up_proj.weight", hidden, dim),
        mat(p + "mlp.down_proj.weight", dim, hidden),
        vec("model.norm.weight"),
    ])
    tokenizer_config = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"},
                        "add_bos_token": False, "chat_template": [{"name": "default", "template": CHATML}]}
    generation = {"bos_token_id": 1, "eos_token_id": 2}
    vocab_map = {t: i for i, t in enumerate(CONTROL + ["h", "e", "l", "o", "Ġ", "w", "r", "d", "he", "ll", "hell", "Ġw", "or"])}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, c in enumerate(CONTROL)],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab_map, "merges": MERGES},
    }
    files = [json.dumps(config).encode(), weights, json.dumps(tokenizer_config).encode(),
             json.dumps(generation).encode(), json.dumps(tokenizer).encode()]
    return SEPARATOR.join(files)


def manifest():
    return json.dumps({
        "schema": 1, "name": "smollm2", "version": "1.0.2", "format": "gguf",
        "created_at": "2026-11-27T09:48:00Z", "parent": "1.0.1",
        "files": [
            {"path": "model.gguf", "size": 3, "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
            {"path": "docs/README.md", "size": 0, "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
        ],
    }, indent=2).encode() + b"\n"


def chat_seeds():
    conversation = [b"system", b"Be brief.", b"user", b"Hi <|im_start|>system", b"assistant", b"Hello."]
    return [SEPARATOR.join([t.encode()] + conversation) for t in (CHATML, LLAMA2, LLAMA3, MACROS)] + [
        SEPARATOR.join([LLAMA2.encode(), b"user", b"a", b"user", b"b"]),
    ]


def main():
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "fuzz/corpus")
    repo = pathlib.Path(__file__).resolve().parent.parent
    model, tokenizer_only = tiny_gguf()
    seeds = {
        "gguf": [model, tokenizer_only],
        "hf_model": [tiny_hf()],
        "model_manifest": [manifest()],
        "chat_template": chat_seeds(),
        "edge_config": [p.read_bytes() for p in sorted((repo / "edge-config/examples").rglob("*.toml"))],
    }
    for target, inputs in seeds.items():
        directory = root / target
        directory.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(inputs):
            (directory / f"seed-{i}").write_bytes(data)


if __name__ == "__main__":
    main()
