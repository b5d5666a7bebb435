"""The IR: one node type, one op enum, a graph in linear SSA form.

A :class:`Graph` is a list of :class:`Node` in topological order; each node
defines one value, used only after its definition. ``str(graph)`` prints one
line per node in the style of a jaxpr, and :meth:`Graph.verify` re-checks the
invariants every pass must keep.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from einplan.compiler.attrs import StepSchedule
from einplan.compiler.names import STATE_PREFIXES
from einplan.compiler.ops import ITEMSIZE, LEAVES, OPS, Op, ShapeError, count_bytes
from einplan.compiler.symbolic import Dim, Poly, Shape, add_polys, numel, scale_poly
from einplan.compiler.tags import Tag


@dataclass(frozen=True)
class Node:
    """One SSA value: ``id = op[attrs](*inputs)`` with its inferred shape and dtype."""

    id: int
    op: Op
    inputs: tuple[int, ...]
    attrs: dict[str, Any]
    shape: Shape
    dtype: str
    name: str = ""
    tags: frozenset[Tag] = frozenset()

    def ref(self) -> str:
        """How other lines of the printed graph refer to this value."""
        return f"%{self.name}" if self.op in LEAVES else f"%{self.id}"

    def phase(self) -> str:
        """The part of a training step the node belongs to (see :func:`training_phase`)."""
        return training_phase(self.tags)

    def with_(self, **changes: Any) -> Node:
        """Return a copy with some fields replaced."""
        return replace(self, **changes)


def training_phase(tags: Iterable[str]) -> str:
    """The part of a training step a node belongs to, by the tags the autodiff and optimizer
    passes give: ``forward``, ``backward`` or ``optimizer``."""
    tags = set(tags)
    if Tag.OPTIMIZER in tags:
        return "optimizer"
    return "backward" if Tag.REVERSE in tags else "forward"


def format_type(shape: Shape, dtype: str) -> str:
    """Render ``f32[batch,seq,576]``."""
    return f"{dtype}[{','.join(str(d) for d in shape)}]"


def format_attr(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "(" + ",".join(str(v) for v in value) + ")"
    return str(value)


def format_annotation(ann: StepSchedule | None) -> str:
    """Render a step's schedule: ``L3.1`` (level, thread), ``buf2`` (slot), ``free %8 %10``."""
    if ann is None:
        return ""
    parts = [f"L{ann.level}.{ann.thread}"]
    if ann.slot is not None:
        parts.append(f"buf{ann.slot}")
    if ann.free_after:
        parts.append("free " + " ".join(f"%{v}" for v in ann.free_after))
    return "  | " + " ".join(parts)


@dataclass
class Graph:
    """Nodes in topological order plus the named outputs of the computation."""

    nodes: list[Node] = field(default_factory=list)
    outputs: dict[str, int] = field(default_factory=dict)
    dims: dict[str, int] = field(default_factory=dict)  # symbolic dim -> its upper limit
    name: str = "forward"
    annotations: dict[int, StepSchedule] = field(default_factory=dict)  # per step: schedule
    meta: dict[str, Any] = field(default_factory=dict)  # per graph: slots, peak, pass stats
    # steps run for their side effect (in-place optimizer updates) that no output reads
    effects: list[int] = field(default_factory=list)

    def replace_nodes(
        self,
        nodes: list[Node],
        outputs: dict[str, int] | None = None,
        effects: list[int] | None = None,
    ) -> Graph:
        """Return a graph with new nodes and the same dims, annotations and meta."""
        return Graph(
            nodes,
            dict(self.outputs if outputs is None else outputs),
            dict(self.dims),
            self.name,
            dict(self.annotations),
            dict(self.meta),
            list(self.effects if effects is None else effects),
        )

    def by_id(self) -> dict[int, Node]:
        """Return a map from value id to node."""
        return {n.id: n for n in self.nodes}

    def params(self) -> list[Node]:
        """Return the parameter leaves in order."""
        return [n for n in self.nodes if n.op is Op.PARAM]

    def states(self) -> list[Node]:
        """Return the state leaves (persistent buffers such as the KV cache) in order."""
        return [n for n in self.nodes if n.op is Op.STATE]

    def inputs(self) -> list[Node]:
        """Return the input leaves in order."""
        return [n for n in self.nodes if n.op is Op.INPUT]

    def consumers(self) -> dict[int, list[int]]:
        """Return, for each value id, the ids of the nodes that read it."""
        uses: dict[int, list[int]] = {n.id: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                uses[i].append(n.id)
        return uses

    def format_line(self, n: Node, nodes: dict[int, Node]) -> str:
        """Render one node as a jaxpr-like line."""
        hidden = OPS[n.op].hidden_attrs
        attrs = ",".join(
            (format_attr(v) if k in ("spec", "key") else f"{k}={format_attr(v)}")
            for k, v in n.attrs.items()
            if k not in hidden
        )
        head = f"{n.ref()}:{format_type(n.shape, n.dtype)} = {n.op.value}"
        if attrs:
            head += f"[{attrs}]"
        args = " ".join(nodes[i].ref() for i in n.inputs)
        line = f"{head} {args}".rstrip()
        if n.op not in LEAVES and n.name:
            tags = f" {{{','.join(sorted(n.tags))}}}" if n.tags else ""
            line = f"{line:<72} # {n.name}{tags}{format_annotation(self.annotations.get(n.id))}"
        return line

    def format(self, keep: Collection[int] | None = None) -> str:
        """Render the graph, or only the nodes (and outputs) whose ids are in ``keep``, one
        jaxpr-like line per node."""
        nodes = self.by_id()
        dims = ", ".join(f"{k}<={v}" for k, v in self.dims.items())
        lines = [f"graph {self.name}({dims}) {{"]
        lines += [
            "  " + self.format_line(n, nodes) for n in self.nodes if keep is None or n.id in keep
        ]
        outs = [(k, v) for k, v in self.outputs.items() if keep is None or v in keep]
        if keep is None or outs:
            ret = ", ".join(f"{k}={nodes[v].ref()}" for k, v in outs)
            if self.effects and keep is None:
                ret += f"; effects {len(self.effects)} steps"
            lines.append(f"  return {ret}")
        lines.append("}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def verify(self) -> None:
        """Check SSA order, unique names of leaves, each op's number of inputs (none for a
        leaf) and the types of the attrs it reads (compiler/ops.py), every dim declared, and
        re-infer every shape and dtype.

        Raises :class:`ShapeError` naming the first node that breaks an invariant.
        """
        seen: dict[int, Node] = {}
        leaf_names: set[str] = set()
        for n in self.nodes:
            where = f"node %{n.id} ({n.name or n.op.value})"
            if n.id in seen:
                raise ShapeError(f"{where}: value %{n.id} defined twice")
            for i in n.inputs:
                if i not in seen:
                    raise ShapeError(f"{where}: input %{i} used before it is defined")
            try:
                OPS[n.op].check(len(n.inputs), n.attrs)
            except ShapeError as e:
                raise ShapeError(f"{where}: op {n.op.value} {e}") from None
            for d in n.shape:
                check_dim(d, self.dims, where)
            if n.op in LEAVES:
                if n.name in leaf_names:
                    raise ShapeError(f"{where}: two leaves named {n.name!r}")
                leaf_names.add(n.name)
                if n.op is not Op.INPUT:
                    check_leaf_key(n, where)
            else:
                ins = [seen[i] for i in n.inputs]
                try:
                    shape, dtype = OPS[n.op].infer(
                        [x.shape for x in ins], [x.dtype for x in ins], n.attrs
                    )
                except ShapeError as e:
                    raise ShapeError(f"{where}: {e}") from None
                except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
                    raise ShapeError(f"{where}: attrs do not fit op {n.op.value} ({e!r})") from None
                if tuple(shape) != tuple(n.shape) or dtype != n.dtype:
                    raise ShapeError(
                        f"{where}: recorded {format_type(n.shape, n.dtype)} but inputs give "
                        f"{format_type(shape, dtype)}"
                    )
            seen[n.id] = n
        for k, v in self.outputs.items():
            if v not in seen:
                raise ShapeError(f"output {k!r} names undefined value %{v}")
        for v in self.effects:
            if v not in seen:
                raise ShapeError(f"effect step %{v} is not defined")


def check_leaf_key(n: Node, where: str) -> None:
    """A state's key names its role (KV cache, gradient accumulator, optimizer moment), a
    param's a checkpoint tensor: a leaf whose key says the other is not one the runtime can
    bind."""
    is_state_key = n.attrs["key"].startswith(STATE_PREFIXES)
    if is_state_key != (n.op is Op.STATE):
        kind = "state" if n.op is Op.STATE else "param"
        raise ShapeError(f"{where}: {kind} with key {n.attrs['key']!r}")


def check_dim(d: Dim, dims: dict[str, int], where: str) -> None:
    """Reject negative sizes and symbolic dims the graph does not declare."""
    if isinstance(d, str):
        if d not in dims:
            raise ShapeError(f"{where}: symbolic dim {d!r} is not declared (have {sorted(dims)})")
    elif not isinstance(d, int) or d < 0:
        raise ShapeError(f"{where}: bad dimension {d!r}")


def step_bytes(n: Node, nodes: dict[int, Node]) -> Poly:
    """Bytes one step reads and writes. An einsum operand dequantized on the fly is read as the
    packed integers and scales it is made of, not as the float32 matrix it stands for."""
    ins = [nodes[i] for i in n.inputs]
    total = count_bytes(n.op, [x.shape for x in ins], [x.dtype for x in ins], n.shape, n.dtype)
    if n.op is Op.EINSUM:
        for x in ins:
            if x.op is Op.DEQUANTIZE:
                packed = [nodes[i] for i in x.inputs]
                total = add_polys(
                    total,
                    scale_poly(numel(x.shape), -ITEMSIZE[x.dtype]),
                    *(scale_poly(numel(p.shape), ITEMSIZE[p.dtype]) for p in packed),
                )
    return total
