#!/usr/bin/env python3
"""The official `openai` Python client against a running `breakwater gpu-host`.

Checks that the SDK parses our wire format: model listing, chat and legacy
completions, each streamed and whole (the streamed text must equal the whole
one at temperature 0), usage, and a 404 surfacing as the SDK's own error.

    breakwater gpu-host --model .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf &
    .cache/venv-openai/bin/python tests/openai_client.py \
        --base-url http://127.0.0.1:8000/v1 --expect "The capital of France is Paris."

`cargo xtask test` creates the venv (openai pinned in xtask) and the test
`host/infer/tests/integration/openai_python.rs` runs this script against an in-process
server. Exits non-zero with a message on the first mismatch.
"""

import argparse
import sys

import openai
from openai import OpenAI

QUESTION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


def check(condition, message):
    if not condition:
        sys.exit(f"openai_client.py: {message}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--expect", help="the chat answer expected, exactly")
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=120)

    ids = [m.id for m in client.models.list().data]
    check(args.model in ids, f"model {args.model!r} not in {ids}")

    whole = client.chat.completions.create(
        model=args.model, messages=QUESTION, temperature=0, max_tokens=48
    )
    choice = whole.choices[0]
    answer = choice.message.content
    check(choice.message.role == "assistant", f"role {choice.message.role!r}")
    check(choice.finish_reason in ("stop", "length"), f"finish {choice.finish_reason!r}")
    check(whole.usage.prompt_tokens > 0, f"usage {whole.usage}")
    check(
        whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens,
        f"usage {whole.usage}",
    )
    if args.expect is not None:
        check(answer == args.expect, f"chat answered {answer!r}, expected {args.expect!r}")

    parts, usage, finish = [], None, None
    stream = client.chat.completions.create(
        model=args.model,
        messages=QUESTION,
        temperature=0,
        max_tokens=48,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                parts.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    streamed = "".join(parts)
    check(streamed == answer, f"streamed {streamed!r} but whole {answer!r}")
    check(finish == choice.finish_reason, f"streamed finish {finish!r}")
    check(usage is not None and usage.completion_tokens == whole.usage.completion_tokens,
          f"streamed usage {usage}")

    prompt = "The capital of France is"
    text = client.completions.create(
        model=args.model, prompt=prompt, temperature=0, max_tokens=8
    ).choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=args.model, prompt=prompt, temperature=0, max_tokens=8, stream=True
        )
        if c.choices
    )
    check(text and streamed == text, f"completion {text!r} vs streamed {streamed!r}")

    try:
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
        check(False, "an unknown model was accepted")
    except openai.NotFoundError as e:
        check(e.status_code == 404, f"status {e.status_code}")
        check(e.code == "model_not_found", f"code {e.code!r}")

    print(f"openai {openai.__version__}: ok; chat answered {answer!r}, completion {text!r}")


if __name__ == "__main__":
    main()
