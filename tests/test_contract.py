"""The contract pass: every einsum lowered to permute/reshape + matmul equals np.einsum
(the oracle), for random equations and shapes; n-ary einsums are split along opt-einsum's path."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from einplan.compiler.ir import Node
from einplan.compiler.ops import Op
from einplan.compiler.passes.contract import lower_einsum
from einplan.compiler.pipeline import PassContext, run_pass
from einplan.compiler.trace import Builder
from einplan.runtime.executor import Executor
from einplan.runtime.kernels import make_kernel

LETTERS = "abcdefg"


@st.composite
def equations(draw, n_operands):
    """A random explicit einsum over 1..n operands with sizes for each letter."""
    letters = draw(st.lists(st.sampled_from(LETTERS), min_size=1, max_size=5, unique=True))
    sizes = {c: draw(st.integers(1, 5)) for c in letters}
    terms = []
    for _ in range(n_operands):
        term = draw(st.lists(st.sampled_from(letters), min_size=0, max_size=4, unique=True))
        terms.append("".join(draw(st.permutations(term))))
    used = sorted(set("".join(terms)))
    out = draw(st.lists(st.sampled_from(used), unique=True, max_size=len(used))) if used else []
    out = "".join(draw(st.permutations(out)))
    return ",".join(terms) + "->" + out, sizes


def _scratch(role, mat, dtype):
    return np.empty(mat, dtype)


def _run_lowered(spec, arrays):
    out_term = spec.split("->")[1]
    sizes = {}
    for t, a in zip(spec.split("->")[0].split(","), arrays, strict=True):
        sizes.update(zip(t, a.shape, strict=True))
    out_shape = tuple(sizes[c] for c in out_term)
    node = Node(
        9,
        Op.EINSUM,
        tuple(range(len(arrays))),
        {"spec": spec, "recipe": lower_einsum(spec)},
        out_shape,
        "f32",
    )
    kernel = make_kernel(node, [a.shape for a in arrays], out_shape, _scratch)
    return kernel(arrays, np.empty(out_shape, np.float32))


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 2).flatmap(equations), st.integers(0, 2**31))
def test_lowered_einsum_matches_numpy(eq, seed):
    spec, sizes = eq
    rng = np.random.default_rng(seed)
    arrays = [
        rng.standard_normal([sizes[c] for c in t]).astype(np.float32)
        for t in spec.split("->")[0].split(",")
    ]
    want = np.einsum(spec, *arrays)
    got = _run_lowered(spec, arrays)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(equations(3), st.integers(0, 2**31))
def test_nary_einsum_split_by_path_matches_numpy(eq, seed):
    spec, sizes = eq
    terms = spec.split("->")[0].split(",")
    b = Builder({})
    xs = [b.input(f"x{i}", tuple(sizes[c] for c in t), "f32") for i, t in enumerate(terms)]
    b.output("y", b.einsum(spec, *xs))
    graph = run_pass("contract", b.graph, PassContext())
    einsums = [n for n in graph.nodes if n.op is Op.EINSUM]
    assert len(einsums) == 2 and all(len(n.inputs) <= 2 for n in einsums)
    graph = run_pass("memory", run_pass("schedule", graph, PassContext()), PassContext())
    rng = np.random.default_rng(seed)
    arrays = {
        f"x{i}": rng.standard_normal([sizes[c] for c in t]).astype(np.float32)
        for i, t in enumerate(terms)
    }
    got = Executor(graph, {}).run(arrays)["y"]
    np.testing.assert_allclose(got, np.einsum(spec, *arrays.values()), rtol=1e-4, atol=1e-4)


def test_low_rank_chain_contracts_the_small_side_first():
    """x·A·B with rank 4: opt-einsum's order multiplies x·A first, never forms A·B."""
    b = Builder({})
    x = b.input("x", (256, 512), "f32")
    a = b.input("a", (512, 4), "f32")
    w = b.input("b", (4, 512), "f32")
    b.output("y", b.einsum("si,ir,ro->so", x, a, w))
    graph = run_pass("contract", b.graph, PassContext())
    first = next(n for n in graph.nodes if n.op is Op.EINSUM)
    assert set(first.inputs) == {0, 1}, first


def test_linear_weight_is_read_transposed_without_a_copy():
    recipe = lower_einsum("bsi,oi->bso")
    assert recipe.a_perm == [0, 1, 2] and recipe.b_perm == [1, 0]
    assert recipe.out_perm == [0, 1, 2]
