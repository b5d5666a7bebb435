"""A training plan bound to weights and optimizer state: one call, one optimizer step.

Each micro-batch is one run of the plan's ``train_step`` entry: forward, backward, and the
gradients added into the accumulators; the last micro-batch of a step also passes the step
number, so the plan's update steps clip and apply AdamW/SGD in place. The loss's cotangent is
1/k for k micro-batches, so the accumulated gradient is the mean. A step whose accumulated
gradient or last loss is not finite is skipped by the plan (a non-finite loss of an earlier
micro-batch has made its gradient non-finite too: the loss is finite whenever the logits are)
and counted here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from einplan.compiler.ir import training_phase
from einplan.compiler.names import GRAD_PREFIX
from einplan.compiler.passes.autodiff import trainable
from einplan.compiler.plan import Plan
from einplan.errors import EinplanError
from einplan.models.train_config import TrainConfig
from einplan.runtime.backends import Backend, get_backend
from einplan.runtime.device import to_device, to_host
from einplan.runtime.executor import Executor
from einplan.runtime.kv_cache import allocate_states
from einplan.runtime.lr_schedule import learning_rate
from einplan.runtime.recorder import Recorder

PHASES = ("forward", "backward", "optimizer")


@dataclass
class StepStats:
    """What one optimizer step did and cost."""

    step: int
    loss: float
    grad_norm: float
    lr: float
    skipped: bool
    tokens: int
    seconds: float
    phase_ms: dict[str, float]


def step_feed(windows: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs, positions and next-token targets of ``(batch, seq + 1)`` token windows."""
    tokens = windows[:, :-1]
    return {
        "tokens": tokens,
        "positions": np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape),
        "targets": windows[:, 1:],
    }


class Trainer:
    """Runs optimizer steps of a training plan over weights it updates in place."""

    def __init__(
        self,
        plan: Plan,
        weights: dict[str, np.ndarray],
        cfg: TrainConfig,
        workers: int = 0,
        kernels: str | Backend | None = None,
    ) -> None:
        """``weights`` (checkpoint key -> writable array) are trained in place (on a GPU
        backend: uploaded once and trained there); the optimizer state starts at zero;
        ``kernels``: the kernels backend (runtime/backends; a name or a Backend)."""
        graph = plan.entry("train_step")
        kernels = get_backend(kernels)
        self.device = kernels.device
        self.plan, self.cfg = plan, cfg
        self.weights = {k: to_device(a, self.device, k) for k, a in weights.items()}
        self.state = allocate_states(graph, {}, kernels.xp)
        self.trained = [n.attrs["key"] for n in graph.params() if trainable(n)]
        self.executor = Executor(graph, {**self.weights, **self.state}, workers, kernels)
        self.loss_executor = Executor(plan.entry("loss"), self.weights, workers, kernels)
        self.profile: Recorder | None = None  # set to keep every step's timing (--profile)
        self.step = 0  # steps taken (the schedule's clock)
        self.updates = 0  # updates applied (the optimizer's bias-correction clock)
        self.skipped = 0

    def micro_batch_feed(
        self, windows: np.ndarray, count: int, lr: float, update: int
    ) -> dict[str, Any]:
        """The plan inputs of one micro-batch of ``count``; ``update`` is 0 but on the last."""
        return {
            **step_feed(windows),
            "loss_grad": 1.0 / count,
            "lr": lr,
            "step": update,
        }

    def run_step(self, batches: list[np.ndarray]) -> StepStats:
        """One optimizer step over micro-batches of ``(batch, seq + 1)`` token windows."""
        c = self.cfg
        step = self.step + 1
        lr = learning_rate(step, c.lr, c.min_lr, c.warmup_steps, c.steps)
        if not math.isfinite(lr):
            raise EinplanError(f"the learning rate of step {step} is {lr}; check lr and min_lr")
        # per-step timing (the phase split) on the CPU always; on a GPU only when profiling,
        # as a recorder launches the steps one by one instead of replaying the CUDA graph
        rec = self.profile or (Recorder() if self.device == "cpu" else None)
        first = len(rec.raw) if rec else 0  # this step's rows of a recorder over the run
        t0 = time.perf_counter()
        losses = []
        for i, windows in enumerate(batches):
            update = self.updates + 1 if i == len(batches) - 1 else 0
            feed = self.micro_batch_feed(windows, len(batches), lr, update)
            # LoRA dropout masks: a seed per (run seed, step, micro-batch), so a resumed run
            # draws the masks the uninterrupted one would have
            feed["dropout_seed"] = (c.seed * 1_000_003 + step) * 1024 + i
            out = self.executor.run(feed, rec)
            losses.append(float(out["loss"]))
        seconds = time.perf_counter() - t0
        norm = float(out["grad_norm"])
        skipped = not math.isfinite(norm)
        self.step = step
        self.skipped += skipped
        self.updates += not skipped
        ms = dict.fromkeys(PHASES, 0.0)
        for run, index, _, _, dur_ns in rec.raw[first:] if rec else ():
            ms[training_phase(rec.runs[run]["table"][index].tags)] += dur_ns / 1e6
        tokens = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)
        return StepStats(step, float(np.mean(losses)), norm, lr, skipped, tokens, seconds, ms)

    def validation_loss(self, windows: list[np.ndarray]) -> float:
        """Mean loss of the ``loss`` entry over batches of held-out windows."""
        losses = [float(self.loss_executor.run(step_feed(w))["loss"]) for w in windows]
        return float(np.mean(losses))

    def trained_weights(self) -> dict[str, np.ndarray]:
        """The weights the optimizer updates (all of them, or LoRA's A and B), for checkpoints
        (host arrays: copied from the device on a GPU)."""
        return {k: to_host(self.weights[k]) for k in self.trained}

    def host_weights(self) -> dict[str, np.ndarray]:
        """Every weight as a host array (the trained arrays themselves on the CPU)."""
        return {k: to_host(a) for k, a in self.weights.items()}

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The optimizer's buffers worth saving (moments; accumulators are empty), as host
        arrays."""
        return {k: to_host(v) for k, v in self.state.items() if not k.startswith(GRAD_PREFIX)}

    def counters(self) -> dict[str, int]:
        """Step, update and skip counts, for checkpoints."""
        return {"step": self.step, "updates": self.updates, "skipped": self.skipped}

    def restore(
        self, weights: dict[str, np.ndarray], optimizer: dict[str, np.ndarray], counters: dict
    ) -> None:
        """Continue from a checkpoint: copy trained weights and optimizer state in place."""
        for key in self.trained:
            self.weights[key][...] = to_device(np.asarray(weights[key]), self.device, key)
        for key, arr in self.state.items():
            if not key.startswith(GRAD_PREFIX):
                arr[...] = to_device(np.asarray(optimizer[key]), self.device, key)
        self.step, self.updates = counters["step"], counters["updates"]
        self.skipped = counters["skipped"]
