"""Forward-pass benchmark: SmolLM2-135M (random weights) tokens/s at 1x256 and 1x1024,
sequential vs thread pool, compile time cold and warm, peak RSS; optionally interleaved with
PyTorch eager (../shared/perf/peer/torch_baselines.py run by a torch venv's python).

    python benchmarks/forward.py                                  # einplan only
    python benchmarks/forward.py --torch-python /path/to/torch-venv/bin/python

Every case runs in its own subprocess (peak RSS per case). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, run_torch_case, subprocess_json, timed, write_results  # noqa: E402

CONFIG = ROOT / "configs" / "smollm2-135m.json"


def run_case_here(kind: str, batch: int, seq: int, workers: int, args) -> dict:
    """One einplan case in this process (called in a subprocess by :func:`main`)."""
    import numpy as np

    import einplan

    if kind == "compile":
        t0 = time.perf_counter()
        plan = einplan.compile_model(CONFIG)
        return {
            "compile_s": time.perf_counter() - t0,
            "passes": plan.meta["passes"],
            "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }
    plan = einplan.compile_model(CONFIG)
    session = einplan.Session(plan, random_seed=0, workers=workers)
    ids = np.random.default_rng(1).integers(1, 49152, (batch, seq))
    samples = timed(lambda: session.forward(ids), args.warmup, args.reps, args.min_time)
    med = statistics.median(samples)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "samples_s": samples,
        "step_s_median": med,
        "step_s_min": min(samples),
        "tokens_per_s": batch * seq / med,
        "tokens_per_s_best": batch * seq / min(samples),
        "peak_rss_kib": ru.ru_maxrss,
        "minflt": ru.ru_minflt,
    }


def run_ours(kind, batch, seq, workers, args, env=None) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--case",
        f"{kind}:{batch}:{seq}:{workers}",
        "--warmup",
        str(args.warmup),
        "--reps",
        str(args.reps),
        "--min-time",
        str(args.min_time),
    ]
    t0 = time.perf_counter()
    res = subprocess_json(cmd, env)
    res.update(
        engine="einplan",
        kind=kind,
        batch=batch,
        seq=seq,
        workers=workers,
        process_s=time.perf_counter() - t0,
    )
    return res


def run_torch(batch, seq, args) -> dict:
    res = run_torch_case(
        args.torch_python, f"smollm2-135m:fwd:{batch}:{seq}", args.warmup, args.reps, args.min_time
    )
    res.update(kind="fwd", batch=batch, seq=seq, workers=None)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch-python", help="python of a venv with torch 2.13.0 + transformers")
    ap.add_argument("--shapes", default="1:256,1:1024")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds of every case")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=3.0)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "forward.json"))
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        kind, b, s, w = args.case.split(":")
        print(json.dumps(run_case_here(kind, int(b), int(s), int(w), args)))
        return

    shapes = [tuple(int(x) for x in s.split(":")) for s in args.shapes.split(",")]
    results = []
    cache = tempfile.mkdtemp(prefix="einplan-bench-cache-")
    env = dict(os.environ, EINPLAN_CACHE_DIR=cache)
    for label in ("cold", "warm"):
        r = run_ours("compile", 0, 0, 0, args, env)
        r["cache"] = label
        results.append(r)
        print(
            f"compile {label}: {r.get('compile_s', float('nan')):.3f} s in-process, "
            f"{r['process_s']:.2f} s process",
            file=sys.stderr,
        )
    for _ in range(args.rounds):
        for b, s in shapes:
            for workers in (0, 2) if (b, s) == shapes[0] else (0,):
                results.append(run_ours("fwd", b, s, workers, args))
                print(
                    f"einplan fwd {b}x{s} workers={workers}: "
                    f"{results[-1].get('tokens_per_s', 0):.1f} tok/s",
                    file=sys.stderr,
                )
            if args.torch_python:
                results.append(run_torch(b, s, args))
                print(
                    f"pytorch fwd {b}x{s}: {results[-1].get('tokens_per_s', 0):.1f} tok/s",
                    file=sys.stderr,
                )

    from rich.console import Console
    from rich.table import Table

    t = Table(title="SmolLM2-135M forward (fp32, random weights, 2 cores)")
    for col in ("engine", "case", "tok/s median", "tok/s best", "peak RSS MiB", "vs PyTorch"):
        t.add_column(col, justify="left" if col in ("engine", "case") else "right")
    torch_by_shape = {}
    for r in results:
        if r["engine"] == "pytorch-eager" and "tokens_per_s" in r:
            torch_by_shape.setdefault((r["batch"], r["seq"]), []).append(r["tokens_per_s"])
    for r in results:
        if r["kind"] == "compile":
            t.add_row(
                "einplan",
                f"compile ({r['cache']} path cache)",
                f"{r.get('compile_s', float('nan')):.3f} s",
                f"{r['process_s']:.2f} s proc",
                f"{r.get('peak_rss_kib', 0) / 1024:.0f}",
                "",
            )
            continue
        if "error" in r:
            t.add_row(r["engine"], f"{r['batch']}x{r['seq']}", "error", r["error"][-60:], "", "")
            continue
        case = f"{r['batch']}x{r['seq']}" + (f" workers={r['workers']}" if r["workers"] else "")
        ref = torch_by_shape.get((r["batch"], r["seq"]))
        ratio = f"{r['tokens_per_s'] / statistics.median(ref):.2f}x" if ref else ""
        t.add_row(
            r["engine"],
            case,
            f"{r['tokens_per_s']:.1f}",
            f"{r.get('tokens_per_s_best', 1 / r['step_s_min'] * r['batch'] * r['seq']):.1f}",
            f"{r['peak_rss_kib'] / 1024:.0f}",
            ratio if r["engine"] == "einplan" else "",
        )
    Console(width=120).print(t)
    write_results(args.json, results)


if __name__ == "__main__":
    main()
