"""Dead-code elimination and common-subexpression elimination."""

from __future__ import annotations

import json

from einplan.compiler.ir import Graph
from einplan.compiler.ops import LEAVES
from einplan.compiler.pipeline import PassContext


def _live_ids(graph: Graph) -> set[int]:
    nodes = graph.by_id()
    live: set[int] = set()
    stack = [*graph.outputs.values(), *graph.effects]
    while stack:
        i = stack.pop()
        if i not in live:
            live.add(i)
            stack.extend(nodes[i].inputs)
    return live


def run(graph: Graph, ctx: PassContext) -> Graph:
    """Drop nodes no output or effect depends on and merge nodes computing the same thing."""
    live = _live_ids(graph)
    seen: dict[str, int] = {}
    rename: dict[int, int] = {}
    nodes = []
    for n in graph.nodes:
        if n.id not in live:
            continue
        n = n.with_(inputs=tuple(rename.get(i, i) for i in n.inputs))
        if n.op not in LEAVES:
            key = json.dumps([n.op.value, n.inputs, n.attrs, n.dtype], sort_keys=True)
            if key in seen:
                rename[n.id] = seen[key]
                continue
            seen[key] = n.id
        nodes.append(n)
    outputs = {k: rename.get(v, v) for k, v in graph.outputs.items()}
    return graph.replace_nodes(nodes, outputs, [rename.get(v, v) for v in graph.effects])
