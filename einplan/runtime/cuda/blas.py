"""Matrix products through a cuBLAS handle of einplan's own, called with ctypes.

CuPy refuses every cuBLAS call while a stream is being captured ("calling cuBLAS API during
stream capture is currently unsupported"), although cuBLAS itself captures its GEMMs. This
handle is bound once to the runner's stream and given a fixed workspace (so that a captured
GEMM allocates nothing), and every product of a plan goes through
``cublasGemmStridedBatchedEx``: 2-D or batched, either operand read transposed in place.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

from einplan.runtime.device import DeviceError, cupy_module, device_stream

OP_N, OP_T = 0, 1
R_32F = 0  # cudaDataType CUDA_R_32F
COMPUTE_32F, COMPUTE_32F_FAST_TF32 = 68, 77  # cublasComputeType_t
GEMM_DEFAULT = -1
WORKSPACE_BYTES = 32 << 20
TF32 = {"on": False}  # set by runtime/cuda/backend.set_tf32


def cublas_path() -> str:
    """The libcublas CuPy loaded (its own handle makes sure it is loaded)."""
    cupy_module().cuda.device.get_cublas_handle()
    for line in Path("/proc/self/maps").read_text().splitlines():
        name = line.rsplit(" ", 1)[-1]
        if "/libcublas.so" in name:
            return name
    raise DeviceError("cuBLAS is not loaded in this process; check the CuPy installation")


@functools.cache
def library() -> ctypes.CDLL:
    """libcublas with the argument types of the calls made here."""
    lib = ctypes.CDLL(cublas_path())
    p, i, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
    lib.cublasCreate_v2.argtypes = [ctypes.POINTER(p)]
    lib.cublasSetStream_v2.argtypes = [p, p]
    lib.cublasSetWorkspace_v2.argtypes = [p, p, ctypes.c_size_t]
    lib.cublasGemmStridedBatchedEx.argtypes = [
        p, i, i, i, i, i, p, p, i, i, ll, p, i, i, ll, p, p, i, i, ll, i, i, i
    ]  # fmt: skip
    return lib


def check(status: int, call: str) -> None:
    """Raise on a cuBLAS error status."""
    if status != 0:
        raise DeviceError(f"cuBLAS {call} failed with status {status}")


@functools.cache
def handle() -> tuple[ctypes.c_void_p, object]:
    """The handle, bound to the runner's stream, and its workspace (kept alive with it)."""
    lib = library()
    h = ctypes.c_void_p()
    check(lib.cublasCreate_v2(ctypes.byref(h)), "cublasCreate")
    check(lib.cublasSetStream_v2(h, device_stream().ptr), "cublasSetStream")
    workspace = cupy_module().empty(WORKSPACE_BYTES, "uint8")
    check(lib.cublasSetWorkspace_v2(h, workspace.data.ptr, WORKSPACE_BYTES), "cublasSetWorkspace")
    return h, workspace


def matrix_layout(r: int, c: int, s0: int, s1: int) -> tuple[int, int] | None:
    """How cuBLAS (column-major) reads a row-major ``r x c`` matrix whose element (i, j) is
    ``i * s0 + j * s1`` elements in: as it is (OP_N) or transposed (OP_T), with its leading
    dimension; None when it can read it neither way."""
    if (s1 == 1 or c == 1) and (s0 >= c or r == 1):
        return OP_N, (s0 if r > 1 else c)
    if (s0 == 1 or r == 1) and (s1 >= r or c == 1):
        return OP_T, (s1 if c > 1 else r)
    return None


def layout(x) -> tuple[int, int, object]:
    """:func:`matrix_layout` of the matrices of ``x``, copied first when cuBLAS cannot read
    them in place."""
    r, c = x.shape[-2:]
    found = matrix_layout(r, c, x.strides[-2] // 4, x.strides[-1] // 4)
    if found is not None:
        return (*found, x)
    return OP_N, c, cupy_module().ascontiguousarray(x)


def gemm(a, b, c, m: int, n: int, k: int, batch: int = 1, accumulate: bool = False) -> None:
    """``batch`` products ``C = A B`` (row-major ``m x k`` by ``k x n``; ``accumulate``:
    ``C += A B``): ``a`` and ``b`` are (op, leading dimension, device pointer, batch stride),
    ``c`` (pointer, leading dimension, batch stride) with strides in elements."""
    op_a, lda, ptr_a, stride_a = a
    op_b, ldb, ptr_b, stride_b = b
    ptr_c, ldc, stride_c = c
    compute = COMPUTE_32F_FAST_TF32 if TF32["on"] else COMPUTE_32F
    # row-major C = A B is column-major C^T = B^T A^T
    status = library().cublasGemmStridedBatchedEx(
        handle()[0], op_b, op_a, n, m, k, ctypes.byref(ONE),
        ptr_b, R_32F, ldb, stride_b,
        ptr_a, R_32F, lda, stride_a,
        ctypes.byref(ONE if accumulate else ZERO), ptr_c, R_32F, ldc, stride_c,
        batch, compute, GEMM_DEFAULT,
    )  # fmt: skip
    check(status, "cublasGemmStridedBatchedEx")


ONE, ZERO = ctypes.c_float(1.0), ctypes.c_float(0.0)


def matmul(a, b, out):
    """``out = a @ b`` for float32 ``a`` (M, K) and ``b`` (K, N), or batches of them of one
    batch size; ``out`` is C-contiguous. A drop-in for ``cupy.matmul(a, b, out=out)``."""
    if a.dtype.char != "f" or b.dtype.char != "f" or out.dtype.char != "f":
        raise DeviceError(f"cuda products are float32; got {a.dtype} x {b.dtype}")
    m, k = a.shape[-2:]
    n = b.shape[-1]
    batch = out.shape[0] if out.ndim == 3 else 1
    op_a, lda, a = layout(a)
    op_b, ldb, b = layout(b)
    stride_a = a.strides[0] // 4 if a.ndim == 3 else 0
    stride_b = b.strides[0] // 4 if b.ndim == 3 else 0
    gemm(
        (op_a, lda, a.data.ptr, stride_a),
        (op_b, ldb, b.data.ptr, stride_b),
        (out.data.ptr, n, m * n),
        m,
        n,
        k,
        batch,
    )
    return out
