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
from einplan.apps.serving import GenParams, ServingEngine
from einplan.apps.session import Session, check_weights_config, load_plan, plan_config
from einplan.apps.train import TrainResult, train
from einplan.compiler.checkpoint_policy import CheckpointError, parse_checkpoint
from einplan.compiler.ir import Graph
from einplan.compiler.pipeline import ALL_PASSES, PassContext
from einplan.compiler.plan import Plan
from einplan.compiler.quant_scheme import parse_quant
from einplan.models.llama import ENTRIES
from einplan.runtime.generate import Generation, PhaseStats
from einplan.runtime.recorder import Recorder


def create_server(session: Session, model: str = "einplan", **options):
    """An OpenAI-compatible FastAPI app over ``session`` and its started
    :class:`ServingEngine` (``max_batch``, ``ctx``, ``max_queue``, ``api_key``, ``chunk``);
    needs the ``einplan[serve]`` extra."""
    try:
        from einplan.apps.server import create_app
    except ImportError as e:
        from einplan.errors import EinplanError

        raise EinplanError(
            f"serving needs the serve extra ({e.name} is missing): pip install 'einplan[serve]'"
        ) from None
    return create_app(session, model, **options)


def run_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` (from :func:`create_server`) with uvicorn until interrupted."""
    from einplan.apps.server import serve

    serve(app, host, port, log_level)


__all__ = [
    "ALL_PASSES",
    "CheckpointError",
    "ENTRIES",
    "TRAIN_ENTRIES",
    "WEIGHT_DTYPES",
    "GenParams",
    "Generation",
    "Graph",
    "PassContext",
    "PhaseStats",
    "Plan",
    "Recorder",
    "ServingEngine",
    "Session",
    "TrainResult",
    "bench_kernels",
    "check_weights_config",
    "compile_model",
    "create_server",
    "evaluate_text",
    "load_plan",
    "memory_warning",
    "parse_checkpoint",
    "parameter_count",
    "parse_quant",
    "plan_config",
    "quant_report",
    "quantize_checkpoint",
    "render_chat",
    "run_server",
    "train",
]
