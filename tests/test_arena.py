"""The arena layout (compiler/arena.py) and the memory choices of the schedule and checkpoint
passes: no two values alive in overlapping levels share bytes, in-place steps keep their
input's bytes, the arena lies between the live peak and the old per-slot sum; a bf16 plan
casts each weight just before its first reader and again in the reverse graph."""

from __future__ import annotations

import pytest
import test_train
from hypothesis import given, settings
from hypothesis import strategies as st

import einplan
from einplan.apps.compile import TRAIN_ENTRIES
from einplan.compiler.arena import ALIGN, place_blocks, plan_arena
from einplan.compiler.ops import ITEMSIZE, LEAVES, OPS, Op
from einplan.compiler.symbolic import evaluate, numel, poly_from_json
from einplan.compiler.tags import Tag

MICRO = {**test_train.MICRO, "train": test_train.TRAIN}
DIMS = {"batch": 3, "seq": 16}


@pytest.fixture(scope="module", params=["f32", "bf16"])
def train_graph(request):
    plan = einplan.compile_model(MICRO, entries=TRAIN_ENTRIES, compute_dtype=request.param)
    return plan.entry("train_step")


def lifetimes(graph, dims):
    """Per slotted value: (first level, last level, offset range) as the runtime uses it."""
    ann = graph.annotations
    freed = {
        v: ann[n.id].level for n in graph.nodes if n.op not in LEAVES for v in ann[n.id].free_after
    }
    end = 1 + max(a.level for a in ann.values())
    layout = plan_arena(graph, dims)
    out = {}
    for n in graph.nodes:
        if n.op in LEAVES or ann[n.id].slot is None:
            continue
        size = evaluate(numel(n.shape), dims) * ITEMSIZE[n.dtype]
        off = layout.offsets[n.id]
        out[n.id] = (ann[n.id].level, freed.get(n.id, end), off, off + size)
    return out, layout


def test_values_alive_together_never_share_bytes(train_graph):
    values, layout = lifetimes(train_graph, DIMS)
    nodes = train_graph.by_id()
    items = sorted(values.items(), key=lambda kv: kv[1][0])
    for k, (a, (_, e1, lo1, hi1)) in enumerate(items):
        assert lo1 % ALIGN == 0 and hi1 <= layout.nbytes
        for b, (s2, _, lo2, hi2) in items[k + 1 :]:
            if s2 > e1:
                break
            if lo1 < hi2 and lo2 < hi1:  # overlapping bytes: only an in-place step over a
                n = nodes[b]  # dying first input (maybe through views of it) may do that
                first = n.inputs[0]
                while OPS[nodes[first].op].alias:
                    first = nodes[first].inputs[0]
                assert OPS[n.op].inplace and first == a and s2 == e1, (nodes[a], n)


def test_the_arena_lies_between_the_live_peak_and_the_slot_sum(train_graph):
    values, layout = lifetimes(train_graph, DIMS)
    levels = {lvl for s, e, _, _ in values.values() for lvl in (s, e)}
    live_peak = max(
        sum(hi - lo for s, e, lo, hi in values.values() if s <= lvl <= e) for lvl in levels
    )
    slots = sum(evaluate(poly_from_json(s), DIMS) for s in train_graph.meta["memory"]["slots"])
    assert live_peak * 0.9 <= layout.nbytes <= slots + ALIGN * len(values)
    # and the memory pass's estimate is this arena
    from einplan.compiler.passes.memory import estimate_memory

    assert estimate_memory(train_graph, DIMS)["arena_bytes"] == layout.nbytes


@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 4), st.integers(1, 9)), max_size=30))
@settings(max_examples=200, deadline=None)
def test_placed_blocks_never_overlap_while_both_live(raw):
    blocks = sorted([[s, s + d, size * ALIGN] for s, d, size in raw], key=lambda b: b[0])
    offsets = place_blocks(blocks)
    for i, (s1, e1, z1) in enumerate(blocks):
        for j in range(i + 1, len(blocks)):
            s2, e2, z2 = blocks[j]
            if s1 <= e2 and s2 <= e1:  # alive in a common level
                assert offsets[i] + z1 <= offsets[j] or offsets[j] + z2 <= offsets[i]


def test_a_bf16_plan_casts_each_weight_just_before_its_first_reader():
    plan = einplan.compile_model(MICRO, entries=TRAIN_ENTRIES, compute_dtype="bf16")
    g = plan.entry("train_step")
    nodes, ann, consumers = g.by_id(), g.annotations, g.consumers()
    casts = [
        n
        for n in g.nodes
        if n.op is Op.CAST and nodes[n.inputs[0]].op is Op.PARAM and Tag.REVERSE not in n.tags
    ]
    assert casts
    for n in casts:
        first = min(ann[c].level for c in consumers[n.id])
        assert ann[n.id].level == first - 1, n.name
    # the reverse graph reads casts made again there, after its cotangent arrived
    reverse_reads = {i for n in g.nodes if Tag.REVERSE in n.tags for i in n.inputs}
    assert not reverse_reads & {n.id for n in casts}
    recast = [n for n in g.nodes if n.op is Op.CAST and Tag.RECOMPUTE in n.tags]
    assert recast and all(nodes[n.inputs[0]].op is Op.AFTER for n in recast)


def test_saved_for_backward_halves_in_bf16_and_shrinks_with_checkpointing():
    """The forward values the reverse graph reads: bf16 stores them in half the bytes (but a
    few float32 ones), layer checkpointing keeps only each layer's input."""
    from einplan.compiler.passes.memory import saved_for_backward

    def saved(**kw) -> int:
        plan = einplan.compile_model(MICRO, entries=TRAIN_ENTRIES, **kw)
        return saved_for_backward(plan.entry("train_step"), DIMS)

    f32, bf16 = saved(), saved(compute_dtype="bf16")
    assert 0.45 * f32 <= bf16 <= 0.55 * f32
    assert saved(checkpoint="layers") < 0.5 * f32
    inference = einplan.compile_model(MICRO).entry("forward")
    assert saved_for_backward(inference, DIMS) == 0
