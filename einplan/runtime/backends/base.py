"""The Backend type: a name and a table of kernel factories (see runtime/backends)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from einplan.compiler.ir import Node
from einplan.compiler.ops import Op
from einplan.compiler.tags import Tag
from einplan.errors import EinplanError
from einplan.runtime.device import DeviceError, array_module
from einplan.runtime.kernels import KERNELS, Kernel, Scratch
from einplan.runtime.panels import is_panels
from einplan.runtime.upcast import make_upcast

Factory = Callable[..., Kernel | None]


@dataclass(frozen=True)
class Backend:
    """A named table of kernel factories; ops it lacks (or declines) run numpy's kernels. A
    backend of another ``device`` than the CPU has no such fall-through: its table must hold
    every op the plan uses (its arrays are not NumPy's)."""

    name: str
    table: dict[Op, Factory] = field(default_factory=dict)
    device: str = "cpu"
    cuda_graph: bool = True  # a GPU device: replay each bound entry as one CUDA graph
    # (plan, weights) -> the weights dict, its arrays replaced in place by the layouts this
    # backend's kernels read (runtime/panels.py); None: the arrays as they are
    pack: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None

    def pack_weights(self, plan: Any, weights: dict[str, Any]) -> dict[str, Any]:
        """``weights`` (changed in place and returned) in the layouts this backend's kernels
        read fastest, for all of ``plan``'s entries (the numba backend: panels,
        runtime/panels.py); unchanged for a backend without such layouts."""
        return weights if self.pack is None else self.pack(plan, weights)

    @property
    def xp(self):
        """The array module of the backend's device (numpy, or cupy for ``cuda``)."""
        return array_module(self.device)

    def kernel_for(
        self,
        node: Node,
        shapes: list[tuple[int, ...]],
        out_shape: tuple[int, ...],
        scratch: Scratch,
        inputs: list[Node] = (),
    ) -> tuple[Kernel, str]:
        """The kernel of one step and the name of the backend that made it; a step tagged
        ``upcast`` gets its float32 kernel wrapped (runtime/upcast.py)."""
        if Tag.UPCAST in node.tags:
            if self.device != "cpu":
                raise DeviceError(
                    f"step {node.name} computes on 16-bit values (a bf16/f16 plan): mixed "
                    f"precision runs on the CPU only for now; run it with --device cpu, or "
                    "compile it in f32"
                )
            made: list[str] = []

            def make(twin, shapes, out_shape, scratch, inputs):
                kernel, name = self.kernel_for(
                    twin.with_(tags=twin.tags - {Tag.UPCAST}), shapes, out_shape, scratch, inputs
                )
                made.append(name)
                return kernel

            kernel = make_upcast(make, node, shapes, out_shape, scratch, list(inputs))
            return kernel, (made[0] if made else "numpy")
        factory = self.table.get(node.op)
        if factory is not None:
            kernel = factory(node, shapes, out_shape, scratch, list(inputs))
            if kernel is not None:
                return kernel, self.name
        held = [i.name for i in inputs if is_panels(i)]
        if held:  # (the backend packs only weights its kernels read: a bug if this happens)
            raise EinplanError(
                f"step {node.name} ({node.op.value}) reads {', '.join(held)} held as panels, "
                f"which no {self.name} kernel of it reads: report this (runtime/panels.py)"
            )
        if self.device != "cpu":
            raise DeviceError(
                f"step {node.name} ({node.op.value}) has no {self.device} kernel: the "
                f"{self.device} device runs float plans (no quantised or mixture-of-experts "
                "ops yet); run this plan with --device cpu"
            )
        return KERNELS[node.op](node, shapes, out_shape, scratch), NUMPY.name


# numpy's table is runtime/kernels.py's KERNELS itself: every op falls through to it
NUMPY = Backend("numpy")
