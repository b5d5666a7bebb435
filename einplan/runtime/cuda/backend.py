"""The cuda backend's table: every op of a float plan, runtime/kernels.py's factories run with
``xp=cupy`` where their NumPy code is CuPy's too, and kernels.py's fused kernels where one
launch replaces several or a scalar must stay on the device."""

from __future__ import annotations

import functools
import os

import numpy as np

from einplan.compiler.attrs import QMatmulRecipe
from einplan.compiler.ops import Op
from einplan.runtime import kernels as numpy_kernels
from einplan.runtime.backends.base import Backend, Factory
from einplan.runtime.cuda import attention, blas, kernels, portable
from einplan.runtime.device import cupy_module

# ops whose runtime/kernels.py factory takes ``xp`` and reads nothing back to the host
SHARED = (
    Op.ADD,
    Op.MUL,
    Op.ROPE_TABLE,
    Op.RESHAPE,
    Op.AFTER,
    Op.SPLIT,
    Op.SLICE_LAST,
    Op.TRANSPOSE,
    Op.CAST,
    Op.SCALE,
    Op.EXPAND,
    Op.SCATTER_ADD,
    Op.ACC_GRAD,
)


def on_device(factory, float_only: bool = False) -> Factory:
    """``factory`` (runtime/kernels.py's signature plus ``xp``) as a cuda factory; with
    ``float_only`` it declines a quantised step (no cuda kernel: the backend says so)."""

    def cuda_factory(node, shapes, out_shape, scratch, inputs=()):
        if float_only and (
            isinstance(node.attrs.get("recipe"), QMatmulRecipe)
            or any(i.op is Op.DEQUANTIZE for i in inputs)
        ):
            return None
        return factory(node, shapes, out_shape, scratch, xp=cupy_module())

    return cuda_factory


def set_tf32(enabled: bool) -> None:
    """Let cuBLAS run float32 products on TF32 tensor cores (10-bit mantissa operands)."""
    import cupy._core._routines_linalg as linalg

    os.environ["CUPY_TF32"] = "1" if enabled else "0"
    blas.TF32["on"] = enabled
    kind = "COMPUTE_TYPE_TF32" if enabled else "COMPUTE_TYPE_DEFAULT"
    linalg.set_compute_type(np.float32, getattr(linalg, kind, 7 if enabled else 1))


def cuda_backend(cuda_graph: bool = True, tf32: bool = False) -> Backend:
    """The cuda backend (CuPy must import and see a GPU); ``cuda_graph``: replay each bound
    entry as one CUDA graph; ``tf32``: float32 products on TF32 tensor cores."""
    cupy_module()
    set_tf32(tf32)
    table: dict[Op, Factory] = {op: on_device(numpy_kernels.KERNELS[op]) for op in SHARED}
    table.update(
        {
            Op.EINSUM: kernels.make_einsum,
            Op.GRAD_NORM: on_device(
                functools.partial(numpy_kernels.make_grad_norm, dot=kernels.sum_squares)
            ),
            Op.GATHER: on_device(numpy_kernels.make_gather, float_only=True),
            Op.DROPOUT: on_device(portable.make_dropout),
            Op.RMS_NORM: kernels.make_rms_norm,
            Op.ROPE: kernels.make_rope,
            Op.SOFTMAX: kernels.make_softmax,
            Op.SILU_MUL: kernels.make_silu_mul,
            Op.KV_APPEND: kernels.make_kv_append,
            Op.CROSS_ENTROPY: kernels.make_cross_entropy,
            Op.CROSS_ENTROPY_GRAD: kernels.make_cross_entropy_grad,
            Op.ADAMW: kernels.make_adamw,
            Op.SGD: kernels.make_sgd,
            Op.SOFTMAX_GRAD: kernels.make_softmax_grad,
            Op.SILU_MUL_GRAD: kernels.make_silu_mul_grad,
            Op.RMS_NORM_GRAD: kernels.make_rms_norm_grad,
            **attention.FLASH_CUDA_KERNELS,
        }
    )
    return Backend("cuda", table, device="cuda", cuda_graph=cuda_graph)
