"""Training at tiny scale: exact resume, gradient accumulation, skipped non-finite steps, the
optimizer's arithmetic, checkpoints (atomic, verified, loadable as a model) and the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import einplan
from einplan.api import TRAIN_ENTRIES
from einplan.apps.training_run import RunOptions, TrainingRun
from einplan.cli import main
from einplan.formats.checkpoint import CheckpointError, load_checkpoint
from einplan.formats.weights import random_weights
from einplan.models.config import ConfigError
from einplan.models.train_config import TrainConfig, load_train_config, parse_train_config
from einplan.runtime.lr_schedule import learning_rate
from einplan.runtime.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "einplan" / "data" / "shakespeare_sample.txt"
TRAIN = {
    "seq_len": 16,
    "micro_batch": 2,
    "accumulation": 2,
    "lr": 3e-3,
    "min_lr": 3e-4,
    "warmup_steps": 2,
    "steps": 8,
    "log_every": 2,
    "checkpoint_every": 3,
    "sample_every": 0,
    "eval_batches": 1,
    "tokenizer": "bytes",
}
MICRO = {
    "name": "micro",
    "vocab_size": 256,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": True,
    "max_batch": 8,
    "train": TRAIN,
}


@pytest.fixture(scope="module")
def plan():
    return einplan.compile_model(MICRO, entries=TRAIN_ENTRIES)


def windows(batch, seed=0, seq=16):
    ids = np.frombuffer(CORPUS.read_bytes()[:20000], np.uint8).astype(np.int64)
    starts = np.random.default_rng(seed).integers(0, len(ids) - seq - 1, batch)
    return np.stack([ids[s : s + seq + 1] for s in starts])


def new_run(plan, out, steps=None, resume=False, **overrides):
    options = RunOptions(CORPUS, out, steps=steps, resume=resume, overrides=overrides)
    return TrainingRun(plan, options)


def test_resume_gives_bit_identical_losses(plan, tmp_path):
    straight = new_run(plan, tmp_path / "a").run(7)
    new_run(plan, tmp_path / "b").run(3)
    resumed = new_run(plan, tmp_path / "b", resume=True)
    assert resumed.trainer.step == 3
    tail = resumed.run(7)
    assert [s.loss for s in straight[3:]] == [s.loss for s in tail]
    assert [s.grad_norm for s in straight[3:]] == [s.grad_norm for s in tail]
    final = load_checkpoint(tmp_path / "a" / "checkpoints").tensors("model.safetensors")
    for key, arr in resumed.trainer.weights.items():
        assert np.array_equal(arr, final[key]), key
    steps = [r["step"] for r in resumed.metrics.records]
    assert steps == [2, 3, 4, 6, 7]  # continues the first log (3: where it stopped)


def test_accumulating_micro_batches_equals_one_large_batch(plan):
    cfg = TrainConfig(**TRAIN)
    big = windows(4)
    accumulated = Trainer(plan, random_weights(plan.entry("train_step"), 0), cfg)
    whole = Trainer(plan, random_weights(plan.entry("train_step"), 0), cfg)
    losses = [
        float(accumulated.executor.run(accumulated.micro_batch_feed(half, 2, 0.0, 0))["loss"])
        for half in (big[:2], big[2:])
    ]
    loss = float(whole.executor.run(whole.micro_batch_feed(big, 1, 0.0, 0))["loss"])
    assert np.mean(losses) == pytest.approx(loss, rel=1e-6)
    grads = [k for k in whole.state if k.startswith("grad.")]
    assert grads and all(np.abs(whole.state[k]).max() > 0 for k in grads)
    for k in grads:
        np.testing.assert_allclose(accumulated.state[k], whole.state[k], rtol=1e-4, atol=1e-7)


def test_a_nan_step_is_skipped_counted_and_logged(plan, tmp_path, monkeypatch):
    run = new_run(plan, tmp_path, log_every=100, checkpoint_every=100)
    run.run(1)
    feed = run.trainer.micro_batch_feed

    def poisoned(windows, count, lr, update):  # a NaN reaches step 2's first micro-batch
        out = feed(windows, count, lr, update)
        if run.trainer.step == 1 and update == 0:
            out["loss_grad"] = float("nan")
        return out

    monkeypatch.setattr(run.trainer, "micro_batch_feed", poisoned)
    before = {k: v.copy() for k, v in run.trainer.weights.items()}
    moments = {k: v.copy() for k, v in run.trainer.optimizer_state().items()}
    (stats,) = run.run(2)
    assert stats.skipped and not math.isfinite(stats.grad_norm)
    assert all(np.array_equal(v, before[k]) for k, v in run.trainer.weights.items())
    assert all(np.array_equal(v, moments[k]) for k, v in run.trainer.optimizer_state().items())
    assert all(not v.any() for k, v in run.trainer.state.items() if k.startswith("grad."))
    assert run.trainer.skipped == 1 and run.trainer.updates == 1
    assert run.metrics.records[-1]["step"] == 2 and run.metrics.records[-1]["skipped"] == 1
    (after,) = run.run(3)
    assert not after.skipped and run.trainer.updates == 2


def adamw_reference(p, grads, lr, b1, b2, eps, wd, clip):
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        g = g * min(1.0, clip / (np.sqrt((g * g).sum()) + 1e-6))
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        p = p * (1 - lr * wd)
        p = p - lr / (1 - b1**t) * m / (np.sqrt(v) / np.sqrt(1 - b2**t) + eps)
    return p


@pytest.mark.parametrize(("optimizer", "chunk"), [("adamw", None), ("adamw", 4), ("sgd", None)])
def test_update_steps_follow_the_textbook_rules(optimizer, chunk, monkeypatch):
    """A one-parameter model whose loss gradient is known: the plan's in-place update after
    three steps equals the reference formula (AdamW as torch.optim.AdamW; SGD + momentum);
    AdamW also in chunks of 4 of the 6 values (a whole chunk and a short one)."""
    from einplan.compiler.pipeline import PASSES, TRAIN_PASSES, PassContext, run_pipeline
    from einplan.runtime import kernels

    if chunk:
        monkeypatch.setattr(kernels, "ADAMW_CHUNK", chunk)
    from einplan.compiler.trace import Builder
    from einplan.runtime.executor import Executor
    from einplan.runtime.kv_cache import allocate_states

    cfg = parse_train_config({"optimizer": optimizer, "weight_decay": 0.1, "grad_clip": 0.5})
    b = Builder({})
    w = b.param("w", "w", (3, 2), "f64")
    r = b.input("r", (3, 2), "f64")
    b.output("loss", b.einsum("ab,ab->", w, r))  # d loss / d w = r
    graph = run_pipeline(b.graph, PassContext(train=cfg), TRAIN_PASSES)
    # pack runs on inference graphs only: training updates the weights in place
    assert PASSES == (
        "lora", "quantize", "flash", "mixed_precision", "simplify", "pack", "contract",
        "schedule", "memory",
    )  # fmt: skip
    assert TRAIN_PASSES == (
        "lora", "quantize", "flash", "autodiff", "checkpoint", "optimizer", "mixed_precision",
        "simplify", "contract", "schedule", "memory",
    )  # fmt: skip
    p0 = np.random.default_rng(0).standard_normal((3, 2))
    grads = [np.random.default_rng(s).standard_normal((3, 2)) for s in (1, 2, 3)]
    weights = {"w": p0.copy()}
    run = Executor(graph, {**weights, **allocate_states(graph, {})})
    for t, g in enumerate(grads, 1):
        run.run({"r": g, "loss_grad": 1.0, "lr": 0.01, "step": t})
    if optimizer == "adamw":
        want = adamw_reference(p0, grads, 0.01, cfg.beta1, cfg.beta2, cfg.eps, 0.1, 0.5)
    else:
        want, buf = p0, np.zeros_like(p0)
        for g in grads:
            g = g * min(1.0, 0.5 / (np.sqrt((g * g).sum()) + 1e-6)) + 0.1 * want
            buf = cfg.momentum * buf + g
            want = want - 0.01 * buf
    np.testing.assert_allclose(weights["w"], want, rtol=1e-12)


def test_no_weight_decay_on_norms_and_biases(plan):
    updates = [n for n in plan.entry("train_step").nodes if n.op.value == "adamw"]
    decay = {n.name: n.attrs["weight_decay"] for n in updates}
    assert decay["attn_norm-0.w.adamw"] == 0 and decay["attn_q-0.w.adamw"] == 0.1
    assert all("optimizer" in n.tags for n in updates)


def test_learning_rate_warms_up_then_decays_to_the_minimum():
    lrs = [learning_rate(s, 1.0, 0.1, 10, 110) for s in range(1, 121)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0
    assert lrs[59] == pytest.approx(0.55) and lrs[109] == lrs[119] == 0.1
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))


def test_train_section_is_strict():
    with pytest.raises(ConfigError, match="unknown train key 'learning_rate'"):
        parse_train_config({"learning_rate": 1e-3})
    with pytest.raises(ConfigError, match="'micro_batch' must be int"):
        parse_train_config({"micro_batch": "4"})
    cfg = load_train_config(ROOT / "configs" / "smollm2-135m-train.json")
    assert (cfg.seq_len, cfg.micro_batch, cfg.accumulation, cfg.warmup_steps) == (256, 4, 4, 200)


def test_checkpoint_loads_as_a_model_and_damage_is_named(plan, tmp_path):
    run = new_run(plan, tmp_path)
    run.run(3)
    folder = load_checkpoint(tmp_path / "checkpoints").path
    session = einplan.Session(plan, folder)
    ids = windows(1)[:, :-1]
    want = einplan.Session(plan, run.trainer.weights).forward(ids)
    np.testing.assert_array_equal(session.forward(ids), want)
    model = folder / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-3] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{model}.*SHA-256"):
        load_checkpoint(tmp_path / "checkpoints")
    model.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match=f"{model}.*truncated"):
        new_run(plan, tmp_path, resume=True)


KILL_DURING_WRITE = """
import os, signal, sys
from pathlib import Path
import einplan
from einplan.api import TRAIN_ENTRIES
from einplan.formats import checkpoint
from einplan.apps.training_run import RunOptions, TrainingRun
sys.path.insert(0, {tests!r})
from test_train import CORPUS, MICRO

plan = einplan.compile_model(MICRO, entries=TRAIN_ENTRIES)
run = TrainingRun(plan, RunOptions(CORPUS, Path({out!r})))
run.run(3)  # checkpoint at step 3

def die_halfway(path, tensors, metadata=None):
    path.write_bytes(b"half a file")
    os.kill(os.getpid(), signal.SIGKILL)

checkpoint.write_tensors = die_halfway
run.run(6)  # killed while writing the step-6 checkpoint
"""


def test_a_kill_during_a_checkpoint_write_leaves_latest_loadable(plan, tmp_path):
    script = KILL_DURING_WRITE.format(tests=str(ROOT / "tests"), out=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, cwd=ROOT)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert any(p.name.startswith(".tmp-step-000006") for p in (tmp_path / "checkpoints").iterdir())
    assert load_checkpoint(tmp_path / "checkpoints").state["counters"]["step"] == 3
    resumed = new_run(plan, tmp_path, resume=True)
    resumed.run(6)
    assert load_checkpoint(tmp_path / "checkpoints").state["counters"]["step"] == 6
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


def test_train_step_never_calls_np_einsum(plan, monkeypatch):
    import opt_einsum

    def forbidden(*a, **k):
        raise AssertionError("the runtime called an einsum")

    trainer = Trainer(plan, random_weights(plan.entry("train_step"), 0), TrainConfig(**TRAIN))
    monkeypatch.setattr(np, "einsum", forbidden)
    monkeypatch.setattr(opt_einsum, "contract", forbidden)
    stats = trainer.run_step([windows(2), windows(2, seed=1)])
    assert math.isfinite(stats.loss) and stats.phase_ms["backward"] > 0


def test_cli_trains_resumes_and_names_bad_input(tmp_path, capsys):
    config = tmp_path / "micro.json"
    config.write_text(json.dumps(MICRO))
    out = tmp_path / "run"
    args = ["train", str(config), "--data", str(CORPUS), "--out", str(out), "--steps", "2"]
    assert main(args) == 0
    assert main([*args[:-1], "4", "--resume"]) == 0
    text = capsys.readouterr().out
    assert "training summary" in text
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("step,loss,val_loss")
    assert os.path.islink(out / "checkpoints" / "latest")
    fresh = tmp_path / "fresh"
    missing = ["train", str(config), "--data", str(tmp_path / "nope.txt"), "--out", str(fresh)]
    assert main([*missing, "--steps", "1"]) == 2
    assert "nope.txt" in capsys.readouterr().err
    bad = [*args[:5], str(fresh), "--set", "optimizer=sgd"]
    assert main(bad) == 2
    assert "compiled into the plan" in capsys.readouterr().err


def test_train_profile_writes_a_trace_with_every_phase_and_memory_kind(tmp_path, capsys):
    from einplan.report.memory import memory_rows
    from einplan.report.trace import read_trace

    config = tmp_path / "micro.json"
    config.write_text(json.dumps(MICRO))
    prof = tmp_path / "prof"
    args = [
        "train",
        str(config),
        "--data",
        str(CORPUS),
        "--out",
        str(tmp_path / "run"),
        "--steps",
        "2",
        "--profile",
        str(prof),
    ]
    assert main(args) == 0
    rec = read_trace(prof / "trace.json")
    steps = [i for i, r in enumerate(rec.runs) if r["entry"] == "train_step"]
    assert len(steps) == 2 * MICRO["train"].get("accumulation", 1)
    tags = {
        t for i in steps for r in rec.records(i) for t in ("reverse", "optimizer") if t in r.tags
    }
    assert tags == {"reverse", "optimizer"}
    rows = {(entry, kind): p50 for entry, kind, p50, _ in memory_rows(rec)}
    for kind in ("weights", "activations", "gradients", "optimizer_state"):
        assert rows[("train_step", kind)] > 0
    weights = rows[("train_step", "weights")]
    assert rows[("train_step", "gradients")] == weights  # one accumulator per weight
    assert rows[("train_step", "optimizer_state")] == 2 * weights  # AdamW's two moments
