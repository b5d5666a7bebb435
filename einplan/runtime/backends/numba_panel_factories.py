"""Which weights the numba backend holds as panels (runtime/panels.py), and the kernel of a
product that reads them (runtime/backends/numba_panels.py).

A weight is packed when every step that reads it, in every entry of the plan, is a float32
``x . W`` product of the (in, out) weight (``reads_panels``): the projections of inference
plans (compiler/passes/pack.py stores them so). A weight that anything else reads stays as it
is: the tied embedding (a gather reads its rows), the weights of a plan with training entries
(their gradients read W transposed), quantised and mixture-of-experts weights. The factory
takes every product of a packed weight, whatever its number of rows; products of weights
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
from einplan.errors import EinplanError
from einplan.runtime.backends.numba_decode_factories import is_gemv
from einplan.runtime.panels import is_panels, pack_panels, packable


def reads_panels(node: Node, inputs: list[Node]) -> bool:
    """Whether a step is a product the panel kernel computes: a float32 ``...i,io->...o``
    einsum whose second operand is a weight leaf (and whose first is not that weight)."""
    if node.op is not Op.EINSUM or len(inputs) != 2 or inputs[1].op is not Op.PARAM:
        return False
    if inputs[0].id == inputs[1].id or node.dtype != "f32":
        return False
    if any(n.dtype != "f32" for n in inputs):
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
                good = pos == 1 and reads_panels(n, [nodes[j] for j in n.inputs])
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
    weight is bound as an array."""
    if len(inputs) != 2 or not is_panels(inputs[1]):
        return None
    if not reads_panels(node, inputs):
        raise EinplanError(
            f"step {node.name} reads weight {inputs[1].name} held as panels but is not a "
            "float32 x . W product: report this (runtime/backends/numba_panel_factories.py)"
        )
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


PANEL_FACTORIES = {Op.EINSUM: make_panel_product}
