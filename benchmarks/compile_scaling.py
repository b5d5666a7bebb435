"""Compile-time scaling: the tiny config with more and more layers, compile time per layer.

    python benchmarks/compile_scaling.py                       # 50 100 200 400 800 layers
    python benchmarks/compile_scaling.py --layers 100 1000 --out /tmp/scaling.json

Each size compiles in its own subprocess (no state shared between sizes). Linear scaling shows
as a flat ms/layer column. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, subprocess_json, write_results  # noqa: E402

CONFIG = ROOT / "einplan" / "configs" / "tiny.json"


def run_case_here(layers: int) -> dict:
    """Compile the tiny config with ``layers`` layers in this process; time it and each pass."""
    import einplan

    cfg = dict(json.loads(CONFIG.read_text()), num_hidden_layers=layers)
    t0 = time.perf_counter()
    plan = einplan.compile_model(cfg)
    seconds = time.perf_counter() - t0
    passes: dict[str, float] = {}
    for stat in plan.meta["passes"]:
        passes[stat["pass"]] = passes.get(stat["pass"], 0.0) + stat["seconds"]
    nodes = sum(len(g.nodes) for g in plan.entries.values())
    return {"layers": layers, "compile_s": seconds, "nodes": nodes, "passes_s": passes}


def main() -> None:
    """Compile each size in a subprocess, print the table and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[50, 100, 200, 400, 800])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compile_scaling.json"))
    ap.add_argument("--case", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case is not None:
        print(json.dumps(run_case_here(args.case)))
        return
    results = []
    print(f"{'layers':>7} {'nodes':>8} {'compile s':>10} {'ms/layer':>9}")
    for layers in args.layers:
        res = subprocess_json([sys.executable, __file__, "--case", str(layers)])
        if "error" in res:
            print(f"{layers:>7} error: {res['error']}")
        else:
            per_layer = 1000 * res["compile_s"] / layers
            print(f"{layers:>7} {res['nodes']:>8} {res['compile_s']:>10.2f} {per_layer:>9.2f}")
        results.append(res)
    write_results(args.out, results)


if __name__ == "__main__":
    main()
