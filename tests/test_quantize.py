"""Quantisation arithmetic: round-trip error bounds per scheme, the packed int4 layout, the
block kernels against a plain float product, and fake-quantised activations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from einplan.runtime import qmatmul
from einplan.runtime.qmatmul import QuantizedMatrix
from einplan.runtime.quantize import (
    fake_quantize,
    pack_int4,
    qmax,
    quantize_weight,
    unpack_int4,
)

SCHEMES = [(8, None, True), (8, None, False), *[(4, g, s) for g in (32, 64, 128) for s in (1, 0)]]


def _matrix(rows: int, cols: int, seed: int, spread: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * np.float32(spread)
    w[rng.random((rows, cols)) < 0.05] *= 20  # outliers, as real weights have
    return w


def _as_matrix(parts: dict, bits: int, group: int) -> QuantizedMatrix:
    return QuantizedMatrix(parts["q"], parts["scale"], parts.get("zero_point"), bits, group)


@settings(max_examples=60, deadline=None)
@given(
    scheme=st.sampled_from(SCHEMES),
    rows=st.integers(1, 9),
    groups=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    spread=st.sampled_from([1e-3, 0.02, 1.0, 50.0]),
)
def test_round_trip_error_is_at_most_half_a_step(scheme, rows, groups, seed, spread):
    """Every weight comes back within half a quantisation step of its group (plus float
    rounding), and a group's largest weight keeps its sign and size to one step."""
    bits, group, symmetric = scheme
    group = group or 64
    cols = group * groups
    w = _matrix(rows, cols, seed, spread)
    g = group if bits == 4 else cols
    parts = quantize_weight(w, bits, g, bool(symmetric))
    back = _as_matrix(parts, bits, g).dequantize()
    step = parts["scale"].repeat(g, axis=1)
    bound = step / 2 + 1e-6 * np.abs(w).max()
    assert np.all(np.abs(back - w) <= bound)
    if symmetric:
        levels = np.rint(back / np.where(step > 0, step, 1))
        assert np.abs(levels).max() <= qmax(bits, True)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5), groups=st.integers(1, 4), group=st.sampled_from([32, 64, 128]))
def test_int4_pack_round_trip_and_layout(rows, groups, group):
    u = np.random.default_rng(rows * groups).integers(0, 16, (rows, group * groups), np.uint8)
    packed = pack_int4(u)
    assert packed.shape == (rows, group * groups // 2) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_int4(packed), u)
    half = group * groups // 2  # byte k of a row: element k low, element k + in/2 high
    assert packed[0, 0] == u[0, 0] | (u[0, half] << 4)
    assert packed[-1, half - 1] == u[-1, half - 1] | (u[-1, -1] << 4)


def test_quantised_zero_weights_stay_zero():
    w = np.zeros((3, 64), np.float32)
    w[1, 5] = 1.0
    for bits, sym in [(8, True), (8, False), (4, True), (4, False)]:
        back = _as_matrix(quantize_weight(w, bits, 64, sym), bits, 64).dequantize()
        assert back[0].tolist() == [0.0] * 64 and back[1, 0] == 0.0 and back[1, 5] == 1.0


@pytest.mark.parametrize("bits, group, symmetric", [(8, 96, True), (8, 96, False), (4, 32, True)])
@pytest.mark.parametrize("m", [1, 3, 40])
def test_block_products_equal_the_float_product(monkeypatch, bits, group, symmetric, m):
    """Blocks of a few rows (several per weight), small and large inputs, both orientations."""
    monkeypatch.setattr(qmatmul, "BLOCK_ELEMENTS", 96 * 5)
    w = _matrix(23, 96, 1, 0.05)
    a = _as_matrix(quantize_weight(w, bits, group, symmetric), bits, group)
    f = a.dequantize()
    x = np.random.default_rng(2).standard_normal((m, 96)).astype(np.float32)
    dy = np.random.default_rng(3).standard_normal((m, 23)).astype(np.float32)
    shapes = qmatmul.scratch_shapes(23, 96, group, m)
    bufs = [{k: np.empty(s, np.float32) for k, s in shapes.items()} for _ in range(2)]
    y = np.empty((m, 23), np.float32)
    a.matmul(x, y, bufs)
    np.testing.assert_allclose(y, x @ f.T, rtol=1e-4, atol=1e-5)
    dx = np.empty((m, 96), np.float32)
    a.matmul_transposed(dy, dx, bufs)
    np.testing.assert_allclose(dx, dy @ f, rtol=1e-4, atol=1e-5)
    ids = np.array([[4, 0], [22, 4]])
    rows = a.take_rows(ids, np.empty((2, 2, 96), np.float32))
    np.testing.assert_array_equal(rows, f[ids])


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([4, 8]), seed=st.integers(0, 1000), static=st.booleans())
def test_fake_quantised_activations_are_within_half_a_step(bits, seed, static):
    x = _matrix(4, 32, seed, 3.0)
    absmax = np.abs(x).max(axis=-1, keepdims=True)
    if static:  # one range for the whole tensor, as calibration measures it
        absmax = np.array([absmax.max()], np.float32)
    y = fake_quantize(x, bits, absmax if static else None)
    step = absmax / qmax(bits, True)
    assert np.all(np.abs(y - x) <= step / 2 + 1e-6 * np.abs(x).max())
    assert len(np.unique(y[0])) <= 2 * qmax(bits, True) + 1
