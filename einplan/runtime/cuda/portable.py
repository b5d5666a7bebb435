"""Kernels of the cuda device written against the array module ``xp``, so that they run (and
are tested) with NumPy too. They read no device value back to the host: a CUDA graph captures
them whole."""

from __future__ import annotations

import numpy as np

from einplan.runtime.kernels import Kernel, scalar_type

# splitmix64's constants: a counter-based hash, so a mask is a pure function of (seed, stream,
# element) and needs no generator state on the host
GOLDEN, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def hashed_uniform(xp, seed, stream: int, n: int):
    """``n`` floats in [0, 1) from splitmix64 of (seed, stream, element index); ``seed`` is a
    0-d integer array (on the device for cupy)."""
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is the hash
        key = seed.astype(np.uint64) * np.uint64(GOLDEN) + np.uint64(stream * MIX2 % 2**64)
        z = xp.arange(n, dtype=np.uint64) * np.uint64(GOLDEN) + key
        z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)


def make_dropout(node, shapes, out_shape, scratch, xp=np) -> Kernel:
    """Inverted dropout with a mask hashed from (seed input, the node's stream, element): the
    same rate and scaling as the CPU kernel, other (but equally seeded) masks."""
    p, stream = node.attrs["p"], node.attrs["stream"]
    keep = scalar_type(node)(1.0 / (1.0 - p))
    n = int(np.prod(out_shape))

    def dropout(ins, out):
        x, seed = ins
        kept = hashed_uniform(xp, seed, stream, n).reshape(x.shape) >= np.float32(p)
        xp.multiply(x, kept, out=out)
        out *= keep
        return out

    return dropout
