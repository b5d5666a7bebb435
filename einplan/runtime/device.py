"""Where a plan's arrays live: ``cpu`` (NumPy) or ``cuda`` (CuPy on an NVIDIA GPU).

The plan file never names a device; one is chosen when a plan is bound (``--device``,
``Session(..., device=)``). This module imports CuPy only when ``cuda`` is asked for, and
turns a missing CuPy or a missing GPU into a clear :class:`DeviceError`.
"""

from __future__ import annotations

import functools
import importlib.util
from types import ModuleType

import numpy as np

from einplan.errors import EinplanError

DEVICES = ("cpu", "cuda")
CUPY_HINT = (
    "pip install 'einplan[cuda12]' (CUDA 12) or 'einplan[cuda13]' (CUDA 13), the extras "
    "that install CuPy's wheel cupy-cuda12x or cupy-cuda13x"
)


class DeviceError(EinplanError):
    """An unknown device, or ``cuda`` without CuPy or without a CUDA GPU."""


def check_device(name: str | None) -> str:
    """``name`` (None: ``cpu``) if this machine can run it, else a :class:`DeviceError`
    saying what is missing and how to get it."""
    name = name or "cpu"
    if name not in DEVICES:
        raise DeviceError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if name == "cuda":
        cupy_module()
    return name


@functools.cache
def cupy_module() -> ModuleType:
    """CuPy, once it is known to import and to see at least one CUDA device."""
    if importlib.util.find_spec("cupy") is None:
        raise DeviceError(f"--device cuda needs CuPy, which is not installed: {CUPY_HINT}")
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CuPy's import or the CUDA runtime: no driver, no device
        raise DeviceError(
            f"--device cuda found no usable CUDA GPU ({type(e).__name__}: {e}); run on a "
            "machine with an NVIDIA GPU and its driver, or use --device cpu"
        ) from None
    if count < 1:
        raise DeviceError("--device cuda found no CUDA GPU; use --device cpu")
    return cupy


@functools.cache
def device_stream():
    """The one CUDA stream every run of this process launches on (graphs cannot capture the
    legacy default stream)."""
    return cupy_module().cuda.Stream(non_blocking=True)


def array_module(device: str) -> ModuleType:
    """The array module of ``device``: numpy for ``cpu``, cupy for ``cuda``."""
    return cupy_module() if check_device(device) == "cuda" else np


def to_host(arr) -> np.ndarray:
    """``arr`` as a NumPy array (a device array is copied back; a host one is returned)."""
    return arr.get() if hasattr(arr, "get") and not isinstance(arr, np.ndarray) else arr


def free_bytes(xp) -> int | None:
    """Bytes a run may still allocate on the device of array module ``xp`` (CuPy: the GPU's
    free memory plus what CuPy's pool holds unused); None for the host (numpy)."""
    if xp is np:
        return None
    pool = xp.get_default_memory_pool()
    return xp.cuda.runtime.memGetInfo()[0] + pool.free_bytes()


def to_device(arr, device: str, name: str = "array"):
    """``arr`` on ``device``: uploaded once for ``cuda`` (an array already there is kept)."""
    if device == "cpu":
        return arr
    cp = cupy_module()
    if isinstance(arr, cp.ndarray):
        return arr
    if arr.dtype.name == "bfloat16":
        raise DeviceError(
            f"{name} is bfloat16, which CuPy has no dtype for: compile the plan with "
            "--weight-dtype f16 or f32 to run it on cuda"
        )
    return cp.asarray(arr)
