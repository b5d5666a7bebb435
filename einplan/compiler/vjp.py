"""One reverse-mode rule (vector-Jacobian product) per op.

A rule takes the forward node, handles on its inputs and output, the cotangent of the output,
and the positions of the inputs that need a gradient; it appends the reverse nodes through the
builder and returns one cotangent per input (None where none is needed). The einsum rule is
written once for every operand: the gradient of an operand is an einsum of the output's
cotangent with the other operands, so the contract pass plans reverse contractions exactly as
it plans forward ones.
"""

from __future__ import annotations

from collections.abc import Callable

from einplan.compiler.ir import Node
from einplan.compiler.ops import FLASH_INPUTS, MOE_EXPERT_INPUTS, Op, ShapeError, parse_spec
from einplan.compiler.trace import Builder, Value

Rule = Callable[[Builder, Node, list[Value], Value, Value, set[int]], list[Value | None]]
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def vjp_einsum(b: Builder, n: Node, ins: list[Value], out: Value, ct: Value, need: set[int]):
    """d operand k = einsum(cotangent, the other operands -> operand k's term); indices only
    operand k has (summed away in the forward) come back by broadcasting."""
    terms, result = parse_spec(n.attrs["spec"])
    grads: list[Value | None] = []
    for k, (term, x) in enumerate(zip(terms, ins, strict=True)):
        if k not in need:
            grads.append(None)
            continue
        others = [(t, v) for j, (t, v) in enumerate(zip(terms, ins, strict=True)) if j != k]
        seen = set(result).union(*(set(t) for t, _ in others))
        kept = "".join(c for c in term if c in seen)
        spec = ",".join([result, *(t for t, _ in others)]) + "->" + kept
        g = b.einsum(spec, ct, *(v for _, v in others), role=f"{n.name}.grad{k}")
        if kept != term:
            axes = [i for i, c in enumerate(term) if c not in seen]
            g = b.expand(g, x.shape, axes, role=f"{n.name}.grad{k}.expand")
        grads.append(g)
    return grads


def sum_to(b: Builder, g: Value, shape: tuple, role: str) -> Value:
    """Sum a cotangent over the axes along which a value of ``shape`` was broadcast."""
    if tuple(g.shape) == tuple(shape):
        return g
    letters = LETTERS[: len(g.shape)]
    lead = len(g.shape) - len(shape)
    kept = "".join(
        c for i, c in enumerate(letters[lead:]) if shape[i] != 1 or g.shape[lead + i] == 1
    )
    summed = b.einsum(f"{letters}->{kept}", g, role=role)
    return summed if len(kept) == len(shape) else b.reshape(summed, shape, role=f"{role}.shape")


def vjp_add(b, n, ins, out, ct, need):
    """d a = ct; d b = ct summed over b's broadcast axes."""
    return [ct, sum_to(b, ct, ins[1].shape, f"{n.name}.grad1")]


def vjp_mul(b, n, ins, out, ct, need):
    """d a = ct * b; d b = (ct * a) summed over b's broadcast axes."""
    a, y = ins
    ga = b.mul(ct, y, role=f"{n.name}.grad0") if 0 in need else None
    gb = None
    if 1 in need:
        gb = sum_to(b, b.mul(ct, a, role=f"{n.name}.grad1"), y.shape, f"{n.name}.grad1.sum")
    return [ga, gb]


def vjp_gather(b, n, ins, out, ct, need):
    """d table = the cotangent rows scattered back (added) to their ids."""
    table, ids = ins
    if table.dtype != out.dtype:
        raise ShapeError(f"{n.name}: cannot train a {table.dtype} table computed in {out.dtype}")
    return [b.scatter_add(ct, ids, table.shape[0], role=f"{n.name}.grad0"), None]


def vjp_scatter_add(b, n, ins, out, ct, need):
    """d values = the cotangent rows gathered at the ids."""
    return [b.gather(ct, ins[1], ct.dtype, role=f"{n.name}.grad0"), None]


FUSED_ATTRS = ("eps", "scale", "ignore_index")  # forward attrs the fused reverse ops reuse


def _fused(op: Op, operands: Callable, wrt: tuple[str | None, ...] = (None,)) -> Rule:
    """A rule whose gradients are one fused reverse op each, on ``operands(ins, out, ct)``;
    ``wrt`` names, per differentiable input position, the op's ``wrt`` attr (None: none)."""

    def rule(b, n, ins, out, ct, need):
        attrs = {k: v for k, v in n.attrs.items() if k in FUSED_ATTRS}
        grads: list[Value | None] = [None] * len(ins)
        for k, name in enumerate(wrt):
            if k in need:
                a = attrs if name is None else {**attrs, "wrt": name}
                grads[k] = b.backward_op(op, operands(ins, out, ct), a, f"{n.name}.grad{k}")
        return grads

    return rule


def vjp_cross_entropy(b, n, ins, out, ct, need):
    """The fused reverse op, reading the logits through an ``after`` view of the loss: it then
    runs after the forward op's read of them and writes its (tokens, vocab) gradient over
    them in place, not beside them (384 MiB of a SmolLM2 1x2048 step's 912 MiB peak)."""
    if 0 not in need:
        return [None, None]
    attrs = {k: v for k, v in n.attrs.items() if k in FUSED_ATTRS}
    logits = b.backward_op(Op.AFTER, [ins[0], out], {}, f"{n.name}.after")
    grad = b.backward_op(Op.CROSS_ENTROPY_GRAD, [logits, ins[1], ct], attrs, f"{n.name}.grad0")
    return [grad, None]


def vjp_rope(b, n, ins, out, ct, need):
    """Rotation is orthogonal: d x = the cotangent rotated back (times the same scale)."""
    x, table = ins
    scale = n.attrs.get("scale", 1.0)
    inverse = not n.attrs.get("inverse", False)
    return [b.rope(ct, table, scale, inverse, role=f"{n.name}.grad0"), None]


def vjp_reshape(b, n, ins, out, ct, need):
    """d x = the cotangent in x's shape."""
    return [b.reshape(ct, ins[0].shape, role=f"{n.name}.grad0")]


def vjp_transpose(b, n, ins, out, ct, need):
    """d x = the cotangent permuted back."""
    perm = n.attrs["perm"]
    return [b.transpose(ct, sorted(range(len(perm)), key=perm.__getitem__), f"{n.name}.grad0")]


def vjp_cast(b, n, ins, out, ct, need):
    """d x = the cotangent in x's dtype."""
    return [b.cast(ct, ins[0].dtype, role=f"{n.name}.grad0")]


def vjp_expand(b, n, ins, out, ct, need):
    """d x = the cotangent summed over the inserted axes."""
    letters = LETTERS[: len(out.shape)]
    kept = "".join(c for i, c in enumerate(letters) if i not in n.attrs["axes"])
    return [b.einsum(f"{letters}->{kept}", ct, role=f"{n.name}.grad0")]


def vjp_scale(b, n, ins, out, ct, need):
    """d x = factor * the cotangent."""
    return [b.scale(ct, n.attrs["factor"], role=f"{n.name}.grad0")]


def vjp_dropout(b, n, ins, out, ct, need):
    """d x = the cotangent through the same mask (same seed and stream), scaled alike."""
    p, stream = n.attrs["p"], n.attrs["stream"]
    return [b.dropout(ct, ins[1], p, stream, role=f"{n.name}.grad0"), None]


def vjp_fake_quant(b, n, ins, out, ct, need):
    """The straight-through estimator of quantisation-aware training: rounding passes the
    cotangent through unchanged (the static range, a frozen param, gets none)."""
    return [ct] + [None] * (len(ins) - 1)


def vjp_moe_topk(b, n, ins, out, ct, need):
    """Through the top-k selection as PyTorch's topk defines it: the picked probabilities get
    the cotangent (through the renormalisation), the others none."""
    attrs = {"k": n.attrs["k"], "norm": n.attrs["norm"]}
    return [b.backward_op(Op.MOE_TOPK_GRAD, [ins[0], ct], attrs, f"{n.name}.grad0")]


def vjp_moe_expert(b, n, ins, out, ct, need):
    """One fused reverse op per input needed (x, gates, the three expert weights), each
    recomputing the expert's activations on its routed tokens only."""
    grads: list[Value | None] = [None] * len(ins)
    for k in sorted(need):
        attrs = {"expert": n.attrs["expert"], "k": n.attrs["k"], "wrt": MOE_EXPERT_INPUTS[k]}
        grads[k] = b.backward_op(Op.MOE_EXPERT_GRAD, [*ins, ct], attrs, f"{n.name}.grad{k}")
    return grads


def vjp_moe_aux_loss(b, n, ins, out, ct, need):
    """d probs of each layer: the loss's weight on each expert, constant in the probabilities
    (the top-k counts get no gradient, as in transformers)."""
    grads: list[Value | None] = [None] * len(ins)
    for k in sorted(need):
        attrs = {"k": n.attrs["k"], "coef": n.attrs["coef"], "wrt": k}
        grads[k] = b.backward_op(Op.MOE_AUX_LOSS_GRAD, [*ins, ct], attrs, f"{n.name}.grad{k}")
    return grads


def vjp_flash_attention(b, n, ins, out, ct, need):
    """One reverse op per input needed (q, k, v), reading the forward output and its saved
    row log-sum-exp: the first to run computes all of them in one pass over the tiles."""
    grads: list[Value | None] = [None] * len(ins)
    need = {k for k in need if k < len(FLASH_INPUTS)}  # the mask gets none
    wanted = "".join(FLASH_INPUTS[k] for k in sorted(need))
    attrs = {k: v for k, v in n.attrs.items() if k != "keep"}
    for k in sorted(need):
        a = {**attrs, "wrt": FLASH_INPUTS[k], "grads": wanted}
        grads[k] = b.backward_op(Op.FLASH_ATTENTION_GRAD, [*ins, out, ct], a, f"{n.name}.grad{k}")
    return grads


RULES: dict[Op, Rule] = {
    Op.EINSUM: vjp_einsum,
    Op.ADD: vjp_add,
    Op.MUL: vjp_mul,
    Op.GATHER: vjp_gather,
    Op.SCATTER_ADD: vjp_scatter_add,
    Op.RMS_NORM: _fused(
        Op.RMS_NORM_GRAD, lambda ins, out, ct: [ins[0], ins[1], ct], wrt=("x", "w")
    ),
    Op.ROPE: vjp_rope,
    Op.SOFTMAX: _fused(Op.SOFTMAX_GRAD, lambda ins, out, ct: [out, ct]),
    Op.SILU_MUL: _fused(
        Op.SILU_MUL_GRAD, lambda ins, out, ct: [ins[0], ins[1], ct], wrt=("gate", "up")
    ),
    Op.CROSS_ENTROPY: vjp_cross_entropy,
    Op.RESHAPE: vjp_reshape,
    Op.TRANSPOSE: vjp_transpose,
    Op.CAST: vjp_cast,
    Op.EXPAND: vjp_expand,
    Op.SCALE: vjp_scale,
    Op.DROPOUT: vjp_dropout,
    Op.FAKE_QUANT: vjp_fake_quant,
    Op.SIGMOID: _fused(Op.SIGMOID_GRAD, lambda ins, out, ct: [out, ct]),
    Op.MOE_TOPK: vjp_moe_topk,
    Op.MOE_EXPERT: vjp_moe_expert,
    Op.MOE_AUX_LOSS: vjp_moe_aux_loss,
    Op.FLASH_ATTENTION: vjp_flash_attention,
}


# Ops with no reverse rule, and why: a differentiated graph may hold them only where no
# trainable value flows through them.
NOT_DIFFERENTIABLE: dict[Op, str] = {
    Op.PARAM: "a leaf",
    Op.INPUT: "a leaf",
    Op.STATE: "a leaf",
    Op.KV_APPEND: "the KV cache is written only by prefill and decode",
    Op.SLICE_LAST: "only prefill takes the last position",
    Op.SPLIT: "packed projections exist only in inference graphs",
    Op.AFTER: "made only in reverse graphs (cross-entropy's rule, the checkpoint pass)",
    Op.ROPE_TABLE: "the rotary table is a function of positions only",
    Op.DEQUANTIZE: "quantised weights are frozen (train LoRA adapters over them)",
    Op.CROSS_ENTROPY_GRAD: "reverse ops are not differentiated again",
    Op.RMS_NORM_GRAD: "reverse ops are not differentiated again",
    Op.SOFTMAX_GRAD: "reverse ops are not differentiated again",
    Op.SILU_MUL_GRAD: "reverse ops are not differentiated again",
    Op.SIGMOID_GRAD: "reverse ops are not differentiated again",
    Op.MOE_TOPK_GRAD: "reverse ops are not differentiated again",
    Op.MOE_EXPERT_GRAD: "reverse ops are not differentiated again",
    Op.MOE_AUX_LOSS_GRAD: "reverse ops are not differentiated again",
    Op.FLASH_ATTENTION_GRAD: "reverse ops are not differentiated again",
    Op.ACC_GRAD: "optimizer ops come after the reverse graph",
    Op.GRAD_NORM: "optimizer ops come after the reverse graph",
    Op.ADAMW: "optimizer ops come after the reverse graph",
    Op.SGD: "optimizer ops come after the reverse graph",
}


def apply_rule(b: Builder, n: Node, ins: list[Value], ct: Value, need: set[int]) -> list:
    """Cotangents of ``n``'s inputs; a clear error for an op without a rule or an input the
    rule cannot differentiate (the softmax mask, rope table)."""
    rule = RULES.get(n.op)
    if rule is None:
        why = NOT_DIFFERENTIABLE.get(n.op, "no rule written")
        raise ShapeError(f"{n.name or n.op.value}: op {n.op.value} has no reverse rule ({why})")
    grads = rule(b, n, ins, b.value(n), ct, need)
    for k in need:
        if grads[k] is None:
            raise ShapeError(f"{n.name}: {n.op.value} has no gradient for its input {k}")
    return grads
