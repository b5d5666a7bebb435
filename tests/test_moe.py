"""Mixture of experts: configs, routing nodes, sparse expert work, and clear errors (the
parity, gradient and generation tests run the MoE fixtures with every other case)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import FIXTURES, MOE_CASES
from safetensors.numpy import load_file, save_file

import einplan
from einplan.compiler.ops import Op, count_flops
from einplan.compiler.symbolic import evaluate
from einplan.formats.weights import WeightsError, load_weights
from einplan.models.config import ConfigError, load_config, parse_config
from einplan.runtime import moe as moe_kernels
from einplan.runtime.executor import Executor

MIXTRAL = FIXTURES / "mixtral_moe"


def _raw(case="mixtral_moe"):
    return json.loads((FIXTURES / case / "config.json").read_text())


def _forward(case, workers=0):
    folder = FIXTURES / case
    plan = einplan.compile_model(folder / "config.json")
    graph = plan.entry("forward")
    ids = load_file(folder / "reference.safetensors")["input_ids"]
    feed = {"tokens": ids, "positions": np.broadcast_to(np.arange(ids.shape[1]), ids.shape)}
    ex = Executor(graph, load_weights(graph, folder), workers)
    return graph, ex.run(feed)["logits"], ids


def test_configs_normalise_both_layouts():
    mix = load_config(MIXTRAL)
    assert (mix.num_experts, mix.num_experts_per_tok, mix.norm_topk_prob) == (4, 2, True)
    assert mix.moe_intermediate_size == 48 and mix.shared_expert_intermediate_size == 0
    assert mix.output_router_logits and mix.router_aux_loss_coef == 0.05
    qwen = load_config(FIXTURES / "qwen2_moe_shared")
    assert (qwen.num_experts, qwen.num_experts_per_tok, qwen.norm_topk_prob) == (6, 3, False)
    assert [qwen.is_moe_layer(i) for i in range(3)] == [True, False, True]
    assert qwen.qkv_bias and qwen.shared_expert_intermediate_size == 96


def test_experts_per_tok_above_experts_is_refused():
    with pytest.raises(ConfigError, match=r"num_experts_per_tok \(5\).*num_local_experts \(4\)"):
        parse_config({**_raw(), "num_experts_per_tok": 5})


def test_unsupported_model_type_named_not_its_keys():
    raw = {**_raw(), "model_type": "deepseek_v3", "n_routed_experts": 64}
    with pytest.raises(ConfigError, match="model_type 'deepseek_v3' is not supported"):
        parse_config(raw)


def test_moe_keys_in_a_dense_config_are_refused():
    raw = json.loads((FIXTURES / "llama_mha_untied" / "config.json").read_text())
    with pytest.raises(ConfigError, match="num_local_experts belong to a mixture-of-experts"):
        parse_config({**raw, "num_local_experts": 4})


def _case_without(tmp_path, drop=(), change=None):
    tensors = load_file(MIXTRAL / "model.safetensors")
    for k in drop:
        del tensors[k]
    tensors.update(change or {})
    shutil.copy(MIXTRAL / "config.json", tmp_path / "config.json")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_missing_expert_tensors_are_listed(tmp_path):
    gone = [f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight" for e in (0, 3)]
    folder = _case_without(tmp_path, drop=gone)
    plan = einplan.compile_model(folder / "config.json")
    with pytest.raises(WeightsError) as err:
        load_weights(plan.entry(), folder)
    assert all(k in str(err.value) for k in gone), err.value


def test_expert_of_the_wrong_shape_is_named(tmp_path):
    key = "model.layers.0.block_sparse_moe.experts.2.w1.weight"
    folder = _case_without(tmp_path, change={key: np.zeros((40, 64), np.float32)})
    plan = einplan.compile_model(folder / "config.json")
    with pytest.raises(WeightsError, match=rf"{key}: checkpoint \[40, 64\], plan \[48, 64\]"):
        load_weights(plan.entry(), folder)


def test_routing_is_graph_nodes_and_expert_flops_follow_top_k():
    plan = einplan.compile_model(MIXTRAL / "config.json")
    g = plan.entry("forward")
    ops = [n.op for n in g.nodes]
    assert ops.count(Op.MOE_TOPK) == 2 and ops.count(Op.MOE_EXPERT) == 8
    nodes, dims = g.by_id(), {"batch": 1, "seq": 100}
    experts = [n for n in g.nodes if n.op is Op.MOE_EXPERT]
    flops = sum(
        evaluate(count_flops(n.op, [nodes[i].shape for i in n.inputs], n.shape, n.attrs), dims)
        for n in experts
    )
    dense = 2 * 4 * 100 * 3 * 2 * 64 * 48  # layers x experts x tokens x 3 products x 2 f d
    assert flops == dense * 2 // 4  # top-2 of 4


def test_experts_compute_only_routed_tokens():
    moe_kernels.LOAD.clear()
    _, _, ids = _forward("mixtral_moe")
    tokens = ids.size
    for layer in (0, 1):
        load = [moe_kernels.LOAD[f"moe_expert-{layer}.{e}"] for e in range(4)]
        assert sum(load) == 2 * tokens  # top-2: each token reaches two experts
        assert max(load) < tokens  # no expert runs every token


def test_thread_pool_gives_the_same_logits():
    _, one, _ = _forward("qwen2_moe_shared")
    _, pooled, _ = _forward("qwen2_moe_shared", workers=2)
    np.testing.assert_array_equal(one, pooled)


def test_top_k_ties_go_to_the_lower_expert():
    p = np.array([[0.2, 0.3, 0.3, 0.2], [0.25, 0.25, 0.25, 0.25]])
    assert moe_kernels.topk_indices(p, 2).tolist() == [[1, 2], [0, 1]]


@pytest.mark.parametrize("case", MOE_CASES)
def test_fixture_routing_is_uneven(case):
    """The fixtures' routers are far from uniform: the busiest expert gets at least twice the
    tokens of the idlest (the fixture script prints the top-k boundary gaps: 1.4e-5 Mixtral)."""
    moe_kernels.LOAD.clear()
    _forward(case)
    loads = np.array(list(moe_kernels.LOAD.values()), dtype=float)
    assert loads.max() >= 2 * loads.min()


def test_graph_picture_puts_a_layers_experts_side_by_side():
    from einplan.report.dot import graph_to_dot

    g = einplan.compile_model(MIXTRAL / "config.json").entry("forward")
    source = graph_to_dot(g, g.nodes).source
    assert source.count("subgraph experts") == 2 and source.count("rank=same") == 2
    assert "cluster_layer0" in source and "#c8eef0" in source  # the experts' colour


def test_profile_holds_per_expert_load_and_report_groups_by_expert(tmp_path):
    from einplan.report.cost import cost_report
    from einplan.report.profile import expert_load
    from einplan.report.trace import read_trace, write_trace
    from einplan.runtime.recorder import Recorder

    folder = MIXTRAL
    graph = einplan.compile_model(folder / "config.json").entry("forward")
    ids = load_file(folder / "reference.safetensors")["input_ids"]
    feed = {"tokens": ids, "positions": np.broadcast_to(np.arange(ids.shape[1]), ids.shape)}
    rec = Recorder(debug=0)
    ex = Executor(graph, load_weights(graph, folder))
    for _ in range(2):
        ex.run(feed, rec)
    back = read_trace(write_trace(rec, tmp_path / "trace.json"))
    assert back.loads == rec.loads and len(rec.loads) == 2 * 8
    load = expert_load(back)
    assert sorted(load) == [("forward", 0), ("forward", 1)]
    assert all(sum(per.values()) == 2 * ids.size for per in load.values())
    report = cost_report(back, "expert", warmup=0)
    assert [r["expert"] for r in report.rows][:2] == ["layer 0 expert 0", "layer 0 expert 1"]
    assert sum(r["tokens"] for r in report.rows) == 2 * 2 * ids.size


def test_router_entropy_is_recorded():
    moe_kernels.ROUTER_ENTROPY.clear()
    _forward("mixtral_moe")
    h = moe_kernels.router_entropy()
    assert 0 < h < np.log(4)  # far from uniform routing: below log E


def test_tiny_moe_trains_with_router_entropy_and_aux_loss_in_the_log(tmp_path):
    """A micro Mixtral trains through einplan.train: the loss (with the load-balancing term)
    falls, the log carries the routers' entropy, and a checkpoint reloads as a Mixtral."""
    from einplan.api import TRAIN_ENTRIES
    from einplan.apps.training_run import RunOptions, TrainingRun

    corpus = FIXTURES.parent.parent / "einplan" / "data" / "shakespeare_sample.txt"
    train = {"seq_len": 16, "micro_batch": 4, "accumulation": 1, "lr": 3e-3, "min_lr": 3e-4}
    train |= {"warmup_steps": 2, "steps": 12, "log_every": 4, "checkpoint_every": 12}
    train |= {"sample_every": 0, "eval_batches": 1, "tokenizer": "bytes"}
    raw = {**_raw(), "max_position_embeddings": 64, "max_batch": 8, "train": train}
    plan = einplan.compile_model(raw, entries=TRAIN_ENTRIES)
    run = TrainingRun(plan, RunOptions(corpus, tmp_path / "run"))
    stats = run.run()
    assert stats[-1].loss < stats[0].loss
    records = run.metrics.records
    assert all(0 < r["router_entropy"] < np.log(4) for r in records)
    assert "router_entropy" in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    ckpt = json.loads((run.last_checkpoint / "config.json").read_text())
    assert ckpt["model_type"] == "mixtral" and ckpt["num_local_experts"] == 4


@pytest.mark.parametrize("workers", [0, 2])
def test_reverse_steps_reuse_the_forward_activations(workers, kernels, monkeypatch):
    """In a training graph the forward expert steps keep their activations (attr keep) and the
    reverse steps multiply nothing again: the forward steps compute the activations once each,
    on both kernels backends; sequential and pooled runs agree."""
    folder = MIXTRAL
    graph = einplan.compile_model(folder / "config.json", entries=("grad",)).entry("grad")
    assert sum(1 for n in graph.nodes if n.op is Op.MOE_EXPERT and n.attrs.get("keep")) == 8
    calls = []
    real = moe_kernels._activations
    monkeypatch.setattr(moe_kernels, "_activations", lambda *a: calls.append(1) or real(*a))
    ids = load_file(folder / "reference.safetensors")["input_ids"]
    targets = np.concatenate([ids[:, 1:], np.full((len(ids), 1), -100)], axis=1)
    feed = {"tokens": ids, "positions": np.broadcast_to(np.arange(ids.shape[1]), ids.shape)}
    feed |= {"targets": targets, "loss_grad": np.array(1.0, np.float32)}
    out = Executor(graph, load_weights(graph, folder), workers, kernels).run(feed)
    assert len(calls) == 8  # once per expert and layer
    key = "grad.model.layers.1.block_sparse_moe.experts.2.w3.weight"
    assert np.isfinite(out[key]).all() and np.abs(out[key]).max() > 0


def test_quantised_plans_keep_the_routers_float():
    g = einplan.compile_model(MIXTRAL / "config.json", quant="w8a16").entry("forward")
    by_name = {n.name: n for n in g.nodes}
    assert (
        by_name["moe_router-0.w"].dtype == "f32" and "quant" not in by_name["moe_router-0.w"].attrs
    )
    assert any(n.op is Op.DEQUANTIZE and n.name.startswith("attn_o-0") for n in g.nodes)


def test_reverse_steps_without_kept_activations_give_the_same_gradients():
    folder = MIXTRAL
    graph = einplan.compile_model(folder / "config.json", entries=("grad",)).entry("grad")
    bare = graph.replace_nodes(
        [n.with_(attrs={k: v for k, v in n.attrs.items() if k != "keep"}) for n in graph.nodes]
    )
    ids = load_file(folder / "reference.safetensors")["input_ids"]
    targets = np.concatenate([ids[:, 1:], np.full((len(ids), 1), -100)], axis=1)
    feed = {"tokens": ids, "positions": np.broadcast_to(np.arange(ids.shape[1]), ids.shape)}
    feed |= {"targets": targets, "loss_grad": np.array(1.0, np.float32)}
    weights = load_weights(graph, folder)
    kept = Executor(graph, weights).run(feed)
    moe_kernels.STASH.clear()
    again = Executor(bare, weights).run(feed)
    for k in kept:
        np.testing.assert_allclose(again[k], kept[k], rtol=1e-5, atol=1e-7)
