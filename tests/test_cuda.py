"""The cuda device (CuPy) against the CPU backend on the fixture models: logits, greedy text,
gradients and training steps, with and without CUDA graph replay; per-step CUDA-event timing.
Marked ``gpu``: skipped where no CUDA device is found (the one allowed skip)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CASES, FIXTURES, MOE_CASES
from safetensors.numpy import load_file
from test_flash_attention import flash_node, padded_mask, plain, plain_grads

import einplan
from einplan.api import Recorder
from einplan.compiler.ops import Op
from einplan.runtime import flash as numpy_flash
from einplan.runtime.device import DeviceError, cupy_module


def cuda_available() -> bool:
    try:
        cupy_module()
    except DeviceError:
        return False
    return True


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cuda_available(), reason="no CUDA device"),
]
DENSE = [c for c in CASES if c not in MOE_CASES]
TRAIN = {"optimizer": "adamw", "micro_batch": 2, "seq_len": 16, "lr": 1e-2, "grad_clip": 1.0}


def close(got: np.ndarray, want: np.ndarray, tol: float = 1e-4) -> None:
    """Equal to float32 rounding of two libraries: error within ``tol`` of the largest value."""
    assert got.shape == want.shape and got.dtype == want.dtype
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    assert err < tol, err


@pytest.mark.parametrize("case", DENSE)
@pytest.mark.parametrize("graph", [True, False])
def test_logits_equal_cpu_and_transformers(case, graph):
    folder = FIXTURES / case
    ref = load_file(folder / "reference.safetensors")
    plan = einplan.compile_model(folder / "config.json")
    cpu = einplan.Session(plan, folder).forward(ref["input_ids"])
    gpu = einplan.Session(plan, folder, device="cuda", cuda_graph=graph)
    for _ in range(3):  # the first run launches step by step; then capture and replay
        logits = gpu.forward(ref["input_ids"])
        assert np.abs(logits - ref["logits"]).max() < 1e-4
        close(logits, cpu)


def test_replay_reads_new_inputs():
    """A replayed graph computes from the inputs of this run, not the captured ones."""
    folder = FIXTURES / "llama_gqa_tied"
    plan = einplan.compile_model(folder / "config.json")
    cpu, gpu = einplan.Session(plan, folder), einplan.Session(plan, folder, device="cuda")
    rng = np.random.default_rng(0)
    for _ in range(4):
        ids = rng.integers(0, plan.config["vocab_size"], (2, 9))
        close(gpu.forward(ids), cpu.forward(ids))


@pytest.mark.parametrize("graph", [True, False])
def test_greedy_text_equals_cpu(graph):
    """Prompts of different lengths (left-padded), decoding across a KV bucket boundary."""
    folder = FIXTURES / "llama_gqa_tied"
    plan = einplan.compile_model(folder / "config.json")
    prompts = [[5, 9, 2, 7, 1, 3] * 7, [4, 8, 6] * 5]
    kw = {"max_new_tokens": 40, "ignore_eos": True}
    want = einplan.Session(plan, folder).generate(prompts, **kw)
    gpu = einplan.Session(plan, folder, device="cuda", cuda_graph=graph)
    for _ in range(2):
        got = gpu.generate(prompts, **kw)
        assert got.tokens == want.tokens


def test_gradients_equal_cpu():
    folder = FIXTURES / "llama_mha_untied"
    plan = einplan.compile_model(folder / "config.json", entries=("forward", "grad"))
    assert any(n.op is Op.FLASH_ATTENTION_GRAD for n in plan.entry("grad").nodes)
    ids = load_file(folder / "reference.safetensors")["input_ids"]
    loss, grads = einplan.Session(plan, folder).loss_and_grads(ids)
    gpu = einplan.Session(plan, folder, device="cuda")
    for _ in range(3):
        g_loss, g_grads = gpu.loss_and_grads(ids)
        assert abs(float(g_loss) - float(loss)) < 1e-5 * abs(float(loss))
        assert g_grads.keys() == grads.keys()
        for k in grads:
            close(g_grads[k], grads[k], 1e-3)


@pytest.mark.parametrize("graph", [True, False])
def test_training_steps_equal_cpu(graph):
    """AdamW with two micro-batches a step: losses and trained weights as on the CPU."""
    from einplan.formats.weights import random_weights
    from einplan.models.train_config import parse_train_config
    from einplan.runtime.backends import get_backend
    from einplan.runtime.trainer import Trainer

    cfg = parse_train_config(TRAIN)
    plan = einplan.compile_model("tiny", entries=("train_step", "loss"), train=cfg)
    weights = random_weights(plan.entry("train_step"), 0)
    cpu = Trainer(plan, {k: v.copy() for k, v in weights.items()}, cfg, kernels="numpy")
    gpu = Trainer(plan, weights, cfg, kernels=get_backend(None, "cuda", graph))
    rng = np.random.default_rng(0)
    for _ in range(4):
        batches = [rng.integers(0, 256, (2, 17)) for _ in range(2)]
        a, b = cpu.run_step(batches), gpu.run_step(batches)
        assert abs(a.loss - b.loss) < 1e-4 * abs(a.loss)
        assert abs(a.grad_norm - b.grad_norm) < 1e-3 * a.grad_norm
    for k, w in gpu.trained_weights().items():
        close(w, cpu.trained_weights()[k], 1e-3)
    opt = gpu.optimizer_state()
    assert all(isinstance(v, np.ndarray) for v in opt.values())  # checkpoints: host arrays


def test_train_run_checkpoints_and_resumes(tmp_path):
    """einplan.train on the GPU writes checkpoints from device memory and resumes from them."""
    data = tmp_path / "corpus.txt"
    data.write_text("To be, or not to be, that is the question. " * 200)
    kw = {"data": data, "device": "cuda"}
    settings = {"sample_every": 0}
    full = einplan.train("tiny", out=tmp_path / "full", steps=4, overrides=settings, **kw)
    einplan.train("tiny", out=tmp_path / "part", steps=2, overrides=settings, **kw)
    resumed = einplan.train("tiny", out=tmp_path / "part", steps=4, resume=True, **kw)
    assert resumed.checkpoint is not None and (resumed.checkpoint / "model.safetensors").exists()
    want = full.history[-1]["loss"]
    got = resumed.history[-1]["loss"]
    assert abs(got - want) < 1e-4 * abs(want)


def test_recorder_times_every_step_with_events():
    folder = FIXTURES / "llama_gqa_tied"
    plan = einplan.compile_model(folder / "config.json")
    gpu = einplan.Session(plan, folder, device="cuda")
    ids = np.arange(12)[None, :]
    gpu.forward(ids)
    gpu.forward(ids)  # captured and replayed: a recorder then launches step by step
    rec = Recorder()
    logits = gpu.forward(ids, recorder=rec)
    close(logits, einplan.Session(plan, folder).forward(ids))
    records = rec.records()
    assert len(records) == sum(gpu.executor.steps_by_backend().values())
    assert all(r.backend == "cuda" for r in records)
    assert sum(r.dur_ns for r in records) > 0


def test_tf32_close_to_float32():
    folder = FIXTURES / "llama_gqa_tied"
    plan = einplan.compile_model(folder / "config.json")
    ids = load_file(folder / "reference.safetensors")["input_ids"]
    want = einplan.Session(plan, folder).forward(ids)
    got = einplan.Session(plan, folder, device="cuda", tf32=True).forward(ids)
    close(got, want, 1e-2)
    einplan.Session(plan, folder, device="cuda", tf32=False)  # leaves TF32 off for the rest


def test_quantised_plan_is_refused_by_name():
    folder = FIXTURES / "llama_gqa_tied"
    plan = einplan.compile_model(folder / "config.json", quant="w8a16")
    session = einplan.Session(plan, folder, device="cuda")
    with pytest.raises(DeviceError, match="no cuda kernel"):
        session.forward(np.arange(4)[None, :])


FLASH_CASES = [  # (b, s, extra keys, n, g, h, layout, masked, scale)
    (2, 7, 0, 2, 3, 8, "bsnh", False, 1.0),
    (1, 5, 4, 3, 2, 16, "bsnh", False, 0.25),
    (2, 6, 5, 2, 2, 8, "bnth", True, 0.5),  # padded rows see no key: they average every key
    (2, 1, 9, 1, 4, 8, "bnth", False, 1.0),
]


def run_cuda_flash(q, k, v, do, mask, keep, **attrs):
    """The cuda kernels' output and gradients (q, k, v) of float32 host arrays."""
    from einplan.runtime.backends import get_backend

    cp = cupy_module()
    table = get_backend(None, "cuda").table
    ins = [cp.asarray(x) for x in (q, k, v, *(() if mask is None else (mask,)))]
    shapes = [x.shape for x in ins]

    def scratch(role, shape, dtype):
        return cp.empty(shape, dtype)

    fwd = flash_node(Op.FLASH_ATTENTION, q.shape, "f32", keep=keep, **attrs)
    out = cp.empty(q.shape, np.float32)
    table[Op.FLASH_ATTENTION](fwd, shapes, q.shape, scratch)(ins, out)
    args = [*ins, out, cp.asarray(do)]
    kernels = {}
    for wrt, x in zip("qkv", ins, strict=False):
        node = flash_node(Op.FLASH_ATTENTION_GRAD, x.shape, "f32", wrt=wrt, **attrs)
        inputs = [None] * (len(args) - 2) + [fwd, None]
        factory = table[Op.FLASH_ATTENTION_GRAD]
        kernels[wrt] = (factory(node, [a.shape for a in args], x.shape, scratch, inputs), x)
    grads = {}
    for wrt in "vqk":  # any sibling may run first
        kernel, x = kernels[wrt]
        g = cp.empty(x.shape, np.float32)
        kernel(args, g)
        grads[wrt] = cp.asnumpy(g)
    return cp.asnumpy(out), grads


@pytest.mark.parametrize("case", FLASH_CASES)
@pytest.mark.parametrize("keep", [True, False])
def test_flash_kernels_equal_numpy_kernels_and_float64(case, keep):
    """Output and gradients of the cuda flash kernels equal runtime/flash.py's (float32) and
    the plain chain in float64."""
    b, s, extra, n, g, h, layout, masked, scale = case
    rng = np.random.default_rng(s * 100 + extra)
    t = s + extra
    f32 = np.float32
    q = rng.standard_normal((b, s, n, g, h)).astype(f32)
    kv_shape = (b, n, t, h) if layout == "bnth" else (b, t, n, h)
    k, v = (rng.standard_normal(kv_shape).astype(f32) for _ in range(2))
    do = rng.standard_normal(q.shape).astype(f32)
    mask = padded_mask(rng, b, s, t).astype(f32) if masked else None
    attrs = {"layout": layout, "causal": not masked, "scale": scale}
    out, grads = run_cuda_flash(q, k, v, do, mask, keep, **attrs)
    ins = [q, k, v, *(() if mask is None else (mask,))]
    want_out = np.empty_like(q)
    node = flash_node(Op.FLASH_ATTENTION, q.shape, "f32", **attrs)
    numpy_flash.make_flash_attention(node, [x.shape for x in ins], q.shape, scratch_np)(
        ins, want_out
    )
    close(out, want_out)
    bnth = layout == "bnth"
    mask64 = None if mask is None else mask.astype(np.float64)
    q64 = q.astype(np.float64) * scale
    close(out.astype(np.float64), plain(q64, k, v, mask64, not masked, bnth)[0], 1e-4)
    want = plain_grads(
        q64, k.astype(np.float64), v.astype(np.float64), do, mask64, not masked, bnth
    )
    want["q"] = want["q"] * scale
    for wrt in "qkv":
        close(grads[wrt].astype(np.float64), want[wrt], 1e-4)


def scratch_np(role, shape, dtype):
    return np.empty(shape, dtype)
