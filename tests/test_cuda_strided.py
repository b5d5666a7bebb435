"""The cuda device's in-place products (runtime/cuda/strided.py) on the CPU: every product of
SmolLM2's forward, decode and training plans, planned over NumPy views and executed by a NumPy
model of cuBLAS's strided-batched GEMM, equals np.einsum; permuted attention operands are
read in place, in few calls."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ONE_LAYER

import einplan
from einplan.compiler.attrs import MatmulRecipe
from einplan.compiler.symbolic import resolve_shape
from einplan.models.train_config import parse_train_config
from einplan.runtime.cuda.blas import OP_N, matrix_layout
from einplan.runtime.cuda.strided import plan_gemms

# conftest's one-layer GQA model, wider
CONFIG = {
    **ONE_LAYER,
    "name": "small-gqa",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
}


def base_and_offset(x: np.ndarray) -> tuple[np.ndarray, int]:
    """The flat buffer under a view and the view's first element's offset in it."""
    base = x
    while base.base is not None:
        base = base.base
    offset = x.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    return base.reshape(-1).view(x.dtype), offset // x.itemsize


def matrix(flat, start, rows, cols, op, ld):
    """A row-major rows x cols matrix as cuBLAS reads it with (op, ld) from ``flat``."""
    i, j = np.arange(rows)[:, None], np.arange(cols)[None, :]
    return flat[start + (i * ld + j if op == OP_N else i + j * ld)]


def run_plan(p, a, b, c) -> None:
    """Execute a GemmPlan with NumPy as cuBLAS would."""
    (fa, oa), (fb, ob), (fc, oc) = (
        base_and_offset(x) for x in ((b, a) if p.swap else (a, b)) + (c,)
    )
    rows = np.arange(p.m)[:, None] * p.ldc + np.arange(p.n)[None, :]
    for da, db, dc in p.offsets:
        for i, (ka, kb) in enumerate(p.k_offsets):
            for t in range(p.batch):
                am = matrix(fa, oa + da + ka + t * p.strides[0], p.m, p.k, *p.a)
                bm = matrix(fb, ob + db + kb + t * p.strides[1], p.k, p.n, *p.b)
                at = oc + dc + t * p.strides[2] + rows
                fc[at] = am @ bm + (fc[at] if i else 0)


def products():
    """(entry, node, bound shapes) of every two-operand product of the plans."""
    cfg = parse_train_config({"optimizer": "adamw", "micro_batch": 3, "seq_len": 16})
    plan = einplan.compile_model(CONFIG, entries=("forward", "decode", "train_step"), train=cfg)
    dims = {"batch": 3, "seq": 16, "ctx": 24, "kv": 20}
    for entry, graph in plan.entries.items():
        nodes = graph.by_id()
        bound = {**dims, "seq": 1} if entry == "decode" else dims
        for n in graph.nodes:
            r = n.attrs.get("recipe")
            if isinstance(r, MatmulRecipe) and not r.a_sum and not r.b_sum:
                shapes = [resolve_shape(nodes[i].shape, bound) for i in n.inputs]
                yield entry, n, shapes, resolve_shape(n.shape, bound)


CASES = list(products())


@pytest.mark.parametrize("case", range(len(CASES)))
def test_in_place_products_equal_einsum(case):
    entry, node, (a_shape, b_shape), out_shape = CASES[case]
    r = node.attrs["recipe"]
    rng = np.random.default_rng(case)
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    out = np.full(out_shape, np.nan, np.float32)
    av, bv = a.transpose(r.a_perm), b.transpose(r.b_perm)
    cv = out.transpose(np.argsort(r.out_perm))
    p = plan_gemms(*((x.shape, x.strides) for x in (av, bv, cv)), r.groups)
    if p is None:  # the recipe's copies run instead: only where a layout allows no other way
        pytest.skip(f"{node.name}: copied")
    run_plan(p, av, bv, cv)
    spec = node.attrs["spec"] if "spec" in node.attrs else None
    want = np.einsum(spec, a, b) if spec else None
    assert not np.isnan(out).any()
    if want is not None:
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_attention_operands_are_not_copied():
    """Every product of the training plan (attention's permuted heads and groups included)
    reads its operands in place, in at most a few calls."""
    planned = []
    for _, node, (a_shape, b_shape), out_shape in CASES:
        r = node.attrs["recipe"]
        a, b = np.zeros(a_shape, np.float32), np.zeros(b_shape, np.float32)
        c = np.zeros(out_shape, np.float32).transpose(np.argsort(r.out_perm))
        views = [(x.shape, x.strides) for x in (a.transpose(r.a_perm), b.transpose(r.b_perm), c)]
        planned.append(plan_gemms(*views, r.groups))
    assert all(p is not None for p in planned)
    assert max(len(p.offsets) for p in planned) <= 8


def test_matrix_layout():
    assert matrix_layout(3, 4, 4, 1) == (OP_N, 4)
    assert matrix_layout(3, 4, 1, 3) == (1, 3)
    assert matrix_layout(3, 4, 8, 2) is None
    assert matrix_layout(1, 4, 999, 1) == (OP_N, 4)
