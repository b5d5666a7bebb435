"""The reverse graph: gradients of the scalar output ``loss`` with respect to every trainable
parameter, appended to the forward graph.

Nodes are visited in reverse order; each applies its op's rule (compiler/vjp.py) to the sum of
the cotangents its users sent it (fan-in). Only values that depend on a trainable parameter get
a cotangent. The loss's own cotangent is a runtime input, ``loss_grad`` (1, or 1/k when k
micro-batches are accumulated), so the plan stays static. Every reverse node is tagged
``reverse``; the gradients become outputs ``grad.<checkpoint key>``.
"""

from __future__ import annotations

from einplan.compiler.ir import Graph, Node
from einplan.compiler.names import grad_key
from einplan.compiler.ops import FLOAT_DTYPES, LEAVES, Op, ShapeError
from einplan.compiler.pipeline import PassContext
from einplan.compiler.tags import Tag
from einplan.compiler.trace import Builder, Value
from einplan.compiler.vjp import apply_rule

LOSS = "loss"


def trainable(n: Node) -> bool:
    """Whether a node is a parameter the reverse graph differentiates."""
    return n.op is Op.PARAM and n.dtype in FLOAT_DTYPES and Tag.FROZEN not in n.tags


def needs_grad(graph: Graph) -> set[int]:
    """Ids of the values that depend on a trainable parameter."""
    need: set[int] = set()
    for n in graph.nodes:
        if trainable(n) or (n.op not in LEAVES and any(i in need for i in n.inputs)):
            need.add(n.id)
    return need


def run(graph: Graph, ctx: PassContext) -> Graph:
    """Append the reverse graph of ``loss`` and output the gradient of each trainable param."""
    if LOSS not in graph.outputs:
        raise ShapeError(f"autodiff: graph {graph.name!r} has no output {LOSS!r} to differentiate")
    nodes = graph.by_id()
    loss = nodes[graph.outputs[LOSS]]
    if loss.shape != () or loss.dtype not in FLOAT_DTYPES:
        raise ShapeError(f"autodiff: the loss must be a float scalar, got {loss.dtype}{loss.shape}")
    need = needs_grad(graph)
    b = Builder.extend(graph)
    cts: dict[int, list[Value]] = {loss.id: [b.input("loss_grad", (), loss.dtype)]}
    grads: dict[str, Value] = {}
    with b.tagged(Tag.REVERSE):
        for n in reversed(graph.nodes):
            parts = cts.pop(n.id, None)
            if parts is None:
                continue
            ct = parts[0]
            for extra in parts[1:]:
                ct = b.add(ct, extra, role=f"{n.name}.grad_sum")
            if n.op is Op.PARAM:
                grads[n.attrs["key"]] = ct
                continue
            ins = [b.value(nodes[i]) for i in n.inputs]
            want = {k for k, i in enumerate(n.inputs) if i in need}
            for k, g in enumerate(apply_rule(b, n, ins, ct, want)):
                if k in want:
                    cts.setdefault(n.inputs[k], []).append(g)
    # forward steps whose activations their reverse steps reuse (runtime/moe.py keeps them)
    differentiated = {n.id for n in b.graph.nodes if n.op is Op.MOE_EXPERT_GRAD}
    keep = _forward_of(b.graph, differentiated)
    if keep:
        b.graph = b.graph.replace_nodes(
            [n.with_(attrs={**n.attrs, "keep": True}) if n.id in keep else n for n in b.graph.nodes]
        )
    missing = [
        n.attrs["key"] for n in graph.params() if trainable(n) and n.attrs["key"] not in grads
    ]
    if missing:
        raise ShapeError(f"autodiff: parameters that do not affect the loss: {', '.join(missing)}")
    for key, g in grads.items():
        b.output(grad_key(key), g)
    return b.graph


def _forward_of(graph: Graph, grad_ids: set[int]) -> set[int]:
    """The forward moe_expert steps of these reverse steps (which read the same inputs)."""
    by_inputs = {n.inputs: n.id for n in graph.nodes if n.op is Op.MOE_EXPERT}
    nodes = graph.by_id()
    return {by_inputs[nodes[i].inputs[:5]] for i in grad_ids if nodes[i].inputs[:5] in by_inputs}
