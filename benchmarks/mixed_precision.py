"""Mixed precision: bf16 (and f16) training against float32, on three counts.

* quality: a 300-step run of the tiny config on the Shakespeare sample (einplan.train, the
  config's train section), final validation loss of each dtype;
* memory: activation bytes of one train step: the forward values the reverse graph reads
  (saved for the backward pass: activation memory in the usual sense), and everything the
  step holds beside weights and optimizer state, as the memory pass estimates it (arena and
  kernels' scratch), as the runtime allocates it, and as measured (the peak of what the
  step allocates after the weights and optimizer state: arena, kernel scratch and
  temporaries, by tracemalloc);
* time: seconds per train step, the dtypes' steps interleaved in one process (tiny at its
  train section's 16x128, SmolLM2-135M at 4x256, random weights), medians.

    python benchmarks/mixed_precision.py                      # all three
    python benchmarks/mixed_precision.py --parts memory,time --dtypes f32,bf16

Prints a table, writes benchmarks/results/mixed_precision.json.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, write_results  # noqa: E402

TINY = ROOT / "einplan" / "configs" / "tiny.json"
CASES = {"tiny": (TINY, 16, 128), "smollm2-135m": (ROOT / "configs" / "smollm2-135m.json", 4, 256)}
CORPUS = ROOT / "einplan" / "data" / "shakespeare_sample.txt"


def trainer_for(config: Path, dtype: str, batch: int, seq: int):
    """A Trainer of ``config``'s train_step in ``dtype`` over seeded random weights."""
    import einplan
    from einplan.formats.weights import random_weights
    from einplan.models.train_config import parse_train_config
    from einplan.runtime.trainer import Trainer

    cfg = parse_train_config({"micro_batch": batch, "seq_len": seq, "lr": 1e-4})
    plan = einplan.compile_model(
        config, entries=("train_step", "loss"), train=cfg, compute_dtype=dtype
    )
    return plan, Trainer(plan, random_weights(plan.entry("train_step"), 0), cfg)


def windows(vocab: int, batch: int, seq: int):
    import numpy as np

    return np.random.default_rng(1).integers(1, vocab, (batch, seq + 1))


def measure_memory(case: str, dtype: str) -> dict:
    """Estimated and measured activation bytes of one train step."""
    from einplan.compiler.passes.memory import estimate_memory, saved_for_backward

    config, batch, seq = CASES[case]
    plan, trainer = trainer_for(config, dtype, batch, seq)
    ids = windows(plan.config["vocab_size"], batch, seq)
    dims = {"batch": batch, "seq": seq}
    est = estimate_memory(plan.entry("train_step"), dims)
    saved = saved_for_backward(plan.entry("train_step"), dims)
    gc.collect()
    tracemalloc.start()
    trainer.run_step([ids])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "case": case,
        "dtype": dtype,
        "saved_for_backward_bytes": saved,
        "estimated_activation_bytes": est["arena_bytes"] + est["scratch_bytes"],
        "arena_and_scratch_bytes": trainer.executor.activation_bytes(),
        "measured_peak_bytes": peak,
    }


def measure_time(case: str, dtypes: list[str], reps: int) -> list[dict]:
    """Step times of each dtype, interleaved step by step."""
    config, batch, seq = CASES[case]
    trainers = {d: trainer_for(config, d, batch, seq)[1] for d in dtypes}
    ids = windows(trainers[dtypes[0]].plan.config["vocab_size"], batch, seq)
    samples: dict[str, list[float]] = {d: [] for d in dtypes}
    for rep in range(reps + 1):  # the first round warms up
        for d in dtypes:
            t0 = time.perf_counter()
            trainers[d].run_step([ids])
            if rep:
                samples[d].append(time.perf_counter() - t0)
    return [
        {
            "case": case,
            "dtype": d,
            "batch": batch,
            "seq": seq,
            "step_s_median": statistics.median(samples[d]),
            "samples_s": samples[d],
        }
        for d in dtypes
    ]


def measure_quality(dtype: str, steps: int) -> dict:
    """Final validation loss of a ``steps``-step run of the tiny config."""
    import einplan

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        res = einplan.train(
            TINY,
            data=CORPUS,
            out=out,
            steps=steps,
            compute_dtype=dtype,
            overrides={"sample_every": 0, "checkpoint_every": 0, "log_every": 50},
        )
        seconds = time.perf_counter() - t0
    last = res.history[-1]
    return {
        "dtype": dtype,
        "steps": steps,
        "val_loss": last["val_loss"],
        "loss": last["loss"],
        "skipped": last["skipped"],
        "val_curve": [(r["step"], r["val_loss"]) for r in res.history],
        "seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="quality,memory,time")
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--cases", default="tiny,smollm2-135m")
    ap.add_argument("--steps", type=int, default=300, help="steps of the quality runs")
    ap.add_argument("--reps", type=int, default=5, help="timed steps per dtype and case")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "mixed_precision.json"))
    args = ap.parse_args()
    parts, dtypes, cases = (args.parts.split(","), args.dtypes.split(","), args.cases.split(","))
    results: list[dict] = []

    def add(rows: list[dict]) -> None:  # written as they come: a long run keeps its parts
        results.extend(rows)
        write_results(args.json, results)
        gc.collect()

    if "memory" in parts:
        for case in cases:
            add([{"part": "memory", **measure_memory(case, d)} for d in dtypes])
    if "time" in parts:
        for case in cases:
            add([{"part": "time", **r} for r in measure_time(case, dtypes, args.reps)])
    if "quality" in parts:
        for d in dtypes:
            add([{"part": "quality", **measure_quality(d, args.steps)}])
    print_table(results, dtypes[0])


def print_table(results: list[dict], base: str) -> None:
    """One row per measurement, with its ratio to the ``base`` dtype's."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"mixed precision against {base} (2 cores, NumPy kernels)")
    for col in ("part", "case", "dtype", "value", f"x {base}"):
        t.add_column(col)
    keys = {
        "memory": (
            "saved_for_backward_bytes",
            "estimated_activation_bytes",
            "arena_and_scratch_bytes",
            "measured_peak_bytes",
        ),
        "time": ("step_s_median",),
        "quality": ("val_loss",),
    }
    for r in results:
        ref = next(
            x
            for x in results
            if x["part"] == r["part"] and x.get("case") == r.get("case") and x["dtype"] == base
        )
        for k in keys[r["part"]]:
            mib = k.endswith("bytes")
            value = f"{r[k] / 2**20:,.1f} MiB" if mib else f"{r[k]:.4f}"
            t.add_row(
                r["part"],
                f"{r.get('case', 'tiny 300 steps')} {k}",
                r["dtype"],
                value,
                f"{r[k] / ref[k]:.3f}",
            )
    Console().print(t)


if __name__ == "__main__":
    main()
