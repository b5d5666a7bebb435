"""The continuous-batching engine without HTTP: decode tokens/s of 1 and of N concurrent
requests, measured in alternating rounds so that a shared machine's changing load hits both
alike, and the time to first token of N prompts arriving together.

    python benchmarks/serve_engine.py --config smollm2-135m --rows 16 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import einplan
from einplan.runtime.batching import BatchEngine, Sequence


def run(engine: BatchEngine, rows: int, prompt: int, new: int) -> dict:
    seqs = [Sequence([1000 + 7 * r + i for i in range(prompt)], new) for r in range(rows)]
    t0 = time.perf_counter()
    for s in seqs:
        engine.add(s)
    decode_s, tokens = 0.0, 0
    while not engine.idle:
        events, stats = engine.step()
        if stats.decode_rows:
            decode_s += stats.decode_s
            tokens += stats.decode_rows
    ttft = [s.first_token_s - t0 for s in seqs]
    return {"decode_tokens_per_s": tokens / decode_s, "ttft_max_s": max(ttft)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="smollm2-135m")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args()
    session = einplan.Session(einplan.compile_model(args.config), random_seed=0)
    engine = BatchEngine(session.plan, session.weights, max_batch=args.rows, ctx=256)
    run(engine, 1, args.prompt, 4)  # warm up both shapes
    run(engine, args.rows, args.prompt, 4)
    one, many = [], []
    for _ in range(args.rounds):
        one.append(run(engine, 1, args.prompt, args.new))
        many.append(run(engine, args.rows, args.prompt, args.new))
        print(json.dumps({"one": one[-1], "many": many[-1]}), flush=True)
    t1 = statistics.median(r["decode_tokens_per_s"] for r in one)
    tn = statistics.median(r["decode_tokens_per_s"] for r in many)
    out = {
        "config": args.config,
        "rows": args.rows,
        "one_decode_tokens_per_s": round(t1, 1),
        "many_decode_tokens_per_s": round(tn, 1),
        "ratio": round(tn / t1, 2),
        "ttft_max_s_many": round(statistics.median(r["ttft_max_s"] for r in many), 3),
    }
    print(json.dumps(out))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
