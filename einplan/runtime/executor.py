"""Executes one entry of a plan: bind sizes, run each step's kernel into preallocated
buffers, drop values at ``free_after``, and time every step.

Buffers (the arena) and kernels are prepared once per set of bound sizes and reused by every
later run with the same sizes, so a steady-state run allocates only its outputs.
"""

from __future__ import annotations

import functools
import os
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from einplan.compiler.dtypes import to_numpy_dtype
from einplan.compiler.ir import Graph
from einplan.compiler.names import CACHE_PREFIX, GRAD_PREFIX
from einplan.compiler.ops import Op
from einplan.errors import EinplanError
from einplan.runtime.backends import Backend, get_backend
from einplan.runtime.blas import blas_controller
from einplan.runtime.device import to_device
from einplan.runtime.load import busy_machine
from einplan.runtime.panels import PanelMatrix
from einplan.runtime.recorder import Recorder, debug_level
from einplan.runtime.steps import OutputRing, Prepared, Step, prepare_steps


class InputError(EinplanError):
    """Inputs or weights do not fit the plan (shape, dtype, size limits)."""


# a dim bounded by another at run time: the keys attended to cannot exceed the cache
CAPACITY = {"kv": "ctx"}


def memory_kind(n) -> str:
    """What a bound leaf's bytes are for: weights, or a state buffer's role by its key."""
    if n.op is Op.PARAM:
        return "weights"
    key = n.attrs["key"]
    if key.startswith(CACHE_PREFIX):
        return "kv_cache"
    return "gradients" if key.startswith(GRAD_PREFIX) else "optimizer_state"


def memory_breakdown(graph: Graph, arrays: dict[int, np.ndarray]) -> dict[str, int]:
    """Bytes of the arrays bound to a graph's leaves, by kind."""
    out = dict.fromkeys(("weights", "kv_cache", "gradients", "optimizer_state"), 0)
    for n in graph.nodes:
        if n.id in arrays and n.op in (Op.PARAM, Op.STATE):
            out[memory_kind(n)] += arrays[n.id].nbytes
    return out


@functools.cache
def missing_numba_hint() -> None:
    """Say once that quantised plans run faster with numba installed."""
    import sys

    sys.stderr.write(
        "einplan: quantised weights run on numpy kernels; pip install 'einplan[numba]' for "
        "compiled ones\n"
    )


class Executor:
    """Runs one entry point of a plan over bound parameters."""

    def __init__(
        self,
        graph: Graph,
        params: dict[str, np.ndarray],
        workers: int = 0,
        kernels: str | Backend | None = None,
    ) -> None:
        """``params`` maps checkpoint keys to arrays; ``workers``: 0 runs the plan as its schedule
        chose (compiler/passes/schedule.py: one step at a time or a pool, and how many BLAS
        threads), 1 one step at a time, n > 1 independent steps of a level on a pool of n (BLAS
        threads capped so workers x BLAS threads <= cores); ``kernels`` names the backend of
        the steps' kernels (runtime/backends; None: the fastest installed); a GPU backend's
        executor uploads the arrays once (those already on the device stay) and runs on the
        device (runtime/cuda)."""
        self.backend = get_backend(kernels)
        self.device_runner = None
        if self.backend.device == "cuda":
            from einplan.runtime.cuda.runner import CudaRunner

            self.device_runner = CudaRunner(graph, self.backend.cuda_graph)
        self.graph = graph
        self.nodes = graph.by_id()
        schedule = graph.meta.get("schedule", {})
        self.workers = workers = workers or schedule.get("workers", 0)
        self.params: dict[int, np.ndarray] = {}
        self.fixed_dims: dict[str, int] = {}  # symbolic dims of state buffers (ctx, batch)
        for n in graph.nodes:
            if n.op in (Op.PARAM, Op.STATE):
                key = n.attrs["key"]
                if key not in params:
                    raise InputError(f"no array bound for {n.op.value} {key}")
                arr = params[key]
                if isinstance(arr, PanelMatrix) and self.backend.pack is None:
                    arr = arr.unpack()  # packed for another backend: this one reads arrays
                arr = self._check_leaf(n, arr)
                self.params[n.id] = to_device(arr, self.backend.device, key)
        self._prepared: OrderedDict[tuple, Prepared] = OrderedDict()
        self.max_prepared = 2  # sets of sizes kept prepared (arenas and kernels)
        self._pool = ThreadPoolExecutor(workers) if workers > 1 else None
        self._quantized = any(n.op is Op.DEQUANTIZE for n in graph.nodes)
        self.blas_threads: int | None = schedule.get("blas_threads")  # None: BLAS's default
        if workers > 1:
            self.blas_threads = max(1, (os.cpu_count() or 1) // workers)
        elif self._quantized:  # quantised products split their rows over the cores themselves
            self.blas_threads = 1
        elif self.blas_threads is None and busy_machine():
            self.blas_threads = 1  # see busy_machine
        self.memory = memory_breakdown(graph, self.params)
        if kernels is None and self._quantized and self.backend.name == "numpy":
            missing_numba_hint()

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
        prepared = prepare_steps(
            self.graph, self.nodes, self.params, dims, self._pool is not None, self.backend
        )
        self._prepared[key] = prepared
        while len(self._prepared) > self.max_prepared:
            self._prepared.popitem(last=False)
        return prepared

    def run(
        self, inputs: dict[str, np.ndarray], recorder: Recorder | None = None
    ) -> dict[str, np.ndarray]:
        """Execute the entry on ``inputs`` and return its named outputs."""
        prepared = self.prepare(self.bind_dims(inputs))
        if recorder is None and debug_level():
            recorder = Recorder()  # EINPLAN_DEBUG: a throwaway recorder prints as it goes
        feeds = {}
        for n in self.graph.inputs():
            arr = np.asarray(inputs[n.name], dtype=to_numpy_dtype(n.dtype))
            feeds[n.name] = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)
        env: dict[int, np.ndarray] = {**self.params, **prepared.static}
        env.update({n.id: feeds[n.name] for n in self.graph.inputs()})
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
        if self.device_runner is not None:
            out = self.device_runner.run(prepared, self.params, feeds, recorder, run)
            if recorder:
                recorder.end_run(run)
            return out
        with np.errstate(over="ignore", under="ignore"):
            if self.blas_threads is None:
                self._run(prepared, env, recorder, run)
            else:
                with blas_controller().limit(limits=self.blas_threads, user_api="blas"):
                    self._run(prepared, env, recorder, run)
        if recorder:
            recorder.end_run(run)
        return {k: env[v] for k, v in self.graph.outputs.items()}

    def _run(self, prepared, env, recorder, run):
        if self._pool is None:
            self._run_sequential(prepared, env, recorder, run)
        else:
            self._run_pooled(prepared, env, recorder, run)

    @staticmethod
    def _run_step(step: Step, env, recorder, run, thread=0, free_now=True):
        out = step.out
        if type(out) is OutputRing:
            out = out.take()
        if recorder is None:
            env[step.node] = step.kernel([env[i] for i in step.inputs], out)
        else:
            t0 = time.perf_counter_ns()
            env[step.node] = step.kernel([env[i] for i in step.inputs], out)
            recorder.add(run, step.index, thread, t0, time.perf_counter_ns() - t0)
        if free_now:
            for f in step.free:
                del env[f]

    def _run_sequential(self, prepared, env, recorder, run):
        if recorder is not None:
            for step in prepared.steps:
                self._run_step(step, env, recorder, run)
            return
        for step in prepared.steps:  # the hot loop
            out = step.out
            if type(out) is OutputRing:
                out = out.take()
            env[step.node] = step.kernel([env[i] for i in step.inputs], out)
            for f in step.free:
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
                for f in steps[i].free:
                    del env[f]

    def steps_by_backend(self) -> dict[str, int]:
        """Steps per kernels backend in the binding prepared last (``{"numba": 121, ...}``)."""
        if not self._prepared:
            return {}
        table = next(reversed(self._prepared.values())).table
        out: dict[str, int] = {}
        for info in table:
            out[info.backend] = out.get(info.backend, 0) + 1
        return out

    def activation_bytes(self) -> int:
        """Bytes of the largest arena (buffers and scratch) prepared so far: the activations
        of this entry at the sizes it ran with."""
        return max((p.arena_bytes for p in self._prepared.values()), default=0)

    def close(self) -> None:
        """Stop the thread pool, if any."""
        if self._pool is not None:
            self._pool.shutdown()
