"""The tags passes give nodes: what a node is for (a projection, the reverse graph, an update).

A :class:`Tag` is a string enum, so printed graphs and plan files hold the plain words.
"""

from __future__ import annotations

from enum import StrEnum


class Tag(StrEnum):
    """A node's role, set when the model is traced or by the pass that makes the node."""

    LINEAR = "linear"  # a projection x . W^T (models/llama.py), the unit quantised and packed
    PACKED = "packed"  # a projection reading a packed weight (passes/pack.py)
    QUANT = "quant"  # quantised weights, their dequantize and activation rounding
    LORA = "lora"  # a LoRA adapter's params and branch (passes/lora.py)
    FROZEN = "frozen"  # a parameter that gets no gradient (a LoRA base, a quantised weight)
    REVERSE = "reverse"  # the reverse graph (passes/autodiff.py)
    RECOMPUTE = "recompute"  # a forward value computed again in the reverse graph (checkpoint)
    OPTIMIZER = "optimizer"  # gradient accumulation, norm and updates (passes/optimizer.py)
    # arithmetic on 16-bit values done in float32: inputs upcast, every sum accumulated in
    # float32, the output rounded once (passes/mixed_precision.py)
    UPCAST = "upcast"
