"""Kernels of flash attention and its reverse op.

softmax(scale * q k^T + mask) v is computed one query block at a time: each block of rows
multiplies only the key tiles some row of it can see (causal tiles above the diagonal are never
computed), keeps a running row maximum and sum (the online softmax) and rescales its partial
product when a later tile raises the maximum, so no (queries x keys) score matrix exists beyond
one tile. The g query heads that share a KV head are rows of the same product (GQA reads each
key once, never repeated). The row log-sum-exp is all the reverse step needs besides q, k, v,
the output and its cotangent: it recomputes each tile's probabilities from it.

Tiles of an additive mask that hide every key of the tile (prefill's causal part, unwritten
cache slots) are skipped too, unless some row of the block sees no key at all: that row then
averages every key, as the plain softmax does.

The work is cut into jobs of one (batch row, KV head, query block), so that a tile stays in a
core's L2 cache, and the jobs are shared between this thread and a helper (numpy and BLAS
release the GIL), each job's small products on one BLAS thread: two BLAS threads per product
spin-wait for each other, which on a busy machine made every tile's product ten times slower.
A step of few score entries runs on this thread alone (compiler/passes/flash.py says when).
How q, k and v carry an extra column so that the products subtract the running maximum and
sum the rows: :class:`Layout`.
"""

from __future__ import annotations

import itertools
import threading

import numpy as np

from einplan.compiler.dtypes import to_numpy_dtype
from einplan.compiler.ir import Node
from einplan.compiler.ops import Op
from einplan.compiler.passes.flash import Block, block_entries, flash_workers, plan_tiles
from einplan.runtime.blas import blas_controller
from einplan.runtime.moe import buffer_key
from einplan.runtime.qmatmul import THREADS, Helper

HIDDEN = np.finfo(np.float32).min  # a mask entry at or below this hides its key
# forward flash_attention node name -> (buffer key of q, k, v, out; row log-sum-exp; run number)
# of its last run, for its reverse steps (attr ``keep``, set on graphs that are differentiated)
LSE: dict[str, tuple[tuple, np.ndarray, int]] = {}
# buffer key of a reverse step's inputs -> (the forward run they came from, the gradients its
# sibling steps have still to take): an entry a failed run left behind is never taken
GRADS: dict[tuple, tuple[int | None, dict[str, np.ndarray]]] = {}
_GRADS_LOCK = threading.Lock()
_RUNS = itertools.count()
HELPER = Helper()  # runs the second share of the query blocks
_HELPER_LOCK = threading.Lock()  # one step at a time hands it work (executor thread pools)

Job = tuple[int, int, int]  # batch row, KV head, block index

# a tile whose rows' sums of exp(score - running max) stay below this was computed against a
# running max close enough to its own (no exp can have overflowed); one above it is done again
# after raising the max
SUM_LIMIT = 2.0**64


def exp_rows(s: np.ndarray, shift: np.ndarray | None = None) -> None:
    """``s = exp(s - shift[:, None])`` in place, NumPy's SIMD exp (the numba backend passes
    its compiled one: runtime/backends/numba_exp.py)."""
    if shift is not None:
        s -= shift[:, None]
    np.exp(s, out=s)


def share_jobs(jobs: list[Job], blocks: list[Block], workers: int) -> list[list[Job]]:
    """The jobs each worker computes: largest first to the least loaded, by the score entries
    of their tiles (causal blocks near the end see more keys)."""
    shares: list[list[Job]] = [[] for _ in range(max(1, min(workers, len(jobs))))]
    load = [0] * len(shares)

    def work(job: Job) -> int:
        return block_entries(blocks[job[2]])

    for job in sorted(jobs, key=work, reverse=True):
        w = load.index(min(load))
        shares[w].append(job)
        load[w] += work(job)
    return shares


def on_workers(lay: Layout, job) -> None:
    """Run ``job(worker, jobs)`` for each worker's share, the second on the helper thread,
    every product on one BLAS thread."""
    with blas_controller().limit(limits=1, user_api="blas"):
        if len(lay.shares) == 1:
            job(0, lay.shares[0])
            return
        with _HELPER_LOCK:
            HELPER.start(lambda: job(1, lay.shares[1]))
            try:
                job(0, lay.shares[0])
            finally:
                HELPER.wait()


class Layout:
    """Concrete sizes of one step, its jobs and the scratch it multiplies in.

    q, k and v are copied heads-first with one extra column, so that a product adds a
    per-row or per-key constant for free: (scale q | -c) x (k | 1)^T is scale q k^T - c, the
    scores already less the row's running maximum (or log-sum-exp), and p x (v | 1) is p v
    with the row sums of p in its last column. Each job is one (batch row, KV head, query
    block), so a tile is (block rows x g, keys) and stays in the core's L2 cache."""

    def __init__(
        self, node: Node, shapes: list[tuple[int, ...]], scratch, roles: tuple[str, ...], exp
    ) -> None:
        a = node.attrs
        self.exp_rows = exp
        self.b, self.s, self.n, self.g, self.h = shapes[0]
        self.bnth = a["layout"] == "bnth"
        self.t = shapes[1][2] if self.bnth else shapes[1][1]
        self.has_mask = len(shapes) in (4, 6)  # forward: q k v [mask]; reverse: + out, ct
        # bf16/f16 values are multiplied and summed in float32 (issue #14: float32 accumulation
        # in every reduction and softmax)
        self.dtype = to_numpy_dtype("f64" if node.dtype == "f64" else "f32")
        self.scale = self.dtype.type(a.get("scale", 1.0))
        self.blocks = plan_tiles(
            self.s, self.t, a["causal"], a["block_q"], a["block_k"], a["min_tiled"]
        )
        self.off = self.t - self.s
        self.causal = bool(a["causal"])
        b, n, h, g = self.b, self.n, self.h, self.g
        jobs = [(bi, hd, k) for bi in range(b) for hd in range(n) for k in range(len(self.blocks))]
        self.shares = share_jobs(jobs, self.blocks, flash_workers(self.blocks, b * n, g, THREADS))
        self.rows = max(i1 - i0 for i0, i1, _ in self.blocks) * g
        self.width = max(j1 - j0 for *_, tiles in self.blocks for j0, j1, _ in tiles)
        self.scratch = scratch
        for role in roles:  # asked for now, so the binding counts them in its scratch bytes
            for worker in range(len(self.shares)):
                self.tile(role, worker, self.rows)
        self.q_t = scratch("flash_q", (b, n, self.s * g, h + 1), self.dtype)
        self.k_t = scratch("flash_k", (b, n, self.t, h + 1), self.dtype)
        self.v_t = scratch("flash_v", (b, n, self.t, h + 1), self.dtype)

    def tile(self, role: str, worker: int, rows: int, width: int | None = None) -> np.ndarray:
        """A (rows, width) view of one worker's scratch tile: scores ("s", "ds") up to the
        widest tile, sums ("acc", "part") of h+1 columns (``width`` None: all of them)."""
        cols = self.h + 1 if role in ("acc", "part") else self.width
        flat = self.scratch(f"flash_{role}{worker}", (self.rows * cols,), self.dtype)
        return flat[: rows * (width or cols)].reshape(rows, width or cols)

    def heads_first(self, q: np.ndarray, k: np.ndarray, v: np.ndarray):
        """scale q as (b, n, s*g, h+1), last column 0, and k, v as (b, n, t, h+1), last
        column 1."""
        b, s, n, g, h = q.shape
        np.multiply(
            q.transpose(0, 2, 1, 3, 4),
            self.scale,
            out=self.q_t.reshape(b, n, s, g, h + 1)[..., :h],
            dtype=self.dtype,
        )
        self.q_t[..., h] = 0
        perm = (0, 1, 2, 3) if self.bnth else (0, 2, 1, 3)
        for src, dst in ((k, self.k_t), (v, self.v_t)):
            np.copyto(dst[..., :h], src.transpose(perm))
            dst[..., h] = 1
        return self.q_t, self.k_t, self.v_t

    def skippable(self, mask: np.ndarray | None) -> np.ndarray:
        """(b, blocks): whether a block's fully hidden mask tiles may be skipped (every row of
        it sees some key; with causal masking too, never)."""
        skip = np.zeros((self.b, len(self.blocks)), bool)
        if mask is None or self.causal:
            return skip
        sees = (mask > HIDDEN).any(axis=-1)  # (b, s)
        for k, (i0, i1, _) in enumerate(self.blocks):
            skip[:, k] = sees[:, i0:i1].all(axis=-1)
        return skip

    def scores(self, worker, job, q_blk, mask, skip, j0, j1, diag) -> np.ndarray | None:
        """scale q k^T - c (c: the last column of ``q_blk`` negated) of one tile, + the mask,
        causal -inf; None when the mask hides it (and the block may ``skip`` such tiles)."""
        bi, hd, k = job
        i0, i1, _ = self.blocks[k]
        m = None
        if mask is not None:
            m = mask[bi, i0:i1, j0:j1]
            if skip and m.max() <= HIDDEN:
                return None
        s = self.tile("s", worker, q_blk.shape[0], j1 - j0)
        # (rows, h+1) x (h+1, keys) -> (rows, keys)
        np.matmul(q_blk, self.k_t[bi, hd, j0:j1].T, out=s)
        s3 = s.reshape(i1 - i0, self.g, j1 - j0)
        if m is not None:
            s3 += m[:, None, :]
        if diag:
            after = np.arange(j0, j1)[None, :] > np.arange(i0, i1)[:, None] + self.off
            np.copyto(s3, -np.inf, where=after[:, None, :])
        return s


def _attend(lay: Layout, mask, out, lse) -> None:
    """Online softmax over each block's key tiles: out (b, s, n, g, h) the normalised context
    (None: only the statistics), lse (b, n, s*g) the row log-sum-exp; q, k, v already in
    ``lay``'s heads-first copies."""
    skips = lay.skippable(mask)

    def run(worker: int, share: list[Job]) -> None:
        for job in share:
            _attend_block(lay, worker, job, skips[job[0], job[2]], mask, out, lse)

    on_workers(lay, run)


def _attend_block(lay: Layout, worker, job, skip, mask, out, lse) -> None:
    """One job's rows. Without a mask the running maximum m rides in q's last column, so a
    tile past the first is one product, one exp and one product (it is done again as an
    exact tile only when its sums say m was far below its scores); an exact tile takes its
    row maxima first and rescales what earlier tiles summed."""
    bi, hd, k = job
    i0, i1, tiles = lay.blocks[k]
    g, h = lay.g, lay.h
    r0, r1 = i0 * g, i1 * g
    q_blk = lay.q_t[bi, hd, r0:r1]
    acc = lay.tile("acc", worker, r1 - r0)  # the context | the row sums
    m = lse[bi, hd, r0:r1]
    fold = mask is None
    first = True
    for j0, j1, diag in tiles:
        v_blk = lay.v_t[bi, hd, j0:j1]
        if not first and fold and not diag and _add_tile(lay, worker, job, q_blk, acc, j0, j1):
            continue
        s = lay.scores(worker, job, q_blk, mask, skip, j0, j1, diag)
        if s is None:
            continue
        c = -q_blk[:, h]  # what the product subtracted from each row
        top = s.max(axis=-1)
        if not first:
            np.maximum(top, m - c, out=top)
        lay.exp_rows(s, top)
        top += c  # the new running maximum
        if first:
            # (rows, keys) x (keys, h+1) -> (rows, h+1)
            np.matmul(s, v_blk, out=acc)
        else:
            acc *= np.exp(m - top)[:, None]
            acc += s @ v_blk
        m[...] = top
        if fold:
            q_blk[:, h] = -m
        first = False
    total = acc[:, h]
    if out is not None:
        ctx = acc[:, :h].reshape(i1 - i0, g, h) / total.reshape(i1 - i0, g, 1)
        np.copyto(out[bi, i0:i1, hd], ctx)
    m += np.log(total)


def _add_tile(lay: Layout, worker, job, q_blk, acc, j0: int, j1: int) -> bool:
    """exp(scores - m) of one tile against the running maximum m as it stands, added to
    ``acc``; False (nothing added) when its row sums exceed SUM_LIMIT."""
    bi, hd, _ = job
    s = lay.tile("s", worker, q_blk.shape[0], j1 - j0)
    # (rows, h+1) x (h+1, keys) -> (rows, keys)
    np.matmul(q_blk, lay.k_t[bi, hd, j0:j1].T, out=s)
    lay.exp_rows(s)
    part = lay.tile("part", worker, q_blk.shape[0])
    # (rows, keys) x (keys, h+1) -> (rows, h+1)
    np.matmul(s, lay.v_t[bi, hd, j0:j1], out=part)
    if not part[:, lay.h].max() <= SUM_LIMIT:  # also false for inf and nan
        return False
    acc += part
    return True


def make_flash_attention(node: Node, shapes, out_shape, scratch, exp=exp_rows):
    """softmax(scale * q k^T + mask) v by query blocks and key tiles (see the module doc);
    ``exp``: the in-place exp of score rows, as :func:`exp_rows`. (A ``direct`` step, few
    queries, is runtime/kernels.py's make_direct_attention.)"""
    lay = Layout(node, shapes, scratch, ("s", "acc", "part"), exp)
    keep = bool(node.attrs.get("keep"))
    rows = (lay.b, lay.n, lay.s * lay.g)
    # the reverse steps read a kept log-sum-exp after other steps ran: it has its own buffer
    lse = np.empty(rows, lay.dtype) if keep else scratch("flash_lse", rows, lay.dtype)

    def flash_attention(ins, out):
        q, k, v = ins[:3]
        lay.heads_first(q, k, v)
        _attend(lay, ins[3] if lay.has_mask else None, out, lse)
        if keep:
            LSE[node.name] = (buffer_key(q, k, v, out), lse, next(_RUNS))
        return out

    return flash_attention


def _gradients(lay: Layout, q, k, v, mask, o, do, lse) -> dict[str, np.ndarray]:
    """d q (b, s, n, g, h), d k and d v in k's layout, recomputing each tile's probabilities
    p = exp(s - lse): d v = p^T do, d s = p * (do v^T - rowsum(do * o)), d q = scale d s k,
    d k = scale d s^T q. As in the forward, the products subtract lse (no mask) and the row
    sums (q's and do's last columns). Each worker sums its jobs' d k and d v apart; they are
    added last."""
    b, s, n, g, h = q.shape
    q_t, k_t, v_t = lay.heads_first(q, k, v)
    fold = mask is None
    if fold:
        q_t[..., h] = -lse
    do_t = np.empty((b, n, s * g, h + 1), lay.dtype)
    do5, dq_t = do_t.reshape(b, n, s, g, h + 1), np.empty((b, n, s * g, h), lay.dtype)
    np.copyto(do5[..., :h], do.transpose(0, 2, 1, 3, 4))
    # the last column: -rowsum(do * o), the products summed in d q's buffer before its use
    dq5 = dq_t.reshape(b, n, s, g, h)
    np.multiply(do5[..., :h], o.transpose(0, 2, 1, 3, 4), out=dq5, dtype=lay.dtype)
    np.sum(dq5, axis=-1, out=do5[..., h])
    do5[..., h] *= -1  # (np.negative of a strided float32 view into one is wrong in numpy 2.4-2.5)
    dq_t[...] = 0
    dkv = [np.zeros((2, b, n, lay.t, h), lay.dtype) for _ in lay.shares]
    skips = lay.skippable(mask)

    def run(worker: int, share: list[Job]) -> None:
        dk_t, dv_t = dkv[worker]
        for job in share:
            bi, hd, idx = job
            i0, i1, tiles = lay.blocks[idx]
            r0, r1 = i0 * g, i1 * g
            q_blk, do_blk = q_t[bi, hd, r0:r1], do_t[bi, hd, r0:r1]
            for j0, j1, diag in tiles:
                p = lay.scores(worker, job, q_blk, mask, skips[bi, idx], j0, j1, diag)
                if p is None:
                    continue
                lay.exp_rows(p, None if fold else lse[bi, hd, r0:r1])
                # (keys, rows) x (rows, h) -> (keys, h)
                dv_t[bi, hd, j0:j1] += p.T @ do_blk[:, :h]
                ds = lay.tile("ds", worker, r1 - r0, j1 - j0)
                # (rows, h+1) x (h+1, keys) -> (rows, keys): do v^T - rowsum(do * o)
                np.matmul(do_blk, v_t[bi, hd, j0:j1].T, out=ds)
                ds *= p
                # (rows, keys) x (keys, h) -> (rows, h)
                dq_t[bi, hd, r0:r1] += ds @ k_t[bi, hd, j0:j1, :h]
                # (keys, rows) x (rows, h) -> (keys, h)
                dk_t[bi, hd, j0:j1] += ds.T @ q_blk[:, :h]

    on_workers(lay, run)
    for extra in dkv[1:]:
        dkv[0] += extra
    dk_t, dv_t = dkv[0]
    dq = np.empty(q.shape, lay.dtype)
    np.multiply(dq_t.reshape(b, n, s, g, h).transpose(0, 2, 1, 3, 4), lay.scale, out=dq)
    if lay.bnth:
        return {"q": dq, "k": dk_t, "v": dv_t}
    return {"q": dq, "k": dk_t.transpose(0, 2, 1, 3), "v": dv_t.transpose(0, 2, 1, 3)}


def _saved(node: Node, ins: list[np.ndarray]) -> tuple[np.ndarray | None, int | None]:
    """The forward step's saved log-sum-exp and run number when it was made from these very
    buffers, else (None, None)."""
    saved = LSE.get(node.name.rsplit(".grad", 1)[0])
    if saved is not None and saved[0] == buffer_key(*ins[:3], ins[-2]):
        return saved[1], saved[2]
    return None, None


def _row_lse(lay: Layout, ins: list[np.ndarray]) -> np.ndarray:
    """The row log-sum-exp computed again (one pass of q k^T, no product with v)."""
    lse = np.empty((lay.b, lay.n, lay.s * lay.g), lay.dtype)
    lay.heads_first(*ins[:3])
    _attend(lay, ins[3] if lay.has_mask else None, None, lse)
    return lse


def make_flash_attention_grad(node: Node, shapes, out_shape, scratch, exp=exp_rows):
    """The gradient of input ``wrt``: the first reverse step of an attention computes every
    gradient in ``grads`` in one pass over the tiles and leaves the others for its siblings."""
    lay = Layout(node, shapes, scratch, ("s", "ds"), exp)
    wrt, wanted = node.attrs["wrt"], node.attrs["grads"]

    def flash_attention_grad(ins, out):
        key = buffer_key(*ins)
        with _GRADS_LOCK:
            lse, run = _saved(node, ins)
            left = GRADS.get(key)
            if left is None or left[0] != run or wrt not in left[1]:
                if lse is None:
                    lse = _row_lse(lay, ins)
                mask = ins[3] if lay.has_mask else None
                grads = _gradients(lay, *ins[:3], mask, ins[-2], ins[-1], lse)
                left = GRADS[key] = (run, {w: grads[w] for w in wanted})
            np.copyto(out, left[1].pop(wrt))
            if not left[1]:
                del GRADS[key]
        return out

    return flash_attention_grad


FLASH_KERNELS = {
    Op.FLASH_ATTENTION: make_flash_attention,
    Op.FLASH_ATTENTION_GRAD: make_flash_attention_grad,
}
