"""Executes one entry of a plan: bind sizes, run each step's kernel into preallocated
buffers, drop values at ``free_after``, and time every step.

Buffers (the arena) and kernels are prepared once per set of bound sizes and reused by every
later run with the same sizes, so a steady-state run allocates only its outputs.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from threadpoolctl import ThreadpoolController, threadpool_limits

from einplan.compiler.dtypes import to_numpy_dtype
from einplan.compiler.ir import Graph, format_type, step_bytes
from einplan.compiler.ops import LEAVES, OPS, Op, count_flops
from einplan.compiler.symbolic import evaluate, poly_from_json, resolve_shape
from einplan.errors import EinplanError
from einplan.runtime.kernels import make_kernel
from einplan.runtime.recorder import Recorder, StepInfo, debug_level


class InputError(EinplanError):
    """Inputs or weights do not fit the plan (shape, dtype, size limits)."""


# views that only look at their input: over a buffer known before the run they are made once
PURE_VIEWS = (Op.RESHAPE, Op.SPLIT)

# a dim bounded by another at run time: the keys attended to cannot exceed the cache
CAPACITY = {"kv": "ctx"}


@functools.cache
def blas_controller() -> ThreadpoolController:
    """The BLAS libraries of this process (found once: looking them up takes milliseconds)."""
    return ThreadpoolController()


def memory_kind(n) -> str:
    """What a bound leaf's bytes are for: weights, or a state buffer's role by its key."""
    if n.op is Op.PARAM:
        return "weights"
    key = n.attrs["key"]
    if key.startswith("cache."):
        return "kv_cache"
    return "gradients" if key.startswith("grad.") else "optimizer_state"


def memory_breakdown(graph: Graph, arrays: dict[int, np.ndarray]) -> dict[str, int]:
    """Bytes of the arrays bound to a graph's leaves, by kind."""
    out = dict.fromkeys(("weights", "kv_cache", "gradients", "optimizer_state"), 0)
    for n in graph.nodes:
        if n.id in arrays and n.op in (Op.PARAM, Op.STATE):
            out[memory_kind(n)] += arrays[n.id].nbytes
    return out


class OutputRing:
    """Buffers for one graph output, recycled once the caller has dropped them.

    Outputs are handed to the caller, so a run must not overwrite one still in use; but a
    fresh 200 MB logits array per run costs tens of thousands of page faults. An array is
    reused only when nothing outside this ring refers to it (no variable, no view).
    """

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, keep: int = 2) -> None:
        self.shape, self.dtype, self.keep = shape, dtype, keep
        self.arrays: list[np.ndarray] = []

    def take(self) -> np.ndarray:
        """Return a free buffer: a recycled one, or a new one."""
        for arr in self.arrays:
            if sys.getrefcount(arr) == 3:  # the list, the loop variable, the call's argument
                return arr
        arr = np.empty(self.shape, self.dtype)
        if len(self.arrays) < self.keep:
            self.arrays.append(arr)
        return arr


@dataclass
class Prepared:
    """Everything a run needs for one binding of the symbolic dims."""

    dims: dict[str, int]
    steps: list[
        tuple
    ]  # (index, node id, kernel, input ids, out buffer or OutputRing, free ids, thread)
    levels: list[list[int]]  # step indices per dependency level
    table: list[StepInfo]  # per step: name, op, FLOPs, bytes, shapes, tags
    arena_bytes: int
    static: dict[int, np.ndarray]  # views fixed at prepare time (reshape, split of buffers)


class Executor:
    """Runs one entry point of a plan over bound parameters."""

    def __init__(self, graph: Graph, params: dict[str, np.ndarray], workers: int = 0) -> None:
        """``params`` maps checkpoint keys to arrays; ``workers`` > 1 runs independent steps of
        a level on a thread pool (BLAS threads capped so workers x BLAS threads <= cores)."""
        self.graph = graph
        self.nodes = graph.by_id()
        self.workers = workers
        self.params: dict[int, np.ndarray] = {}
        self.fixed_dims: dict[str, int] = {}  # symbolic dims of state buffers (ctx, batch)
        for n in graph.nodes:
            if n.op in (Op.PARAM, Op.STATE):
                key = n.attrs["key"]
                if key not in params:
                    raise InputError(f"no array bound for {n.op.value} {key}")
                self.params[n.id] = self._check_leaf(n, params[key])
        self._prepared: OrderedDict[tuple, Prepared] = OrderedDict()
        self._pool = ThreadPoolExecutor(workers) if workers > 1 else None
        self._quantized = any(n.op is Op.DEQUANTIZE for n in graph.nodes)
        self._blas_threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None
        self._small = graph.meta.get("schedule", {}).get("blas_threads") == 1
        self.memory = memory_breakdown(graph, self.params)

    def _check_leaf(self, n, arr: np.ndarray) -> np.ndarray:
        """Check a weight or state array against its leaf; bind the state's symbolic dims."""
        what = f"{'weight' if n.op is Op.PARAM else 'state'} {n.attrs['key']}"
        ok = arr.ndim == len(n.shape) and arr.dtype == to_numpy_dtype(n.dtype)
        for sym, size in zip(n.shape, arr.shape, strict=False):
            ok = ok and (
                sym == size
                if isinstance(sym, int)
                else self.fixed_dims.setdefault(sym, size) == size
            )
        if not ok:
            raise InputError(
                f"{what} is {arr.dtype}{list(arr.shape)}, the plan needs {n.dtype}{list(n.shape)}"
            )
        return arr

    def bind_dims(self, inputs: dict[str, np.ndarray]) -> dict[str, int]:
        """Read the symbolic dims off the input arrays, checking ranks, agreement and limits."""
        dims: dict[str, int] = dict(self.fixed_dims)
        for n in self.graph.inputs():
            if n.name not in inputs:
                raise InputError(
                    f"missing input {n.name!r} (plan inputs: "
                    f"{', '.join(x.name for x in self.graph.inputs())})"
                )
            arr = np.asarray(inputs[n.name])
            if arr.ndim != len(n.shape):
                raise InputError(
                    f"input {n.name!r} must have rank {len(n.shape)} "
                    f"{list(n.shape)}, got shape {list(arr.shape)}"
                )
            for sym, size in zip(n.shape, arr.shape, strict=True):
                if isinstance(sym, int):
                    if sym != size:
                        raise InputError(f"input {n.name!r}: dim of size {size}, plan needs {sym}")
                elif dims.setdefault(sym, size) != size:
                    raise InputError(
                        f"input {n.name!r}: {sym} is {size} here, {dims[sym]} in another input"
                    )
        for sym, size in dims.items():
            limit = min(self.graph.dims[sym], dims.get(CAPACITY.get(sym, sym), size))
            if not 1 <= size <= limit:
                raise InputError(
                    f"{sym}={size} is outside the limit 1..{limit}"
                    + (" (the KV cache's ctx)" if sym in CAPACITY else "")
                )
        return dims

    def prepare(self, dims: dict[str, int]) -> Prepared:
        """Allocate the arena and build the kernels for these dims (cached)."""
        key = tuple(sorted(dims.items()))
        if key in self._prepared:
            self._prepared.move_to_end(key)
            return self._prepared[key]
        g, nodes = self.graph, self.nodes
        slot_sizes = [evaluate(poly_from_json(s), dims) for s in g.meta["memory"]["slots"]]
        arena = [np.empty(max(s, 1), np.uint8) for s in slot_sizes]
        scratch_bufs: dict[tuple, np.ndarray] = {}
        steps, table, levels = [], [], {}
        fixed: dict[int, np.ndarray] = dict(self.params)  # arrays known before the run
        static: dict[int, np.ndarray] = {}  # views of fixed arrays, made once here
        carried_free: list[int] = []  # frees of a view step that no longer runs
        for n in g.nodes:
            if n.op in LEAVES:
                continue
            ann = g.annotations.get(n.id, {})
            # scratch is per thread slot only when steps of a level may run together: run one
            # after another, all steps share one set (272 optimizer updates would otherwise
            # each keep a scratch the size of their weight)
            thread = ann.get("thread", 0) if self._pool is not None else 0
            shape = resolve_shape(n.shape, dims)
            ins = [resolve_shape(nodes[i].shape, dims) for i in n.inputs]

            def scratch(role, mat, dtype, thread=thread):
                size = int(np.prod(mat))
                key = (thread, role, np.dtype(dtype).str)
                buf = scratch_bufs.get(key)
                if buf is None or buf.size < size:
                    buf = scratch_bufs[key] = np.empty(size, dtype)
                return buf[:size].reshape(mat)

            kernel = make_kernel(n, ins, shape, scratch)
            dtype = to_numpy_dtype(n.dtype)
            if n.op in PURE_VIEWS and all(i in fixed for i in n.inputs):
                view = kernel([fixed[i] for i in n.inputs], None)
                if view.base is not None:  # a true view (a reshape may have to copy)
                    fixed[n.id] = static[n.id] = view
                    carried_free += ann.get("free_after", [])
                    continue
            if OPS[n.op].alias:
                out = None
            elif ann.get("slot") is None:  # an output, or the buffer an output is a view of
                out = OutputRing(shape, dtype)
            else:
                nbytes = int(np.prod(shape)) * dtype.itemsize
                out = arena[ann["slot"]][:nbytes].view(dtype).reshape(shape)
            if isinstance(out, np.ndarray):
                fixed[n.id] = out
            index = len(steps)
            free = carried_free + ann.get("free_after", [])
            carried_free = []
            steps.append((index, n.id, kernel, n.inputs, out, free, thread))
            levels.setdefault(ann.get("level", index), []).append(index)
            in_nodes = [nodes[i] for i in n.inputs]
            in_shapes = [x.shape for x in in_nodes]
            table.append(
                StepInfo(
                    n.name,
                    n.op.value,
                    evaluate(count_flops(n.op, in_shapes, n.shape, n.attrs), dims),
                    evaluate(step_bytes(n, nodes), dims),
                    ", ".join(format_type(s, x.dtype) for s, x in zip(ins, in_nodes, strict=True))
                    + f" -> {format_type(shape, n.dtype)}",
                    tuple(sorted(n.tags)),
                )
            )
        # scratch for one binding is sized by the kernels built above
        arena_bytes = sum(slot_sizes) + sum(b.nbytes for b in scratch_bufs.values())
        prepared = Prepared(
            dict(dims), steps, [levels[k] for k in sorted(levels)], table, arena_bytes, static
        )
        self._prepared[key] = prepared
        while len(self._prepared) > 2:
            self._prepared.popitem(last=False)
        return prepared

    def run(
        self, inputs: dict[str, np.ndarray], recorder: Recorder | None = None
    ) -> dict[str, np.ndarray]:
        """Execute the entry on ``inputs`` and return its named outputs."""
        prepared = self.prepare(self.bind_dims(inputs))
        if recorder is None and debug_level():
            recorder = Recorder()  # EINPLAN_DEBUG: a throwaway recorder prints as it goes
        env: dict[int, np.ndarray] = {**self.params, **prepared.static}
        for n in self.graph.inputs():
            arr = np.asarray(inputs[n.name], dtype=to_numpy_dtype(n.dtype))
            env[n.id] = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)
        run = (
            recorder.begin_run(
                self.graph.name,
                prepared.dims,
                prepared.table,
                {**self.memory, "activations": prepared.arena_bytes},
            )
            if recorder
            else None
        )
        with np.errstate(over="ignore", under="ignore"):
            if self._pool is None and (self._quantized or self._small):
                # quantised products split their rows over two threads themselves; a plan of
                # small contractions runs on one BLAS thread (compiler/passes/schedule.py)
                with blas_controller().limit(limits=1, user_api="blas"):
                    self._run_sequential(prepared, env, recorder, run)
            elif self._pool is None:
                self._run_sequential(prepared, env, recorder, run)
            else:
                with threadpool_limits(self._blas_threads, user_api="blas"):
                    self._run_pooled(prepared, env, recorder, run)
        if recorder:
            recorder.end_run(run)
        return {k: env[v] for k, v in self.graph.outputs.items()}

    @staticmethod
    def _run_step(step, env, recorder, run, thread=0, free_now=True):
        index, nid, kernel, in_ids, out, free, _ = step
        if type(out) is OutputRing:
            out = out.take()
        if recorder is None:
            env[nid] = kernel([env[i] for i in in_ids], out)
        else:
            t0 = time.perf_counter_ns()
            env[nid] = kernel([env[i] for i in in_ids], out)
            recorder.add(run, index, thread, t0, time.perf_counter_ns() - t0)
        if free_now:
            for f in free:
                del env[f]

    def _run_sequential(self, prepared, env, recorder, run):
        if recorder is not None:
            for step in prepared.steps:
                self._run_step(step, env, recorder, run)
            return
        for _, nid, kernel, in_ids, out, free, _ in prepared.steps:  # the hot loop
            if type(out) is OutputRing:
                out = out.take()
            env[nid] = kernel([env[i] for i in in_ids], out)
            for f in free:
                del env[f]

    def _run_pooled(self, prepared, env, recorder, run):
        steps = prepared.steps
        for level in prepared.levels:
            if len(level) == 1:
                self._run_step(steps[level[0]], env, recorder, run)
                continue
            # siblings may read what one of them frees: free only once the level is done
            futures = [
                self._pool.submit(self._run_step, steps[i], env, recorder, run, k + 1, False)
                for k, i in enumerate(level[1:])
            ]
            self._run_step(steps[level[0]], env, recorder, run, 0, False)
            for f in futures:
                f.result()
            for i in level:
                for f in steps[i][5]:
                    del env[f]

    def activation_bytes(self) -> int:
        """Bytes of the largest arena (buffers and scratch) prepared so far: the activations
        of this entry at the sizes it ran with."""
        return max((p.arena_bytes for p in self._prepared.values()), default=0)

    def close(self) -> None:
        """Stop the thread pool, if any."""
        if self._pool is not None:
            self._pool.shutdown()
