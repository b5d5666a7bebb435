"""simplify, schedule and memory: dead code and CSE, levels that respect dependencies, and
buffer reuse that never lets two live values share memory."""

from __future__ import annotations

import numpy as np
from conftest import ONE_LAYER

import einplan
from einplan.api import compile_model
from einplan.compiler.ops import OPS, Op
from einplan.compiler.pipeline import PassContext, run_pass
from einplan.compiler.trace import Builder


def test_simplify_removes_dead_nodes_and_merges_duplicates():
    b = Builder({"n": 8})
    x = b.input("x", ("n", 4), "f32")
    w = b.param("w", "w", (4,))
    y1 = b.mul(x, w)
    y2 = b.mul(x, w)  # same computation
    b.add(x, x)  # dead
    b.output("y", b.add(y1, y2))
    g = run_pass("simplify", b.graph, PassContext())
    ops = [n.op for n in g.nodes]
    assert ops.count(Op.MUL) == 1 and ops.count(Op.ADD) == 1
    add = g.nodes[-1]
    assert add.inputs[0] == add.inputs[1]


def test_schedule_levels_respect_dependencies():
    g = compile_model(ONE_LAYER).entry("forward")
    ann = g.annotations
    nodes = g.by_id()
    for n in g.nodes:
        for i in n.inputs:
            if nodes[i].op not in (Op.PARAM, Op.INPUT):
                assert ann[i].level < ann[n.id].level
    level_of = {n.name: ann[n.id].level for n in g.nodes if n.id in ann}
    assert level_of["attn_q-0"] == level_of["attn_k-0"] == level_of["attn_v-0"]
    assert level_of["ffn_gate-0"] == level_of["ffn_up-0"]


def test_no_two_live_values_share_a_buffer():
    """Simulate the run: a slot may be taken only when its previous value is dead."""
    g = compile_model("tiny").entry("forward")
    root = {}
    for n in g.nodes:
        root[n.id] = root[n.inputs[0]] if OPS[n.op].alias else n.id
    holder: dict[int, int] = {}  # slot -> live root value
    live: set[int] = set()
    for n in g.nodes:
        if n.op in (Op.PARAM, Op.INPUT):
            continue
        a = g.annotations[n.id]
        for i in n.inputs:
            if g.by_id()[i].op not in (Op.PARAM, Op.INPUT):
                assert root[i] in live, f"{n.name} reads a freed value %{i}"
        if a.slot is not None:
            owner = holder.get(a.slot)
            in_place = (
                OPS[n.op].inplace
                and owner == root[n.inputs[0]]
                and owner in {root[v] for v in a.free_after}
            )  # writes over its first input, which dies at this step
            assert owner is None or owner not in live or in_place, (
                f"{n.name} overwrites live %{owner}"
            )
            holder[a.slot] = n.id
        live.add(root[n.id])
        for v in a.free_after:
            live.discard(root[v])
    assert set(g.outputs.values()) <= live


def test_buffers_are_reused():
    g = compile_model("tiny").entry("forward")
    slots = {a.slot for a in g.annotations.values() if a.slot is not None}
    steps = [n for n in g.nodes if n.id in g.annotations and g.annotations[n.id].slot is not None]
    assert len(slots) < len(steps) / 3


def test_peak_estimate_is_weights_plus_arena_plus_scratch_plus_outputs():
    mem = compile_model("tiny").entry("forward").meta["memory"]
    parts = ("weights_bytes", "state_bytes", "arena_bytes", "scratch_bytes", "transient_bytes")
    parts += ("outputs_bytes",)
    assert mem["peak_bytes"] == sum(mem[k] for k in parts)
    assert mem["weights_bytes"] == 758_912 * 4


def test_pack_fuses_projections_of_one_input_and_keeps_the_logits():
    from einplan.compiler.pipeline import PassContext

    packed = compile_model("tiny", entries=("forward", "decode"))
    plain = compile_model("tiny", entries=("forward", "decode"), ctx=PassContext(pack=False))
    g = packed.entry("forward")
    names = {n.name for n in g.nodes if n.op is Op.EINSUM}
    assert {"attn_q+attn_k+attn_v-0", "ffn_gate+ffn_up-0", "attn_o-0", "ffn_down-0"} <= names
    assert sum(n.op is Op.SPLIT for n in g.nodes) == 5 * 4  # q, k, v, gate, up per layer
    qkv = next(n for n in g.params() if n.name == "attn_q+attn_k+attn_v-0.w")
    assert qkv.shape == (128, 128 + 64 + 64) and len(qkv.attrs["pack"]) == 3
    ids = np.random.default_rng(0).integers(0, 256, (2, 9))
    a = einplan.Session(packed, random_seed=5).forward(ids)
    b = einplan.Session(plain, random_seed=5).forward(ids)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_dying_inputs_are_overwritten_in_place():
    g = compile_model("tiny").entry("forward")
    nodes = g.by_id()
    residual = next(n for n in g.nodes if n.name == "attn_residual-1")
    first = nodes[residual.inputs[0]]
    assert g.annotations[residual.id].slot == g.annotations[first.id].slot
