"""The three per-op tables agree: every op has its compiler entry, every computed op a kernel,
and every op either a reverse rule or a stated reason why a gradient never flows through it."""

from __future__ import annotations

import pytest

from einplan.compiler.ops import LEAVES, OPS, Op, ShapeError
from einplan.compiler.pipeline import PassContext, run_pipeline
from einplan.compiler.trace import Builder
from einplan.compiler.vjp import NOT_DIFFERENTIABLE, RULES
from einplan.runtime.kernels import KERNELS


def test_every_op_has_shape_inference():
    assert set(OPS) == set(Op)


def test_every_computed_op_has_a_kernel_and_no_leaf_has_one():
    assert set(KERNELS) == set(Op) - LEAVES


def test_every_op_is_differentiable_or_says_why_not():
    assert not set(RULES) & set(NOT_DIFFERENTIABLE)
    assert set(RULES) | set(NOT_DIFFERENTIABLE) == set(Op)
    assert all(why.strip() for why in NOT_DIFFERENTIABLE.values())


def test_a_gradient_through_an_op_without_a_rule_names_the_reason():
    b = Builder({})
    w = b.param("w", "w", (2, 3, 4), "f64")
    last = b.slice_last(w)  # a trainable value through an op with no rule
    b.output("loss", b.einsum("ab,ab->", last, last))
    with pytest.raises(ShapeError, match="slice_last has no reverse rule .only prefill"):
        run_pipeline(b.graph, PassContext(), ("autodiff",))
