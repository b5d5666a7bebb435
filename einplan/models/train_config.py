"""The ``train`` section of a config: optimizer, schedule, batches, checkpoints, logging.

Checked as strictly as the model keys: an unknown key or a value of the wrong type is an
error naming it. The optimizer settings are compiled into the plan (attrs of its update
steps); the rest drive the training loop and can be overridden on the command line.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from einplan.compiler.checkpoint_policy import CheckpointError, parse_checkpoint
from einplan.compiler.dtypes import COMPUTE_DTYPES
from einplan.models.config import ConfigError, read_config

OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    """How to train: every field has the default of a small from-scratch run."""

    optimizer: str = "adamw"
    lr: float = 3e-4
    min_lr: float = 3e-5  # the cosine schedule decays to this at the last step
    warmup_steps: int = 200
    steps: int = 2000  # optimizer steps of the whole run (the schedule's length)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_norms_and_biases: bool = False
    momentum: float = 0.9  # sgd
    grad_clip: float = 1.0  # global gradient-norm limit; 0 turns clipping off
    micro_batch: int = 4
    accumulation: int = 1  # micro-batches per optimizer step
    seq_len: int = 256
    compute_dtype: str = "f32"  # f32, f64, or bf16/f16 mixed precision (float32 master weights)
    checkpoint: str = "none"  # activation checkpointing: none, layers, every:K, selective
    seed: int = 0
    val_fraction: float = 0.05  # the corpus's tail held out for validation loss
    eval_batches: int = 4  # micro-batches of validation loss per log line
    log_every: int = 50
    checkpoint_every: int = 250
    keep_checkpoints: int = 3  # step checkpoints kept besides latest
    sample_every: int = 500
    sample_prompt: str = "JULIET:"
    sample_tokens: int = 64
    tokenizer: str = ""  # "bytes", "train" (BPE trained on the corpus), or a tokenizer.json

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the plan file and checkpoints."""
        return asdict(self)


POSITIVE = ("lr", "steps", "micro_batch", "accumulation", "seq_len", "eps")
NON_NEGATIVE = (
    "min_lr",
    "warmup_steps",
    "weight_decay",
    "momentum",
    "grad_clip",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "sample_every",
    "sample_tokens",
    "eval_batches",
    "seed",
)


def parse_train_config(raw: dict[str, Any] | None, origin: str = "config") -> TrainConfig:
    """Validate a ``train`` section (missing keys take the defaults)."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: the train section must be a JSON object")
    types = {f.name: type(getattr(TrainConfig(), f.name)) for f in fields(TrainConfig)}
    for key, value in raw.items():
        if key not in types:
            raise ConfigError(
                f"{origin}: unknown train key {key!r}; check its spelling "
                f"(known keys: {', '.join(sorted(types))})"
            )
        want = (int, float) if types[key] is float else types[key]
        if not isinstance(value, want) or (isinstance(value, bool) and types[key] is not bool):
            raise ConfigError(
                f"{origin}: train key {key!r} must be {types[key].__name__}, "
                f"got {type(value).__name__} {value!r}"
            )
    cfg = TrainConfig(**{k: (float(v) if types[k] is float else v) for k, v in raw.items()})
    for key, kind in types.items():
        if kind is float and not math.isfinite(getattr(cfg, key)):
            raise ConfigError(
                f"{origin}: train key {key!r} must be finite, got {getattr(cfg, key)}"
            )
    for key in POSITIVE:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{origin}: train key {key!r} must be positive")
    for key in NON_NEGATIVE:
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{origin}: train key {key!r} must not be negative")
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"{origin}: optimizer {cfg.optimizer!r} is not one of {OPTIMIZERS}")
    if cfg.compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(
            f"{origin}: compute_dtype {cfg.compute_dtype!r} is not one of "
            f"{', '.join(COMPUTE_DTYPES)} (bf16 and f16 train with float32 master weights)"
        )
    try:
        parse_checkpoint(cfg.checkpoint)
    except CheckpointError as e:
        raise ConfigError(f"{origin}: train key 'checkpoint': {e}") from None
    if not (0 < cfg.val_fraction < 1 and 0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1):
        raise ConfigError(f"{origin}: val_fraction, beta1 and beta2 must lie in [0, 1)")
    return cfg


def load_train_config(source: str | Path | dict[str, Any]) -> TrainConfig:
    """The ``train`` section of a config (file, built-in name or dict); defaults if absent."""
    raw, origin = read_config(source)
    return parse_train_config(raw.get("train") if isinstance(raw, dict) else None, origin)
