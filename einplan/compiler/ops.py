"""The op set: for every op its shape/dtype inference, FLOP count and print rule.

One table, keyed by :class:`Op`, so that adding an op means adding one entry
here (its inference, its number of inputs and the attributes it reads), one kernel in
``runtime/kernels.py`` and (for training) one VJP rule.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from einplan.compiler.attrs import lora_problem, pack_problem, quant_problem, recipe_problem
from einplan.compiler.symbolic import Dim, Poly, Shape, add_polys, numel, scale_poly
from einplan.errors import EinplanError


class Op(StrEnum):
    """Every operation a graph node can perform."""

    PARAM = "param"
    INPUT = "input"
    STATE = "state"
    KV_APPEND = "kv_append"
    SLICE_LAST = "slice_last"
    SPLIT = "split"
    EINSUM = "einsum"
    ADD = "add"
    MUL = "mul"
    GATHER = "gather"
    RMS_NORM = "rms_norm"
    ROPE_TABLE = "rope_table"
    ROPE = "rope"
    SOFTMAX = "softmax"
    SILU_MUL = "silu_mul"
    RESHAPE = "reshape"
    TRANSPOSE = "transpose"
    CAST = "cast"
    DEQUANTIZE = "dequantize"
    FAKE_QUANT = "fake_quant"
    SCALE = "scale"
    DROPOUT = "dropout"
    EXPAND = "expand"
    SCATTER_ADD = "scatter_add"
    CROSS_ENTROPY = "cross_entropy"
    SIGMOID = "sigmoid"
    # softmax(q k^T + mask) v in query and key tiles, never holding the (queries x keys) scores
    FLASH_ATTENTION = "flash_attention"
    # a view of input 0 that exists only once input 1 is computed: recomputation reads its
    # checkpoints through it, so the schedule cannot hoist it into the forward pass
    AFTER = "after"
    # mixture of experts: routing, one routed expert FFN, the load-balancing loss
    MOE_TOPK = "moe_topk"
    MOE_EXPERT = "moe_expert"
    MOE_AUX_LOSS = "moe_aux_loss"
    # reverse-mode ops the autodiff pass emits (compiler/vjp.py)
    CROSS_ENTROPY_GRAD = "cross_entropy_grad"
    RMS_NORM_GRAD = "rms_norm_grad"
    SOFTMAX_GRAD = "softmax_grad"
    SILU_MUL_GRAD = "silu_mul_grad"
    SIGMOID_GRAD = "sigmoid_grad"
    MOE_TOPK_GRAD = "moe_topk_grad"
    MOE_EXPERT_GRAD = "moe_expert_grad"
    MOE_AUX_LOSS_GRAD = "moe_aux_loss_grad"
    FLASH_ATTENTION_GRAD = "flash_attention_grad"
    # optimizer ops the optimizer pass emits: in place on their first input
    ACC_GRAD = "acc_grad"
    GRAD_NORM = "grad_norm"
    ADAMW = "adamw"
    SGD = "sgd"


class ShapeError(EinplanError):
    """A node's inputs do not fit its op (ranks, dims or dtypes)."""


CE_BLOCK_BYTES = 1 << 22  # rows of logits per block of the cross-entropy kernels (scratch)
ADAMW_CHUNK = 1 << 16  # values of a weight the AdamW kernel updates at a time (scratch)
# threads a kernel shares its work with (this one and a helper) when the process may use 2
# cores: each has its own scratch (runtime/qmatmul.py, runtime/flash.py; the memory estimate)
KERNEL_THREADS = min(2, len(os.sched_getaffinity(0)))
ITEMSIZE = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "i64": 8, "i32": 4, "i8": 1, "u8": 1}
FLOAT_DTYPES = {"f64", "f32", "bf16", "f16"}
INT_DTYPES = {"i64", "i32", "i8", "u8"}

Infer = Callable[[list[Shape], list[str], dict[str, Any]], tuple[Shape, str]]


@dataclass(frozen=True)
class Attr:
    """One attribute an op reads: ``problem`` says what is wrong with a value (None: fine)."""

    problem: Callable[[Any], str | None]
    required: bool = True

    def optional(self) -> Attr:
        return Attr(self.problem, False)


def _is_int(v: Any) -> bool:
    return type(v) is int


def _is_num(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _kind(test: Callable[[Any], bool], wanted: str) -> Attr:
    return Attr(lambda v: None if test(v) else f"must be {wanted}")


STR = _kind(lambda v: type(v) is str, "a string")
BOOL = _kind(lambda v: type(v) is bool, "true or false")
INT = _kind(_is_int, "an integer")
NAT = _kind(lambda v: _is_int(v) and v >= 0, "an integer >= 0")
NUMBER = _kind(_is_num, "a finite number")
POSITIVE = _kind(lambda v: _is_num(v) and v > 0, "a positive number")
NON_NEGATIVE = _kind(lambda v: _is_num(v) and v >= 0, "a number >= 0")
FRACTION = _kind(lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)")
BITS = _kind(lambda v: _is_int(v) and v in (4, 8), "4 or 8")
GROUP = _kind(lambda v: _is_int(v) and v >= 1, "a positive integer")
DIM = _kind(lambda v: type(v) is str or (_is_int(v) and v >= 1), "a size >= 1 or a dim name")
INTS = _kind(lambda v: type(v) in (list, tuple) and all(_is_int(x) for x in v), "integers")
DIMS = _kind(
    lambda v: type(v) in (list, tuple) and all(type(d) is str or _is_int(d) for d in v),
    "a list of sizes and dim names",
)
FREQS = _kind(
    lambda v: type(v) in (list, tuple) and len(v) > 0 and all(_is_num(x) for x in v),
    "a non-empty list of finite numbers",
)


def _one_of(*values: str) -> Attr:
    return _kind(lambda v: type(v) is str and v in values, " or ".join(map(repr, values)))


@dataclass(frozen=True)
class OpDef:
    """How the compiler reasons about one op."""

    infer: Infer
    flops_per_element: int = 0  # of the output, for elementwise-like ops
    alias: bool = False  # output is a view of input 0: no buffer, no copy
    inplace: bool = False  # the kernel may write its output over input 0 (same size)
    hidden_attrs: tuple[str, ...] = ()  # attrs left out of the printed graph
    arity: tuple[int, int | None] = (1, 1)  # least and most inputs (None: any number)
    # the attrs the op reads and what each must be; None: not declared, not checked
    attrs: dict[str, Attr] | None = field(default_factory=dict)

    def check(self, n_inputs: int, attrs: dict[str, Any]) -> None:
        """Raise :class:`ShapeError` when a node of this op has the wrong number of inputs,
        lacks an attr it reads, has one it does not read, or one of the wrong type."""
        least, most = self.arity
        if n_inputs < least or (most is not None and n_inputs > most):
            wanted = f"{least}" if least == most else f"{least}..{most if most else ''}"
            raise ShapeError(f"takes {wanted} input(s), has {n_inputs}")
        if self.attrs is None:
            return
        for name, spec in self.attrs.items():
            if name not in attrs:
                if spec.required:
                    raise ShapeError(f"attr {name!r} is missing")
                continue
            why = spec.problem(attrs[name])
            if why:
                raise ShapeError(f"attr {name!r} {why}, got {attrs[name]!r:.60}")
        unknown = [k for k in attrs if k not in self.attrs]
        if unknown:
            known = ", ".join(self.attrs) or "none"
            raise ShapeError(f"unknown attr(s) {', '.join(map(repr, unknown))} (known: {known})")


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ShapeError(msg)


def parse_spec(spec: str) -> tuple[list[str], str]:
    """Split an explicit einsum spec ``"bsd,ed->bse"`` into input terms and output."""
    _need("->" in spec, f"einsum spec {spec!r} must be explicit (contain '->')")
    lhs, out = spec.split("->")
    terms = lhs.split(",")
    for t in [*terms, out]:
        _need(t.isalpha() or t == "", f"einsum spec {spec!r}: only letters allowed in terms")
        _need(len(set(t)) == len(t), f"einsum spec {spec!r}: repeated index in term {t!r}")
    return terms, out


def einsum_sizes(spec: str, shapes: list[Shape]) -> dict[str, Dim]:
    """Map each index letter of ``spec`` to its dimension, checking ranks and agreement."""
    terms, out = parse_spec(spec)
    _need(
        len(terms) == len(shapes), f"einsum {spec!r} has {len(terms)} operands, got {len(shapes)}"
    )
    sizes: dict[str, Dim] = {}
    for i, (t, s) in enumerate(zip(terms, shapes, strict=True)):
        _need(len(t) == len(s), f"einsum {spec!r}: operand {i} has rank {len(s)}, term {t!r}")
        for ch, d in zip(t, s, strict=True):
            if ch in sizes:
                _need(
                    sizes[ch] == d,
                    f"einsum {spec!r}: index {ch!r} is {sizes[ch]} in one operand, {d} in another",
                )
            sizes[ch] = d
    for ch in out:
        _need(ch in sizes, f"einsum {spec!r}: output index {ch!r} is in no input")
    return sizes


def _infer_einsum(shapes, dtypes, attrs):
    sizes = einsum_sizes(attrs["spec"], shapes)
    _need(all(d == dtypes[0] for d in dtypes), f"einsum operands differ in dtype: {dtypes}")
    _need(dtypes[0] in FLOAT_DTYPES, f"einsum needs float operands, got {dtypes[0]}")
    out = attrs["spec"].split("->")[1]
    return tuple(sizes[c] for c in out), dtypes[0]


def _broadcasts(small: Shape, big: Shape) -> bool:
    if len(small) > len(big):
        return False
    return all(s == 1 or s == b for s, b in zip(small[::-1], big[::-1], strict=False))


def _infer_binary(shapes, dtypes, attrs):
    a, b = shapes
    _need(_broadcasts(b, a), f"second operand {list(b)} does not broadcast to {list(a)}")
    _need(dtypes[0] == dtypes[1], f"operands differ in dtype: {dtypes}")
    return a, dtypes[0]


def _infer_gather(shapes, dtypes, attrs):
    table, ids = shapes
    _need(len(table) == 2, f"gather table must be 2-D, got {list(table)}")
    _need(dtypes[1] in INT_DTYPES, f"gather ids must be integers, got {dtypes[1]}")
    width = table[0] if attrs.get("transposed") else table[1]  # rows, or columns of (d, v)
    return (*ids, width), attrs.get("dtype", "f32")


def _infer_rms_norm(shapes, dtypes, attrs):
    x, w = shapes
    _need(len(w) == 1 and w[0] == x[-1], f"rms_norm weight {list(w)} must be [{x[-1]}]")
    _need(dtypes[0] == dtypes[1], f"rms_norm dtypes differ: {dtypes}")
    return x, dtypes[0]


def _infer_rope_table(shapes, dtypes, attrs):
    (pos,) = shapes
    _need(dtypes[0] in INT_DTYPES, f"rope_table positions must be integers, got {dtypes[0]}")
    return (2, *pos, len(attrs["inv_freq"])), attrs.get("dtype", "f32")


def _infer_rope(shapes, dtypes, attrs):
    x, table = shapes
    _need(len(table) == 4 and table[0] == 2, f"rope table must be [2,batch,seq,half], got {table}")
    _need(x[:2] == table[1:3], f"rope: x {list(x)} and table {list(table)} differ in batch/seq")
    _need(x[-1] == 2 * table[3], f"rope: head dim {x[-1]} is not twice the table's {table[3]}")
    return x, dtypes[0]


def _infer_softmax(shapes, dtypes, attrs):
    x = shapes[0]
    if attrs.get("causal"):
        _need(len(x) >= 2, "causal softmax needs [..., q, k]")
    if len(shapes) == 2:  # an additive mask over (batch, queries, keys)
        m = shapes[1]
        _need(
            len(x) >= 3 and tuple(m) == (x[0], x[-2], x[-1]),
            f"softmax mask {list(m)} must be [batch, queries, keys] = [{x[0]}, {x[-2]}, {x[-1]}]",
        )
    return x, dtypes[0]


def _infer_silu_mul(shapes, dtypes, attrs):
    g, u = shapes
    _need(g == u, f"silu_mul operands differ: {list(g)} vs {list(u)}")
    return g, dtypes[0]


def _infer_reshape(shapes, dtypes, attrs):
    (x,) = shapes
    new = tuple(attrs["shape"])
    _need(numel(x) == numel(new), f"reshape {list(x)} -> {list(new)} changes the element count")
    return new, dtypes[0]


def _infer_after(shapes, dtypes, attrs):
    return shapes[0], dtypes[0]


def _infer_transpose(shapes, dtypes, attrs):
    (x,) = shapes
    perm = attrs["perm"]
    _need(sorted(perm) == list(range(len(x))), f"transpose perm {perm} does not fit rank {len(x)}")
    return tuple(x[p] for p in perm), dtypes[0]


def _infer_cast(shapes, dtypes, attrs):
    return shapes[0], attrs["dtype"]


def _infer_dequantize(shapes, dtypes, attrs):
    bits, group = attrs["bits"], attrs["group"]
    q, scale = shapes[0], shapes[1]
    _need(
        len(q) == 2 and all(isinstance(d, int) for d in q),
        f"dequantize needs a 2-D weight, got {q}",
    )
    n_in = q[1] * (8 // bits)
    _need(bits in (4, 8) and n_in % group == 0, f"dequantize: {bits}-bit, group {group}, in {n_in}")
    _need(dtypes[0] in ("i8", "u8"), f"dequantize needs i8/u8 integers, got {dtypes[0]}")
    _need(
        tuple(scale) == (q[0], n_in // group) and dtypes[1] == "f32",
        f"dequantize scale must be f32[{q[0]},{n_in // group}], got {dtypes[1]}{list(scale)}",
    )
    if len(shapes) == 3:
        _need(
            tuple(shapes[2]) == tuple(scale) and dtypes[2] == "u8",
            f"dequantize zero point must be u8{list(scale)}, got {dtypes[2]}{list(shapes[2])}",
        )
    return (q[0], n_in), "f32"


def _infer_fake_quant(shapes, dtypes, attrs):
    _need(attrs["bits"] in (4, 8), f"fake_quant to {attrs['bits']} bits (4 or 8)")
    if len(shapes) == 2:
        _need(tuple(shapes[1]) == (1,), f"fake_quant static range must be [1], got {shapes[1]}")
    return shapes[0], dtypes[0]


def _infer_scale(shapes, dtypes, attrs):
    return shapes[0], dtypes[0]


def _infer_dropout(shapes, dtypes, attrs):
    _need(0 < attrs["p"] < 1, f"dropout probability {attrs['p']} must lie in (0, 1)")
    _need(shapes[1] == () and dtypes[1] in INT_DTYPES, "dropout seed must be an integer scalar")
    return shapes[0], dtypes[0]


def _infer_kv_append(shapes, dtypes, attrs):
    cache, new, pos = shapes
    _need(pos == (1,) and dtypes[2] in INT_DTYPES, f"kv_append position must be i64[1], got {pos}")
    _need(len(cache) == len(new) == 4, f"kv_append needs [b,n,ctx,h] and [b,s,n,h], got {shapes}")
    _need(
        cache[0] == new[0] and cache[1] == new[2] and cache[3] == new[3],
        f"kv_append: new entries {list(new)} do not fit the cache {list(cache)}",
    )
    _need(dtypes[0] == dtypes[1], f"kv_append dtypes differ: {dtypes[:2]}")
    return (cache[0], cache[1], attrs["length"], cache[3]), dtypes[0]


def _infer_slice_last(shapes, dtypes, attrs):
    (x,) = shapes
    _need(len(x) >= 2, f"slice_last needs [batch, seq, ...], got {list(x)}")
    return (x[0], *x[2:]), dtypes[0]


def _infer_split(shapes, dtypes, attrs):
    (x,) = shapes
    start, stop = attrs["start"], attrs["stop"]
    _need(
        isinstance(x[-1], int) and 0 <= start < stop <= x[-1],
        f"split [{start}:{stop}] does not fit last axis {x[-1]}",
    )
    return (*x[:-1], stop - start), dtypes[0]


def _infer_expand(shapes, dtypes, attrs):
    (x,) = shapes
    target, axes = tuple(attrs["shape"]), attrs["axes"]
    kept = tuple(d for i, d in enumerate(target) if i not in axes)
    _need(kept == tuple(x), f"expand: {list(x)} is not {list(target)} without axes {axes}")
    return target, dtypes[0]


def _infer_scatter_add(shapes, dtypes, attrs):
    values, ids = shapes
    _need(dtypes[1] in INT_DTYPES, f"scatter_add ids must be integers, got {dtypes[1]}")
    _need(tuple(values[:-1]) == tuple(ids), f"scatter_add: values {values} do not fit ids {ids}")
    return (attrs["rows"], values[-1]), dtypes[0]


def _infer_cross_entropy(shapes, dtypes, attrs):
    logits, targets = shapes[:2]
    _need(tuple(logits[:-1]) == tuple(targets), f"cross_entropy: {logits} vs targets {targets}")
    _need(dtypes[1] in INT_DTYPES, f"cross_entropy targets must be integers, got {dtypes[1]}")
    _need(dtypes[0] in FLOAT_DTYPES, f"cross_entropy logits must be float, got {dtypes[0]}")
    return (), loss_dtype(dtypes[0])


def loss_dtype(dtype: str) -> str:
    """A loss of values stored in ``dtype`` is float32 under mixed precision (bf16, f16)."""
    return "f32" if dtype in ("bf16", "f16") else dtype


def _infer_cross_entropy_grad(shapes, dtypes, attrs):
    _infer_cross_entropy(shapes, dtypes, attrs)
    _need(tuple(shapes[2]) == (), f"cross_entropy_grad: cotangent must be a scalar, {shapes[2]}")
    return shapes[0], dtypes[0]


def _infer_like_first(shapes, dtypes, attrs):
    _need(all(d == dtypes[0] for d in dtypes), f"operands differ in dtype: {dtypes}")
    return shapes[0], dtypes[0]


def _infer_rms_norm_grad(shapes, dtypes, attrs):
    x, w, ct = shapes
    _need(tuple(ct) == tuple(x), f"rms_norm_grad: cotangent {ct} is not x's {x}")
    return (x if attrs["wrt"] == "x" else w), dtypes[0]


def _infer_same_shapes(shapes, dtypes, attrs):
    _need(all(tuple(s) == tuple(shapes[0]) for s in shapes), f"shapes differ: {shapes}")
    return _infer_like_first(shapes, dtypes, attrs)


def _infer_grad_norm(shapes, dtypes, attrs):
    _need(tuple(shapes[0]) == (), f"grad_norm: the loss must be a scalar, got {shapes[0]}")
    _need(len(set(dtypes)) == 1, f"grad_norm operands differ in dtype: {sorted(set(dtypes))}")
    return (), dtypes[0]


def _infer_update(shapes, dtypes, attrs):
    """An optimizer update: (param, *state, grad, norm, lr, step) -> param, in place."""
    *tensors, norm, lr, step = shapes
    _need(all(tuple(s) == tuple(tensors[0]) for s in tensors), f"shapes differ: {tensors}")
    _need(norm == lr == step == (), "norm, lr and step must be scalars")
    _need(dtypes[-1] in INT_DTYPES, f"step must be an integer, got {dtypes[-1]}")
    return tensors[0], dtypes[0]


def _infer_moe_topk(shapes, dtypes, attrs):
    (p,) = shapes[:1]
    _need(dtypes[0] in FLOAT_DTYPES, f"moe_topk needs float router probabilities, got {dtypes[0]}")
    e = p[-1]
    _need(
        isinstance(e, int) and 1 <= attrs["k"] <= e,
        f"moe_topk: top-{attrs['k']} of {e} experts (experts_per_tok must not exceed experts)",
    )
    if len(shapes) == 2:  # the reverse op: (probs, cotangent)
        _need(tuple(shapes[1]) == tuple(p), f"moe_topk_grad: cotangent {shapes[1]} is not {p}")
    return p, dtypes[0]


def _infer_moe_expert(shapes, dtypes, attrs):
    """(x [..., d], gates [..., E], w_gate [f, d], w_up [f, d], w_down [d, f]) -> [..., d]; the
    reverse op adds the output's cotangent and gives the shape of input ``wrt``."""
    x, gates, wg, wu, wd = shapes[:5]
    e = attrs["expert"]
    _need(tuple(gates[:-1]) == tuple(x[:-1]), f"moe_expert: gates {gates} do not fit x {x}")
    _need(isinstance(gates[-1], int) and 0 <= e < gates[-1], f"moe_expert: no expert {e}")
    d = x[-1]
    _need(
        len(wg) == 2 and wg[1] == d and tuple(wu) == tuple(wg) and tuple(wd) == (d, wg[0]),
        f"moe_expert {e}: expert weights gate {list(wg)}, up {list(wu)}, down {list(wd)} do not "
        f"fit hidden size {d} (want [f,{d}], [f,{d}], [{d},f])",
    )
    _need(all(t == dtypes[0] for t in dtypes), f"moe_expert operands differ in dtype: {dtypes}")
    if len(shapes) == 6:
        _need(tuple(shapes[5]) == tuple(x), f"moe_expert_grad: cotangent {shapes[5]} is not {x}")
        return shapes[MOE_EXPERT_INPUTS.index(attrs["wrt"])], dtypes[0]
    return x, dtypes[0]


MOE_EXPERT_INPUTS = ("x", "gates", "gate", "up", "down")  # the inputs of moe_expert, in order


def _infer_moe_aux_loss(shapes, dtypes, attrs):
    """Router probabilities of every MoE layer [..., E] -> the load-balancing loss (a scalar);
    the reverse op adds the loss's cotangent and gives the probabilities of layer ``wrt``."""
    probs = shapes if "wrt" not in attrs else shapes[:-1]
    _need(all(tuple(p) == tuple(probs[0]) for p in probs), f"moe_aux_loss: shapes {probs} differ")
    _need(1 <= attrs["k"] <= probs[0][-1], f"moe_aux_loss: top-{attrs['k']} of {probs[0][-1]}")
    if "wrt" in attrs:
        return probs[attrs["wrt"]], dtypes[0]
    return (), loss_dtype(dtypes[0])


FLASH_INPUTS = ("q", "k", "v")  # the differentiable inputs of flash_attention, in order
# where the keys' sequence axis sits: (batch, keys, kv heads, head dim) as the forward pass
# projects them, or (batch, kv heads, keys, head dim) as the KV cache holds them
KV_LAYOUTS = ("bsnh", "bnth")


def _infer_flash(shapes, dtypes, attrs):
    """(q [b,s,n,g,h], k [b,t,n,h] or [b,n,t,h], v like k[, mask [b,s,t]]) -> [b,s,n,g,h];
    the reverse op adds the forward output and its cotangent and gives input ``wrt``'s shape."""
    grad = "wrt" in attrs
    q, k, v = shapes[:3]
    rest = shapes[3:-2] if grad else shapes[3:]
    _need(len(q) == 5, f"flash_attention q must be [b,s,n,g,h], got {list(q)}")
    _need(len(k) == 4 and tuple(k) == tuple(v), f"flash_attention k {k} and v {v} differ")
    bnth = attrs["layout"] == "bnth"
    b, t, n, h = (k[0], k[2], k[1], k[3]) if bnth else tuple(k)
    _need(
        q[0] == b and q[2] == n and q[4] == h,
        f"flash_attention: q {list(q)} does not fit keys {list(k)} (layout {attrs['layout']})",
    )
    if rest:
        _need(
            tuple(rest[0]) == (b, q[1], t),
            f"flash_attention mask {list(rest[0])} must be [batch, queries, keys] = "
            f"[{b}, {q[1]}, {t}]",
        )
    _need(all(d == dtypes[0] for d in dtypes), f"flash_attention dtypes differ: {dtypes}")
    _need(dtypes[0] in FLOAT_DTYPES, f"flash_attention needs float operands, got {dtypes[0]}")
    if grad:
        _need(
            tuple(shapes[-1]) == tuple(shapes[-2]) == tuple(q),
            f"flash_attention_grad: output {shapes[-2]} and cotangent {shapes[-1]} must be {q}",
        )
        return shapes[FLASH_INPUTS.index(attrs["wrt"])], dtypes[0]
    return q, dtypes[0]


def _infer_leaf(shapes, dtypes, attrs):
    raise AssertionError("leaves carry their own shape")


FLOAT_DTYPE = _one_of(*sorted(FLOAT_DTYPES))
DTYPE = _one_of(*sorted(ITEMSIZE))
QUANT = Attr(quant_problem, False)
EPS = {"eps": POSITIVE}
MOE_AUX = {"k": GROUP, "coef": NUMBER}
UPDATE = {"weight_decay": NON_NEGATIVE, "max_norm": NON_NEGATIVE}
FLASH = {
    "layout": _one_of(*KV_LAYOUTS),
    "causal": BOOL,
    "scale": NUMBER.optional(),
    "block_q": GROUP,  # query rows per tile
    "block_k": GROUP,  # keys per tile
    "min_tiled": NAT,  # below this many keys the kernel runs one untiled block
}

OPS: dict[Op, OpDef] = {
    Op.PARAM: OpDef(
        _infer_leaf,
        hidden_attrs=("quant", "lora"),
        arity=(0, 0),
        attrs={
            "key": STR,
            "quant": QUANT,
            "lora": Attr(lora_problem, False),
            "pack": Attr(pack_problem, False),
        },
    ),
    Op.INPUT: OpDef(_infer_leaf, arity=(0, 0)),
    Op.STATE: OpDef(_infer_leaf, arity=(0, 0), attrs={"key": STR}),
    Op.KV_APPEND: OpDef(_infer_kv_append, alias=True, arity=(3, 3), attrs={"length": DIM}),
    Op.SLICE_LAST: OpDef(_infer_slice_last),
    Op.SPLIT: OpDef(_infer_split, alias=True, attrs={"start": NAT, "stop": NAT}),
    Op.EINSUM: OpDef(
        _infer_einsum,
        hidden_attrs=("recipe",),
        arity=(1, None),
        attrs={"spec": STR, "recipe": Attr(recipe_problem, False)},
    ),
    Op.ADD: OpDef(_infer_binary, 1, inplace=True, arity=(2, 2)),
    Op.MUL: OpDef(_infer_binary, 1, inplace=True, arity=(2, 2)),
    Op.GATHER: OpDef(
        _infer_gather,
        arity=(2, 2),
        attrs={"transposed": BOOL.optional(), "dtype": FLOAT_DTYPE.optional()},
    ),
    Op.RMS_NORM: OpDef(_infer_rms_norm, 4, arity=(2, 2), attrs=EPS),
    Op.ROPE_TABLE: OpDef(
        _infer_rope_table,
        2,
        hidden_attrs=("inv_freq",),
        attrs={"inv_freq": FREQS, "dtype": FLOAT_DTYPE.optional()},
    ),
    Op.ROPE: OpDef(
        _infer_rope,
        3,
        arity=(2, 2),
        attrs={"scale": NUMBER.optional(), "inverse": BOOL.optional()},
    ),
    Op.SOFTMAX: OpDef(
        _infer_softmax,
        5,
        inplace=True,
        arity=(1, 2),
        attrs={"causal": BOOL.optional(), "scale": NUMBER.optional()},
    ),
    Op.SILU_MUL: OpDef(_infer_silu_mul, 5, arity=(2, 2)),
    Op.RESHAPE: OpDef(_infer_reshape, alias=True, attrs={"shape": DIMS}),
    Op.TRANSPOSE: OpDef(_infer_transpose, attrs={"perm": INTS}),
    Op.CAST: OpDef(_infer_cast, 1, attrs={"dtype": DTYPE}),
    # the runtime never materialises a dequantized weight: the einsum or gather reading it
    # dequantizes blocks of rows into a small scratch (runtime/qmatmul.py), hence a view
    Op.DEQUANTIZE: OpDef(
        _infer_dequantize, alias=True, arity=(2, 3), attrs={"bits": BITS, "group": GROUP}
    ),
    Op.FAKE_QUANT: OpDef(_infer_fake_quant, 5, arity=(1, 2), attrs={"bits": BITS}),
    Op.SCALE: OpDef(_infer_scale, 1, attrs={"factor": NUMBER}),
    Op.DROPOUT: OpDef(_infer_dropout, 2, arity=(2, 2), attrs={"p": NUMBER, "stream": INT}),
    Op.EXPAND: OpDef(_infer_expand, attrs={"shape": DIMS, "axes": INTS}),
    Op.SCATTER_ADD: OpDef(_infer_scatter_add, 1, arity=(2, 2), attrs={"rows": DIM}),
    Op.CROSS_ENTROPY: OpDef(_infer_cross_entropy, 4, arity=(2, 2), attrs={"ignore_index": INT}),
    Op.SIGMOID: OpDef(_infer_like_first, 4),
    Op.AFTER: OpDef(_infer_after, alias=True, arity=(2, 2)),
    Op.MOE_TOPK: OpDef(_infer_moe_topk, 4, attrs={"k": GROUP, "norm": BOOL}),
    Op.MOE_EXPERT: OpDef(
        _infer_moe_expert, arity=(5, 5), attrs={"expert": NAT, "k": GROUP, "keep": BOOL.optional()}
    ),
    Op.MOE_AUX_LOSS: OpDef(_infer_moe_aux_loss, 2, arity=(1, None), attrs=MOE_AUX),
    Op.FLASH_ATTENTION: OpDef(
        _infer_flash,
        arity=(3, 4),
        # keep: leave the row log-sum-exp for reverse steps; direct: all scores at once, no tiles
        attrs={**FLASH, "keep": BOOL.optional(), "direct": BOOL.optional()},
    ),
    Op.CROSS_ENTROPY_GRAD: OpDef(
        _infer_cross_entropy_grad, 5, inplace=True, arity=(3, 3), attrs={"ignore_index": INT}
    ),
    Op.RMS_NORM_GRAD: OpDef(
        _infer_rms_norm_grad, 8, arity=(3, 3), attrs={**EPS, "wrt": _one_of("x", "w")}
    ),
    Op.SOFTMAX_GRAD: OpDef(_infer_like_first, 4, arity=(2, 2), attrs={"scale": NUMBER.optional()}),
    Op.SILU_MUL_GRAD: OpDef(
        _infer_like_first, 8, arity=(3, 3), attrs={"wrt": _one_of("gate", "up")}
    ),
    Op.SIGMOID_GRAD: OpDef(_infer_like_first, 3, arity=(2, 2)),
    Op.MOE_TOPK_GRAD: OpDef(_infer_moe_topk, 4, arity=(2, 2), attrs={"k": GROUP, "norm": BOOL}),
    Op.MOE_EXPERT_GRAD: OpDef(
        _infer_moe_expert,
        arity=(6, 6),
        attrs={"expert": NAT, "k": GROUP, "wrt": _one_of(*MOE_EXPERT_INPUTS)},
    ),
    Op.MOE_AUX_LOSS_GRAD: OpDef(
        _infer_moe_aux_loss, 2, arity=(2, None), attrs={**MOE_AUX, "wrt": NAT}
    ),
    Op.FLASH_ATTENTION_GRAD: OpDef(
        _infer_flash,
        arity=(5, 6),
        attrs={**FLASH, "wrt": _one_of(*FLASH_INPUTS), "grads": STR},
    ),
    Op.ACC_GRAD: OpDef(_infer_same_shapes, 1, alias=True, arity=(2, 2)),
    Op.GRAD_NORM: OpDef(_infer_grad_norm, arity=(1, None)),
    Op.ADAMW: OpDef(
        _infer_update,
        12,
        alias=True,
        arity=(7, 7),
        attrs={**UPDATE, "beta1": FRACTION, "beta2": FRACTION, **EPS},
    ),
    Op.SGD: OpDef(
        _infer_update, 5, alias=True, arity=(6, 6), attrs={**UPDATE, "momentum": NON_NEGATIVE}
    ),
}


LEAVES = frozenset({Op.PARAM, Op.INPUT, Op.STATE})  # values bound from outside, never computed

# ops that write into their first input: bytes moved per element of it (read + write)
IN_PLACE_TRAFFIC = {Op.ACC_GRAD: 3, Op.ADAMW: 8, Op.SGD: 6}


def einsum_flops(spec: str, shapes: list[Shape]) -> Poly:
    """FLOPs of a contraction done pairwise: 2 per multiply-add over all index combinations."""
    sizes = einsum_sizes(spec, shapes)
    terms, out = parse_spec(spec)
    every = numel(sizes.values())
    if len(terms) == 1:
        return every if set(terms[0]) - set(out) else {}
    contracted = set("".join(terms)) - set(out)
    return scale_poly(every, 2 * (len(terms) - 1)) if contracted else every


def moe_expert_flops(op: Op, in_shapes: list[Shape], attrs: dict) -> Poly:
    """One routed expert's FFN over the tokens expected to reach it: top-k of E experts, so
    ``tokens * k / E`` rows of three (d x f) products (the reverse op: by what it computes)."""
    tokens, (f, d) = numel(in_shapes[0][:-1]), in_shapes[2]
    k, e = attrs["k"], in_shapes[1][-1]
    products = {"x": 5, "gates": 3, "gate": 4, "up": 4, "down": 3}.get(attrs.get("wrt"), 3)
    per_token = 2 * products * f * d * k
    return {m: v * per_token // e for m, v in tokens.items() if v * per_token // e}


def flash_flops(op: Op, in_shapes: list[Shape], attrs: dict) -> Poly:
    """FLOPs of the score tiles a flash_attention step computes: per (query row, key) pair
    2h for q k^T, 2h for p v and ~5 for the online softmax (the reverse: 10h + 5, done once by
    the first reverse step, which leaves its siblings' gradients for them). Causal tiles above
    the diagonal are skipped, so a query sees on average (keys + block_q + block_k) / 2 keys."""
    if op is Op.FLASH_ATTENTION_GRAD and attrs["wrt"] != attrs["grads"][0]:
        return {}
    q, k = in_shapes[0], in_shapes[1]
    h, keys = q[-1], k[2] if attrs["layout"] == "bnth" else k[1]
    per_pair = (10 if op is Op.FLASH_ATTENTION_GRAD else 4) * h + 5
    pairs = numel((*q[:-1], keys))
    if not attrs["causal"]:
        return scale_poly(pairs, per_pair)
    edge = scale_poly(numel(q[:-1]), attrs["block_q"] + attrs["block_k"])
    return {m: v * per_pair // 2 for m, v in add_polys(pairs, edge).items() if v * per_pair // 2}


def count_flops(op: Op, in_shapes: list[Shape], out_shape: Shape, attrs: dict) -> Poly:
    """FLOPs one execution of the op performs, as a polynomial in the symbolic dims."""
    if op is Op.EINSUM:
        return einsum_flops(attrs["spec"], in_shapes)
    if op in (Op.MOE_EXPERT, Op.MOE_EXPERT_GRAD):
        return moe_expert_flops(op, in_shapes, attrs)
    if op in (Op.FLASH_ATTENTION, Op.FLASH_ATTENTION_GRAD):
        return flash_flops(op, in_shapes, attrs)
    if op is Op.GRAD_NORM:
        return add_polys(*(scale_poly(numel(s), 2) for s in in_shapes[1:]))
    return scale_poly(numel(out_shape), OPS[op].flops_per_element)


def count_bytes(op: Op, in_shapes, in_dtypes, out_shape, out_dtype) -> Poly:
    """Bytes read plus written by one execution (views move nothing)."""
    if op is Op.KV_APPEND:  # writes the new entries into the cache, in place
        return scale_poly(numel(in_shapes[1]), 2 * ITEMSIZE[in_dtypes[1]])
    if op in IN_PLACE_TRAFFIC:
        return scale_poly(numel(in_shapes[0]), IN_PLACE_TRAFFIC[op] * ITEMSIZE[in_dtypes[0]])
    if OPS[op].alias or op in LEAVES:
        return {}
    parts = [scale_poly(numel(s), ITEMSIZE[d]) for s, d in zip(in_shapes, in_dtypes, strict=True)]
    if op is Op.GATHER:  # reads only the gathered rows, not the table
        parts[0] = scale_poly(numel(out_shape), ITEMSIZE[in_dtypes[0]])
    return add_polys(*parts, scale_poly(numel(out_shape), ITEMSIZE[out_dtype]))
