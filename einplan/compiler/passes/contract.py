"""Plan every contraction: opt-einsum orders n-ary einsums into pairwise ones, and each
pairwise einsum is lowered to a transpose/reshape + ``np.matmul`` recipe stored in its attrs.

The recipe depends only on the spec, so one plan serves every batch and sequence length; the
runtime turns it into concrete reshapes when it binds sizes and never calls ``np.einsum`` or
opt-einsum itself.
"""

from __future__ import annotations

from einplan.compiler.attrs import MatmulRecipe, QMatmulRecipe, UnaryRecipe
from einplan.compiler.ir import Graph, Node
from einplan.compiler.ops import Op, ShapeError, einsum_sizes, parse_spec
from einplan.compiler.path_cache import PathCache
from einplan.compiler.pipeline import PassContext
from einplan.compiler.symbolic import resolve_shape


def lower_einsum(spec: str) -> UnaryRecipe | MatmulRecipe:
    """Lower a one- or two-operand einsum to a matmul recipe.

    Two operands ``A, B -> C``: sum away indices only one operand has and the output lacks,
    permute A to (batch, a_free, contracted) and B to (batch, contracted, b_free), multiply as
    ``[batch] (M x K) @ (K x N)``, then permute the (batch, a_free, b_free) result to C's order.
    One operand: sum away missing indices and permute.
    """
    terms, out = parse_spec(spec)
    if len(terms) == 1:
        (a,) = terms
        kept = [c for c in a if c in out]
        return UnaryRecipe(
            sum_axes=[i for i, c in enumerate(a) if c not in out],
            perm=[kept.index(c) for c in out],
        )
    a, b = terms
    a_sum = [i for i, c in enumerate(a) if c not in b and c not in out]
    b_sum = [i for i, c in enumerate(b) if c not in a and c not in out]
    a2 = "".join(c for c in a if c in b or c in out)
    b2 = "".join(c for c in b if c in a or c in out)
    batch = [c for c in out if c in a2 and c in b2]
    contr = [c for c in a2 if c in b2 and c not in out]
    a_free = [c for c in out if c in a2 and c not in b2]
    b_free = [c for c in out if c in b2 and c not in a2]
    order = batch + a_free + b_free
    return MatmulRecipe(
        a_sum=a_sum,
        b_sum=b_sum,
        a_perm=[a2.index(c) for c in batch + a_free + contr],
        b_perm=[b2.index(c) for c in batch + contr + b_free],
        groups=[len(batch), len(a_free), len(contr), len(b_free)],
        out_perm=[order.index(c) for c in out],
    )


def lower_dequantized(n: Node, w: Node) -> QMatmulRecipe:
    """The recipe of ``x . W^T`` or ``dy . W`` whose W is dequantized on the fly: the runtime
    multiplies block by block from the packed integers (runtime/qmatmul.py)."""
    terms, out = parse_spec(n.attrs["spec"])
    if len(terms) != 2 or n.inputs[1] != w.id or n.inputs[0] == w.id:
        raise ShapeError(f"{n.name}: a dequantized weight must be the second of two operands")
    (a, b) = terms
    lead_ok = a[:-1] == out[:-1] and len(b) == 2
    if lead_ok and a[-1] == b[1] and out[-1] == b[0]:
        transposed = False
    elif lead_ok and a[-1] == b[0] and out[-1] == b[1]:
        transposed = True
    else:
        raise ShapeError(
            f"{n.name}: einsum {n.attrs['spec']!r} reads a dequantized weight in a way the "
            "block kernel does not do (only x.W^T and dy.W)"
        )
    return QMatmulRecipe(transposed=transposed, bits=w.attrs["bits"], group=w.attrs["group"])


def _split_nary(
    n: Node, nodes: dict[int, Node], next_id: int, cache: PathCache, typical: dict[str, int]
) -> list[Node]:
    """Replace an einsum of three or more operands by the pairwise einsums of its best path."""
    spec = n.attrs["spec"]
    terms, out = parse_spec(spec)
    shapes = [nodes[i].shape for i in n.inputs]
    letters = einsum_sizes(spec, shapes)
    path = cache.find_path(spec, [resolve_shape(s, typical) for s in shapes])
    operands = list(zip(terms, n.inputs, strict=True))
    made: list[Node] = []
    for step, pair in enumerate(path):
        picked = [operands[i] for i in pair]
        for i in sorted(pair, reverse=True):
            operands.pop(i)
        rest = "".join(t for t, _ in operands) + out
        if step == len(path) - 1:
            result = out
        else:
            seen = "".join(t for t, _ in picked)
            result = "".join(dict.fromkeys(c for c in seen if c in rest))
        sub = ",".join(t for t, _ in picked) + "->" + result
        last = step == len(path) - 1
        node = Node(
            n.id if last else next_id + step,
            Op.EINSUM,
            tuple(i for _, i in picked),
            {"spec": sub},
            tuple(letters[c] for c in result),
            n.dtype,
            n.name if last else f"{n.name}.part{step}",
            n.tags,
        )
        made.append(node)
        operands.append((result, node.id))
    return made


def run(graph: Graph, ctx: PassContext) -> Graph:
    """Order every n-ary einsum with opt-einsum and attach a matmul recipe to each pairwise one."""
    cache = PathCache(ctx.path_cache, ctx.use_path_cache)
    nodes = graph.by_id()
    next_id = max(nodes) + 1
    out: list[Node] = []
    for n in graph.nodes:
        if n.op is not Op.EINSUM:
            out.append(n)
            continue
        shapes = [nodes[i].shape for i in n.inputs]
        sizes = [resolve_shape(s, ctx.typical_dims) for s in shapes]
        if len(n.inputs) > 2:
            parts = _split_nary(n, nodes, next_id, cache, ctx.typical_dims)
            next_id += len(parts)
        else:
            cache.find_path(n.attrs["spec"], sizes)  # records the planner's view of it too
            parts = [n]
        for p in parts:
            nodes[p.id] = p
            deq = [nodes[i] for i in p.inputs if nodes[i].op is Op.DEQUANTIZE]
            recipe = lower_dequantized(p, deq[0]) if deq else lower_einsum(p.attrs["spec"])
            out.append(p.with_(attrs={**p.attrs, "recipe": recipe}))
    cache.save()
    graph = graph.replace_nodes(out)
    graph.meta["path_cache"] = {"hits": cache.hits, "misses": cache.misses}
    return graph
