"""Dependency levels, the critical path, and the order the runtime executes steps in.

Nodes of one level do not depend on each other (q/k/v projections, gate/up), so a thread
pool may run them together. The steps are reordered level by level so that sequential and
pooled execution see the same order, which the memory pass relies on for buffer reuse.

The pass also chooses how the plan runs (``meta.schedule``): one step at a time or a thread
pool over each level's independent steps, and one BLAS thread or all cores, by a cost model
of each step at typical sizes (:func:`choose_threads`); the compile summary says which and why,
and the executor follows it unless told otherwise.
"""

from __future__ import annotations

import os

import networkx as nx

from einplan.compiler.attrs import StepSchedule
from einplan.compiler.ir import Graph, Node, step_bytes
from einplan.compiler.ops import LEAVES, OPS, Op, count_flops
from einplan.compiler.pipeline import PassContext
from einplan.compiler.symbolic import evaluate


def run(graph: Graph, ctx: PassContext) -> Graph:
    """Assign each step its dependency level and a thread slot within that level, and choose
    how the plan runs: sequentially or on a thread pool, and with how many BLAS threads."""
    nodes = graph.by_id()
    dag = nx.DiGraph()
    for n in graph.nodes:
        if n.op in LEAVES:
            continue
        dag.add_node(n.id, flops=step_flops(n, nodes, ctx.typical_dims))
        dag.add_edges_from((i, n.id) for i in n.inputs if nodes[i].op not in LEAVES)
    level_of = sink_weight_steps(dag, nodes, asap_levels(dag))
    leaves = [n for n in graph.nodes if n.op in LEAVES]
    steps = sorted((n for n in graph.nodes if n.op not in LEAVES), key=lambda n: level_of[n.id])
    ann = dict(graph.annotations)
    width: dict[int, int] = {}
    for n in steps:
        lvl = level_of[n.id]
        ann[n.id] = StepSchedule(lvl, width.get(lvl, 0))
        width[lvl] = width.get(lvl, 0) + 1
    out = graph.replace_nodes(leaves + steps)
    out.annotations = ann
    for u, v in dag.edges:
        dag.edges[u, v]["flops"] = dag.nodes[v]["flops"]
    critical = nx.dag_longest_path(dag, weight="flops") if len(dag) else []
    levels: dict[int, list[Node]] = {}
    for n in steps:
        levels.setdefault(level_of[n.id], []).append(n)
    choice = choose_threads(list(levels.values()), nodes, ctx.typical_dims)
    out.meta["schedule"] = {
        "levels": len(width),
        "parallel_levels": sum(1 for w in width.values() if w > 1),
        "max_width": max(width.values(), default=0),
        "critical_path": [nodes[i].name for i in critical],
        **choice,
    }
    return out


def asap_levels(dag: nx.DiGraph) -> dict[int, int]:
    """Each step's dependency level: one more than the highest level among its inputs."""
    return {m: k for k, members in enumerate(nx.topological_generations(dag)) for m in members}


def sink_weight_steps(
    dag: nx.DiGraph, nodes: dict[int, Node], level_of: dict[int, int]
) -> dict[int, int]:
    """Move the steps that read only weights (a weight's bf16 cast), and the steps that read
    only those, to the level just before their first reader: as early as possible, all of a
    bf16 plan's weight copies would be made at the start and stay alive through the forward
    pass (measured: 255 of a 258 MiB peak on SmolLM2-135M 4x256)."""
    order = list(nx.topological_sort(dag))
    weight_only: set[int] = set()
    for m in order:
        n = nodes[m]
        if all(i in weight_only or nodes[i].op is Op.PARAM for i in n.inputs):
            weight_only.add(m)
    out = dict(level_of)
    for m in reversed(order):
        readers = [out[c] for c in dag.successors(m)]
        if m in weight_only and readers:
            out[m] = min(readers) - 1
    return out


def step_flops(n: Node, nodes: dict[int, Node], dims: dict[str, int]) -> int:
    """FLOPs of one step at ``dims``."""
    return evaluate(count_flops(n.op, [nodes[i].shape for i in n.inputs], n.shape, n.attrs), dims)


# The cost model the thread choice is made with: what one core of the 2-core AVX-512 hosts this
# was measured on sustains (einplan bench machine; benchmarks/threads.py), and what running a
# step on the pool costs over running it in place. A step takes max(FLOPs / CORE_FLOPS,
# bytes / CORE_BYTES) on one thread; a product (einsum, expert FFN) on t BLAS threads takes
# that / (1 + BLAS_GAIN * (t - 1)) once it is long enough to split (THREADED_PRODUCT_S).
CORE_FLOPS = 80e9  # forward GEMMs ran at 150-190 GFLOP/s on 2 cores (README, Numbers)
CORE_BYTES = 14e9  # decode streams its weights at 20-28 GB/s on 2 cores
BLAS_GAIN = 0.8  # a second BLAS thread makes a large product 1.8x faster, not 2x
THREADED_PRODUCT_S = 50e-6  # below this a product gains nothing from a second thread
POOL_STEP_S = 40e-6  # handing a step to a worker and joining it (Python futures, the GIL)
PRODUCTS = (Op.EINSUM, Op.MOE_EXPERT, Op.MOE_EXPERT_GRAD)


def step_seconds(n: Node, nodes: dict[int, Node], dims: dict[str, int]) -> float:
    """Estimated time of one step on one thread."""
    if OPS[n.op].alias:
        return 0.0
    nbytes = evaluate(step_bytes(n, nodes), dims)
    return max(step_flops(n, nodes, dims) / CORE_FLOPS, nbytes / CORE_BYTES)


def choose_threads(
    levels: list[list[Node]], nodes: dict[int, Node], dims: dict[str, int], cores: int = 0
) -> dict:
    """How a plan runs best by the cost model, at typical sizes: ``workers`` (0: sequential;
    n: a pool of n running a level's independent steps together, each with cores // n BLAS
    threads), ``blas_threads`` (1, or None for all cores), the estimated ms per run of each
    way, and ``threads_reason``, one sentence for the compile summary."""
    cores = cores or os.cpu_count() or 1
    est = {n.id: step_seconds(n, nodes, dims) for lvl in levels for n in lvl}
    products = [est[n.id] for lvl in levels for n in lvl if n.op in PRODUCTS]
    largest = max(products, default=0.0)
    threaded = cores > 1 and largest >= THREADED_PRODUCT_S

    def on(n: Node, threads: int) -> float:
        t = est[n.id]
        if n.op in PRODUCTS and threads > 1 and t >= THREADED_PRODUCT_S:
            return t / (1 + BLAS_GAIN * (threads - 1))
        return t

    sequential = sum(on(n, cores if threaded else 1) for lvl in levels for n in lvl)
    workers = min(cores, max((len(lvl) for lvl in levels), default=1))
    pooled = 0.0
    for lvl in levels:
        if len(lvl) == 1:
            pooled += on(lvl[0], cores if threaded else 1)
            continue
        bins = [0.0] * workers  # longest first onto the least loaded worker
        for t in sorted((on(n, max(1, cores // workers)) for n in lvl), reverse=True):
            bins[bins.index(min(bins))] += t
        pooled += max(bins) + POOL_STEP_S * (len(lvl) - 1)
    use_pool = workers > 1 and pooled < 0.9 * sequential
    if use_pool:
        reason = (
            f"a pool of {workers} is estimated {sequential / pooled:.2f}x faster than one "
            f"step at a time ({pooled * 1e3:.2f} vs {sequential * 1e3:.2f} ms)"
        )
    else:
        reason = (
            f"one step at a time: a pool is estimated no faster ({pooled * 1e3:.2f} vs "
            f"{sequential * 1e3:.2f} ms)"
        )
    if threaded:
        reason += f"; all {cores} BLAS threads: its largest product takes ~{largest * 1e3:.2f} ms"
        reason += " (1 while the machine is busy)"
    else:
        reason += f"; 1 BLAS thread: its largest product takes ~{largest * 1e3:.2f} ms"
    return {
        "workers": workers if use_pool else 0,
        "blas_threads": None if threaded else 1,
        "largest_product_us": largest * 1e6,
        "estimated_ms": {"sequential": sequential * 1e3, "pooled": pooled * 1e3},
        "threads_reason": reason,
    }
