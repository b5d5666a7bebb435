"""The numba backend: compiled kernels where they beat numpy's, numpy's everywhere else.

The quantised weights: products with few input rows (decode, short prompts)
read the packed integers directly (runtime/backends/numba_kernels.py), and the embedding
gather of a quantised table dequantises only its rows in one pass. Products with more rows
keep numpy's dequantise-a-block + BLAS GEMM, which wins once a block is reused by enough
rows (``MAX_ROWS``, measured by ``einplan bench kernels``). And float32
decode (runtime/backends/numba_decode_factories.py): the GEMV of packed (in, out) weights and
one compiled kernel per op between the products.

This module does not import numba: the kernels module is imported when a factory first
builds a compiled kernel, so a plan with nothing to compile never pays numba's import.
"""

from __future__ import annotations

import math

import numpy as np

from einplan.compiler.attrs import QMatmulRecipe
from einplan.compiler.ops import Op
from einplan.runtime.backends.base import Backend
from einplan.runtime.backends.numba_decode_factories import DECODE_FACTORIES
from einplan.runtime.backends.numba_exp_factories import EXP_FACTORIES
from einplan.runtime.backends.numba_panel_factories import PANEL_FACTORIES, pack_weights
from einplan.runtime.kernels import make_gather
from einplan.runtime.qmatmul import QuantizedMatrix

# products with at most this many input rows run compiled; above it, numpy's block GEMM
# (measured on SmolLM2-135M shapes, 2 cores AVX-512: see einplan bench kernels)
MAX_ROWS = 16


def compiled():
    """The compiled kernels module (imports numba on first use)."""
    from einplan.runtime.backends import numba_kernels

    return numba_kernels


def compiled_int4():
    """The int4 kernels module (imports numba on first use)."""
    from einplan.runtime.backends import numba_int4

    return numba_int4


def make_qmatmul(node, shapes, out_shape, scratch, inputs):
    """``x . W^T`` reading the packed weight, for at most MAX_ROWS rows of x; else None."""
    r = node.attrs.get("recipe")
    if not isinstance(r, QMatmulRecipe) or r.transposed or r.bits not in (4, 8):
        return None
    m = math.prod(int(d) for d in shapes[0][:-1])
    if m > MAX_ROWS:
        return None
    nk = compiled()
    n_out = out_shape[-1]
    kernel = nk.q8_matmul if r.bits == 8 else compiled_int4().q4_kernel(r.group, shapes[1][1] // 2)

    def qmatmul(ins, out):
        x, w = ins
        x2, o2 = x.reshape(m, x.shape[-1]), out.reshape(m, n_out)
        if r.bits == 8:
            kernel(x2, w.q, w.scale, w.zero_f32, o2)
        else:
            kernel(x2, w.q, w.scale, w.zero_f32, w.group, o2)
        return out

    return qmatmul


def make_qgather(node, shapes, out_shape, scratch, inputs):
    """An embedding lookup in a quantised (vocab, d) table; None for a float table."""
    if node.attrs.get("transposed") or inputs[0].op is not Op.DEQUANTIZE:
        return None
    nk = compiled()
    fallback = make_gather(node, shapes, out_shape, scratch)

    def qgather(ins, out):
        table, ids = ins
        if not isinstance(table, QuantizedMatrix):
            return fallback(ins, out)
        flat_ids = np.ascontiguousarray(ids.reshape(-1), dtype=np.int64)
        flat = out.reshape(-1, table.cols)
        t = table
        nk.q_take_rows(flat_ids, t.q, t.scale, t.zero_f32, t.bits, t.group, flat)
        return out

    return qgather


QUANT_FACTORIES = {Op.EINSUM: make_qmatmul, Op.GATHER: make_qgather}


def first_of(*factories):
    """A factory trying ``factories`` in order: the first kernel one of them makes, else None."""

    def factory(node, shapes, out_shape, scratch, inputs):
        for f in factories:
            kernel = f(node, shapes, out_shape, scratch, inputs)
            if kernel is not None:
                return kernel
        return None

    return factory


def merge_tables(*tables: dict) -> dict:
    """One table from several: an op in more than one tries their factories in order."""
    ops = dict.fromkeys(op for t in tables for op in t)
    return {op: first_of(*(t[op] for t in tables if op in t)) for op in ops}


NUMBA = Backend(
    "numba",
    merge_tables(PANEL_FACTORIES, QUANT_FACTORIES, DECODE_FACTORIES, EXP_FACTORIES),
    pack=pack_weights,
)
