"""The public Python API; the commands and users call these, never the runtime's classes.

Each name is defined where its work is done (``apps/``, ``compiler/``, ``runtime/``) and
gathered here, so that this one module is the engine's surface."""

from __future__ import annotations

from einplan.apps.chat import render_chat
from einplan.apps.compile import (
    TRAIN_ENTRIES,
    WEIGHT_DTYPES,
    compile_model,
    memory_warning,
    parameter_count,
)
from einplan.apps.evaluate import evaluate_text
from einplan.apps.kernel_bench import bench_kernels
from einplan.apps.quant_report import quant_report
from einplan.apps.quantize_checkpoint import quantize_checkpoint
from einplan.apps.session import Session, check_weights_config, load_plan, plan_config
from einplan.apps.train import TrainResult, train
from einplan.compiler.ir import Graph
from einplan.compiler.pipeline import ALL_PASSES, PassContext
from einplan.compiler.plan import Plan
from einplan.compiler.quant_scheme import parse_quant
from einplan.models.llama import ENTRIES
from einplan.runtime.generate import Generation, PhaseStats
from einplan.runtime.recorder import Recorder

__all__ = [
    "ALL_PASSES",
    "ENTRIES",
    "TRAIN_ENTRIES",
    "WEIGHT_DTYPES",
    "Generation",
    "Graph",
    "PassContext",
    "PhaseStats",
    "Plan",
    "Recorder",
    "Session",
    "TrainResult",
    "bench_kernels",
    "check_weights_config",
    "compile_model",
    "evaluate_text",
    "load_plan",
    "memory_warning",
    "parameter_count",
    "parse_quant",
    "plan_config",
    "quant_report",
    "quantize_checkpoint",
    "render_chat",
    "train",
]
