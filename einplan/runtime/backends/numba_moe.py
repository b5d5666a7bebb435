"""The numba backend's mixture-of-experts kernel: one routed SwiGLU expert's forward step,
compiled and parallel over the cores (runtime/backends/numba_moe_kernels.py), for experts that
got between ``MIN_ROWS`` and ``MAX_ROWS`` tokens (short prompts); numpy's kernel runs the
others: below, its BLAS calls on a few rows win (decode); above, BLAS on two threads wins, and
numba's and BLAS's threads contend for the cores (benchmarks/moe_kernels.py, 2 cores, tiny-moe
shapes: 64 rows 0.69 ms numpy vs 0.90 (1 thread) / 0.52-16.6 (2) compiled; 256 rows 1.86 vs
1.92). The reverse steps are numpy's: compiled ones never beat them (64 to 256 rows: 1.0-1.2x
numpy's time on one thread, 1.6-5.3x on two), so they were removed.

The kernel computes what runtime/moe.py's numpy kernel computes, to rounding, and shares its
bookkeeping: per-expert token counts in ``LOAD``, and in a training graph the forward step's
activations in ``STASH`` in the same layout, for numpy's reverse steps. Factories decline a
dtype other than float32/float64.
"""

from __future__ import annotations

import numpy as np

from einplan.compiler.dtypes import to_numpy_dtype
from einplan.runtime import moe

# routed rows below which an expert runs numpy's kernel (BLAS GEMV-like calls): about where
# the compiled forward step starts to win on one thread (benchmarks/moe_kernels.py --rows)
MIN_ROWS = 8
# and above which: 16 rows 0.23 ms compiled vs 0.34 numpy, 32 rows 0.56 vs 0.71 (one thread)
MAX_ROWS = 32
DTYPES = (np.float32, np.float64)
LOAD, STASH = moe.LOAD, moe.STASH


def compiled():
    """The compiled MoE kernels module (imports numba on first use)."""
    from einplan.runtime.backends import numba_moe_kernels

    return numba_moe_kernels


def find_routed(nk, gates2: np.ndarray, col: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows routed to expert ``col`` and their gate values (as moe._routed finds them)."""
    rows = np.empty(len(gates2), np.int64)
    g = np.empty(len(gates2), gates2.dtype)
    n = nk.collect_routed_rows(gates2, col, rows, g)
    return rows[:n], g[:n]


def make_moe_expert(node, shapes, out_shape, scratch, inputs):
    """One expert's weighted SwiGLU output on the tokens routed to it (moe.make_moe_expert);
    None for a dtype other than float32/float64."""
    dtype = to_numpy_dtype(node.dtype)
    if dtype not in DTYPES:
        return None
    col, d, e = node.attrs["expert"], out_shape[-1], shapes[1][-1]
    name, keep = node.name, bool(node.attrs.get("keep"))
    fallback = moe.make_moe_expert(node, shapes, out_shape, scratch)
    nk = compiled()

    def moe_expert(ins, out):
        x, gates, wg, wu, wd = ins
        x2, gates2 = x.reshape(-1, d), gates.reshape(-1, e)
        rows, g = find_routed(nk, gates2, col)
        n = len(rows)
        if not MIN_ROWS <= n <= MAX_ROWS:
            return fallback(ins, out)
        LOAD[name] = n
        f = wg.shape[0]
        a, u, s, h = (np.empty((n, f), dtype) for _ in range(4))
        own, ones = np.arange(n), np.ones(n, dtype)
        # (n routed of x) x (f, d) -> (n, f), twice: the gate and up products
        nk.gemm_nt(x2, rows, wg, a, own, ones)
        nk.gemm_nt(x2, rows, wu, u, own, ones)
        nk.swiglu(a, u, s, h)
        o2 = out.reshape(-1, d)
        o2.fill(0)
        # g * ((n, f) x (d, f) -> (n, d)), scattered to the routed rows of out
        nk.gemm_nt(h, own, wd, o2, rows, g)
        if keep:
            key = moe.buffer_key(x, gates, wg, wu, wd)
            STASH[name] = {"rows": rows, "g": g, "xs": x2[rows], "a": a, "u": u, "s": s}
            STASH[name].update(h=h, key=key)
        return out

    return moe_expert
