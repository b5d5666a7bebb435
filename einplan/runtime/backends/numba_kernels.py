"""Compiled (numba) kernels for quantised weights: products that read the packed integers
and never write a float weight, and the embedding gather that dequantises only its rows.

Importing this module imports numba (about half a second) and points numba's on-disk cache
at ``$EINPLAN_CACHE_DIR/numba`` unless ``NUMBA_CACHE_DIR`` says otherwise, so only the first
run on a machine compiles (``cache=True``). Products are parallel over output rows
(``prange``, numba's OpenMP layer; how its threads wait depends on the machine's load).

Layouts are runtime/quantize.py's: int8 (out, in) one group per row; int4 (out, in/2)
bytes, byte k holding element k (low nibble) and element k + in/2 (high nibble); scales and
zero points per (row, group) in element order.

Results match dequantise-then-matmul to float32 rounding: each group's sum is
``sum x * (u - z)`` (exact integers times x, no cancellation against a zero-point term),
scaled once. ``fastmath`` allows only reassociation and contraction (vectorised sums, FMA),
never assumptions about NaN or infinities.
"""

from __future__ import annotations

import os

from einplan.compiler.path_cache import cache_dir
from einplan.runtime.load import busy_machine

if "NUMBA_CACHE_DIR" not in os.environ:
    os.environ["NUMBA_CACHE_DIR"] = str(cache_dir() / "numba")
# How OpenMP threads wait between parallel calls (a decode step makes ~120 short ones), unless
# the environment says: on a busy (shared) machine they sleep at once, since spinning threads
# steal the cores the work needs (W8A16 decode measured 6.7 tok/s spinning, 40-55 passive, 2
# cores, 5 users); on a quiet one they spin 300,000 rounds (libgomp's default, well under a
# millisecond) before sleeping, so the next call finds them awake: fp32 decode measured 50.1
# and 50.5 tok/s against 37.4 and 29.0 sleeping at once (2 cores, load 2, interleaved).
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    if busy_machine():
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    else:
        os.environ["GOMP_SPINCOUNT"] = "300000"

import numba  # noqa: E402
import numpy as np  # noqa: E402
from numba import njit, prange, uint64  # noqa: E402

if numba.config.CACHE_DIR != os.environ["NUMBA_CACHE_DIR"]:  # numba imported before us
    numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]

FAST = {"reassoc", "contract"}  # sums may be vectorised and fused; no NaN/inf assumptions
OPTIONS = {"nogil": True, "cache": True, "fastmath": FAST}


@njit(parallel=True, **OPTIONS)
def q8_matmul(x, q, scale, zero, out):  # pragma: no cover - compiled
    """``out[i, o] = s[o] * sum_k x[i, k] (q[o, k] - z[o])``: x (m, in) f32, q (out, in)
    i8/u8, scale and zero (out, 1) f32, out (m, out) f32; parallel over output rows."""
    m, k_in = x.shape
    for o in prange(q.shape[0]):
        z = zero[o, 0]
        s = scale[o, 0]
        for i in range(m):
            acc = np.float32(0)
            for k in range(k_in):
                acc += x[i, k] * (np.float32(q[o, k]) - z)
            out[i, o] = acc * s


def make_q4_matmul(seg: int):
    """A compiled ``out[i, o] = sum_g s[o, g] sum_{k in g} x[i, k] (u[o, k] - z[o, g])``
    with u the nibbles of q (out, in/2) u8; scale and zero (out, in/group) f32; parallel
    over rows. Byte j holds elements j (low nibble) and j + in/2 (high), read in segments of
    ``seg`` bytes within which both lie in one group each (seg must divide the group and
    in/2). ``seg`` is a constant of the compiled code: the inner loop's fixed trip count over
    unsigned indices is what lets LLVM vectorise it."""

    @njit(parallel=True, **OPTIONS)
    def q4_matmul(x, q, scale, zero, group, out):  # pragma: no cover - compiled
        m = x.shape[0]
        half = q.shape[1]
        h = uint64(half)
        for o in prange(q.shape[0]):
            for i in range(m):
                total = np.float32(0)
                for c in range(half // seg):
                    j0 = c * seg
                    g_lo = j0 // group
                    g_hi = (j0 + half) // group
                    z_lo = zero[o, g_lo]
                    z_hi = zero[o, g_hi]
                    lo = np.float32(0)
                    hi = np.float32(0)
                    b = uint64(j0)
                    for t in range(seg):
                        j = b + uint64(t)
                        f = np.float32(q[o, j])  # the byte as a float: nibbles exactly by floor
                        f_hi = np.floor(f * np.float32(0.0625))
                        f_lo = f - f_hi * np.float32(16)
                        lo += x[i, j] * (f_lo - z_lo)
                        hi += x[i, j + h] * (f_hi - z_hi)
                    total += lo * scale[o, g_lo] + hi * scale[o, g_hi]
                out[i, o] = total

    return q4_matmul


q4_matmul_32 = make_q4_matmul(32)
q4_matmul_64 = make_q4_matmul(64)


@njit(parallel=True, **OPTIONS)
def q4_matmul_any(x, q, scale, zero, group, out):  # pragma: no cover - compiled
    """q4_matmul for any width and group (segments of half a group, or a group): slower,
    short loops of variable length are not vectorised."""
    m = x.shape[0]
    half = q.shape[1]
    step = group if half % group == 0 else group // 2
    h = uint64(half)
    for o in prange(q.shape[0]):
        for i in range(m):
            total = np.float32(0)
            for j0 in range(0, half, step):
                g_lo = j0 // group
                g_hi = (j0 + half) // group
                z_lo = zero[o, g_lo]
                z_hi = zero[o, g_hi]
                lo = np.float32(0)
                hi = np.float32(0)
                for j in range(uint64(j0), uint64(j0 + step)):
                    f = np.float32(q[o, j])
                    f_hi = np.floor(f * np.float32(0.0625))
                    lo += x[i, j] * (f - f_hi * np.float32(16) - z_lo)
                    hi += x[i, j + h] * (f_hi - z_hi)
                total += lo * scale[o, g_lo] + hi * scale[o, g_hi]
            out[i, o] = total


@njit(parallel=True, nogil=True, cache=True)
def q_take_rows(ids, q, scale, zero, bits, group, out):  # pragma: no cover - compiled
    """Rows ``ids`` (1-D) of the float weight into out (len(ids), in): ``(u - z) * s`` per
    element, as QuantizedMatrix.dequantize_rows computes it (bit-identical)."""
    k_in = out.shape[1]
    half = k_in // 2
    for r in prange(ids.shape[0]):
        row = ids[r]
        for e in range(k_in):
            g = e // group
            if bits == 8:
                u = np.float32(q[row, e])
            elif e < half:
                u = np.float32(q[row, e] & 15)
            else:
                u = np.float32(q[row, e - half] >> 4)
            out[r, e] = (u - zero[row, g]) * scale[row, g]
