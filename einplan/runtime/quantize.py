"""Quantisation arithmetic: weights to packed integers and scales, activations fake-quantised.

Weights are quantised per (output row, group of ``group`` inputs): int8 uses one group per row
(per output channel), int4 groups of 32/64/128. Symmetric: ``w = s * q``, ``q`` in
[-127, 127] (int8, stored i8) or [-7, 7] (int4, stored as ``q + 8`` in 0..15). Asymmetric:
``w = s * (u - z)`` with ``u`` and the zero point ``z`` in 0..255 or 0..15 (stored u8); the
range always holds 0, so zero weights stay exact.

int4 layout: two values per byte, byte ``k`` of a row holding element ``k`` in its low nibble
and element ``k + in/2`` in its high nibble, so that unpacking writes the two halves of each
row as two long contiguous runs and never interleaves (the groups of the scales are in element
order, whatever the packing).
"""

from __future__ import annotations

import numpy as np

ROWS_PER_CHUNK = 2048  # quantise big matrices in row chunks: float temporaries stay small


def qmax(bits: int, symmetric: bool) -> int:
    """Largest stored level: 127/7 (symmetric, around 0) or 255/15 (asymmetric, from 0)."""
    if symmetric:
        return 127 if bits == 8 else 7
    return 255 if bits == 8 else 15


def pack_int4(u: np.ndarray) -> np.ndarray:
    """Pack (rows, in) values in 0..15 into (rows, in/2) bytes: the first half of each row in
    the low nibbles, the second half in the high nibbles."""
    half = u.shape[1] // 2
    v = u.astype(np.uint8)
    return v[:, :half] | (v[:, half:] << 4)


def unpack_int4(p: np.ndarray) -> np.ndarray:
    """Unpack (rows, in/2) bytes into (rows, in) values in 0..15 (inverse of pack_int4)."""
    return np.concatenate([p & 0x0F, p >> 4], axis=1)


def _quantize_rows(w: np.ndarray, bits: int, group: int, symmetric: bool) -> dict:
    rows, n_in = w.shape
    g = w.astype(np.float32, copy=False).reshape(rows, n_in // group, group)
    top = qmax(bits, symmetric)
    if symmetric:
        scale = np.abs(g).max(axis=-1) / np.float32(top)
        safe = np.where(scale > 0, scale, np.float32(1))[..., None]
        q = np.clip(np.rint(g / safe), -top, top)
        parts = {"scale": scale.astype(np.float32)}
        u = q.astype(np.int8) if bits == 8 else (q + 8).astype(np.uint8)
    else:
        lo = np.minimum(g.min(axis=-1), 0)
        hi = np.maximum(g.max(axis=-1), 0)
        scale = ((hi - lo) / np.float32(top)).astype(np.float32)
        safe = np.where(scale > 0, scale, np.float32(1))
        zero = np.clip(np.rint(-lo / safe), 0, top)
        u = np.clip(np.rint(g / safe[..., None]) + zero[..., None], 0, top).astype(np.uint8)
        parts = {"scale": scale, "zero_point": zero.astype(np.uint8)}
    u = u.reshape(rows, n_in)
    parts["q"] = u if bits == 8 else pack_int4(u)
    return parts


def quantize_weight(w: np.ndarray, bits: int, group: int, symmetric: bool) -> dict:
    """Quantise an (out, in) float matrix: ``{"q", "scale"[, "zero_point"]}`` as stored in a
    plan's params (see compiler/quant_scheme.py stored_layout), in row chunks."""
    chunks = [
        _quantize_rows(w[r : r + ROWS_PER_CHUNK], bits, group, symmetric)
        for r in range(0, w.shape[0], ROWS_PER_CHUNK)
    ]
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def fake_quantize(
    x: np.ndarray, bits: int, absmax: np.ndarray | None = None, out: np.ndarray | None = None
) -> np.ndarray:
    """Round ``x`` to symmetric ``bits``-bit levels and back, with the scale max |x| / qmax
    taken per token (row of the last axis) when ``absmax`` is None, else from the static
    ``absmax`` measured on calibration text (values beyond it are clipped)."""
    top = np.float32(qmax(bits, True))
    if absmax is None:
        absmax = np.abs(x).max(axis=-1, keepdims=True)
    scale = np.where(absmax > 0, absmax / top, np.float32(1)).astype(np.float32)
    out = np.divide(x, scale, out=out)
    np.rint(out, out=out)
    np.clip(out, -top, top, out=out)
    out *= scale
    return out
