"""The plan's dtype names and their NumPy types (bf16 through ml-dtypes)."""

from __future__ import annotations

import ml_dtypes
import numpy as np

NP_DTYPES: dict[str, np.dtype] = {
    "f64": np.dtype(np.float64),
    "f32": np.dtype(np.float32),
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "f16": np.dtype(np.float16),
    "i64": np.dtype(np.int64),
    "i32": np.dtype(np.int32),
    "i8": np.dtype(np.int8),
    "u8": np.dtype(np.uint8),
}
DTYPE_NAMES = {v: k for k, v in NP_DTYPES.items()}
# compute dtypes that store values in 16 bits and compute them in float32 (mixed precision:
# compiler/passes/mixed_precision.py); the master weights and optimizer state stay float32
LOW_PRECISION = ("bf16", "f16")
COMPUTE_DTYPES = ("f32", "f64", *LOW_PRECISION)


def master_dtype(compute_dtype: str) -> str:
    """The dtype of the weights, optimizer state, loss and gradient accumulators of a model
    computed in ``compute_dtype``: float32 under mixed precision, else the compute dtype."""
    return "f32" if compute_dtype in LOW_PRECISION else compute_dtype


def to_numpy_dtype(name: str) -> np.dtype:
    """Return the NumPy dtype of a plan dtype name."""
    return NP_DTYPES[name]
