"""Data-parallel training benchmark (issue #16): train steps of the tiny config and of
SmolLM2-135M (fp32, random weights) as one process with 2 BLAS threads accumulating 2
micro-batches, against ``--dp 2`` with 1 BLAS thread per worker and one micro-batch each (the
same global batch, the same losses), on a local Ray and on a two-node local cluster
(``ray start --head`` + ``ray start --address``, one CPU each). Reports tokens/s, the
all-reduce's milliseconds and share of the step, each worker's tokens/s, the run's wall time
(Ray's start included), and what the measured all-reduce predicts for 8 machines.

    python benchmarks/dp.py                              # both models, 2 rounds, two-node too
    python benchmarks/dp.py --models tiny --rounds 1 --no-two-node
    python benchmarks/dp.py --two-node-only -o benchmarks/results/dp-two-node.json

The single-process and data-parallel runs alternate (round 1: single, dp; round 2: ...), each
in its own subprocess; figures are medians over the steps after the warm-up steps, then over
rounds. Prints a table, writes benchmarks/results/dp.json. A 2-core machine cannot show a
speed-up: both sides share the same two cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import ROOT, subprocess_json, write_results  # noqa: E402

CORPUS = ROOT / "einplan" / "data" / "shakespeare_sample.txt"
# per model: train settings (per worker) and steps (the first ``warmup`` not counted)
MODELS = {
    "tiny": {
        "config": "tiny",
        "train": {"seq_len": 128, "micro_batch": 8},
        "steps": 30,
        "warmup": 5,
    },
    "smollm2-135m": {
        "config": "smollm2-135m",
        "train": {"seq_len": 128, "micro_batch": 1, "tokenizer": "bytes"},
        "steps": 6,
        "warmup": 2,
    },
}
COMMON = {
    "accumulation": 1,
    "log_every": 1,
    "checkpoint_every": 0,
    "sample_every": 0,
    "eval_batches": 1,
    "warmup_steps": 2,
    "keep_checkpoints": 1,
}
SIZE = 2  # workers of the data-parallel side
LINKS_GBIT = (10, 25, 100)  # network links the 8-machine prediction is given for
TARGET = 0.10  # the all-reduce's share of a step to stay under


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def run_case_here(model: str, mode: str, address: str | None) -> dict:
    """One run in this process: ``single`` (2 threads, accumulation 2) or ``dp`` (2 workers
    of 1 thread); medians of its steps after the warm-up."""
    import einplan
    from einplan.api import TRAIN_ENTRIES, parameter_count
    from einplan.apps.metrics import read_records

    spec = MODELS[model]
    overrides = {**COMMON, **spec["train"]}
    plan = einplan.compile_model(spec["config"], entries=TRAIN_ENTRIES)
    params = parameter_count(plan.entry("train_step"))
    out = Path(tempfile.mkdtemp(prefix=f"dp-{model}-{mode}-"))
    try:
        t0 = time.perf_counter()
        if mode == "single":
            overrides["accumulation"] = SIZE
            einplan.train(plan, data=CORPUS, out=out, steps=spec["steps"], overrides=overrides)
        else:
            einplan.train(
                plan,
                data=CORPUS,
                out=out,
                steps=spec["steps"],
                overrides=overrides,
                dp=SIZE,
                threads_per_worker=1,
                ray_address=address,
            )
        wall = time.perf_counter() - t0
        records = read_records(out / "metrics.jsonl")[spec["warmup"] :]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    workers = len(records[0].get("workers", [])) if records else 0
    return {
        "model": model,
        "mode": mode,
        "cluster": "two-node" if address else "local",
        "params": params,
        "steps_counted": len(records),
        "tokens_per_s": median([r["tokens_per_s"] for r in records]),
        "step_s": median([step_tokens(spec) / r["tokens_per_s"] for r in records]),
        "allreduce_ms": median([r["allreduce_ms"] for r in records if "allreduce_ms" in r]),
        "allreduce_fraction": median(
            [r["allreduce_fraction"] for r in records if "allreduce_fraction" in r]
        ),
        "worker_tokens_per_s": [
            median([r["workers"][k]["tokens_per_s"] for r in records]) for k in range(workers)
        ],
        "forward_ms": median([r["forward_ms"] for r in records]),
        "backward_ms": median([r["backward_ms"] for r in records]),
        "optimizer_ms": median([r["optimizer_ms"] for r in records]),
        "wall_s": wall,
    }


def step_tokens(spec: dict) -> int:
    """Tokens in one step of either side: SIZE micro-batches of micro_batch x seq_len."""
    return SIZE * spec["train"]["micro_batch"] * spec["train"]["seq_len"]


def run_case(model: str, mode: str, address: str | None) -> dict:
    """One run in a subprocess of its own."""
    cmd = [sys.executable, __file__, "--case", model, mode]
    if address:
        cmd += ["--address", address]
    result = subprocess_json(cmd)
    return {"model": model, "mode": mode, **result}


def merge_rounds(rows: list[dict]) -> dict:
    """Medians over the rounds of one case."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return rows[0]
    merged = dict(ok[0])
    for key, value in ok[0].items():
        if isinstance(value, float):
            merged[key] = median([r[key] for r in ok if r.get(key) is not None])
    merged["worker_tokens_per_s"] = [
        median([r["worker_tokens_per_s"][k] for r in ok])
        for k in range(len(merged["worker_tokens_per_s"]))
    ]
    merged["rounds"] = len(ok)
    merged["failed_rounds"] = [r["error"][-300:] for r in rows if "error" in r]
    return merged


def predict(smol_dp: dict, grad_bytes: int) -> dict:
    """What the measured all-reduce implies for 8 machines of 2 cores, one worker each."""
    nodes = 8
    per_node = 2 * (nodes - 1) / nodes * grad_bytes  # sent (and received) by each node
    measured_s = smol_dp["allreduce_ms"] / 1e3
    compute_s = smol_dp["step_s"] - measured_s  # one worker's share of a step
    budget_s = compute_s * TARGET / (1 - TARGET)  # all-reduce <= 10 % of the whole step
    local_bytes = 2 * (SIZE - 1) / SIZE * grad_bytes
    return {
        "nodes": nodes,
        "grad_bytes": grad_bytes,
        "bytes_per_node_per_step": per_node,
        "measured_local_allreduce_s": measured_s,
        "measured_local_bytes_per_rank": local_bytes,
        "measured_local_gb_per_s": local_bytes / measured_s / 1e9,
        "worker_compute_s": compute_s,
        "allreduce_budget_s": budget_s,
        "bandwidth_needed_gbit_per_s": per_node * 8 / budget_s / 1e9,
        "predicted_allreduce_s": {
            f"{g} Gbit/s": per_node * 8 / (g * 1e9) + measured_s * per_node / local_bytes
            for g in LINKS_GBIT
        },
    }


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'model':<14}{'side':<22}{'tok/s':>9}{'step s':>9}{'all-red ms':>11}{'share':>7}"
        f"{'worker tok/s':>18}{'wall s':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<14}{r['mode']:<22}error: {r['error'][-200:]}")
            continue
        side = {"single": "1 proc x 2 threads", "dp": "--dp 2 x 1 thread"}[r["mode"]]
        side += " (2 nodes)" if r.get("cluster") == "two-node" else ""
        ar = f"{r['allreduce_ms']:.0f}" if r["allreduce_ms"] is not None else "-"
        share = f"{r['allreduce_fraction']:.0%}" if r["allreduce_fraction"] is not None else "-"
        workers = " ".join(f"{t:,.0f}" for t in r["worker_tokens_per_s"]) or "-"
        print(
            f"{r['model']:<14}{side:<22}{r['tokens_per_s']:>9,.0f}{r['step_s']:>9.2f}{ar:>11}"
            f"{share:>7}{workers:>18}{r['wall_s']:>8.0f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-two-node", action="store_true")
    ap.add_argument("--two-node-only", action="store_true", help="only the two-node cluster")
    ap.add_argument("-o", "--out", default=str(ROOT / "benchmarks" / "results" / "dp.json"))
    ap.add_argument("--case", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case_here(*args.case, args.address)))
        return
    rows = []
    for model in [] if args.two_node_only else args.models:
        rounds: dict[str, list[dict]] = {"single": [], "dp": []}
        for _ in range(args.rounds):  # interleaved: single, dp, single, dp
            for mode in rounds:
                rounds[mode].append(run_case(model, mode, None))
        rows += [merge_rounds(rounds["single"]), merge_rounds(rounds["dp"])]
    if not args.no_two_node:
        from ray_cluster import local_cluster

        with local_cluster(nodes=2, cpus=1) as address:
            for model in args.models:
                rows.append(merge_rounds([run_case(model, "dp", address)]))
    print_table(rows)
    smol = [r for r in rows if r["model"] == "smollm2-135m" and r["mode"] == "dp"][:1]
    prediction = None
    if smol and "error" not in smol[0] and smol[0]["allreduce_ms"]:
        prediction = predict(smol[0], smol[0]["params"] * 4)
        p = prediction
        print(
            f"\nSmolLM2-135M: {p['grad_bytes'] / 1e6:,.0f} MB of fp32 gradients; the all-reduce "
            f"took {p['measured_local_allreduce_s'] * 1e3:,.0f} ms on one machine "
            f"({p['measured_local_gb_per_s']:.2f} GB/s through the object store).\n"
            f"8 machines: each sends and receives {p['bytes_per_node_per_step'] / 1e6:,.0f} MB "
            f"a step; with {p['worker_compute_s']:.2f} s of compute per worker the all-reduce "
            f"stays under {TARGET:.0%} of a step only below {p['allreduce_budget_s']:.2f} s, "
            f"which needs {p['bandwidth_needed_gbit_per_s']:.1f} Gbit/s per node; predicted "
            + ", ".join(f"{k}: {v:.2f} s" for k, v in p["predicted_allreduce_s"].items())
        )
    print(
        "\nThis machine has 2 cores: both sides use the same two, so --dp cannot be faster "
        "here; the all-reduce and Ray's start are its cost."
    )
    write_results(args.out, [*rows, {"prediction": prediction}])


if __name__ == "__main__":
    main()
