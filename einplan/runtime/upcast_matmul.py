"""A product of 16-bit operands on NumPy's float32 BLAS, in blocks.

Each block of the operands is converted to float32 while it is laid out for ``np.matmul``
(a copy the float32 kernel often makes anyway), multiplied, and its block of the result is
rounded into the 16-bit output. Blocks are cut along one axis, picked to keep the float32
scratch small: the batch axis of a batched product (attention); else the rows of A, the
columns of B, or the contracted axis (partial products summed in float32), whichever leaves
the smallest operand whole.
"""

from __future__ import annotations

import math

import numpy as np

from einplan.compiler.attrs import MatmulRecipe
from einplan.runtime.kernels import Kernel, Scratch

F32 = np.dtype(np.float32)
BLOCK_BYTES = 1 << 20  # float32 bytes of the largest operand block


def _groups(t: list[int], sizes: tuple[int, int, int]) -> tuple[int, ...]:
    """``t`` (a permuted shape) as matmul's ([batch,] rows, cols) by group sizes."""
    nb, n1, _ = sizes
    batch, rows, cols = math.prod(t[:nb]), math.prod(t[nb : nb + n1]), math.prod(t[nb + n1 :])
    return (batch, rows, cols) if nb else (rows, cols)


def pick_axis(r: MatmulRecipe, at: list[int], bt: list[int]) -> str:
    """The axis the blocks are cut along: ``batch``, ``rows``, ``cols`` or ``contracted``."""
    nb, na, nk, nn = r.groups
    if nb:
        return "batch"
    a = math.prod(at)
    b = math.prod(bt)
    c = math.prod(at[:na]) * math.prod(bt[nk:])
    whole = {"rows": b, "cols": a, "contracted": 2 * c}  # what stays unblocked
    if not na:
        del whole["rows"]
    if not nn:
        del whole["cols"]
    return min(whole, key=whole.__getitem__)


def make_upcast_matmul(
    r: MatmulRecipe,
    shapes: list[tuple[int, ...]],
    out_shape: tuple[int, ...],
    scratch: Scratch,
) -> Kernel:
    """The kernel of one product of 16-bit operands into a 16-bit output."""
    nb, na, nk, nn = r.groups
    a_shape = tuple(d for i, d in enumerate(shapes[0]) if i not in r.a_sum)
    b_shape = tuple(d for i, d in enumerate(shapes[1]) if i not in r.b_sum)
    at = [a_shape[p] for p in r.a_perm]
    bt = [b_shape[p] for p in r.b_perm]
    logical = at[: nb + na] + bt[nb + nk :]
    axis = pick_axis(r, at, bt)
    # the blocked axis in A's, B's and the logical output's permuted order (None: whole)
    a_ax, b_ax, c_ax = {
        "batch": (0, 0, 0),
        "rows": (nb, None, nb),
        "cols": (None, nb + nk, nb + na),
        "contracted": (nb + na, nb, None),
    }[axis]
    size = at[a_ax] if a_ax is not None else bt[b_ax]
    if size == 0 or not math.prod(at) or not math.prod(bt):
        size = 1
    blocked = [math.prod(at) if a_ax is not None else 0, math.prod(bt) if b_ax is not None else 0]
    per_index = 4 * max(max(blocked), math.prod(logical) if c_ax is not None else 0) / size
    step = max(1, min(size, int(BLOCK_BYTES // max(per_index, 1))))
    a_sum, b_sum, out_perm = tuple(r.a_sum), tuple(r.b_sum), r.out_perm
    a_groups, b_groups = (nb, na, nk), (nb, nk, nn)
    out_axis = out_perm.index(c_ax) if c_ax is not None else None

    def shape_of(t: list[int], ax: int | None, n: int) -> list[int]:
        return t if ax is None else [*t[:ax], n, *t[ax + 1 :]]

    def block(x: np.ndarray, t: list[int], ax: int | None, perm, i0, n, role, groups):
        """Rows i0..i0+n of axis ``ax`` of the permuted ``x`` (all of it: ax None) as a
        float32 ([batch,] rows, cols) block."""
        view = x.transpose(perm)
        if ax is not None:
            view = view[(slice(None),) * ax + (slice(i0, i0 + n),)]
        full = shape_of(t, ax, step if ax is not None else 0)
        buf = scratch(role, (math.prod(full),), F32)[: math.prod(view.shape)]
        buf = buf.reshape(view.shape)
        np.copyto(buf, view)
        return buf.reshape(_groups(list(view.shape), groups))

    for role, t, ax in (("mm.a", at, a_ax), ("mm.b", bt, b_ax)):  # the largest blocks
        scratch(role, (math.prod(shape_of(t, ax, step)),), F32)
    # float32 result blocks, rounded into the 16-bit output (or, blocked along the
    # contracted axis, the whole float32 sum and one partial product)
    c_full = scratch("mm.c", (math.prod(shape_of(logical, c_ax, step)),), F32)
    tmp = scratch("mm.t", (math.prod(logical),), F32) if c_ax is None else None
    c_groups = (nb, na, nn)

    def matmul(ins, out):
        a, b = ins
        if a_sum:
            a = a.sum(axis=a_sum, dtype=F32)
        if b_sum:
            b = b.sum(axis=b_sum, dtype=F32)
        a_whole = None if a_ax is not None else block(a, at, None, r.a_perm, 0, 0, "mm.a", a_groups)
        b_whole = None if b_ax is not None else block(b, bt, None, r.b_perm, 0, 0, "mm.b", b_groups)
        if c_ax is None:
            acc = c_full.reshape(_groups(logical, c_groups))
            acc.fill(0)
        for i0 in range(0, size, step):
            n = min(step, size - i0)
            a2 = (
                a_whole
                if a_whole is not None
                else block(a, at, a_ax, r.a_perm, i0, n, "mm.a", a_groups)
            )
            b2 = (
                b_whole
                if b_whole is not None
                else block(b, bt, b_ax, r.b_perm, i0, n, "mm.b", b_groups)
            )
            if c_ax is None:
                part = tmp.reshape(acc.shape)
                np.matmul(a2, b2, out=part)
                acc += part
                continue
            lshape = shape_of(logical, c_ax, n)
            c = c_full[: math.prod(lshape)].reshape(_groups(lshape, c_groups))
            np.matmul(a2, b2, out=c)
            dest = out[(slice(None),) * out_axis + (slice(i0, i0 + n),)]
            np.copyto(dest, c.reshape(lshape).transpose(out_perm), casting="unsafe")
        if c_ax is None:
            np.copyto(out, acc.reshape(logical).transpose(out_perm), casting="unsafe")
        return out

    return matmul
