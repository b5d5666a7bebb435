"""A training plan bound to weights and optimizer state: one call, one optimizer step.

Each micro-batch is one run of the plan's ``train_step`` entry: forward, backward, and the
gradients added into the accumulators; the last micro-batch of a step also passes the step
number, so the plan's update steps clip and apply AdamW/SGD in place. The loss's cotangent is
1/k for k micro-batches, so the accumulated gradient is the mean. A step whose accumulated
gradient or last loss is not finite is skipped by the plan (a non-finite loss of an earlier
micro-batch has made its gradient non-finite too: the loss is finite whenever the logits are)
and counted here. An f16 plan's loss is scaled dynamically (runtime/loss_scale.py): the
cotangent is S/k and the plan unscales by its ``inv_loss_scale`` input.

A data-parallel step (``Shard``) runs only this process's share of the micro-batches, all
without the update; the shard's all-reduce then sums every process's accumulators in place and
the update runs on its own (runtime/optimizer_tail.py). The accumulators are views of one flat
buffer per dtype, so an all-reduce sends each in one piece.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from einplan.compiler.ir import training_phase
from einplan.compiler.names import GRAD_PREFIX
from einplan.compiler.passes.autodiff import trainable
from einplan.compiler.passes.optimizer import INV_LOSS_SCALE
from einplan.compiler.plan import Plan
from einplan.errors import EinplanError
from einplan.models.train_config import TrainConfig
from einplan.runtime.backends import Backend, get_backend
from einplan.runtime.device import to_device, to_host
from einplan.runtime.executor import Executor
from einplan.runtime.kv_cache import allocate_states
from einplan.runtime.loss_scale import LossScale
from einplan.runtime.lr_schedule import learning_rate
from einplan.runtime.optimizer_tail import OptimizerTail
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
    loss_scale: float | None = None  # f16: the scale the step ran with
    allreduce_ms: float = 0.0  # a data-parallel step's all-reduce
    workers: list[dict[str, Any]] = field(default_factory=list)  # per process of a shard


# sums buffers over every process in place and gathers one small record per process
AllReduce = Callable[[list[np.ndarray], dict[str, Any]], list[dict[str, Any]]]


@dataclass
class Shard:
    """This process's share of a data-parallel step: of the step's ``size`` x k micro-batches
    it runs ``rank``, ``rank + size``, ...; ``all_reduce`` sums the accumulated gradients of
    every share in rank order."""

    rank: int
    size: int
    all_reduce: AllReduce


def pack_accumulators(state: dict[str, np.ndarray], xp: Any = np) -> list[np.ndarray]:
    """Make the gradient accumulators of ``state`` views of one flat buffer per dtype (in
    place, in the array module ``xp`` of their device) and return those buffers."""
    keys: dict[np.dtype, list[str]] = {}
    for key, arr in state.items():
        if key.startswith(GRAD_PREFIX):
            keys.setdefault(arr.dtype, []).append(key)
    flats = []
    for dtype, names in keys.items():
        flat = xp.zeros(sum(state[k].size for k in names), dtype)
        start = 0
        for k in names:
            size = state[k].size
            state[k] = flat[start : start + size].reshape(state[k].shape)
            start += size
        flats.append(flat)
    return flats


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
        self.grad_buffers = pack_accumulators(self.state, kernels.xp)
        self.trained = [n.attrs["key"] for n in graph.params() if trainable(n)]
        self.executor = Executor(graph, {**self.weights, **self.state}, workers, kernels)
        self.loss_executor = Executor(plan.entry("loss"), self.weights, workers, kernels)
        self._tail: OptimizerTail | None = None  # the update alone, made for a first shard
        self.profile: Recorder | None = None  # set to keep every step's timing (--profile)
        self.step = 0  # steps taken (the schedule's clock)
        self.updates = 0  # updates applied (the optimizer's bias-correction clock)
        self.skipped = 0
        scaled = any(n.name == INV_LOSS_SCALE for n in graph.inputs())
        self.loss_scale = LossScale() if scaled else None

    def micro_batch_feed(
        self, windows: np.ndarray, count: int, lr: float, update: int
    ) -> dict[str, Any]:
        """The plan inputs of one micro-batch of ``count``; ``update`` is 0 but on the last."""
        feed = {**step_feed(windows), "loss_grad": 1.0 / count, "lr": lr, "step": update}
        if self.loss_scale is not None:
            feed["loss_grad"] = self.loss_scale.scale / count
            feed[INV_LOSS_SCALE] = 1.0 / self.loss_scale.scale
        return feed

    def run_step(self, batches: list[np.ndarray], shard: Shard | None = None) -> StepStats:
        """One optimizer step over micro-batches of ``(batch, seq + 1)`` token windows: all of
        the step's, or (``shard``) this process's share of them."""
        c = self.cfg
        step = self.step + 1
        lr = learning_rate(step, c.lr, c.min_lr, c.warmup_steps, c.steps)
        if not math.isfinite(lr):
            raise EinplanError(f"the learning rate of step {step} is {lr}; check lr and min_lr")
        rank, size = (shard.rank, shard.size) if shard else (0, 1)
        count = len(batches) * size
        # per-step timing (the phase split) on the CPU always; on a GPU only when profiling,
        # as a recorder launches the steps one by one instead of replaying the CUDA graph
        rec = self.profile or (Recorder() if self.device == "cpu" else None)
        first = len(rec.raw) if rec else 0  # this step's rows of a recorder over the run
        t0 = time.perf_counter()
        losses = []
        for j, windows in enumerate(batches):
            i = rank + j * size  # the micro-batch's place in the whole step
            update = self.updates + 1 if shard is None and i == count - 1 else 0
            feed = self.micro_batch_feed(windows, count, lr, update)
            # LoRA dropout masks: a seed per (run seed, step, micro-batch), so a resumed run
            # draws the masks the uninterrupted one would have
            feed["dropout_seed"] = (c.seed * 1_000_003 + step) * 1024 + i
            out = self.executor.run(feed, rec)
            losses.append(float(out["loss"]))
        seconds = time.perf_counter() - t0
        tokens = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)
        ms = dict.fromkeys(PHASES, 0.0)
        for run, index, _, _, dur_ns in rec.raw[first:] if rec else ():
            ms[training_phase(rec.runs[run]["table"][index].tags)] += dur_ns / 1e6
        if shard is None:
            norm, reduce_ms, workers = float(out["grad_norm"]), 0.0, []
        else:
            norm, reduce_ms, update_ms, workers, losses = self.reduce_and_update(
                shard, losses, tokens, seconds, lr
            )
            seconds = time.perf_counter() - t0  # the step, all-reduce and update included
            tokens *= size
            ms["optimizer"] += update_ms
        skipped = not math.isfinite(norm)
        self.step = step
        self.skipped += skipped
        self.updates += not skipped
        scale = None
        if self.loss_scale is not None:
            scale = self.loss_scale.scale
            self.loss_scale.update(skipped)
        loss = float(np.mean(losses))
        return StepStats(
            step, loss, norm, lr, skipped, tokens, seconds, ms, scale, reduce_ms, workers
        )

    def reduce_and_update(
        self, shard: Shard, losses: list[float], tokens: int, seconds: float, lr: float
    ) -> tuple[float, float, float, list[dict[str, Any]], list[float]]:
        """Sum every share's gradients, then update: the global norm, the milliseconds of the
        all-reduce and of the update, a record per process (its tokens/s) and every
        micro-batch's loss in the order of the whole step."""
        if self._tail is None:
            self._tail = OptimizerTail(
                self.executor.graph, self.executor.params, self.executor.backend
            )
        mine = {"losses": losses, "tokens_per_s": tokens / seconds}
        t0 = time.perf_counter()
        workers = shard.all_reduce(self.grad_buffers, mine)
        reduce_ms = (time.perf_counter() - t0) * 1e3
        count = len(losses) * shard.size
        ordered = [workers[i % shard.size]["losses"][i // shard.size] for i in range(count)]
        t1 = time.perf_counter()
        norm = self._tail.run(ordered[-1], lr, self.updates + 1)
        update_ms = (time.perf_counter() - t1) * 1e3
        workers = [{k: v for k, v in w.items() if k != "losses"} for w in workers]
        return norm, reduce_ms, update_ms, workers, ordered

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
        """Step, update and skip counts (and an f16 run's loss scale), for checkpoints."""
        out: dict = {"step": self.step, "updates": self.updates, "skipped": self.skipped}
        if self.loss_scale is not None:
            out["loss_scale"] = self.loss_scale.to_dict()
        return out

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
        if self.loss_scale is not None:
            self.loss_scale = LossScale(**counters["loss_scale"])
