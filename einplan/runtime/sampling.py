"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus) and a
repetition penalty, with a seeded generator so that runs repeat exactly."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from einplan.errors import EinplanError


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens; temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise EinplanError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.temperature < 0:
            raise EinplanError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise EinplanError(f"top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise EinplanError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise EinplanError(f"repetition penalty must be > 0, got {self.repetition_penalty}")


def penalize_repeats(logits: np.ndarray, seen: list[list[int]], penalty: float) -> np.ndarray:
    """Make tokens already in each sequence less likely (CTRL-style, as transformers does):
    positive logits divided by ``penalty``, negative ones multiplied."""
    if penalty == 1.0:
        return logits
    logits = logits.copy()
    for row, ids in enumerate(seen):
        idx = np.unique(np.asarray(ids, dtype=np.int64))
        vals = logits[row, idx]
        logits[row, idx] = np.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def filter_top_k_top_p(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Set to -inf every logit outside the top ``k`` and outside the smallest set of tokens
    whose probability reaches ``top_p``."""
    out = logits.copy()
    if top_k and top_k < out.shape[-1]:
        kth = np.partition(out, -top_k, axis=-1)[:, -top_k][:, None]
        out[out < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-out, axis=-1, kind="stable")
        sorted_logits = np.take_along_axis(out, order, axis=-1)
        probs = np.exp(sorted_logits - sorted_logits[:, :1])
        probs /= probs.sum(axis=-1, keepdims=True)
        before = np.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
        drop = before >= top_p
        np.put_along_axis(out, order, np.where(drop, -np.inf, sorted_logits), axis=-1)
    return out


class Sampler:
    """Picks the next token of every sequence in a batch."""

    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def pick(self, logits: np.ndarray, seen: list[list[int]]) -> np.ndarray:
        """Next token ids (batch,) for float32 logits (batch, vocab)."""
        c = self.config
        logits = penalize_repeats(logits, seen, c.repetition_penalty)
        if c.temperature == 0.0:
            return logits.argmax(axis=-1)
        logits = filter_top_k_top_p(logits / np.float32(c.temperature), c.top_k, c.top_p)
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        u = self.rng.random((logits.shape[0], 1), dtype=np.float32)
        picked = (np.cumsum(probs, axis=-1) < u).sum(axis=-1)
        return np.minimum(picked, logits.shape[-1] - 1)
