"""The runtime: no np.einsum on any step, pool equals sequential, the recorder sees every
step, bad inputs are refused, and repeated runs reuse their buffers."""

from __future__ import annotations

import numpy as np
import pytest

import einplan
from einplan.formats.weights import WeightsError, checkpoint_shapes
from einplan.runtime.executor import Executor, InputError
from einplan.runtime.recorder import Recorder


@pytest.fixture(scope="module")
def plan():
    return einplan.compile_model("tiny")


def _ids(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape)


def test_forward_never_calls_np_einsum_or_opt_einsum(plan, monkeypatch):
    session = einplan.Session(plan, random_seed=0)

    def forbidden(*a, **k):
        raise AssertionError("the runtime called an einsum")

    import opt_einsum

    monkeypatch.setattr(np, "einsum", forbidden)
    monkeypatch.setattr(opt_einsum, "contract", forbidden)
    logits = session.forward(_ids((2, 17)))
    assert logits.shape == (2, 17, 256) and np.isfinite(logits).all()


def test_thread_pool_gives_the_same_logits(plan):
    ids = _ids((3, 33))
    seq = einplan.Session(plan, random_seed=1).forward(ids)
    pool = einplan.Session(plan, random_seed=1, workers=2)
    for _ in range(3):
        np.testing.assert_allclose(pool.forward(ids), seq, rtol=1e-5, atol=1e-5)


def test_recorder_records_every_step_once_per_run(plan):
    session = einplan.Session(plan, random_seed=0)
    rec = Recorder()
    session.forward(_ids((1, 20)), recorder=rec)
    session.forward(_ids((1, 20)), recorder=rec)
    nodes = [n for n in plan.entry().nodes if n.op.value not in ("param", "input")]
    views = [n for n in nodes if n.op.value in ("reshape", "split")]  # made before the run
    assert len(rec.records(0)) == len(nodes) - len(views) == len(rec.records(1))
    assert {x.name for x in rec.records(0)} == {n.name for n in nodes if n not in views}
    r = {x.name: x for x in rec.records(0)}
    gate_up = r["ffn_gate+ffn_up-0"]  # one packed projection (compiler/passes/pack.py)
    assert gate_up.flops == 2 * 20 * 128 * 688
    assert gate_up.bytes == 4 * (20 * 128 + 688 * 128 + 20 * 688)
    assert sum(x.dur_ns for x in rec.records(0)) <= rec.wall_ns(0)


def test_causal_prefix_property(plan):
    """Logits of a prefix do not depend on later tokens."""
    session = einplan.Session(plan, random_seed=2)
    ids = _ids((1, 30))
    np.testing.assert_allclose(
        session.forward(ids[:, :12]), session.forward(ids)[:, :12], rtol=1e-5, atol=1e-5
    )


def test_batch_rows_are_independent(plan):
    session = einplan.Session(plan, random_seed=2)
    ids = _ids((3, 16))
    np.testing.assert_allclose(
        session.forward(ids[1:2]), session.forward(ids)[1:2], rtol=1e-5, atol=1e-5
    )


def test_outputs_are_not_overwritten_by_the_next_run(plan):
    session = einplan.Session(plan, random_seed=0)
    a = session.forward(_ids((1, 8), 1))
    kept = a.copy()
    session.forward(_ids((1, 8), 2))
    assert np.array_equal(a, kept)


@pytest.mark.parametrize(
    "tokens, message",
    [
        (np.zeros((1, 513), np.int64), "seq=513 is outside the limit 1..512"),
        (np.zeros((65, 4), np.int64), "batch=65"),
        (np.full((1, 4), 256), "token ids must lie in 0..255"),
        (np.zeros((1, 4), np.float32), "must be integers"),
        (np.zeros((1, 2, 3), np.int64), "rank 2"),
    ],
)
def test_bad_inputs_are_refused(plan, tokens, message):
    session = einplan.Session(plan, random_seed=0)
    with pytest.raises(InputError, match=message):
        session.forward(tokens)


def test_weights_of_the_wrong_shape_are_refused(plan):
    tensors = {k: np.ones(s, np.float32) for k, s in checkpoint_shapes(plan.entry()).items()}
    tensors["model.norm.weight"] = np.ones(64, np.float32)
    with pytest.raises(WeightsError, match="model.norm.weight: checkpoint \\[64\\], plan"):
        einplan.Session(plan, tensors)
    with pytest.raises(InputError, match="weight model.norm.weight is float32\\[64\\]"):
        Executor(
            plan.entry(),
            {
                **einplan.Session(plan, random_seed=0).weights,
                "model.norm.weight": np.ones(64, np.float32),
            },
        )


@pytest.mark.parametrize("block", [64, 100, 1 << 16])
def test_swiglu_in_row_blocks_equals_the_formula(block, monkeypatch):
    """The SwiGLU kernel over blocks of rows (the gate and up halves of one product, column
    views) gives g / (1 + exp(-g)) * u bit for bit, with a short last block."""
    from einplan.runtime import kernels

    monkeypatch.setattr(kernels, "SILU_BLOCK", block)
    rng = np.random.default_rng(0)
    gate_up = rng.standard_normal((3, 7, 2 * 10)).astype(np.float32)
    g, u = gate_up[..., :10], gate_up[..., 10:]
    out = np.full((3, 7, 10), np.nan, np.float32)
    kernels.make_silu_mul(None, [g.shape, u.shape], out.shape, None)([g, u], out)
    assert np.array_equal(out, g / (1 + np.exp(-g)) * u)
