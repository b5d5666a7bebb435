"""Pack the weights of inference projections for the runtime: each weight is stored
transposed, (in, out), and projections of the same input (q/k/v, gate/up) share one
concatenated weight, so one BLAS call streams it and ``split`` views hand out the parts.

Decode is bound by reading the weights: larger, (in, out) row-major matrices read about 20 %
faster through numpy's GEMV than separate (out, in) ones (benchmarks/generate.py). The packed
param keeps the checkpoint keys it is made of (``attrs["pack"]``); the weights loader builds
it. Training graphs are left alone: their gradients and updates address the original params.
"""

from __future__ import annotations

from einplan.compiler.ir import Graph, Node
from einplan.compiler.ops import Op
from einplan.compiler.pipeline import PassContext

TRAINING_TAGS = {"reverse", "optimizer"}


def _plain_linear(n: Node, nodes: dict[int, Node], uses: dict[int, list[int]]) -> bool:
    """An f32 ``x · W`` einsum whose weight is a param read by nothing else."""
    if n.op is not Op.EINSUM or "linear" not in n.tags or len(n.inputs) != 2:
        return False
    w = nodes[n.inputs[1]]
    lead = n.attrs["spec"].split("i,")[0]
    return (
        w.op is Op.PARAM
        and w.dtype == "f32"
        and "pack" not in w.attrs
        and n.attrs["spec"] == f"{lead}i,oi->{lead}o"
        and uses[w.id] == [n.id]
    )


def _group_name(names: list[str]) -> str:
    """``attn_q-3, attn_k-3, attn_v-3`` -> ``attn_q+attn_k+attn_v-3``."""
    roles = [n.rsplit("-", 1) for n in names]
    if all(len(r) == 2 and r[1] == roles[0][1] for r in roles):
        return "+".join(r[0] for r in roles) + "-" + roles[0][1]
    return "+".join(names)


def run(graph: Graph, ctx: PassContext) -> Graph:
    """Replace the plain linears of an inference graph by packed, transposed ones."""
    if any(n.tags & TRAINING_TAGS for n in graph.nodes):
        return graph
    nodes, uses = graph.by_id(), graph.consumers()
    groups: dict[int, list[Node]] = {}  # input value -> its linears, in order
    for n in graph.nodes:
        if _plain_linear(n, nodes, uses):
            groups.setdefault(n.inputs[0], []).append(n)
    next_id = max(nodes) + 1
    packed_weight: dict[int, Node] = {}  # first member's weight id -> packed param
    replace: dict[int, list[Node]] = {}  # first member's einsum id -> new einsum + splits
    dropped: set[int] = set()
    for members in groups.values():
        weights = [nodes[m.inputs[1]] for m in members]
        rows = [w.shape[0] for w in weights]
        keys = [w.attrs["key"] for w in weights]
        first, x = members[0], nodes[members[0].inputs[0]]
        name = _group_name([m.name for m in members])
        w = Node(
            next_id,
            Op.PARAM,
            (),
            {"key": "+".join(keys), "pack": [list(p) for p in zip(keys, rows, strict=True)]},
            (weights[0].shape[1], sum(rows)),
            "f32",
            _group_name([w.name for w in weights]) if len(members) > 1 else weights[0].name,
            weights[0].tags,
        )
        lead = first.attrs["spec"].split("i,")[0]
        # (batch, seq, in) x (in, out) -> (batch, seq, out)
        mm = Node(
            next_id + 1 if len(members) > 1 else first.id,
            Op.EINSUM,
            (x.id, w.id),
            {"spec": f"{lead}i,io->{lead}o"},
            (*x.shape[:-1], sum(rows)),
            "f32",
            name,
            first.tags | {"packed"},
        )
        next_id += 2
        new = [mm]
        if len(members) > 1:
            start = 0
            for m, r in zip(members, rows, strict=True):
                new.append(
                    Node(
                        m.id,
                        Op.SPLIT,
                        (mm.id,),
                        {"start": start, "stop": start + r},
                        m.shape,
                        m.dtype,
                        m.name,
                        m.tags,
                    )
                )
                start += r
        packed_weight[weights[0].id] = w
        replace[first.id] = new
        dropped.update(m.id for m in members[1:])
        dropped.update(wt.id for wt in weights[1:])
    out = []
    for n in graph.nodes:
        if n.id in packed_weight:
            out.append(packed_weight[n.id])
        elif n.id in replace:
            out.extend(replace[n.id])
        elif n.id not in dropped:
            out.append(n)
    return graph.replace_nodes(out)
