"""Every VJP rule against central finite differences in float64: a graph applies one op to
float64 parameters, a random projection turns its output into a scalar loss, and the autodiff
pass's gradient of each parameter must equal (loss(p + eps) - loss(p - eps)) / 2 eps."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_contract import equations

from einplan.compiler.ops import ShapeError
from einplan.compiler.pipeline import PASSES, PassContext, run_pipeline
from einplan.compiler.trace import Builder
from einplan.runtime.executor import Executor

EPS = 1e-6
LETTERS = "abcdefgh"
SETTINGS = settings(max_examples=20, deadline=None)


def gradients(build, params, inputs=None, seed=0):
    """Autodiff and finite-difference gradients of sum(op(params) * r) for each param."""
    inputs = inputs or {}
    b = Builder({})
    values = {k: b.param(k, k, a.shape, "f64") for k, a in params.items()}
    ins = {
        k: b.input(k, a.shape, "i64" if a.dtype.kind == "i" else "f64") for k, a in inputs.items()
    }
    y = build(b, values, ins)
    r = b.input("r", y.shape, "f64")
    term = LETTERS[: len(y.shape)]
    b.output("loss", b.einsum(f"{term},{term}->", y, r))
    feed = dict(inputs, r=np.random.default_rng(seed).standard_normal(y.shape))
    forward = Executor(run_pipeline(b.graph, PassContext(), PASSES), params)
    reverse = Executor(run_pipeline(b.graph, PassContext(), ("autodiff", *PASSES)), params)
    got = reverse.run({**feed, "loss_grad": np.array(1.0)})
    for key, p in params.items():
        numeric = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            keep = p[i]
            p[i] = keep + EPS
            up = float(forward.run(feed)["loss"])
            p[i] = keep - EPS
            down = float(forward.run(feed)["loss"])
            p[i] = keep
            numeric[i] = (up - down) / (2 * EPS)
        yield key, got[f"grad.{key}"], numeric


def check(build, params, inputs=None, seed=0):
    """Assert autodiff equals finite differences for every param."""
    for key, got, numeric in gradients(build, params, inputs, seed):
        np.testing.assert_allclose(got, numeric, rtol=1e-5, atol=1e-7, err_msg=key)


def randn(rng, *shape):
    return rng.standard_normal(shape)


@SETTINGS
@given(st.integers(1, 3).flatmap(equations), st.integers(0, 2**31))
def test_einsum_rule_for_every_operand(eq, seed):
    spec, sizes = eq
    rng = np.random.default_rng(seed)
    terms = spec.split("->")[0].split(",")
    params = {f"x{k}": randn(rng, *(sizes[c] for c in t)) for k, t in enumerate(terms)}
    check(lambda b, v, i: b.einsum(spec, *v.values()), params, seed=seed)


shapes = st.lists(st.integers(1, 3), min_size=1, max_size=3)


@SETTINGS
@given(shapes, st.integers(0, 2**31), st.sampled_from(["add", "mul"]), st.data())
def test_broadcasting_add_and_mul(shape, seed, op, data):
    tail = shape[data.draw(st.integers(0, len(shape) - 1)) :]
    small = [data.draw(st.sampled_from([1, d])) for d in tail]
    rng = np.random.default_rng(seed)
    params = {"a": randn(rng, *shape), "b": randn(rng, *small)}
    check(lambda b, v, i: getattr(b, op)(v["a"], v["b"]), params, seed=seed)


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 4), st.integers(0, 2**31))
def test_gather_and_scatter_add(batch, seq, seed):
    rng = np.random.default_rng(seed)
    ids = {"ids": rng.integers(0, 5, (batch, seq))}
    check(lambda b, v, i: b.gather(v["t"], i["ids"], "f64"), {"t": randn(rng, 5, 3)}, ids)
    values = {"v": randn(rng, batch, seq, 3)}
    check(lambda b, v, i: b.scatter_add(v["v"], i["ids"], 5), values, ids)


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 6), st.integers(0, 2**31))
def test_rms_norm(rows, width, seed):
    rng = np.random.default_rng(seed)
    params = {"x": randn(rng, rows, 2, width), "w": randn(rng, width)}
    check(lambda b, v, i: b.rms_norm(v["x"], v["w"], 1e-5), params)


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 4), st.sampled_from([1.0, 0.35]), st.integers(0, 2**31))
def test_rope(batch, seq, scale, seed):
    rng = np.random.default_rng(seed)
    pos = {"pos": rng.integers(0, 50, (batch, seq))}

    def build(b, v, i):
        table = b.rope_table(i["pos"], [1.0, 0.1, 0.01], "f64")
        return b.rope(v["x"], table, scale)

    check(build, {"x": randn(rng, batch, seq, 2, 6)}, pos)


@SETTINGS
@given(
    st.integers(1, 2),
    st.integers(1, 4),
    st.booleans(),
    st.booleans(),
    st.sampled_from([1.0, 0.5]),
    st.integers(0, 2**31),
)
def test_softmax(batch, q, causal, masked, scale, seed):
    rng = np.random.default_rng(seed)
    k = q + 1
    mask = {"mask": np.where(rng.random((batch, q, k)) < 0.3, -30.0, 0.0)} if masked else {}

    def build(b, v, i):
        return b.softmax(v["x"], scale, causal, i.get("mask"))

    check(build, {"x": randn(rng, batch, 2, q, k)}, mask)


@SETTINGS
@given(shapes, st.integers(0, 2**31))
def test_silu_mul(shape, seed):
    rng = np.random.default_rng(seed)
    params = {"g": randn(rng, *shape) * 3, "u": randn(rng, *shape)}
    check(lambda b, v, i: b.silu_mul(v["g"], v["u"]), params)


@SETTINGS
@given(st.permutations([0, 1, 2]), st.integers(0, 2**31))
def test_reshape_transpose_expand(perm, seed):
    rng = np.random.default_rng(seed)
    x = {"x": randn(rng, 2, 3, 4)}
    check(lambda b, v, i: b.transpose(b.reshape(v["x"], (3, 2, 4)), list(perm)), x)
    check(lambda b, v, i: b.expand(v["x"], (2, 5, 3, 4), [1]), x)


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 4), st.integers(2, 6), st.integers(0, 2**31))
def test_cross_entropy_with_ignored_targets(batch, seq, vocab, seed):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, vocab, (batch, seq))
    targets[rng.random((batch, seq)) < 0.3] = -100
    check(
        lambda b, v, i: b.cross_entropy(v["z"], i["t"]),
        {"z": randn(rng, batch, seq, vocab) * 2},
        {"t": targets},
    )


def test_cross_entropy_value_is_the_mean_over_kept_targets():
    logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
    targets = np.array([[0, -100]])
    b = Builder({})
    z, t = b.param("z", "z", (1, 2, 3), "f64"), b.input("t", (1, 2), "i64")
    b.output("loss", b.cross_entropy(z, t))
    run = Executor(run_pipeline(b.graph, PassContext(), PASSES), {"z": logits})
    assert float(run.run({"t": targets})["loss"]) == pytest.approx(np.log(2))


def test_an_op_without_a_rule_is_named():
    b = Builder({})
    x = b.param("x", "x", (2, 3, 4), "f64")
    y = b.slice_last(x)
    b.output("loss", b.einsum("ab->", y))
    with pytest.raises(ShapeError, match="slice_last has no reverse rule"):
        run_pipeline(b.graph, PassContext(), ("autodiff",))


def test_reverse_nodes_are_tagged_and_printed():
    b = Builder({})
    x = b.param("x", "x", (2, 3), "f64")
    b.output("loss", b.einsum("ab,ab->", x, x, role="square"))
    g = run_pipeline(b.graph, PassContext(), ("autodiff",))
    text = str(g)
    assert "{reverse}" in text and "grad.x=" in text and "%loss_grad" in text
