"""The KV cache: one preallocated (batch, kv_heads, ctx, head_dim) buffer per layer for keys
and one for values, shared by a plan's prefill and decode entry points."""

from __future__ import annotations

import numpy as np

from einplan.compiler.dtypes import to_numpy_dtype
from einplan.compiler.ir import Graph
from einplan.compiler.ops import ITEMSIZE
from einplan.compiler.symbolic import evaluate, numel, resolve_shape
from einplan.runtime.device import free_bytes
from einplan.runtime.memory_limit import check_fits


def allocate_states(graph: Graph, dims: dict[str, int], xp=np) -> dict[str, np.ndarray]:
    """Zeroed buffers for every state leaf of ``graph`` (KV cache, optimizer state), their
    symbolic dims bound by ``dims``, allocated by the array module ``xp`` (numpy, or cupy
    on a GPU), first checked to fit in the available memory (of the host, or the GPU's)."""
    nbytes = sum(evaluate(numel(n.shape), dims) * ITEMSIZE[n.dtype] for n in graph.states())
    what = f"the state buffers of {graph.name} (KV cache or optimizer state)"
    check_fits(nbytes, what, dims, gpu_free=free_bytes(xp))
    return {
        n.attrs["key"]: xp.zeros(resolve_shape(n.shape, dims), to_numpy_dtype(n.dtype))
        for n in graph.states()
    }


def allocate_cache(graph: Graph, batch: int, ctx: int, xp=np) -> dict[str, np.ndarray]:
    """Zeroed state buffers for every state leaf of ``graph`` at this batch and context."""
    return allocate_states(graph, {"batch": batch, "ctx": ctx}, xp)


def cache_bytes(cache: dict[str, np.ndarray]) -> int:
    """Total bytes of a cache."""
    return sum(a.nbytes for a in cache.values())
