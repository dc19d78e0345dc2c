#!/usr/bin/env python3
"""The official `openai` Python client on a stream whose upstream is lost.

Streams a chat completion through an edge node; after --pause-after chunks
with text it prints `paused` and waits for a line on stdin (the test kills
every GPU host meanwhile), then reads on. The stream must end in the SDK's
own `openai.APIError` carrying the edge's `upstream_lost` event, after the
text so far, and never finish as if whole. Prints `raised: <message>` and
exits 0 when it did; exits non-zero with the reason otherwise.

The e2e test `tests/tests/e2e/stream_resume.rs` runs it with the venv that
`cargo xtask test` creates (`.cache/venv-openai`).
"""

import argparse
import sys

import openai
from openai import OpenAI


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--pause-after", type=int, default=10)
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=120)
    stream = client.chat.completions.create(
        model=args.model,
        messages=[{"role": "user", "content": "tell me a long story"}],
        temperature=0,
        max_tokens=args.max_tokens,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    text = []
    finished = None
    try:
        for chunk in stream:
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta.content
            if delta:
                text.append(delta)
                if len(text) == args.pause_after:
                    print("paused", flush=True)
                    sys.stdin.readline()
            if chunk.choices[0].finish_reason is not None:
                finished = chunk.choices[0].finish_reason
    except openai.APIError as error:
        if len(text) < args.pause_after:
            sys.exit(f"raised after only {len(text)} chunks: {error}")
        if "upstream" not in str(error) or finished is not None:
            sys.exit(f"raised {error!r} (finish {finished!r})")
        print(f"raised: {error}", flush=True)
        return
    sys.exit(f"the stream ended without an error after {len(text)} chunks (finish {finished!r})")


if __name__ == "__main__":
    main()
