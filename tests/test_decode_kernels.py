"""The numba backend's float32 decode kernels against numpy's kernels for the same node: the
GEMV of a packed (in, out) weight, RMSNorm, RoPE, the masked softmax and the KV-cache write,
on random shapes (hypothesis), odd sizes and strided inputs; and which steps it declines."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BACKENDS
from hypothesis import given, settings
from hypothesis import strategies as st

from einplan.compiler.attrs import MatmulRecipe
from einplan.compiler.ir import Node
from einplan.compiler.ops import Op
from einplan.compiler.passes.contract import lower_einsum
from einplan.runtime.kernels import KERNELS
from einplan.runtime.steps import ScratchBuffers

pytestmark = pytest.mark.skipif("numba" not in BACKENDS, reason="numba is not installed")

EXAMPLES = settings(max_examples=25, deadline=None)


def numba_backend():
    from einplan.runtime.backends.numba_backend import NUMBA

    return NUMBA


def leaf(i: int, shape, dtype: str = "f32") -> Node:
    return Node(i, Op.INPUT, (), {}, tuple(shape), dtype, f"in{i}")


def both(op: Op, attrs: dict, arrays: list[np.ndarray], out_shape, dtypes=None):
    """numpy's kernel and the numba backend's on the same node and inputs: their outputs, and
    which backend made the second."""
    dtypes = dtypes or ["f32"] * len(arrays)
    ins = [leaf(i, a.shape, d) for i, (a, d) in enumerate(zip(arrays, dtypes, strict=True))]
    node = Node(len(ins), op, tuple(n.id for n in ins), attrs, tuple(out_shape), "f32", "step")
    shapes = [a.shape for a in arrays]
    want = np.full(out_shape, np.nan, np.float32)
    KERNELS[op](node, shapes, tuple(out_shape), ScratchBuffers().for_thread(0))(
        [a.copy() for a in arrays], want
    )
    kernel, made = numba_backend().kernel_for(
        node, shapes, tuple(out_shape), ScratchBuffers().for_thread(0), ins
    )
    got = np.full(out_shape, np.nan, np.float32)
    got = kernel(list(arrays), got)
    return got, want, made


def rand(rng, shape, strided=False):
    """A float32 array of ``shape``; strided: a view of every other column of a wider one."""
    if not strided:
        return rng.standard_normal(shape, np.float32)
    wide = rng.standard_normal((*shape[:-1], 2 * shape[-1]), np.float32)
    return wide[..., ::2]


def assert_close(got, want, scale=1.0):
    """Equal to float32 rounding relative to ``scale`` (the size of the terms summed)."""
    assert np.all(np.isfinite(got) == np.isfinite(want))
    err = np.abs(got - want)[np.isfinite(want)]
    assert err.size == 0 or np.max(err / (np.abs(want[np.isfinite(want)]) + scale)) < 2e-6


def gemv_recipe() -> MatmulRecipe:
    return lower_einsum("bsi,io->bso")


@EXAMPLES
@given(
    m=st.integers(1, 8),
    k_in=st.integers(1, 70),
    n=st.sampled_from([1, 5, 90, 511, 512, 1100]),  # column chunks of 512 and parts
    strided=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gemv_equals_blas(m, k_in, n, strided, seed):
    from einplan.runtime.backends.numba_decode_factories import GEMV_MAX_ROWS

    m = min(m, GEMV_MAX_ROWS)
    rng = np.random.default_rng(seed)
    x = rand(rng, (m, 1, k_in), strided)
    w = rng.standard_normal((k_in, n), np.float32)
    attrs = {"spec": "bsi,io->bso", "recipe": gemv_recipe()}
    got, want, made = both(Op.EINSUM, attrs, [x, w], (m, 1, n))
    assert made == "numba"
    # error relative to sum |x| |w|, the scale of the terms of each sum
    scale = np.abs(x.reshape(m, k_in)) @ np.abs(w)
    assert np.all(np.abs(got - want).reshape(m, n) <= 4e-6 * (scale + 1e-30))


def test_only_plain_products_are_gemvs():
    from einplan.runtime.backends.numba_decode_factories import is_gemv

    def node(spec):
        return Node(2, Op.EINSUM, (0, 1), {"spec": spec, "recipe": lower_einsum(spec)}, (), "f32")

    assert is_gemv(node("bsi,io->bso"), [(1, 1, 4), (4, 3)])
    assert is_gemv(node("bd,dv->bv"), [(1, 4), (4, 3)])
    for spec in (",ab->", "bi,ib->b", "bi,oi->bo", "bi,io->ob"):
        assert not is_gemv(node(spec), [(2, 2), (2, 2)]), spec


def test_gemv_declines_many_rows():
    from einplan.runtime.backends.numba_decode_factories import GEMV_MAX_ROWS

    rng = np.random.default_rng(0)
    attrs = {"spec": "bsi,io->bso", "recipe": gemv_recipe()}
    for rows, want in ((GEMV_MAX_ROWS, "numba"), (GEMV_MAX_ROWS + 1, "numpy")):
        x = rng.standard_normal((rows, 1, 8), np.float32)  # a decode step of `rows` sequences
        w = rng.standard_normal((8, 5), np.float32)
        *_, made = both(Op.EINSUM, attrs, [x, w], (rows, 1, 5))
        assert made == want, rows


@EXAMPLES
@given(
    rows=st.integers(1, 9), d=st.integers(1, 130), strided=st.booleans(), seed=st.integers(0, 99)
)
def test_rms_norm(rows, d, strided, seed):
    rng = np.random.default_rng(seed)
    x, w = rand(rng, (rows, 1, d), strided), rng.standard_normal(d, np.float32)
    got, want, made = both(Op.RMS_NORM, {"eps": 1e-5}, [x, w], (rows, 1, d))
    assert made == "numba"
    assert_close(got, want, np.abs(w).max())


@EXAMPLES
@given(
    batch=st.integers(1, 3),
    heads=st.sampled_from([(3,), (3, 3), (2, 1)]),
    half=st.integers(1, 20),
    scale=st.sampled_from([1.0, 0.125]),
    inverse=st.booleans(),
    strided=st.booleans(),
    seq=st.sampled_from([1, 7]),  # a decode step's token, or a forward's (any size is taken)
    seed=st.integers(0, 99),
)
def test_rope(batch, heads, half, scale, inverse, strided, seq, seed):
    rng = np.random.default_rng(seed)
    shape = (batch, seq, *heads, 2 * half)
    x = rand(rng, shape, strided)
    angles = rng.uniform(-20, 20, (batch, seq, half)).astype(np.float32)
    table = np.stack([np.cos(angles), np.sin(angles)])
    attrs = {"scale": scale, "inverse": inverse}
    got, want, made = both(Op.ROPE, attrs, [x, table], shape)
    assert made == "numba"
    assert_close(got, want, np.abs(x).max() * scale)


@EXAMPLES
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 9),
    k=st.integers(1, 60),
    scale=st.sampled_from([1.0, 0.3]),
    masked=st.booleans(),
    seed=st.integers(0, 99),
)
def test_masked_softmax(batch, heads, k, scale, masked, seed):
    rng = np.random.default_rng(seed)
    q = 1  # a decode step's one query
    x = rng.standard_normal((batch, heads, q, k), np.float32) * 5
    arrays = [x]
    if masked:  # padding and unwritten slots: -inf, at least one key visible per row
        mask = np.where(rng.random((batch, q, k)) < 0.3, -np.inf, 0).astype(np.float32)
        mask[..., 0] = 0
        arrays.append(mask)
    got, want, made = both(Op.SOFTMAX, {"scale": scale}, arrays, x.shape)
    assert made == "numba"  # at most 2 * 9 * 60 values: compiled
    assert_close(got, want, 1e-3)
    causal = rng.standard_normal((1, 2, 3, 5), np.float32)
    *_, made = both(Op.SOFTMAX, {"scale": scale, "causal": True}, [causal], causal.shape)
    assert made == "numpy"


def test_kv_append_writes_in_place_and_checks_the_slot():
    rng = np.random.default_rng(0)
    new = rng.standard_normal((2, 1, 3, 4), np.float32)
    caches = [np.zeros((2, 3, 6, 4), np.float32) for _ in range(2)]
    attrs = {"length": "kv"}
    ins = [leaf(0, caches[0].shape), leaf(1, new.shape), leaf(2, (1,), "i64")]
    node = Node(3, Op.KV_APPEND, (0, 1, 2), attrs, (2, 3, 5, 4), "f32", "cache")
    shapes = [caches[0].shape, new.shape, (1,)]
    scratch = ScratchBuffers().for_thread(0)
    numpy_kernel = KERNELS[Op.KV_APPEND](node, shapes, (2, 3, 5, 4), scratch)
    compiled, made = numba_backend().kernel_for(node, shapes, (2, 3, 5, 4), scratch, ins)
    assert made == "numba"
    pairs = zip((numpy_kernel, compiled), caches, strict=True)
    views = [k([c, new, np.array([4])], None) for k, c in pairs]
    assert np.array_equal(caches[0], caches[1]) and np.array_equal(views[0], views[1])
    assert np.shares_memory(views[1], caches[1])
    with pytest.raises(IndexError, match="exceeds kv=5"):
        compiled([caches[1], new, np.array([5])], None)


def test_many_token_softmax_falls_through_and_norms_compile_at_every_size():
    """A softmax over more than one query (prefill, forward, training) keeps numpy's kernel;
    RMSNorm compiles at every size, as RoPE does (test_rope)."""
    x = np.ones((1, 2, 5, 7), np.float32)  # five queries
    *_, made = both(Op.SOFTMAX, {"scale": 1.0}, [x], x.shape)
    assert made == "numpy"
    rng = np.random.default_rng(0)
    w = rng.standard_normal(64, np.float32)
    for shape in ((1100, 1, 64), (2, 300, 64)):
        x = rng.standard_normal(shape, np.float32)
        got, want, made = both(Op.RMS_NORM, {"eps": 1e-5}, [x, w], x.shape)
        assert made == "numba"
        assert_close(got, want, np.abs(w).max())


def test_only_the_decode_entry_gets_compiled_float_kernels():
    """A float plan's forward runs numpy's kernels under the numba backend but for RoPE,
    RMSNorm, flash attention's exp (SwiGLU too from MIN_SILU values, more than this forward
    has) and the products and tied-embedding gather of weights bound as panels (an inference
    plan's: runtime/panels.py); bound as arrays, its products run on BLAS. Its decode compiles the
    products, norms, RoPE, the softmax of its direct flash steps and cache writes."""
    import einplan
    from einplan.runtime.executor import Executor
    from einplan.runtime.kv_cache import allocate_cache

    plan = einplan.compile_model("tiny")
    weights = einplan.Session(plan, random_seed=0, kernels="numba").weights
    unpacked = einplan.Session(plan, random_seed=0, kernels="numpy").weights
    compiled = {"rope", "rms_norm", "flash_attention"}
    for bound, ops in ((weights, compiled | {"einsum", "gather"}), (unpacked, compiled)):
        forward = Executor(plan.entry("forward"), bound, kernels="numba")
        forward.prepare({"batch": 1, "seq": 9})
        table = next(iter(forward._prepared.values())).table
        assert {i.op for i in table if i.backend == "numba"} == ops
    graph = plan.entry("decode")
    decode = Executor(graph, {**weights, **allocate_cache(graph, 1, 16)}, kernels="numba")
    decode.prepare({"batch": 1, "kv": 16, "ctx": 16})
    ops = {(i.op, i.backend) for i in next(iter(decode._prepared.values())).table}
    for op in ("einsum", "rms_norm", "rope", "flash_attention", "kv_append"):
        assert (op, "numba") in ops, op
