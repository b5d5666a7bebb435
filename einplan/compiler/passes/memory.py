"""Liveness and buffer assignment: when each value dies, which buffer it lives in, the peak.

Every computed value gets a slot of the runtime's arena; a slot is reused by a later value of
the same (symbolic) size once its previous value is dead, and only by a step of a later
dependency level, so steps that may run concurrently never share a buffer. An op whose kernel
may write over its first input (``inplace``: add, mul, softmax, cross_entropy_grad) takes that
input's buffer when the input dies at this step and no concurrent step reads it. Views (reshape)
share their source's buffer and keep it alive. Graph outputs get fresh arrays at run time.
"""

from __future__ import annotations

import dataclasses

from einplan.compiler.ir import Graph
from einplan.compiler.ops import ITEMSIZE, LEAVES, OPS
from einplan.compiler.pipeline import PassContext
from einplan.compiler.symbolic import evaluate, numel, poly_from_json, poly_to_json, scale_poly


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
    too), arena (all intermediate buffers) and outputs for bound dims."""
    nodes = graph.by_id()

    def size(n):
        return evaluate(scale_poly(numel(n.shape), ITEMSIZE[n.dtype]), dims)

    weights = sum(size(n) for n in graph.params())
    states = sum(size(n) for n in graph.states())
    arena = sum(evaluate(poly_from_json(s), dims) for s in graph.meta["memory"]["slots"])
    outs = sum(size(nodes[v]) for v in set(graph.outputs.values()))
    return {
        "weights_bytes": weights,
        "state_bytes": states,
        "arena_bytes": arena,
        "outputs_bytes": outs,
        "peak_bytes": weights + states + arena + outs,
        "dims": dict(dims),
    }
