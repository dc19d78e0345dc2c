#!/usr/bin/env python3
"""The peer of `infer_bench run`: PyTorch `transformers` on the same model
directory and GPU, eager attention, fp16, greedy.

For each batch size it prints one JSON line per measurement, the median of
--repeat runs, in the same shape as infer_bench:

- decode: generated tokens per second of `generate` (prefill included),
  every sequence forced to exactly --gen-tokens tokens;
- prefill: prompt tokens per second of one forward pass over the batch.

Prompts are random token ids; nothing is padded (all prompts are the same
length).
"""
import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--streams", default="1,8,32,64")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()

    model = AutoModelForCausalLM.from_pretrained(
        a.model, torch_dtype=torch.float16, attn_implementation="eager"
    ).to("cuda").eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def prompts(batch):
        ids = torch.randint(3, vocab, (batch, a.prompt_tokens), generator=gen)
        return ids.to("cuda"), torch.ones_like(ids).to("cuda")

    def timed(fn):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    def generate(ids, mask, n):
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )

    with torch.inference_mode():
        ids, mask = prompts(max(int(s) for s in a.streams.split(",")))
        generate(ids, mask, 4)  # warm-up
        for batch in [int(s) for s in a.streams.split(",")]:
            rates = []
            for _ in range(a.repeat):
                ids, mask = prompts(batch)
                rates.append(batch * a.prompt_tokens / timed(lambda: model(input_ids=ids, attention_mask=mask)))
            emit("prefill", batch, a.prompt_tokens, 1, statistics.median(rates))
            rates = []
            for _ in range(a.repeat):
                ids, mask = prompts(batch)
                rates.append(batch * a.gen_tokens / timed(lambda: generate(ids, mask, a.gen_tokens)))
            emit("decode", batch, a.prompt_tokens, a.gen_tokens, statistics.median(rates))


def emit(kind, streams, prompt_tokens, gen_tokens, rate):
    print(json.dumps({
        "engine": "transformers",
        "backend": "cuda",
        "kind": kind,
        "streams": streams,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "tokens_per_second": round(rate, 1),
    }), flush=True)


if __name__ == "__main__":
    main()
