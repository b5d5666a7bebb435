"""Causal flash attention as one compiled kernel: the forward of a plan's ``forward`` entry
(no mask, no saved statistics), where runtime/flash.py's tile loop runs in Python around
BLAS products.

Per job (batch row, KV head, block of queries) and per key tile, three passes over a score
tile that stays in L2: the scores by the panel tiles of numba_panels.py (K^T held as 32-key
panels), the online softmax with numba_exp's vectorised exp (running row maximum and sum, the
earlier context rescaled), and the context by the panel tiles again (V held as panels of 32
head dims, the tile's keys a run of its rows). The g query heads of a KV head are rows of one
job, as in runtime/flash.py. Jobs alternate between the threads in order, so both get early
(short) and late (long) causal blocks. No Python runs per tile, and neither product re-packs
its operands per call as BLAS does (OpenBLAS packs the freshly computed score tile for every
context product).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from einplan.runtime.backends.numba_exp import OPTIONS, exp32
from einplan.runtime.backends.numba_panels import make_tile, panel_rows
from einplan.runtime.panels import PANEL

tile_4x2 = make_tile(4, 2)
tile_2x2 = make_tile(2, 2)
tile_1x2 = make_tile(1, 2)


@njit(**OPTIONS)
def context_rows(sb, vp, tb, rows, p, k0, width):  # pragma: no cover - compiled
    """tb[:rows, 32p : 32p+64] = sb[:rows, :width] . V[k0:k0+width, 32p : 32p+64]."""
    i = 0
    while rows - i >= 4:
        tile_4x2(sb, vp, tb, i, p, p, k0, width)
        i += 4
    if rows - i >= 2:
        tile_2x2(sb, vp, tb, i, p, p, k0, width)
        i += 2
    if rows - i == 1:
        tile_1x2(sb, vp, tb, i, p, p, k0, width)


@njit(parallel=True, **OPTIONS)
def causal_flash(q, kp, vp, scale, off, bq, bk, out, xb, sb, tb, acc, stats):  # pragma: no cover
    """out = softmax(scale q k^T, causal) v. q and out (b, s, n, g, h): g query heads per KV
    head; kp (b, n, ceil(t/32), h, 32): K^T as panels (keys past t zero); vp (b, n, h/32, t,
    32): V as panels of head dims (as_panels); query i sees keys 0..i+off. Per thread (first
    axis): xb (bq*g, h) the job's queries (row (i - i0) g + r for query i, head r), sb (bq*g,
    >= bk) the score tile, tb (bq*g, h) a tile's context, acc (bq*g, h) the running context,
    stats (2, bq*g) the running maximum and sum. h must be a multiple of 64, bk of 32."""
    nb, s, nh, g, h = q.shape
    blocks = (s + bq - 1) // bq
    jobs = nb * nh * blocks
    threads = xb.shape[0]
    for th in prange(threads):
        x, sc, tc, ac = xb[th], sb[th], tb[th], acc[th]
        top, total = stats[th, 0], stats[th, 1]
        lanes = np.empty(16, np.float32)
        for job in range(th, jobs, threads):
            blk = job % blocks
            n = (job // blocks) % nh
            b = job // (blocks * nh)
            i0, i1 = blk * bq, min(s, blk * bq + bq)
            rows = (i1 - i0) * g
            for r in range(rows):
                qr = q[b, i0 + r // g, n, r % g]
                for d in range(h):
                    x[r, d] = qr[d] * scale
                    ac[r, d] = 0
                top[r] = -np.inf
                total[r] = 0
            kb, vb = kp[b, n], vp[b, n]
            limit = min(vb.shape[1], i1 + off)  # keys some row of the block sees
            for j0 in range(0, limit, bk):
                width = min(limit, j0 + bk) - j0
                for c in range((width + PANEL - 1) // PANEL):
                    panel_rows(x, kb, sc, 0, rows, j0 // PANEL + c, c)  # the scores
                for r in range(rows):
                    seen = min(width, i0 + r // g + off - j0 + 1)  # keys of the tile it sees
                    for j in range(max(seen, 0), width):
                        sc[r, j] = -np.inf
                    # the row maximum in 16 lanes: a select per lane vectorises, a max
                    # reduction does not (no fastmath nnan: NaN must stay NaN)
                    for lane in range(16):
                        lanes[lane] = -np.inf
                    full = width // 16 * 16
                    row = sc[r]
                    for j in range(0, full, 16):
                        for lane in range(16):
                            v = row[j + lane]
                            lanes[lane] = v if v > lanes[lane] else lanes[lane]
                    mx = top[r]
                    for lane in range(16):
                        mx = max(mx, lanes[lane])
                    for j in range(full, width):
                        mx = max(mx, row[j])
                    rescale = exp32(top[r] - mx) if top[r] > -np.inf else np.float32(0)
                    row_sum = np.float32(0)
                    for j in range(width):
                        e = exp32(sc[r, j] - mx)
                        sc[r, j] = e
                        row_sum += e
                    total[r] = total[r] * rescale + row_sum
                    top[r] = mx
                    for d in range(h):
                        ac[r, d] *= rescale
                for p in range(0, h // PANEL, 2):
                    context_rows(sc, vb, tc, rows, p, j0, width)
                for r in range(rows):
                    for d in range(h):
                        ac[r, d] += tc[r, d]
            for r in range(rows):
                inv = np.float32(1) / total[r]
                o = out[b, i0 + r // g, n, r % g]
                for d in range(h):
                    o[d] = ac[r, d] * inv


@njit(parallel=True, **OPTIONS)
def as_panels(k, v, kp, vp):  # pragma: no cover - compiled
    """K^T and V of heads-first (b, n, t, h) keys and values (any strides) into the panels
    causal_flash reads: per (b, n), kp is runtime/panels.pack_panels of K^T and vp of V,
    written here into the binding's scratch (no allocation per call), kp zero-padded past t
    to whole panels."""
    nb, nh, t, h = k.shape
    for bn in prange(nb * nh):
        b, n = bn // nh, bn % nh
        kb, vb = kp[b, n], vp[b, n]
        for j in range(kb.shape[0] * PANEL):
            for d in range(h):
                kb[j // PANEL, d, j % PANEL] = k[b, n, j, d] if j < t else np.float32(0)
        for j in range(t):
            for d in range(h):
                vb[d // PANEL, j, d % PANEL] = v[b, n, j, d]


def warm_up() -> None:
    """Call the kernels once on tiny arrays (compile, or load from the on-disk cache)."""
    f = np.float32
    q = np.ones((1, 2, 1, 1, 2 * PANEL), f)
    k = np.ones((1, 1, 2, 2 * PANEL), f)
    kp, vp = np.empty((1, 1, 1, 2 * PANEL, PANEL), f), np.empty((1, 1, 2, 2, PANEL), f)
    as_panels(k, k, kp, vp)
    xb, tb, acc = (np.empty((2, 2, 2 * PANEL), f) for _ in range(3))
    sb, stats = np.empty((2, 2, PANEL), f), np.empty((2, 2, 2), f)
    causal_flash(q, kp, vp, f(1), 0, 2, PANEL, np.empty_like(q), xb, sb, tb, acc, stats)
