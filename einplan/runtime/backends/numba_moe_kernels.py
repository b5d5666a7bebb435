"""Compiled (numba) kernels of one routed SwiGLU expert's forward step, parallel over tiles
of the output on numba's passive OpenMP threads: they use every core without BLAS's
spin-waiting threads (which a plan of small products keeps at one) and release the GIL.

The products are one kernel, :func:`gemm_nt`, ``out[o_i, j] = scale_i sum_p a[a_i, p] b[j, p]``:
both operands are read along their contiguous last axis, the rows of ``a`` through an index
(the tokens routed to the expert) and the rows of the result scattered through another, so
the forward step neither gathers its tokens nor scatters its result in a separate pass. Each
tile of 4 x 4 results keeps its 16 sums in registers; ``fastmath`` reassociation lets LLVM
vectorise the sums along p (AVX-512: about BLAS's single-thread speed per core when p runs
over a hidden or expert width). The SiLU gate is one fused pass over the routed rows.

Importing this module imports numba (see numba_kernels for the cache and thread settings).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from einplan.runtime.backends.numba_kernels import OPTIONS

TILE_COLS = 64  # result columns per parallel tile: b's rows of a tile stay in L2


@njit(inline="always", **OPTIONS)
def dot4x4(a, r0, r1, r2, r3, b, j, k, zero):  # pragma: no cover - compiled
    """The 16 sums ``a[r, :] . b[j + c, :]`` of rows r0..r3 and c < 4, row by row."""
    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = zero
    s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = zero
    for p in range(k):
        a0, a1, a2, a3 = a[r0, p], a[r1, p], a[r2, p], a[r3, p]
        b0, b1, b2, b3 = b[j, p], b[j + 1, p], b[j + 2, p], b[j + 3, p]
        s00 += a0 * b0
        s01 += a0 * b1
        s02 += a0 * b2
        s03 += a0 * b3
        s10 += a1 * b0
        s11 += a1 * b1
        s12 += a1 * b2
        s13 += a1 * b3
        s20 += a2 * b0
        s21 += a2 * b1
        s22 += a2 * b2
        s23 += a2 * b3
        s30 += a3 * b0
        s31 += a3 * b1
        s32 += a3 * b2
        s33 += a3 * b3
    return (s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)


@njit(inline="always", **OPTIONS)
def store_row4(out, o, j, c, x0, x1, x2, x3):  # pragma: no cover - compiled
    """``out[o, j:j + 4] = c * (x0, x1, x2, x3)``."""
    out[o, j], out[o, j + 1], out[o, j + 2], out[o, j + 3] = c * x0, c * x1, c * x2, c * x3


@njit(inline="always", **OPTIONS)
def dot1(a, r, b, j, k, zero):  # pragma: no cover - compiled
    """``a[r, :] . b[j, :]``."""
    s = zero
    for p in range(k):
        s += a[r, p] * b[j, p]
    return s


@njit(inline="always", **OPTIONS)
def locate_tile(t, m, n, col_tiles):  # pragma: no cover - compiled
    """Parallel task t's first row and its columns [lo, hi): 4 rows x TILE_COLS columns."""
    lo = (t % col_tiles) * TILE_COLS
    return (t // col_tiles) * 4, lo, min(lo + TILE_COLS, n)


@njit(parallel=True, **OPTIONS)
def gemm_nt(a, a_rows, b, out, out_rows, scale):  # pragma: no cover - compiled
    """``out[out_rows[i], j] = scale[i] * sum_p a[a_rows[i], p] * b[j, p]`` for i < len(a_rows)
    and every row j of b; a (*, k), b (n, k), out (*, n) C-contiguous, one dtype. Rows of out
    not in out_rows are left alone."""
    m = a_rows.shape[0]
    n, k = b.shape
    zero = out.dtype.type(0)  # the sums stay in out's dtype
    col_tiles = (n + TILE_COLS - 1) // TILE_COLS
    for t in prange(((m + 3) // 4) * col_tiles):
        i0, j_lo, j_hi = locate_tile(t, m, n, col_tiles)
        if i0 + 4 <= m:
            rows = (a_rows[i0], a_rows[i0 + 1], a_rows[i0 + 2], a_rows[i0 + 3])
            j = j_lo
            while j + 4 <= j_hi:
                v = dot4x4(a, rows[0], rows[1], rows[2], rows[3], b, j, k, zero)
                # static tuple indices: the sums stay in registers
                store_row4(out, out_rows[i0], j, scale[i0], v[0], v[1], v[2], v[3])
                store_row4(out, out_rows[i0 + 1], j, scale[i0 + 1], v[4], v[5], v[6], v[7])
                store_row4(out, out_rows[i0 + 2], j, scale[i0 + 2], v[8], v[9], v[10], v[11])
                store_row4(out, out_rows[i0 + 3], j, scale[i0 + 3], v[12], v[13], v[14], v[15])
                j += 4
            for jj in range(j, j_hi):  # the tile's last columns
                for i in range(i0, i0 + 4):
                    out[out_rows[i], jj] = scale[i] * dot1(a, a_rows[i], b, jj, k, zero)
        else:  # the last rows
            for i in range(i0, m):
                for jj in range(j_lo, j_hi):
                    out[out_rows[i], jj] = scale[i] * dot1(a, a_rows[i], b, jj, k, zero)


@njit(parallel=True, **OPTIONS)
def swiglu(a, u, s, h):  # pragma: no cover - compiled
    """``s = sigmoid(a)`` and ``h = a s u`` (a, u, s, h of one shape, 2-D)."""
    one = a.dtype.type(1)
    for i in prange(a.shape[0]):
        for j in range(a.shape[1]):
            sj = one / (one + np.exp(-a[i, j]))
            s[i, j] = sj
            h[i, j] = a[i, j] * sj * u[i, j]


@njit(**OPTIONS)
def collect_routed_rows(gates, col, rows, g):  # pragma: no cover - compiled
    """The rows of ``gates`` (tokens, E) whose column ``col`` is non-zero into ``rows``, their
    values into ``g``; returns how many."""
    n = 0
    for t in range(gates.shape[0]):
        v = gates[t, col]
        if v != 0:
            rows[n] = t
            g[n] = v
            n += 1
    return n
