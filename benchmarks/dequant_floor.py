"""What a decode token's weight products cost per weight, fp32 against int8 and int4 in NumPy.

    python benchmarks/dequant_floor.py

Times, on SmolLM2-135M's projection shapes (random values, 134 M weights, far beyond the
caches), the float32 product streamed from memory and the quantised products of
runtime/qmatmul.py, and takes the quantised ones apart: the integer-to-float unpacking into a
cache-sized block, and the product from that block. It also times what a second thread costs:
a hand-off to the helper thread and back, and the unpacking throughput of a background thread
while this thread runs small numpy operations (the GIL). These are the numbers behind the
quantised decode speeds in the README. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, timed, write_results  # noqa: E402

from einplan.runtime import qmatmul  # noqa: E402
from einplan.runtime.quantize import quantize_weight  # noqa: E402

# (out, in) of one layer's packed q/k/v, o, gate/up and down, 30 layers, and the tied head
LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def shapes() -> list[tuple[int, int]]:
    """The weight shapes one SmolLM2-135M decode token reads, in order."""
    return LAYER * 30 + [(49152, 576)]


def median_time(fn, reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` runs after one warm-up."""
    return statistics.median(timed(fn, 1, reps, 0.0))


def quantised(bits: int, group: int) -> list[tuple[qmatmul.QuantizedMatrix, list[dict]]]:
    """Every weight quantised as ``einplan quantize`` would, with its scratch sets."""
    rng = np.random.default_rng(0)
    # one scratch set per thread shared by every product, as the executor's sequential runs
    base = [np.empty(2 * qmatmul.BLOCK_ELEMENTS + 65536, np.float32) for _ in range(2)]
    out = []
    for rows, cols in shapes():
        w = rng.standard_normal((rows, cols), np.float32)
        p = quantize_weight(w, bits, cols if bits == 8 else group, True)
        m = qmatmul.QuantizedMatrix(p["q"], p["scale"], None, bits, cols if bits == 8 else group)
        bufs = []
        for b in base:
            views, at = {}, 0
            for k, size in qmatmul.scratch_shapes(rows, cols, m.group, 1).items():
                views[k] = b[at : at + size[0]]
                at += size[0]
            bufs.append(views)
        out.append((m, bufs))
    return out


def per_weight_ns(seconds: float, weights: int) -> float:
    return seconds / weights * 1e9


def measure_fp32(reps: int) -> dict:
    """The float32 products as decode runs them: (1, in) x (in, out) from memory."""
    rng = np.random.default_rng(0)
    mats = [rng.standard_normal((c, r), np.float32) for r, c in shapes()]  # (in, out): packed
    xs = {c: rng.standard_normal((1, c), np.float32) for _, c in shapes()}
    outs = [np.empty((1, m.shape[1]), np.float32) for m in mats]
    n = sum(m.size for m in mats)

    def run():
        for m, o in zip(mats, outs, strict=True):
            np.matmul(xs[m.shape[0]], m, out=o)

    res = {}
    for threads in (1, 2):
        with threadpool_limits(threads, user_api="blas"):
            res[f"fp32 product, {threads} BLAS thread(s)"] = per_weight_ns(
                median_time(run, reps), n
            )
    return res


def measure_quantised(bits: int, group: int, reps: int) -> dict:
    """The quantised products, whole and in parts (unpack, product from the block)."""
    mats = quantised(bits, group)
    n = sum(m.rows * m.cols for m, _ in mats)
    xs = {m.cols: np.ones((1, m.cols), np.float32) for m, _ in mats}
    outs = [np.empty((1, m.rows), np.float32) for m, _ in mats]
    name = "int8 per channel" if bits == 8 else f"int4 g{group}"

    def whole(threads):
        def run():
            for (m, bufs), o in zip(mats, outs, strict=True):
                m.matmul(xs[m.cols], o, bufs[:threads])

        return run

    def unpack_only():
        for m, bufs in mats:
            for r in range(0, m.rows, m.block_rows):
                stop = min(m.rows, r + m.block_rows)
                f = bufs[0]["dq"][: (stop - r) * m.cols].reshape(-1, m.cols)
                m.unpack(r, stop, f, bufs[0]["dq_n"])

    res = {}
    with threadpool_limits(1, user_api="blas"):
        res[f"{name} product, 1 thread"] = per_weight_ns(median_time(whole(1), reps), n)
        res[f"{name} product, 2 threads (row halves)"] = per_weight_ns(
            median_time(whole(2), reps), n
        )
        unpack = per_weight_ns(median_time(unpack_only, reps), n)
        res[f"{name}: unpack to float32 (part of the product)"] = unpack
        res[f"{name}: the rest (product from the block, scales)"] = (
            res[f"{name} product, 1 thread"] - unpack
        )
    return res


def measure_threads(reps: int) -> dict:
    """A hand-off to the helper thread and back; unpacking on a background thread alone and
    while this thread runs small numpy operations that hold the GIL."""
    helper = qmatmul.HELPER
    handoff = median_time(lambda: (helper.start(lambda: None), helper.wait()), reps * 50)
    block = 1 << 20
    src = np.random.default_rng(0).integers(-127, 127, (16, block)).astype(np.int8)
    dst = np.empty(block, np.float32)
    done = [0]
    stop = threading.Event()

    def unpack_loop():
        while not stop.is_set():
            for row in src:
                np.copyto(dst, row, casting="unsafe")
                done[0] += 1

    alone = median_time(lambda: [np.copyto(dst, r, casting="unsafe") for r in src], reps)
    small = np.ones(64, np.float32)  # below numpy's size for releasing the GIL
    worker = threading.Thread(target=unpack_loop, daemon=True)
    worker.start()
    time.sleep(0.05)
    before, t0 = done[0], time.perf_counter()
    while time.perf_counter() - t0 < 0.5:
        np.multiply(small, small, out=small)
    busy = (time.perf_counter() - t0) / max(1, done[0] - before) / block * 1e9
    stop.set()
    worker.join()
    return {
        "hand-off to the helper thread and back (us)": handoff * 1e6,
        "int8 unpack on a background thread, main thread idle": per_weight_ns(alone, 16 * block),
        "the same while the main thread runs small numpy ops": busy,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "dequant_floor.json"))
    args = ap.parse_args()
    rows = measure_fp32(args.reps)
    rows |= measure_quantised(8, 0, args.reps)
    rows |= measure_quantised(4, 64, args.reps)
    rows |= measure_threads(args.reps)

    from rich.console import Console
    from rich.table import Table

    t = Table(title="Decode weight products, SmolLM2-135M shapes (ns per weight)")
    t.add_column("what")
    t.add_column("ns / weight", justify="right")
    for k, v in rows.items():
        t.add_row(k, f"{v:.3f}" if "(us)" not in k else f"{v:.1f} us")
    Console().print(t)
    n = sum(r * c for r, c in shapes())
    print(f"{n / 1e6:.0f} M weights per token: 0.1 ns per weight is {n * 0.1e-6:.1f} ms")
    write_results(args.json, [{"what": k, "value": v} for k, v in rows.items()])


if __name__ == "__main__":
    main()
