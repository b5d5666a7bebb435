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


def to_numpy_dtype(name: str) -> np.dtype:
    """Return the NumPy dtype of a plan dtype name."""
    return NP_DTYPES[name]
