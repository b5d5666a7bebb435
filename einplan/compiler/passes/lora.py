"""Add LoRA adapters: each targeted projection ``x . W`` becomes
``x . W + (alpha / r) * ((x . A) . B)`` with W frozen and A (r, in), B (out, r) new params.

The low-rank branch is one three-operand einsum, so the contract pass (opt-einsum) picks its
order: ``(x . A) . B`` costs ``2 tokens r (in + out)`` FLOPs where ``x . (A . B)`` costs
``2 r in out + 2 tokens in out``. A and B are tagged ``lora`` and carry ``attrs["lora"]``:
their values come from an adapter (PEFT layout, formats/peft.py) or from the LoRA paper's
initialisation (A uniform in +-1/sqrt(in) as PEFT's kaiming-uniform, B zero), never from the
base checkpoint. Every other param is tagged ``frozen``: training updates only A and B, so
the optimizer keeps state only for them.
"""

from __future__ import annotations

from einplan.compiler.attrs import LoraPart
from einplan.compiler.dtypes import master_dtype
from einplan.compiler.ir import Graph, Node
from einplan.compiler.lora_spec import LoraConfig, LoraError
from einplan.compiler.ops import Op, parse_spec
from einplan.compiler.pipeline import Mode, PassContext
from einplan.compiler.tags import Tag

LORA = frozenset({Tag.LORA})
DROPOUT_SEED = "dropout_seed"  # the runtime input that seeds every dropout mask of a step


def role_of(name: str) -> str:
    """``attn_q-3`` -> ``attn_q``; ``output`` -> ``output``."""
    return name.rsplit("-", 1)[0]


def module_key(n: Node, w: Node) -> str:
    """The Hugging Face module a projection belongs to (``model.layers.3.self_attn.q_proj``);
    the tied output head is ``lm_head`` although it reads the embedding."""
    if role_of(n.name) == "output":
        return "lm_head"
    return w.attrs["key"].removesuffix(".weight")


def _weight_param(w: Node, nodes: dict[int, Node]) -> Node:
    return nodes[w.inputs[0]] if w.op is Op.CAST else w


def _branch(n: Node, w: Node, cfg: LoraConfig, next_id: int, seed: Node | None) -> list[Node]:
    """A and B params, (dropout of x,) the low-rank einsum, its scaling, and the sum with the
    base output."""
    (a_term, _), out_term = parse_spec(n.attrs["spec"])
    n_out, n_in = w.shape
    if cfg.r > min(n_in, n_out):
        raise LoraError(
            f"LoRA rank r={cfg.r} is larger than {n.name}'s weight allows "
            f"(min(out, in) = min({n_out}, {n_in}) = {min(n_in, n_out)})"
        )
    lead, i, o = a_term[:-1], a_term[-1], out_term[-1]
    r = next(c for c in "rkzyxwu" if c not in n.attrs["spec"])
    module = module_key(n, w)
    role = role_of(n.name)

    def param(k: int, part: str, shape: tuple[int, int]) -> Node:
        meta = LoraPart(cfg.r, cfg.alpha, n_in, module, role, part)
        attrs = {"key": f"{module}.lora_{part}.weight", "lora": meta}
        name = f"{n.name}.lora_{part.lower()}"
        return Node(k, Op.PARAM, (), attrs, shape, master_dtype(n.dtype), name, LORA)

    a = param(next_id, "A", (cfg.r, n_in))
    b = param(next_id + 1, "B", (n_out, cfg.r))
    casts = []  # mixed precision: A and B are float32 masters read as 16-bit copies
    if a.dtype != n.dtype:
        casts = [
            Node(k, Op.CAST, (p.id,), {"dtype": n.dtype}, p.shape, n.dtype, f"{p.name}.cast", LORA)
            for k, p in ((next_id + 6, a), (next_id + 7, b))
        ]
    x = n.inputs[0]
    dropped = []
    if seed is not None:
        x_node = Node(
            next_id + 5,
            Op.DROPOUT,
            (x, seed.id),
            {"p": cfg.dropout, "stream": next_id + 5},
            n.shape[:-1] + (n_in,),
            n.dtype,
            f"{n.name}.lora_dropout",
            LORA,
        )
        dropped, x = [x_node], x_node.id
    # (batch, seq, in) x (r, in) x (out, r) -> (batch, seq, out)
    low = Node(
        next_id + 2,
        Op.EINSUM,
        (x, *(c.id for c in casts or (a, b))),
        {"spec": f"{lead}{i},{r}{i},{o}{r}->{lead}{o}"},
        n.shape,
        n.dtype,
        f"{n.name}.lora",
        LORA,
    )
    scaled = Node(
        next_id + 3,
        Op.SCALE,
        (low.id,),
        {"factor": cfg.scale},
        n.shape,
        n.dtype,
        f"{n.name}.lora_scale",
        LORA,
    )
    total = Node(
        next_id + 4, Op.ADD, (n.id, scaled.id), {}, n.shape, n.dtype, f"{n.name}.lora_add", LORA
    )
    return [a, b, *casts, *dropped, low, scaled, total]


def run(graph: Graph, ctx: PassContext) -> Graph:
    """Give every linear einsum whose role is a LoRA target its low-rank branch."""
    cfg = ctx.lora
    if cfg is None:
        return graph
    seed = None
    if cfg.dropout > 0 and ctx.mode is not Mode.INFERENCE:  # PEFT drops out only in training
        seed = Node(max(graph.by_id()) + 1, Op.INPUT, (), {}, (), "i64", DROPOUT_SEED)
    nodes = graph.by_id()
    next_id = max(nodes) + 2
    rename: dict[int, int] = {}
    out: list[Node] = [] if seed is None else [seed]
    for n in graph.nodes:
        n = n.with_(inputs=tuple(rename.get(i, i) for i in n.inputs))
        if n.op is Op.PARAM:  # only A and B train: everything else is the frozen base
            n = n.with_(tags=n.tags | {Tag.FROZEN})
        out.append(n)
        if n.op is Op.EINSUM and Tag.LINEAR in n.tags and role_of(n.name) in cfg.targets:
            w = _weight_param(nodes[n.inputs[1]], nodes)
            made = _branch(n, w, cfg, next_id, seed)
            next_id += 8
            out.extend(made)
            rename[n.id] = made[-1].id
    outputs = {k: rename.get(v, v) for k, v in graph.outputs.items()}
    return graph.replace_nodes(out, outputs)
