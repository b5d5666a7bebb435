"""LoRA: the graph rewrite and its contraction order, an untrained adapter changing nothing,
the PEFT folder layout both ways, merging, and clear errors for adapters that do not fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FIXTURES

import einplan
from einplan.cli import main
from einplan.compiler.lora_spec import LoraError, parse_lora
from einplan.compiler.ops import Op, count_flops
from einplan.compiler.symbolic import evaluate
from einplan.formats.peft import PEFT_PREFIX, lora_params, save_adapter
from einplan.formats.weights import open_checkpoint, read_safetensors_index
from einplan.runtime.generate import GenerationRequest, Generator

CASE = FIXTURES / "llama_gqa_tied"
ALL = "r=4,alpha=8,targets=q,k,v,o,gate,up,down,lm_head"


def _ids(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape)


def _trained(graph, seed=1):
    """A and B as if trained: random, so the adapter changes the logits."""
    rng = np.random.default_rng(seed)
    return {
        k: rng.standard_normal(s).astype(np.float32) * 0.05 for k, s in lora_params(graph).items()
    }


def _checkpoint():
    return {k: np.asarray(a) for k, (a, _) in open_checkpoint(CASE).items()}


def test_lora_options_parse():
    cfg = parse_lora("r=8,alpha=16,targets=q,k,v,o,dropout=0.05")
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.scale) == (8, 16.0, 0.05, 2.0)
    assert cfg.targets == ("attn_q", "attn_k", "attn_v", "attn_o")
    assert parse_lora({"targets": ["q_proj", "lm_head"]}).targets == ("attn_q", "output")


def test_graph_adds_a_low_rank_branch_ordered_x_times_a_first():
    plan = einplan.compile_model(CASE, lora="r=4,alpha=8,targets=q,v")
    g = plan.entry("forward")
    nodes = g.by_id()
    names = {n.name for n in g.params()}
    assert {"attn_q-0.lora_a", "attn_q-0.lora_b", "attn_v-1.lora_b"} <= names
    assert "attn_k-0.lora_a" not in names
    parts = [n for n in g.nodes if n.name == "attn_q-0.lora.part0"]
    assert len(parts) == 1 and parts[0].attrs["spec"] == "bsi,ri->bsr"
    assert nodes[parts[0].inputs[1]].name == "attn_q-0.lora_a"
    assert any(n.name == "attn_q+attn_k+attn_v-0" for n in g.nodes)  # base still packed
    # the order the planner chose against x . (A . B), at batch 1 x 256 tokens
    dims = {"batch": 1, "seq": 256}

    def flops(n):
        return evaluate(
            count_flops(n.op, [nodes[i].shape for i in n.inputs], n.shape, n.attrs), dims
        )

    chosen = sum(flops(n) for n in g.nodes if n.name in ("attn_q-0.lora.part0", "attn_q-0.lora"))
    x, a, b = ("batch", "seq", 64), (4, 64), (64, 4)
    other = evaluate(count_flops(Op.EINSUM, [a, b], (64, 64), {"spec": "ri,or->oi"}), dims)
    other += evaluate(count_flops(Op.EINSUM, [x, (64, 64)], x, {"spec": "bsi,oi->bso"}), dims)
    assert chosen == 2 * 256 * 4 * (64 + 64)
    # ~ in out / (r (in + out)): 8.1 here, 37 for SmolLM2's q_proj (576 x 576, r = 8)
    assert other / chosen > 8


def test_untrained_adapter_changes_no_logit():
    base = einplan.compile_model(CASE)
    lora = einplan.compile_model(CASE, lora=ALL)
    ids = _ids((2, 20))
    np.testing.assert_array_equal(
        einplan.Session(lora, CASE).forward(ids), einplan.Session(base, CASE).forward(ids)
    )
    prompt = [_ids(9).tolist()]
    runs = [
        Generator(p, einplan.Session(p, CASE).weights).generate(GenerationRequest(prompt, 5))
        for p in (base, lora)
    ]
    assert runs[0].tokens == runs[1].tokens


def test_untrained_adapter_on_quantised_weights_changes_no_logit():
    quant = {"scheme": "w4a16", "group_size": 32}
    base = einplan.compile_model(CASE, quant=quant)
    lora = einplan.compile_model(CASE, quant=quant, lora=ALL)
    ids = _ids((1, 16))
    np.testing.assert_array_equal(
        einplan.Session(lora, CASE).forward(ids), einplan.Session(base, CASE).forward(ids)
    )


def test_peft_layout_round_trip_and_merge(tmp_path):
    plan = einplan.compile_model(CASE, lora=ALL)
    graph = plan.entry()
    trained = _trained(graph)
    folder = save_adapter(tmp_path / "adapter", trained, parse_lora(ALL), _checkpoint(), "fixture")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (config["r"], config["lora_alpha"]) == (4, 8.0)
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    )
    stored = read_safetensors_index(folder / "adapter_model.safetensors")
    name = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    assert stored[name][0].shape == (4, 64)
    assert stored["base_model.model.lm_head.lora_B.weight"][0].shape == (256, 4)
    for k, v in trained.items():
        np.testing.assert_array_equal(stored[PEFT_PREFIX + k][0], v)

    ids = _ids((2, 18))
    adapted = einplan.Session(plan, CASE, adapter=folder).forward(ids)
    assert (
        np.abs(adapted - einplan.Session(einplan.compile_model(CASE), CASE).forward(ids)).max()
        > 1e-3
    )
    out = tmp_path / "merged"
    assert main(["lora", "merge", str(folder), "--weights", str(CASE), "-o", str(out)]) == 0
    merged_cfg = json.loads((out / "config.json").read_text())
    assert merged_cfg["tie_word_embeddings"] is False  # the adapted head is its own weight now
    merged = einplan.Session(einplan.compile_model(out), out).forward(ids)
    np.testing.assert_allclose(merged, adapted, rtol=0, atol=1e-5)


def test_cli_compile_from_an_adapter_folder(tmp_path):
    plan = einplan.compile_model(CASE, lora="r=2,alpha=4,targets=q_proj,down")
    folder = save_adapter(
        tmp_path / "a",
        _trained(plan.entry()),
        parse_lora("r=2,alpha=4,targets=q,down"),
        _checkpoint(),
    )
    out = tmp_path / "p.plan"
    assert main(["compile", str(CASE / "config.json"), "--lora", str(folder), "-o", str(out)]) == 0
    meta = einplan.load_plan(out).meta["lora"]
    assert (meta["r"], meta["alpha"], sorted(meta["targets"])) == (2, 4.0, ["down", "q"])
    einplan.Session(einplan.load_plan(out), CASE, adapter=folder)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("r=4,targets=q,qq", "LoRA target 'qq' names no projection"),
        ("r=65,targets=q", "rank r=65 is larger than attn_q-0's weight allows"),
        ("r=0", "rank r must be at least 1"),
        ("r=4,rank=3", "unknown key"),
        ("r=4,dropout=1.5", "dropout must lie in"),
        ("r=four", "LoRA r must be a int"),
    ],
)
def test_bad_lora_options_are_refused(spec, message):
    with pytest.raises(LoraError, match=message):
        einplan.compile_model(CASE, lora=spec)


def test_adapters_that_do_not_fit_are_refused(tmp_path):
    plan = einplan.compile_model(CASE, lora="r=4,alpha=8,targets=q,v")
    folder = save_adapter(
        tmp_path / "a", _trained(plan.entry()), parse_lora("r=4,alpha=8,targets=q,v"), _checkpoint()
    )
    tiny = einplan.compile_model("tiny", lora="r=4,alpha=8,targets=q,v")
    with pytest.raises(LoraError, match="made for another base model"):
        einplan.Session(tiny, random_seed=0, adapter=folder)
    other = _checkpoint()
    other["model.norm.weight"] = other["model.norm.weight"] * 2
    with pytest.raises(LoraError, match="made for other base weights"):
        einplan.Session(plan, other, adapter=folder)
    with pytest.raises(LoraError, match=r"does not match the plan's LoRA \(r 4 vs 2"):
        einplan.Session(
            einplan.compile_model(CASE, lora="r=2,alpha=8,targets=q,v"), CASE, adapter=folder
        )
    with pytest.raises(LoraError, match="this plan has no LoRA params"):
        einplan.Session(einplan.compile_model(CASE), CASE, adapter=folder)
    with pytest.raises(LoraError, match="not a PEFT adapter folder"):
        einplan.Session(plan, CASE, adapter=tmp_path)
