"""Evaluate a model on text: next-token loss and perplexity over fixed windows."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from einplan.errors import EinplanError


def next_token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ``targets`` under ``logits`` (last axis), stable, float32."""
    m = logits.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(axis=-1)) + m[..., 0]
    picked = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - picked


def windows(ids: np.ndarray, window: int, batch: int) -> Iterator[np.ndarray]:
    """Non-overlapping ``(batch, window + 1)`` slices of a token stream (input + target)."""
    n = (len(ids) - 1) // window
    rows = [ids[i * window : i * window + window + 1] for i in range(n)]
    for k in range(0, n, batch):
        yield np.stack(rows[k : k + batch])


@dataclass
class EvalResult:
    """Mean next-token loss over the evaluated tokens and its perplexity."""

    loss: float
    tokens: int

    @property
    def perplexity(self) -> float:
        """exp(loss); ``inf`` when that overflows a float."""
        return math.inf if self.loss > math.log(sys.float_info.max) else math.exp(self.loss)


def evaluate_text(
    forward: Callable[[np.ndarray], np.ndarray],
    ids: np.ndarray,
    window: int,
    batch: int,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Run ``forward`` over windows of ``ids`` and average the next-token loss."""
    total, count = 0.0, 0
    for chunk in windows(ids, window, batch):
        logits = forward(chunk[:, :-1])
        nll = next_token_nll(logits, chunk[:, 1:])
        total += float(nll.sum())
        count += nll.size
        if progress:
            progress(nll.size)
    if count == 0:
        raise EinplanError(f"text too short: need more than {window} tokens for one window")
    return EvalResult(total / count, count)
