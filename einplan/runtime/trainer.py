"""A training plan bound to weights and optimizer state: one call, one optimizer step.

Each micro-batch is one run of the plan's ``train_step`` entry: forward, backward, and the
gradients added into the accumulators; the last micro-batch of a step also passes the step
number, so the plan's update steps clip and apply AdamW/SGD in place. The loss's cotangent is
1/k for k micro-batches, so the accumulated gradient is the mean. A step whose accumulated
gradient or last loss is not finite is skipped by the plan (a non-finite loss of an earlier
micro-batch has made its gradient non-finite too: the loss is finite whenever the logits are)
and counted here.

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
from einplan.compiler.plan import Plan
from einplan.errors import EinplanError
from einplan.models.train_config import TrainConfig
from einplan.runtime.executor import Executor
from einplan.runtime.kv_cache import allocate_states
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


def pack_accumulators(state: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Make the gradient accumulators of ``state`` views of one flat buffer per dtype (in
    place) and return those buffers."""
    keys: dict[np.dtype, list[str]] = {}
    for key, arr in state.items():
        if key.startswith(GRAD_PREFIX):
            keys.setdefault(arr.dtype, []).append(key)
    flats = []
    for dtype, names in keys.items():
        flat = np.zeros(sum(state[k].size for k in names), dtype)
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
        kernels: str | None = None,
    ) -> None:
        """``weights`` (checkpoint key -> writable array) are trained in place; the optimizer
        state starts at zero; ``kernels``: the kernels backend (runtime/backends)."""
        graph = plan.entry("train_step")
        self.plan, self.cfg, self.weights = plan, cfg, weights
        self.state = allocate_states(graph, {})
        self.grad_buffers = pack_accumulators(self.state)
        self.trained = [n.attrs["key"] for n in graph.params() if trainable(n)]
        self.executor = Executor(graph, {**weights, **self.state}, workers, kernels)
        self.loss_executor = Executor(plan.entry("loss"), weights, workers, kernels)
        self._tail: OptimizerTail | None = None  # the update alone, made for a first shard
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
        rec = self.profile or Recorder()
        first = len(rec.raw)  # this step's rows of a recorder that may span the whole run
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
        for run, index, _, _, dur_ns in rec.raw[first:]:
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
        loss = float(np.mean(losses))
        return StepStats(step, loss, norm, lr, skipped, tokens, seconds, ms, reduce_ms, workers)

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
        """The weights the optimizer updates (all of them, or LoRA's A and B), for checkpoints."""
        return {k: self.weights[k] for k in self.trained}

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The optimizer's buffers worth saving (moments; accumulators are empty)."""
        return {k: v for k, v in self.state.items() if not k.startswith(GRAD_PREFIX)}

    def counters(self) -> dict[str, int]:
        """Step, update and skip counts, for checkpoints."""
        return {"step": self.step, "updates": self.updates, "skipped": self.skipped}

    def restore(
        self, weights: dict[str, np.ndarray], optimizer: dict[str, np.ndarray], counters: dict
    ) -> None:
        """Continue from a checkpoint: copy trained weights and optimizer state in place."""
        for key, arr in self.trained_weights().items():
            np.copyto(arr, weights[key])
        for key, arr in self.optimizer_state().items():
            np.copyto(arr, optimizer[key])
        self.step, self.updates = counters["step"], counters["updates"]
        self.skipped = counters["skipped"]
