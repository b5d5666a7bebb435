"""Kernel backends: where each step of a bound plan gets its kernel.

A :class:`Backend` is a name and a table from op to kernel factory. The plan file never names
a backend: one is chosen when a plan is bound (``Executor(..., kernels=)``,
``Session(..., kernels=)``, ``--kernels``). ``numpy`` (runtime/kernels.py) is always there
and has a kernel for every op; another backend has kernels only for the ops where it wins,
and :meth:`Backend.kernel_for` is the one rule for the rest: a backend's factory may decline
a node (return None: wrong op, shape or dtype for it) and the step then runs numpy's kernel.
Every step records which backend made its kernel (StepInfo.backend).

A factory is ``factory(node, shapes, out_shape, scratch, inputs) -> Kernel | None`` with the
arguments of runtime/kernels.py's factories plus the step's input nodes (``inputs``), so
that it can see, say, that a table is a dequantised weight. A GPU backend implements the same.
"""

from __future__ import annotations

import importlib.util

from einplan.errors import EinplanError
from einplan.runtime.backends.base import NUMPY, Backend, Factory
from einplan.runtime.device import check_device

__all__ = ["NUMPY", "Backend", "BackendError", "Factory", "available_backends", "get_backend"]

NAMES = ("numpy", "numba")
INSTALL_HINT = {"numba": "pip install numba  (or: pip install 'einplan[numba]')"}


class BackendError(EinplanError):
    """An unknown backend, or one whose library is not installed."""


def installed(name: str) -> bool:
    """Whether a backend's library can be imported (without importing it)."""
    return name == "numpy" or importlib.util.find_spec(name) is not None


def available_backends() -> list[str]:
    """The backends this machine can run, fastest first."""
    return [n for n in reversed(NAMES) if installed(n)]


def default_backend() -> str:
    """The fastest installed backend (numba when importable, else numpy)."""
    return available_backends()[0]


def get_backend(
    name: str | Backend | None = None,
    device: str | None = None,
    cuda_graph: bool = True,
    tf32: bool = False,
) -> Backend:
    """The backend called ``name`` (None: :func:`default_backend`); a clear error for an
    unknown name or a missing library. Imports no compiler library: the numba backend
    imports numba only when it first builds a compiled kernel. ``device="cuda"`` gives the
    GPU backend (runtime/cuda; CuPy), whose options are ``cuda_graph`` (replay each bound
    entry as one CUDA graph) and ``tf32`` (float32 products on TF32 tensor cores)."""
    if isinstance(name, Backend):
        return name
    if check_device(device) == "cuda":
        if name not in (None, "cuda"):
            raise BackendError(
                f"--kernels {name} runs on the cpu; --device cuda has its own kernels"
            )
        from einplan.runtime.cuda.backend import cuda_backend

        return cuda_backend(cuda_graph, tf32)
    if tf32 or not cuda_graph:
        raise BackendError("--tf32 and --no-cuda-graph are options of --device cuda")
    name = default_backend() if name is None else name
    if name not in NAMES:
        raise BackendError(f"unknown kernels backend {name!r}; choose one of {', '.join(NAMES)}")
    if not installed(name):
        raise BackendError(
            f"the {name} kernels backend needs {name}, which is not installed: {INSTALL_HINT[name]}"
        )
    if name == "numpy":
        return NUMPY
    from einplan.runtime.backends.numba_backend import NUMBA

    return NUMBA
