"""flash_attention and its reverse op on the GPU, with the numpy kernels' semantics
(runtime/flash.py): softmax(scale * q k^T + mask) v, GQA query heads as rows of their KV head's
product.

A GPU of this size holds the whole (b, n, s*g, t) score matrix, so each step is three or four
batched cuBLAS products (blas.gemm, one call over every (batch, KV head)) around source.cu's
row kernels: ``flash_probs`` turns scores into probabilities and the row log-sum-exp,
``flash_dscores`` the probabilities' cotangent into the scores'. The forward step of a
differentiated graph (attr ``keep``) leaves its row log-sum-exp in a buffer of its own, from
which its reverse steps recompute the probabilities; the first reverse step of an attention to
run computes every gradient its siblings want into buffers of their group, the others copy
theirs. Every buffer is taken when the step is bound: a call allocates nothing (CUDA graphs).
"""

from __future__ import annotations

import numpy as np

from einplan.compiler.ir import Node
from einplan.compiler.ops import Op
from einplan.runtime.cuda import blas
from einplan.runtime.cuda.kernels import NULL, check_float32, contiguous, function, row_threads
from einplan.runtime.device import DeviceError, cupy_module
from einplan.runtime.kernels import Kernel

F32 = np.float32
# (forward node name, q shape, k shape) -> the row log-sum-exp its kept forward step wrote
# last (the binding bound last; a reverse step takes it when it is bound, right after)
KEPT: dict[tuple, object] = {}


def batched(x) -> tuple[int, int, int, int] | None:
    """(op, leading dimension, pointer offset in elements, batch stride) of the (B, N)
    matrices of a 4-D float32 ``x`` as cuBLAS reads them in one strided-batched call; None
    when the (B, N) pairs are not evenly spaced or a matrix is unreadable in place."""
    big, heads, r, c = x.shape
    s0, s1, s2, s3 = (s // x.itemsize for s in x.strides)
    if heads == 1:
        stride = s0
    elif big == 1 or s0 == heads * s1:
        stride = s1
    else:
        return None
    found = blas.matrix_layout(r, c, s2, s3)
    return None if found is None else (*found, stride)


def bmm(a, b, out) -> None:
    """``out = a @ b`` over the (B, N) matrices of 4-D float32 views ``a`` and ``b`` (each
    readable by :func:`batched`) into a C-contiguous ``out``."""
    ra, rb = batched(a), batched(b)
    if ra is None or rb is None or not out.flags.c_contiguous:
        raise DeviceError(f"flash_attention product over unreadable views {a.strides} {b.strides}")
    m, k = a.shape[-2:]
    n = b.shape[-1]
    blas.gemm(
        (ra[0], ra[1], a.data.ptr, ra[2]),
        (rb[0], rb[1], b.data.ptr, rb[2]),
        (out.data.ptr, n, m * n),
        m,
        n,
        k,
        a.shape[0] * a.shape[1],
    )


class Sizes:
    """Concrete sizes of one flash step and the scratch it works in."""

    def __init__(self, node: Node, shapes: list[tuple[int, ...]], scratch) -> None:
        check_float32(node)
        a = node.attrs
        self.b, self.s, self.n, self.g, self.h = shapes[0]
        self.bnth = a["layout"] == "bnth"
        self.t = shapes[1][2] if self.bnth else shapes[1][1]
        grad = "wrt" in a
        self.has_mask = len(shapes) == (6 if grad else 4)
        self.scale = F32(a.get("scale", 1.0))
        self.causal = np.int32(bool(a["causal"]))
        b, n, rows, t, h = self.b, self.n, self.s * self.g, self.t, self.h
        self.rows = b * n * rows
        self.q_t = scratch("flash_q", (b, n, rows, h), F32)
        self.k_t = scratch("flash_k", (b, n, t, h), F32)
        self.v_t = scratch("flash_v", (b, n, t, h), F32)
        self.scores = scratch("flash_scores", (b, n, rows, t), F32)
        self.probs_fn, self.threads = function("flash_probs"), row_threads(t)

    def heads_first(self, ins: list) -> tuple:
        """q as (b, n, s*g, h) and k, v as (b, n, t, h): q always copied, k and v only when
        cuBLAS cannot read them in place (keys by sequence; an uneven cache view)."""
        cp = cupy_module()
        q, k, v = ins[:3]
        b, s, n, g, h = q.shape
        cp.copyto(self.q_t.reshape(b, n, s, g, h), q.transpose(0, 2, 1, 3, 4))
        kv = []
        for x, buf in ((k, self.k_t), (v, self.v_t)):
            x = x if self.bnth else x.transpose(0, 2, 1, 3)
            if batched(x) is None:
                cp.copyto(buf, x)
                x = buf
            kv.append(x)
        return self.q_t, kv[0], kv[1]

    def probabilities(self, ins: list, lse, saved: bool):
        """The (b, n, s*g, t) probabilities in the scores buffer (``saved``: from the row
        log-sum-exp ``lse``, else writing it), and q, k, v heads first."""
        q_t, k_t, v_t = self.heads_first(ins)
        # (b, n, s*g, h) x (b, n, h, t) -> (b, n, s*g, t)
        bmm(q_t, k_t.swapaxes(-1, -2), self.scores)
        mask = contiguous(ins[3]) if self.has_mask else NULL
        args = (self.scores, mask, lse, np.int32(self.s), np.int32(self.g), np.int32(self.n))
        extra = (np.int32(self.t), self.scale, self.causal, np.int32(saved))
        self.probs_fn((self.rows,), self.threads, (*args, *extra))
        return q_t, k_t, v_t

    def to_input(self, x_t, wrt: str, out) -> None:
        """A heads-first gradient (b, n, rows, h) into ``out`` in input ``wrt``'s layout."""
        b, s, n, g, h = self.b, self.s, self.n, self.g, self.h
        if wrt == "q":
            src = x_t.reshape(b, n, s, g, h).transpose(0, 2, 1, 3, 4)
        else:
            src = x_t if self.bnth else x_t.transpose(0, 2, 1, 3)
        cupy_module().copyto(out, src)


def make_flash_attention(node, shapes, out_shape, scratch, inputs=()) -> Kernel:
    """softmax(scale * q k^T + mask) v through the whole score matrix (see the module doc)."""
    z = Sizes(node, shapes, scratch)
    out_t = scratch("flash_out", (z.b, z.n, z.s * z.g, z.h), F32)
    rows = (z.b, z.n, z.s * z.g)
    if node.attrs.get("keep"):  # read by the reverse steps after other steps ran: its own
        lse = cupy_module().empty(rows, F32)
        KEPT[(node.name, tuple(shapes[0]), tuple(shapes[1]))] = lse
    else:
        lse = scratch("flash_lse", rows, F32)

    def flash_attention(ins, out):
        _, _, v_t = z.probabilities(ins, lse, saved=False)
        # (b, n, s*g, t) x (b, n, t, h) -> (b, n, s*g, h)
        bmm(z.scores, v_t, out_t)
        z.to_input(out_t, "q", out)
        return out

    return flash_attention


class Siblings:
    """The reverse steps of one attention in one binding: the gradients the first of a run
    computes for all, and which of them are still to be taken."""

    def __init__(self, z: Sizes, wanted: str) -> None:
        cp = cupy_module()
        q_rows, kv_rows = (z.b, z.n, z.s * z.g, z.h), (z.b, z.n, z.t, z.h)
        self.grads = {w: cp.empty(q_rows if w == "q" else kv_rows, F32) for w in wanted}
        self.members: set[str] = set()
        self.left: set[str] = set()


GROUPS: dict[tuple, Siblings] = {}  # (forward name, q shape, k shape) -> the last bound group


def sibling_group(node: Node, z: Sizes, key: tuple) -> Siblings:
    """The group of this reverse step: the one its siblings bound just now, or a new one when
    that already has a step of this ``wrt`` (another binding)."""
    wrt = node.attrs["wrt"]
    group = GROUPS.get(key)
    if group is None or wrt in group.members:
        group = GROUPS[key] = Siblings(z, node.attrs["grads"])
    group.members.add(wrt)
    return group


def make_flash_attention_grad(node, shapes, out_shape, scratch, inputs=()) -> Kernel:
    """The gradient of input ``wrt``; the first reverse step of an attention to run computes
    every gradient in ``grads`` (probabilities again from the kept row log-sum-exp when the
    forward step is in this graph, else from a fresh one)."""
    z = Sizes(node, shapes, scratch)
    wrt, wanted = node.attrs["wrt"], node.attrs["grads"]
    fwd = inputs[-2] if len(inputs) == len(shapes) else None
    name = fwd.name if fwd is not None else node.name.rsplit(".grad", 1)[0]
    key = (name, tuple(shapes[0]), tuple(shapes[1]))
    kept = None
    if fwd is not None and fwd.op is Op.FLASH_ATTENTION and fwd.attrs.get("keep"):
        kept = KEPT.get(key)
    lse = kept if kept is not None else scratch("flash_lse", (z.b, z.n, z.s * z.g), F32)
    group = sibling_group(node, z, key)
    rows = (z.b, z.n, z.s * z.g, z.h)
    do_t, o_t = scratch("flash_do", rows, F32), scratch("flash_o", rows, F32)
    dscores = scratch("flash_dscores", z.scores.shape, F32)
    dscores_fn = function("flash_dscores")
    heads = (0, 2, 1, 3, 4)

    def compute(ins) -> None:
        cp = cupy_module()
        q_t, k_t, v_t = z.probabilities(ins, lse, saved=kept is not None)
        b, s, n, g, h = z.b, z.s, z.n, z.g, z.h
        cp.copyto(do_t.reshape(b, n, s, g, h), ins[-1].transpose(heads))
        cp.copyto(o_t.reshape(b, n, s, g, h), ins[-2].transpose(heads))
        p = z.scores
        if "v" in group.grads:
            # (b, n, t, s*g) x (b, n, s*g, h) -> (b, n, t, h)
            bmm(p.swapaxes(-1, -2), do_t, group.grads["v"])
        if "q" in group.grads or "k" in group.grads:
            # (b, n, s*g, h) x (b, n, h, t) -> (b, n, s*g, t)
            bmm(do_t, v_t.swapaxes(-1, -2), dscores)
            args = (p, dscores, do_t, o_t, np.int32(z.t), np.int32(h), z.scale)
            dscores_fn((z.rows,), z.threads, args)
        if "q" in group.grads:
            # (b, n, s*g, t) x (b, n, t, h) -> (b, n, s*g, h)
            bmm(dscores, k_t, group.grads["q"])
        if "k" in group.grads:
            # (b, n, t, s*g) x (b, n, s*g, h) -> (b, n, t, h)
            bmm(dscores.swapaxes(-1, -2), q_t, group.grads["k"])

    def flash_attention_grad(ins, out):
        if wrt not in group.left:
            compute(ins)
            group.left = set(wanted)
        group.left.discard(wrt)
        z.to_input(group.grads[wrt], wrt, out)
        return out

    return flash_attention_grad


FLASH_CUDA_KERNELS = {
    Op.FLASH_ATTENTION: make_flash_attention,
    Op.FLASH_ATTENTION_GRAD: make_flash_attention_grad,
}
