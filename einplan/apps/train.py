"""``einplan.train``: what ``einplan train`` runs, as a call. Compile the config (or read a
plan file), train in a run folder, print the summary; return the log and last checkpoint."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from einplan.apps.compile import TRAIN_ENTRIES, compile_model
from einplan.apps.session import load_plan
from einplan.apps.training_run import RunOptions, TrainingRun
from einplan.compiler.plan import Plan
from einplan.report.profile import write_profile
from einplan.runtime.recorder import Recorder

PLAN_PREFIX = b'{"magic":"einplan-plan"'


@dataclass
class TrainResult:
    """A finished run: its metrics rows (as in metrics.jsonl) and its last checkpoint."""

    history: list[dict[str, Any]]
    checkpoint: Path | None  # None when the run made none and resumed from none


def open_or_compile(source: str | os.PathLike | dict | Plan, out: Path) -> Plan:
    """The training plan: a Plan, a plan file, or a config compiled with the training
    entries (and saved in the run folder as model.plan)."""
    if isinstance(source, Plan):
        return source
    if not isinstance(source, dict):
        path = Path(source)
        if path.is_file() and path.read_bytes()[: len(PLAN_PREFIX)] == PLAN_PREFIX:
            return load_plan(path)
    plan = compile_model(source, entries=TRAIN_ENTRIES)
    out.mkdir(parents=True, exist_ok=True)
    plan.save(out / "model.plan")
    return plan


def train(
    config_or_plan: str | os.PathLike | dict | Plan,
    *,
    data: str | os.PathLike,
    out: str | os.PathLike,
    steps: int | None = None,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    init_weights: str | None = None,
    tokenizer: str | None = None,
    workers: int = 0,
    profile: str | os.PathLike | None = None,
    kernels: str | None = None,
) -> TrainResult:
    """Train on the text file ``data`` in the run folder ``out`` until step ``steps``
    (default: the train settings'), with the train settings changed by ``overrides``;
    ``resume`` continues from the folder's latest checkpoint. ``profile`` (a folder) records
    every step and writes its trace there, as ``einplan train --profile``. ``kernels``: the
    kernels backend, ``"numpy"`` or ``"numba"`` (None: the fastest installed)."""
    out = Path(out)
    options = RunOptions(
        corpus=Path(data),
        out=out,
        steps=steps,
        resume=resume,
        init_weights=init_weights,
        tokenizer=tokenizer,
        overrides=overrides or {},
        workers=workers,
        kernels=kernels,
    )
    training = TrainingRun(open_or_compile(config_or_plan, out), options)
    if profile:
        training.trainer.profile = Recorder()
    training.run()
    training.finish()
    if profile:
        write_profile(training.trainer.profile, profile)
    return TrainResult(training.metrics.records, training.last_checkpoint)
