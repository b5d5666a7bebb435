"""The optimizer's steps: gradients accumulated into state buffers, their global norm, and an
in-place AdamW or SGD update of every trained parameter, appended after the reverse graph.

Each run of the entry is one micro-batch: its gradients are added into ``grad.<key>`` state
buffers. The update steps read the runtime input ``step``: 0 means "accumulate only"; t >= 1
applies optimizer step t (its bias correction) with learning rate ``lr``, clipped by the global
norm, then empties the accumulators. A non-finite norm (or loss) skips the update (and empties
them). An f16 plan also reads ``inv_loss_scale`` (dynamic loss scaling, see runtime/trainer.py).
Updates are side effects (``Graph.effects``), tagged ``optimizer``; every reader of a parameter
must run before its update, which this pass checks.
"""

from __future__ import annotations

import networkx as nx

from einplan.compiler.ir import Graph
from einplan.compiler.names import GRAD_PREFIX, grad_key, optim_key
from einplan.compiler.ops import Op, ShapeError
from einplan.compiler.pipeline import PassContext
from einplan.compiler.tags import Tag
from einplan.compiler.trace import Builder

INV_LOSS_SCALE = "inv_loss_scale"  # the runtime input 1/S of an f16 plan whose loss is scaled by S


def check_reads_before_updates(graph: Graph, norm: int, params: list[int]) -> None:
    """Every step reading an updated parameter must be an ancestor of the norm (which every
    update waits for, and which reads the loss and every gradient), or the in-place update
    could overwrite a value still to be read."""
    dag = nx.DiGraph((i, n.id) for n in graph.nodes for i in n.inputs)
    before = nx.ancestors(dag, norm)
    updated = set(params)
    for n in graph.nodes:
        if n.op not in (Op.ADAMW, Op.SGD) and updated.intersection(n.inputs):
            if n.id not in before:
                raise ShapeError(f"optimizer: {n.name} reads a parameter after its update")


def run(graph: Graph, ctx: PassContext) -> Graph:
    """Replace the ``grad.*`` outputs by accumulation, global norm and in-place updates."""
    cfg = ctx.train
    if cfg is None:
        raise ShapeError("optimizer pass: no train settings in the pass context")
    nodes = graph.by_id()
    params = {n.attrs["key"]: n for n in graph.params()}
    grads = {
        k[len(GRAD_PREFIX) :]: v for k, v in graph.outputs.items() if k.startswith(GRAD_PREFIX)
    }
    if not grads:
        raise ShapeError("optimizer pass: the graph has no gradients (run autodiff first)")
    dtype = nodes[graph.outputs["loss"]].dtype
    outputs = {k: v for k, v in graph.outputs.items() if not k.startswith(GRAD_PREFIX)}
    b = Builder.extend(graph.replace_nodes(graph.nodes, outputs))
    with b.tagged(Tag.OPTIMIZER):
        lr = b.input("lr", (), dtype)
        step = b.input("step", (), "i64")
        # f16 training scales the loss (runtime/loss_scale.py): each gradient is unscaled
        # (in float32) before it is accumulated, clipped and applied
        inv_scale = b.input(INV_LOSS_SCALE, (), dtype) if ctx.compute_dtype == "f16" else None
        accs = {}
        for key, gid in grads.items():
            p = params[key]
            acc = b.state(f"{p.name}.grad", grad_key(key), p.shape, p.dtype)
            g = b.value(nodes[gid])
            if inv_scale is not None:
                g = b.mul(g, inv_scale, role=f"{p.name}.unscale")
            accs[key] = b.acc_grad(acc, g, role=f"{p.name}.acc_grad")
        loss = b.value(nodes[graph.outputs["loss"]])
        norm = b.grad_norm(loss, list(accs.values()))
        for key, acc in accs.items():
            p = params[key]
            decay = cfg.weight_decay if len(p.shape) > 1 or cfg.decay_norms_and_biases else 0.0
            attrs = {"weight_decay": decay, "max_norm": cfg.grad_clip}
            if cfg.optimizer == "adamw":
                op, attrs = Op.ADAMW, {**attrs, "beta1": cfg.beta1, "beta2": cfg.beta2}
                attrs["eps"] = cfg.eps
                moments = [
                    b.state(f"{p.name}.{m}", optim_key(m, key), p.shape, p.dtype)
                    for m in ("m", "v")
                ]
            else:
                op, attrs = Op.SGD, {**attrs, "momentum": cfg.momentum}
                moments = [b.state(f"{p.name}.buf", optim_key("buf", key), p.shape, p.dtype)]
            inputs = [b.value(p), *moments, acc, norm, lr, step]
            b.effect(b.update(op, inputs, attrs, role=f"{p.name}.{op.value}"))
    b.output("grad_norm", norm)
    check_reads_before_updates(b.graph, norm.id, [p.id for p in params.values()])
    return b.graph
