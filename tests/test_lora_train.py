"""Training LoRA: gradients of A and B against finite differences, only A and B trained (and
given optimizer state), a trained adapter lowering the loss, checkpoints in PEFT layout that
merge, and a quantised base (QLoRA) training too."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FIXTURES
from test_gradients import shifted_targets

import einplan
from einplan.api import TRAIN_ENTRIES
from einplan.apps.training_run import RunOptions, TrainingRun
from einplan.cli import main
from einplan.commands.eval import BUNDLED_TEXT
from einplan.errors import EinplanError
from einplan.formats.checkpoint import load_checkpoint
from einplan.formats.peft import PEFT_PREFIX, lora_params
from einplan.formats.weights import load_weights
from einplan.models.train_config import TrainConfig
from einplan.runtime.executor import Executor

CASE = FIXTURES / "llama_gqa_tied"
LORA = "r=4,alpha=8,targets=q,k,v,o,gate,up,down,lm_head"
TRAIN = TrainConfig(
    seq_len=32,
    micro_batch=4,
    lr=1e-2,
    min_lr=1e-3,
    warmup_steps=2,
    steps=24,
    log_every=4,
    checkpoint_every=12,
    sample_every=0,
    eval_batches=2,
    weight_decay=0.0,
    tokenizer="bytes",
)


def _feed(ids):
    return {
        "tokens": ids,
        "positions": np.broadcast_to(np.arange(ids.shape[1]), ids.shape),
        "targets": shifted_targets(ids),
        "loss_grad": np.array(1.0),
    }


def test_lora_gradients_match_finite_differences():
    plan = einplan.compile_model(CASE, compute_dtype="f64", entries=("grad",), lora=LORA)
    graph = plan.entry("grad")
    weights = load_weights(graph, CASE, tied=True)
    rng = np.random.default_rng(0)
    for key, shape in lora_params(graph).items():  # B non-zero, so that A gets a gradient
        weights[key] = rng.standard_normal(shape) * 0.1
    ids = np.random.default_rng(1).integers(0, 256, (2, 12))
    out = Executor(graph, weights).run(_feed(ids))
    grads = {k.removeprefix("grad."): v for k, v in out.items() if k.startswith("grad.")}
    assert set(grads) == set(lora_params(graph))  # the base is frozen: no gradient
    checks = [
        ("model.layers.0.self_attn.q_proj.lora_A.weight", (1, 3)),
        ("model.layers.1.mlp.down_proj.lora_B.weight", (5, 2)),
        ("lm_head.lora_A.weight", (0, 7)),
        ("model.layers.0.self_attn.v_proj.lora_B.weight", (9, 0)),
    ]
    eps = 1e-6
    for key, idx in checks:
        losses = []
        for sign in (1, -1):
            moved = {**weights, key: weights[key].copy()}
            moved[key][idx] += sign * eps
            losses.append(float(Executor(graph, moved).run(_feed(ids))["loss"]))
        numeric = (losses[0] - losses[1]) / (2 * eps)
        assert abs(grads[key][idx] - numeric) < 1e-6 * max(1.0, abs(numeric)), key


def _run(plan, out, init, steps=None, resume=False):
    options = RunOptions(BUNDLED_TEXT, out, steps=steps, resume=resume, init_weights=init)
    return TrainingRun(plan, options)


@pytest.fixture(scope="module")
def lora_plan():
    return einplan.compile_model(CASE, entries=TRAIN_ENTRIES, train=TRAIN, lora=LORA)


def test_trained_lora_lowers_the_loss_and_merges(lora_plan, tmp_path):
    run = _run(lora_plan, tmp_path / "run", str(CASE))
    base = {k: np.array(v) for k, v in run.trainer.weights.items() if "lora" not in k}
    first = run.trainer.validation_loss(run.val_batches)
    run.run()
    last = run.trainer.validation_loss(run.val_batches)
    assert last < first - 0.3, (first, last)
    for k, v in base.items():  # the base stayed as it was
        assert np.array_equal(run.trainer.weights[k], v), k
    state = run.trainer.optimizer_state()
    assert {k.split(".", 2)[2] for k in state} == set(lora_params(lora_plan.entry("train_step")))
    latest = load_checkpoint(tmp_path / "run" / "checkpoints").path
    saved = load_checkpoint(tmp_path / "run" / "checkpoints").tensors("adapter_model.safetensors")
    assert {k.removeprefix(PEFT_PREFIX) for k in saved} == set(
        lora_params(lora_plan.entry("train_step"))
    )
    assert not (latest / "model.safetensors").exists() and not (latest / "config.json").exists()
    merged = tmp_path / "merged"
    assert main(["lora", "merge", str(latest), "--weights", str(CASE), "-o", str(merged)]) == 0
    ids = np.random.default_rng(3).integers(0, 256, (1, 20))
    adapted = einplan.Session(lora_plan, CASE, adapter=latest).forward(ids)
    folded = einplan.Session(einplan.compile_model(merged), merged).forward(ids)
    np.testing.assert_allclose(folded, adapted, rtol=0, atol=1e-5)


def test_lora_runs_resume_on_their_base_and_need_it(lora_plan, tmp_path):
    straight = _run(lora_plan, tmp_path / "a", str(CASE)).run(6)
    _run(lora_plan, tmp_path / "b", str(CASE)).run(3)
    with pytest.raises(EinplanError, match="LoRA trains adapters on a pretrained base"):
        _run(lora_plan, tmp_path / "b", None, resume=True)
    tail = _run(lora_plan, tmp_path / "b", str(CASE), resume=True).run(6)
    assert [s.loss for s in straight[3:]] == [s.loss for s in tail]


def test_lora_trains_on_a_quantised_base(tmp_path):
    quant = {"scheme": "w4a16", "group_size": 32}
    plan = einplan.compile_model(CASE, entries=TRAIN_ENTRIES, train=TRAIN, lora=LORA, quant=quant)
    run = _run(plan, tmp_path / "q", str(CASE))
    packed = [v for k, v in run.trainer.weights.items() if k.endswith("proj.weight")]
    assert packed and all(v.dtype == np.uint8 for v in packed)
    first = run.trainer.validation_loss(run.val_batches)
    run.run(12)
    assert run.trainer.validation_loss(run.val_batches) < first - 0.2


def test_lora_dropout_masks_the_branch_input_in_training_only():
    """Training entries drop out x on the LoRA branch (seeded per step: the same seed gives the
    same loss, another seed another); inference entries do not; the mask's gradient is exact."""
    spec = "r=4,alpha=8,targets=q,v,dropout=0.25"
    plan = einplan.compile_model(CASE, compute_dtype="f64", entries=("grad", "forward"), lora=spec)
    graph = plan.entry("grad")
    # forward: q and v of 2 layers; reverse: layer 1's only (layer 0's input needs no gradient)
    assert sum(n.op.value == "dropout" for n in graph.nodes) == 2 * 2 + 2
    assert all(n.op.value != "dropout" for n in plan.entry("forward").nodes)
    weights = load_weights(graph, CASE, tied=True)
    rng = np.random.default_rng(0)
    for key, shape in lora_params(graph).items():
        weights[key] = rng.standard_normal(shape) * 0.1
    ids = np.random.default_rng(1).integers(0, 256, (2, 12))
    run = Executor(graph, weights)

    def loss(seed, w=weights):
        return float(Executor(graph, w).run({**_feed(ids), "dropout_seed": seed})["loss"])

    assert loss(1) == loss(1) != loss(2)
    key, idx, eps = "model.layers.0.self_attn.q_proj.lora_A.weight", (2, 5), 1e-6
    grad = run.run({**_feed(ids), "dropout_seed": 7})[f"grad.{key}"][idx]
    moved = [{**weights, key: weights[key].copy()} for _ in (1, -1)]
    moved[0][key][idx] += eps
    moved[1][key][idx] -= eps
    numeric = (loss(7, moved[0]) - loss(7, moved[1])) / (2 * eps)
    assert abs(grad - numeric) < 1e-6 * max(1.0, abs(numeric))


def test_a_lora_run_with_dropout_trains_and_resumes_exactly(tmp_path):
    spec = "r=4,alpha=8,targets=q,v,dropout=0.1"
    plan = einplan.compile_model(CASE, entries=TRAIN_ENTRIES, train=TRAIN, lora=spec)
    straight = _run(plan, tmp_path / "a", str(CASE)).run(4)
    _run(plan, tmp_path / "b", str(CASE)).run(2)
    tail = _run(plan, tmp_path / "b", str(CASE), resume=True).run(4)
    assert [s.loss for s in straight[2:]] == [s.loss for s in tail]


def test_a_lora_checkpoint_refuses_other_base_weights_and_foreign_features(
    lora_plan, tmp_path, capsys
):
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    _run(lora_plan, tmp_path / "run", str(CASE)).run(3)
    latest = load_checkpoint(tmp_path / "run" / "checkpoints").path
    other = tmp_path / "other"
    shutil.copytree(CASE, other)
    tensors = load_file(other / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.5
    save_file(tensors, str(other / "model.safetensors"))
    with pytest.raises(EinplanError, match=f"adapter {latest} was made for other base weights"):
        einplan.Session(lora_plan, other, adapter=latest)
    argv = ["lora", "merge", str(latest), "--weights", str(other), "-o", str(tmp_path / "m")]
    assert main(argv) == 2 and "other base weights" in capsys.readouterr().err
    with pytest.raises(EinplanError, match="LoRA run's checkpoint holds an adapter"):
        einplan.Session(lora_plan, latest)
    with pytest.raises(EinplanError, match="trained on other base weights"):
        _run(lora_plan, tmp_path / "run", str(other), resume=True)
    adapter = tmp_path / "adapter"
    shutil.copytree(latest, adapter)
    (adapter / "trainer.json").unlink()  # a plain PEFT folder now
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(EinplanError, match="features einplan does not support: use_dora=True"):
        einplan.Session(lora_plan, CASE, adapter=adapter)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    extra = load_file(adapter / "adapter_model.safetensors")
    extra[PEFT_PREFIX + "model.layers.0.mlp.up_proj.lora_magnitude_vector"] = np.ones(4, np.float32)
    save_file(extra, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(EinplanError, match="match none of the plan's LoRA targets: .*magnitude"):
        einplan.Session(lora_plan, CASE, adapter=adapter)
