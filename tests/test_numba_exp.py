"""The numba backend's kernels on its vectorised exp: the exp against the exact one, flash
attention's forward and reverse steps against numpy's kernels and the float64 plain chain,
and SwiGLU against numpy's kernel, in float32."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BACKENDS
from hypothesis import given, settings
from hypothesis import strategies as st
from test_decode_kernels import both
from test_flash_attention import (
    F64,
    flash_node,
    make_case,
    plain,
    plain_grads,
    scratch,
    shapes,
)

from einplan.compiler.ops import Op
from einplan.runtime.flash import GRADS, make_flash_attention, make_flash_attention_grad

pytestmark = pytest.mark.skipif("numba" not in BACKENDS, reason="numba is not installed")
F32 = np.float32


def compiled_exp():
    from einplan.runtime.backends.numba_exp_factories import compiled_exp_rows

    return compiled_exp_rows()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-120, 88, width=32), min_size=1, max_size=70),
    st.integers(1, 3),
    st.floats(-5, 5, width=32),
)
def test_compiled_exp_is_within_one_ulp_of_the_exact_exp(values, rows, shift):
    x = np.array(values * rows, F32).reshape(rows, len(values))
    got = x.copy()
    compiled_exp()(got, np.full(rows, shift, F32))
    y = (x - F32(shift)).astype(F64)  # the kernel subtracts in float32
    exact = np.exp(y)
    normal = (y > -87.33654) & (y <= 88.3)
    ulp = np.spacing(exact[normal].astype(F32)).astype(F64)
    assert np.all(np.abs(got[normal] - exact[normal]) <= ulp)
    assert np.all(got[y <= -87.33654] == 0)  # below the smallest normal: 0, never garbage


def test_compiled_exp_keeps_nan_and_gives_zero_for_minus_infinity():
    x = np.array([[np.nan, -np.inf, 0.0, -1e30]], F32)
    compiled_exp()(x)
    assert np.isnan(x[0, 0]) and x[0, 1] == 0 and x[0, 2] == 1 and x[0, 3] == 0


def run_f32(q, k, v, mask, do, exp, **attrs):
    """Forward and the three gradients of one case in float32, with ``exp`` (None: numpy's)."""
    kw = {} if exp is None else {"exp": exp}
    q, k, v, do = (x.astype(F32) for x in (q, k, v, do))
    mask = None if mask is None else mask.astype(F32)
    ins = [q, k, v] + ([] if mask is None else [mask])
    node = flash_node(Op.FLASH_ATTENTION, q.shape, "f32", **attrs)
    out = np.empty_like(q)
    make_flash_attention(node, [x.shape for x in ins], q.shape, scratch, **kw)(ins, out)
    grads = {}
    for wrt, x in zip("qkv", (q, k, v), strict=True):
        grad = flash_node(Op.FLASH_ATTENTION_GRAD, x.shape, "f32", wrt=wrt, **attrs)
        args = [*ins, out, do]
        g = np.empty_like(x)
        make_flash_attention_grad(grad, [a.shape for a in args], x.shape, scratch, **kw)(args, g)
        grads[wrt] = g
    assert not GRADS
    return out, grads


@settings(max_examples=40, deadline=None)
@given(shapes())
def test_compiled_flash_equals_numpy_flash_and_the_float64_chain(c):
    q, k, v, mask, attrs, rng = make_case(c, every_row_sees=True)
    do = rng.standard_normal(q.shape)
    want, _ = plain(q, k, v, mask, attrs["causal"], c["bnth"])
    want_grads = plain_grads(q, k, v, do, mask, attrs["causal"], c["bnth"])
    got, grads = run_f32(q, k, v, mask, do, compiled_exp(), **attrs)
    ref, ref_grads = run_f32(q, k, v, mask, do, None, **attrs)
    assert got.dtype == F32
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)
    for name in "qkv":
        scale = max(np.abs(want_grads[name]).max(), 1.0)  # inputs and cotangent are O(1)
        assert np.abs(grads[name] - want_grads[name]).max() < 1e-4 * scale, name
        assert np.abs(grads[name] - ref_grads[name]).max() < 1e-4 * scale, name


@settings(max_examples=25, deadline=None)
@given(
    size=st.sampled_from([(1, 7), (3, 1536), (8, 1536), (64, 1024), (97, 677), (1, 70000)]),
    halves=st.booleans(),
    seed=st.integers(0, 99),
)
def test_compiled_swiglu_equals_numpys(size, halves, seed):
    """Gate and up as the two halves of one product's output (strided rows) or apart; steps
    below MIN_SILU values keep numpy's kernel."""
    from einplan.runtime.backends.numba_exp_factories import MIN_SILU

    rows, width = size
    rng = np.random.default_rng(seed)
    if halves:
        both_halves = rng.standard_normal((rows, 2 * width), F32) * 4
        g, u = both_halves[:, :width], both_halves[:, width:]
    else:
        g, u = (rng.standard_normal((rows, width), F32) * 4 for _ in range(2))
    g[0, 0] = -100.0  # exp(100) overflows float32: the product is -0 in both
    with np.errstate(over="ignore"):  # numpy's exp(100) is inf (the product still -0)
        got, want, made = both(Op.SILU_MUL, {}, [g, u], (rows, width))
    assert made == ("numba" if rows * width >= MIN_SILU else "numpy")
    scale = np.abs(g).max() * np.abs(u).max()
    assert np.abs(got - want).max() <= 4e-7 * scale


def test_warm_up_compiles_every_kernel():
    """`einplan bench kernels` times this first call (the JIT, or the on-disk cache)."""
    from einplan.runtime.backends import numba_exp

    numba_exp.warm_up()
    assert numba_exp.exp_rows.signatures and numba_exp.silu_mul_rows.signatures
