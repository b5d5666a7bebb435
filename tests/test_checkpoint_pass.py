"""Activation checkpointing (passes/checkpoint.py): gradients bit-identical to the plan that
keeps every activation, a peak estimate that falls with the policy and tracks the measured peak,
recompute tags and views in the printed graph, and clear errors for bad policies."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from conftest import ONE_LAYER, check_golden

from einplan.api import (
    CheckpointError,
    PassContext,
    compile_model,
    load_plan,
    parse_checkpoint,
    train,
)
from einplan.apps.gradients import loss_feed, shifted_targets
from einplan.cli import main
from einplan.compiler.ops import Op
from einplan.compiler.passes.memory import estimate_memory
from einplan.compiler.tags import Tag
from einplan.errors import EinplanError
from einplan.formats.weights import random_weights
from einplan.models.config import ConfigError
from einplan.models.train_config import parse_train_config
from einplan.runtime.executor import Executor

EIGHT_LAYERS = {  # enough layers for every:K to differ from layers
    "name": "eight-layers",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 80,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": True,
    "max_batch": 4,
}
POLICIES = ("layers", "every:2", "every:3", "selective")
DIMS = {"batch": 2, "seq": 96}


def grad_plan(config, policy: str, dtype: str = "f64"):
    ctx = PassContext(typical_dims=dict(DIMS))
    return compile_model(config, entries=("grad",), compute_dtype=dtype, ctx=ctx, checkpoint=policy)


def run_grads(config, policy: str, dtype: str = "f64", seq: int = DIMS["seq"]):
    """The grad entry's outputs on fixed tokens, with weights drawn from one seed."""
    graph = grad_plan(config, policy, dtype).entry("grad")
    vocab = config["vocab_size"] if isinstance(config, dict) else 256
    ids = np.random.default_rng(3).integers(0, vocab, (DIMS["batch"], seq))
    return Executor(graph, random_weights(graph, seed=1, std=0.2)).run(
        loss_feed(ids, shifted_targets(ids))
    )


@pytest.fixture(scope="module")
def reference():
    return run_grads(EIGHT_LAYERS, "none")


@pytest.mark.parametrize("policy", POLICIES)
def test_checkpointed_gradients_are_bit_identical(reference, policy):
    got = run_grads(EIGHT_LAYERS, policy)
    assert set(got) == set(reference)
    for k, want in reference.items():
        assert want.dtype == np.float64
        assert np.array_equal(got[k], want), f"{policy}: {k} differs"


def test_moe_gradients_are_bit_identical_with_layers():
    want, got = (run_grads("tiny-moe", p, seq=32) for p in ("none", "layers"))
    for k in want:
        assert np.array_equal(got[k], want[k]), k


def test_float32_gradients_stay_float32_and_identical():
    want, got = (run_grads(EIGHT_LAYERS, p, "f32") for p in ("none", "layers"))
    for k in want:
        assert got[k].dtype == np.float32 and np.array_equal(got[k], want[k]), k


def arena(policy: str) -> int:
    return grad_plan(EIGHT_LAYERS, policy, "f32").entry("grad").meta["memory"]["arena_bytes"]


def test_peak_estimate_falls_with_checkpointing():
    none, layers, every2, every4 = (arena(p) for p in ("none", "layers", "every:2", "every:4"))
    assert layers < every2 < every4 < none
    assert layers < 0.5 * none
    assert arena("selective") < none


@pytest.mark.parametrize(("policy", "seq"), [("none", 384), ("layers", 384), ("none", 640)])
def test_estimate_tracks_the_measured_peak(policy, seq):
    """The memory pass's activations (arena, kernels' scratch) and outputs at the run's sizes
    against the peak of every NumPy allocation of the run (tracemalloc; weights bound before
    it): the estimate is 85-100 % of it (the rest: temporaries of preparing and running).
    Flash attention's tiles and its reverse step's temporaries are in the estimate."""
    config = {**EIGHT_LAYERS, "max_position_embeddings": 1024}
    dims = {"batch": 4, "seq": seq}  # flash attention in 3 (384) or 5 (640) query blocks
    graph = compile_model(
        config, entries=("grad",), ctx=PassContext(typical_dims=dims), checkpoint=policy
    ).entry("grad")
    assert any(n.op is Op.FLASH_ATTENTION_GRAD for n in graph.nodes)
    ids = np.random.default_rng(0).integers(0, 64, (dims["batch"], dims["seq"]))
    feed = loss_feed(ids, shifted_targets(ids))
    # a first executor compiles (or loads) the numba backend's kernels: not the run's memory
    Executor(graph, random_weights(graph, seed=1)).run(feed)
    ex = Executor(graph, random_weights(graph, seed=1))
    tracemalloc.start()
    try:
        ex.run(feed)
        measured = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    est = estimate_memory(graph, dims)
    parts = ("arena_bytes", "scratch_bytes", "transient_bytes", "outputs_bytes")
    ratio = sum(est[k] for k in parts) / measured
    assert ex.activation_bytes() == est["arena_bytes"] + est["scratch_bytes"]
    assert 0.85 <= ratio <= 1.0, f"{policy}: estimate / measured = {ratio:.2f}"


def test_recomputation_is_tagged_and_stays_in_the_backward_pass():
    plan = grad_plan(EIGHT_LAYERS, "layers")
    g = plan.entry("grad")
    recomputed = [n for n in g.nodes if Tag.RECOMPUTE in n.tags]
    assert recomputed and all(Tag.REVERSE in n.tags for n in recomputed)
    assert {n.op for n in recomputed} >= {Op.AFTER, Op.EINSUM, Op.RMS_NORM, Op.FLASH_ATTENTION}
    assert g.meta["checkpoint"]["policy"] == "layers"
    assert "{recompute,reverse}" in str(g)
    level = {i: a.level for i, a in g.annotations.items()}
    loss = g.outputs["loss"]
    assert min(level[n.id] for n in recomputed) > level[loss]
    assert not any(
        Tag.RECOMPUTE in n.tags for n in grad_plan(EIGHT_LAYERS, "none").entry("grad").nodes
    )


def test_printed_graph_after_the_checkpoint_pass_matches_golden():
    dumps = {}
    ctx = PassContext(dump_after=("checkpoint",), on_dump=lambda p, g: dumps.setdefault(g.name, g))
    compile_model(ONE_LAYER, entries=("grad",), ctx=ctx, checkpoint="layers")
    check_golden("one_layer_checkpoint.txt", str(dumps["grad"]))


@pytest.mark.parametrize("text", ["every:0", "every:x", "every", "layer", "", "all"])
def test_bad_policies_are_named_errors(text):
    with pytest.raises(CheckpointError, match="checkpoint policy"):
        parse_checkpoint(text)
    with pytest.raises(CheckpointError):
        compile_model(ONE_LAYER, entries=("grad",), checkpoint=text)
    with pytest.raises(ConfigError, match="train key 'checkpoint'"):
        parse_train_config({"checkpoint": text})


def test_train_section_and_cli_take_the_policy(tmp_path, capsys):
    plan = compile_model(
        {**ONE_LAYER, "train": {"checkpoint": "every:2"}}, entries=("train_step", "loss")
    )
    assert plan.meta["train"]["checkpoint"] == "every:2"
    assert plan.entry("train_step").meta["checkpoint"]["policy"] == "every:2"
    out = str(tmp_path / "x.plan")
    assert main(["compile", "tiny", "--train", "--checkpoint", "every:-1", "-o", out]) == 2
    assert "every:K" in capsys.readouterr().err
    assert main(["-q", "compile", "tiny", "--train", "--checkpoint", "layers", "-o", out]) == 0
    assert load_plan(out).meta["train"]["checkpoint"] == "layers"


def test_train_refuses_to_change_the_compiled_policy(tmp_path):
    config = {**ONE_LAYER, "vocab_size": 256}
    plan = compile_model(config, entries=("train_step", "loss", "forward", "prefill", "decode"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("JULIET: a short corpus for a test. " * 40)
    with pytest.raises(EinplanError, match="checkpoint are compiled into the plan"):
        train(
            plan, data=corpus, out=tmp_path / "run", steps=1, checkpoint="layers", tokenizer="bytes"
        )
