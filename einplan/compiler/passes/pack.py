"""Pack the weights of inference projections for the runtime: each weight is stored
transposed, (in, out), and projections of the same input (q/k/v, gate/up) share one
concatenated weight, so one BLAS call streams it and ``split`` views hand out the parts.
Quantised projections of one input share one packed quantised weight likewise (kept (out, in),
the layout the block kernel reads): fewer, larger products, split over more row blocks.

Decode is bound by reading the weights: larger, (in, out) row-major matrices read about 20 %
faster through numpy's GEMV than separate (out, in) ones (benchmarks/generate.py). The packed
param keeps the checkpoint keys it is made of (``attrs["pack"]``); the weights loader builds
it. Training graphs are left alone: their gradients and updates address the original params.
"""

from __future__ import annotations

import dataclasses

from einplan.compiler.attrs import PackMember
from einplan.compiler.ir import Graph, Node
from einplan.compiler.ops import Op
from einplan.compiler.pipeline import PassContext
from einplan.compiler.tags import Tag


def _packable(n: Node, nodes: dict[int, Node], uses: dict[int, list[int]]) -> tuple | None:
    """How a linear ``x · W^T`` einsum packs: ``("f32",)`` for a float32 param read by nothing
    else, ``("quant", bits, group, parts)`` for a dequantized weight whose params nothing else
    reads, None when it does not."""
    if n.op is not Op.EINSUM or Tag.LINEAR not in n.tags or len(n.inputs) != 2:
        return None
    w = nodes[n.inputs[1]]
    lead = n.attrs["spec"].split("i,")[0]
    if n.attrs["spec"] != f"{lead}i,oi->{lead}o" or uses[w.id] != [n.id]:
        return None
    if w.op is Op.PARAM and w.dtype == "f32" and "pack" not in w.attrs:
        return ("f32",)
    if w.op is Op.DEQUANTIZE and all(
        nodes[i].op is Op.PARAM and uses[i] == [w.id] for i in w.inputs
    ):
        return ("quant", w.attrs["bits"], w.attrs["group"], len(w.inputs))
    return None


def _group_name(names: list[str]) -> str:
    """``attn_q-3, attn_k-3, attn_v-3`` -> ``attn_q+attn_k+attn_v-3``."""
    roles = [n.rsplit("-", 1) for n in names]
    if all(len(r) == 2 and r[1] == roles[0][1] for r in roles):
        return "+".join(r[0] for r in roles) + "-" + roles[0][1]
    return "+".join(names)


def _packed_product(members: list[Node], x: Node, w: Node, spec: str, k: int) -> list[Node]:
    """One einsum of ``x`` with the packed weight ``w`` (value id ``k`` unless it stands alone)
    and, for several members, a ``split`` view per member under the member's id."""
    rows = [m.shape[-1] for m in members]
    first = members[0]
    mm = Node(
        k if len(members) > 1 else first.id,
        Op.EINSUM,
        (x.id, w.id),
        {"spec": spec},
        (*x.shape[:-1], sum(rows)),
        first.dtype,
        _group_name([m.name for m in members]),
        first.tags | {Tag.PACKED},
    )
    new = [mm]
    if len(members) > 1:
        start = 0
        for m, r in zip(members, rows, strict=True):
            attrs = {"start": start, "stop": start + r}
            new.append(Node(m.id, Op.SPLIT, (mm.id,), attrs, m.shape, m.dtype, m.name, m.tags))
            start += r
    return new


def _pack_quantized(members: list[Node], nodes: dict[int, Node], k: int) -> list[Node]:
    """Packed params (integers, scales, zero points concatenated along the output rows: the
    quantisation is per row, so the parts stay valid) and their ``dequantize``."""
    deqs = [nodes[m.inputs[1]] for m in members]
    rows = [d.shape[0] for d in deqs]
    leaves = []
    for j, part in enumerate(nodes[i] for i in deqs[0].inputs):
        parts = [nodes[d.inputs[j]] for d in deqs]
        keys = [p.attrs["key"] for p in parts]
        of = "+".join(p.attrs["quant"].of for p in parts)
        attrs = {
            "key": "+".join(keys),
            "quant": dataclasses.replace(
                part.attrs["quant"], of=of, shape=(sum(rows), deqs[0].shape[1])
            ),
            "pack": tuple(
                PackMember(p.attrs["key"], r, p.attrs["quant"].of)
                for p, r in zip(parts, rows, strict=True)
            ),
        }
        shape = (sum(rows), part.shape[1])
        name = _group_name([p.name for p in parts])
        leaves.append(Node(k + j, Op.PARAM, (), attrs, shape, part.dtype, name, part.tags))
    shape = (sum(rows), deqs[0].shape[1])
    name = _group_name([d.name for d in deqs])
    k += len(leaves)
    deq = Node(
        k,
        Op.DEQUANTIZE,
        tuple(x.id for x in leaves),
        deqs[0].attrs,
        shape,
        "f32",
        name,
        deqs[0].tags,
    )
    return [*leaves, deq]


def _transpose_tied_embedding(
    graph: Graph, nodes: dict[int, Node], uses: dict[int, list[int]]
) -> dict[int, Node]:
    """A tied embedding read by one gather and one output projection is stored (d, v): the
    head streams it row-major, the gather picks columns. Returns the replaced nodes."""
    for w in graph.params():
        readers = [nodes[u] for u in uses[w.id]]
        if w.dtype != "f32" or "pack" in w.attrs or len(readers) != 2:
            continue
        gather = next((r for r in readers if r.op is Op.GATHER and r.inputs[0] == w.id), None)
        head = next((r for r in readers if r.op is Op.EINSUM and Tag.LINEAR in r.tags), None)
        if gather is None or head is None or head.inputs[1] != w.id:
            continue
        lead = head.attrs["spec"].split("d,")[0]
        if head.attrs["spec"] != f"{lead}d,vd->{lead}v":
            continue
        key = w.attrs["key"]
        return {
            w.id: w.with_(
                attrs={"key": key, "pack": (PackMember(key, w.shape[0]),)},
                shape=(w.shape[1], w.shape[0]),
            ),
            gather.id: gather.with_(attrs={**gather.attrs, "transposed": True}),
            # (batch, seq, d) x (d, vocab) -> (batch, seq, vocab)
            head.id: head.with_(
                attrs={"spec": f"{lead}d,dv->{lead}v"}, tags=head.tags | {Tag.PACKED}
            ),
        }
    return {}


def run(graph: Graph, ctx: PassContext) -> Graph:
    """Replace the plain linears of an inference graph by packed, transposed ones, and the
    quantised linears of one input by one packed quantised product."""
    nodes, uses = graph.by_id(), graph.consumers()
    groups: dict[tuple, list[Node]] = {}  # (input value, kind) -> its linears, in order
    for n in graph.nodes:
        kind = _packable(n, nodes, uses)
        if kind is not None:
            groups.setdefault((n.inputs[0], kind), []).append(n)
    next_id = max(nodes) + 1
    placed: dict[int, list[Node]] = {}  # first member's weight id -> the nodes replacing it
    replace: dict[int, list[Node]] = {}  # first member's einsum id -> new einsum + splits
    dropped: set[int] = set()
    for (x_id, kind), members in groups.items():
        first, x = members[0], nodes[x_id]
        lead = first.attrs["spec"].split("i,")[0]
        weights = [nodes[m.inputs[1]] for m in members]
        if kind == ("f32",):
            rows = [w.shape[0] for w in weights]
            keys = [w.attrs["key"] for w in weights]
            w = Node(
                next_id,
                Op.PARAM,
                (),
                {
                    "key": "+".join(keys),
                    "pack": tuple(PackMember(k, r) for k, r in zip(keys, rows, strict=True)),
                },
                (weights[0].shape[1], sum(rows)),
                "f32",
                _group_name([w.name for w in weights]) if len(members) > 1 else weights[0].name,
                weights[0].tags,
            )
            placed[weights[0].id] = [w]
            # (batch, seq, in) x (in, out) -> (batch, seq, out)
            replace[first.id] = _packed_product(members, x, w, f"{lead}i,io->{lead}o", next_id + 1)
            next_id += 2
        elif len(members) > 1:
            made = _pack_quantized(members, nodes, next_id)
            placed[weights[0].id] = made
            dropped.update(i for w in weights for i in w.inputs)
            # (batch, seq, in) x (out, in) -> (batch, seq, out)
            spec = f"{lead}i,oi->{lead}o"
            replace[first.id] = _packed_product(members, x, made[-1], spec, next_id + len(made))
            next_id += len(made) + 1
        else:
            continue
        dropped.update(m.id for m in members[1:])
        dropped.update(wt.id for wt in weights[1:])
    transposed = _transpose_tied_embedding(graph, nodes, uses)
    out = []
    for n in graph.nodes:
        if n.id in transposed:
            out.append(transposed[n.id])
        elif n.id in placed:
            out.extend(placed[n.id])
        elif n.id in replace:
            out.extend(replace[n.id])
        elif n.id not in dropped:
            out.append(n)
    return graph.replace_nodes(out)
