"""Profiling overhead: SmolLM2-135M forward (random weights) at 1x256 with per-step timing off
(no recorder) and on (a Recorder), interleaved so that both see the same machine load.

    python benchmarks/profile_overhead.py [--reps 20]

Prints both medians and the overhead in % of wall time; writes JSON. On a busy host the A/B
difference is mostly noise, so it also times what recording adds to one step (two clock reads
and ``Recorder.add``) in a tight loop: that cost times the steps per pass, over the pass's wall
time, is the overhead without the noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

import einplan
from einplan.runtime.recorder import Recorder

ROOT = Path(__file__).resolve().parent.parent


def time_forward(session: einplan.Session, ids: np.ndarray, recorder: Recorder | None) -> float:
    """Seconds of one forward pass."""
    t0 = time.perf_counter()
    session.forward(ids, recorder=recorder)
    return time.perf_counter() - t0


def recording_cost_ns(table_len: int, calls: int = 200_000) -> float:
    """Nanoseconds that timing one step adds: the executor's two clock reads plus one
    ``Recorder.add``, averaged over ``calls``."""
    rec = Recorder(debug=0)
    run = rec.begin_run("forward", {}, [None] * table_len)
    clock = time.perf_counter_ns
    t0 = time.perf_counter()
    for k in range(calls):
        start = clock()
        rec.add(run, k % table_len, 0, start, clock() - start)
    return (time.perf_counter() - t0) / calls * 1e9


def main() -> None:
    """Run the interleaved cases and report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20, help="timed passes per case")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument(
        "--json", default=str(ROOT / "benchmarks" / "results" / "profile_overhead.json")
    )
    args = ap.parse_args()
    os.environ.pop("EINPLAN_DEBUG", None)
    session = einplan.Session(
        einplan.compile_model(ROOT / "configs" / "smollm2-135m.json"), random_seed=0
    )
    ids = np.random.default_rng(1).integers(1, 49152, (1, args.seq))
    for _ in range(2):  # warm-up: arena, BLAS threads, page faults
        time_forward(session, ids, None)
        time_forward(session, ids, Recorder())
    off, on = [], []
    for k in range(args.reps):  # alternate which case goes first
        pair = [(off, None), (on, Recorder())]
        for samples, rec in pair if k % 2 == 0 else pair[::-1]:
            samples.append(time_forward(session, ids, rec))
    med_off, med_on = statistics.median(off), statistics.median(on)
    steps = len(session.executor.prepare({"batch": 1, "seq": args.seq}).steps)
    per_step_ns = recording_cost_ns(steps)
    result = {
        "case": f"smollm2-135m forward 1x{args.seq}, fp32, random weights",
        "reps": args.reps,
        "timing_off_s_median": med_off,
        "timing_on_s_median": med_on,
        "timing_off_s_min": min(off),
        "timing_on_s_min": min(on),
        "overhead_pct_median": 100 * (med_on - med_off) / med_off,
        "overhead_pct_min": 100 * (min(on) - min(off)) / min(off),
        "steps": steps,
        "recording_ns_per_step": per_step_ns,
        "recording_pct_of_best_wall": 100 * per_step_ns * steps / 1e9 / min(off),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "samples_off_s": off,
        "samples_on_s": on,
    }
    print(f"{'case':<34}{'median ms':>12}{'best ms':>12}")
    print(f"{'per-step timing off':<34}{med_off * 1e3:12.1f}{min(off) * 1e3:12.1f}")
    print(f"{'per-step timing on (Recorder)':<34}{med_on * 1e3:12.1f}{min(on) * 1e3:12.1f}")
    print(
        f"overhead: {result['overhead_pct_median']:+.2f} % of wall (median), "
        f"{result['overhead_pct_min']:+.2f} % (best); {steps} steps per pass"
    )
    print(
        f"recording one step costs {per_step_ns:.0f} ns: {steps} steps = "
        f"{per_step_ns * steps / 1e6:.2f} ms per pass = "
        f"{result['recording_pct_of_best_wall']:.3f} % of the best pass"
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
