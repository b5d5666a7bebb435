"""Compiled (numba) kernels for float32 decode: the GEMV that streams a packed (in, out)
weight, and the ops between the products where one compiled pass beats numpy's chain of ufunc
calls (RMSNorm, RoPE, the masked softmax over few keys, the KV-cache write). SwiGLU, the
residual add and the attention products stay numpy's: its SIMD exp, single add and batched
BLAS products were faster at decode sizes (measured: see numba_decode_factories.py).

They are meant for decode-sized inputs (runtime/backends/numba_decode_factories.py declines
larger ones, which numpy's vectorised kernels serve well). Every kernel computes what numpy's
kernel in runtime/kernels.py computes, in the same order per element; only sums may be
reassociated (``fastmath`` reassoc/contract, as numba_kernels.py), so results match numpy's
to float32 rounding.

Importing this module imports numba through numba_kernels (its cache directory and OpenMP
wait policy are set there).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from einplan.runtime.backends.numba_exp import exp32
from einplan.runtime.backends.numba_kernels import OPTIONS

# output columns a thread sweeps before its next four weight rows: four rows of that width
# (8 KiB) and the partial sums of up to 8 input rows (16 KiB) stay in L1 while every input row
# passes over them
GEMV_COLUMNS = 512


@njit(parallel=True, **OPTIONS)
def f32_gemv(x, w, part, out):  # pragma: no cover - compiled
    """``out = x . w``: x (m, in), w (in, out) row-major, out (m, out); part (T, m, out) is
    scratch. Each of T threads owns a contiguous block of w's rows and reads it as four
    streams at once, from the starts of its four quarters: four far-apart runs keep more
    reads in flight than one (measured on SmolLM2's shapes, 2 cores: 28-33 GB/s against 17-30
    for four adjacent rows, which the prefetcher sees as one run). One row of x sweeps whole
    weight rows; several rows sweep them column chunk by column chunk, so the chunk's weights
    and partial sums stay in L1 while every row of x passes. The partials are added at the
    end. The 1-D views of the rows let LLVM vectorise the sweep (2-D indexing did not)."""
    m, k_in = x.shape
    n = w.shape[1]
    threads = part.shape[0]
    chunk = (k_in + threads - 1) // threads
    width = n if m == 1 else GEMV_COLUMNS
    for t in prange(threads):
        k0 = min(k_in, t * chunk)
        k1 = min(k_in, k0 + chunk)
        q = (k1 - k0) // 4
        p = part[t]
        p[:, :] = 0
        for k in range(k0, k0 + q):
            for c0 in range(0, n, width):
                c1 = min(n, c0 + width)
                w0, w1 = w[k, c0:c1], w[k + q, c0:c1]
                w2, w3 = w[k + 2 * q, c0:c1], w[k + 3 * q, c0:c1]
                for i in range(m):
                    a0, a1, a2, a3 = x[i, k], x[i, k + q], x[i, k + 2 * q], x[i, k + 3 * q]
                    pi = p[i, c0:c1]
                    for o in range(pi.shape[0]):
                        pi[o] += a0 * w0[o] + a1 * w1[o] + a2 * w2[o] + a3 * w3[o]
        for k in range(k0 + 4 * q, k1):
            for i in range(m):
                a0 = x[i, k]
                for o in range(n):
                    p[i, o] += a0 * w[k, o]
    for i in range(m):
        for o in range(n):
            s = np.float32(0)
            for t in range(threads):
                s += part[t, i, o]
            out[i, o] = s


@njit(**OPTIONS)
def rms_norm_rows(x, w, eps, inv_d, out):  # pragma: no cover - compiled
    """Per row of x (r, d): ``x / sqrt(mean(x^2) + eps) * w``."""
    for i in range(x.shape[0]):
        s = np.float32(0)
        for j in range(x.shape[1]):
            s += x[i, j] * x[i, j]
        denom = np.sqrt(s * inv_d + eps)
        for j in range(x.shape[1]):
            out[i, j] = x[i, j] / denom * w[j]


@njit(**OPTIONS)
def rope_rows(x, x_stride, table, scale, sign, out):  # pragma: no cover - compiled
    """Rotate the halves of each head of x by the angles of table (2, r, hd/2) (cos, sin);
    ``sign`` -1 rotates back; then multiply by ``scale``. x is a 1-D buffer whose row i (heads
    x hd values) starts at ``i * x_stride`` (q and k are strided views of one product: a 3-D
    view of them would not vectorise); out (r, heads * hd) C-contiguous."""
    rows, width = out.shape
    half = table.shape[2]
    hd = 2 * half
    for i in range(rows):
        xr = x[i * x_stride : i * x_stride + width]
        cos, sin = table[0, i], table[1, i]
        o = out[i]
        for b in range(0, width, hd):
            x1, x2 = xr[b : b + half], xr[b + half : b + hd]
            o1, o2 = o[b : b + half], o[b + half : b + hd]
            if sign > 0:
                for j in range(half):
                    o1[j] = (x1[j] * cos[j] - x2[j] * sin[j]) * scale
                    o2[j] = (x2[j] * cos[j] + x1[j] * sin[j]) * scale
            else:
                for j in range(half):
                    o1[j] = (x1[j] * cos[j] + x2[j] * sin[j]) * scale
                    o2[j] = (x2[j] * cos[j] - x1[j] * sin[j]) * scale


@njit(**OPTIONS)
def softmax_rows(x, mask, scale, out):  # pragma: no cover - compiled
    """softmax(scale * x + mask) over the last axis of x (b, heads, q, k); mask (b, q, k),
    or (0, 0, 0) for none."""
    has_mask = mask.shape[0] > 0
    one = np.float32(1)
    for b in range(x.shape[0]):
        for h in range(x.shape[1]):
            for i in range(x.shape[2]):
                top = -np.inf
                for j in range(x.shape[3]):
                    v = x[b, h, i, j] * scale
                    if has_mask:
                        v += mask[b, i, j]
                    out[b, h, i, j] = v
                    top = max(top, v)
                total = np.float32(0)
                for j in range(x.shape[3]):
                    e = np.exp(out[b, h, i, j] - top)
                    out[b, h, i, j] = e
                    total += e
                inv = one / total
                for j in range(x.shape[3]):
                    out[b, h, i, j] *= inv


@njit(**OPTIONS)
def attend_one_query(q, k, v, t, mask, scale, out):  # pragma: no cover - compiled
    """softmax(scale * q k^T + mask) v for one query per head over the first ``t`` keys: q
    (b, 1, n, g, h), k and v (b, n, ctx, h) C-contiguous (the whole cache: a slice of it
    would compile to strided loops, 5x slower), mask (b, 1, t) or (0, 0, 0) for none, out
    like q. As runtime/kernels.py's direct step computes it, in one pass per KV head: each
    key row is read once for its g query heads, each value row once into their g context
    rows; the exp is numba_exp.py's."""
    nb, _, n_kv, g, h = q.shape
    has_mask = mask.shape[0] > 0
    one = np.float32(1)
    p = np.empty((g, t), np.float32)
    for b in range(nb):
        for n in range(n_kv):
            for j in range(t):
                kj = k[b, n, j]
                for r in range(g):
                    qr = q[b, 0, n, r]
                    acc = np.float32(0)
                    for d in range(h):
                        acc += qr[d] * kj[d]
                    acc *= scale
                    if has_mask:
                        acc += mask[b, 0, j]
                    p[r, j] = acc
            for r in range(g):
                pr = p[r]
                top = -np.inf
                for j in range(t):
                    top = max(top, pr[j])
                total = np.float32(0)
                for j in range(t):
                    e = exp32(pr[j] - top)
                    pr[j] = e
                    total += e
                inv = one / total
                for j in range(t):
                    pr[j] *= inv
            ctx = out[b, 0, n]
            ctx[:, :] = 0
            for j in range(t):
                vj = v[b, n, j]
                for r in range(g):
                    w = p[r, j]
                    cr = ctx[r]
                    for d in range(h):
                        cr[d] += w * vj[d]


@njit(**OPTIONS)
def kv_write(cache, new, pos):  # pragma: no cover - compiled
    """``cache[:, :, pos:pos+s] = new.transpose(0, 2, 1, 3)``: cache (b, n, ctx, h), new
    (b, s, n, h)."""
    for b in range(new.shape[0]):
        for s in range(new.shape[1]):
            for n in range(new.shape[2]):
                for h in range(new.shape[3]):
                    cache[b, n, pos + s, h] = new[b, s, n, h]


def warm_up() -> None:
    """Call every kernel once on tiny arrays (compile, or load from the on-disk cache)."""
    f = np.float32
    x2 = np.ones((1, 8), f)
    f32_gemv(x2, np.ones((8, 4), f), np.empty((2, 1, 4), f), np.empty((1, 4), f))
    rms_norm_rows(x2, np.ones(8, f), f(1e-5), f(1 / 8), np.empty_like(x2))
    rope_rows(np.ones(16, f), 16, np.ones((2, 1, 4), f), f(1), 1, np.empty((1, 16), f))
    x4 = np.ones((1, 2, 1, 8), f)
    softmax_rows(x4, np.zeros((1, 1, 8), f), f(1), np.empty_like(x4))
    kv_write(np.ones((1, 1, 8, 4), f), np.ones((1, 1, 1, 4), f), 0)
    kv = np.ones((1, 1, 8, 4), f)
    q5 = np.ones((1, 1, 1, 2, 4), f)
    attend_one_query(q5, kv, kv, 8, np.zeros((1, 1, 8), f), f(1), np.empty_like(q5))
