"""Training checkpoints: a folder per step, written atomically, with ``latest`` pointing at
the newest complete one.

A checkpoint holds ``model.safetensors`` (the weights under their Hugging Face names, so
einplan and transformers load the folder as a model), ``optimizer.safetensors`` (the optimizer
state buffers), ``config.json``, ``tokenizer.json``, and ``trainer.json``: step, RNG and data
state, the train settings, the size and SHA-256 of every other file, and the SHA-256 of its own
other fields (so an emptied file list or an edited step is caught). A LoRA run's checkpoint
holds the adapter in PEFT's layout (``adapter_config.json``, ``adapter_model.safetensors``)
instead of ``model.safetensors`` and ``config.json``, so it never loads as a whole (and mostly
random) model. Weights or optimizer state that are not finite are never saved. It is written into a
temporary folder, renamed into place, and only then does ``latest`` (a symlink, replaced by
rename) move to it, so a kill at any moment leaves ``latest`` naming a complete checkpoint; a
file damaged later is refused by its hash, naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from einplan.errors import EinplanError
from einplan.formats.files import fsync_path, hash_file
from einplan.formats.weights import WeightsError, non_finite, read_safetensors_index

FORMAT = "einplan-checkpoint"
VERSION = 2  # 2: trainer.json carries manifest_sha256; LoRA checkpoints in PEFT's layout
MANIFEST = "trainer.json"
SELF_HASH = "manifest_sha256"
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


def write_tensors(
    path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """Write one safetensors file (metadata ``format: pt``, as transformers expects)."""
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(arrays, str(path), {"format": "pt", **(metadata or {})})


def manifest_hash(manifest: Mapping[str, Any]) -> str:
    """SHA-256 of a manifest's canonical JSON, its own hash field left out."""
    body = {k: v for k, v in manifest.items() if k != SELF_HASH}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def check_finite(step: int, tensors: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Refuse to checkpoint weights or optimizer state holding NaN or infinity, naming them."""
    bad = [f"{name}:{key}" for name, arrays in tensors.items() for key in non_finite(arrays)]
    if bad:
        raise CheckpointError(
            f"not saving the checkpoint of step {step}: non-finite values in "
            f"{', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''}; the previous checkpoint is "
            "kept; lower the learning rate or set grad_clip and resume from it"
        )


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
    metadata: Mapping[str, dict[str, str]] | None = None,
) -> Path:
    """Write ``tensors`` (file name -> arrays, with ``metadata`` strings per file name), other
    ``files`` and ``state`` as the checkpoint of ``step`` under ``root``, point ``latest`` at
    it, and keep only the ``keep`` newest."""
    check_finite(step, tensors)
    check_latest_link(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, arrays in tensors.items():
        write_tensors(tmp / name, arrays, (metadata or {}).get(name))
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    listed = {p.name: {"bytes": p.stat().st_size, "sha256": hash_file(p)} for p in tmp.iterdir()}
    manifest = {"format": FORMAT, "version": VERSION, "step": step, "files": listed, **state}
    manifest[SELF_HASH] = manifest_hash(manifest)
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


def check_latest_link(root: Path) -> None:
    """Refuse a checkpoints root whose ``latest`` is not the symlink einplan writes (a copied
    folder, a file): saving the next checkpoint could not move it, so a resumed run would
    fail only after writing a checkpoint into the folder."""
    latest = root / LATEST
    if (latest.exists() or latest.is_symlink()) and not latest.is_symlink():
        kind = "a folder" if latest.is_dir() else "a file"
        raise CheckpointError(
            f"{latest} is {kind}, not the symlink einplan keeps to the newest checkpoint; "
            f"move it away and link the checkpoint to resume from (ln -s step-NNNNNN {latest})"
        )


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
        check_latest_link(path)
        path = path / LATEST
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path} (nothing to resume)")
    path = path.resolve()
    manifest = path / MANIFEST
    try:
        state = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{manifest}: missing or damaged checkpoint manifest ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{manifest}: not an einplan checkpoint manifest")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"{manifest}: checkpoint version {state.get('version')!r}, this einplan reads "
            f"version {VERSION} (older manifests are not tamper-evident); load its "
            "model.safetensors as plain weights, or train again"
        )
    if state.get(SELF_HASH) != manifest_hash(state):
        raise CheckpointError(
            f"{manifest}: checkpoint manifest was edited or damaged ({SELF_HASH} does not "
            "match its content); use an earlier checkpoint"
        )
    if not isinstance(state.get("files"), dict) or not state["files"]:
        raise CheckpointError(f"{manifest}: checkpoint manifest lists no files")
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


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is an einplan checkpoint folder (or a checkpoints root with ``latest``)
    or a file inside one."""
    folder = path if path.is_dir() else path.parent
    return (folder / MANIFEST).is_file() or (folder / LATEST).is_symlink()


def verified_source(path: Path) -> Path:
    """``path`` as it is, or (when it is an einplan checkpoint, or a file in one) the
    checkpoint folder after checking every file against its manifest."""
    if not is_checkpoint(path):
        return path
    ckpt = load_checkpoint(path if path.is_dir() else path.parent)
    return ckpt.path if path.is_dir() else ckpt.path / path.name


def verified_weights(path: Path) -> Path:
    """:func:`verified_source` for weights: a LoRA run's checkpoint (an adapter, no model) is
    refused with what to do instead."""
    source = verified_source(path)
    if is_checkpoint(path) and source.is_dir() and not (source / "model.safetensors").is_file():
        raise CheckpointError(
            f"{source}: a LoRA run's checkpoint holds an adapter, not a model: give it as the "
            "adapter (--adapter) and its base model as the weights"
        )
    return source
