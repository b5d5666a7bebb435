"""Pick the part of a graph a person asked to see: one layer, names matching a pattern."""

from __future__ import annotations

import re

from einplan.compiler.ir import Graph, Node
from einplan.errors import EinplanError
from einplan.report.phases import layer_of


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
        layers = {layer_of(n.name) for n in graph.nodes} - {None}
        what = " and ".join(
            x
            for x in (
                f"layer {layer}" if layer is not None else "",
                f"names matching {pattern!r}" if pattern is not None else "",
            )
            if x
        )
        raise EinplanError(
            f"no node of entry {graph.name!r} is in {what} (layers 0..{max(layers, default=0)})"
        )
    return kept
