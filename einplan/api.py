"""The public Python API; the commands and users call these, never the runtime's classes.

Each name is defined where its work is done (``apps/``, ``compiler/``, ``runtime/``) and
gathered here, so that this one module is the engine's surface."""

from __future__ import annotations

from einplan.apps.compile import TRAIN_ENTRIES, WEIGHT_DTYPES, compile_model, parameter_count
from einplan.apps.session import Session, check_weights_config, load_plan, plan_config
from einplan.models.llama import ENTRIES

__all__ = [
    "ENTRIES",
    "TRAIN_ENTRIES",
    "WEIGHT_DTYPES",
    "Session",
    "check_weights_config",
    "compile_model",
    "load_plan",
    "parameter_count",
    "plan_config",
]
