"""Which weights the numba backend holds as panels (runtime/panels.py), and the kernel of a
product that reads them (runtime/backends/numba_panels.py).

A weight is packed when every step that reads it, in every entry of the plan, is a float32
``x . W`` product of the (in, out) weight or the gather of a tied (d, vocab) embedding table
(``reads_panels``): the projections and the LM head of inference plans
(compiler/passes/pack.py stores them so). A weight that anything else reads stays as it is:
the weights of a plan with training entries (their gradients read W transposed), an untied
(vocab, d) embedding, quantised and mixture-of-experts weights. The factories take every
product of a packed weight, whatever its number of rows, and its gather; products of weights
bound unpacked keep the GEMV/BLAS kernels (numba_decode_factories.py).

This module does not import numba: the kernels module is imported when a factory first
builds a kernel.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from einplan.compiler.ir import Node
from einplan.compiler.ops import Op
from einplan.runtime.backends.numba_decode_factories import is_gemv
from einplan.runtime.panels import PANEL, is_panels, pack_panels, packable


def reads_panels(node: Node, inputs: list[Node], pos: int) -> bool:
    """Whether a step reads its input ``pos`` (a weight leaf) through a panel kernel: as the
    weight of a float32 ``...i,io->...o`` product (``pos`` 1), or as the (d, vocab) table of
    a float32 gather of columns (``pos`` 0: a tied embedding, whose head is such a product)."""
    if node.dtype != "f32" or inputs[pos].op is not Op.PARAM or inputs[pos].dtype != "f32":
        return False
    if node.op is Op.GATHER:
        return pos == 0 and bool(node.attrs.get("transposed"))
    if node.op is not Op.EINSUM or len(inputs) != 2 or pos != 1:
        return False
    if inputs[0].id == inputs[1].id or inputs[0].dtype != "f32":
        return False
    return is_gemv(node, [n.shape for n in inputs])


def panel_keys(plan: Any) -> set[str]:
    """The checkpoint keys of the plan's weights that every reader, in every entry, reads
    through ``reads_panels`` (see the module docstring)."""
    ok: dict[str, bool] = {}
    for graph in plan.entries.values():
        nodes = graph.by_id()
        outputs = set(graph.outputs.values())
        for n in graph.nodes:
            for pos, i in enumerate(n.inputs):
                leaf = nodes[i]
                if leaf.op is not Op.PARAM:
                    continue
                good = reads_panels(n, [nodes[j] for j in n.inputs], pos)
                key = leaf.attrs["key"]
                ok[key] = ok.get(key, True) and good and i not in outputs
    return {k for k, good in ok.items() if good}


def pack_weights(plan: Any, arrays: dict[str, Any]) -> dict[str, Any]:
    """Hold each weight of ``panel_keys`` as panels, in place: each packed weight replaces its
    array in ``arrays`` (returned), one at a time, so an array nothing else holds is freed
    before the next is packed and binding never holds two copies of the weights."""
    for key in panel_keys(plan):
        if key in arrays and packable(arrays[key]):
            arrays[key] = pack_panels(arrays[key])
    return arrays


def kernels():
    """The compiled panel kernels module (imports numba on first use)."""
    from einplan.runtime.backends import numba_panels

    return numba_panels


def make_panel_product(node, shapes, out_shape, scratch, inputs):
    """``x . W`` for a weight bound as panels, for any number of rows of x; None when the
    weight is bound as an array (a step that declines a weight held as panels is refused by
    Backend.kernel_for)."""
    if len(inputs) != 2 or not is_panels(inputs[1]) or not reads_panels(node, inputs, 1):
        return None
    nk = kernels()
    from numba import get_num_threads

    threads = get_num_threads()
    m = math.prod(int(d) for d in shapes[0][:-1])
    k_in, n = shapes[1]

    def product(ins, out):
        x, w = ins
        x2 = np.ascontiguousarray(x.reshape(m, k_in))
        if out.flags.c_contiguous:
            nk.panel_matmul(x2, w.panels, out.reshape(m, n), threads)
        else:  # (the arena's buffers are contiguous; a strided output gets a copy)
            tmp = np.empty((m, n), np.float32)
            nk.panel_matmul(x2, w.panels, tmp, threads)
            out[...] = tmp.reshape(out.shape)
        return out

    return product


def make_panel_gather(node, shapes, out_shape, scratch, inputs):
    """The embedding lookup of a tied (d, vocab) table bound as panels: token v is column
    v % 32 of panel v // 32 (a strided read of d values per token); None for an array."""
    if not inputs or not is_panels(inputs[0]) or not reads_panels(node, inputs, 0):
        return None
    d = shapes[0][0]

    def gather_panels(ins, out):
        table, ids = ins
        flat = np.asarray(ids).reshape(-1)  # (ids past the table raise IndexError, as numpy's)
        out.reshape(-1, d)[...] = table.panels[flat // PANEL, :, flat % PANEL]
        return out

    return gather_panels


PANEL_FACTORIES = {Op.EINSUM: make_panel_product, Op.GATHER: make_panel_gather}
