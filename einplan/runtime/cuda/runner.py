"""Runs a prepared binding of a plan on the GPU: inputs copied into fixed device buffers, the
steps launched one by one (the first run of a binding; every run with a recorder, timed by
CUDA events; every run with ``--no-cuda-graph``) or replayed as one captured CUDA graph, and
only the plan's outputs copied back to the host.

Capture needs a run that allocates nothing new: the arena and scratch are fixed, and the few
temporaries CuPy makes inside a kernel come from a memory pool private to the binding, filled
by the first (uncaptured) run, so the captured run is served from it and its addresses stay
the graph's alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from einplan.compiler.ir import Graph
from einplan.compiler.ops import Op
from einplan.compiler.symbolic import resolve_shape
from einplan.runtime.device import DeviceError, cupy_module, device_stream
from einplan.runtime.recorder import Recorder
from einplan.runtime.steps import OutputRing, Prepared

ALIGN = 256  # bytes between the inputs in their staging buffers


@dataclass
class BindingState:
    """A binding's device side: input buffers (one pinned host block copied to one device
    block per run), output rings of pinned host arrays, private memory pool, captured graph."""

    host: object  # pinned host block of every input
    device: object  # device block of every input
    host_inputs: dict[str, np.ndarray]  # input name -> view of ``host``
    inputs: dict[int, object]  # input node id -> view of ``device`` (fixed for the graph)
    rings: dict[str, OutputRing]  # output name -> pinned host arrays it is copied into
    pool: object  # cupy.cuda.MemoryPool of the kernels' temporaries
    runs: int = 0
    graph: object = None  # cupy.cuda.graph.Graph once captured
    outputs: dict[str, object] = field(default_factory=dict)  # the captured run's outputs
    events: list = field(default_factory=list)  # CUDA events of a timed run


class CudaRunner:
    """Runs the bindings of one entry (Executor's device half)."""

    def __init__(self, graph: Graph, use_graph: bool = True) -> None:
        """``use_graph``: capture each binding's second run into a CUDA graph and replay it."""
        self.cp = cupy_module()
        self.stream = device_stream()
        self.graph, self.use_graph = graph, use_graph
        nodes = graph.by_id()
        # cache writes at a slot given as an input: checked on the host before each run
        self.slot_checks = {
            nodes[n.inputs[2]].name: (nodes[n.inputs[1]].shape, n.shape)
            for n in graph.nodes
            if n.op is Op.KV_APPEND and nodes[n.inputs[2]].op is Op.INPUT
        }

    def check_slots(self, feeds: dict[str, np.ndarray], dims: dict[str, int]) -> None:
        """Refuse a KV cache write past the attended slots, as the CPU kernel does."""
        for name, (new_shape, out_shape) in self.slot_checks.items():
            p = int(feeds[name].reshape(-1)[0])
            s, kv = resolve_shape(new_shape, dims)[1], resolve_shape(out_shape, dims)[2]
            if not 0 <= p <= kv - s:
                raise IndexError(f"KV cache write at slot {p} of {s} entries exceeds kv={kv}")

    def run(
        self,
        prepared: Prepared,
        params: dict[int, object],
        feeds: dict[str, np.ndarray],
        recorder: Recorder | None,
        run: int | None,
    ) -> dict[str, np.ndarray]:
        """One run of ``prepared`` on host ``feeds``; the outputs as NumPy arrays."""
        cp = self.cp
        self.check_slots(feeds, prepared.dims)
        state = prepared.device_state
        if state is None:
            state = prepared.device_state = self._bind(feeds)
        for name, view in state.host_inputs.items():
            np.copyto(view, feeds[name])
        # work queued on the default stream (uploads, a cache zeroed) comes first
        self.stream.wait_event(cp.cuda.Stream.null.record())
        with self.stream:
            state.device.set(state.host, self.stream)
            env = {**params, **prepared.static, **state.inputs}
            if recorder is not None:
                outputs = self._timed(prepared, env, state, recorder, run)
            elif not self.use_graph or state.runs == 0:
                outputs = self._launch(prepared, env, state)
            else:
                if state.graph is None:
                    state.graph, state.outputs = self._capture(prepared, env, state)
                state.graph.launch(self.stream)
                outputs = state.outputs
            state.runs += 1
            host = {}
            for k, v in outputs.items():
                ring = state.rings.get(k)
                if ring is None or ring.shape != v.shape or ring.dtype != v.dtype:
                    ring = state.rings[k] = OutputRing(v.shape, v.dtype, empty=self.pinned)
                host[k] = v.get(stream=self.stream, out=ring.take(), blocking=False)
        self.stream.synchronize()
        return host

    def pinned(self, shape, dtype) -> np.ndarray:
        """A NumPy array in page-locked host memory (copied to and from at full speed)."""
        import cupyx

        return cupyx.empty_pinned(shape, dtype)

    def _bind(self, feeds: dict[str, np.ndarray]) -> BindingState:
        """The device side of a new binding: input blocks laid out for these feeds."""
        cp = self.cp
        offsets, total = {}, 0
        for n in self.graph.inputs():
            offsets[n.name] = total
            total += -(-max(feeds[n.name].nbytes, 1) // ALIGN) * ALIGN
        host, device = self.pinned(total, np.uint8), cp.empty(total, np.uint8)

        def view(block, name):
            f, o = feeds[name], offsets[name]
            return block[o : o + f.nbytes].view(f.dtype).reshape(f.shape)

        names = {n.id: n.name for n in self.graph.inputs()}
        host_inputs = {name: view(host, name) for name in names.values()}
        inputs = {i: view(device, name) for i, name in names.items()}
        return BindingState(host, device, host_inputs, inputs, {}, cp.cuda.MemoryPool())

    def _launch(self, prepared: Prepared, env: dict, state: BindingState) -> dict[str, object]:
        """Launch every step in order (temporaries from the binding's pool)."""
        with self.cp.cuda.using_allocator(state.pool.malloc):
            for step in prepared.steps:
                env[step.node] = step.kernel([env[i] for i in step.inputs], step.out)
                for f in step.free:
                    del env[f]
        return {k: env[v] for k, v in self.graph.outputs.items()}

    def _capture(self, prepared: Prepared, env: dict, state: BindingState):
        """The steps captured into a CUDA graph (nothing runs yet) and the arrays that hold
        the outputs whenever it is replayed."""
        runtime = self.cp.cuda.runtime
        mode = getattr(runtime, "streamCaptureModeRelaxed", None)
        self.stream.begin_capture(*(() if mode is None else (mode,)))
        try:
            outputs = self._launch(prepared, env, state)
        except Exception as e:
            try:
                self.stream.end_capture()
            except Exception:  # the capture is already broken; report the first error
                pass
            raise DeviceError(
                f"capturing {self.graph.name} into a CUDA graph failed ({type(e).__name__}: "
                f"{e}); run with --no-cuda-graph"
            ) from e
        return self.stream.end_capture(), outputs

    def _timed(self, prepared, env, state, recorder: Recorder, run: int | None):
        """Launch every step between CUDA events; record each step's device time (the time
        from the previous step's end to its own: launch gaps included)."""
        cp, steps = self.cp, prepared.steps
        if len(state.events) != len(steps) + 1:
            state.events = [cp.cuda.Event() for _ in range(len(steps) + 1)]
        events = state.events
        t0 = time.perf_counter_ns()
        events[0].record(self.stream)
        with cp.cuda.using_allocator(state.pool.malloc):
            for k, step in enumerate(steps):
                env[step.node] = step.kernel([env[i] for i in step.inputs], step.out)
                events[k + 1].record(self.stream)
                for f in step.free:
                    del env[f]
        events[-1].synchronize()
        elapsed = cp.cuda.get_elapsed_time
        for k, step in enumerate(steps):
            start = t0 + int(elapsed(events[0], events[k]) * 1e6)
            recorder.add(run, step.index, 0, start, int(elapsed(events[k], events[k + 1]) * 1e6))
        return {k: env[v] for k, v in self.graph.outputs.items()}
