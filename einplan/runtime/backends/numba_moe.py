"""The numba backend's mixture-of-experts kernels: one routed SwiGLU expert and the gradients
of its inputs, compiled and parallel over the cores (runtime/backends/numba_moe_kernels.py),
but for the weight gradients, whose sums over the routed rows BLAS does faster.

They compute what runtime/moe.py's numpy kernels compute, to rounding, and share their
bookkeeping: per-expert token counts in ``LOAD``, and in a training graph the forward step's
activations in ``STASH`` in the same layout, so either backend's reverse step can use either
backend's forward step. An expert that got fewer than ``MIN_ROWS`` tokens (decode) runs
numpy's kernel, whose BLAS calls win there, and so do the reverse steps of one with fewer than
``REVERSE_MIN_ROWS``; factories decline a dtype other than float32/float64.
"""

from __future__ import annotations

import numpy as np

from einplan.compiler.dtypes import to_numpy_dtype
from einplan.runtime import moe

# routed rows below which an expert runs numpy's kernel (BLAS GEMV-like calls): about where
# the compiled forward step starts to win on one thread (benchmarks/moe_kernels.py --rows)
MIN_ROWS = 8
# the same for the reverse steps, which first transpose the three weights (0.3 ms at 256 x 688):
# at 27 rows they cost 1.4x numpy's on one thread, at 242 rows 1.1x (benchmarks/moe_kernels.py)
REVERSE_MIN_ROWS = 64
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
        if n < MIN_ROWS:
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


def compute_reverse_parts(nk, act: dict, ct2: np.ndarray, wd: np.ndarray) -> dict:
    """What the reverse steps of one expert share: c = ct Wd on the routed rows, then
    [d a, d u] (n, 2f), dy = g ct (n, d) and d g (see numba_moe_kernels.compute_expert_reverse)."""
    a, rows = act["a"], act["rows"]
    n, f = a.shape
    d, dtype = ct2.shape[1], a.dtype
    wd_t = np.empty((f, d), dtype)
    nk.transpose_into(wd, wd_t, 0)
    c = np.empty((n, f), dtype)
    # (n routed of ct) x (f, d) -> (n, f)
    nk.gemm_nt(ct2, rows, wd_t, c, np.arange(n), np.ones(n, dtype))
    parts = {"duda": np.empty((n, 2 * f), dtype), "dy": np.empty((n, d), dtype)}
    parts["dgates"] = np.empty(n, dtype)
    nk.compute_expert_reverse(
        a, act["u"], act["s"], act["h"], c, act["g"], ct2, rows, *parts.values()
    )
    return parts


def make_moe_expert_grad(node, shapes, out_shape, scratch, inputs):
    """The gradient of one input of one expert (moe.make_moe_expert_grad), from the
    activations its forward step kept; numpy's kernel when none were kept for these buffers
    or the expert got fewer than REVERSE_MIN_ROWS tokens. None for a dtype other than f32/f64."""
    dtype = to_numpy_dtype(node.dtype)
    if dtype not in DTYPES:
        return None
    col, wrt = node.attrs["expert"], node.attrs["wrt"]
    d, e = shapes[0][-1], shapes[1][-1]
    forward = node.name.rsplit(".grad", 1)[0]
    fallback = moe.make_moe_expert_grad(node, shapes, out_shape, scratch)
    nk = compiled()

    def moe_expert_grad(ins, out):
        x, gates, wg, wu, wd, ct = ins
        act = STASH.get(forward)
        fresh = act is not None and act["key"] == moe.buffer_key(x, gates, wg, wu, wd)
        if not fresh or len(act["rows"]) < REVERSE_MIN_ROWS or "h" not in act:
            return fallback(ins, out)
        rows = act["rows"]
        n, f = act["a"].shape
        ct2 = ct.reshape(-1, d)
        ct_key = moe.buffer_key(ct)
        if act.get("compiled_ct_key") != ct_key:  # the first sibling of this run
            act["compiled"] = compute_reverse_parts(nk, act, ct2, wd)
            act["compiled_ct_key"] = ct_key
        p = act["compiled"]
        # the weight gradients sum over the routed rows, as few as 60: BLAS wins those
        if wrt == "gates":
            out.fill(0)
            out.reshape(-1, e)[rows, col] = p["dgates"]
        elif wrt == "down":  # (n, d)^T x (n, f) -> (d, f)
            np.matmul(p["dy"].T, act["h"], out=out)
        elif wrt == "gate":  # (n, f)^T x (n, d) -> (f, d)
            np.matmul(p["duda"][:, :f].T, act["xs"], out=out)
        elif wrt == "up":
            np.matmul(p["duda"][:, f:].T, act["xs"], out=out)
        else:  # d x = d a Wg + d u Wu: (n, 2f) x (d, 2f) -> (n, d), scattered to the rows
            w_t = np.empty((d, 2 * f), dtype)
            nk.transpose_into(wg, w_t, 0)
            nk.transpose_into(wu, w_t, f)
            o2 = out.reshape(-1, d)
            o2.fill(0)
            nk.gemm_nt(p["duda"], np.arange(n), w_t, o2, rows, np.ones(n, dtype))
        return out

    return moe_expert_grad
