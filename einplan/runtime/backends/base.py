"""The Backend type: a name and a table of kernel factories (see runtime/backends)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from einplan.compiler.ir import Node
from einplan.compiler.ops import Op
from einplan.compiler.tags import Tag
from einplan.runtime.kernels import KERNELS, Kernel, Scratch
from einplan.runtime.upcast import make_upcast

Factory = Callable[..., Kernel | None]


@dataclass(frozen=True)
class Backend:
    """A named table of kernel factories; ops it lacks (or declines) run numpy's kernels."""

    name: str
    table: dict[Op, Factory] = field(default_factory=dict)

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
        return KERNELS[node.op](node, shapes, out_shape, scratch), NUMPY.name


# numpy's table is runtime/kernels.py's KERNELS itself: every op falls through to it
NUMPY = Backend("numpy")
