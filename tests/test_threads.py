"""How a plan runs: the schedule pass's choice of thread pool and BLAS threads by its cost
model, the executor following it (or an explicit ``workers``), and the compile summary saying
which and why."""

from __future__ import annotations

import io

import numpy as np
from rich.console import Console

import einplan
from einplan.compiler.ir import Node
from einplan.compiler.ops import Op
from einplan.compiler.passes import schedule
from einplan.models.train_config import parse_train_config
from einplan.report.summary import print_compile_summary
from einplan.runtime.executor import Executor


def leaf(i: int, shape) -> Node:
    return Node(i, Op.INPUT, (), {}, tuple(shape), "f32", f"x{i}")


def test_small_products_run_on_one_blas_thread_large_ones_on_all():
    x, w = leaf(0, (4, 8)), leaf(1, (8, 8))
    small = Node(2, Op.EINSUM, (0, 1), {"spec": "bi,io->bo"}, (4, 8), "f32", "mm")
    nodes = {n.id: n for n in (x, w, small)}
    got = schedule.choose_threads([[small]], nodes, {}, cores=2)
    assert got["blas_threads"] == 1 and got["workers"] == 0
    assert "1 BLAS thread" in got["threads_reason"]
    x, w = leaf(0, (512, 1024)), leaf(1, (1024, 1024))
    large = Node(2, Op.EINSUM, (0, 1), {"spec": "bi,io->bo"}, (512, 1024), "f32", "mm")
    nodes = {n.id: n for n in (x, w, large)}
    got = schedule.choose_threads([[large]], nodes, {}, cores=2)
    assert got["blas_threads"] is None and "all 2 BLAS threads" in got["threads_reason"]
    # one core: nothing to share
    assert schedule.choose_threads([[large]], nodes, {}, cores=1)["blas_threads"] == 1


def test_a_pool_is_chosen_where_independent_steps_outweigh_its_cost():
    """Two long single-threaded steps of one level run together on two cores; two short ones
    do not pay for handing them to a worker."""
    for size, pooled in ((1 << 24, True), (64, False)):
        a, b = leaf(0, (size,)), leaf(1, (size,))
        steps = [Node(2 + k, Op.SILU_MUL, (0, 1), {}, (size,), "f32", f"s{k}") for k in range(2)]
        nodes = {n.id: n for n in (a, b, *steps)}
        got = schedule.choose_threads([steps], nodes, {}, cores=2)
        assert (got["workers"] == 2) is pooled, got
        est = got["estimated_ms"]
        assert (est["pooled"] < est["sequential"]) is pooled


def test_expert_products_count_towards_the_blas_threads():
    """The tiny Mixtral's products are mostly inside its expert steps: counted, its train step
    gets every core's BLAS thread (one thread ran it at 0.69x PyTorch; two at 1.10x)."""
    cfg = parse_train_config({"micro_batch": 4, "seq_len": 128, "lr": 1e-3})
    plan = einplan.compile_model("tiny-moe", entries=("train_step",), train=cfg)
    chosen = plan.entry("train_step").meta["schedule"]
    if (schedule.os.cpu_count() or 1) > 1:
        assert chosen["blas_threads"] is None
    assert chosen["threads_reason"] and chosen["workers"] >= 0


def test_executor_follows_the_plan_unless_told():
    plan = einplan.compile_model("tiny", entries=("forward",))
    graph = plan.entry("forward")
    weights = einplan.Session(plan, random_seed=0).weights
    graph.meta["schedule"].update(workers=2, blas_threads=None)
    chosen = Executor(graph, weights)
    assert chosen.workers == 2 and chosen._pool is not None
    told = Executor(graph, weights, workers=1)
    assert told._pool is None
    graph.meta["schedule"].update(workers=0, blas_threads=1)
    seq = Executor(graph, weights)
    assert seq._pool is None and seq.blas_threads == 1
    ids = {"tokens": np.arange(9)[None], "positions": np.arange(9)[None]}
    ids = {k: v for k, v in ids.items() if k in {n.name for n in graph.inputs()}}
    np.testing.assert_allclose(chosen.run(ids)["logits"], seq.run(ids)["logits"], atol=1e-5)
    for ex in (chosen, told, seq):
        ex.close()


def test_compile_summary_says_how_each_entry_runs():
    plan = einplan.compile_model("tiny")
    out = io.StringIO()
    print_compile_summary(plan, 1, 64, Console(file=out, width=300))
    text = out.getvalue()
    for name in plan.entries:
        assert f"threads ({name})" in text
    assert "BLAS thread" in text


def test_a_busy_machine_keeps_one_blas_thread(monkeypatch):
    from einplan.runtime import executor  # its busy_machine is runtime/load.py's

    plan = einplan.compile_model("tiny", entries=("forward",))
    graph = plan.entry("forward")
    weights = einplan.Session(plan, random_seed=0).weights
    graph.meta["schedule"].update(workers=0, blas_threads=None)
    monkeypatch.setattr(executor, "busy_machine", lambda: True)
    assert Executor(graph, weights).blas_threads == 1
    monkeypatch.setattr(executor, "busy_machine", lambda: False)
    assert Executor(graph, weights).blas_threads is None
