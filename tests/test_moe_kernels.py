"""The numba backend's compiled expert kernels against numpy's (runtime/moe.py) on random
routings: experts, top-k and token counts (experts with no tokens, fewer than MIN_ROWS and
more than MAX_ROWS included), float32 and float64; and the MoE fixtures' logits and
float64 gradients on both backends, every expert compiled (test_generate checks greedy text
on both)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BACKENDS, FIXTURES, MOE_CASES
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file
from test_gradients import shifted_targets

import einplan
from einplan.compiler.ir import Node
from einplan.compiler.ops import Op
from einplan.formats.weights import load_weights
from einplan.runtime import moe
from einplan.runtime.backends import get_backend, numba_moe
from einplan.runtime.executor import Executor

pytestmark = pytest.mark.skipif("numba" not in BACKENDS, reason="numba is not installed")
WRT = ("x", "gates", "gate", "up", "down")
TOL = {np.float32: 2e-5, np.float64: 1e-12}


def routing(rng, tokens: int, experts: int, k: int, idle: int, dtype) -> np.ndarray:
    """Top-k gates (tokens, experts): each token picks k experts among all but the first
    ``idle`` (which get no token), weights renormalised."""
    gates = np.zeros((tokens, experts), dtype)
    for t in range(tokens):
        picks = rng.choice(np.arange(idle, experts), size=k, replace=False)
        w = rng.random(k) + 0.1
        gates[t, picks] = w / w.sum()
    return gates


def expert_nodes(col: int, k: int, shape, dtype: str, keep: bool) -> list[Node]:
    """A forward expert node and its five reverse nodes, named as the reverse pass names them."""
    fwd = Node(0, Op.MOE_EXPERT, (), {"expert": col, "k": k, "keep": keep}, shape, dtype, "ex-0.1")
    attrs = [{"expert": col, "k": k, "wrt": w} for w in WRT]
    return [fwd] + [
        Node(1 + i, Op.MOE_EXPERT_GRAD, (), a, (), dtype, f"ex-0.1.grad{i}")
        for i, a in enumerate(attrs)
    ]


def run_expert(backend: str, ins: list[np.ndarray], ct: np.ndarray, col: int, k: int, keep: bool):
    """The forward output and the five gradients of one expert, all kernels from ``backend``."""
    be = get_backend(backend)
    x, gates, wg, wu, wd = ins
    dtype = "f32" if x.dtype == np.float32 else "f64"
    fwd, *grads = expert_nodes(col, k, x.shape, dtype, keep)
    shapes = [a.shape for a in ins]
    kernel, _ = be.kernel_for(fwd, shapes, x.shape, None)
    y = kernel(ins, np.full(x.shape, np.nan, x.dtype))
    out = {"y": y}
    for g, target in zip(grads, ins, strict=True):
        g = g.with_(shape=target.shape)
        kernel, _ = be.kernel_for(g, [*shapes, ct.shape], target.shape, None)
        out[g.attrs["wrt"]] = kernel([*ins, ct], np.full(target.shape, np.nan, x.dtype))
    return out


@settings(max_examples=60, deadline=None)
@given(
    experts=st.integers(2, 8),
    k=st.integers(1, 3),
    tokens=st.integers(1, 200),
    idle=st.integers(0, 2),
    d=st.integers(1, 40),
    f=st.integers(1, 70),
    dtype=st.sampled_from([np.float32, np.float64]),
    keep=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_compiled_expert_kernels_equal_numpys(experts, k, tokens, idle, d, f, dtype, keep, seed):
    k = min(k, experts - 1)
    idle = min(idle, experts - k)
    rng = np.random.default_rng(seed)
    gates = routing(rng, tokens, experts, k, idle, dtype)
    x = rng.standard_normal((1, tokens, d)).astype(dtype)
    wg, wu = (rng.standard_normal((f, d)).astype(dtype) / np.sqrt(d) for _ in range(2))
    wd = rng.standard_normal((d, f)).astype(dtype) / np.sqrt(f)
    ins = [x, gates.reshape(1, tokens, experts), wg, wu, wd]
    ct = rng.standard_normal(x.shape).astype(dtype)
    for col in range(experts):
        want = run_expert("numpy", ins, ct, col, k, keep)
        moe.LOAD.clear()
        got = run_expert("numba", ins, ct, col, k, keep)
        assert moe.LOAD["ex-0.1"] == np.count_nonzero(gates[:, col])
        for name, w in want.items():
            assert got[name].dtype == dtype, name
            scale = max(np.abs(w).max(), 1.0)
            err = np.abs(got[name] - w).max() / scale
            assert err <= TOL[dtype], f"expert {col} {name}: {err:.2e}"
        if not np.count_nonzero(gates[:, col]):  # no tokens: every output exactly 0
            assert all(not np.any(v) for v in got.values())


def test_routings_in_the_window_take_the_compiled_path(monkeypatch):
    """Experts with MIN_ROWS to MAX_ROWS tokens run gemm_nt (not numpy's fallback), odd sizes
    included; numpy's reverse steps read what the compiled forward step kept."""
    monkeypatch.setattr(numba_moe, "MAX_ROWS", 1000)
    rng = np.random.default_rng(3)
    tokens, experts, d, f = 203, 4, 37, 61
    gates = routing(rng, tokens, experts, 2, 0, np.float32)
    ins = [
        rng.standard_normal((1, tokens, d)).astype(np.float32),
        gates[None],
        rng.standard_normal((f, d)).astype(np.float32),
        rng.standard_normal((f, d)).astype(np.float32),
        rng.standard_normal((d, f)).astype(np.float32),
    ]
    ct = rng.standard_normal((1, tokens, d)).astype(np.float32)
    moe.STASH.clear()
    got = run_expert("numba", ins, ct, 1, 2, True)
    assert moe.STASH["ex-0.1"]["a"].shape == (np.count_nonzero(gates[:, 1]), f)
    want = run_expert("numpy", ins, ct, 1, 2, True)
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, rtol=1e-4, atol=1e-4 * np.abs(w).max())


def compile_every_expert(monkeypatch) -> None:
    """Let experts with any number of tokens run compiled (the fixtures route 48 tokens)."""
    monkeypatch.setattr(numba_moe, "MIN_ROWS", 1)
    monkeypatch.setattr(numba_moe, "MAX_ROWS", 10**9)


@pytest.mark.parametrize("case", MOE_CASES)
def test_fixture_logits_on_both_backends(case, kernels, monkeypatch):
    compile_every_expert(monkeypatch)
    folder = FIXTURES / case
    ref = load_file(folder / "reference.safetensors")
    plan = einplan.compile_model(folder / "config.json")
    session = einplan.Session(plan, folder, kernels=kernels)
    steps = session.executor.prepare(session.executor.bind_dims(_feed(ref["input_ids"])))
    backends = {s.name: s.backend for s in steps.table if s.op == "moe_expert"}
    assert set(backends.values()) == {kernels}
    assert np.abs(session.forward(ref["input_ids"]) - ref["logits"]).max() < 1e-4


@pytest.mark.parametrize("case", MOE_CASES)
def test_fixture_float64_gradients_on_both_backends(case, kernels, monkeypatch):
    compile_every_expert(monkeypatch)
    moe.STASH.clear()
    folder = FIXTURES / case
    plan = einplan.compile_model(folder / "config.json", compute_dtype="f64", entries=("grad",))
    graph = plan.entry("grad")
    ref = load_file(folder / "reference.safetensors")
    feed = _feed(ref["input_ids"]) | {"loss_grad": np.array(1.0)}
    ex = Executor(graph, load_weights(graph, folder), kernels=kernels)
    out = ex.run(feed)
    experts = len(moe.STASH)  # the forward expert steps, which kept their activations
    compiled = ex.steps_by_backend().get("numba", 0)
    assert experts > 0 and compiled == (experts if kernels == "numba" else 0)
    for name, w in ref.items():
        if name.startswith("grad64."):
            got = out[f"grad.{name.removeprefix('grad64.')}"]
            rel = np.abs(got - w).max() / np.abs(w).max()
            assert rel < 1e-6, f"{name}: relative error {rel:.2e}"


def _feed(ids: np.ndarray) -> dict:
    return {
        "tokens": ids,
        "positions": np.broadcast_to(np.arange(ids.shape[1]), ids.shape),
        "targets": shifted_targets(ids),
    }
