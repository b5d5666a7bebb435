"""Mixed precision: every arithmetic step on 16-bit (bf16, f16) values computes in float32.

Values stay stored in the compute dtype (activations, the 16-bit copies of the weights, the
reverse graph's cotangents); each step that does arithmetic on them is tagged ``upcast``: the
runtime upcasts its inputs to float32, runs the float32 kernel (so every sum, norm, softmax and
product accumulates in float32) and rounds the output once. Steps that only move values
(reshape, transpose, slices, the KV cache, casts, gathers) run on the 16-bit data as it is.

The pass then audits the graph against the rules of a mixed-precision plan
(:func:`audit_precision`): float32 master weights, optimizer state and gradient accumulators,
the loss and its cotangent in float32, the activations in the compute dtype, every 16-bit
arithmetic step tagged. A graph breaking a rule is a compiler bug, reported by name.
"""

from __future__ import annotations

from einplan.compiler.dtypes import LOW_PRECISION
from einplan.compiler.ir import Graph, Node
from einplan.compiler.names import GRAD_PREFIX, OPTIM_PREFIX
from einplan.compiler.ops import LEAVES, Op, ShapeError
from einplan.compiler.pipeline import PassContext
from einplan.compiler.tags import Tag

# ops that only move or convert values: no arithmetic, so no precision to lose
MOVES = frozenset(
    {
        Op.RESHAPE,
        Op.TRANSPOSE,
        Op.SLICE_LAST,
        Op.SPLIT,
        Op.KV_APPEND,
        Op.EXPAND,
        Op.CAST,
        Op.GATHER,
        Op.AFTER,
    }
)
# the steps that must run in the compute dtype: the model's products, norms and activations
# and their reverse ops
IN_COMPUTE_DTYPE = frozenset(
    {
        Op.EINSUM,
        Op.RMS_NORM,
        Op.SOFTMAX,
        Op.SILU_MUL,
        Op.ROPE,
        Op.RMS_NORM_GRAD,
        Op.SOFTMAX_GRAD,
        Op.SILU_MUL_GRAD,
        Op.CROSS_ENTROPY_GRAD,
    }
)
MASTER = "f32"  # the dtype of master weights, optimizer state, loss


def touches_low_precision(n: Node, nodes: dict[int, Node]) -> bool:
    """Whether a step reads or writes a 16-bit float value."""
    return n.dtype in LOW_PRECISION or any(nodes[i].dtype in LOW_PRECISION for i in n.inputs)


def needs_upcast(n: Node, nodes: dict[int, Node]) -> bool:
    """Whether a step does arithmetic on 16-bit values (and so must compute in float32)."""
    return n.op not in LEAVES and n.op not in MOVES and touches_low_precision(n, nodes)


def audit_precision(graph: Graph, compute_dtype: str) -> list[str]:
    """The rules of a mixed-precision graph this one breaks, one line each (empty: none)."""
    nodes = graph.by_id()
    problems = []
    for n in graph.nodes:
        if n.op is Op.PARAM and Tag.FROZEN not in n.tags and n.dtype != MASTER:
            problems.append(f"trained weight {n.name} is {n.dtype}, not {MASTER} (master weights)")
        elif n.op is Op.STATE and n.attrs["key"].startswith((GRAD_PREFIX, OPTIM_PREFIX)):
            if n.dtype != MASTER:
                problems.append(f"optimizer state {n.name} is {n.dtype}, not {MASTER}")
        elif n.op is Op.INPUT and n.name == "loss_grad" and n.dtype != MASTER:
            problems.append(f"the loss's cotangent is {n.dtype}, not {MASTER}")
        elif needs_upcast(n, nodes) and Tag.UPCAST not in n.tags:
            problems.append(f"{n.name} ({n.op.value}) computes on 16-bit values without upcast")
        elif n.op in IN_COMPUTE_DTYPE and n.dtype != compute_dtype:
            problems.append(f"{n.name} ({n.op.value}) is {n.dtype}, not {compute_dtype}")
    for out in ("loss", "grad_norm"):
        if out in graph.outputs and nodes[graph.outputs[out]].dtype != MASTER:
            problems.append(f"output {out} is {nodes[graph.outputs[out]].dtype}, not {MASTER}")
    return problems


def run(graph: Graph, ctx: PassContext) -> Graph:
    """Tag every arithmetic step on 16-bit values ``upcast``; audit a mixed-precision graph."""
    nodes = graph.by_id()
    tagged = [
        n.with_(tags=n.tags | {Tag.UPCAST}) if needs_upcast(n, nodes) else n for n in graph.nodes
    ]
    out = graph.replace_nodes(tagged)
    if ctx.compute_dtype in LOW_PRECISION:
        problems = audit_precision(out, ctx.compute_dtype)
        if problems:
            raise ShapeError(f"mixed precision, graph {graph.name}: " + "; ".join(problems[:5]))
    return out
