"""This machine's limits for the roofline: float32 GEMM peak and memory bandwidth, measured
with NumPy by ``einplan bench machine`` and cached in ``machine.json`` in einplan's cache."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from einplan.compiler.path_cache import cache_dir
from einplan.errors import EinplanError
from einplan.formats.files import write_atomic
from einplan.runtime.device import check_device
from einplan.runtime.memory_limit import check_fits


def machine_path(device: str = "cpu") -> Path:
    """Where the measured limits of ``device`` are cached (machine.json, machine-cuda.json)."""
    return cache_dir() / ("machine.json" if device == "cpu" else f"machine-{device}.json")


def best_seconds(fn: Callable[[], object], reps: int) -> float:
    """The fastest of ``reps`` timed calls after one warm-up call (the least disturbed one)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_machine(
    gemm_n: int = 2048, copy_mib: int = 256, reps: int = 5, device: str = "cpu"
) -> dict[str, Any]:
    """Measure float32 GEMM GFLOP/s (``n^3`` matmul, BLAS on every core) and memory GB/s (a
    large array copy: bytes read plus written); ``device="cuda"``: the GPU's (cuBLAS, also
    with TF32; device memory), timed by CUDA events."""
    for name, value in (("gemm_n", gemm_n), ("copy_mib", copy_mib), ("reps", reps)):
        if value < 1:
            raise EinplanError(f"bench machine: {name} must be at least 1, got {value}")
    if check_device(device) == "cuda":
        from einplan.runtime.cuda.machine import measure_gpu

        return measure_gpu(gemm_n, copy_mib, reps)
    check_fits(
        3 * 4 * gemm_n**2 + 2 * copy_mib * 2**20,
        "bench machine's arrays",
        {},
        "lower --gemm-n or --copy-mib",
    )
    rng = np.random.default_rng(0)
    a = rng.standard_normal((gemm_n, gemm_n), dtype=np.float32)
    b = rng.standard_normal((gemm_n, gemm_n), dtype=np.float32)
    c = np.empty_like(a)
    gemm = best_seconds(lambda: np.matmul(a, b, out=c), reps)
    src = np.ones(copy_mib * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    copy = best_seconds(lambda: np.copyto(dst, src), reps)
    return {
        "gemm_gflops": 2 * gemm_n**3 / gemm / 1e9,
        "bandwidth_gbs": 2 * src.nbytes / copy / 1e9,
        "gemm_n": gemm_n,
        "copy_mib": copy_mib,
        "cpus": os.cpu_count(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def machine_of(rec) -> dict[str, Any] | None:
    """The cached limits of the device a recording ran on: the GPU's when its steps ran on
    the cuda backend, else this machine's CPU."""
    on_gpu = any(r.backend == "cuda" for r in rec.records())
    return load_machine("cuda" if on_gpu else "cpu")


def save_machine(limits: dict[str, Any], device: str = "cpu") -> Path:
    """Cache the measured limits of ``device``; returns the file written."""
    return write_atomic(machine_path(device), json.dumps(limits, indent=1))


def load_machine(device: str = "cpu") -> dict[str, Any] | None:
    """The cached limits of ``device``, or None when ``einplan bench machine`` (``--device
    cuda``) has not been run here."""
    try:
        limits = json.loads(machine_path(device).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(limits, dict) or not {"gemm_gflops", "bandwidth_gbs"} <= set(limits):
        return None
    bad = [k for k in ("gemm_gflops", "bandwidth_gbs") if not is_positive(limits[k])]
    if bad:
        values = ", ".join(f"{k} {limits[k]!r}" for k in bad)
        print(
            f"einplan: warning: {machine_path(device)}: {values} "
            "is not a positive number; ignoring the file (run einplan bench machine again)",
            file=sys.stderr,
        )
        return None
    return limits


def is_positive(value: Any) -> bool:
    """Whether ``value`` is a finite number above zero."""
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf
