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

The query blocks are shared between this thread and a helper (numpy and BLAS release the GIL),
each block's small products on one BLAS thread: two BLAS threads per product spin-wait for each
other, which on a busy machine made every tile's product ten times slower.
"""

from __future__ import annotations

import itertools
import threading

import numpy as np

from einplan.compiler.dtypes import to_numpy_dtype
from einplan.compiler.ir import Node
from einplan.compiler.ops import Op
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

Tile = tuple[int, int, bool]  # first key, end key, whether some key lies after some row
Block = tuple[int, int, list[Tile]]  # first row, end row, its key tiles


def plan_tiles(
    queries: int, keys: int, causal: bool, block_q: int, block_k: int, min_tiled: int
) -> list[Block]:
    """The query blocks and, for each, the key tiles it computes: the causal ones stop at the
    block's last row (queries sit at the end of the keys); fewer than ``min_tiled`` keys make
    one block of one tile."""
    if keys < min_tiled:
        block_q, block_k = queries, keys
    off = keys - queries
    blocks = []
    for i0 in range(0, queries, block_q):
        i1 = min(queries, i0 + block_q)
        end = min(keys, i1 + off) if causal else keys
        tiles = [
            (j0, min(end, j0 + block_k), causal and min(end, j0 + block_k) - 1 > i0 + off)
            for j0 in range(0, end, block_k)
        ]
        blocks.append((i0, i1, tiles))
    return blocks


def share_blocks(blocks: list[Block], g: int, workers: int) -> list[list[int]]:
    """The block indices each worker computes: largest first to the least loaded, by the score
    entries of their tiles (causal blocks near the end see more keys)."""
    shares: list[list[int]] = [[] for _ in range(max(1, min(workers, len(blocks))))]
    load = [0] * len(shares)
    work = [(i1 - i0) * g * sum(j1 - j0 for j0, j1, _ in tiles) for i0, i1, tiles in blocks]
    for k in sorted(range(len(blocks)), key=work.__getitem__, reverse=True):
        w = load.index(min(load))
        shares[w].append(k)
        load[w] += work[k]
    return shares


def on_workers(lay: Layout, job) -> None:
    """Run ``job(worker, block indices)`` for each worker's share, the second on the helper
    thread, every product on one BLAS thread."""
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
    """Concrete sizes of one step and the scratch it multiplies in."""

    def __init__(
        self, node: Node, shapes: list[tuple[int, ...]], scratch, tiles: tuple[str, ...]
    ) -> None:
        a = node.attrs
        self.b, self.s, self.n, self.g, self.h = shapes[0]
        self.bnth = a["layout"] == "bnth"
        self.t = shapes[1][2] if self.bnth else shapes[1][1]
        self.has_mask = len(shapes) in (4, 6)  # forward: q k v [mask]; reverse: + out, ct
        # bf16/f16 values are multiplied and summed in float32 (issue #14: float32 accumulation
        # in every reduction and softmax)
        self.dtype = to_numpy_dtype("f64" if node.dtype == "f64" else "f32")
        self.copy_kv = a["layout"] != "bnth" or node.dtype not in ("f32", "f64")
        self.scale = self.dtype.type(a.get("scale", 1.0))
        self.blocks = plan_tiles(
            self.s, self.t, a["causal"], a["block_q"], a["block_k"], a["min_tiled"]
        )
        self.off = self.t - self.s
        self.causal = bool(a["causal"])
        rows = max(i1 - i0 for i0, i1, _ in self.blocks) * self.g
        width = max(j1 - j0 for *_, tiles in self.blocks for j0, j1, _ in tiles)
        b, n, h = self.b, self.n, self.h
        self.tile_size = b * n * rows * width
        self.scratch = scratch
        self.shares = share_blocks(self.blocks, self.g, THREADS)
        for role in tiles:  # asked for now, so the binding counts them in its scratch bytes
            for worker in range(len(self.shares)):
                self.tile(role, worker, rows, width)
        self.q_t = scratch("flash_q", (b, n, self.s * self.g, h), self.dtype)
        kv = (b, n, self.t, h)
        self.k_t = scratch("flash_k", kv, self.dtype) if self.copy_kv else None
        self.v_t = scratch("flash_v", kv, self.dtype) if self.copy_kv else None

    def tile(self, role: str, worker: int, rows: int, width: int) -> np.ndarray:
        """A (b, n, rows, width) view of one worker's scratch tile."""
        flat = self.scratch(f"flash_{role}{worker}", (self.tile_size,), self.dtype)
        return flat[: self.b * self.n * rows * width].reshape(self.b, self.n, rows, width)

    def heads_first(self, q: np.ndarray, k: np.ndarray, v: np.ndarray):
        """q as (b, n, s*g, h) and k, v as (b, n, t, h), copied only where needed."""
        b, s, n, g, h = q.shape
        np.copyto(self.q_t.reshape(b, n, s, g, h), q.transpose(0, 2, 1, 3, 4))
        if not self.copy_kv:
            return self.q_t, k, v
        perm = (0, 1, 2, 3) if self.bnth else (0, 2, 1, 3)
        np.copyto(self.k_t, k.transpose(perm))
        np.copyto(self.v_t, v.transpose(perm))
        return self.q_t, self.k_t, self.v_t

    def skippable(self, mask: np.ndarray | None) -> list[bool]:
        """Per query block: whether its fully hidden mask tiles may be skipped (every row of
        it sees some key; with causal masking too, never)."""
        if mask is None or self.causal:
            return [False] * len(self.blocks)
        sees = (mask > HIDDEN).any(axis=-1)  # (b, s)
        return [bool(sees[:, i0:i1].all()) for i0, i1, _ in self.blocks]

    def scores(self, worker, q_blk, k_t, mask, skip, i0, i1, j0, j1, diag) -> np.ndarray | None:
        """scale * q k^T (+ mask, causal -inf) of one tile, or None when the mask hides it
        (and the block may ``skip`` such tiles)."""
        m = None
        if mask is not None:
            m = mask[:, i0:i1, j0:j1]
            if skip and m.max() <= HIDDEN:
                return None
        s = self.tile("s", worker, q_blk.shape[2], j1 - j0)
        # (b, n, rows, h) x (b, n, h, keys) -> (b, n, rows, keys)
        np.matmul(q_blk, k_t[:, :, j0:j1].swapaxes(-1, -2), out=s)
        if self.scale != 1:
            s *= self.scale
        s5 = s.reshape(self.b, self.n, i1 - i0, self.g, j1 - j0)
        if m is not None:
            s5 += m[:, None, :, None, :]
        if diag:
            after = np.arange(j0, j1)[None, :] > np.arange(i0, i1)[:, None] + self.off
            np.copyto(s5, -np.inf, where=after[:, None, :])
        return s


def _attend(lay: Layout, q_t, k_t, v_t, mask, out_t, lse) -> None:
    """Online softmax over each block's key tiles: out_t (b, n, s*g, h) the normalised
    context (None: only the statistics), lse (b, n, s*g) the row log-sum-exp."""
    skips = lay.skippable(mask)

    def job(worker: int, share: list[int]) -> None:
        for k in share:
            _attend_block(lay, worker, lay.blocks[k], skips[k], q_t, k_t, v_t, mask, out_t, lse)

    on_workers(lay, job)


def _attend_block(lay: Layout, worker, block, skip, q_t, k_t, v_t, mask, out_t, lse) -> None:
    (i0, i1, tiles), g = block, lay.g
    r0, r1 = i0 * g, i1 * g
    q_blk = q_t[:, :, r0:r1]
    acc = None if out_t is None else out_t[:, :, r0:r1]
    m, total = lse[:, :, r0:r1], None
    for j0, j1, diag in tiles:
        p = lay.scores(worker, q_blk, k_t, mask, skip, i0, i1, j0, j1, diag)
        if p is None:
            continue
        top = p.max(axis=-1)
        if total is None:
            m[...] = top
        else:
            new = np.maximum(m, top)
            fix = np.exp(m - new)  # rescales what earlier tiles summed
            m[...] = new
            total *= fix
            if acc is not None:
                acc *= fix[..., None]
        p -= m[..., None]
        np.exp(p, out=p)
        part = p.sum(axis=-1)
        if acc is not None:
            # (b, n, rows, keys) x (b, n, keys, h) -> (b, n, rows, h)
            if total is None:
                np.matmul(p, v_t[:, :, j0:j1], out=acc)
            else:
                acc += p @ v_t[:, :, j0:j1]
        total = part if total is None else total + part
    if acc is not None:
        acc /= total[..., None]
    m += np.log(total)


def _to_queries(lay: Layout, x_t: np.ndarray, out: np.ndarray) -> None:
    """(b, n, s*g, h) back to the op's (b, s, n, g, h)."""
    b, n, s, g, h = lay.b, lay.n, lay.s, lay.g, lay.h
    np.copyto(out, x_t.reshape(b, n, s, g, h).transpose(0, 2, 1, 3, 4))


def make_flash_attention(node: Node, shapes, out_shape, scratch):
    """softmax(scale * q k^T + mask) v by query blocks and key tiles (see the module doc)."""
    lay = Layout(node, shapes, scratch, ("s",))
    keep = bool(node.attrs.get("keep"))
    out_t = scratch("flash_out", (lay.b, lay.n, lay.s * lay.g, lay.h), lay.dtype)
    rows = (lay.b, lay.n, lay.s * lay.g)
    # the reverse steps read a kept log-sum-exp after other steps ran: it has its own buffer
    lse = np.empty(rows, lay.dtype) if keep else scratch("flash_lse", rows, lay.dtype)

    def flash_attention(ins, out):
        q, k, v = ins[:3]
        q_t, k_t, v_t = lay.heads_first(q, k, v)
        _attend(lay, q_t, k_t, v_t, ins[3] if lay.has_mask else None, out_t, lse)
        _to_queries(lay, out_t, out)
        if keep:
            LSE[node.name] = (buffer_key(q, k, v, out), lse, next(_RUNS))
        return out

    return flash_attention


def _gradients(lay: Layout, q, k, v, mask, o, do, lse) -> dict[str, np.ndarray]:
    """d q (b, s, n, g, h), d k and d v in k's layout, recomputing each tile's probabilities
    p = exp(s - lse): d v = p^T do, d s = p * (do v^T - rowsum(do * o)), d q = scale d s k,
    d k = scale d s^T q. Each worker sums its blocks' d k and d v apart; they are added last."""
    b, s, n, g, h = q.shape
    q_t, k_t, v_t = lay.heads_first(q, k, v)
    heads = (0, 2, 1, 3, 4)
    do, o = do.astype(lay.dtype, copy=False), o.astype(lay.dtype, copy=False)
    do_t = np.ascontiguousarray(do.transpose(heads)).reshape(b, n, s * g, h)
    rowdot = (do * o).sum(axis=-1).transpose(0, 2, 1, 3).reshape(b, n, s * g)
    dq_t = np.zeros_like(do_t)
    dkv = [np.zeros((2, b, n, lay.t, h), lay.dtype) for _ in lay.shares]
    skips = lay.skippable(mask)

    def job(worker: int, share: list[int]) -> None:
        dk_t, dv_t = dkv[worker]
        for idx in share:
            (i0, i1, tiles), r0, r1 = (
                lay.blocks[idx],
                lay.blocks[idx][0] * g,
                lay.blocks[idx][1] * g,
            )
            q_blk, do_blk = q_t[:, :, r0:r1], do_t[:, :, r0:r1]
            for j0, j1, diag in tiles:
                p = lay.scores(worker, q_blk, k_t, mask, skips[idx], i0, i1, j0, j1, diag)
                if p is None:
                    continue
                p -= lse[:, :, r0:r1, None]
                np.exp(p, out=p)
                # (b, n, keys, rows) x (b, n, rows, h) -> (b, n, keys, h)
                dv_t[:, :, j0:j1] += p.swapaxes(-1, -2) @ do_blk
                ds = lay.tile("ds", worker, r1 - r0, j1 - j0)
                # (b, n, rows, h) x (b, n, h, keys) -> (b, n, rows, keys)
                np.matmul(do_blk, v_t[:, :, j0:j1].swapaxes(-1, -2), out=ds)
                ds -= rowdot[:, :, r0:r1, None]
                ds *= p
                if lay.scale != 1:
                    ds *= lay.scale
                # (b, n, rows, keys) x (b, n, keys, h) -> (b, n, rows, h)
                dq_t[:, :, r0:r1] += ds @ k_t[:, :, j0:j1]
                # (b, n, keys, rows) x (b, n, rows, h) -> (b, n, keys, h)
                dk_t[:, :, j0:j1] += ds.swapaxes(-1, -2) @ q_blk

    on_workers(lay, job)
    for extra in dkv[1:]:
        dkv[0] += extra
    dk_t, dv_t = dkv[0]
    dq = np.empty(q.shape, lay.dtype)
    _to_queries(lay, dq_t, dq)
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
    q_t, k_t, v_t = lay.heads_first(*ins[:3])
    _attend(lay, q_t, k_t, v_t, ins[3] if lay.has_mask else None, None, lse)
    return lse


def make_flash_attention_grad(node: Node, shapes, out_shape, scratch):
    """The gradient of input ``wrt``: the first reverse step of an attention computes every
    gradient in ``grads`` in one pass over the tiles and leaves the others for its siblings."""
    lay = Layout(node, shapes, scratch, ("s", "ds"))
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
