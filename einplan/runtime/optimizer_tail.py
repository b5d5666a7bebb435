"""The update of a training step run on its own: the ``train_step`` entry's global-norm and
AdamW/SGD steps, with the same kernels, over gradient accumulators that something else filled
(a data-parallel all-reduce). A single process never needs this: its last micro-batch runs
the update inside the entry.
"""

from __future__ import annotations

import numpy as np

from einplan.compiler.dtypes import to_numpy_dtype
from einplan.compiler.ir import Graph
from einplan.compiler.ops import Op
from einplan.errors import EinplanError
from einplan.runtime.backends import Backend
from einplan.runtime.steps import ScratchBuffers

TAIL_OPS = (Op.GRAD_NORM, Op.ADAMW, Op.SGD)


class OptimizerTail:
    """The global norm and parameter updates of a train_step graph, bound to its leaves."""

    def __init__(self, graph: Graph, leaves: dict[int, np.ndarray], backend: Backend) -> None:
        """``leaves``: value id -> array of every parameter and state leaf (an Executor's
        ``params``); an accumulation step's value is read as the accumulator it adds into."""
        nodes = graph.by_id()

        def source(i: int) -> int:
            return source(nodes[i].inputs[0]) if nodes[i].op is Op.ACC_GRAD else i

        tail = [n for n in graph.nodes if n.op in TAIL_OPS]
        norms = [n for n in tail if n.op is Op.GRAD_NORM]
        if len(norms) != 1:
            raise EinplanError(f"{graph.name}: expected one gradient-norm step, found {len(norms)}")
        self.norm_node = norms[0]
        self.loss_id = self.norm_node.inputs[0]
        self.loss_dtype = to_numpy_dtype(nodes[self.loss_id].dtype)
        self.inputs = {n.name: n for n in graph.inputs() if n.name in ("lr", "step")}
        self.norm = np.empty((), to_numpy_dtype(self.norm_node.dtype))
        env_shapes = {i: a.shape for i, a in leaves.items()}
        scratch = ScratchBuffers().for_thread(0)
        self.env: dict[int, np.ndarray] = dict(leaves)
        self.steps = []
        for n in tail:
            ins = tuple(source(i) for i in n.inputs)
            shapes = [env_shapes.get(i, ()) for i in ins]
            out_shape = () if n.op is Op.GRAD_NORM else env_shapes[ins[0]]
            kernel, _ = backend.kernel_for(n, shapes, out_shape, scratch, [nodes[i] for i in ins])
            self.steps.append((n, kernel, ins))

    def run(self, last_loss: float, lr: float, step: int) -> float:
        """Clip and apply optimizer step ``step`` (0: none) with learning rate ``lr`` to the
        accumulated gradients, then empty them; ``last_loss`` not finite skips the update, as
        in the entry. Returns the global gradient norm."""
        env = self.env
        env[self.loss_id] = np.asarray(last_loss, self.loss_dtype)
        for name, n in self.inputs.items():
            env[n.id] = np.asarray(lr if name == "lr" else step, to_numpy_dtype(n.dtype))
        with np.errstate(over="ignore", under="ignore"):
            for n, kernel, ins in self.steps:
                out = self.norm if n.op is Op.GRAD_NORM else None
                env[n.id] = kernel([env[i] for i in ins], out)
        return float(self.norm)
