"""Contractions read in place: a plan's product whose operands are permuted views (attention's
heads and groups, GQA's shared keys) becomes a few strided-batched cuBLAS calls over the
views instead of copying each permuted operand first (on the CPU the recipe copies: 600 MB
of attention probabilities per layer of a 16x1024 training step).

A product is (batch..., M...) x (batch..., K...) -> (batch..., M..., N...). Each of M, K and N
must read as one strided axis of its matrices; an M (or N) group that does not is cut to its
largest axis and the rest become batch axes (the other operand repeats along them: stride 0).
The largest batch axis is cuBLAS's batch; the other batch axes are a loop of calls, with
offsets worked out once per layout. A K group that is not one axis is summed by calls that
add into the output (GQA's gradients of keys and values sum over the query groups). Pure
index arithmetic: tested on the CPU with NumPy.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from einplan.runtime.cuda.blas import matrix_layout

MAX_CALLS = 64  # more calls than this: copy the operands instead (one GEMM)


@dataclass(frozen=True)
class GemmPlan:
    """Calls of one product: the matrices' sizes and layouts, cuBLAS's batch, the offsets."""

    m: int
    n: int
    k: int
    a: tuple[int, int]  # (op, leading dimension)
    b: tuple[int, int]
    ldc: int
    batch: int
    strides: tuple[int, int, int]  # batch strides of A, B, C (elements)
    offsets: tuple[tuple[int, int, int], ...]  # per output block: offsets of A, B, C
    k_offsets: tuple[tuple[int, int], ...] = ((0, 0),)  # per partial sum: offsets of A, B
    swap: bool = False  # computes C^T = B^T A^T: the plan's A is the product's B, and back


def collapse(dims: list[tuple[int, ...]]) -> tuple[int, ...] | None:
    """Axes ``(size, stride in operand 1, stride in operand 2)`` as one axis of their total
    size, when each operand steps through them evenly; else None."""
    dims = [d for d in dims if d[0] > 1]
    if not dims:
        return (1, 0, 0)
    for outer, inner in zip(dims, dims[1:], strict=False):
        if any(outer[j] != inner[j] * inner[0] for j in (1, 2)):
            return None
    return (math.prod(d[0] for d in dims), *dims[-1][1:])


def split_free(dims: list[tuple[int, int, int]], side: int):
    """The matrix axis of a free group (M with side 0, N with side 1) and the axes moved to
    the batch, as (size, stride in A, in B, in C) with stride 0 in the operand without them."""
    whole = collapse(dims)
    if whole is not None:
        return whole, []
    keep = max(range(len(dims)), key=lambda i: dims[i][0])
    moved = []
    for i, (size, s_own, s_c) in enumerate(dims):
        if i != keep:
            moved.append((size, s_own, 0, s_c) if side == 0 else (size, 0, s_own, s_c))
    return dims[keep], moved


def plan_gemms(a, b, c, groups, itemsize: int = 4) -> GemmPlan | None:
    """The cuBLAS calls of ``C = A B`` over the views ``a``, ``b``, ``c``, each given as
    ``(shape, strides in bytes)`` in the recipe's logical order (batch, M, K), (batch, K, N),
    (batch, M, N) with ``groups`` = (batch, M, K, N) axis counts; None when some operand cannot
    be read in place within MAX_CALLS calls."""
    nb, na, nk, nn = groups
    (ash, ast), (bsh, bst), (_, cst) = a, b, c
    if any(s % itemsize for s in (*ast, *bst, *cst)):
        return None
    sa, sb, sc = ([s // itemsize for s in st] for st in (ast, bst, cst))
    batch = [(ash[i], sa[i], sb[i], sc[i]) for i in range(nb)]
    m_dims = [(ash[nb + i], sa[nb + i], sc[nb + i]) for i in range(na)]
    k_dims = [(ash[nb + na + i], sa[nb + na + i], sb[nb + i]) for i in range(nk)]
    n_dims = [(bsh[nb + nk + i], sb[nb + nk + i], sc[nb + na + i]) for i in range(nn)]
    kk = collapse(k_dims)
    k_loop = []
    if kk is None:  # keep K's largest axis; sum over the others call by call
        keep = max(range(nk), key=lambda i: k_dims[i][0])
        kk = k_dims[keep]
        k_loop = [d for i, d in enumerate(k_dims) if i != keep and d[0] > 1]
    (m, ra, rc), moved_m = split_free(m_dims, 0)
    (n, nb_, nc), moved_n = split_free(n_dims, 1)
    k, ka, kb = kk
    dims = [d for d in batch + moved_m + moved_n if d[0] > 1]
    swap = False
    if (nc == 1 or n == 1) and (rc >= n or m == 1):  # C row-major
        la, lb, ldc = matrix_layout(m, k, ra, ka), matrix_layout(k, n, kb, nb_), rc
    elif (rc == 1 or m == 1) and (nc >= m or n == 1):  # C^T row-major: C^T = B^T A^T
        la, lb, ldc = matrix_layout(n, k, nb_, kb), matrix_layout(k, m, ka, ra), nc
        m, n = n, m
        dims = [(d[0], d[2], d[1], d[3]) for d in dims]
        k_loop = [(d[0], d[2], d[1]) for d in k_loop]
        swap = True
    else:
        return None
    if la is None or lb is None:
        return None
    ldc = ldc if m > 1 else n
    inner = max(dims, key=lambda d: d[0]) if dims else (1, 0, 0, 0)
    outer = [d for d in dims if d is not inner]
    if math.prod(d[0] for d in outer + k_loop) > MAX_CALLS:
        return None
    k_offsets = tuple(
        tuple(sum(i * d[j] for i, d in zip(index, k_loop, strict=True)) for j in (1, 2))
        for index in itertools.product(*(range(d[0]) for d in k_loop))
    )
    offsets = tuple(
        tuple(sum(i * d[j] for i, d in zip(index, outer, strict=True)) for j in (1, 2, 3))
        for index in itertools.product(*(range(d[0]) for d in outer))
    )
    return GemmPlan(m, n, k, la, lb, ldc, inner[0], inner[1:], offsets, k_offsets, swap)
