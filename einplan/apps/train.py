"""``einplan.train``: what ``einplan train`` runs, as a call. Compile the config (or read a
plan file), train in a run folder, print the summary; return the log and last checkpoint."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from einplan.apps.compile import TRAIN_ENTRIES, compile_model
from einplan.apps.distributed import DataParallel, train_data_parallel
from einplan.apps.session import load_plan
from einplan.apps.training_run import RUN_HISTORY, RunOptions, TrainingRun
from einplan.compiler.plan import Plan, is_plan_file
from einplan.errors import EinplanError
from einplan.formats.files import check_not_input
from einplan.report.profile import write_profile
from einplan.runtime.recorder import Recorder

PLAN_NAME = "model.plan"  # a config's plan, compiled into the run folder


@dataclass
class TrainResult:
    """A finished run: its metrics rows (as in metrics.jsonl) and its last checkpoint."""

    history: list[dict[str, Any]]
    checkpoint: Path | None  # None when the run made none and resumed from none


def open_or_compile(
    source: str | os.PathLike | dict | Plan,
    out: Path,
    compute_dtype: str | None = None,
    attention: str | None = None,
    checkpoint: str | None = None,
) -> Plan:
    """The training plan: a Plan, a plan file, or a config compiled with the training
    entries in ``compute_dtype`` (None: its train section's), ``attention`` and activation
    ``checkpoint`` policy, saved in the run folder as model.plan."""
    compiled = isinstance(source, Plan) or (not isinstance(source, dict) and is_plan_file(source))
    if compiled and attention is not None:
        raise EinplanError(
            f"--attention {attention} chooses how a config is compiled, and {source} is a "
            "compiled plan: recompile it with einplan compile --train --attention, or give "
            "the config"
        )
    if isinstance(source, Plan):
        return source
    if compiled:
        return load_plan(source)
    plan = compile_model(
        source,
        entries=TRAIN_ENTRIES,
        compute_dtype=compute_dtype,
        attention=attention,
        checkpoint=checkpoint,
    )
    out.mkdir(parents=True, exist_ok=True)
    plan.save(out / PLAN_NAME)
    return plan


def clear_old_run(out: Path, resume: bool, overwrite: bool, inputs: list[Path]) -> None:
    """Refuse to start a fresh run in a folder that holds one, unless ``overwrite``: then
    remove the old run's checkpoints, log, loss curve and plan (not an input among them),
    saying so on standard error."""
    if resume and overwrite:
        raise EinplanError("--resume continues the run and --overwrite replaces it: give one")
    if resume or not any((out / name).exists() for name in RUN_HISTORY):
        return
    sources = [p.resolve() for p in inputs]
    old = [out / n for n in (*RUN_HISTORY, PLAN_NAME) if (out / n).exists()]
    old = [p for p in old if p.resolve() not in sources]
    names = ", ".join(p.name for p in old)
    if not overwrite:
        raise EinplanError(
            f"{out} already holds a run ({names}): continue it with --resume, replace it "
            "with --overwrite, or give another --out"
        )
    for p in old:
        if any(s.is_relative_to(p.resolve()) for s in sources):
            raise EinplanError(f"--overwrite would remove {p}, which this run reads; copy it out")
    for p in old:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    print(f"--overwrite: removed the previous run's {names} from {out}", file=sys.stderr)


def train(
    config_or_plan: str | os.PathLike | dict | Plan,
    *,
    data: str | os.PathLike,
    out: str | os.PathLike,
    steps: int | None = None,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    init_weights: str | None = None,
    tokenizer: str | None = None,
    workers: int = 0,
    profile: str | os.PathLike | None = None,
    kernels: str | None = None,
    compute_dtype: str | None = None,
    checkpoint: str | None = None,
    device: str | None = None,
    cuda_graph: bool = True,
    tf32: bool = False,
    attention: str | None = None,
    dp: int | None = None,
    ray_address: str | None = None,
    threads_per_worker: int | None = None,
    max_failures: int = 3,
) -> TrainResult:
    """Train on the text file ``data`` in the run folder ``out`` until step ``steps``
    (default: the train settings'), with the train settings changed by ``overrides``;
    ``resume`` continues from the folder's latest checkpoint; a folder that holds a run is
    refused without ``resume``, or cleared first with ``overwrite``. ``profile`` (a folder) records
    every step and writes its trace there, as ``einplan train --profile``. ``kernels``: the
    kernels backend, ``"numpy"`` or ``"numba"`` (None: the fastest installed); ``device="cuda"``
    trains on an NVIDIA GPU (``cuda_graph``, ``tf32`` as :class:`einplan.Session`'s).
    ``compute_dtype`` (``"bf16"``, ``"f16"``: mixed precision) compiles a config in that dtype
    (as the overrides' compute_dtype does); a plan must have been compiled in it. ``attention``
    (``auto``, ``flash``, ``plain``; a config only) as :func:`compile_model`'s. ``dp``: train
    data-parallel on that many Ray workers (a local Ray started for the run, or the cluster at
    ``ray_address``), each with ``threads_per_worker`` BLAS threads (default: the cluster's
    CPUs / dp), the group restarted from the latest checkpoint up to ``max_failures`` times
    when a worker dies; needs the ``einplan[ray]`` extra.
    ``checkpoint``: the activation checkpointing policy a config is compiled with (a plan must
    have it)."""
    if steps is not None and steps < 1:
        raise EinplanError(f"steps must be at least 1, got {steps}")
    if workers < 0:
        raise EinplanError(f"workers must be 0 (as the plan chose) or more, got {workers}")
    if dp is None and (ray_address or threads_per_worker):
        raise EinplanError("--ray-address and --threads-per-worker go with --dp N")
    if dp is not None and device not in (None, "cpu"):
        raise EinplanError("--dp trains on CPU workers; leave out --device, or drop --dp")
    if dp is not None and profile:
        raise EinplanError("--profile records one process's steps; leave it out with --dp")
    out = Path(out)
    overrides = dict(overrides or {})
    compute_dtype = compute_dtype or overrides.get("compute_dtype")
    if compute_dtype is not None:
        overrides["compute_dtype"] = compute_dtype
    sources = (config_or_plan, data, init_weights, tokenizer)
    inputs = [Path(p) for p in sources if isinstance(p, str | os.PathLike)]
    check_not_input(out, inputs)
    clear_old_run(out, resume, overwrite, inputs)
    options = RunOptions(
        corpus=Path(data),
        out=out,
        steps=steps,
        resume=resume,
        init_weights=init_weights,
        tokenizer=tokenizer,
        overrides={**(overrides or {}), **({"checkpoint": checkpoint} if checkpoint else {})},
        workers=workers,
        kernels=kernels,
        device=device,
        cuda_graph=cuda_graph,
        tf32=tf32,
    )
    plan = open_or_compile(config_or_plan, out, compute_dtype, attention, checkpoint)
    if dp is not None:
        spread = DataParallel(dp, ray_address, threads_per_worker, max_failures)
        return TrainResult(*train_data_parallel(plan, options, spread))
    training = TrainingRun(plan, options)
    if profile:
        training.trainer.profile = Recorder()
    training.run()
    training.finish()
    if profile:
        write_profile(training.trainer.profile, profile)
    return TrainResult(training.metrics.records, training.last_checkpoint)
