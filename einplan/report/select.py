"""Pick the part of a graph a person asked to see: one layer, names matching a pattern."""

from __future__ import annotations

import re

from einplan.compiler.ir import Graph, Node
from einplan.compiler.names import layer_of
from einplan.errors import EinplanError


def select_nodes(graph: Graph, layer: int | None = None, pattern: str | None = None) -> list[Node]:
    """The nodes of ``graph`` in ``layer`` whose names match the regex ``pattern`` (searched,
    as grep does); a filter that matches nothing is an error naming it."""
    try:
        regex = re.compile(pattern) if pattern is not None else None
    except re.error as e:
        raise EinplanError(f"--filter {pattern!r} is not a regular expression: {e}") from None
    kept = [
        n
        for n in graph.nodes
        if (layer is None or layer_of(n.name) == layer) and (regex is None or regex.search(n.name))
    ]
    if not kept:
        asked = [f"layer {layer}"] if layer is not None else []
        asked += [f"names matching {pattern!r}"] if pattern is not None else []
        layers = sorted({layer_of(n.name) for n in graph.nodes} - {None})
        has = f"layers {layers[0]}..{layers[-1]}" if layers else "no layers"
        raise EinplanError(
            f"no node of entry {graph.name!r} is in {' and '.join(asked)} (it has {has})"
        )
    return kept
