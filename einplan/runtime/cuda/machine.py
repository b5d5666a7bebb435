"""The GPU's limits for the roofline: float32 (and TF32) GEMM peak through cuBLAS and device
memory bandwidth, measured with CUDA events (``einplan bench machine --device cuda``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from einplan.runtime.cuda.backend import set_tf32
from einplan.runtime.device import cupy_module


def best_event_seconds(fn: Callable[[], object], reps: int) -> float:
    """The fastest of ``reps`` calls of ``fn`` timed by CUDA events, after one warm-up."""
    cp = cupy_module()
    fn()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / 1e3)
    return min(times)


def measure_gpu(gemm_n: int, copy_mib: int, reps: int) -> dict[str, Any]:
    """float32 and TF32 GEMM GFLOP/s (``n^3`` products of random matrices) and device memory
    GB/s (a device-to-device copy: bytes read plus written) of GPU 0."""
    cp = cupy_module()
    rng = cp.random.default_rng(0)
    a = rng.standard_normal((gemm_n, gemm_n), dtype=np.float32)
    b = rng.standard_normal((gemm_n, gemm_n), dtype=np.float32)
    c = cp.empty_like(a)
    flops = 2 * gemm_n**3
    gemm = {}
    for tf32 in (False, True):
        set_tf32(tf32)
        gemm[tf32] = flops / best_event_seconds(lambda: cp.matmul(a, b, out=c), reps) / 1e9
    set_tf32(False)
    src = rng.standard_normal(copy_mib * 2**20 // 4, dtype=np.float32)
    dst = cp.empty_like(src)
    copy = best_event_seconds(lambda: cp.copyto(dst, src), reps)
    props = cp.cuda.runtime.getDeviceProperties(0)
    return {
        "gemm_gflops": gemm[False],
        "gemm_tf32_gflops": gemm[True],
        "bandwidth_gbs": 2 * src.nbytes / copy / 1e9,
        "gemm_n": gemm_n,
        "copy_mib": copy_mib,
        "device": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
        "cupy": cp.__version__,
        "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
