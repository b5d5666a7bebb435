"""Data-parallel training on Ray (``einplan train --dp N``).

Ray Train's ``DataParallelTrainer`` (its v2 API, which needs no torch) places N workers (one
CPU bundle each), runs :func:`train_worker` on every one and, when a worker dies, tears the
group down and starts it again, up to ``FailureConfig(max_failures)`` times. Each worker
binds the same plan and runs a :class:`TrainingRun` as one shard: it draws every micro-batch
of a step from the seeded sampler and runs micro-batches ``rank, rank + N, ...``; the
gradients are summed by apps/allreduce.py and every worker applies the same update. Rank 0
writes the run folder as a single process would (metrics, samples, atomic checkpoints), so a
restarted group, or ``--resume``, continues from its latest checkpoint. Ray is imported only
here, and only when ``--dp`` asks for it.

A small coordinator actor is the meeting point of the all-reduce's rounds, the flag that stops
every worker when one meets bad input (an error that a restart would only repeat), and the
channel that carries rank 0's progress to the driver's bar.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from threadpoolctl import threadpool_limits

from einplan.apps.allreduce import ObjectStoreAllReduce
from einplan.apps.metrics import read_records
from einplan.apps.training_run import Progress, RunOptions, TrainingRun, finish_run
from einplan.compiler.plan import Plan
from einplan.errors import EinplanError
from einplan.runtime.trainer import Shard

POLL_S = 0.2  # how often the driver's bar asks for rank 0's progress


class DistributedError(EinplanError):
    """Ray is missing, or the cluster cannot be reached or cannot hold the workers."""


class GroupStopped(Exception):
    """Another worker of the group met bad input; this one stops too."""


@dataclass
class DataParallel:
    """How to spread a run over Ray workers."""

    workers: int  # --dp N
    address: str | None = None  # an existing cluster (``auto``, ``host:port``); None: local
    threads: int | None = None  # BLAS threads per worker (None: the cluster's CPUs / N)
    max_failures: int = 3  # group restarts after a worker dies


def import_ray() -> Any:
    """The ``ray`` module with Ray Train, or an error saying how to install it."""
    try:
        import ray
        import ray.train  # noqa: F401  (raises ImportError without the train extra's packages)
    except ImportError as e:
        raise DistributedError(
            f"--dp trains on Ray, which is not installed ({e}): pip install 'einplan[ray]'"
        ) from None
    return ray


class Coordinator:
    """The worker group's meeting point, run as an async Ray actor (its methods interleave at
    their awaits): all-reduce rounds, the stop flag, rank 0's progress events."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.rounds: dict[tuple, dict[str, Any]] = {}
        self.generations = 0
        self.error: str | None = None
        self.stopped = asyncio.Event()
        self.events: list[tuple] = []

    async def new_generation(self) -> int:
        """A number for a newly started group (0 for the first, then one per restart)."""
        self.generations += 1
        return self.generations - 1

    async def exchange(self, key: tuple, rank: int, value: Any) -> list[Any] | None:
        """Every rank's ``value`` for round ``key``, once all have come; None when the group
        was stopped."""
        entry = self.rounds.get(key)
        if entry is None:
            entry = {"values": [None] * self.size, "came": 0, "left": self.size}
            entry["all"] = asyncio.Event()
            self.rounds[key] = entry
        entry["values"][rank] = value
        entry["came"] += 1
        if entry["came"] == self.size:
            entry["all"].set()
        waits = [asyncio.ensure_future(e.wait()) for e in (entry["all"], self.stopped)]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        entry["left"] -= 1
        if entry["left"] == 0:
            del self.rounds[key]
        return None if self.stopped.is_set() else entry["values"]

    async def stop(self, error: str) -> None:
        """Stop every worker, for this reason (bad input: restarting would repeat it)."""
        self.error = self.error or error
        self.stopped.set()

    async def failure(self) -> str | None:
        """Why the group was stopped, if it was."""
        return self.error

    async def post(self, event: tuple) -> None:
        """Queue a progress event from rank 0."""
        self.events.append(event)

    async def take_events(self) -> list[tuple]:
        """The progress events since the last call."""
        events, self.events = self.events, []
        return events


class RemoteProgress(Progress):
    """Rank 0's progress bar and log lines, sent to the driver's bar through the coordinator."""

    def __init__(self, coordinator: Any, total: int, initial: int) -> None:
        super().__init__(total, initial)
        self.coordinator = coordinator

    @contextlib.contextmanager
    def shown(self) -> Iterator[Progress]:
        """Tell the driver where this group starts."""
        self.coordinator.post.remote(("start", self.total, self.initial))
        yield self

    def step(
        self, loss: float, lr: float, tokens_per_s: float, loss_scale: float | None = None
    ) -> None:
        """Advance the driver's bar."""
        self.coordinator.post.remote(("step", loss, lr, tokens_per_s, loss_scale))

    def write(self, text: str) -> None:
        """Print a line above the driver's bar."""
        self.coordinator.post.remote(("write", text))


def has_checkpoint(out: Path) -> bool:
    """Whether a run folder has a checkpoint to continue from."""
    return (out / "checkpoints" / "latest").is_symlink()


def absolute_paths(options: RunOptions) -> RunOptions:
    """``options`` with its files as absolute paths (workers run in folders of their own)."""

    def absolute(spec: str | None) -> str | None:
        return str(Path(spec).resolve()) if spec and Path(spec).exists() else spec

    return replace(
        options,
        corpus=options.corpus.resolve(),
        out=options.out.resolve(),
        init_weights=absolute(options.init_weights),
        tokenizer=absolute(options.tokenizer),
    )


def train_worker(config: dict[str, Any]) -> None:
    """One worker of the group (run by Ray Train): a shard of the run, from the latest
    checkpoint when the group is a restart."""
    import ray
    import ray.train
    from ray.train.collective import broadcast_from_rank_zero

    context = ray.train.get_context()
    rank, size = context.get_world_rank(), context.get_world_size()
    coordinator = config["coordinator"]
    generation = ray.get(coordinator.new_generation.remote()) if rank == 0 else None
    generation = broadcast_from_rank_zero(generation)
    rounds = itertools.count()

    def exchange(phase: str, value: Any) -> list[Any]:
        key = (generation, next(rounds), phase)
        values = ray.get(coordinator.exchange.remote(key, rank, value))
        if values is None:
            raise GroupStopped()
        return values

    options: RunOptions = config["options"]
    if generation > 0 and has_checkpoint(options.out):  # restarted after a worker died
        options = replace(options, resume=True, overrides={}, tokenizer=None)
    all_reduce = ObjectStoreAllReduce(rank, size, exchange)
    try:
        with threadpool_limits(config["threads"], user_api="blas"):
            run = TrainingRun(config["plan"], options, shard=Shard(rank, size, all_reduce))
            last = options.steps or run.cfg.steps
            progress = RemoteProgress(coordinator, last, run.trainer.step) if rank == 0 else None
            run.run(progress=progress)
            all_reduce.finish()
    except EinplanError as e:
        ray.get(coordinator.stop.remote(f"worker {rank}: {e}"))
    except GroupStopped:
        pass


def connect(ray: Any, address: str | None) -> bool:
    """Start a local Ray for this run (``address`` None: True, stop it after) or join the
    cluster at ``address`` (False)."""
    quiet = {"log_to_driver": False, "logging_level": "ERROR"}
    if address is None:
        cpus = max(os.cpu_count() or 1, 1)
        ray.init(num_cpus=cpus, include_dashboard=False, **quiet)
        return True
    if address != "auto":
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
        except (OSError, ValueError) as e:
            raise DistributedError(
                f"--ray-address {address}: no Ray cluster answers there ({e}); start one "
                "with `ray start --head` and give the address it prints (or 'auto' on its head)"
            ) from None
    try:
        ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        if "AuthToken" in str(e.__cause__) or "AuthenticationError" in str(e.__cause__):
            raise DistributedError(
                f"--ray-address {address}: the Ray cluster asks for its token; set "
                "RAY_AUTH_MODE=token (the token is read from ~/.ray/auth_token or RAY_AUTH_TOKEN)"
            ) from None
        raise DistributedError(
            f"--ray-address {address}: could not join the Ray cluster ({e}); start one with "
            "`ray start --head`, or leave out --ray-address for a local one"
        ) from None
    return False


def worker_threads(ray: Any, dp: DataParallel) -> int:
    """BLAS threads (and CPUs reserved) per worker; refuses a cluster whose nodes cannot
    hold ``dp.workers`` of them (Ray would wait for them forever)."""
    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    total = int(sum(nodes))
    threads = dp.threads or max(1, total // dp.workers)
    fits = sum(int(cpus // threads) for cpus in nodes)
    if fits < dp.workers:
        raise DistributedError(
            f"--dp {dp.workers} with {threads} CPU(s) per worker needs {dp.workers * threads} "
            f"CPUs; the Ray cluster's {len(nodes)} node(s) have {', '.join(map(str, nodes))} "
            f"and hold {fits} such worker(s): lower --dp or --threads-per-worker, or add nodes"
        )
    return threads


class DriverProgress:
    """The driver's bar, fed by rank 0's events (a restarted group moves it back)."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.shown: contextlib.ExitStack = contextlib.ExitStack()

    def apply(self, events: list[tuple]) -> None:
        """Show each event: a group start, a step, a line of text."""
        for kind, *args in events:
            if kind == "start":
                total, initial = args
                if self.progress is None:
                    self.progress = Progress(total, initial)
                    self.shown.enter_context(self.progress.shown())
                else:
                    self.progress.write(f"worker group restarted from step {initial}")
                    self.progress.bar.n = initial
                    self.progress.bar.refresh()
            elif kind == "step" and self.progress is not None:
                self.progress.step(*args)
            elif kind == "write" and self.progress is not None:
                self.progress.write(*args)

    def close(self) -> None:
        """Close the bar."""
        self.shown.close()


def fit_with_progress(ray: Any, trainer: Any, coordinator: Any) -> None:
    """Run ``trainer.fit()`` while showing rank 0's progress."""
    outcome: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # re-raised below, in the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=fit, daemon=True)
    bar = DriverProgress()
    thread.start()
    try:
        while thread.is_alive():
            thread.join(POLL_S)
            bar.apply(ray.get(coordinator.take_events.remote()))
        bar.apply(ray.get(coordinator.take_events.remote()))
    finally:
        bar.close()
    if "error" in outcome:
        raise outcome["error"]


def train_data_parallel(
    plan: Plan, options: RunOptions, dp: DataParallel, console: Console | None = None
) -> tuple[list[dict[str, Any]], Path | None]:
    """Train the run described by ``options`` on ``dp.workers`` Ray workers; return the
    metrics records and the last checkpoint."""
    if dp.workers < 1:
        raise DistributedError(f"--dp takes 1 or more workers, got {dp.workers}")
    ray = import_ray()
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    out = options.out.resolve()
    started = connect(ray, dp.address)
    try:
        threads = worker_threads(ray, dp)
        coordinator = ray.remote(num_cpus=0)(Coordinator).remote(dp.workers)
        config = {
            "plan": plan,
            "options": absolute_paths(options),
            "coordinator": coordinator,
            "threads": threads,
        }
        trainer = DataParallelTrainer(
            train_worker,
            train_loop_config=config,
            scaling_config=ScalingConfig(
                num_workers=dp.workers, resources_per_worker={"CPU": threads}
            ),
            run_config=RunConfig(
                name="ray",
                storage_path=str(out),
                failure_config=FailureConfig(max_failures=dp.max_failures),
            ),
        )
        fit_with_progress(ray, trainer, coordinator)
        error = ray.get(coordinator.failure.remote())
        if error:
            raise EinplanError(error)
    finally:
        if started:
            ray.shutdown()
        with contextlib.suppress(OSError):
            (out / "ray").rmdir()  # Ray Train's storage folder: empty, as no checkpoint goes there
    records = read_records(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    finish_run(records, options.out, console or Console())
    latest = out / "checkpoints" / "latest"
    return records, latest.resolve() if latest.is_symlink() else None
