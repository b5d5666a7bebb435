"""The device choice on a machine without a GPU: clear errors (exit 2 at the command line)
without CuPy or without a CUDA device, and the cuda device's array-module-generic kernels
run with NumPy as their array module."""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest

from einplan.cli import main
from einplan.compiler.ir import Node
from einplan.compiler.ops import Op
from einplan.runtime import device
from einplan.runtime.backends import BackendError, get_backend
from einplan.runtime.cuda.portable import hashed_uniform, make_dropout
from einplan.runtime.device import DeviceError, check_device


@pytest.fixture
def no_cupy(monkeypatch):
    """A machine where CuPy is not installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "cupy" else real(name, *a)
    )
    device.cupy_module.cache_clear()
    yield
    device.cupy_module.cache_clear()


@pytest.fixture
def no_gpu(monkeypatch):
    """A machine where CuPy imports but the CUDA runtime finds no device."""
    fake = types.ModuleType("cupy")

    def no_device():
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=no_device))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: types.SimpleNamespace() if name == "cupy" else real(name, *a),
    )
    device.cupy_module.cache_clear()
    yield
    device.cupy_module.cache_clear()


def test_cuda_without_cupy_says_how_to_install(no_cupy):
    with pytest.raises(DeviceError, match=r"einplan\[cuda12\]"):
        check_device("cuda")
    with pytest.raises(DeviceError, match="CuPy"):
        get_backend(None, "cuda")


def test_cuda_without_gpu_is_refused(no_gpu):
    with pytest.raises(DeviceError, match="no usable CUDA GPU.*cudaErrorNoDevice"):
        check_device("cuda")


def test_unknown_device_and_cuda_options_on_cpu():
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        check_device("tpu")
    assert check_device(None) == "cpu"
    with pytest.raises(BackendError, match="--tf32"):
        get_backend("numpy", "cpu", tf32=True)
    with pytest.raises(BackendError, match="--no-cuda-graph"):
        get_backend(None, None, cuda_graph=False)


def run_args(plan, *extra: str) -> list[str]:
    """``einplan run`` of ``plan`` on random weights and a byte prompt, plus ``extra``."""
    return ["run", str(plan), "--random-weights", "0", "--tokenizer", "bytes", "-p", "Hi", *extra]


def test_cli_device_cuda_without_cupy_exits_2(no_cupy, tmp_path, capsys):
    plan = tmp_path / "t.plan"
    assert main(["compile", "tiny", "-o", str(plan), "-q"]) in (0, None)
    code = main(run_args(plan, "--device", "cuda"))
    assert code == 2
    assert "einplan[cuda12]" in capsys.readouterr().err


def test_cli_tf32_needs_cuda(tmp_path, capsys):
    plan = tmp_path / "t.plan"
    main(["compile", "tiny", "-o", str(plan), "-q"])
    code = main(run_args(plan, "--tf32"))
    assert code == 2
    assert "--device cuda" in capsys.readouterr().err


def dropout_node(p: float, stream: int) -> Node:
    return Node(0, Op.DROPOUT, (1, 2), {"p": p, "stream": stream}, (64, 256), "f32", "drop")


def test_hashed_dropout_with_numpy_as_xp():
    """The cuda device's dropout (masks hashed from seed, stream and element, no host state):
    keeps 1 - p of the elements, scales them by 1/(1 - p), and draws the same mask for the same
    seed and stream, another for another."""
    x = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    p = 0.25
    kernel = make_dropout(dropout_node(p, 3), [x.shape, ()], x.shape, None, xp=np)
    out = np.empty_like(x)
    a = kernel([x, np.array(7)], out).copy()
    assert a.dtype == np.float32
    kept = a != 0
    assert abs(kept.mean() - (1 - p)) < 0.02
    np.testing.assert_allclose(a[kept], x[kept] / (1 - p), rtol=1e-6)
    assert np.array_equal(kernel([x, np.array(7)], out), a)
    assert not np.array_equal(kernel([x, np.array(8)], out) != 0, kept)
    other = make_dropout(dropout_node(p, 4), [x.shape, ()], x.shape, None, xp=np)
    assert not np.array_equal(other([x, np.array(7)], out) != 0, kept)


def test_hashed_uniform_is_uniform():
    u = hashed_uniform(np, np.array(123), 0, 1 << 16)
    assert u.dtype == np.float32 and u.min() >= 0 and u.max() < 1
    counts = np.histogram(u, bins=16, range=(0, 1))[0]
    assert counts.min() > 0.9 * len(u) / 16 and counts.max() < 1.1 * len(u) / 16


def test_strided_rows_reads_views_of_fused_products_in_place():
    """Views of part of each row of a fused product (q of qkv, gate of gate+up) are read
    through their row stride; other strided views are copied."""
    from einplan.runtime.cuda.kernels import strided_rows

    qkv = np.arange(2 * 3 * 20, dtype=np.float32).reshape(2, 3, 20)
    q = qkv[..., 4:12].reshape(2, 3, 2, 4)  # (batch, seq, heads, head_dim) inside rows of 20
    same, stride = strided_rows(q, 2)
    assert same is q and stride == 20
    flat = qkv.reshape(-1)[4:]
    for b, s in np.ndindex(2, 3):
        row = (b * 3 + s) * stride
        assert np.array_equal(flat[row : row + 8], q[b, s].ravel())
    gate = qkv[..., :10]
    assert strided_rows(gate, 2) == (gate, 20)
    dense = np.zeros((4, 5), np.float32)
    assert strided_rows(dense, 1)[1] == 5
    t = qkv.transpose(1, 0, 2)  # (seq, batch, 20): pairs do not collapse into one axis
    copied, stride = strided_rows(t, 2)
    assert copied is not t and copied.flags.c_contiguous and stride == 20
    assert np.array_equal(copied, t)
    cols = qkv[..., ::2]  # rows not contiguous: copied
    assert strided_rows(cols, 2)[0].flags.c_contiguous


def test_roofs_of_a_gpu_recording_are_the_gpus():
    """The cost report of steps run on the cuda backend uses `bench machine --device cuda`'s
    limits (machine-cuda.json), of other steps this machine's."""
    from einplan.report import machine
    from einplan.runtime.recorder import Recorder, StepInfo

    machine.save_machine({"gemm_gflops": 100.0, "bandwidth_gbs": 20.0})
    machine.save_machine({"gemm_gflops": 50000.0, "bandwidth_gbs": 4000.0}, "cuda")
    for backend, peak in (("cuda", 50000.0), ("numpy", 100.0)):
        rec = Recorder()
        run = rec.begin_run("forward", {}, [StepInfo("a", "einsum", 10, 10, backend=backend)])
        rec.add(run, 0, 0, 0, 5)
        rec.end_run(run)
        assert machine.machine_of(rec)["gemm_gflops"] == peak


def test_gpu_memory_is_checked_before_allocating():
    """A binding or state too large for the GPU stops with the numbers and what to lower."""
    from einplan.runtime.device import free_bytes
    from einplan.runtime.memory_limit import MemoryLimitError, check_fits

    assert free_bytes(np) is None
    pool = types.SimpleNamespace(free_bytes=lambda: 1 << 20)
    gpu = types.SimpleNamespace(
        get_default_memory_pool=lambda: pool,
        cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(memGetInfo=lambda: (3 << 20, 0))),
    )
    assert free_bytes(gpu) == 4 << 20
    check_fits(4 << 20, "running forward", {"batch": 2}, gpu_free=free_bytes(gpu))
    with pytest.raises(MemoryLimitError, match=r"only 4.00 MiB of GPU memory is free; lower batch"):
        check_fits(5 << 20, "running forward", {"batch": 2}, gpu_free=free_bytes(gpu))


def test_flash_products_read_heads_first_views_in_place():
    """attention.batched: one strided-batched call over (batch, KV head) for contiguous
    arrays, the KV cache's slice of its context and transposed views; None for keys by
    sequence with several sequences (those are copied first)."""
    from einplan.runtime.cuda.attention import batched
    from einplan.runtime.cuda.blas import OP_N, OP_T

    x = np.zeros((2, 3, 5, 4), np.float32)
    assert batched(x) == (OP_N, 4, 20)
    assert batched(x.swapaxes(-1, -2)) == (OP_T, 4, 20)
    cache = np.zeros((2, 3, 16, 4), np.float32)
    assert batched(cache[:, :, :7]) == (OP_N, 4, 64)
    assert batched(cache[:, :, :7].swapaxes(-1, -2)) == (OP_T, 4, 64)
    by_seq = np.zeros((2, 7, 3, 4), np.float32).transpose(0, 2, 1, 3)
    assert batched(by_seq) is None
    assert batched(by_seq[:1]) == (OP_N, 12, 4)
