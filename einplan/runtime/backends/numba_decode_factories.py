"""Factories of the numba backend's float32 decode kernels (runtime/backends/numba_decode.py):
the GEMV of a packed (in, out) weight and the ops between the products where compiled wins.

Each factory takes decode steps and declines the rest (returns None, so numpy's kernel runs):
the elementwise kernels take only nodes whose traced token axis is the literal 1 of the decode
entry, except RoPE and RMSNorm, whose one compiled pass beats numpy's chain of passes at every
size (training, forward and prefill use them, and flash attention's compiled exp:
runtime/backends/numba_exp_factories.py); a product takes at most ``GEMV_MAX_ROWS``
input rows (BLAS's GEMM reuses each weight block across rows and wins above); a softmax at most
``SOFTMAX_MAX_ELEMENTS`` values and no causal mask; nothing but float32. The kernels module is
imported only when a factory builds a kernel.

Measured per call against numpy's kernel on SmolLM2-135M decode shapes, batch 1 / 8, 160 keys
(best of 2000, 2 cores): RMSNorm 1.0 / 1.5 vs 5.6 / 5.9 us, RoPE on q 1.1 / 3.3 vs 9.4 / 16.5,
softmax 8.4 vs 10.8 (batch 1), KV write 0.9 vs 1.1. Not kept (numpy's faster): SwiGLU 5.1 /
34.5 vs 3.3 / 15.8 (with a scalar exp; the vectorised one of numba_exp.py takes SwiGLU from
8K values, batch-8 decode), residual add 0.9 vs 0.5, the
attention products 8.9 / 17.4 vs 5.9 / 5.9 (batched BLAS), softmax at batch 8 60 vs 27.
"""

from __future__ import annotations

import math

import numpy as np

from einplan.compiler.attrs import MatmulRecipe
from einplan.compiler.ops import Op
from einplan.runtime.kernels import KERNELS

# products with at most this many input rows stream the weight in the compiled GEMV; above,
# BLAS. Measured by `einplan bench kernels` (SmolLM2-135M's decode shapes, 2 cores, best of
# 20, a weight out of cache each call), BLAS time / compiled time at 1 / 2 / 4 / 8 / 16 rows:
# qkv 576x960 1.22 1.58 1.25 0.94 0.75; attn o 576x576 1.36 2.06 1.28 0.96 0.93; mlp gate+up
# 576x3072 0.79 1.94 1.65 1.17 0.88; mlp down 1536x576 0.93 1.41 1.14 0.88 0.81; lm head
# 576x49152 1.07 2.68 2.67 1.84 1.21. One rule for every product of a step, not the faster
# kernel per shape: BLAS's threads (spinning after each call) and numba's contend for the two
# cores, and batch-8 decode with only the wide products compiled ran at 28.6 tok/s, against
# 134 with every product on BLAS and 159 with every one compiled (benchmarks/generate.py).
GEMV_MAX_ROWS = 8
# a softmax over at most this many values runs compiled: its exp is a scalar call per value,
# numpy's is SIMD; below this numpy's fixed cost (the blocks, six passes) is the larger
SOFTMAX_MAX_ELEMENTS = 4096


def kernels():
    """The compiled decode kernels module (imports numba on first use)."""
    from einplan.runtime.backends import numba_decode

    return numba_decode


def _f32(node, inputs) -> bool:
    return node.dtype == "f32" and all(n.dtype in ("f32", "i64") for n in inputs)


def one_token(n, axis: int) -> bool:
    """Whether a node's traced ``axis`` is the literal 1 of a decode step (one token per
    sequence), not a symbolic ``seq``: training, forward and prefill steps never get these
    kernels, so they never import numba nor pay its JIT."""
    return -len(n.shape) <= axis < len(n.shape) and n.shape[axis] == 1


def _rows(shape) -> int:
    return math.prod(int(d) for d in shape[:-1])


def is_gemv(node, shapes) -> bool:
    """Whether an einsum is ``x . W`` with W a 2-D (in, out) operand: ``...i,io->...o``."""
    spec = node.attrs.get("spec", "")
    if "->" not in spec or not isinstance(node.attrs.get("recipe"), MatmulRecipe):
        return False
    lhs, out = spec.split("->")
    ops = lhs.split(",")
    if len(ops) != 2 or len(ops[1]) != 2:
        return False
    a, b = ops
    if not a or len(set(a)) != len(a) or b[1] in a:  # a diagonal or repeated letter
        return False
    return b[0] == a[-1] and out == a[:-1] + b[1] and len(shapes[1]) == 2


def make_gemv(node, shapes, out_shape, scratch, inputs):
    """``x . W`` of a float32 (in, out) weight for at most GEMV_MAX_ROWS rows of x: every
    product of a decode step (batch <= 8) and the LM head of a prefill, whose output has no
    token axis."""
    if not _f32(node, inputs) or not is_gemv(node, shapes):
        return None
    m = _rows(shapes[0])
    if m > GEMV_MAX_ROWS:
        return None
    nk = kernels()
    from numba import get_num_threads

    k_in, n = shapes[1]
    part = scratch("gemv", (get_num_threads(), m, n), np.float32)

    def gemv(ins, out):
        x, w = ins
        nk.f32_gemv(x.reshape(m, k_in), w, part, out.reshape(m, n))
        return out

    return gemv


def flat_rows(x: np.ndarray) -> tuple[np.ndarray, int] | None:
    """A 2-D array with unit column stride as a 1-D view of its memory and its row stride (in
    elements), the form in which a compiled kernel's rows vectorise; None for another
    layout."""
    if x.flags.c_contiguous:  # (a decode step's one row): a plain view, no strided one
        return x.reshape(-1), x.shape[-1]
    item = x.itemsize
    if x.ndim != 2 or x.strides[1] != item or x.strides[0] % item or x.strides[0] < 0:
        return None
    stride = x.strides[0] // item if x.shape[0] > 1 else x.shape[1]
    span = (x.shape[0] - 1) * stride + x.shape[1] if x.size else 0
    return np.lib.stride_tricks.as_strided(x, shape=(span,), strides=(item,)), stride


def make_rms_norm(node, shapes, out_shape, scratch, inputs):
    """RMSNorm of the rows of a float32 input, of any step: one compiled pass per row against
    numpy's four."""
    if not _f32(node, inputs):
        return None
    nk = kernels()
    d = out_shape[-1]
    eps, inv_d = np.float32(node.attrs["eps"]), np.float32(1.0 / d)
    rows = _rows(out_shape)
    fallback = KERNELS[Op.RMS_NORM](node, shapes, out_shape, scratch)

    def rms_norm(ins, out):
        x, w = ins
        if not out.flags.c_contiguous:
            return fallback(ins, out)
        nk.rms_norm_rows(x.reshape(rows, d), w, eps, inv_d, out.reshape(rows, d))
        return out

    return rms_norm


def make_rope(node, shapes, out_shape, scratch, inputs):
    """RoPE (and its scale) on q or k, of any step: one compiled pass against numpy's six
    (SmolLM2's q at 1024 tokens: 0.07 ms against 1.6)."""
    if not _f32(node, inputs):
        return None
    nk = kernels()
    x_shape = shapes[0]
    rows, hd = int(x_shape[0]) * int(x_shape[1]), int(x_shape[-1])
    heads = math.prod(int(d) for d in x_shape[2:-1])
    scale = np.float32(node.attrs.get("scale", 1.0))
    sign = -1 if node.attrs.get("inverse") else 1
    x2, t3 = (rows, heads * hd), (2, rows, hd // 2)
    fallback = KERNELS[Op.ROPE](node, shapes, out_shape, scratch)

    def rope(ins, out):
        x, table = ins
        flat = flat_rows(x.reshape(x2))
        if flat is None or not out.flags.c_contiguous:
            return fallback(ins, out)
        nk.rope_rows(flat[0], flat[1], table.reshape(t3), scale, sign, out.reshape(x2))
        return out

    return rope


def make_softmax(node, shapes, out_shape, scratch, inputs):
    """The masked (not causal) softmax over the keys of a decode step's scores."""
    if node.attrs.get("causal") or not one_token(node, -2) or not _f32(node, inputs):
        return None
    if math.prod(out_shape) > SOFTMAX_MAX_ELEMENTS:
        return None
    nk = kernels()
    q, k = out_shape[-2], out_shape[-1]
    shape4 = (out_shape[0], math.prod(out_shape[1:-2]), q, k)
    scale = np.float32(node.attrs.get("scale", 1.0))
    no_mask = np.zeros((0, 0, 0), np.float32)

    def softmax(ins, out):
        mask = ins[1] if len(ins) == 2 else no_mask
        nk.softmax_rows(ins[0].reshape(shape4), mask, scale, out.reshape(shape4))
        return out

    return softmax


def make_kv_append(node, shapes, out_shape, scratch, inputs):
    """Write a decode step's keys or values into the cache at slot ``pos`` (as numpy's)."""
    if not _f32(node, inputs) or not one_token(inputs[1], 1):
        return None
    nk = kernels()
    kv, s = out_shape[2], shapes[1][1]

    def kv_append(ins, out):
        cache, new, pos = ins
        p = int(pos[0])
        if not 0 <= p <= kv - s:
            raise IndexError(f"KV cache write at slot {p} of {s} entries exceeds kv={kv}")
        nk.kv_write(cache, new, p)
        return cache[:, :, :kv]

    return kv_append


DECODE_FACTORIES = {
    Op.EINSUM: make_gemv,
    Op.RMS_NORM: make_rms_norm,
    Op.ROPE: make_rope,
    Op.SOFTMAX: make_softmax,
    Op.KV_APPEND: make_kv_append,
}
