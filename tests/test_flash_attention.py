"""Flash attention (issue #14 part 1): the op and its reverse op against the plain scores ->
softmax -> context chain written in float64 NumPy, finite differences for the reverse op, and
whole plans compiled with attention=flash against attention=plain."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from conftest import BACKENDS, CASES, FIXTURES, ONE_LAYER
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file
from test_gradients import run_grad_entry

import einplan
from einplan.cli import main
from einplan.commands.arguments import ATTENTION_CHOICES
from einplan.compiler.ir import Node
from einplan.compiler.ops import Op, count_flops
from einplan.compiler.passes import flash as flash_pass
from einplan.errors import EinplanError
from einplan.runtime import flash as flash_runtime
from einplan.runtime.executor import Executor
from einplan.runtime.flash import GRADS, LSE, make_flash_attention, make_flash_attention_grad
from einplan.runtime.generate import MASKED, attention_mask

F64 = np.float64


def scratch(role, shape, dtype):
    return np.empty(shape, dtype)


def plain(q, k, v, mask=None, causal=True, bnth=False):
    """The chain the model traces, in float64: softmax over keys of q k^T (+ mask) times v.
    q (b, s, n, g, h); k, v (b, t, n, h) or (b, n, t, h); returns (out, probs)."""
    if bnth:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    s, t = q.shape[1], k.shape[1]
    x = np.einsum("bsngh,btnh->bngst", q, k)
    if mask is not None:
        x = x + mask[:, None, None]
    if causal:
        x = np.where(np.arange(t)[None, :] > np.arange(s)[:, None] + (t - s), -np.inf, x)
    p = np.exp(x - x.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("bngst,btnh->bsngh", p, v), p


def plain_grads(q, k, v, do, mask=None, causal=True, bnth=False):
    """d q, d k, d v of sum(out * do) through the plain chain, in float64."""
    out, p = plain(q, k, v, mask, causal, bnth)
    kk, vv = (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)) if bnth else (k, v)
    dv = np.einsum("bngst,bsngh->btnh", p, do)
    dp = np.einsum("bsngh,btnh->bngst", do, vv)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    dq = np.einsum("bngst,btnh->bsngh", ds, kk)
    dk = np.einsum("bngst,bsngh->btnh", ds, q)
    if bnth:
        dk, dv = dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3)
    return {"q": dq, "k": dk, "v": dv}


def flash_node(op, shape, dtype="f64", wrt=None, **attrs):
    a = {"layout": "bsnh", "causal": True, "block_q": 3, "block_k": 4, "min_tiled": 0, **attrs}
    if wrt is not None:
        a.update(wrt=wrt, grads="qkv")
    return Node(0, op, (), a, shape, dtype, "attn_flash-0" + ("" if wrt is None else ".grad0"))


def run_flash(q, k, v, mask=None, **attrs):
    """The tiled kernel (runtime/flash.py), at any size: KERNELS would run small inference
    steps directly (attends_directly)."""
    ins = [q, k, v] + ([] if mask is None else [mask])
    node = flash_node(Op.FLASH_ATTENTION, q.shape, **attrs)
    out = np.empty_like(q)
    make_flash_attention(node, [x.shape for x in ins], q.shape, scratch)(ins, out)
    return out


def run_flash_grads(q, k, v, do, mask=None, **attrs):
    ins = [q, k, v] + ([] if mask is None else [mask])
    out = run_flash(q, k, v, mask, **attrs)
    grads = {}
    for wrt, x in zip("qkv", (q, k, v), strict=True):
        node = flash_node(Op.FLASH_ATTENTION_GRAD, x.shape, wrt=wrt, **attrs)
        args = [*ins, out, do]
        g = np.empty_like(x)
        make_flash_attention_grad(node, [a.shape for a in args], x.shape, scratch)(args, g)
        grads[wrt] = g
    assert not GRADS, "every sibling took its gradient"
    return grads


def padded_mask(rng, b, s, t, every_row_sees=False):
    """Left padding plus causality over a cache whose queries sit at its end; the padded
    queries see no key unless ``every_row_sees``."""
    pads = rng.integers(0, (t - s + 1) if every_row_sees else s, size=b)
    return attention_mask(pads, t - s, s, t).astype(F64)


def shapes(draw_causal=True):
    return st.fixed_dictionaries(
        {
            "b": st.integers(1, 2),
            "s": st.integers(1, 13),
            "extra": st.integers(0, 6),  # keys before the queries (a cache)
            "n": st.integers(1, 2),
            "g": st.integers(1, 3),
            "h": st.integers(1, 5),
            "block_q": st.integers(1, 6),
            "block_k": st.integers(1, 7),
            "masked": st.booleans(),
            "bnth": st.booleans(),
            "seed": st.integers(0, 2**31),
        }
    )


def make_case(c, every_row_sees=False):
    rng = np.random.default_rng(c["seed"])
    b, s, n, g, h = c["b"], c["s"], c["n"], c["g"], c["h"]
    t = s + c["extra"]
    q = rng.standard_normal((b, s, n, g, h))
    kv_shape = (b, n, t, h) if c["bnth"] else (b, t, n, h)
    k, v = rng.standard_normal(kv_shape), rng.standard_normal(kv_shape)
    mask = padded_mask(rng, b, s, t, every_row_sees) if c["masked"] else None
    attrs = {
        "layout": "bnth" if c["bnth"] else "bsnh",
        "causal": not c["masked"],
        "block_q": c["block_q"],
        "block_k": c["block_k"],
    }
    return q, k, v, mask, attrs, rng


@settings(max_examples=60, deadline=None)
@given(shapes())
def test_forward_equals_the_plain_chain(c):
    q, k, v, mask, attrs, _ = make_case(c)
    want, _ = plain(q, k, v, mask, attrs["causal"], c["bnth"])
    got = run_flash(q, k, v, mask, **attrs)
    assert got.dtype == F64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(shapes())
def test_reverse_equals_the_plain_chain(c):
    """(Rows that see no key are left out: their scores are all MASKED, whose log-sum-exp
    cannot hold log(keys) in floating point; no differentiated graph has a mask.)"""
    q, k, v, mask, attrs, rng = make_case(c, every_row_sees=True)
    do = rng.standard_normal(q.shape)
    want = plain_grads(q, k, v, do, mask, attrs["causal"], c["bnth"])
    got = run_flash_grads(q, k, v, do, mask, **attrs)
    for name in "qkv":
        np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=1e-11, err_msg=name)


@settings(max_examples=60, deadline=None)
@given(shapes(), st.booleans())
def test_direct_steps_equal_the_plain_chain(c, cache_view):
    """A direct step (few queries, all keys at once), one query or several, causal or padded,
    keys as a view of a longer cache (decode's) or whole."""
    q, k, v, mask, attrs, _ = make_case(c)
    if cache_view:  # a cache with unwritten slots past the keys, as decode reads it
        axis = 2 if c["bnth"] else 1
        pad = [(0, 0)] * 4
        pad[axis] = (0, 3)
        k, v = (np.pad(x, pad)[(slice(None),) * axis + (slice(0, x.shape[axis]),)] for x in (k, v))
    want, _ = plain(q, k, v, mask, attrs["causal"], c["bnth"])
    got = run_flash(q, k, v, mask, direct=True, **attrs)
    assert got.dtype == F64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("queries", [1, 3])
def test_direct_steps_of_each_backend_agree_in_float32(kernels, queries):
    """The numba backend's direct step (numpy's products, decode's compiled softmax for one
    query) against the float64 chain, GQA over a cache view with a padding mask."""
    from einplan.runtime.backends import get_backend
    from einplan.runtime.steps import ScratchBuffers

    rng = np.random.default_rng(3)
    b, n, g, h, t = 2, 3, 3, 16, 11
    q = rng.standard_normal((b, queries, n, g, h)).astype(np.float32)
    caches = [rng.standard_normal((b, n, t + 4, h)).astype(np.float32) for _ in range(2)]
    k, v = (c[:, :, :t] for c in caches)  # the views a KV append gives
    mask = padded_mask(rng, b, queries, t, every_row_sees=True).astype(np.float32)
    shapes = [q.shape, k.shape, v.shape, mask.shape]
    ins = [Node(i, Op.INPUT, (), {}, sh, "f32", f"in{i}") for i, sh in enumerate(shapes)]
    attrs = {"layout": "bnth", "causal": False, "block_q": 3, "block_k": 4, "min_tiled": 0}
    node = Node(4, Op.FLASH_ATTENTION, (0, 1, 2, 3), {**attrs, "direct": True}, q.shape, "f32", "f")
    backend = get_backend(kernels)
    kernel, made = backend.kernel_for(node, shapes, q.shape, ScratchBuffers().for_thread(0), ins)
    assert made == kernels
    got = kernel([q, k, v, mask], np.full(q.shape, np.nan, np.float32))
    want, _ = plain(*(x.astype(F64) for x in (q, k, v, mask)), causal=False, bnth=True)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.skipif("numba" not in BACKENDS, reason="numba is not installed")
def test_one_query_attention_walks_only_the_cache_a_key_view_slices():
    """The compiled one-query step reads the whole (b, n, ctx, h) cache of a leading slice of
    it, and refuses any other view (the BLAS step runs those): a view that starts past slot 0,
    a stepped one, one whose rows are not the cache's."""
    from einplan.runtime.backends.numba_exp_factories import cache_of

    five = np.arange(2 * 2 * 3 * 10 * 4, dtype=np.float32).reshape(2, 2, 3, 10, 4)
    for cache in five:  # a cache may be a part of a larger array (keys and values in one)
        whole = cache_of(cache[:, :, :7])
        assert whole.shape == cache.shape and np.shares_memory(whole, cache)
        assert np.array_equal(whole, cache)
        assert cache_of(cache) is cache
        assert cache_of(cache[:, :, ::2]) is None
        assert cache_of(cache[:, :, :7, :2]) is None
        assert cache_of(cache.transpose(0, 2, 1, 3)[:, :3]) is None
    assert cache_of(five[1, :, :, 1:8]) is None  # from slot 1: would reach past the end


def test_short_inference_steps_attend_directly_where_the_scores_fit_the_copies():
    """An inference flash step runs directly at bound sizes where its scores take no more
    memory than the tiled kernel's copies (a short prefill), tiled beyond; never a training
    step (its reverse reads the saved log-sum-exp) nor a 16-bit one."""
    from einplan.compiler.passes.flash import attends_directly

    node = flash_node(Op.FLASH_ATTENTION, ("batch", "seq", 3, 3, 64), "f32")
    assert attends_directly(node, (1, 27, 3, 3, 64), 31)
    assert attends_directly(node, (1, 64, 3, 3, 64), 64)
    assert not attends_directly(node, (1, 128, 3, 3, 64), 128)
    assert not attends_directly(node.with_(attrs={**node.attrs, "keep": True}), (1, 4, 3, 3, 64), 4)
    assert not attends_directly(node.with_(dtype="bf16"), (1, 4, 3, 3, 64), 4)
    assert attends_directly(
        node.with_(attrs={**node.attrs, "direct": True}), (1, 1, 3, 3, 64), 9999
    )


def test_decode_steps_attend_directly_with_the_arena_the_estimate_gives():
    """Greedy generation over a padded batch runs decode's direct steps (and the short
    prefill's, at its bound sizes); each bound prefill and decode arena is the memory pass's
    estimate (arena and scratch) at its sizes. (numpy's kernels: the numba backend's GEMV
    adds partial sums per thread that the plan's estimate leaves out.)"""
    from einplan.compiler.passes.memory import estimate_memory
    from einplan.runtime.generate import GenerationRequest, Generator
    from einplan.runtime.sampling import SamplingConfig

    plan = einplan.compile_model("tiny")
    decode = plan.entry("decode")
    flash = [x for x in decode.nodes if x.op is Op.FLASH_ATTENTION]
    assert flash and all(x.attrs.get("direct") for x in flash)
    gen = Generator(plan, einplan.Session(plan, random_seed=0).weights, kernels="numpy")
    out = gen.generate(GenerationRequest([[5, 6, 7, 8, 9], [3, 4]], 4, SamplingConfig()))
    assert all(len(row) == 4 for row in out.tokens)
    for entry, ex in (("prefill", gen._bound[1]), ("decode", gen._bound[2])):
        assert ex._prepared
        for key, prepared in ex._prepared.items():
            est = estimate_memory(plan.entry(entry), dict(key))
            assert prepared.arena_bytes == est["arena_bytes"] + est["scratch_bytes"], key


def test_reverse_equals_finite_differences():
    """GQA (g=2), block edges that do not divide 7 queries or 9 keys, an additive mask."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 7, 2, 2, 3))
    k, v = rng.standard_normal((1, 9, 2, 3)), rng.standard_normal((1, 9, 2, 3))
    mask = padded_mask(rng, 1, 7, 9, every_row_sees=True)
    mask[0, :, 4] += 0.7  # a finite additive term, not only hiding
    attrs = {"causal": False, "block_q": 2, "block_k": 4}
    do = rng.standard_normal(q.shape)
    got = run_flash_grads(q, k, v, do, mask, **attrs)
    eps = 1e-6
    for name, x in zip("qkv", (q, k, v), strict=True):
        for idx in [tuple(rng.integers(0, d) for d in x.shape) for _ in range(6)]:
            old = x[idx]
            x[idx] = old + eps
            up = (run_flash(q, k, v, mask, **attrs) * do).sum()
            x[idx] = old - eps
            down = (run_flash(q, k, v, mask, **attrs) * do).sum()
            x[idx] = old
            assert abs((up - down) / (2 * eps) - got[name][idx]) < 1e-7, (name, idx)


def test_fully_hidden_rows_average_every_key_as_the_plain_softmax_does():
    """Left-padded query rows see no key: the plain softmax of an all-MASKED row is uniform."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 6, 1, 2, 4))
    k, v = rng.standard_normal((2, 1, 8, 4)), rng.standard_normal((2, 1, 8, 4))
    mask = np.full((2, 6, 8), MASKED, F64)
    mask[1] = attention_mask(np.array([0]), 2, 6, 8)[0]
    attrs = {"layout": "bnth", "causal": False, "block_q": 2, "block_k": 3}
    got = run_flash(q, k, v, mask, **attrs)
    np.testing.assert_allclose(got, plain(q, k, v, mask, False, True)[0], rtol=1e-12)
    every_key = np.broadcast_to(v[0].mean(axis=1)[None, :, None], (6, 1, 2, 4))
    np.testing.assert_allclose(got[0], every_key)


def test_float32_stays_float32():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 10, 1, 3, 8)).astype(np.float32)
    k, v = (rng.standard_normal((1, 10, 1, 8)).astype(np.float32) for _ in range(2))
    node = flash_node(Op.FLASH_ATTENTION, q.shape, "f32")
    out = np.empty_like(q)
    make_flash_attention(node, [q.shape, k.shape, v.shape], q.shape, scratch)([q, k, v], out)
    want, _ = plain(q.astype(F64), k.astype(F64), v.astype(F64))
    assert out.dtype == np.float32 and np.abs(out - want).max() < 1e-5


@pytest.mark.parametrize("layout", ["bsnh", "bnth"])
def test_bfloat16_is_computed_in_float32_and_stays_bfloat16(layout):
    """bf16 values multiply and sum in float32 (as every reduction of a bf16 plan must)."""
    bf16 = ml_dtypes.bfloat16
    rng = np.random.default_rng(2)
    q64 = rng.standard_normal((1, 9, 2, 2, 8))
    kv_shape = (1, 2, 9, 8) if layout == "bnth" else (1, 9, 2, 8)
    k64, v64 = rng.standard_normal(kv_shape), rng.standard_normal(kv_shape)
    q, k, v = (x.astype(bf16) for x in (q64, k64, v64))
    do = rng.standard_normal(q.shape).astype(bf16)
    attrs = {"layout": layout, "block_q": 2, "block_k": 4}
    bnth = layout == "bnth"
    node = flash_node(Op.FLASH_ATTENTION, q.shape, "bf16", **attrs)
    out = np.empty(q.shape, bf16)
    make_flash_attention(node, [q.shape, k.shape, v.shape], q.shape, scratch)([q, k, v], out)
    want, _ = plain(*(x.astype(F64) for x in (q, k, v)), bnth=bnth)
    assert out.dtype == bf16 and np.abs(out.astype(F64) - want).max() < 2e-2
    args = [q, k, v, out, do]
    grads = plain_grads(*(x.astype(F64) for x in (q, k, v, do)), bnth=bnth)
    for wrt, x in zip("qkv", (q, k, v), strict=True):
        g = np.empty(x.shape, bf16)
        grad = flash_node(Op.FLASH_ATTENTION_GRAD, x.shape, "bf16", wrt=wrt, **attrs)
        make_flash_attention_grad(grad, [a.shape for a in args], x.shape, scratch)(args, g)
        err = np.abs(g.astype(F64) - grads[wrt]).max() / np.abs(grads[wrt]).max()
        assert g.dtype == bf16 and err < 3e-2, wrt


def test_causal_flops_count_only_the_computed_tiles():
    """At 1024 keys in tiles of 128 x 512, about half the square plus the diagonal's tiles."""
    q, k = (1, 1024, 3, 3, 64), (1, 1024, 3, 64)
    a = {"layout": "bsnh", "causal": True, "block_q": 128, "block_k": 512, "min_tiled": 0}
    flops = count_flops(Op.FLASH_ATTENTION, [q, k, k], q, a)[()]
    square = 9 * 1024 * 1024 * (4 * 64 + 5)
    assert flops == 9 * 1024 * (1024 + 640) * (4 * 64 + 5) // 2
    assert 0.5 * square < flops < 0.85 * square
    assert count_flops(Op.FLASH_ATTENTION, [q, k, k], q, {**a, "causal": False})[()] == square


# ---- whole plans: attention=flash against attention=plain --------------------------------


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles that do not divide the test lengths, so plans run several blocks and tiles."""
    monkeypatch.setattr(flash_pass, "BLOCK_Q", 3)
    monkeypatch.setattr(flash_pass, "BLOCK_K", 5)


def _feed(ids):
    return {"tokens": ids, "positions": np.broadcast_to(np.arange(ids.shape[1]), ids.shape)}


def test_grad_plans_equal_in_float64(small_tiles, monkeypatch):
    """The reverse steps take the forward's saved log-sum-exp, never computing it again."""

    def recompute(*args):
        raise AssertionError("the reverse step recomputed the log-sum-exp")

    monkeypatch.setattr(flash_runtime, "_row_lse", recompute)
    cfg = {**ONE_LAYER, "num_hidden_layers": 2}
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 32, size=(2, 11))
    outs = {}
    for attention in ("flash", "plain"):
        plan = einplan.compile_model(
            cfg, compute_dtype="f64", entries=("grad",), attention=attention
        )
        graph = plan.entry("grad")
        ops = {n.op for n in graph.nodes}
        assert (Op.FLASH_ATTENTION_GRAD in ops) == (attention == "flash")
        weights = {
            n.attrs["key"]: np.random.default_rng(len(n.name)).standard_normal(n.shape) * 0.3
            for n in graph.params()
        }
        targets = np.concatenate([ids[:, 1:], np.full((2, 1), -100)], axis=1)
        feed = {**_feed(ids), "targets": targets, "loss_grad": np.array(1.0)}
        outs[attention] = Executor(graph, weights).run(feed)
        if attention == "flash":  # the three reverse steps of a layer on a thread pool
            pooled = Executor(graph, weights, workers=3).run(feed)
            assert all(np.array_equal(pooled[k], v) for k, v in outs["flash"].items())
    assert set(outs["flash"]) == set(outs["plain"])
    for name, want in outs["plain"].items():
        got = outs["flash"][name]
        assert np.abs(got - want).max() <= 1e-10 * max(1.0, np.abs(want).max()), name
    assert not LSE or all(k.startswith("attn_flash") for k in LSE)


def test_forward_prefill_and_padded_verify_plans_equal_plain(small_tiles):
    """In float32 (the KV cache is float32): left-padded rows over the cache, every entry."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 32, size=(2, 9))
    pads = np.array([0, 3])
    entries = ("forward", "prefill", "verify", "decode")
    plans = {
        a: einplan.compile_model(ONE_LAYER, entries=entries, attention=a)
        for a in ("flash", "plain")
    }
    assert plans["flash"].entry("decode").meta["attention"]["kind"] == "flash"
    weights = {
        n.attrs["key"]: (rng.standard_normal(n.shape) * 0.5).astype(np.float32)
        for n in plans["plain"].entry("forward").params()
    }
    got = {}
    for a, plan in plans.items():
        fwd = Executor(plan.entry("forward"), weights).run(_feed(ids))["logits"]
        res = {"forward": fwd}
        for entry in ("prefill", "verify"):
            cache = {
                n.attrs["key"]: np.zeros((2, 2, 16, 4), np.float32)
                for n in plan.entry(entry).states()
            }
            feed = {
                **_feed(ids),
                "mask": attention_mask(pads, 0, 9, 9),
                "write_pos": np.array([0]),
            }
            res[entry] = Executor(plan.entry(entry), {**weights, **cache}).run(feed)["logits"]
        got[a] = res
    for name, want in got["plain"].items():
        np.testing.assert_allclose(got["flash"][name], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_transformers_parity_with_flash_tiles(case, small_tiles):
    folder = FIXTURES / case
    ref = load_file(folder / "reference.safetensors")
    plan = einplan.compile_model(folder / "config.json", attention="flash")
    assert any(n.op is Op.FLASH_ATTENTION for n in plan.entry("forward").nodes)
    logits = einplan.Session(plan, folder).forward(ref["input_ids"])
    assert np.abs(logits - ref["logits"]).max() < 1e-4


@pytest.mark.parametrize("case", ["llama_gqa_tied", "qwen2_bias_mqa", "mixtral_moe"])
def test_transformers_gradients_with_flash_tiles(case, small_tiles, monkeypatch):
    """auto, tiled at every length: float64 loss and gradients still match the fixtures."""
    monkeypatch.setattr(flash_pass, "MIN_TILED", 0)
    out, ref = run_grad_entry(case, "f64")
    assert abs(float(out["loss"]) - float(ref["loss64"])) < 1e-6 * float(ref["loss64"])
    for name in (k.removeprefix("grad64.") for k in ref if k.startswith("grad64.")):
        got, want = out[f"grad.{name}"], ref[f"grad64.{name}"]
        assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max(), name


def test_auto_tiles_forward_makes_decode_direct_and_records_its_choice():
    plan = einplan.compile_model("tiny")
    forward, decode = plan.entry("forward"), plan.entry("decode")
    assert forward.meta["attention"]["kind"] == "flash"
    assert forward.meta["attention"]["min_tiled"] == flash_pass.MIN_TILED
    assert forward.meta["attention"]["direct"] == 0
    assert "flash_attention" in str(forward)
    assert not any(n.attrs.get("direct") for n in forward.nodes)
    flash = [n for n in decode.nodes if n.op is Op.FLASH_ATTENTION]
    assert len(flash) == decode.meta["attention"]["direct"] == 4
    assert all(n.attrs["direct"] for n in flash)
    grad = einplan.compile_model("tiny", entries=("grad",)).entry("grad")
    assert all(
        n.attrs.get("keep") and not n.attrs.get("direct")
        for n in grad.nodes
        if n.op is Op.FLASH_ATTENTION
    )
    plain_plan = einplan.compile_model("tiny", attention="plain")
    assert not any(n.op is Op.FLASH_ATTENTION for n in plain_plan.entry("forward").nodes)
    assert plain_plan.meta["attention"]["forward"]["kind"] == "plain"


def test_unknown_attention_is_a_clear_error():
    with pytest.raises(EinplanError, match="attention 'fast' is not one of auto, flash, plain"):
        einplan.compile_model("tiny", attention="fast")


def _unwrapped(table: str) -> str:
    """A printed table's text with its borders and line wraps taken out."""
    return " ".join(table.replace("│", " ").split())


def test_cli_compile_says_what_it_chose_and_train_refuses_it_for_a_plan(tmp_path, capsys):
    plan = tmp_path / "t.plan"
    assert main(["compile", "tiny", "--attention", "plain", "-o", str(plan)]) == 0
    out = _unwrapped(capsys.readouterr().out)
    assert "forward: plain (--attention plain)" in out
    assert main(["compile", "tiny", "-o", str(plan)]) == 0
    out = _unwrapped(capsys.readouterr().out)
    assert "forward: flash x4 (tiles 128 queries x 512" in out
    assert "decode: flash x4 direct (auto: at most 16 queries, all keys at once)" in out
    argv = ["train", str(plan), "--data", str(plan), "-o", str(tmp_path / "run")]
    assert main([*argv, "--attention", "flash"]) == 2
    assert "recompile it with einplan compile --train --attention" in capsys.readouterr().err


def test_the_parser_offers_the_compilers_choices():
    assert ATTENTION_CHOICES == flash_pass.ATTENTION_CHOICES


def test_a_tile_far_above_the_running_maximum_is_done_again():
    """The first key tile sets the running maximum; a later tile scoring 150 above it would
    overflow exp(score - maximum): its sums pass the limit and it is computed again exactly."""
    rng = np.random.default_rng(5)
    u = np.array([1.0, -0.5, 0.5, 1.0])
    q = u + 0.1 * rng.standard_normal((1, 4, 1, 1, 4))
    k, v = rng.standard_normal((1, 12, 1, 4)), rng.standard_normal((1, 12, 1, 4))
    k[0, 8:] += u[None, None] * 60  # the keys of the last tile match every query
    calls = []
    real = flash_runtime._add_tile
    monkey = pytest.MonkeyPatch()
    monkey.setattr(flash_runtime, "_add_tile", lambda *a: calls.append(r := real(*a)) or r)
    try:
        got = run_flash(q, k, v, causal=False, block_q=4, block_k=4)
    finally:
        monkey.undo()
    want, p = plain(q, k, v, causal=False)
    assert p[..., 8:].sum(axis=-1).min() > 0.99  # the last tile's keys take the weight
    assert False in calls  # ... and the running maximum was raised for them
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif("numba" not in BACKENDS, reason="numba is not installed")
@settings(max_examples=25, deadline=None)
@given(
    s=st.integers(1, 90),
    extra=st.sampled_from([0, 0, 7, 40]),
    n=st.integers(1, 2),
    g=st.integers(1, 3),
    h=st.sampled_from([64, 128]),
    bq=st.sampled_from([1, 3, 8, 32]),
    bk=st.sampled_from([32, 64, 96]),
    bnth=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_compiled_causal_forward_equals_the_chain(s, extra, n, g, h, bq, bk, bnth, seed):
    """The numba backend's whole-kernel causal forward (numba_flash.py: panel products,
    block and tile edges that do not divide the lengths, keys past the queries) against the
    float64 chain; its kernel is chosen only where it applies."""
    from einplan.runtime.backends.numba_exp_factories import compiles_whole, make_causal_flash
    from einplan.runtime.steps import ScratchBuffers

    rng = np.random.default_rng(seed)
    t = s + extra
    q = rng.standard_normal((2, s, n, g, h)).astype(np.float32)
    kv_shape = (2, n, t, h) if bnth else (2, t, n, h)
    k, v = (rng.standard_normal(kv_shape).astype(np.float32) for _ in range(2))
    shapes = [q.shape, k.shape, v.shape]
    ins = [Node(i, Op.INPUT, (), {}, sh, "f32", f"in{i}") for i, sh in enumerate(shapes)]
    attrs = {"layout": "bnth" if bnth else "bsnh", "causal": True, "block_q": bq}
    attrs.update(block_k=bk, min_tiled=0, scale=0.125)
    node = Node(3, Op.FLASH_ATTENTION, (0, 1, 2), attrs, q.shape, "f32", "f")
    assert compiles_whole(node, shapes, ins)
    assert not compiles_whole(node.with_(attrs={**attrs, "keep": True}), shapes, ins)
    assert not compiles_whole(node.with_(attrs={**attrs, "causal": False}), shapes, ins)
    kernel = make_causal_flash(node, shapes, q.shape, ScratchBuffers().for_thread(0))
    got = kernel([q, k, v], np.full(q.shape, np.nan, np.float32))
    want, _ = plain(*(x.astype(F64) for x in (q * np.float32(0.125), k, v)), bnth=bnth)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.skipif("numba" not in BACKENDS, reason="numba is not installed")
def test_the_forward_of_a_long_prompt_takes_the_compiled_kernel():
    """SmolLM2's forward at 512 tokens: each flash step gets numba_flash's kernel (a short
    step attends directly instead)."""
    from einplan.runtime.backends import get_backend
    from einplan.runtime.steps import ScratchBuffers

    plan = einplan.compile_model("smollm2-135m", entries=("forward",))
    graph = plan.entry("forward")
    node = next(x for x in graph.nodes if x.op is Op.FLASH_ATTENTION)
    by_id = graph.by_id()
    ins = [by_id[i] for i in node.inputs]
    for s, want in ((512, "causal_flash"), (8, "direct")):
        shapes = [(1, s, 3, 3, 64), (1, s, 3, 64), (1, s, 3, 64)]
        kernel, made = get_backend("numba").kernel_for(
            node, shapes, shapes[0], ScratchBuffers().for_thread(0), ins
        )
        assert made == "numba" and (kernel.__name__ == "causal_flash") == (want != "direct")
