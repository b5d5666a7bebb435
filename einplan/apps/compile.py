"""Compiling a model: trace a config into graphs, run the passes, gather one plan."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from einplan.compiler.checkpoint_policy import parse_checkpoint
from einplan.compiler.dtypes import COMPUTE_DTYPES, master_dtype
from einplan.compiler.ir import Graph
from einplan.compiler.lora_spec import parse_lora
from einplan.compiler.passes.flash import check_attention
from einplan.compiler.passes.memory import estimate_memory
from einplan.compiler.pipeline import Mode, PassContext, compile_entry
from einplan.compiler.plan import Plan
from einplan.compiler.quant_scheme import parse_quant
from einplan.errors import EinplanError
from einplan.models.config import config_sections, load_config
from einplan.models.llama import ENTRIES, build_graph
from einplan.models.train_config import TrainConfig, load_train_config
from einplan.runtime.memory_limit import available_memory, human_bytes

WEIGHT_DTYPES = ("f32", "bf16", "f16", "f64")
# entries traced as the loss graph, and what each computes from it
DERIVED = {
    "loss": Mode.INFERENCE,
    "grad": Mode.GRADIENT,  # loss and the gradient of every parameter, as outputs
    "train_step": Mode.TRAINING,  # loss, backward, gradient accumulation and optimizer update
}
# A training plan: the step, validation loss, and generation for samples (and Session).
TRAIN_ENTRIES = ("train_step", "loss", "forward", "prefill", "decode")


def compile_model(
    config: str | Path | dict[str, Any],
    *,
    weight_dtype: str | None = None,
    compute_dtype: str | None = None,
    entries: tuple[str, ...] = ENTRIES,
    train: TrainConfig | None = None,
    ctx: PassContext | None = None,
    lora: str | dict[str, Any] | None = None,
    quant: str | dict[str, Any] | None = None,
    attention: str | None = None,
    checkpoint: str | None = None,
) -> Plan:
    """Trace a model config (path, built-in name, dict or HF config.json) and compile each
    entry point (``forward``, ``prefill``, ``decode``; ``loss``, ``grad``, ``train_step`` for
    training, whose optimizer settings come from ``train`` or the config's train section)
    into one plan. Weights are stored in ``weight_dtype`` and computed in ``compute_dtype``
    (default: the train section's, else float32; ``bf16``/``f16``: mixed precision, 16-bit
    values with float32 weights, optimizer state and loss); the weight dtype defaults to the
    compute dtype (float32 under mixed precision). ``lora``
    (``"r=8,alpha=16,targets=q,v"`` or a dict) and ``quant`` (``"w4a16"`` or a dict with
    group_size, symmetric, activations) override the config's sections of those names.
    ``attention`` (``auto``, ``flash``, ``plain``) overrides the context's choice of attention
    kernel (compiler/passes/flash.py); ``checkpoint`` (``none``, ``layers``, ``every:K``,
    ``selective``) overrides the train section's activation checkpointing of the gradient
    entries."""
    ctx = ctx or PassContext()
    if attention is not None:
        ctx.attention = attention
    check_attention(ctx.attention)
    with paused_gc():
        return _compile(
            config, weight_dtype, compute_dtype, entries, train, ctx, lora, quant, checkpoint
        )


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Switch off Python's cycle collector for a compilation: a graph's nodes make no cycles,
    and each full collection rescans every node built so far, which made compile time grow
    quadratically with the number of layers."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _compile(
    config: str | Path | dict[str, Any],
    weight_dtype: str | None,
    compute_dtype: str | None,
    entries: tuple[str, ...],
    train: TrainConfig | None,
    ctx: PassContext | None,
    lora: str | dict[str, Any] | None,
    quant: str | dict[str, Any] | None,
    checkpoint: str | None,
) -> Plan:
    t0 = time.perf_counter()
    cfg = load_config(config)
    train = train or load_train_config(config)
    if checkpoint is not None:
        parse_checkpoint(checkpoint)
        train = dataclasses.replace(train, checkpoint=checkpoint)
    compute_dtype = compute_dtype or train.compute_dtype
    if compute_dtype not in COMPUTE_DTYPES:
        raise EinplanError(
            f"compute dtype {compute_dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}; "
            "bf16 and f16 are mixed precision (16-bit values, float32 master weights)"
        )
    weight_dtype = weight_dtype or master_dtype(compute_dtype)
    if weight_dtype not in WEIGHT_DTYPES:
        raise EinplanError(
            f"weight dtype {weight_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}"
        )
    training = bool({"grad", "train_step"} & set(entries))
    if training and weight_dtype != master_dtype(compute_dtype):
        raise EinplanError(
            f"training in {compute_dtype} needs the weights stored in "
            f"{master_dtype(compute_dtype)}, not {weight_dtype}: leave out --weight-dtype"
        )
    if training:  # the plan's train settings say what it was compiled with
        train = replace(train, compute_dtype=compute_dtype)
    sections = config_sections(config)
    ctx = ctx or PassContext()
    ctx.train = train
    ctx.compute_dtype = compute_dtype
    ctx.checkpoint = train.checkpoint
    ctx.lora = parse_lora(lora if lora is not None else sections.get("lora"))
    ctx.quant = parse_quant(quant if quant is not None else sections.get("quant"))
    if any(DERIVED.get(e, Mode.INFERENCE) is not Mode.INFERENCE for e in entries):
        # every entry of a plan with gradients reads the one set of weights the optimizer
        # updates in place (or the gradients are taken of): none may pack them into copies
        ctx.pack = False
    graphs = {}
    for entry in entries:
        traced = "loss" if entry in DERIVED else entry
        graph = build_graph(cfg, traced, weight_dtype, compute_dtype)
        graph.name = entry
        graphs[entry] = compile_entry(graph, ctx, DERIVED.get(entry, Mode.INFERENCE))
    params = parameter_count(graphs[entries[0]])
    meta = {
        "weight_dtype": weight_dtype,
        "compute_dtype": compute_dtype,
        "lora": ctx.lora.to_dict() if ctx.lora else None,
        "quant": ctx.quant.to_dict() if ctx.quant else None,
        "attention": {name: g.meta.get("attention") for name, g in graphs.items()},
        "parameters": params,
        "passes": ctx.stats,
        "compile_seconds": time.perf_counter() - t0,
    }
    if "train_step" in entries:
        meta["train"] = train.to_dict()
    return Plan(cfg.to_dict(), graphs, meta)


def memory_warning(plan: Plan, batch: int, seq: int) -> str | None:
    """A warning when the plan's largest entry, at this batch and sequence length (and a
    context of ``seq``), needs more memory than the machine has available; else None."""
    dims = {"batch": batch, "seq": seq, "kv": seq, "ctx": seq}
    peaks = {name: estimate_memory(g, dims)["peak_bytes"] for name, g in plan.entries.items()}
    entry = max(peaks, key=peaks.__getitem__)
    available = available_memory()
    if peaks[entry] <= available:
        return None
    return (
        f"{entry} at batch {batch}, seq {seq} is estimated to need "
        f"{human_bytes(peaks[entry])}, more than the {human_bytes(available)} available here; "
        "running it so would stop: lower batch or seq, or run it on a larger machine"
    )


def parameter_count(graph: Graph) -> int:
    """Parameters of the model a graph computes (LoRA's included): a quantised weight counts
    as the float matrix it stands for, its scales and zero points not at all."""
    total = 0
    for n in graph.params():
        quant = n.attrs.get("quant")
        if quant is None:
            total += int(np.prod(n.shape))
        elif quant.part == "q":
            total += int(np.prod(quant.shape))
    return total
