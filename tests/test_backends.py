"""Kernel backends: compiled kernels equal numpy's to float32 rounding (random shapes, group
edges, strided inputs), the fall-through rule, clear errors, and the backend named per step."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import BACKENDS, FIXTURES
from hypothesis import given, settings
from hypothesis import strategies as st

import einplan
from einplan.api import Recorder
from einplan.runtime import backends
from einplan.runtime.backends import BackendError, get_backend
from einplan.runtime.qmatmul import THREADS, QuantizedMatrix, scratch_shapes
from einplan.runtime.quantize import quantize_weight

CASE = FIXTURES / "llama_gqa_tied"
needs_numba = pytest.mark.skipif("numba" not in BACKENDS, reason="numba is not installed")


def quantized(rows, cols, bits, group, symmetric, seed=0):
    w = np.random.default_rng(seed).standard_normal((rows, cols), np.float32) * 0.05
    g = cols if bits == 8 else group
    p = quantize_weight(w, bits, g, symmetric)
    return QuantizedMatrix(p["q"], p["scale"], p.get("zero_point"), bits, g)


def numpy_product(w: QuantizedMatrix, x: np.ndarray) -> np.ndarray:
    """numpy's kernel (block dequantise + BLAS / per-group) for the same product."""
    m = x.shape[0]
    bufs = [
        {k: np.empty(s, np.float32) for k, s in scratch_shapes(w.rows, w.cols, w.group, m).items()}
        for _ in range(THREADS)
    ]
    out = np.empty((m, w.rows), np.float32)
    w.matmul(np.ascontiguousarray(x), out, bufs)
    return out


def close(got, want, x, w):
    """Equal to float32 rounding: error against sum |x| |W| (the scale of the sums' terms)."""
    scale = np.abs(x) @ np.abs(w.dequantize()).T + 1e-30
    assert np.all(np.abs(got - want) <= 4e-6 * scale), np.max(np.abs(got - want) / scale)


@needs_numba
@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([8, 4]),
    group=st.sampled_from([32, 64, 128]),
    symmetric=st.booleans(),
    rows=st.integers(1, 70),
    groups=st.integers(1, 6),
    m=st.integers(1, 16),
    strided=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_compiled_products_equal_dequantise_then_matmul(
    bits, group, symmetric, rows, groups, m, strided, seed
):
    from einplan.runtime.backends import numba_int4
    from einplan.runtime.backends import numba_kernels as nk

    cols = group * groups  # int4 in/2 need not be a multiple of the group: segments split
    w = quantized(rows, cols, bits, group, symmetric, seed)
    x = np.random.default_rng(seed + 1).standard_normal((m, 2 * cols), np.float32)
    x = x[:, ::2] if strided else np.ascontiguousarray(x[:, :cols])
    out = np.full((m, rows), np.nan, np.float32)
    if bits == 8:
        nk.q8_matmul(x, w.q, w.scale, w.zero_f32, out)
    else:
        numba_int4.q4_matmul(x, w.q, w.scale, w.zero_f32, w.group, out)
    close(out, x @ w.dequantize().T, x, w)
    close(out, numpy_product(w, x), x, w)


@needs_numba
@pytest.mark.parametrize(
    "bits, group, symmetric",
    [(8, 0, True), (8, 0, False), (4, 32, True), (4, 64, False), (4, 128, True)],
)
def test_compiled_gather_is_bit_identical(bits, group, symmetric):
    from einplan.runtime.backends import numba_kernels as nk

    w = quantized(50, 256, bits, group, symmetric)
    ids = np.array([[3, 49, 0], [7, 7, 1]])
    want = np.empty((2, 3, 256), np.float32)
    w.take_rows(ids, want)
    got = np.empty_like(want)
    flat = got.reshape(-1, 256)
    nk.q_take_rows(ids.reshape(-1), w.q, w.scale, w.zero_f32, w.bits, w.group, flat)
    assert np.array_equal(got, want)


@needs_numba
def test_every_int4_kernel_agrees_where_it_applies():
    """in/2 a multiple of 64, of 32 only, and of neither; groups whose edges fall inside a
    row's high half: each int4 kernel that takes the shape (the table-lookup one with
    AVX-512, which q4_kernel picks wherever it fits), 1 to 9 input rows."""
    from einplan.runtime.backends import numba_int4 as int4
    from einplan.runtime.backends import numba_kernels as nk

    for cols, group in [(256, 64), (192, 64), (96, 32), (576, 64), (384, 128), (320, 32)]:
        half = cols // 2
        kernels = [nk.q4_matmul_any]
        kernels += [nk.q4_matmul_32] if half % 32 == 0 else []
        kernels += [nk.q4_matmul_64] if half % 64 == 0 and group % 64 == 0 else []
        lookup = int4.has_avx512() and int4.fits(group, half)
        kernels += [int4.q4_lut_matmul] if lookup else []
        assert (int4.q4_kernel(group, half) is int4.q4_lut_matmul) == lookup
        w = quantized(9, cols, 4, group, False)
        for m in (1, 2, 3, 4, 5, 9):
            x = np.random.default_rng(m).standard_normal((m, cols), np.float32)
            for kernel in kernels:
                out = np.full((m, 9), np.nan, np.float32)
                kernel(x, w.q, w.scale, w.zero_f32, w.group, out)
                close(out, x @ w.dequantize().T, x, w)


@needs_numba
def test_lookup_kernel_is_taken_on_avx512():
    """The fast int4 kernel is not silently absent on the machines it is written for."""
    import os

    import llvmlite.binding

    from einplan.runtime.backends import numba_int4 as int4

    host = llvmlite.binding.get_host_cpu_features().get("avx512f", False)
    portable = bool(os.environ.get("NUMBA_CPU_NAME"))
    assert int4.has_avx512() == (host and not portable)
    assert int4.fits(64, 288) and int4.fits(128, 768) and not int4.fits(32, 48)


def test_unknown_or_missing_backend_is_a_clear_error(monkeypatch):
    with pytest.raises(BackendError, match="choose one of numpy, numba"):
        get_backend("cuda")
    monkeypatch.setattr(backends, "installed", lambda name: name == "numpy")
    with pytest.raises(BackendError, match="pip install numba"):
        get_backend("numba")
    assert backends.default_backend() == "numpy"


def test_numpy_backend_runs_every_op_and_steps_name_their_backend(kernels):
    plan = einplan.compile_model(CASE, quant={"scheme": "w4a16", "group_size": 32})
    rec = Recorder()
    session = einplan.Session(plan, CASE, kernels=kernels)
    session.forward(np.arange(5)[None], recorder=rec)
    made = {(r.op, r.backend) for r in rec.records()}
    if kernels == "numpy":
        assert {b for _, b in made} == {"numpy"}
    else:  # compiled quantised products, gather, norms; the residual adds stay numpy's
        assert ("einsum", "numba") in made and ("gather", "numba") in made
        assert ("rms_norm", "numba") in made and ("add", "numpy") in made
    # a float plan: numba holds its projections and tied head as panels and computes every
    # product of them, of any number of rows, and the gather (runtime/panels.py)
    rec = Recorder()
    einplan.Session(einplan.compile_model(CASE), CASE, kernels=kernels).forward(
        np.arange(40)[None], recorder=rec
    )
    products = {r.name: r.backend for r in rec.records() if "linear" in r.tags}
    assert len(products) == 9 and set(products.values()) == {kernels}
    assert {r.backend for r in rec.records() if r.op == "gather"} == {kernels}


def test_run_stats_json(tmp_path, capsys):
    from einplan.cli import main

    plan = tmp_path / "m.plan"
    main(["compile", str(CASE / "config.json"), "-o", str(plan)])
    stats = tmp_path / "stats.json"
    main(
        [
            "run",
            str(plan),
            "--weights",
            str(CASE),
            "--tokenizer",
            "bytes",
            "--prompt",
            "hi",
            "--max-new-tokens",
            "4",
            "--kernels",
            "numpy",
            "--stats-json",
            str(stats),
        ]
    )
    data = json.loads(stats.read_text())
    assert data["backend"] == "numpy" and data["decode_steps"] >= 1
    assert data["decode_tokens_per_s"] > 0 and data["memory_bytes"]["weights"] > 0
    assert set(data["decode_steps_by_backend"]) == {"numpy"}
