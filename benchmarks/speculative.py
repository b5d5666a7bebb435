"""Speculative decoding on SmolLM2-135M: greedy speed-up with a truncated-layer draft (the
target's own first L layers, embeddings and final norm), the acceptance rate, and the step
costs that decide the acceptance rate needed for a given speed-up:

    speed-up = E[tokens per round] * T_decode / (k * T_draft + T_verify(k+1)),
    E[tokens per round] = (1 - a^(k+1)) / (1 - a)   (a: acceptance rate per drafted token)

    python benchmarks/speculative.py --layers 2 4 --k 2 4 --new 48 --out results/spec.json
    python benchmarks/speculative.py --weights DIR   # real weights, a Shakespeare prompt

Random weights (the default) make a truncated draft disagree with the target on almost every
token; ``--weights`` (an HF folder, e.g. ``einplan convert`` of SmolLM2-135M-Instruct's GGUF)
measures the acceptance a real model gives.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import timed  # noqa: E402

import einplan  # noqa: E402
from einplan.api import ENTRIES
from einplan.runtime.generate import GenerationRequest
from einplan.runtime.speculative import Model, speculative_generate

CONFIG = Path(einplan.__file__).parent / "configs" / "smollm2-135m.json"


def median_time(fn, reps: int = 7) -> float:
    """Median seconds of ``reps`` calls after one warm-up (benchmarks/common.py's timer)."""
    return statistics.median(timed(fn, 1, reps, 0.0))


def needed_acceptance(k: int, t_dec: float, t_draft: float, t_ver: float, goal: float) -> float:
    """The per-token acceptance rate at which the expected speed-up reaches ``goal``."""
    lo, hi = 0.0, 1.0
    for _ in range(50):
        a = (lo + hi) / 2
        tokens = (1 - a ** (k + 1)) / (1 - a) if a < 1 else k + 1
        if tokens * t_dec / (k * t_draft + t_ver) < goal:
            lo = a
        else:
            hi = a
    return hi


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    p.add_argument("--k", type=int, nargs="+", default=[2, 4])
    p.add_argument("--new", type=int, default=48)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--out")
    p.add_argument("--weights", help="HF folder of real weights (default: random weights)")
    args = p.parse_args()
    if args.weights:
        config = Path(args.weights) / "config.json"
        cfg = json.loads(config.read_text())
        plan = einplan.compile_model(config, entries=(*ENTRIES, "verify"))
        target = einplan.Session(plan, args.weights)
        text = (Path(einplan.__file__).parent / "data" / "shakespeare_sample.txt").read_text()
        prompt = target.tokenizer.encode(text[5000:6000]).ids[:32]
    else:
        cfg = json.loads(CONFIG.read_text())
        plan = einplan.compile_model(CONFIG, entries=(*ENTRIES, "verify"))
        target = einplan.Session(plan, random_seed=0)
        prompt = list(range(1000, 1032))
    t0 = time.perf_counter()
    plain = target.generate(prompt, args.new, ctx=args.ctx, ignore_eos=True)
    plain_s = time.perf_counter() - t0
    out: dict = {"plain": {"seconds": round(plain_s, 2), "new_tokens": args.new}, "runs": []}
    tgt = Model(target.plan, target.weights, args.ctx, 0, verify=True)
    tgt.feed(prompt, 0, None)
    t_dec = median_time(lambda: tgt.feed([5], 32, None))
    out["target_decode_ms"] = round(t_dec * 1e3, 1)
    print(json.dumps(out), flush=True)
    for layers in args.layers:
        dplan = einplan.compile_model({**cfg, "num_hidden_layers": layers, "name": f"d{layers}"})
        dft = Model(dplan, target.weights, args.ctx, 0, verify=False)
        dft.feed(prompt, 0, None)
        t_draft = median_time(lambda dft=dft: dft.feed([5], 32, None))
        for k in args.k:
            t_ver = median_time(lambda k=k: tgt.feed([5] * (k + 1), 32, None, all_logits=True))
            request = GenerationRequest([prompt], args.new, ctx=args.ctx)
            t0 = time.perf_counter()
            spec = speculative_generate(
                (target.plan, target.weights), (dplan, target.weights), request, k
            )
            spec_s = time.perf_counter() - t0
            row = {
                "draft_layers": layers,
                "k": k,
                "same_tokens_as_plain": spec.tokens == plain.tokens,
                "acceptance": round(spec.stats.acceptance_rate, 3),
                "seconds": round(spec_s, 2),
                "speedup": round(plain_s / spec_s, 2),
                "draft_decode_ms": round(t_draft * 1e3, 1),
                "verify_ms": round(t_ver * 1e3, 1),
                "acceptance_needed_for_1.3x": round(
                    needed_acceptance(k, t_dec, t_draft, t_ver, 1.3), 3
                ),
            }
            out["runs"].append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
