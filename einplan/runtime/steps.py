"""The steps of one binding of a plan's symbolic dims: each step's kernel, where its output
lives (its arena slot, or a ring of arrays for a graph output), the values dead after it, and
its row of the recorder's table. The executor prepares them once per set of sizes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from einplan.compiler.arena import plan_arena
from einplan.compiler.attrs import StepSchedule
from einplan.compiler.dtypes import to_numpy_dtype
from einplan.compiler.ir import Graph, Node, format_type, step_bytes
from einplan.compiler.ops import ITEMSIZE, LEAVES, OPS, Op, count_flops
from einplan.compiler.symbolic import evaluate, numel, resolve_shape
from einplan.runtime.backends import NUMPY, Backend
from einplan.runtime.device import free_bytes
from einplan.runtime.kernels import Kernel, Scratch
from einplan.runtime.memory_limit import check_fits
from einplan.runtime.panels import PanelMatrix, mark_panels
from einplan.runtime.qmatmul import QuantizedMatrix
from einplan.runtime.recorder import StepInfo

# views that only look at their input: over a buffer known before the run they are made once
PURE_VIEWS = (Op.RESHAPE, Op.SPLIT)


class OutputRing:
    """Buffers for one graph output, recycled once the caller has dropped them.

    Outputs are handed to the caller, so a run must not overwrite one still in use; but a
    fresh 200 MB logits array per run costs tens of thousands of page faults. An array is
    reused only when nothing outside this ring refers to it (no variable, no view).
    """

    def __init__(
        self, shape: tuple[int, ...], dtype: np.dtype, keep: int = 2, empty=np.empty
    ) -> None:
        """``empty(shape, dtype)`` allocates a buffer (a GPU run: pinned host memory)."""
        self.shape, self.dtype, self.keep, self.empty = shape, dtype, keep, empty
        self.arrays: list[np.ndarray] = []

    def take(self) -> np.ndarray:
        """Return a free buffer: a recycled one, or a new one."""
        for arr in self.arrays:
            if sys.getrefcount(arr) == 3:  # the list, the loop variable, the call's argument
                return arr
        arr = self.empty(self.shape, self.dtype)
        if len(self.arrays) < self.keep:
            self.arrays.append(arr)
        return arr


@dataclass(slots=True)
class Step:
    """One step of a prepared run: the kernel that computes value ``node`` from ``inputs``
    into ``out``, and the values dead once it has run."""

    index: int  # position in Prepared.steps and Prepared.table
    node: int
    kernel: Kernel
    inputs: tuple[int, ...]
    out: np.ndarray | OutputRing | None  # None: a view, which writes nothing
    free: list[int]


class ScratchBuffers:
    """Scratch arrays the kernels of one binding ask for, one per (thread slot, role, dtype),
    each as large as the largest request."""

    def __init__(self, xp=np) -> None:
        self.xp = xp  # the array module the buffers are allocated by (numpy, cupy)
        self.buffers: dict[tuple[int, str, str], np.ndarray] = {}

    def for_thread(self, thread: int) -> Scratch:
        """The scratch function the kernels of thread slot ``thread`` get."""

        def scratch(role: str, mat: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
            size = int(np.prod(mat))
            key = (thread, role, np.dtype(dtype).str)
            buf = self.buffers.get(key)
            if buf is None or buf.size < size:
                buf = self.buffers[key] = self.xp.empty(size, dtype)
            return buf[:size].reshape(mat)

        return scratch

    def nbytes(self) -> int:
        """Bytes of every scratch array."""
        return sum(b.nbytes for b in self.buffers.values())


def fixed_view(n: Node, kernel: Kernel, fixed: dict[int, np.ndarray]) -> np.ndarray | None:
    """The view a reshape or split step makes of arrays known before the run, or the handle a
    dequantize step makes of a packed weight (runtime/qmatmul.py: no float copy), made once
    now; None when the step must run each time (its input is computed, a reshape copies, or
    the dequantize writes floats). A quantised decode token skips 4 steps a layer so."""
    if n.op not in (*PURE_VIEWS, Op.DEQUANTIZE) or any(i not in fixed for i in n.inputs):
        return None
    view = kernel([fixed[i] for i in n.inputs], None)
    if n.op is Op.DEQUANTIZE:
        return view if isinstance(view, QuantizedMatrix) else None
    return view if view.base is not None else None


def output_buffer(
    ann: StepSchedule,
    shape: tuple[int, ...],
    dtype: np.dtype,
    arena: np.ndarray,
    offset: int | None,
    alias: bool,
    xp=np,
) -> np.ndarray | OutputRing | None:
    """Where a step writes: its bytes of the arena from ``offset`` (compiler/arena.py), a ring
    of fresh arrays for a graph output (no slot; on a device, one fixed buffer that the run
    copies back to the host), or nothing for a view (``alias``)."""
    if alias:
        return None
    if ann.slot is None:  # an output, or the buffer an output is a view of
        return OutputRing(shape, dtype) if xp is np else xp.empty(shape, dtype)
    assert offset is not None
    nbytes = int(np.prod(shape)) * dtype.itemsize
    return arena[offset : offset + nbytes].view(dtype).reshape(shape)


def step_info(
    n: Node,
    nodes: dict[int, Node],
    ins: list[tuple[int, ...]],
    shape: tuple[int, ...],
    dims: dict[str, int],
    backend: str = "numpy",
) -> StepInfo:
    """The recorder's row for a step: name, op, FLOPs and bytes at these dims, the bound
    shapes of its inputs and output, its tags, the backend of its kernel."""
    in_nodes = [nodes[i] for i in n.inputs]
    flops = count_flops(n.op, [x.shape for x in in_nodes], n.shape, n.attrs)
    types = ", ".join(format_type(s, x.dtype) for s, x in zip(ins, in_nodes, strict=True))
    return StepInfo(
        n.name,
        n.op.value,
        evaluate(flops, dims),
        evaluate(step_bytes(n, nodes), dims),
        f"{types} -> {format_type(shape, n.dtype)}",
        tuple(sorted(n.tags)),
        backend,
    )


def _bound(dims: dict[str, int]) -> str:
    return ", ".join(f"{k}={v:,}" for k, v in sorted(dims.items())) or "fixed sizes"


@dataclass
class Prepared:
    """Everything a run needs for one binding of the symbolic dims."""

    dims: dict[str, int]
    steps: list[Step]
    levels: list[list[int]]  # step indices per dependency level
    table: list[StepInfo]  # per step: name, op, FLOPs, bytes, shapes, tags
    arena_bytes: int
    static: dict[int, np.ndarray]  # views fixed at prepare time (reshape, split of buffers)
    device_state: object = None  # a device's per-binding state (runtime/cuda: CUDA graph)


def prepare_steps(
    graph: Graph,
    nodes: dict[int, Node],
    params: dict[int, np.ndarray],
    dims: dict[str, int],
    pooled: bool,
    backend: Backend = NUMPY,
) -> Prepared:
    """Make every step of ``graph`` for these dims: its kernel, its output buffer in the arena, its
    recorder row; views of arrays known before the run (``params``) are made here once, not
    as steps. ``pooled``: steps of a level may run together, each thread slot needs its own
    scratch. ``backend`` gives each step's kernel (runtime/backends)."""
    layout = plan_arena(graph, dims)
    outputs = sum(
        evaluate(numel(nodes[v].shape), dims) * ITEMSIZE[nodes[v].dtype]
        for v in set(graph.outputs.values())
    )
    xp = backend.xp
    what = f"running {graph.name} ({_bound(dims)})"
    check_fits(layout.nbytes + outputs, what, dims, gpu_free=free_bytes(xp))
    arena = xp.empty(max(layout.nbytes, 1), np.uint8)
    scratch = ScratchBuffers(xp)
    steps: list[Step] = []
    table: list[StepInfo] = []
    levels: dict[int, list[int]] = {}
    fixed: dict[int, np.ndarray] = dict(params)  # arrays known before the run
    static: dict[int, np.ndarray] = {}  # views of fixed arrays, made once here
    carried_free: list[int] = []  # frees of a view step that no longer runs
    for n in graph.nodes:
        if n.op in LEAVES:
            continue
        ann = graph.annotations[n.id]
        # scratch is per thread slot only when steps of a level may run together: run one
        # after another, all steps share one set (272 optimizer updates would otherwise
        # each keep a scratch the size of their weight)
        thread = ann.thread if pooled else 0
        shape = resolve_shape(n.shape, dims)
        ins = [resolve_shape(nodes[i].shape, dims) for i in n.inputs]
        in_nodes = [
            mark_panels(nodes[i]) if isinstance(params.get(i), PanelMatrix) else nodes[i]
            for i in n.inputs
        ]
        kernel, made_by = backend.kernel_for(n, ins, shape, scratch.for_thread(thread), in_nodes)
        view = fixed_view(n, kernel, fixed)
        if view is not None:
            fixed[n.id] = static[n.id] = view
            carried_free += ann.free_after
            continue
        out = output_buffer(
            ann,
            shape,
            to_numpy_dtype(n.dtype),
            arena,
            layout.offsets.get(n.id),
            OPS[n.op].alias,
            xp,
        )
        if out is not None and not isinstance(out, OutputRing):
            fixed[n.id] = out
        step = Step(len(steps), n.id, kernel, n.inputs, out, [*carried_free, *ann.free_after])
        carried_free = []
        steps.append(step)
        levels.setdefault(ann.level, []).append(step.index)
        table.append(step_info(n, nodes, ins, shape, dims, made_by))
    # scratch for one binding is sized by the kernels built above
    arena_bytes = layout.nbytes + scratch.nbytes()
    return Prepared(
        dict(dims), steps, [levels[k] for k in sorted(levels)], table, arena_bytes, static
    )
