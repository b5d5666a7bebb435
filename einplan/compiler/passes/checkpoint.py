"""Activation checkpointing: forward values the reverse graph reads are computed again there
from values the step keeps, instead of staying alive from the forward pass to the backward.

The policy (compiler/checkpoint_policy.py) picks the recomputed values. ``layers`` and
``every:K`` recompute every value of a segment of K layers that no other segment reads: only
each segment's input (the residual stream entering it) stays alive. ``selective`` recomputes
the elementwise values (norms, the SwiGLU product) whose inputs the reverse graph keeps anyway.

Each reverse step that read a recomputed value reads a copy instead: the same op, attrs and
shapes, so the same kernels compute the same bits. The copies of a segment read its kept
values through ``after`` views that also depend on the cotangent arriving at the segment, so
the schedule (which places each step as early as its inputs allow) cannot move the
recomputation into the forward pass. Copies and views are tagged ``reverse`` and
``recompute``; copies keep their forward names (``attn_q-3``), views are ``<value>.checkpoint``.

Under every policy, ``none`` included, a 16-bit copy of a weight (the cast of a float32 master
weight in a bf16/f16 plan) that the reverse graph reads is cast again there rather than kept
from the forward pass: the cast reads the master weight, which stays alive anyway, so keeping
the copy would only hold a second, 16-bit set of the weights through the step (measured on
SmolLM2-135M bf16 4x256: see benchmarks/mixed_precision.py).
"""

from __future__ import annotations

from einplan.compiler.checkpoint_policy import parse_checkpoint
from einplan.compiler.dtypes import LOW_PRECISION
from einplan.compiler.ir import Graph, Node
from einplan.compiler.names import layer_of
from einplan.compiler.ops import LEAVES, Op
from einplan.compiler.pipeline import PassContext
from einplan.compiler.tags import Tag

# ops ``selective`` recomputes: cheap elementwise and row-wise work, no contraction
ELEMENTWISE = frozenset(
    {
        Op.ADD,
        Op.MUL,
        Op.SCALE,
        Op.CAST,
        Op.RMS_NORM,
        Op.ROPE,
        Op.SOFTMAX,
        Op.SILU_MUL,
        Op.SIGMOID,
        Op.DROPOUT,
        Op.FAKE_QUANT,
    }
)
# never recomputed: MoE steps share activations with their reverse steps (runtime/moe.py)
KEPT_OPS = frozenset({Op.MOE_TOPK, Op.MOE_EXPERT, Op.MOE_AUX_LOSS, Op.KV_APPEND, Op.AFTER})
RECOMPUTED_TAGS = frozenset({Tag.REVERSE, Tag.RECOMPUTE})


def run(graph: Graph, ctx: PassContext) -> Graph:
    """Rewrite the reverse graph to recompute the values ``ctx.checkpoint`` does not keep."""
    policy = parse_checkpoint(ctx.checkpoint)
    nodes = graph.by_id()
    forward = [n for n in graph.nodes if n.op not in LEAVES and Tag.REVERSE not in n.tags]
    recast = weight_casts(graph, nodes, forward)
    if policy.kind == "none" and not recast:
        return graph
    segment = {
        n.id: policy.segment_of(layer)
        for n in forward
        if (layer := layer_of(n.name)) is not None and n.op not in KEPT_OPS
    }
    for i in recast:  # a cast outside the layers is cast again on its own
        segment.setdefault(i, -1 - i)
    if policy.kind == "selective":
        recompute = selective_values(graph, nodes, forward, segment)
    elif policy.kind == "none":
        recompute = set()
    else:
        recompute = segment_values(graph, nodes, forward, segment)
    recompute |= recast
    out = Rewriter(graph, nodes, {n.id for n in forward}, segment, recompute).run()
    out.meta["checkpoint"] = {
        "policy": ctx.checkpoint,
        "recomputed_steps": sum(Op.AFTER is not n.op for n in out.nodes if recomputed(n)),
    }
    return out


def recomputed(n: Node) -> bool:
    """Whether the checkpoint pass made ``n`` (a recomputed value or a view of a kept one)."""
    return Tag.RECOMPUTE in n.tags


def weight_casts(graph: Graph, nodes: dict[int, Node], forward: list[Node]) -> set[int]:
    """The 16-bit casts of weights (a leaf cast to bf16/f16) that reverse steps read."""
    read = {i for n in graph.nodes if Tag.REVERSE in n.tags for i in n.inputs}
    return {
        n.id
        for n in forward
        if n.op is Op.CAST
        and n.id in read
        and n.dtype in LOW_PRECISION
        and nodes[n.inputs[0]].op in LEAVES
    }


def segment_values(
    graph: Graph, nodes: dict[int, Node], forward: list[Node], segment: dict[int, int]
) -> set[int]:
    """Values of a segment that no step outside it reads and that depend on a computed value
    (a weight's cast stays): all but the residual stream between segments."""
    consumers = graph.consumers()
    outputs = set(graph.outputs.values())
    forward_ids = {n.id for n in forward}
    out = set()
    for n in forward:
        s = segment.get(n.id)
        if s is None or n.id in outputs or all(nodes[i].op in LEAVES for i in n.inputs):
            continue
        if all(segment.get(c) == s for c in consumers[n.id] if c in forward_ids):
            out.add(n.id)
    return out


def selective_values(
    graph: Graph, nodes: dict[int, Node], forward: list[Node], segment: dict[int, int]
) -> set[int]:
    """Elementwise values the reverse graph reads whose computed inputs it reads too (kept
    anyway), so recomputing them frees their buffers at the cost of a cheap op."""
    forward_ids = {n.id for n in forward}
    saved = {i for n in graph.nodes if Tag.REVERSE in n.tags for i in n.inputs} & forward_ids
    out: set[int] = set()
    for n in forward:
        if n.id not in saved or n.id not in segment or n.op not in ELEMENTWISE:
            continue
        computed = [i for i in n.inputs if nodes[i].op not in LEAVES]
        if computed and all(i in saved and i not in out for i in computed):
            out.add(n.id)
    return out


class Rewriter:
    """Walks the graph once, inserting each segment's copies before the first reverse step
    that reads them."""

    def __init__(
        self,
        graph: Graph,
        nodes: dict[int, Node],
        forward: set[int],
        segment: dict[int, int],
        recompute: set[int],
    ) -> None:
        self.graph, self.nodes, self.forward = graph, nodes, forward
        self.segment, self.recompute = segment, recompute
        self.next_id = max((n.id for n in graph.nodes), default=-1) + 1
        self.copies: dict[int, dict[int, int]] = {}  # segment -> forward value -> its copy
        self.views: dict[int, dict[int, int]] = {}  # segment -> kept value -> its after view
        self.dep: dict[int, int | None] = {}  # segment -> the reverse value copies wait for

    def run(self) -> Graph:
        """Return the graph with its reverse steps reading copies of the recomputed values."""
        out: list[Node] = []
        for n in self.graph.nodes:
            if Tag.REVERSE in n.tags and any(i in self.recompute for i in n.inputs):
                inputs = []
                for i in n.inputs:
                    if i in self.recompute:
                        s = self.segment[i]
                        if s not in self.dep:
                            self.dep[s] = next(
                                (
                                    j
                                    for j in n.inputs
                                    if j not in self.forward and self.nodes[j].op not in LEAVES
                                ),
                                None,
                            )
                        i = self.copy(i, s, out)
                    inputs.append(i)
                n = n.with_(inputs=tuple(inputs))
            out.append(n)
        return self.graph.replace_nodes(out)

    def copy(self, i: int, s: int, out: list[Node]) -> int:
        """The id of segment ``s``'s copy of value ``i``, appending it (and the copies and
        views it reads) to ``out`` when it is new."""
        done = self.copies.setdefault(s, {})
        if i in done:
            return done[i]
        n = self.nodes[i]
        inputs = []
        for j in n.inputs:
            if j in self.recompute:
                inputs.append(self.copy(j, s, out))
            elif self.dep[s] is None or (self.nodes[j].op in LEAVES and n.op is not Op.CAST):
                # a leaf is read as it is, but for a weight cast again (a recomputed cast of a
                # leaf is one of weight_casts): through a view that waits for the cotangent,
                # else the schedule would cast it at the start of the step
                inputs.append(j)
            else:
                inputs.append(self.view(j, s, out))
        done[i] = self.append(n.with_(inputs=tuple(inputs), tags=n.tags | RECOMPUTED_TAGS), out)
        return done[i]

    def view(self, j: int, s: int, out: list[Node]) -> int:
        """Segment ``s``'s ``after`` view of the kept value ``j``."""
        done = self.views.setdefault(s, {})
        if j not in done:
            kept = self.nodes[j]
            dep = self.dep[s]
            assert dep is not None
            view = Node(
                0,
                Op.AFTER,
                (j, dep),
                {},
                kept.shape,
                kept.dtype,
                f"{kept.name}.checkpoint",
                RECOMPUTED_TAGS,
            )
            done[j] = self.append(view, out)
        return done[j]

    def append(self, n: Node, out: list[Node]) -> int:
        n = n.with_(id=self.next_id)
        self.next_id += 1
        out.append(n)
        return n.id
