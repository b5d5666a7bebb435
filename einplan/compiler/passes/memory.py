"""Liveness and buffer assignment: when each value dies, which buffer it lives in, the peak.

Every computed value gets a slot of the runtime's arena; a slot is reused by a later value of
the same (symbolic) size once its previous value is dead, and only by a step of a later
dependency level, so steps that may run concurrently never share a buffer. The slots name
buffers and lifetimes; where each value lies in the runtime's one arena for bound dims is
compiler/arena.py's layout, which packs values of any size into the gaps of dead ones.
An op whose kernel may write over its first input (``inplace``: add, mul, softmax,
cross_entropy_grad) takes that input's buffer when the input dies at this step and no
concurrent step reads it. Views (reshape) share their source's buffer and keep it alive. Graph
outputs get fresh arrays at run time.
"""

from __future__ import annotations

import dataclasses

from einplan.compiler.arena import plan_arena
from einplan.compiler.attrs import MatmulRecipe, operand_copied
from einplan.compiler.ir import Graph, Node
from einplan.compiler.ops import (
    ADAMW_CHUNK,
    CE_BLOCK_BYTES,
    ITEMSIZE,
    KERNEL_THREADS,
    LEAVES,
    OPS,
    Op,
)
from einplan.compiler.passes.flash import (
    attends_directly,
    flash_workers,
    key_axis,
    plan_tiles,
)
from einplan.compiler.pipeline import PassContext
from einplan.compiler.symbolic import evaluate, numel, poly_to_json, scale_poly
from einplan.compiler.tags import Tag


def run(graph: Graph, ctx: PassContext) -> Graph:
    """Annotate each step with ``slot`` and ``free_after``; record slot sizes and peak."""
    nodes = graph.by_id()
    root = {}
    for n in graph.nodes:
        root[n.id] = root[n.inputs[0]] if OPS[n.op].alias else n.id
    order = {n.id: k for k, n in enumerate(graph.nodes)}
    views: dict[int, list[int]] = {}  # root value -> itself and every view of it
    for n in graph.nodes:
        views.setdefault(root[n.id], []).append(n.id)
    last_use: dict[int, int] = {}
    readers: dict[int, list[int]] = {}  # root value -> the steps that read it or its views
    for n in graph.nodes:
        for i in n.inputs:
            last_use[root[i]] = max(last_use.get(root[i], -1), order[n.id])
            readers.setdefault(root[i], []).append(n.id)
    outputs = {root[v] for v in graph.outputs.values()}
    ann = dict(graph.annotations)
    level = {i: a.level for i, a in ann.items()}

    slot_sizes: list[dict] = []
    free_slots: dict[str, list[tuple[int, int]]] = {}  # size key -> [(slot, level freed)]
    slot_of: dict[int, int] = {}
    dies_at: dict[int, list[int]] = {}
    for r, k in last_use.items():
        if r not in outputs:
            dies_at.setdefault(k, []).append(r)
    donated: set[int] = set()  # values whose buffer a step took over in place
    for k, n in enumerate(graph.nodes):
        if n.op in LEAVES:
            continue
        slot = None
        if not OPS[n.op].alias and n.id not in outputs:
            size = scale_poly(numel(n.shape), ITEMSIZE[n.dtype])
            key = repr(sorted(size.items()))
            pool = free_slots.get(key, [])
            pick = next((p for p in pool if p[1] < level[n.id]), None)
            first = root[n.inputs[0]] if n.inputs else None
            if (
                OPS[n.op].inplace
                and first in slot_of
                and first not in outputs
                and last_use[first] == k
                and nodes[first].dtype == n.dtype
                and numel(nodes[first].shape) == numel(n.shape)
                and all(level[r] < level[n.id] for r in readers[first] if r != n.id)
            ):  # write over the first input, which dies here and no concurrent step reads
                slot = slot_of[first]
                donated.add(first)
            elif pick is not None:
                pool.remove(pick)
                slot = pick[0]
            else:
                slot = len(slot_sizes)
                slot_sizes.append(size)
            slot_of[n.id] = slot
        dead = [r for r in dies_at.get(k, []) if nodes[r].op not in LEAVES]
        free = tuple(v for r in dead for v in views[r])
        ann[n.id] = dataclasses.replace(ann[n.id], slot=slot, free_after=free)
        for r in dead:
            if r in slot_of and r not in donated:
                size = scale_poly(numel(nodes[r].shape), ITEMSIZE[nodes[r].dtype])
                free_slots.setdefault(repr(sorted(size.items())), []).append(
                    (slot_of[r], level[n.id])
                )
    out = graph.replace_nodes(list(graph.nodes))
    out.annotations = ann
    out.meta["memory"] = {"slots": [poly_to_json(s) for s in slot_sizes]}
    out.meta["memory"].update(estimate_memory(out, ctx.typical_dims))
    return out


def estimate_memory(graph: Graph, dims: dict[str, int]) -> dict[str, int]:
    """Bytes of weights, state buffers (KV cache, optimizer state: their dims must be bound
    too), arena (all intermediate buffers), the kernels' scratch, what one step allocates for
    itself while it runs (flash attention's reverse step) and outputs, for bound dims."""
    nodes = graph.by_id()

    def size(n):
        return evaluate(scale_poly(numel(n.shape), ITEMSIZE[n.dtype]), dims)

    weights = sum(size(n) for n in graph.params())
    states = sum(size(n) for n in graph.states())
    arena = plan_arena(graph, dims).nbytes
    scratch, transient = scratch_bytes(graph, dims)
    outs = sum(size(nodes[v]) for v in set(graph.outputs.values()))
    return {
        "weights_bytes": weights,
        "state_bytes": states,
        "arena_bytes": arena,
        "scratch_bytes": scratch,
        "transient_bytes": transient,
        "outputs_bytes": outs,
        "peak_bytes": weights + states + arena + scratch + transient + outs,
        "dims": dict(dims),
    }


def saved_for_backward(graph: Graph, dims: dict[str, int]) -> int:
    """Bytes of the forward pass's computed values that the reverse graph reads (through views
    too), so that they stay alive from the forward pass into the backward one: the activation
    memory of a training step in the usual sense (0 for a graph without a reverse part)."""
    nodes = graph.by_id()
    root: dict[int, int] = {}
    for n in graph.nodes:
        root[n.id] = root[n.inputs[0]] if n.op not in LEAVES and OPS[n.op].alias else n.id
    saved = {
        root[i]
        for n in graph.nodes
        if Tag.REVERSE in n.tags
        for i in n.inputs
        if nodes[root[i]].op not in LEAVES and Tag.REVERSE not in nodes[root[i]].tags
    }
    return sum(evaluate(numel(nodes[r].shape), dims) * ITEMSIZE[nodes[r].dtype] for r in saved)


def scratch_bytes(graph: Graph, dims: dict[str, int]) -> tuple[int, int]:
    """Bytes of the scratch arrays the runtime gives kernels (runtime/steps.py keeps one per
    role and dtype, as large as its largest request), and the most one step allocates for
    itself while it runs. The scratch: operands a matmul must copy to permute
    (compiler/attrs.py operand_copied) and its permuted result, the RMS-norm and SwiGLU
    gradients' temporaries, the cross-entropy block, the AdamW temporary."""
    nodes = graph.by_id()
    largest: dict[tuple[str, str], int] = {}
    transient = 0  # the most any one step allocates for itself while it runs

    def need(role: str, shape, dtype: str) -> None:
        size = evaluate(numel(shape), dims) * ITEMSIZE[dtype]
        largest[role, dtype] = max(largest.get((role, dtype), 0), size)

    for n in graph.nodes:
        ins = [nodes[i] for i in n.inputs]
        r = n.attrs.get("recipe")
        if n.op is Op.EINSUM and isinstance(r, MatmulRecipe):
            nb, na, nk, _ = r.groups
            for role, x, summed, perm, n1 in (
                ("a", ins[0], r.a_sum, r.a_perm, na),
                ("b", ins[1], r.b_sum, r.b_perm, nk),
            ):
                if operand_copied(perm, nb, n1):
                    need(role, [d for k, d in enumerate(x.shape) if k not in summed], n.dtype)
            if r.out_perm != sorted(r.out_perm):
                need("c", n.shape, n.dtype)
        elif n.op is Op.RMS_NORM_GRAD:
            need("rms", ins[0].shape, n.dtype)
        elif n.op is Op.SILU_MUL_GRAD:
            need("sigmoid", n.shape, n.dtype)
        elif n.op is Op.ADAMW:
            need("update", (min(evaluate(numel(n.shape), dims), ADAMW_CHUNK),), n.dtype)
        elif n.op in (Op.CROSS_ENTROPY, Op.CROSS_ENTROPY_GRAD):
            vocab = ins[0].shape[-1]
            rows = evaluate(numel(ins[0].shape[:-1]), dims)
            block = max(1, min(rows, CE_BLOCK_BYTES // (vocab * ITEMSIZE[n.dtype])))
            need("ce", (block, vocab), ins[0].dtype)
        elif n.op in (Op.FLASH_ATTENTION, Op.FLASH_ATTENTION_GRAD):
            transient = max(transient, flash_bytes(n, ins, dims, need))
    return sum(largest.values()), transient


def flash_bytes(n: Node, ins: list[Node], dims: dict[str, int], need) -> int:
    """Flash attention's scratch (``need``: q, k, v heads-first with their extra column, one
    score tile per role and worker and the forward's two (rows, h+1) sums, as
    runtime/flash.py's Layout asks) and the bytes its reverse step allocates while it runs
    (the cotangent heads-first, d q heads-first and in q's layout, d k and d v per worker;
    16-bit output and cotangent in float32); returns the latter."""
    a = n.attrs
    dtype = "f64" if n.dtype == "f64" else "f32"  # 16-bit values are multiplied in float32
    b, s, heads, g, h = (evaluate(numel([d]), dims) for d in ins[0].shape)
    t = evaluate(numel([ins[1].shape[key_axis(n)]]), dims)
    if attends_directly(n, (b, s, heads, g, h), t):  # the scores at once (make_direct_attention)
        need("flash_direct", (b, heads, g, s, t), n.dtype)
        return 0
    blocks = plan_tiles(s, t, a["causal"], a["block_q"], a["block_k"], a["min_tiled"])
    rows = max(i1 - i0 for i0, i1, _ in blocks) * g
    width = max(j1 - j0 for *_, tiles in blocks for j0, j1, _ in tiles)
    q, kv = b * heads * s * g * h, b * heads * t * h
    workers = flash_workers(blocks, b * heads, g, KERNEL_THREADS)
    reverse = n.op is Op.FLASH_ATTENTION_GRAD
    for role in ("s", "ds") if reverse else ("s", "acc", "part"):
        cols = width if role in ("s", "ds") else h + 1
        for w in range(workers):
            need(f"flash_{role}{w}", (rows * cols,), dtype)
    need("flash_q", (q + q // h,), dtype)
    need("flash_k", (kv + kv // h,), dtype)
    need("flash_v", (kv + kv // h,), dtype)
    if not reverse:
        return 0
    copies_of_q = 3 + 2 * (n.dtype != dtype)
    return (copies_of_q * q + 2 * workers * kv) * ITEMSIZE[dtype]
