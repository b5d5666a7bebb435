"""The builder that model code calls: each method appends one node to a graph.

Model code never touches arrays; it describes the computation through these
calls and gets back :class:`Value` handles carrying shape and dtype, so shape
errors surface at trace time with the name of the node that caused them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from einplan.compiler.ir import Graph, Node
from einplan.compiler.ops import OPS, Op, ShapeError
from einplan.compiler.symbolic import Shape
from einplan.compiler.tags import Tag


@dataclass(frozen=True)
class Value:
    """A handle on a traced value."""

    id: int
    shape: Shape
    dtype: str


class Builder:
    """Traces model code into a :class:`Graph`."""

    def __init__(self, dims: dict[str, int], name: str = "forward") -> None:
        self.graph = Graph(dims=dict(dims), name=name)
        self._layer: int | None = None
        self._tags: frozenset[Tag] = frozenset()
        self._next_id = 0

    @classmethod
    def extend(cls, graph: Graph) -> Builder:
        """A builder appending to a copy of ``graph`` (the autodiff and optimizer passes)."""
        b = cls(graph.dims, graph.name)
        b.graph = graph.replace_nodes(list(graph.nodes))
        b._next_id = max((n.id for n in graph.nodes), default=-1) + 1
        return b

    def value(self, node: Node) -> Value:
        """The handle of an existing node."""
        return Value(node.id, node.shape, node.dtype)

    @contextmanager
    def tagged(self, tag: Tag) -> Iterator[None]:
        """Tag every node made inside the block (``reverse``, ``optimizer``)."""
        prev, self._tags = self._tags, self._tags | {tag}
        try:
            yield
        finally:
            self._tags = prev

    @contextmanager
    def layer(self, index: int) -> Iterator[None]:
        """Name every node made inside the block ``role-index``."""
        prev, self._layer = self._layer, index
        try:
            yield
        finally:
            self._layer = prev

    def _name(self, role: str) -> str:
        if self._layer is None:
            return role
        base, dot, rest = role.partition(".")
        return f"{base}-{self._layer}{dot}{rest}"

    def _append(
        self,
        op: Op,
        inputs: list[Value],
        attrs: dict[str, Any],
        role: str,
        shape: Shape | None = None,
        dtype: str | None = None,
        tags: frozenset[Tag] = frozenset(),
    ) -> Value:
        name = self._name(role)
        if shape is None:
            try:
                shape, dtype = OPS[op].infer(
                    [v.shape for v in inputs], [v.dtype for v in inputs], attrs
                )
            except ShapeError as e:
                raise ShapeError(f"{name} ({op.value}): {e}") from None
        node = Node(
            self._next_id,
            op,
            tuple(v.id for v in inputs),
            attrs,
            tuple(shape),
            dtype,
            name,
            tags | self._tags,
        )
        self._next_id += 1
        self.graph.nodes.append(node)
        return Value(node.id, node.shape, node.dtype)

    def input(self, name: str, shape: Shape, dtype: str) -> Value:
        """Declare a runtime input such as token ids."""
        return self._append(Op.INPUT, [], {}, name, shape, dtype)

    def param(
        self,
        role: str,
        key: str,
        shape: Shape,
        dtype: str = "f32",
        tags: frozenset[Tag] = frozenset(),
    ) -> Value:
        """Declare a weight named ``role-layer`` loaded from checkpoint tensor ``key``."""
        return self._append(Op.PARAM, [], {"key": key}, role, shape, dtype, tags)

    def einsum(
        self, spec: str, *xs: Value, role: str = "einsum", tags: frozenset[Tag] = frozenset()
    ) -> Value:
        """Contract operands by an explicit einsum spec."""
        return self._append(Op.EINSUM, list(xs), {"spec": spec}, role, tags=tags)

    def add(self, a: Value, b: Value, role: str = "add") -> Value:
        """Elementwise sum; ``b`` may broadcast over leading dims of ``a``."""
        return self._append(Op.ADD, [a, b], {}, role)

    def mul(self, a: Value, b: Value, role: str = "mul") -> Value:
        """Elementwise product; ``b`` may broadcast over leading dims of ``a``."""
        return self._append(Op.MUL, [a, b], {}, role)

    def gather(self, table: Value, ids: Value, dtype: str = "f32", role: str = "embed") -> Value:
        """Rows of ``table`` selected by integer ``ids`` (an embedding lookup), as ``dtype``."""
        attrs = {} if dtype == "f32" else {"dtype": dtype}
        return self._append(Op.GATHER, [table, ids], attrs, role)

    def rms_norm(self, x: Value, w: Value, eps: float, role: str = "norm") -> Value:
        """RMS normalisation over the last axis, scaled by ``w``."""
        return self._append(Op.RMS_NORM, [x, w], {"eps": float(eps)}, role)

    def rope_table(
        self, positions: Value, inv_freq: list[float], dtype: str = "f32", role: str = "rope_table"
    ) -> Value:
        """cos and sin of ``positions * inv_freq``, stacked as ``[2, batch, seq, half]``."""
        attrs: dict[str, Any] = {"inv_freq": list(inv_freq)}
        if dtype != "f32":
            attrs["dtype"] = dtype
        return self._append(Op.ROPE_TABLE, [positions], attrs, role)

    def rope(
        self,
        x: Value,
        table: Value,
        scale: float = 1.0,
        inverse: bool = False,
        role: str = "rope",
    ) -> Value:
        """Rotate the last axis of ``x`` (half-split convention) by a rope table, times
        ``scale`` (attention folds its 1/sqrt(head_dim) into q here); ``inverse`` rotates
        back (the transpose of the rotation, for the reverse graph)."""
        attrs: dict[str, Any] = {} if scale == 1.0 else {"scale": float(scale)}
        if inverse:
            attrs["inverse"] = True
        return self._append(Op.ROPE, [x, table], attrs, role)

    def softmax(
        self,
        x: Value,
        scale: float = 1.0,
        causal: bool = False,
        mask: Value | None = None,
        role: str = "softmax",
    ) -> Value:
        """softmax(scale * x + mask) over the last axis; ``causal`` masks keys after the
        query; ``mask`` is an additive (batch, queries, keys) mask (cache, padding)."""
        attrs: dict[str, Any] = {} if scale == 1.0 else {"scale": float(scale)}
        attrs["causal"] = causal
        return self._append(Op.SOFTMAX, [x] if mask is None else [x, mask], attrs, role)

    def kv_append(
        self, cache: Value, new: Value, pos: Value, length: str, role: str = "kv_append"
    ) -> Value:
        """Write ``new`` (b, s, n, h) into the state ``cache`` (b, n, ctx, h) at slots
        ``pos .. pos + s`` and return a view of the first ``length`` slots."""
        return self._append(Op.KV_APPEND, [cache, new, pos], {"length": length}, role)

    def slice_last(self, x: Value, role: str = "last") -> Value:
        """The last position of the sequence axis: (b, s, ...) -> (b, ...)."""
        return self._append(Op.SLICE_LAST, [x], {}, role)

    def state(self, role: str, key: str, shape: Shape, dtype: str = "f32") -> Value:
        """Declare a persistent buffer the runtime owns across runs (a KV cache)."""
        return self._append(Op.STATE, [], {"key": key}, role, shape, dtype)

    def silu_mul(self, gate: Value, up: Value, role: str = "silu_mul") -> Value:
        """silu(gate) * up, the SwiGLU activation."""
        return self._append(Op.SILU_MUL, [gate, up], {}, role)

    def reshape(self, x: Value, shape: Shape, role: str = "reshape") -> Value:
        """A view of ``x`` with a new shape of the same size."""
        return self._append(Op.RESHAPE, [x], {"shape": list(shape)}, role)

    def transpose(self, x: Value, perm: list[int], role: str = "transpose") -> Value:
        """Permute axes (materialised)."""
        return self._append(Op.TRANSPOSE, [x], {"perm": list(perm)}, role)

    def cast(self, x: Value, dtype: str, role: str = "cast") -> Value:
        """Convert to another dtype (bf16/f16 weights to f32 compute)."""
        return self._append(Op.CAST, [x], {"dtype": dtype}, role)

    def scale(self, x: Value, factor: float, role: str = "scale") -> Value:
        """``factor * x`` for a constant factor (LoRA's alpha / r)."""
        return self._append(Op.SCALE, [x], {"factor": float(factor)}, role)

    def dropout(self, x: Value, seed: Value, p: float, stream: int, role: str = "dropout") -> Value:
        """Zero each element with probability ``p``, scale the rest by 1 / (1 - p); the mask
        depends only on (``seed``, ``stream``), so the reverse step can draw it again."""
        return self._append(Op.DROPOUT, [x, seed], {"p": float(p), "stream": stream}, role)

    def expand(self, x: Value, shape: Shape, axes: list[int], role: str = "expand") -> Value:
        """Broadcast ``x`` to ``shape`` by inserting the ``axes`` (materialised)."""
        return self._append(Op.EXPAND, [x], {"shape": list(shape), "axes": list(axes)}, role)

    def scatter_add(self, values: Value, ids: Value, rows: int, role: str = "scatter") -> Value:
        """A (rows, d) table of zeros with each ``values`` row added at its id (the reverse
        of gather)."""
        return self._append(Op.SCATTER_ADD, [values, ids], {"rows": rows}, role)

    def cross_entropy(
        self, logits: Value, targets: Value, ignore_index: int = -100, role: str = "loss"
    ) -> Value:
        """Mean next-token cross entropy of ``logits`` (..., vocab) against integer
        ``targets`` (...); targets equal to ``ignore_index`` (padding) count for nothing."""
        return self._append(
            Op.CROSS_ENTROPY, [logits, targets], {"ignore_index": ignore_index}, role
        )

    def sigmoid(self, x: Value, role: str = "sigmoid") -> Value:
        """1 / (1 + exp(-x)), elementwise (Qwen2-MoE's shared-expert gate)."""
        return self._append(Op.SIGMOID, [x], {}, role)

    def moe_topk(self, probs: Value, k: int, norm: bool, role: str = "moe_topk") -> Value:
        """The routing weights: ``probs`` (..., E) with all but each row's ``k`` largest set to
        zero (ties: the lower expert first), renormalised to sum 1 when ``norm``."""
        return self._append(Op.MOE_TOPK, [probs], {"k": k, "norm": norm}, role)

    def moe_expert(
        self,
        x: Value,
        gates: Value,
        w_gate: Value,
        w_up: Value,
        w_down: Value,
        expert: int,
        k: int,
        role: str = "moe_expert",
    ) -> Value:
        """Expert ``expert``'s SwiGLU FFN on the tokens routed to it (their gate, column
        ``expert`` of ``gates``, is non-zero), times that gate; zero for the other tokens. The
        token count is known only when it runs; ``k`` (experts per token) sizes the FLOP count."""
        attrs = {"expert": expert, "k": k}
        return self._append(Op.MOE_EXPERT, [x, gates, w_gate, w_up, w_down], attrs, role)

    def moe_aux_loss(
        self, probs: list[Value], k: int, coef: float, role: str = "moe_aux_loss"
    ) -> Value:
        """``coef`` times the Switch/Mixtral load-balancing loss over the router probabilities
        of every MoE layer: E * sum_e (share of top-k picks of e) * (mean probability of e)."""
        return self._append(Op.MOE_AUX_LOSS, probs, {"k": k, "coef": float(coef)}, role)

    def backward_op(self, op: Op, inputs: list[Value], attrs: dict[str, Any], role: str) -> Value:
        """A fused reverse-mode op (``*_grad``) of the autodiff pass."""
        return self._append(op, inputs, attrs, role)

    def acc_grad(self, acc: Value, grad: Value, role: str = "acc_grad") -> Value:
        """Add ``grad`` into the state buffer ``acc`` in place (micro-batch accumulation)."""
        return self._append(Op.ACC_GRAD, [acc, grad], {}, role)

    def grad_norm(self, loss: Value, grads: list[Value], role: str = "grad_norm") -> Value:
        """The global L2 norm of all ``grads``, a scalar; NaN when ``loss`` is not finite (so
        the update skips), which also orders every read of the loss before the updates."""
        return self._append(Op.GRAD_NORM, [loss, *grads], {}, role)

    def update(
        self, op: Op, inputs: list[Value], attrs: dict[str, Any], role: str = "update"
    ) -> Value:
        """An in-place optimizer update (adamw, sgd) of the param ``inputs[0]``."""
        return self._append(op, inputs, attrs, role)

    def effect(self, x: Value) -> None:
        """Keep ``x`` (a step run for its side effect) although no output reads it."""
        self.graph.effects.append(x.id)

    def output(self, name: str, x: Value) -> None:
        """Mark ``x`` as a named result of the graph."""
        self.graph.outputs[name] = x.id
