"""Runs the named passes in order, timing each and verifying the graph after it."""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from einplan.compiler.ir import Graph
from einplan.compiler.lora_spec import LoraConfig
from einplan.compiler.quant_scheme import QuantConfig

if TYPE_CHECKING:
    from einplan.models.train_config import TrainConfig

# The order of DESIGN.md. pack (inference graphs only) lays out projection weights for the
# runtime. schedule runs before memory: buffers may only be reused across dependency levels, so
# liveness needs the level order.
PASSES = ("lora", "quantize", "simplify", "pack", "contract", "schedule", "memory")
# A training entry gets its reverse graph after LoRA and quantisation, then the optimizer's
# in-place updates.
TRAIN_PASSES = (*PASSES[:2], "autodiff", "optimizer", *PASSES[2:])


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
    skip: tuple[str, ...] = ()  # passes not to run (optimisations only, e.g. "pack")
    stats: list[dict] = field(default_factory=list)
    lora: LoraConfig | None = None  # the lora pass adds adapters when set
    quant: QuantConfig | None = None  # the quantize pass quantises when set
    train: TrainConfig | None = None  # the optimizer pass's settings


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
        if name not in ctx.skip:
            graph = run_pass(name, graph, ctx)
    return graph
