"""``einplan bench kernels``: what the compiled kernels cost to get (JIT on a machine's first
run, loading from the on-disk cache after) and what they gain per call on SmolLM2-135M's
product shapes, against numpy's kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

# name, (out, in), bits, group, symmetric: SmolLM2-135M's decode products
SHAPES = [
    ("w8 mlp up+gate 3072x576", (3072, 576), 8, 576, True),
    ("w4 g64 mlp up+gate 3072x576", (3072, 576), 4, 64, True),
    ("w4 g64 mlp down 576x1536", (576, 1536), 4, 64, True),
]


def _first_calls() -> dict:
    """In a fresh process: numba's import, then each kernel's first call (JIT or cache)."""
    t0 = time.perf_counter()
    from einplan.runtime.backends import numba_kernels as nk

    out = {"import_s": time.perf_counter() - t0}
    x = np.ones((1, 128), np.float32)
    for name, bits, k_in, kernel in [
        ("q8_matmul", 8, 128, nk.q8_matmul),
        ("q4_matmul_64", 4, 128, nk.q4_matmul_64),
        ("q4_matmul_32", 4, 64, nk.q4_matmul_32),
    ]:
        q = np.zeros((4, k_in if bits == 8 else k_in // 2), np.int8 if bits == 8 else np.uint8)
        s = np.ones((4, 1 if bits == 8 else k_in // 64), np.float32)
        o = np.empty((1, 4), np.float32)
        t0 = time.perf_counter()
        if bits == 8:
            kernel(x[:, :k_in], q, s, s * 0, o)
        else:
            kernel(np.ascontiguousarray(x[:, :k_in]), q, s, s * 0, 64 if k_in == 128 else 32, o)
        out[name] = time.perf_counter() - t0
    from einplan.runtime.backends import numba_int4 as int4

    if int4.has_avx512():
        t0 = time.perf_counter()
        q4 = np.zeros((4, 64), np.uint8)
        s = np.ones((4, 2), np.float32)
        int4.q4_lut_matmul(x, q4, s, s * 0, 64, np.empty((1, 4), np.float32))
        out["q4_lut_matmul"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    nk.q_take_rows(
        np.zeros(2, np.int64),
        np.zeros((4, 8), np.uint8),
        np.ones((4, 1), np.float32),
        np.zeros((4, 1), np.float32),
        8,
        8,
        np.empty((2, 8), np.float32),
    )
    out["q_take_rows"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    from einplan.runtime.backends import numba_decode

    numba_decode.warm_up()
    out["fp32 decode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    from einplan.runtime.backends import numba_panels

    numba_panels.warm_up()
    out["fp32 panels"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    from einplan.runtime.backends import numba_flash

    numba_flash.warm_up()
    out["causal flash"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    from einplan.runtime.backends import numba_exp

    numba_exp.warm_up()
    out["exp, SwiGLU"] = time.perf_counter() - t0  # flash attention's exp and SwiGLU
    return out


def _best(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def speed(reps: int = 50) -> list[dict]:
    """Per decode shape: numpy's kernel and the compiled one, µs per call (best of reps)."""
    from einplan.runtime.backends import numba_int4
    from einplan.runtime.backends import numba_kernels as nk
    from einplan.runtime.qmatmul import THREADS, QuantizedMatrix, scratch_shapes
    from einplan.runtime.quantize import quantize_weight

    rows_out = []
    rng = np.random.default_rng(0)
    for name, (rows, cols), bits, group, sym in SHAPES:
        p = quantize_weight(rng.standard_normal((rows, cols), np.float32), bits, group, sym)
        w = QuantizedMatrix(p["q"], p["scale"], p.get("zero_point"), bits, group)
        x = rng.standard_normal((1, cols), np.float32)
        out = np.empty((1, rows), np.float32)
        sh = scratch_shapes(rows, cols, group, 1)
        bufs = [{k: np.empty(s, np.float32) for k, s in sh.items()} for _ in range(THREADS)]
        kern = nk.q8_matmul if bits == 8 else numba_int4.q4_kernel(group, cols // 2)
        args = (
            (x, w.q, w.scale, w.zero_f32, out)
            if bits == 8
            else (x, w.q, w.scale, w.zero_f32, group, out)
        )
        t_np = _best(lambda w=w, x=x, out=out, bufs=bufs: w.matmul(x, out, bufs), reps)
        t_nb = _best(lambda kern=kern, args=args: kern(*args), reps)
        rows_out.append({"shape": name, "numpy_us": t_np * 1e6, "numba_us": t_nb * 1e6})
    return rows_out + gemv_speed(reps)


# (in, out) of SmolLM2-135M's packed fp32 products
GEMV_SHAPES = [
    ("qkv", 576, 960),
    ("attn o", 576, 576),
    ("mlp gate+up", 576, 3072),
    ("mlp down", 1536, 576),
    ("lm head", 576, 49152),
]


def gemv_speed(reps: int) -> list[dict]:
    """fp32 products per shape and rows of x (1: decode, 8: batch-8 decode, 32: a prompt):
    BLAS on the (in, out) array (numpy), the panel kernel on the same weight as panels
    (numba: an inference plan's projections) and, up to 8 rows, the GEMV of the array (numba
    on weights bound unpacked); each call on a weight not in the caches (weights rotate
    through 256 MB)."""
    from numba import get_num_threads

    from einplan.runtime.backends.numba_decode import f32_gemv
    from einplan.runtime.backends.numba_panels import panel_matmul
    from einplan.runtime.panels import pack_panels

    rows_out = []
    rng = np.random.default_rng(0)
    for name, k_in, n in GEMV_SHAPES:
        copies = max(2, (256 << 20) // (4 * k_in * n))
        ws = [rng.standard_normal((k_in, n), np.float32) for _ in range(copies)]
        panels = [pack_panels(w).panels for w in ws]
        for m in (1, 8, 32):
            x = rng.standard_normal((m, k_in), np.float32)
            out = np.empty((m, n), np.float32)
            blas = rotating(lambda w, x=x, out=out: np.matmul(x, w, out=out), ws)
            packed = rotating(
                lambda p, x=x, out=out: panel_matmul(x, p, out, get_num_threads()), panels
            )
            row = {
                "shape": f"fp32 {name} {k_in}x{n}, {m} row{'s' if m > 1 else ''}",
                "numpy_us": _best(blas, reps) * 1e6,
                "numba_us": _best(packed, reps) * 1e6,
            }
            if m <= 8:
                part = np.empty((get_num_threads(), m, n), np.float32)
                gemv = rotating(lambda w, x=x, p=part, out=out: f32_gemv(x, w, p, out), ws)
                row["gemv_us"] = _best(gemv, reps) * 1e6
            rows_out.append(row)
    return rows_out


def rotating(fn, weights: list):
    """``fn(w)`` for the next of ``weights`` at each call (so no call finds it in cache)."""
    state = [0]

    def call():
        state[0] += 1
        return fn(weights[state[0] % len(weights)])

    return call


def bench_kernels(reps: int = 50) -> dict:
    """First-call cost of each compiled kernel with a cold cache and a warm one (each in a
    fresh process), and per-call speed against numpy's kernels."""
    code = (
        "import json; from einplan.apps.kernel_bench import _first_calls as f; "
        "print(json.dumps(f()))"
    )
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, NUMBA_CACHE_DIR=tmp)
        for phase in ("cold", "cached"):
            p = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            )
            result[phase] = json.loads(p.stdout.strip().splitlines()[-1])
    result["speed"] = speed(reps)
    return result
