"""The graph as a Graphviz picture: one cluster per layer, a node per value labelled
``name | op | type``, coloured by kind, edges labelled with the input slot they feed; a
layer's routed experts (mixture of experts) side by side in one row.

DOT is written with the ``graphviz`` package and laid out by Graphviz's ``dot`` program.
"""

from __future__ import annotations

from html import escape

import graphviz

from einplan.compiler.ir import Graph, Node, format_attr, format_type
from einplan.compiler.names import layer_of
from einplan.compiler.ops import Op
from einplan.compiler.tags import Tag
from einplan.errors import EinplanError

# kind -> fill colour; the first kind in this order that fits a node wins (see node_kind)
COLORS = {
    "optimizer": "#d9c8f5",
    "recompute": "#f7b267",  # forward values the reverse graph computes again (checkpoint)
    "reverse": "#f6c6c6",
    "lora": "#f8d3ee",
    "expert": "#c8eef0",
    "quant": "#fff0a8",
    "param": "#cfe2f7",
    "input": "#fcd9b6",
    "linear": "#cdebd3",
    "op": "#ffffff",
    "outside": "#eeeeee",  # a value from outside the selection
}
QUANT_OPS = ("quantize", "dequantize")
EXPERT_OPS = (Op.MOE_EXPERT, Op.MOE_TOPK)
INSTALL_HINT = (
    "install Graphviz: apt-get install graphviz (Debian/Ubuntu), brew install graphviz "
    "(macOS) or conda install graphviz; --format text and --format dot need no Graphviz"
)


class GraphvizMissing(EinplanError):
    """Graphviz's ``dot`` program is not on the PATH."""


def node_kind(n: Node) -> str:
    """The colour key of a node, from its tags and op (later passes add tags, not code)."""
    for tag in (Tag.OPTIMIZER, Tag.RECOMPUTE, Tag.REVERSE, Tag.LORA):
        if tag in n.tags:
            return tag.value
    if n.op in EXPERT_OPS:
        return "expert"
    if Tag.QUANT in n.tags or n.op.value in QUANT_OPS:
        return "quant"
    if n.op is Op.PARAM:
        return "param"
    if n.op is Op.INPUT:
        return "input"
    return "linear" if Tag.LINEAR in n.tags else "op"


def node_label(n: Node, kind: str) -> str:
    """An HTML-like label: the name in bold, the op with its einsum spec, the type."""
    op = n.op.value
    if "spec" in n.attrs:
        op += f"[{format_attr(n.attrs['spec'])}]"
    rows = [f"<B>{escape(n.name or f'%{n.id}')}</B>", escape(op), format_type(n.shape, n.dtype)]
    cells = "".join(f"<TR><TD>{r}</TD></TR>" for r in rows)
    return (
        f'<<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="0" CELLPADDING="3" '
        f'BGCOLOR="{COLORS[kind]}">{cells}</TABLE>>'
    )


def legend_label(kinds: set[str]) -> str:
    """An HTML-like table naming the colour of each kind of node in the picture."""
    cells = "".join(
        f'<TR><TD BGCOLOR="{color}">{kind}</TD></TR>'
        for kind, color in COLORS.items()
        if kind in kinds
    )
    return f'<<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="0" CELLPADDING="2">{cells}</TABLE>>'


def graph_to_dot(graph: Graph, nodes: list[Node], title: str = "") -> graphviz.Digraph:
    """The DOT graph of ``nodes`` (a selection of ``graph``); values they read from outside
    the selection appear as grey ``outside`` nodes, and a legend names the colours."""
    everything = graph.by_id()
    kept = {n.id for n in nodes}
    outside = sorted({i for n in nodes for i in n.inputs if i not in kept})
    dot = graphviz.Digraph(
        graph.name,
        graph_attr={
            "rankdir": "TB",
            "fontname": "Helvetica",
            "label": title or graph.name,
        },
        node_attr={"shape": "plain", "fontname": "Helvetica", "fontsize": "10"},
        edge_attr={"fontname": "Helvetica", "fontsize": "8", "color": "#555555"},
    )
    layer = {n.id: layer_of(n.name) for n in graph.nodes}
    # a value read by several layers (the rope table) is drawn again, grey, inside each layer
    # that reads it: edges fanning out across clusters would wreck dot's ranking of layers
    readers: dict[int, set[int | None]] = {}
    for n in nodes:
        for i in n.inputs:
            readers.setdefault(i, set()).add(layer[n.id])
    shared = {i for i, where in readers.items() if len(where) > 1}
    # (key, node, kind, cluster) of every box; then the edges, adding the copies they need
    boxes = [(f"v{n.id}", n, node_kind(n), layer[n.id]) for n in nodes]
    boxes += [(f"v{i}", everything[i], "outside", None) for i in outside if i not in shared]
    for n in nodes:
        for slot, i in enumerate(n.inputs):
            src = f"v{i}"
            if i in shared and not (i in kept and layer[i] == layer[n.id]):
                src = f"v{i}_in{layer[n.id]}"
                if src not in {b[0] for b in boxes}:
                    boxes.append((src, everything[i], "outside", layer[n.id]))
            dot.edge(src, f"v{n.id}", label=str(slot) if len(n.inputs) > 1 else None)
    clusters: dict[int, graphviz.Digraph] = {}
    experts: dict[int, graphviz.Digraph] = {}  # per layer: its expert steps, one rank
    for key, n, kind, cluster in boxes:
        target = dot
        if cluster is not None:
            if cluster not in clusters:
                clusters[cluster] = graphviz.Digraph(f"cluster_layer{cluster}")
                clusters[cluster].attr(label=f"layer {cluster}", style="rounded", color="#888888")
            target = clusters[cluster]
            if n.op is Op.MOE_EXPERT and kind != "outside":
                target = experts.setdefault(
                    cluster, graphviz.Digraph(f"experts{cluster}", graph_attr={"rank": "same"})
                )
        tip = graph.format_line(n, everything) if kind != "outside" else f"from elsewhere: {n.name}"
        target.node(key, node_label(n, kind), id=key, tooltip=tip)
    for layer_index, sub in clusters.items():
        if layer_index in experts:
            sub.subgraph(experts[layer_index])
        dot.subgraph(sub)
    dot.node("legend", legend_label({b[2] for b in boxes}), id="legend")
    return dot


def render_dot(dot: graphviz.Digraph, fmt: str) -> bytes:
    """Lay out and render through Graphviz's ``dot`` (svg, png, ...); a clear error when
    Graphviz is not installed."""
    try:
        return dot.pipe(format=fmt)
    except graphviz.ExecutableNotFound:
        raise GraphvizMissing(
            f"Graphviz's dot program is not on the PATH; {INSTALL_HINT}"
        ) from None
