"""Factories of the numba backend's kernels built on its vectorised exp
(runtime/backends/numba_exp.py): flash attention (the causal forward of a ``forward`` entry
as one compiled kernel, numba_flash.py; the other tiled steps runtime/flash.py's kernels with
the compiled exp for the score tiles, their products BLAS's) and SwiGLU.

Measured on SmolLM2-135M shapes (2 cores, Zen 4): one layer's causal attention at 4096
tokens took 165 ms with NumPy's exp and 138 with the compiled one (1024 tokens: 16.3 and
11.2); SwiGLU of a 1024 x 1536 gate and up (strided halves of one product) 2.5 ms in NumPy's
five passes, 1.4 in one compiled pass. Float64 steps decline (the compiled exp is float32's);
16-bit flash steps compute in float32 and take it.
"""

from __future__ import annotations

import math

import numpy as np

from einplan.compiler.ops import Op
from einplan.compiler.passes.flash import attends_directly, key_axis
from einplan.runtime.backends.numba_decode_factories import flat_rows, kernels, make_softmax
from einplan.runtime.flash import make_flash_attention, make_flash_attention_grad
from einplan.runtime.kernels import direct_softmax, make_direct_attention, silu_mul_block
from einplan.runtime.panels import PANEL

NO_SHIFT = np.empty(0, np.float32)
# SwiGLU steps below this many values keep numpy's kernel (the views and the call cost ~8 us).
# Median us of SmolLM2's (rows, 1536) gate and up, compiled against numpy: 1 row 9.0 / 3.5,
# 8 rows 12.9 / 16.4, 32 rows 26.8 / 66.3, 128 rows 81.9 / 240
MIN_SILU = 1 << 13
# decode's attention as one compiled pass up to this many keys; BLAS's products beyond. One
# SmolLM2 layer (3 KV heads of 3 queries, head dim 64), compiled against BLAS's direct step
# (us): 128 keys 12 / 40, 512 52 / 75, 1024 104 / 129, 2048 208 / 183, 4096 441 / 414
ATTEND_MAX_KEYS = 1024


def compiled():
    """The compiled kernels module (imports numba on first use)."""
    from einplan.runtime.backends import numba_exp

    return numba_exp


def compiled_exp_rows():
    """flash's ``exp_rows`` on the compiled exp."""
    exp_rows = compiled().exp_rows

    def exp(s: np.ndarray, shift: np.ndarray | None = None) -> None:
        exp_rows(s, NO_SHIFT if shift is None else shift)

    return exp


def make_flash(node, shapes, out_shape, scratch, inputs):
    """Flash attention (forward or reverse) on the compiled exp, a direct step (few queries)
    with decode's compiled softmax; None for a float64 step."""
    if node.dtype == "f64":
        return None
    if attends_directly(node, shapes[0], shapes[1][key_axis(node)]):
        return make_direct(node, shapes, out_shape, scratch, inputs)
    if compiles_whole(node, shapes, inputs):
        return make_causal_flash(node, shapes, out_shape, scratch)
    make = make_flash_attention if node.op is Op.FLASH_ATTENTION else make_flash_attention_grad
    return make(node, shapes, out_shape, scratch, exp=compiled_exp_rows())


def compiles_whole(node, shapes, inputs) -> bool:
    """Whether a flash step runs as one compiled kernel (numba_flash.py): the causal forward
    of float32 values without a mask or kept statistics (a plan's ``forward`` entry; training
    keeps the log-sum-exp for its reverse step), heads of a multiple of 64 dims."""
    a = node.attrs
    return (
        node.op is Op.FLASH_ATTENTION
        and node.dtype == "f32"
        and all(i.dtype == "f32" for i in inputs[:3])
        and bool(a.get("causal"))
        and len(shapes) == 3
        and not a.get("keep")
        and shapes[0][-1] % 64 == 0
        and a["block_k"] % 32 == 0
    )


def make_causal_flash(node, shapes, out_shape, scratch):
    """The causal forward as numba_flash.causal_flash, on the pass's query blocks and key
    tiles, its buffers in the binding's scratch."""
    from numba import get_num_threads

    from einplan.runtime.backends import numba_flash as nf

    b, s, n, g, h = shapes[0]
    # k and v heads first, (b, n, t, h): a view of either layout
    heads_first = (0, 1, 2, 3) if node.attrs["layout"] == "bnth" else (0, 2, 1, 3)
    t = shapes[1][key_axis(node)]
    bq, bk = node.attrs["block_q"], node.attrs["block_k"]
    threads = get_num_threads()
    panels = -(-t // PANEL)
    rows, width = min(bq, s) * g, min(bk, panels * PANEL)
    f32 = np.float32
    kp = scratch("flash_kp", (b, n, panels, h, PANEL), f32)
    vp = scratch("flash_vp", (b, n, h // PANEL, t, PANEL), f32)
    xb, tb, acc = (scratch(f"flash_{r}", (threads, rows, h), f32) for r in ("xb", "tb", "acc"))
    sb = scratch("flash_sb", (threads, rows, width), f32)
    stats = scratch("flash_stats", (threads, 2, rows), f32)
    scale = f32(node.attrs.get("scale", 1.0))

    def causal_flash(ins, out):
        q, k, v = ins[:3]
        nf.as_panels(k.transpose(heads_first), v.transpose(heads_first), kp, vp)
        nf.causal_flash(q, kp, vp, scale, t - s, bq, bk, out, xb, sb, tb, acc, stats)
        return out

    return causal_flash


def make_direct(node, shapes, out_shape, scratch, inputs):
    """A direct flash step (runtime/kernels.py make_direct_attention: BLAS products) whose
    softmax is decode's compiled one where it takes the scores (one query, few keys); one
    query per head over at most ATTEND_MAX_KEYS keys of a (b, n, ctx, h) cache runs as one
    compiled pass (make_attend_one_query)."""
    b, s, n, g, _ = shapes[0]
    axis = key_axis(node)
    scores = (b, n, g, s, shapes[1][axis])
    keys = inputs[1].shape[axis]
    probs = direct_softmax(node, keys)
    sm = make_softmax(probs, [scores, *shapes[3:4]], scores, scratch, [probs, *inputs[3:4]])
    blas = make_direct_attention(node, shapes, out_shape, scratch, softmax=sm)
    if s == 1 and axis == 2 and shapes[1][axis] <= ATTEND_MAX_KEYS and node.dtype == "f32":
        return make_attend_one_query(node, blas)
    return blas


def cache_of(a: np.ndarray) -> np.ndarray | None:
    """The C-contiguous (b, n, ctx, h) cache whose ``[:, :, :t]`` is ``a`` (the view a KV
    append returns), as a view of the same memory, for the compiled kernel to walk row by
    row; None when ``a`` is not such a slice of a contiguous array (then the BLAS step runs).
    A few attribute checks and two addresses: about 3 us."""
    if a.flags.c_contiguous:
        return a
    b, n, _, h = a.shape
    item = a.itemsize
    row = h * item
    if a.strides[3] != item or a.strides[2] != row or a.strides[1] % row:
        return None
    ctx = a.strides[1] // row
    base = a.base
    if a.strides[0] != n * ctx * row or type(base) is not np.ndarray:
        return None
    if not base.flags.c_contiguous or base.dtype != a.dtype:
        return None
    start, size = a.ctypes.data - base.ctypes.data, b * n * ctx * h
    if start < 0 or start % item or start // item + size > base.size:
        return None
    return base.reshape(-1)[start // item : start // item + size].reshape(b, n, ctx, h)


def make_attend_one_query(node, blas):
    """Decode's attention as one compiled pass (numba_decode.attend_one_query); the BLAS
    step ``blas`` for keys and values that are not leading slices of a cache."""
    attend = kernels().attend_one_query
    scale = np.float32(node.attrs.get("scale", 1.0))
    no_mask = np.zeros((0, 0, 0), np.float32)

    def flash_attention(ins, out):
        q, k, v = ins[:3]
        k_all, v_all = cache_of(k), cache_of(v)
        if k_all is None or v_all is None or not q.flags.c_contiguous:
            return blas(ins, out)
        mask = ins[3] if len(ins) == 4 else no_mask
        attend(q, k_all, v_all, k.shape[2], mask, scale, out)
        return out

    return flash_attention


def make_silu_mul(node, shapes, out_shape, scratch, inputs):
    """SwiGLU of float32 gate and up of the output's shape, from MIN_SILU values; None
    otherwise."""
    if node.dtype != "f32" or any(n.dtype != "f32" for n in inputs) or len(out_shape) < 2:
        return None
    if math.prod(out_shape) < MIN_SILU:
        return None
    if any(tuple(s) != tuple(out_shape) for s in shapes):
        return None
    kernel = compiled().silu_mul_rows
    width = out_shape[-1]

    def silu_mul(ins, out):
        g, u = (x.reshape(-1, width) for x in ins)
        fg, fu = flat_rows(g), flat_rows(u)
        if fg is None or fu is None or not out.flags.c_contiguous:
            return silu_mul_block(*ins, out)
        kernel(fg[0], fg[1], fu[0], fu[1], out.reshape(-1, width))
        return out

    return silu_mul


EXP_FACTORIES = {
    Op.FLASH_ATTENTION: make_flash,
    Op.FLASH_ATTENTION_GRAD: make_flash,
    Op.SILU_MUL: make_silu_mul,
}
