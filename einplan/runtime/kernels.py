"""One NumPy kernel per op. Contractions run as ``np.matmul`` (BLAS) by their plan recipe.

Factories whose code is CuPy's too take the array module ``xp`` (default numpy): the cuda
device runs them with ``xp=cupy`` (runtime/cuda/backend.py), so their kernels never read a
device value back to the host.

``make_kernel`` is called once per step when a plan is bound to concrete sizes; it does the
shape arithmetic up front and returns ``fn(inputs, out) -> array`` that writes into the
preallocated ``out`` (views return their input reshaped, and write nothing).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from einplan.compiler.attrs import QMatmulRecipe, UnaryRecipe, operand_copied
from einplan.compiler.dtypes import to_numpy_dtype
from einplan.compiler.ir import Node
from einplan.compiler.ops import ADAMW_CHUNK, CE_BLOCK_BYTES, Op
from einplan.compiler.passes.flash import attends_directly, key_axis
from einplan.runtime.flash import FLASH_KERNELS, make_flash_attention
from einplan.runtime.moe import MOE_KERNELS
from einplan.runtime.qmatmul import THREADS, QuantizedMatrix, scratch_shapes
from einplan.runtime.quantize import fake_quantize

Kernel = Callable[[list[np.ndarray], np.ndarray | None], np.ndarray]
Scratch = Callable[[str, tuple[int, ...], np.dtype], np.ndarray]


def scalar_type(node: Node) -> type:
    """The NumPy scalar type of a node's dtype, for constants that must not change precision."""
    return to_numpy_dtype(node.dtype).type


def _prod(dims) -> int:
    return math.prod(int(d) for d in dims)


def _operand_view(
    shape: tuple[int, ...],
    perm: list[int],
    nb: int,
    n1: int,
    role: str,
    scratch: Scratch,
    dtype: np.dtype,
    xp=np,
) -> Callable[[np.ndarray], np.ndarray]:
    """How to present one operand to matmul as ``[batch,] rows x cols`` without a copy when
    the stored layout allows (identity, or a plain 2-D transpose BLAS reads directly)."""
    t = [shape[p] for p in perm]
    batch, rows, cols = _prod(t[:nb]), _prod(t[nb : nb + n1]), _prod(t[nb + n1 :])
    mat = (batch, rows, cols) if nb else (rows, cols)
    if perm == sorted(perm):
        return lambda x: x.reshape(mat)
    if not operand_copied(perm, nb, n1):
        # stored as ([batch,] cols, rows): a transposed view, read by BLAS with its trans flag
        if nb == 0:
            return lambda x: x.reshape(cols, rows).T
        return lambda x: x.reshape(batch, cols, rows).swapaxes(-1, -2)
    buf = scratch(role, mat, dtype)
    tshape = tuple(t)

    def copy(x: np.ndarray) -> np.ndarray:
        moved = x.transpose(perm)
        if moved.flags.c_contiguous:  # the permutation only moves axes of size 1 (decode)
            return moved.reshape(mat)
        xp.copyto(buf.reshape(tshape), moved)
        return buf

    return copy


def make_einsum(
    node: Node,
    shapes: list[tuple[int, ...]],
    out_shape: tuple[int, ...],
    scratch: Scratch,
    xp=np,
    matmul=None,
) -> Kernel:
    """A pairwise contraction as permute/reshape + one ``matmul(a, b, out=)`` (default: the
    array module ``xp``'s; numpy: BLAS) into the output buffer."""
    r = node.attrs["recipe"]
    if isinstance(r, QMatmulRecipe):
        return make_qmatmul(node, shapes, out_shape, scratch)
    if isinstance(r, UnaryRecipe):
        axes, perm = tuple(r.sum_axes), r.perm

        def unary(ins, out):
            x = ins[0].sum(axis=axes) if axes else ins[0]
            xp.copyto(out, x.transpose(perm))
            return out

        return unary
    a_shape = tuple(d for i, d in enumerate(shapes[0]) if i not in r.a_sum)
    b_shape = tuple(d for i, d in enumerate(shapes[1]) if i not in r.b_sum)
    nb, na, nk, nn = r.groups
    dtype = to_numpy_dtype(node.dtype)
    a_view = _operand_view(a_shape, r.a_perm, nb, na, "a", scratch, dtype, xp)
    b_view = _operand_view(b_shape, r.b_perm, nb, nk, "b", scratch, dtype, xp)
    at = [a_shape[p] for p in r.a_perm]
    bt = [b_shape[p] for p in r.b_perm]
    logical = tuple(at[: nb + na]) + tuple(bt[nb + nk :])
    mm = ((_prod(at[:nb]),) if nb else ()) + (_prod(at[nb : nb + na]), _prod(bt[nb + nk :]))
    a_sum, b_sum = tuple(r.a_sum), tuple(r.b_sum)
    out_perm = r.out_perm
    direct = out_perm == sorted(out_perm)
    c_buf = None if direct else scratch("c", mm, dtype)
    in_order = tuple(int(i) for i in np.argsort(out_perm))  # out's axes in the product's order
    product = matmul or xp.matmul

    def matmul(ins, out):
        a, b = ins
        if a_sum:
            a = a.sum(axis=a_sum)
        if b_sum:
            b = b.sum(axis=b_sum)
        if direct:
            product(a_view(a), b_view(b), out=out.reshape(mm))
        elif (target := out.transpose(in_order)).flags.c_contiguous:  # moves size-1 axes only
            product(a_view(a), b_view(b), out=target.reshape(mm))
        else:
            product(a_view(a), b_view(b), out=c_buf)
            xp.copyto(out, c_buf.reshape(logical).transpose(out_perm))
        return out

    return matmul


def make_qmatmul(node, shapes, out_shape, scratch) -> Kernel:
    """``x . W^T`` (or ``dy . W`` when ``transposed``) with a quantised W, block by block."""
    r = node.attrs["recipe"]
    rows, cols = shapes[1]
    m = _prod(shapes[0][:-1])
    shapes = scratch_shapes(rows, cols, r.group, m)
    bufs = [
        {k: scratch(f"{k}{t}", s, np.float32) for k, s in shapes.items()} for t in range(THREADS)
    ]
    transposed = r.transposed

    def qmatmul(ins, out):
        x, w = ins
        x2, o2 = x.reshape(m, x.shape[-1]), out.reshape(m, out_shape[-1])
        if transposed:
            w.matmul_transposed(x2, o2, bufs)
        else:
            w.matmul(x2, o2, bufs)
        return out

    return qmatmul


def make_dequantize(node, shapes, out_shape, scratch) -> Kernel:
    """A handle on the packed weight (no float copy); cached while its arrays stay the same."""
    bits, group = node.attrs["bits"], node.attrs["group"]
    cache: list = [None, None]

    def dequantize(ins, out):
        if cache[0] is None or any(a is not b for a, b in zip(cache[0], ins, strict=True)):
            zero = ins[2] if len(ins) == 3 else None
            cache[:] = [list(ins), QuantizedMatrix(ins[0], ins[1], zero, bits, group)]
        return cache[1]

    return dequantize


def make_fake_quant(node, shapes, out_shape, scratch) -> Kernel:
    bits = node.attrs["bits"]

    def fake_quant(ins, out):
        return fake_quantize(ins[0], bits, ins[1] if len(ins) == 2 else None, out)

    return fake_quant


def make_scale(node, shapes, out_shape, scratch, xp=np) -> Kernel:
    factor = scalar_type(node)(node.attrs["factor"])
    return lambda ins, out: xp.multiply(ins[0], factor, out=out)


def make_dropout(node, shapes, out_shape, scratch) -> Kernel:
    """Inverted dropout with a mask drawn from (seed input, the node's stream)."""
    p, stream = node.attrs["p"], node.attrs["stream"]
    keep = scalar_type(node)(1.0 / (1.0 - p))

    def dropout(ins, out):
        x, seed = ins
        rng = np.random.default_rng([int(seed), stream])
        np.multiply(x, rng.random(x.shape, np.float32) >= p, out=out)
        out *= keep
        return out

    return dropout


def make_gather(node, shapes, out_shape, scratch, xp=np) -> Kernel:
    if node.attrs.get("transposed"):  # a (d, v) table: the ids pick columns

        def gather_columns(ins, out):
            table, ids = ins
            # rows of the (v, d) view: np.take along axis 1 walks the table element by element
            xp.copyto(out, table.T[ids])
            return out

        return gather_columns

    def gather(ins, out):
        table, ids = ins
        if isinstance(table, QuantizedMatrix):
            table.take_rows(ids, out)
        elif table.dtype == out.dtype:
            xp.take(table, ids, axis=0, out=out)
        else:
            out[...] = table[ids]
        return out

    return gather


def make_rms_norm(node, shapes, out_shape, scratch) -> Kernel:
    eps = scalar_type(node)(node.attrs["eps"])
    inv_d = scalar_type(node)(1.0 / out_shape[-1])

    def rms_norm(ins, out):
        x, w = ins
        denom = np.vecdot(x, x)[..., None]  # sum of squares over the last axis
        denom *= inv_d
        denom += eps
        np.sqrt(denom, out=denom)
        np.divide(x, denom, out=out)
        out *= w
        return out

    return rms_norm


def make_rope_table(node, shapes, out_shape, scratch, xp=np) -> Kernel:
    dtype = to_numpy_dtype(node.dtype)
    inv_freq = xp.asarray(np.asarray(node.attrs["inv_freq"], dtype=dtype))

    def rope_table(ins, out):
        angles = ins[0][..., None].astype(dtype) * inv_freq
        xp.cos(angles, out=out[0])
        xp.sin(angles, out=out[1])
        return out

    return rope_table


def make_rope(node, shapes, out_shape, scratch) -> Kernel:
    x_shape, t_shape = shapes
    half = x_shape[-1] // 2
    bcast = tuple(x_shape[:2]) + (1,) * (len(x_shape) - 3) + (half,)
    scale = scalar_type(node)(node.attrs.get("scale", 1.0))
    sign = -1 if node.attrs.get("inverse") else 1  # the inverse rotation negates the angle

    def rope(ins, out):
        x, table = ins
        cos, sin = table[0].reshape(bcast), table[1].reshape(bcast)
        x1, x2 = x[..., :half], x[..., half:]
        o1, o2 = out[..., :half], out[..., half:]
        np.multiply(x1, cos, out=o1)
        np.multiply(x2, cos, out=o2)
        if sign > 0:
            o1 -= x2 * sin
            o2 += x1 * sin
        else:
            o1 += x2 * sin
            o2 -= x1 * sin
        if scale != 1:
            out *= scale
        return out

    return rope


SOFTMAX_BLOCK_BYTES = 1 << 20  # rows per block sized to stay in L2 across the six passes


def make_softmax(node, shapes, out_shape, scratch) -> Kernel:
    """softmax(scale * x + mask) over the last axis, in blocks of query rows kept in cache.

    With ``causal``, query i (at position k - q + i) sees keys up to its own position: a block
    of rows reads only the keys some row of it can see, masks (-inf) only the diagonal part
    where its rows differ, and writes zeros beyond, so the masked half is never exponentiated.
    An optional second input is an additive (batch, queries, keys) mask.
    """
    scale = scalar_type(node)(node.attrs.get("scale", 1.0))
    causal = bool(node.attrs.get("causal"))
    has_mask = len(shapes) == 2
    if len(out_shape) >= 2:
        q, k = out_shape[-2], out_shape[-1]
        batch, rows = out_shape[0], _prod(out_shape[1:-2])
    else:
        q, k, batch, rows = 1, out_shape[-1], 1, 1
    block = max(16, SOFTMAX_BLOCK_BYTES // max(1, 4 * batch * rows * k))
    blocks = []  # (first row, end row, end of visible keys, start of masked keys, mask)
    for i0 in range(0, q, block):
        i1 = min(q, i0 + block)
        kend = min(k, i1 + (k - q)) if causal else k
        dstart = max(0, min(kend, i0 + (k - q) + 1)) if causal else kend
        above = np.arange(dstart, kend)[None, :] > (np.arange(i0, i1)[:, None] + (k - q))
        mask = np.where(above, np.float32(-np.inf), np.float32(0)).astype(np.float32)
        blocks.append((i0, i1, kend, dstart, mask))
    shape4 = (batch, rows, q, k)

    def softmax(ins, out):
        x4, o4 = ins[0].reshape(shape4), out.reshape(shape4)
        pad = ins[1][:, None] if has_mask else None  # (batch, 1, queries, keys)
        for i0, i1, kend, dstart, mask in blocks:
            o = o4[:, :, i0:i1, :kend]
            x = x4[:, :, i0:i1, :kend]
            if scale != 1:
                x = np.multiply(x, scale, out=o)
            if pad is not None:
                x = np.add(x, pad[:, :, i0:i1, :kend], out=o)
            if dstart < kend:  # rows of this block see different numbers of keys
                top = (x[..., dstart:] + mask).max(axis=-1, keepdims=True)
                if dstart > 0:
                    np.maximum(top, x[..., :dstart].max(axis=-1, keepdims=True), out=top)
                np.subtract(x, top, out=o)
                o[..., dstart:] += mask
            else:
                np.subtract(x, x.max(axis=-1, keepdims=True), out=o)
            np.exp(o, out=o)
            o *= np.float32(1) / o.sum(axis=-1, keepdims=True)
            if kend < k:
                o4[:, :, i0:i1, kend:] = 0
        return out

    return softmax


# values of a SwiGLU product per block of rows: its five passes then run in L2, not memory
SILU_BLOCK = 1 << 16


def make_silu_mul(node, shapes, out_shape, scratch) -> Kernel:
    """``g * sigmoid(g) * u`` as ``g / (1 + exp(-g)) * u``; above SILU_BLOCK values, in blocks
    of rows of about that many (g and u are often column halves of one gate+up product)."""
    width = out_shape[-1] if out_shape else 1
    rows = max(1, SILU_BLOCK // max(width, 1))
    blocked = (
        math.prod(out_shape) > SILU_BLOCK
        and len(out_shape) >= 2
        and all(tuple(s) == tuple(out_shape) for s in shapes)
    )
    if not blocked:  # decode and other small steps: one pass each, no slicing
        return lambda ins, out: silu_mul_block(ins[0], ins[1], out)

    def silu_mul(ins, out):
        if not out.flags.c_contiguous:
            return silu_mul_block(ins[0], ins[1], out)
        g2, u2, o2 = (x.reshape(-1, width) for x in (*ins, out))  # views: rows of one stride
        for r in range(0, o2.shape[0], rows):
            silu_mul_block(g2[r : r + rows], u2[r : r + rows], o2[r : r + rows])
        return out

    return silu_mul


def silu_mul_block(g, u, out):
    """``g / (1 + exp(-g)) * u`` into ``out`` in five NumPy passes."""
    np.negative(g, out=out)
    np.exp(out, out=out)
    out += 1
    np.divide(g, out, out=out)
    out *= u
    return out


def make_elementwise(name: str) -> Callable:
    """The factory of a binary ufunc (``"add"``, ``"multiply"``) of the array module."""

    def factory(node, shapes, out_shape, scratch, xp=np) -> Kernel:
        ufunc = getattr(xp, name)

        def elementwise(ins, out):
            return ufunc(ins[0], ins[1], out=out)

        return elementwise

    return factory


def make_kv_append(node, shapes, out_shape, scratch) -> Kernel:
    """Write the new keys/values into the cache at slot ``pos`` (an input), in place, and
    return a view of the first ``kv`` slots."""
    kv, s = out_shape[2], shapes[1][1]

    def kv_append(ins, out):
        cache, new, pos = ins  # cache (b, n, ctx, h), new (b, s, n, h)
        p = int(pos[0])
        if not 0 <= p <= kv - s:
            raise IndexError(f"KV cache write at slot {p} of {s} entries exceeds kv={kv}")
        cache[:, :, p : p + s] = new.transpose(0, 2, 1, 3)
        return cache[:, :, :kv]

    return kv_append


def make_slice_last(node, shapes, out_shape, scratch, xp=np) -> Kernel:
    def slice_last(ins, out):
        xp.copyto(out, ins[0][:, -1])
        return out

    return slice_last


def make_split(node, shapes, out_shape, scratch, xp=np) -> Kernel:
    start, stop = node.attrs["start"], node.attrs["stop"]
    return lambda ins, out: ins[0][..., start:stop]


def make_reshape(node, shapes, out_shape, scratch, xp=np) -> Kernel:
    return lambda ins, out: ins[0].reshape(out_shape)


def make_after(node, shapes, out_shape, scratch, xp=np) -> Kernel:
    return lambda ins, out: ins[0]


def make_transpose(node, shapes, out_shape, scratch, xp=np) -> Kernel:
    perm = node.attrs["perm"]

    def transpose(ins, out):
        xp.copyto(out, ins[0].transpose(perm))
        return out

    return transpose


def make_cast(node, shapes, out_shape, scratch, xp=np) -> Kernel:
    def cast(ins, out):
        out[...] = ins[0]
        return out

    return cast


def make_expand(node, shapes, out_shape, scratch, xp=np) -> Kernel:
    axes = node.attrs["axes"]
    with_ones = tuple(1 if i in axes else d for i, d in enumerate(out_shape))

    def expand(ins, out):
        xp.copyto(out, ins[0].reshape(with_ones))
        return out

    return expand


def make_scatter_add(node, shapes, out_shape, scratch, xp=np) -> Kernel:
    width = out_shape[-1]

    def scatter_add(ins, out):
        values, ids = ins
        out.fill(0)
        xp.add.at(out, ids.reshape(-1), values.reshape(-1, width))
        return out

    return scatter_add


# 16-bit logits are upcast into a second block: smaller blocks keep mixed precision's scratch
LOW_CE_BLOCK_BYTES = 1 << 20


def _ce_blocks(shapes, dtype, scratch, low: bool = False):
    """Rows (all but the vocab axis) in blocks, with a scratch block (``low``: of the size for
    16-bit logits)."""
    vocab = shapes[0][-1]
    rows = _prod(shapes[0][:-1])
    limit = LOW_CE_BLOCK_BYTES if low else CE_BLOCK_BYTES
    block = max(1, min(rows, limit // (vocab * dtype.itemsize)))
    return vocab, rows, block, scratch("ce", (block, vocab), dtype)


def make_cross_entropy(node, shapes, out_shape, scratch, low: bool = False) -> Kernel:
    """Mean over non-ignored rows of logsumexp(logits) - logits[target], in blocks of rows;
    ``low``: 16-bit logits, upcast a block at a time (the loss is float32)."""
    dtype = to_numpy_dtype(node.dtype)
    vocab, rows, block, buf = _ce_blocks(shapes, dtype, scratch, low)
    upcast = scratch("ce.x", (block, vocab), dtype) if low else None
    ignore = node.attrs["ignore_index"]

    def cross_entropy(ins, out):
        logits, targets = ins[0].reshape(rows, vocab), ins[1].reshape(rows)
        valid = targets != ignore
        total = dtype.type(0)
        for r0 in range(0, rows, block):
            x, t, ok = logits[r0 : r0 + block], targets[r0 : r0 + block], valid[r0 : r0 + block]
            if upcast is not None:
                np.copyto(upcast[: len(x)], x)
                x = upcast[: len(x)]
            e = buf[: len(x)]
            top = x.max(axis=-1, keepdims=True)
            np.subtract(x, top, out=e)
            np.exp(e, out=e)
            lse = np.log(e.sum(axis=-1)) + top[:, 0]
            picked = np.take_along_axis(x, np.where(ok, t, 0)[:, None], axis=-1)[:, 0]
            total += (lse - picked)[ok].sum()
        out[...] = total / max(1, int(valid.sum()))
        return out

    return cross_entropy


def make_cross_entropy_grad(node, shapes, out_shape, scratch, low: bool = False) -> Kernel:
    """(softmax(logits) - onehot(target)) * ct / count on non-ignored rows, zero elsewhere;
    ``low``: logits and gradient are stored in 16 bits, each block computed in ``dtype``."""
    dtype = to_numpy_dtype(node.dtype)
    vocab, rows, block, buf = _ce_blocks(shapes, dtype, scratch, low)
    ignore = node.attrs["ignore_index"]

    def cross_entropy_grad(ins, out):
        logits, targets, ct = ins[0].reshape(rows, vocab), ins[1].reshape(rows), ins[2]
        o = out.reshape(rows, vocab)
        valid = targets != ignore
        scale = ct / max(1, int(valid.sum()))
        for r0 in range(0, rows, block):
            x, e = logits[r0 : r0 + block], o[r0 : r0 + block]
            if low:  # upcast the block into the scratch block, compute there
                e = buf[: len(x)]
                np.copyto(e, x)
                x = e
            np.subtract(x, x.max(axis=-1, keepdims=True), out=e)
            np.exp(e, out=e)
            e *= scale / e.sum(axis=-1, keepdims=True)
            t, ok = targets[r0 : r0 + block], valid[r0 : r0 + block]
            hit = np.flatnonzero(ok)
            e[hit, t[hit]] -= scale
            e[~ok] = 0
            if low:
                np.copyto(o[r0 : r0 + block], e, casting="unsafe")
        return out

    return cross_entropy_grad


def make_rms_norm_grad(node, shapes, out_shape, scratch, xp=np) -> Kernel:
    """With r = 1/sqrt(mean(x^2) + eps): d w = sum over rows of ct * x * r; d x = r * ct * w
    - x * r^3 * mean(ct * w * x)."""
    eps = scalar_type(node)(node.attrs["eps"])
    dtype = to_numpy_dtype(node.dtype)
    tmp = scratch("rms", tuple(shapes[0]), dtype)
    wrt_w = node.attrs["wrt"] == "w"

    def rms_norm_grad(ins, out):
        x, w, ct = ins
        xp.multiply(x, x, out=tmp)
        r = tmp.mean(axis=-1, keepdims=True)
        r += eps
        xp.sqrt(r, out=r)
        xp.divide(1, r, out=r)
        if wrt_w:
            xp.multiply(x, r, out=tmp)
            xp.multiply(tmp, ct, out=tmp)
            xp.sum(tmp.reshape(-1, tmp.shape[-1]), axis=0, out=out)
            return out
        xp.multiply(ct, w, out=out)  # ct * w
        xp.multiply(out, x, out=tmp)
        dot = tmp.mean(axis=-1, keepdims=True)
        dot *= r * r
        xp.multiply(x, dot, out=tmp)
        out -= tmp
        out *= r
        return out

    return rms_norm_grad


def direct_softmax(node: Node, keys) -> Node:
    """The softmax node of a direct flash step's (b, n, g, s, keys) scores (``keys``: the
    traced or concrete key count), for a softmax kernel factory."""
    b, s, n, g, _ = node.shape
    attrs = {"causal": node.attrs["causal"], "scale": node.attrs.get("scale", 1.0)}
    return node.with_(op=Op.SOFTMAX, attrs=attrs, shape=(b, n, g, s, keys))


def make_direct_attention(node: Node, shapes, out_shape, scratch, softmax=None):
    """softmax(scale * q k^T + mask) v of a step of few queries (attr ``direct``: decode, a
    speculative check) as the plain chain computes it, in one step: the (b, n, g, s, keys)
    scores in one scratch buffer, no tiles and no heads-first copy of the cache. ``softmax``:
    the kernel of :func:`direct_softmax`'s node (None: runtime/kernels.py's)."""
    b, s, n, g, h = shapes[0]
    bnth = node.attrs["layout"] == "bnth"
    t = shapes[1][key_axis(node)]
    scores = scratch("flash_direct", (b, n, g, s, t), to_numpy_dtype(node.dtype))
    if softmax is None:
        probs = direct_softmax(node, t)
        softmax = make_softmax(probs, [scores.shape, *shapes[3:4]], scores.shape, scratch)

    def flash_attention(ins, out):
        q, k, v = ins[:3]
        if not bnth:
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        # (b, n, g, s, h) x (b, n, 1, h, t) -> (b, n, g, s, t): a product per query row (one
        # per KV head with its g rows measured 3x slower from 1024 keys: BLAS's GEMM for 3 rows)
        np.matmul(q.transpose(0, 2, 3, 1, 4), k[:, :, None].swapaxes(-1, -2), out=scores)
        softmax([scores, *ins[3:4]], scores)
        if s == 1:  # one product per KV head, its g query rows together (1.7x faster)
            # (b, n, g, t) x (b, n, t, h) -> (b, n, g, h)
            np.matmul(scores[:, :, :, 0], v, out=out[:, 0])
            return out
        # (b, n, g, s, t) x (b, n, 1, t, h) -> (b, n, g, s, h), written into (b, s, n, g, h)
        np.matmul(scores, v[:, :, None], out=out.transpose(0, 2, 3, 1, 4))
        return out

    return flash_attention


def make_flash(node: Node, shapes, out_shape, scratch) -> Kernel:
    """A flash_attention step: direct (few queries) or by query blocks and key tiles
    (runtime/flash.py)."""
    if attends_directly(node, shapes[0], shapes[1][key_axis(node)]):
        return make_direct_attention(node, shapes, out_shape, scratch)
    return make_flash_attention(node, shapes, out_shape, scratch)


def make_softmax_grad(node, shapes, out_shape, scratch, xp=np) -> Kernel:
    """d x = scale * y * (ct - sum(ct * y)) over the last axis."""
    scale = scalar_type(node)(node.attrs.get("scale", 1.0))

    def softmax_grad(ins, out):
        y, ct = ins
        xp.multiply(y, ct, out=out)
        s = out.sum(axis=-1, keepdims=True)
        xp.subtract(ct, s, out=out)
        out *= y
        if scale != 1:
            out *= scale
        return out

    return softmax_grad


def make_silu_mul_grad(node, shapes, out_shape, scratch, xp=np) -> Kernel:
    """With s = sigmoid(gate): d up = ct * gate * s; d gate = ct * up * s * (1 + gate * (1 - s))."""
    sig = scratch("sigmoid", tuple(out_shape), to_numpy_dtype(node.dtype))
    wrt_up = node.attrs["wrt"] == "up"

    def silu_mul_grad(ins, out):
        g, u, ct = ins
        xp.negative(g, out=sig)
        xp.exp(sig, out=sig)
        xp.add(sig, 1, out=sig)
        xp.divide(1, sig, out=sig)
        if wrt_up:
            xp.multiply(g, sig, out=out)
            out *= ct
            return out
        xp.subtract(1, sig, out=out)
        out *= g
        out += 1
        out *= sig
        out *= u
        out *= ct
        return out

    return silu_mul_grad


def make_acc_grad(node, shapes, out_shape, scratch, xp=np) -> Kernel:
    def acc_grad(ins, out):
        acc, g = ins
        acc += g
        return acc

    return acc_grad


def make_grad_norm(node, shapes, out_shape, scratch, xp=np, dot=None) -> Kernel:
    """sqrt of the sum of squares of every gradient (``dot(g, g)``, default ``xp.dot``),
    accumulated in their dtype; NaN when the loss (input 0) is not finite. Reads nothing back
    to the host (a device runs it in a graph)."""
    nan = scalar_type(node)(np.nan)
    total = scratch("norm", (), to_numpy_dtype(node.dtype))
    dot = dot or xp.dot

    def grad_norm(ins, out):
        loss, *grads = ins
        total.fill(0)
        for g in grads:
            flat = g.reshape(-1)
            xp.add(total, dot(flat, flat), out=total)
        xp.sqrt(total, out=out)
        out[...] = xp.where(xp.isfinite(loss), out, nan)
        return out

    return grad_norm


def _clip_scale(norm: float, max_norm: float) -> float:
    """The factor clipping the global gradient norm to ``max_norm`` (torch's rule)."""
    return min(1.0, max_norm / (norm + 1e-6)) if max_norm > 0 else 1.0


def make_adamw(node, shapes, out_shape, scratch) -> Kernel:
    """AdamW step ``t`` in place (decoupled weight decay, bias correction, as torch.optim.AdamW),
    then empty the accumulated gradient. ``t`` = 0: accumulate only; non-finite norm: skip.
    Works through the flat weight ``ADAMW_CHUNK`` values at a time: its ten passes then run
    in cache, and the temporary is one chunk, not a copy of the largest weight."""
    a = node.attrs
    b1, b2, eps, wd, max_norm = a["beta1"], a["beta2"], a["eps"], a["weight_decay"], a["max_norm"]
    size = math.prod(out_shape)
    whole = scratch("update", (min(size, ADAMW_CHUNK),), to_numpy_dtype(node.dtype))

    def adamw(ins, out):
        p, m, v, g, norm, lr, step = ins
        t = int(step)
        if t == 0:
            return p
        if np.isfinite(norm):
            lr, clip = float(lr), _clip_scale(float(norm), max_norm)
            bias2, step_size = 1 / math.sqrt(1 - b2**t), -lr / (1 - b1**t)
            flat = [x.reshape(-1) for x in (p, m, v, g)]
            for k in range(0, size, ADAMW_CHUNK):
                pc, mc, vc, gc = (x[k : k + ADAMW_CHUNK] for x in flat)
                tmp = whole[: len(pc)]
                if clip < 1:
                    gc *= clip
                mc *= b1
                np.multiply(gc, 1 - b1, out=tmp)
                mc += tmp
                vc *= b2
                np.multiply(gc, gc, out=tmp)
                np.multiply(tmp, 1 - b2, out=tmp)
                vc += tmp
                if wd:
                    pc *= 1 - lr * wd
                np.sqrt(vc, out=tmp)
                np.multiply(tmp, bias2, out=tmp)
                np.add(tmp, eps, out=tmp)
                np.divide(mc, tmp, out=tmp)
                np.multiply(tmp, step_size, out=tmp)
                pc += tmp
        g.fill(0)
        return p

    return adamw


def make_sgd(node, shapes, out_shape, scratch) -> Kernel:
    """SGD with momentum in place (torch.optim.SGD: coupled weight decay, no dampening), then
    empty the accumulated gradient. ``t`` = 0: accumulate only; non-finite norm: skip."""
    a = node.attrs
    mom, wd, max_norm = a["momentum"], a["weight_decay"], a["max_norm"]

    def sgd(ins, out):
        p, buf, g, norm, lr, step = ins
        if int(step) == 0:
            return p
        if np.isfinite(norm):
            clip = _clip_scale(float(norm), max_norm)
            if clip < 1:
                g *= clip
            if wd:
                g += wd * p
            buf *= mom
            buf += g
            p -= float(lr) * buf
        g.fill(0)
        return p

    return sgd


KERNELS: dict[Op, Callable[..., Kernel]] = {
    Op.EINSUM: make_einsum,
    Op.ADD: make_elementwise("add"),
    Op.MUL: make_elementwise("multiply"),
    Op.GATHER: make_gather,
    Op.RMS_NORM: make_rms_norm,
    Op.ROPE_TABLE: make_rope_table,
    Op.ROPE: make_rope,
    Op.SOFTMAX: make_softmax,
    Op.SILU_MUL: make_silu_mul,
    Op.RESHAPE: make_reshape,
    Op.AFTER: make_after,
    Op.KV_APPEND: make_kv_append,
    Op.SLICE_LAST: make_slice_last,
    Op.SPLIT: make_split,
    Op.TRANSPOSE: make_transpose,
    Op.CAST: make_cast,
    Op.DEQUANTIZE: make_dequantize,
    Op.FAKE_QUANT: make_fake_quant,
    Op.SCALE: make_scale,
    Op.DROPOUT: make_dropout,
    Op.EXPAND: make_expand,
    Op.SCATTER_ADD: make_scatter_add,
    Op.CROSS_ENTROPY: make_cross_entropy,
    Op.CROSS_ENTROPY_GRAD: make_cross_entropy_grad,
    Op.RMS_NORM_GRAD: make_rms_norm_grad,
    Op.SOFTMAX_GRAD: make_softmax_grad,
    Op.SILU_MUL_GRAD: make_silu_mul_grad,
    Op.ACC_GRAD: make_acc_grad,
    Op.GRAD_NORM: make_grad_norm,
    Op.ADAMW: make_adamw,
    Op.SGD: make_sgd,
    **MOE_KERNELS,
    **FLASH_KERNELS,
    Op.FLASH_ATTENTION: make_flash,
}


def make_kernel(
    node: Node, shapes: list[tuple[int, ...]], out_shape: tuple[int, ...], scratch: Scratch
) -> Kernel:
    """Build the kernel of one step for concrete input and output shapes."""
    return KERNELS[node.op](node, shapes, out_shape, scratch)
