"""Dependency levels, the critical path, and the order the runtime executes steps in.

Nodes of one level do not depend on each other (q/k/v projections, gate/up), so a thread
pool may run them together. The steps are reordered level by level so that sequential and
pooled execution see the same order, which the memory pass relies on for buffer reuse.
"""

from __future__ import annotations

import networkx as nx

from einplan.compiler.attrs import StepSchedule
from einplan.compiler.ir import Graph
from einplan.compiler.ops import ITEMSIZE, LEAVES, Op, count_flops
from einplan.compiler.pipeline import PassContext
from einplan.compiler.symbolic import evaluate, numel


def run(graph: Graph, ctx: PassContext) -> Graph:
    """Assign each step its dependency level and a thread slot within that level."""
    nodes = graph.by_id()
    dag = nx.DiGraph()
    for n in graph.nodes:
        if n.op in LEAVES:
            continue
        flops = evaluate(
            count_flops(n.op, [nodes[i].shape for i in n.inputs], n.shape, n.attrs),
            ctx.typical_dims,
        )
        dag.add_node(n.id, flops=flops)
        dag.add_edges_from((i, n.id) for i in n.inputs if nodes[i].op not in LEAVES)
    level_of: dict[int, int] = {}
    for level, members in enumerate(nx.topological_generations(dag)):
        for m in members:
            level_of[m] = level
    leaves = [n for n in graph.nodes if n.op in LEAVES]
    steps = sorted((n for n in graph.nodes if n.op not in LEAVES), key=lambda n: level_of[n.id])
    ann = dict(graph.annotations)
    width: dict[int, int] = {}
    for n in steps:
        lvl = level_of[n.id]
        ann[n.id] = StepSchedule(lvl, width.get(lvl, 0))
        width[lvl] = width.get(lvl, 0) + 1
    out = graph.replace_nodes(leaves + steps)
    out.annotations = ann
    for u, v in dag.edges:
        dag.edges[u, v]["flops"] = dag.nodes[v]["flops"]
    critical = nx.dag_longest_path(dag, weight="flops") if len(dag) else []
    out.meta["schedule"] = {
        "levels": len(width),
        "parallel_levels": sum(1 for w in width.values() if w > 1),
        "max_width": max(width.values(), default=0),
        "critical_path": [nodes[i].name for i in critical],
        "blas_threads": blas_threads(graph, ctx.typical_dims),
    }
    return out


# Below this size a contraction's operands fit in the caches: a second BLAS thread gains little
# and, on a busy machine, its spin-waiting partner can slow every call tenfold.
SMALL_OPERAND_BYTES = 4 << 20


def blas_threads(graph: Graph, dims: dict[str, int]) -> int | None:
    """1 when every contraction of the graph is small (its largest operand or result under
    SMALL_OPERAND_BYTES at typical sizes); None leaves BLAS its default (all cores)."""
    nodes = graph.by_id()
    largest = 0
    for n in graph.nodes:
        if n.op is Op.EINSUM:
            for v in (*[nodes[i] for i in n.inputs], n):
                largest = max(largest, evaluate(numel(v.shape), dims) * ITEMSIZE[v.dtype])
    return 1 if largest < SMALL_OPERAND_BYTES else None
