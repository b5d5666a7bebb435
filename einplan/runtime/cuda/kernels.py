"""The cuda device's own kernels: fused CUDA kernels (source.cu) where one pass replaces a
chain of NumPy passes, and kernels that read every per-run scalar (cache slot, step, learning
rate) from device memory, so that a captured CUDA graph replays them with new values.

The other ops run runtime/kernels.py's factories with ``xp=cupy`` (runtime/cuda/backend.py).
The fused kernels compute in float32; a plan of another compute dtype is refused by name.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np

from einplan.compiler.attrs import QMatmulRecipe, UnaryRecipe
from einplan.compiler.dtypes import to_numpy_dtype
from einplan.compiler.ir import Node
from einplan.compiler.ops import Op
from einplan.runtime.device import DeviceError, cupy_module
from einplan.runtime.kernels import Kernel, scalar_type

SOURCE = Path(__file__).with_name("source.cu")
THREADS = 256  # threads per block of the elementwise kernels and at most per row
MAX_BLOCKS = 8192  # grid-stride loops cover larger arrays
NULL = np.uint64(0)  # a null pointer argument (no mask)


@functools.cache
def function(name: str):
    """A kernel of source.cu (the module is compiled by NVRTC on first use, then cached)."""
    return compiled_module().get_function(name)


@functools.cache
def compiled_module():
    """source.cu compiled for this process's GPU."""
    return cupy_module().RawModule(code=SOURCE.read_text(), options=("-std=c++17",))


def check_float32(node: Node) -> None:
    """Refuse a step whose dtype the fused kernels do not compute in."""
    if to_numpy_dtype(node.dtype) != np.float32:
        raise DeviceError(
            f"step {node.name} computes in {node.dtype}; the cuda kernels compute in float32: "
            "compile the plan with compute dtype f32 (weights may stay f16), or run on the cpu"
        )


def grid(n: int) -> tuple[int]:
    """Blocks of THREADS for an elementwise kernel over ``n`` elements."""
    return (max(1, min(MAX_BLOCKS, -(-n // THREADS))),)


def row_threads(width: int) -> tuple[int]:
    """Threads of a one-block-per-row kernel: a whole number of warps, at most THREADS."""
    return (min(THREADS, 32 * max(1, -(-width // 32))),)


def contiguous(a):
    """``a`` as a C-contiguous array (copied only when it is a strided view)."""
    if a.flags.c_contiguous:
        return a
    xp = np if isinstance(a, np.ndarray) else cupy_module()
    return xp.ascontiguousarray(a)


def strided_rows(x, lead: int) -> tuple[object, int]:
    """``x`` and the elements between consecutive index tuples of its first ``lead`` axes,
    when those collapse into one axis and the rest of each is one contiguous block (a view of
    part of a fused product's rows); else a contiguous copy and the block's size."""
    block = math.prod(x.shape[lead:])
    expect = x.itemsize
    compact = True
    for n, s in zip(reversed(x.shape[lead:]), reversed(x.strides[lead:]), strict=True):
        compact = compact and (n == 1 or s == expect)
        expect *= n
    outer = [(n, s) for n, s in zip(x.shape[:lead], x.strides[:lead], strict=True) if n > 1]
    if compact and not outer:
        return x, block
    pairs = zip(outer, outer[1:], strict=False)
    if compact and all(s == s_in * n_in for (_, s), (n_in, s_in) in pairs):
        step = outer[-1][1]
        if step % x.itemsize == 0 and step >= block * x.itemsize:
            return x, step // x.itemsize
    return contiguous(x), block


@functools.cache
def sum_squares_kernel():
    """A one-launch reduction ``sum(x * x)`` (CuPy's ``dot`` is cuBLAS, which CuPy will not
    call while a graph is captured)."""
    return cupy_module().ReductionKernel(
        "T x", "T y", "x * x", "a + b", "y = a", "0", "einplan_sum_squares"
    )


def sum_squares(a, b):
    """``dot(a, a)`` of a flat array (``b`` is ``a``: the grad_norm kernel's ``dot``)."""
    return sum_squares_kernel()(a)


def make_rms_norm(node, shapes, out_shape, scratch, inputs=()) -> Kernel:
    """x / sqrt(mean(x^2) + eps) * w in one pass per row."""
    check_float32(node)
    d, rows = out_shape[-1], math.prod(out_shape[:-1])
    eps, inv_d = scalar_type(node)(node.attrs["eps"]), np.float32(1.0 / d)
    fn, threads = function("rms_norm"), row_threads(d)

    def rms_norm(ins, out):
        x, w = ins
        fn((rows,), threads, (contiguous(x), contiguous(w), out, np.int32(d), inv_d, eps))
        return out

    return rms_norm


def make_rope(node, shapes, out_shape, scratch, inputs=()) -> Kernel:
    """The rotary embedding (or its inverse) of (batch, seq, heads..., head_dim) in one pass."""
    check_float32(node)
    x_shape = shapes[0]
    half = x_shape[-1] // 2
    heads = math.prod(x_shape[2:-1])
    pairs = x_shape[0] * x_shape[1]
    n = math.prod(x_shape[:-1]) * half
    sign = np.float32(-1 if node.attrs.get("inverse") else 1)
    scale = np.float32(node.attrs.get("scale", 1.0))
    fn = function("rope")

    def rope(ins, out):
        x, table = ins
        x, xs = strided_rows(x, 2)
        args = (x, contiguous(table), out, np.int64(n), np.int32(half), np.int32(heads))
        fn(grid(n), (THREADS,), (*args, np.int64(pairs), sign, scale, np.int64(xs)))
        return out

    return rope


def make_softmax(node, shapes, out_shape, scratch, inputs=()) -> Kernel:
    """softmax(scale * x + mask) over the last axis, causal or not, one block per row."""
    check_float32(node)
    if len(out_shape) >= 2:
        q, k, batch, heads = out_shape[-2], out_shape[-1], out_shape[0], math.prod(out_shape[1:-2])
    else:
        q, k, batch, heads = 1, out_shape[-1], 1, 1
    rows = batch * heads * q
    scale = np.float32(node.attrs.get("scale", 1.0))
    causal = np.int32(bool(node.attrs.get("causal")))
    fn, threads = function("softmax"), row_threads(k)
    has_mask = len(shapes) == 2

    def softmax(ins, out):
        mask = contiguous(ins[1]) if has_mask else NULL
        args = (contiguous(ins[0]), mask, out, np.int32(q), np.int32(k), np.int32(heads))
        fn((rows,), threads, (*args, scale, causal))
        return out

    return softmax


def make_silu_mul(node, shapes, out_shape, scratch, inputs=()) -> Kernel:
    """silu(gate) * up in one pass."""
    check_float32(node)
    n, width = math.prod(out_shape), out_shape[-1]
    lead = len(out_shape) - 1
    fn = function("silu_mul")

    def silu_mul(ins, out):
        (g, gs), (u, us) = strided_rows(ins[0], lead), strided_rows(ins[1], lead)
        args = (g, u, out, np.int64(n), np.int32(width), np.int64(gs), np.int64(us))
        fn(grid(n), (THREADS,), args)
        return out

    return silu_mul


def make_kv_append(node, shapes, out_shape, scratch, inputs=()) -> Kernel:
    """Keys or values (b, s, n, h) into the cache (b, n, ctx, h) at the slot held on the device
    (the runner checks the slot against the cache on the host, before the run)."""
    check_float32(node)
    (_, n, ctx, h), s, kv = shapes[0], shapes[1][1], out_shape[2]
    total = math.prod(shapes[1])
    fn = function("kv_append")

    def kv_append(ins, out):
        cache, new, pos = ins
        new, fs = strided_rows(new, 2)
        args = (cache, new, pos, np.int64(total), np.int32(s), np.int32(n), np.int32(h))
        fn(grid(total), (THREADS,), (*args, np.int64(ctx), np.int64(fs)))
        return cache[:, :, :kv]

    return kv_append


def make_cross_entropy(node, shapes, out_shape, scratch, inputs=()) -> Kernel:
    """Mean over non-ignored rows of logsumexp(logits) - logits[target]: one block per row,
    then two reductions."""
    check_float32(node)
    cp = cupy_module()
    vocab, rows = shapes[0][-1], math.prod(shapes[0][:-1])
    ignore = np.int64(node.attrs["ignore_index"])
    per_row = scratch("ce_rows", (rows,), np.float32)
    count = scratch("ce_count", (), np.int64)
    fn, threads = function("cross_entropy_rows"), row_threads(vocab)

    def cross_entropy(ins, out):
        logits, targets = contiguous(ins[0]), contiguous(ins[1])
        fn((rows,), threads, (logits, targets, per_row, np.int32(vocab), ignore))
        cp.sum(targets != ignore, out=count)
        cp.divide(per_row.sum(), cp.maximum(count, 1).astype(np.float32), out=out)
        return out

    return cross_entropy


def make_cross_entropy_grad(node, shapes, out_shape, scratch, inputs=()) -> Kernel:
    """(softmax(logits) - onehot(target)) * ct / count, zero on ignored rows."""
    check_float32(node)
    cp = cupy_module()
    vocab, rows = shapes[0][-1], math.prod(shapes[0][:-1])
    ignore = np.int64(node.attrs["ignore_index"])
    count = scratch("ce_count", (), np.int64)
    fn, threads = function("cross_entropy_grad"), row_threads(vocab)

    def cross_entropy_grad(ins, out):
        logits, targets = contiguous(ins[0]), contiguous(ins[1])
        cp.sum(targets != ignore, out=count)
        args = (logits, targets, contiguous(ins[2]), count, out, np.int32(vocab), ignore)
        fn((rows,), threads, args)
        return out

    return cross_entropy_grad


def make_adamw(node, shapes, out_shape, scratch, inputs=()) -> Kernel:
    """AdamW in place in one pass over each parameter (runtime/kernels.make_adamw's rule)."""
    check_float32(node)
    a = node.attrs
    consts = [np.float32(a[k]) for k in ("beta1", "beta2", "eps", "weight_decay", "max_norm")]
    n = math.prod(out_shape)
    fn = function("adamw")

    def adamw(ins, out):
        p, m, v, g, norm, lr, step = ins
        fn(grid(n), (THREADS,), (p, m, v, g, norm, lr, step, np.int64(n), *consts))
        return p

    return adamw


def make_sgd(node, shapes, out_shape, scratch, inputs=()) -> Kernel:
    """SGD with momentum in place in one pass (runtime/kernels.make_sgd's rule)."""
    check_float32(node)
    a = node.attrs
    consts = [np.float32(a[k]) for k in ("momentum", "weight_decay", "max_norm")]
    n = math.prod(out_shape)
    fn = function("sgd")

    def sgd(ins, out):
        p, buf, g, norm, lr, step = ins
        fn(grid(n), (THREADS,), (p, buf, g, norm, lr, step, np.int64(n), *consts))
        return p

    return sgd


def make_softmax_grad(node, shapes, out_shape, scratch, inputs=()) -> Kernel:
    """scale * y * (ct - sum(ct * y)) in one pass per row."""
    check_float32(node)
    k, rows = out_shape[-1], math.prod(out_shape[:-1])
    scale = np.float32(node.attrs.get("scale", 1.0))
    fn, threads = function("softmax_grad"), row_threads(k)

    def softmax_grad(ins, out):
        y, ct = ins
        fn((rows,), threads, (contiguous(y), contiguous(ct), out, np.int32(k), scale))
        return out

    return softmax_grad


def make_silu_mul_grad(node, shapes, out_shape, scratch, inputs=()) -> Kernel:
    """The gradient of silu(gate) * up for gate or up in one pass (views read in place)."""
    check_float32(node)
    n, width = math.prod(out_shape), out_shape[-1]
    lead = len(out_shape) - 1
    wrt_up = np.int32(node.attrs["wrt"] == "up")
    fn = function("silu_mul_grad")

    def silu_mul_grad(ins, out):
        (g, gs), (u, us), (ct, cs) = (strided_rows(a, lead) for a in ins)
        strides = (np.int64(gs), np.int64(us), np.int64(cs))
        fn(grid(n), (THREADS,), (g, u, ct, out, np.int64(n), np.int32(width), *strides, wrt_up))
        return out

    return silu_mul_grad


RMS_CHUNK = 64  # rows per partial sum of the weight's gradient


def make_rms_norm_grad(node, shapes, out_shape, scratch, inputs=()) -> Kernel:
    """The gradient of rms_norm for x (one pass per row) or for w (per-row inverse norms,
    then partial column sums over chunks of rows, then their sum)."""
    check_float32(node)
    d, rows = shapes[0][-1], math.prod(shapes[0][:-1])
    eps, inv_d = np.float32(node.attrs["eps"]), np.float32(1.0 / d)
    threads = row_threads(d)
    if node.attrs["wrt"] != "w":
        fn = function("rms_norm_grad_x")

        def rms_norm_grad_x(ins, out):
            x, w, ct = (contiguous(a) for a in ins)
            fn((rows,), threads, (x, w, ct, out, np.int32(d), inv_d, eps))
            return out

        return rms_norm_grad_x
    chunks = -(-rows // RMS_CHUNK)
    inverse = scratch("rms_inverse", (rows,), np.float32)
    partial = scratch("rms_partial", (chunks, d), np.float32)
    inverse_fn, partial_fn = function("rms_inverse"), function("rms_norm_grad_w")
    cp = cupy_module()

    def rms_norm_grad_w(ins, out):
        x, _, ct = (contiguous(a) for a in ins)
        inverse_fn((rows,), threads, (x, inverse, np.int32(d), inv_d, eps))
        blocks = (-(-d // THREADS), chunks)
        args = (x, ct, inverse, partial, np.int64(rows), np.int32(d), np.int32(RMS_CHUNK))
        partial_fn(blocks, (THREADS,), args)
        cp.sum(partial, axis=0, out=out)
        return out

    return rms_norm_grad_w


def make_einsum(node, shapes, out_shape, scratch, inputs=()) -> Kernel | None:
    """A product through cuBLAS over its operands in place (runtime/cuda/strided.py), or, when
    a layout does not allow that, runtime/kernels.py's recipe (copies, then one GEMM);
    None for a quantised product (no cuda kernel)."""
    from einplan.runtime import kernels as numpy_kernels
    from einplan.runtime.cuda import blas, strided

    r = node.attrs["recipe"]
    if isinstance(r, QMatmulRecipe) or any(i.op is Op.DEQUANTIZE for i in inputs):
        return None
    cp = cupy_module()
    generic = numpy_kernels.make_einsum(node, shapes, out_shape, scratch, xp=cp, matmul=blas.matmul)
    if isinstance(r, UnaryRecipe) or r.a_sum or r.b_sum:
        return generic
    check_float32(node)
    in_order = tuple(int(i) for i in np.argsort(r.out_perm))
    plans: dict[tuple, strided.GemmPlan | None] = {}

    def einsum(ins, out):
        a = ins[0].transpose(r.a_perm)
        b = ins[1].transpose(r.b_perm)
        c = out.transpose(in_order)
        key = (a.strides, b.strides, c.strides)
        if key not in plans:
            views = [(x.shape, x.strides) for x in (a, b, c)]
            plans[key] = strided.plan_gemms(*views, r.groups)
        p = plans[key]
        if p is None:
            return generic(ins, out)
        sa, sb, sc = p.strides
        pa, pb, pc = a.data.ptr, b.data.ptr, c.data.ptr
        if p.swap:
            pa, pb = pb, pa
        for oa, ob, oc in p.offsets:
            for i, (ka, kb) in enumerate(p.k_offsets):
                blas.gemm(
                    (*p.a, pa + 4 * (oa + ka), sa),
                    (*p.b, pb + 4 * (ob + kb), sb),
                    (pc + 4 * oc, p.ldc, sc),
                    p.m,
                    p.n,
                    p.k,
                    p.batch,
                    accumulate=i > 0,
                )
        return out

    return einsum
