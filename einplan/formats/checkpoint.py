"""Training checkpoints: a folder per step, written atomically, with ``latest`` pointing at
the newest complete one.

A checkpoint holds ``model.safetensors`` (the weights under their Hugging Face names, so
einplan and transformers load the folder as a model), ``optimizer.safetensors`` (the optimizer
state buffers), ``config.json``, ``tokenizer.json``, and ``trainer.json``: step, RNG and data
state, the train settings, and the size and SHA-256 of every other file. It is written into a
temporary folder, renamed into place, and only then does ``latest`` (a symlink, replaced by
rename) move to it, so a kill at any moment leaves ``latest`` naming a complete checkpoint; a
file damaged later is refused by its hash, naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from einplan.errors import EinplanError
from einplan.formats.files import fsync_path, hash_file
from einplan.formats.weights import WeightsError, read_safetensors_index

FORMAT = "einplan-checkpoint"
VERSION = 1
MANIFEST = "trainer.json"
LATEST = "latest"


class CheckpointError(EinplanError):
    """A checkpoint is missing, incomplete or damaged."""


@dataclass
class Checkpoint:
    """A verified checkpoint: its folder, its trainer state, and its tensor files."""

    path: Path
    state: dict[str, Any]

    def tensors(self, name: str) -> dict[str, np.ndarray]:
        """The arrays of one safetensors file of the checkpoint (memory-mapped)."""
        try:
            return {k: a for k, (a, _) in read_safetensors_index(self.path / name).items()}
        except WeightsError as e:
            raise CheckpointError(str(e)) from None


def write_tensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Write one safetensors file (metadata ``format: pt``, as transformers expects)."""
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), {"format": "pt"})


def step_name(step: int) -> str:
    """The folder name of the checkpoint after ``step``."""
    return f"step-{step:06d}"


def save_checkpoint(
    root: Path,
    step: int,
    tensors: dict[str, dict[str, np.ndarray]],
    files: dict[str, bytes],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``tensors`` (file name -> arrays), other ``files`` and ``state`` as the checkpoint
    of ``step`` under ``root``, point ``latest`` at it, and keep only the ``keep`` newest."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, arrays in tensors.items():
        write_tensors(tmp / name, arrays)
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    listed = {p.name: {"bytes": p.stat().st_size, "sha256": hash_file(p)} for p in tmp.iterdir()}
    manifest = {"format": FORMAT, "version": VERSION, "step": step, "files": listed, **state}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for p in tmp.iterdir():
        fsync_path(p)
    fsync_path(tmp)
    latest = root / LATEST
    if final.exists():  # left by a run that died before moving latest to it
        if latest.exists() and latest.resolve() == final.resolve():
            raise CheckpointError(f"{final}: would overwrite the latest checkpoint")
        shutil.rmtree(final)
    os.rename(tmp, final)
    link = root / f".{LATEST}-{os.getpid()}"
    link.unlink(missing_ok=True)
    link.symlink_to(final.name)
    os.replace(link, latest)
    fsync_path(root)
    prune(root, keep)
    return final


def prune(root: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest step folders (never latest's) and stale temps."""
    target = (root / LATEST).resolve()
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[: max(0, len(steps) - keep)]:
        if old.resolve() != target:
            shutil.rmtree(old)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(path: Path) -> Checkpoint:
    """Open a checkpoint folder (or a run's checkpoint root, meaning its ``latest``), checking
    every file against the manifest; a missing, truncated or altered file is named."""
    if (path / LATEST).exists() or (path / LATEST).is_symlink():
        path = path / LATEST
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path} (nothing to resume)")
    path = path.resolve()
    manifest = path / MANIFEST
    try:
        state = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{manifest}: missing or damaged checkpoint manifest ({e})") from None
    if state.get("format") != FORMAT or state.get("version") != VERSION:
        raise CheckpointError(f"{manifest}: not an einplan checkpoint of version {VERSION}")
    for name, info in state["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: checkpoint file is missing")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(
                f"{f}: checkpoint file is truncated or damaged ({size} bytes, "
                f"expected {info['bytes']})"
            )
        if hash_file(f) != info["sha256"]:
            raise CheckpointError(f"{f}: checkpoint file is damaged (SHA-256 mismatch)")
    return Checkpoint(path, state)
