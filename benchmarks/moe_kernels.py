"""Per-kernel times of one routed expert: numpy's kernels (runtime/moe.py, BLAS on one thread
as a plan of small products runs them, and on two) against the numba backend's compiled ones
(runtime/backends/numba_moe.py), forward step and its five reverse steps (numpy's on both:
the compiled reverse steps lost and were removed), interleaved per repeat. Less sensitive to a
shared host's load than whole-model runs.

    python benchmarks/moe_kernels.py
    python benchmarks/moe_kernels.py --reps 50 --rows 1 2 4 8 16 32

Prints wall-clock microseconds (median and min) and the process's CPU microseconds (median;
all threads, so about twice the wall time of a kernel that keeps two cores busy) per step;
writes JSON (--out).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from common import write_results
from threadpoolctl import threadpool_limits

from einplan.compiler.ir import Node
from einplan.compiler.ops import Op
from einplan.runtime import moe
from einplan.runtime.backends import get_backend

WRT = ("x", "gates", "gate", "up", "down")
# (label, hidden d, expert width f, experts, top-k, tokens): benchmarks/moe.py's train steps
SHAPES = [
    ("tiny-moe train 4x128", 256, 688, 4, 2, 512),
    ("smollm2-moe train 1x256", 576, 1536, 8, 2, 256),
]


def make_case(d: int, f: int, experts: int, k: int, tokens: int, seed: int = 0):
    """Inputs of expert 0 with ~tokens*k/experts routed rows, and a cotangent."""
    rng = np.random.default_rng(seed)
    gates = np.zeros((tokens, experts), np.float32)
    for t in range(tokens):
        gates[t, rng.choice(experts, k, replace=False)] = 1.0 / k
    x = rng.standard_normal((1, tokens, d), np.float32)
    wg, wu = (rng.standard_normal((f, d), np.float32) * 0.05 for _ in range(2))
    wd = rng.standard_normal((d, f), np.float32) * 0.05
    return [x, gates[None], wg, wu, wd], rng.standard_normal(x.shape, np.float32)


def make_kernels(backend: str, ins, ct):
    """The forward kernel (keeping its activations) and the five reverse kernels of expert 0."""
    be = get_backend(backend)
    shapes = [a.shape for a in ins]
    fwd = Node(0, Op.MOE_EXPERT, (), {"expert": 0, "k": 2, "keep": True}, ins[0].shape, "f32", "e")
    kf, _ = be.kernel_for(fwd, shapes, ins[0].shape, None)
    grads = []
    for i, (w, target) in enumerate(zip(WRT, ins, strict=True)):
        node = Node(1 + i, Op.MOE_EXPERT_GRAD, (), {"expert": 0, "k": 2, "wrt": w}, (), "f32")
        node = node.with_(shape=target.shape, name=f"e.grad{i}")
        kernel, _ = be.kernel_for(node, [*shapes, ct.shape], target.shape, None)
        grads.append((kernel, np.empty_like(target)))
    out = np.empty_like(ins[0])

    def forward():
        kf(ins, out)

    def reverse():
        for kernel, buf in grads:
            kernel([*ins, ct], buf)

    return forward, reverse


def time_us(fn, threads: int) -> tuple[float, float]:
    """One call's wall-clock and CPU (every thread of the process) microseconds, on
    ``threads`` BLAS and numba threads. CPU time hardly depends on other processes' load."""
    import numba

    numba.set_num_threads(threads)
    with threadpool_limits(threads, user_api="blas"):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        return (time.perf_counter() - t0) * 1e6, (time.process_time() - c0) * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_kernels.json"))
    args = ap.parse_args(argv)
    cases = [(label, d, f, e, k, t) for label, d, f, e, k, t in SHAPES]
    # decode-like: a few rows of the tiny model's expert (tokens = rows * experts / k)
    cases += [(f"tiny-moe {r} rows", 256, 688, 4, 2, 2 * r) for r in args.rows]
    two = min(2, os.cpu_count() or 1)
    engines = (
        ("numpy 1 thread", "numpy", 1),
        (f"numpy {two} threads", "numpy", two),
        ("numba 1 thread", "numba", 1),
        (f"numba {two} threads", "numba", two),
    )
    results = []
    print(f"{'case':26s} {'rows':>5s} {'step':8s} {'engine':16s} wall us: median      min   CPU us")
    for label, d, f, experts, k, tokens in cases:
        ins, ct = make_case(d, f, experts, k, tokens)
        rows = int(np.count_nonzero(ins[1][0, :, 0]))
        fns = {name: make_kernels(backend, ins, ct) for name, backend, _ in engines}
        samples = {(name, part): [] for name, _, _ in engines for part in ("forward", "reverse")}
        for _ in range(args.reps + 2):
            for name, _, threads in engines:
                moe.STASH.clear()
                fwd, rev = fns[name]
                samples[(name, "forward")].append(time_us(fwd, threads))
                samples[(name, "reverse")].append(time_us(rev, threads))
        for part in ("forward", "reverse"):
            for name, _, _ in engines:
                wall, cpu = zip(*samples[(name, part)][2:], strict=True)
                row = {"case": label, "rows": rows, "d": d, "f": f, "step": part, "engine": name}
                row |= {"wall_us_median": statistics.median(wall), "wall_us_min": min(wall)}
                row["cpu_us_median"] = statistics.median(cpu)
                results.append(row)
                print(
                    f"{label:26s} {rows:5d} {part:8s} {name:16s} {row['wall_us_median']:15,.0f} "
                    f"{row['wall_us_min']:8,.0f} {row['cpu_us_median']:8,.0f}",
                    flush=True,
                )
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
