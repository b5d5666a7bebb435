"""bf16/f16 mixed precision: the dtype audit of compiled plans, bf16 gradients against float32
ones, f16 dynamic loss scaling, round trips of plans and checkpoints, bad dtype names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import test_train

import einplan
from einplan.apps.compile import TRAIN_ENTRIES
from einplan.apps.training_run import RunOptions, TrainingRun
from einplan.compiler.ops import Op
from einplan.compiler.passes.mixed_precision import audit_precision
from einplan.compiler.plan import Plan
from einplan.compiler.tags import Tag
from einplan.errors import EinplanError
from einplan.formats.checkpoint import load_checkpoint
from einplan.formats.weights import load_weights, random_weights
from einplan.models.config import ConfigError
from einplan.models.train_config import parse_train_config
from einplan.runtime import upcast
from einplan.runtime.executor import Executor
from einplan.runtime.loss_scale import LossScale

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "einplan" / "data" / "shakespeare_sample.txt"
TRAIN = {k: v for k, v in test_train.TRAIN.items() if k != "min_lr"}
MICRO = {**test_train.MICRO, "train": TRAIN}  # test_train's micro model, this train section


@pytest.fixture(scope="module")
def bf16_plan():
    return einplan.compile_model(MICRO, entries=TRAIN_ENTRIES, compute_dtype="bf16")


def feed(batch=4, seq=16, seed=0):
    ids = np.frombuffer(CORPUS.read_bytes()[:20000], np.uint8).astype(np.int64)
    starts = np.random.default_rng(seed).integers(0, len(ids) - seq - 1, batch)
    w = np.stack([ids[s : s + seq + 1] for s in starts])
    positions = np.broadcast_to(np.arange(seq), (batch, seq))
    return {"tokens": w[:, :-1], "positions": positions, "targets": w[:, 1:], "loss_grad": 1.0}


def test_bf16_plan_keeps_bf16_where_asked_and_f32_where_the_rules_say(bf16_plan):
    for name, graph in bf16_plan.entries.items():
        assert audit_precision(graph, "bf16") == [], name
    g = bf16_plan.entry("train_step")
    nodes = g.by_id()
    by_op = {}
    for n in g.nodes:
        by_op.setdefault(n.op, set()).add(n.dtype)
    # products, norms, attention, activations and their reverse ops store bf16 ...
    stored_16 = (Op.EINSUM, Op.RMS_NORM, Op.FLASH_ATTENTION, Op.FLASH_ATTENTION_GRAD, Op.SILU_MUL)
    for op in (*stored_16, Op.ROPE):
        assert by_op[op] == {"bf16"}, op
    # ... master weights, accumulators, moments, the loss, its cotangent and the norm are f32
    assert {n.dtype for n in g.params()} == {"f32"}
    assert {n.dtype for n in g.states()} == {"f32"}
    assert by_op[Op.CROSS_ENTROPY] == by_op[Op.ADAMW] == by_op[Op.GRAD_NORM] == {"f32"}
    assert nodes[g.outputs["loss"]].dtype == "f32"
    assert next(n for n in g.inputs() if n.name == "loss_grad").dtype == "f32"
    # every reduction on bf16 values accumulates in f32 (tagged upcast, run in f32 blocks)
    for n in g.nodes:
        if n.op in (*stored_16, Op.CROSS_ENTROPY, Op.SCATTER_ADD):
            assert Tag.UPCAST in n.tags, n.name
    # the weights are read as bf16 copies of the f32 masters; their gradients cast back
    casts = [n for n in g.nodes if n.op is Op.CAST]
    assert {(nodes[n.inputs[0]].dtype, n.dtype) for n in casts} == {
        ("f32", "bf16"),
        ("bf16", "f32"),
    }
    # the generation entries keep a bf16 KV cache
    assert {n.dtype for n in bf16_plan.entry("decode").states()} == {"bf16"}


def test_the_audit_names_every_broken_rule(bf16_plan):
    g = bf16_plan.entry("train_step")
    norm = next(n for n in g.nodes if n.op is Op.RMS_NORM)
    weight = next(n for n in g.params() if n.name.startswith("attn_q"))
    moment = next(n for n in g.states() if n.attrs["key"].startswith("optim."))
    changed = {
        norm.id: norm.with_(tags=norm.tags - {Tag.UPCAST}),
        weight.id: weight.with_(dtype="bf16"),
        moment.id: moment.with_(dtype="bf16"),
    }
    broken = g.replace_nodes([changed.get(n.id, n) for n in g.nodes])
    problems = "\n".join(audit_precision(broken, "bf16"))
    assert f"{norm.name} (rms_norm) computes on 16-bit values without upcast" in problems
    assert f"trained weight {weight.name} is bf16" in problems
    assert f"optimizer state {moment.name} is bf16" in problems
    # and a float32 plan is not a bf16 one
    f32 = einplan.compile_model(MICRO, entries=("grad",))
    assert any("is f32, not bf16" in p for p in audit_precision(f32.entry("grad"), "bf16"))


@pytest.mark.parametrize("dtype, tol", [("bf16", 0.03), ("f16", 0.005)])
def test_16_bit_loss_and_gradients_are_close_to_float32(dtype, tol):
    grads = {}
    for d in ("f32", dtype):
        plan = einplan.compile_model(MICRO, entries=("grad",), compute_dtype=d)
        g = plan.entry("grad")
        grads[d] = Executor(g, random_weights(g, 0, std=0.1)).run(feed())
    ref, got = grads["f32"], grads[dtype]
    assert got["loss"].dtype == np.float32
    assert abs(float(got["loss"]) - float(ref["loss"])) < tol * float(ref["loss"])
    for key in ref:
        if key.startswith("grad."):
            assert got[key].dtype == np.float32, key  # master-weight gradients
            err = np.linalg.norm(got[key] - ref[key]) / np.linalg.norm(ref[key])
            assert err < tol, (key, err)


def test_chunked_upcast_steps_compute_the_same_numbers(monkeypatch):
    plan = einplan.compile_model(MICRO, entries=("grad",), compute_dtype="bf16")
    g = plan.entry("grad")
    weights = random_weights(g, 0, std=0.1)
    whole = Executor(g, weights).run(feed())
    monkeypatch.setattr(upcast, "BLOCK_BYTES", 256)  # a few rows per chunk
    chunked = Executor(g, weights).run(feed())
    for key in whole:  # the same arithmetic row by row; norm weights sum chunks in f32
        if "norm" in key:
            np.testing.assert_allclose(chunked[key], whole[key], rtol=1e-2, atol=1e-6)
        else:
            assert np.array_equal(whole[key], chunked[key]), key


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_the_embedding_gradient_sums_its_rows_in_float32(dtype):
    """The 16-bit scatter-add (embedding gradient) equals numpy's float32 kernel rounded once,
    bit for bit, repeated ids and the table's last row included, from a block of one row per
    token, not a float32 copy of the table."""
    from einplan.compiler.dtypes import to_numpy_dtype
    from einplan.compiler.ir import Node
    from einplan.runtime.kernels import make_scatter_add
    from einplan.runtime.steps import ScratchBuffers

    rng = np.random.default_rng(0)
    vocab, width, low = 50, 7, to_numpy_dtype(dtype)
    ids = rng.integers(0, vocab, (3, 9))
    ids[0, :4] = 5  # one row summed four times
    ids[2, -1] = vocab - 1
    values = rng.standard_normal((3, 9, width)).astype(low)
    x, i = Node(0, Op.INPUT, (), {}, (3, 9, width), dtype), Node(1, Op.INPUT, (), {}, (3, 9), "i64")
    node = Node(2, Op.SCATTER_ADD, (0, 1), {"rows": vocab}, (vocab, width), dtype)
    shapes = [(3, 9, width), (3, 9)]
    scratch = ScratchBuffers()
    kernel = upcast.make_upcast(
        make_scatter_add, node, shapes, (vocab, width), scratch.for_thread(0), [x, i]
    )
    got = kernel([values, ids], np.full((vocab, width), np.nan, low))
    want = make_scatter_add(node, shapes, (vocab, width), None)(
        [values.astype(np.float32), ids], np.empty((vocab, width), np.float32)
    ).astype(low)
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
    assert scratch.nbytes() <= 2 * 3 * 9 * width * 4  # two blocks of one row per token


def new_run(plan, out, steps=None, resume=False):
    return TrainingRun(plan, RunOptions(CORPUS, out, steps=steps, resume=resume))


def test_f16_loss_scaling_recovers_from_an_overflow(tmp_path):
    plan = einplan.compile_model(MICRO, entries=TRAIN_ENTRIES, compute_dtype="f16")
    assert "inv_loss_scale" in {n.name for n in plan.entry("train_step").inputs()}
    run = new_run(plan, tmp_path / "run")
    t = run.trainer
    assert t.loss_scale.scale == 2.0**16
    t.loss_scale.scale = 2.0**40  # the gradients overflow f16
    before = {k: v.copy() for k, v in t.weights.items()}
    first = t.run_step([run.sampler.draw(2)])
    assert first.skipped and not np.isfinite(first.grad_norm)
    assert (t.skipped, t.loss_scale.scale) == (1, 2.0**39)
    assert all(np.array_equal(before[k], v) for k, v in t.weights.items())  # nothing applied
    stats = [first]
    while stats[-1].skipped:
        stats.append(t.run_step([run.sampler.draw(2)]))
        assert len(stats) < 40
    scales = [s.loss_scale for s in stats]
    assert scales == [2.0 ** (40 - i) for i in range(len(stats))]  # halved at each skip
    assert t.skipped == len(stats) - 1 and t.updates == 1
    assert any(not np.array_equal(before[k], v) for k, v in t.weights.items())
    more = [t.run_step([run.sampler.draw(2)]) for _ in range(2)]  # training continues
    assert not any(s.skipped for s in more) and all(np.isfinite(s.loss) for s in more)
    record = run.record(more[-1], [more[-1].loss])
    assert record["loss_scale"] == more[-1].loss_scale and record["skipped"] == t.skipped


def test_the_loss_scale_grows_after_a_run_of_good_steps():
    s = LossScale(scale=8.0, interval=3)
    for skipped in (False, False, True, False, False):
        s.update(skipped)
    assert (s.scale, s.good_steps) == (4.0, 2)
    s.update(False)
    assert (s.scale, s.good_steps) == (8.0, 0)


def test_plans_and_checkpoints_round_trip(bf16_plan, tmp_path):
    bf16_plan.save(tmp_path / "m.plan")
    loaded = Plan.load(tmp_path / "m.plan")
    assert (
        loaded.meta["compute_dtype"] == "bf16" and loaded.meta["train"]["compute_dtype"] == "bf16"
    )
    for name, graph in bf16_plan.entries.items():
        assert str(loaded.entry(name)) == str(graph)
        assert audit_precision(loaded.entry(name), "bf16") == []
    # f16 resumes bit for bit, loss scale included; checkpoints hold the f32 master weights
    plan = einplan.compile_model(MICRO, entries=TRAIN_ENTRIES, compute_dtype="f16")
    straight = new_run(plan, tmp_path / "a").run(5)
    new_run(plan, tmp_path / "b").run(3)
    resumed = new_run(plan, tmp_path / "b", resume=True)
    assert resumed.trainer.loss_scale == LossScale(scale=2.0**16, good_steps=3)
    tail = resumed.run(5)
    assert [s.loss for s in straight[3:]] == [s.loss for s in tail]
    final = load_checkpoint(tmp_path / "a" / "checkpoints").tensors("model.safetensors")
    assert {a.dtype for a in final.values()} == {np.dtype(np.float32)}
    for key, arr in resumed.trainer.weights.items():
        assert np.array_equal(arr, final[key]), key
    # a float32 session reads the checkpoint as any other model folder
    f32 = einplan.compile_model(MICRO, entries=("forward",))
    g = f32.entry("forward")
    inputs = {k: v for k, v in feed().items() if k in ("tokens", "positions")}
    logits = Executor(g, load_weights(g, final, tied=True)).run(inputs)["logits"]
    assert logits.dtype == np.float32 and np.isfinite(logits).all()


def test_bad_dtype_names_are_rejected_clearly(tmp_path):
    with pytest.raises(EinplanError, match=r"compute dtype 'bfloat16' is not one of .*bf16"):
        einplan.compile_model(MICRO, compute_dtype="bfloat16")
    with pytest.raises(ConfigError, match=r"compute_dtype 'fp16' is not one of .*f16"):
        parse_train_config({"compute_dtype": "fp16"})
    with pytest.raises(EinplanError, match="training in bf16 needs the weights stored in f32"):
        einplan.compile_model(
            MICRO, entries=("train_step",), compute_dtype="bf16", weight_dtype="bf16"
        )
    cli = [sys.executable, "-m", "einplan", "compile", "tiny", "--compute-dtype", "bfloat16"]
    p = subprocess.run(cli, capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2 and "invalid choice: 'bfloat16'" in p.stderr


@pytest.mark.parametrize("config, lora", [(MICRO, "r=4,targets=q,v"), ("tiny-moe", None)])
def test_lora_and_mixture_of_experts_train_in_bf16(config, lora):
    grads = {}
    for d in ("f32", "bf16"):
        plan = einplan.compile_model(config, entries=("grad",), compute_dtype=d, lora=lora)
        g = plan.entry("grad")
        assert d == "f32" or audit_precision(g, "bf16") == []
        rng = np.random.default_rng(1)
        adapters = {
            n.attrs["key"]: (0.1 * rng.standard_normal(n.shape)).astype(np.float32)
            for n in g.params()
            if Tag.LORA in n.tags
        }
        weights = {**random_weights(g, 0, std=0.1), **adapters}
        grads[d] = Executor(g, weights).run(feed())
    names = [k for k in grads["f32"] if k.startswith("grad.")]
    assert names and all(("lora" in k) == bool(lora) for k in names)
    for key in names:
        ref = grads["f32"][key]
        err = np.linalg.norm(grads["bf16"][key] - ref) / np.linalg.norm(ref)
        assert err < 0.05, (key, err)


def test_a_gpu_device_refuses_16_bit_steps_clearly(bf16_plan):
    from einplan.runtime.backends.base import Backend
    from einplan.runtime.device import DeviceError

    node = next(n for n in bf16_plan.entry("forward").nodes if Tag.UPCAST in n.tags)
    with pytest.raises(DeviceError, match="mixed precision runs on the CPU only"):
        Backend("cuda", device="cuda").kernel_for(node, [], (), None)
