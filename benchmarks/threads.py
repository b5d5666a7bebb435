"""Thread benchmark: each way a plan can run (one step at a time on 1 BLAS thread or on all
cores, a pool of 2 workers with 1 BLAS thread each, and the schedule pass's own choice) on
SmolLM2-135M decode at batch 1 and 8 (random fp32 weights, 32-token prompt) and on training
steps (tiny Mixtral 4x128, the tiny Llama 4x256), interleaved round by round.

    python benchmarks/threads.py --rounds 3

Every (case, way) runs in its own subprocess. Prints a table (median per case and way, and
what the schedule chose), writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, subprocess_json, timed, write_results  # noqa: E402
from train import MODELS, TRAIN  # noqa: E402

CASES = {
    "decode b1": ("decode", "smollm2-135m", 1, 32),
    "decode b8": ("decode", "smollm2-135m", 8, 32),
    "train tiny-moe 4x128": ("train", "tiny-moe", 4, 128),
    "train tiny 4x256": ("train", "tiny", 4, 256),
}
# way: (workers given to the executor, BLAS threads written into the plan's schedule)
WAYS = {
    "sequential, 1 BLAS thread": (1, 1),
    "sequential, all BLAS threads": (1, None),
    "pool of 2, 1 BLAS thread each": (2, 1),
    "schedule's choice": (0, "plan"),
}


def set_blas_threads(plan, threads) -> None:
    """Write a BLAS thread count into every entry's schedule ("plan": leave the choice)."""
    if threads == "plan":
        return
    for name in plan.entries:
        plan.entry(name).meta["schedule"]["blas_threads"] = threads


def schedule_of(plan, entry: str) -> dict:
    s = plan.entry(entry).meta["schedule"]
    return {k: s.get(k) for k in ("workers", "blas_threads", "estimated_ms", "threads_reason")}


def run_case_here(case: str, way: str, new: int, reps: int) -> dict:
    """One case run one way in this process."""
    import numpy as np

    import einplan

    kind, model, batch, seq = CASES[case]
    workers, threads = WAYS[way]
    config = MODELS.get(model, ROOT / "configs" / f"{model}.json")
    if kind == "decode":
        from einplan.formats.weights import random_weights
        from einplan.runtime.backends import get_backend
        from einplan.runtime.generate import GenerationRequest, Generator

        plan = einplan.compile_model(config, entries=("prefill", "decode"))
        set_blas_threads(plan, threads)
        weights = random_weights(plan.entry("decode"), 0)
        gen = Generator(plan, get_backend().pack_weights(plan, weights), workers)  # as Session
        rng = np.random.default_rng(1)
        prompts = [rng.integers(1, 49152, seq).tolist() for _ in range(batch)]
        gen.generate(GenerationRequest(prompts, 8))  # warm-up: kernels, buffers
        steps = [
            s
            for _ in range(reps)
            for s in gen.generate(GenerationRequest(prompts, new)).stats.decode_step_s
        ]
        p50 = statistics.median(steps)
        return {"tokens_per_s": batch / p50, "ms": p50 * 1e3, "chosen": schedule_of(plan, "decode")}
    from einplan.formats.weights import random_weights
    from einplan.models.train_config import parse_train_config
    from einplan.runtime.trainer import Trainer

    cfg = parse_train_config({**TRAIN, "micro_batch": batch, "seq_len": seq, "lr": 1e-4})
    plan = einplan.compile_model(config, entries=("train_step", "loss"), train=cfg)
    set_blas_threads(plan, threads)
    trainer = Trainer(plan, random_weights(plan.entry("train_step"), 0), cfg, workers)
    ids = np.random.default_rng(1).integers(1, plan.config["vocab_size"], (batch, seq + 1))
    med = statistics.median(timed(lambda: trainer.run_step([ids]), 2, reps, 2.0))
    return {
        "tokens_per_s": batch * seq / med,
        "ms": med * 1e3,
        "chosen": schedule_of(plan, "train_step"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=64, help="decode: new tokens per generation")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "threads.json"))
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--way", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case_here(args.case, args.way, args.new, args.reps)))
        return
    cases = args.cases.split(",")
    me = [sys.executable, __file__, "--new", str(args.new), "--reps", str(args.reps)]
    runs: dict[tuple[str, str], list[dict]] = {(c, w): [] for c in cases for w in WAYS}
    for _ in range(args.rounds):  # every way of a case back to back, round after round
        for case in cases:
            for way in WAYS:
                r = subprocess_json([*me, "--case", case, "--way", way])
                runs[(case, way)].append(r)
                print(f"{case} | {way}: {r.get('tokens_per_s', 0):.1f} tok/s", file=sys.stderr)
    results = []
    for (case, way), rs in runs.items():
        ok = [r for r in rs if "tokens_per_s" in r]
        row = {"case": case, "way": way, "rounds": rs}
        if ok:
            row["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in ok)
            row["chosen"] = ok[0]["chosen"]  # the schedule's choice only in its own way
        results.append(row)

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"pool vs sequential, median of {args.rounds} interleaved rounds (tok/s)")
    t.add_column("case")
    for way in WAYS:
        t.add_column(way, justify="right")
    t.add_column("schedule chose")
    for case in cases:
        rows = [r for r in results if r["case"] == case]
        own = [r for r in rows if r["way"] == "schedule's choice"]
        chosen = own[0].get("chosen", {}) if own else {}
        what = "pool" if chosen.get("workers") else "sequential"
        what += f", BLAS {chosen.get('blas_threads') or 'all'}" if chosen else ""
        t.add_row(case, *[f"{r.get('tokens_per_s', 0):.1f}" for r in rows], what)
    Console(width=160).print(t)
    write_results(args.json, results)


if __name__ == "__main__":
    main()
