"""Weights held as panels (runtime/panels.py): the layout, which weights the numba backend
packs, and its products against numpy's."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BACKENDS, FIXTURES
from hypothesis import given, settings
from hypothesis import strategies as st

import einplan
from einplan.compiler.attrs import MatmulRecipe
from einplan.compiler.ir import Node
from einplan.compiler.ops import Op
from einplan.runtime.executor import Executor
from einplan.runtime.panels import PANEL, PanelMatrix, is_panels, mark_panels, pack_panels

CASE = FIXTURES / "llama_gqa_tied"
needs_numba = pytest.mark.skipif("numba" not in BACKENDS, reason="numba is not installed")


def assert_product(got: np.ndarray, x: np.ndarray, w: np.ndarray) -> None:
    """Equal to x @ w to float32 rounding: error against sum |x| |w| (the terms' scale)."""
    want = x.astype(np.float64) @ w.astype(np.float64)
    scale = np.abs(x).astype(np.float64) @ np.abs(w) + 1e-30
    assert np.all(np.abs(got - want) <= 4e-6 * scale), np.max(np.abs(got - want) / scale)


def test_pack_and_unpack_round_trip_and_refuse_what_does_not_fit():
    w = np.random.default_rng(0).standard_normal((7, 3 * PANEL), np.float32)
    p = pack_panels(w)
    assert p.panels.shape == (3, 7, PANEL) and p.shape == w.shape and p.nbytes == w.nbytes
    assert np.array_equal(p.panels[1, 4], w[4, PANEL : 2 * PANEL])
    assert np.array_equal(p.unpack(), w)
    for bad in (w[:, :40], w.astype(np.float64), w[0]):
        with pytest.raises(ValueError, match="cannot pack"):
            pack_panels(bad)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        PanelMatrix(p.panels[:, ::2])
    node = Node(3, Op.PARAM, (), {"key": "w"}, (7, 96), "f32")
    assert is_panels(mark_panels(node)) and not is_panels(node)


@needs_numba
@settings(max_examples=60, deadline=None)
@given(
    m=st.sampled_from([1, 2, 3, 5, 8, 9, 17, 33, 130, 261]),
    k=st.integers(1, 150),
    panels=st.integers(1, 9),
    lead=st.sampled_from([(1,), (2,), ()]),
    strided=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_panel_product_equals_numpy(m, k, panels, lead, strided, seed):
    """The factory's kernel (every tile shape, row blocks, a strided x) against numpy."""
    from einplan.runtime.backends.numba_panel_factories import make_panel_product

    rng = np.random.default_rng(seed)
    n = panels * PANEL
    rows = m * (lead[0] if lead else 1)
    w = rng.standard_normal((k, n), np.float32)
    x = rng.standard_normal((rows, 2 * k), np.float32)
    x = x[:, ::2] if strided else np.ascontiguousarray(x[:, :k])
    x_shape = (*lead, m, k)
    letters = "bs"[-len(x_shape) + 1 :]
    spec = f"{letters}i,io->{letters}o"
    recipe = MatmulRecipe([], [], [], [], [], [])  # (the factory only asks that there is one)
    weight = mark_panels(Node(1, Op.PARAM, (), {"key": "w"}, (k, n), "f32"))
    x_node = Node(0, Op.INPUT, (), {}, x_shape, "f32")
    node = Node(2, Op.EINSUM, (0, 1), {"spec": spec, "recipe": recipe}, (*x_shape[:-1], n), "f32")
    kernel = make_panel_product(node, [x_shape, (k, n)], (*x_shape[:-1], n), None, [x_node, weight])
    out = np.full((*x_shape[:-1], n), np.nan, np.float32)
    kernel([x.reshape(x_shape), pack_panels(w)], out)
    assert_product(out.reshape(rows, n), x, w)


@needs_numba
def test_numba_packs_the_projections_of_inference_plans_only():
    from einplan.runtime.backends.numba_panel_factories import panel_keys

    plan = einplan.compile_model(CASE / "config.json")
    keys = panel_keys(plan)
    session = einplan.Session(plan, CASE, kernels="numba")
    packed = {k for k, a in session.weights.items() if isinstance(a, PanelMatrix)}
    # q+k+v, o, gate+up, down of two layers and the tied embedding (gather and head)
    assert packed == keys and len(keys) == 9 and "model.embed_tokens.weight" in keys
    trained = einplan.compile_model(CASE / "config.json", entries=("forward", "grad"))
    assert panel_keys(trained) == set()  # its gradients read the weights transposed
    numpy_weights = einplan.Session(plan, CASE, kernels="numpy").weights
    assert not any(isinstance(a, PanelMatrix) for a in numpy_weights.values())


@needs_numba
def test_packed_weights_give_numpys_logits_on_either_backend():
    """A forward over panels (numba) equals numpy's over arrays; a numpy executor given the
    packed weights unpacks them and gives the same."""
    plan = einplan.compile_model(CASE / "config.json")
    ids = np.random.default_rng(0).integers(0, 256, (2, 37))
    want = einplan.Session(plan, CASE, kernels="numpy").forward(ids)
    packed = einplan.Session(plan, CASE, kernels="numba")
    got = packed.forward(ids)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    graph = plan.entry("forward")
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    run = Executor(graph, packed.weights, kernels="numpy").run
    again = run({"tokens": ids, "positions": positions})["logits"]
    np.testing.assert_allclose(again, want, rtol=1e-6, atol=1e-6)


@needs_numba
def test_gather_of_a_tied_table_held_as_panels_picks_its_columns():
    from einplan.runtime.backends.numba_panel_factories import make_panel_gather

    table = np.random.default_rng(0).standard_normal((5, 3 * PANEL), np.float32)  # (d, vocab)
    ids = np.array([[0, 31, 32], [95, 64, 33]])
    leaf = mark_panels(Node(0, Op.PARAM, (), {"key": "e"}, table.shape, "f32"))
    node = Node(2, Op.GATHER, (0, 1), {"transposed": True}, (2, 3, 5), "f32")
    id_node = Node(1, Op.INPUT, (), {}, ids.shape, "i64")
    kernel = make_panel_gather(node, [table.shape, ids.shape], (2, 3, 5), None, [leaf, id_node])
    out = np.empty((2, 3, 5), np.float32)
    kernel([pack_panels(table), ids], out)
    assert np.array_equal(out, table.T[ids])
    with pytest.raises(IndexError):
        kernel([pack_panels(table), np.array([[96]])], np.empty((1, 1, 5), np.float32))


@needs_numba
def test_wide_inputs_take_smaller_row_blocks():
    """in = 4100: a block holds 56 rows of x (1 MiB), so 70 rows take two blocks."""
    from einplan.runtime.backends.numba_panels import BLOCK_BYTES, panel_matmul

    rng = np.random.default_rng(3)
    k = 4100
    assert BLOCK_BYTES // (4 * k) // 8 * 8 == 56
    x = rng.standard_normal((70, k), np.float32)
    w = rng.standard_normal((k, 2 * PANEL), np.float32)
    out = np.full((70, 2 * PANEL), np.nan, np.float32)
    panel_matmul(x, pack_panels(w).panels, out, 2)
    assert_product(out, x, w)


@needs_numba
def test_a_step_that_cannot_read_panels_is_refused_clearly():
    """A weight held as panels reaching a step no kernel reads it in (a bug: the backend
    packs only what its kernels read) is a clear error, not numpy's kernel on a PanelMatrix."""
    from einplan.errors import EinplanError
    from einplan.runtime.backends import get_backend

    leaf = mark_panels(Node(0, Op.PARAM, (), {"key": "w"}, (4, PANEL), "f32"))
    x = Node(1, Op.INPUT, (), {}, (2, 4), "f32")
    node = Node(2, Op.EINSUM, (1, 0), {"spec": "si,io->so"}, (2, PANEL), "f64")  # not f32
    with pytest.raises(EinplanError, match="held as panels"):
        get_backend("numba").kernel_for(node, [(2, 4), (4, PANEL)], (2, PANEL), None, [x, leaf])
