"""The pass lists, by mode, and the runner that applies them in order, timing each and
verifying the graph after it."""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from einplan.compiler.ir import Graph
from einplan.compiler.lora_spec import LoraConfig
from einplan.compiler.quant_scheme import QuantConfig

if TYPE_CHECKING:
    from einplan.models.train_config import TrainConfig


class Mode(StrEnum):
    """What an entry computes, which decides the passes it gets."""

    INFERENCE = "inference"  # values only (forward, prefill, decode, loss)
    GRADIENT = "gradient"  # + the reverse graph: the loss and every trainable param's gradient
    TRAINING = "training"  # + gradient accumulation and the optimizer's in-place update


# Every pass, in the order they run. The reverse graph comes after LoRA, quantisation and
# flash attention's rewrite, the recomputation of checkpointed activations and the optimizer's
# updates after it;
# mixed_precision then marks (and checks) every step computing on 16-bit values. pack lays out
# projection weights in copies, so it runs only on inference graphs of plans whose weights
# nothing updates. schedule runs before memory: buffers may only be reused across dependency
# levels, so liveness needs the level order.
ALL_PASSES = (
    "lora",
    "quantize",
    "flash",
    "autodiff",
    "checkpoint",
    "optimizer",
    "mixed_precision",
    "simplify",
    "pack",
    "contract",
    "schedule",
    "memory",
)


def passes_for(mode: Mode, pack: bool = True) -> tuple[str, ...]:
    """The passes an entry of ``mode`` runs, in order; ``pack`` False leaves every weight as
    the checkpoint stores it (a training plan's entries all read the weights it updates)."""
    runs = {
        "autodiff": mode is not Mode.INFERENCE,
        "checkpoint": mode is not Mode.INFERENCE,
        "optimizer": mode is Mode.TRAINING,
        "pack": pack and mode is Mode.INFERENCE,
    }
    return tuple(name for name in ALL_PASSES if runs.get(name, True))


PASSES = passes_for(Mode.INFERENCE)
TRAIN_PASSES = passes_for(Mode.TRAINING)


@dataclass
class PassContext:
    """Options shared by the passes of one compilation."""

    # sizes the symbolic dims take when a pass needs numbers (contraction order, peak estimate)
    typical_dims: dict[str, int] = field(
        default_factory=lambda: {"batch": 1, "seq": 256, "kv": 256, "ctx": 256}
    )
    path_cache: Path | None = None  # on-disk cache of contraction paths; None: default location
    use_path_cache: bool = True
    verify: bool = True
    dump_after: tuple[str, ...] = ()
    on_dump: Callable[[str, Graph], None] | None = None
    pack: bool = True  # pack projection weights of inference entries (see passes_for)
    mode: Mode = Mode.INFERENCE  # the entry being compiled (set by compile_entry)
    stats: list[dict] = field(default_factory=list)
    lora: LoraConfig | None = None  # the lora pass adds adapters when set
    quant: QuantConfig | None = None  # the quantize pass quantises when set
    train: TrainConfig | None = None  # the optimizer pass's settings
    compute_dtype: str = "f32"  # bf16/f16: mixed precision (passes/mixed_precision.py)
    attention: str = "auto"  # auto | flash | plain: what the flash pass does (passes/flash.py)
    # activation checkpointing of gradient entries: none, layers, every:K or selective
    checkpoint: str = "none"


def run_pass(name: str, graph: Graph, ctx: PassContext) -> Graph:
    """Run one pass by name, record its time and node count, and verify its result."""
    module = importlib.import_module(f"einplan.compiler.passes.{name}")
    t0 = time.perf_counter()
    out = module.run(graph, ctx)
    seconds = time.perf_counter() - t0
    if ctx.verify:
        out.verify()
    ctx.stats.append(
        {
            "pass": name,
            "entry": graph.name,
            "nodes_in": len(graph.nodes),
            "nodes_out": len(out.nodes),
            "seconds": seconds,
        }
    )
    if name in ctx.dump_after and ctx.on_dump is not None:
        ctx.on_dump(name, out)
    return out


def run_pipeline(graph: Graph, ctx: PassContext, passes: tuple[str, ...] = PASSES) -> Graph:
    """Run every pass of ``passes`` over ``graph`` and return the final graph."""
    if ctx.verify:
        graph.verify()
    for name in passes:
        graph = run_pass(name, graph, ctx)
    return graph


def compile_entry(graph: Graph, ctx: PassContext, mode: Mode) -> Graph:
    """Run the passes of ``mode`` over one traced entry (the context's stats are shared)."""
    return run_pipeline(graph, replace(ctx, mode=mode), passes_for(mode, ctx.pack))
