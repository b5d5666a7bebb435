"""einplan: Llama-family models traced into einsum graphs, compiled to plans, run on NumPy.

The public API lives in :mod:`einplan.api`; its names are loaded on first use (PEP 562), so
that importing one part (``einplan.compiler.ops``) does not pull in the runtime."""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

from einplan._version import __version__

# OpenBLAS's idle threads spin up to 2^28 cycles (about 0.1 s) after each call before they
# sleep. On 2 cores a spinning thread takes the core that flash attention's and the quantised
# products' second worker runs on, which halved flash attention in a SmolLM2 forward (671 ms
# against 368 of a 1x1024 forward's 2.3 s) and cost the tiny config's train step 20 %. 2^12
# cycles lets them sleep at once; what it costs is a wake-up per product where products
# come faster than that: numpy-backend decode 3-7 % slower, numba decode unchanged
# (measured in interleaved runs; see the README). OpenBLAS reads it once, when numpy
# loads: einplan sets
# it only if numpy is not loaded yet and the environment does not say otherwise.
if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "12")

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
