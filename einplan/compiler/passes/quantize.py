"""Quantise the projections: each linear's float weight becomes packed integers and scales
(params of their own) with a ``dequantize`` before the einsum; for WxA8/WxA4 schemes the
einsum's input is fake-quantised (rounded to the activation grid and back).

The weights found are those of einsums tagged ``linear`` (models/llama.py ``linear()``, but
not the MoE routers, and
the tied output head, which reads the embedding: the embedding lookup then reads the same
dequantized table, one row at a time). LoRA branches (tag ``lora``) are left in float.

Param keys follow the checkpoint: ``...q_proj.weight`` holds the integers,
``...q_proj.weight_scale`` and ``...q_proj.weight_zero_point`` the scales and zero points,
``...q_proj.input_absmax`` the largest |input| seen on calibration text, for static
activation scales (``einplan quantize --calibrate``).
Each such param's ``attrs["quant"]`` says what it is, so that formats/weights.py can quantise a
float checkpoint at load time or take a quantised one as it is.
"""

from __future__ import annotations

from einplan.compiler.attrs import INPUT_ABSMAX, QuantPart
from einplan.compiler.ir import Graph, Node
from einplan.compiler.ops import Op
from einplan.compiler.pipeline import PassContext
from einplan.compiler.quant_scheme import (
    QuantConfig,
    QuantError,
    input_absmax_key,
    stored_layout,
    weight_group,
)
from einplan.compiler.tags import Tag

QUANT = frozenset({Tag.QUANT})
QUANT_PARAM = frozenset({Tag.QUANT, Tag.FROZEN})  # quantised weights (and scales) never train
SUFFIX = {"q": "q", "scale": "s", "zero_point": "z"}
# MoE routers stay float (as llama.cpp keeps ffn_gate_inp): rounding them would move tokens
# between experts. Routed experts (moe_expert steps, not einsums) are not quantised either.
FLOAT_ROLES = ("moe_router-", "moe_shared_router-")  # attn_q-3.w -> attn_q-3.wq, .ws, .wz


def _weight_params(graph: Graph, nodes: dict[int, Node]) -> dict[int, Node]:
    """The float32 params read as the weight of a linear einsum, by id."""
    found = {}
    for n in graph.nodes:
        if n.op is Op.EINSUM and Tag.LINEAR in n.tags and len(n.inputs) == 2:
            if n.name.startswith(FLOAT_ROLES):
                continue
            w = nodes[n.inputs[1]]
            if w.op is Op.CAST:
                raise QuantError(
                    f"{n.name}: quantisation starts from float32 weights; compile without "
                    "--weight-dtype (the quantised weights replace it)"
                )
            if w.op is Op.PARAM:
                if w.dtype != "f32":
                    raise QuantError(f"{n.name}: quantised plans compute in float32, not {w.dtype}")
                found[w.id] = w
    return found


def _quantized_leaves(w: Node, cfg: QuantConfig, next_id: int) -> list[Node]:
    """Packed params for one (out, in) weight, then the dequantize node standing for it."""
    out, n_in = w.shape
    group = weight_group(cfg, n_in, w.name)
    bits, key = cfg.weight_bits, w.attrs["key"]
    base = w.name.rsplit(".", 1)[0]
    leaves = []
    for part, (shape, dtype) in stored_layout(bits, group, cfg.symmetric, (out, n_in)).items():
        leaves.append(
            Node(
                next_id + len(leaves),
                Op.PARAM,
                (),
                {
                    "key": key if part == "q" else f"{key}_{part}",
                    "quant": QuantPart(part, bits, key, group, cfg.symmetric, (out, n_in)),
                },
                shape,
                dtype,
                f"{w.name}{SUFFIX[part]}",
                w.tags | QUANT_PARAM,
            )
        )
    deq = Node(
        next_id + len(leaves),
        Op.DEQUANTIZE,
        tuple(x.id for x in leaves),
        {"bits": bits, "group": group},
        w.shape,
        "f32",
        f"{base}.dequant",
        QUANT,
    )
    return [*leaves, deq]


def _fake_quant(n: Node, x: Node, w_key: str, cfg: QuantConfig, next_id: int) -> list[Node]:
    """Fake-quantise an einsum input: per token, or by a static scale param."""
    made = []
    inputs = (x.id,)
    if cfg.activations == "static":
        key = input_absmax_key(w_key)
        name = f"{n.name}.in_absmax"
        attrs = {"key": key, "quant": QuantPart(INPUT_ABSMAX, cfg.act_bits, key)}
        made.append(Node(next_id, Op.PARAM, (), attrs, (1,), "f32", name, QUANT_PARAM))
        inputs = (x.id, next_id)
    made.append(
        Node(
            next_id + len(made),
            Op.FAKE_QUANT,
            inputs,
            {"bits": cfg.act_bits},
            x.shape,
            x.dtype,
            f"{n.name}.act_quant",
            QUANT,
        )
    )
    return made


def run(graph: Graph, ctx: PassContext) -> Graph:
    """Quantise the weights (and, for a8/a4 schemes, the inputs) of every linear einsum."""
    cfg = ctx.quant
    if cfg is None:
        return graph
    nodes = graph.by_id()
    weights = _weight_params(graph, nodes)
    next_id = max(nodes) + 1
    replaced: dict[int, list[Node]] = {}
    for wid, w in weights.items():
        replaced[wid] = _quantized_leaves(w, cfg, next_id)
        next_id += len(replaced[wid])
    rename = {wid: made[-1].id for wid, made in replaced.items()}
    weight_of = {made[-1].id: weights[wid] for wid, made in replaced.items()}
    out: list[Node] = []
    for n in graph.nodes:
        if n.id in replaced:
            out.extend(replaced[n.id])
            continue
        n = n.with_(inputs=tuple(rename.get(i, i) for i in n.inputs))
        if cfg.act_bits < 16 and Tag.LINEAR in n.tags and n.inputs[-1] in weight_of:
            key = weight_of[n.inputs[-1]].attrs["key"]
            made = _fake_quant(n, nodes[n.inputs[0]], key, cfg, next_id)
            next_id += len(made)
            out.extend(made)
            n = n.with_(inputs=(made[-1].id, *n.inputs[1:]))
        out.append(n)
    return graph.replace_nodes(out)
