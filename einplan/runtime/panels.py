"""Panel layout: a float32 (in, out) weight stored as column panels ``(out/32, in, 32)``, the
layout the numba backend's products read (runtime/backends/numba_panels.py).

A panel is 32 output columns over every input row: one contiguous run of ``in x 128`` bytes.
A product's tile (up to 8 input rows x one panel) reads its panel front to back, so every
weight byte comes from one sequential stream the prefetcher follows, and the tile's 8 x 32
sums stay in registers. From the row-major (in, out) matrix the same tile reads 128 bytes per
row at a stride of ``out x 4`` bytes, and BLAS re-packs each block before it multiplies: at
the 32-row products of a prompt OpenBLAS reaches ~100 GFLOP/s on SmolLM2's shapes, the
panels ~190 (2 cores, Zen 4; benchmarks/generate.py measures the end to end).

The layout is chosen when weights are bound, not in the plan: a backend that reads panels
repacks the weights it can (``Backend.pack_weights``), and an executor of another backend
given a packed weight unpacks it (runtime/executor.py). Packing moves the values, it does
not change them.
"""

from __future__ import annotations

import numpy as np

from einplan.compiler.ir import Node

PANEL = 32  # output columns per panel: two 16-float vectors


class PanelMatrix:
    """A float32 (in, out) weight held as panels; ``shape``, ``dtype``, ``ndim`` and
    ``nbytes`` are those of the matrix it stands for, so bookkeeping reads it as one."""

    def __init__(self, panels: np.ndarray) -> None:
        """``panels``: (out/32, in, 32) float32, C-contiguous (see pack_panels)."""
        p, k, w = panels.shape
        if w != PANEL or panels.dtype != np.float32 or not panels.flags.c_contiguous:
            raise ValueError(f"panels must be C-contiguous float32 (n, in, {PANEL})")
        self.panels = panels
        self.shape = (k, p * PANEL)
        self.dtype = panels.dtype
        self.ndim = 2
        self.nbytes = panels.nbytes

    def unpack(self) -> np.ndarray:
        """The (in, out) row-major matrix (a new array)."""
        p, k, w = self.panels.shape
        return np.ascontiguousarray(self.panels.transpose(1, 0, 2).reshape(k, p * w))


def packable(w: np.ndarray) -> bool:
    """Whether an array can be held as panels: a 2-D float32 matrix whose columns fill whole
    panels."""
    return (
        isinstance(w, np.ndarray)
        and w.ndim == 2
        and w.dtype == np.float32
        and w.shape[1] % PANEL == 0
        and w.size > 0
    )


def pack_panels(w: np.ndarray) -> PanelMatrix:
    """The panels of a float32 (in, out) matrix (see packable)."""
    if not packable(w):
        raise ValueError(f"cannot pack {w.dtype}{list(w.shape)} into {PANEL}-column panels")
    k, n = w.shape
    return PanelMatrix(np.ascontiguousarray(w.reshape(k, n // PANEL, PANEL).transpose(1, 0, 2)))


def mark_panels(node: Node) -> Node:
    """``node`` (a weight leaf) marked as bound to a PanelMatrix, for the kernel factories of
    its consumers (runtime/steps.py marks the leaves when it builds the kernels)."""
    return node.with_(attrs={**node.attrs, "layout": "panels"})


def is_panels(node: Node) -> bool:
    """Whether a factory's input node is a weight bound as panels (see mark_panels)."""
    return node.attrs.get("layout") == "panels"
