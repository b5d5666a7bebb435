"""einplan: Llama-family models traced into einsum graphs, compiled to plans, run on NumPy.

The public API lives in :mod:`einplan.api`; its names are loaded on first use (PEP 562), so
that importing one part (``einplan.compiler.ops``) does not pull in the runtime."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from einplan._version import __version__

if TYPE_CHECKING:
    from einplan.api import (
        Generation,
        Plan,
        Session,
        TrainResult,
        compile_model,
        load_plan,
        train,
    )

__all__ = [
    "Generation",
    "Plan",
    "Session",
    "TrainResult",
    "compile_model",
    "load_plan",
    "train",
    "__version__",
]


def __getattr__(name: str) -> Any:
    """Load a public API name from :mod:`einplan.api` the first time it is asked for."""
    if name in __all__:
        return getattr(importlib.import_module("einplan.api"), name)
    raise AttributeError(f"module 'einplan' has no attribute {name!r}")
