"""The IR: golden printing, and verify() catching every broken invariant."""

from __future__ import annotations

import re

import pytest
from conftest import ONE_LAYER, check_golden

from einplan.api import compile_model
from einplan.compiler.ir import Graph, Node
from einplan.compiler.ops import Op, ShapeError
from einplan.compiler.trace import Builder
from einplan.models.config import parse_config
from einplan.models.llama import build_graph


def test_traced_graph_matches_golden_text():
    check_golden("one_layer_traced.txt", str(build_graph(parse_config(ONE_LAYER), "forward")))


def test_compiled_graph_matches_golden_text():
    plan = compile_model(ONE_LAYER)
    check_golden("one_layer_compiled.txt", str(plan.entry("forward")))


def test_print_line_is_jaxpr_like():
    b = Builder({"batch": 2, "seq": 8})
    x = b.input("x", ("batch", "seq", 4), "f32")
    with b.layer(3):
        w = b.param("attn_q.w", "q.weight", (6, 4))
        y = b.einsum("bsd,ed->bse", x, w, role="attn_q")
    b.output("y", y)
    lines = str(b.graph).splitlines()
    assert lines[0] == "graph forward(batch<=2, seq<=8) {"
    assert lines[2] == "  %attn_q-3.w:f32[6,4] = param[q.weight]"
    assert lines[3].startswith("  %2:f32[batch,seq,6] = einsum[bsd,ed->bse] %x %attn_q-3.w")
    assert lines[3].endswith("# attn_q-3")
    assert lines[-2] == "  return y=%2"


def _graph(*nodes: Node) -> Graph:
    return Graph(list(nodes), {"out": nodes[-1].id}, {"batch": 2, "seq": 8})


X = Node(0, Op.INPUT, (), {}, ("batch", "seq", 4), "f32", "x")
W = Node(1, Op.PARAM, (), {"key": "w"}, (6, 4), "f32", "w")


def test_verify_accepts_a_good_graph():
    _graph(
        X, W, Node(2, Op.EINSUM, (0, 1), {"spec": "bsd,ed->bse"}, ("batch", "seq", 6), "f32")
    ).verify()


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            Node(2, Op.EINSUM, (0, 7), {"spec": "bsd,ed->bse"}, ("batch", "seq", 6), "f32"),
            "used before it is defined",
        ),
        (
            Node(2, Op.EINSUM, (0, 1), {"spec": "bsd,ed->bse"}, ("batch", "seq", 5), "f32"),
            "recorded f32[batch,seq,5]",
        ),
        (Node(2, Op.EINSUM, (0, 1), {"spec": "bd,ed->be"}, ("batch", 6), "f32"), "rank"),
        (
            Node(2, Op.EINSUM, (0, 1), {"spec": "bsd,ed->bsz"}, ("batch", "seq", 6), "f32"),
            "output index 'z'",
        ),
        (
            Node(2, Op.EINSUM, (0, 1), {"spec": "bsd,de->bse"}, ("batch", "seq", 4), "f32"),
            "index 'd' is 4 in one operand, 6",
        ),
        (Node(2, Op.ADD, (0, 1), {}, ("batch", "seq", 4), "f32"), "does not broadcast"),
        (
            Node(2, Op.EINSUM, (0, 1), {"spec": "bsd,ed->bse"}, ("batch", "seq", 6), "f16"),
            "recorded f16",
        ),
    ],
)
def test_verify_rejects(bad, message):
    with pytest.raises(ShapeError, match=re.escape(message)):
        _graph(X, W, bad).verify()


def test_verify_rejects_undeclared_symbolic_dim():
    bad = Node(0, Op.INPUT, (), {}, ("batch", "tokens"), "i64", "x")
    with pytest.raises(ShapeError, match="symbolic dim 'tokens' is not declared"):
        _graph(bad).verify()


def test_verify_rejects_value_defined_twice_and_duplicate_leaf_names():
    with pytest.raises(ShapeError, match="defined twice"):
        _graph(X, X.with_(name="y")).verify()
    with pytest.raises(ShapeError, match="two leaves named 'x'"):
        _graph(X, X.with_(id=5)).verify()


def test_builder_reports_the_node_that_broke_shapes():
    b = Builder({"batch": 2, "seq": 8})
    x = b.input("x", ("batch", "seq", 4), "f32")
    w = b.param("w", "w", (6, 5))
    with pytest.raises(ShapeError, match="attn_q"):
        b.einsum("bsd,ed->bse", x, w, role="attn_q")
