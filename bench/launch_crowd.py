#!/usr/bin/env python3
"""The launch crowd for bench/launch-crowd.sh: REQUESTS chat completions,
each question drawn Zipf-like (exponent ZIPF_S) from QUESTIONS distinct ones,
sent by CONCURRENCY clients at once, each on its own keep-alive connection.

Every request is deterministic (temperature 0), as a tenant's app asking a
fixed question would send it. Prints one JSON object: how many requests,
failures, the X-Cache outcomes, latency p50/p99 in ms, wall time, the
completion tokens the answers carried and how many of those came from the
cache (hits), and how many distinct questions were asked.

Standard library only: the bench must not depend on a package index.
"""

import argparse
import http.client
import json
import random
import statistics
import sys
import threading
import time

TOPICS = [
    "the tide", "a lighthouse", "a breakwater", "the moon", "rain", "a harbour",
    "a river delta", "sea salt", "a reef", "the wind", "a storm surge", "a jetty",
    "sand dunes", "a compass", "the horizon", "fog", "a ferry", "coral",
    "a buoy", "kelp", "the current", "an estuary", "a cliff", "a wave",
    "driftwood",
]
ASKS = [
    "What is {}?", "Describe {} in one sentence.", "Why does {} matter?",
    "Give one fact about {}.", "Who studies {}?", "Where would I see {}?",
    "How old can {} be?", "What colour is {}?", "Name a poem about {}.",
    "What sound does {} make?", "Is {} dangerous?", "How is {} formed?",
]


def questions(count):
    """`count` distinct questions, the same list on every run."""
    out = []
    for ask in ASKS:
        for topic in TOPICS:
            out.append(ask.format(topic))
    if count > len(out):
        out += [f"Question {i}: what is the number {i}?" for i in range(count - len(out))]
    return out[:count]


def zipf_draws(n, count, exponent, seed):
    """`count` indexes into `n` items, item k drawn with weight 1/(k+1)^s."""
    weights = [1.0 / (k + 1) ** exponent for k in range(n)]
    return random.Random(seed).choices(range(n), weights=weights, k=count)


def percentile(values, share):
    ordered = sorted(values)
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))
    return ordered[index]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--zipf-s", type=float, default=1.1)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()

    asked = questions(args.questions)
    draws = zipf_draws(len(asked), args.requests, args.zipf_s, args.seed)
    bodies = [
        json.dumps({
            "model": args.model,
            "messages": [
                {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
                {"role": "user", "content": asked[k]},
            ],
            "temperature": 0,
            "max_tokens": args.max_tokens,
        })
        for k in range(len(asked))
    ]

    lock = threading.Lock()
    next_index = [0]
    results = []

    def client():
        conn = http.client.HTTPConnection(args.host, args.port, timeout=args.timeout)
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= len(draws):
                break
            body = bodies[draws[i]]
            started = time.monotonic()
            try:
                conn.request("POST", "/v1/chat/completions", body=body,
                             headers={"content-type": "application/json"})
                response = conn.getresponse()
                data = response.read()
                elapsed = time.monotonic() - started
                outcome = response.getheader("x-cache") or "none"
                tokens = 0
                if response.status == 200:
                    tokens = json.loads(data).get("usage", {}).get("completion_tokens", 0)
                result = (response.status, outcome, elapsed, tokens)
            except (OSError, http.client.HTTPException, ValueError) as error:
                conn.close()
                conn = http.client.HTTPConnection(args.host, args.port, timeout=args.timeout)
                result = (0, f"error: {error}", time.monotonic() - started, 0)
            with lock:
                results.append(result)
        conn.close()

    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - started

    ok = [r for r in results if r[0] == 200]
    outcomes = {}
    for r in results:
        outcomes[r[1]] = outcomes.get(r[1], 0) + 1
    latencies = [r[2] * 1000 for r in ok]
    report = {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "distinct_questions_asked": len(set(draws)),
        "x_cache": outcomes,
        "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
        "p99_ms": round(percentile(latencies, 0.99), 1) if latencies else None,
        "wall_s": round(wall, 1),
        "completion_tokens_served": sum(r[3] for r in ok),
        "completion_tokens_from_cache": sum(r[3] for r in ok if r[1] == "HIT"),
    }
    json.dump(report, sys.stdout)
    print()
    return 0 if not report["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
