"""Steps tagged ``upcast`` (compiler/passes/mixed_precision.py): arithmetic on 16-bit values
done in float32. NumPy's BLAS has no bf16 or f16 product, and float32 sums are what mixed
precision asks for, so the step's 16-bit inputs are copied into float32 blocks, the float32
kernel of the op runs on them, and its output is rounded once into the 16-bit buffer.

The blocks stay small: products convert block by block while laying their operands out for
matmul (runtime/upcast_matmul.py), the cross-entropy kernels convert a block of rows at a
time, ops that treat the leading axis row by row run in chunks of rows of at most
``BLOCK_BYTES`` of float32 (and the norm's weight gradient sums such chunks in float32), the
embedding gradient sums only the rows its tokens name. Any other op converts whole inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from einplan.compiler.attrs import MatmulRecipe
from einplan.compiler.dtypes import LOW_PRECISION
from einplan.compiler.ir import Node
from einplan.compiler.ops import Op
from einplan.runtime.kernels import (
    Kernel,
    Scratch,
    make_cross_entropy,
    make_cross_entropy_grad,
)
from einplan.runtime.upcast_matmul import make_upcast_matmul

F32 = np.dtype(np.float32)
BLOCK_BYTES = 1 << 18  # float32 bytes of one chunk of rows (at least one row)
# ops whose output row i (leading axis) depends only on row i of the inputs of its rank
ROW_WISE = frozenset(
    {
        Op.ADD,
        Op.MUL,
        Op.SCALE,
        Op.SIGMOID,
        Op.SILU_MUL,
        Op.SOFTMAX,
        Op.RMS_NORM,
        Op.SIGMOID_GRAD,
        Op.SILU_MUL_GRAD,
        Op.SOFTMAX_GRAD,
    }
)


def as_float32(n: Node) -> Node:
    """The node with a 16-bit float dtype replaced by float32 (other dtypes kept)."""
    return n.with_(dtype="f32") if n.dtype in LOW_PRECISION else n


def row_wise(n: Node) -> bool:
    """Whether a node's output rows (leading axis) can be computed chunk by chunk (the norm's
    weight gradient, a sum over rows, is summed chunk by chunk instead)."""
    return n.op in ROW_WISE or (n.op is Op.RMS_NORM_GRAD and n.attrs["wrt"] == "x")


def make_upcast(
    make: Callable[..., Kernel],
    node: Node,
    shapes: list[tuple[int, ...]],
    out_shape: tuple[int, ...],
    scratch: Scratch,
    inputs: list[Node],
) -> Kernel:
    """The kernel of a step tagged ``upcast``: ``make(node, shapes, out_shape, scratch,
    inputs)`` builds float32 kernels, which get float32 copies of the 16-bit inputs."""
    low = [x.dtype in LOW_PRECISION for x in inputs]
    twin = as_float32(node)
    recipe = node.attrs.get("recipe")
    if isinstance(recipe, MatmulRecipe) and all(low) and node.dtype in LOW_PRECISION:
        return make_upcast_matmul(recipe, shapes, out_shape, scratch)
    if node.op is Op.CROSS_ENTROPY:  # reads 16-bit logits a block at a time
        return make_cross_entropy(twin, shapes, out_shape, scratch, low=True)
    if node.op is Op.CROSS_ENTROPY_GRAD:
        return make_cross_entropy_grad(twin, shapes, out_shape, scratch, low=True)
    if node.op is Op.SCATTER_ADD:
        return make_upcast_scatter_add(shapes, out_shape, scratch)
    # chunks of rows: of the output (row-wise ops), or of input 0 summed into the output
    summed = node.op is Op.RMS_NORM_GRAD and node.attrs["wrt"] == "w"
    lead = shapes[0] if summed else out_shape
    rows = lead[0] if len(lead) > 1 and (summed or row_wise(node)) else 1
    chunk = min(rows, max(1, BLOCK_BYTES // (4 * math.prod(lead[1:])))) if rows > 1 else 1
    sliced = [
        rows > 1
        and len(s) >= 1
        and s[0] == rows
        and (len(s) == len(lead) or (node.op is Op.SOFTMAX and k == 1))
        for k, s in enumerate(shapes)
    ]
    chunked_out = rows > 1 and not summed
    total = scratch("upcast.sum", tuple(out_shape), F32) if summed and chunk < rows else None

    def part(n_rows: int) -> tuple[Kernel, list[np.ndarray | None], np.ndarray | None]:
        """A float32 kernel for ``n_rows`` rows (all of them when not chunked), with its
        input blocks (None: not 16-bit) and output block (None: a float32 output)."""
        ins = [(n_rows, *s[1:]) if sl else tuple(s) for s, sl in zip(shapes, sliced, strict=True)]
        out = (n_rows, *out_shape[1:]) if chunked_out else tuple(out_shape)
        kernel = make(twin, ins, out, scratch, [as_float32(x) for x in inputs])
        blocks = [
            scratch(f"upcast.{k}", s, F32) if lo else None
            for k, (s, lo) in enumerate(zip(ins, low, strict=True))
        ]
        result = scratch("upcast.out", out, F32) if node.dtype in LOW_PRECISION else None
        return kernel, blocks, result

    parts = {n: part(n) for n in {chunk, rows % chunk or chunk}}

    def upcast(ins, out):
        for r0 in range(0, rows, chunk):
            n = min(chunk, rows - r0)
            kernel, blocks, result = parts[n]
            args = []
            for x, block, sl in zip(ins, blocks, sliced, strict=True):
                x = x[r0 : r0 + n] if sl else x
                if block is not None:
                    np.copyto(block, x)
                    x = block
                args.append(x)
            if total is not None:  # a partial sum over these rows, added up in float32
                y = kernel(args, result)
                if r0:
                    np.add(total, y, out=total)
                else:
                    np.copyto(total, y)
                continue
            dest = out[r0 : r0 + n] if chunked_out else out
            if result is None:
                kernel(args, dest)
            else:
                np.copyto(dest, kernel(args, result), casting="unsafe")
        if total is not None:
            np.copyto(out, total, casting="unsafe")
        return out

    return upcast


def make_upcast_scatter_add(
    shapes: list[tuple[int, ...]], out_shape: tuple[int, ...], scratch: Scratch
) -> Kernel:
    """A 16-bit embedding gradient: the rows the ids name, summed in float32 in a block of
    at most one row per token (in the order numpy's kernel adds them), rounded into the zeroed
    output. A float32 block of the whole table (108 MiB for SmolLM2) would be mostly zeros."""
    width = out_shape[-1]
    tokens = math.prod(shapes[1])
    values32 = scratch("upcast.0", (tokens, width), F32)
    sums = scratch("upcast.out", (tokens, width), F32)

    def scatter_add(ins, out):
        values, ids = ins
        np.copyto(values32, values.reshape(tokens, width))
        rows, slot = np.unique(ids.reshape(-1), return_inverse=True)
        acc = sums[: len(rows)]
        acc.fill(0)
        np.add.at(acc, slot, values32)
        out.fill(0)
        out[rows] = acc
        return out

    return scatter_add
